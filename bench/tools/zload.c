/* zload: TCP load generator for ztun's benchmarks (built on demand by bench/conftest.py).
 *
 *   zload server HOST:PORT [THREADS]             prints "READY <port>" once listening
 *   zload client HOST:PORT tput BYTES [WRITE]     single stream, WRITE-byte writes (1 MiB)
 *   zload client HOST:PORT pp COUNT [SIZE] [WARMUP]   SIZE-byte ping-pong (64 B)
 *   zload client HOST:PORT conns SECONDS [MAX]    sequential connect / 1-byte exchange / close
 *   zload client HOST:PORT cconns SECONDS THREADS the same from THREADS threads at once
 *   zload client HOST:PORT hold COUNT             open COUNT connections, 1-byte exchange on
 *                                                each, print a JSON line, keep them open
 *                                                until stdin closes (idle memory benchmark)
 *
 * HOST may be IPv4 or IPv6 ("[::1]:9000"). Each client prints one JSON line. The first
 * byte a client sends names the test: 'T' + u64 length (server reads it all, answers the
 * u64 count), 'P' + u32 count + u32 size (echo), 'C' (server answers 'c' and closes first,
 * so TIME_WAIT lands on the server side, not on the client's ephemeral ports), 'H' (server
 * answers 'h' and parks the connection in one epoll thread until the client closes it).
 * Nothing here depends on half-close: TLS relays that cannot carry it still work.
 * Every client socket has a send/receive timeout, so a stuck path fails instead of hanging. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BUFSZ (256 * 1024)
#define MAX_SAMPLES 2000000	/* bounds the latency arrays (16 MB) */

static int io_timeout_s = 30;	/* ZLOAD_TIMEOUT overrides */
static struct sockaddr_storage target;
static socklen_t target_len;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fail(const char *what)
{
	printf("{\"error\":\"%s: %s\"}\n", what, strerror(errno));
	exit(1);
}

static void parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
	char host[256];
	const char *port;
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV,
				  .ai_socktype = SOCK_STREAM }, *ai;

	if (s[0] == '[') {
		const char *e = strchr(s, ']');
		if (!e || e[1] != ':') { fprintf(stderr, "bad address %s\n", s); exit(2); }
		snprintf(host, sizeof(host), "%.*s", (int)(e - s - 1), s + 1);
		port = e + 2;
	} else {
		const char *c = strrchr(s, ':');
		if (!c) { fprintf(stderr, "bad address %s\n", s); exit(2); }
		snprintf(host, sizeof(host), "%.*s", (int)(c - s), s);
		port = c + 1;
	}
	if (getaddrinfo(host, port, &hints, &ai)) { fprintf(stderr, "bad address %s\n", s); exit(2); }
	memcpy(ss, ai->ai_addr, ai->ai_addrlen);
	*len = ai->ai_addrlen;
	freeaddrinfo(ai);
}

static void set_timeouts(int fd, int secs)
{
	struct timeval tv = { .tv_sec = secs };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
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
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		o += r;
	}
	return 0;
}

static int writen(int fd, const void *b, size_t n)
{
	size_t o = 0;
	while (o < n) {
		ssize_t r = send(fd, (const char *)b + o, n - o, MSG_NOSIGNAL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		o += r;
	}
	return 0;
}

static uint64_t get64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = v & 0xff;
}

static int connect_target(void)
{
	int fd = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	set_timeouts(fd, io_timeout_s);
	if (connect(fd, (struct sockaddr *)&target, target_len)) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	nodelay(fd);
	return fd;
}

/* Idle-connection runs hold thousands of sockets: use the whole hard limit. */
static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* ------------------------------------------------------------------ server */
static int lfd;
static int holdfd = -1;	/* epoll of parked ('H') connections */

/* Parked connections cost no thread: one epoll waits for their clients to close them. */
static void *holder_thread(void *arg)
{
	struct epoll_event evs[256];
	char b[512];
	(void)arg;
	for (;;) {
		int n = epoll_wait(holdfd, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			ssize_t r = recv(fd, b, sizeof(b), MSG_DONTWAIT);
			if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
				close(fd);
		}
	}
	return NULL;
}

