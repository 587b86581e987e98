/* Compiled L4 authorization policy: blob validation and per-connection evaluation.
 *
 * Rule 1: ztun_policy_load() is the only place that trusts nothing. Every offset, count,
 *         index and string of the blob is checked there, once; after it returns 0 the
 *         evaluator indexes the table without checks.
 * Rule 2: evaluation never allocates, locks or writes anything but the relaxed counters.
 * Rule 3: the reference semantics live in ztun/policy.py; this file must agree with it
 *         bit for bit (tests/core/test_policy_c.py runs both on the same corpus and on
 *         random policy sets).
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "ztun/policy.h"
#include "ztun/ztun.h"

/* ---- blob layout (little-endian; all integers are u32 unless said otherwise) ---- */

enum {
	SEC_POLICIES,
	SEC_RULES,
	SEC_CLAUSES,
	SEC_MATCHES,
	SEC_STRMATCH,
	SEC_SAMATCH,
	SEC_CIDRS,
	SEC_PORTS,
	SEC_GROUPS,
	SEC_GROUP_IDX,
	SEC_WORKLOADS,
	SEC_IPMAP,
	SEC_STRINGS,
	SEC_COUNT,
};

/* Match fields, in the order of their (first, count) pairs in a match record. */
enum {
	F_PRINCIPALS,
	F_NOT_PRINCIPALS,
	F_NAMESPACES,
	F_NOT_NAMESPACES,
	F_SERVICE_ACCOUNTS,
	F_NOT_SERVICE_ACCOUNTS,
	F_SOURCE_IPS,
	F_NOT_SOURCE_IPS,
	F_DESTINATION_IPS,
	F_NOT_DESTINATION_IPS,
	F_DESTINATION_PORTS,
	F_NOT_DESTINATION_PORTS,
	F_COUNT,
};

struct blob_header {
	char magic[4];
	uint16_t version;
	uint16_t header_size;
	uint32_t total_size;
	uint32_t n_sections;
};

struct blob_section {
	uint32_t offset;
	uint32_t count;
	uint32_t entry_size;
};

struct rec_policy {
	uint32_t key_off, key_len; /* "namespace/name" */
	uint8_t action;            /* 0 ALLOW, 1 DENY */
	uint8_t flags;             /* POLICY_DRY_RUN */
	uint8_t scope;             /* 0 global, 1 namespace, 2 workload selector (informative) */
	uint8_t pad;
	uint32_t rule_first, rule_count;
};

struct rec_range {
	uint32_t first, count;
};

struct rec_match {
	struct rec_range f[F_COUNT];
};

struct rec_strmatch {
	uint8_t kind; /* STRM_* */
	uint8_t pad[3];
	uint32_t off, len;
};

struct rec_samatch {
	uint32_t ns_off, ns_len, sa_off, sa_len;
};

struct rec_cidr {
	uint8_t addr[16]; /* IPv4 as ::ffff:a.b.c.d with prefix 96 + n */
	uint8_t prefix;   /* 0..128 */
	uint8_t family;   /* 4 or 6: a v4 CIDR only matches v4 peers, a v6 one only v6 peers */
	uint8_t pad[2];
};

struct rec_group {
	uint32_t first; /* into SEC_GROUP_IDX: n_deny DENY, then n_allow ALLOW, then n_dry dry-run */
	uint32_t n_deny, n_allow, n_dry;
};

#define GROUP_NONE UINT32_MAX
#define WL_GROUPS 3 /* namespace, mesh-wide, selector: the order ztunnel chains them in */

struct rec_workload {
	uint32_t key_off, key_len; /* "namespace/name" ("" for the implicit default) */
	uint32_t groups[WL_GROUPS];
	uint32_t flags;
};

struct rec_ipmap {
	uint8_t ip[16];
	uint32_t workload;
};

enum { ACTION_ALLOW = 0, ACTION_DENY = 1 };
#define POLICY_DRY_RUN 0x1
enum { STRM_EXACT = 0, STRM_PREFIX = 1, STRM_SUFFIX = 2, STRM_PRESENCE = 3 };

