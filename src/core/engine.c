/* The engine: worker threads, their command queues, listeners, counters, events.
 *
 * Threads: the caller's thread (Python, holding no lock of ours across calls) only
 * creates sockets, enqueues commands and reads counters/events. Each worker runs
 * worker_main(): epoll_wait, then accepts, relays, runs commands, fires timers. A
 * connection lives and dies on the worker that accepted it, so connection state is
 * never shared between threads.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <sys/random.h>

#include "conn.h"
#include "engine_int.h"
#include "tls_int.h"
#include "ztun/policy.h"

/* Timers (connect, handshake, idle, drain) fire from a tick of this period. */
#define TICK_NS (100ull * 1000 * 1000)
/* Back-off when accept() runs out of file descriptors. */
#define EMFILE_BACKOFF_NS (100ull * 1000 * 1000)
#define MAX_EVENTS 256

uint64_t ztun_now_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ztun_now_precise(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t ztun_now_real(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

const char *ztun_close_reason_name(int reason)
{
	static const char *const names[ZTUN_CLOSE__COUNT] = {
		[ZTUN_CLOSE_OK] = "ok",
		[ZTUN_CLOSE_RESET_DOWN] = "reset_by_downstream",
		[ZTUN_CLOSE_RESET_UP] = "reset_by_upstream",
		[ZTUN_CLOSE_CONNECT_REFUSED] = "connect_refused",
		[ZTUN_CLOSE_CONNECT_TIMEOUT] = "connect_timeout",
		[ZTUN_CLOSE_CONNECT_ERROR] = "connect_error",
		[ZTUN_CLOSE_IDLE_TIMEOUT] = "idle_timeout",
		[ZTUN_CLOSE_HANDSHAKE_TIMEOUT] = "handshake_timeout",
		[ZTUN_CLOSE_TLS_ERROR] = "tls_error",
		[ZTUN_CLOSE_POLICY_DENIED] = "policy_denied",
		[ZTUN_CLOSE_POLICY_CHANGED] = "policy_changed",
		[ZTUN_CLOSE_SHUTDOWN] = "shutdown",
		[ZTUN_CLOSE_IO_ERROR] = "io_error",
		[ZTUN_CLOSE_PROTOCOL] = "protocol_error",
		[ZTUN_CLOSE_UPSTREAM_STATUS] = "upstream_status",
		[ZTUN_CLOSE_NO_MEMORY] = "no_memory",
	};
	if (reason < 0 || reason >= ZTUN_CLOSE__COUNT)
		return "unknown";
	return names[reason];
}

/* ---- listeners ---------------------------------------------------------- */

void zlistener_get(struct zlistener *l)
{
	atomic_fetch_add_explicit(&l->refs, 1, memory_order_relaxed);
}

void zlistener_put(struct zlistener *l)
{
	if (atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (l->fd >= 0)
		close(l->fd);
	ztun_tls_ctx_free(l->tls);
	ztls_expect_put(l->expect);
	ztls_slot_destroy(&l->slot);
	free(l->baggage);
	free(l->workload_ips);
	free(l->workload_key);
	pthread_mutex_destroy(&l->tls_lock);
	free(l);
}

/* ---- events ------------------------------------------------------------- */

void zworker_wake_consumer(struct zworker *w)
{
	struct ztun_engine *e = w->e;

	/* Only the first event after the consumer armed the fd pays for a write(). */
	if (atomic_exchange_explicit(&e->ev_armed, 0, memory_order_acq_rel)) {
		uint64_t one = 1;
		ssize_t r = write(e->evfd, &one, sizeof(one));
		(void)r;
	}
}

void zworker_emit_log(struct zworker *w, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int n;

	if (!(atomic_load_explicit(&w->e->events, memory_order_relaxed) & ZTUN_EVMASK_LOG))
		return;
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(msg))
		n = sizeof(msg) - 1;

	uint32_t len = zring_align((uint32_t)(sizeof(struct ztun_event_log) + (size_t)n));
	struct ztun_event_log *ev = zring_reserve(&w->ring, len);

	if (!ev)
		return;
	memset(ev, 0, sizeof(*ev));
	ev->h.len = len;
	ev->h.type = ZTUN_EV_LOG;
	ev->h.worker = (uint16_t)w->idx;
	ev->level = (uint16_t)level;
	ev->msg_len = (uint16_t)n;
	memcpy(ev + 1, msg, (size_t)n);
	zring_commit(&w->ring, len);
	zworker_wake_consumer(w);
}

int ztun_engine_event_fd(const ztun_engine *e)
{
	return e->evfd;
}

int ztun_engine_read_events(ztun_engine *e, void *buf, size_t len, size_t *used)
{
	size_t n = 0;
	uint64_t junk;
	ssize_t r;

	pthread_mutex_lock(&e->ev_lock);
	r = read(e->evfd, &junk, sizeof(junk)); /* reset the counter; EAGAIN is fine */
	(void)r;
	for (int i = 0; i < e->nworkers; i++) {
		/* Rotate the starting worker so a busy one cannot starve the others. */
		struct zworker *w = &e->workers[(e->ev_next + i) % e->nworkers];

		n += zring_drain(&w->ring, (char *)buf + n, len - n);
	}
	e->ev_next = (e->ev_next + 1) % e->nworkers;
	pthread_mutex_unlock(&e->ev_lock);
	*used = n;
	return 0;
}

int ztun_engine_arm_events(ztun_engine *e)
{
	atomic_store_explicit(&e->ev_armed, 1, memory_order_seq_cst);
	for (int i = 0; i < e->nworkers; i++) {
		if (!zring_empty(&e->workers[i].ring))
			return 1;
	}
	return 0;
}

/* ---- commands ----------------------------------------------------------- */

static void sync_done(struct zsync *s, int rc)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->mu);
	if (rc && !s->rc)
		s->rc = rc;
	if (--s->pending == 0)
		pthread_cond_broadcast(&s->cv);
	pthread_mutex_unlock(&s->mu);
}

