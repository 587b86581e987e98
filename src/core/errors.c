#include <string.h>

#include "ztun/ztun.h"

const char *ztun_version(void)
{
	return ZTUN_VERSION_STRING;
}

const char *ztun_strerror(int err)
{
	switch (err) {
	case ZTUN_OK: return "ok";
	case ZTUN_EINVAL: return "invalid argument";
	case ZTUN_ENOMEM: return "out of memory";
	case ZTUN_ESTATE: return "not allowed in the current state";
	case ZTUN_ENOTFOUND: return "not found";
	case ZTUN_ETLS: return "TLS setup failed";
	case ZTUN_EFULL: return "queue full";
	case ZTUN_EPOLICY: return "malformed policy table";
	case ZTUN_ECLOSED: return "engine is stopped";
	}
	if (err < 0 && err > -4096)
		return strerror(-err);
	return "unknown error";
}
