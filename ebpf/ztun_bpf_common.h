/* SPDX-License-Identifier: Apache-2.0 OR BSD-2-Clause */
/*
 * ztun_bpf_common.h - the only header shared by the BPF programs (ebpf/ztun.bpf.c, after
 * vmlinux.h) and user space (src/bpf/loader.c, after <linux/types.h>).
 *
 * Fixed-width __u types only; every struct is padded explicitly so both compilers agree on
 * its layout, and the sizes are checked at build time in the loader.
 */
#ifndef ZTUN_BPF_COMMON_H
#define ZTUN_BPF_COMMON_H

/* Bumped whenever a struct below changes layout (pinned maps of an older run are refused). */
#define ZTUN_BPF_LAYOUT 1

/*
 * One TCP socket as seen from itself. IPv4 (and IPv4-mapped IPv6) is stored as family
 * AF_INET with the address in local[0]/remote[0] (network order) and zeros elsewhere, so a
 * dual-stack socket and a plain IPv4 socket of the same connection produce mirrored keys.
 * netns is bpf_get_netns_cookie() / SO_NETNS_COOKIE: two namespaces may reuse one 4-tuple.
 */
struct ztun_sock_key {
	__u64 netns;
	__u32 local[4];
	__u32 remote[4];
	__u16 lport; /* host order */
	__u16 rport; /* host order */
	__u16 family;
	__u16 pad;
};

/*
 * An address of a same-node app in another network namespace of this host (key of
 * ztun_local_addrs; ztund's workloads each have their own). Encoded as the remote half of
 * ztun_sock_key: IPv4 in addr[0], network order.
 */
struct ztun_addr_key {
	__u32 addr[4];
	__u16 family;
	__u16 pad[3];
};

/* Where a socket of ztun_socks lives (value of ztun_sockinfo, written by sock_ops). */
struct ztun_sockinfo {
	__u64 addr;   /* kernel address of the struct sock */
	__u64 cookie; /* its socket cookie, to detect reuse of the object */
};

/* A port on which ztun listens, in one network namespace: connections to it are ztun hops. */
struct ztun_port_key {
	__u64 netns;
	__u16 port; /* host order */
	__u16 pad[3];
};

/*
 * Route of one app socket of a same-node pair (value of ztun_routes, keyed by the app
 * socket's own key). The sender's bytes go straight into target's receive queue when the
 * relay path  sender -> near (ztun) -> engine buffer -> far (ztun) -> target  is empty.
 */
struct ztun_route {
	struct ztun_sock_key target; /* the other app socket */
	struct ztun_sock_key near;   /* ztun's socket connected to the sender */
	struct ztun_sock_key far;    /* ztun's socket connected to the target */
	__u64 target_cookie;         /* socket cookies at pair_add: a key reused by a later */
	__u64 near_cookie;           /* connection (same 4-tuple) is not the socket meant */
	__u64 far_cookie;
	__u32 slot;                  /* index in ztun_pairs */
	__u32 dir;                   /* 0: A->B (A = peer of the first ztun socket), 1: B->A */
	__u32 gen;                   /* must equal ztun_pairs[slot].gen, else the route is stale */
	__u32 pad;
};

/*
 * Per-pair state, one slot of the mmap-able array ztun_pairs (two cache lines, so pairs
 * served by different CPUs do not share one). busy[] is written by the engine through the
 * mmap (no system call); inflight and the counters by the sk_msg program.
 */
struct ztun_pair_slot {
	__u32 busy[2];          /* non-zero while the engine holds relay bytes of that direction */
	__u32 gen;              /* bumped by user space on add and on del */
	__u32 state;            /* enum ztun_pair_state */
	__u32 inflight;         /* verdicts of this pair running now: pair_del waits for 0 */
	__u32 pad;
	__u64 direct_bytes[2];  /* bytes redirected app -> app */
	__u64 direct_msgs[2];   /* sk_msg verdicts that redirected app -> app */
	__u64 fallback_msgs[2]; /* verdicts that left the bytes on the relay path */
	__u64 reserved[7];
};

enum ztun_pair_state {
	ZTUN_PAIR_FREE = 0,
	ZTUN_PAIR_ACTIVE = 1,
};

/* Global counters (per-CPU array ztun_stats). */
enum ztun_stat {
	ZTUN_STAT_SOCKOPS_INSERT = 0, /* sockets put into the sockhash by sock_ops */
	ZTUN_STAT_SOCKOPS_ERR,        /* ... and refused (map full, duplicate key) */
	ZTUN_STAT_HOP_REDIRECT,       /* app<->ztun hop: message redirected to the peer */
	ZTUN_STAT_HOP_ORDER,          /* ... left on TCP: older bytes still on the TCP path */
	ZTUN_STAT_HOP_CAP,            /* ... left on TCP: the peer already holds ingress_cap */
	ZTUN_STAT_HOP_MISS,           /* peer not in the sockhash: plain TCP */
	ZTUN_STAT_PAIR_REDIRECT,      /* app->app message redirected */
	ZTUN_STAT_PAIR_ORDER,         /* app->app fallback: relay path not empty */
	ZTUN_STAT_PAIR_CAP,           /* app->app fallback: target holds ingress_cap */
	ZTUN_STAT_PAIR_STALE,         /* route of a deleted pair seen */
	ZTUN_STAT_PAIR_WAIT_NEAR,     /* ... PAIR_ORDER because of stages 1-2 (sender -> engine) */
	ZTUN_STAT_PAIR_WAIT_BUSY,     /* ... stage 3 (engine's buffer) */
	ZTUN_STAT_PAIR_WAIT_FAR,      /* ... stages 4-5 (engine -> target) */
	ZTUN_STAT_MAX,
};

