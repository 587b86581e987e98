/* Connections: accept → (handshake) → authorize → connect → (handshake) → relay.
 *
 * Sockets are registered edge-triggered for both directions once, for their whole
 * life; readiness is remembered in the endpoint flags (rd_ready/wr_ready) and
 * cleared only when an operation says EAGAIN. That spares an epoll_ctl per state
 * change and makes backpressure simple: when a direction's buffer is full we just
 * stop reading, the kernel's socket buffers fill, and TCP slows the sender.
 *
 * An endpoint can also be an HTTP/2 CONNECT stream (hbone.c): then "reading" it
 * means taking DATA the HTTP/2 layer queued (its flow-control window bounds the
 * queue), and "writing" it means handing bytes to the stream's data provider.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "conn.h"
#include "ztun/policy.h"

/* A flow relays at most this many rounds per wake-up, then yields to the others. */
#define RELAY_ROUNDS 8

static void zpipe_put(struct zworker *w, struct zpipe *p);
static void pair_end(struct zworker *w, struct zflow *f);

/* ---- state -------------------------------------------------------------- */

int zflow_set_state(struct zflow *f, int next)
{
	if (!(flow_next[f->state] & FS_BIT(next)))
		return -1; /* a bug: the table does not allow it */
	f->state = (uint8_t)next;
	return 0;
}

void zflow_set_pending(struct zworker *w, struct zflow *f, uint32_t timeout_ms)
{
	f->deadline = w->now + (uint64_t)timeout_ms * 1000000ull;
	if (!zlist_linked(&f->plink))
		zlist_add_tail(&w->pending, &f->plink);
}

static void clear_pending(struct zflow *f)
{
	if (zlist_linked(&f->plink))
		zlist_del(&f->plink);
}

static void touch(struct zworker *w, struct zflow *f)
{
	f->last_active = w->now;
	zlist_move_tail(&w->flows, &f->link);
}

void zflow_set_detail(struct zflow *f, const char *s)
{
	if (f->detail || !s || !*s)
		return;
	f->detail = strdup(s);
}

/* ---- events ------------------------------------------------------------- */

int zflow_emit(struct zworker *w, struct zflow *f, int type)
{
	uint32_t mask = type == ZTUN_EV_CONN_OPEN	 ? ZTUN_EVMASK_OPEN
			: type == ZTUN_EV_CONN_CLOSE ? ZTUN_EVMASK_CLOSE
						     : ZTUN_EVMASK_ALL; /* results: always */
	const char *local = f->tls ? ztun_tls_ctx_identity(f->tls) : NULL;
	const char *parts[5] = {f->peer_id, f->detail, local, f->trace, f->baggage};
	size_t lens[5], total = 0;
	struct ztun_event_conn *ev;
	uint32_t len;
	char *p;

	if (!(atomic_load_explicit(&w->e->events, memory_order_relaxed) & mask))
		return 0;
	for (int i = 0; i < 5; i++) {
		lens[i] = parts[i] ? strlen(parts[i]) : 0;
		if (lens[i] > 2048)
			lens[i] = 2048;
		total += lens[i];
	}
	len = zring_align((uint32_t)(sizeof(*ev) + total));
	ev = zring_reserve(&w->ring, len);
	if (!ev)
		return -1;
	memset(ev, 0, sizeof(*ev));
	ev->h.len = len;
	ev->h.type = (uint16_t)type;
	ev->h.worker = (uint16_t)w->idx;
	ev->fd = type == ZTUN_EV_ACCEPT ? f->deliver_fd : -1;
	ev->conn_id = f->id;
	ev->listener_id = f->l->id;
	ev->reason = f->reason;
	ev->mode = (uint16_t)f->l->mode;
	ev->policy = f->policy;
	ev->policy_rule = f->policy_rule;
	ev->http_status = f->http_status;
	ev->sys_errno = f->sys_errno;
	ev->policy_gen = f->policy_gen;
	ev->policy_reason = f->policy_reason;
	ev->policy_flags = f->policy_flags;
	ev->dry_run_policy = f->dry_run_policy;
	ev->dry_run_rule = f->dry_run_rule;
	ev->start_ns = f->start_real;
	ev->duration_ns = type == ZTUN_EV_CONN_CLOSE ? (ztun_now_precise() - f->start_mono) : 0;
	ev->bytes_down_up = f->bytes[0];
	ev->bytes_up_down = f->bytes[1];
	ev->src = f->src;
	ev->dst = f->dst;
	ev->target = f->target;
	ev->request_id = f->request_id;
	ev->peer_id_len = (uint16_t)lens[0];
	ev->detail_len = (uint16_t)lens[1];
	ev->local_id_len = (uint16_t)lens[2];
	ev->trace_len = (uint16_t)lens[3];
	ev->baggage_len = (uint16_t)lens[4];
	ev->tls_reason = f->tls_reason;
	p = (char *)(ev + 1);
	for (int i = 0; i < 5; i++) {
		if (lens[i])
			memcpy(p, parts[i], lens[i]);
		p += lens[i];
	}
	zring_commit(&w->ring, len);
	zworker_wake_consumer(w);
	return 0;
}

/* ---- closing ------------------------------------------------------------ */

static void rxq_free(struct zworker *w, struct zep *ep)
{
	while (ep->rxq_head) {
		struct zbuf *b = ep->rxq_head;

		ep->rxq_head = b->next;
		zpool_put(&w->pool, b);
	}
	ep->rxq_tail = NULL;
}

