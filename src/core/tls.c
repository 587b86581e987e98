/* TLS 1.3 contexts and SPIFFE verification with OpenSSL 3.
 *
 * OpenSSL verifies the chain (signatures, validity, path to a root in the store);
 * ztun adds what SPIFFE requires and OpenSSL does not know: exactly one URI SAN
 * that is a SPIFFE ID, a leaf that is not a CA and may sign, a root that belongs to
 * the leaf's trust domain, and the expected identity (client) or trust domain
 * (server). The checks run in the verify callback, so a refused peer gets a TLS
 * alert, and again after the handshake, because a resumed session skips the callback.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "spiffe.h"
#include "tls_int.h"

static int hs_index = -1;
static int slot_index = -1;
static pthread_once_t index_once = PTHREAD_ONCE_INIT;

static void make_indexes(void)
{
	hs_index = SSL_get_ex_new_index(0, "ztun hs", NULL, NULL, NULL);
	slot_index = SSL_get_ex_new_index(0, "ztun slot", NULL, NULL, NULL);
}

static void set_err(char *err, size_t errlen, const char *what)
{
	unsigned long e = ERR_get_error();
	char buf[256];

	if (!err || !errlen)
		return;
	if (e) {
		ERR_error_string_n(e, buf, sizeof(buf));
		snprintf(err, errlen, "%s: %s", what, buf);
	} else {
		snprintf(err, errlen, "%s", what);
	}
	ERR_clear_error();
}

/* ---- SPIFFE checks on a leaf certificate -------------------------------- */

/* The single SPIFFE URI SAN of cert, or NULL with *why set. *n_out = number of URI SANs. */
static int leaf_spiffe_id(X509 *cert, char *out, size_t outlen, const char **why, int *code)
{
	GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	int nuri = 0;
	const char *td, *perr = NULL;
	size_t td_len;

	if (!names) {
		*why = "certificate has no URI SAN";
		*code = ZTUN_TLSR_NO_URI_SAN;
		return -1;
	}
	for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
		GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
		const unsigned char *s;
		int len;

		if (gn->type != GEN_URI)
			continue;
		if (++nuri > 1)
			break;
		s = ASN1_STRING_get0_data(gn->d.uniformResourceIdentifier);
		len = ASN1_STRING_length(gn->d.uniformResourceIdentifier);
		if (len <= 0 || (size_t)len >= outlen || memchr(s, 0, (size_t)len)) {
			perr = "URI SAN is empty or too long";
			continue;
		}
		memcpy(out, s, (size_t)len);
		out[len] = 0;
		if (ztun_spiffe_parse(out, (size_t)len, &td, &td_len, &perr) != 0) {
			if (strncmp(out, "spiffe://", 9) != 0)
				perr = "non-SPIFFE URI SAN (not a spiffe:// ID)";
		}
	}
	GENERAL_NAMES_free(names);
	if (nuri == 0) {
		*why = "certificate has no URI SAN";
		*code = ZTUN_TLSR_NO_URI_SAN;
		return -1;
	}
	if (nuri > 1) {
		*why = "certificate has multiple URI SANs";
		*code = ZTUN_TLSR_MULTIPLE_URI_SANS;
		return -1;
	}
	if (perr) {
		*why = perr;
		*code = ZTUN_TLSR_NON_SPIFFE_URI;
		return -1;
	}
	return 0;
}

static int leaf_usage_ok(X509 *cert, const char **why, int *code)
{
	uint32_t ku = X509_get_key_usage(cert);

	*code = ZTUN_TLSR_BAD_KEY_USAGE;
	if (X509_get_extension_flags(cert) & EXFLAG_CA) {
		*why = "leaf certificate is a CA (basicConstraints CA:TRUE)";
		*code = ZTUN_TLSR_LEAF_IS_CA;
		return -1;
	}
	if (ku == UINT32_MAX || !(ku & KU_DIGITAL_SIGNATURE)) {
		*why = "bad key usage: the leaf certificate lacks digitalSignature";
		return -1;
	}
	if (ku & (KU_KEY_CERT_SIGN | KU_CRL_SIGN)) {
		*why = "bad key usage: the leaf certificate may sign certificates or CRLs";
		return -1;
	}
	*code = 0;
	return 0;
}

