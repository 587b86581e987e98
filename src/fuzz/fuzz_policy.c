/* libFuzzer target: ztun_policy_load() must reject or accept any bytes without a crash,
 * and whatever it accepts must evaluate safely. Build: see src/fuzz/CMakeLists.txt. */
#include <stdint.h>
#include <string.h>

#include "ztun/policy.h"
#include "ztun/ztun.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char peer[] = "spiffe://cluster.local/ns/default/sa/web";
	struct ztun_policy *t = NULL;
	struct ztun_policy_conn c;
	struct ztun_policy_verdict v;

	if (ztun_policy_load(data, size, &t) != 0)
		return 0;
	/* An accepted table is trusted from here on: walk every workload with a few peers. */
	memset(&c, 0, sizeof(c));
	c.src_ip[10] = c.src_ip[11] = 0xff;
	c.src_ip[12] = 10;
	c.dst_port = 8080;
	for (uint32_t w = 0; w < ztun_policy_workload_count(t); w++) {
		c.dst_workload = (int32_t)w;
		c.peer_id = NULL;
		c.peer_id_len = 0;
		ztun_policy_eval(t, &c, &v);
		c.peer_id = peer;
		c.peer_id_len = sizeof(peer) - 1;
		ztun_policy_eval(t, &c, &v);
	}
	ztun_policy_find_workload(t, c.src_ip);
	ztun_policy_find_workload_by_name(t, "prod/web", 8);
	for (uint32_t i = 0; i < ztun_policy_count(t); i++)
		(void)strlen(ztun_policy_name(t, (int32_t)i));
	ztun_policy_free(t);
	return 0;
}