void zflow_close(struct zworker *w, struct zflow *f, int reason, int down_how, int up_how)
{
	int was = f->state;

	if (f->state == FS_CLOSED)
		return;
	f->reason = (uint8_t)reason;
	if (f->socks == SOCKS_WAITING) {
		/* Tell the SOCKS5 client why, then a FIN so it reads the reply. */
		zsocks_reply(w, f, 0, reason);
		down_how = END_GRACEFUL;
	}
	zflow_set_state(f, FS_CLOSED);
	clear_pending(f);
	if (zlist_linked(&f->alink))
		zlist_del(&f->alink);
	zlist_del(&f->link);
	/* Before the sockets close: nothing of the pair is redirected after this, and
	 * the kernel's byte counts join ours for the access log. */
	pair_end(w, f);

	for (int s = 0; s < 2; s++) {
		int how = s == 0 ? down_how : up_how;
		struct zep *ep = &f->ep[s];

		if (ep->kind == EP_STREAM) {
			zh2_stream_close(w, f, ep, how == END_RESET);
			rxq_free(w, ep);
			continue;
		}
		if (how == END_GRACEFUL && ep->ssl && !ep->notify_sent && SSL_is_init_finished(ep->ssl)) {
			SSL_shutdown(ep->ssl); /* best effort close_notify */
			ep->notify_sent = 1;
		}
		if (how == END_GRACEFUL &&
		    (reason == ZTUN_CLOSE_TLS_ERROR || reason == ZTUN_CLOSE_POLICY_DENIED))
			zep_close_lingering(ep); /* the refused peer reads why before any RST */
		else
			zep_close(ep, how == END_RESET);
	}

	for (int d = 0; d < 2; d++) {
		zpool_put(&w->pool, f->buf[d]);
		f->buf[d] = NULL;
		zpipe_put(w, f->pipe[d]);
		f->pipe[d] = NULL;
	}
	if (f->deliver_fd >= 0) {
		close(f->deliver_fd);
		f->deliver_fd = -1;
	}
	zstat_add(&w->stats.closed, 1);
	zstat_add(&w->stats.reason[reason], 1);
	if (f->request_id && was < FS_RELAY)
		zflow_emit(w, f, ZTUN_EV_CONNECT_DONE); /* the caller learns why it failed */
	zflow_emit(w, f, ZTUN_EV_CONN_CLOSE);
	w->nflows--;
	zlist_add_tail(&w->zombies, &f->link);
}

static void flow_free(struct zflow *f)
{
	if (f->hs) {
		ztls_expect_put(f->hs->expect);
		free(f->hs);
	}
	ztun_tls_ctx_free(f->tls);
	free(f->peer_id);
	free(f->src_principal);
	free(f->detail);
	free(f->trace);
	free(f->baggage);
	free(f->req);
	ztls_expect_put(f->expect);
	zlistener_put(f->l);
	free(f);
}

void zflow_reap(struct zworker *w)
{
	while (!zlist_empty(&w->zombies)) {
		struct zflow *f = zlist_entry(w->zombies.next, struct zflow, link);

		zlist_del(&f->link);
		flow_free(f);
	}
}

/* An I/O error on endpoint `side`: the peer there reset (or worse). Reset the other. */
static void flow_fail_io(struct zworker *w, struct zflow *f, int side, int err)
{
	int reason;

	f->sys_errno = err < 0 ? -err : err;
	if (err == -ECONNRESET || err == -EPIPE || err == -ECONNABORTED || err == -ETIMEDOUT)
		reason = side == 0 ? ZTUN_CLOSE_RESET_DOWN : ZTUN_CLOSE_RESET_UP;
	else if (err == -EPROTO)
		reason = ZTUN_CLOSE_TLS_ERROR;
	else
		reason = ZTUN_CLOSE_IO_ERROR;
	zflow_close(w, f, reason, END_RESET, END_RESET);
}

/* ---- splice pipes -------------------------------------------------------- */

#define ZTUN_PIPE_KEEP 64

static struct zpipe *zpipe_get(struct zworker *w)
{
	struct zpipe *p = w->pipes;
	int fds[2];

	if (p) {
		w->pipes = p->next;
		w->npipes--;
		p->next = NULL;
		return p;
	}
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
		return NULL;
	p = calloc(1, sizeof(*p));
	if (!p) {
		close(fds[0]);
		close(fds[1]);
		return NULL;
	}
	p->r = fds[0];
	p->w = fds[1];
	fcntl(p->w, F_SETPIPE_SZ, (int)w->e->cfg.splice_pipe);
	return p;
}

static void zpipe_free(struct zpipe *p)
{
	close(p->r);
	close(p->w);
	free(p);
}

static void zpipe_put(struct zworker *w, struct zpipe *p)
{
	if (!p)
		return;
	if (p->len || w->npipes >= ZTUN_PIPE_KEEP) {
		zpipe_free(p); /* a pipe with leftovers cannot be reused */
		return;
	}
	p->next = w->pipes;
	w->pipes = p;
	w->npipes++;
}

void zpipe_pool_destroy(struct zworker *w)
{
	while (w->pipes) {
		struct zpipe *p = w->pipes;

		w->pipes = p->next;
		zpipe_free(p);
	}
	w->npipes = 0;
}

/* ---- sockmap pairs ------------------------------------------------------- *
 *
 * When the accelerator is attached and both endpoints are plain TCP sockets to local
 * apps, the pair is handed to the kernel: each app's sends go straight into the
 * other app's socket (sk_msg), while we keep relaying whatever still comes our way
 * (before the switch, and whenever the program falls back), carry FIN and RST, and
 * count. The order argument is the BPF side's (docs/sockmap.md); our part of the
 * protocol is the per-direction busy flag: up before every read, down once all we
 * read has been written. */

#define PAIR_TRIES 20 /* pair_add says EAGAIN until the peer's accept is complete */

static void pair_busy(struct zworker *w, struct zflow *f, int d, int busy)
{
	if (!f->paired || f->busy[d] == busy)
		return;
	f->busy[d] = (uint8_t)busy;
	w->e->bpf_api->relay_busy(w->e->bpf, f->pair_id, (unsigned)d, busy);
}

static void pair_try(struct zworker *w, struct zflow *f)
{
	const struct ztun_bpf_api *api = w->e->bpf_api;
	int rc;

	if (!f->pair_tries || f->paired)
		return;
	rc = api->pair_add(w->e->bpf, f->ep[0].fd, f->ep[1].fd, 0, &f->pair_id);
	if (rc == -EAGAIN) {
		f->pair_tries--;
		return;
	}
	f->pair_tries = 0;
	if (rc < 0)
		return; /* not a local pair (or no room): the relay carries it */
	f->paired = 1;
	f->busy[0] = f->busy[1] = 1; /* a new pair starts busy both ways */
	zstat_add(&w->stats.bpf_pairs, 1);
	for (int d = 0; d < 2; d++) {
		if (!f->buf[d] || zbuf_len(f->buf[d]) == 0)
			pair_busy(w, f, d, 0);
	}
}

