/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * DirectRouting: peers on our L2 segment get plain routed packets, the rest
 * VXLAN, in one cluster (flannel's "DirectRouting", Calico's VXLAN
 * CrossSubnet). The Go side decides per peer (its PublicIP lies in a
 * connected subnet of the underlay NIC, as host-gw decides) and sets
 * route.direct; the programs follow the flag per packet, so a peer that moves
 * switches path with one map update.
 *
 * Out (send_to_peer -> direct_out), Cilium's BPF host routing: from the
 * container veth's TC ingress straight out of the underlay NIC towards the
 * peer's PublicIP, skipping the bridge, routing and netfilter as the VXLAN
 * path does. The peer's MAC is the kernel's neighbour entry: while the encap's
 * nexthops cache (or bpf_fib_lookup) has it resolved, the program writes the
 * Ethernet header and uses bpf_redirect; before that (a first packet) it
 * leaves the header to bpf_redirect_neigh, and the kernel resolves the peer by
 * ARP. bpf_redirect_neigh on every packet measured about half the TCP 4-stream
 * rate and a third more CPU per GB than the cached header (docs/design.md,
 * Measured kernel facts). TTL is decremented as a router would: the packet
 * crosses this host.
 *
 * In (direct_in, from decap_tc for what is not VXLAN for us): a plain IPv4
 * packet for our subnet from a peer's subnet. Nothing in it proves where it
 * came from, so the anti-spoofing rule of the VXLAN path (the outer source
 * must be the PublicIP of the lease owning the inner source) becomes an L2
 * rule: its Ethernet source must be the MAC of the peer whose lease owns its
 * IPv4 source, as our neighbour table knows that peer's PublicIP (through the
 * nexthops cache the encap keeps, else bpf_fib_lookup). Then it is delivered
 * as decap delivers (deliver: a learned container through bpf_redirect_peer,
 * else through xnet0). A packet from a peer's subnet that another neighbour
 * sent is dropped, and so is one from the subnet of a peer that is not on our
 * segment: that peer sends VXLAN, so a plain packet in its name is someone
 * else's (a peer and we disagree on the segment only when the netmasks on
 * one LAN differ). One that cannot be checked because the peer's neighbour
 * entry is unresolved (our kernel learns it from the peer's ARP request before
 * its first packet, so this is rare) goes to the stack, where the host's own
 * rules decide, as they would without xnet. Packets from no peer's subnet (a
 * LAN host reaching a container through a route) are not ours to judge and
 * pass untouched, and so is everything while DirectRouting is off.
 */
#ifndef XNET_DIRECT_H
#define XNET_DIRECT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "encap.h"

/* ttl_decrement lowers the TTL by one as a router does, fixing the header
 * checksum. It returns -1, changing nothing, when the packet must not be
 * forwarded (TTL 1 or 0): the stack answers it with "time exceeded". */
static __always_inline int ttl_decrement(struct iphdr *ip)
{
	__u16 *word = (__u16 *)&ip->ttl; /* TTL shares a 16-bit word with the protocol */
	__u16 old;

	if (ip->ttl <= 1)
		return -1;
	old = *word;
	ip->ttl--;
	csum_replace2(&ip->check, old, *word);
	return 0;
}

/*
 * direct_out sends the IPv4 packet in skb plain to the peer of route rt, a
 * peer on our L2 segment: out of the underlay NIC, to the peer's PublicIP as
 * next hop. from_container as for encap: a container's packet is forwarded
 * (TTL decremented; what the direct path cannot take goes to the stack, which
 * answers or fragments it), while xnet0 carries the host's own packets,
 * which the kernel has already routed and sized to xnet0's MTU.
 */
static __always_inline int direct_out(struct __sk_buff *skb, const struct host_config *cfg, struct iphdr *ip,
				      const struct route *rt, int from_container)
{
	struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = ip4_word(rt->remote_ip)};
	struct underlay_hop hop = {};
	struct ethhdr *eth;

	/* Containers get the overlay MTU, which always fits; a container
	 * configured larger is the stack's to answer (ICMP or fragments). */
	if (encap_seg_len(skb, ip) > cfg->underlay_mtu) {
		if (!from_container) {
			count(VERDICT_DROP_TOO_BIG, skb->len);
			return TC_ACT_SHOT;
		}
		count(VERDICT_PASS_TOO_BIG, skb->len);
		return XNET_TC_PASS;
	}
	if (from_container && ttl_decrement(ip) < 0) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	count(VERDICT_DIRECT_OUT, skb->len);
	count_peer4(nh.ipv4_nh, skb->len, 0);
	/* The peer is on our segment, so the next hop is the peer itself.
	 * Anything short of a resolved neighbour (even a FIB that disagrees)
	 * is the kernel's to sort out. */
	if (find_hop(skb, cfg, rt->remote_ip, &hop) < 0 || !hop.resolved)
		return bpf_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
	eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, hop.dmac);
	mac_copy(eth->h_source, hop.smac);
	return bpf_redirect(hop.ifindex, 0);
}

