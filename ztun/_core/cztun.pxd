# C declarations of the ztun core: one block per header, all nogil.

from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr_storage:
        unsigned short ss_family


cdef extern from "ztun/ztun.h" nogil:
    const char *ztun_strerror(int err)
    const char *ztun_version()


cdef extern from "ztun/tls.h" nogil:
    ctypedef struct ztun_tls_ctx
    enum:
        ZTUN_TLS_CHACHA20
        ZTUN_TLS_RESUMPTION
        ZTUN_TLS_ANY_TRUST_DOMAIN
    struct ztun_tls_config:
        const char *chain_pem
        size_t chain_len
        const char *key_pem
        size_t key_len
        int ntrust
        const char *const *trust_domains
        const char *const *trust_pems
        const size_t *trust_lens
        uint32_t flags
        uint32_t session_lifetime_s
    int ztun_tls_ctx_new(const ztun_tls_config *cfg, ztun_tls_ctx **out, char *err, size_t errlen)
    ztun_tls_ctx *ztun_tls_ctx_ref(ztun_tls_ctx *ctx)
    void ztun_tls_ctx_free(ztun_tls_ctx *ctx)
    const char *ztun_tls_ctx_identity(const ztun_tls_ctx *ctx)
    enum:
        ZTUN_TLSR__COUNT
    const char *ztun_tls_reason_name(int reason)


