/* HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS, as Istio's
 * ztunnel speaks it (see DESIGN.md §4).
 *
 * libnghttp2 does the HTTP/2 (framing, HPACK, flow control, flood limits); this
 * file feeds it the bytes SSL_read gives us, writes what it produces through the
 * TLS endpoint's tx buffer, and ties each CONNECT stream to a flow (conn.c) whose
 * other endpoint is a TCP socket.
 *
 * Flow control is the backpressure: we consume received DATA (and so open the
 * window) only when it has been written to the TCP side, so a stream whose reader
 * stops holds at most its window (4 MiB) and a connection at most 16 MiB.
 *
 * Rules: an h2 connection lives on one worker; a stream's flow and its connection
 * are on the same worker; a flow never outlives its link to the stream (closing
 * the flow detaches it, and the stream's user data becomes NULL).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "conn.h"

/* ztunnel's HTTP/2 settings. */
#define H2_STREAM_WINDOW (4u << 20)
#define H2_CONN_WINDOW (16u << 20)
#define H2_MAX_FRAME (1u << 20)
#define H2_SERVER_MAX_STREAMS 200
#define H2_CLIENT_MAX_STREAMS 100 /* per pooled connection; then open another */
#define H2_PING_INTERVAL_NS (10ull * 1000000000ull)
#define H2_PING_TIMEOUT_NS (20ull * 1000000000ull)
#define H2_POOL_IDLE_NS (300ull * 1000000000ull)
/* Our DATA frames stay well below the tx buffer so a frame always fits whole. */
#define H2_DATA_CHUNK (64u * 1024)
/* Request headers we accept in total (CONNECT needs a few hundred bytes). */
#define H2_MAX_HEADER_BYTES (16u * 1024)
/* Reads per wake-up before yielding to other connections. */
#define H2_READ_ROUNDS 16
#define H2_READ_CHUNK ZTUN_SCRATCH_BYTES
/* TLS record overhead per record (header 5 + tag 16 + content type 1). */
#define TLS_RECORD_OVERHEAD 22

enum h2_state {
	H2_CONNECTING = 0, /* client: TCP connect in flight */
	H2_HANDSHAKE,      /* TLS handshake */
	H2_ACTIVE,         /* streams may be opened */
	H2_GOAWAY,         /* no new streams; closes when the last one ends */
	H2_DEAD,           /* closed; freed after the epoll batch */
};

struct zh2req {
	char method[16];
	char authority[96];
	char traceparent[64];
	char forwarded[160];
	char *baggage;
	uint32_t header_bytes;
	uint8_t truncated; /* a header was longer than we keep */
	uint8_t too_large; /* the whole list exceeded H2_MAX_HEADER_BYTES */
};

struct zh2 {
	struct zep ep; /* the TLS connection; ep.tag.kind == TAG_H2 */
	struct zworker *w;
	struct zlistener *l;
	nghttp2_session *s;
	int server;
	int state;
	ztun_tls_ctx *tls;
	struct ztls_hs *hs;
	struct ztls_expect *expect; /* client: pool key part */
	char *peer_id;
	char *detail;
	struct sockaddr_storage peer; /* server: the client's address; client: the dialed one */
	struct zlist link;            /* w->h2s */
	struct zlist dlink;           /* w->h2dirty */
	struct zlist flows;           /* flows attached (waiting or streaming), via f->wlink */
	uint32_t nstreams;            /* flows attached */
	uint64_t idle_since;
	uint64_t ping_sent;
	uint64_t next_ping;
	uint64_t deadline; /* connect/handshake */
	uint8_t read_again;
	int reason; /* why it closed (enum ztun_close_reason) */
	uint32_t goaway_error; /* a GOAWAY with this error code was sent */
	uint32_t invalid_logged;
	int last_invalid; /* nghttp2's error for the last invalid frame received */
	uint8_t last_type; /* type of the last frame received */
	uint32_t rst_received;
};

static void h2_fail(struct zh2 *h, int reason, const char *why);
static void stage_flush(struct zh2 *h);
static void h2_mark(struct zh2 *h);
static void h2_submit_request(struct zh2 *h, struct zflow *f);

/* ---- small helpers ------------------------------------------------------- */

static struct zflow *stream_flow(struct zh2 *h, int32_t sid)
{
	struct zflow *f;

	/* A connection that died inside a callback still gets the rest of its input
	 * parsed by nghttp2: nothing of it may reach a flow any more. */
	if (!h->s || h->state == H2_DEAD)
		return NULL;
	f = nghttp2_session_get_stream_user_data(h->s, sid);
	return f && f->state != FS_CLOSED ? f : NULL;
}

static int stream_side(const struct zh2 *h)
{
	/* Inbound streams are the flow's downstream (0), outbound ones its upstream (1). */
	return h->server ? 0 : 1;
}

static uint64_t rng_next(struct zworker *w)
{
	/* xorshift128+: trace ids need to be unique, not secret. */
	uint64_t s1 = w->rng[0];
	const uint64_t s0 = w->rng[1];

	w->rng[0] = s0;
	s1 ^= s1 << 23;
	w->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
	return w->rng[1] + s0;
}

static void new_traceparent(struct zworker *w, char out[56])
{
	uint64_t a = rng_next(w), b = rng_next(w), c = rng_next(w);

	if (!a && !b)
		a = 1; /* all-zero trace ids are invalid */
	if (!c)
		c = 1;
	snprintf(out, 56, "00-%016llx%016llx-%016llx-01", (unsigned long long)a, (unsigned long long)b,
		 (unsigned long long)c);
}

static void format_addr(const struct sockaddr_storage *ss, char *out, size_t len)
{
	char ip[INET6_ADDRSTRLEN];

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;

		inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
		snprintf(out, len, "[%s]:%u", ip, ntohs(s6->sin6_port));
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;

		inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
		snprintf(out, len, "%s:%u", ip, ntohs(s4->sin_port));
	}
}

/* "<ipv4>:<port>" or "[<ipv6>]:<port>" -> sockaddr. 0 ok, -1 bad. */
static int parse_authority(const char *a, struct sockaddr_storage *out)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon;
	char *end;
	unsigned long port;
	size_t hl;

	memset(out, 0, sizeof(*out));
	if (a[0] == '[') {
		const char *rb = strchr(a, ']');

		if (!rb || rb[1] != ':')
			return -1;
		hl = (size_t)(rb - a - 1);
		if (hl == 0 || hl >= sizeof(host))
			return -1;
		memcpy(host, a + 1, hl);
		host[hl] = 0;
		colon = rb + 1;
	} else {
		colon = strrchr(a, ':');
		if (!colon || strchr(a, ':') != colon)
			return -1;
		hl = (size_t)(colon - a);
		if (hl == 0 || hl >= sizeof(host))
			return -1;
		memcpy(host, a, hl);
		host[hl] = 0;
	}
	if (!colon[1] || colon[1] == '+' || colon[1] == '-')
		return -1;
	errno = 0;
	port = strtoul(colon + 1, &end, 10);
	if (errno || *end || port == 0 || port > 65535)
		return -1;
	if (a[0] == '[') {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)out;

		if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1)
			return -1;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((uint16_t)port);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)out;

		if (inet_pton(AF_INET, host, &s4->sin_addr) != 1)
			return -1;
		s4->sin_family = AF_INET;
		s4->sin_port = htons((uint16_t)port);
	}
	return 0;
}