static size_t td_of(const char *id, const char **td)
{
	const char *p = id + 9, *slash = strchr(p, '/');

	*td = p;
	return slash ? (size_t)(slash - p) : strlen(p);
}

static int td_equal(const char *id, const char *td)
{
	const char *t;
	size_t n = td_of(id, &t);

	return strlen(td) == n && memcmp(t, td, n) == 0;
}

/* Identity rules that depend on the connection's role and expectations: 0 or the
 * refusal's reason code (enum ztun_tls_reason). */
static int identity_allowed(const struct ztls_hs *hs, const char *id, char *why, size_t whylen)
{
	const ztun_tls_ctx *ctx = hs->ctx;

	if (hs->server) {
		if (!(ctx->flags & ZTUN_TLS_ANY_TRUST_DOMAIN) && !td_equal(id, ctx->trust_domain)) {
			snprintf(why, whylen, "other trust domain: client %s is not in trust domain %s", id,
				 ctx->trust_domain);
			return ZTUN_TLSR_OTHER_TRUST_DOMAIN;
		}
		return 0;
	}
	if (!hs->expect || hs->expect->n == 0)
		return 0;
	for (int i = 0; i < hs->expect->n; i++) {
		if (strcmp(hs->expect->ids[i], id) == 0)
			return 0;
	}
	snprintf(why, whylen, "unexpected SPIFFE ID %s (expected %s%s)", id, hs->expect->ids[0],
		 hs->expect->n > 1 ? " or others" : "");
	return ZTUN_TLSR_UNEXPECTED_ID;
}

static const char *x509_reason(int err, int *code)
{
	*code = ZTUN_TLSR_OTHER;
	switch (err) {
	case X509_V_ERR_CERT_HAS_EXPIRED:
		*code = ZTUN_TLSR_EXPIRED;
		return "certificate expired";
	case X509_V_ERR_CERT_NOT_YET_VALID:
		*code = ZTUN_TLSR_NOT_YET_VALID;
		return "certificate not yet valid";
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
	case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
	case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
	case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
		*code = ZTUN_TLSR_UNKNOWN_CA;
		return "certificate signed by an unknown CA";
	case X509_V_ERR_CERT_SIGNATURE_FAILURE:
		*code = ZTUN_TLSR_UNKNOWN_CA;
		return "certificate signature invalid";
	case X509_V_ERR_INVALID_PURPOSE:
		*code = ZTUN_TLSR_BAD_KEY_USAGE;
		return "bad key usage: key usage or extended key usage not allowed";
	case X509_V_ERR_INVALID_CA: return "an issuer in the chain is not a CA";
	case X509_V_ERR_CERT_REVOKED: return "certificate revoked";
	default: return NULL;
	}
}

const char *ztun_tls_reason_name(int reason)
{
	static const char *const names[ZTUN_TLSR__COUNT] = {
		[ZTUN_TLSR_NONE] = "none",
		[ZTUN_TLSR_EXPIRED] = "expired",
		[ZTUN_TLSR_NOT_YET_VALID] = "not_yet_valid",
		[ZTUN_TLSR_UNKNOWN_CA] = "unknown_ca",
		[ZTUN_TLSR_OTHER_TRUST_DOMAIN] = "other_trust_domain",
		[ZTUN_TLSR_NO_URI_SAN] = "no_uri_san",
		[ZTUN_TLSR_MULTIPLE_URI_SANS] = "multiple_uri_sans",
		[ZTUN_TLSR_NON_SPIFFE_URI] = "non_spiffe_uri",
		[ZTUN_TLSR_UNEXPECTED_ID] = "unexpected_spiffe_id",
		[ZTUN_TLSR_LEAF_IS_CA] = "leaf_is_ca",
		[ZTUN_TLSR_BAD_KEY_USAGE] = "bad_key_usage",
		[ZTUN_TLSR_NO_PEER_CERT] = "no_peer_certificate",
		[ZTUN_TLSR_PROTOCOL_VERSION] = "protocol_version",
		[ZTUN_TLSR_NOT_TLS] = "not_tls",
		[ZTUN_TLSR_PEER_REFUSED] = "peer_refused",
		[ZTUN_TLSR_HANDSHAKE_TIMEOUT] = "handshake_timeout",
		[ZTUN_TLSR_OWN_CERT_EXPIRED] = "own_certificate_expired",
		[ZTUN_TLSR_NO_ALPN] = "no_alpn_h2",
		[ZTUN_TLSR_OTHER] = "other",
	};
	if (reason < 0 || reason >= ZTUN_TLSR__COUNT)
		return "other";
	return names[reason];
}

