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
 * What differs from IPv4: the nexthops cache is keyed by IPv4 addresses, so
 * the IPv6 next hop is asked of the FIB per packet (bpf_fib_lookup, which
 * reads the neighbour table too); while it is unresolved, or the lookup
 * refuses (IPv6 forwarding off on the NIC), bpf_redirect_neigh with the
 * PublicIPv6 as next hop leaves neighbour discovery to the kernel. The hop
 * limit is decremented as a router does (no checksum in an IPv6 header).
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

#ifndef AF_INET6
#define AF_INET6 10
#endif

/* fib6_neighbour asks the FIB for the way to peer (an IPv6 underlay address,
 * wire order) out of the underlay NIC, as from our PublicIPv6. It returns 0
 * with the next hop's MAC, our NIC's MAC and the NIC in fib when the
 * neighbour is resolved, -1 otherwise (unresolved, unreachable, or IPv6
 * forwarding off on the NIC, which bpf_fib_lookup insists on). */
static __always_inline int fib6_neighbour(struct __sk_buff *skb, const struct host_config *cfg,
					  const struct host_config6 *cfg6, const void *peer, struct bpf_fib_lookup *fib)
{
	const __u32 *dst = ip6_words(peer), *src = ip6_words(cfg6->local_ip6);

	fib->family = AF_INET6;
	fib->l4_protocol = IPPROTO_TCP;
	fib->ifindex = cfg->underlay_ifindex;
	fib->ipv6_dst[0] = dst[0];
	fib->ipv6_dst[1] = dst[1];
	fib->ipv6_dst[2] = dst[2];
	fib->ipv6_dst[3] = dst[3];
	fib->ipv6_src[0] = src[0];
	fib->ipv6_src[1] = src[1];
	fib->ipv6_src[2] = src[2];
	fib->ipv6_src[3] = src[3];
	/* No tot_len, as in hop_from_fib: the sizes were checked before. */
	if (bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	return 0;
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
	struct bpf_fib_lookup fib = {};
	const __u32 *peer = ip6_words(rt->remote_ip6);
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
	count_peer(ip4_word(rt->remote_ip), skb->len, 0);
	if (fib6_neighbour(skb, cfg, cfg6, rt->remote_ip6, &fib) < 0) {
		nh.ipv6_nh[0] = peer[0];
		nh.ipv6_nh[1] = peer[1];
		nh.ipv6_nh[2] = peer[2];
		nh.ipv6_nh[3] = peer[3];
		return bpf_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
	}
	eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, fib.dmac);
	mac_copy(eth->h_source, fib.smac);
	return bpf_redirect(fib.ifindex, 0);
}

/* direct6_pull makes the Ethernet and IPv6 headers of a paged frame linear
 * (direct_pull's reason). */
static __always_inline void direct6_pull(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u32 hdrs = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);

	if (data + hdrs <= data_end || skb->len < hdrs)
		return;
	bpf_skb_pull_data(skb, hdrs);
}

#endif /* XNET_DIRECT6_H */