static uint16_t addr_port(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
	return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

static void addr_ip16(const struct sockaddr_storage *ss, uint8_t ip[16])
{
	if (ss->ss_family == AF_INET6) {
		memcpy(ip, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
	} else {
		memset(ip, 0, 10);
		ip[10] = ip[11] = 0xff;
		memcpy(ip + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
	}
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	uint8_t x[16], y[16];

	if (addr_port(a) != addr_port(b))
		return 0;
	addr_ip16(a, x);
	addr_ip16(b, y);
	return memcmp(x, y, 16) == 0;
}

static void count_status(struct zworker *w, int status)
{
	int i;

	switch (status) {
	case 200: i = 0; break;
	case 400: i = 1; break;
	case 401: i = 2; break;
	case 503: i = 3; break;
	default: i = 4; break;
	}
	zstat_add(&w->stats.hbone_status[i], 1);
}

/* ---- TLS output for nghttp2 ----------------------------------------------- */

static uint32_t tx_space(const struct zh2 *h)
{
	return h->ep.tx ? zbuf_space(h->ep.tx) : h->w->pool.size[ZBUF_LARGE];
}

/* Room for len plaintext bytes once encrypted (records of at most 16 KiB). */
static int tx_fits(const struct zh2 *h, size_t len)
{
	size_t need = len + TLS_RECORD_OVERHEAD * (len / 16384 + 2);

	return need <= tx_space(h);
}

static int tls_write_all(struct zh2 *h, const uint8_t *p, size_t len)
{
	while (len) {
		size_t put = 0;

		ERR_clear_error();
		if (SSL_write_ex(h->ep.ssl, p, len, &put) <= 0)
			return -1; /* cannot happen when tx_fits() said yes */
		p += put;
		len -= put;
	}
	return 0;
}

static ssize_t send_cb(nghttp2_session *s, const uint8_t *data, size_t length, int flags, void *user)
{
	struct zh2 *h = user;
	size_t room = tx_space(h), n = length;

	if (room < 2 * TLS_RECORD_OVERHEAD + 64)
		return NGHTTP2_ERR_WOULDBLOCK;
	room -= TLS_RECORD_OVERHEAD * (room / 16384 + 2);
	if (n > room)
		n = room;
	if (tls_write_all(h, data, n) < 0)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	return (ssize_t)n;
}

/* DATA frames: the payload comes straight from the flow's ring (no copy into
 * nghttp2); the frame header and payload are encrypted into the tx buffer. */
static int send_data_cb(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
			nghttp2_data_source *source, void *user)
{
	struct zh2 *h = user;
	struct zflow *f = stream_flow(h, frame->hd.stream_id);
	int ss = stream_side(h), d = !ss;
	struct zbuf *b;

	if (!tx_fits(h, 9 + length))
		return NGHTTP2_ERR_WOULDBLOCK;
	if (!f && length)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* the flow is gone: reset the stream */
	if (tls_write_all(h, framehd, 9) < 0)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	if (!f)
		return 0;
	b = f->buf[d];
	if (length) {
		uint32_t mask = b->cap - 1;

		if (tls_write_all(h, (const uint8_t *)b->data + (b->head & mask), length) < 0)
			return NGHTTP2_ERR_CALLBACK_FAILURE;
		b->head += (uint32_t)length;
		zflow_count_bytes(h->w, f, d, length);
		if (zbuf_len(b) == 0) {
			zpool_put(&h->w->pool, b);
			f->buf[d] = NULL;
		}
		/* Room again on the TCP side: let the relay read more. */
		if (f->state == FS_RELAY && f->ep[d].rd_ready && !f->ep[d].rd_eof &&
		    !zlist_linked(&f->alink))
			zlist_add_tail(&h->w->again, &f->alink);
	}
	if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
		f->ep[ss].wr_shut = 1;
		if (!zlist_linked(&f->alink))
			zlist_add_tail(&h->w->again, &f->alink);
	}
	return 0;
}

static ssize_t data_read_cb(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
			    uint32_t *flags, nghttp2_data_source *source, void *user)
{
	struct zh2 *h = user;
	struct zflow *f = stream_flow(h, sid);
	int ss = stream_side(h), d = !ss;
	struct zbuf *b;
	uint32_t avail, contig;

	if (!f) {
		*flags |= NGHTTP2_DATA_FLAG_EOF;
		return 0;
	}
	b = f->buf[d];
	avail = b ? zbuf_len(b) : 0;
	if (!avail) {
		if (f->ep[d].rd_eof) {
			*flags |= NGHTTP2_DATA_FLAG_EOF;
			return 0;
		}
		f->ep[ss].deferred = 1;
		return NGHTTP2_ERR_DEFERRED;
	}
	contig = b->cap - (b->head & (b->cap - 1));
	if (contig > avail)
		contig = avail;
	if (length > contig)
		length = contig;
	if (length > H2_DATA_CHUNK)
		length = H2_DATA_CHUNK;
	*flags |= NGHTTP2_DATA_FLAG_NO_COPY;
	if (f->ep[d].rd_eof && length == avail)
		*flags |= NGHTTP2_DATA_FLAG_EOF; /* END_STREAM rides on the last DATA frame */
	return (ssize_t)length;
}

/* ---- receiving ----------------------------------------------------------- */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
	struct zh2 *h = user;
	struct zflow *f;

	if (!h->server || h->state == H2_DEAD || frame->hd.type != NGHTTP2_HEADERS ||
	    frame->headers.cat != NGHTTP2_HCAT_REQUEST)
		return 0;
	f = zflow_new(h->w, h->l);
	if (!f)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	f->req = calloc(1, sizeof(*f->req));
	if (!f->req) {
		zflow_close(h->w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	}
	f->src = h->peer;
	f->tls = ztun_tls_ctx_ref(h->tls);
	f->peer_id = h->peer_id ? strdup(h->peer_id) : NULL;
	f->ep[0].kind = EP_STREAM;
	f->ep[0].h2 = h;
	f->ep[0].stream_id = frame->hd.stream_id;
	zlist_add_tail(&h->flows, &f->wlink);
	h->nstreams++;
	nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, f);
	return 0;
}

static void keep(char *dst, size_t cap, const uint8_t *v, size_t vlen, struct zh2req *r)
{
	if (vlen >= cap) {
		r->truncated = 1;
		vlen = cap - 1;
	}
	memcpy(dst, v, vlen);
	dst[vlen] = 0;
}

#define HDR_IS(lit) (namelen == sizeof(lit) - 1 && memcmp(name, lit, namelen) == 0)

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
		     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *user)
{
	struct zh2 *h = user;
	struct zflow *f = stream_flow(h, frame->hd.stream_id);

	if (!f || frame->hd.type != NGHTTP2_HEADERS)
		return 0;
	if (h->server) {
		struct zh2req *r = f->req;

		if (!r)
			return 0; /* trailers */
		r->header_bytes += (uint32_t)(namelen + valuelen + 32);
		if (r->header_bytes > H2_MAX_HEADER_BYTES) {
			r->too_large = 1; /* keep nothing more; answered 431 when the list ends */
			return 0;
		}
		if (HDR_IS(":method"))
			keep(r->method, sizeof(r->method), value, valuelen, r);
		else if (HDR_IS(":authority"))
			keep(r->authority, sizeof(r->authority), value, valuelen, r);
		else if (HDR_IS("traceparent"))
			keep(r->traceparent, sizeof(r->traceparent), value, valuelen, r);
		else if (HDR_IS("forwarded"))
			keep(r->forwarded, sizeof(r->forwarded), value, valuelen, r);
		else if (HDR_IS("baggage") && !r->baggage && valuelen < 2048)
			r->baggage = strndup((const char *)value, valuelen);
		return 0;
	}
	if (HDR_IS(":status")) {
		int status = 0;

		for (size_t i = 0; i < valuelen && i < 3; i++)
			status = status * 10 + (value[i] - '0');
		f->http_status = status;
	}
	return 0;
}

