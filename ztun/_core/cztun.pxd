# C declarations of the ztun core, one block per header, all nogil.

cdef extern from "ztun/ztun.h" nogil:
    const char *ztun_strerror(int err)
    const char *ztun_version()
