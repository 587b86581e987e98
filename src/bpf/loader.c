/* loader.c - ztun's eBPF loader (see include/ztun/bpf.h).
 *
 * Lifecycle: open (skeleton embedded, knobs in rodata, maps sized) -> load (verifier, CO-RE
 * relocations against the running kernel's BTF) -> attach (sk_msg on the sockhash, sock_ops
 * on a cgroup, both as bpf_links owned by this process) -> detach -> destroy, with one
 * cleanup path. libbpf is linked dynamically (Debian's libbpf.a is not PIC); its messages
 * go to a ring read by ztun_bpf_log_read(), never to stderr.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "ztun/ztun.h"
#include "ztun/bpf.h"
#include "ztun_bpf_common.h"
#include "ztun_bpf.skel.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

/* Defaults: a sockhash entry per accelerated socket (two per hop), a slot per pair. */
#define DEFAULT_MAX_SOCKETS 65536
#define DEFAULT_MAX_PAIRS 16384
/* Listening ports ztun may register (one entry per port and namespace). */
#define MAX_PORTS 1024

_Static_assert(sizeof(struct ztun_sock_key) == 48, "ztun_sock_key layout");
_Static_assert(sizeof(struct ztun_route) == 184, "ztun_route layout");
_Static_assert(sizeof(struct ztun_pair_slot) == 128, "ztun_pair_slot layout");
_Static_assert(sizeof(struct ztun_addr_key) == 24, "ztun_addr_key layout");
_Static_assert(ZTUN_STAT_MAX == ZTUN_BPF_NSTATS, "stat count");

struct pair_rec {
	struct ztun_sock_key app_a, app_b; /* route keys, to delete them */
	bool used;
};

struct ztun_bpf {
	struct ztun_bpf_skel *skel;
	struct ztun_bpf_config cfg;
	int cg_fd;
	struct bpf_link *sockops_link; /* cgroup link; NULL when legacy-attached */
	int msg_link_fd;               /* sockmap link; -1 when legacy-attached or detached */
	bool sockops_legacy, msg_legacy;
	int fd_socks, fd_info, fd_ports, fd_routes, fd_pairs, fd_stats;
	int fd_expect, fd_local_addrs;
	struct ztun_pair_slot *slots; /* mmap of ztun_pairs */
	size_t slots_len;
	pthread_mutex_t lock; /* slot allocation and pair records */
	struct pair_rec *recs;
	uint32_t *free_slots, nfree;
};

/* ------------------------------------------------------------------ errors and log */

static __thread char last_error[512];

const char *ztun_bpf_last_error(void)
{
	return last_error;
}

const char *ztun_bpf_strerror(int err)
{
	switch (err) {
	case ZTUN_OK: return "ok";
	case ZTUN_EINVAL: return "invalid argument";
	case ZTUN_ENOMEM: return "out of memory";
	case ZTUN_ESTATE: return "not allowed in the current state";
	case ZTUN_ENOTFOUND: return "not found";
	case ZTUN_EFULL: return "table full";
	}
	if (err < 0 && err > -4096)
		return strerror(-err);
	return "unknown error";
}

/* Record what failed (with the error's text) and return err, which is negative. */
__attribute__((format(printf, 2, 3))) static int fail(int err, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < sizeof(last_error))
		snprintf(last_error + n, sizeof(last_error) - n, ": %s", ztun_bpf_strerror(err));
	return err;
}

/* The ring of log lines: libbpf's output and our own notes. Bounded (old lines are
 * dropped), because nobody may be reading it. */
#define LOG_RING 16384
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_ring[LOG_RING];
static size_t log_head, log_len;

static void log_put(char level, const char *msg)
{
	size_t n = strlen(msg);

	pthread_mutex_lock(&log_lock);
	for (size_t i = 0; i < n + 2; i++) {
		char c = i == 0 ? level : i == 1 ? ' ' : msg[i - 2];

		if (i == n + 1 && n && msg[n - 1] == '\n')
			break;
		if (i == n + 1)
			c = '\n';
		log_ring[(log_head + log_len) % LOG_RING] = c;
		if (log_len < LOG_RING)
			log_len++;
		else
			log_head = (log_head + 1) % LOG_RING;
	}
	pthread_mutex_unlock(&log_lock);
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[1024];

	/* DEBUG is the verifier's whole log: far too much to keep. */
	if (level == LIBBPF_DEBUG)
		return 0;
	vsnprintf(line, sizeof(line), fmt, ap);
	log_put(level == LIBBPF_WARN ? 'W' : 'I', line);
	return 0;
}

size_t ztun_bpf_log_read(char *buf, size_t len)
{
	size_t n = 0;

	if (!buf || !len)
		return 0;
	pthread_mutex_lock(&log_lock);
	while (n + 1 < len && log_len) {
		buf[n++] = log_ring[log_head];
		log_head = (log_head + 1) % LOG_RING;
		log_len--;
	}
	pthread_mutex_unlock(&log_lock);
	buf[n] = 0;
	return n;
}

static pthread_once_t print_once = PTHREAD_ONCE_INIT;

static void set_print(void)
{
	libbpf_set_print(libbpf_print);
}

/* ------------------------------------------------------------------ features */

static int kernel_version(int *maj, int *min, char *rel, size_t len)
{
	struct utsname u;

	if (uname(&u))
		return -errno;
	snprintf(rel, len, "%.*s", (int)len - 1, u.release);
	if (sscanf(u.release, "%d.%d", maj, min) != 2)
		return ZTUN_EINVAL;
	return 0;
}

static bool btf_struct_has(const struct btf *btf, const char *type, const char *member)
{
	int id = btf__find_by_name_kind(btf, type, BTF_KIND_STRUCT);
	const struct btf_type *t;
	const struct btf_member *m;

	if (id < 0)
		return false;
	t = btf__type_by_id(btf, id);
	m = btf_members(t);
	for (int i = 0; i < btf_vlen(t); i++, m++)
		if (!strcmp(btf__name_by_offset(btf, m->name_off), member))
			return true;
	return false;
}

