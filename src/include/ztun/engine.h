/* ztun engine — worker threads that relay bytes between sockets.
 *
 * The engine owns N worker threads, each with its own epoll loop. Everything a
 * caller asks of it (add a listener, swap a TLS context, stop) goes through a
 * per-worker command queue; everything it reports comes back through per-worker
 * atomic counters and a bounded event ring whose readiness is signalled on an
 * eventfd (so an asyncio loop can add_reader() it). No function here ever calls
 * back into the caller, and no worker ever waits for the caller.
 *
 * All functions return 0 or a negative error (see ztun.h).
 */
#ifndef ZTUN_ENGINE_H
#define ZTUN_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "ztun/tls.h"
#include "ztun/ztun.h"

typedef struct ztun_engine ztun_engine;
typedef struct ztun_tls_ctx ztun_tls_ctx; /* see tls.h */
typedef struct ztun_policy ztun_policy;   /* see policy.h */
struct ztun_policy_counters;              /* see policy.h */

struct ztun_engine_config {
	int workers;                   /* 0: one per online CPU */
	uint32_t connect_timeout_ms;   /* 0: default 10 s */
	uint32_t handshake_timeout_ms; /* 0: default 10 s */
	uint32_t idle_timeout_ms;      /* 0: never */
	uint32_t event_ring_bytes;     /* per worker; 0: default 1 MiB */
	uint32_t buf_small;            /* 0: default, see buf.h */
	uint32_t buf_large;            /* 0: default, see buf.h */
	uint32_t events;               /* ZTUN_EVMASK_* bits: which events to emit */
	uint32_t splice_pipe;          /* TCP-to-TCP legs: splice(2) through pipes of this
	                                * many bytes; 0: copy through buffers */
	uint32_t spin_us;              /* after work, poll this long before sleeping; 0: never */
};

/* What a listener does with the connections it accepts. */
enum ztun_listener_mode {
	ZTUN_MODE_FORWARD = 1, /* plaintext in, plaintext to the upstream */
	ZTUN_MODE_TLS_OUT = 2, /* plaintext in, mutual TLS to the upstream (client side) */
	ZTUN_MODE_TLS_IN = 3,  /* mutual TLS in (server side), plaintext to the upstream */
	ZTUN_MODE_HBONE_IN = 4,  /* mutual TLS + HTTP/2 CONNECT in, plaintext to the authority */
	ZTUN_MODE_HBONE_OUT = 5, /* plaintext in, HTTP/2 CONNECT over pooled mutual TLS out */
	ZTUN_MODE_SOCKS5 = 6,    /* plaintext SOCKS5 in; the destination is routed (directory) */
};

struct ztun_listener_spec {
	int mode;                        /* enum ztun_listener_mode */
	int fd;                          /* a listening socket made by the caller (in-pod), or -1 */
	struct sockaddr_storage bind;    /* where to listen when fd < 0 */
	socklen_t bind_len;
	int backlog;                     /* 0: SOMAXCONN */
	struct sockaddr_storage upstream; /* where accepted connections go */
	socklen_t upstream_len;
	ztun_tls_ctx *tls;               /* TLS_* and HBONE_* modes; the listener takes a reference */
	/* The destination workload policy judges this listener's connections as: an index in
	 * the table in force, or -1 for the table's default workload. Prefer workload_key. */
	int32_t workload;
	uint32_t flags;                  /* ZTUN_LISTENER_* */
	/* HBONE_OUT: the inner CONNECT target when different from upstream (e.g. a
	 * workload ip:port reached through its node's ip:15008); family 0 = upstream. */
	struct sockaddr_storage target;
	socklen_t target_len;
	/* TLS_OUT / HBONE_OUT: the SPIFFE IDs the server may present (any of them);
	 * none: any identity of a trusted trust domain. */
	const char *const *expect;
	int nexpect;
	/* HBONE_OUT: the baggage header sent with each CONNECT (NULL: none). */
	const char *baggage;
	/* HBONE_IN: the workload addresses this node serves (16-byte IPv6, IPv4 mapped);
	 * a CONNECT to any other address is answered 400. */
	const uint8_t (*workload_ips)[16];
	int nworkload_ips;
	/* Policy: the destination workload by name ("namespace/name"), looked up in each
	 * table swapped in (indices change between tables); a table that does not know it
	 * judges the connections as its default workload. NULL: use `workload`.
	 * HBONE_IN: the CONNECT authority's workload in the table wins when it has one. */
	const char *workload_key;
};