static void cmd_refuse(struct zcmd *c)
{
	if (c->type == CMD_ADOPT) {
		close(c->u.adopt.fd);
		zlistener_put(c->u.adopt.l);
	}
	if (c->type == CMD_SET_POLICY)
		zpolicy_put(c->u.policy); /* the reference taken for this worker */
	sync_done(c->sync, ZTUN_ECLOSED);
	free(c);
}

static void worker_enqueue(struct zworker *w, struct zcmd *c)
{
	uint64_t one = 1;
	ssize_t r;

	c->next = NULL;
	pthread_mutex_lock(&w->qlock);
	if (w->exited) {
		/* Nobody will run it: complete it now so no caller waits forever. */
		pthread_mutex_unlock(&w->qlock);
		cmd_refuse(c);
		return;
	}
	if (w->qtail)
		w->qtail->next = c;
	else
		w->qhead = c;
	w->qtail = c;
	pthread_mutex_unlock(&w->qlock);
	r = write(w->cmdfd, &one, sizeof(one));
	(void)r;
}

/* Send a copy of a command to every worker and wait until all have run it. */
static int broadcast(struct ztun_engine *e, const struct zcmd *tmpl, int wait)
{
	struct zsync s;
	int rc;

	pthread_mutex_init(&s.mu, NULL);
	pthread_cond_init(&s.cv, NULL);
	s.pending = e->nworkers;
	s.rc = 0;
	for (int i = 0; i < e->nworkers; i++) {
		struct zcmd *c = malloc(sizeof(*c));

		if (!c) {
			if (tmpl->type == CMD_SET_POLICY)
				zpolicy_put(tmpl->u.policy); /* this worker's reference */
			sync_done(&s, ZTUN_ENOMEM);
			continue;
		}
		*c = *tmpl;
		c->sync = wait ? &s : NULL;
		if (!wait)
			sync_done(&s, 0);
		worker_enqueue(&e->workers[i], c);
	}
	pthread_mutex_lock(&s.mu);
	while (s.pending > 0)
		pthread_cond_wait(&s.cv, &s.mu);
	rc = s.rc;
	pthread_mutex_unlock(&s.mu);
	pthread_mutex_destroy(&s.mu);
	pthread_cond_destroy(&s.cv);
	return rc;
}

static int worker_arm_listener(struct zworker *w, struct zlistener *l)
{
	/* Level-triggered and exclusive: one worker wakes per incoming connection. */
	struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &l->tag};

	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, l->fd, &ev) < 0)
		return -errno;
	return 0;
}

static void worker_disarm_listeners(struct zworker *w)
{
	for (int i = 0; i < w->nlisteners; i++)
		epoll_ctl(w->epfd, EPOLL_CTL_DEL, w->listeners[i]->fd, NULL);
}

static void worker_snapshot(struct zworker *w, struct zsnap *s)
{
	pthread_mutex_lock(&s->mu);
	for (struct zlist *it = w->flows.next; it != &w->flows; it = it->next) {
		struct zflow *f = zlist_entry(it, struct zflow, link);

		if (s->n < s->cap) {
			struct ztun_conn_info *ci = &s->out[s->n];

			ci->conn_id = f->id;
			ci->listener_id = f->l->id;
			ci->mode = (uint16_t)f->l->mode;
			ci->state = f->state == FS_RELAY;
			ci->bytes_down_up = f->bytes[0];
			ci->bytes_up_down = f->bytes[1];
			ci->start_ns = f->start_real;
		}
		s->n++;
	}
	pthread_mutex_unlock(&s->mu);
}