static void respond(struct zh2 *h, struct zflow *f, int status, int with_body)
{
	char st[4];
	nghttp2_nv nv[] = {{(uint8_t *)":status", (uint8_t *)st, 7, 3, NGHTTP2_NV_FLAG_NONE}};
	nghttp2_data_provider prd = {.read_callback = data_read_cb};

	snprintf(st, sizeof(st), "%03d", status);
	f->http_status = status;
	count_status(h->w, status);
	nghttp2_submit_response(h->s, f->ep[0].stream_id, nv, 1, with_body ? &prd : NULL);
	h2_mark(h);
}

/* Refuse an inbound request with an HTTP status; the stream ends, the connection stays. */
static void refuse(struct zh2 *h, struct zflow *f, int status, int reason, const char *why)
{
	zflow_set_detail(f, why);
	respond(h, f, status, 0); /* on_frame_send releases the stream once it is out */
	zworker_emit_log(h->w, ZTUN_LOG_INFO, "conn %llu: HBONE request from %s refused with %d: %s",
			 (unsigned long long)f->id, h->peer_id ? h->peer_id : "?", status, why);
	zflow_close(h->w, f, reason, END_GRACEFUL, END_RESET);
}

/* A complete CONNECT request: check it, in ztunnel's order, then dial the target. */
static void handle_request(struct zh2 *h, struct zflow *f, int end_stream)
{
	struct zh2req *r = f->req;
	struct sockaddr_storage dst;
	uint16_t port;

	f->req = NULL;
	if (r->traceparent[0])
		f->trace = strdup(r->traceparent);
	f->baggage = r->baggage;
	r->baggage = NULL;
	if (r->too_large) {
		zstat_add(&h->w->stats.hbone_protocol_errors, 1);
		refuse(h, f, 431, ZTUN_CLOSE_PROTOCOL, "request headers too large (over 16 KiB)");
		goto out;
	}
	if (strcmp(r->method, "CONNECT") != 0) {
		refuse(h, f, 400, ZTUN_CLOSE_PROTOCOL, "not a CONNECT request");
		goto out;
	}
	if (r->truncated || parse_authority(r->authority, &dst) != 0) {
		refuse(h, f, 400, ZTUN_CLOSE_PROTOCOL, "bad :authority (expected ip:port)");
		goto out;
	}
	f->target = dst;
	f->dst = dst;
	port = addr_port(&dst);
	if (port == 15001 || port == 15006 || port == 15008) {
		refuse(h, f, 400, ZTUN_CLOSE_PROTOCOL, "target port is one of ztun's own (15001/15006/15008)");
		goto out;
	}
	if (!zflow_local_workload(h->w, f->l, &dst)) {
		refuse(h, f, 400, ZTUN_CLOSE_PROTOCOL, "target is not a workload of this node");
		goto out;
	}
	if (!zflow_authorize(h->w, f)) {
		refuse(h, f, 401, ZTUN_CLOSE_POLICY_DENIED, "denied by policy");
		goto out;
	}
	if (end_stream)
		f->ep[0].rd_eof = 1;
	if (f->l->flags & ZTUN_LISTENER_DELIVER) {
		zflow_deliver(h->w, f);
		goto out;
	}
	zflow_set_state(f, FS_CONNECTING);
	zflow_connect(h->w, f, &dst);
out:
	free(r->baggage);
	free(r);
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
	struct zh2 *h = user;
	struct zflow *f;

	switch (frame->hd.type) {
	case NGHTTP2_HEADERS:
		f = stream_flow(h, frame->hd.stream_id);
		if (!f)
			return 0;
		if (h->server) {
			if (f->req && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
				handle_request(h, f, !!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM));
			else if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
				if (f->staged)
					stage_flush(h);
				f->ep[0].rd_eof = 1;
				zflow_relay(h->w, f);
			}
			return 0;
		}
		if (frame->headers.cat != NGHTTP2_HCAT_RESPONSE)
			return 0;
		if (f->state != FS_CONNECTING)
			return 0;
		count_status(h->w, f->http_status);
		if (f->http_status != 200) {
			char msg[96];

			snprintf(msg, sizeof(msg), "HBONE peer answered %d", f->http_status);
			zflow_set_detail(f, msg);
			zflow_close(h->w, f, f->http_status == 401 ? ZTUN_CLOSE_POLICY_DENIED
								    : ZTUN_CLOSE_UPSTREAM_STATUS,
				    END_RESET, END_RESET);
			return 0;
		}
		if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
			f->ep[1].rd_eof = 1;
		zflow_start_relay(h->w, f);
		return 0;
	case NGHTTP2_DATA:
		if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
			return 0;
		f = stream_flow(h, frame->hd.stream_id);
		if (f) {
			if (f->staged)
				stage_flush(h); /* the bytes before END_STREAM go out before the FIN */
			f->ep[stream_side(h)].rd_eof = 1;
			zflow_relay(h->w, f);
		}
		return 0;
	case NGHTTP2_PING:
		if (frame->hd.flags & NGHTTP2_FLAG_ACK)
			h->ping_sent = 0;
		return 0;
	case NGHTTP2_GOAWAY:
		if (h->state == H2_ACTIVE)
			h->state = H2_GOAWAY; /* never handed out again */
		return 0;
	default:
		return 0;
	}
}

