// SPDX-License-Identifier: GPL-2.0
// ShellWeGo per-VM QoS classifier (tc, clsact). One instance per VM and direction:
//  - on the TAP's egress (VM download) it marks packets for the TAP's HTB class;
//  - on the TAP's ingress (VM upload) it marks them and redirects them to the VM's IFB,
//    whose HTB shapes them.
// Shaping is HTB's job: on kernels without fq (no EDT pacing) a BPF token-bucket dropper
// collapses TCP throughput, while BPF classification + HTB holds the rate.
// Counters (bytes, packets) live in a per-CPU array the agent reads.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct qos_config {
	__u32 enabled;          // 0: count only, pass everything unmarked
	__u32 priority;         // skb->priority = HTB class id (major << 16 | minor)
	__u32 redirect_ifindex; // non-zero: redirect to this device's egress (the IFB)
	__u32 pad;
};

struct qos_counters {
	__u64 bytes;
	__u64 packets;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct qos_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct qos_counters);
} counters SEC(".maps");

SEC("classifier")
int qos(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct qos_counters *c = bpf_map_lookup_elem(&counters, &key);
	if (c) {
		c->bytes += skb->len;
		c->packets += 1;
	}
	struct qos_config *cfg = bpf_map_lookup_elem(&config, &key);
	if (!cfg || !cfg->enabled)
		return TC_ACT_OK;
	skb->priority = cfg->priority;
	if (cfg->redirect_ifindex)
		return bpf_redirect(cfg->redirect_ifindex, 0);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
