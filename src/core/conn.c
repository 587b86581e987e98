/* Connections: accept → (handshake) → authorize → connect → (handshake) → relay.
 *
 * Sockets are registered edge-triggered for both directions once, for their whole
 * life; readiness is remembered in the endpoint flags (rd_ready/wr_ready) and
 * cleared only when an operation says EAGAIN. That spares an epoll_ctl per state
 * change and makes backpressure simple: when a direction's buffer is full we just
 * stop reading, the kernel's socket buffers fill, and TCP slows the sender.
 */
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

/* A flow relays at most this many rounds per wake-up, then yields to the others. */
#define RELAY_ROUNDS 8

static void relay(struct zworker *w, struct zflow *f);
static void zpipe_put(struct zworker *w, struct zpipe *p);
static int tls_flush(struct zflow *f, struct zep *ep);
static void start_connect(struct zworker *w, struct zflow *f);

/* ---- state -------------------------------------------------------------- */

static int flow_set_state(struct zflow *f, int next)
{
	if (!(flow_next[f->state] & FS_BIT(next)))
		return -1; /* a bug: the table does not allow it */
	f->state = (uint8_t)next;
	return 0;
}

static void set_pending(struct zworker *w, struct zflow *f, uint32_t timeout_ms)
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

static void set_detail(struct zflow *f, const char *s)
{
	if (f->detail || !s || !*s)
		return;
	f->detail = strdup(s);
}

/* ---- events ------------------------------------------------------------- */

static void emit_conn(struct zworker *w, struct zflow *f, int type)
{
	uint32_t mask = type == ZTUN_EV_CONN_OPEN ? ZTUN_EVMASK_OPEN : ZTUN_EVMASK_CLOSE;
	const char *local = f->tls ? ztun_tls_ctx_identity(f->tls) : NULL;
	size_t pl = f->peer_id ? strlen(f->peer_id) : 0;
	size_t dl = f->detail ? strlen(f->detail) : 0;
	size_t ll = local ? strlen(local) : 0;
	struct ztun_event_conn *ev;
	uint32_t len;
	char *p;

	if (!(w->e->cfg.events & mask))
		return;
	if (pl > 4096)
		pl = 4096;
	if (dl > 1024)
		dl = 1024;
	if (ll > 4096)
		ll = 4096;
	len = zring_align((uint32_t)(sizeof(*ev) + pl + dl + ll));
	ev = zring_reserve(&w->ring, len);
	if (!ev)
		return;
	memset(ev, 0, sizeof(*ev));
	ev->h.len = len;
	ev->h.type = (uint16_t)type;
	ev->h.worker = (uint16_t)w->idx;
	ev->conn_id = f->id;
	ev->listener_id = f->l->id;
	ev->reason = f->reason;
	ev->mode = (uint16_t)f->l->mode;
	ev->policy = f->policy;
	ev->policy_rule = f->policy_rule;
	ev->http_status = f->http_status;
	ev->sys_errno = f->sys_errno;
	ev->start_ns = f->start_real;
	ev->duration_ns = type == ZTUN_EV_CONN_CLOSE ? (ztun_now_precise() - f->start_mono) : 0;
	ev->bytes_down_up = f->bytes[0];
	ev->bytes_up_down = f->bytes[1];
	ev->src = f->src;
	ev->dst = f->dst;
	ev->peer_id_len = (uint16_t)pl;
	ev->detail_len = (uint16_t)dl;
	ev->local_id_len = (uint16_t)ll;
	p = (char *)(ev + 1);
	if (pl)
		memcpy(p, f->peer_id, pl);
	if (dl)
		memcpy(p + pl, f->detail, dl);
	if (ll)
		memcpy(p + pl + dl, local, ll);
	zring_commit(&w->ring, len);
	zworker_wake_consumer(w);
}

/* ---- endpoints ---------------------------------------------------------- */

static int ep_register(struct zworker *w, struct zep *ep)
{
	struct epoll_event ev = {
		.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		.data.ptr = &ep->tag,
	};

	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, ep->fd, &ev) < 0)
		return -errno;
	return 0;
}