int ztun_bpf_features(struct ztun_bpf_features *f)
{
	struct btf *btf;
	int maj = 0, min = 0, err;

	pthread_once(&print_once, set_print);
	memset(f, 0, sizeof(*f));
	err = kernel_version(&maj, &min, f->kernel, sizeof(f->kernel));
	if (err)
		return fail(err, "uname");
	f->sockmap_link = maj > 6 || (maj == 6 && min >= 10);
	f->btf = access("/sys/kernel/btf/vmlinux", R_OK) == 0;
	if (!f->btf)
		return 0;
	btf = btf__load_vmlinux_btf();
	if (!btf)
		return fail(-errno, "load kernel BTF");
	f->rdonly_cast = btf__find_by_name_kind(btf, "bpf_rdonly_cast", BTF_KIND_FUNC) > 0;
	if (btf_struct_has(btf, "sk_psock", "msg_tot_len"))
		f->bound = ZTUN_BPF_BOUND_EXACT;
	else if (maj > 6 || (maj == 6 && min >= 13))
		f->bound = ZTUN_BPF_BOUND_RMEM;
	else
		f->bound = ZTUN_BPF_BOUND_NONE;
	btf__free(btf);
	return 0;
}

/* ------------------------------------------------------------------ open / attach */

/* net.ipv4.tcp_rmem[2]: the largest receive buffer TCP autotuning grants one socket. */
static uint32_t default_cap(void)
{
	FILE *f = fopen("/proc/sys/net/ipv4/tcp_rmem", "re");
	long lo, def, max;
	uint32_t cap = ZTUN_BPF_DEFAULT_CAP;

	if (f) {
		if (fscanf(f, "%ld %ld %ld", &lo, &def, &max) == 3 && max > 0 && max < (1L << 31))
			cap = (uint32_t)max;
		fclose(f);
	}
	return cap;
}

static void map_fds(ztun_bpf *h)
{
	h->fd_socks = bpf_map__fd(h->skel->maps.ztun_socks);
	h->fd_info = bpf_map__fd(h->skel->maps.ztun_sockinfo);
	h->fd_ports = bpf_map__fd(h->skel->maps.ztun_ports);
	h->fd_routes = bpf_map__fd(h->skel->maps.ztun_routes);
	h->fd_pairs = bpf_map__fd(h->skel->maps.ztun_pairs);
	h->fd_stats = bpf_map__fd(h->skel->maps.ztun_stats);
	h->fd_expect = bpf_map__fd(h->skel->maps.ztun_expect);
	h->fd_local_addrs = bpf_map__fd(h->skel->maps.ztun_local_addrs);
}

int ztun_bpf_open(const struct ztun_bpf_config *cfg, ztun_bpf **out)
{
	struct ztun_bpf_features feat;
	ztun_bpf *h;
	long page = sysconf(_SC_PAGESIZE);
	int err;

	pthread_once(&print_once, set_print);
	*out = NULL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return fail(ZTUN_ENOMEM, "ztun_bpf_open");
	if (cfg)
		h->cfg = *cfg;
	h->cg_fd = -1;
	h->msg_link_fd = -1;
	pthread_mutex_init(&h->lock, NULL);
	if (!h->cfg.mark)
		h->cfg.mark = ZTUN_BPF_DEFAULT_MARK;
	if (!h->cfg.max_sockets)
		h->cfg.max_sockets = DEFAULT_MAX_SOCKETS;
	if (!h->cfg.max_pairs)
		h->cfg.max_pairs = DEFAULT_MAX_PAIRS;

	err = ztun_bpf_features(&feat);
	if (err)
		goto cleanup;
	if (!feat.btf || !feat.rdonly_cast) {
		err = fail(-EOPNOTSUPP, "kernel %s lacks %s", feat.kernel,
			   !feat.btf ? "BTF (/sys/kernel/btf/vmlinux)" : "the bpf_rdonly_cast kfunc (6.2+)");
		goto cleanup;
	}
	if (feat.bound == ZTUN_BPF_BOUND_NONE && !(h->cfg.flags & ZTUN_BPF_F_UNBOUNDED)) {
		err = fail(-EOPNOTSUPP, "kernel %s cannot bound bytes queued by sk_msg redirects "
			   "(needs 6.13+); pass ZTUN_BPF_F_UNBOUNDED to accept that", feat.kernel);
		goto cleanup;
	}

	h->skel = ztun_bpf_skel__open();
	if (!h->skel) {
		err = fail(-errno, "open BPF object");
		goto cleanup;
	}
	/* Knobs: rodata, fixed at load. */
	h->skel->rodata->ztun_mark = h->cfg.mark;
	if (!h->cfg.ingress_cap)
		h->cfg.ingress_cap = default_cap();
	h->skel->rodata->ingress_cap = h->cfg.ingress_cap;
	h->skel->rodata->hop_enabled = !(h->cfg.flags & ZTUN_BPF_F_NO_HOP);
	h->skel->rodata->pairs_enabled = !(h->cfg.flags & ZTUN_BPF_F_NO_PAIRS);
	/* Map sizes. */
	if ((err = bpf_map__set_max_entries(h->skel->maps.ztun_socks, h->cfg.max_sockets)) ||
	    (err = bpf_map__set_max_entries(h->skel->maps.ztun_sockinfo, h->cfg.max_sockets)) ||
	    (err = bpf_map__set_max_entries(h->skel->maps.ztun_expect, h->cfg.max_sockets)) ||
	    (err = bpf_map__set_max_entries(h->skel->maps.ztun_routes, 2 * h->cfg.max_pairs)) ||
	    (err = bpf_map__set_max_entries(h->skel->maps.ztun_pairs, h->cfg.max_pairs)) ||
	    (err = bpf_map__set_max_entries(h->skel->maps.ztun_ports, MAX_PORTS))) {
		err = fail(err, "size maps");
		goto cleanup;
	}
	err = ztun_bpf_skel__load(h->skel);
	if (err) {
		err = fail(err, "load BPF programs (verifier; see the log)");
		goto cleanup;
	}
	map_fds(h);

	/* The pair slots: engine threads flip busy flags through this mapping. */
	h->slots_len = ((size_t)h->cfg.max_pairs * sizeof(struct ztun_pair_slot) + page - 1) /
		       page * page;
	h->slots = mmap(NULL, h->slots_len, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd_pairs, 0);
	if (h->slots == MAP_FAILED) {
		h->slots = NULL;
		err = fail(-errno, "mmap ztun_pairs");
		goto cleanup;
	}
	h->recs = calloc(h->cfg.max_pairs, sizeof(*h->recs));
	h->free_slots = calloc(h->cfg.max_pairs, sizeof(*h->free_slots));
	if (!h->recs || !h->free_slots) {
		err = fail(ZTUN_ENOMEM, "pair table");
		goto cleanup;
	}
	/* Slot 0 last, so ids of early pairs are not 0 (easier to spot misuse). */
	for (uint32_t i = 0; i < h->cfg.max_pairs; i++)
		h->free_slots[h->nfree++] = i;
	*out = h;
	return 0;
cleanup:
	ztun_bpf_close(h);
	return err;
}

