/* Endpoint I/O: nonblocking TCP and TLS sockets, shared by flows and HTTP/2. */
#include <errno.h>
#include <stdio.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "conn.h"

/* ---- endpoints ---------------------------------------------------------- */

void zep_detail(struct zep *ep, const char *s)
{
	if (!ep->detail || *ep->detail || !s || !*s)
		return;
	*ep->detail = strdup(s);
}

int zep_register(struct zworker *w, struct zep *ep)
{
	struct epoll_event ev = {
		.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		.data.ptr = &ep->tag,
	};

	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, ep->fd, &ev) < 0)
		return -errno;
	return 0;
}

void zep_close(struct zep *ep, int reset)
{
	if (ep->tx) {
		if (!reset)
			zep_flush(ep); /* best effort: an alert or close_notify */
		zpool_put(&ep->w->pool, ep->tx);
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
		if (!reset) {
			/* Unread input turns close() into an RST that throws away what we
			 * still had queued (an alert, a close_notify): read it away first. */
			char sink[16384];

			if (ep->lingered) {
				/* Graceful now: undo the crash-time reset (linger 0 would
				 * drop what is still queued). */
				struct linger lg = {0, 0};

				setsockopt(ep->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			}

			/* A relay that finished both ways already sent its FIN and read the
			 * peer's: nothing to do (and no syscall spent) then. */
			if (!ep->wr_shut)
				shutdown(ep->fd, SHUT_WR);
			if (!ep->rd_eof) {
				for (int i = 0; i < 16 && recv(ep->fd, sink, sizeof(sink), MSG_DONTWAIT) > 0; i++)
					;
			}
		}
		/* close() removes the fd from epoll only if no other process holds the
		 * socket: after a fork() the child's copy would keep delivering events for
		 * a freed connection. Remove it explicitly. */
		if (ep->w && ep->w->epfd >= 0)
			epoll_ctl(ep->w->epfd, EPOLL_CTL_DEL, ep->fd, NULL);
		close(ep->fd);
		ep->fd = -1;
	}
}

/* ---- lingering close after a refusal ---------------------------------------
 *
 * A refused peer (a TLS alert, or close_notify after a policy denial) may already be
 * sending what it wrote right behind its handshake. Closing with that input unread, or
 * with more of it still arriving, makes the kernel answer with an RST that can overtake
 * the alert and throw it away at the peer, which then sees "connection reset" instead of
 * the reason. So the socket stays open, write side shut, and whatever arrives is read and
 * dropped until the peer closes, ZTUN_LINGER_NS passes, or ZTUN_LINGER_BYTES arrived. */
#define ZTUN_LINGER_NS (2ull * 1000 * 1000 * 1000)
#define ZTUN_LINGER_MAX 1024             /* per worker; beyond it, close at once */
#define ZTUN_LINGER_BYTES (1u << 20)

struct zlinger {
	struct ztag tag;
	int fd;
	uint32_t bytes;
	uint64_t deadline;
	struct zlist link;
};

static void linger_end(struct zworker *w, struct zlinger *lg)
{
	epoll_ctl(w->epfd, EPOLL_CTL_DEL, lg->fd, NULL);
	close(lg->fd);
	zlist_del(&lg->link);
	w->nlingers--;
	free(lg);
}

/* 1 when the lingering socket is done (peer closed, error, or too much input). */
static int linger_drain(struct zlinger *lg)
{
	char sink[16384];

	for (;;) {
		ssize_t r = recv(lg->fd, sink, sizeof(sink), MSG_DONTWAIT);

		if (r > 0) {
			lg->bytes += (uint32_t)r;
			if (lg->bytes >= ZTUN_LINGER_BYTES)
				return 1;
			continue;
		}
		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		return 1;
	}
}

void zep_close_lingering(struct zep *ep)
{
	struct zworker *w = ep->w;
	struct zlinger *lg;
	struct epoll_event ev;

	if (ep->fd < 0 || ep->rd_eof || !w || w->stopping || w->nlingers >= ZTUN_LINGER_MAX ||
	    !(lg = calloc(1, sizeof(*lg)))) {
		zep_close(ep, 0);
		return;
	}
	if (ep->tx) {
		zep_flush(ep); /* the alert or close_notify */
		zpool_put(&w->pool, ep->tx);
		ep->tx = NULL;
	}
	if (ep->ssl) {
		SSL_free(ep->ssl);
		ep->ssl = NULL;
	}
	if (ep->lingered) {
		struct linger l0 = {0, 0};

		setsockopt(ep->fd, SOL_SOCKET, SO_LINGER, &l0, sizeof(l0));
	}
	shutdown(ep->fd, SHUT_WR);
	lg->tag.kind = TAG_LINGER;
	lg->fd = ep->fd;
	lg->deadline = w->now + ZTUN_LINGER_NS;
	ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
	ev.data.ptr = &lg->tag;
	if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, ep->fd, &ev) < 0) {
		free(lg);
		zep_close(ep, 0);
		return;
	}
	ep->fd = -1;
	zlist_add_tail(&w->lingers, &lg->link);
	w->nlingers++;
	if (linger_drain(lg))
		linger_end(w, lg);
}