static int rxq_append(struct zworker *w, struct zep *ep, const uint8_t *data, size_t len)
{
	size_t off = 0;

	while (off < len) {
		struct zbuf *b = ep->rxq_tail;
		struct iovec iov[2];
		size_t take;

		if (!b || !zbuf_space(b)) {
			b = zpool_get(&w->pool, ZBUF_LARGE);
			if (!b)
				return -1;
			if (ep->rxq_tail)
				ep->rxq_tail->next = b;
			else
				ep->rxq_head = b;
			ep->rxq_tail = b;
		}
		int n = zbuf_fill_iov(b, iov);

		for (int i = 0; i < n && off < len; i++) {
			take = iov[i].iov_len < len - off ? iov[i].iov_len : len - off;
			memcpy(iov[i].iov_base, data + off, take);
			b->tail += (uint32_t)take;
			off += take;
		}
	}
	return 0;
}

/* Received DATA waits in the read buffer ("staged") until nghttp2 has parsed the
 * whole batch; then each flow's chunks go out with one sendmsg and only what the
 * socket did not take is copied into the flow's queue. No copy, one syscall per
 * flow per batch in the common case. */
static void stage_flush(struct zh2 *h)
{
	struct zworker *w = h->w;
	int ss = stream_side(h);

	for (uint32_t i = 0; i < w->nstage; i++) {
		struct zflow *f = w->stage[i].f;
		struct iovec iov[ZTUN_STAGE_MAX];
		int n = 0;
		size_t total = 0, sent = 0;
		int32_t sid = w->stage[i].sid;

		if (!f)
			continue;
		for (uint32_t j = i; j < w->nstage; j++) {
			if (w->stage[j].f != f)
				continue;
			iov[n].iov_base = (void *)w->stage[j].p;
			iov[n].iov_len = w->stage[j].len;
			total += w->stage[j].len;
			n++;
			w->stage[j].f = NULL;
		}
		f->staged = 0;
		if (f->state != FS_RELAY || !h->s) {
			if (h->s)
				nghttp2_session_consume_connection(h->s, total);
			continue;
		}
		struct zep *ep = &f->ep[ss], *out = &f->ep[!ss];

		if (out->wr_ready) {
			struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
			ssize_t r = sendmsg(out->fd, &m, MSG_NOSIGNAL);

			if (r > 0)
				sent = (size_t)r;
			else if (r < 0 && errno == EAGAIN)
				out->wr_ready = 0;
			/* Other errors surface on the next relay write. */
		}
		if (sent) {
			zflow_count_bytes(w, f, ss, sent);
			if (ep->stream_id > 0)
				nghttp2_session_consume(h->s, ep->stream_id, sent);
			else
				nghttp2_session_consume_connection(h->s, sent);
		}
		for (int k = 0; k < n && sent < total; k++) {
			size_t skip = sent >= iov[k].iov_len ? iov[k].iov_len : sent;

			sent -= skip;
			total -= skip;
			if (skip < iov[k].iov_len &&
			    rxq_append(w, ep, (const uint8_t *)iov[k].iov_base + skip, iov[k].iov_len - skip) < 0) {
				zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
				break;
			}
		}
		if (ep->rxq_head && out->wr_ready && f->state == FS_RELAY && !zlist_linked(&f->alink))
			zlist_add_tail(&w->again, &f->alink);
		(void)sid;
	}
	w->nstage = 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
			 void *user)
{
	struct zh2 *h = user;
	struct zworker *w = h->w;
	struct zflow *f = stream_flow(h, sid);
	struct zep *ep, *out;

	if (!f) {
		nghttp2_session_consume(s, sid, len); /* nobody reads it: keep the window open */
		return 0;
	}
	ep = &f->ep[stream_side(h)];
	out = &f->ep[!stream_side(h)];
	if (f->state == FS_RELAY && out->kind == EP_TCP && !ep->rxq_head) {
		if (w->nstage == ZTUN_STAGE_MAX)
			stage_flush(h);
		if (!ep->rxq_head) {
			w->stage[w->nstage++] = (struct zstage){f, data, (uint32_t)len, sid};
			f->staged = 1;
			return 0;
		}
	}
	if (f->staged)
		stage_flush(h); /* keep order: what is staged goes first */
	if (rxq_append(w, ep, data, len) < 0)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	if (f->state == FS_RELAY && out->wr_ready && !zlist_linked(&f->alink))
		zlist_add_tail(&w->again, &f->alink);
	return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t error_code, void *user)
{
	struct zh2 *h = user;
	struct zflow *f = stream_flow(h, sid);
	int ss = stream_side(h);

	if (!f)
		return 0;
	if (f->staged)
		stage_flush(h);
	nghttp2_session_set_stream_user_data(s, sid, NULL);
	f->ep[ss].stream_id = -1; /* closed in nghttp2; the flow may still flush */
	if (error_code != NGHTTP2_NO_ERROR || f->state != FS_RELAY) {
		char msg[96];

		if (error_code == NGHTTP2_REFUSED_STREAM)
			snprintf(msg, sizeof(msg), "HBONE stream refused by the peer");
		else
			snprintf(msg, sizeof(msg), "HBONE stream reset (%s)", nghttp2_http2_strerror(error_code));
		zflow_set_detail(f, msg);
		if (f->state == FS_CONNECTING && !h->server)
			zflow_close(h->w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
		else
			zflow_close(h->w, f, ss == 0 ? ZTUN_CLOSE_RESET_DOWN : ZTUN_CLOSE_RESET_UP,
				    END_RESET, END_RESET);
		return 0;
	}
	f->ep[ss].rd_eof = 1;
	f->ep[ss].wr_shut = 1;
	zflow_relay(h->w, f);
	return 0;
}

/* nghttp2 ends a connection on its own (a protocol violation, a flood) by sending
 * GOAWAY with an error code: count it and say why, like every other refusal. */
static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
	struct zh2 *h = user;

	if (frame->hd.type == NGHTTP2_HEADERS && h->server && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) &&
	    !nghttp2_session_get_stream_remote_close(s, frame->hd.stream_id)) {
		/* A refusal (400, 401, 503, ...) is complete. RFC 9113 8.1: the server may
		 * now ask the client to stop sending with RST_STREAM(NO_ERROR), so the
		 * stream stops holding one of the 200 slots while the client dawdles. */
		nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
		return 0;
	}
	if (frame->hd.type != NGHTTP2_GOAWAY || frame->goaway.error_code == NGHTTP2_NO_ERROR)
		return 0;
	zstat_add(&h->w->stats.hbone_protocol_errors, 1);
	h->goaway_error = frame->goaway.error_code;
	if (!h->detail) {
		char msg[240], name[48];
		const char *code = nghttp2_http2_strerror(frame->goaway.error_code);
		int n = (int)frame->goaway.opaque_data_len, k = 0;

		/* "FLOW_CONTROL_ERROR" -> "flow control error", for people reading logs. */
		for (; code[k] && k < (int)sizeof(name) - 1; k++)
			name[k] = code[k] == '_' ? ' ' : (char)(code[k] | 0x20);
		name[k] = 0;
		static const char *const types[] = {"DATA",	    "HEADERS", "PRIORITY",
						    "RST_STREAM",   "SETTINGS", "PUSH_PROMISE",
						    "PING",	    "GOAWAY",  "WINDOW_UPDATE",
						    "CONTINUATION"};
		const char *last = h->last_type < 10 ? types[h->last_type] : "unknown";
		char extra[96] = "";

		if (frame->goaway.error_code == NGHTTP2_INTERNAL_ERROR && h->rst_received >= 100)
			snprintf(extra, sizeof(extra), "; the peer reset %u streams (rapid reset limit)",
				 h->rst_received);
		snprintf(msg, sizeof(msg), "sent GOAWAY %s (%s) after a %s frame%s%.*s%s%s%s", code, name,
			 last, n ? ": " : "", n > 120 ? 120 : n,
			 frame->goaway.opaque_data ? (const char *)frame->goaway.opaque_data : "",
			 h->last_invalid ? "; last invalid frame: " : "",
			 h->last_invalid ? nghttp2_strerror(h->last_invalid) : "", extra);
		h->detail = strdup(msg);
	}
	return 0;
}

