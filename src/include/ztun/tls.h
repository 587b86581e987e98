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

/* Why a TLS handshake was refused: counted per reason (ztun_stats.tls_failures). */
enum ztun_tls_reason {
	ZTUN_TLSR_NONE = 0,
	ZTUN_TLSR_EXPIRED,              /* the peer's certificate expired */
	ZTUN_TLSR_NOT_YET_VALID,
	ZTUN_TLSR_UNKNOWN_CA,           /* no path to a trusted root */
	ZTUN_TLSR_OTHER_TRUST_DOMAIN,   /* a root or an identity of another trust domain */
	ZTUN_TLSR_NO_URI_SAN,
	ZTUN_TLSR_MULTIPLE_URI_SANS,
	ZTUN_TLSR_NON_SPIFFE_URI,
	ZTUN_TLSR_UNEXPECTED_ID,        /* a valid identity, but not one we expected */
	ZTUN_TLSR_LEAF_IS_CA,
	ZTUN_TLSR_BAD_KEY_USAGE,
	ZTUN_TLSR_NO_PEER_CERT,         /* the client sent no certificate */
	ZTUN_TLSR_PROTOCOL_VERSION,     /* not TLS 1.3 */
	ZTUN_TLSR_NOT_TLS,              /* garbage, plaintext, HTTP */
	ZTUN_TLSR_PEER_REFUSED,         /* the peer sent an alert: it refused us */
	ZTUN_TLSR_HANDSHAKE_TIMEOUT,
	ZTUN_TLSR_OWN_CERT_EXPIRED,     /* our own certificate expired without renewal */
	ZTUN_TLSR_NO_ALPN,              /* HBONE: the peer did not negotiate h2 */
	ZTUN_TLSR_OTHER,
	ZTUN_TLSR__COUNT
};
const char *ztun_tls_reason_name(int reason);

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