static int verify_cb(int ok, X509_STORE_CTX *xs)
{
	SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
	struct ztls_hs *hs = ssl ? SSL_get_ex_data(ssl, hs_index) : NULL;
	char id[ZTUN_SPIFFE_MAX + 1];
	const char *why = NULL;
	X509 *leaf, *top;
	STACK_OF(X509) *chain;
	const char *td;
	size_t td_len;
	int matched = 0;

	if (!hs)
		return ok;
	if (!ok) {
		int err = X509_STORE_CTX_get_error(xs), code;
		const char *r = x509_reason(err, &code);

		if (!hs->reason[0]) {
			hs->code = code;
			if (r)
				snprintf(hs->reason, sizeof(hs->reason), "%s", r);
			else
				snprintf(hs->reason, sizeof(hs->reason), "certificate verification failed: %s",
					 X509_verify_cert_error_string(err));
		}
		return 0;
	}
	if (X509_STORE_CTX_get_error_depth(xs) != 0)
		return 1;

	leaf = X509_STORE_CTX_get_current_cert(xs);
	if (leaf_spiffe_id(leaf, id, sizeof(id), &why, &hs->code) ||
	    leaf_usage_ok(leaf, &why, &hs->code)) {
		snprintf(hs->reason, sizeof(hs->reason), "%s", why);
		goto refuse;
	}
	/* The chain must end at a root of the leaf's own trust domain. */
	chain = X509_STORE_CTX_get0_chain(xs);
	top = chain ? sk_X509_value(chain, sk_X509_num(chain) - 1) : NULL;
	td_len = td_of(id, &td);
	for (int i = 0; top && i < hs->ctx->nroots; i++) {
		const struct ztls_root *r = &hs->ctx->roots[i];

		if (X509_cmp(r->cert, top) == 0 && strlen(r->td) == td_len &&
		    memcmp(r->td, td, td_len) == 0) {
			matched = 1;
			break;
		}
	}
	if (!matched) {
		snprintf(hs->reason, sizeof(hs->reason),
			 "other trust domain: certificate for %s does not chain to a root of trust domain %.*s",
			 id, (int)td_len, td);
		hs->code = ZTUN_TLSR_OTHER_TRUST_DOMAIN;
		goto refuse;
	}
	hs->code = identity_allowed(hs, id, hs->reason, sizeof(hs->reason));
	if (hs->code)
		goto refuse;
	return 1;
refuse:
	X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
	return 0;
}