/* Remember what the peer sent last, for the GOAWAY explanation. */
static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *user)
{
	struct zh2 *h = user;

	h->last_type = hd->type;
	if (hd->type == NGHTTP2_RST_STREAM)
		h->rst_received++;
	return 0;
}

static int on_invalid_frame(nghttp2_session *s, const nghttp2_frame *frame, int lib_error, void *user)
{
	struct zh2 *h = user;

	zstat_add(&h->w->stats.hbone_protocol_errors, 1);
	h->last_invalid = lib_error;
	/* A flood must not become a log flood: the first few per connection. */
	if (h->invalid_logged++ < 3)
		zworker_emit_log(h->w, ZTUN_LOG_INFO, "HBONE connection from %s: invalid frame: %s%s",
				 h->peer_id ? h->peer_id : "?", nghttp2_strerror(lib_error),
				 h->invalid_logged == 3 ? " (further ones not logged)" : "");
	return 0;
}

/* ---- the connection -------------------------------------------------------- */

static void h2_mark(struct zh2 *h)
{
	if (h->state != H2_DEAD && !zlist_linked(&h->dlink))
		zlist_add_tail(&h->w->h2dirty, &h->dlink);
}

static int h2_session_new(struct zh2 *h)
{
	nghttp2_session_callbacks *cb;
	nghttp2_option *opt;
	int rv;

	if (nghttp2_session_callbacks_new(&cb) != 0)
		return -1;
	nghttp2_session_callbacks_set_send_callback(cb, send_cb);
	nghttp2_session_callbacks_set_send_data_callback(cb, send_data_cb);
	nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
	nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
	nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cb, on_invalid_frame);
	nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
	nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
	if (nghttp2_option_new(&opt) != 0) {
		nghttp2_session_callbacks_del(cb);
		return -1;
	}
	/* We open windows ourselves, once bytes reached the TCP side. */
	nghttp2_option_set_no_auto_window_update(opt, 1);
	nghttp2_option_set_max_settings(opt, 32);
	nghttp2_option_set_max_continuations(opt, 8);
	if (h->server)
		rv = nghttp2_session_server_new2(&h->s, cb, h, opt);
	else
		rv = nghttp2_session_client_new2(&h->s, cb, h, opt);
	nghttp2_option_del(opt);
	nghttp2_session_callbacks_del(cb);
	if (rv != 0)
		return -1;

	nghttp2_settings_entry iv[] = {
		{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, h->server ? H2_SERVER_MAX_STREAMS : 0},
		{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW},
		{NGHTTP2_SETTINGS_MAX_FRAME_SIZE, H2_MAX_FRAME},
		{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
	};
	/* ENABLE_PUSH is a client setting only. */
	if (nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, h->server ? 3 : 4) != 0 ||
	    nghttp2_session_set_local_window_size(h->s, NGHTTP2_FLAG_NONE, 0, H2_CONN_WINDOW) != 0)
		return -1;
	return 0;
}

static struct zh2 *h2_new(struct zworker *w, struct zlistener *l, int server, struct ztls_expect *expect)
{
	struct zh2 *h = calloc(1, sizeof(*h));

	if (!h)
		return NULL;
	h->w = w;
	zlistener_get(l);
	h->l = l;
	h->server = server;
	h->ep.tag.kind = TAG_H2;
	h->ep.fd = -1;
	h->ep.w = w;
	h->ep.detail = &h->detail;
	zlist_init(&h->dlink);
	zlist_init(&h->flows);
	zlist_add_tail(&w->h2s, &h->link);
	h->hs = calloc(1, sizeof(*h->hs));
	if (!h->hs)
		return h; /* h2_begin_tls fails on it */
	h->hs->server = server;
	pthread_mutex_lock(&l->tls_lock);
	h->tls = ztun_tls_ctx_ref(l->tls);
	pthread_mutex_unlock(&l->tls_lock);
	if (!server) {
		h->expect = ztls_expect_ref(expect);
		h->hs->expect = ztls_expect_ref(expect);
		/* Resumption: one slot per listener, only when the listener has one hop. */
		h->hs->slot = expect == l->expect ? &l->slot : NULL;
	}
	h->idle_since = w->now;
	zstat_add(&w->stats.h2_opened, 1);
	return h;
}

static void h2_free(struct zh2 *h)
{
	if (h->s)
		nghttp2_session_del(h->s);
	if (h->hs) {
		ztls_expect_put(h->hs->expect);
		free(h->hs);
	}
	ztls_expect_put(h->expect);
	ztun_tls_ctx_free(h->tls);
	zlistener_put(h->l);
	free(h->peer_id);
	free(h->detail);
	free(h);
}

