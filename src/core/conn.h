/* A relayed connection ("flow"): two endpoints and the bytes between them.
 *
 * Rule 1: every flow state and every allowed transition is defined here, in
 * flow_next[] below; conn.c changes state only through flow_set_state(), which
 * refuses a transition not in the table.
 * Rule 2: the table does not know the listener mode; the mode only decides which
 * of the allowed paths a flow takes (e.g. TLS_IN goes through HANDSHAKE_IN).
 * Rule 3: a flow lives on one worker, from accept to free, and is touched by no
 * other thread.
 *
 * Endpoint 0 is the downstream side (the client that connected to us), endpoint 1
 * the upstream side (where we connected). Direction d carries bytes read from
 * endpoint d to endpoint !d, through buf[d].
 */
#ifndef ZTUN_CONN_H
#define ZTUN_CONN_H

#include <stdint.h>
#include <sys/socket.h>

#include "engine_int.h"

enum zflow_state {
	FS_ACCEPTED = 0,  /* accepted, nothing started yet */
	FS_PREAMBLE,      /* reading a client preamble (SOCKS5 negotiation) */
	FS_HANDSHAKE_IN,  /* TLS server handshake with the downstream */
	FS_CONNECTING,    /* TCP connect to the upstream in flight */
	FS_HANDSHAKE_OUT, /* TLS client handshake with the upstream */
	FS_RELAY,         /* bytes flow both ways (each way ends on its own FIN) */
	FS_CLOSED,        /* finished; freed after the current epoll batch */
	FS__COUNT
};

#define FS_BIT(s) (1u << (s))
/* HBONE streams: an outbound flow waits for the 200 in CONNECTING; an inbound
 * one sits in ACCEPTED until its request is checked, then CONNECTING. */
static const uint8_t flow_next[FS__COUNT] = {
	[FS_ACCEPTED] = FS_BIT(FS_PREAMBLE) | FS_BIT(FS_HANDSHAKE_IN) | FS_BIT(FS_CONNECTING) | FS_BIT(FS_RELAY) |
			FS_BIT(FS_CLOSED),
	[FS_PREAMBLE] = FS_BIT(FS_CONNECTING) | FS_BIT(FS_CLOSED),
	[FS_HANDSHAKE_IN] = FS_BIT(FS_CONNECTING) | FS_BIT(FS_CLOSED),
	[FS_CONNECTING] = FS_BIT(FS_HANDSHAKE_OUT) | FS_BIT(FS_RELAY) | FS_BIT(FS_CLOSED),
	[FS_HANDSHAKE_OUT] = FS_BIT(FS_RELAY) | FS_BIT(FS_CLOSED),
	[FS_RELAY] = FS_BIT(FS_CLOSED),
	[FS_CLOSED] = 0,
};

enum zep_kind { EP_NONE = 0, EP_TCP, EP_TLS, EP_STREAM };

struct zh2;
struct zh2req;

struct zep {
	struct ztag tag;
	uint8_t side;        /* 0 downstream, 1 upstream */
	uint8_t kind;        /* enum zep_kind */
	uint8_t rd_ready;    /* may read: set by EPOLLIN, cleared by EAGAIN */
	uint8_t wr_ready;    /* may write: set by EPOLLOUT, cleared by EAGAIN */
	uint8_t rd_eof;      /* the peer finished sending (FIN / close_notify) */
	uint8_t wr_shut;     /* we finished sending (shutdown / close_notify sent) */
	uint8_t rd_wants_wr; /* TLS: the last read needs the socket writable */
	uint8_t wr_wants_rd; /* TLS: the last write needs the socket readable */
	uint8_t notify_sent; /* TLS: close_notify queued */
	uint8_t deferred;    /* STREAM: our data provider is waiting for bytes */
	uint8_t rdhup;       /* the peer's FIN (or a hangup) was signalled */
	uint8_t lingered;    /* SO_LINGER {1,0}: a crash of ztun resets the app, never a FIN */
	uint8_t rd_short;    /* TLS: the last socket read was short (drained) */
	int fd;
	SSL *ssl;
	struct zbuf *tx;     /* TLS: records OpenSSL wrote, not yet sent (see tx BIO) */
	struct zworker *w;
	char **detail;       /* where to say why it failed (the owner's detail slot) */
	/* STREAM endpoints: a CONNECT stream inside an HTTP/2 connection. */
	struct zh2 *h2;
	int32_t stream_id;
	struct zbuf *rxq_head, *rxq_tail; /* received DATA not yet written out (a chain) */
};