char *ztls_peer_identity(SSL *ssl, struct ztls_hs *hs)
{
	X509 *peer = SSL_get0_peer_certificate(ssl);
	char id[ZTUN_SPIFFE_MAX + 1];
	const char *why = NULL;

	if (!peer) {
		snprintf(hs->reason, sizeof(hs->reason), "peer sent no certificate");
		hs->code = ZTUN_TLSR_NO_PEER_CERT;
		return NULL;
	}
	if (SSL_get_verify_result(ssl) != X509_V_OK) {
		if (!hs->reason[0])
			snprintf(hs->reason, sizeof(hs->reason), "peer certificate not verified");
		if (!hs->code)
			hs->code = ZTUN_TLSR_OTHER;
		return NULL;
	}
	/* A resumed session carries the certificate verified when it was made: it must
	 * still be within its validity now. */
	if (X509_cmp_current_time(X509_get0_notAfter(peer)) <= 0) {
		snprintf(hs->reason, sizeof(hs->reason), "certificate expired");
		hs->code = ZTUN_TLSR_EXPIRED;
		return NULL;
	}
	if (leaf_spiffe_id(peer, id, sizeof(id), &why, &hs->code) ||
	    leaf_usage_ok(peer, &why, &hs->code)) {
		snprintf(hs->reason, sizeof(hs->reason), "%s", why);
		return NULL;
	}
	hs->code = identity_allowed(hs, id, hs->reason, sizeof(hs->reason));
	if (hs->code)
		return NULL;
	return strdup(id);
}

/* OpenSSL's own handshake failures, by their reason code. */
static int ztls_reason_of(int lib_reason)
{
	switch (lib_reason) {
	case SSL_R_UNSUPPORTED_PROTOCOL:
	case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
	case SSL_R_NO_PROTOCOLS_AVAILABLE:
		return ZTUN_TLSR_PROTOCOL_VERSION;
	case SSL_R_WRONG_VERSION_NUMBER:
	case SSL_R_HTTP_REQUEST:
	case SSL_R_HTTPS_PROXY_REQUEST:
	case SSL_R_PACKET_LENGTH_TOO_LONG:
	case SSL_R_UNEXPECTED_MESSAGE:
	case SSL_R_RECORD_LENGTH_MISMATCH:
	case SSL_R_WRONG_SSL_VERSION:
		return ZTUN_TLSR_NOT_TLS;
	case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
		return ZTUN_TLSR_NO_PEER_CERT;
	default:
		/* An alert from the peer (reasons 1000 + alert): it refused us. */
		if (lib_reason >= SSL_AD_REASON_OFFSET && lib_reason < SSL_AD_REASON_OFFSET + 256)
			return ZTUN_TLSR_PEER_REFUSED;
		return ZTUN_TLSR_OTHER;
	}
}

void ztls_describe_error(SSL *ssl, int ret, struct ztls_hs *hs, char *buf, size_t len)
{
	int e = SSL_get_error(ssl, ret);
	unsigned long code = ERR_peek_last_error();
	char ebuf[256];

	if (hs && hs->reason[0]) {
		snprintf(buf, len, "%s", hs->reason);
	} else if (e == SSL_ERROR_SSL && code) {
		const char *r = ERR_reason_error_string(code);
		long v = SSL_get_verify_result(ssl);
		int lib_reason = ERR_GET_REASON(code);

		if (hs && !hs->code)
			hs->code = ztls_reason_of(lib_reason);

		if (ERR_GET_REASON(code) == SSL_R_CERTIFICATE_VERIFY_FAILED && v != X509_V_OK)
			snprintf(buf, len, "certificate verify failed: %s", X509_verify_cert_error_string(v));
		else if (r)
			snprintf(buf, len, "%s", r);
		else
			snprintf(buf, len, "%s", ERR_error_string(code, ebuf));
	} else if (e == SSL_ERROR_SYSCALL) {
		if (errno)
			snprintf(buf, len, "socket error: %s", strerror(errno));
		else
			snprintf(buf, len, "peer closed the connection during TLS");
	} else if (e == SSL_ERROR_ZERO_RETURN) {
		snprintf(buf, len, "peer closed TLS");
	} else {
		snprintf(buf, len, "TLS error %d", e);
	}
	ERR_clear_error();
}

/* ---- expectations and session slots ------------------------------------- */

struct ztls_expect *ztls_expect_new(const char *const *ids, int n)
{
	struct ztls_expect *x = calloc(1, sizeof(*x));