static void pair_end(struct zworker *w, struct zflow *f)
{
	struct ztun_bpf_pair_stats st;

	if (!f->paired)
		return;
	f->paired = 0;
	if (w->e->bpf_api->pair_del(w->e->bpf, f->pair_id, &st) == 0) {
		/* What went app to app never passed the relay: count it now. */
		for (int d = 0; d < 2; d++) {
			zflow_count_bytes(w, f, d, st.direct_bytes[d]);
			zstat_add(&w->stats.bpf_direct_bytes, st.direct_bytes[d]);
		}
	}
}

/* ---- relay -------------------------------------------------------------- */

void zflow_count_bytes(struct zworker *w, struct zflow *f, int d, uint64_t n)
{
	f->bytes[d] += n;
	zstat_add(&w->stats.bytes[d], n);
}

static int write_pending_tls(struct zworker *w, struct zflow *f, int side)
{
	struct zep *out = &f->ep[side];

	if (out->tx && out->wr_ready) {
		/* Records queued by an earlier write, a handshake or a key update. */
		int r = zep_flush(out);

		if (r == 0)
			return 1;
		if (r != -EAGAIN) {
			flow_fail_io(w, f, side, r);
			return -1;
		}
	}
	return 0;
}

static int shutdown_if_done(struct zworker *w, struct zflow *f, int d, int drained)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	int r;

	if (!in->rd_eof || !drained || out->wr_shut)
		return 0;
	r = zep_shutdown_write(out);
	if (r == 0) {
		out->wr_shut = 1;
		return 1;
	}
	if (r != -EAGAIN) {
		flow_fail_io(w, f, !d, r);
		return -1;
	}
	return 0;
}

/* Stream -> socket: write the DATA the HTTP/2 layer queued, then open its window. */
static int relay_from_stream(struct zworker *w, struct zflow *f, int d)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	int progress = write_pending_tls(w, f, !d), r;

	if (progress < 0)
		return -1;
	while (in->rxq_head && out->wr_ready) {
		struct zbuf *b = in->rxq_head;

		r = zep_write(out, b);
		if (r > 0) {
			b->head += (uint32_t)r;
			zflow_count_bytes(w, f, d, (uint64_t)r);
			zh2_stream_consumed(w, in, (size_t)r);
			progress = 1;
			if (zbuf_len(b) == 0) {
				in->rxq_head = b->next;
				if (!in->rxq_head)
					in->rxq_tail = NULL;
				zpool_put(&w->pool, b);
			}
		} else if (r == -EAGAIN) {
			break;
		} else {
			flow_fail_io(w, f, !d, r);
			return -1;
		}
	}
	r = shutdown_if_done(w, f, d, !in->rxq_head);
	return r < 0 ? -1 : (progress | r);
}

/* Socket -> stream: read into buf[d]; the stream's data provider takes it from there. */
static int relay_to_stream(struct zworker *w, struct zflow *f, int d)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	struct zbuf *b = f->buf[d];
	int r;

	if (in->rd_eof || !in->rd_ready || out->wr_shut || (b && !zbuf_space(b)))
		return 0;
	if (!b) {
		b = f->buf[d] = zpool_get(&w->pool, f->cls[d]);
		if (!b) {
			zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
			return -1;
		}
	}
	uint32_t space = zbuf_space(b);

	r = zep_read(in, b);
	if (r > 0) {
		b->tail += (uint32_t)r;
		if ((uint32_t)r == space && b->cls == ZBUF_SMALL)
			f->cls[d] = ZBUF_LARGE;
		zh2_stream_data_ready(w, f, d);
		return 1;
	}
	if (r == 0) {
		in->rd_eof = 1;
		if (zbuf_len(b) == 0) {
			zpool_put(&w->pool, b);
			f->buf[d] = NULL;
		}
		zh2_stream_data_ready(w, f, d); /* the provider now ends the stream */
		return 1;
	}
	if (r != -EAGAIN) {
		flow_fail_io(w, f, d, r);
		return -1;
	}
	if (zbuf_len(b) == 0) {
		zpool_put(&w->pool, b);
		f->buf[d] = NULL;
	}
	return 0;
}

/* Move bytes from ep[d] to ep[!d]. 1: progress, 0: nothing to do, -1: flow closed. */
static int relay_dir(struct zworker *w, struct zflow *f, int d)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	struct zbuf *b = f->buf[d];
	int progress, r;

	if (in->kind == EP_STREAM)
		return relay_from_stream(w, f, d);
	if (out->kind == EP_STREAM)
		return relay_to_stream(w, f, d);

	progress = write_pending_tls(w, f, !d);
	if (progress < 0)
		return -1;
	if (b && zbuf_len(b) && out->wr_ready) {
		r = zep_write(out, b);
		if (r > 0) {
			b->head += (uint32_t)r;
			zflow_count_bytes(w, f, d, (uint64_t)r);
			progress = 1;
		} else if (r != -EAGAIN) {
			flow_fail_io(w, f, !d, r);
			return -1;
		}
	}
	if (!in->rd_eof && in->rd_ready && (!b || zbuf_space(b))) {
		if (!b) {
			b = f->buf[d] = zpool_get(&w->pool, f->cls[d]);
			if (!b) {
				zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
				return -1;
			}
		}
		uint32_t space = zbuf_space(b);

		pair_busy(w, f, d, 1); /* before the read: the kernel must not go direct now */
		r = zep_read(in, b);
		if (r > 0) {
			b->tail += (uint32_t)r;
			progress = 1;
			/* A read that fills a small ring is a bulk flow: use a large one next. */
			if ((uint32_t)r == space && b->cls == ZBUF_SMALL)
				f->cls[d] = ZBUF_LARGE;
			else if ((uint32_t)r < w->pool.size[ZBUF_SMALL] / 4)
				f->cls[d] = ZBUF_SMALL;
			if (out->wr_ready) {
				int wr = zep_write(out, b);

				if (wr > 0) {
					b->head += (uint32_t)wr;
					zflow_count_bytes(w, f, d, (uint64_t)wr);
				} else if (wr != -EAGAIN) {
					flow_fail_io(w, f, !d, wr);
					return -1;
				}
			}
		} else if (r == 0) {
			in->rd_eof = 1;
			progress = 1;
		} else if (r != -EAGAIN) {
			flow_fail_io(w, f, d, r);
			return -1;
		}
	}
	if (b && zbuf_len(b) == 0) {
		/* Drained: give the ring back so an idle connection holds no buffer. */
		zpool_put(&w->pool, b);
		f->buf[d] = NULL;
	}
	if (!f->buf[d])
		pair_busy(w, f, d, 0); /* everything we read is written: direct may resume */
	r = shutdown_if_done(w, f, d, !f->buf[d]);
	return r < 0 ? -1 : (progress | r);
}

