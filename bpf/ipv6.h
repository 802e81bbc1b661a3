/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IPv6 container traffic in a dual-stack overlay: the IPv6 halves of the
 * encap and decap, for the programs in xnet.c. Inner IPv6 packets cross the
 * same tunnel as IPv4 ones (except to a peer with an IPv6 VTEP while we have
 * one too: then VXLAN over the IPv6 underlay, underlay6.h): VXLAN over the
 * IPv4 underlay to the peer's PublicIP, with the inner Ethernet type 0x86DD, the same VNI, VTEP MACs, GSO
 * handling (bpf_skb_adjust_room with the UDP-tunnel flags) and per-peer
 * counters. So one program and one pair of VTEP MACs serve both families, as
 * the lease's BackendV6Data says (backend/ebpf).
 *
 * What differs from IPv4, step by step:
 *   - The maps: routes6, endpoints6 and config6 (maps.h). An IPv4-only host
 *     has config6 all zero, and its IPv6 passes untouched, as before.
 *   - Link traffic stays on the link: neighbour discovery, router
 *     solicitations, MLD and everything else to a link-local (fe80::/10) or
 *     multicast (ff00::/8) destination is never encapsulated (no route6 can
 *     hold one either); the bridge serves it.
 *   - Anti-spoofing at the source: a container's packet crosses the overlay
 *     only from an address in our IPv6 lease, and only from one that no other
 *     live veth holds (learn6, the IPv4 rule). The peer's decap checks the
 *     same again (vxlan_classify_inner6 in parse.h).
 *   - Too big: IPv6 routers never fragment, so every container packet that
 *     would not fit the underlay once encapsulated is answered with ICMPv6
 *     Packet Too Big (icmp6.h), never left to the kernel; except an ICMPv6
 *     error itself (RFC 4443 2.4 e), which is dropped and counted.
 *   - Extension headers: the encap walks them (ipv6_upper_layer) only where it
 *     must know the upper layer: a GSO packet's segment size, and whether a
 *     too-big packet is an ICMPv6 error. The decap delivers them unread.
 *   - Decap: the strip also turns the skb's protocol to IPv6
 *     (XNET_DECAP6_ROOM_FLAGS), since bpf_redirect_peer does not look at the
 *     Ethernet header again.
 */
#ifndef XNET_IPV6_H
#define XNET_IPV6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"
#include "encap.h"
#include "icmp6.h"
#include "underlay6.h"
#include "direct.h"
#include "direct6.h"

/* ip6_link_scope says whether a is link-local unicast (fe80::/10) or
 * multicast (ff00::/8): traffic of the link the container sits on, which the
 * bridge and the neighbours on it serve. */
static __always_inline int ip6_link_scope(const struct in6_addr *a)
{
	__u8 b0 = a->in6_u.u6_addr8[0], b1 = a->in6_u.u6_addr8[1];

	return b0 == 0xff || (b0 == 0xfe && (b1 & 0xc0) == 0x80);
}

static __always_inline int ip6_in_lease(const struct in6_addr *a, const struct host_config6 *cfg6)
{
	return ip6_in_prefix(a, cfg6->subnet_addr, cfg6->subnet_mask);
}

/*
 * ipv6_upper_layer walks the extension headers of the IPv6 packet whose fixed
 * header starts at off in skb (nexthdr is that header's next header) and
 * returns the upper-layer protocol, with *l4_off where its header starts. A
 * fragment other than the first has no upper-layer header: it returns
 * IPPROTO_FRAGMENT. It returns -1 when the chain is cut short or longer than
 * XNET_IPV6_MAX_EXT_HDRS. It reads with bpf_skb_load_bytes, so headers in the
 * paged part of a GSO packet count too.
 */
