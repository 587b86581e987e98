/* ztun/bpf.h - the eBPF loader: sockmap acceleration of local hops and same-node pairs.
 *
 * Built as libztun_bpf.so (only when the build found clang, bpftool, libbpf and kernel BTF),
 * bound to Python by cffi as ztun._bpf. The engine never links it: it receives a handle and
 * the function table of ztun_bpf_api() from Python (two addresses) and calls through them,
 * so the engine builds and runs unchanged without BPF.
 *
 * Every function returning int returns 0 or a negative error: -errno, or ZTUN_E* of
 * ztun/ztun.h (ZTUN_EINVAL, ZTUN_ENOTFOUND, ZTUN_EFULL, ZTUN_ESTATE). The thread-local
 * ztun_bpf_last_error() says what failed and why, in words.
 *
 * Threads: ztun_bpf_open/attach/detach/pin/close belong to one control thread; the pair
 * functions and ztun_bpf_add_listener may be called from any thread while the handle is
 * open (ztun_bpf_relay_busy takes no lock and makes no system call).
 */
#ifndef ZTUN_BPF_H
#define ZTUN_BPF_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ztun_bpf ztun_bpf;

/* ztun_bpf_config.flags */
#define ZTUN_BPF_F_NO_HOP 0x1u        /* do not accelerate app <-> ztun hops */
#define ZTUN_BPF_F_NO_PAIRS 0x2u      /* do not honour same-node pairs */
#define ZTUN_BPF_F_UNBOUNDED 0x4u     /* accelerate even where redirected bytes cannot be bounded */
#define ZTUN_BPF_F_LEGACY_ATTACH 0x8u /* bpf_prog_attach instead of bpf_links (kernels < 6.10) */

/* SO_MARK ztun puts on its own sockets when the config leaves it 0 ("zt" in ASCII). */
#define ZTUN_BPF_DEFAULT_MARK 0x7a74u

/* Bound on redirected-but-unread bytes per receiving socket when the config leaves it 0:
 * the host's net.ipv4.tcp_rmem[2] (what TCP autotuning lets one receiver hold; 32 MiB on
 * Debian), or this if it cannot be read. A receiver descheduled for a few ms must not trip
 * it: at 30 Gbit/s 4 MiB is 1 ms, and a trip sends a bulk sender through the relay until
 * it pauses. Under TCP memory pressure the bound drops to the receiver's SO_RCVBUF. */
#define ZTUN_BPF_DEFAULT_CAP (32u << 20)

struct ztun_bpf_config {
	uint32_t flags;
	uint32_t mark;        /* SO_MARK of ztun's outgoing sockets; 0: ZTUN_BPF_DEFAULT_MARK */
	uint32_t ingress_cap; /* redirected-unread bytes a receiver may hold (at least its
			       * SO_RCVBUF; only that under TCP memory pressure);
			       * 0: net.ipv4.tcp_rmem[2] */
	uint32_t max_sockets; /* sockhash size; 0: 65536 */
	uint32_t max_pairs;   /* same-node pairs at once; 0: 16384 */
	uint32_t reserved;
};

/* How the kernel lets the programs bound what a sender can queue into a receiver. */
enum ztun_bpf_bound {
	ZTUN_BPF_BOUND_NONE = 0,  /* no way to read it: acceleration needs ZTUN_BPF_F_UNBOUNDED */
	ZTUN_BPF_BOUND_RMEM = 1,  /* sk_rmem_alloc (6.13+ charges redirected bytes to it) */
	ZTUN_BPF_BOUND_EXACT = 2, /* psock->msg_tot_len (6.18, stable backports) */
};

struct ztun_bpf_features {
	int32_t bound;        /* enum ztun_bpf_bound */
	int32_t sockmap_link; /* sockmap bpf_links (6.10+); else legacy attach */
	int32_t rdonly_cast;  /* bpf_rdonly_cast kfunc (6.2+): needed to read peer sockets */
	int32_t btf;          /* /sys/kernel/btf/vmlinux present */
	char kernel[64];      /* uname -r */
};

struct ztun_bpf_pair_stats {
	uint64_t direct_bytes[2];  /* [0]: A->B, [1]: B->A, moved app to app by the kernel */
	uint64_t direct_msgs[2];
	uint64_t fallback_msgs[2]; /* sendmsg chunks that stayed on the relay path */
};