/* The same, TCP to TCP through a pipe with splice(2): no copy in user space. */
static int relay_dir_splice(struct zworker *w, struct zflow *f, int d)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	struct zpipe *p = f->pipe[d];
	const unsigned fl = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
	int progress = 0;
	ssize_t r;

	for (int round = 0; round < 2; round++) {
		if (p && p->len && out->wr_ready) {
			r = splice(p->r, NULL, out->fd, NULL, p->len, fl);
			if (r > 0) {
				p->len -= (uint32_t)r;
				zflow_count_bytes(w, f, d, (uint64_t)r);
				progress = 1;
			} else if (r < 0 && errno == EAGAIN) {
				out->wr_ready = 0;
			} else if (r < 0 && errno != EINTR) {
				flow_fail_io(w, f, !d, -errno);
				return -1;
			}
		}
		if (round == 1 || in->rd_eof || !in->rd_ready)
			break;
		if (!p) {
			p = f->pipe[d] = zpipe_get(w);
			if (!p) {
				zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
				return -1;
			}
		}
		r = splice(in->fd, NULL, p->w, NULL, w->e->cfg.splice_pipe, fl);
		if (r > 0) {
			p->len += (uint32_t)r;
			progress = 1;
		} else if (r == 0) {
			in->rd_eof = 1;
			progress = 1;
		} else if (errno == EAGAIN) {
			/* Empty pipe: the socket is drained. Non-empty: maybe the pipe is
			 * full; keep rd_ready and retry once it drains. */
			if (p->len == 0)
				in->rd_ready = 0;
		} else if (errno != EINTR) {
			flow_fail_io(w, f, d, -errno);
			return -1;
		}
	}
	if (p && p->len == 0) {
		zpipe_put(w, p);
		f->pipe[d] = NULL;
	}
	if (in->rd_eof && !f->pipe[d] && !out->wr_shut) {
		int rs = zep_shutdown_write(out);

		if (rs == 0) {
			out->wr_shut = 1;
			progress = 1;
		} else if (rs != -EAGAIN) {
			flow_fail_io(w, f, !d, rs);
			return -1;
		}
	}
	return progress;
}

static int ep_done(const struct zep *ep)
{
	return ep->rd_eof && ep->wr_shut && !ep->tx && !ep->rxq_head;
}

static int flow_finished(const struct zflow *f)
{
	return ep_done(&f->ep[0]) && ep_done(&f->ep[1]) && !f->buf[0] && !f->buf[1] && !f->pipe[0] &&
	       !f->pipe[1];
}

void zflow_relay(struct zworker *w, struct zflow *f)
{
	int moved = 0;
	int use_splice = w->e->cfg.splice_pipe && f->ep[0].kind == EP_TCP && f->ep[1].kind == EP_TCP;

	if (f->state != FS_RELAY)
		return;
	if (f->pair_tries && w->now >= f->pair_next) {
		f->pair_next = w->now + 1000000; /* again in about a millisecond */
		pair_try(w, f);
	}
	for (int round = 0; round < RELAY_ROUNDS; round++) {
		int progress = 0;

		for (int d = 0; d < 2; d++) {
			int r = use_splice ? relay_dir_splice(w, f, d) : relay_dir(w, f, d);

			if (r < 0)
				return;
			progress |= r;
		}
		if (flow_finished(f)) {
			zflow_close(w, f, ZTUN_CLOSE_OK, END_GRACEFUL, END_GRACEFUL);
			return;
		}
		if (!progress) {
			if (moved)
				touch(w, f);
			return;
		}
		moved = 1;
	}
	/* Out of rounds with work left: run again after the other ready flows. */
	touch(w, f);
	if (!zlist_linked(&f->alink))
		zlist_add_tail(&w->again, &f->alink);
}

void zflow_run_again(struct zworker *w)
{
	struct zlist batch;

	/* Flows re-queued while these run wait for the next round. */
	zlist_take(&batch, &w->again);
	while (!zlist_empty(&batch)) {
		struct zflow *f = zlist_entry(batch.next, struct zflow, alink);

		zlist_del(&f->alink);
		zflow_relay(w, f);
	}
}

void zflow_start_relay(struct zworker *w, struct zflow *f)
{
	clear_pending(f);
	zflow_set_state(f, FS_RELAY);
	if (w->e->bpf && f->marked && f->ep[0].kind == EP_TCP && f->ep[1].kind == EP_TCP &&
	    f->ep[0].fd >= 0 && f->ep[1].fd >= 0)
		f->pair_tries = PAIR_TRIES;
	zsocks_reply(w, f, 1, ZTUN_CLOSE_OK);
	if (f->request_id)
		zflow_emit(w, f, ZTUN_EV_CONNECT_DONE);
	zflow_emit(w, f, ZTUN_EV_CONN_OPEN);
	touch(w, f);
	zflow_relay(w, f);
}

/* ---- TLS handshakes ----------------------------------------------------- */

static int begin_tls(struct zworker *w, struct zflow *f, int side)
{
	struct zlistener *l = f->l;

	f->hs = calloc(1, sizeof(*f->hs));
	if (!f->hs)
		return ZTUN_ENOMEM;
	f->hs->server = side == 0;
	if (side == 1) {
		f->hs->expect = ztls_expect_ref(l->expect);
		f->hs->slot = &l->slot;
	}
	pthread_mutex_lock(&l->tls_lock);
	f->tls = ztun_tls_ctx_ref(l->tls);
	pthread_mutex_unlock(&l->tls_lock);
	return zep_tls_begin(w, &f->ep[side], f->tls, f->hs, NULL);
}

static void after_handshake(struct zworker *w, struct zflow *f, int side)
{
	struct zep *ep = &f->ep[side];

	zstat_add(&w->stats.handshakes, 1);
	if (SSL_session_reused(ep->ssl))
		zstat_add(&w->stats.handshakes_resumed, 1);
	ztls_expect_put(f->hs->expect);
	free(f->hs);
	f->hs = NULL;

	if (side == 0) {
		if (!zflow_authorize(w, f)) {
			/* Denied mTLS: a clean close (close_notify), nothing reaches upstream. */
			zflow_close(w, f, ZTUN_CLOSE_POLICY_DENIED, END_GRACEFUL, END_RESET);
			return;
		}
		zflow_set_state(f, FS_CONNECTING);
		zflow_connect(w, f, &f->l->upstream);
	} else {
		zflow_start_relay(w, f);
	}
}