static int attach_msg(ztun_bpf *h)
{
	int prog = bpf_program__fd(h->skel->progs.ztun_skmsg);

	if (!(h->cfg.flags & ZTUN_BPF_F_LEGACY_ATTACH)) {
		/* libbpf 1.1 has no bpf_program__attach_sockmap() (1.5 does), but its
		 * bpf_link_create() passes the attach type through to BPF_LINK_CREATE. */
		int fd = bpf_link_create(prog, h->fd_socks, BPF_SK_MSG_VERDICT, NULL);

		if (fd >= 0) {
			h->msg_link_fd = fd;
			return 0;
		}
		if (errno != EINVAL && errno != EOPNOTSUPP)
			return fail(-errno, "bpf_link_create(sk_msg, sockhash)");
		log_put('W', "sockmap bpf_link unsupported (kernel < 6.10): legacy attach");
	}
	if (bpf_prog_attach(prog, h->fd_socks, BPF_SK_MSG_VERDICT, 0))
		return fail(-errno, "bpf_prog_attach(sk_msg, sockhash)");
	h->msg_legacy = true;
	return 0;
}

int ztun_bpf_attach_cgroup(ztun_bpf *h, const char *cgroup_path)
{
	int err;

	if (!h || !cgroup_path)
		return fail(ZTUN_EINVAL, "attach: no handle or cgroup");
	if (h->cg_fd >= 0)
		return fail(ZTUN_ESTATE, "attach: already attached");
	h->cg_fd = open(cgroup_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (h->cg_fd < 0)
		return fail(-errno, "open cgroup %s", cgroup_path);
	/* sk_msg first: a socket sock_ops inserts must find its verdict program attached. */
	err = attach_msg(h);
	if (err)
		goto cleanup;
	if (h->cfg.flags & ZTUN_BPF_F_LEGACY_ATTACH) {
		if (bpf_prog_attach(bpf_program__fd(h->skel->progs.ztun_sockops), h->cg_fd,
				    BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)) {
			err = fail(-errno, "bpf_prog_attach(sock_ops, %s)", cgroup_path);
			goto cleanup;
		}
		h->sockops_legacy = true;
	} else {
		h->sockops_link = bpf_program__attach_cgroup(h->skel->progs.ztun_sockops, h->cg_fd);
		if (!h->sockops_link) {
			err = fail(-errno, "attach sock_ops to %s", cgroup_path);
			goto cleanup;
		}
	}
	return 0;
cleanup:
	ztun_bpf_detach(h);
	return err;
}

static int mkdirs(const char *dir)
{
	char tmp[512];

	if (snprintf(tmp, sizeof(tmp), "%s", dir) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(tmp, 0700) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(tmp, 0700) && errno != EEXIST)
		return -errno;
	return 0;
}

int ztun_bpf_pin(ztun_bpf *h, const char *dir)
{
	struct bpf_map *m;
	char p[600];
	int err;

	if (!h || !dir)
		return fail(ZTUN_EINVAL, "pin: no handle or directory");
	err = mkdirs(dir);
	if (err)
		return fail(err, "mkdir %s", dir);
	bpf_object__for_each_map(m, h->skel->obj) {
		if (!strcmp(bpf_map__name(m), ".rodata") || strchr(bpf_map__name(m), '.'))
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, bpf_map__name(m));
		if ((err = bpf_map__pin(m, p)))
			return fail(err, "pin %s", p);
	}
	if (h->sockops_link) {
		snprintf(p, sizeof(p), "%s/link_sockops", dir);
		if ((err = bpf_link__pin(h->sockops_link, p)))
			return fail(err, "pin %s", p);
	}
	if (h->msg_link_fd >= 0) {
		snprintf(p, sizeof(p), "%s/link_skmsg", dir);
		if (bpf_obj_pin(h->msg_link_fd, p))
			return fail(-errno, "pin %s", p);
	}
	return 0;
}

/* ------------------------------------------------------------------ keys from fds */

