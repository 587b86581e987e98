// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * ztun.bpf.c - ztun's sockmap programs.
 *
 * sock_ops (attached to a cgroup v2) puts the sockets of local hops into one SOCKHASH:
 *   - an app socket connecting to a ztun listening port (ztun_ports) and the socket ztun
 *     accepts for it;
 *   - a socket ztun connects to a local app (marked with ztun_mark) and the socket the
 *     app accepts for it (found through ztun_expect).
 * sk_msg (attached to the SOCKHASH) runs on every sendmsg() of those sockets and either
 *   - redirects the message into the receive queue of the app at the other end of a
 *     same-node pair (ztun_routes; the "shortcut"), or
 *   - redirects it into the receive queue of the loopback peer (the "hop"), or
 *   - leaves it to TCP (SK_PASS without a redirect).
 *
 * Ordering rule (docs/sockmap.md has the argument): a message may take a shorter path only
 * when every longer path it could overtake is empty, checked stage by stage in the order the
 * bytes flow, and the receiver's redirected-but-unread bytes stay under a cap; otherwise it
 * takes the longer path, which has TCP backpressure. Redirected bytes are read by the
 * receiver before its TCP receive queue (tcp_bpf_recvmsg), so "empty" must include the TCP
 * receive queue of the receiver.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "ztun_bpf_common.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
/* sk_user_data carries a psock when this bit is set (include/net/sock.h). */
#define SK_USER_DATA_PSOCK 4UL
#define SK_USER_DATA_PTRMASK (~7UL)

/* Knobs, set by the loader between open and load. */
const volatile __u32 ztun_mark = 0;    /* SO_MARK on ztun's own outgoing sockets (0: none) */
/* Redirected-but-unread bytes a receiving socket may hold: the larger of this and its
 * SO_RCVBUF; only SO_RCVBUF while the host is under TCP memory pressure. Beyond that,
 * senders fall back to TCP, which has backpressure. */
const volatile __u32 ingress_cap = 32 << 20; /* set by the loader */
const volatile __u8 hop_enabled = 1;   /* accelerate app<->ztun hops */
const volatile __u8 pairs_enabled = 1; /* honour same-node pair routes */

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536); /* resized by the loader */
	__type(key, struct ztun_sock_key);
	__type(value, __u64);
} ztun_socks SEC(".maps");

/*
 * Where each socket of ztun_socks lives in kernel memory, for reading its state from the
 * sk_msg program of another socket (a sockhash lookup there would return a referenced
 * socket that sk_msg programs cannot release). Filled by sock_ops when it inserts a
 * socket, removed when the socket reaches TCP_CLOSE; the cookie is re-checked around
 * every read, so a freed and reused socket object is never mistaken for the original.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* resized by the loader, like ztun_socks */
	__type(key, struct ztun_sock_key);
	__type(value, struct ztun_sockinfo);
} ztun_sockinfo SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ztun_port_key);
	__type(value, __u8);
} ztun_ports SEC(".maps");

/* Keys of app sockets about to be accepted for a ztun connect (LRU: remote apps never
 * accept, their entries age out). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ztun_sock_key);
	__type(value, __u64);
} ztun_expect SEC(".maps");

/* Addresses of same-node apps in other network namespaces (ztun_bpf_add_local_addr): a
 * marked ztun connect to one is to a local app, as over loopback. Its accepted socket is
 * expected under the mirrored key with netns 0 (its namespace is not known here); sock_ops
 * stores the namespace there when the app accepts, for pair_add. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ztun_addr_key);
	__type(value, __u8);
} ztun_local_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768); /* 2 per pair; resized by the loader */
	__type(key, struct ztun_sock_key);
	__type(value, struct ztun_route);
} ztun_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384); /* resized by the loader */
	__type(key, __u32);
	__type(value, struct ztun_pair_slot);
} ztun_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZTUN_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ztun_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ztun_stats, &idx);

	if (v)
		*v += 1;
}