static void drive_handshake(struct zworker *w, struct zflow *f, int side)
{
	char *id = NULL;
	int r = zep_handshake(&f->ep[side], f->hs, &id);

	if (r == 0)
		return;
	if (r < 0) {
		f->tls_reason = (uint8_t)ztls_count_failure(w, f->hs->code);
		zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: TLS handshake with %s failed: %s",
				 (unsigned long long)f->id, side == 0 ? "client" : "server",
				 f->detail ? f->detail : "?");
		/* A failed handshake sent its alert: close the TLS side without an RST after
		 * it. A peer refused after a completed handshake (a resumed session whose
		 * identity no longer passes) cannot get an alert any more: reset it, so it
		 * never mistakes the refusal for a clean end. */
		if (r == -EACCES)
			zflow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
		else
			zflow_close(w, f, ZTUN_CLOSE_TLS_ERROR, side == 0 ? END_GRACEFUL : END_RESET,
				    side == 1 ? END_GRACEFUL : END_RESET);
		return;
	}
	f->peer_id = id;
	after_handshake(w, f, side);
}

/* ---- authorization -------------------------------------------------------- */

static void addr_ip16(const struct sockaddr_storage *ss, uint8_t ip[16], uint16_t *port)
{
	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;

		memcpy(ip, &s6->sin6_addr, 16);
		*port = ntohs(s6->sin6_port);
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;

		memset(ip, 0, 10);
		ip[10] = ip[11] = 0xff;
		memcpy(ip + 12, &s4->sin_addr, 4);
		*port = ss->ss_family == AF_INET ? ntohs(s4->sin_port) : 0;
	}
}

static const char *addr_str(const struct sockaddr_storage *ss, char *out, size_t len)
{
	char ip[INET6_ADDRSTRLEN] = "?";

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;

		inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
		snprintf(out, len, "[%s]:%u", ip, ntohs(s6->sin6_port));
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;

		inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
		snprintf(out, len, "%s:%u", ip, ntohs(s4->sin_port));
	}
	return out;
}

/* The listener's workload in table p: its key is looked up once per table generation
 * (a linear search) and cached in the listener; concurrent workers may race to refresh
 * the cache, which is harmless (same answer, single 64-bit store). */
static int32_t listener_workload(struct zlistener *l, const struct zpolicy *p)
{
	uint64_t c;
	int r;
	int32_t wl;

	if (!l->workload_key)
		return l->workload;
	c = atomic_load_explicit(&l->workload_cache, memory_order_relaxed);
	if ((uint32_t)(c >> 32) == p->gen)
		return (int32_t)(uint32_t)c;
	r = ztun_policy_find_workload_by_name(p->table, l->workload_key, l->workload_key_len);
	wl = r >= 0 ? r : ZTUN_POLICY_WORKLOAD_DEFAULT;
	atomic_store_explicit(&l->workload_cache, ((uint64_t)p->gen << 32) | (uint32_t)wl,
			      memory_order_relaxed);
	return wl;
}

/* The destination policy judges: HBONE_IN the CONNECT authority; otherwise where we
 * connect (the listener's upstream, i.e. the local target of an inbound listener). */
static const struct sockaddr_storage *flow_policy_dst(const struct zflow *f)
{
	if (f->l->mode == ZTUN_MODE_HBONE_IN)
		return &f->target;
	if (f->dst.ss_family)
		return &f->dst;
	return &f->l->upstream;
}

/* The source principal policy judges: the peer's verified identity, unless the flow
 * carries its own (a local route, where peer_id names the destination). */
static const char *flow_principal(const struct zflow *f)
{
	return f->src_principal ? f->src_principal : f->peer_id;
}

/* The facts policy sees (ConnectionFacts in ztun/policy.py) and the verdict. No
 * allocation: everything is read from the flow, its listener and the table. */
static int flow_eval(struct zflow *f, const struct zpolicy *p, uint16_t flags,
		     struct ztun_policy_verdict *v)
{
	struct zlistener *l = f->l;
	struct ztun_policy_conn c;
	uint16_t port;

	addr_ip16(&f->src, c.src_ip, &port);
	addr_ip16(flow_policy_dst(f), c.dst_ip, &c.dst_port);
	c.flags = flags;
	c.peer_id = flow_principal(f);
	c.peer_id_len = c.peer_id ? strlen(c.peer_id) : 0;
	c.dst_workload = -1;
	if (l->mode == ZTUN_MODE_HBONE_IN || f->local_route) {
		int r = ztun_policy_find_workload(p->table, c.dst_ip);

		if (r >= 0)
			c.dst_workload = r;
	}
	if (c.dst_workload < 0)
		c.dst_workload = listener_workload(l, p);
	return ztun_policy_eval(p->table, &c, v);
}

static void record_verdict(struct zflow *f, const struct zpolicy *p,
			   const struct ztun_policy_verdict *v, int recheck)
{
	f->policy = v->policy;
	f->policy_rule = v->rule;
	f->policy_gen = p->gen;
	f->policy_reason = (uint8_t)v->reason;
	f->dry_run_policy = v->dry_run_policy;
	f->dry_run_rule = v->dry_run_rule;
	f->policy_flags = recheck ? ZTUN_EVPOL_RECHECKED : 0;
	if (v->dry_run_evaluated) {
		f->policy_flags |= ZTUN_EVPOL_DRY_RUN;
		if (!v->dry_run_allow)
			f->policy_flags |= ZTUN_EVPOL_DRY_RUN_DENY;
	}
}

static void clear_verdict(struct zflow *f)
{
	f->policy = f->policy_rule = -1;
	f->dry_run_policy = f->dry_run_rule = -1;
	f->policy_gen = 0;
	f->policy_reason = 0;
	f->policy_flags = 0;
}

static const char *policy_label(const struct zpolicy *p, int32_t idx)
{
	const char *n = idx >= 0 ? ztun_policy_name(p->table, idx) : NULL;

	return n ? n : "(default)";
}