static void worker_run_cmd(struct zworker *w, struct zcmd *c)
{
	int rc = 0;

	switch (c->type) {
	case CMD_ADD_LISTENER:
		if (w->stopping)
			break;
		if (w->nlisteners == w->caplisteners) {
			int cap = w->caplisteners ? w->caplisteners * 2 : 8;
			void *p = realloc(w->listeners, (size_t)cap * sizeof(*w->listeners));

			if (!p) {
				rc = ZTUN_ENOMEM;
				break;
			}
			w->listeners = p;
			w->caplisteners = cap;
		}
		if (!w->accept_paused)
			rc = worker_arm_listener(w, c->u.listener);
		if (rc == 0) {
			zlistener_get(c->u.listener);
			w->listeners[w->nlisteners++] = c->u.listener;
		}
		break;
	case CMD_DEL_LISTENER:
		for (int i = 0; i < w->nlisteners; i++) {
			if (w->listeners[i] != c->u.listener)
				continue;
			epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->u.listener->fd, NULL);
			w->listeners[i] = w->listeners[--w->nlisteners];
			zlistener_put(c->u.listener);
			break;
		}
		break;
	case CMD_PAUSE_ACCEPT:
		worker_disarm_listeners(w);
		w->accept_paused = 2; /* 2: paused for good, never re-armed by the back-off */
		break;
	case CMD_SET_POLICY:
		zpolicy_put(w->policy);
		w->policy = c->u.policy; /* the broadcaster took a reference for us */
		zflow_recheck_policy(w);
		break;
	case CMD_ADOPT:
		if (w->stopping)
			close(c->u.adopt.fd);
		else
			zflow_adopt(w, c->u.adopt.l, c->u.adopt.fd, &c->u.adopt.target, c->u.adopt.request_id);
		zlistener_put(c->u.adopt.l);
		break;
	case CMD_SNAPSHOT:
		worker_snapshot(w, c->u.snap);
		break;
	case CMD_STOP:
		if (!w->stopping) {
			w->stopping = 1;
			worker_disarm_listeners(w);
			w->drain_deadline = w->now + (uint64_t)c->u.drain_ms * 1000000ull;
		}
		break;
	}
	sync_done(c->sync, rc);
	free(c);
}

static void worker_run_cmds(struct zworker *w)
{
	struct zcmd *c;
	uint64_t junk;
	ssize_t r = read(w->cmdfd, &junk, sizeof(junk));

	(void)r;
	pthread_mutex_lock(&w->qlock);
	c = w->qhead;
	w->qhead = w->qtail = NULL;
	pthread_mutex_unlock(&w->qlock);
	while (c) {
		struct zcmd *next = c->next;

		worker_run_cmd(w, c);
		c = next;
	}
}

/* ---- accept ------------------------------------------------------------- */

static void worker_accept(struct zworker *w, struct zlistener *l)
{
	/* Bounded so one busy listener cannot starve established connections. */
	for (int i = 0; i < 64; i++) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
				return;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* Out of descriptors: stop polling the listeners for a moment
				 * instead of spinning on a level-triggered readable socket. */
				zworker_emit_log(w, ZTUN_LOG_ERROR,
						 "accept on listener %u: %s; pausing accepts for 100 ms",
						 l->id, strerror(errno));
				if (!w->accept_paused) {
					worker_disarm_listeners(w);
					w->accept_paused = 1;
					w->accept_resume_ns = w->now + EMFILE_BACKOFF_NS;
				}
				return;
			}
			zworker_emit_log(w, ZTUN_LOG_WARNING, "accept on listener %u: %s", l->id,
					 strerror(errno));
			return;
		}
		zflow_accept(w, l, fd, &ss, sl);
	}
}

/* ---- the worker loop ---------------------------------------------------- */

static void worker_tick(struct zworker *w)
{
	if (w->accept_paused == 1 && w->now >= w->accept_resume_ns && !w->stopping) {
		w->accept_paused = 0;
		for (int i = 0; i < w->nlisteners; i++)
			worker_arm_listener(w, w->listeners[i]);
	}
	zflow_tick(w);
	zh2_tick(w);
	zlinger_tick(w, 0);
	if (w->nflows == 0)
		zpool_trim(&w->pool);
}