/* 32-bit ctx loads: clang would otherwise narrow them, which the ctx rewriter refuses. */
#define RD32(x) (*(volatile __u32 *)&(x))

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

/* Fill key addresses from ctx fields; returns 0 for families we don't handle. */
static __always_inline int key_addrs(struct ztun_sock_key *k, __u32 family, __u32 l4, __u32 r4,
				     const __u32 *l6, const __u32 *r6)
{
	if (family == AF_INET) {
		k->family = AF_INET;
		k->local[0] = l4;
		k->remote[0] = r4;
		return 1;
	}
	if (family != AF_INET6)
		return 0;
	if (is_v4_mapped(r6)) {
		k->family = AF_INET;
		k->local[0] = l6[3];
		k->remote[0] = r6[3];
		return 1;
	}
	k->family = AF_INET6;
	k->local[0] = l6[0];
	k->local[1] = l6[1];
	k->local[2] = l6[2];
	k->local[3] = l6[3];
	k->remote[0] = r6[0];
	k->remote[1] = r6[1];
	k->remote[2] = r6[2];
	k->remote[3] = r6[3];
	return 1;
}

static __always_inline int key_from_ops(struct ztun_sock_key *k, struct bpf_sock_ops *ops)
{
	__u32 l6[4], r6[4];
	__u32 family = ops->family;

	if (family == AF_INET6) {
		l6[0] = ops->local_ip6[0];
		l6[1] = ops->local_ip6[1];
		l6[2] = ops->local_ip6[2];
		l6[3] = ops->local_ip6[3];
		r6[0] = ops->remote_ip6[0];
		r6[1] = ops->remote_ip6[1];
		r6[2] = ops->remote_ip6[2];
		r6[3] = ops->remote_ip6[3];
	} else {
		__builtin_memset(l6, 0, sizeof(l6));
		__builtin_memset(r6, 0, sizeof(r6));
	}
	if (!key_addrs(k, family, ops->local_ip4, ops->remote_ip4, l6, r6))
		return 0;
	k->netns = bpf_get_netns_cookie(ops);
	k->lport = (__u16)RD32(ops->local_port);
	k->rport = bpf_ntohs((__u16)(RD32(ops->remote_port) >> 16));
	return 1;
}

static __always_inline int key_from_msg(struct ztun_sock_key *k, struct sk_msg_md *msg)
{
	__u32 l6[4], r6[4];
	__u32 family = msg->family;

	if (family == AF_INET6) {
		l6[0] = msg->local_ip6[0];
		l6[1] = msg->local_ip6[1];
		l6[2] = msg->local_ip6[2];
		l6[3] = msg->local_ip6[3];
		r6[0] = msg->remote_ip6[0];
		r6[1] = msg->remote_ip6[1];
		r6[2] = msg->remote_ip6[2];
		r6[3] = msg->remote_ip6[3];
	} else {
		__builtin_memset(l6, 0, sizeof(l6));
		__builtin_memset(r6, 0, sizeof(r6));
	}
	if (!key_addrs(k, family, msg->local_ip4, msg->remote_ip4, l6, r6))
		return 0;
	k->netns = bpf_get_netns_cookie(msg);
	k->lport = (__u16)RD32(msg->local_port);
	k->rport = bpf_ntohs((__u16)(RD32(msg->remote_port) >> 16));
	return 1;
}

static __always_inline void key_reverse(struct ztun_sock_key *r, const struct ztun_sock_key *k)
{
	r->netns = k->netns;
	r->family = k->family;
	r->pad = 0;
	r->lport = k->rport;
	r->rport = k->lport;
	r->local[0] = k->remote[0];
	r->local[1] = k->remote[1];
	r->local[2] = k->remote[2];
	r->local[3] = k->remote[3];
	r->remote[0] = k->local[0];
	r->remote[1] = k->local[1];
	r->remote[2] = k->local[2];
	r->remote[3] = k->local[3];
}