/* The records above are read in place from an aligned private copy, so their sizes are
 * part of the format: pin them. */
_Static_assert(sizeof(struct blob_header) == 16, "header layout");
_Static_assert(sizeof(struct blob_section) == 12, "section layout");
_Static_assert(sizeof(struct rec_policy) == 20, "policy layout");
_Static_assert(sizeof(struct rec_match) == 96, "match layout");
_Static_assert(sizeof(struct rec_strmatch) == 12, "strmatch layout");
_Static_assert(sizeof(struct rec_samatch) == 16, "samatch layout");
_Static_assert(sizeof(struct rec_cidr) == 20, "cidr layout");
_Static_assert(sizeof(struct rec_group) == 16, "group layout");
_Static_assert(sizeof(struct rec_workload) == 24, "workload layout");
_Static_assert(sizeof(struct rec_ipmap) == 20, "ipmap layout");

static const uint32_t entry_sizes[SEC_COUNT] = {
	[SEC_POLICIES] = sizeof(struct rec_policy),
	[SEC_RULES] = sizeof(struct rec_range),
	[SEC_CLAUSES] = sizeof(struct rec_range),
	[SEC_MATCHES] = sizeof(struct rec_match),
	[SEC_STRMATCH] = sizeof(struct rec_strmatch),
	[SEC_SAMATCH] = sizeof(struct rec_samatch),
	[SEC_CIDRS] = sizeof(struct rec_cidr),
	[SEC_PORTS] = sizeof(uint32_t),
	[SEC_GROUPS] = sizeof(struct rec_group),
	[SEC_GROUP_IDX] = sizeof(uint32_t),
	[SEC_WORKLOADS] = sizeof(struct rec_workload),
	[SEC_IPMAP] = sizeof(struct rec_ipmap),
	[SEC_STRINGS] = 1,
};

/* Which pool each match field indexes. */
static const int field_pool[F_COUNT] = {
	[F_PRINCIPALS] = SEC_STRMATCH,        [F_NOT_PRINCIPALS] = SEC_STRMATCH,
	[F_NAMESPACES] = SEC_STRMATCH,        [F_NOT_NAMESPACES] = SEC_STRMATCH,
	[F_SERVICE_ACCOUNTS] = SEC_SAMATCH,   [F_NOT_SERVICE_ACCOUNTS] = SEC_SAMATCH,
	[F_SOURCE_IPS] = SEC_CIDRS,           [F_NOT_SOURCE_IPS] = SEC_CIDRS,
	[F_DESTINATION_IPS] = SEC_CIDRS,      [F_NOT_DESTINATION_IPS] = SEC_CIDRS,
	[F_DESTINATION_PORTS] = SEC_PORTS,    [F_NOT_DESTINATION_PORTS] = SEC_PORTS,
};

struct counter {
	_Atomic uint64_t allowed, denied, dry_run;
};

struct ztun_policy {
	void *mem; /* private, aligned copy of the blob */
	size_t len;
	const struct rec_policy *policies;
	const struct rec_range *rules;
	const struct rec_range *clauses;
	const struct rec_match *matches;
	const struct rec_strmatch *strm;
	const struct rec_samatch *sam;
	const struct rec_cidr *cidrs;
	const uint32_t *ports;
	const struct rec_group *groups;
	const uint32_t *group_idx;
	const struct rec_workload *workloads;
	const struct rec_ipmap *ipmap;
	const char *strings;
	uint32_t n[SEC_COUNT];
	/* n_policies + 1 entries; the last counts the default decisions. Written through a
	 * const table: the only mutable state, hence a separate allocation. */
	struct counter *counters;
};

/* ---- validation ---- */

static bool range_ok(uint32_t first, uint32_t count, uint32_t n)
{
	return (uint64_t)first + count <= n;
}

static bool str_ok(const struct ztun_policy *t, uint32_t off, uint32_t len)
{
	/* room for the terminating NUL, which must be there so names can be handed out */
	return (uint64_t)off + len < t->n[SEC_STRINGS] && t->strings[(size_t)off + len] == '\0';
}