/* Close the connection: every flow still on it is reset. */
static void h2_close(struct zh2 *h, int reason, int reset)
{
	struct zworker *w = h->w;

	if (h->state == H2_DEAD)
		return;
	h->state = H2_DEAD;
	h->reason = reason;
	while (!zlist_empty(&h->flows)) {
		struct zflow *f = zlist_entry(h->flows.next, struct zflow, wlink);
		int ss = stream_side(h);

		zlist_del(&f->wlink);
		f->ep[ss].h2 = NULL; /* no stream to reset any more */
		if (h->detail)
			zflow_set_detail(f, h->detail);
		if (f->state == FS_CONNECTING && !h->server)
			zflow_close(w, f, reason == ZTUN_CLOSE_OK ? ZTUN_CLOSE_CONNECT_ERROR : reason, END_RESET,
				    END_RESET);
		else
			zflow_close(w, f, ss == 0 ? ZTUN_CLOSE_RESET_DOWN : ZTUN_CLOSE_RESET_UP, END_RESET,
				    END_RESET);
	}
	zep_close(&h->ep, reset);
	if (zlist_linked(&h->dlink))
		zlist_del(&h->dlink);
	zlist_del(&h->link);
	zlist_add_tail(&w->h2zombies, &h->link);
	zstat_add(&w->stats.h2_closed, 1);
	zstat_add(&w->stats.h2_reason[reason], 1);
}

static void h2_fail(struct zh2 *h, int reason, const char *why)
{
	if (why && !h->detail)
		h->detail = strdup(why);
	zworker_emit_log(h->w, reason == ZTUN_CLOSE_OK ? ZTUN_LOG_DEBUG : ZTUN_LOG_WARNING,
			 "HBONE connection %s %s: %s", h->server ? "from" : "to",
			 h->peer_id ? h->peer_id : "(unauthenticated peer)", h->detail ? h->detail : "closed");
	h2_close(h, reason, reason != ZTUN_CLOSE_OK);
}

/* Produce and send what nghttp2 has for the peer. */
static void h2_send(struct zh2 *h)
{
	if (h->state < H2_ACTIVE || h->state == H2_DEAD || !h->s)
		return;
	for (int i = 0; i < 64; i++) {
		int rv = nghttp2_session_send(h->s), r;

		if (rv != 0) {
			h2_fail(h, ZTUN_CLOSE_PROTOCOL, nghttp2_strerror(rv));
			return;
		}
		r = zep_flush(&h->ep);
		if (r == -EAGAIN)
			return; /* EPOLLOUT resumes */
		if (r < 0) {
			h2_fail(h, ZTUN_CLOSE_RESET_UP, "connection lost while sending");
			return;
		}
		if (!nghttp2_session_want_write(h->s))
			break;
	}
	if (!nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s))
		h2_fail(h, h->goaway_error ? ZTUN_CLOSE_PROTOCOL : ZTUN_CLOSE_OK, "HTTP/2 session finished");
	else if (h->state == H2_GOAWAY && h->nstreams == 0 && !h->server)
		h2_fail(h, ZTUN_CLOSE_OK, "drained after GOAWAY");
}

static void h2_read(struct zh2 *h)
{
	for (int i = 0; i < H2_READ_ROUNDS && h->state != H2_DEAD; i++) {
		size_t n = 0;
		int err = -EAGAIN;
		ssize_t rv;

		if (!h->ep.rd_ready)
			return;
		/* SSL_read gives one record (<= 16 KiB) per call: gather a batch first. */
		while (n < H2_READ_CHUNK) {
			size_t got = 0;
			int r;

			ERR_clear_error();
			h->ep.rd_short = 0; /* only a read made by this call counts */
			r = SSL_read_ex(h->ep.ssl, h->w->scratch + n, H2_READ_CHUNK - n, &got);
			if (r <= 0) {
				err = zep_tls_error(&h->ep, r, 0);
				break;
			}
			n += got;
			if (h->ep.rd_short && !h->ep.rdhup && !SSL_has_pending(h->ep.ssl)) {
				/* Drained, nothing buffered: spare the read that says EAGAIN. */
				h->ep.rd_short = 0;
				h->ep.rd_ready = 0;
				break;
			}
		}
		if (n) {
			rv = nghttp2_session_mem_recv(h->s, (const uint8_t *)h->w->scratch, n);
			stage_flush(h);
			if (rv < 0) {
				zstat_add(&h->w->stats.hbone_protocol_errors, 1);
				h2_send(h); /* a GOAWAY nghttp2 queued, if any */
				if (h->state != H2_DEAD)
					h2_fail(h, ZTUN_CLOSE_PROTOCOL, nghttp2_strerror((int)rv));
				return;
			}
		}
		if (err == -EAGAIN) {
			if (n < H2_READ_CHUNK)
				return; /* drained (rd_ready was cleared) */
			continue;
		}
		h2_fail(h, err == 0 ? ZTUN_CLOSE_OK : (err == -EPROTO ? ZTUN_CLOSE_TLS_ERROR : ZTUN_CLOSE_RESET_DOWN),
			err == 0 ? "peer closed the connection" : NULL);
		return;
	}
	h->read_again = 1; /* budget spent with data left: come back after the others */
	h2_mark(h);
}

static void h2_activate(struct zh2 *h)
{
	const unsigned char *alpn = NULL;
	unsigned int alpn_len = 0;

	SSL_get0_alpn_selected(h->ep.ssl, &alpn, &alpn_len);
	if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) {
		zstat_add(&h->w->stats.hbone_protocol_errors, 1);
		ztls_count_failure(h->w, ZTUN_TLSR_NO_ALPN);
		h2_fail(h, ZTUN_CLOSE_PROTOCOL, "peer did not negotiate ALPN h2");
		return;
	}
	if (h2_session_new(h) != 0) {
		h2_fail(h, ZTUN_CLOSE_NO_MEMORY, "cannot create the HTTP/2 session");
		return;
	}
	zstat_add(&h->w->stats.handshakes, 1);
	if (SSL_session_reused(h->ep.ssl))
		zstat_add(&h->w->stats.handshakes_resumed, 1);
	ztls_expect_put(h->hs->expect);
	free(h->hs);
	h->hs = NULL;
	h->state = H2_ACTIVE;
	h->next_ping = h->w->now + H2_PING_INTERVAL_NS;
	/* Client: send the queued CONNECTs. */
	struct zlist *it = h->flows.next;

	while (it != &h->flows) {
		struct zflow *f = zlist_entry(it, struct zflow, wlink);

		it = it->next;
		if (h->peer_id && !f->peer_id)
			f->peer_id = strdup(h->peer_id);
		if (f->ep[1].stream_id == 0)
			h2_submit_request(h, f);
	}
	h2_mark(h);
	h2_read(h); /* data may have come with the handshake */
}

static void h2_handshake(struct zh2 *h)
{
	char *id = NULL;
	int r = zep_handshake(&h->ep, h->hs, &id);

	if (r == 0)
		return;
	if (r < 0) {
		ztls_count_failure(h->w, h->hs->code);
		h2_fail(h, ZTUN_CLOSE_TLS_ERROR, NULL);
		return;
	}
	h->peer_id = id;
	h2_activate(h);
}

static int h2_begin_tls(struct zh2 *h)
{
	if (!h->hs || !h->tls)
		return ZTUN_ENOMEM;
	h->ep.kind = EP_TCP;
	return zep_tls_begin(h->w, &h->ep, h->tls, h->hs, h->server ? NULL : "h2");
}

