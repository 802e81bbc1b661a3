/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of the datapath, one commented definition each. All are pinned by
 * name under the loader's bpffs directory (--bpffs, default /sys/fs/bpf/xnet),
 * with BTF, so `bpftool map dump pinned /sys/fs/bpf/xnet/routes` is readable
 * and a restarted xnetd finds them again. After the definitions: the one
 * accessor each map is read or counted through.
 */
#ifndef XNET_MAPS_H
#define XNET_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"

/* routes: remote subnet -> peer (PublicIP, VTEP MAC). One entry per peer
 * lease. The encap looks up the inner destination; the decap looks up the
 * inner source to check that the outer source is that lease's PublicIP. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct route_key);
	__type(value, struct route);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} routes SEC(".maps");

/* peers: per-peer packet and byte counters, keyed by the peer's underlay
 * address (underlay_addr): its PublicIP mapped into IPv6, or in an IPv6-only
 * overlay its PublicIPv6 (count_peer6). The Go side creates an entry when a
 * peer appears and deletes it when the peer goes; the programs only count into
 * existing entries. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, underlay_addr);
	__type(value, struct peer_stats);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peers SEC(".maps");

/* config: this host (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct host_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

/* counters: packets and bytes per verdict, per CPU. The key stays __u32, not
 * enum verdict: the kernel accepts only a 32-bit int as the BTF key of an
 * array map (measured on 6.18: with the enum, map creation fell back to no
 * BTF at all and bpftool printed raw hex). `xnetd status` prints the names. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, VERDICT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

/* endpoints: local container IPv4 -> its veth, learned from the packets
 * containers send. A miss only costs a detour through xnet0 and
 * the host's forwarding, so the map may lag behind Docker. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, ipv4_addr);
	__type(value, struct endpoint);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* nexthops: peer underlay address -> underlay next hop (MACs, NIC), a cache
 * of bpf_fib_lookup answers written by encap and the DirectRouting paths and
 * trusted for XNET_NEXTHOP_TTL_JIFFIES. Keyed by underlay_addr: a peer's
 * PublicIP as ::ffff:a.b.c.d, or the PublicIPv6 of a DirectRouting peer on our
 * IPv6 segment. LRU: peers that went away age out by themselves. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, underlay_addr);
	__type(value, struct nexthop);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nexthops SEC(".maps");

/* routes6: remote IPv6 subnet -> peer, in a dual-stack overlay. One entry per
 * peer lease with an IPv6Subnet; the value points at the same peer (PublicIP,
 * counters) as its IPv4 route. Looked up as routes is: the encap by inner
 * destination, the decap by inner source. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct route6_key);
	__type(value, struct route6);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} routes6 SEC(".maps");

/* config6: this host's IPv6 lease (one entry; all zero on an IPv4-only host). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct host_config6);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config6 SEC(".maps");

/* endpoints6: local container IPv6 address -> its veth, learned as endpoints
 * is (a container's addresses in our IPv6 lease, from what it sends). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, ipv6_addr);
	__type(value, struct endpoint);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints6 SEC(".maps");

/* icmp_buckets: the token bucket of the ICMP errors the encap sends (one
 * entry, per CPU: no atomics, and a CPU flooded by one container does not
 * starve the others); see enum icmp_ratelimit and icmp_allowed below. Pinned
 * like the rest: a restart does not refill the buckets. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct icmp_bucket);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} icmp_buckets SEC(".maps");

/*
 * The one way each map is read or counted into.
 */

/* get_config returns this host's config, or 0 while the datapath is not
 * configured: an unconfigured datapath (the Go side has not written our lease
 * yet) must behave as if it were not attached. An IPv6-only host has no IPv4
 * underlay address: its ipv6_only says it is configured. */
static __always_inline const struct host_config *get_config(void)
{
	__u32 zero = 0;
	const struct host_config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg || (!ip4_word(cfg->local_ip) && !cfg->ipv6_only))
		return 0;
	return cfg;
}