static void ep_close(struct zflow *f, struct zep *ep, int reset)
{
	if (ep->tx) {
		if (!reset)
			tls_flush(f, ep); /* best effort: an alert or close_notify */
		zpool_put(&f->w->pool, ep->tx);
		ep->tx = NULL;
	}
	if (ep->ssl) {
		SSL_free(ep->ssl);
		ep->ssl = NULL;
	}
	if (ep->fd >= 0) {
		if (reset) {
			/* SO_LINGER 0 turns close() into an RST: the peer sees a reset, not EOF. */
			struct linger lg = {.l_onoff = 1, .l_linger = 0};

			setsockopt(ep->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		}
		close(ep->fd); /* also leaves the epoll set */
		ep->fd = -1;
	}
}

static int sock_error(int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return errno;
	return err;
}

/* ---- TLS output ---------------------------------------------------------
 *
 * OpenSSL writes records through a BIO of ours that appends them to ep->tx (a pool
 * buffer held only while records wait), and we send() them in batches: one
 * syscall per ~256 KiB instead of one per 16 KiB record. Reads go straight to the
 * socket with read-ahead, so one recv() brings several records too.
 */

static BIO_METHOD *tx_method;
static pthread_once_t tx_once = PTHREAD_ONCE_INIT;

/* Keep room for a whole record (16 KiB + header + tag) before each SSL_write. */
#define TLS_RECORD_ROOM (16384 + 512)

static int tx_write(BIO *bio, const char *data, int len)
{
	struct zep *ep = BIO_get_data(bio);
	struct zflow *f = container_of(ep, struct zflow, ep[ep->side]);
	struct iovec iov[2];
	int n, off = 0;

	BIO_clear_retry_flags(bio);
	if (len <= 0)
		return 0;
	if (!ep->tx) {
		ep->tx = zpool_get(&f->w->pool, ZBUF_LARGE);
		if (!ep->tx)
			return -1;
	}
	if (zbuf_space(ep->tx) < (uint32_t)len) {
		BIO_set_retry_write(bio);
		return -1;
	}
	n = zbuf_fill_iov(ep->tx, iov);
	for (int i = 0; i < n && off < len; i++) {
		size_t take = iov[i].iov_len < (size_t)(len - off) ? iov[i].iov_len : (size_t)(len - off);

		memcpy(iov[i].iov_base, data + off, take);
		off += (int)take;
	}
	ep->tx->tail += (uint32_t)len;
	return len;
}

static long tx_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
	switch (cmd) {
	case BIO_CTRL_FLUSH:
		return 1; /* we flush on our own schedule */
	case BIO_CTRL_WPENDING: {
		struct zep *ep = BIO_get_data(bio);

		return ep && ep->tx ? (long)zbuf_len(ep->tx) : 0;
	}
	default:
		return 0;
	}
}

static int tx_create(BIO *bio)
{
	BIO_set_init(bio, 1);
	return 1;
}

static void tx_method_init(void)
{
	tx_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "ztun tx");
	BIO_meth_set_write(tx_method, tx_write);
	BIO_meth_set_ctrl(tx_method, tx_ctrl);
	BIO_meth_set_create(tx_method, tx_create);
}

/* Read from the socket, write through our tx BIO. */
static int tls_attach_bios(struct zep *ep)
{
	BIO *rb, *wb;

	pthread_once(&tx_once, tx_method_init);
	if (!tx_method)
		return ZTUN_ENOMEM;
	rb = BIO_new_socket(ep->fd, BIO_NOCLOSE);
	wb = BIO_new(tx_method);
	if (!rb || !wb) {
		BIO_free(rb);
		BIO_free(wb);
		return ZTUN_ENOMEM;
	}
	BIO_set_data(wb, ep);
	SSL_set_bio(ep->ssl, rb, wb);
	return 0;
}