static void addr_into(uint32_t out[4], uint16_t *family, const struct sockaddr_storage *ss,
		      uint16_t *port)
{
	memset(out, 0, 16);
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *s = (const void *)ss;

		*family = AF_INET;
		out[0] = s->sin_addr.s_addr;
		*port = ntohs(s->sin_port);
		return;
	}
	const struct sockaddr_in6 *s6 = (const void *)ss;

	*port = ntohs(s6->sin6_port);
	if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
		*family = AF_INET;
		memcpy(&out[0], &s6->sin6_addr.s6_addr[12], 4);
	} else {
		*family = AF_INET6;
		memcpy(out, &s6->sin6_addr, 16);
	}
}

/* The key of fd's socket as seen by itself (local = fd's side). */
static int key_of_fd(int fd, struct ztun_sock_key *k)
{
	struct sockaddr_storage l, r;
	socklen_t ll = sizeof(l), rl = sizeof(r), nl = sizeof(k->netns);
	uint16_t lf = 0, rf = 0;

	memset(k, 0, sizeof(*k));
	if (getsockname(fd, (struct sockaddr *)&l, &ll) || getpeername(fd, (struct sockaddr *)&r, &rl))
		return -errno;
	if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &k->netns, &nl))
		return -errno;
	if ((l.ss_family != AF_INET && l.ss_family != AF_INET6) || l.ss_family != r.ss_family)
		return ZTUN_EINVAL;
	addr_into(k->local, &lf, &l, &k->lport);
	addr_into(k->remote, &rf, &r, &k->rport);
	if (lf != rf)
		return ZTUN_EINVAL;
	k->family = lf;
	return 0;
}

static void key_reverse(struct ztun_sock_key *r, const struct ztun_sock_key *k)
{
	memset(r, 0, sizeof(*r));
	r->netns = k->netns;
	r->family = k->family;
	r->lport = k->rport;
	r->rport = k->lport;
	memcpy(r->local, k->remote, sizeof(r->local));
	memcpy(r->remote, k->local, sizeof(r->remote));
}

static int port_key_of_fd(int fd, struct ztun_port_key *pk)
{
	struct sockaddr_storage l;
	socklen_t ll = sizeof(l), nl = sizeof(pk->netns);
	uint32_t a[4];
	uint16_t fam;

	memset(pk, 0, sizeof(*pk));
	if (getsockname(fd, (struct sockaddr *)&l, &ll))
		return -errno;
	if (l.ss_family != AF_INET && l.ss_family != AF_INET6)
		return ZTUN_EINVAL;
	if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &pk->netns, &nl))
		return -errno;
	addr_into(a, &fam, &l, &pk->port);
	return 0;
}

int ztun_bpf_add_listener(ztun_bpf *h, int fd)
{
	struct ztun_port_key pk;
	__u8 one = 1;
	int err;

	if (!h || !h->skel)
		return fail(ZTUN_EINVAL, "add_listener: no handle");
	if ((err = port_key_of_fd(fd, &pk)))
		return fail(err, "add_listener: fd %d", fd);
	if (bpf_map_update_elem(h->fd_ports, &pk, &one, BPF_ANY))
		return fail(-errno, "add_listener: port %u", pk.port);
	return 0;
}

int ztun_bpf_del_listener(ztun_bpf *h, int fd)
{
	struct ztun_port_key pk;
	int err;

	if (!h || !h->skel)
		return fail(ZTUN_EINVAL, "del_listener: no handle");
	if ((err = port_key_of_fd(fd, &pk)))
		return fail(err, "del_listener: fd %d", fd);
	if (bpf_map_delete_elem(h->fd_ports, &pk) && errno != ENOENT)
		return fail(-errno, "del_listener: port %u", pk.port);
	return 0;
}

static int addr_key_of(const char *ip, struct ztun_addr_key *a)
{
	struct in6_addr a6;

	memset(a, 0, sizeof(*a));
	if (!ip)
		return ZTUN_EINVAL;
	if (inet_pton(AF_INET, ip, &a->addr[0]) == 1) {
		a->family = AF_INET;
		return 0;
	}
	if (inet_pton(AF_INET6, ip, &a6) != 1)
		return ZTUN_EINVAL;
	if (IN6_IS_ADDR_V4MAPPED(&a6)) { /* as sock_ops keys it */
		a->family = AF_INET;
		memcpy(&a->addr[0], &a6.s6_addr[12], 4);
		return 0;
	}
	a->family = AF_INET6;
	memcpy(a->addr, &a6, 16);
	return 0;
}

int ztun_bpf_add_local_addr(ztun_bpf *h, const char *ip)
{
	struct ztun_addr_key a;
	__u8 one = 1;

	if (!h || !h->skel)
		return fail(ZTUN_EINVAL, "add_local_addr: no handle");
	if (addr_key_of(ip, &a))
		return fail(ZTUN_EINVAL, "add_local_addr: not an IP address: %s", ip ? ip : "(null)");
	if (bpf_map_update_elem(h->fd_local_addrs, &a, &one, BPF_ANY))
		return fail(-errno, "add_local_addr: %s", ip);
	return 0;
}

int ztun_bpf_del_local_addr(ztun_bpf *h, const char *ip)
{
	struct ztun_addr_key a;

	if (!h || !h->skel)
		return fail(ZTUN_EINVAL, "del_local_addr: no handle");
	if (addr_key_of(ip, &a))
		return fail(ZTUN_EINVAL, "del_local_addr: not an IP address: %s", ip ? ip : "(null)");
	if (bpf_map_delete_elem(h->fd_local_addrs, &a) && errno != ENOENT)
		return fail(-errno, "del_local_addr: %s", ip);
	return 0;
}

uint32_t ztun_bpf_mark(const ztun_bpf *h)
{
	return h ? h->cfg.mark : ZTUN_BPF_DEFAULT_MARK;
}

/* ------------------------------------------------------------------ pairs */

