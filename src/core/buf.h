/* Relay buffers: power-of-two rings, handed out by a per-worker pool.
 *
 * A connection holds a buffer per direction only while bytes are in flight: as soon
 * as a ring drains, it goes back to the pool, so an idle connection holds none. The
 * size adapts to the flow: a direction starts small and moves to the large class
 * once a read fills a whole small ring (a bulk transfer); it falls back to small
 * when the flow quiets down.
 */
#ifndef ZTUN_BUF_H
#define ZTUN_BUF_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

/* Small: one TLS record's worth of plaintext (16 KiB) — enough for request/response
 * traffic without ever growing. */
#define ZTUN_BUF_SMALL_DEFAULT (16u * 1024)
/* Large: big enough that a bulk flow moves ~0.25 MiB per syscall pair, small enough
 * that 64 busy connections per worker stay within 32 MiB. */
#define ZTUN_BUF_LARGE_DEFAULT (256u * 1024)
/* How many free buffers of each class a worker keeps for reuse; the rest are freed. */
#define ZTUN_POOL_KEEP_SMALL 256
#define ZTUN_POOL_KEEP_LARGE 16

enum { ZBUF_SMALL = 0, ZBUF_LARGE = 1, ZBUF_NCLASS = 2 };

struct zbuf {
	struct zbuf *next; /* pool free list */
	uint32_t cap;      /* power of two */
	uint8_t cls;
	uint32_t head;     /* free-running read position */
	uint32_t tail;     /* free-running write position */
	char data[];
};

static inline uint32_t zbuf_len(const struct zbuf *b) { return b->tail - b->head; }
static inline uint32_t zbuf_space(const struct zbuf *b) { return b->cap - (b->tail - b->head); }

/* Up to two iovecs describing the free space (where to read into). */
static inline int zbuf_fill_iov(struct zbuf *b, struct iovec iov[2])
{
	uint32_t space = zbuf_space(b), mask = b->cap - 1;
	uint32_t t = b->tail & mask, first = b->cap - t;

	if (space == 0)
		return 0;
	if (first >= space) {
		iov[0].iov_base = b->data + t;
		iov[0].iov_len = space;
		return 1;
	}
	iov[0].iov_base = b->data + t;
	iov[0].iov_len = first;
	iov[1].iov_base = b->data;
	iov[1].iov_len = space - first;
	return 2;
}

/* Up to two iovecs describing the queued bytes (what to write out). */
static inline int zbuf_drain_iov(struct zbuf *b, struct iovec iov[2])
{
	uint32_t len = zbuf_len(b), mask = b->cap - 1;
	uint32_t h = b->head & mask, first = b->cap - h;

	if (len == 0)
		return 0;
	if (first >= len) {
		iov[0].iov_base = b->data + h;
		iov[0].iov_len = len;
		return 1;
	}
	iov[0].iov_base = b->data + h;
	iov[0].iov_len = first;
	iov[1].iov_base = b->data;
	iov[1].iov_len = len - first;
	return 2;
}

struct zpool {
	struct zbuf *free[ZBUF_NCLASS];
	uint32_t nfree[ZBUF_NCLASS];
	uint32_t size[ZBUF_NCLASS];
	uint32_t keep[ZBUF_NCLASS];
	/* Read by other threads (stats), written only by the owning worker. */
	_Atomic uint64_t in_use; /* buffers held by connections */
	_Atomic uint64_t bytes;  /* bytes of all live buffers (held + cached) */
};

void zpool_init(struct zpool *p, uint32_t small, uint32_t large);
void zpool_destroy(struct zpool *p);
struct zbuf *zpool_get(struct zpool *p, int cls);
void zpool_put(struct zpool *p, struct zbuf *b);
/* Free cached buffers beyond what a quiet worker needs. */
void zpool_trim(struct zpool *p);

#endif
