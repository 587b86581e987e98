#include <stdlib.h>
#include <string.h>

#include "buf.h"

static uint32_t round_pow2(uint32_t v)
{
	uint32_t p = 4096;

	while (p < v && p < (1u << 30))
		p <<= 1;
	return p;
}

void zpool_init(struct zpool *p, uint32_t small, uint32_t large)
{
	memset(p, 0, sizeof(*p));
	p->size[ZBUF_SMALL] = round_pow2(small ? small : ZTUN_BUF_SMALL_DEFAULT);
	p->size[ZBUF_LARGE] = round_pow2(large ? large : ZTUN_BUF_LARGE_DEFAULT);
	if (p->size[ZBUF_LARGE] < p->size[ZBUF_SMALL])
		p->size[ZBUF_LARGE] = p->size[ZBUF_SMALL];
	p->keep[ZBUF_SMALL] = ZTUN_POOL_KEEP_SMALL;
	p->keep[ZBUF_LARGE] = ZTUN_POOL_KEEP_LARGE;
}

struct zbuf *zpool_get(struct zpool *p, int cls)
{
	struct zbuf *b = p->free[cls];

	if (b) {
		p->free[cls] = b->next;
		p->nfree[cls]--;
	} else {
		b = malloc(sizeof(*b) + p->size[cls]);
		if (!b)
			return NULL;
		b->cap = p->size[cls];
		b->cls = (uint8_t)cls;
		atomic_fetch_add_explicit(&p->bytes, b->cap, memory_order_relaxed);
	}
	b->next = NULL;
	b->head = b->tail = 0;
	atomic_fetch_add_explicit(&p->in_use, 1, memory_order_relaxed);
	return b;
}

void zpool_put(struct zpool *p, struct zbuf *b)
{
	if (!b)
		return;
	atomic_fetch_sub_explicit(&p->in_use, 1, memory_order_relaxed);
	if (p->nfree[b->cls] >= p->keep[b->cls]) {
		atomic_fetch_sub_explicit(&p->bytes, b->cap, memory_order_relaxed);
		free(b);
		return;
	}
	b->next = p->free[b->cls];
	p->free[b->cls] = b;
	p->nfree[b->cls]++;
}

void zpool_trim(struct zpool *p)
{
	/* A quiet worker keeps a few small buffers and no large ones. */
	static const uint32_t quiet_keep[ZBUF_NCLASS] = {8, 0};

	for (int c = 0; c < ZBUF_NCLASS; c++) {
		while (p->nfree[c] > quiet_keep[c]) {
			struct zbuf *b = p->free[c];

			p->free[c] = b->next;
			p->nfree[c]--;
			atomic_fetch_sub_explicit(&p->bytes, b->cap, memory_order_relaxed);
			free(b);
		}
	}
}

void zpool_destroy(struct zpool *p)
{
	for (int c = 0; c < ZBUF_NCLASS; c++) {
		while (p->free[c]) {
			struct zbuf *b = p->free[c];

			p->free[c] = b->next;
			free(b);
		}
		p->nfree[c] = 0;
	}
}
