/* Internal structures of the engine, shared by engine.c (workers, commands,
 * listeners) and conn.c (the per-connection state machine and relay). */
#ifndef ZTUN_ENGINE_INT_H
#define ZTUN_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "buf.h"
#include "events.h"
#include "list.h"
#include "tls_int.h"
#include "ztun/bpf.h"
#include "ztun/engine.h"


#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Every epoll registration points at a tag saying what it is. */
enum ztag_kind { TAG_LISTENER = 1, TAG_CMD, TAG_EP, TAG_H2, TAG_LINGER };
struct ztag {
	uint8_t kind;
};

struct zlistener {
	struct ztag tag;
	_Atomic int refs;
	uint32_t id;
	int fd;
	int mode;
	uint32_t flags;
	int32_t workload;
	struct sockaddr_storage local;
	socklen_t local_len;
	struct sockaddr_storage upstream;
	socklen_t upstream_len;
	struct sockaddr_storage target;
	socklen_t target_len;
	pthread_mutex_t tls_lock; /* guards tls: swapped by the control thread */
	ztun_tls_ctx *tls;
	struct ztls_expect *expect;    /* client side: acceptable server identities */
	struct ztls_session_slot slot; /* client side: the session to resume */
	char *baggage;                 /* HBONE_OUT: baggage header value, or NULL */
	uint8_t (*workload_ips)[16];   /* HBONE_IN: addresses of the workloads we serve */
	uint32_t nworkload_ips;
	char *workload_key;            /* policy: "namespace/name" of our workload, or NULL */
	size_t workload_key_len;
	/* workload_key resolved in table generation (high 32 bits) -> index (low 32 bits):
	 * a cache any worker may refresh when its table is newer (indices are per table). */
	_Atomic uint64_t workload_cache;
};

/* A compiled policy table shared by the workers: the last reference frees it. */
struct zpolicy {
	_Atomic int refs;
	uint32_t gen;       /* 1, 2, ...: named in connection events */
	ztun_policy *table;
};
struct zpolicy *zpolicy_new(ztun_policy *table, uint32_t gen);
void zpolicy_get(struct zpolicy *p);
void zpolicy_put(struct zpolicy *p);

/* The destination directory (outbound.c), sorted by address, shared read-only. */
struct zdirent {
	uint8_t ip[16];
	struct ztls_expect *expect; /* NULL: passthrough */
	struct sockaddr_storage via;
	uint32_t flags;             /* ZTUN_DIR_* */
};
struct zdir {
	_Atomic int refs;
	uint32_t n;
	struct zdirent *v;
};
void zdir_put(struct zdir *d);

/* Counters each worker updates with relaxed atomics; summed on read. */
struct zstats {
	_Atomic uint64_t bytes[2]; /* [0] down->up, [1] up->down */
	_Atomic uint64_t opened;
	_Atomic uint64_t closed;
	_Atomic uint64_t reason[ZTUN_CLOSE__COUNT];
	_Atomic uint64_t handshakes;
	_Atomic uint64_t handshakes_resumed;
	_Atomic uint64_t policy_allowed;
	_Atomic uint64_t policy_denied;
	_Atomic uint64_t policy_dry_run;
	_Atomic uint64_t hbone_status[5]; /* responses sent or received: 200, 400, 401, 503, other */
	_Atomic uint64_t hbone_protocol_errors;
	_Atomic uint64_t h2_opened;
	_Atomic uint64_t h2_closed;
	_Atomic uint64_t h2_reason[ZTUN_CLOSE__COUNT];
	_Atomic uint64_t tls_failures[ZTUN_TLSR__COUNT];
	_Atomic uint64_t bpf_pairs;
	_Atomic uint64_t bpf_direct_bytes;
};

