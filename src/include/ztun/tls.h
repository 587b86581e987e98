/* ztun TLS contexts: one per workload identity (SVID + trust bundle).
 *
 * A context is immutable once built and reference counted; identity rotation
 * builds a new one and swaps it into the listeners, so new handshakes use the new
 * certificate while live connections keep theirs. Only TLS 1.3, mutual
 * authentication, and SPIFFE identity checks (URI SAN) on both sides.
 */
#ifndef ZTUN_TLS_H
#define ZTUN_TLS_H

#include <stddef.h>
#include <stdint.h>

#include "ztun/ztun.h"

typedef struct ztun_tls_ctx ztun_tls_ctx;

enum {
	/* Offer/accept TLS_CHACHA20_POLY1305_SHA256 too (AES-GCM suites always). */
	ZTUN_TLS_CHACHA20 = 1u << 0,
	/* TLS 1.3 session resumption: servers issue one ticket, clients reuse it. */
	ZTUN_TLS_RESUMPTION = 1u << 1,
	/* Servers accept clients of any trust domain in the bundle, not only their own. */
	ZTUN_TLS_ANY_TRUST_DOMAIN = 1u << 2,
};

struct ztun_tls_config {
	const char *chain_pem; /* leaf first, then intermediates */
	size_t chain_len;
	const char *key_pem;   /* private key of the leaf (PKCS#8 or traditional PEM) */
	size_t key_len;
	/* Trust bundle: for each trust domain, its name and its roots (PEM). */
	int ntrust;
	const char *const *trust_domains;
	const char *const *trust_pems;
	const size_t *trust_lens;
	uint32_t flags;
	uint32_t session_lifetime_s; /* tickets / cached sessions; 0: 1 hour */
};

/* On failure, err (if given) receives a one-line description (OpenSSL's reason). */
int ztun_tls_ctx_new(const struct ztun_tls_config *cfg, ztun_tls_ctx **out, char *err, size_t errlen);
ztun_tls_ctx *ztun_tls_ctx_ref(ztun_tls_ctx *ctx);
void ztun_tls_ctx_free(ztun_tls_ctx *ctx);
/* The SPIFFE ID of this context's own certificate (NUL-terminated). */
const char *ztun_tls_ctx_identity(const ztun_tls_ctx *ctx);

#endif