int zflow_authorize(struct zworker *w, struct zflow *f)
{
	const struct zpolicy *p = w->policy; /* this worker's reference: stable meanwhile */
	struct ztun_policy_verdict v;
	char src[INET6_ADDRSTRLEN + 8];

	/* The destination judged is the one the access log names, also when denied. */
	if (!f->dst.ss_family && f->l->mode != ZTUN_MODE_HBONE_IN)
		f->dst = f->l->upstream;
	if (!p) {
		clear_verdict(f);
		f->authorized = 1;
		return 1; /* no table: everything is allowed */
	}
	if (flow_eval(f, p, 0, &v) < 0) {
		/* Only a listener workload index outside this table gets here: fail closed. */
		clear_verdict(f);
		zflow_set_detail(f, "policy evaluation failed (bad workload index)");
		zstat_add(&w->stats.policy_denied, 1);
		return 0;
	}
	record_verdict(f, p, &v, 0);
	zstat_add(v.allow ? &w->stats.policy_allowed : &w->stats.policy_denied, 1);
	if (v.dry_run_evaluated && v.dry_run_allow != v.allow) {
		zstat_add(&w->stats.policy_dry_run, 1);
		zworker_emit_log(w, ZTUN_LOG_INFO,
				 "conn %llu: dry-run policy %s would %s the connection from %s (%s); "
				 "enforced verdict: %s by %s (table %u)",
				 (unsigned long long)f->id, policy_label(p, v.dry_run_policy),
				 v.dry_run_allow ? "allow" : "deny", addr_str(&f->src, src, sizeof(src)),
				 flow_principal(f) ? flow_principal(f) : "no identity",
				 v.allow ? "allow" : "deny", policy_label(p, v.policy), p->gen);
	}
	if (!v.allow) {
		zflow_set_detail(f, v.policy >= 0 ? "denied by policy"
						  : "denied: ALLOW policies apply but none matched");
		return 0;
	}
	f->authorized = 1;
	return 1;
}

int zflow_local_workload(struct zworker *w, const struct zlistener *l,
			 const struct sockaddr_storage *dst)
{
	uint8_t ip[16];
	uint16_t port;

	addr_ip16(dst, ip, &port);
	for (uint32_t i = 0; i < l->nworkload_ips; i++) {
		if (memcmp(l->workload_ips[i], ip, 16) == 0)
			return 1;
	}
	/* A listener that names its workloads serves those only: the policy table may also
	 * know other workloads of the node (the same-node routes of a shared accelerator). */
	if (l->nworkload_ips)
		return 0;
	return w->policy && ztun_policy_find_workload(w->policy->table, ip) >= 0;
}

/* ---- connect ------------------------------------------------------------ */

static int close_reason_for_connect(int err)
{
	switch (err) {
	case ECONNREFUSED: return ZTUN_CLOSE_CONNECT_REFUSED;
	case ETIMEDOUT: return ZTUN_CLOSE_CONNECT_TIMEOUT;
	default: return ZTUN_CLOSE_CONNECT_ERROR;
	}
}

static void connect_failed(struct zworker *w, struct zflow *f, int err)
{
	f->sys_errno = err;
	zflow_set_detail(f, strerror(err));
	zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: connect to upstream failed: %s",
			 (unsigned long long)f->id, strerror(err));
	if (f->ep[0].kind == EP_STREAM) {
		/* Inbound HBONE: answer 503 on the stream rather than resetting it. */
		zh2_upstream_result(w, f, 0);
		zflow_close(w, f, close_reason_for_connect(err), END_GRACEFUL, END_RESET);
		return;
	}
	/* The client sees a reset: the closest thing to the refusal we got. */
	zflow_close(w, f, close_reason_for_connect(err), END_RESET, END_RESET);
}

static void connected(struct zworker *w, struct zflow *f)
{
	if (f->l->mode == ZTUN_MODE_TLS_OUT) {
		if (begin_tls(w, f, 1)) {
			f->tls_reason = (uint8_t)ztls_count_failure(w, f->hs ? f->hs->code : 0);
			zflow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
			return;
		}
		zflow_set_state(f, FS_HANDSHAKE_OUT);
		zflow_set_pending(w, f, w->e->cfg.handshake_timeout_ms);
		drive_handshake(w, f, 1);
		return;
	}
	if (f->ep[0].kind == EP_STREAM)
		zh2_upstream_result(w, f, 1); /* 200: the tunnel is open */
	zflow_start_relay(w, f);
}

void zflow_connect(struct zworker *w, struct zflow *f, const struct sockaddr_storage *dst)
{
	struct zep *up = &f->ep[1];
	int one = 1, fd;
	socklen_t dlen = dst->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
						    : sizeof(struct sockaddr_in);

	f->dst = *dst;
	fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		connect_failed(w, f, errno);
		return;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	zflow_tag_source(f, fd);
	up->fd = fd;
	up->kind = EP_TCP;
	if (f->l->mode != ZTUN_MODE_TLS_OUT) {
		/* A plaintext leg to an app: a crash of ztun resets it; with the accelerator
		 * the mark lets its accepted socket join the sockhash (hop and pair). */
		zep_linger_reset(up);
		if (w->e->bpf) {
			uint32_t mark = w->e->bpf_api->mark(w->e->bpf);

			if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) == 0)
				f->marked = 1;
		}
	}
	if (zep_register(w, up) < 0) {
		connect_failed(w, f, errno);
		return;
	}
	if (connect(fd, (const struct sockaddr *)dst, dlen) == 0) {
		up->wr_ready = 1;
		connected(w, f);
		return;
	}
	if (errno != EINPROGRESS) {
		connect_failed(w, f, errno);
		return;
	}
	zflow_set_pending(w, f, w->e->cfg.connect_timeout_ms);
}

/* ---- accept ------------------------------------------------------------- */

struct zflow *zflow_new(struct zworker *w, struct zlistener *l)
{
	struct zflow *f = calloc(1, sizeof(*f));