static inline void zstat_add(_Atomic uint64_t *c, uint64_t v)
{
	atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

enum zcmd_type {
	CMD_ADD_LISTENER = 1,
	CMD_DEL_LISTENER,
	CMD_PAUSE_ACCEPT,
	CMD_SET_POLICY,
	CMD_STOP,
	CMD_ADOPT,
	CMD_SNAPSHOT,
};

/* A snapshot of live connections being filled by the workers. */
struct zsnap {
	pthread_mutex_t mu;
	struct ztun_conn_info *out;
	size_t cap, n;
};

/* A caller waiting for every worker to run a broadcast command. */
struct zsync {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int pending;
	int rc;
};

struct zcmd {
	struct zcmd *next;
	int type;
	struct zsync *sync;
	union {
		struct zlistener *listener;
		struct zpolicy *policy;
		uint32_t drain_ms;
		struct zsnap *snap;
		struct {
			struct zlistener *l; /* a reference for the worker */
			int fd;
			uint64_t request_id;
			struct sockaddr_storage target;
		} adopt;
	} u;
};

struct zpipe;
struct zflow;

/* HBONE: received DATA chunks not yet written, pointing into the read buffer. */
#define ZTUN_STAGE_MAX 64
#define ZTUN_SCRATCH_BYTES (256u * 1024)
struct zstage {
	struct zflow *f;
	const uint8_t *p;
	uint32_t len;
	int32_t sid;
};

struct zworker {
	struct ztun_engine *e;
	int idx;
	pthread_t thread;
	int started;
	int epfd;
	int cmdfd;
	struct ztag cmd_tag;
	pthread_mutex_t qlock;
	struct zcmd *qhead, *qtail;
	int exited; /* under qlock: the loop ended, commands are refused */

	struct zpool pool;
	struct zpipe *pipes;  /* free splice pipes */
	uint32_t npipes;
	struct zring ring;
	struct zstats stats;

	struct zlistener **listeners; /* registered in this worker's epoll */
	int nlisteners, caplisteners;
	uint64_t accept_resume_ns;    /* EMFILE back-off: re-arm listeners after this */
	int accept_paused;

	struct zlist flows;   /* every live flow, least recently active first */
	struct zlist pending; /* flows waiting on a connect or handshake deadline */
	struct zlist again;   /* flows with work left after their time slice */
	struct zlist zombies; /* closed flows, freed after the epoll batch */
	uint32_t nflows;
	struct zlist lingers;   /* refused sockets read until the peer closes (sockio.c) */
	uint32_t nlingers;
	struct zlist h2s;       /* HTTP/2 connections (hbone.c) */
	struct zlist h2dirty;   /* ... with output to produce */
	struct zlist h2zombies; /* ... closed, freed after the batch */
	char *scratch;          /* TLS read buffer for HTTP/2 input */
	struct zstage stage[ZTUN_STAGE_MAX];
	uint32_t nstage;
	uint64_t rng[2];        /* trace ids */

	struct zpolicy *policy; /* this worker's reference, NULL: no policy */

	uint64_t now;        /* CLOCK_MONOTONIC_COARSE ns, updated every loop */
	uint64_t next_tick;
	int stopping;
	uint64_t drain_deadline;
};

struct ztun_engine {
	struct ztun_engine_config cfg;
	_Atomic uint32_t events; /* ZTUN_EVMASK_*: which events to emit, changeable live */
	int nworkers;
	struct zworker *workers;
	int evfd;
	_Atomic int ev_armed;
	pthread_mutex_t ev_lock; /* one consumer at a time */
	int ev_next;             /* round-robin start for draining */
	_Atomic uint64_t next_conn_id;
	_Atomic uint32_t next_listener_id;
	_Atomic uint32_t rr;     /* round-robin worker choice for adopted fds */
	pthread_mutex_t lock;    /* listeners table, policy pointer, lifecycle */
	struct zlistener **listeners;
	int nlisteners, caplisteners;
	struct zpolicy *policy;
	pthread_mutex_t dir_lock;
	struct zdir *dir;
	ztun_bpf *bpf;                     /* the accelerator, or NULL */
	const struct ztun_bpf_api *bpf_api;
	int state;               /* 0 new, 1 running, 2 stopped */
	pthread_mutex_t policy_lock; /* serializes policy swaps (and counter reads against them) */
	uint32_t policy_gen;     /* the last generation handed out */
};

/* engine.c */
uint64_t ztun_now_mono(void);
uint64_t ztun_now_real(void);
uint64_t ztun_now_precise(void); /* CLOCK_MONOTONIC, for durations */
void zlistener_put(struct zlistener *l);
void zlistener_get(struct zlistener *l);
void zworker_emit_log(struct zworker *w, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void zworker_wake_consumer(struct zworker *w);

/* conn.c */
void zflow_accept(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *src,
		  socklen_t srclen);
void zflow_on_event(struct zworker *w, struct ztag *tag, uint32_t events);
void zflow_run_again(struct zworker *w);
void zflow_tick(struct zworker *w);
void zflow_reap(struct zworker *w);
void zflow_shutdown_all(struct zworker *w, int reason);
void zflow_recheck_policy(struct zworker *w);
void zflow_adopt(struct zworker *w, struct zlistener *l, int fd, const struct sockaddr_storage *target,
		 uint64_t request_id);
void zpipe_pool_destroy(struct zworker *w);

#endif