static void *worker_main(void *arg)
{
	struct zworker *w = arg;
	struct epoll_event evs[MAX_EVENTS];

	w->now = ztun_now_mono();
	w->next_tick = w->now + TICK_NS;
	uint64_t spin_ns = (uint64_t)w->e->cfg.spin_us * 1000, last_work = 0;

	for (;;) {
		int busy = !zlist_empty(&w->again) || !zlist_empty(&w->h2dirty);
		int timeout = busy ? 0 : (int)(TICK_NS / 1000000);
		int n;

		/* Low-latency mode: right after some work, poll without sleeping for a
		 * little while, so the next packet of a request/response exchange does not
		 * pay for a thread wake-up. */
		if (!busy && spin_ns && last_work) {
			uint64_t until = last_work + spin_ns;

			do
				n = epoll_wait(w->epfd, evs, MAX_EVENTS, 0);
			while (n == 0 && ztun_now_precise() < until);
			if (n == 0)
				n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout);
		} else {
			n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout);
		}
		last_work = n > 0 && spin_ns ? ztun_now_precise() : 0;

		w->now = ztun_now_mono();
		for (int i = 0; i < n; i++) {
			struct ztag *tag = evs[i].data.ptr;

			switch (tag->kind) {
			case TAG_LISTENER:
				if (!w->stopping && !w->accept_paused)
					worker_accept(w, container_of(tag, struct zlistener, tag));
				break;
			case TAG_CMD:
				worker_run_cmds(w);
				break;
			case TAG_H2:
				zh2_on_event(w, tag, evs[i].events);
				break;
			case TAG_LINGER:
				zlinger_on_event(w, tag);
				break;
			default:
				zflow_on_event(w, tag, evs[i].events);
				break;
			}
		}
		zflow_run_again(w);
		zh2_flush_dirty(w);
		zflow_reap(w);
		zh2_reap(w);
		if (w->now >= w->next_tick) {
			w->next_tick = w->now + TICK_NS;
			worker_tick(w);
			zh2_flush_dirty(w);
			zflow_reap(w);
			zh2_reap(w);
		}
		if (w->stopping) {
			if (w->stopping == 1) {
				/* First pass after the stop command: GOAWAY on every HTTP/2 connection. */
				w->stopping = 2;
				zh2_shutdown_all(w, 1);
			}
			if (w->nflows == 0 && zh2_count(w) == 0)
				break;
			if (w->now >= w->drain_deadline) {
				zh2_shutdown_all(w, 0);
				zflow_shutdown_all(w, ZTUN_CLOSE_SHUTDOWN);
				zflow_reap(w);
				zh2_reap(w);
				break;
			}
		}
	}
	zlinger_tick(w, 1);
	/* Commands that raced with the stop: refuse them, and every later one, so no
	 * caller hangs. */
	pthread_mutex_lock(&w->qlock);
	w->exited = 1;
	struct zcmd *c = w->qhead;

	w->qhead = w->qtail = NULL;
	pthread_mutex_unlock(&w->qlock);
	while (c) {
		struct zcmd *next = c->next;

		cmd_refuse(c);
		c = next;
	}
	return NULL;
}

/* ---- lifecycle ---------------------------------------------------------- */

static int worker_init(struct ztun_engine *e, struct zworker *w, int idx)
{
	struct epoll_event ev;
	int rc;

	memset(w, 0, sizeof(*w));
	w->e = e;
	w->idx = idx;
	w->epfd = -1;
	w->cmdfd = -1;
	w->exited = 1; /* until started: commands are refused, never left waiting */
	pthread_mutex_init(&w->qlock, NULL);
	zlist_init(&w->flows);
	zlist_init(&w->pending);
	zlist_init(&w->again);
	zlist_init(&w->zombies);
	zlist_init(&w->h2s);
	zlist_init(&w->h2dirty);
	zlist_init(&w->h2zombies);
	zlist_init(&w->lingers);
	w->scratch = malloc(ZTUN_SCRATCH_BYTES);
	if (!w->scratch)
		return ZTUN_ENOMEM;
	if (getrandom(w->rng, sizeof(w->rng), 0) != sizeof(w->rng) || (!w->rng[0] && !w->rng[1])) {
		w->rng[0] = ztun_now_precise() ^ (uint64_t)(uintptr_t)w;
		w->rng[1] = 0x9e3779b97f4a7c15ull;
	}
	zpool_init(&w->pool, e->cfg.buf_small, e->cfg.buf_large);
	rc = zring_init(&w->ring, e->cfg.event_ring_bytes);
	if (rc)
		return rc;
	w->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (w->epfd < 0)
		return -errno;
	w->cmdfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->cmdfd < 0)
		return -errno;
	w->cmd_tag.kind = TAG_CMD;
	ev.events = EPOLLIN;
	ev.data.ptr = &w->cmd_tag;
	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->cmdfd, &ev) < 0)
		return -errno;
	return 0;
}

static void worker_destroy(struct zworker *w)
{
	struct zcmd *c = w->qhead;

	while (c) {
		struct zcmd *next = c->next;

		cmd_refuse(c);
		c = next;
	}
	for (int i = 0; i < w->nlisteners; i++)
		zlistener_put(w->listeners[i]);
	free(w->listeners);
	zpolicy_put(w->policy);
	zpool_destroy(&w->pool);
	zpipe_pool_destroy(w);
	free(w->scratch);
	zring_destroy(&w->ring);
	if (w->epfd >= 0)
		close(w->epfd);
	if (w->cmdfd >= 0)
		close(w->cmdfd);
	pthread_mutex_destroy(&w->qlock);
}

int ztun_engine_new(const struct ztun_engine_config *cfg, ztun_engine **out)
{
	struct ztun_engine *e;
	int rc;

	*out = NULL;
	if (!cfg || cfg->workers < 0 || cfg->workers > 256)
		return ZTUN_EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return ZTUN_ENOMEM;
	e->cfg = *cfg;
	atomic_store(&e->events, cfg->events);
	if (!e->cfg.connect_timeout_ms)
		e->cfg.connect_timeout_ms = 10000;
	if (!e->cfg.handshake_timeout_ms)
		e->cfg.handshake_timeout_ms = 10000;
	if (!e->cfg.event_ring_bytes)
		e->cfg.event_ring_bytes = 1u << 20;
	e->nworkers = cfg->workers;
	if (e->nworkers == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);

		e->nworkers = n > 0 ? (int)n : 1;
	}
	e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	pthread_mutex_init(&e->ev_lock, NULL);
	pthread_mutex_init(&e->lock, NULL);
	pthread_mutex_init(&e->policy_lock, NULL);
	pthread_mutex_init(&e->dir_lock, NULL);
	atomic_store(&e->ev_armed, 1);
	atomic_store(&e->next_conn_id, 1);
	atomic_store(&e->next_listener_id, 1);
	e->workers = calloc((size_t)e->nworkers, sizeof(*e->workers));
	if (e->evfd < 0 || !e->workers) {
		rc = e->evfd < 0 ? -errno : ZTUN_ENOMEM;
		goto fail;
	}
	for (int i = 0; i < e->nworkers; i++) {
		rc = worker_init(e, &e->workers[i], i);
		if (rc)
			goto fail;
	}
	*out = e;
	return 0;