void zlinger_on_event(struct zworker *w, struct ztag *tag)
{
	struct zlinger *lg = container_of(tag, struct zlinger, tag);

	if (linger_drain(lg))
		linger_end(w, lg);
}

/* Close the lingering sockets whose time is up (all of them when the engine stops). They
 * were added with one fixed timeout, so the list is in deadline order. */
void zlinger_tick(struct zworker *w, int all)
{
	while (!zlist_empty(&w->lingers)) {
		struct zlinger *lg = container_of(w->lingers.next, struct zlinger, link);

		if (!all && lg->deadline > w->now)
			break;
		linger_end(w, lg);
	}
}

void zep_linger_reset(struct zep *ep)
{
	struct linger lg = {.l_onoff = 1, .l_linger = 0};

	/* If ztun dies (or is killed) the kernel then resets the app instead of sending
	 * a FIN: a relayed stream must never look complete when it was cut short. */
	if (setsockopt(ep->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) == 0)
		ep->lingered = 1;
}

int zsock_error(int fd)
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
	struct iovec iov[2];
	int n, off = 0;

	BIO_clear_retry_flags(bio);
	if (len <= 0)
		return 0;
	if (!ep->tx) {
		ep->tx = zpool_get(&ep->w->pool, ZBUF_LARGE);
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

/* Reads go straight to the socket, and remember whether the last one was short (the
 * socket is drained): the relay then skips the read that would only say EAGAIN. */
static BIO_METHOD *rx_method;

static int rx_read(BIO *bio, char *buf, int len)
{
	struct zep *ep = BIO_get_data(bio);
	ssize_t n;

	BIO_clear_retry_flags(bio);
	if (len <= 0)
		return 0;
	n = recv(ep->fd, buf, (size_t)len, 0);
	if (n > 0) {
		ep->rd_short = n < len;
		return (int)n;
	}
	if (n == 0)
		return 0;
	if (errno == EAGAIN || errno == EINTR)
		BIO_set_retry_read(bio);
	return -1; /* errno stays for SSL_ERROR_SYSCALL */
}

static long rx_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
	struct zep *ep = BIO_get_data(bio);

	switch (cmd) {
	case BIO_CTRL_FLUSH:
		return 1;
	case BIO_C_GET_FD:
		if (ptr)
			*(int *)ptr = ep->fd;
		return ep->fd;
	default:
		return 0;
	}
}

static void tx_method_init(void)
{
	tx_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "ztun tx");
	BIO_meth_set_write(tx_method, tx_write);
	BIO_meth_set_ctrl(tx_method, tx_ctrl);
	BIO_meth_set_create(tx_method, tx_create);
	rx_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "ztun rx");
	BIO_meth_set_read(rx_method, rx_read);
	BIO_meth_set_ctrl(rx_method, rx_ctrl);
	BIO_meth_set_create(rx_method, tx_create);
}