static __always_inline int ipv6_upper_layer(struct __sk_buff *skb, __u32 off, __u8 nexthdr, __u32 *l4_off)
{
	__u32 pos = off + sizeof(struct ipv6hdr);
	__u8 ext[4];

	for (int i = 0; i < XNET_IPV6_MAX_EXT_HDRS; i++) {
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			/* Next header, then the length in 8-byte units, not
			 * counting the first 8 (RFC 8200 4.3-4.6). */
			if (bpf_skb_load_bytes(skb, pos, ext, 2) < 0)
				return -1;
			nexthdr = ext[0];
			pos += ((__u32)ext[1] + 1) * 8;
			break;
		case IPPROTO_AH:
			/* In 4-byte units, not counting the first 8 (RFC 4302). */
			if (bpf_skb_load_bytes(skb, pos, ext, 2) < 0)
				return -1;
			nexthdr = ext[0];
			pos += ((__u32)ext[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, pos, ext, 4) < 0)
				return -1;
			/* The offset is the top 13 bits of the third and fourth bytes. */
			if ((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) {
				*l4_off = pos;
				return IPPROTO_FRAGMENT;
			}
			nexthdr = ext[0];
			pos += 8;
			break;
		default:
			/* The last extension header must end inside the packet
			 * too, not only the ones read. */
			if (pos > skb->len)
				return -1;
			*l4_off = pos;
			return nexthdr;
		}
	}
	return -1;
}

/* encap6_seg_len is encap_seg_len for IPv6: the longest IPv6 packet the inner
 * packet becomes on the overlay. For a GSO packet, one segment: the headers up
 * to the upper layer's, and gso_size bytes of payload. 0 when a GSO packet's
 * headers cannot be walked. */
static __always_inline __u32 encap6_seg_len(struct __sk_buff *skb, __u8 nexthdr)
{
	__u32 l4_off = 0, l4 = 0;
	__u8 doff = 0;
	int proto;

	if (!skb->gso_size)
		return skb->len - sizeof(struct ethhdr);
	proto = ipv6_upper_layer(skb, sizeof(struct ethhdr), nexthdr, &l4_off);
	if (proto < 0)
		return 0;
	if (proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4_off + 12, &doff, 1) < 0)
			return 0;
		l4 = (doff >> 4) * 4;
	} else if (proto == IPPROTO_UDP) {
		l4 = sizeof(struct udphdr);
	}
	return l4_off - sizeof(struct ethhdr) + l4 + skb->gso_size;
}

/*
 * encap6_too_big deals with an IPv6 packet that will not fit the underlay once
 * encapsulated: from a container (answer set) it is answered with Packet Too
 * Big carrying mtu, the overlay MTU on the path the packet would take, unless
 * it is an ICMPv6 error or the ICMP budget is spent (icmp_allowed); in xnet0
 * the stack already held it to xnet0's MTU, and a misfit is dropped and
 * counted.
 */
