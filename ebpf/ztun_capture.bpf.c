// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * ztun_capture.bpf.c - transparent capture of a workload's TCP traffic, without iptables.
 *
 * A workload is (cgroup v2, network namespace). ztun serves it with listeners inside its
 * namespace: outbound (15001), HBONE (15008) and plaintext inbound (15006).
 *
 * Outbound, on the workload's cgroup:
 *   cgroup/connect4, cgroup/connect6  rewrite a TCP connect to ztun's outbound port in the
 *       same namespace (127.0.0.1 / ::1), keeping what the app dialled in ztun_cap_orig
 *       (keyed by socket cookie);
 *   sockops (TCP_CONNECT_CB)  once the source port is chosen, before the SYN leaves, files
 *       the original destination under the connection's 4-tuple (ztun_cap_pair), which is
 *       what ztun's accepted socket sees; forgets it when the app's socket reaches CLOSE;
 *   cgroup/getpeername4/6  show the app the peer it dialled;
 *   cgroup/sock_release  forget the socket cookie.
 * On ztun's own cgroup:
 *   cgroup/getsockopt  answers getsockopt(SOL_IP, SO_ORIGINAL_DST) and
 *       getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) from ztun_cap_pair, so ztun (or any
 *       proxy written for iptables REDIRECT) learns the original destination unchanged;
 *   cgroup/setsockopt  takes setsockopt(ZTUN_SO_ORIGINAL_SRC) on ztun's socket to a captured
 *       app, before connect(); sockops (attached here too) files it under the 4-tuple at
 *       TCP_CONNECT_CB; the app's accept()/getpeername() then show that client, not ztun
 *       (the getpeername hooks above, which accept() runs too).
 * Inbound, on the workload's network namespace:
 *   sk_lookup  steers a new TCP connection to the HBONE port to ztun's HBONE listener and
 *       any other one (not made inside the namespace) to ztun's plaintext listener; the accepted socket
 *       keeps the packet's addresses, so getsockname() is the original destination and
 *       getpeername() the original source. With no ztun listener the connection is refused
 *       (fail closed). One instance of this program is loaded per namespace, with its
 *       netns cookie in lookup_netns (sk_lookup programs cannot call bpf_get_netns_cookie).
 *
 * ztun's own sockets are not captured: they live in another cgroup, and sockets carrying
 * ztun's SO_MARK are skipped even inside a captured cgroup. UDP is left alone.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "ztun_bpf_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define IP6T_SO_ORIGINAL_DST 80
#define LOOPBACK_IFINDEX 1 /* lo is ifindex 1 in every network namespace */

/* Knobs, set by the loader before load. */
const volatile __u32 ztun_mark = 0;     /* SO_MARK of ztun's own sockets (0: none) */
const volatile __u64 lookup_netns = 0;  /* sk_lookup instance: its namespace's cookie */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256); /* resized by the loader (max_workloads) */
	__type(key, __u64);
	__type(value, struct ztun_cap_ns);
} ztun_cap_ns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ztun_cap_skip_key);
	__type(value, __u8);
} ztun_cap_skip SEC(".maps");

/* Socket cookie of a rewritten app socket -> what it dialled (LRU: a socket whose release
 * we never see ages out instead of filling the map). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* resized by the loader (max_conns) */
	__type(key, __u64);
	__type(value, struct ztun_cap_dst);
} ztun_cap_orig SEC(".maps");

/* The app socket's 4-tuple (as seen by the app) -> what it dialled. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* resized by the loader (max_conns) */
	__type(key, struct ztun_sock_key);
	__type(value, struct ztun_cap_dst);
} ztun_cap_pair SEC(".maps");

/* ztun's socket to a captured app (its 4-tuple as ztun sees it) -> the client it carries,
 * filed by setsockopt(ZTUN_SO_ORIGINAL_SRC), shown by the app's getpeername()/accept(). LRU:
 * the app's socket release cannot read its addresses; a reused 4-tuple is filed again. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* resized by the loader (max_conns) */
	__type(key, struct ztun_sock_key);
	__type(value, struct ztun_cap_dst);
} ztun_cap_src SEC(".maps");

/* The client ztun named for one of its sockets before connect() (setsockopt): sock_ops
 * files it under the 4-tuple at TCP_CONNECT_CB, before the SYN leaves, so the app can
 * never accept the connection before its client is known. Freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ztun_cap_dst);
} ztun_cap_tag SEC(".maps");

/* ztun's listening sockets, ZTUN_CAP_LSN_PER_SLOT per captured namespace. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1024); /* resized by the loader */
	__type(key, __u32);
	__type(value, __u64);
} ztun_cap_lsn SEC(".maps");