static const char *key_str(const struct ztun_sock_key *k, char *buf, size_t len)
{
	char l[INET6_ADDRSTRLEN], r[INET6_ADDRSTRLEN];
	int af = k->family == AF_INET6 ? AF_INET6 : AF_INET;

	inet_ntop(af, k->local, l, sizeof(l));
	inet_ntop(af, k->remote, r, sizeof(r));
	snprintf(buf, len, "%s:%u->%s:%u", l, k->lport, r, k->rport);
	return buf;
}

/* The socket's cookie if sock_ops knows it (in the sockhash, with its address recorded,
 * both for the same socket), else 0. A sockhash lookup from user space returns the cookie. */
static __u64 known(ztun_bpf *h, const struct ztun_sock_key *k)
{
	struct ztun_sockinfo si;
	__u64 cookie;

	if (bpf_map_lookup_elem(h->fd_info, k, &si) || bpf_map_lookup_elem(h->fd_socks, k, &cookie))
		return 0;
	return si.cookie == cookie ? cookie : 0;
}

static inline struct ztun_pair_slot *slot_of(ztun_bpf *h, uint64_t id, uint32_t *idx)
{
	uint32_t i = (uint32_t)id, gen = (uint32_t)(id >> 32);

	if (!h || !h->slots || i >= h->cfg.max_pairs || !gen)
		return NULL;
	if (__atomic_load_n(&h->slots[i].gen, __ATOMIC_ACQUIRE) != gen)
		return NULL;
	if (idx)
		*idx = i;
	return &h->slots[i];
}

int ztun_bpf_pair_add(ztun_bpf *h, int ztun_fd_a, int ztun_fd_b, uint32_t flags,
		      uint64_t *pair_id)
{
	struct ztun_sock_key za, zb, a, b;
	struct ztun_route ra = {}, rb = {};
	struct ztun_pair_slot *s;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	char kb[128];
	uint32_t idx, gen;
	int err;

	if (!h || !h->slots || !pair_id || (flags & ~ZTUN_BPF_PAIR_KEEP_LINGER))
		return fail(ZTUN_EINVAL, "pair_add: bad arguments");
	if (h->cfg.flags & ZTUN_BPF_F_NO_PAIRS)
		return fail(ZTUN_ESTATE, "pair_add: pairs are disabled");
	if ((err = key_of_fd(ztun_fd_a, &za)) || (err = key_of_fd(ztun_fd_b, &zb)))
		return fail(err, "pair_add: not a connected TCP socket");
	key_reverse(&a, &za);
	key_reverse(&b, &zb);
	__u64 cza = known(h, &za), czb = known(h, &zb), ca = known(h, &a), cb;

	if (!cza || !czb || !ca) {
		const struct ztun_sock_key *miss = !cza ? &za : !czb ? &zb : &a;

		return fail(ZTUN_ENOTFOUND, "pair_add: socket %s was not seen by sock_ops "
			    "(outside the attached cgroup, listener not registered or ztun socket "
			    "not marked)", key_str(miss, kb, sizeof(kb)));
	}
	cb = known(h, &b);
	if (!cb) {
		/* An app in another namespace (ztun_local_addrs): sock_ops stored its namespace
		 * under the mirrored key with netns 0 when it accepted. */
		struct ztun_sock_key x = b;
		__u64 ns = 0;

		x.netns = 0;
		if (!bpf_map_lookup_elem(h->fd_expect, &x, &ns) && ns) {
			b.netns = ns;
			cb = known(h, &b);
		}
	}
	if (!cb) {
		/* connect() returns before the app's side of a loopback connection exists (the
		 * final ACK is processed after): the engine retries shortly. */
		return fail(-EAGAIN, "pair_add: %s not established on the app's side yet",
			    key_str(&b, kb, sizeof(kb)));
	}
	/* If ztun dies, its sockets must reset both apps: a FIN would tell an app that a
	 * stream which went partly around ztun ended cleanly. */
	if (!(flags & ZTUN_BPF_PAIR_KEEP_LINGER) &&
	    (setsockopt(ztun_fd_a, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) ||
	     setsockopt(ztun_fd_b, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))))
		return fail(-errno, "pair_add: SO_LINGER");

	pthread_mutex_lock(&h->lock);
	if (!h->nfree) {
		pthread_mutex_unlock(&h->lock);
		return fail(ZTUN_EFULL, "pair_add: %u pairs in use", h->cfg.max_pairs);
	}
	idx = h->free_slots[--h->nfree];
	h->recs[idx].used = true;
	h->recs[idx].app_a = a;
	h->recs[idx].app_b = b;
	pthread_mutex_unlock(&h->lock);

	s = &h->slots[idx];
	gen = s->gen + 1;
	if (!gen)
		gen = 1;
	/* Both directions start busy: the engine may hold bytes it read before the pair
	 * existed; it clears each flag once its buffer is empty. */
	__atomic_store_n(&s->busy[0], 1, __ATOMIC_RELAXED);
	__atomic_store_n(&s->busy[1], 1, __ATOMIC_RELAXED);
	memset(s->direct_bytes, 0, sizeof(s->direct_bytes));
	memset(s->direct_msgs, 0, sizeof(s->direct_msgs));
	memset(s->fallback_msgs, 0, sizeof(s->fallback_msgs));
	__atomic_store_n(&s->state, ZTUN_PAIR_ACTIVE, __ATOMIC_RELAXED);
	__atomic_store_n(&s->gen, gen, __ATOMIC_SEQ_CST);

	ra.target = b, ra.near = za, ra.far = zb, ra.slot = idx, ra.dir = 0, ra.gen = gen;
	ra.target_cookie = cb, ra.near_cookie = cza, ra.far_cookie = czb;
	rb.target = a, rb.near = zb, rb.far = za, rb.slot = idx, rb.dir = 1, rb.gen = gen;
	rb.target_cookie = ca, rb.near_cookie = czb, rb.far_cookie = cza;
	if (bpf_map_update_elem(h->fd_routes, &a, &ra, BPF_NOEXIST)) {
		err = fail(-errno, "pair_add: route of %s", key_str(&a, kb, sizeof(kb)));
		goto undo;
	}
	if (bpf_map_update_elem(h->fd_routes, &b, &rb, BPF_NOEXIST)) {
		err = fail(-errno, "pair_add: route of %s", key_str(&b, kb, sizeof(kb)));
		bpf_map_delete_elem(h->fd_routes, &a);
		goto undo;
	}
	*pair_id = (uint64_t)gen << 32 | idx;
	return 0;