/* Global counters, indexes of ztun_bpf_stats(); names from ztun_bpf_stat_name(). */
#define ZTUN_BPF_NSTATS 13

/* ---- probing, lifecycle (control thread) ---- */

int ztun_bpf_features(struct ztun_bpf_features *out);
/* open -> set knobs -> load; nothing is attached yet. */
int ztun_bpf_open(const struct ztun_bpf_config *cfg, ztun_bpf **out);
/* sk_msg on the sockhash, then sock_ops on the cgroup v2 directory, through bpf_links. */
int ztun_bpf_attach_cgroup(ztun_bpf *h, const char *cgroup_path);
/* Pin maps and links under dir (on a bpffs) so they outlive the process. */
int ztun_bpf_pin(ztun_bpf *h, const char *dir);
/* Stop accelerating new connections and end every pair (their bytes return to the relay,
 * in order). Sockets already accelerated keep their hop acceleration until they close. */
int ztun_bpf_detach(ztun_bpf *h);
/* detach + destroy; idempotent on NULL. */
void ztun_bpf_close(ztun_bpf *h);

/* ---- configuration of ztun's sockets ---- */

/* Connections to this listening socket's port (in its network namespace) are ztun hops. */
int ztun_bpf_add_listener(ztun_bpf *h, int listen_fd);
int ztun_bpf_del_listener(ztun_bpf *h, int listen_fd);
/* Addresses of same-node apps in other network namespaces of this host (one netns per
 * workload): ztun's marked connects to them pair like connects over loopback. */
int ztun_bpf_add_local_addr(ztun_bpf *h, const char *ip);
int ztun_bpf_del_local_addr(ztun_bpf *h, const char *ip);
/* The mark ztun must set (SO_MARK) on its outgoing sockets before connect(). */
uint32_t ztun_bpf_mark(const ztun_bpf *h);

/* ---- same-node pairs (engine worker threads) ----
 *
 * ztun_fd_a: ztun's socket accepted from app A; ztun_fd_b: ztun's socket connected to
 * app B. Both must be established loopback connections whose four sockets sock_ops has
 * seen (ztun's listener registered, ztun_fd_b marked, all inside the attached cgroup).
 * Direction 0 is A->B (what the engine reads from ztun_fd_a), 1 is B->A.
 *
 * Protocol the engine must keep for each direction of a pair (docs/sockmap.md):
 *   - relay_busy(dir, 1) BEFORE every recv() on the socket it reads for dir, and
 *     relay_busy(dir, 0) only when everything it read has been handed to send();
 *   - a new pair starts with both directions busy: clear them as soon as the engine's
 *     buffers are empty;
 *   - recv()/send() only, never splice() on these sockets;
 *   - forward FIN (shutdown(SHUT_WR)) as usual after its own buffer is empty;
 *   - pair_del() before closing the sockets;
 *   - pair_add sets SO_LINGER {1, 0} on both sockets, so that if ztun dies the kernel
 *     resets both apps instead of sending a FIN that would look like a clean end of a
 *     stream that partly bypassed ztun; before a graceful close() (both FINs relayed)
 *     the engine sets SO_LINGER {0, 0}, else close() discards its unsent bytes with a
 *     RST. Setting {1, 0} on every relayed socket at accept/connect gives the same
 *     guarantee to connections that are never paired.
 */
#define ZTUN_BPF_PAIR_KEEP_LINGER 0x1u /* do not set SO_LINGER {1, 0} on the two sockets */

/* pair_add returns -EAGAIN while app B's accepted socket does not exist yet (a loopback
 * connect() returns before the peer processes the final ACK): retry on the next event or
 * after ~1 ms; ZTUN_ENOTFOUND means a socket sock_ops will never see (outside the cgroup,
 * port not registered, ztun_fd_b not marked). */

int ztun_bpf_pair_add(ztun_bpf *h, int ztun_fd_a, int ztun_fd_b, uint32_t flags,
		      uint64_t *pair_id);