/* Send queued records. 0: all sent, -EAGAIN: the socket is full, or -errno. */
static int tls_flush(struct zflow *f, struct zep *ep)
{
	while (ep->tx && zbuf_len(ep->tx)) {
		struct iovec iov[2];
		struct msghdr m = {.msg_iov = iov};
		ssize_t r;

		m.msg_iovlen = (size_t)zbuf_drain_iov(ep->tx, iov);
		r = sendmsg(ep->fd, &m, MSG_NOSIGNAL);
		if (r > 0) {
			ep->tx->head += (uint32_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN) {
			ep->wr_ready = 0;
			return -EAGAIN;
		}
		return r < 0 ? -errno : -EIO;
	}
	if (ep->tx) {
		zpool_put(&f->w->pool, ep->tx);
		ep->tx = NULL;
	}
	return 0;
}

/* TLS record errors: reads that end without close_notify are truncation — report
 * them as a reset so the other side sees an error, never a clean EOF. */
static int tls_io_error(struct zflow *f, struct zep *ep, int ret, int for_write)
{
	int e = SSL_get_error(ep->ssl, ret);

	switch (e) {
	case SSL_ERROR_WANT_READ:
		ep->rd_ready = 0;
		if (for_write)
			ep->wr_wants_rd = 1;
		return -EAGAIN;
	case SSL_ERROR_WANT_WRITE:
		/* Our tx buffer is full: the caller flushes and retries. */
		return -EAGAIN;
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	case SSL_ERROR_SYSCALL: {
		int err = errno;

		ERR_clear_error();
		if (err == EAGAIN)
			return -EAGAIN;
		set_detail(f, err ? "TLS connection reset" : "TLS peer closed without close_notify");
		return err ? -err : -ECONNRESET;
	}
	default: {
		char buf[256];

		ztls_describe_error(ep->ssl, ret, NULL, buf, sizeof(buf));
		if (strstr(buf, "unexpected eof")) {
			set_detail(f, "TLS peer closed without close_notify");
			return -ECONNRESET;
		}
		set_detail(f, buf);
		return -EPROTO;
	}
	}
}

/* Read into b. >0 bytes, 0 EOF, -EAGAIN, or -errno. */
static int ep_read(struct zflow *f, struct zep *ep, struct zbuf *b)
{
	struct iovec iov[2];
	int n = zbuf_fill_iov(b, iov);

	if (ep->kind == EP_TCP) {
		ssize_t r = readv(ep->fd, iov, n);

		if (r >= 0)
			return (int)r;
		if (errno == EAGAIN || errno == EINTR) {
			if (errno == EAGAIN)
				ep->rd_ready = 0;
			return -EAGAIN;
		}
		return -errno;
	}
	/* TLS: SSL_read returns one record (<= 16 KiB) per call; keep reading until the
	 * ring is full or the socket is drained, so the plaintext side sends in bulk. */
	size_t total = 0;

	for (int i = 0; i < n; i++) {
		char *p = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		while (left) {
			size_t got = 0;
			int r;

			ERR_clear_error();
			r = SSL_read_ex(ep->ssl, p, left, &got);
			if (r <= 0) {
				int err = tls_io_error(f, ep, r, 0);

				/* Report what we have; a real error recurs on the next call. */
				if (total)
					return (int)total;
				return err;
			}
			ep->rd_wants_wr = 0;
			total += got;
			p += got;
			left -= got;
		}
	}
	return (int)total;
}

/* Write from b. >0 bytes consumed, -EAGAIN, or -errno. */
static int ep_write(struct zflow *f, struct zep *ep, struct zbuf *b)
{
	struct iovec iov[2];
	int n = zbuf_drain_iov(b, iov), r;

	if (ep->kind == EP_TCP) {
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t s = sendmsg(ep->fd, &m, MSG_NOSIGNAL);

		if (s >= 0)
			return (int)s;
		if (errno == EAGAIN || errno == EINTR) {
			if (errno == EAGAIN)
				ep->wr_ready = 0;
			return -EAGAIN;
		}
		return -errno;
	}
	r = tls_flush(f, ep);
	if (r < 0)
		return r;
	size_t total = 0;

	for (int i = 0; i < n; i++) {
		const char *p = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		while (left) {
			size_t put = 0, chunk = left < 16384 ? left : 16384;

			if (ep->tx && zbuf_space(ep->tx) < TLS_RECORD_ROOM) {
				r = tls_flush(f, ep);
				if (r == -EAGAIN)
					goto out;
				if (r < 0)
					return total ? (int)total : r;
			}
			ERR_clear_error();
			r = SSL_write_ex(ep->ssl, p, chunk, &put);
			if (r <= 0) {
				int err = tls_io_error(f, ep, r, 1);

				if (err == -EAGAIN)
					goto out;
				return total ? (int)total : err;
			}
			ep->wr_wants_rd = 0;
			total += put;
			p += put;
			left -= put;
		}
	}
out:
	r = tls_flush(f, ep);
	if (r < 0 && r != -EAGAIN && !total)
		return r;
	return total ? (int)total : -EAGAIN;
}

/* Half-close our sending side. 0 done, -EAGAIN, or -errno. */
static int ep_shutdown_write(struct zflow *f, struct zep *ep)
{
	if (ep->kind == EP_TLS) {
		int r;

		if (!ep->notify_sent) {
			ERR_clear_error();
			/* Queues close_notify; TLS 1.3 lets us keep reading afterwards. */
			r = SSL_shutdown(ep->ssl);
			if (r < 0 && tls_io_error(f, ep, r, 1) == -EAGAIN)
				return -EAGAIN;
			ep->notify_sent = 1;
		}
		r = tls_flush(f, ep);
		if (r == -EAGAIN)
			return r;
		/* An error here means the peer is gone: still send the TCP FIN. */
	}
	if (shutdown(ep->fd, SHUT_WR) < 0 && errno != ENOTCONN)
		return -errno;
	return 0;
}

/* ---- closing ------------------------------------------------------------ */

/* How to end each side: a graceful close (FIN / close_notify) or a reset. */
enum { END_GRACEFUL = 0, END_RESET = 1 };

static void flow_close(struct zworker *w, struct zflow *f, int reason, int down_how, int up_how)
{
	if (f->state == FS_CLOSED)
		return;
	f->reason = (uint8_t)reason;
	flow_set_state(f, FS_CLOSED);
	clear_pending(f);
	if (zlist_linked(&f->alink))
		zlist_del(&f->alink);
	zlist_del(&f->link);

	for (int s = 0; s < 2; s++) {
		int how = s == 0 ? down_how : up_how;
		struct zep *ep = &f->ep[s];

		if (how == END_GRACEFUL && ep->ssl && !ep->notify_sent && SSL_is_init_finished(ep->ssl)) {
			SSL_shutdown(ep->ssl); /* best effort close_notify */
			ep->notify_sent = 1;
		}
		ep_close(f, ep, how == END_RESET);
	}

	for (int d = 0; d < 2; d++) {
		zpool_put(&w->pool, f->buf[d]);
		f->buf[d] = NULL;
		zpipe_put(w, f->pipe[d]);
		f->pipe[d] = NULL;
	}
	zstat_add(&w->stats.closed, 1);
	zstat_add(&w->stats.reason[reason], 1);
	emit_conn(w, f, ZTUN_EV_CONN_CLOSE);
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
	free(f->detail);
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
	flow_close(w, f, reason, END_RESET, END_RESET);
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

/* ---- relay -------------------------------------------------------------- */

static void count_bytes(struct zworker *w, struct zflow *f, int d, int n)
{
	f->bytes[d] += (uint64_t)n;
	zstat_add(&w->stats.bytes[d], (uint64_t)n);
}

/* Move bytes from ep[d] to ep[!d]. 1: progress, 0: nothing to do, -1: flow closed. */
static int relay_dir(struct zworker *w, struct zflow *f, int d)
{
	struct zep *in = &f->ep[d], *out = &f->ep[!d];
	struct zbuf *b = f->buf[d];
	int progress = 0, r;

	if (out->tx && out->wr_ready) {
		/* Records queued by an earlier write, a handshake or a key update. */
		r = tls_flush(f, out);
		if (r == 0)
			progress = 1;
		else if (r != -EAGAIN) {
			flow_fail_io(w, f, !d, r);
			return -1;
		}
	}
	if (b && zbuf_len(b) && out->wr_ready) {
		r = ep_write(f, out, b);
		if (r > 0) {
			b->head += (uint32_t)r;
			count_bytes(w, f, d, r);
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
				flow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
				return -1;
			}
		}
		uint32_t space = zbuf_space(b);

		r = ep_read(f, in, b);
		if (r > 0) {
			b->tail += (uint32_t)r;
			progress = 1;
			/* A read that fills a small ring is a bulk flow: use a large one next. */
			if ((uint32_t)r == space && b->cls == ZBUF_SMALL)
				f->cls[d] = ZBUF_LARGE;
			else if ((uint32_t)r < w->pool.size[ZBUF_SMALL] / 4)
				f->cls[d] = ZBUF_SMALL;
			if (out->wr_ready) {
				int wr = ep_write(f, out, b);

				if (wr > 0) {
					b->head += (uint32_t)wr;
					count_bytes(w, f, d, wr);
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
	if (in->rd_eof && !f->buf[d] && !out->wr_shut) {
		r = ep_shutdown_write(f, out);
		if (r == 0) {
			out->wr_shut = 1;
			progress = 1;
		} else if (r != -EAGAIN) {
			flow_fail_io(w, f, !d, r);
			return -1;
		}
	}
	return progress;
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
				count_bytes(w, f, d, (int)r);
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
				flow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
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
		int rs = ep_shutdown_write(f, out);

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

static int flow_finished(const struct zflow *f)
{
	return f->ep[0].rd_eof && f->ep[1].rd_eof && f->ep[0].wr_shut && f->ep[1].wr_shut &&
	       !f->buf[0] && !f->buf[1] && !f->pipe[0] && !f->pipe[1] && !f->ep[0].tx && !f->ep[1].tx;
}

static void relay(struct zworker *w, struct zflow *f)
{
	int moved = 0;

	for (int round = 0; round < RELAY_ROUNDS; round++) {
		int progress = 0;

		int use_splice = w->e->cfg.splice_pipe && f->ep[0].kind == EP_TCP &&
				 f->ep[1].kind == EP_TCP;

		for (int d = 0; d < 2; d++) {
			int r = use_splice ? relay_dir_splice(w, f, d) : relay_dir(w, f, d);

			if (r < 0)
				return;
			progress |= r;
		}
		if (flow_finished(f)) {
			flow_close(w, f, ZTUN_CLOSE_OK, END_GRACEFUL, END_GRACEFUL);
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

	if (zlist_empty(&w->again))
		return;
	/* Take the current list: flows re-queued while running go to the next round. */
	batch = w->again;
	batch.next->prev = &batch;
	batch.prev->next = &batch;
	zlist_init(&w->again);
	while (!zlist_empty(&batch)) {
		struct zflow *f = zlist_entry(batch.next, struct zflow, alink);

		zlist_del(&f->alink);
		if (f->state == FS_RELAY)
			relay(w, f);
	}
}

static void start_relay(struct zworker *w, struct zflow *f)
{
	clear_pending(f);
	flow_set_state(f, FS_RELAY);
	emit_conn(w, f, ZTUN_EV_CONN_OPEN);
	touch(w, f);
	relay(w, f);
}

/* ---- TLS handshakes ----------------------------------------------------- */

static int begin_tls(struct zworker *w, struct zflow *f, int side)
{
	struct zep *ep = &f->ep[side];
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
	if ((int64_t)(ztun_now_real() / 1000000000ull) >= f->tls->not_after) {
		/* Never present an expired certificate: peers would refuse it anyway, and
		 * this says why on our side. */
		char msg[300];

		snprintf(msg, sizeof(msg), "own certificate for %s has expired; no renewal arrived",
			 f->tls->identity);
		set_detail(f, msg);
		zworker_emit_log(w, ZTUN_LOG_ERROR, "conn %llu: %s", (unsigned long long)f->id, msg);
		return ZTUN_ETLS;
	}
	ep->ssl = ztls_new(f->tls, ep->fd, f->hs,
			   l->mode == ZTUN_MODE_HBONE_OUT ? "h2" : NULL);
	if (!ep->ssl)
		return ZTUN_ETLS;
	ep->kind = EP_TLS;
	return tls_attach_bios(ep);
}

static void after_handshake(struct zworker *w, struct zflow *f, int side);

static void drive_handshake(struct zworker *w, struct zflow *f, int side)
{
	struct zep *ep = &f->ep[side];
	int r;

	ERR_clear_error();
	r = SSL_do_handshake(ep->ssl);
	if (r == 1) {
		after_handshake(w, f, side);
		return;
	}
	int e = SSL_get_error(ep->ssl, r);

	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		int fl = tls_flush(f, ep);

		if (e == SSL_ERROR_WANT_READ)
			ep->rd_ready = 0;
		if (fl < 0 && fl != -EAGAIN) {
			f->sys_errno = -fl;
			set_detail(f, "connection lost during the TLS handshake");
			flow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
		}
		return;
	}
	switch (e) {
	default: {
		char buf[256];

		ztls_describe_error(ep->ssl, r, f->hs, buf, sizeof(buf));
		set_detail(f, buf);
		zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: TLS handshake with %s failed: %s",
				 (unsigned long long)f->id, side == 0 ? "client" : "server", buf);
		/* The alert (if any) is already queued; close without an RST after it. */
		flow_close(w, f, ZTUN_CLOSE_TLS_ERROR, side == 0 ? END_GRACEFUL : END_RESET, END_RESET);
		return;
	}
	}
}

static void after_handshake(struct zworker *w, struct zflow *f, int side)
{
	struct zep *ep = &f->ep[side];
	char *id = ztls_peer_identity(ep->ssl, f->hs);

	if (!id) {
		set_detail(f, f->hs->reason);
		zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: peer identity refused: %s",
				 (unsigned long long)f->id, f->hs->reason);
		flow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
		return;
	}
	f->peer_id = id;
	zstat_add(&w->stats.handshakes, 1);
	if (SSL_session_reused(ep->ssl))
		zstat_add(&w->stats.handshakes_resumed, 1);
	ztls_detach(ep->ssl);
	ztls_expect_put(f->hs->expect);
	free(f->hs);
	f->hs = NULL;

	if (side == 0) {
		flow_set_state(f, FS_CONNECTING);
		start_connect(w, f);
	} else {
		start_relay(w, f);
	}
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
	set_detail(f, strerror(err));
	zworker_emit_log(w, ZTUN_LOG_WARNING, "conn %llu: connect to upstream failed: %s",
			 (unsigned long long)f->id, strerror(err));
	/* The client sees a reset: the closest thing to the refusal we got. */
	flow_close(w, f, close_reason_for_connect(err), END_RESET, END_RESET);
}

static void connected(struct zworker *w, struct zflow *f)
{
	if (f->l->mode == ZTUN_MODE_TLS_OUT) {
		int rc = begin_tls(w, f, 1);

		if (rc) {
			set_detail(f, "cannot create TLS session");
			flow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
			return;
		}
		flow_set_state(f, FS_HANDSHAKE_OUT);
		set_pending(w, f, w->e->cfg.handshake_timeout_ms);
		drive_handshake(w, f, 1);
		return;
	}
	start_relay(w, f);
}

static void start_connect(struct zworker *w, struct zflow *f)
{
	struct zep *up = &f->ep[1];
	const struct sockaddr_storage *dst = &f->l->upstream;
	socklen_t dlen = f->l->upstream_len;
	int one = 1, fd;

	f->dst = *dst;
	fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		connect_failed(w, f, errno);
		return;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	up->fd = fd;
	up->kind = EP_TCP;
	if (ep_register(w, up) < 0) {
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
	set_pending(w, f, w->e->cfg.connect_timeout_ms);
}

/* ---- accept ------------------------------------------------------------- */

void zflow_accept(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *src,
		  socklen_t srclen)
{
	struct zflow *f = calloc(1, sizeof(*f));
	int one = 1;

	if (!f) {
		close(fd);
		return;
	}
	f->w = w;
	f->id = atomic_fetch_add_explicit(&w->e->next_conn_id, 1, memory_order_relaxed);
	zlistener_get(l);
	f->l = l;
	f->policy = -1;
	f->policy_rule = -1;
	f->start_real = ztun_now_real();
	f->start_mono = ztun_now_precise();
	f->last_active = w->now;
	memcpy(&f->src, src, srclen < sizeof(f->src) ? srclen : sizeof(f->src));
	zlist_init(&f->plink);
	zlist_init(&f->alink);
	for (int s = 0; s < 2; s++) {
		f->ep[s].tag.kind = TAG_EP;
		f->ep[s].side = (uint8_t)s;
		f->ep[s].fd = -1;
	}
	f->ep[0].fd = fd;
	f->ep[0].kind = EP_TCP;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	zlist_add_tail(&w->flows, &f->link);
	w->nflows++;
	zstat_add(&w->stats.opened, 1);

	if (ep_register(w, &f->ep[0]) < 0) {
		f->sys_errno = errno;
		flow_close(w, f, ZTUN_CLOSE_IO_ERROR, END_RESET, END_RESET);
		return;
	}
	switch (l->mode) {
	case ZTUN_MODE_TLS_IN:
		if (begin_tls(w, f, 0)) {
			set_detail(f, "cannot create TLS session");
			flow_close(w, f, ZTUN_CLOSE_TLS_ERROR, END_RESET, END_RESET);
			return;
		}
		flow_set_state(f, FS_HANDSHAKE_IN);
		set_pending(w, f, w->e->cfg.handshake_timeout_ms);
		/* The client's hello is usually not here yet; the first EPOLLIN drives it. */
		return;
	default:
		flow_set_state(f, FS_CONNECTING);
		start_connect(w, f);
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
	case FS_HANDSHAKE_IN:
		if (side == 0)
			drive_handshake(w, f, 0);
		return;
	case FS_CONNECTING:
		if (side == 1 && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
			int err = sock_error(ep->fd);

			if (err) {
				connect_failed(w, f, err);
				return;
			}
			connected(w, f);
			return;
		}
		if (side == 0 && (events & EPOLLERR)) {
			/* The client gave up (reset) before the upstream answered. */
			f->sys_errno = sock_error(ep->fd);
			flow_close(w, f, ZTUN_CLOSE_RESET_DOWN, END_RESET, END_RESET);
		}
		return;
	case FS_HANDSHAKE_OUT:
		if (side == 1)
			drive_handshake(w, f, 1);
		else if (events & EPOLLERR)
			flow_close(w, f, ZTUN_CLOSE_RESET_DOWN, END_RESET, END_RESET);
		return;
	case FS_RELAY:
		if (events & EPOLLERR) {
			int err = sock_error(ep->fd);

			flow_fail_io(w, f, side, -(err ? err : ECONNRESET));
			return;
		}
		relay(w, f);
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
		} else {
			set_detail(f, "TLS handshake timed out");
			flow_close(w, f, ZTUN_CLOSE_HANDSHAKE_TIMEOUT, END_RESET, END_RESET);
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
		flow_close(w, f, ZTUN_CLOSE_IDLE_TIMEOUT, END_RESET, END_RESET);
	}
}

void zflow_shutdown_all(struct zworker *w, int reason)
{
	while (!zlist_empty(&w->flows)) {
		struct zflow *f = zlist_entry(w->flows.next, struct zflow, link);

		flow_close(w, f, reason, END_RESET, END_RESET);
	}
}

void zflow_recheck_policy(struct zworker *w)
{
	(void)w; /* wired with the policy evaluator */
}

/* ---- policy references -------------------------------------------------- */

struct zpolicy *zpolicy_new(ztun_policy *table)
{
	struct zpolicy *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	atomic_store(&p->refs, 1);
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
	free(p);
}