undo:
	__atomic_store_n(&s->state, ZTUN_PAIR_FREE, __ATOMIC_RELAXED);
	__atomic_store_n(&s->gen, gen + 1 ? gen + 1 : 1, __ATOMIC_SEQ_CST);
	pthread_mutex_lock(&h->lock);
	h->recs[idx].used = false;
	h->free_slots[h->nfree++] = idx;
	pthread_mutex_unlock(&h->lock);
	return err;
}

/* How long pair_end waits for running verdicts (each is a few hundred instructions). */
#define INFLIGHT_WAIT_NS (100 * 1000 * 1000)

static void read_counters(const struct ztun_pair_slot *s, struct ztun_bpf_pair_stats *out)
{
	for (int d = 0; d < 2; d++) {
		out->direct_bytes[d] = __atomic_load_n(&s->direct_bytes[d], __ATOMIC_RELAXED);
		out->direct_msgs[d] = __atomic_load_n(&s->direct_msgs[d], __ATOMIC_RELAXED);
		out->fallback_msgs[d] = __atomic_load_n(&s->fallback_msgs[d], __ATOMIC_RELAXED);
	}
}

/*
 * End a pair (h->lock held). The state is cleared first, so a verdict starting after this
 * falls back to the relay path; then the routes go; then we wait for the verdicts already
 * running, so that on return no byte of this pair will be redirected any more and the
 * counters are final. Ordering needs nothing more: a redirect is enqueued synchronously
 * inside the sender's sendmsg, before the sender's next byte is even looked at, so every
 * redirected byte is in place before any later byte can enter the relay path.
 */
static void pair_end(ztun_bpf *h, uint32_t idx, struct ztun_bpf_pair_stats *final)
{
	struct ztun_pair_slot *s = &h->slots[idx];
	struct timespec t0, t;
	uint32_t gen = s->gen + 1;

	__atomic_store_n(&s->state, ZTUN_PAIR_FREE, __ATOMIC_SEQ_CST);
	bpf_map_delete_elem(h->fd_routes, &h->recs[idx].app_a);
	bpf_map_delete_elem(h->fd_routes, &h->recs[idx].app_b);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (__atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST)) {
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) >
		    INFLIGHT_WAIT_NS) {
			log_put('W', "pair_del: a verdict did not finish in 100 ms; counters may "
				     "miss its bytes");
			break;
		}
		sched_yield();
	}
	if (final)
		read_counters(s, final);
	__atomic_store_n(&s->gen, gen ? gen : 1, __ATOMIC_SEQ_CST);
	h->recs[idx].used = false;
	h->free_slots[h->nfree++] = idx;
}

int ztun_bpf_pair_del(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *final)
{
	uint32_t idx;

	if (!h)
		return fail(ZTUN_EINVAL, "pair_del: no handle");
	pthread_mutex_lock(&h->lock);
	if (!slot_of(h, pair_id, &idx) || !h->recs[idx].used) {
		pthread_mutex_unlock(&h->lock);
		return fail(ZTUN_ENOTFOUND, "pair_del: no pair %#llx", (unsigned long long)pair_id);
	}
	pair_end(h, idx, final);
	pthread_mutex_unlock(&h->lock);
	return 0;
}

int ztun_bpf_pair_stats(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *out)
{
	struct ztun_pair_slot *s = slot_of(h, pair_id, NULL);

	if (!s || !out)
		return ZTUN_ENOTFOUND;
	read_counters(s, out);
	/* The counters of a pair deleted meanwhile belong to someone else now. */
	return slot_of(h, pair_id, NULL) ? 0 : ZTUN_ENOTFOUND;
}

int ztun_bpf_relay_busy(ztun_bpf *h, uint64_t pair_id, unsigned dir, int busy)
{
	struct ztun_pair_slot *s = slot_of(h, pair_id, NULL);

	if (!s || dir > 1)
		return ZTUN_ENOTFOUND;
	/* Sequentially consistent: the flag must be visible before the recv() that follows
	 * (busy = 1), and only after the send() that preceded (busy = 0). */
	__atomic_store_n(&s->busy[dir], busy ? 1u : 0u, __ATOMIC_SEQ_CST);
	return 0;
}

/* ------------------------------------------------------------------ detach / close */

int ztun_bpf_detach(ztun_bpf *h)
{
	if (!h)
		return 0;
	/* Pairs first: after this no byte is redirected app to app, so the engine's busy
	 * flags (about to be unmapped) no longer matter. */
	if (h->skel && h->recs) {
		pthread_mutex_lock(&h->lock);
		for (uint32_t i = 0; i < h->cfg.max_pairs; i++)
			if (h->recs[i].used)
				pair_end(h, i, NULL);
		pthread_mutex_unlock(&h->lock);
	}
	if (h->sockops_link) {
		bpf_link__destroy(h->sockops_link);
		h->sockops_link = NULL;
	} else if (h->sockops_legacy && h->cg_fd >= 0) {
		bpf_prog_detach2(bpf_program__fd(h->skel->progs.ztun_sockops), h->cg_fd,
				 BPF_CGROUP_SOCK_OPS);
	}
	h->sockops_legacy = false;
	if (h->msg_link_fd >= 0) {
		close(h->msg_link_fd);
		h->msg_link_fd = -1;
	} else if (h->msg_legacy) {
		bpf_prog_detach2(bpf_program__fd(h->skel->progs.ztun_skmsg), h->fd_socks,
				 BPF_SK_MSG_VERDICT);
	}
	h->msg_legacy = false;
	if (h->cg_fd >= 0) {
		close(h->cg_fd);
		h->cg_fd = -1;
	}
	return 0;
}