void zh2_accept(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *src)
{
	struct zh2 *h = h2_new(w, l, 1, NULL);

	if (!h) {
		close(fd);
		return;
	}
	h->peer = *src;
	h->ep.fd = fd;
	if (zep_register(w, &h->ep) < 0 || h2_begin_tls(h) != 0) {
		ztls_count_failure(w, h->hs ? h->hs->code : 0);
		h2_fail(h, ZTUN_CLOSE_TLS_ERROR, h->detail ? NULL : "cannot start TLS");
		return;
	}
	h->state = H2_HANDSHAKE;
	h->deadline = w->now + (uint64_t)w->e->cfg.handshake_timeout_ms * 1000000ull;
}

/* ---- outbound: the pool ------------------------------------------------------ */

static int same_expect(const struct ztls_expect *a, const struct ztls_expect *b)
{
	int na = a ? a->n : 0, nb = b ? b->n : 0;

	if (na != nb)
		return 0;
	for (int i = 0; i < na; i++) {
		int found = 0;

		for (int j = 0; j < nb && !found; j++)
			found = strcmp(a->ids[i], b->ids[j]) == 0;
		if (!found)
			return 0;
	}
	return 1;
}

static uint32_t stream_limit(const struct zh2 *h)
{
	uint32_t lim = H2_CLIENT_MAX_STREAMS;

	if (h->s) {
		uint32_t peer = nghttp2_session_get_remote_settings(h->s, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);

		if (peer < lim)
			lim = peer;
	}
	return lim;
}

/* Pool key: (our identity, acceptable peer identities, dialed address). The source
 * address is the kernel's choice for every connection we make, so it is implied. */
static struct zh2 *pool_find(struct zworker *w, struct zlistener *l, const struct sockaddr_storage *hop,
			     const struct ztls_expect *expect)
{
	const char *me;
	struct zh2 *best = NULL;

	pthread_mutex_lock(&l->tls_lock);
	me = l->tls ? l->tls->identity : NULL;
	for (struct zlist *it = w->h2s.next; me && it != &w->h2s; it = it->next) {
		struct zh2 *h = zlist_entry(it, struct zh2, link);

		if (h->server || h->state > H2_ACTIVE || !h->tls)
			continue;
		if (strcmp(h->tls->identity, me) != 0 || !same_addr(&h->peer, hop) ||
		    !same_expect(h->expect, expect))
			continue;
		if (h->nstreams >= stream_limit(h))
			continue;
		/* Prefer the busiest connection that has room: fewer connections overall. */
		if (!best || h->nstreams > best->nstreams)
			best = h;
	}
	pthread_mutex_unlock(&l->tls_lock);
	return best;
}

static struct zh2 *pool_dial(struct zworker *w, struct zlistener *l, const struct sockaddr_storage *dst,
			     struct ztls_expect *expect)
{
	struct zh2 *h = h2_new(w, l, 0, expect);
	socklen_t dlen = dst->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	int one = 1;

