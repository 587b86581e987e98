/* ztun — compiled L4 authorization policy (Istio AuthorizationPolicy, ztunnel semantics).
 *
 * Python (ztun.policy) compiles a policy set into a flat, versioned blob; this module
 * validates it once (ztun_policy_load) and then evaluates connections against it with
 * no allocation, no locks and no Python. A loaded table is immutable except for its
 * per-policy decision counters (relaxed atomics), so any number of threads may call
 * ztun_policy_eval() on it concurrently; the engine swaps tables RCU-style and frees the
 * old one once no reader can still hold it.
 *
 * Semantics (same as ztun/policy.py, which is the reference model):
 *   1. a matching enforced DENY policy denies;
 *   2. no enforced ALLOW policy applies to the destination -> allow;
 *   3. a matching enforced ALLOW policy allows;
 *   4. otherwise deny.
 * A policy matches when ANY rule matches; a rule when ALL its clauses match; a clause
 * when ANY of its matches matches (an empty match never does, an empty clause always
 * does, a policy without rules never does). Policies are tried in the order namespace
 * group, mesh-wide group, workload-selector group; within a group by "namespace/name".
 * Dry-run policies are evaluated and counted but never change the verdict.
 *
 * The blob format: docs/policy.md and ztun/_policy_compile.py (the only writer).
 */
#ifndef ZTUN_POLICY_H
#define ZTUN_POLICY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ztun_policy;

/* Blob magic and the one format version this build reads. */
#define ZTUN_POLICY_MAGIC "ZTPB"
#define ZTUN_POLICY_VERSION 1

/* ztun_policy_conn.flags */
#define ZTUN_POLICY_F_NOCOUNT 0x1 /* do not touch the counters (re-checks, explain, tests) */

/* dst_workload value that selects the table's default workload (destination unknown). */
#define ZTUN_POLICY_WORKLOAD_DEFAULT (-1)

struct ztun_policy_conn {
	uint8_t src_ip[16];      /* peer address; IPv4 as ::ffff:a.b.c.d */
	uint8_t dst_ip[16];      /* local (destination) address; IPv4 as ::ffff:a.b.c.d */
	uint16_t dst_port;       /* destination port, host order */
	uint16_t flags;          /* ZTUN_POLICY_F_* */
	int32_t dst_workload;    /* ztun_policy_find_workload() result or ZTUN_POLICY_WORKLOAD_DEFAULT */
	const char *peer_id;     /* authenticated "spiffe://td/ns/N/sa/S" (not NUL-terminated
	                            necessarily); NULL for a plaintext peer */
	size_t peer_id_len;
};

enum ztun_policy_reason {
	ZTUN_POLICY_DENIED_BY_POLICY = 1,  /* a DENY policy matched */
	ZTUN_POLICY_ALLOWED_BY_POLICY = 2, /* an ALLOW policy matched */
	ZTUN_POLICY_ALLOWED_NO_ALLOW = 3,  /* no ALLOW policy applies: default allow */
	ZTUN_POLICY_DENIED_NO_MATCH = 4,   /* ALLOW policies apply, none matched: default deny */
};

struct ztun_policy_verdict {
	int32_t allow;           /* 1 allow, 0 deny */
	int32_t reason;          /* enum ztun_policy_reason */
	int32_t policy;          /* deciding policy index, -1 for the defaults */
	int32_t rule;            /* index of the matching rule in that policy, -1 for the defaults */
	/* Dry run: the verdict as if dry-run policies were enforced too. */
	uint32_t dry_run_evaluated; /* dry-run policies that apply (0: the fields below are moot) */
	uint32_t dry_run_matched;   /* how many of them matched */
	int32_t dry_run_allow;      /* would-be verdict */
	int32_t dry_run_policy;     /* dry-run policy that would have decided, or -1 */
	int32_t dry_run_rule;       /* its matching rule, or -1 */
};

struct ztun_policy_counters {
	uint64_t allowed;   /* connections this ALLOW policy allowed (defaults: default allows) */
	uint64_t denied;    /* connections this DENY policy denied (defaults: default denies) */
	uint64_t dry_run;   /* connections this dry-run policy matched */
};

/* Validate and load a compiled blob (copied; the caller may free it afterwards). Safe on
 * arbitrary bytes: every offset, count and string is checked. 0, ZTUN_EPOLICY for a
 * malformed blob, ZTUN_EINVAL for bad arguments, ZTUN_ENOMEM. */
int ztun_policy_load(const void *blob, size_t len, struct ztun_policy **out);
void ztun_policy_free(struct ztun_policy *table);

/* Index of the workload that owns ip16 (HBONE authority / original destination), or
 * ZTUN_ENOTFOUND. Binary search; no allocation. */
int ztun_policy_find_workload(const struct ztun_policy *table, const uint8_t ip16[16]);

/* Index of the workload named "namespace/name", or ZTUN_ENOTFOUND. Linear: meant for
 * re-resolving a listener's workload when a new table is swapped in (indices are only
 * valid within the table that produced them). */
int ztun_policy_find_workload_by_name(const struct ztun_policy *table, const char *key,
				      size_t key_len);

/* Decide one connection. 0 or ZTUN_EINVAL (NULL argument, dst_workload out of range). */
int ztun_policy_eval(const struct ztun_policy *table, const struct ztun_policy_conn *conn,
		     struct ztun_policy_verdict *out);

/* Introspection, for logs, metrics and the Python binding. Strings live as long as the
 * table and are NUL-terminated. */
uint32_t ztun_policy_count(const struct ztun_policy *table);
const char *ztun_policy_name(const struct ztun_policy *table, int32_t idx); /* "ns/name"; NULL if out of range */
int ztun_policy_is_dry_run(const struct ztun_policy *table, int32_t idx);
int ztun_policy_is_deny(const struct ztun_policy *table, int32_t idx);
uint32_t ztun_policy_workload_count(const struct ztun_policy *table); /* includes the default */
const char *ztun_policy_workload_name(const struct ztun_policy *table, int32_t idx);

/* Counters of policy idx (-1: the default allow/deny decisions). Relaxed reads. */
int ztun_policy_counters(const struct ztun_policy *table, int32_t idx,
			 struct ztun_policy_counters *out);
/* Add the counters of every policy of src to the policy of the same name in dst (and the
 * defaults to the defaults): carries totals across a swap. Linear merge (keys are sorted). */
void ztun_policy_counters_carry(struct ztun_policy *dst, const struct ztun_policy *src);

#ifdef __cplusplus
}
#endif

#endif
