/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * VXLAN over the IPv6 underlay, as flannel's dual stack runs it: a peer with
 * an IPv6 VTEP of its own (a PublicIPv6, and a BackendV6Data VtepMAC other
 * than its IPv4 one) gets its IPv6 subnet's traffic in VXLAN over IPv6 to that
 * PublicIPv6, and sends ours to our PublicIPv6 the same way. The encap does
 * not write the outer headers itself here: bpf_skb_adjust_room cannot mark a
 * packet SKB_GSO_UDP_TUNNEL_CSUM, so a GSO packet it grew would go out with
 * zero UDP checksums, and over IPv6 a kernel vxlan device without
 * udp6zerocsumrx (flannel's) drops those. Instead, as Cilium does, the
 * packet goes to a metadata-mode ("external") vxlan device, xnet6, with the
 * outer addresses and the VNI in its tunnel key (bpf_skb_set_tunnel_key): the
 * kernel's vxlan builds the headers, fills the UDP checksum, keeps GSO and
 * segments at the last moment. The inner Ethernet header is the frame's own,
 * so the encap rewrites it first: the peer's IPv6 VtepMAC as destination
 * (flannel's device drops frames for another MAC when it hands them to its
 * stack), our IPv6 VtepMAC (xnet6's, the one we publish) as source.
 *
 * Receive: the same device's UDP socket (port 8472 or the configured one, on
 * every address) takes the datagrams, GRO merges their inner flows, the
 * kernel strips the outer headers and applies RFC 6040 to the ECN field, and
 * decap_tunnel at xnet6's TC ingress judges the inner frame with the tunnel
 * key the kernel recorded (tunnel_classify): our VNI, our VTEP MAC, and the
 * rules of vxlan_classify (parse.h) with the outer source read from the key.
 * The socket also owns the port on IPv4 (a metadata-mode device opens both),
 * and so receives what decap_tc on the underlay passes to the stack: chiefly
 * datagrams fragmented on the IPv4 underlay once reassembled, which the same
 * rules judge with the peer's PublicIP.
 */
#ifndef XNET_UNDERLAY6_H
#define XNET_UNDERLAY6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"

/* The outer hop limit, as encap_write_headers sets the IPv4 TTL. */
#define XNET_TUNNEL_HOP_LIMIT 64

/* tunnel6_send hands the IPv6 frame in skb (Ethernet at skb->data) to xnet6
 * for the peer of route rt (underlay6 set): the caller has checked its size
 * against the IPv6 underlay. rt is the caller's copy. */
static __always_inline int tunnel6_send(struct __sk_buff *skb, const struct host_config *cfg,
					const struct host_config6 *cfg6, const struct route6 *rt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_tunnel_key key = {};
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		count(VERDICT_DROP_MALFORMED, skb->len);
		return TC_ACT_SHOT;
	}
	mac_copy(eth->h_dest, rt->vtep_mac);
	mac_copy(eth->h_source, cfg6->vtep_mac6);

	key.tunnel_id = cfg->vni;
	/* Both addresses in wire order, as the helper copies them. The source
	 * is our PublicIPv6, which the peer's anti-spoofing rule expects. */
	ip6_copy(key.remote_ipv6, rt->remote_ip6);
	ip6_copy(key.local_ipv6, cfg6->local_ip6);
	/* Traffic class 0: the kernel then copies the inner ECN field as RFC
	 * 6040 encapsulates it (CE as ECT(0)), as encap_write_headers does. */
	key.tunnel_tos = 0;
	key.tunnel_ttl = XNET_TUNNEL_HOP_LIMIT;
	/* No BPF_F_ZERO_CSUM_TX: the kernel fills the outer UDP checksum, which
	 * a receiver on IPv6 insists on. */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) < 0) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_ENCAP, skb->len);
	count_peer6(rt, skb->len, 0);
	return bpf_redirect(cfg6->tunnel_ifindex, 0);
}

/* tunnel_match: what tunnel_classify found in an accepted frame. */
struct tunnel_match {
	underlay_addr peer; /* what keys the peer's counters: its PublicIP, or its PublicIPv6 without one (route6_peer) */
	__u32 inner_daddr;  /* network order; for inner IPv4 */
	__u8 inner_ipv6;   /* the inner packet is IPv6: inner_daddr6 holds its destination */
	ipv6_addr inner_daddr6;
};

/* tunnel_classify6 is tunnel_classify for an inner IPv6 packet (nh after the
 * inner Ethernet header): vxlan_classify_inner6's rules, with the outer source
 * from the tunnel key, an IPv6 one (outer6) or an IPv4 one in host order. */