void ztun_bpf_close(ztun_bpf *h)
{
	if (!h)
		return;
	ztun_bpf_detach(h);
	if (h->slots)
		munmap(h->slots, h->slots_len);
	if (h->skel)
		ztun_bpf_skel__destroy(h->skel);
	free(h->recs);
	free(h->free_slots);
	pthread_mutex_destroy(&h->lock);
	free(h);
}

/* ------------------------------------------------------------------ observation */

static const char *const stat_names[ZTUN_STAT_MAX] = {
	[ZTUN_STAT_SOCKOPS_INSERT] = "sockops_insert",
	[ZTUN_STAT_SOCKOPS_ERR] = "sockops_error",
	[ZTUN_STAT_HOP_REDIRECT] = "hop_redirect",
	[ZTUN_STAT_HOP_ORDER] = "hop_fallback_order",
	[ZTUN_STAT_HOP_CAP] = "hop_fallback_cap",
	[ZTUN_STAT_HOP_MISS] = "hop_miss",
	[ZTUN_STAT_PAIR_REDIRECT] = "pair_redirect",
	[ZTUN_STAT_PAIR_ORDER] = "pair_fallback_order",
	[ZTUN_STAT_PAIR_CAP] = "pair_fallback_cap",
	[ZTUN_STAT_PAIR_STALE] = "pair_stale_route",
	[ZTUN_STAT_PAIR_WAIT_NEAR] = "pair_wait_near",
	[ZTUN_STAT_PAIR_WAIT_BUSY] = "pair_wait_busy",
	[ZTUN_STAT_PAIR_WAIT_FAR] = "pair_wait_far",
};

const char *ztun_bpf_stat_name(unsigned idx)
{
	return idx < ZTUN_STAT_MAX ? stat_names[idx] : NULL;
}

int ztun_bpf_stats(ztun_bpf *h, uint64_t *out, size_t n)
{
	int ncpu = libbpf_num_possible_cpus();
	__u64 *vals;

	if (!h || !h->skel || !out)
		return fail(ZTUN_EINVAL, "stats: bad arguments");
	if (ncpu <= 0)
		return fail(ncpu ? ncpu : ZTUN_EINVAL, "stats: cpu count");
	vals = calloc(ncpu, sizeof(*vals));
	if (!vals)
		return fail(ZTUN_ENOMEM, "stats");
	for (size_t i = 0; i < n && i < ZTUN_STAT_MAX; i++) {
		__u32 k = i;

		out[i] = 0;
		if (bpf_map_lookup_elem(h->fd_stats, &k, vals) == 0)
			for (int c = 0; c < ncpu; c++)
				out[i] += vals[c];
	}
	free(vals);
	return 0;
}

int ztun_bpf_socket_count(ztun_bpf *h)
{
	struct ztun_sock_key k, next;
	void *prev = NULL;
	int n = 0;

	if (!h || !h->skel)
		return fail(ZTUN_EINVAL, "socket_count: no handle");
	while (bpf_map_get_next_key(h->fd_socks, prev, &next) == 0) {
		n++;
		k = next;
		prev = &k;
	}
	return n;
}

/* ------------------------------------------------------------------ cleanup */

struct report {
	char *buf;
	size_t len, off;
	int count;
};

__attribute__((format(printf, 2, 3))) static void note(struct report *r, const char *fmt, ...)
{
	va_list ap;
	int n;

	r->count++;
	if (!r->buf || r->off + 1 >= r->len)
		return;
	va_start(ap, fmt);
	n = vsnprintf(r->buf + r->off, r->len - r->off, fmt, ap);
	va_end(ap);
	if (n > 0)
		r->off = r->off + n < r->len ? r->off + n : r->len - 1;
}

static struct report *nftw_report;

static int unpin_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	if (type == FTW_DP) {
		if (rmdir(path) == 0 && ftw->level > 0)
			note(nftw_report, "rmdir %s\n", path);
		return 0;
	}
	if (unlink(path) == 0)
		note(nftw_report, "unpin %s\n", path);
	return 0;
}

static bool prog_is_ztun(__u32 prog_id, __u32 *map_ids, __u32 *nmaps)
{
	struct bpf_prog_info info = {};
	__u32 len = sizeof(info), cap = nmaps ? *nmaps : 0;
	int fd = bpf_prog_get_fd_by_id(prog_id);
	bool yes;

	if (fd < 0)
		return false;
	if (cap) {
		info.nr_map_ids = cap;
		info.map_ids = (__u64)(unsigned long)map_ids;
	}
	yes = bpf_obj_get_info_by_fd(fd, &info, &len) == 0 && !strncmp(info.name, "ztun_", 5);
	if (nmaps)
		*nmaps = info.nr_map_ids < cap ? info.nr_map_ids : cap;
	close(fd);
	return yes;
}

/* Cgroup ids (inode numbers on cgroup2) of every directory under root. */
struct idset {
	__u64 *v;
	size_t n, cap;
};

static struct idset *nftw_ids;

static int add_id(struct idset *s, __u64 id)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 64;
		__u64 *v = realloc(s->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		s->v = v;
		s->cap = cap;
	}
	s->v[s->n++] = id;
	return 0;
}

static bool has_id(const struct idset *s, __u64 id)
{
	for (size_t i = 0; i < s->n; i++)
		if (s->v[i] == id)
			return true;
	return false;
}

static int collect_cg(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	if (type == FTW_D)
		add_id(nftw_ids, st->st_ino);
	return 0;
}