static int key_cmp(const struct ztun_policy *t, const struct rec_policy *a, const struct rec_policy *b)
{
	uint32_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
	int c = memcmp(t->strings + a->key_off, t->strings + b->key_off, n);
	if (c)
		return c;
	return (a->key_len > b->key_len) - (a->key_len < b->key_len);
}

static int validate(struct ztun_policy *t)
{
	uint32_t i, j;

	for (i = 0; i < t->n[SEC_POLICIES]; i++) {
		const struct rec_policy *p = &t->policies[i];
		if (!str_ok(t, p->key_off, p->key_len) || p->action > ACTION_DENY ||
		    (p->flags & ~POLICY_DRY_RUN) || p->scope > 2 ||
		    !range_ok(p->rule_first, p->rule_count, t->n[SEC_RULES]))
			return ZTUN_EPOLICY;
		/* strictly sorted keys: unique names, and a linear counter carry-over */
		if (i && key_cmp(t, &t->policies[i - 1], p) >= 0)
			return ZTUN_EPOLICY;
	}
	for (i = 0; i < t->n[SEC_RULES]; i++)
		if (!range_ok(t->rules[i].first, t->rules[i].count, t->n[SEC_CLAUSES]))
			return ZTUN_EPOLICY;
	for (i = 0; i < t->n[SEC_CLAUSES]; i++)
		if (!range_ok(t->clauses[i].first, t->clauses[i].count, t->n[SEC_MATCHES]))
			return ZTUN_EPOLICY;
	for (i = 0; i < t->n[SEC_MATCHES]; i++)
		for (j = 0; j < F_COUNT; j++) {
			const struct rec_range *r = &t->matches[i].f[j];
			if (!range_ok(r->first, r->count, t->n[field_pool[j]]))
				return ZTUN_EPOLICY;
		}
	for (i = 0; i < t->n[SEC_STRMATCH]; i++) {
		const struct rec_strmatch *s = &t->strm[i];
		if (s->kind > STRM_PRESENCE || !str_ok(t, s->off, s->len))
			return ZTUN_EPOLICY;
	}
	for (i = 0; i < t->n[SEC_SAMATCH]; i++) {
		const struct rec_samatch *s = &t->sam[i];
		if (!str_ok(t, s->ns_off, s->ns_len) || !str_ok(t, s->sa_off, s->sa_len))
			return ZTUN_EPOLICY;
	}
	for (i = 0; i < t->n[SEC_CIDRS]; i++) {
		const struct rec_cidr *c = &t->cidrs[i];
		if (c->prefix > 128 || (c->family != 4 && c->family != 6))
			return ZTUN_EPOLICY;
	}
	for (i = 0; i < t->n[SEC_PORTS]; i++)
		if (t->ports[i] > UINT16_MAX)
			return ZTUN_EPOLICY;
	for (i = 0; i < t->n[SEC_GROUPS]; i++) {
		const struct rec_group *g = &t->groups[i];
		uint64_t total = (uint64_t)g->n_deny + g->n_allow + g->n_dry;
		if ((uint64_t)g->first + total > t->n[SEC_GROUP_IDX])
			return ZTUN_EPOLICY;
		for (j = 0; j < total; j++) {
			uint32_t pi = t->group_idx[g->first + j];
			if (pi >= t->n[SEC_POLICIES])
				return ZTUN_EPOLICY;
			const struct rec_policy *p = &t->policies[pi];
			bool dry = p->flags & POLICY_DRY_RUN;
			/* the evaluator trusts the partition: check it matches the policies */
			if (j < g->n_deny ? (dry || p->action != ACTION_DENY) :
			    j < (uint64_t)g->n_deny + g->n_allow ? (dry || p->action != ACTION_ALLOW) :
			    !dry)
				return ZTUN_EPOLICY;
		}
	}
	if (t->n[SEC_WORKLOADS] < 1) /* the last workload is the default one */
		return ZTUN_EPOLICY;
	for (i = 0; i < t->n[SEC_WORKLOADS]; i++) {
		const struct rec_workload *w = &t->workloads[i];
		if (!str_ok(t, w->key_off, w->key_len))
			return ZTUN_EPOLICY;
		for (j = 0; j < WL_GROUPS; j++)
			if (w->groups[j] != GROUP_NONE && w->groups[j] >= t->n[SEC_GROUPS])
				return ZTUN_EPOLICY;
	}
	for (i = 0; i < t->n[SEC_IPMAP]; i++) {
		if (t->ipmap[i].workload >= t->n[SEC_WORKLOADS])
			return ZTUN_EPOLICY;
		/* strictly ascending: binary search needs it, and an IP has one owner */
		if (i && memcmp(t->ipmap[i - 1].ip, t->ipmap[i].ip, 16) >= 0)
			return ZTUN_EPOLICY;
	}
	return 0;
}