static __always_inline int encap6_too_big(struct __sk_buff *skb, const struct host_config6 *cfg6, __u8 nexthdr,
					  __u32 mtu, int answer)
{
	__u32 len = skb->len, l4_off = 0;
	__u8 type = 0;
	int proto;

	if (!answer) {
		count(VERDICT_DROP_TOO_BIG, len);
		return TC_ACT_SHOT;
	}
	proto = ipv6_upper_layer(skb, sizeof(struct ethhdr), nexthdr, &l4_off);
	if (proto < 0) {
		count(VERDICT_DROP_EXT_HEADERS, len);
		return TC_ACT_SHOT;
	}
	if (proto == IPPROTO_ICMPV6 &&
	    (bpf_skb_load_bytes(skb, l4_off, &type, 1) < 0 || type < XNET_ICMPV6_INFO_MIN)) {
		count(VERDICT_DROP_TOO_BIG, len);
		return TC_ACT_SHOT;
	}
	if (!icmp_allowed()) {
		count(VERDICT_DROP_ICMP_RATELIMIT, len);
		return TC_ACT_SHOT;
	}
	if (icmp6_packet_too_big(skb, cfg6->gateway, mtu) < 0) {
		count(VERDICT_DROP_HELPER, len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_ICMP_PACKET_TOO_BIG, len);
	/* Out of the veth it came in on: into the container. */
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * encap6 wraps the IPv6 packet in skb into VXLAN for the peer of route6 found
 * and redirects it out of the underlay NIC: encap's steps (encap.h), with the
 * IPv6 sizes and answers. from_container as for encap.
 */
static __always_inline int encap6(struct __sk_buff *skb, const struct host_config *cfg,
				  const struct host_config6 *cfg6, struct ipv6hdr *inner, const struct route6 *found,
				  int from_container)
{
	struct underlay_hop hop = {};
	struct route rt = {};
	struct route6 rt6 = *found;
	__u8 tclass = ipv6_tclass(inner), nexthdr = inner->nexthdr;
	__u32 seg, hash, overhead = XNET_VXLAN_OVERHEAD;
	/* Over the IPv6 underlay only while xnet6 is there to carry it. */
	int underlay6 = rt6.underlay6 && cfg6->tunnel_ifindex;

	/* The IPv4 route the tunnel code takes: the same peer. Copied, as
	 * encap copies: the entry may change under us. */
	*(__u32 *)rt.remote_ip = ip4_word(rt6.remote_ip);
	mac_copy(rt.vtep_mac, rt6.vtep_mac);

	seg = encap6_seg_len(skb, nexthdr);
	if (!seg) {
		count(VERDICT_DROP_EXT_HEADERS, skb->len);
		return TC_ACT_SHOT;
	}
	/* A peer on our IPv6 segment, with DirectRouting: plain (direct6.h). */
	if (rt6.direct)
		return direct6_out(skb, cfg, cfg6, inner, &rt6, seg, from_container);
	if (underlay6)
		overhead = XNET_VXLAN6_OVERHEAD;
	if (seg + overhead > cfg->underlay_mtu)
		return encap6_too_big(skb, cfg6, nexthdr, cfg->underlay_mtu - overhead, from_container);
	if (underlay6)
		return tunnel6_send(skb, cfg, cfg6, &rt6);
	if (find_hop(skb, cfg, rt.remote_ip, &hop) < 0) {
		count(VERDICT_DROP_NO_NEXTHOP, skb->len);
		return TC_ACT_SHOT;
	}

	hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, XNET_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, XNET_ENCAP_ROOM_FLAGS) ||
	    encap_write_headers(skb, cfg, &rt, &hop, tclass, flow_src_port(hash), bpf_htons(ETH_P_IPV6)) < 0) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_ENCAP, skb->len);
	count_peer4(ip4_word(rt.remote_ip), skb->len, 0);
	return encap_send(skb, &hop);
}

/*
 * learn6 is learn (encap.h) for a container's IPv6 addresses in our lease:
 * the same rules, so an address bound to a live veth does not move. It
 * returns -1 for a packet whose source is not the sender's to use, 0
 * otherwise (also for a source outside our lease, which it does not learn).
 *
 * The check covers every packet, neighbour discovery included: a container
 * that answers solicitations for its neighbour's address (NDP spoofing) is
 * refused as one that sends from it. Learning, though, takes only packets the
 * container routes through its gateway (to neither the link nor our lease):
 * their Ethernet destination is the gateway's MAC, which deliver6 puts back
 * as the source, where a solicitation's is a multicast group and a local
 * neighbour's another container.
 */
static __always_inline int learn6(struct __sk_buff *skb, const struct host_config6 *cfg6, struct ethhdr *eth,
				  struct ipv6hdr *ip)
{
	struct endpoint *known, ep = {};
	ipv6_addr saddr;
	int routed;

	if (!ip6_in_lease(&ip->saddr, cfg6))
		return 0;
	if (!unicast_mac(eth->h_source))
		return -1;
	routed = !ip6_link_scope(&ip->daddr) && !ip6_in_lease(&ip->daddr, cfg6);
	ip6_copy(saddr, &ip->saddr);
	known = bpf_map_lookup_elem(&endpoints6, saddr);
	if (known) {
		if (known->ifindex == skb->ifindex) {
			if (!routed || (mac_equal(known->mac, eth->h_source) && mac_equal(known->gw_mac, eth->h_dest)))
				return 0;
		} else if (ifindex_alive(skb, known->ifindex)) {
			return -1;
		}
	}
	if (!routed)
		return 0;
	ep.ifindex = skb->ifindex;
	mac_copy(ep.mac, eth->h_source);
	mac_copy(ep.gw_mac, eth->h_dest);
	bpf_map_update_elem(&endpoints6, saddr, &ep, BPF_ANY);
	return 0;
}