/* Returns 1 when the connection was parked (the caller must not close it). */
static int serve(int fd, char *buf)
{
	unsigned char h[9];
	nodelay(fd);
	set_timeouts(fd, 120);	/* a vanished client frees its thread */
	if (readn(fd, h, 1))
		return 0;
	if (h[0] == 'H') {
		struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = fd };
		if (writen(fd, "h", 1) || epoll_ctl(holdfd, EPOLL_CTL_ADD, fd, &ev))
			return 0;
		return 1;
	}
	if (h[0] == 'C') {
		writen(fd, "c", 1);
	} else if (h[0] == 'T') {
		uint64_t left, got = 0;
		if (readn(fd, h + 1, 8))
			return 0;
		left = get64(h + 1);
		while (left) {
			ssize_t r = recv(fd, buf, left < BUFSZ ? left : BUFSZ, 0);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				break;
			left -= r;
			got += r;
		}
		put64(h, got);
		writen(fd, h, 8);
		while (recv(fd, buf, BUFSZ, 0) > 0)	/* until the client closes */
			;
	} else if (h[0] == 'P') {
		unsigned char p[8];
		uint32_t count, size;
		if (readn(fd, p, 8))
			return 0;
		count = ntohl(*(uint32_t *)p);
		size = ntohl(*(uint32_t *)(p + 4));
		if (size > BUFSZ)
			return 0;
		for (uint32_t i = 0; i < count; i++)
			if (readn(fd, buf, size) || writen(fd, buf, size))
				break;
		while (recv(fd, buf, BUFSZ, 0) > 0)
			;
	}
	return 0;
}

static void *server_thread(void *arg)
{
	char *buf = malloc(BUFSZ);
	(void)arg;
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				usleep(10000);
				continue;
			}
			perror("accept");
			exit(1);
		}
		if (!serve(fd, buf))
			close(fd);
	}
	return NULL;
}

static int server(const char *addr, int nthreads)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int one = 1;
	char host[64];

	parse_addr(addr, &ss, &len);
	raise_nofile();
	holdfd = epoll_create1(EPOLL_CLOEXEC);
	if (holdfd < 0)
		fail("epoll");
	{
		pthread_t t;
		pthread_create(&t, NULL, holder_thread, NULL);
		pthread_detach(t);
	}
	lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&ss, len) || listen(lfd, 4096))
		fail("listen");
	len = sizeof(ss);
	getsockname(lfd, (struct sockaddr *)&ss, &len);
	(void)host;
	printf("READY %d\n", ntohs(ss.ss_family == AF_INET6 ?
				     ((struct sockaddr_in6 *)&ss)->sin6_port :
				     ((struct sockaddr_in *)&ss)->sin_port));
	fflush(stdout);
	for (int i = 1; i < nthreads; i++) {
		pthread_t t;
		pthread_attr_t at;
		pthread_attr_init(&at);
		pthread_attr_setstacksize(&at, 256 * 1024);
		pthread_create(&t, &at, server_thread, NULL);
		pthread_detach(t);
	}
	server_thread(NULL);
	return 0;
}

/* ------------------------------------------------------------------ client */
static int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
	size_t i = (size_t)(p * (n - 1) + 0.5);
	return n ? v[i < n ? i : n - 1] : 0;
}

static int tput(uint64_t total, size_t wsize)
{
	unsigned char h[9] = { 'T' }, ack[8];
	char *buf = malloc(wsize);
	uint64_t left = total;
	int fd;
	double t0, tw, t;

	memset(buf, 0x5a, wsize);
	put64(h + 1, total);
	fd = connect_target();
	if (fd < 0)
		fail("connect");
	t0 = now();
	if (writen(fd, h, 9))
		fail("send header");
	while (left) {
		size_t n = left < wsize ? left : wsize;
		if (writen(fd, buf, n))
			fail("send");
		left -= n;
	}
	tw = now() - t0;
	if (readn(fd, ack, 8))
		fail("ack");
	t = now() - t0;
	close(fd);
	if (get64(ack) != total) {
		printf("{\"error\":\"ack %llu of %llu bytes\"}\n", (unsigned long long)get64(ack),
		       (unsigned long long)total);
		return 1;
	}
	printf("{\"mode\":\"tput\",\"bytes\":%llu,\"write_size\":%zu,\"write_secs\":%.6f,"
	       "\"secs\":%.6f,\"gbps\":%.4f}\n",
	       (unsigned long long)total, wsize, tw, t, total * 8 / t / 1e9);
	return 0;
}