/* Registry of captured workloads by name: user space only (restart, reconcile). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256); /* resized by the loader (max_workloads) */
	__type(key, struct ztun_cap_wl_key);
	__type(value, struct ztun_cap_wl);
} ztun_cap_wl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZTUN_CAP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ztun_cap_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ztun_cap_stats, &idx);

	if (v)
		*v += 1;
}

/* 32-bit ctx loads: clang would otherwise narrow them, which the ctx rewriter refuses. */
#define RD32(x) (*(volatile __u32 *)&(x))

static __always_inline int v4_loopback(__u32 ip)
{
	return (ip & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

static __always_inline int v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int v6_local(const __u32 *a)
{
	/* :: and ::1 */
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == 0 || a[3] == bpf_htonl(1));
}

static __always_inline int port_skipped(__u64 netns, __u16 port, __u8 dir)
{
	struct ztun_cap_skip_key k = {};

	k.netns = netns;
	k.port = port;
	k.dir = dir;
	return bpf_map_lookup_elem(&ztun_cap_skip, &k) != NULL;
}

/* ztun's own sockets opt out with their mark, even inside a captured cgroup. The low 16
 * bits only: each live sockmap accelerator marks k << 16 | 0x7a74 (docs/sockmap.md §7). */
static __always_inline int is_ztun_socket(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	return ztun_mark && sk && (sk->mark & 0xffff) == (ztun_mark & 0xffff);
}

/* ------------------------------------------------------------------ outbound */

/* Record what the app dialled; 0 when that failed (the connect is then refused: a capture
 * that cannot recover the destination must not hand ztun a connection it cannot route). */
static __always_inline int remember(struct bpf_sock_addr *ctx, struct ztun_cap_dst *d)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (bpf_map_update_elem(&ztun_cap_orig, &cookie, d, BPF_ANY)) {
		stat_inc(ZTUN_CAP_STAT_STORE_ERR);
		return 0;
	}
	return 1;
}

SEC("cgroup/connect4")
int ztun_cap_conn4(struct bpf_sock_addr *ctx)
{
	struct ztun_cap_dst d = {};
	struct ztun_cap_ns *ns;
	__u64 netns;
	__u32 dip = ctx->user_ip4;
	__u16 dport = (__u16)ctx->user_port;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	ns = bpf_map_lookup_elem(&ztun_cap_ns, &netns);
	if (!ns || !(ns->flags & ZTUN_CAP_F_OUT4))
		return 1;
	if (is_ztun_socket(ctx)) {
		stat_inc(ZTUN_CAP_STAT_SKIP_MARK);
		return 1;
	}
	if (dip == 0 || v4_loopback(dip)) {
		stat_inc(ZTUN_CAP_STAT_SKIP_LOCAL);
		return 1;
	}
	if (port_skipped(netns, bpf_ntohs(dport), ZTUN_CAP_DIR_OUT)) {
		stat_inc(ZTUN_CAP_STAT_SKIP_PORT);
		return 1;
	}
	d.family = AF_INET;
	d.ip[0] = dip;
	d.port = dport;
	if (!remember(ctx, &d))
		return 0;
	ctx->user_ip4 = ns->out_ip4;
	ctx->user_port = bpf_htons(ns->out_port);
	stat_inc(ZTUN_CAP_STAT_REWRITE4);
	return 1;
}

