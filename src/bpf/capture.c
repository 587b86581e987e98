/* capture.c - loader of ztun's transparent capture (see include/ztun/bpf.h, docs/capture.md).
 *
 * One object per process holds the shared maps and the cgroup programs; each captured
 * namespace gets its own instance of the sk_lookup program (same object file, only that
 * program loaded, the maps reused, its netns cookie in .rodata), because sk_lookup
 * programs cannot ask which namespace they run in.
 *
 * Every attachment is a bpf_link created with raw bpf_link_create(): the same fd type for
 * cgroup and netns links, pinnable, and replaceable in place with bpf_link_update() (how
 * a restarted process takes over pinned programs without a moment of no capture).
 *
 * Pin layout under pin_dir (names without dots: bpffs reserves them):
 *   ztun_cap_*          the maps
 *   engine_<cgroup id>  getsockopt link on ztun's cgroup
 *   engineset_<id>      setsockopt link on ztun's cgroup
 *   engineops_<id>      sockops link on ztun's cgroup (files tagged clients)
 *   w<slot>/<hook>      a workload's links (connect4 ... sk_lookup)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "ztun/ztun.h"
#include "ztun/bpf.h"
#include "ztun_bpf_common.h"
#include "ztun_capture.skel.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif

#define DEFAULT_MAX_CONNS 65536
#define DEFAULT_MAX_WORKLOADS 256
#define DEFAULT_OUT_PORT 15001
#define DEFAULT_HBONE_PORT 15008
/* Excluded ports of all workloads together. */
#define MAX_SKIP_ENTRIES 4096

_Static_assert(sizeof(struct ztun_cap_ns) == 32, "ztun_cap_ns layout");
_Static_assert(sizeof(struct ztun_cap_skip_key) == 16, "ztun_cap_skip_key layout");
_Static_assert(sizeof(struct ztun_cap_dst) == 24, "ztun_cap_dst layout");
_Static_assert(sizeof(struct ztun_cap_wl) == 32, "ztun_cap_wl layout");
_Static_assert(ZTUN_CAP_STAT_MAX == ZTUN_CAPTURE_NSTATS, "capture stat count");
_Static_assert(ZTUN_CAP_LSN_PER_SLOT == ZTUN_CAPTURE_NLSN, "listener slots");
_Static_assert(ZTUN_CAPTURE_LSN_PLAIN4 == ZTUN_CAP_LSN_PLAIN * 2, "listener index");
_Static_assert(ZTUN_CAPTURE_NAME_MAX < ZTUN_CAP_NAME_MAX, "name length");
_Static_assert(ZTUN_CAPTURE_SO_ORIGINAL_SRC == ZTUN_SO_ORIGINAL_SRC, "optname");

/* A workload's hooks, in attach order: the namespace's inbound steering last (its
 * listeners are in place by then), the connect rewrite after what it relies on. */
enum hook { H_RELEASE, H_PEER4, H_PEER6, H_SOCKOPS, H_CONN4, H_CONN6, H_LOOKUP, NHOOK };

static const char *const hook_name[NHOOK] = {
	[H_RELEASE] = "sock_release", [H_PEER4] = "getpeername4", [H_PEER6] = "getpeername6",
	[H_SOCKOPS] = "sockops",      [H_CONN4] = "connect4",     [H_CONN6] = "connect6",
	[H_LOOKUP] = "sk_lookup",
};

static const enum bpf_attach_type hook_type[NHOOK] = {
	[H_RELEASE] = BPF_CGROUP_INET_SOCK_RELEASE, [H_PEER4] = BPF_CGROUP_INET4_GETPEERNAME,
	[H_PEER6] = BPF_CGROUP_INET6_GETPEERNAME,   [H_SOCKOPS] = BPF_CGROUP_SOCK_OPS,
	[H_CONN4] = BPF_CGROUP_INET4_CONNECT,       [H_CONN6] = BPF_CGROUP_INET6_CONNECT,
	[H_LOOKUP] = BPF_SK_LOOKUP,
};

struct cap_wl {
	bool used;
	char name[ZTUN_CAP_NAME_MAX];
	uint32_t slot;
	uint64_t netns_cookie;
	struct ztun_capture_skel *lookup; /* this namespace's sk_lookup instance */
	int link[NHOOK];                  /* -1: not attached by us */
};

struct ztun_capture {
	struct ztun_capture_skel *skel;
	struct ztun_capture_config cfg;
	char pin_dir[PATH_MAX];
	char engine_cg[PATH_MAX];
	bool pinning;     /* cfg.pin_dir given */
	bool maps_pinned; /* the maps are pinned right now */
	int engine_link;  /* getsockopt link on engine_cg, -1 */
	int engine_set_link; /* setsockopt link on engine_cg, -1 */
	int engine_ops_link; /* sockops link on engine_cg, -1 */
	uint64_t engine_cg_id;
	int fd_ns, fd_skip, fd_orig, fd_pair, fd_lsn, fd_wl, fd_stats;
	struct cap_wl *wl; /* cfg.max_workloads entries */
};

/* ------------------------------------------------------------------ errors */

/* What the last failing capture call of this thread did wrong, in words. */
static __thread char cap_error[512];

const char *ztun_capture_last_error(void)
{
	return cap_error;
}

__attribute__((format(printf, 2, 3))) static int fail(int err, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(cap_error, sizeof(cap_error), fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < sizeof(cap_error))
		snprintf(cap_error + n, sizeof(cap_error) - n, ": %s", ztun_bpf_strerror(err));
	return err;
}