static __always_inline int tunnel_classify6(void *data, void *data_end, __u32 frame_len, const struct bpf_tunnel_key *key,
					    int outer6, struct hdr_cursor *nh, struct tunnel_match *m)
{
	const struct host_config6 *cfg6 = get_config6();
	struct ipv6hdr *inner;
	struct route6 *src_route;
	__u32 inner_len, inner_present;

	if (!cfg6)
		return VERDICT_DROP_INNER_NOT_IPV4;
	if (parse_ipv6hdr(nh, data_end, &inner) < 0)
		return VERDICT_DROP_MALFORMED;
	inner_len = sizeof(*inner) + bpf_ntohs(inner->payload_len);
	inner_present = frame_len - (__u32)((void *)inner - data);
	if (inner_len > inner_present)
		return VERDICT_DROP_MALFORMED;
	if (!inner->payload_len && inner->nexthdr == IPPROTO_HOPOPTS)
		return VERDICT_DROP_MALFORMED;
	if (!ip6_in_prefix(&inner->daddr, cfg6->subnet_addr, cfg6->subnet_mask))
		return VERDICT_DROP_NOT_LOCAL;
	/* Anti-spoofing: the inner source belongs to a peer's IPv6 lease, and
	 * the datagram came from that peer's address on the underlay it
	 * arrived on: its PublicIPv6 (if we reach it over IPv6) or its
	 * PublicIP. */
	src_route = route6_of(&inner->saddr);
	if (!src_route)
		return VERDICT_DROP_UNKNOWN_SOURCE;
	if (outer6) {
		if (!src_route->underlay6 || !ip6_equal(src_route->remote_ip6, key->remote_ipv6))
			return VERDICT_DROP_SPOOFED;
	} else if (ip4_word(src_route->remote_ip) != bpf_htonl(key->remote_ipv4)) {
		return VERDICT_DROP_SPOOFED;
	}
	route6_peer(src_route, m->peer);
	m->inner_ipv6 = 1;
	ip6_copy(m->inner_daddr6, &inner->daddr);
	return VERDICT_DECAP;
}

/*
 * tunnel_classify judges a frame xnet6 received (the inner Ethernet frame at
 * skb->data, the outer headers gone into the tunnel key) by the acceptance
 * rules of vxlan_classify: our VNI, our VTEP MAC as the inner destination (the
 * IPv6 one over IPv6, the IPv4 one over IPv4), the inner packet all there and
 * for our lease, from a peer's lease whose underlay address is the outer
 * source. Inner IPv4 crosses only the IPv4 underlay (no peer of ours sends it
 * over IPv6: flannel's IPv6 device routes IPv6 only). It returns VERDICT_DECAP
 * with m filled, or the reason to drop.
 */
static __always_inline int tunnel_classify(struct __sk_buff *skb, const struct host_config *cfg, struct tunnel_match *m)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = data};
	const struct host_config6 *cfg6;
	struct bpf_tunnel_key key = {};
	struct ethhdr *eth;
	struct iphdr *inner;
	struct route *src_route;
	__u32 inner_len, inner_present;
	int outer6 = 1, proto;

	/* The helper refuses the IPv6 flag for a tunnel over IPv4. */
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) < 0) {
		outer6 = 0;
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
			return VERDICT_DROP_MALFORMED;
		/* In an IPv6-only overlay no lease has an IPv4 PublicIP: whatever
		 * came over the IPv4 underlay came from no peer. */
		if (cfg->ipv6_only)
			return VERDICT_DROP_SPOOFED;
	}
	if (key.tunnel_id != cfg->vni)
		return VERDICT_DROP_WRONG_VNI;
	proto = parse_ethhdr(&nh, data_end, &eth);
	if (proto < 0)
		return VERDICT_DROP_MALFORMED;
	if (outer6) {
		cfg6 = get_config6();
		if (!cfg6 || !mac_equal(eth->h_dest, cfg6->vtep_mac6))
			return VERDICT_DROP_BAD_VTEP_MAC;
	} else if (!mac_equal(eth->h_dest, cfg->vtep_mac)) {
		return VERDICT_DROP_BAD_VTEP_MAC;
	}
	if (proto == bpf_htons(ETH_P_IPV6))
		return tunnel_classify6(data, data_end, skb->len, &key, outer6, &nh, m);
	if (proto != bpf_htons(ETH_P_IP))
		return VERDICT_DROP_INNER_NOT_IPV4;
	if (outer6)
		return VERDICT_DROP_SPOOFED;
	if (parse_iphdr(&nh, data_end, &inner) < 0)
		return VERDICT_DROP_MALFORMED;
	inner_len = bpf_ntohs(inner->tot_len);
	inner_present = skb->len - (__u32)((void *)inner - data);
	if (inner_len < (__u32)inner->ihl * 4 || inner_len > inner_present)
		return VERDICT_DROP_MALFORMED;
	if ((inner->daddr & ip4_word(cfg->subnet_mask)) != ip4_word(cfg->subnet_addr))
		return VERDICT_DROP_NOT_LOCAL;
	src_route = route_of(inner->saddr);
	if (!src_route)
		return VERDICT_DROP_UNKNOWN_SOURCE;
	if (ip4_word(src_route->remote_ip) != bpf_htonl(key.remote_ipv4))
		return VERDICT_DROP_SPOOFED;
	underlay_addr4(m->peer, ip4_word(src_route->remote_ip));
	m->inner_daddr = inner->daddr;
	return VERDICT_DECAP;
}

#endif /* XNET_UNDERLAY6_H */