SEC("cgroup/connect6")
int ztun_cap_conn6(struct bpf_sock_addr *ctx)
{
	struct ztun_cap_dst d = {};
	struct ztun_cap_ns *ns;
	__u64 netns;
	__u32 a[4];
	__u16 dport = (__u16)ctx->user_port;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	ns = bpf_map_lookup_elem(&ztun_cap_ns, &netns);
	if (!ns || !(ns->flags & ZTUN_CAP_F_OUT6))
		return 1;
	if (is_ztun_socket(ctx)) {
		stat_inc(ZTUN_CAP_STAT_SKIP_MARK);
		return 1;
	}
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	if (v6_local(a) || (v4_mapped(a) && (a[3] == 0 || v4_loopback(a[3])))) {
		stat_inc(ZTUN_CAP_STAT_SKIP_LOCAL);
		return 1;
	}
	if (port_skipped(netns, bpf_ntohs(dport), ZTUN_CAP_DIR_OUT)) {
		stat_inc(ZTUN_CAP_STAT_SKIP_PORT);
		return 1;
	}
	d.port = dport;
	if (v4_mapped(a)) {
		/* The kernel connects this socket with IPv4 (tcp_v4_connect, which runs no
		 * connect4 hook): send it to the IPv4 listener, as ::ffff:127.0.0.1. */
		d.family = AF_INET;
		d.flags = ZTUN_CAP_DST_MAPPED;
		d.ip[0] = a[3];
		if (!remember(ctx, &d))
			return 0;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = ns->out_ip4;
	} else {
		d.family = AF_INET6;
		d.ip[0] = a[0];
		d.ip[1] = a[1];
		d.ip[2] = a[2];
		d.ip[3] = a[3];
		if (!remember(ctx, &d))
			return 0;
		ctx->user_ip6[0] = ns->out_ip6[0];
		ctx->user_ip6[1] = ns->out_ip6[1];
		ctx->user_ip6[2] = ns->out_ip6[2];
		ctx->user_ip6[3] = ns->out_ip6[3];
	}
	ctx->user_port = bpf_htons(ns->out_port);
	stat_inc(ZTUN_CAP_STAT_REWRITE6);
	return 1;
}

/* The app socket's 4-tuple as the app sees it; IPv4-mapped sockets are keyed as IPv4 (the
 * IPv4 listener's accepted socket sees them so). 0 if the family is not ours. */
static __always_inline int app_key(struct ztun_sock_key *k, struct bpf_sock_ops *ops)
{
	__u32 family = ops->family;

	k->netns = bpf_get_netns_cookie(ops);
	k->lport = (__u16)RD32(ops->local_port);
	k->rport = bpf_ntohs((__u16)(RD32(ops->remote_port) >> 16));
	if (family == AF_INET) {
		k->family = AF_INET;
		k->local[0] = ops->local_ip4;
		k->remote[0] = ops->remote_ip4;
		return 1;
	}
	if (family != AF_INET6)
		return 0;
	k->remote[0] = ops->remote_ip6[0];
	k->remote[1] = ops->remote_ip6[1];
	k->remote[2] = ops->remote_ip6[2];
	k->remote[3] = ops->remote_ip6[3];
	if (v4_mapped(k->remote)) {
		k->family = AF_INET;
		k->remote[0] = k->remote[3];
		k->remote[1] = k->remote[2] = k->remote[3] = 0;
		k->local[0] = ops->local_ip6[3];
		return 1;
	}
	k->family = AF_INET6;
	k->local[0] = ops->local_ip6[0];
	k->local[1] = ops->local_ip6[1];
	k->local[2] = ops->local_ip6[2];
	k->local[3] = ops->local_ip6[3];
	return 1;
}

SEC("sockops")
int ztun_cap_sockops(struct bpf_sock_ops *ops)
{
	struct ztun_sock_key k = {};
	struct ztun_cap_dst *d;
	struct ztun_cap_ns *ns;
	__u64 cookie;
	__u32 op = ops->op;

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* The source port is chosen, the SYN not sent yet: the peer cannot accept the
		 * connection before the entry exists. */
		cookie = bpf_get_socket_cookie(ops);
		d = bpf_map_lookup_elem(&ztun_cap_orig, &cookie);
		if (!d) {
			/* ztun's own socket (this program also hooks ztun's cgroup), to an app
			 * it delivers a client to: file the client it was tagged with. */
			struct bpf_sock *sk = ops->sk;

			if (!sk)
				return 1;
			d = bpf_sk_storage_get(&ztun_cap_tag, sk, 0, 0);
			if (d && app_key(&k, ops) &&
			    bpf_map_update_elem(&ztun_cap_src, &k, d, BPF_ANY) == 0)
				stat_inc(ZTUN_CAP_STAT_SRC_STORED);
			return 1;
		}
		if (!app_key(&k, ops))
			return 1;
		if (bpf_map_update_elem(&ztun_cap_pair, &k, d, BPF_ANY) == 0)
			stat_inc(ZTUN_CAP_STAT_PAIR_STORED);
		/* Tell us when it closes, to forget the 4-tuple. */
		bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	if (op == BPF_SOCK_OPS_STATE_CB && ops->args[1] == BPF_TCP_CLOSE) {
		/* Only when the app's socket is gone (CLOSE, after FIN_WAIT or a reset) may the
		 * entry go: ztun may accept the connection well after the app closed it. Other
		 * programs may have asked for state callbacks on other sockets: only sockets
		 * connected to ztun's outbound port were filed. */
		if (!app_key(&k, ops))
			return 1;
		ns = bpf_map_lookup_elem(&ztun_cap_ns, &k.netns);
		if (ns && k.rport == ns->out_port)
			bpf_map_delete_elem(&ztun_cap_pair, &k);
	}
	return 1;
}