enum {
	/* Apply the engine's policy table to connections of this listener. */
	ZTUN_LISTENER_POLICY = 1u << 0,
	/* Take the original destination from SO_ORIGINAL_DST (transparent capture). */
	ZTUN_LISTENER_ORIGINAL_DST = 1u << 1,
	/* No socket: connections are handed in with ztun_engine_adopt(). */
	ZTUN_LISTENER_VIRTUAL = 1u << 2,
	/* HBONE_IN: instead of dialing the authority, hand each accepted stream to the
	 * caller as one end of a socketpair (a ZTUN_EV_ACCEPT event carries the fd). */
	ZTUN_LISTENER_DELIVER = 1u << 3,
};

int ztun_engine_new(const struct ztun_engine_config *cfg, ztun_engine **out);
int ztun_engine_start(ztun_engine *e);
/* Stop accepting, let live connections finish for up to drain_ms, reset the rest,
 * join the workers. Idempotent. */
int ztun_engine_stop(ztun_engine *e, uint32_t drain_ms);
/* Stop (without draining) if needed and free everything. NULL is fine. */
void ztun_engine_free(ztun_engine *e);
int ztun_engine_workers(const ztun_engine *e);

/* Listeners. The bound address is written to *bound (may be NULL). */
int ztun_engine_add_listener(ztun_engine *e, const struct ztun_listener_spec *spec,
			     uint32_t *id, struct sockaddr_storage *bound, socklen_t *bound_len);
int ztun_engine_remove_listener(ztun_engine *e, uint32_t id);
/* New handshakes of this listener use ctx; live connections keep theirs. */
int ztun_engine_set_listener_tls(ztun_engine *e, uint32_t id, ztun_tls_ctx *ctx);
/* Stop accepting on every listener but keep live connections (drain begins). */
int ztun_engine_pause_accept(ztun_engine *e);
/* Carry an already-connected stream socket (e.g. a socketpair end) through a
 * VIRTUAL listener as if it had been accepted there. The engine owns fd from now
 * on. target (may be NULL) overrides the listener's target (HBONE authority).
 * When the tunnel is up or has failed, a ZTUN_EV_CONNECT_DONE event carries
 * request_id with the outcome. */
int ztun_engine_adopt(ztun_engine *e, uint32_t listener_id, int fd, const struct sockaddr_storage *target,
		      uint64_t request_id);

/* Policy: the engine takes ownership of the table (NULL removes policy), also when it
 * fails. Every worker switches to it before this returns; then live connections that
 * were authorized are re-checked against it (not counted) and the newly denied ones
 * reset with ZTUN_CLOSE_POLICY_CHANGED, each logged. The decision counters of the old
 * table are added to the new one's same-named policies. Each call makes a new table
 * generation (1, 2, ...; 0 means "no table"), reported in connection events so that a
 * policy index can be named after later swaps; *generation gets it (may be NULL).
 * Calls are serialized. Before ztun_engine_start() the table is simply installed. */
int ztun_engine_set_policy(ztun_engine *e, ztun_policy *table);
int ztun_engine_swap_policy(ztun_engine *e, ztun_policy *table, uint32_t *generation);
/* Decision counters of the table in force (carried across swaps by policy name):
 * out[0] is the defaults (no policy decided), out[1 + i] policy i. Fills min(n, count)
 * entries; *count gets 1 + the table's policies (0 without a table), *generation its
 * generation (0: none). Either pointer may be NULL. */
int ztun_engine_policy_counters(ztun_engine *e, struct ztun_policy_counters *out, uint32_t n,
				uint32_t *count, uint32_t *generation);

/* The directory: which destination addresses are mesh workloads. Outbound
 * connections with a per-connection destination (SOCKS5, ORIGINAL_DST) to a listed
 * address go over HBONE to its hop expecting its identity; any other address gets
 * a plain connection (passthrough). Replaces the whole directory atomically. */
struct ztun_dir_entry {
	uint8_t ip[16];              /* the workload's address (IPv4 as ::ffff:a.b.c.d) */
	const char *identity;        /* its SPIFFE ID; NULL: not in the mesh (passthrough) */
	struct sockaddr_storage via; /* its HBONE listener; family 0: the address itself, :15008 */
	uint32_t flags;              /* ZTUN_DIR_* */
};
enum {
	/* The workload lives on this node: with the eBPF accelerator, policy is decided
	 * here and its payload goes app to app in the kernel instead of over HBONE. */
	ZTUN_DIR_LOCAL = 1u << 0,
};
int ztun_engine_set_directory(ztun_engine *e, const struct ztun_dir_entry *entries, int n);