cdef extern from "ztun/engine.h" nogil:
    ctypedef struct ztun_engine
    ctypedef struct ztun_policy
    struct ztun_policy_counters:
        uint64_t allowed
        uint64_t denied
        uint64_t dry_run

    struct ztun_engine_config:
        int workers
        uint32_t connect_timeout_ms
        uint32_t handshake_timeout_ms
        uint32_t idle_timeout_ms
        uint32_t event_ring_bytes
        uint32_t buf_small
        uint32_t buf_large
        uint32_t events
        uint32_t splice_pipe
        uint32_t spin_us

    enum:
        ZTUN_MODE_FORWARD
        ZTUN_MODE_TLS_OUT
        ZTUN_MODE_TLS_IN
        ZTUN_MODE_HBONE_IN
        ZTUN_MODE_HBONE_OUT
        ZTUN_MODE_SOCKS5
        ZTUN_LISTENER_POLICY
        ZTUN_LISTENER_ORIGINAL_DST
        ZTUN_LISTENER_VIRTUAL
        ZTUN_LISTENER_DELIVER
        ZTUN_EV_ACCEPT
        ZTUN_CLOSE__COUNT
        ZTUN_EV_PAD
        ZTUN_EV_CONN_OPEN
        ZTUN_EV_CONN_CLOSE
        ZTUN_EV_LOG
        ZTUN_EV_CONNECT_DONE
        ZTUN_EVMASK_OPEN
        ZTUN_EVMASK_CLOSE
        ZTUN_EVMASK_LOG
        ZTUN_EVMASK_ALL
        ZTUN_EVPOL_DRY_RUN
        ZTUN_EVPOL_DRY_RUN_DENY
        ZTUN_EVPOL_RECHECKED

    struct ztun_listener_spec:
        int mode
        int fd
        sockaddr_storage bind
        socklen_t bind_len
        int backlog
        sockaddr_storage upstream
        socklen_t upstream_len
        ztun_tls_ctx *tls
        int32_t workload
        uint32_t flags
        sockaddr_storage target
        socklen_t target_len
        const char *const *expect
        int nexpect
        const char *baggage
        const unsigned char (*workload_ips)[16]
        int nworkload_ips
        const char *workload_key

    struct ztun_stats:
        uint64_t bytes_down_up
        uint64_t bytes_up_down
        uint64_t conns_opened
        uint64_t conns_closed
        uint64_t conns_active
        uint64_t conns_failed
        uint64_t close_reason[32]
        uint64_t handshakes
        uint64_t handshakes_resumed
        uint64_t policy_allowed
        uint64_t policy_denied
        uint64_t policy_dry_run
        uint64_t events_dropped
        uint64_t buffers_in_use
        uint64_t buffer_bytes
        uint64_t hbone_status[5]
        uint64_t hbone_protocol_errors
        uint64_t h2_opened
        uint64_t h2_closed
        uint64_t h2_active
        uint64_t h2_close_reason[32]
        uint64_t tls_failures[32]
        uint64_t bpf_pairs
        uint64_t bpf_direct_bytes

    struct ztun_event_hdr:
        uint32_t len
        uint16_t type
        uint16_t worker

    struct ztun_event_conn:
        ztun_event_hdr h
        uint64_t conn_id
        uint32_t listener_id
        uint16_t reason
        uint16_t mode
        int32_t policy
        int32_t policy_rule
        int32_t http_status
        int32_t sys_errno
        uint32_t policy_gen
        uint16_t policy_reason
        uint16_t policy_flags
        int32_t dry_run_policy
        int32_t dry_run_rule
        uint64_t start_ns
        uint64_t duration_ns
        uint64_t bytes_down_up
        uint64_t bytes_up_down
        sockaddr_storage src
        sockaddr_storage dst
        sockaddr_storage target
        uint64_t request_id
        uint16_t peer_id_len
        uint16_t detail_len
        uint16_t local_id_len
        uint16_t trace_len
        uint16_t baggage_len
        uint16_t tls_reason
        int32_t fd

    struct ztun_event_log:
        ztun_event_hdr h
        uint16_t level
        uint16_t msg_len

    int ztun_engine_new(const ztun_engine_config *cfg, ztun_engine **out)
    int ztun_engine_start(ztun_engine *e)
    int ztun_engine_stop(ztun_engine *e, uint32_t drain_ms)
    void ztun_engine_free(ztun_engine *e)
    int ztun_engine_workers(const ztun_engine *e)
    int ztun_engine_add_listener(ztun_engine *e, const ztun_listener_spec *spec, uint32_t *id,
                                 sockaddr_storage *bound, socklen_t *bound_len)
    int ztun_engine_remove_listener(ztun_engine *e, uint32_t id)
    int ztun_engine_set_listener_tls(ztun_engine *e, uint32_t id, ztun_tls_ctx *ctx)
    int ztun_engine_pause_accept(ztun_engine *e)
    int ztun_engine_adopt(ztun_engine *e, uint32_t listener_id, int fd,
                          const sockaddr_storage *target, uint64_t request_id)
    int ztun_engine_set_policy(ztun_engine *e, ztun_policy *table)
    int ztun_engine_swap_policy(ztun_engine *e, ztun_policy *table, uint32_t *generation)
    int ztun_engine_policy_counters(ztun_engine *e, ztun_policy_counters *out, uint32_t n,
                                    uint32_t *count, uint32_t *generation)
    struct ztun_dir_entry:
        unsigned char ip[16]
        const char *identity
        sockaddr_storage via
        uint32_t flags
    enum:
        ZTUN_DIR_LOCAL
    int ztun_engine_set_bpf(ztun_engine *e, void *handle, const void *api)
    int ztun_engine_set_directory(ztun_engine *e, const ztun_dir_entry *entries, int n)
    const char *ztun_close_reason_name(int reason)
    int ztun_engine_stats(ztun_engine *e, ztun_stats *out)
    struct ztun_conn_info:
        uint64_t conn_id
        uint32_t listener_id
        uint16_t mode
        uint16_t state
        uint64_t bytes_down_up
        uint64_t bytes_up_down
        uint64_t start_ns
    int ztun_engine_connections(ztun_engine *e, ztun_conn_info *out, size_t cap, size_t *n)
    void ztun_engine_set_events(ztun_engine *e, uint32_t mask)
    int ztun_engine_event_fd(const ztun_engine *e)
    int ztun_engine_read_events(ztun_engine *e, void *buf, size_t len, size_t *used)
    int ztun_engine_arm_events(ztun_engine *e)