/* Read through our rx BIO, write through our tx BIO. */
int zep_tls_attach(struct zep *ep)
{
	BIO *rb, *wb;

	pthread_once(&tx_once, tx_method_init);
	if (!tx_method || !rx_method)
		return ZTUN_ENOMEM;
	rb = BIO_new(rx_method);
	wb = BIO_new(tx_method);
	if (!rb || !wb) {
		BIO_free(rb);
		BIO_free(wb);
		return ZTUN_ENOMEM;
	}
	BIO_set_data(rb, ep);
	BIO_set_data(wb, ep);
	SSL_set_bio(ep->ssl, rb, wb);
	return 0;
}

/* Send queued records. 0: all sent, -EAGAIN: the socket is full, or -errno. */
int zep_flush(struct zep *ep)
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
		zpool_put(&ep->w->pool, ep->tx);
		ep->tx = NULL;
	}
	return 0;
}

/* TLS record errors: reads that end without close_notify are truncation — report
 * them as a reset so the other side sees an error, never a clean EOF. */
int zep_tls_error(struct zep *ep, int ret, int for_write)
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
		zep_detail(ep, err ? "TLS connection reset" : "TLS peer closed without close_notify");
		return err ? -err : -ECONNRESET;
	}
	default: {
		char buf[256];

		ztls_describe_error(ep->ssl, ret, NULL, buf, sizeof(buf));
		if (strstr(buf, "unexpected eof")) {
			zep_detail(ep, "TLS peer closed without close_notify");
			return -ECONNRESET;
		}
		zep_detail(ep, buf);
		return -EPROTO;
	}
	}
}

/* Read into b. >0 bytes, 0 EOF, -EAGAIN, or -errno. */
int zep_read(struct zep *ep, struct zbuf *b)
{
	struct iovec iov[2];
	int n = zbuf_fill_iov(b, iov);

	if (ep->kind == EP_TCP) {
		ssize_t r = readv(ep->fd, iov, n);

		if (r >= 0) {
			/* A short read drained the socket: skip the read that would say
			 * EAGAIN. More data means a new edge; a FIN that came with this
			 * edge (rdhup) still needs a read to be seen. */
			if (r > 0 && !ep->rdhup && (size_t)r < iov[0].iov_len + (n > 1 ? iov[1].iov_len : 0))
				ep->rd_ready = 0;
			return (int)r;
		}
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
			ep->rd_short = 0; /* only a read made by this call counts (plaintext can be left over) */
			r = SSL_read_ex(ep->ssl, p, left, &got);
			if (r <= 0) {
				int err = zep_tls_error(ep, r, 0);

				/* Report what we have; a real error recurs on the next call. */
				if (total)
					return (int)total;
				return err;
			}
			ep->rd_wants_wr = 0;
			total += got;
			p += got;
			left -= got;
			if (ep->rd_short && !ep->rdhup && !SSL_has_pending(ep->ssl)) {
				/* Drained, nothing buffered: the next read would be EAGAIN. */
				ep->rd_short = 0;
				ep->rd_ready = 0;
				return (int)total;
			}
		}
	}
	return (int)total;
}

