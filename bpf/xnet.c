//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The xnet datapath: VXLAN (RFC 7348) in TC and XDP, wire-compatible with the
 * kernel's vxlan device as flannel sets it up.
 *
 *   encap_container  TC ingress of each container's host-side veth
 *   encap_host       TC egress of xnet0, the routed device for host traffic
 *   decap_tc         TC ingress of the underlay NIC
 *   decap_xdp        XDP of the underlay NIC (when --decap picks XDP)
 *   deliver_bridge   TC egress of each container bridge
 *   decap_tunnel     TC ingress of xnet6, the metadata-mode vxlan device that
 *                    carries VXLAN over the IPv6 underlay (underlay6.h)
 *
 * Encapsulating where the container's packet enters the host skips the
 * bridge, routing and netfilter; decapsulating at the NIC's ingress and
 * handing the packet to the container's veth peer (bpf_redirect_peer) skips
 * them on the way in, and with them rp_filter, which would drop decapsulated
 * packets arriving on the NIC. With DirectRouting the same two hooks carry
 * plain routed packets to and from the peers on our L2 segment.
 *
 * The steps live in headers by role (katran style): consts.h, structs.h,
 * maps.h, parse.h (vxlan_classify, the acceptance rules), encap.h (both
 * directions of the tunnel), direct.h (plain routing on our segment, and the
 * choice between it and the tunnel), icmp.h (the "fragmentation needed"
 * answer), csum.h, and for a dual-stack overlay ipv6.h (the IPv6 halves of
 * encap and decap), icmp6.h (Packet Too Big), underlay6.h (VXLAN over the
 * IPv6 underlay, through xnet6) and direct6.h (DirectRouting for IPv6). This file holds only the
 * programs.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"
#include "encap.h"
#include "direct.h"
#include "ipv6.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Keeps enum verdict in the BTF (it only appears as constants otherwise), so
 * bpf2go can generate the Go constants from it. */
const enum verdict *unused_verdict __attribute__((unused));
/* The same for enum icmp_ratelimit, whose constants the tests check against. */
const enum icmp_ratelimit *unused_icmp_ratelimit __attribute__((unused));

SEC("tc")
int encap_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = data};
	const struct host_config *cfg;
	struct ethhdr *eth;
	struct iphdr *ip;
	int proto, learned;

	cfg = get_config();
	if (!cfg)
		return XNET_TC_PASS;
	proto = parse_ethhdr(&nh, data_end, &eth);
	if (proto == bpf_htons(ETH_P_IPV6))
		return encap6_container(skb, cfg);
	/* In an IPv6-only overlay a container's IPv4 (Docker's default
	 * bridge network) is the host's business: not learned, not sent. */
	if (proto != bpf_htons(ETH_P_IP) || cfg->ipv6_only || parse_iphdr(&nh, data_end, &ip) < 0) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	learned = learn(skb, cfg, eth, ip);
	/* With kernel host routing the stack and its netfilter rules decide
	 * about every packet: the program only learns where containers are,
	 * for deliver_bridge. */
	if (cfg->host_routing_kernel)
		return XNET_TC_PASS;
	/* A packet from an address another container holds is spoofed: it
	 * goes nowhere, overlay or not. */
	if (learned < 0) {
		count(VERDICT_DROP_BAD_SOURCE, skb->len);
		return TC_ACT_SHOT;
	}
	return send_to_peer(skb, cfg, ip, 1);
}

SEC("tc")
int encap_host(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = data};
	const struct host_config *cfg;
	struct ethhdr *eth;
	struct iphdr *ip;
	int proto;

	/* Everything routed into xnet0 is overlay traffic: what we cannot
	 * send is dropped here rather than looping through the stack. */
	cfg = get_config();
	if (!cfg) {
		count(VERDICT_DROP_NO_CONFIG, skb->len);
		return TC_ACT_SHOT;
	}
	proto = parse_ethhdr(&nh, data_end, &eth);
	if (proto == bpf_htons(ETH_P_IPV6))
		return encap6_host(skb, cfg);
	if (proto != bpf_htons(ETH_P_IP) || cfg->ipv6_only || parse_iphdr(&nh, data_end, &ip) < 0) {
		/* xnet0 has ARP off: nothing else has anywhere to go. */
		count(VERDICT_PASS, skb->len);
		return TC_ACT_SHOT;
	}
	return send_to_peer(skb, cfg, ip, 0);
}