static __always_inline int is_ztun_port(__u64 netns, __u16 port)
{
	struct ztun_port_key pk = {};

	pk.netns = netns;
	pk.port = port;
	if (bpf_map_lookup_elem(&ztun_ports, &pk))
		return 1;
	pk.netns = 0; /* registered for every namespace */
	return bpf_map_lookup_elem(&ztun_ports, &pk) != NULL;
}

/* Only loopback peers (127/8, ::1, or our own address) can be reached by a redirect; a
 * ztun socket to another node must stay on plain TCP. */
static __always_inline int peer_is_local(const struct ztun_sock_key *k)
{
	if (k->family == AF_INET)
		return (k->remote[0] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
		       k->remote[0] == k->local[0];
	if (k->remote[0] == 0 && k->remote[1] == 0 && k->remote[2] == 0 &&
	    k->remote[3] == bpf_htonl(1))
		return 1;
	return k->remote[0] == k->local[0] && k->remote[1] == k->local[1] &&
	       k->remote[2] == k->local[2] && k->remote[3] == k->local[3];
}

static __always_inline int peer_in_other_netns(const struct ztun_sock_key *k)
{
	struct ztun_addr_key a = {};

	a.family = k->family;
	a.addr[0] = k->remote[0];
	a.addr[1] = k->remote[1];
	a.addr[2] = k->remote[2];
	a.addr[3] = k->remote[3];
	return bpf_map_lookup_elem(&ztun_local_addrs, &a) != NULL;
}

static __always_inline void insert(struct bpf_sock_ops *ops, struct ztun_sock_key *k)
{
	struct ztun_sockinfo si = {};
	struct bpf_sock *sk = ops->sk;

	if (!sk)
		return;
	si.cookie = bpf_get_socket_cookie(ops); /* also makes sure skc_cookie is set */
	si.addr = (__u64)sk;
	if (bpf_map_update_elem(&ztun_sockinfo, k, &si, BPF_ANY) ||
	    bpf_sock_hash_update(ops, &ztun_socks, k, BPF_NOEXIST)) {
		bpf_map_delete_elem(&ztun_sockinfo, k);
		stat_inc(ZTUN_STAT_SOCKOPS_ERR);
		return;
	}
	/* Get a callback on state changes, to forget the address at TCP_CLOSE. */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	stat_inc(ZTUN_STAT_SOCKOPS_INSERT);
}

SEC("sockops")
int ztun_sockops(struct bpf_sock_ops *ops)
{
	struct ztun_sock_key k = {}, r = {};
	struct bpf_sock *sk;
	__u32 op = ops->op;
	__u64 one = 1, *pending;

	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* args[1] is the new state; the sockhash drops the socket itself. */
		if (ops->args[1] == BPF_TCP_CLOSE && key_from_ops(&k, ops))
			bpf_map_delete_elem(&ztun_sockinfo, &k);
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!key_from_ops(&k, ops))
		return 1;

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		/* An app connecting to ztun: the app end of a hop. */
		if (is_ztun_port(k.netns, k.rport)) {
			insert(ops, &k);
			return 1;
		}
		/* ztun connecting to a local app: ztun's end of a hop, and the app's accepted
		 * socket (established after us: the final ACK leaves after this callback) is
		 * expected under the mirrored key. */
		sk = ops->sk;
		if (ztun_mark && sk && sk->mark == ztun_mark && peer_is_local(&k)) {
			key_reverse(&r, &k);
			bpf_map_update_elem(&ztun_expect, &r, &one, BPF_ANY);
			insert(ops, &k);
		} else if (ztun_mark && sk && sk->mark == ztun_mark && peer_in_other_netns(&k)) {
			__u64 pending = 0;

			key_reverse(&r, &k);
			r.netns = 0;
			bpf_map_update_elem(&ztun_expect, &r, &pending, BPF_ANY);
			insert(ops, &k);
		}
		return 1;
	}

	/* Passive: ztun accepting on its port, or an app accepting ztun's connect. */
	if (is_ztun_port(k.netns, k.lport)) {
		insert(ops, &k);
		return 1;
	}
	if (bpf_map_lookup_elem(&ztun_expect, &k)) {
		bpf_map_delete_elem(&ztun_expect, &k);
		insert(ops, &k);
		return 1;
	}
	/* An app in another namespace accepting ztun's connect (ztun_local_addrs). */
	r = k;
	r.netns = 0;
	pending = bpf_map_lookup_elem(&ztun_expect, &r);
	if (pending && *pending == 0) {
		__u64 ns = k.netns; /* cookies are never 0 */

		bpf_map_update_elem(&ztun_expect, &r, &ns, BPF_ANY);
		insert(ops, &k);
	}
	return 1;
}

