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

#endif /* ZTUN_BPF_COMMON_H */