/* deliver6 is deliver (encap.h) for a frame carrying an IPv6 packet to daddr
 * (16 bytes on the stack): into a learned container, else into xnet0 (the host
 * forwards it: IPv6 forwarding must be on, as Docker with --ipv6 turns it on),
 * else to the stack. */
static __always_inline int deliver6(struct __sk_buff *skb, const struct host_config *cfg, const void *daddr)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint *ep;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	/* Kernel host routing: through xnet0 and the host's forwarding. */
	ep = cfg->host_routing_kernel ? 0 : bpf_map_lookup_elem(&endpoints6, daddr);
	if (ep) {
		mac_copy(eth->h_dest, ep->mac);
		mac_copy(eth->h_source, ep->gw_mac);
		return bpf_redirect_peer(ep->ifindex, 0);
	}
	if (cfg->host_ifindex) {
		mac_copy(eth->h_dest, cfg->vtep_mac);
		return bpf_redirect(cfg->host_ifindex, BPF_F_INGRESS);
	}
	mac_copy(eth->h_dest, cfg->underlay_mac);
	return TC_ACT_OK;
}

/* decap6 finishes the decap of a frame vxlan_classify accepted with an inner
 * IPv6 packet (m->inner_ipv6), after decap_ecn: strip, count, deliver. */
static __always_inline int decap6(struct __sk_buff *skb, const struct host_config *cfg, const struct vxlan_match *m)
{
	ipv6_addr daddr;

	ip6_copy(daddr, m->inner_daddr6);
	if (bpf_skb_adjust_room(skb, -(__s32)m->strip_len, BPF_ADJ_ROOM_MAC, XNET_DECAP6_ROOM_FLAGS)) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_DECAP, skb->len);
	count_peer4(m->peer_ip, skb->len, 1);
	return deliver6(skb, cfg, daddr);
}

/*
 * direct6_in judges a frame on the underlay NIC that is not VXLAN for us and
 * says it is IPv6: with DirectRouting, a plain IPv6 packet for our IPv6 lease
 * from a direct peer's IPv6 subnet is delivered when its Ethernet source is
 * that peer's MAC as the neighbour table knows its PublicIPv6 (through the
 * nexthops cache, as direct_in), dropped when it is another's (or the peer is
 * not direct: it sends VXLAN), left to the stack when that cannot be checked;
 * direct_in's rules (direct.h).
 * Everything else passes untouched.
 */
static __always_inline int direct6_in(struct __sk_buff *skb, const struct host_config *cfg)
{
	const struct host_config6 *cfg6 = get_config6();
	struct underlay_hop hop = {};
	struct hdr_cursor nh;
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	struct route6 *src;
	ipv6_addr daddr, peer;
	underlay_addr peer_key;
	void *data_end;

	direct_pull(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	nh.pos = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (!cfg->direct_routing || !cfg6 || parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IPV6) ||
	    parse_ipv6hdr(&nh, data_end, &ip) < 0 || !ip6_in_lease(&ip->daddr, cfg6)) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	src = route6_of(&ip->saddr);
	if (!src) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	if (!src->direct) {
		count(VERDICT_DROP_DIRECT_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}
	ip6_copy(peer, src->remote_ip6);
	route6_peer(src, peer_key);
	if (find_hop6(skb, cfg, cfg6, peer, &hop) < 0) {
		count(VERDICT_PASS_UNVERIFIED, skb->len);
		return XNET_TC_PASS;
	}
	if (!mac_equal(eth->h_source, hop.dmac)) {
		count(VERDICT_DROP_DIRECT_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip->hop_limit <= 1) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	ip->hop_limit--;
	ip6_copy(daddr, &ip->daddr);
	count(VERDICT_DIRECT_IN, skb->len);
	count_peer(peer_key, skb->len, 1);
	return deliver6(skb, cfg, daddr);
}

/* plain_in judges what decap_tc found not to be VXLAN for us: IPv6 by
 * direct6_in, IPv4 by direct_in, except in an IPv6-only overlay, whose IPv4
 * is not the datapath's. */
static __always_inline int plain_in(struct __sk_buff *skb, const struct host_config *cfg)
{
	__be16 proto = 0;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) == 0 &&
	    proto == bpf_htons(ETH_P_IPV6))
		return direct6_in(skb, cfg);
	if (cfg->ipv6_only) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	return direct_in(skb, cfg);
}