/*
 * What the verdict needs to know about one socket, read with CO-RE from its tcp_sock.
 * "Everything X wrote has arrived at its peer Y" is X.write_seq == Y.rcv_nxt (one sequence
 * space), which unlike snd_una does not wait for a (possibly delayed) ACK; rcv_nxt only
 * moves when in-order data is queued, never for data parked in a backlog.
 */
struct sock_view {
	__u32 write_seq;  /* end of what the owner has written */
	__u32 rcv_nxt;    /* end of what has arrived in order */
	__u32 copied_seq; /* end of what the owner has read */
	__u32 ingress;    /* redirected bytes not yet read by the owner */
	__u32 cap;        /* ingress bound for this socket */
	__u32 rcvbuf;     /* its sk_rcvbuf: TCP's own bound */
};

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

#define barrier() asm volatile("" ::: "memory")

/* Redirected-but-unread bytes of a socket: psock->ingress_msg. */
static __always_inline __u32 psock_ingress(struct sock *sk)
{
	unsigned long ud = (unsigned long)sk->sk_user_data;
	struct sk_psock *ps;
	struct list_head *head;
	__u32 n;

	if (!(ud & SK_USER_DATA_PSOCK))
		return 0;
	ps = bpf_rdonly_cast((void *)(ud & SK_USER_DATA_PTRMASK),
			     bpf_core_type_id_kernel(struct sk_psock));
	if (bpf_core_field_exists(ps->msg_tot_len)) {
		/* Exact (6.18 and stable backports): bytes in ingress_msg, decremented as the
		 * owner copies them out. */
		n = ps->msg_tot_len;
	} else {
		/* Since 6.13 redirected bytes are charged to sk_rmem_alloc, which also counts
		 * TCP skbs: an over-estimate, erring towards the relay path. */
		n = (__u32)sk->sk_backlog.rmem_alloc.counter;
	}
	/* A queued message with a zero count can only be a racing update: not empty. */
	head = &ps->ingress_msg;
	if (!n && ps->ingress_msg.next != head)
		n = 1;
	return n;
}

/* The kernel's own "TCP memory is short" flag (tcp_memory_pressure: set above tcp_mem[1],
 * cleared below tcp_mem[0]), reached through the socket's proto. */
static __always_inline int tcp_mem_pressure(struct sock *sk)
{
	struct proto *prot = sk->__sk_common.skc_prot;
	unsigned long *flag;

	if (!prot)
		return 0;
	flag = bpf_rdonly_cast(prot->memory_pressure, bpf_core_type_id_kernel(unsigned long));
	return flag && *flag;
}

static __always_inline void view_tcp(struct tcp_sock *tp, struct sock_view *v)
{
	struct sock *sk = &tp->inet_conn.icsk_inet.sk;
	int rcvbuf = sk->sk_rcvbuf;
	__u32 rb = rcvbuf > 0 ? (__u32)rcvbuf : 0;

	v->write_seq = tp->write_seq;
	v->rcv_nxt = tp->rcv_nxt;
	v->copied_seq = tp->copied_seq;
	v->ingress = psock_ingress(sk);
	v->cap = tcp_mem_pressure(sk) || rb > ingress_cap ? rb : ingress_cap;
	v->rcvbuf = rb;
}