int ztun_policy_load(const void *blob, size_t len, struct ztun_policy **out)
{
	struct blob_header h;
	struct blob_section sec[SEC_COUNT];
	struct ztun_policy *t;
	int i, rc;

	if (!out || (!blob && len))
		return ZTUN_EINVAL;
	*out = NULL;
	if (len < sizeof(h) || len > UINT32_MAX)
		return ZTUN_EPOLICY;
	memcpy(&h, blob, sizeof(h));
	if (memcmp(h.magic, ZTUN_POLICY_MAGIC, 4) || h.version != ZTUN_POLICY_VERSION ||
	    h.total_size != len || h.n_sections != SEC_COUNT ||
	    h.header_size != sizeof(h) + sizeof(sec) || h.header_size > len)
		return ZTUN_EPOLICY;
	memcpy(sec, (const char *)blob + sizeof(h), sizeof(sec));
	for (i = 0; i < SEC_COUNT; i++) {
		uint64_t end = (uint64_t)sec[i].offset + (uint64_t)sec[i].count * sec[i].entry_size;
		/* sections are 8-aligned so records can be read in place from the aligned copy */
		if (sec[i].entry_size != entry_sizes[i] || sec[i].offset < h.header_size ||
		    (sec[i].offset & 7) || end > len)
			return ZTUN_EPOLICY;
	}

	t = calloc(1, sizeof(*t));
	if (!t)
		return ZTUN_ENOMEM;
	/* malloc's alignment (>= 8) plus 8-aligned section offsets: every record is aligned */
	t->mem = malloc(len);
	if (!t->mem) {
		free(t);
		return ZTUN_ENOMEM;
	}
	memcpy(t->mem, blob, len);
	t->len = len;
	for (i = 0; i < SEC_COUNT; i++)
		t->n[i] = sec[i].count;
	const char *base = t->mem;
	t->policies = (const void *)(base + sec[SEC_POLICIES].offset);
	t->rules = (const void *)(base + sec[SEC_RULES].offset);
	t->clauses = (const void *)(base + sec[SEC_CLAUSES].offset);
	t->matches = (const void *)(base + sec[SEC_MATCHES].offset);
	t->strm = (const void *)(base + sec[SEC_STRMATCH].offset);
	t->sam = (const void *)(base + sec[SEC_SAMATCH].offset);
	t->cidrs = (const void *)(base + sec[SEC_CIDRS].offset);
	t->ports = (const void *)(base + sec[SEC_PORTS].offset);
	t->groups = (const void *)(base + sec[SEC_GROUPS].offset);
	t->group_idx = (const void *)(base + sec[SEC_GROUP_IDX].offset);
	t->workloads = (const void *)(base + sec[SEC_WORKLOADS].offset);
	t->ipmap = (const void *)(base + sec[SEC_IPMAP].offset);
	t->strings = base + sec[SEC_STRINGS].offset;

	rc = validate(t);
	if (rc == 0) {
		t->counters = calloc((size_t)t->n[SEC_POLICIES] + 1, sizeof(*t->counters));
		if (!t->counters)
			rc = ZTUN_ENOMEM;
	}
	if (rc) {
		ztun_policy_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

void ztun_policy_free(struct ztun_policy *t)
{
	if (!t)
		return;
	free(t->counters);
	free(t->mem);
	free(t);
}

/* ---- evaluation ---- */

/* What the evaluator needs to know about the peer, parsed once per connection. */
struct peer {
	const char *principal; /* the SPIFFE ID without "spiffe://"; NULL: no principal */
	size_t principal_len;
	const char *ns; /* "" unless the ID has the form td/ns/<ns>/sa/<sa> */
	size_t ns_len;
	const char *sa; /* NULL unless that form */
	size_t sa_len;
};

#define SPIFFE_PREFIX "spiffe://"
#define SPIFFE_PREFIX_LEN (sizeof(SPIFFE_PREFIX) - 1)

static void parse_peer(const struct ztun_policy_conn *c, struct peer *p)
{
	const char *seg[5];
	size_t seglen[5];
	size_t i, start, n = 0;

	p->principal = NULL;
	p->principal_len = 0;
	p->ns = "";
	p->ns_len = 0;
	p->sa = NULL;
	p->sa_len = 0;
	/* ztunnel matches principals against the ID minus "spiffe://" and fails if absent */
	if (!c->peer_id || c->peer_id_len < SPIFFE_PREFIX_LEN ||
	    memcmp(c->peer_id, SPIFFE_PREFIX, SPIFFE_PREFIX_LEN))
		return;
	p->principal = c->peer_id + SPIFFE_PREFIX_LEN;
	p->principal_len = c->peer_id_len - SPIFFE_PREFIX_LEN;
	/* exactly five '/'-separated segments: td / "ns" / <ns> / "sa" / <sa> */
	for (i = 0, start = 0; i <= p->principal_len; i++) {
		if (i < p->principal_len && p->principal[i] != '/')
			continue;
		if (n == 5)
			return;
		seg[n] = p->principal + start;
		seglen[n] = i - start;
		n++;
		start = i + 1;
	}
	if (n != 5 || seglen[1] != 2 || memcmp(seg[1], "ns", 2) || seglen[3] != 2 ||
	    memcmp(seg[3], "sa", 2))
		return;
	p->ns = seg[2];
	p->ns_len = seglen[2];
	p->sa = seg[4];
	p->sa_len = seglen[4];
}

static bool str_match(const struct ztun_policy *t, const struct rec_strmatch *m, const char *s,
		      size_t len)
{
	const char *v = t->strings + m->off;

	switch (m->kind) {
	case STRM_EXACT:
		return len == m->len && !memcmp(s, v, len);
	case STRM_PREFIX:
		return len >= m->len && !memcmp(s, v, m->len);
	case STRM_SUFFIX:
		return len >= m->len && !memcmp(s + len - m->len, v, m->len);
	default: /* STRM_PRESENCE */
		return len > 0;
	}
}

static bool cidr_match(const struct rec_cidr *c, const uint8_t ip[16])
{
	static const uint8_t v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	bool is_v4 = !memcmp(ip, v4mapped, sizeof(v4mapped));
	unsigned full = c->prefix / 8, rest = c->prefix % 8;

	/* ztunnel canonicalizes addresses: an IPv4 peer never matches an IPv6 CIDR (not even
	 * ::/0 or ::ffff:0:0/96), and an IPv6 peer never an IPv4 one */
	if (is_v4 != (c->family == 4))
		return false;
	if (memcmp(ip, c->addr, full))
		return false;
	if (rest) {
		uint8_t mask = (uint8_t)(0xff00 >> rest);
		if ((ip[full] & mask) != (c->addr[full] & mask))
			return false;
	}
	return true;
}

struct ctx {
	const struct ztun_policy *t;
	const struct ztun_policy_conn *c;
	struct peer peer;
};

static bool field_one(const struct ctx *x, int field, uint32_t i)
{
	const struct ztun_policy *t = x->t;

	switch (field) {
	case F_PRINCIPALS:
	case F_NOT_PRINCIPALS:
		return x->peer.principal &&
		       str_match(t, &t->strm[i], x->peer.principal, x->peer.principal_len);
	case F_NAMESPACES:
	case F_NOT_NAMESPACES:
		return str_match(t, &t->strm[i], x->peer.ns, x->peer.ns_len);
	case F_SERVICE_ACCOUNTS:
	case F_NOT_SERVICE_ACCOUNTS: {
		const struct rec_samatch *s = &t->sam[i];
		return x->peer.sa && s->ns_len == x->peer.ns_len && s->sa_len == x->peer.sa_len &&
		       !memcmp(t->strings + s->ns_off, x->peer.ns, s->ns_len) &&
		       !memcmp(t->strings + s->sa_off, x->peer.sa, s->sa_len);
	}
	case F_SOURCE_IPS:
	case F_NOT_SOURCE_IPS:
		return cidr_match(&t->cidrs[i], x->c->src_ip);
	case F_DESTINATION_IPS:
	case F_NOT_DESTINATION_IPS:
		return cidr_match(&t->cidrs[i], x->c->dst_ip);
	default: /* ports */
		return t->ports[i] == x->c->dst_port;
	}
}

static bool field_any(const struct ctx *x, int field, const struct rec_range *r)
{
	for (uint32_t i = 0; i < r->count; i++)
		if (field_one(x, field, r->first + i))
			return true;
	return false;
}

static bool match_matches(const struct ctx *x, const struct rec_match *m)
{
	bool empty = true;

	/* positive lists: ANY must match; negative lists: NONE may match */
	for (int f = 0; f < F_COUNT; f += 2) {
		const struct rec_range *pos = &m->f[f], *neg = &m->f[f + 1];
		if (pos->count) {
			empty = false;
			if (!field_any(x, f, pos))
				return false;
		}
		if (neg->count) {
			empty = false;
			if (field_any(x, f + 1, neg))
				return false;
		}
	}
	return !empty; /* ztunnel skips an empty match: it never matches */
}

/* Index of the first matching rule, or -1. */
static int32_t policy_matches(const struct ctx *x, const struct rec_policy *p)
{
	const struct ztun_policy *t = x->t;

	for (uint32_t r = 0; r < p->rule_count; r++) {
		const struct rec_range *rule = &t->rules[p->rule_first + r];
		bool rule_ok = true;
		for (uint32_t c = 0; c < rule->count && rule_ok; c++) {
			const struct rec_range *clause = &t->clauses[rule->first + c];
			bool clause_ok = clause->count == 0; /* an empty clause always matches */
			for (uint32_t m = 0; m < clause->count && !clause_ok; m++)
				clause_ok = match_matches(x, &t->matches[clause->first + m]);
			rule_ok = clause_ok;
		}
		if (rule_ok)
			return (int32_t)r;
	}
	return -1;
}

int ztun_policy_eval(const struct ztun_policy *t, const struct ztun_policy_conn *c,
		     struct ztun_policy_verdict *out)
{
	const struct rec_group *g[WL_GROUPS];
	const struct rec_workload *w;
	struct ctx x;
	uint32_t n_allow = 0;
	int ng = 0, i;
	int32_t wl;
	bool count;

	if (!t || !c || !out)
		return ZTUN_EINVAL;
	wl = c->dst_workload;
	if (wl == ZTUN_POLICY_WORKLOAD_DEFAULT)
		wl = (int32_t)t->n[SEC_WORKLOADS] - 1;
	if (wl < 0 || (uint32_t)wl >= t->n[SEC_WORKLOADS])
		return ZTUN_EINVAL;
	w = &t->workloads[wl];
	for (i = 0; i < WL_GROUPS; i++)
		if (w->groups[i] != GROUP_NONE)
			g[ng++] = &t->groups[w->groups[i]];

	x.t = t;
	x.c = c;
	parse_peer(c, &x.peer);
	count = !(c->flags & ZTUN_POLICY_F_NOCOUNT);

	*out = (struct ztun_policy_verdict){ .policy = -1, .rule = -1, .dry_run_policy = -1,
					     .dry_run_rule = -1 };

	/* 1. any matching DENY denies */
	for (i = 0; i < ng && out->policy < 0; i++)
		for (uint32_t k = 0; k < g[i]->n_deny; k++) {
			uint32_t pi = t->group_idx[g[i]->first + k];
			int32_t r = policy_matches(&x, &t->policies[pi]);
			if (r >= 0) {
				out->allow = 0;
				out->reason = ZTUN_POLICY_DENIED_BY_POLICY;
				out->policy = (int32_t)pi;
				out->rule = r;
				break;
			}
		}
	if (out->policy < 0) {
		for (i = 0; i < ng; i++)
			n_allow += g[i]->n_allow;
		/* 2. no ALLOW policy applies: allow; 3. a matching ALLOW allows; 4. deny */
		out->allow = n_allow == 0;
		out->reason = n_allow ? ZTUN_POLICY_DENIED_NO_MATCH : ZTUN_POLICY_ALLOWED_NO_ALLOW;
		for (i = 0; i < ng && out->policy < 0; i++)
			for (uint32_t k = 0; k < g[i]->n_allow; k++) {
				uint32_t pi = t->group_idx[g[i]->first + g[i]->n_deny + k];
				int32_t r = policy_matches(&x, &t->policies[pi]);
				if (r >= 0) {
					out->allow = 1;
					out->reason = ZTUN_POLICY_ALLOWED_BY_POLICY;
					out->policy = (int32_t)pi;
					out->rule = r;
					break;
				}
			}
	}

	/* Dry run: evaluate every dry-run policy (each match is counted), then work out
	 * what the verdict would be if they were enforced as well. */
	int32_t dry_deny = -1, dry_deny_rule = -1, dry_allow = -1, dry_allow_rule = -1;
	uint32_t n_dry_allow = 0;
	for (i = 0; i < ng; i++) {
		out->dry_run_evaluated += g[i]->n_dry;
		for (uint32_t k = 0; k < g[i]->n_dry; k++) {
			uint32_t pi = t->group_idx[g[i]->first + g[i]->n_deny + g[i]->n_allow + k];
			const struct rec_policy *p = &t->policies[pi];
			int32_t r = policy_matches(&x, p);
			if (p->action == ACTION_ALLOW)
				n_dry_allow++;
			if (r < 0)
				continue;
			out->dry_run_matched++;
			if (count)
				atomic_fetch_add_explicit(&t->counters[pi].dry_run, 1,
							  memory_order_relaxed);
			if (p->action == ACTION_DENY && dry_deny < 0) {
				dry_deny = (int32_t)pi;
				dry_deny_rule = r;
			} else if (p->action == ACTION_ALLOW && dry_allow < 0) {
				dry_allow = (int32_t)pi;
				dry_allow_rule = r;
			}
		}
	}
	if (out->reason == ZTUN_POLICY_DENIED_BY_POLICY) {
		out->dry_run_allow = 0; /* an enforced DENY still wins */
	} else if (dry_deny >= 0) {
		out->dry_run_allow = 0;
		out->dry_run_policy = dry_deny;
		out->dry_run_rule = dry_deny_rule;
	} else if (out->reason == ZTUN_POLICY_ALLOWED_BY_POLICY) {
		out->dry_run_allow = 1;
	} else if (dry_allow >= 0) {
		out->dry_run_allow = 1;
		out->dry_run_policy = dry_allow;
		out->dry_run_rule = dry_allow_rule;
	} else {
		/* no ALLOW matched: allowed only if no ALLOW policy, enforced or not, applies */
		out->dry_run_allow = n_allow + n_dry_allow == 0;
	}

	if (count) {
		struct counter *ctr = &t->counters[out->policy >= 0 ? (uint32_t)out->policy :
								      t->n[SEC_POLICIES]];
		if (out->allow)
			atomic_fetch_add_explicit(&ctr->allowed, 1, memory_order_relaxed);
		else
			atomic_fetch_add_explicit(&ctr->denied, 1, memory_order_relaxed);
	}
	return 0;
}

int ztun_policy_find_workload(const struct ztun_policy *t, const uint8_t ip16[16])
{
	uint32_t lo = 0, hi;

	if (!t || !ip16)
		return ZTUN_EINVAL;
	hi = t->n[SEC_IPMAP];
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		int c = memcmp(t->ipmap[mid].ip, ip16, 16);
		if (c == 0)
			return (int)t->ipmap[mid].workload;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return ZTUN_ENOTFOUND;
}

int ztun_policy_find_workload_by_name(const struct ztun_policy *t, const char *key,
				      size_t key_len)
{
	if (!t || (!key && key_len))
		return ZTUN_EINVAL;
	/* the last entry is the unnamed default: never found by name */
	for (uint32_t i = 0; i + 1 < t->n[SEC_WORKLOADS]; i++) {
		const struct rec_workload *w = &t->workloads[i];
		if (w->key_len == key_len && !memcmp(t->strings + w->key_off, key, key_len))
			return (int)i;
	}
	return ZTUN_ENOTFOUND;
}

/* ---- introspection and counters ---- */

uint32_t ztun_policy_count(const struct ztun_policy *t)
{
	return t ? t->n[SEC_POLICIES] : 0;
}

const char *ztun_policy_name(const struct ztun_policy *t, int32_t idx)
{
	if (!t || idx < 0 || (uint32_t)idx >= t->n[SEC_POLICIES])
		return NULL;
	return t->strings + t->policies[idx].key_off;
}

int ztun_policy_is_dry_run(const struct ztun_policy *t, int32_t idx)
{
	if (!t || idx < 0 || (uint32_t)idx >= t->n[SEC_POLICIES])
		return ZTUN_EINVAL;
	return t->policies[idx].flags & POLICY_DRY_RUN ? 1 : 0;
}

int ztun_policy_is_deny(const struct ztun_policy *t, int32_t idx)
{
	if (!t || idx < 0 || (uint32_t)idx >= t->n[SEC_POLICIES])
		return ZTUN_EINVAL;
	return t->policies[idx].action == ACTION_DENY;
}

uint32_t ztun_policy_workload_count(const struct ztun_policy *t)
{
	return t ? t->n[SEC_WORKLOADS] : 0;
}

const char *ztun_policy_workload_name(const struct ztun_policy *t, int32_t idx)
{
	if (!t || idx < 0 || (uint32_t)idx >= t->n[SEC_WORKLOADS])
		return NULL;
	return t->strings + t->workloads[idx].key_off;
}

int ztun_policy_counters(const struct ztun_policy *t, int32_t idx, struct ztun_policy_counters *out)
{
	const struct counter *c;

	if (!t || !out || idx < -1 || (idx >= 0 && (uint32_t)idx >= t->n[SEC_POLICIES]))
		return ZTUN_EINVAL;
	c = &t->counters[idx < 0 ? t->n[SEC_POLICIES] : (uint32_t)idx];
	out->allowed = atomic_load_explicit(&c->allowed, memory_order_relaxed);
	out->denied = atomic_load_explicit(&c->denied, memory_order_relaxed);
	out->dry_run = atomic_load_explicit(&c->dry_run, memory_order_relaxed);
	return 0;
}

static void counter_add(struct counter *dst, const struct counter *src)
{
	atomic_fetch_add_explicit(&dst->allowed,
				  atomic_load_explicit(&src->allowed, memory_order_relaxed),
				  memory_order_relaxed);
	atomic_fetch_add_explicit(&dst->denied,
				  atomic_load_explicit(&src->denied, memory_order_relaxed),
				  memory_order_relaxed);
	atomic_fetch_add_explicit(&dst->dry_run,
				  atomic_load_explicit(&src->dry_run, memory_order_relaxed),
				  memory_order_relaxed);
}

void ztun_policy_counters_carry(struct ztun_policy *dst, const struct ztun_policy *src)
{
	uint32_t i = 0, j = 0;

	if (!dst || !src)
		return;
	counter_add(&dst->counters[dst->n[SEC_POLICIES]], &src->counters[src->n[SEC_POLICIES]]);
	/* both key lists are strictly sorted (checked at load): merge-join by name */
	while (i < dst->n[SEC_POLICIES] && j < src->n[SEC_POLICIES]) {
		const struct rec_policy *a = &dst->policies[i], *b = &src->policies[j];
		uint32_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
		int c = memcmp(dst->strings + a->key_off, src->strings + b->key_off, n);
		if (!c)
			c = (a->key_len > b->key_len) - (a->key_len < b->key_len);
		if (c == 0)
			counter_add(&dst->counters[i++], &src->counters[j++]);
		else if (c < 0)
			i++;
		else
			j++;
	}
}