/* ------------------------------------------------------------------ small helpers */

static int mkdirs(const char *dir)
{
	char tmp[PATH_MAX];

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

static uint64_t inode_of(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

struct cookie_job {
	int ns_fd;
	int err;
	uint64_t cookie;
};

/* On a helper thread, so the caller's own namespace never changes. */
static void *cookie_thread(void *arg)
{
	struct cookie_job *j = arg;
	socklen_t len = sizeof(j->cookie);
	int s;

	if (setns(j->ns_fd, CLONE_NEWNET)) {
		j->err = -errno;
		return NULL;
	}
	s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		j->err = -errno;
		return NULL;
	}
	if (getsockopt(s, SOL_SOCKET, SO_NETNS_COOKIE, &j->cookie, &len))
		j->err = -errno;
	close(s);
	return NULL;
}

static int netns_cookie_fd(int ns_fd, uint64_t *cookie)
{
	struct cookie_job j = {.ns_fd = ns_fd};
	pthread_t t;
	int rc = pthread_create(&t, NULL, cookie_thread, &j);

	if (rc)
		return -rc;
	pthread_join(t, NULL);
	if (j.err)
		return j.err;
	*cookie = j.cookie;
	return 0;
}

int ztun_capture_netns_cookie(const char *netns, uint64_t *cookie)
{
	int fd, rc;

	if (!netns || !cookie)
		return fail(ZTUN_EINVAL, "netns_cookie: bad arguments");
	fd = open(netns, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(-errno, "open network namespace %s", netns);
	rc = netns_cookie_fd(fd, cookie);
	close(fd);
	return rc ? fail(rc, "cookie of network namespace %s", netns) : 0;
}

/* This process's cgroup v2 directory (from /proc/self/cgroup and the cgroup2 mount). */
static int own_cgroup(char *out, size_t len)
{
	char line[PATH_MAX], mnt[PATH_MAX] = "", rel[PATH_MAX] = "";
	FILE *f = fopen("/proc/self/mountinfo", "re");

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char *sep = strstr(line, " - ");
		char type[64];

		if (sep && sscanf(sep + 3, "%63s", type) == 1 && !strcmp(type, "cgroup2") &&
		    sscanf(line, "%*s %*s %*s %*s %4095s", mnt) == 1)
			break;
		mnt[0] = 0;
	}
	fclose(f);
	if (!mnt[0])
		return -ENOENT;
	f = fopen("/proc/self/cgroup", "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "0::", 3)) {
			snprintf(rel, sizeof(rel), "%s", line + 3);
			rel[strcspn(rel, "\n")] = 0;
			break;
		}
	}
	fclose(f);
	if (!rel[0])
		return -ENOENT;
	if (snprintf(out, len, "%s%s", mnt, strcmp(rel, "/") ? rel : "") >= (int)len)
		return -ENAMETOOLONG;
	return 0;
}

/* Is inner equal to or below outer (both cgroup directories)? */
static bool cgroup_within(const char *inner, const char *outer)
{
	char a[PATH_MAX], b[PATH_MAX];
	size_t n;

	if (!realpath(inner, a) || !realpath(outer, b))
		return false;
	n = strlen(b);
	return !strncmp(a, b, n) && (a[n] == 0 || a[n] == '/');
}

/* ------------------------------------------------------------------ links */

static void link_path(const ztun_capture *c, uint32_t slot, int h, char *out, size_t len)
{
	snprintf(out, len, "%s/w%u/%s", c->pin_dir, slot, hook_name[h]);
}

static uint32_t prog_fd(const struct ztun_capture_skel *s, int h)
{
	switch (h) {
	case H_RELEASE: return bpf_program__fd(s->progs.ztun_cap_release);
	case H_PEER4: return bpf_program__fd(s->progs.ztun_cap_peer4);
	case H_PEER6: return bpf_program__fd(s->progs.ztun_cap_peer6);
	case H_SOCKOPS: return bpf_program__fd(s->progs.ztun_cap_sockops);
	case H_CONN4: return bpf_program__fd(s->progs.ztun_cap_conn4);
	case H_CONN6: return bpf_program__fd(s->progs.ztun_cap_conn6);
	default: return bpf_program__fd(s->progs.ztun_cap_lookup);
	}
}

/* What a link is attached to: cgroup id or netns inode (0: cannot tell). */
static uint64_t link_target(int fd)
{
	struct bpf_link_info info = {};
	__u32 len = sizeof(info);

	if (bpf_obj_get_info_by_fd(fd, &info, &len))
		return 0;
	if (info.type == BPF_LINK_TYPE_CGROUP)
		return info.cgroup.cgroup_id;
	if (info.type == BPF_LINK_TYPE_NETNS)
		return info.netns.netns_ino;
	return 0;
}

/*
 * Attach prog to target (an fd of a cgroup or netns whose id/inode is target_id), or take
 * over a link: ours (mine >= 0, a repeated add) or the one pinned at pin (NULL: no
 * pinning), replacing its program in place so the hook never runs without one. A link on
 * another target (re-created cgroup or netns), or detached behind our back (ztund bpf
 * cleanup: target 0), is replaced. Returns the link fd or a negative error.
 */
static int attach_link(int mine, const char *pin, int prog, int target, uint64_t target_id,
		       enum bpf_attach_type type, const char *what)
{
	int fd = mine >= 0 ? mine : pin ? bpf_obj_get(pin) : -1;