static const enum bpf_attach_type legacy_types[] = {
	BPF_CGROUP_SOCK_OPS, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT,
	BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_GETPEERNAME, BPF_CGROUP_INET6_GETPEERNAME,
	BPF_CGROUP_INET_SOCK_RELEASE,
};

static struct report *legacy_report;

static int detach_legacy(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	__u32 ids[64];

	if (type != FTW_D)
		return 0;
	int cg = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (cg < 0)
		return 0;
	for (size_t t = 0; t < sizeof(legacy_types) / sizeof(legacy_types[0]); t++) {
		__u32 cnt = 64, flags = 0;

		if (bpf_prog_query(cg, legacy_types[t], 0, &flags, ids, &cnt))
			continue;
		for (__u32 i = 0; i < cnt; i++) {
			int pfd;

			if (!prog_is_ztun(ids[i], NULL, NULL))
				continue;
			pfd = bpf_prog_get_fd_by_id(ids[i]);
			if (pfd < 0)
				continue;
			/* Links show up in queries too; detach2 refuses them (EINVAL), fine. */
			if (bpf_prog_detach2(pfd, cg, legacy_types[t]) == 0)
				note(legacy_report, "detach prog %u from %s (type %d)\n", ids[i], path,
				     legacy_types[t]);
			close(pfd);
		}
	}
	close(cg);
	return 0;
}

static int find_cgroup2(char *buf, size_t len)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char line[4096];

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char *sep = strstr(line, " - ");
		char mnt[1024], type[64];

		if (!sep || sscanf(sep + 3, "%63s", type) != 1 || strcmp(type, "cgroup2"))
			continue;
		if (sscanf(line, "%*s %*s %*s %*s %1023s", mnt) != 1)
			continue;
		snprintf(buf, len, "%s", mnt);
		fclose(f);
		return 0;
	}
	fclose(f);
	return -ENOENT;
}

int ztun_bpf_cleanup(const char *pin_root, const char *cgroup_root, uint32_t flags, char *buf,
		     size_t len)
{
	struct report r = { .buf = buf, .len = len };
	struct idset cgs = {}, maps = {};
	char cg2[1024];
	__u32 id = 0;

	static pthread_mutex_t cleanup_lock = PTHREAD_MUTEX_INITIALIZER;

	pthread_once(&print_once, set_print);
	if (buf && len)
		buf[0] = 0;
	/* nftw() callbacks take no argument: the walks share static state. */
	pthread_mutex_lock(&cleanup_lock);
	if ((flags & ZTUN_BPF_CLEAN_PINS) && pin_root && access(pin_root, F_OK) == 0) {
		/* Unpinning a link whose process is gone releases it: that detaches it. */
		nftw_report = &r;
		nftw(pin_root, unpin_one, 16, FTW_DEPTH | FTW_PHYS);
		nftw_report = NULL;
	}
	if (cgroup_root) {
		nftw_ids = &cgs;
		nftw(cgroup_root, collect_cg, 16, FTW_PHYS);
		nftw_ids = NULL;
	}
	if (flags & ZTUN_BPF_CLEAN_LINKS) {
		/* First cgroup links (collecting their programs' maps), then sockmap links. */
		for (int pass = 0; pass < 2; pass++) {
			id = 0;
			while (bpf_link_get_next_id(id, &id) == 0) {
				struct bpf_link_info info = {};
				__u32 ilen = sizeof(info), mids[16], nm = 16;
				int fd = bpf_link_get_fd_by_id(id);
				bool take;

				if (fd < 0)
					continue;
				if (bpf_obj_get_info_by_fd(fd, &info, &ilen) ||
				    !prog_is_ztun(info.prog_id, mids, &nm)) {
					close(fd);
					continue;
				}
				if (pass == 0 && info.type == BPF_LINK_TYPE_CGROUP) {
					take = !cgroup_root || has_id(&cgs, info.cgroup.cgroup_id);
					if (take)
						for (__u32 i = 0; i < nm; i++)
							add_id(&maps, mids[i]);
				} else if (pass == 1 && info.type != BPF_LINK_TYPE_CGROUP) {
					/* sockmap links (type 14 on 6.10+): their map is
					 * info.sockmap.map_id, not exposed by libbpf 1.1's
					 * headers; match by the program's maps instead. */
					take = !cgroup_root;
					for (__u32 i = 0; !take && i < nm; i++)
						take = has_id(&maps, mids[i]);
				} else {
					take = false;
				}
				if (take && bpf_link_detach(fd) == 0)
					note(&r, "detach link %u (type %u, prog %u)\n", id, info.type,
					     info.prog_id);
				close(fd);
			}
		}
	}
	if (flags & ZTUN_BPF_CLEAN_LEGACY) {
		const char *root = cgroup_root;

		if (!root && find_cgroup2(cg2, sizeof(cg2)) == 0)
			root = cg2;
		if (root) {
			legacy_report = &r;
			nftw(root, detach_legacy, 16, FTW_PHYS);
			legacy_report = NULL;
		}
	}
	pthread_mutex_unlock(&cleanup_lock);
	free(cgs.v);
	free(maps.v);
	return r.count;
}

/* ------------------------------------------------------------------ engine table */

static const struct ztun_bpf_api api = {
	.abi = ZTUN_BPF_API_ABI,
	.size = sizeof(struct ztun_bpf_api),
	.pair_add = ztun_bpf_pair_add,
	.pair_del = ztun_bpf_pair_del,
	.pair_stats = ztun_bpf_pair_stats,
	.relay_busy = ztun_bpf_relay_busy,
	.add_listener = ztun_bpf_add_listener,
	.del_listener = ztun_bpf_del_listener,
	.mark = ztun_bpf_mark,
	.strerror = ztun_bpf_strerror,
};

const struct ztun_bpf_api *ztun_bpf_api(void)
{
	return &api;
}