/* Write from b. >0 bytes consumed, -EAGAIN, or -errno. */
int zep_write(struct zep *ep, struct zbuf *b)
{
	struct iovec iov[2];
	int n = zbuf_drain_iov(b, iov), r;

	if (ep->kind == EP_TCP) {
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t s = sendmsg(ep->fd, &m, MSG_NOSIGNAL);

		if (s >= 0) {
			/* A short write filled the socket buffer: EPOLLOUT will say when to go on. */
			if ((size_t)s < iov[0].iov_len + (n > 1 ? iov[1].iov_len : 0))
				ep->wr_ready = 0;
			return (int)s;
		}
		if (errno == EAGAIN || errno == EINTR) {
			if (errno == EAGAIN)
				ep->wr_ready = 0;
			return -EAGAIN;
		}
		return -errno;
	}
	r = zep_flush(ep);
	if (r < 0)
		return r;
	size_t total = 0;

	for (int i = 0; i < n; i++) {
		const char *p = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		while (left) {
			size_t put = 0, chunk = left < 16384 ? left : 16384;

			if (ep->tx && zbuf_space(ep->tx) < TLS_RECORD_ROOM) {
				r = zep_flush(ep);
				if (r == -EAGAIN)
					goto out;
				if (r < 0)
					return total ? (int)total : r;
			}
			ERR_clear_error();
			r = SSL_write_ex(ep->ssl, p, chunk, &put);
			if (r <= 0) {
				int err = zep_tls_error(ep, r, 1);

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
	r = zep_flush(ep);
	if (r < 0 && r != -EAGAIN && !total)
		return r;
	return total ? (int)total : -EAGAIN;
}

/* Half-close our sending side. 0 done, -EAGAIN, or -errno. */
int zep_shutdown_write(struct zep *ep)
{
	if (ep->kind == EP_TLS) {
		int r;

		if (!ep->notify_sent) {
			ERR_clear_error();
			/* Queues close_notify; TLS 1.3 lets us keep reading afterwards. */
			r = SSL_shutdown(ep->ssl);
			if (r < 0 && zep_tls_error(ep, r, 1) == -EAGAIN)
				return -EAGAIN;
			ep->notify_sent = 1;
		}
		r = zep_flush(ep);
		if (r == -EAGAIN)
			return r;
		/* An error here means the peer is gone: still send the TCP FIN. */
	}
	if (shutdown(ep->fd, SHUT_WR) < 0 && errno != ENOTCONN)
		return -errno;
	return 0;
}


/* ---- TLS handshakes ------------------------------------------------------ */

int ztls_count_failure(struct zworker *w, int code)
{
	if (code <= 0 || code >= ZTUN_TLSR__COUNT)
		code = ZTUN_TLSR_OTHER;
	zstat_add(&w->stats.tls_failures[code], 1);
	return code;
}

int zep_tls_begin(struct zworker *w, struct zep *ep, ztun_tls_ctx *ctx, struct ztls_hs *hs,
		  const char *alpn)
{
	if ((int64_t)(ztun_now_real() / 1000000000ull) >= ctx->not_after) {
		/* Never present an expired certificate: peers would refuse it anyway, and
		 * this says why on our side. */
		char msg[300];

		snprintf(msg, sizeof(msg), "own certificate for %s has expired; no renewal arrived",
			 ctx->identity);
		zep_detail(ep, msg);
		zworker_emit_log(w, ZTUN_LOG_ERROR, "%s", msg);
		hs->code = ZTUN_TLSR_OWN_CERT_EXPIRED;
		return ZTUN_ETLS;
	}
	ep->ssl = ztls_new(ctx, ep->fd, hs, alpn);
	if (!ep->ssl) {
		zep_detail(ep, "cannot create a TLS session");
		return ZTUN_ETLS;
	}
	ep->kind = EP_TLS;
	return zep_tls_attach(ep);
}

int zep_handshake(struct zep *ep, struct ztls_hs *hs, char **peer_id)
{
	int r, e;

	ERR_clear_error();
	r = SSL_do_handshake(ep->ssl);
	if (r == 1) {
		*peer_id = ztls_peer_identity(ep->ssl, hs);
		if (!*peer_id) {
			zep_detail(ep, hs->reason);
			return -EACCES;
		}
		ztls_detach(ep->ssl);
		/* The last handshake read may have pulled application data into OpenSSL's
		 * read-ahead buffer, where no epoll edge will ever announce it: read once. */
		ep->rd_ready = 1;
		return 1;
	}
	e = SSL_get_error(ep->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		int fl = zep_flush(ep);

		if (e == SSL_ERROR_WANT_READ)
			ep->rd_ready = 0;
		if (fl < 0 && fl != -EAGAIN) {
			zep_detail(ep, "connection lost during the TLS handshake");
			return fl;
		}
		return 0;
	}
	char buf[256];

	ztls_describe_error(ep->ssl, r, hs, buf, sizeof(buf));
	zep_detail(ep, buf);
	/* Send the alert OpenSSL queued, so the peer learns why too. */
	zep_flush(ep);
	return -EPROTO;
}