	/* A link someone detached (ztund bpf cleanup) reports target 0: replaced below. */
	if (fd >= 0) {
		if (link_target(fd) == target_id && !bpf_link_update(fd, prog, NULL))
			return fd;
		bpf_link_detach(fd);
		close(fd);
		if (pin)
			unlink(pin);
	}
	fd = bpf_link_create(prog, target, type, NULL);
	if (fd < 0)
		return fail(-errno, "attach %s", what);
	if (pin && bpf_obj_pin(fd, pin)) {
		int err = -errno;

		close(fd);
		return fail(err, "pin %s", pin);
	}
	return fd;
}

/* Detach (also when others hold it: pinned, or a dead process's pin) and unpin. */
static void drop_link(int *fd, const char *pin)
{
	int pfd;

	if (*fd >= 0) {
		bpf_link_detach(*fd);
		close(*fd);
		*fd = -1;
	}
	if (pin && (pfd = bpf_obj_get(pin)) >= 0) {
		bpf_link_detach(pfd);
		close(pfd);
	}
	if (pin)
		unlink(pin);
}

/* ------------------------------------------------------------------ open */

static void map_fds(ztun_capture *c)
{
	c->fd_ns = bpf_map__fd(c->skel->maps.ztun_cap_ns);
	c->fd_skip = bpf_map__fd(c->skel->maps.ztun_cap_skip);
	c->fd_orig = bpf_map__fd(c->skel->maps.ztun_cap_orig);
	c->fd_pair = bpf_map__fd(c->skel->maps.ztun_cap_pair);
	c->fd_lsn = bpf_map__fd(c->skel->maps.ztun_cap_lsn);
	c->fd_wl = bpf_map__fd(c->skel->maps.ztun_cap_wl);
	c->fd_stats = bpf_map__fd(c->skel->maps.ztun_cap_stats);
}

static bool user_map(const struct bpf_map *m)
{
	return !strchr(bpf_map__name(m), '.'); /* not .rodata, .bss, ... */
}

static int pin_maps(ztun_capture *c)
{
	struct bpf_map *m;
	char p[PATH_MAX + 64];
	int err;

	if (!c->pinning || c->maps_pinned)
		return 0;
	/* The ones reused from an earlier process are pinned already. */
	if ((err = mkdirs(c->pin_dir)))
		return fail(err, "mkdir %s", c->pin_dir);
	bpf_object__for_each_map(m, c->skel->obj) {
		if (!user_map(m) || bpf_map__is_pinned(m))
			continue;
		snprintf(p, sizeof(p), "%s/%s", c->pin_dir, bpf_map__name(m));
		if ((err = bpf_map__pin(m, p)))
			return fail(err, "pin %s", p);
	}
	c->maps_pinned = true;
	return 0;
}

static void unpin_maps(ztun_capture *c)
{
	struct bpf_map *m;

	bpf_object__for_each_map(m, c->skel->obj) {
		if (user_map(m) && bpf_map__is_pinned(m))
			bpf_map__unpin(m, NULL);
	}
	c->maps_pinned = false;
}

int ztun_capture_open(const struct ztun_capture_config *cfg, ztun_capture **out)
{
	struct bpf_map *m;
	ztun_capture *c;
	char p[PATH_MAX + 64];
	int err;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return fail(ZTUN_ENOMEM, "ztun_capture_open");
	if (cfg)
		c->cfg = *cfg;
	c->engine_link = -1;
	c->engine_set_link = -1;
	c->engine_ops_link = -1;
	if (!c->cfg.mark)
		c->cfg.mark = ZTUN_BPF_DEFAULT_MARK;
	if (!c->cfg.max_conns)
		c->cfg.max_conns = DEFAULT_MAX_CONNS;
	if (!c->cfg.max_workloads)
		c->cfg.max_workloads = DEFAULT_MAX_WORKLOADS;
	c->cfg.pin_dir = NULL;
	c->cfg.engine_cgroup = NULL;
	if (cfg && cfg->pin_dir) {
		if (snprintf(c->pin_dir, sizeof(c->pin_dir), "%s", cfg->pin_dir) >=
		    (int)sizeof(c->pin_dir) - 64) {
			err = fail(-ENAMETOOLONG, "pin directory");
			goto cleanup;
		}
		c->pinning = true;
	}
	if (cfg && cfg->engine_cgroup)
		err = snprintf(c->engine_cg, sizeof(c->engine_cg), "%s", cfg->engine_cgroup) >=
		      (int)sizeof(c->engine_cg) ? -ENAMETOOLONG : 0;
	else
		err = own_cgroup(c->engine_cg, sizeof(c->engine_cg));
	if (err) {
		err = fail(err, "the engine's cgroup");
		goto cleanup;
	}
	c->engine_cg_id = inode_of(c->engine_cg);
	if (!c->engine_cg_id) {
		err = fail(-errno, "cgroup %s", c->engine_cg);
		goto cleanup;
	}
	c->wl = calloc(c->cfg.max_workloads, sizeof(*c->wl));
	if (!c->wl) {
		err = fail(ZTUN_ENOMEM, "workload table");
		goto cleanup;
	}

	c->skel = ztun_capture_skel__open();
	if (!c->skel) {
		err = fail(-errno, "open capture BPF object");
		goto cleanup;
	}
	c->skel->rodata->ztun_mark = c->cfg.mark;
	/* The per-namespace sk_lookup program is loaded per namespace, not here. */
	bpf_program__set_autoload(c->skel->progs.ztun_cap_lookup, false);
	if ((err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_ns, c->cfg.max_workloads)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_wl, c->cfg.max_workloads)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_lsn,
					    c->cfg.max_workloads * ZTUN_CAPTURE_NLSN)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_orig, c->cfg.max_conns)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_pair, c->cfg.max_conns)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_src, c->cfg.max_conns)) ||
	    (err = bpf_map__set_max_entries(c->skel->maps.ztun_cap_skip, MAX_SKIP_ENTRIES))) {
		err = fail(err, "size capture maps");
		goto cleanup;
	}
	if (c->pinning) {
		/* Maps pinned by an earlier process are reused (libbpf checks they match what
		 * this object declares); nothing is pinned before the first capture, so opening
		 * has no lasting effect. */
		bpf_object__for_each_map(m, c->skel->obj) {
			if (!user_map(m))
				continue;
			snprintf(p, sizeof(p), "%s/%s", c->pin_dir, bpf_map__name(m));
			if (access(p, F_OK))
				continue;
			if ((err = bpf_map__set_pin_path(m, p))) {
				err = fail(err, "pin path %s", p);
				goto cleanup;
			}
		}
	}
	err = ztun_capture_skel__load(c->skel);
	if (err) {
		err = fail(err, c->pinning ? "load capture programs (verifier; or maps pinned in %s "
					     "by another version: ztund bpf cleanup)"
					   : "load capture programs (verifier; see the log)%s",
			   c->pinning ? c->pin_dir : "");
		goto cleanup;
	}
	map_fds(c);
	/* What a previous process left captured is taken over by ztun_capture_add(). */
	*out = c;
	return 0;
