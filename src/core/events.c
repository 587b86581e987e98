#include <stdlib.h>
#include <string.h>

#include "events.h"
#include "ztun/engine.h"

int zring_init(struct zring *r, uint32_t cap)
{
	uint32_t c = 4096;

	while (c < cap && c < (1u << 28))
		c <<= 1;
	memset(r, 0, sizeof(*r));
	r->data = malloc(c);
	if (!r->data)
		return ZTUN_ENOMEM;
	r->cap = c;
	return 0;
}

void zring_destroy(struct zring *r)
{
	free(r->data);
	r->data = NULL;
}

void *zring_reserve(struct zring *r, uint32_t len)
{
	uint32_t head = atomic_load_explicit(&r->head, memory_order_acquire);
	uint32_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
	uint32_t used = tail - head, off = tail & (r->cap - 1), to_end = r->cap - off;

	if (len > r->cap / 2)
		goto full;
	if (to_end < len) {
		/* Pad to the end, then the record starts at 0. */
		if (used + to_end + len > r->cap)
			goto full;
		struct ztun_event_hdr *pad = (struct ztun_event_hdr *)(r->data + off);

		pad->len = to_end;
		pad->type = ZTUN_EV_PAD;
		pad->worker = 0;
		atomic_store_explicit(&r->tail, tail + to_end, memory_order_release);
		return r->data;
	}
	if (used + len > r->cap)
		goto full;
	return r->data + off;
full:
	atomic_fetch_add_explicit(&r->dropped, 1, memory_order_relaxed);
	return NULL;
}

void zring_commit(struct zring *r, uint32_t len)
{
	uint32_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);

	atomic_store_explicit(&r->tail, tail + len, memory_order_release);
}

int zring_empty(struct zring *r)
{
	return atomic_load_explicit(&r->head, memory_order_relaxed) ==
	       atomic_load_explicit(&r->tail, memory_order_acquire);
}

size_t zring_drain(struct zring *r, char *out, size_t outlen)
{
	uint32_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
	uint32_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
	size_t n = 0;

	while (head != tail) {
		const struct ztun_event_hdr *h =
			(const struct ztun_event_hdr *)(r->data + (head & (r->cap - 1)));

		if (h->type != ZTUN_EV_PAD) {
			if (n + h->len > outlen)
				break;
			memcpy(out + n, h, h->len);
			n += h->len;
		}
		head += h->len;
	}
	atomic_store_explicit(&r->head, head, memory_order_release);
	return n;
}
