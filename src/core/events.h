/* A bounded single-producer, single-consumer ring of variable-length event records.
 *
 * Each worker owns one ring and is its only producer; the engine's reader (a Python
 * thread or an asyncio callback, serialized by a mutex) is the only consumer. A
 * record never wraps: when it does not fit before the end, the producer writes a PAD
 * record up to the end and starts again at 0. When the ring is full the event is
 * dropped and counted — a slow reader never slows the data path.
 */
#ifndef ZTUN_EVENTS_H
#define ZTUN_EVENTS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct zring {
	char *data;
	uint32_t cap; /* power of two, multiple of 8 */
	_Atomic uint32_t head; /* consumer position (free-running) */
	_Atomic uint32_t tail; /* producer position (free-running) */
	_Atomic uint64_t dropped;
};

int zring_init(struct zring *r, uint32_t cap);
void zring_destroy(struct zring *r);
/* Producer: room for a record of len bytes (multiple of 8), or NULL when full. */
void *zring_reserve(struct zring *r, uint32_t len);
void zring_commit(struct zring *r, uint32_t len);
/* Consumer: copy whole records into out; returns bytes copied. */
size_t zring_drain(struct zring *r, char *out, size_t outlen);
int zring_empty(struct zring *r);

static inline uint32_t zring_align(uint32_t n) { return (n + 7u) & ~7u; }

#endif