/*
 * The 4-tuple of a connection between ztun and an app as ztun's end sees it, from ztun's
 * socket (app == 0) or from the app's (app == 1: reversed). IPv4-mapped IPv6 is filed as
 * IPv4, so a dual-stack socket and an IPv4 one agree.
 */
static __always_inline void ztun_end_key(struct ztun_sock_key *k, struct bpf_sock *sk, int app)
{
	__u32 a[4], b[4];

	k->lport = app ? bpf_ntohs(sk->dst_port) : (__u16)sk->src_port;
	k->rport = app ? (__u16)sk->src_port : bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET) {
		k->family = AF_INET;
		k->local[0] = app ? sk->dst_ip4 : sk->src_ip4;
		k->remote[0] = app ? sk->src_ip4 : sk->dst_ip4;
		return;
	}
	a[0] = sk->src_ip6[0];
	a[1] = sk->src_ip6[1];
	a[2] = sk->src_ip6[2];
	a[3] = sk->src_ip6[3];
	b[0] = sk->dst_ip6[0];
	b[1] = sk->dst_ip6[1];
	b[2] = sk->dst_ip6[2];
	b[3] = sk->dst_ip6[3];
	if (v4_mapped(a)) {
		k->family = AF_INET;
		k->local[0] = app ? b[3] : a[3];
		k->remote[0] = app ? a[3] : b[3];
		return;
	}
	k->family = AF_INET6;
	for (int i = 0; i < 4; i++) {
		k->local[i] = app ? b[i] : a[i];
		k->remote[i] = app ? a[i] : b[i];
	}
}

/*
 * The client ztun named for this socket of the app's (one ztun connected to, and tagged):
 * keyed by the socket's 4-tuple as ztun's end sees it. Sockets of a captured cgroup only.
 */
static __always_inline struct ztun_cap_dst *delivered_for(struct bpf_sock_addr *ctx)
{
	struct ztun_sock_key k = {};
	struct bpf_sock *sk = ctx->sk;
	struct ztun_cap_dst *d;

	if (!sk)
		return NULL;
	k.netns = bpf_get_netns_cookie(ctx);
	ztun_end_key(&k, sk, 1); /* ztun's end is this socket's peer */
	d = bpf_map_lookup_elem(&ztun_cap_src, &k);
	if (d)
		stat_inc(ZTUN_CAP_STAT_SRC_SHOWN);
	return d;
}

SEC("cgroup/getpeername4")
int ztun_cap_peer4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ztun_cap_dst *d = bpf_map_lookup_elem(&ztun_cap_orig, &cookie);

	if (d)
		stat_inc(ZTUN_CAP_STAT_PEERNAME);
	else
		d = delivered_for(ctx);
	if (d && d->family == AF_INET) {
		ctx->user_ip4 = d->ip[0];
		ctx->user_port = d->port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int ztun_cap_peer6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ztun_cap_dst *d = bpf_map_lookup_elem(&ztun_cap_orig, &cookie);

	if (d)
		stat_inc(ZTUN_CAP_STAT_PEERNAME);
	else
		d = delivered_for(ctx);
	if (!d)
		return 1;
	if (d->family == AF_INET6) {
		ctx->user_ip6[0] = d->ip[0];
		ctx->user_ip6[1] = d->ip[1];
		ctx->user_ip6[2] = d->ip[2];
		ctx->user_ip6[3] = d->ip[3];
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = d->ip[0];
	}
	ctx->user_port = d->port;
	return 1;
}

SEC("cgroup/sock_release")
int ztun_cap_release(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_socket_cookie(sk);

	/* The 4-tuple entry stays until the TCP connection itself is closed (sock_ops). A
	 * lookup first: most sockets released here were never rewritten, and a miss costs no
	 * bucket lock. */
	if (bpf_map_lookup_elem(&ztun_cap_orig, &cookie))
		bpf_map_delete_elem(&ztun_cap_orig, &cookie);
	return 1;
}