/*
 * send_to_peer sends the IPv4 packet in skb to the peer owning its
 * destination: plain when that peer is on our segment (route.direct), else in
 * VXLAN (encap). from_container says where it comes from: a container's veth,
 * where traffic without a peer is simply not ours (a container talking to the
 * world), or xnet0, where traffic can only be overlay traffic and what cannot
 * go is dropped.
 */
static __always_inline int send_to_peer(struct __sk_buff *skb, const struct host_config *cfg, struct iphdr *ip,
					int from_container)
{
	struct route *found = route_of(ip->daddr);

	if (!found) {
		if (from_container) {
			count(VERDICT_PASS, skb->len);
			return XNET_TC_PASS;
		}
		count(VERDICT_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	if (found->direct)
		return direct_out(skb, cfg, ip, found, from_container);
	return encap(skb, cfg, ip, found, from_container);
}

/* neighbour_mac fills mac with the L2 address our neighbour table has for
 * peer_ip (network order), through the nexthops cache; it returns -1 when
 * the neighbour is not resolved (or forwarding is off on the NIC, which
 * bpf_fib_lookup insists on). */
static __always_inline int neighbour_mac(struct __sk_buff *skb, const struct host_config *cfg, __u32 peer_ip,
					 __u8 *mac)
{
	struct underlay_hop hop = {};
	__u64 now = bpf_jiffies64();
	underlay_addr key;

	underlay_addr4(key, peer_ip);
	if (!hop_from_cache(key, now, &hop) && (hop_from_fib(skb, cfg, peer_ip, key, now, &hop) < 0 || !hop.resolved))
		return -1;
	mac_copy(mac, hop.dmac);
	return 0;
}

/* direct_pull makes the first hdrs bytes of a paged frame linear (the
 * Ethernet and IP headers), where direct packet access reads them. Frames from
 * a veth or a NIC almost always have them there already; for the rare one that
 * does not, copying 34 (IPv4) or 54 (IPv6) bytes costs less than leaving a
 * routed packet unchecked. */
static __always_inline void direct_pull(struct __sk_buff *skb, __u32 hdrs)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + hdrs <= data_end || skb->len < hdrs)
		return;
	bpf_skb_pull_data(skb, hdrs);
}

/*
 * direct_in judges a frame on the underlay NIC that is not VXLAN for us: with
 * DirectRouting, a plain IPv4 packet from a peer's subnet to ours is delivered
 * when its L2 source is that peer on our segment, dropped when it is not, and
 * left to the stack when that cannot be checked (see the top of this file).
 * Everything else passes untouched.
 */
static __always_inline int direct_in(struct __sk_buff *skb, const struct host_config *cfg)
{
	struct hdr_cursor nh;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct route *src;
	__u8 peer_mac[XNET_ETH_ALEN];
	__u32 peer_ip, daddr;
	void *data_end;

	direct_pull(skb, sizeof(struct ethhdr) + sizeof(struct iphdr));
	nh.pos = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (!cfg->direct_routing || parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP) ||
	    parse_iphdr(&nh, data_end, &ip) < 0 ||
	    (ip->daddr & ip4_word(cfg->subnet_mask)) != ip4_word(cfg->subnet_addr)) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	src = route_of(ip->saddr);
	if (!src) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	if (!src->direct) {
		count(VERDICT_DROP_DIRECT_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}
	peer_ip = ip4_word(src->remote_ip);
	if (neighbour_mac(skb, cfg, peer_ip, peer_mac) < 0) {
		count(VERDICT_PASS_UNVERIFIED, skb->len);
		return XNET_TC_PASS;
	}
	if (!mac_equal(eth->h_source, peer_mac)) {
		count(VERDICT_DROP_DIRECT_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}
	if (ttl_decrement(ip) < 0) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	daddr = ip->daddr;
	count(VERDICT_DIRECT_IN, skb->len);
	count_peer4(peer_ip, skb->len, 1);
	return deliver(skb, cfg, daddr);
}

#endif /* XNET_DIRECT_H */