	if (!f)
		return NULL;
	f->w = w;
	f->id = atomic_fetch_add_explicit(&w->e->next_conn_id, 1, memory_order_relaxed);
	zlistener_get(l);
	f->l = l;
	f->policy = -1;
	f->policy_rule = -1;
	f->dry_run_policy = -1;
	f->dry_run_rule = -1;
	f->start_real = ztun_now_real();
	f->start_mono = ztun_now_precise();
	f->last_active = w->now;
	zlist_init(&f->plink);
	zlist_init(&f->alink);
	zlist_init(&f->wlink);
	f->deliver_fd = -1;
	for (int s = 0; s < 2; s++) {
		f->ep[s].tag.kind = TAG_EP;
		f->ep[s].side = (uint8_t)s;
		f->ep[s].fd = -1;
		f->ep[s].w = w;
		f->ep[s].detail = &f->detail;
	}
	zlist_add_tail(&w->flows, &f->link);
	w->nflows++;
	zstat_add(&w->stats.opened, 1);
	return f;
}

static void flow_begin(struct zworker *w, struct zflow *f);

void zflow_accept(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *src,
		  socklen_t srclen)
{
	struct zflow *f;
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (l->mode == ZTUN_MODE_HBONE_IN) {
		zh2_accept(w, l, fd, src);
		return;
	}
	f = zflow_new(w, l);
	if (!f) {
		close(fd);
		return;
	}
	memcpy(&f->src, src, srclen < sizeof(f->src) ? srclen : sizeof(f->src));
	f->ep[0].fd = fd;
	if (l->mode != ZTUN_MODE_TLS_IN)
		zep_linger_reset(&f->ep[0]); /* a plaintext app socket: see zep_linger_reset */
	flow_begin(w, f);
}

void zflow_adopt(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *target,
		 uint64_t request_id)
{
	struct zflow *f = zflow_new(w, l);
	socklen_t sl = sizeof(f->src);

	if (!f) {
		close(fd);
		return;
	}
	f->request_id = request_id;
	if (target && target->ss_family)
		f->target = *target;
	/* The caller's socket may be blocking; the worker is edge-triggered. */
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	getpeername(fd, (struct sockaddr *)&f->src, &sl); /* AF_UNIX for a socketpair */
	f->ep[0].fd = fd;
	flow_begin(w, f);
}

static void flow_begin(struct zworker *w, struct zflow *f)
{
	struct zlistener *l = f->l;

	f->ep[0].kind = EP_TCP;
	if (zep_register(w, &f->ep[0]) < 0) {
		f->sys_errno = errno;
		zflow_close(w, f, ZTUN_CLOSE_IO_ERROR, END_RESET, END_RESET);
		return;
	}
	switch (l->mode) {
	case ZTUN_MODE_TLS_IN:
		if (begin_tls(w, f, 0)) {
			f->tls_reason = (uint8_t)ztls_count_failure(w, f->hs ? f->hs->code : 0);
			zflow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
			return;
		}
		zflow_set_state(f, FS_HANDSHAKE_IN);
		zflow_set_pending(w, f, w->e->cfg.handshake_timeout_ms);
		/* The client's hello is usually not here yet; the first EPOLLIN drives it. */
		return;
	case ZTUN_MODE_SOCKS5:
		zflow_set_state(f, FS_PREAMBLE);
		f->socks = SOCKS_GREETING;
		zflow_set_pending(w, f, w->e->cfg.handshake_timeout_ms);
		return;
	case ZTUN_MODE_HBONE_OUT:
		if (l->flags & ZTUN_LISTENER_ORIGINAL_DST) {
			struct sockaddr_storage dst;
			int rc = zflow_original_dst(f->ep[0].fd, &dst);

			if (rc < 0) {
				f->sys_errno = -rc;
				zflow_set_detail(f, "no original destination (SO_ORIGINAL_DST)");
				zflow_close(w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
				return;
			}
			zflow_route(w, f, &dst);
			return;
		}
		zflow_set_state(f, FS_CONNECTING);
		if (!f->target.ss_family)
			f->target = l->target_len ? l->target : l->upstream;
		zflow_set_pending(w, f, w->e->cfg.connect_timeout_ms);
		zh2_open_outbound(w, f);
		return;
	default:
		if (l->flags & ZTUN_LISTENER_ORIGINAL_DST) {
			/* Inbound capture: connect to what the client dialled. */
			int rc = zflow_inbound_dst(l, f->ep[0].fd, &f->dst);

			if (rc < 0) {
				f->sys_errno = rc == -ELOOP ? 0 : -rc;
				zflow_set_detail(f, rc == -ELOOP
							    ? "destination port is one of ztun's own (loop)"
							    : "no original destination (not steered here)");
				zflow_close(w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
				return;
			}
		}
		if ((l->flags & ZTUN_LISTENER_POLICY) && !zflow_authorize(w, f)) {
			zflow_close(w, f, ZTUN_CLOSE_POLICY_DENIED, END_RESET, END_RESET);
			return;
		}
		zflow_set_state(f, FS_CONNECTING);
		zflow_connect(w, f, f->dst.ss_family ? &f->dst : &l->upstream);
		return;
	}
}

/* ---- epoll events ------------------------------------------------------- */

void zflow_on_event(struct zworker *w, struct ztag *tag, uint32_t events)
{
	struct zep *ep = container_of(tag, struct zep, tag);
	int side = ep->side;
	struct zflow *f = container_of(ep, struct zflow, ep[side]);

	if (f->state == FS_CLOSED)
		return; /* closed earlier in this batch */
	if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		ep->rdhup = 1;
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
		ep->rd_ready = 1;
		if (ep->wr_wants_rd) {
			ep->wr_wants_rd = 0;
			ep->wr_ready = 1;
		}
	}
	if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
		ep->wr_ready = 1;
		if (ep->rd_wants_wr) {
			ep->rd_wants_wr = 0;
			ep->rd_ready = 1;
		}
	}

	switch (f->state) {
	case FS_PREAMBLE:
		if (side == 0)
			zsocks_on_readable(w, f);
		return;
	case FS_HANDSHAKE_IN:
		if (side == 0)
			drive_handshake(w, f, 0);
		return;
	case FS_CONNECTING:
		if (side == 1 && f->ep[1].kind == EP_TCP && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
			int err = zsock_error(ep->fd);

			if (err) {
				connect_failed(w, f, err);
				return;
			}
			connected(w, f);
			return;
		}
		if (side == 0 && (events & EPOLLERR)) {
			/* The client gave up (reset) before the upstream answered. */
			f->sys_errno = zsock_error(ep->fd);
			zflow_close(w, f, ZTUN_CLOSE_RESET_DOWN, END_RESET, END_RESET);
		}
		return;
	case FS_HANDSHAKE_OUT:
		if (side == 1)
			drive_handshake(w, f, 1);
		else if (events & EPOLLERR)
			zflow_close(w, f, ZTUN_CLOSE_RESET_DOWN, END_RESET, END_RESET);
		return;
	case FS_RELAY:
		if (events & EPOLLERR) {
			int err = zsock_error(ep->fd);

			flow_fail_io(w, f, side, -(err ? err : ECONNRESET));
			return;
		}
		zflow_relay(w, f);
		return;
	default:
		return;
	}
}