/* A pipe that carries one direction of a TCP-to-TCP relay with splice(2): the
 * kernel moves page references, the relay copies nothing. Pooled like buffers. */
struct zpipe {
	struct zpipe *next;
	int r, w;
	uint32_t len; /* bytes in the pipe */
};

struct zflow {
	struct zep ep[2];
	struct zbuf *buf[2];
	struct zpipe *pipe[2];
	uint8_t cls[2];      /* buffer class hint per direction (adaptive sizing) */
	uint8_t state;
	uint8_t reason;
	uint8_t in_again;
	uint64_t id;
	struct zworker *w;
	struct zlistener *l;
	ztun_tls_ctx *tls;       /* the context this flow's handshake used */
	struct ztls_hs *hs;      /* while a handshake runs */
	struct zlist link;       /* w->flows (LRU) */
	struct zlist plink;      /* w->pending, while a deadline runs */
	struct zlist alink;      /* w->again */
	struct zlist wlink;      /* HBONE: the h2 connection's flows */
	struct zh2req *req;      /* HBONE inbound: request headers being received */
	uint64_t deadline;       /* monotonic ns, for pending */
	uint64_t last_active;    /* monotonic ns */
	uint64_t start_real;     /* realtime ns */
	uint64_t start_mono;
	uint64_t bytes[2];
	struct sockaddr_storage src; /* downstream peer */
	struct sockaddr_storage dst; /* upstream address */
	char *peer_id;           /* verified SPIFFE ID of the peer (either side), malloc'd */
	char *src_principal;     /* policy's source principal when it is not peer_id (a local
				  * route: ours, while peer_id names the destination), malloc'd */
	char *detail;            /* why it failed, malloc'd */
	int32_t policy;          /* deciding policy index, -1 */
	int32_t policy_rule;
	int32_t http_status;
	int32_t sys_errno;
	char *trace;             /* HBONE: traceparent of this connection, malloc'd */
	char *baggage;           /* HBONE: baggage header received, malloc'd */
	struct sockaddr_storage target; /* HBONE: the CONNECT authority */
	uint64_t request_id;     /* adopted connections: the caller's request */
	/* The policy verdict (zflow_authorize / re-checks), besides policy/policy_rule. */
	uint32_t policy_gen;     /* table generation of policy, 0: no table */
	int32_t dry_run_policy;
	int32_t dry_run_rule;
	uint8_t policy_reason;   /* enum ztun_policy_reason, 0: not evaluated */
	uint8_t policy_flags;    /* ZTUN_EVPOL_* */
	uint8_t authorized;      /* passed zflow_authorize: re-checked on policy swaps */
	int deliver_fd;          /* DELIVER: the caller's socketpair end, until handed over */
	struct sockaddr_storage hop;  /* HBONE out: the HBONE server dialed (ip:15008) */
	struct ztls_expect *expect;   /* HBONE out: identities the server may present */
	uint8_t socks;                /* SOCKS5: negotiation step; 0 when not SOCKS */
	uint8_t staged;               /* HBONE: has DATA chunks staged in the read buffer */
	uint8_t tls_reason;           /* enum ztun_tls_reason when a handshake was refused */
	uint8_t local_route;          /* same-node: decided here, then paired (policy by dst) */
	uint8_t marked;               /* our upstream connect carries the accelerator's mark */
	uint8_t paired;               /* sockmap pair: payload flows app to app in the kernel */
	uint8_t pair_tries;           /* pair_add said EAGAIN: tries left */
	uint8_t busy[2];              /* last relay_busy value told per direction */
	uint64_t pair_id;
	uint64_t pair_next;           /* when to try pair_add again */
};

/* ---- sockio.c: endpoint I/O ---------------------------------------------- */
int zep_register(struct zworker *w, struct zep *ep);
void zep_close(struct zep *ep, int reset);
int zsock_error(int fd);
/* SO_LINGER {1,0} now, {0,0} again before a graceful close (zep_close). */
void zep_linger_reset(struct zep *ep);
void zep_close_lingering(struct zep *ep);
void zlinger_on_event(struct zworker *w, struct ztag *tag);
void zlinger_tick(struct zworker *w, int all);
void zep_detail(struct zep *ep, const char *s);
int zep_tls_attach(struct zep *ep);
int zep_flush(struct zep *ep);
int zep_tls_error(struct zep *ep, int ret, int for_write);
int zep_read(struct zep *ep, struct zbuf *b);
int zep_write(struct zep *ep, struct zbuf *b);
int zep_shutdown_write(struct zep *ep);
/* Create the SSL for ep (refused when our own certificate has expired). */
int zep_tls_begin(struct zworker *w, struct zep *ep, ztun_tls_ctx *ctx, struct ztls_hs *hs,
		  const char *alpn);