/* route_of returns the route of the peer subnet holding addr (network order). */
static __always_inline struct route *route_of(__u32 addr)
{
	struct route_key key = {.prefixlen = 32};

	*(__u32 *)key.addr = addr;
	return bpf_map_lookup_elem(&routes, &key);
}

/* count adds one packet of bytes to a verdict. Per-CPU values: no atomics. */
static __always_inline void count(__u32 verdict, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &verdict);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* count_peer adds one packet to the tx or rx counters of the peer at peer (an
 * underlay_addr on the stack), if the Go side knows the peer. */
static __always_inline void count_peer(const void *peer, __u32 bytes, int rx)
{
	struct peer_stats *p = bpf_map_lookup_elem(&peers, peer);

	if (!p)
		return;
	if (rx) {
		p->rx_packets++;
		p->rx_bytes += bytes;
	} else {
		p->tx_packets++;
		p->tx_bytes += bytes;
	}
}

/* count_peer4 is count_peer for the peer whose PublicIP is peer_ip (network
 * order). */
static __always_inline void count_peer4(__u32 peer_ip, __u32 bytes, int rx)
{
	underlay_addr key;

	underlay_addr4(key, peer_ip);
	count_peer(key, bytes, rx);
}

/* route6_peer writes into key (an underlay_addr) the address that keys the
 * counters of the peer of rt: its PublicIP, as for its IPv4 route (one set of
 * counters per peer, whichever family and underlay the traffic takes), or in
 * an IPv6-only overlay, where it has none (0.0.0.0), its PublicIPv6. */
static __always_inline void route6_peer(const struct route6 *rt, void *key)
{
	__u32 ip = ip4_word(rt->remote_ip);

	if (ip) {
		underlay_addr4(key, ip);
		return;
	}
	ip6_copy(key, rt->remote_ip6);
}

/* count_peer6 is count_peer for the peer of the IPv6 route rt. */
static __always_inline void count_peer6(const struct route6 *rt, __u32 bytes, int rx)
{
	underlay_addr key;

	route6_peer(rt, key);
	count_peer(key, bytes, rx);
}

/* get_config6 returns this host's IPv6 config, or 0 when the overlay (or this
 * host's lease) has no IPv6: then IPv6 is not ours and passes untouched. A
 * lease's mask is never /0, so a zero first word means "not written". */
static __always_inline const struct host_config6 *get_config6(void)
{
	__u32 zero = 0;
	const struct host_config6 *cfg6 = bpf_map_lookup_elem(&config6, &zero);

	if (!cfg6 || !ip6_words(cfg6->subnet_mask)[0])
		return 0;
	return cfg6;
}

/* route6_of returns the route of the peer IPv6 subnet holding addr (16 bytes,
 * wire order, 4-byte aligned). */
static __always_inline struct route6 *route6_of(const void *addr)
{
	struct route6_key key = {.prefixlen = 128};

	ip6_copy(key.addr, addr);
	return bpf_map_lookup_elem(&routes6, &key);
}

/* icmp_allowed takes one token from this CPU's ICMP bucket: 1 when the encap
 * may send the ICMP error it is about to build, 0 when it is over the budget
 * (the packet is then dropped unanswered, as the kernel's icmp_global_allow
 * drops its own). The bucket holds time rather than tokens: every nanosecond
 * since the last error adds one, up to XNET_ICMP_BURST intervals, and an error
 * costs one interval. An entry never used holds 0 as its last time, so the
 * first error finds a full bucket. */
static __always_inline int icmp_allowed(void)
{
	__u32 zero = 0;
	struct icmp_bucket *b = bpf_map_lookup_elem(&icmp_buckets, &zero);
	__u64 now = bpf_ktime_get_ns(), credit, full = (__u64)XNET_ICMP_BURST * XNET_ICMP_INTERVAL_NS;

	if (!b)
		return 0;
	credit = now - b->last_ns;
	if (credit > full || b->credit_ns > full - credit)
		credit = full;
	else
		credit += b->credit_ns;
	b->last_ns = now;
	if (credit < XNET_ICMP_INTERVAL_NS) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - XNET_ICMP_INTERVAL_NS;
	return 1;
}

#endif /* XNET_MAPS_H */