	if (!x)
		return NULL;
	atomic_store(&x->refs, 1);
	x->ids = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
	if (!x->ids) {
		free(x);
		return NULL;
	}
	for (int i = 0; i < n; i++) {
		x->ids[i] = strdup(ids[i]);
		if (!x->ids[i]) {
			x->n = i;
			ztls_expect_put(x);
			return NULL;
		}
	}
	x->n = n;
	return x;
}

struct ztls_expect *ztls_expect_ref(struct ztls_expect *x)
{
	if (x)
		atomic_fetch_add(&x->refs, 1);
	return x;
}

void ztls_expect_put(struct ztls_expect *x)
{
	if (!x || atomic_fetch_sub(&x->refs, 1) != 1)
		return;
	for (int i = 0; i < x->n; i++)
		free(x->ids[i]);
	free(x->ids);
	free(x);
}

void ztls_slot_init(struct ztls_session_slot *s)
{
	pthread_mutex_init(&s->mu, NULL);
	s->sess = NULL;
}

void ztls_slot_clear(struct ztls_session_slot *s)
{
	SSL_SESSION *old;

	pthread_mutex_lock(&s->mu);
	old = s->sess;
	s->sess = NULL;
	pthread_mutex_unlock(&s->mu);
	if (old)
		SSL_SESSION_free(old);
}

void ztls_slot_destroy(struct ztls_session_slot *s)
{
	if (s->sess)
		SSL_SESSION_free(s->sess);
	s->sess = NULL;
	pthread_mutex_destroy(&s->mu);
}

/* A TLS 1.3 ticket arrived (after the handshake): keep it for the next connection. */
static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	/* Tickets arrive after the handshake, when the handshake state is gone: the
	 * slot has its own ex_data entry and outlives the connection (its listener). */
	struct ztls_session_slot *slot = SSL_get_ex_data(ssl, slot_index);
	SSL_SESSION *old;

	if (!slot || !SSL_SESSION_is_resumable(sess))
		return 0;
	pthread_mutex_lock(&slot->mu);
	old = slot->sess;
	slot->sess = sess;
	pthread_mutex_unlock(&slot->mu);
	if (old)
		SSL_SESSION_free(old);
	return 1; /* we took the reference */
}

/* ---- contexts ----------------------------------------------------------- */

static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
			  const unsigned char *in, unsigned int inlen, void *arg)
{
	static const unsigned char h2[] = {2, 'h', '2'};

	/* Accept h2 when offered (HBONE); a client offering nothing else gets no ALPN. */
	if (SSL_select_next_proto((unsigned char **)out, outlen, h2, sizeof(h2), in, inlen) ==
	    OPENSSL_NPN_NEGOTIATED)
		return SSL_TLSEXT_ERR_OK;
	return SSL_TLSEXT_ERR_NOACK;
}

static int load_chain(SSL_CTX *ssl, const char *pem, size_t len, X509 **leaf_out, char *err, size_t errlen)
{
	BIO *b = BIO_new_mem_buf(pem, (int)len);
	X509 *x;
	int n = 0;

	if (!b)
		return ZTUN_ENOMEM;
	while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
		int ok = n == 0 ? SSL_CTX_use_certificate(ssl, x) : SSL_CTX_add0_chain_cert(ssl, x);

		if (!ok) {
			X509_free(x);
			BIO_free(b);
			set_err(err, errlen, "certificate chain rejected");
			return ZTUN_ETLS;
		}
		if (n == 0)
			*leaf_out = x; /* SSL_CTX_use_certificate took its own reference */
		n++;
	}
	ERR_clear_error(); /* the loop ends with a "no start line" error */
	BIO_free(b);
	if (n == 0) {
		set_err(err, errlen, "certificate chain: no PEM certificate found");
		return ZTUN_ETLS;
	}
	return 0;
}