/* Live connections, for metrics of connections that have not finished yet. */
struct ztun_conn_info {
	uint64_t conn_id;
	uint32_t listener_id;
	uint16_t mode;
	uint16_t state;          /* 0: setting up, 1: relaying */
	uint64_t bytes_down_up;
	uint64_t bytes_up_down;
	uint64_t start_ns;       /* CLOCK_REALTIME */
};
/* Copy up to cap live connections into out; *n receives how many there are in all
 * (may exceed cap). Costs one round trip through every worker. */
int ztun_engine_connections(ztun_engine *e, struct ztun_conn_info *out, size_t cap, size_t *n);

/* The eBPF accelerator (ztun/bpf.py owns it): a `ztun_bpf *` handle and its function
 * table (`const struct ztun_bpf_api *`, see ztun/bpf.h). Only before start(); the
 * accelerator must outlive the engine. With it, the engine registers its listening
 * sockets (app<->ztun hops go socket to socket), marks its plaintext connects, and
 * pairs TCP<->TCP connections so same-node payload flows app to app in the kernel. */
int ztun_engine_set_bpf(ztun_engine *e, void *handle, const void *api);

/* Counters. Sums over all workers, read with relaxed atomics. */
enum ztun_close_reason {
	ZTUN_CLOSE_OK = 0,          /* both sides finished (FIN both ways) */
	ZTUN_CLOSE_RESET_DOWN,      /* the downstream (client) side reset */
	ZTUN_CLOSE_RESET_UP,        /* the upstream (server) side reset */
	ZTUN_CLOSE_CONNECT_REFUSED, /* the upstream refused the connection */
	ZTUN_CLOSE_CONNECT_TIMEOUT, /* the upstream did not answer in time */
	ZTUN_CLOSE_CONNECT_ERROR,   /* the upstream connect failed otherwise (unreachable, …) */
	ZTUN_CLOSE_IDLE_TIMEOUT,    /* no bytes either way for idle_timeout_ms */
	ZTUN_CLOSE_HANDSHAKE_TIMEOUT,
	ZTUN_CLOSE_TLS_ERROR,       /* a handshake or record error; the event says which */
	ZTUN_CLOSE_POLICY_DENIED,   /* policy denied the connection */
	ZTUN_CLOSE_POLICY_CHANGED,  /* a new policy denied a live connection */
	ZTUN_CLOSE_SHUTDOWN,        /* the engine stopped */
	ZTUN_CLOSE_IO_ERROR,        /* another socket error */
	ZTUN_CLOSE_PROTOCOL,        /* the peer broke the protocol (garbage, bad HTTP/2, …) */
	ZTUN_CLOSE_UPSTREAM_STATUS, /* HBONE: the peer answered the CONNECT with a non-200 */
	ZTUN_CLOSE_NO_MEMORY,
	ZTUN_CLOSE__COUNT
};
const char *ztun_close_reason_name(int reason);

struct ztun_stats {
	uint64_t bytes_down_up;   /* bytes read from downstream (clients), written upstream */
	uint64_t bytes_up_down;   /* bytes read from upstream, written downstream */
	uint64_t conns_opened;    /* connections accepted (or adopted) */
	uint64_t conns_closed;    /* connections finished, for any reason */
	uint64_t conns_active;    /* opened - closed */
	uint64_t conns_failed;    /* closed with any reason other than OK/RESET_* */
	uint64_t close_reason[ZTUN_CLOSE__COUNT];
	uint64_t handshakes;      /* completed TLS handshakes */
	uint64_t handshakes_resumed;
	uint64_t policy_allowed;
	uint64_t policy_denied;
	uint64_t policy_dry_run;  /* dry-run policies that would have changed the decision */
	uint64_t events_dropped;  /* events lost because the ring was full */
	uint64_t buffers_in_use;  /* pool buffers held by connections */
	uint64_t buffer_bytes;    /* bytes of all pool buffers, held or cached */
	uint64_t hbone_status[5]; /* CONNECT responses sent/received: 200, 400, 401, 503, other */
	uint64_t hbone_protocol_errors;
	uint64_t h2_opened;       /* HTTP/2 (HBONE) connections */
	uint64_t h2_closed;
	uint64_t h2_active;
	uint64_t h2_close_reason[ZTUN_CLOSE__COUNT];
	uint64_t tls_failures[ZTUN_TLSR__COUNT]; /* refused handshakes, by reason */
	uint64_t bpf_pairs;         /* connections whose payload went app to app (sockmap) */
	uint64_t bpf_direct_bytes;  /* bytes those carried in the kernel, bypassing the relay */
};
int ztun_engine_stats(ztun_engine *e, struct ztun_stats *out);