/* ---- timers ------------------------------------------------------------- */

void zflow_tick(struct zworker *w)
{
	struct zlist *it = w->pending.next;
	uint64_t idle = (uint64_t)w->e->cfg.idle_timeout_ms * 1000000ull;

	while (it != &w->pending) {
		struct zflow *f = zlist_entry(it, struct zflow, plink);

		it = it->next;
		if (w->now < f->deadline)
			continue;
		if (f->state == FS_CONNECTING) {
			connect_failed(w, f, ETIMEDOUT);
		} else if (f->state == FS_PREAMBLE) {
			zflow_set_detail(f, "SOCKS5 negotiation timed out");
			zworker_emit_log(w, ZTUN_LOG_INFO, "conn %llu: SOCKS5 negotiation timed out",
					 (unsigned long long)f->id);
			zflow_close(w, f, ZTUN_CLOSE_HANDSHAKE_TIMEOUT, END_RESET, END_RESET);
		} else {
			zflow_set_detail(f, "TLS handshake timed out");
			f->tls_reason = (uint8_t)ztls_count_failure(w, ZTUN_TLSR_HANDSHAKE_TIMEOUT);
			zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: TLS handshake timed out",
					 (unsigned long long)f->id);
			zflow_close(w, f, ZTUN_CLOSE_HANDSHAKE_TIMEOUT, END_RESET, END_RESET);
		}
	}
	if (!idle)
		return;
	while (!zlist_empty(&w->flows)) {
		struct zflow *f = zlist_entry(w->flows.next, struct zflow, link);

		if (w->now - f->last_active < idle)
			break;
		if (f->state != FS_RELAY) {
			/* Deadlines of the other states are the pending list's job. */
			zlist_move_tail(&w->flows, &f->link);
			f->last_active = w->now;
			continue;
		}
		zflow_close(w, f, ZTUN_CLOSE_IDLE_TIMEOUT, END_RESET, END_RESET);
	}
}

void zflow_shutdown_all(struct zworker *w, int reason)
{
	while (!zlist_empty(&w->flows)) {
		struct zflow *f = zlist_entry(w->flows.next, struct zflow, link);

		zflow_close(w, f, reason, END_RESET, END_RESET);
	}
}

void zflow_deliver(struct zworker *w, struct zflow *f)
{
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
		f->sys_errno = errno;
		zflow_set_detail(f, "cannot create a socketpair for the caller");
		zh2_upstream_result(w, f, 0);
		zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_GRACEFUL, END_RESET);
		return;
	}
	f->ep[1].fd = sv[0];
	f->ep[1].kind = EP_TCP;
	f->deliver_fd = sv[1];
	if (zep_register(w, &f->ep[1]) < 0 || zflow_emit(w, f, ZTUN_EV_ACCEPT) < 0) {
		/* The caller is not draining its events: refuse rather than pile up fds. */
		zflow_set_detail(f, "accept queue full (the application is not accepting)");
		zh2_upstream_result(w, f, 0);
		zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_GRACEFUL, END_RESET);
		return;
	}
	f->deliver_fd = -1; /* the caller owns it now */
	f->ep[1].wr_ready = 1;
	zflow_set_state(f, FS_CONNECTING);
	zh2_upstream_result(w, f, 1);
	zflow_start_relay(w, f);
}

/* A new table is in force on this worker: judge every authorized live flow again
 * (uncounted: each connection is counted once, when it was first decided). */
void zflow_recheck_policy(struct zworker *w)
{
	const struct zpolicy *p = w->policy;
	struct zlist *it, *next;
	uint32_t checked = 0, closed = 0;

	for (it = w->flows.next; it != &w->flows; it = next) {
		struct zflow *f = zlist_entry(it, struct zflow, link);
		struct ztun_policy_verdict v;
		char src[INET6_ADDRSTRLEN + 8], dst[INET6_ADDRSTRLEN + 8];
		int rc;

		next = it->next; /* closing f unlinks f only */
		if (!f->authorized || f->state == FS_CLOSED)
			continue;
		checked++;
		if (!p) {
			clear_verdict(f);
			continue;
		}
		rc = flow_eval(f, p, ZTUN_POLICY_F_NOCOUNT, &v);
		if (rc == 0) {
			record_verdict(f, p, &v, 1);
			if (v.allow)
				continue;
		} else {
			clear_verdict(f);
		}
		zworker_emit_log(w, ZTUN_LOG_WARNING,
				 "conn %llu: closed by a policy change: peer %s (%s) to %s now denied by %s "
				 "(table %u)",
				 (unsigned long long)f->id, addr_str(&f->src, src, sizeof(src)),
				 flow_principal(f) ? flow_principal(f) : "no identity",
				 addr_str(flow_policy_dst(f), dst, sizeof(dst)),
				 rc == 0 ? policy_label(p, v.policy) : "(evaluation error)", p->gen);
		zflow_set_detail(f, "denied by a policy change");
		/* Reset both sides; for an HBONE stream that is RST_STREAM. */
		zflow_close(w, f, ZTUN_CLOSE_POLICY_CHANGED, END_RESET, END_RESET);
		closed++;
	}
	if (closed)
		zworker_emit_log(w, ZTUN_LOG_INFO,
				 "policy table %u: re-checked %u live connections, closed %u",
				 p ? p->gen : 0, checked, closed);
}

/* ---- policy references -------------------------------------------------- */

struct zpolicy *zpolicy_new(ztun_policy *table, uint32_t gen)
{
	struct zpolicy *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	atomic_store(&p->refs, 1);
	p->gen = gen;
	p->table = table;
	return p;
}

void zpolicy_get(struct zpolicy *p)
{
	atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
}

void zpolicy_put(struct zpolicy *p)
{
	if (!p || atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1)
		return;
	ztun_policy_free(p->table);
	free(p);
}