SEC("tc")
int decap_tc(struct __sk_buff *skb)
{
	const struct host_config *cfg;
	struct vxlan_match m = {};
	void *data, *data_end;
	int verdict;

	cfg = get_config();
	if (!cfg)
		return XNET_TC_PASS;
	/* IPv6-only: no VXLAN for us arrives on the NIC itself (VXLAN over
	 * IPv6 is xnet6's, decap_tunnel), only plain IPv6 from peers on our
	 * segment (DirectRouting), and IPv4 is not the overlay's. */
	if (cfg->ipv6_only)
		return plain_in(skb, cfg);

	if (xdp_decapped(skb)) {
		struct hdr_cursor nh = {.pos = (void *)(long)skb->data};
		struct ethhdr *eth;
		struct iphdr *ip;

		int proto;

		data_end = (void *)(long)skb->data_end;
		proto = parse_ethhdr(&nh, data_end, &eth);
		if (proto == bpf_htons(ETH_P_IPV6))
			return deliver6_decapped(skb, cfg);
		if (proto != bpf_htons(ETH_P_IP) || parse_iphdr(&nh, data_end, &ip) < 0)
			return TC_ACT_SHOT;
		return deliver(skb, cfg, ip->daddr);
	}

	decap_pull(skb, cfg);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	verdict = vxlan_classify(data, data_end, skb->len, cfg, &m);
	if (verdict == VERDICT_PASS)
		return plain_in(skb, cfg); /* plain routed from a peer on our segment, or not ours */
	if (verdict != VERDICT_DECAP) {
		count(verdict, skb->len);
		return TC_ACT_SHOT;
	}
	decap_ecn(data, data_end, &m);
	if (m.inner_ipv6)
		return decap6(skb, cfg, &m);

	if (decap_strip(skb, &m) < 0) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_DECAP, skb->len);
	count_peer4(m.peer_ip, skb->len, 1);
	return deliver(skb, cfg, m.inner_daddr);
}

/* Overlay packets the host forwarded into a container bridge go to the
 * learned container's veth rather than through the bridge (bridge_to_veth in
 * encap.h says why); the rest, and everything while unconfigured, pass. */
SEC("tc")
int deliver_bridge(struct __sk_buff *skb)
{
	const struct host_config *cfg = get_config();

	if (!cfg)
		return XNET_TC_PASS;
	return bridge_to_veth(skb, cfg);
}

/* What xnet6 received: judged by tunnel_classify (underlay6.h), then delivered
 * as decap_tc delivers. The kernel's vxlan has stripped the outer headers and
 * applied the outer ECN field already. */
SEC("tc")
int decap_tunnel(struct __sk_buff *skb)
{
	const struct host_config *cfg;
	struct tunnel_match m = {};
	ipv6_addr daddr;
	int verdict;

	cfg = get_config();
	if (!cfg) {
		count(VERDICT_DROP_NO_CONFIG, skb->len);
		return TC_ACT_SHOT;
	}
	verdict = tunnel_classify(skb, cfg, &m);
	if (verdict != VERDICT_DECAP) {
		count(verdict, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_DECAP, skb->len);
	count_peer(m.peer, skb->len, 1);
	if (m.inner_ipv6) {
		ip6_copy(daddr, m.inner_daddr6);
		return deliver6(skb, cfg, daddr);
	}
	return deliver(skb, cfg, m.inner_daddr);
}

SEC("xdp")
int decap_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	const struct host_config *cfg;
	struct vxlan_match m = {};
	__u32 len = data_end - data;
	int verdict;

	cfg = get_config();
	if (!cfg)
		return XDP_PASS;
	if (cfg->ipv6_only) {
		count(VERDICT_PASS, len);
		return XDP_PASS;
	}
	verdict = vxlan_classify(data, data_end, len, cfg, &m);
	if (verdict == VERDICT_PASS) {
		count(VERDICT_PASS, len);
		return XDP_PASS;
	}
	if (verdict != VERDICT_DECAP) {
		count(verdict, len);
		return XDP_DROP;
	}

	/* Mark first: a driver without metadata support gets the packet
	 * unchanged and decap_tc does the whole job. */
	if (xdp_mark_decapped(ctx) < 0)
		return XDP_PASS;
	/* The helper invalidated the packet pointers. */
	decap_ecn((void *)(long)ctx->data, (void *)(long)ctx->data_end, &m);

	/* Strip up to the inner Ethernet header: the stack sees the inner
	 * frame, so GRO on a physical NIC coalesces the inner TCP flow. */
	if (bpf_xdp_adjust_head(ctx, m.strip_len)) {
		count(VERDICT_DROP_HELPER, len);
		return XDP_DROP;
	}
	count(VERDICT_DECAP, len - m.strip_len);
	count_peer4(m.peer_ip, len - m.strip_len, 1);
	return XDP_PASS;
}