static int load_roots(ztun_tls_ctx *c, const struct ztun_tls_config *cfg, char *err, size_t errlen)
{
	X509_STORE *store = SSL_CTX_get_cert_store(c->ssl);

	for (int t = 0; t < cfg->ntrust; t++) {
		BIO *b = BIO_new_mem_buf(cfg->trust_pems[t], (int)cfg->trust_lens[t]);
		X509 *x;
		int n = 0;

		if (!b)
			return ZTUN_ENOMEM;
		while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
			void *p = realloc(c->roots, (size_t)(c->nroots + 1) * sizeof(*c->roots));

			if (!p || !X509_STORE_add_cert(store, x)) {
				X509_free(x);
				BIO_free(b);
				set_err(err, errlen, "trust bundle: root rejected");
				return p ? ZTUN_ETLS : ZTUN_ENOMEM;
			}
			c->roots = p;
			c->roots[c->nroots].cert = x;
			c->roots[c->nroots].td = strdup(cfg->trust_domains[t]);
			c->nroots++;
			n++;
		}
		ERR_clear_error();
		BIO_free(b);
		if (n == 0) {
			if (err)
				snprintf(err, errlen, "trust bundle for %s: no PEM certificate found",
					 cfg->trust_domains[t]);
			return ZTUN_ETLS;
		}
	}
	return 0;
}

int ztun_tls_ctx_new(const struct ztun_tls_config *cfg, ztun_tls_ctx **out, char *err, size_t errlen)
{
	ztun_tls_ctx *c;
	X509 *leaf = NULL;
	EVP_PKEY *key = NULL;
	BIO *kb;
	char id[ZTUN_SPIFFE_MAX + 1];
	const char *why = NULL, *td;
	size_t td_len;
	int rc = ZTUN_ETLS;
	const char *suites = (cfg->flags & ZTUN_TLS_CHACHA20)
				     ? "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
				     : "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384";

	*out = NULL;
	if (err && errlen)
		err[0] = 0;
	if (!cfg || !cfg->chain_pem || !cfg->key_pem || cfg->ntrust <= 0)
		return ZTUN_EINVAL;
	pthread_once(&index_once, make_indexes);
	c = calloc(1, sizeof(*c));
	if (!c)
		return ZTUN_ENOMEM;
	atomic_store(&c->refs, 1);
	c->flags = cfg->flags;
	c->ssl = SSL_CTX_new(TLS_method());
	if (!c->ssl) {
		set_err(err, errlen, "SSL_CTX_new");
		goto fail;
	}
	SSL_CTX_set_min_proto_version(c->ssl, TLS1_3_VERSION);
	SSL_CTX_set_max_proto_version(c->ssl, TLS1_3_VERSION);
	if (!SSL_CTX_set_ciphersuites(c->ssl, suites) || !SSL_CTX_set1_groups_list(c->ssl, "X25519:P-256")) {
		set_err(err, errlen, "cipher suites");
		goto fail;
	}
	SSL_CTX_set_options(c->ssl, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
					    SSL_OP_CIPHER_SERVER_PREFERENCE);
	/* Partial writes let the relay hand OpenSSL a large buffer and keep what is left;
	 * released buffers keep an idle connection's memory low. */
	SSL_CTX_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
					 SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_read_ahead(c->ssl, 1);
	/* With read-ahead, one recv() can bring several records. */
	SSL_CTX_set_default_read_buffer_len(c->ssl, 64 * 1024);
	SSL_CTX_set_verify(c->ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_cb);
	SSL_CTX_set_alpn_select_cb(c->ssl, alpn_select_cb, NULL);
	SSL_CTX_set_session_id_context(c->ssl, (const unsigned char *)"ztun", 4);
	SSL_CTX_set_timeout(c->ssl, cfg->session_lifetime_s ? cfg->session_lifetime_s : 3600);
	if (cfg->flags & ZTUN_TLS_RESUMPTION) {
		SSL_CTX_set_num_tickets(c->ssl, 1);
		SSL_CTX_set_session_cache_mode(c->ssl, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
		SSL_CTX_sess_set_new_cb(c->ssl, new_session_cb);
	} else {
		SSL_CTX_set_num_tickets(c->ssl, 0);
		SSL_CTX_set_options(c->ssl, SSL_OP_NO_TICKET);
		SSL_CTX_set_session_cache_mode(c->ssl, SSL_SESS_CACHE_OFF);
	}

	rc = load_chain(c->ssl, cfg->chain_pem, cfg->chain_len, &leaf, err, errlen);
	if (rc)
		goto fail;
	rc = ZTUN_ETLS;
	kb = BIO_new_mem_buf(cfg->key_pem, (int)cfg->key_len);
	if (kb) {
		key = PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL);
		BIO_free(kb);
	}
	if (!key) {
		set_err(err, errlen, "private key: not a PEM private key");
		goto fail;
	}
	if (!SSL_CTX_use_PrivateKey(c->ssl, key) || !SSL_CTX_check_private_key(c->ssl)) {
		EVP_PKEY_free(key);
		set_err(err, errlen, "private key does not match the certificate");
		goto fail;
	}
	EVP_PKEY_free(key);
	int why_code = 0;

	if (leaf_spiffe_id(leaf, id, sizeof(id), &why, &why_code) || leaf_usage_ok(leaf, &why, &why_code)) {
		if (err)
			snprintf(err, errlen, "own certificate: %s", why);
		goto fail;
	}
	if (ztun_spiffe_parse(id, strlen(id), &td, &td_len, &why) != 0)
		goto fail;
	c->identity = strdup(id);
	c->trust_domain = strndup(td, td_len);
	{
		struct tm tm;

		if (!ASN1_TIME_to_tm(X509_get0_notAfter(leaf), &tm)) {
			set_err(err, errlen, "own certificate: unreadable notAfter");
			goto fail;
		}
		c->not_after = (int64_t)timegm(&tm);
	}
	rc = load_roots(c, cfg, err, errlen);
	if (rc)
		goto fail;
	*out = c;
	return 0;
fail:
	ztun_tls_ctx_free(c);
	return rc;
}