/* deliver6_decapped delivers a frame decap_xdp already validated and stripped
 * (Ethernet + inner IPv6 at skb->data). */
static __always_inline int deliver6_decapped(struct __sk_buff *skb, const struct host_config *cfg)
{
	struct hdr_cursor nh = {.pos = (void *)(long)skb->data};
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	ipv6_addr daddr;

	if (parse_ethhdr(&nh, data_end, &eth) < 0 || parse_ipv6hdr(&nh, data_end, &ip) < 0)
		return TC_ACT_SHOT;
	ip6_copy(daddr, &ip->daddr);
	return deliver6(skb, cfg, daddr);
}

/*
 * encap6_container is encap_container for an IPv6 frame from a container:
 * link traffic and traffic for the world or this host pass to the bridge as
 * they came; a packet for a peer's IPv6 subnet from one of our addresses is
 * encapsulated; one from any other source, or from an address another live
 * veth holds, is dropped.
 */
static __always_inline int encap6_container(struct __sk_buff *skb, const struct host_config *cfg)
{
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = (void *)(long)skb->data};
	const struct host_config6 *cfg6 = get_config6();
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	struct route6 *rt;
	int learned;

	if (!cfg6 || parse_ethhdr(&nh, data_end, &eth) < 0 || parse_ipv6hdr(&nh, data_end, &ip) < 0) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	learned = learn6(skb, cfg6, eth, ip);
	/* With kernel host routing the stack and its netfilter rules decide
	 * about every packet, as for IPv4: only learn. */
	if (cfg->host_routing_kernel)
		return XNET_TC_PASS;
	if (learned < 0) {
		count(VERDICT_DROP_BAD_SOURCE, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip6_link_scope(&ip->daddr)) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	rt = route6_of(&ip->daddr);
	if (!rt) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	/* Only our lease's addresses cross the overlay: a link-local or
	 * foreign source would be dropped by the peer anyway, after costing
	 * the trip. */
	if (!ip6_in_lease(&ip->saddr, cfg6)) {
		count(VERDICT_DROP_BAD_SOURCE, skb->len);
		return TC_ACT_SHOT;
	}
	return encap6(skb, cfg, cfg6, ip, rt, 1);
}

/* encap6_host is encap_host for an IPv6 frame the host routed into xnet0:
 * overlay traffic, or dropped (xnet0 reaches nothing else). */
static __always_inline int encap6_host(struct __sk_buff *skb, const struct host_config *cfg)
{
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = (void *)(long)skb->data};
	const struct host_config6 *cfg6 = get_config6();
	struct ethhdr *eth;
	struct ipv6hdr *ip;
	struct route6 *rt;

	/* Router solicitations, MLD reports and the like of xnet0 itself,
	 * and all IPv6 on an IPv4-only host, have nowhere to go. */
	if (!cfg6 || parse_ethhdr(&nh, data_end, &eth) < 0 || parse_ipv6hdr(&nh, data_end, &ip) < 0 ||
	    ip6_link_scope(&ip->daddr)) {
		count(VERDICT_PASS, skb->len);
		return TC_ACT_SHOT;
	}
	rt = route6_of(&ip->daddr);
	if (!rt) {
		count(VERDICT_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	return encap6(skb, cfg, cfg6, ip, rt, 0);
}

#endif /* XNET_IPV6_H */