/*
 * Read the view of a socket of ztun_socks by key (and, if want is not 0, with that socket
 * cookie); 0 on success. The program runs under
 * rcu_read_lock() and TCP sockets are SLAB_TYPESAFE_BY_RCU, so the object stays a socket
 * while we read it; equal non-zero cookies before and after the reads prove it is still
 * the socket sock_ops recorded (a reused object has cookie 0 or a new one).
 */
static __always_inline int view_key(struct ztun_sock_key *k, __u64 want, struct sock_view *v)
{
	struct ztun_sockinfo *si = bpf_map_lookup_elem(&ztun_sockinfo, k);
	struct tcp_sock *tp;
	__u64 cookie;

	if (!si)
		return -1;
	cookie = si->cookie;
	if (want && cookie != want)
		return -1;
	tp = bpf_rdonly_cast((void *)si->addr, bpf_core_type_id_kernel(struct tcp_sock));
	if (tp->inet_conn.icsk_inet.sk.__sk_common.skc_cookie.counter != cookie)
		return -1;
	barrier();
	view_tcp(tp, v);
	barrier();
	if (tp->inet_conn.icsk_inet.sk.__sk_common.skc_cookie.counter != cookie)
		return -1;
	return 0;
}

enum { TRY_REDIRECTED = 0, TRY_ORDER = 1, TRY_CAP = 2, TRY_MISS = 3 };

static __always_inline int pair_verdict(struct sk_msg_md *msg, struct tcp_sock *self,
					struct ztun_route *rt, struct ztun_pair_slot *slot, __u32 dir)
{
	struct sock_view v = {};
	__u32 far_written;

	if (slot->gen != rt->gen || slot->state != ZTUN_PAIR_ACTIVE) {
		stat_inc(ZTUN_STAT_PAIR_STALE);
		return TRY_MISS;
	}
	/* 1 + 2: all the sender wrote has arrived at near, and the engine has read it all. */
	if (view_key(&rt->near, rt->near_cookie, &v) || self->write_seq != v.rcv_nxt ||
	    v.rcv_nxt != v.copied_seq || v.ingress) {
		stat_inc(ZTUN_STAT_PAIR_WAIT_NEAR);
		goto order;
	}
	/* 3. Fetch-and-add 0: a full barrier, so this load is not hoisted above stage 2. */
	if (__sync_fetch_and_add(&slot->busy[dir], 0)) {
		stat_inc(ZTUN_STAT_PAIR_WAIT_BUSY);
		goto order;
	}
	/* 4 + 5: all the engine wrote to far has arrived at target, and target read it all. */
	if (view_key(&rt->far, rt->far_cookie, &v))
		goto far;
	far_written = v.write_seq;
	if (view_key(&rt->target, rt->target_cookie, &v) || far_written != v.rcv_nxt || v.rcv_nxt != v.copied_seq)
		goto far;
	if (v.ingress >= v.cap) {
		__sync_fetch_and_add(&slot->fallback_msgs[dir], 1);
		stat_inc(ZTUN_STAT_PAIR_CAP);
		return TRY_CAP;
	}
	if (bpf_msg_redirect_hash(msg, &ztun_socks, &rt->target, BPF_F_INGRESS) != SK_PASS)
		goto order;
	__sync_fetch_and_add(&slot->direct_bytes[dir], msg->size);
	__sync_fetch_and_add(&slot->direct_msgs[dir], 1);
	stat_inc(ZTUN_STAT_PAIR_REDIRECT);
	return TRY_REDIRECTED;
far:
	stat_inc(ZTUN_STAT_PAIR_WAIT_FAR);
order:
	__sync_fetch_and_add(&slot->fallback_msgs[dir], 1);
	stat_inc(ZTUN_STAT_PAIR_ORDER);
	return TRY_ORDER;
}