ztun_tls_ctx *ztun_tls_ctx_ref(ztun_tls_ctx *ctx)
{
	if (ctx)
		atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
	return ctx;
}

void ztun_tls_ctx_free(ztun_tls_ctx *c)
{
	if (!c || atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (c->ssl)
		SSL_CTX_free(c->ssl);
	for (int i = 0; i < c->nroots; i++) {
		X509_free(c->roots[i].cert);
		free(c->roots[i].td);
	}
	free(c->roots);
	free(c->identity);
	free(c->trust_domain);
	free(c);
}

const char *ztun_tls_ctx_identity(const ztun_tls_ctx *ctx)
{
	return ctx->identity;
}

void ztls_detach(SSL *ssl)
{
	SSL_set_ex_data(ssl, hs_index, NULL);
}

SSL *ztls_new(ztun_tls_ctx *ctx, int fd, struct ztls_hs *hs, const char *alpn)
{
	SSL *ssl = SSL_new(ctx->ssl);

	if (!ssl)
		return NULL;
	hs->ctx = ctx;
	if (!SSL_set_fd(ssl, fd) || !SSL_set_ex_data(ssl, hs_index, hs) ||
	    !SSL_set_ex_data(ssl, slot_index, hs->slot)) {
		SSL_free(ssl);
		return NULL;
	}
	if (hs->server) {
		SSL_set_accept_state(ssl);
	} else {
		SSL_set_connect_state(ssl);
		if (alpn) {
			unsigned char wire[32];
			size_t n = strlen(alpn);

			if (n < sizeof(wire) - 1) {
				wire[0] = (unsigned char)n;
				memcpy(wire + 1, alpn, n);
				SSL_set_alpn_protos(ssl, wire, (unsigned int)n + 1);
			}
		}
		if (hs->slot && (ctx->flags & ZTUN_TLS_RESUMPTION)) {
			SSL_SESSION *s;

			pthread_mutex_lock(&hs->slot->mu);
			s = hs->slot->sess;
			if (s)
				SSL_SESSION_up_ref(s);
			pthread_mutex_unlock(&hs->slot->mu);
			if (s) {
				SSL_set_session(ssl, s);
				SSL_SESSION_free(s);
			}
		}
	}
	return ssl;
}