cleanup:
	ztun_capture_close(c);
	return err;
}

/* ------------------------------------------------------------------ registry */

static struct cap_wl *wl_find(ztun_capture *c, const char *name)
{
	for (uint32_t i = 0; i < c->cfg.max_workloads; i++)
		if (c->wl[i].used && !strcmp(c->wl[i].name, name))
			return &c->wl[i];
	return NULL;
}

static int reg_get(ztun_capture *c, const char *name, struct ztun_cap_wl *v)
{
	struct ztun_cap_wl_key k = {};

	snprintf(k.name, sizeof(k.name), "%s", name);
	return bpf_map_lookup_elem(c->fd_wl, &k, v) ? -ENOENT : 0;
}

/* A slot no workload uses (in this process or in the pinned registry). */
static int free_slot(ztun_capture *c, uint32_t *slot)
{
	struct ztun_cap_wl_key k, next;
	struct ztun_cap_wl v;
	bool *used = calloc(c->cfg.max_workloads, 1);
	void *prev = NULL;

	if (!used)
		return ZTUN_ENOMEM;
	for (uint32_t i = 0; i < c->cfg.max_workloads; i++)
		if (c->wl[i].used)
			used[c->wl[i].slot] = true;
	while (bpf_map_get_next_key(c->fd_wl, prev, &next) == 0) {
		if (bpf_map_lookup_elem(c->fd_wl, &next, &v) == 0 && v.slot < c->cfg.max_workloads)
			used[v.slot] = true;
		k = next;
		prev = &k;
	}
	for (uint32_t i = 0; i < c->cfg.max_workloads; i++) {
		if (!used[i]) {
			free(used);
			*slot = i;
			return 0;
		}
	}
	free(used);
	return ZTUN_EFULL;
}

/* Which registered workload captures this namespace (NULL: none). */
static bool reg_by_cookie(ztun_capture *c, uint64_t cookie, char *name, size_t len)
{
	struct ztun_cap_wl_key k, next;
	struct ztun_cap_wl v;
	void *prev = NULL;

	while (bpf_map_get_next_key(c->fd_wl, prev, &next) == 0) {
		if (bpf_map_lookup_elem(c->fd_wl, &next, &v) == 0 && v.netns_cookie == cookie) {
			snprintf(name, len, "%.*s", ZTUN_CAP_NAME_MAX - 1, next.name);
			return true;
		}
		k = next;
		prev = &k;
	}
	return false;
}

static void clear_skips(ztun_capture *c, uint64_t netns)
{
	struct ztun_cap_skip_key k, next, del[64];
	void *prev = NULL;
	int n;

	/* Deleting while iterating restarts the walk: collect, delete, repeat. */
	do {
		n = 0;
		prev = NULL;
		while (n < 64 && bpf_map_get_next_key(c->fd_skip, prev, &next) == 0) {
			if (next.netns == netns)
				del[n++] = next;
			k = next;
			prev = &k;
		}
		for (int i = 0; i < n; i++)
			bpf_map_delete_elem(c->fd_skip, &del[i]);
	} while (n == 64);
}

static int put_skips(ztun_capture *c, uint64_t netns, const uint16_t *ports, int n, uint8_t dir)
{
	__u8 one = 1;

	if (n < 0 || n > ZTUN_CAPTURE_MAX_SKIP || (n && !ports))
		return fail(ZTUN_EINVAL, "excluded ports: at most %d per direction",
			    ZTUN_CAPTURE_MAX_SKIP);
	for (int i = 0; i < n; i++) {
		struct ztun_cap_skip_key k = {.netns = netns, .port = ports[i], .dir = dir};

		if (!ports[i])
			return fail(ZTUN_EINVAL, "excluded port 0");
		if (bpf_map_update_elem(c->fd_skip, &k, &one, BPF_ANY))
			return fail(-errno, "exclude port %u", ports[i]);
	}
	return 0;
}