/*
 * Same-node pair: sender -> target directly, only if the relay path is empty, checked in
 * the order bytes flow through it (each stage is fed only by the one before, and the first
 * is fed only by this sender, which holds its socket lock: a stage seen empty stays empty):
 *   1. sender's TCP path to near: sender.write_seq == near.rcv_nxt,
 *   2. near's receive queue and ingress: read by the engine,
 *   3. the engine's buffer: busy flag, raised before it reads near,
 *   4. far's TCP path to target: far.write_seq == target.rcv_nxt,
 *   5. target's TCP receive queue: read (it is read after the ingress queue).
 * inflight brackets the verdict, so pair_del can wait until no verdict of the pair runs
 * (it clears state first; whoever increments after that sees the cleared state).
 */
static __always_inline int try_pair(struct sk_msg_md *msg, struct tcp_sock *self,
				    struct ztun_route *rt)
{
	struct ztun_pair_slot *slot;
	__u32 idx = rt->slot, dir = rt->dir & 1;
	int r;

	slot = bpf_map_lookup_elem(&ztun_pairs, &idx);
	if (!slot)
		return TRY_MISS;
	__sync_fetch_and_add(&slot->inflight, 1);
	r = pair_verdict(msg, self, rt, slot, dir);
	__sync_fetch_and_sub(&slot->inflight, 1);
	return r;
}

/* Hop: sender -> its loopback peer, only if all the sender wrote over TCP has arrived and
 * been read (the peer reads its ingress first) and the peer holds less than its cap. A
 * hop's cap is also bounded by the peer's sk_rcvbuf, what TCP would let it queue: the peer
 * is ztun, which passes the bytes on, and when the far side is slower a pair-sized cap
 * only piles cache-cold bytes up in ztun's socket (docs/sockmap.md §4). */
static __always_inline void try_hop(struct sk_msg_md *msg, struct tcp_sock *self,
				    struct ztun_sock_key *me)
{
	struct ztun_sock_key peer = {};
	struct sock_view v = {};

	key_reverse(&peer, me);
	if (view_key(&peer, 0, &v)) {
		stat_inc(ZTUN_STAT_HOP_MISS);
		return;
	}
	if (self->write_seq != v.rcv_nxt || v.rcv_nxt != v.copied_seq) {
		stat_inc(ZTUN_STAT_HOP_ORDER);
		return;
	}
	/* (A cap of ~0 lifts every bound: the tests' control of what the kernel alone does.) */
	if (v.ingress >= v.cap || (ingress_cap != ~0u && v.ingress >= v.rcvbuf)) {
		stat_inc(ZTUN_STAT_HOP_CAP);
		return;
	}
	if (bpf_msg_redirect_hash(msg, &ztun_socks, &peer, BPF_F_INGRESS) == SK_PASS)
		stat_inc(ZTUN_STAT_HOP_REDIRECT);
	else
		stat_inc(ZTUN_STAT_HOP_MISS);
}

SEC("sk_msg")
int ztun_skmsg(struct sk_msg_md *msg)
{
	struct ztun_sock_key me = {};
	struct ztun_route *rt;
	struct bpf_sock *sk = msg->sk;
	struct tcp_sock *self;

	/* Every exit is SK_PASS: SK_DROP would fail the app's sendmsg() with EACCES. Without
	 * a redirect SK_PASS means plain TCP. */
	if (!sk || !key_from_msg(&me, msg))
		return SK_PASS;
	self = bpf_skc_to_tcp_sock(sk);
	if (!self)
		return SK_PASS;
	if (pairs_enabled) {
		rt = bpf_map_lookup_elem(&ztun_routes, &me);
		switch (rt ? try_pair(msg, self, rt) : TRY_MISS) {
		case TRY_REDIRECTED:
			return SK_PASS;
		case TRY_CAP:
		case TRY_ORDER:
			/* A paired sender falls back to TCP only: the hop into ztun's socket
			 * would let a stalled target hold a second cap's worth there (ztun
			 * cannot pass it on), while TCP blocks the sender after its buffers. */
			return SK_PASS;
		default:
			break; /* no live pair: an ordinary hop */
		}
	}
	if (hop_enabled)
		try_hop(msg, self, &me);
	return SK_PASS;
}