/* Ends the pair: when it returns no byte of the pair is redirected any more (both apps'
 * bytes take the relay path, behind everything already delivered) and final (may be NULL)
 * holds the pair's exact counters. */
int ztun_bpf_pair_del(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *final);
int ztun_bpf_pair_stats(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *out);
int ztun_bpf_relay_busy(ztun_bpf *h, uint64_t pair_id, unsigned dir, int busy);

/* ---- observation ---- */

int ztun_bpf_stats(ztun_bpf *h, uint64_t *out, size_t n);
const char *ztun_bpf_stat_name(unsigned idx);
/* Sockets currently in the sockhash (walks the map: diagnostics only). */
int ztun_bpf_socket_count(ztun_bpf *h);
/* Copy and consume buffered libbpf/loader log lines ("L message\n", L = E/W/I/D). */
size_t ztun_bpf_log_read(char *buf, size_t len);
const char *ztun_bpf_last_error(void);
const char *ztun_bpf_strerror(int err);

/* ---- cleanup of leftovers (ztund bpf cleanup) ----
 * Removes pins under pin_root (NULL: nothing), detaches links and legacy cgroup
 * attachments of programs named ztun_* (cgroup_root NULL: everywhere; else only those on
 * cgroups under it, and the sockmap links of their maps). report gets one line per object.
 * Returns the number of objects removed, or a negative error. */
#define ZTUN_BPF_CLEAN_PINS 0x1u
#define ZTUN_BPF_CLEAN_LINKS 0x2u
#define ZTUN_BPF_CLEAN_LEGACY 0x4u
int ztun_bpf_cleanup(const char *pin_root, const char *cgroup_root, uint32_t flags, char *report,
		     size_t len);

/* ---- the engine's view ---- */

#define ZTUN_BPF_API_ABI 1

struct ztun_bpf_api {
	uint32_t abi;  /* ZTUN_BPF_API_ABI */
	uint32_t size; /* sizeof(struct ztun_bpf_api) */
	int (*pair_add)(ztun_bpf *h, int ztun_fd_a, int ztun_fd_b, uint32_t flags,
			uint64_t *pair_id);
	int (*pair_del)(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *final);
	int (*pair_stats)(ztun_bpf *h, uint64_t pair_id, struct ztun_bpf_pair_stats *out);
	int (*relay_busy)(ztun_bpf *h, uint64_t pair_id, unsigned dir, int busy);
	int (*add_listener)(ztun_bpf *h, int listen_fd);
	int (*del_listener)(ztun_bpf *h, int listen_fd);
	uint32_t (*mark)(const ztun_bpf *h);
	const char *(*strerror)(int err);
};

const struct ztun_bpf_api *ztun_bpf_api(void);

/* ==================================================================== transparent capture
 *
 * (src/bpf/capture.c, ebpf/ztun_capture.bpf.c; docs/capture.md.) A captured workload is a
 * cgroup v2 (its processes) and a network namespace (where ztun listens for it):
 *   - its TCP connects are rewritten to ztun's outbound port in that namespace, which
 *     learns the original destination with getsockopt(SO_ORIGINAL_DST /
 *     IP6T_SO_ORIGINAL_DST), answered by a program on ztun's own cgroup;
 *   - new TCP connections arriving in the namespace are steered (sk_lookup) to ztun's HBONE
 *     listener (the HBONE port) or its plaintext listener (any other port), or refused
 *     while ztun does not listen.
 * With a pin directory every object outlives the process (fail closed: connects are
 * refused while ztun is away; a restarted ztun takes the pinned programs over with
 * bpf_link_update, without a gap); without one everything goes with the process.
 *
 * Threads: one control thread per handle.
 */
typedef struct ztun_capture ztun_capture;

/* ztun_capture_workload.flags */
#define ZTUN_CAPTURE_OUT4 0x1u /* capture IPv4 connects */
#define ZTUN_CAPTURE_OUT6 0x2u /* capture IPv6 connects (and IPv4-mapped ones) */
#define ZTUN_CAPTURE_IN 0x4u   /* steer inbound TCP to ztun (sk_lookup) */
#define ZTUN_CAPTURE_ALL 0x7u

