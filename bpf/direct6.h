/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * DirectRouting for IPv6 (direct.h is the IPv4 original, and says why): a
 * peer whose PublicIPv6 lies in a connected IPv6 subnet of the underlay NIC
 * gets route6.direct, and its IPv6 subnet's packets go plain out of the
 * underlay with its PublicIPv6 as next hop, as vxlan's DirectRouting routes
 * `<IPv6 subnet> via <PublicIPv6>` and flannel's does. In the other direction
 * (direct6_in in ipv6.h) a plain IPv6 packet for our IPv6 lease from a direct
 * peer's IPv6 subnet is delivered only when its Ethernet source is that
 * peer's MAC as our neighbour table knows its PublicIPv6.
 *
 * The next hop comes from the same nexthops cache as IPv4's, keyed by the
 * peer's PublicIPv6 (an underlay_addr), else from bpf_fib_lookup, which reads
 * the neighbour table and whose resolved answer is cached for the next
 * packets: per packet, the lookup cost the direct path what it costs the
 * encap. While the neighbour is unresolved, or the lookup refuses (IPv6
 * forwarding off on the NIC), bpf_redirect_neigh with the PublicIPv6 as next
 * hop leaves neighbour discovery to the kernel, and nothing is cached. What
 * invalidates an IPv4 entry invalidates an IPv6 one: it expires after
 * XNET_NEXTHOP_TTL_JIFFIES, and the Go side deletes it when the peer's path
 * changes or its lease goes (backend/ebpf). The hop limit is decremented as a
 * router does (no checksum in an IPv6 header).
 */
#ifndef XNET_DIRECT6_H
#define XNET_DIRECT6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"
#include "encap.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif

/* hop6_from_fib asks the FIB for the way to peer (an IPv6 underlay address,
 * wire order: also its underlay_addr) out of the underlay NIC, as from our
 * PublicIPv6, and caches a resolved answer as hop_from_fib does. It returns -1
 * when the neighbour is not resolved, the peer is unreachable, or IPv6
 * forwarding is off on the NIC (which bpf_fib_lookup insists on): nothing is
 * cached then, and the caller leaves the packet to bpf_redirect_neigh or the
 * stack. */
static __always_inline int hop6_from_fib(struct __sk_buff *skb, const struct host_config *cfg,
					 const struct host_config6 *cfg6, const void *peer, __u64 now,
					 struct underlay_hop *hop)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_TCP;
	fib.ifindex = cfg->underlay_ifindex;
	ip6_copy(fib.ipv6_dst, peer);
	ip6_copy(fib.ipv6_src, cfg6->local_ip6);
	/* No tot_len, as in hop_from_fib: the sizes were checked before. */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	hop_from_answer(&fib, peer, now, hop);
	return 0;
}

/* find_hop6 fills hop with the resolved next hop towards peer (an IPv6
 * underlay address on the stack, 4-byte aligned): the nexthops cache, else the
 * FIB. It returns -1 when the neighbour is not resolved (hop6_from_fib). */
static __always_inline int find_hop6(struct __sk_buff *skb, const struct host_config *cfg,
				     const struct host_config6 *cfg6, const void *peer, struct underlay_hop *hop)
{
	__u64 now = bpf_jiffies64();

	if (hop_from_cache(peer, now, hop))
		return 0;
	return hop6_from_fib(skb, cfg, cfg6, peer, now, hop);
}

/*
 * direct6_out sends the IPv6 packet in skb (inner at ip) plain to the peer of
 * route rt (direct, remote_ip6 its PublicIPv6), out of the underlay NIC.
 * from_container as for direct_out: a container's packet is forwarded (hop
 * limit decremented; one that does not fit the underlay, or whose hop limit
 * runs out, goes to the stack, which answers it), the host's own packets from
 * xnet0 were routed and sized by the kernel already. seg is the packet's
 * largest segment on the wire (encap6_seg_len). rt is the caller's copy.
 */
static __always_inline int direct6_out(struct __sk_buff *skb, const struct host_config *cfg,
				       const struct host_config6 *cfg6, struct ipv6hdr *ip, const struct route6 *rt,
				       __u32 seg, int from_container)
{
	struct bpf_redir_neigh nh = {.nh_family = AF_INET6};
	struct underlay_hop hop = {};
	struct ethhdr *eth;

	if (seg > cfg->underlay_mtu) {
		if (!from_container) {
			count(VERDICT_DROP_TOO_BIG, skb->len);
			return TC_ACT_SHOT;
		}
		count(VERDICT_PASS_TOO_BIG, skb->len);
		return XNET_TC_PASS;
	}
	if (from_container) {
		if (ip->hop_limit <= 1) {
			count(VERDICT_PASS, skb->len);
			return XNET_TC_PASS;
		}
		ip->hop_limit--;
	}
	count(VERDICT_DIRECT_OUT, skb->len);
	count_peer6(rt, skb->len, 0);
	if (find_hop6(skb, cfg, cfg6, rt->remote_ip6, &hop) < 0) {
		ip6_copy(nh.ipv6_nh, rt->remote_ip6);
		return bpf_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
	}
	eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, hop.dmac);
	mac_copy(eth->h_source, hop.smac);
	return bpf_redirect(hop.ifindex, 0);
}

#endif /* XNET_DIRECT6_H */