struct sockaddr_in_ {
	__u16 sin_family;
	__u16 sin_port;
	__u32 sin_addr;
	__u8 zero[8];
};

struct sockaddr_in6_ {
	__u16 sin6_family;
	__u16 sin6_port;
	__u32 sin6_flowinfo;
	__u32 sin6_addr[4];
	__u32 sin6_scope_id;
};

/*
 * ztun's accepted socket: its peer is the app's socket, its local address the outbound
 * listener. The iptables answer is the pre-NAT destination: a sockaddr_in for SOL_IP, a
 * sockaddr_in6 for SOL_IPV6. Anything else keeps the kernel's own result.
 */
SEC("cgroup/getsockopt")
int ztun_cap_getsockopt(struct bpf_sockopt *ctx)
{
	struct ztun_sock_key k = {};
	struct ztun_cap_dst *d;
	struct bpf_sock *sk;
	int v6;

	if (ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST)
		v6 = 0;
	else if (ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST)
		v6 = 1;
	else
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	k.netns = bpf_get_netns_cookie(ctx);
	/* App's view: its local end is our peer, its remote end is us. */
	k.lport = bpf_ntohs(sk->dst_port);
	k.rport = (__u16)sk->src_port;
	if (sk->family == AF_INET) {
		k.family = AF_INET;
		k.local[0] = sk->dst_ip4;
		k.remote[0] = sk->src_ip4;
	} else if (sk->family == AF_INET6) {
		k.local[0] = sk->dst_ip6[0];
		k.local[1] = sk->dst_ip6[1];
		k.local[2] = sk->dst_ip6[2];
		k.local[3] = sk->dst_ip6[3];
		k.remote[0] = sk->src_ip6[0];
		k.remote[1] = sk->src_ip6[1];
		k.remote[2] = sk->src_ip6[2];
		k.remote[3] = sk->src_ip6[3];
		if (v4_mapped(k.local)) {
			k.family = AF_INET;
			k.local[0] = k.local[3];
			k.remote[0] = k.remote[3];
			k.local[1] = k.local[2] = k.local[3] = 0;
			k.remote[1] = k.remote[2] = k.remote[3] = 0;
		} else {
			k.family = AF_INET6;
		}
	} else {
		return 1;
	}
	d = bpf_map_lookup_elem(&ztun_cap_pair, &k);
	if (!d) {
		stat_inc(ZTUN_CAP_STAT_ORIG_MISS);
		return 1;
	}
	if (!v6) {
		struct sockaddr_in_ *sin = ctx->optval;

		if (d->family != AF_INET || (void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->sin_family = AF_INET;
		sin->sin_port = d->port;
		sin->sin_addr = d->ip[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6_ *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = d->port;
		sin6->sin6_flowinfo = 0;
		sin6->sin6_scope_id = 0;
		if (d->family == AF_INET6) {
			sin6->sin6_addr[0] = d->ip[0];
			sin6->sin6_addr[1] = d->ip[1];
			sin6->sin6_addr[2] = d->ip[2];
			sin6->sin6_addr[3] = d->ip[3];
		} else {
			sin6->sin6_addr[0] = 0;
			sin6->sin6_addr[1] = 0;
			sin6->sin6_addr[2] = bpf_htonl(0xffff);
			sin6->sin6_addr[3] = d->ip[0];
		}
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	stat_inc(ZTUN_CAP_STAT_ORIG_HIT);
	return 1;
}

/*
 * ztun names the client a connection to a captured app is for: setsockopt(SOL_IP or
 * SOL_IPV6, ZTUN_SO_ORIGINAL_SRC, sockaddr) on its socket before connect(). Kept with the
 * socket, never passed to the kernel (optlen -1); any other option is the kernel's.
 */
SEC("cgroup/setsockopt")
int ztun_cap_setsockopt(struct bpf_sockopt *ctx)
{
	struct ztun_sock_key k = {};
	struct ztun_cap_dst d = {};
	struct bpf_sock *sk;
	__u16 *fam;

	if ((ctx->level != SOL_IP && ctx->level != SOL_IPV6) ||
	    ctx->optname != ZTUN_SO_ORIGINAL_SRC)
		return 1;
	sk = ctx->sk;
	fam = ctx->optval;
	if (!sk || (void *)(fam + 1) > ctx->optval_end)
		return 0; /* EPERM: a malformed tag is not passed to the kernel either */
	if (*fam == AF_INET) {
		struct sockaddr_in_ *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end)
			return 0;
		d.family = AF_INET;
		d.ip[0] = sin->sin_addr;
		d.port = sin->sin_port;
	} else if (*fam == AF_INET6) {
		struct sockaddr_in6_ *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 0;
		d.port = sin6->sin6_port;
		if (v4_mapped(sin6->sin6_addr)) {
			d.family = AF_INET;
			d.flags = ZTUN_CAP_DST_MAPPED;
			d.ip[0] = sin6->sin6_addr[3];
		} else {
			d.family = AF_INET6;
			d.ip[0] = sin6->sin6_addr[0];
			d.ip[1] = sin6->sin6_addr[1];
			d.ip[2] = sin6->sin6_addr[2];
			d.ip[3] = sin6->sin6_addr[3];
		}
	} else {
		return 0;
	}
	/* Before connect() (the way to use it): kept with the socket for sock_ops. */
	if (!bpf_sk_storage_get(&ztun_cap_tag, sk, &d, BPF_SK_STORAGE_GET_F_CREATE))
		return 0;
	ctx->optlen = -1; /* handled: the kernel's setsockopt is skipped, the call returns 0 */
	if (!sk->dst_port)
		return 1;
	/* After connect() started: filed under the 4-tuple now (the app may have accepted
	 * already: tag before connect()). ztun's end: this socket's own 4-tuple. */
	k.netns = bpf_get_netns_cookie(ctx);
	ztun_end_key(&k, sk, 0);
	if (bpf_map_update_elem(&ztun_cap_src, &k, &d, BPF_ANY) == 0)
		stat_inc(ZTUN_CAP_STAT_SRC_STORED);
	return 1;
}

/* ------------------------------------------------------------------ inbound */

/*
 * A connection made inside the namespace to one of its own addresses. Over 127/8 or ::1 it
 * arrives on lo; to a workload address it is reported on the interface owning that address
 * (as if from outside), but its source is then the destination itself (the kernel's choice
 * for a local route, unless the socket was bound elsewhere). From outside, a packet with
 * one of our addresses as source is a martian for IPv4 (dropped unless accept_local), and
 * over IPv6 a blind spoof cannot complete a handshake.
 */
static __always_inline int from_self(struct bpf_sk_lookup *ctx)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	if (ctx->family == AF_INET)
		return ctx->remote_ip4 == ctx->local_ip4;
	return ctx->remote_ip6[0] == ctx->local_ip6[0] && ctx->remote_ip6[1] == ctx->local_ip6[1] &&
	       ctx->remote_ip6[2] == ctx->local_ip6[2] && ctx->remote_ip6[3] == ctx->local_ip6[3];
}

SEC("sk_lookup")
int ztun_cap_lookup(struct bpf_sk_lookup *ctx)
{
	__u64 netns = lookup_netns;
	struct ztun_cap_ns *ns;
	struct bpf_sock *sk;
	__u32 port = ctx->local_port, key, kind;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	ns = bpf_map_lookup_elem(&ztun_cap_ns, &netns);
	if (!ns || !(ns->flags & ZTUN_CAP_F_IN))
		return SK_PASS;
	if (port == ns->hbone_port) {
		kind = ZTUN_CAP_LSN_HBONE;
	} else {
		/* From inside the namespace: the workload talking to itself, or ztun
		 * delivering a connection it has already authorized. */
		if (from_self(ctx)) {
			stat_inc(ZTUN_CAP_STAT_IN_LOCAL);
			return SK_PASS;
		}
		if (port_skipped(netns, (__u16)port, ZTUN_CAP_DIR_IN)) {
			stat_inc(ZTUN_CAP_STAT_IN_SKIP_PORT);
			return SK_PASS;
		}
		kind = ZTUN_CAP_LSN_PLAIN;
	}
	key = ns->slot * ZTUN_CAP_LSN_PER_SLOT + kind * 2 + (ctx->family == AF_INET6);
	sk = bpf_map_lookup_elem(&ztun_cap_lsn, &key);
	if (!sk) {
		/* ztun is not listening (stopped, restarting): refuse rather than let the
		 * connection reach the app unauthenticated. */
		stat_inc(ZTUN_CAP_STAT_IN_REFUSED);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		stat_inc(ZTUN_CAP_STAT_IN_REFUSED);
		return SK_DROP;
	}
	stat_inc(kind == ZTUN_CAP_LSN_HBONE ? ZTUN_CAP_STAT_IN_HBONE : ZTUN_CAP_STAT_IN_PLAIN);
	return SK_PASS;
}