/* ------------------------------------------------------------------ listeners */

static int put_listener(ztun_capture *c, uint32_t slot, uint64_t cookie, unsigned which, int fd)
{
	__u32 key = slot * ZTUN_CAPTURE_NLSN + which;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss), il = sizeof(int), cl = sizeof(uint64_t);
	int listening = 0, type = 0;
	uint64_t ns = 0;
	__u64 v;

	if (which >= ZTUN_CAPTURE_NLSN)
		return fail(ZTUN_EINVAL, "listener slot %u", which);
	if (fd < 0) {
		bpf_map_delete_elem(c->fd_lsn, &key);
		return 0;
	}
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) ||
	    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &il) ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &il) ||
	    getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &ns, &cl))
		return fail(-errno, "listener fd %d", fd);
	if (!listening || type != SOCK_STREAM)
		return fail(ZTUN_EINVAL, "listener fd %d is not a listening TCP socket", fd);
	if ((which & 1) != (ss.ss_family == AF_INET6))
		return fail(ZTUN_EINVAL, "listener fd %d: an %s socket in an IPv%d slot", fd,
			    ss.ss_family == AF_INET6 ? "IPv6" : "IPv4", which & 1 ? 6 : 4);
	if (ns != cookie)
		return fail(ZTUN_EINVAL, "listener fd %d is not in the workload's network namespace",
			    fd);
	v = (__u64)fd;
	if (bpf_map_update_elem(c->fd_lsn, &key, &v, BPF_ANY))
		return fail(-errno, "put listener fd %d in the sockmap", fd);
	return 0;
}

/* ------------------------------------------------------------------ add / remove */

static int ensure_engine(ztun_capture *c)
{
	char pin[PATH_MAX + 64];
	int cg, fd;

	if (c->engine_link >= 0 && link_target(c->engine_link) == c->engine_cg_id &&
	    c->engine_set_link >= 0 && link_target(c->engine_set_link) == c->engine_cg_id &&
	    c->engine_ops_link >= 0 && link_target(c->engine_ops_link) == c->engine_cg_id)
		return 0;
	if (c->engine_link >= 0) {
		/* detached behind our back (ztund bpf cleanup): attach again */
		close(c->engine_link);
		c->engine_link = -1;
	}
	cg = open(c->engine_cg, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cg < 0)
		return fail(-errno, "open cgroup %s", c->engine_cg);
	snprintf(pin, sizeof(pin), "%s/engine_%llu", c->pin_dir,
		 (unsigned long long)c->engine_cg_id);
	fd = attach_link(-1, c->pinning ? pin : NULL,
			 bpf_program__fd(c->skel->progs.ztun_cap_getsockopt), cg, c->engine_cg_id,
			 BPF_CGROUP_GETSOCKOPT, "getsockopt to ztun's cgroup");
	if (fd < 0) {
		close(cg);
		return fd;
	}
	c->engine_link = fd;
	snprintf(pin, sizeof(pin), "%s/engineset_%llu", c->pin_dir,
		 (unsigned long long)c->engine_cg_id);
	fd = attach_link(c->engine_set_link, c->pinning ? pin : NULL,
			 bpf_program__fd(c->skel->progs.ztun_cap_setsockopt), cg, c->engine_cg_id,
			 BPF_CGROUP_SETSOCKOPT, "setsockopt to ztun's cgroup");
	if (fd < 0) {
		close(cg);
		return fd;
	}
	c->engine_set_link = fd;
	/* sock_ops on ztun's sockets too: files a tagged client at TCP_CONNECT_CB. */
	snprintf(pin, sizeof(pin), "%s/engineops_%llu", c->pin_dir,
		 (unsigned long long)c->engine_cg_id);
	fd = attach_link(c->engine_ops_link, c->pinning ? pin : NULL,
			 bpf_program__fd(c->skel->progs.ztun_cap_sockops), cg, c->engine_cg_id,
			 BPF_CGROUP_SOCK_OPS, "sockops to ztun's cgroup");
	close(cg);
	if (fd < 0)
		return fd;
	c->engine_ops_link = fd;
	return 0;
}

static int load_lookup(ztun_capture *c, struct cap_wl *w)
{
	struct ztun_capture_skel *s;
	struct bpf_program *p;
	struct bpf_map *m;
	int err;

	s = ztun_capture_skel__open();
	if (!s)
		return fail(-errno, "open sk_lookup instance");
	s->rodata->ztun_mark = c->cfg.mark;
	s->rodata->lookup_netns = w->netns_cookie;
	bpf_object__for_each_program(p, s->obj)
		bpf_program__set_autoload(p, p == s->progs.ztun_cap_lookup);
	bpf_object__for_each_map(m, s->obj) {
		const struct bpf_map *mine;

		if (!user_map(m))
			continue;
		mine = bpf_object__find_map_by_name(c->skel->obj, bpf_map__name(m));
		if (!mine || (err = bpf_map__reuse_fd(m, bpf_map__fd(mine)))) {
			ztun_capture_skel__destroy(s);
			return fail(mine ? err : ZTUN_ENOTFOUND, "share map %s", bpf_map__name(m));
		}
	}
	err = ztun_capture_skel__load(s);
	if (err) {
		ztun_capture_skel__destroy(s);
		return fail(err, "load sk_lookup instance");
	}
	w->lookup = s;
	return 0;
}

