# C declarations of the compiled policy evaluator (src/include/ztun/policy.h), all nogil.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "ztun/policy.h" nogil:
    ctypedef struct ztun_policy "struct ztun_policy":
        pass

    int ZTUN_POLICY_F_NOCOUNT
    int ZTUN_POLICY_WORKLOAD_DEFAULT

    ctypedef struct ztun_policy_conn "struct ztun_policy_conn":
        uint8_t src_ip[16]
        uint8_t dst_ip[16]
        uint16_t dst_port
        uint16_t flags
        int32_t dst_workload
        const char *peer_id
        size_t peer_id_len

    ctypedef struct ztun_policy_verdict "struct ztun_policy_verdict":
        int32_t allow
        int32_t reason
        int32_t policy
        int32_t rule
        uint32_t dry_run_evaluated
        uint32_t dry_run_matched
        int32_t dry_run_allow
        int32_t dry_run_policy
        int32_t dry_run_rule

    ctypedef struct ztun_policy_counters_t "struct ztun_policy_counters":
        uint64_t allowed
        uint64_t denied
        uint64_t dry_run

    int ztun_policy_load(const void *blob, size_t len, ztun_policy **out)
    void ztun_policy_free(ztun_policy *table)
    int ztun_policy_find_workload(const ztun_policy *table, const uint8_t *ip16)
    int ztun_policy_find_workload_by_name(const ztun_policy *table, const char *key,
                                          size_t key_len)
    int ztun_policy_eval(const ztun_policy *table, const ztun_policy_conn *conn,
                         ztun_policy_verdict *out)
    uint32_t ztun_policy_count(const ztun_policy *table)
    const char *ztun_policy_name(const ztun_policy *table, int32_t idx)
    int ztun_policy_is_dry_run(const ztun_policy *table, int32_t idx)
    int ztun_policy_is_deny(const ztun_policy *table, int32_t idx)
    uint32_t ztun_policy_workload_count(const ztun_policy *table)
    const char *ztun_policy_workload_name(const ztun_policy *table, int32_t idx)
    int ztun_policy_counters(const ztun_policy *table, int32_t idx, ztun_policy_counters_t *out)
    void ztun_policy_counters_carry(ztun_policy *dst, const ztun_policy *src)


cdef extern from "ztun/ztun.h" nogil:
    int ZTUN_ENOTFOUND