/* Events: variable-length records, drained by the caller in batches. */
enum ztun_event_type {
	ZTUN_EV_PAD = 0,         /* internal: skip */
	ZTUN_EV_CONN_OPEN = 1,   /* a connection is established end to end */
	ZTUN_EV_CONN_CLOSE = 2,  /* a connection finished (the access-log record) */
	ZTUN_EV_LOG = 3,         /* a log line from the engine */
	ZTUN_EV_CONNECT_DONE = 4, /* an adopted connection's result (request id, status) */
	ZTUN_EV_ACCEPT = 5,       /* DELIVER listeners: a tunnelled connection for the caller (fd) */
};
enum {
	ZTUN_EVMASK_OPEN = 1u << 0,
	ZTUN_EVMASK_CLOSE = 1u << 1,
	ZTUN_EVMASK_LOG = 1u << 2,
	ZTUN_EVMASK_ALL = 0xffffffffu,
};
enum ztun_log_level { ZTUN_LOG_DEBUG = 10, ZTUN_LOG_INFO = 20, ZTUN_LOG_WARNING = 30, ZTUN_LOG_ERROR = 40 };

/* Event record layout (little-endian host structs, all fields naturally aligned). */
struct ztun_event_hdr {
	uint32_t len;  /* whole record, header included, multiple of 8 */
	uint16_t type; /* enum ztun_event_type */
	uint16_t worker;
};
struct ztun_event_conn {
	struct ztun_event_hdr h;
	uint64_t conn_id;
	uint32_t listener_id;
	uint16_t reason;      /* CLOSE: enum ztun_close_reason */
	uint16_t mode;        /* listener mode */
	int32_t policy;       /* deciding policy index, -1: none / default */
	int32_t policy_rule;
	int32_t http_status;  /* HBONE status sent or received, 0: none */
	int32_t sys_errno;    /* errno behind the reason, 0: none */
	uint32_t policy_gen;  /* table generation `policy` indexes (0: no table decided) */
	uint16_t policy_reason; /* enum ztun_policy_reason, 0: not evaluated */
	uint16_t policy_flags;  /* ZTUN_EVPOL_* */
	int32_t dry_run_policy; /* dry-run policy that would have decided, -1: none */
	int32_t dry_run_rule;
	uint64_t start_ns;    /* CLOCK_REALTIME */
	uint64_t duration_ns; /* CLOSE only */
	uint64_t bytes_down_up;
	uint64_t bytes_up_down;
	struct sockaddr_storage src; /* downstream peer */
	struct sockaddr_storage dst; /* upstream (or original destination) */
	struct sockaddr_storage target; /* HBONE: the CONNECT authority (workload ip:port) */
	uint64_t request_id;         /* adopted connections: the caller's request id */
	uint16_t peer_id_len;        /* peer SPIFFE ID (verified), may be 0 */
	uint16_t detail_len;         /* human-readable detail (e.g. the TLS verify error) */
	uint16_t local_id_len;       /* our own SPIFFE ID on this connection */
	uint16_t trace_len;          /* HBONE: traceparent */
	uint16_t baggage_len;        /* HBONE: baggage received */
	uint16_t tls_reason;         /* enum ztun_tls_reason: why a handshake was refused */
	int32_t fd;                  /* ACCEPT: the caller's end of the socketpair */
	/* followed by peer_id, detail, local_id, trace and baggage bytes (no NULs) */
};
enum {
	ZTUN_EVPOL_DRY_RUN = 1u << 0,      /* dry-run policies applied to the connection */
	ZTUN_EVPOL_DRY_RUN_DENY = 1u << 1, /* ... and, enforced too, would have denied it */
	ZTUN_EVPOL_RECHECKED = 1u << 2,    /* the verdict is a re-check after a policy swap */
};
struct ztun_event_log {
	struct ztun_event_hdr h;
	uint16_t level;
	uint16_t msg_len;
	uint32_t _pad;
	/* followed by msg bytes */
};

/* Which events to emit from now on (ZTUN_EVMASK_*): a caller that logs nothing per
 * connection saves the records. Results (connect_done, accept) are always emitted. */
void ztun_engine_set_events(ztun_engine *e, uint32_t mask);
/* The fd to watch for readability; read it (8 bytes) then drain. */
int ztun_engine_event_fd(const ztun_engine *e);
/* Copy whole event records into buf (at most len bytes). *used gets the number of
 * bytes written; stops early when the next record does not fit. */
int ztun_engine_read_events(ztun_engine *e, void *buf, size_t len, size_t *used);
/* Arm the wake-up: returns 1 when events are already pending (drain again),
 * 0 when the event fd will become readable on the next event. */
int ztun_engine_arm_events(ztun_engine *e);

#endif