/* Drive a handshake: 1 done (*peer_id set, malloc'd), 0 in progress, <0 failed
 * (the reason is in the endpoint's detail; an alert was sent when there is one). */
int zep_handshake(struct zep *ep, struct ztls_hs *hs, char **peer_id);
/* Count a refused handshake by reason; returns the reason actually counted. */
int ztls_count_failure(struct zworker *w, int code);

/* ---- conn.c: flows, for hbone.c ------------------------------------------ */
enum { END_GRACEFUL = 0, END_RESET = 1 };
struct zflow *zflow_new(struct zworker *w, struct zlistener *l);
int zflow_set_state(struct zflow *f, int next);
void zflow_close(struct zworker *w, struct zflow *f, int reason, int down_how, int up_how);
void zflow_set_detail(struct zflow *f, const char *s);
void zflow_relay(struct zworker *w, struct zflow *f);
void zflow_start_relay(struct zworker *w, struct zflow *f);
void zflow_connect(struct zworker *w, struct zflow *f, const struct sockaddr_storage *dst);
void zflow_count_bytes(struct zworker *w, struct zflow *f, int d, uint64_t n);
/* 0: queued; -1: the event ring is full (the event is dropped and counted). */
int zflow_emit(struct zworker *w, struct zflow *f, int type);
/* HBONE DELIVER: make the socketpair, hand one end over, relay the other. */
void zflow_deliver(struct zworker *w, struct zflow *f);
void zflow_set_pending(struct zworker *w, struct zflow *f, uint32_t timeout_ms);
/* 1: allowed; 0: denied (the verdict is recorded in the flow). */
int zflow_authorize(struct zworker *w, struct zflow *f);
/* HBONE_IN: is dst one of the listener's workload_ips, or a workload of the policy
 * table in force? (Either list may be empty.) */
int zflow_local_workload(struct zworker *w, const struct zlistener *l,
			 const struct sockaddr_storage *dst);

/* ---- outbound.c: where outbound connections go --------------------------- */
/* SOCKS5 negotiation steps (zflow.socks). */
enum { SOCKS_GREETING = 1, SOCKS_REQUEST = 2, SOCKS_WAITING = 3, SOCKS_DONE = 4 };
/* Route an outbound connection to dst: HBONE to the destination workload's hop
 * when the directory knows it, a plain connection otherwise (passthrough). */
void zflow_route(struct zworker *w, struct zflow *f, const struct sockaddr_storage *dst);
/* The downstream of a SOCKS5 listener is readable: advance the negotiation. */
void zsocks_on_readable(struct zworker *w, struct zflow *f);
/* The outbound leg is up (ok) or failed: answer the SOCKS5 client. */
void zsocks_reply(struct zworker *w, struct zflow *f, int ok, int reason);
/* Read the original destination of a captured connection. */
int zflow_original_dst(int fd, struct sockaddr_storage *dst);
int zflow_inbound_dst(const struct zlistener *l, int fd, struct sockaddr_storage *dst);
void zflow_tag_source(const struct zflow *f, int fd);

/* ---- hbone.c: HTTP/2 CONNECT streams ------------------------------------- */
/* The relay put bytes into f->buf[d] (or saw EOF on ep[d]) for the stream at ep[!d]. */
void zh2_stream_data_ready(struct zworker *w, struct zflow *f, int d);
/* n bytes of the stream's received data were written out: open the window. */
void zh2_stream_consumed(struct zworker *w, struct zep *ep, size_t n);
/* The flow is closing: reset or forget its stream. */
void zh2_stream_close(struct zworker *w, struct zflow *f, struct zep *ep, int reset);
/* Outbound HBONE: carry this accepted connection over a pooled HTTP/2 connection. */
void zh2_open_outbound(struct zworker *w, struct zflow *f);
/* Inbound HBONE: a TLS connection was accepted on a HBONE_IN listener. */
void zh2_accept(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *src);
/* Inbound HBONE: the upstream connect finished; answer 200 (ok) or 503. */
void zh2_upstream_result(struct zworker *w, struct zflow *f, int ok);
void zh2_on_event(struct zworker *w, struct ztag *tag, uint32_t events);
void zh2_flush_dirty(struct zworker *w);
void zh2_tick(struct zworker *w);
void zh2_shutdown_all(struct zworker *w, int graceful);
void zh2_reap(struct zworker *w);
int zh2_count(struct zworker *w);


#endif
