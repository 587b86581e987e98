#include <string.h>

#include "spiffe.h"

static int td_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

static int path_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
	       c == '-' || c == '_';
}

int ztun_spiffe_parse(const char *id, size_t len, const char **td, size_t *td_len, const char **why)
{
	static const char scheme[] = "spiffe://";
	const size_t slen = sizeof(scheme) - 1;
	size_t i, seg_start;

	if (len == 0) {
		*why = "empty SPIFFE ID";
		return -1;
	}
	if (len > ZTUN_SPIFFE_MAX) {
		*why = "SPIFFE ID longer than 2048 bytes";
		return -1;
	}
	if (len < slen || memcmp(id, scheme, slen) != 0) {
		*why = "not a spiffe:// URI";
		return -1;
	}
	for (i = slen; i < len && id[i] != '/'; i++) {
		if (!td_char(id[i])) {
			*why = "trust domain has a character outside [a-z0-9.-_]";
			return -1;
		}
	}
	if (i == slen) {
		*why = "empty trust domain";
		return -1;
	}
	*td = id + slen;
	*td_len = i - slen;
	/* Path: zero or more "/segment", no empty, "." or ".." segments, no trailing slash. */
	while (i < len) {
		i++; /* the '/' */
		seg_start = i;
		while (i < len && id[i] != '/') {
			if (!path_char(id[i])) {
				*why = "path has a character outside [A-Za-z0-9.-_]";
				return -1;
			}
			i++;
		}
		if (i == seg_start) {
			*why = i == len ? "path ends with a slash" : "path has an empty segment";
			return -1;
		}
		if ((i - seg_start == 1 && id[seg_start] == '.') ||
		    (i - seg_start == 2 && id[seg_start] == '.' && id[seg_start + 1] == '.')) {
			*why = "path has a '.' or '..' segment";
			return -1;
		}
	}
	return 0;
}
