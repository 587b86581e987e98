/* A minimal intrusive circular doubly-linked list. */
#ifndef ZTUN_LIST_H
#define ZTUN_LIST_H

#include <stddef.h>

struct zlist {
	struct zlist *prev, *next;
};

static inline void zlist_init(struct zlist *h) { h->prev = h->next = h; }
static inline int zlist_empty(const struct zlist *h) { return h->next == h; }
/* A node not on any list points at itself (after zlist_init or zlist_del). */
static inline int zlist_linked(const struct zlist *n) { return n->next != n; }

static inline void zlist_add_tail(struct zlist *h, struct zlist *n)
{
	n->prev = h->prev;
	n->next = h;
	h->prev->next = n;
	h->prev = n;
}

static inline void zlist_del(struct zlist *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->prev = n->next = n;
}

static inline void zlist_move_tail(struct zlist *h, struct zlist *n)
{
	zlist_del(n);
	zlist_add_tail(h, n);
}

/* Move every node of src to the (uninitialized) head dst; src becomes empty. For
 * "work on what is queued now; what gets queued meanwhile waits for the next round". */
static inline void zlist_take(struct zlist *dst, struct zlist *src)
{
	if (zlist_empty(src)) {
		zlist_init(dst);
		return;
	}
	*dst = *src;
	dst->next->prev = dst;
	dst->prev->next = dst;
	zlist_init(src);
}

#define zlist_entry(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

#endif
