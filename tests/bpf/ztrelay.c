/* ztrelay - stand-in for ztun's engine in the eBPF tests and benchmarks (not installed).
 *
 *   ztrelay server IP:PORT                          sink / ping-pong server; greets with 'R'
 *   ztrelay client IP:PORT tput BYTES CHUNK [nowait] -> one JSON line
 *   ztrelay client IP:PORT pp COUNT SIZE [WARMUP]   -> one JSON line
 *       The client waits for the greeting before it sends (nowait: it sends at once, a
 *       client that speaks first and never pauses).
 *   ztrelay relay LISTEN TARGET [options]           copy relay, one poll() loop per connection
 *       --bpf CGROUP      load ztun's programs, attach to CGROUP, register LISTEN, mark the
 *                         outgoing sockets (hop acceleration both sides)
 *       --no-hop          ... but without hop acceleration
 *       --pairs           pair every connection (same-node shortcut) once connected
 *       --pair-delay-us N pair only after N us (random in [0,N] with --jitter)
 *       --flap-us N       then alternate pair_del / pair_add every N us (random with --jitter)
 *       --cap BYTES       ingress cap (default 4 MiB or the receiver's SO_RCVBUF)
 *       --mark N          SO_MARK of the relay's outgoing sockets (default ztun's); loaders
 *                         sharing a cgroup need distinct marks
 *       --linger0         SO_LINGER {1,0} on every relayed socket (pair_add does it anyway)
 *   SIGUSR1 makes the relay end every connection the way a policy change would: pair_del,
 *   then reset both sides. The relay prints "READY" once listening and one JSON line per
 *   finished connection.
 *
 * The relay keeps the engine's side of the pair protocol (include/ztun/bpf.h): busy before
 * every recv(), not busy once everything read has been sent; recv()/send() only.
 * Built by the tests with: cc -O2 -pthread ztrelay.c -I src/include -L DIR -lztun_bpf
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ztun/bpf.h"

#define MAGIC 0x7a74756e
#define BUFSZ (256 * 1024) /* relay buffer per direction, as the probes' relays */

struct hdr {
	uint32_t magic, type;
	uint64_t arg;
};

static void die(const char *m)
{
	perror(m);
	exit(1);
}

static void parse(const char *s, struct sockaddr_in *a)
{
	char ip[64];
	const char *c = strrchr(s, ':');

	if (!c) {
		fprintf(stderr, "bad address %s\n", s);
		exit(2);
	}
	memset(a, 0, sizeof(*a));
	snprintf(ip, sizeof(ip), "%.*s", (int)(c - s), s);
	a->sin_family = AF_INET;
	a->sin_port = htons(atoi(c + 1));
	if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) {
		fprintf(stderr, "bad ip %s\n", ip);
		exit(2);
	}
}

static void nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int readn(int fd, void *b, size_t n)
{
	size_t o = 0;

	while (o < n) {
		ssize_t r = recv(fd, (char *)b + o, n - o, 0);

		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			return -1;
		}
		o += r;
	}
	return 0;
}

static int writen(int fd, const void *b, size_t n)
{
	size_t o = 0;

	while (o < n) {
		ssize_t r = send(fd, (const char *)b + o, n - o, MSG_NOSIGNAL);

		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			return -1;
		}
		o += r;
	}
	return 0;
}

static int listen_on(const char *s)
{
	struct sockaddr_in a;
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	parse(s, &a);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (void *)&a, sizeof(a)))
		die("bind");
	if (listen(fd, 1024))
		die("listen");
	return fd;
}

static int connect_to(const char *s, uint32_t mark)
{
	struct sockaddr_in a;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	parse(s, &a);
	if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)))
		die("SO_MARK");
	if (connect(fd, (void *)&a, sizeof(a))) {
		close(fd);
		return -1;
	}
	nodelay(fd);
	return fd;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ server */

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	struct hdr h;
	char *buf = malloc(BUFSZ);

	nodelay(fd);
	if (writen(fd, "R", 1) || readn(fd, &h, sizeof(h)) || h.magic != MAGIC)
		goto out;
	if (h.type == 1) { /* tput: read arg bytes, answer with the count */
		uint64_t left = h.arg, got = 0;

		while (left) {
			ssize_t r = recv(fd, buf, left < BUFSZ ? left : BUFSZ, 0);

			if (r <= 0)
				break;
			left -= r;
			got += r;
		}
		writen(fd, &got, 8);
	} else if (h.type == 2) { /* ping-pong: count echoes of size bytes */
		uint32_t size = h.arg >> 32, count = (uint32_t)h.arg;

		for (uint32_t i = 0; i < count; i++)
			if (readn(fd, buf, size) || writen(fd, buf, size))
				break;
	}
	while (recv(fd, buf, BUFSZ, 0) > 0)
		;