static int pingpong(uint32_t count, uint32_t size, uint32_t warm)
{
	unsigned char h[9] = { 'P' };
	uint32_t n = count + warm;
	double *lat = calloc(count ? count : 1, sizeof(double)), sum = 0, t0;
	char *buf = calloc(1, size ? size : 1);
	int fd;

	if (size == 0 || size > BUFSZ || count == 0 || count > MAX_SAMPLES) {
		printf("{\"error\":\"bad pp arguments\"}\n");
		return 2;
	}
	*(uint32_t *)(h + 1) = htonl(n);
	*(uint32_t *)(h + 5) = htonl(size);
	fd = connect_target();
	if (fd < 0)
		fail("connect");
	if (writen(fd, h, 9))
		fail("send header");
	for (uint32_t i = 0; i < n; i++) {
		t0 = now();
		if (writen(fd, buf, size) || readn(fd, buf, size))
			fail("ping-pong");
		if (i >= warm)
			lat[i - warm] = (now() - t0) * 1e6;
	}
	close(fd);
	for (uint32_t i = 0; i < count; i++)
		sum += lat[i];
	qsort(lat, count, sizeof(double), cmpd);
	printf("{\"mode\":\"pp\",\"count\":%u,\"size\":%u,\"p50_us\":%.2f,\"p90_us\":%.2f,"
	       "\"p99_us\":%.2f,\"mean_us\":%.2f,\"min_us\":%.2f,\"max_us\":%.2f}\n",
	       count, size, pct(lat, count, 0.5), pct(lat, count, 0.9), pct(lat, count, 0.99),
	       sum / count, lat[0], lat[count - 1]);
	return 0;
}

/* One connection: connect, 'C', expect 'c', then the server's FIN, close. */
static int one_conn(void)
{
	char c;
	int fd = connect_target();
	if (fd < 0)
		return -1;
	if (writen(fd, "C", 1) || readn(fd, &c, 1) || c != 'c') {
		close(fd);
		return -2;
	}
	/* wait for the server's FIN, so that the client never holds TIME_WAIT */
	while (recv(fd, &c, 1, 0) > 0)
		;
	close(fd);
	return 0;
}

struct conn_job {
	double secs;
	uint64_t max, ok, errors;
	double *lat;
	size_t nlat, cap;
};

static void *conn_loop(void *arg)
{
	struct conn_job *j = arg;
	double start = now(), end = start + j->secs;
	while (j->ok + j->errors < j->max) {
		double t0 = now();
		if (t0 >= end)
			break;
		if (one_conn() == 0) {
			j->ok++;
			if (j->nlat < j->cap)
				j->lat[j->nlat++] = (now() - t0) * 1e6;
		} else {
			j->errors++;
			if (j->errors > 1000 && j->errors > j->ok)	/* a dead path: stop early */
				break;
		}
	}
	return NULL;
}

static int conns(double secs, uint64_t max, int nthreads, const char *mode)
{
	struct conn_job *jobs = calloc(nthreads, sizeof(*jobs));
	pthread_t *ts = calloc(nthreads, sizeof(*ts));
	uint64_t ok = 0, errors = 0;
	size_t nlat = 0;
	double t0, t, *all;

	for (int i = 0; i < nthreads; i++) {
		jobs[i].secs = secs;
		jobs[i].max = max / nthreads + 1;
		jobs[i].cap = MAX_SAMPLES / nthreads;
		jobs[i].lat = malloc(jobs[i].cap * sizeof(double));
	}
	t0 = now();
	for (int i = 0; i < nthreads; i++)
		pthread_create(&ts[i], NULL, conn_loop, &jobs[i]);
	for (int i = 0; i < nthreads; i++)
		pthread_join(ts[i], NULL);
	t = now() - t0;
	for (int i = 0; i < nthreads; i++) {
		ok += jobs[i].ok;
		errors += jobs[i].errors;
		nlat += jobs[i].nlat;
	}
	all = malloc((nlat ? nlat : 1) * sizeof(double));
	nlat = 0;
	for (int i = 0; i < nthreads; i++) {
		memcpy(all + nlat, jobs[i].lat, jobs[i].nlat * sizeof(double));
		nlat += jobs[i].nlat;
	}
	qsort(all, nlat, sizeof(double), cmpd);
	printf("{\"mode\":\"%s\",\"threads\":%d,\"conns\":%llu,\"errors\":%llu,\"secs\":%.4f,"
	       "\"conns_per_s\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f}\n",
	       mode, nthreads, (unsigned long long)ok, (unsigned long long)errors, t, ok / t,
	       pct(all, nlat, 0.5), pct(all, nlat, 0.99));
	return ok ? 0 : 1;
}

