/* Outbound connections whose destination is chosen per connection: SOCKS5
 * (ztunnel's 15080), captured connections (SO_ORIGINAL_DST), and the directory
 * that says, for a destination address, whether it is a mesh workload (HBONE to
 * its hop, expecting its SPIFFE ID) or not (a plain connection: passthrough).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"

#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

/* Ports that belong to ztun itself: never valid destinations (loops). */
static int ztun_port(uint16_t port)
{
	return port == 15001 || port == 15006 || port == 15008 || port == 15080;
}

static void ip16_of(const struct sockaddr_storage *ss, uint8_t ip[16])
{
	if (ss->ss_family == AF_INET6) {
		memcpy(ip, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
	} else {
		memset(ip, 0, 10);
		ip[10] = ip[11] = 0xff;
		memcpy(ip + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
	}
}

static uint16_t port_of(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
	return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

/* ---- the directory ---------------------------------------------------------- */

static int ent_cmp(const void *a, const void *b)
{
	return memcmp(((const struct zdirent *)a)->ip, ((const struct zdirent *)b)->ip, 16);
}

void zdir_put(struct zdir *d)
{
	if (!d || atomic_fetch_sub_explicit(&d->refs, 1, memory_order_acq_rel) != 1)
		return;
	for (uint32_t i = 0; i < d->n; i++)
		ztls_expect_put(d->v[i].expect);
	free(d->v);
	free(d);
}

int ztun_engine_set_directory(ztun_engine *e, const struct ztun_dir_entry *entries, int n)
{
	struct zdir *d, *old;

	if (n < 0 || (n > 0 && !entries))
		return ZTUN_EINVAL;
	d = calloc(1, sizeof(*d));
	if (!d)
		return ZTUN_ENOMEM;
	atomic_store(&d->refs, 1);
	d->v = calloc((size_t)(n ? n : 1), sizeof(*d->v));
	if (!d->v) {
		free(d);
		return ZTUN_ENOMEM;
	}
	for (int i = 0; i < n; i++) {
		struct zdirent *z = &d->v[d->n];

		memcpy(z->ip, entries[i].ip, 16);
		z->via = entries[i].via;
		z->flags = entries[i].flags;
		if (entries[i].identity) {
			const char *id = entries[i].identity;

			z->expect = ztls_expect_new(&id, 1);
			if (!z->expect) {
				zdir_put(d);
				return ZTUN_ENOMEM;
			}
		}
		d->n++;
	}
	qsort(d->v, d->n, sizeof(*d->v), ent_cmp);
	pthread_mutex_lock(&e->dir_lock);
	old = e->dir;
	e->dir = d;
	pthread_mutex_unlock(&e->dir_lock);
	zdir_put(old);
	return 0;
}

static struct zdir *dir_get(struct ztun_engine *e)
{
	struct zdir *d;

	pthread_mutex_lock(&e->dir_lock);
	d = e->dir;
	if (d)
		atomic_fetch_add_explicit(&d->refs, 1, memory_order_relaxed);
	pthread_mutex_unlock(&e->dir_lock);
	return d;
}

static const struct zdirent *dir_find(const struct zdir *d, const uint8_t ip[16])
{
	uint32_t lo = 0, hi = d ? d->n : 0;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		int c = memcmp(d->v[mid].ip, ip, 16);

		if (c == 0)
			return &d->v[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/* ---- routing ------------------------------------------------------------------ */

void zflow_route(struct zworker *w, struct zflow *f, const struct sockaddr_storage *dst)
{
	struct zdir *d;
	const struct zdirent *ent;
	uint8_t ip[16];

	f->target = *dst;
	f->dst = *dst;
	if (ztun_port(port_of(dst))) {
		zflow_set_detail(f, "destination port is one of ztun's own (loop)");
		zsocks_reply(w, f, 0, ZTUN_CLOSE_CONNECT_ERROR);
		zflow_close(w, f, ZTUN_CLOSE_CONNECT_ERROR, END_RESET, END_RESET);
		return;
	}
	ip16_of(dst, ip);
	d = dir_get(w->e);
	ent = dir_find(d, ip);
	zflow_set_state(f, FS_CONNECTING);
	if (!ent || !ent->expect) {
		/* Not a mesh workload: a plain connection, as ztunnel's passthrough. */
		zdir_put(d);
		zflow_connect(w, f, dst);
		return;
	}
	if ((ent->flags & ZTUN_DIR_LOCAL) && w->e->bpf && f->l->tls) {
		/* Same node: both identities are known here (ours is the source's), so
		 * policy is decided now; then a plain connection the kernel shortcuts.
		 * Policy judges our identity as the source principal; the events and the
		 * access log name the destination's, as for an HBONE route. */
		f->local_route = 1;
		if (!f->peer_id && ent->expect->n > 0)
			f->peer_id = strdup(ent->expect->ids[0]);
		zdir_put(d); /* ent is not used after this */
		if (!f->tls) {
			pthread_mutex_lock(&f->l->tls_lock);
			f->tls = ztun_tls_ctx_ref(f->l->tls);
			pthread_mutex_unlock(&f->l->tls_lock);
		}
		free(f->src_principal);
		f->src_principal = strdup(ztun_tls_ctx_identity(f->tls));
		if (!f->src_principal || !f->peer_id) {
			zflow_set_detail(f, "out of memory");
			zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
			return;
		}
		if (!zflow_authorize(w, f)) {
			zflow_close(w, f, ZTUN_CLOSE_POLICY_DENIED, END_RESET, END_RESET);
			return;
		}
		zflow_connect(w, f, dst);
		return;
	}
	if (ent->via.ss_family) {
		f->hop = ent->via;
	} else {
		f->hop = *dst;
		if (f->hop.ss_family == AF_INET6)
			((struct sockaddr_in6 *)&f->hop)->sin6_port = htons(15008);
		else
			((struct sockaddr_in *)&f->hop)->sin_port = htons(15008);
	}
	f->expect = ztls_expect_ref(ent->expect);
	zdir_put(d);
	zflow_set_pending(w, f, w->e->cfg.connect_timeout_ms);
	zh2_open_outbound(w, f);
}

int zflow_original_dst(int fd, struct sockaddr_storage *dst)
{
	socklen_t len = sizeof(struct sockaddr_in);
	struct sockaddr_storage local;
	socklen_t ll = sizeof(local);

	memset(dst, 0, sizeof(*dst));
	if (getsockname(fd, (struct sockaddr *)&local, &ll) < 0)
		return -errno;
	if (local.ss_family == AF_INET6) {
		len = sizeof(struct sockaddr_in6);
		if (getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, dst, &len) < 0)
			return -errno;
		return 0;
	}
	if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, dst, &len) < 0)
		return -errno;
	return 0;
}

/* The destination a client dialled, for a connection steered to a listener by sk_lookup
 * or TPROXY (the accepted socket keeps it as its own address) or by REDIRECT (the socket's
 * address is the listener's port: conntrack, or a cgroup/getsockopt program, knows it).
 * -ELOOP for one of ztun's own ports. */
int zflow_inbound_dst(const struct zlistener *l, int fd, struct sockaddr_storage *dst)
{
	socklen_t len = sizeof(*dst);
	int rc;

	memset(dst, 0, sizeof(*dst));
	if (getsockname(fd, (struct sockaddr *)dst, &len) < 0)
		return -errno;
	if (port_of(dst) == port_of(&l->local)) {
		rc = zflow_original_dst(fd, dst);
		if (rc < 0)
			return rc;
	}
	if (ztun_port(port_of(dst)))
		return -ELOOP;
	return 0;
}

/* A connection delivered to a local app for a client (inbound capture, HBONE inbound):
 * name the client on the socket before connect(), so that capture's programs show it to
 * the app (accept(), getpeername()). Without them nothing changes. */
void zflow_tag_source(const struct zflow *f, int fd)
{
	socklen_t len;

	if (!(f->l->mode == ZTUN_MODE_HBONE_IN ||
	      (f->l->mode == ZTUN_MODE_FORWARD && (f->l->flags & ZTUN_LISTENER_ORIGINAL_DST))))
		return;
	if (f->src.ss_family == AF_INET6)
		len = sizeof(struct sockaddr_in6);
	else if (f->src.ss_family == AF_INET)
		len = sizeof(struct sockaddr_in);
	else
		return;
	(void)setsockopt(fd, f->dst.ss_family == AF_INET6 ? IPPROTO_IPV6 : IPPROTO_IP,
			 ZTUN_CAPTURE_SO_ORIGINAL_SRC, &f->src, len); /* ENOPROTOOPT without capture */
}

/* ---- SOCKS5 (RFC 1928), CONNECT only, no authentication, IP literals only --------
 *
 * The engine never resolves names: a DOMAINNAME request is answered "address type
 * not supported". The negotiation bytes are read into the flow's downstream
 * buffer; whatever the client sends after its request stays there and is relayed.
 */

static void socks_send(struct zflow *f, const uint8_t *p, size_t n)
{
	/* Tiny replies into an empty socket buffer: a short write cannot happen. */
	ssize_t r = send(f->ep[0].fd, p, n, MSG_NOSIGNAL);

	(void)r;
}

static void socks_fail(struct zworker *w, struct zflow *f, uint8_t code, const char *why)
{
	uint8_t rep[10] = {5, code, 0, 1, 0, 0, 0, 0, 0, 0};

	zflow_set_detail(f, why);
	socks_send(f, rep, sizeof(rep));
	f->socks = SOCKS_DONE;
	zflow_close(w, f, ZTUN_CLOSE_PROTOCOL, END_GRACEFUL, END_RESET);
}

void zsocks_reply(struct zworker *w, struct zflow *f, int ok, int reason)
{
	uint8_t rep[10] = {5, 0, 0, 1, 0, 0, 0, 0, 0, 0};

	if (f->socks != SOCKS_WAITING)
		return;
	if (!ok) {
		switch (reason) {
		case ZTUN_CLOSE_POLICY_DENIED: rep[1] = 2; break;    /* not allowed by ruleset */
		case ZTUN_CLOSE_CONNECT_REFUSED: rep[1] = 5; break;   /* connection refused */
		case ZTUN_CLOSE_CONNECT_TIMEOUT: rep[1] = 6; break;   /* TTL expired */
		default: rep[1] = 4; break;                           /* host unreachable */
		}
	}
	socks_send(f, rep, sizeof(rep));
	f->socks = SOCKS_DONE;
}

void zsocks_on_readable(struct zworker *w, struct zflow *f)
{
	struct zep *ep = &f->ep[0];
	struct zbuf *b = f->buf[0];
	struct sockaddr_storage dst;
	uint8_t hdr[22];
	uint32_t len, need;
	int r;

	if (!b) {
		b = f->buf[0] = zpool_get(&w->pool, ZBUF_SMALL);
		if (!b) {
			zflow_close(w, f, ZTUN_CLOSE_NO_MEMORY, END_RESET, END_RESET);
			return;
		}
	}
	while (ep->rd_ready && zbuf_space(b)) {
		r = zep_read(ep, b);
		if (r > 0) {
			b->tail += (uint32_t)r;
			continue;
		}
		if (r == -EAGAIN)
			break;
		zflow_set_detail(f, r == 0 ? "client closed during SOCKS5 negotiation"
					   : "client error during SOCKS5 negotiation");
		zflow_close(w, f, ZTUN_CLOSE_PROTOCOL, END_RESET, END_RESET);
		return;
	}
	for (;;) {
		len = zbuf_len(b);
		/* The small ring is never wrapped here: negotiation starts at offset 0. */
		const uint8_t *p = (const uint8_t *)b->data + (b->head & (b->cap - 1));

		if (f->socks == SOCKS_GREETING) {
			int none = 0;

			if (len < 2)
				return;
			if (p[0] != 5) {
				socks_fail(w, f, 1, "not a SOCKS5 client");
				return;
			}
			need = 2u + p[1];
			if (len < need)
				return;
			for (uint32_t i = 2; i < need; i++)
				none |= p[i] == 0;
			b->head += need;
			if (!none) {
				uint8_t rep[2] = {5, 0xff};

				zflow_set_detail(f, "SOCKS5 client offers no 'no authentication' method");
				socks_send(f, rep, 2);
				zflow_close(w, f, ZTUN_CLOSE_PROTOCOL, END_GRACEFUL, END_RESET);
				return;
			}
			uint8_t rep[2] = {5, 0};

			socks_send(f, rep, 2);
			f->socks = SOCKS_REQUEST;
			continue;
		}
		if (f->socks != SOCKS_REQUEST)
			return;
		if (len < 4)
			return;
		if (p[0] != 5 || p[2] != 0) {
			socks_fail(w, f, 1, "malformed SOCKS5 request");
			return;
		}
		if (p[1] != 1) {
			socks_fail(w, f, 7, "only the SOCKS5 CONNECT command is supported");
			return;
		}
		if (p[3] == 1)
			need = 10;
		else if (p[3] == 4)
			need = 22;
		else if (p[3] == 3) {
			socks_fail(w, f, 8, "SOCKS5 domain names are not resolved: use an IP address");
			return;
		} else {
			socks_fail(w, f, 8, "unknown SOCKS5 address type");
			return;
		}
		if (len < need)
			return;
		memcpy(hdr, p, need);
		b->head += need;
		memset(&dst, 0, sizeof(dst));
		if (hdr[3] == 1) {
			struct sockaddr_in *s4 = (struct sockaddr_in *)&dst;

			s4->sin_family = AF_INET;
			memcpy(&s4->sin_addr, hdr + 4, 4);
			memcpy(&s4->sin_port, hdr + 8, 2);
		} else {
			struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&dst;

			s6->sin6_family = AF_INET6;
			memcpy(&s6->sin6_addr, hdr + 4, 16);
			memcpy(&s6->sin6_port, hdr + 20, 2);
		}
		if (zbuf_len(b) == 0) {
			zpool_put(&w->pool, b);
			f->buf[0] = NULL;
		}
		f->socks = SOCKS_WAITING;
		zflow_route(w, f, &dst);
		return;
	}
}