out:
	free(buf);
	close(fd);
	return NULL;
}

static void accept_loop(int lfd, void *(*fn)(void *))
{
	for (;;) {
		int c = accept(lfd, NULL, NULL);
		pthread_t t;

		if (c < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		pthread_create(&t, NULL, fn, (void *)(intptr_t)c);
		pthread_detach(t);
	}
}

/* ------------------------------------------------------------------ client */

static int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int client(int argc, char **argv)
{
	int fd = connect_to(argv[2], 0);
	struct hdr h = { MAGIC, 0, 0 };
	bool nowait = !strcmp(argv[3], "tput") && argc > 6 && !strcmp(argv[6], "nowait");
	char r = 0;

	if (fd < 0)
		die("connect");
	if (!nowait && (readn(fd, &r, 1) || r != 'R'))
		die("greeting");
	if (!strcmp(argv[3], "tput")) {
		uint64_t total = strtoull(argv[4], 0, 0), left = total, ack = 0;
		size_t chunk = strtoul(argv[5], 0, 0);
		char *buf = malloc(chunk);
		double t0;

		memset(buf, 0x5a, chunk);
		h.type = 1;
		h.arg = total;
		t0 = now();
		if (writen(fd, &h, sizeof(h)))
			die("hdr");
		while (left) {
			size_t n = left < chunk ? left : chunk;

			if (writen(fd, buf, n))
				die("send");
			left -= n;
		}
		if (nowait && (readn(fd, &r, 1) || r != 'R'))
			die("greeting");
		if (readn(fd, &ack, 8))
			die("ack");
		double t = now() - t0;

		printf("{\"bytes\":%" PRIu64 ",\"secs\":%.6f,\"gbps\":%.3f}\n", total, t,
		       total * 8 / t / 1e9);
		if (ack != total) {
			fprintf(stderr, "ack mismatch %" PRIu64 " != %" PRIu64 "\n", ack, total);
			return 1;
		}
	} else {
		uint32_t count = atoi(argv[4]), size = atoi(argv[5]);
		uint32_t warm = argc > 6 ? atoi(argv[6]) : 1000;
		double *lat = calloc(count, sizeof(double)), sum = 0;
		char *buf = calloc(1, size);

		h.type = 2;
		h.arg = ((uint64_t)size << 32) | (count + warm);
		if (writen(fd, &h, sizeof(h)))
			die("hdr");
		for (uint32_t i = 0; i < count + warm; i++) {
			double t0 = now();

			if (writen(fd, buf, size) || readn(fd, buf, size))
				die("pp");
			if (i >= warm)
				lat[i - warm] = (now() - t0) * 1e6;
		}
		for (uint32_t i = 0; i < count; i++)
			sum += lat[i];
		qsort(lat, count, sizeof(double), cmpd);
		printf("{\"p50_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f}\n", lat[count / 2],
		       lat[(size_t)(count * 0.99)], sum / count);
	}
	shutdown(fd, SHUT_WR);
	close(fd);
	return 0;
}

/* ------------------------------------------------------------------ relay */

static const char *target;
static ztun_bpf *acc;
/* Per-connection calls go through the table, as the engine makes them (it gets the handle
 * and the table from Python and never links libztun_bpf). */
static const struct ztun_bpf_api *api;
static bool opt_pairs, opt_jitter, opt_linger0;
static long opt_pair_delay_us, opt_flap_us;
static volatile sig_atomic_t abort_all;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long conn_seq;

struct dir {
	int from, to;
	char *buf;
	size_t off, len;
	bool eof, shut;
	uint64_t relayed;
};

static long rnd_us(long max, unsigned *seed)
{
	if (!opt_jitter || max <= 0)
		return max;
	return (long)(rand_r(seed) % (unsigned)(max + 1));
}

static void set_busy(uint64_t pid, unsigned d, int busy)
{
	if (pid)
		api->relay_busy(acc, pid, d, busy);
}

/* Push what is buffered; true when the buffer is empty. */
static bool flush(struct dir *d, int *err)
{
	while (d->off < d->len) {
		ssize_t m = send(d->to, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (m < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return false;
			*err = errno;
			return false;
		}
		d->off += m;
		d->relayed += m;
	}
	d->off = d->len = 0;
	return true;
}

static void abort_conn(int a, int b)
{
	struct linger lg = { 1, 0 };

	setsockopt(a, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

static void *relay_conn(void *arg)
{
	int a = (int)(intptr_t)arg, b, err = 0;
	unsigned seed = (unsigned)(uintptr_t)arg ^ (unsigned)time(NULL);
	struct dir d[2] = {};
	uint64_t pid = 0, direct[2] = { 0, 0 };
	unsigned pairs = 0, pair_errs = 0, unpairs = 0, pair_retries = 0;
	double next_toggle = 1e300;
	char why[160] = "";

	nodelay(a);
	b = connect_to(target, acc ? api->mark(acc) : 0);
	if (b < 0) {
		close(a);
		return NULL;
	}
	if (opt_linger0) {
		struct linger lg = { 1, 0 };

		setsockopt(a, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	fcntl(a, F_SETFL, O_NONBLOCK);
	fcntl(b, F_SETFL, O_NONBLOCK);
	d[0].from = a, d[0].to = b;
	d[1].from = b, d[1].to = a;
	d[0].buf = malloc(BUFSZ);
	d[1].buf = malloc(BUFSZ);
	if (acc && opt_pairs)
		next_toggle = now() + rnd_us(opt_pair_delay_us, &seed) * 1e-6;

	while (!(d[0].eof && d[0].shut && d[1].eof && d[1].shut) && !err) {
		struct pollfd p[2] = { { a, 0, 0 }, { b, 0, 0 } };
		double t = now();
		int timeout = 50; /* ms: also how fast SIGUSR1 (abort_all) is noticed */

		if (abort_all) {
			err = ECONNABORTED;
			break;
		}
		if (t >= next_toggle && !pid && (d[0].eof || d[1].eof)) {
			/* Half-closed already: not worth a pair (it could still carry the
			 * other direction, but the peer may be gone: pair_add would fail). */
			next_toggle = 1e300;
		} else if (t >= next_toggle) {
			if (!pid) {
				int rc = api->pair_add(acc, a, b, 0, &pid);

				if (rc == 0) {
					pairs++;
					/* Busy exactly while a direction holds bytes. */
					set_busy(pid, 0, d[0].len > 0);
					set_busy(pid, 1, d[1].len > 0);
				} else if (rc == -EAGAIN && ++pair_retries < 200) {
					pid = 0; /* app side not there yet: again in 1 ms */
					next_toggle = t + 1e-3;
					continue;
				} else {
					pair_errs++;
					snprintf(why, sizeof(why), "%s", ztun_bpf_last_error());
					pid = 0;
				}
			} else {
				struct ztun_bpf_pair_stats st;

				if (api->pair_del(acc, pid, &st) == 0) {
					direct[0] += st.direct_bytes[0];
					direct[1] += st.direct_bytes[1];
				}
				pid = 0;
				unpairs++;
			}
			next_toggle = opt_flap_us ? t + rnd_us(opt_flap_us, &seed) * 1e-6 : 1e300;
		}
		if (next_toggle < 1e299) {
			double ms = (next_toggle - t) * 1e3;

			if (ms < timeout)
				timeout = ms < 0 ? 0 : (int)ms + 1;
		}
		for (int i = 0; i < 2; i++) {
			if (!d[i].eof && !d[i].len)
				p[i].events |= POLLIN; /* from-socket of direction i is p[i] */
			if (d[i].len)
				p[1 - i].events |= POLLOUT;
		}
		if (poll(p, 2, timeout) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		for (int i = 0; i < 2 && !err; i++) {
			struct dir *x = &d[i];

			if (x->len && (p[1 - i].revents & (POLLOUT | POLLERR | POLLHUP))) {
				if (flush(x, &err))
					set_busy(pid, i, 0);
			}
			if (x->eof || x->len || !(p[i].revents & (POLLIN | POLLERR | POLLHUP | POLLRDHUP)))
				continue;
			/* The protocol: busy before the read ... */
			set_busy(pid, i, 1);
			ssize_t n = recv(x->from, x->buf, BUFSZ, MSG_DONTWAIT);

			if (n > 0) {
				x->len = n;
				x->off = 0;
				/* ... and not busy once all of it has been handed to send(). */
				if (flush(x, &err))
					set_busy(pid, i, 0);
			} else if (n == 0) {
				x->eof = true;
				set_busy(pid, i, 0);
			} else if (errno == EAGAIN || errno == EINTR) {
				set_busy(pid, i, 0);
			} else {
				err = errno;
			}
		}
		/* Forward FIN once the direction's buffer is empty. */
		for (int i = 0; i < 2; i++) {
			if (d[i].eof && !d[i].len && !d[i].shut) {
				shutdown(d[i].to, SHUT_WR);
				d[i].shut = true;
			}
		}
	}
	if (pid) {
		struct ztun_bpf_pair_stats st;

		if (api->pair_del(acc, pid, &st) == 0) {
			direct[0] += st.direct_bytes[0];
			direct[1] += st.direct_bytes[1];
		}
	}
	if (err) { /* an error on one side resets the other: no silent truncation */
		abort_conn(a, b);
	} else {
		/* Graceful end: SO_LINGER {1,0} (pair_add's, or --linger0) would turn close()
		 * into a RST that discards what is still in our send queues. */
		struct linger lg = { 0, 0 };

		setsockopt(a, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	close(a);
	close(b);
	pthread_mutex_lock(&out_lock);
	printf("{\"conn\":%lu,\"relayed\":[%" PRIu64 ",%" PRIu64 "],\"direct\":[%" PRIu64
	       ",%" PRIu64 "],\"pairs\":%u,\"unpairs\":%u,\"pair_errors\":%u,\"error\":%d,"
	       "\"why\":\"%s\"}\n",
	       ++conn_seq, d[0].relayed, d[1].relayed, direct[0], direct[1], pairs, unpairs,
	       pair_errs, err, why);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
	free(d[0].buf);
	free(d[1].buf);
	return NULL;
}

static void on_usr1(int sig)
{
	abort_all = 1;
}

static void on_term(int sig)
{
	/* Exit through close(): links go, pairs end. Global counters go to stderr first. */
	if (acc) {
		uint64_t v[ZTUN_BPF_NSTATS];

		if (ztun_bpf_stats(acc, v, ZTUN_BPF_NSTATS) == 0)
			for (unsigned i = 0; i < ZTUN_BPF_NSTATS; i++)
				fprintf(stderr, "%s=%" PRIu64 "%c", ztun_bpf_stat_name(i), v[i],
					i + 1 < ZTUN_BPF_NSTATS ? ' ' : '\n');
		ztun_bpf_close(acc);
	}
	_exit(0);
}

static int relay(int argc, char **argv)
{
	struct ztun_bpf_config cfg = {};
	const char *cgroup = NULL;
	int l;

	target = argv[3];
	for (int i = 4; i < argc; i++) {
		if (!strcmp(argv[i], "--bpf") && i + 1 < argc)
			cgroup = argv[++i];
		else if (!strcmp(argv[i], "--no-hop"))
			cfg.flags |= ZTUN_BPF_F_NO_HOP;
		else if (!strcmp(argv[i], "--pairs"))
			opt_pairs = true;
		else if (!strcmp(argv[i], "--jitter"))
			opt_jitter = true;
		else if (!strcmp(argv[i], "--linger0"))
			opt_linger0 = true;
		else if (!strcmp(argv[i], "--pair-delay-us") && i + 1 < argc)
			opt_pair_delay_us = atol(argv[++i]);
		else if (!strcmp(argv[i], "--flap-us") && i + 1 < argc)
			opt_flap_us = atol(argv[++i]);
		else if (!strcmp(argv[i], "--mark") && i + 1 < argc)
			cfg.mark = (uint32_t)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--cap") && i + 1 < argc)
			cfg.ingress_cap = (uint32_t)atol(argv[++i]);
		else {
			fprintf(stderr, "unknown relay option %s\n", argv[i]);
			return 2;
		}
	}
	l = listen_on(argv[2]);
	api = ztun_bpf_api();
	if (api->abi != ZTUN_BPF_API_ABI || api->size < sizeof(*api)) {
		fprintf(stderr, "libztun_bpf API %u/%u, built for %u\n", api->abi, api->size,
			ZTUN_BPF_API_ABI);
		return 1;
	}
	if (cgroup) {
		int err = ztun_bpf_open(&cfg, &acc);

		if (!err)
			err = ztun_bpf_attach_cgroup(acc, cgroup);
		if (!err)
			err = ztun_bpf_add_listener(acc, l);
		if (err) {
			char log[4096];

			ztun_bpf_log_read(log, sizeof(log));
			fprintf(stderr, "bpf: %s\n%s", ztun_bpf_last_error(), log);
			return 1;
		}
	}
	signal(SIGUSR1, on_usr1);
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	printf("READY\n");
	fflush(stdout);
	accept_loop(l, relay_conn);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 3 && !strcmp(argv[1], "server")) {
		int l = listen_on(argv[2]);

		printf("READY\n");
		fflush(stdout);
		accept_loop(l, serve);
	} else if (argc >= 6 && !strcmp(argv[1], "client")) {
		return client(argc, argv);
	} else if (argc >= 4 && !strcmp(argv[1], "relay")) {
		return relay(argc, argv);
	}
	fprintf(stderr, "usage: see the comment at the top of ztrelay.c\n");
	return 2;
}