fail:
	ztun_engine_free(e);
	return rc;
}

int ztun_engine_workers(const ztun_engine *e)
{
	return e->nworkers;
}

int ztun_engine_start(ztun_engine *e)
{
	int rc = 0;

	pthread_mutex_lock(&e->lock);
	if (e->state != 0) {
		rc = ZTUN_ESTATE;
		goto out;
	}
	/* Workers run with every signal blocked: signals belong to the embedding
	 * program (Python handles them on its main thread), and a SIGPIPE from a
	 * socket write must never kill it. */
	sigset_t all, old;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (int i = 0; i < e->nworkers; i++) {
		int err;

		e->workers[i].exited = 0;
		err = pthread_create(&e->workers[i].thread, NULL, worker_main, &e->workers[i]);

		if (err) {
			e->workers[i].exited = 1;
			rc = -err;
			break;
		}
		e->workers[i].started = 1;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	e->state = 1;
out:
	pthread_mutex_unlock(&e->lock);
	if (rc)
		ztun_engine_stop(e, 0);
	return rc;
}

/* Listening sockets stop accepting (new connections are refused), even if the engine's
 * memory is released later. Their ports leave the accelerator, which other engines of
 * the process may go on sharing. */
static void listeners_stop(ztun_engine *e)
{
	pthread_mutex_lock(&e->lock);
	for (int i = 0; i < e->nlisteners; i++) {
		if (e->listeners[i]->fd < 0)
			continue;
		if (e->bpf)
			e->bpf_api->del_listener(e->bpf, e->listeners[i]->fd);
		shutdown(e->listeners[i]->fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&e->lock);
}

int ztun_engine_stop(ztun_engine *e, uint32_t drain_ms)
{
	struct zcmd stop = {.type = CMD_STOP, .u.drain_ms = drain_ms};
	int was;

	pthread_mutex_lock(&e->lock);
	if (e->state != 1) {
		was = e->state;
		e->state = 2;
		pthread_mutex_unlock(&e->lock);
		if (was == 0)
			listeners_stop(e); /* never started: its listeners still hold ports */
		return 0;
	}
	e->state = 2;
	pthread_mutex_unlock(&e->lock);

	broadcast(e, &stop, 0);
	for (int i = 0; i < e->nworkers; i++) {
		if (e->workers[i].started) {
			pthread_join(e->workers[i].thread, NULL);
			e->workers[i].started = 0;
		}
	}
	listeners_stop(e);
	/* Wake any event consumer so it sees the final records. */
	atomic_store(&e->ev_armed, 1);
	if (e->nworkers)
		zworker_wake_consumer(&e->workers[0]);
	return 0;
}

void ztun_engine_free(ztun_engine *e)
{
	if (!e)
		return;
	ztun_engine_stop(e, 0);
	if (e->workers) {
		for (int i = 0; i < e->nworkers; i++)
			worker_destroy(&e->workers[i]);
		free(e->workers);
	}
	for (int i = 0; i < e->nlisteners; i++)
		zlistener_put(e->listeners[i]);
	free(e->listeners);
	zpolicy_put(e->policy);
	zdir_put(e->dir);
	pthread_mutex_destroy(&e->dir_lock);
	if (e->evfd >= 0)
		close(e->evfd);
	pthread_mutex_destroy(&e->ev_lock);
	pthread_mutex_destroy(&e->lock);
	pthread_mutex_destroy(&e->policy_lock);
	free(e);
}

static int make_listen_socket(const struct ztun_listener_spec *s, int *out)
{
	int one = 1;
	int fd = socket(s->bind.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (s->bind.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&s->bind, s->bind_len) < 0 ||
	    listen(fd, s->backlog > 0 ? s->backlog : SOMAXCONN) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	*out = fd;
	return 0;
}

static int valid_mode(int mode)
{
	return mode >= ZTUN_MODE_FORWARD && mode <= ZTUN_MODE_SOCKS5;
}

int ztun_engine_add_listener(ztun_engine *e, const struct ztun_listener_spec *spec, uint32_t *id,
			     struct sockaddr_storage *bound, socklen_t *bound_len)
{
	struct zlistener *l;
	struct zcmd add = {.type = CMD_ADD_LISTENER};
	int fd = -1, rc;
	/* SOCKS5 may route over HBONE: it needs the identity too. */
	int need_tls = spec->mode != ZTUN_MODE_FORWARD;

	if (!valid_mode(spec->mode) || (need_tls && !spec->tls))
		return ZTUN_EINVAL;
	if (spec->mode != ZTUN_MODE_HBONE_IN && spec->mode != ZTUN_MODE_SOCKS5 &&
	    spec->upstream_len == 0 && !(spec->flags & ZTUN_LISTENER_ORIGINAL_DST))
		return ZTUN_EINVAL;
	if ((spec->flags & ZTUN_LISTENER_VIRTUAL) && spec->mode == ZTUN_MODE_HBONE_IN)
		return ZTUN_EINVAL;
	if ((spec->flags & ZTUN_LISTENER_DELIVER) && spec->mode != ZTUN_MODE_HBONE_IN)
		return ZTUN_EINVAL;
	if (spec->nexpect < 0 || (spec->nexpect > 0 && !spec->expect) || spec->nworkload_ips < 0 ||
	    (spec->nworkload_ips > 0 && !spec->workload_ips))
		return ZTUN_EINVAL;
	if (spec->flags & ZTUN_LISTENER_VIRTUAL) {
		fd = -1;
	} else if (spec->fd >= 0) {
		fd = fcntl(spec->fd, F_DUPFD_CLOEXEC, 0);
		if (fd < 0)
			return -errno;
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	} else {
		rc = make_listen_socket(spec, &fd);
		if (rc)
			return rc;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		close(fd);
		return ZTUN_ENOMEM;
	}
	l->tag.kind = TAG_LISTENER;
	atomic_store(&l->refs, 1);
	l->fd = fd;
	l->mode = spec->mode;
	l->flags = spec->flags;
	l->workload = spec->workload;
	l->upstream = spec->upstream;
	l->upstream_len = spec->upstream_len;
	l->target = spec->target;
	l->target_len = spec->target_len;
	pthread_mutex_init(&l->tls_lock, NULL);
	ztls_slot_init(&l->slot);
	if (spec->tls)
		l->tls = ztun_tls_ctx_ref(spec->tls);
	if (spec->nexpect > 0) {
		l->expect = ztls_expect_new(spec->expect, spec->nexpect);
		if (!l->expect) {
			zlistener_put(l);
			return ZTUN_ENOMEM;
		}
	}
	if (spec->baggage && !(l->baggage = strdup(spec->baggage))) {
		zlistener_put(l);
		return ZTUN_ENOMEM;
	}
	if (spec->workload_key) {
		l->workload_key = strdup(spec->workload_key);
		if (!l->workload_key) {
			zlistener_put(l);
			return ZTUN_ENOMEM;
		}
		l->workload_key_len = strlen(l->workload_key);
		l->workload = ZTUN_POLICY_WORKLOAD_DEFAULT;
	}
	if (spec->nworkload_ips > 0) {
		l->workload_ips = malloc((size_t)spec->nworkload_ips * 16);
		if (!l->workload_ips) {
			zlistener_put(l);
			return ZTUN_ENOMEM;
		}
		memcpy(l->workload_ips, spec->workload_ips, (size_t)spec->nworkload_ips * 16);
		l->nworkload_ips = (uint32_t)spec->nworkload_ips;
	}
	l->local_len = sizeof(l->local);
	if (fd >= 0)
		getsockname(fd, (struct sockaddr *)&l->local, &l->local_len);
	else
		l->local_len = 0;
	l->id = atomic_fetch_add(&e->next_listener_id, 1);
	/* Connections to our listeners: app<->ztun hops go socket to socket. */
	if (e->bpf && fd >= 0)
		e->bpf_api->add_listener(e->bpf, fd);

	pthread_mutex_lock(&e->lock);
	if (e->state == 2) {
		pthread_mutex_unlock(&e->lock);
		zlistener_put(l);
		return ZTUN_ECLOSED;
	}
	if (e->nlisteners == e->caplisteners) {
		int cap = e->caplisteners ? e->caplisteners * 2 : 8;
		void *p = realloc(e->listeners, (size_t)cap * sizeof(*e->listeners));

		if (!p) {
			pthread_mutex_unlock(&e->lock);
			zlistener_put(l);
			return ZTUN_ENOMEM;
		}
		e->listeners = p;
		e->caplisteners = cap;
	}
	e->listeners[e->nlisteners++] = l;
	pthread_mutex_unlock(&e->lock);

	add.u.listener = l;
	rc = (l->flags & ZTUN_LISTENER_VIRTUAL) ? 0 : broadcast(e, &add, 1);
	if (rc) {
		ztun_engine_remove_listener(e, l->id);
		return rc;
	}
	if (id)
		*id = l->id;
	if (bound) {
		*bound = l->local;
		if (bound_len)
			*bound_len = l->local_len;
	}
	return 0;
}

static struct zlistener *take_listener(struct ztun_engine *e, uint32_t id)
{
	struct zlistener *l = NULL;

	pthread_mutex_lock(&e->lock);
	for (int i = 0; i < e->nlisteners; i++) {
		if (e->listeners[i]->id == id) {
			l = e->listeners[i];
			e->listeners[i] = e->listeners[--e->nlisteners];
			break;
		}
	}
	pthread_mutex_unlock(&e->lock);
	return l;
}

int ztun_engine_remove_listener(ztun_engine *e, uint32_t id)
{
	struct zlistener *l = take_listener(e, id);
	struct zcmd del = {.type = CMD_DEL_LISTENER};

	if (!l)
		return ZTUN_ENOTFOUND;
	del.u.listener = l;
	if (l->fd >= 0) {
		broadcast(e, &del, 1);
		if (e->bpf)
			e->bpf_api->del_listener(e->bpf, l->fd);
		/* Close the socket now (a listener with live connections keeps its config). */
		shutdown(l->fd, SHUT_RDWR);
	}
	zlistener_put(l);
	return 0;
}

int ztun_engine_adopt(ztun_engine *e, uint32_t listener_id, int fd, const struct sockaddr_storage *target,
		      uint64_t request_id)
{
	struct zlistener *l = NULL;
	struct zcmd *c;
	int rc = 0;

	if (fd < 0)
		return ZTUN_EINVAL;
	pthread_mutex_lock(&e->lock);
	if (e->state != 1) {
		rc = ZTUN_ECLOSED;
	} else {
		for (int i = 0; i < e->nlisteners; i++) {
			if (e->listeners[i]->id == listener_id) {
				l = e->listeners[i];
				zlistener_get(l);
				break;
			}
		}
		if (!l)
			rc = ZTUN_ENOTFOUND;
		else if (!(l->flags & ZTUN_LISTENER_VIRTUAL))
			rc = ZTUN_EINVAL;
	}
	pthread_mutex_unlock(&e->lock);
	if (rc) {
		if (l)
			zlistener_put(l);
		return rc;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		zlistener_put(l);
		return ZTUN_ENOMEM;
	}
	c->type = CMD_ADOPT;
	c->u.adopt.l = l;
	c->u.adopt.fd = fd;
	c->u.adopt.request_id = request_id;
	if (target)
		c->u.adopt.target = *target;
	/* Spread adopted connections over the workers. */
	worker_enqueue(&e->workers[atomic_fetch_add(&e->rr, 1) % (uint32_t)e->nworkers], c);
	return 0;
}

int ztun_engine_set_listener_tls(ztun_engine *e, uint32_t id, ztun_tls_ctx *ctx)
{
	int rc = ZTUN_ENOTFOUND;

	if (!ctx)
		return ZTUN_EINVAL;
	pthread_mutex_lock(&e->lock);
	for (int i = 0; i < e->nlisteners; i++) {
		struct zlistener *l = e->listeners[i];
		ztun_tls_ctx *old;

		if (l->id != id)
			continue;
		pthread_mutex_lock(&l->tls_lock);
		old = l->tls;
		l->tls = ztun_tls_ctx_ref(ctx);
		pthread_mutex_unlock(&l->tls_lock);
		/* A session made with the old certificate or trust must not be resumed. */
		ztls_slot_clear(&l->slot);
		ztun_tls_ctx_free(old);
		rc = 0;
		break;
	}
	pthread_mutex_unlock(&e->lock);
	return rc;
}

int ztun_engine_pause_accept(ztun_engine *e)
{
	struct zcmd pause = {.type = CMD_PAUSE_ACCEPT};

	return broadcast(e, &pause, 1);
}

int ztun_engine_swap_policy(ztun_engine *e, ztun_policy *table, uint32_t *generation)
{
	struct zcmd set = {.type = CMD_SET_POLICY};
	struct zpolicy *ref = NULL, *old;
	uint32_t gen;
	int rc = 0, state;

	pthread_mutex_lock(&e->policy_lock);
	gen = ++e->policy_gen;
	if (table) {
		ref = zpolicy_new(table, gen);
		if (!ref) {
			ztun_policy_free(table);
			pthread_mutex_unlock(&e->policy_lock);
			return ZTUN_ENOMEM;
		}
	}
	pthread_mutex_lock(&e->lock);
	state = e->state;
	if (state == 2) {
		pthread_mutex_unlock(&e->lock);
		pthread_mutex_unlock(&e->policy_lock);
		zpolicy_put(ref);
		return ZTUN_ECLOSED;
	}
	old = e->policy;
	e->policy = ref;
	/* One reference per worker; each drops its old one when it switches. */
	for (int i = 0; i < e->nworkers && ref; i++)
		zpolicy_get(ref);
	if (state == 0) {
		/* No worker runs yet (start needs e->lock): install directly. */
		for (int i = 0; i < e->nworkers; i++) {
			zpolicy_put(e->workers[i].policy);
			e->workers[i].policy = ref;
		}
	}
	pthread_mutex_unlock(&e->lock);
	if (state == 1) {
		set.u.policy = ref;
		rc = broadcast(e, &set, 1);
	}
	/* Every worker now evaluates the new table only (the broadcast waited for each to
	 * switch), so the old counters are final: carry them over by policy name. */
	if (old && ref)
		ztun_policy_counters_carry(ref->table, old->table);
	zpolicy_put(old);
	pthread_mutex_unlock(&e->policy_lock);
	if (generation)
		*generation = gen;
	return rc;
}

void ztun_engine_set_events(ztun_engine *e, uint32_t mask)
{
	atomic_store_explicit(&e->events, mask, memory_order_relaxed);
}

int ztun_engine_set_bpf(ztun_engine *e, void *handle, const void *api)
{
	const struct ztun_bpf_api *a = api;
	int rc = 0;

	if (handle && (!a || a->abi != ZTUN_BPF_API_ABI || a->size < sizeof(*a)))
		return ZTUN_EINVAL; /* a loader built apart from this engine */
	pthread_mutex_lock(&e->lock);
	if (e->state != 0) {
		rc = ZTUN_ESTATE;
	} else {
		e->bpf = handle;
		e->bpf_api = handle ? a : NULL;
		/* Sockets fed by sk_msg redirects cannot be read with splice(2). */
		if (handle)
			e->cfg.splice_pipe = 0;
	}
	pthread_mutex_unlock(&e->lock);
	return rc;
}

int ztun_engine_connections(ztun_engine *e, struct ztun_conn_info *out, size_t cap, size_t *n)
{
	struct zsnap s = {.out = out, .cap = cap};
	struct zcmd cmd = {.type = CMD_SNAPSHOT, .u.snap = &s};
	int rc;

	pthread_mutex_init(&s.mu, NULL);
	rc = broadcast(e, &cmd, 1);
	pthread_mutex_destroy(&s.mu);
	*n = s.n;
	return rc;
}

int ztun_engine_set_policy(ztun_engine *e, ztun_policy *table)
{
	return ztun_engine_swap_policy(e, table, NULL);
}

int ztun_engine_policy_counters(ztun_engine *e, struct ztun_policy_counters *out, uint32_t n,
				uint32_t *count, uint32_t *generation)
{
	struct zpolicy *p;
	uint32_t total = 0;

	if (n && !out)
		return ZTUN_EINVAL;
	/* policy_lock: never read a table whose predecessor's totals are not carried yet. */
	pthread_mutex_lock(&e->policy_lock);
	p = e->policy;
	if (p) {
		total = 1 + ztun_policy_count(p->table);
		for (uint32_t i = 0; i < n && i < total; i++)
			ztun_policy_counters(p->table, (int32_t)i - 1, &out[i]);
	}
	if (count)
		*count = total;
	if (generation)
		*generation = p ? p->gen : 0;
	pthread_mutex_unlock(&e->policy_lock);
	return 0;
}

int ztun_engine_stats(ztun_engine *e, struct ztun_stats *out)
{
	memset(out, 0, sizeof(*out));
	for (int i = 0; i < e->nworkers; i++) {
		struct zstats *s = &e->workers[i].stats;

#define RD(x) atomic_load_explicit(&(x), memory_order_relaxed)
		out->bytes_down_up += RD(s->bytes[0]);
		out->bytes_up_down += RD(s->bytes[1]);
		out->conns_opened += RD(s->opened);
		out->conns_closed += RD(s->closed);
		for (int r = 0; r < ZTUN_CLOSE__COUNT; r++)
			out->close_reason[r] += RD(s->reason[r]);
		out->handshakes += RD(s->handshakes);
		out->handshakes_resumed += RD(s->handshakes_resumed);
		out->policy_allowed += RD(s->policy_allowed);
		out->policy_denied += RD(s->policy_denied);
		out->policy_dry_run += RD(s->policy_dry_run);
		out->events_dropped += RD(e->workers[i].ring.dropped);
		out->buffers_in_use += RD(e->workers[i].pool.in_use);
		out->buffer_bytes += RD(e->workers[i].pool.bytes);
		for (int k = 0; k < 5; k++)
			out->hbone_status[k] += RD(s->hbone_status[k]);
		out->hbone_protocol_errors += RD(s->hbone_protocol_errors);
		out->h2_opened += RD(s->h2_opened);
		out->h2_closed += RD(s->h2_closed);
		for (int r = 0; r < ZTUN_CLOSE__COUNT; r++)
			out->h2_close_reason[r] += RD(s->h2_reason[r]);
		for (int r = 0; r < ZTUN_TLSR__COUNT; r++)
			out->tls_failures[r] += RD(s->tls_failures[r]);
		out->bpf_pairs += RD(s->bpf_pairs);
		out->bpf_direct_bytes += RD(s->bpf_direct_bytes);
#undef RD
	}
	out->conns_active = out->conns_opened - out->conns_closed;
	out->h2_active = out->h2_opened - out->h2_closed;
	for (int r = 0; r < ZTUN_CLOSE__COUNT; r++) {
		if (r != ZTUN_CLOSE_OK && r != ZTUN_CLOSE_RESET_DOWN && r != ZTUN_CLOSE_RESET_UP)
			out->conns_failed += out->close_reason[r];
	}
	return 0;
}