static void wl_release(ztun_capture *c, struct cap_wl *w, bool detach)
{
	char pin[PATH_MAX + 64];

	for (int h = 0; h < NHOOK; h++) {
		if (detach) {
			link_path(c, w->slot, h, pin, sizeof(pin));
			drop_link(&w->link[h], c->pinning ? pin : NULL);
		} else if (w->link[h] >= 0) {
			close(w->link[h]); /* unpinned: this detaches it */
			w->link[h] = -1;
		}
	}
	if (detach && c->pinning) {
		snprintf(pin, sizeof(pin), "%s/w%u", c->pin_dir, w->slot);
		rmdir(pin);
	}
	if (w->lookup) {
		ztun_capture_skel__destroy(w->lookup);
		w->lookup = NULL;
	}
	w->used = false;
}

static int attach_hooks(ztun_capture *c, struct cap_wl *w, int cg, uint64_t cg_id, int ns,
			uint64_t ns_ino, uint32_t flags)
{
	char pin[PATH_MAX + 64], what[64];
	int err;

	if (c->pinning) {
		snprintf(pin, sizeof(pin), "%s/w%u", c->pin_dir, w->slot);
		if ((err = mkdirs(pin)))
			return fail(err, "mkdir %s", pin);
	}
	for (int h = 0; h < NHOOK; h++) {
		bool netns = h == H_LOOKUP;

		link_path(c, w->slot, h, pin, sizeof(pin));
		if (netns && !(flags & ZTUN_CAPTURE_IN)) {
			drop_link(&w->link[h], c->pinning ? pin : NULL);
			continue;
		}
		if (netns && !w->lookup && (err = load_lookup(c, w)))
			return err;
		snprintf(what, sizeof(what), "%s of %s", hook_name[h], w->name);
		/* Ours already (a repeated add): updated in place, or replaced if detached. */
		w->link[h] = attach_link(w->link[h], c->pinning ? pin : NULL,
					 prog_fd(netns ? w->lookup : c->skel, h), netns ? ns : cg,
					 netns ? ns_ino : cg_id, hook_type[h], what);
		if (w->link[h] < 0) {
			err = w->link[h];
			w->link[h] = -1;
			return err;
		}
	}
	return 0;
}

int ztun_capture_add(ztun_capture *c, const struct ztun_capture_workload *in)
{
	struct ztun_cap_wl_key key = {};
	struct ztun_cap_wl reg = {}, old;
	struct ztun_cap_ns nsv = {};
	struct cap_wl *w = NULL;
	char other[ZTUN_CAP_NAME_MAX];
	bool had_old, fresh = false;
	int cg = -1, ns = -1, err;
	uint64_t cookie, cg_id, ns_ino;
	struct stat st;

	if (!c || !in || !in->name || !in->cgroup || !in->netns || !in->name[0] ||
	    strlen(in->name) > ZTUN_CAPTURE_NAME_MAX || (in->flags & ~ZTUN_CAPTURE_ALL))
		return fail(ZTUN_EINVAL, "capture: bad workload (name up to %d bytes, cgroup, netns)",
			    ZTUN_CAPTURE_NAME_MAX);
	if (cgroup_within(c->engine_cg, in->cgroup))
		return fail(ZTUN_EINVAL, "capture %s: cgroup %s holds ztun's own cgroup %s: its "
			    "connections would be captured too (a loop)", in->name, in->cgroup,
			    c->engine_cg);
	cg = open(in->cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cg < 0 || fstat(cg, &st)) {
		err = fail(-errno, "capture %s: cgroup %s", in->name, in->cgroup);
		goto out;
	}
	cg_id = st.st_ino;
	ns = open(in->netns, O_RDONLY | O_CLOEXEC);
	if (ns < 0 || fstat(ns, &st)) {
		err = fail(-errno, "capture %s: network namespace %s", in->name, in->netns);
		goto out;
	}
	ns_ino = st.st_ino;
	if ((err = netns_cookie_fd(ns, &cookie))) {
		err = fail(err, "capture %s: cookie of %s", in->name, in->netns);
		goto out;
	}
	if (reg_by_cookie(c, cookie, other, sizeof(other)) && strcmp(other, in->name)) {
		err = fail(-EEXIST, "capture %s: network namespace %s is captured as %s", in->name,
			   in->netns, other);
		goto out;
	}

	/* This process's record, or a new one: a pinned registry entry of the same name is
	 * a previous process's capture, taken over in place (same slot, links updated). */
	w = wl_find(c, in->name);
	had_old = reg_get(c, in->name, &old) == 0;
	if (!w) {
		for (uint32_t i = 0; i < c->cfg.max_workloads && !w; i++)
			if (!c->wl[i].used)
				w = &c->wl[i];
		if (!w) {
			err = fail(ZTUN_EFULL, "capture %s: %u workloads", in->name,
				   c->cfg.max_workloads);
			goto out;
		}
		memset(w, 0, sizeof(*w));
		for (int h = 0; h < NHOOK; h++)
			w->link[h] = -1;
		snprintf(w->name, sizeof(w->name), "%s", in->name);
		if (had_old && old.slot < c->cfg.max_workloads) {
			w->slot = old.slot;
		} else if ((err = free_slot(c, &w->slot))) {
			err = fail(err, "capture %s: no free slot", in->name);
			goto out;
		}
		w->used = true;
		fresh = true;
	}
	if (had_old && old.netns_cookie != cookie) {
		/* The namespace was re-created: the old one's settings go. */
		bpf_map_delete_elem(c->fd_ns, &old.netns_cookie);
		clear_skips(c, old.netns_cookie);
	}
	if (w->lookup && w->netns_cookie != cookie) {
		ztun_capture_skel__destroy(w->lookup); /* its netns cookie is baked in */
		w->lookup = NULL;
	}
	w->netns_cookie = cookie;
	if ((err = pin_maps(c)) || (err = ensure_engine(c)))
		goto undo;

	/* 1. ztun's listeners (inbound to a missing one is refused, never passed). */
	for (unsigned i = 0; i < ZTUN_CAPTURE_NLSN; i++)
		if ((err = put_listener(c, w->slot, cookie, i, in->listen_fds[i])))
			goto undo;
	/* 2. The namespace's settings. */
	clear_skips(c, cookie);
	if ((err = put_skips(c, cookie, in->skip_out, in->nskip_out, ZTUN_CAP_DIR_OUT)) ||
	    (err = put_skips(c, cookie, in->skip_in, in->nskip_in, ZTUN_CAP_DIR_IN)))
		goto undo;
	inet_pton(AF_INET6, "::1", nsv.out_ip6);
	nsv.out_ip4 = htonl(INADDR_LOOPBACK);
	nsv.out_port = in->outbound_port ? in->outbound_port : DEFAULT_OUT_PORT;
	nsv.hbone_port = in->hbone_port ? in->hbone_port : DEFAULT_HBONE_PORT;
	nsv.flags = in->flags;
	nsv.slot = w->slot;
	if (bpf_map_update_elem(c->fd_ns, &cookie, &nsv, BPF_ANY)) {
		err = fail(-errno, "capture %s: namespace settings", in->name);
		goto undo;
	}
	/* 3. The programs. */
	if ((err = attach_hooks(c, w, cg, cg_id, ns, ns_ino, in->flags)))
		goto undo;
	/* 4. The registry, for a later process. */
	snprintf(key.name, sizeof(key.name), "%s", in->name);
	reg.netns_cookie = cookie;
	reg.netns_ino = ns_ino;
	reg.cgroup_id = cg_id;
	reg.slot = w->slot;
	reg.flags = in->flags;
	if (bpf_map_update_elem(c->fd_wl, &key, &reg, BPF_ANY)) {
		err = fail(-errno, "capture %s: registry", in->name);
		goto undo;
	}
	err = 0;
	goto out;
undo:
	/* A failed first capture leaves nothing; a failed update leaves the previous state
	 * (whatever links are still attached keep the old behaviour). */
	if (fresh && !had_old) {
		char saved[512];

		snprintf(saved, sizeof(saved), "%s", cap_error);
		wl_release(c, w, true);
		for (unsigned i = 0; i < ZTUN_CAPTURE_NLSN; i++) {
			__u32 k = w->slot * ZTUN_CAPTURE_NLSN + i;

			bpf_map_delete_elem(c->fd_lsn, &k);
		}
		bpf_map_delete_elem(c->fd_ns, &cookie);
		clear_skips(c, cookie);
		snprintf(cap_error, sizeof(cap_error), "%s", saved);
	}
out:
	if (cg >= 0)
		close(cg);
	if (ns >= 0)
		close(ns);
	return err;
}

