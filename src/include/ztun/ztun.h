/* ztun — public C API basics: version, error codes.
 *
 * Every public function of the core returns 0 or a negative error: either -errno (a
 * system call failed) or one of the ZTUN_E* codes below, which live far above the errno
 * range so the two never collide. ztun_strerror() turns either kind into text.
 */
#ifndef ZTUN_ZTUN_H
#define ZTUN_ZTUN_H

#define ZTUN_VERSION_STRING "0.1.0"

enum ztun_error {
	ZTUN_OK = 0,
	ZTUN_EINVAL = -10001,     /* an argument is invalid */
	ZTUN_ENOMEM = -10002,     /* out of memory */
	ZTUN_ESTATE = -10003,     /* the object is not in a state that allows this */
	ZTUN_ENOTFOUND = -10004,  /* no such listener / connection / id */
	ZTUN_ETLS = -10005,       /* TLS setup failed (OpenSSL said why in the event ring) */
	ZTUN_EFULL = -10006,      /* a bounded queue is full */
	ZTUN_EPOLICY = -10007,    /* the compiled policy blob is malformed */
	ZTUN_ECLOSED = -10008,    /* the engine is stopped or stopping */
};

const char *ztun_strerror(int err);
const char *ztun_version(void);

#endif
