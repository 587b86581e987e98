/* Internal TLS API used by the connection code. */
#ifndef ZTUN_TLS_INT_H
#define ZTUN_TLS_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "ztun/tls.h"

struct ztls_root {
	X509 *cert;
	char *td;
};

struct ztun_tls_ctx {
	_Atomic int refs;
	SSL_CTX *ssl;
	uint32_t flags;
	char *identity;     /* our own SPIFFE ID */
	char *trust_domain; /* our own trust domain */
	int64_t not_after;  /* our certificate's expiry (Unix seconds) */
	int nroots;
	struct ztls_root *roots;
};

/* Expected peer identities of a client connection, shared by a listener's connections. */
struct ztls_expect {
	_Atomic int refs;
	int n;
	char **ids;
};
struct ztls_expect *ztls_expect_new(const char *const *ids, int n);
struct ztls_expect *ztls_expect_ref(struct ztls_expect *x);
void ztls_expect_put(struct ztls_expect *x);

/* A resumable session for one destination (client side), shared across workers. */
struct ztls_session_slot {
	pthread_mutex_t mu;
	SSL_SESSION *sess;
};
void ztls_slot_init(struct ztls_session_slot *s);
/* Forget the stored session (identity or trust changed: resume nothing made before). */
void ztls_slot_clear(struct ztls_session_slot *s);
void ztls_slot_destroy(struct ztls_session_slot *s);

/* Per-connection handshake state, attached to the SSL while the handshake runs. */
struct ztls_hs {
	int server;
	const ztun_tls_ctx *ctx;
	struct ztls_expect *expect;      /* client side, may be NULL: any identity of a trusted domain */
	struct ztls_session_slot *slot;  /* client side, may be NULL: no resumption */
	char reason[200];                /* why verification failed, for logs and counters */
	int code;                        /* enum ztun_tls_reason */
};

/* Make an SSL for fd in the given role, with its handshake state attached. */
SSL *ztls_new(ztun_tls_ctx *ctx, int fd, struct ztls_hs *hs, const char *alpn);
/* Forget the handshake state (about to be freed); the session slot stays. */
void ztls_detach(SSL *ssl);
/* After the handshake: the peer's verified SPIFFE ID (malloc'd), re-checked against
 * the expectations (resumed sessions skip the verify callback). NULL + hs->reason
 * on failure. */
char *ztls_peer_identity(SSL *ssl, struct ztls_hs *hs);
/* Describe the last error of an SSL call (handshake or record) into buf. */
void ztls_describe_error(SSL *ssl, int ret, struct ztls_hs *hs, char *buf, size_t len);

#endif