int ztun_capture_set_listener(ztun_capture *c, const char *name, unsigned which, int fd)
{
	struct cap_wl *w = c && name ? wl_find(c, name) : NULL;

	if (!w)
		return fail(ZTUN_ENOTFOUND, "set_listener: %s is not captured by this process",
			    name ? name : "(null)");
	return put_listener(c, w->slot, w->netns_cookie, which, fd);
}

static int registry_count(ztun_capture *c)
{
	struct ztun_cap_wl_key k, next;
	void *prev = NULL;
	int n = 0;

	while (bpf_map_get_next_key(c->fd_wl, prev, &next) == 0) {
		n++;
		k = next;
		prev = &k;
	}
	return n;
}

int ztun_capture_remove(ztun_capture *c, const char *name)
{
	struct ztun_cap_wl_key key = {};
	struct ztun_cap_wl reg;
	struct cap_wl *w, tmp;
	bool known;

	if (!c || !name)
		return fail(ZTUN_EINVAL, "remove: bad arguments");
	w = wl_find(c, name);
	known = reg_get(c, name, &reg) == 0;
	if (!w && !known)
		return fail(ZTUN_ENOTFOUND, "remove: %s is not captured", name);
	if (!w) {
		/* Pinned by an earlier process: drop its pins by slot. */
		memset(&tmp, 0, sizeof(tmp));
		for (int h = 0; h < NHOOK; h++)
			tmp.link[h] = -1;
		tmp.slot = reg.slot;
		tmp.netns_cookie = reg.netns_cookie;
		snprintf(tmp.name, sizeof(tmp.name), "%s", name);
		w = &tmp;
	}
	/* Programs first (connects go direct again), then the state they read. */
	wl_release(c, w, true);
	for (unsigned i = 0; i < ZTUN_CAPTURE_NLSN; i++) {
		__u32 k = w->slot * ZTUN_CAPTURE_NLSN + i;

		bpf_map_delete_elem(c->fd_lsn, &k);
	}
	bpf_map_delete_elem(c->fd_ns, &w->netns_cookie);
	clear_skips(c, w->netns_cookie);
	snprintf(key.name, sizeof(key.name), "%s", name);
	bpf_map_delete_elem(c->fd_wl, &key);

	if (registry_count(c) == 0) {
		/* Nothing captured any more: the shared hook and the pins go too. */
		char pin[PATH_MAX + 64];
		DIR *d;
		struct dirent *e;

		snprintf(pin, sizeof(pin), "%s/engine_%llu", c->pin_dir,
			 (unsigned long long)c->engine_cg_id);
		drop_link(&c->engine_link, c->pinning ? pin : NULL);
		snprintf(pin, sizeof(pin), "%s/engineset_%llu", c->pin_dir,
			 (unsigned long long)c->engine_cg_id);
		drop_link(&c->engine_set_link, c->pinning ? pin : NULL);
		snprintf(pin, sizeof(pin), "%s/engineops_%llu", c->pin_dir,
			 (unsigned long long)c->engine_cg_id);
		drop_link(&c->engine_ops_link, c->pinning ? pin : NULL);
		if (c->pinning && (d = opendir(c->pin_dir))) {
			/* engine links of other cgroups (an earlier ztund elsewhere) */
			while ((e = readdir(d))) {
				if (strncmp(e->d_name, "engine", 6))
					continue;
				snprintf(pin, sizeof(pin), "%s/%s", c->pin_dir, e->d_name);
				int fd = -1;

				drop_link(&fd, pin);
			}
			closedir(d);
		}
		if (c->pinning) {
			unpin_maps(c);
			rmdir(c->pin_dir);
		}
	}
	return 0;
}

