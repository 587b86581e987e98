/* SPIFFE ID validation in C, used on the handshake path (no allocation). */
#ifndef ZTUN_SPIFFE_H
#define ZTUN_SPIFFE_H

#include <stddef.h>

/* The longest SPIFFE ID we accept (the spec's URI limit). */
#define ZTUN_SPIFFE_MAX 2048

/* Validate "spiffe://<trust-domain><path>" per the SPIFFE ID spec. On success
 * returns 0 and sets *td and *td_len to the trust domain inside id. On failure returns
 * -1 and points *why at a static description of the broken rule. */
int ztun_spiffe_parse(const char *id, size_t len, const char **td, size_t *td_len, const char **why);

#endif
