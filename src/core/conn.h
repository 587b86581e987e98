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
	FS_HANDSHAKE_IN,  /* TLS server handshake with the downstream */
	FS_CONNECTING,    /* TCP connect to the upstream in flight */
	FS_HANDSHAKE_OUT, /* TLS client handshake with the upstream */
	FS_RELAY,         /* bytes flow both ways (each way ends on its own FIN) */
	FS_CLOSED,        /* finished; freed after the current epoll batch */
	FS__COUNT
};

#define FS_BIT(s) (1u << (s))
static const uint8_t flow_next[FS__COUNT] = {
	[FS_ACCEPTED] = FS_BIT(FS_HANDSHAKE_IN) | FS_BIT(FS_CONNECTING) | FS_BIT(FS_RELAY) | FS_BIT(FS_CLOSED),
	[FS_HANDSHAKE_IN] = FS_BIT(FS_CONNECTING) | FS_BIT(FS_CLOSED),
	[FS_CONNECTING] = FS_BIT(FS_HANDSHAKE_OUT) | FS_BIT(FS_RELAY) | FS_BIT(FS_CLOSED),
	[FS_HANDSHAKE_OUT] = FS_BIT(FS_RELAY) | FS_BIT(FS_CLOSED),
	[FS_RELAY] = FS_BIT(FS_CLOSED),
	[FS_CLOSED] = 0,
};

enum zep_kind { EP_NONE = 0, EP_TCP, EP_TLS };

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
	int fd;
	SSL *ssl;
	struct zbuf *tx;     /* TLS: records OpenSSL wrote, not yet sent (see tx BIO) */
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
	uint64_t deadline;       /* monotonic ns, for pending */
	uint64_t last_active;    /* monotonic ns */
	uint64_t start_real;     /* realtime ns */
	uint64_t start_mono;
	uint64_t bytes[2];
	struct sockaddr_storage src; /* downstream peer */
	struct sockaddr_storage dst; /* upstream address */
	char *peer_id;           /* verified SPIFFE ID of the peer (either side), malloc'd */
	char *detail;            /* why it failed, malloc'd */
	int32_t policy;          /* deciding policy index, -1 */
	int32_t policy_rule;
	int32_t http_status;
	int32_t sys_errno;
};

#endif