/* ------------------------------------------------------------------ transparent capture
 * (ebpf/ztun_capture.bpf.c, src/bpf/capture.c). Own layout version: pinned capture maps of
 * an older layout are refused at load. */
#define ZTUN_CAP_LAYOUT 1

/* ztun_cap_ns.flags: what is captured in one network namespace. */
#define ZTUN_CAP_F_OUT4 0x1u /* rewrite IPv4 TCP connects to the outbound port */
#define ZTUN_CAP_F_OUT6 0x2u /* rewrite IPv6 TCP connects (v4-mapped ones too) */
#define ZTUN_CAP_F_IN 0x4u   /* steer inbound TCP to ztun's listeners (sk_lookup) */

/* Per captured network namespace (value of ztun_cap_ns, keyed by its netns cookie). */
struct ztun_cap_ns {
	__u32 out_ip6[4]; /* rewrite target of IPv6 connects (::1), network order */
	__u32 out_ip4;    /* rewrite target of IPv4 connects (127.0.0.1), network order */
	__u16 out_port;   /* ztun's outbound port (15001), host order */
	__u16 hbone_port; /* inbound port steered to ztun's HBONE listener (15008), host order */
	__u32 flags;      /* ZTUN_CAP_F_* */
	__u32 slot;       /* listeners: ztun_cap_lsn[slot * ZTUN_CAP_LSN_PER_SLOT + ...] */
};

/* Listener index within a slot: kind * 2 + (family == AF_INET6). */
#define ZTUN_CAP_LSN_HBONE 0
#define ZTUN_CAP_LSN_PLAIN 1
#define ZTUN_CAP_LSN_PER_SLOT 4

/* A port that is never captured in one namespace (key of ztun_cap_skip). */
#define ZTUN_CAP_DIR_OUT 0 /* destination port of outgoing connects */
#define ZTUN_CAP_DIR_IN 1  /* local port of incoming connections */
struct ztun_cap_skip_key {
	__u64 netns;
	__u16 port; /* host order */
	__u8 dir;   /* ZTUN_CAP_DIR_* */
	__u8 pad[5];
};

/* The destination an app dialled before connect4/6 rewrote it (network order). An app that
 * dialled a v4-mapped address (::ffff:a.b.c.d on an IPv6 socket) is stored as AF_INET with
 * ZTUN_CAP_DST_MAPPED, so the IPv4 listener's SO_ORIGINAL_DST gets a sockaddr_in. */
#define ZTUN_CAP_DST_MAPPED 0x1u
struct ztun_cap_dst {
	__u32 ip[4];  /* AF_INET: ip[0] */
	__u16 port;   /* network order */
	__u16 family; /* AF_INET or AF_INET6 */
	__u32 flags;  /* ZTUN_CAP_DST_* */
};

/* setsockopt(SOL_IP or SOL_IPV6, ZTUN_SO_ORIGINAL_SRC, &sockaddr, len) on ztun's socket to
 * a captured app, before connect(), names the client the connection is for: answered by
 * ztun's cgroup/setsockopt program, never by the kernel; the app's accept() and
 * getpeername() then show that client. ("zt": an optname no kernel has.) */
#define ZTUN_SO_ORIGINAL_SRC 0x7a74

/* A captured workload, by name (registry ztun_cap_wl, read by user space only: it is what
 * a restarted ztund finds in the pinned maps). */
#define ZTUN_CAP_NAME_MAX 64
struct ztun_cap_wl_key {
	char name[ZTUN_CAP_NAME_MAX];
};
struct ztun_cap_wl {
	__u64 netns_cookie;
	__u64 netns_ino;
	__u64 cgroup_id;
	__u32 slot;
	__u32 flags; /* ZTUN_CAP_F_* */
};

enum ztun_cap_stat {
	ZTUN_CAP_STAT_REWRITE4 = 0,  /* IPv4 connects sent to ztun's outbound port */
	ZTUN_CAP_STAT_REWRITE6,      /* IPv6 (and v4-mapped) connects sent there */
	ZTUN_CAP_STAT_SKIP_LOCAL,    /* loopback / unspecified destinations: left alone */
	ZTUN_CAP_STAT_SKIP_PORT,     /* destination port excluded */
	ZTUN_CAP_STAT_SKIP_MARK,     /* ztun's own (marked) sockets */
	ZTUN_CAP_STAT_STORE_ERR,     /* original destination not stored: connect refused */
	ZTUN_CAP_STAT_PAIR_STORED,   /* sock_ops: original destination keyed by 4-tuple */
	ZTUN_CAP_STAT_ORIG_HIT,      /* getsockopt(SO_ORIGINAL_DST) answered */
	ZTUN_CAP_STAT_ORIG_MISS,     /* ... asked for a socket we know nothing of */
	ZTUN_CAP_STAT_PEERNAME,      /* getpeername() shown the original peer */
	ZTUN_CAP_STAT_IN_HBONE,      /* sk_lookup: steered to ztun's HBONE listener */
	ZTUN_CAP_STAT_IN_PLAIN,      /* sk_lookup: steered to ztun's plaintext listener */
	ZTUN_CAP_STAT_IN_LOCAL,      /* sk_lookup: from loopback (ztun delivering): left alone */
	ZTUN_CAP_STAT_IN_SKIP_PORT,  /* sk_lookup: local port excluded */
	ZTUN_CAP_STAT_IN_REFUSED,    /* sk_lookup: ztun not listening: refused (fail closed) */
	ZTUN_CAP_STAT_SRC_STORED,    /* setsockopt(ZTUN_SO_ORIGINAL_SRC) filed */
	ZTUN_CAP_STAT_SRC_SHOWN,     /* an app's accept()/getpeername() shown the client */
	ZTUN_CAP_STAT_MAX,
};

#endif /* ZTUN_BPF_COMMON_H */