/* Listener slots of a workload (ztun_capture_set_listener). */
#define ZTUN_CAPTURE_LSN_HBONE4 0
#define ZTUN_CAPTURE_LSN_HBONE6 1
#define ZTUN_CAPTURE_LSN_PLAIN4 2
#define ZTUN_CAPTURE_LSN_PLAIN6 3
#define ZTUN_CAPTURE_NLSN 4

#define ZTUN_CAPTURE_NAME_MAX 63 /* bytes of a workload name */
#define ZTUN_CAPTURE_MAX_SKIP 64 /* excluded ports per direction */

struct ztun_capture_config {
	const char *pin_dir;       /* on a bpffs; NULL: nothing pinned */
	const char *engine_cgroup; /* cgroup v2 of the process whose listeners ask for
				    * SO_ORIGINAL_DST (ztun's); NULL: this process's */
	uint32_t mark;             /* SO_MARK of ztun's sockets, never captured; 0: ZTUN_BPF_DEFAULT_MARK */
	uint32_t max_conns;        /* original destinations remembered at once; 0: 65536 */
	uint32_t max_workloads;    /* 0: 256 */
	uint32_t reserved;
};

struct ztun_capture_workload {
	const char *name;   /* unique key (registry, pins) */
	const char *cgroup; /* cgroup v2 directory of its processes (descendants included) */
	const char *netns;  /* its network namespace: /run/netns/<name>, /proc/<pid>/ns/net */
	uint32_t flags;     /* ZTUN_CAPTURE_* */
	uint16_t outbound_port; /* ztun's outbound listener in the namespace; 0: 15001 */
	uint16_t hbone_port;    /* inbound port steered to the HBONE listener; 0: 15008 */
	const uint16_t *skip_out; /* destination ports never captured */
	int nskip_out;
	const uint16_t *skip_in;  /* local ports never steered inbound */
	int nskip_in;
	int listen_fds[4]; /* ZTUN_CAPTURE_LSN_*: ztun's listening sockets in the namespace,
			    * -1 for none (inbound to a missing one is refused) */
};

int ztun_capture_open(const struct ztun_capture_config *cfg, ztun_capture **out);
/* Capture a workload (or take over its pinned capture after a restart). Listeners first,
 * then the namespace's settings, then the programs: connects are never rewritten to a
 * port that does not listen yet. Refuses a cgroup holding the engine's cgroup (a loop). */
int ztun_capture_add(ztun_capture *c, const struct ztun_capture_workload *w);
/* Replace one listener (fd -1: none). The socket must listen in the workload's namespace. */
int ztun_capture_set_listener(ztun_capture *c, const char *name, unsigned which, int listen_fd);
/* Stop capturing: detach and unpin its programs, forget its settings. The last one also
 * removes the shared programs and pinned maps: nothing of capture is left. */
int ztun_capture_remove(ztun_capture *c, const char *name);
/* Names of captured workloads (also those pinned by an earlier process), one per line. */
int ztun_capture_list(ztun_capture *c, char *buf, size_t len);
int ztun_capture_stats(ztun_capture *c, uint64_t *out, size_t n);
const char *ztun_capture_stat_name(unsigned idx);
/* The engine's side of source preservation: before connect() to a captured app,
 * setsockopt(fd, SOL_IP or SOL_IPV6, ZTUN_CAPTURE_SO_ORIGINAL_SRC, &client_sockaddr, len)
 * makes the app's accept()/getpeername() show the client (a program on ztun's cgroup takes
 * the call; without capture it fails with ENOPROTOOPT, harmless). */
#define ZTUN_CAPTURE_SO_ORIGINAL_SRC 0x7a74

/* What the last failing ztun_capture_* call of this thread did wrong (capture's own
 * buffer: ztun_bpf_last_error() is the sockmap loader's). */
const char *ztun_capture_last_error(void);
/* The netns cookie of a network namespace path (what the programs key it by). */
int ztun_capture_netns_cookie(const char *netns, uint64_t *cookie);
/* Let go of the handle. Pinned objects stay (and keep capturing: fail closed); unpinned
 * ones are detached. NULL is fine. */
void ztun_capture_close(ztun_capture *c);

#define ZTUN_CAPTURE_NSTATS 17

#ifdef __cplusplus
}
#endif

#endif /* ZTUN_BPF_H */