int ztun_capture_list(ztun_capture *c, char *buf, size_t len)
{
	struct ztun_cap_wl_key k, next;
	void *prev = NULL;
	size_t off = 0;
	int n = 0;

	if (!c || !buf || !len)
		return fail(ZTUN_EINVAL, "list: bad arguments");
	buf[0] = 0;
	while (bpf_map_get_next_key(c->fd_wl, prev, &next) == 0) {
		int w = snprintf(buf + off, len - off, "%.*s\n", ZTUN_CAP_NAME_MAX - 1, next.name);

		if (w < 0 || (size_t)w >= len - off)
			return fail(ZTUN_EFULL, "list: buffer too small");
		off += (size_t)w;
		n++;
		k = next;
		prev = &k;
	}
	return n;
}

/* ------------------------------------------------------------------ observation */

static const char *const stat_names[ZTUN_CAP_STAT_MAX] = {
	[ZTUN_CAP_STAT_REWRITE4] = "rewrite4",
	[ZTUN_CAP_STAT_REWRITE6] = "rewrite6",
	[ZTUN_CAP_STAT_SKIP_LOCAL] = "skip_local",
	[ZTUN_CAP_STAT_SKIP_PORT] = "skip_port",
	[ZTUN_CAP_STAT_SKIP_MARK] = "skip_mark",
	[ZTUN_CAP_STAT_STORE_ERR] = "store_error",
	[ZTUN_CAP_STAT_PAIR_STORED] = "pair_stored",
	[ZTUN_CAP_STAT_ORIG_HIT] = "original_dst_hit",
	[ZTUN_CAP_STAT_ORIG_MISS] = "original_dst_miss",
	[ZTUN_CAP_STAT_PEERNAME] = "getpeername",
	[ZTUN_CAP_STAT_IN_HBONE] = "in_hbone",
	[ZTUN_CAP_STAT_IN_PLAIN] = "in_plaintext",
	[ZTUN_CAP_STAT_IN_LOCAL] = "in_local",
	[ZTUN_CAP_STAT_IN_SKIP_PORT] = "in_skip_port",
	[ZTUN_CAP_STAT_IN_REFUSED] = "in_refused",
	[ZTUN_CAP_STAT_SRC_STORED] = "source_stored",
	[ZTUN_CAP_STAT_SRC_SHOWN] = "source_shown",
};

const char *ztun_capture_stat_name(unsigned idx)
{
	return idx < ZTUN_CAP_STAT_MAX ? stat_names[idx] : NULL;
}

int ztun_capture_stats(ztun_capture *c, uint64_t *out, size_t n)
{
	int ncpu = libbpf_num_possible_cpus();
	__u64 *vals;

	if (!c || !out)
		return fail(ZTUN_EINVAL, "stats: bad arguments");
	if (ncpu <= 0)
		return fail(ncpu ? ncpu : ZTUN_EINVAL, "stats: cpu count");
	vals = calloc(ncpu, sizeof(*vals));
	if (!vals)
		return fail(ZTUN_ENOMEM, "stats");
	for (size_t i = 0; i < n && i < ZTUN_CAP_STAT_MAX; i++) {
		__u32 k = i;

		out[i] = 0;
		if (bpf_map_lookup_elem(c->fd_stats, &k, vals) == 0)
			for (int cpu = 0; cpu < ncpu; cpu++)
				out[i] += vals[cpu];
	}
	free(vals);
	return 0;
}

/* ------------------------------------------------------------------ close */

void ztun_capture_close(ztun_capture *c)
{
	if (!c)
		return;
	if (c->wl) {
		for (uint32_t i = 0; i < c->cfg.max_workloads; i++)
			if (c->wl[i].used)
				wl_release(c, &c->wl[i], false);
		free(c->wl);
	}
	if (c->engine_link >= 0)
		close(c->engine_link);
	if (c->engine_set_link >= 0)
		close(c->engine_set_link);
	if (c->engine_ops_link >= 0)
		close(c->engine_ops_link);
	if (c->skel)
		ztun_capture_skel__destroy(c->skel);
	free(c);
}