	if (!h)
		return NULL;
	h->peer = *dst;
	h->ep.fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (h->ep.fd < 0) {
		h2_fail(h, ZTUN_CLOSE_CONNECT_ERROR, strerror(errno));
		return NULL;
	}
	setsockopt(h->ep.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (zep_register(w, &h->ep) < 0) {
		h2_fail(h, ZTUN_CLOSE_CONNECT_ERROR, strerror(errno));
		return NULL;
	}
	h->state = H2_CONNECTING;
	h->deadline = w->now + (uint64_t)w->e->cfg.connect_timeout_ms * 1000000ull;
	if (connect(h->ep.fd, (const struct sockaddr *)dst, dlen) < 0 && errno != EINPROGRESS) {
		h2_fail(h, errno == ECONNREFUSED ? ZTUN_CLOSE_CONNECT_REFUSED : ZTUN_CLOSE_CONNECT_ERROR,
			strerror(errno));
		return NULL;
	}
	return h;
}

static void h2_submit_request(struct zh2 *h, struct zflow *f)
{
	char authority[64], forwarded[80], src[64], trace[56];
	const char *baggage = f->l->baggage;
	nghttp2_nv nv[6];
	int n = 0;
	nghttp2_data_provider prd = {.read_callback = data_read_cb};
	int32_t sid;

#define NV(k, v) \
	nv[n++] = (nghttp2_nv){(uint8_t *)(k), (uint8_t *)(v), sizeof(k) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}
	format_addr(&f->target, authority, sizeof(authority));
	new_traceparent(h->w, trace);
	NV(":method", "CONNECT");
	NV(":authority", authority);
	if (f->src.ss_family == AF_INET || f->src.ss_family == AF_INET6) {
		format_addr(&f->src, src, sizeof(src));
		snprintf(forwarded, sizeof(forwarded), "for=\"%s\"", src);
		NV("forwarded", forwarded);
	}
	NV("traceparent", trace);
	if (baggage && *baggage)
		NV("baggage", baggage);
#undef NV
	f->trace = strdup(trace);
	sid = nghttp2_submit_request(h->s, NULL, nv, (size_t)n, &prd, f);
	if (sid < 0) {
		zflow_set_detail(f, nghttp2_strerror(sid));
		zflow_close(h->w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
		return;
	}
	f->ep[1].stream_id = sid;
	h2_mark(h);
}

void zh2_open_outbound(struct zworker *w, struct zflow *f)
{
	struct zlistener *l = f->l;
	struct zh2 *h;

	if (!f->hop.ss_family) {
		/* A static HBONE_OUT listener: its upstream, its expectations. */
		f->hop = l->upstream;
		if (!f->expect)
			f->expect = ztls_expect_ref(l->expect);
	}
	h = pool_find(w, l, &f->hop, f->expect);
	if (!h) {
		h = pool_dial(w, l, &f->hop, f->expect);
		if (!h) {
			zflow_set_detail(f, "cannot reach the HBONE peer");
			zflow_close(w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
			return;
		}
	}
	f->dst = f->hop;
	f->ep[1].kind = EP_STREAM;
	f->ep[1].h2 = h;
	f->ep[1].stream_id = 0; /* submitted when the connection is ready */
	zlist_add_tail(&h->flows, &f->wlink);
	h->nstreams++;
	if (h->tls && !f->tls)
		f->tls = ztun_tls_ctx_ref(h->tls);
	if (h->state == H2_ACTIVE) {
		if (h->peer_id && !f->peer_id)
			f->peer_id = strdup(h->peer_id);
		h2_submit_request(h, f);
	}
}

/* ---- stream endpoints (called by conn.c) ----------------------------------- */

void zh2_stream_data_ready(struct zworker *w, struct zflow *f, int d)
{
	struct zep *ep = &f->ep[!d];

	if (!ep->h2 || ep->stream_id <= 0 || ep->h2->state == H2_DEAD)
		return;
	if (ep->deferred) {
		ep->deferred = 0;
		nghttp2_session_resume_data(ep->h2->s, ep->stream_id);
	}
	h2_mark(ep->h2);
}

void zh2_stream_consumed(struct zworker *w, struct zep *ep, size_t n)
{
	struct zh2 *h = ep->h2;

	if (!h || h->state == H2_DEAD || !h->s)
		return;
	if (ep->stream_id > 0)
		nghttp2_session_consume(h->s, ep->stream_id, n);
	else
		nghttp2_session_consume_connection(h->s, n);
	h2_mark(h);
}

void zh2_stream_close(struct zworker *w, struct zflow *f, struct zep *ep, int reset)
{
	struct zh2 *h = ep->h2;
	size_t unread = 0;

	if (!h)
		return;
	for (struct zbuf *b = ep->rxq_head; b; b = b->next)
		unread += zbuf_len(b);
	zlist_del(&f->wlink);
	h->nstreams--;
	if (h->nstreams == 0)
		h->idle_since = w->now;
	ep->h2 = NULL;
	if (h->state == H2_DEAD || !h->s)
		return;
	if (ep->stream_id > 0) {
		nghttp2_session_set_stream_user_data(h->s, ep->stream_id, NULL);
		/* RST_STREAM(CONNECT_ERROR) is how HTTP/2 CONNECT says "the TCP side reset". */
		/* A refused request needs no reset: the response ended our side and the
		 * client ends its own. */
		if (reset)
			nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, ep->stream_id,
						  NGHTTP2_CONNECT_ERROR);
	}
	if (unread)
		nghttp2_session_consume_connection(h->s, unread);
	h2_mark(h);
}

void zh2_upstream_result(struct zworker *w, struct zflow *f, int ok)
{
	struct zh2 *h = f->ep[0].h2;

	if (!h || h->state == H2_DEAD || f->ep[0].stream_id <= 0)
		return;
	respond(h, f, ok ? 200 : 503, ok);
}

/* ---- events, timers, shutdown ---------------------------------------------- */

void zh2_on_event(struct zworker *w, struct ztag *tag, uint32_t events)
{
	struct zh2 *h = container_of(tag, struct zh2, ep.tag);

	if (h->state == H2_DEAD)
		return;
	if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		h->ep.rdhup = 1;
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		h->ep.rd_ready = 1;
	if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
		h->ep.wr_ready = 1;
	switch (h->state) {
	case H2_CONNECTING: {
		int err;

		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		err = zsock_error(h->ep.fd);
		if (err) {
			h2_fail(h, err == ECONNREFUSED ? ZTUN_CLOSE_CONNECT_REFUSED : ZTUN_CLOSE_CONNECT_ERROR,
				strerror(err));
			return;
		}
		if (h2_begin_tls(h) != 0) {
			ztls_count_failure(w, h->hs ? h->hs->code : 0);
			h2_fail(h, ZTUN_CLOSE_TLS_ERROR, NULL);
			return;
		}
		h->state = H2_HANDSHAKE;
		h->deadline = w->now + (uint64_t)w->e->cfg.handshake_timeout_ms * 1000000ull;
		h2_handshake(h);
		return;
	}
	case H2_HANDSHAKE:
		h2_handshake(h);
		return;
	default:
		if (events & EPOLLERR) {
			int err = zsock_error(h->ep.fd);

			h2_fail(h, h->server ? ZTUN_CLOSE_RESET_DOWN : ZTUN_CLOSE_RESET_UP,
				err ? strerror(err) : "connection error");
			return;
		}
		h2_read(h);
		if (h->state != H2_DEAD)
			h2_mark(h);
		return;
	}
}

void zh2_flush_dirty(struct zworker *w)
{
	struct zlist batch;

	zlist_take(&batch, &w->h2dirty);
	while (!zlist_empty(&batch)) {
		struct zh2 *h = zlist_entry(batch.next, struct zh2, dlink);

		zlist_del(&h->dlink);
		if (h->read_again) {
			h->read_again = 0;
			h2_read(h);
		}
		h2_send(h);
	}
}

void zh2_tick(struct zworker *w)
{
	struct zlist *it = w->h2s.next;

	while (it != &w->h2s) {
		struct zh2 *h = zlist_entry(it, struct zh2, link);

		it = it->next;
		if (h->state < H2_ACTIVE) {
			if (w->now >= h->deadline && h->state == H2_HANDSHAKE)
				ztls_count_failure(w, ZTUN_TLSR_HANDSHAKE_TIMEOUT);
			if (w->now >= h->deadline)
				h2_fail(h, h->state == H2_CONNECTING ? ZTUN_CLOSE_CONNECT_TIMEOUT
								     : ZTUN_CLOSE_HANDSHAKE_TIMEOUT,
					h->state == H2_CONNECTING ? "connect timed out"
								  : "TLS handshake timed out");
			continue;
		}
		if (h->ping_sent && w->now - h->ping_sent > H2_PING_TIMEOUT_NS) {
			h2_fail(h, ZTUN_CLOSE_IO_ERROR, "no PING reply within 20 s");
			continue;
		}
		if (!h->ping_sent && w->now >= h->next_ping) {
			nghttp2_submit_ping(h->s, NGHTTP2_FLAG_NONE, NULL);
			h->ping_sent = w->now;
			h->next_ping = w->now + H2_PING_INTERVAL_NS;
			h2_mark(h);
		}
		if (!h->server && h->nstreams == 0 && w->now - h->idle_since > H2_POOL_IDLE_NS) {
			nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0);
			h->state = H2_GOAWAY;
			h2_mark(h);
		}
	}
}

void zh2_shutdown_all(struct zworker *w, int graceful)
{
	struct zlist *it = w->h2s.next;

	while (it != &w->h2s) {
		struct zh2 *h = zlist_entry(it, struct zh2, link);

		it = it->next;
		if (graceful && h->state == H2_ACTIVE && h->s) {
			/* Drain: no new streams; live ones finish. */
			nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE,
					      nghttp2_session_get_last_proc_stream_id(h->s), NGHTTP2_NO_ERROR,
					      NULL, 0);
			h->state = H2_GOAWAY;
			h2_mark(h);
			if (h->nstreams == 0)
				h2_send(h);
		} else if (!graceful) {
			h2_fail(h, ZTUN_CLOSE_SHUTDOWN, "engine stopped");
		}
	}
	if (graceful)
		zh2_flush_dirty(w);
}

void zh2_reap(struct zworker *w)
{
	while (!zlist_empty(&w->h2zombies)) {
		struct zh2 *h = zlist_entry(w->h2zombies.next, struct zh2, link);

		zlist_del(&h->link);
		h2_free(h);
	}
}

int zh2_count(struct zworker *w)
{
	int n = 0;

	for (struct zlist *it = w->h2s.next; it != &w->h2s; it = it->next)
		n++;
	return n;
}