/* Open COUNT connections ('H', expect 'h') from HOLD_THREADS threads, report, keep them
 * open until stdin closes. */
#define HOLD_THREADS 8
struct hold_job {
	int *fds;
	uint32_t want, ok, errors;
};

static void *hold_loop(void *arg)
{
	struct hold_job *j = arg;
	char c;
	while (j->ok < j->want) {
		int fd = connect_target();
		if (fd < 0 || writen(fd, "H", 1) || readn(fd, &c, 1) || c != 'h') {
			if (fd >= 0)
				close(fd);
			if (++j->errors > 100 && j->errors > j->ok)
				break;
			continue;
		}
		j->fds[j->ok++] = fd;
	}
	return NULL;
}

static int hold(uint32_t count)
{
	struct hold_job jobs[HOLD_THREADS];
	pthread_t ts[HOLD_THREADS];
	uint32_t ok = 0, errors = 0;
	double t0 = now();
	char line[64];

	raise_nofile();
	for (int i = 0; i < HOLD_THREADS; i++) {
		jobs[i].want = count / HOLD_THREADS + (i < (int)(count % HOLD_THREADS));
		jobs[i].fds = calloc(jobs[i].want + 1, sizeof(int));
		jobs[i].ok = jobs[i].errors = 0;
		pthread_create(&ts[i], NULL, hold_loop, &jobs[i]);
	}
	for (int i = 0; i < HOLD_THREADS; i++) {
		pthread_join(ts[i], NULL);
		ok += jobs[i].ok;
		errors += jobs[i].errors;
	}
	printf("{\"mode\":\"hold\",\"conns\":%u,\"errors\":%u,\"secs\":%.4f}\n", ok, errors,
	       now() - t0);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin))	/* until stdin closes */
		;
	for (int i = 0; i < HOLD_THREADS; i++)
		for (uint32_t k = 0; k < jobs[i].ok; k++)
			close(jobs[i].fds[k]);
	return ok == count ? 0 : 1;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (getenv("ZLOAD_TIMEOUT"))
		io_timeout_s = atoi(getenv("ZLOAD_TIMEOUT"));
	if (argc >= 3 && !strcmp(argv[1], "server"))
		return server(argv[2], argc > 3 ? atoi(argv[3]) : 64);
	if (argc >= 5 && !strcmp(argv[1], "client")) {
		parse_addr(argv[2], &target, &target_len);
		if (!strcmp(argv[3], "tput"))
			return tput(strtoull(argv[4], 0, 0), argc > 5 ? strtoul(argv[5], 0, 0) : 1 << 20);
		if (!strcmp(argv[3], "pp"))
			return pingpong(strtoul(argv[4], 0, 0), argc > 5 ? strtoul(argv[5], 0, 0) : 64,
					argc > 6 ? strtoul(argv[6], 0, 0) : 500);
		if (!strcmp(argv[3], "conns"))
			return conns(atof(argv[4]), argc > 5 ? strtoull(argv[5], 0, 0) : 1000000, 1,
				     "conns");
		if (!strcmp(argv[3], "hold"))
			return hold(strtoul(argv[4], 0, 0));
		if (!strcmp(argv[3], "cconns"))
			return conns(atof(argv[4]), 1000000, argc > 5 ? atoi(argv[5]) : 4, "cconns");
	}
	fprintf(stderr, "usage: see the comment at the top of zload.c\n");
	return 2;
}
