/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet parsing shared by every program: a header cursor advanced by one
 * parse_* function per protocol (the xdp-tutorial pattern), and the VXLAN
 * acceptance rules of docs/design.md in one function, vxlan_classify, that the
 * XDP and the TC decap both call, so the two hooks can never disagree on what
 * is ours.
 *
 * The functions work on [data, data_end) only, so they run unchanged on an
 * xdp_md and on an __sk_buff.
 */
#ifndef XNET_PARSE_H
#define XNET_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>

#include "xnet.h"
#include "maps.h"

/* hdr_cursor: how far parsing got. */
struct hdr_cursor {
	void *pos;
};

/* Each parse_* returns the next protocol (or 0) and moves the cursor past the
 * header, or returns -1 when the header is not entirely inside the packet:
 * the verifier insists on the bounds check before any field is read, and a
 * truncated packet must never be read past its end. */

static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end, struct ethhdr **eth)
{
	struct ethhdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	nh->pos = h + 1;
	*eth = h;
	return h->h_proto; /* network order */
}

static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end, struct iphdr **iph)
{
	struct iphdr *h = nh->pos;
	int hdrsize;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (h->version != 4)
		return -1;
	/* ihl counts 32-bit words and is at least 5; options may follow the
	 * fixed 20 bytes and must be inside the packet too. */
	hdrsize = h->ihl * 4;
	if (hdrsize < (int)sizeof(*h))
		return -1;
	if (nh->pos + hdrsize > data_end)
		return -1;
	nh->pos += hdrsize;
	*iph = h;
	return h->protocol;
}

/* parse_ipv6hdr parses the fixed IPv6 header (40 bytes) and returns its
 * next header; extension headers, if any, follow it and are the caller's. */
static __always_inline int parse_ipv6hdr(struct hdr_cursor *nh, void *data_end, struct ipv6hdr **ip6h)
{
	struct ipv6hdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (h->version != 6)
		return -1;
	nh->pos = h + 1;
	*ip6h = h;
	return h->nexthdr;
}

/* ipv6_ecn is the ECN field of an IPv6 header: the low two bits of the traffic
 * class, which straddles the version nibble and the flow label. */
static __always_inline __u8 ipv6_ecn(const struct ipv6hdr *h)
{
	return (h->flow_lbl[0] >> 4) & ECN_MASK;
}

/* ipv6_tclass is the whole traffic class (DSCP and ECN) of an IPv6 header. */
static __always_inline __u8 ipv6_tclass(const struct ipv6hdr *h)
{
	return (h->priority << 4) | (h->flow_lbl[0] >> 4);
}

static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end, struct udphdr **udph)
{
	struct udphdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	nh->pos = h + 1;
	*udph = h;
	return 0;
}

static __always_inline int parse_vxlanhdr(struct hdr_cursor *nh, void *data_end, struct vxlanhdr **vxh)
{
	struct vxlanhdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	nh->pos = h + 1;
	*vxh = h;
	return 0;
}

/* vxlan_match: what vxlan_classify found in an accepted packet. */
struct vxlan_match {
	__u32 strip_len;   /* outer Ethernet + outer IPv4 (with options) + UDP + VXLAN */
	__u32 peer_ip;     /* outer source, network order */
	__u32 inner_daddr; /* network order; for inner IPv4 */
	__u32 inner_off;   /* where the inner IP header starts (strip_len + inner Ethernet) */
	__u8 outer_ce;     /* the outer ECN field is CE: decap_ecn marks the inner packet */
	__u8 inner_ipv6;   /* the inner packet is IPv6 (vxlan_classify_inner6): inner_daddr6 holds its destination */
	ipv6_addr inner_daddr6;
};

/*
 * vxlan_classify_inner6 is vxlan_classify's second half for an inner IPv6
 * packet (dual-stack overlay), with the same rules as for IPv4: the packet
 * must be all there, no second datagram behind it, its destination in our
 * IPv6 lease, its source in a peer's IPv6 lease whose PublicIP is the outer
 * source, and an outer CE mark must have an ECN-capable packet to go to.
 *
 * Extension headers are delivered as they came, unread: nothing in these rules
 * depends on them (the addresses and the ECN field are in the fixed header),
 * and the receiving container's stack parses and checks them as it does for
 * any packet, as behind the kernel's vxlan. The one kind refused is a
 * jumbogram (payload length 0 with a hop-by-hop header, RFC 2675): no peer of
 * ours sends one, the outer IPv4 length being 16 bits.
 *
 * ip is the outer IPv4 header, nh the cursor after the inner Ethernet header.
 */
static __always_inline int vxlan_classify_inner6(void *data, void *data_end, __u32 frame_len, struct iphdr *ip,
						 struct hdr_cursor *nh, struct vxlan_match *m)
{
	const struct host_config6 *cfg6 = get_config6();
	struct ipv6hdr *inner;
	struct route6 *src_route;
	__u32 inner_len, inner_present;
	int nexthdr;

	/* An IPv4-only host: IPv6 is as foreign to it as any other protocol. */
	if (!cfg6)
		return VERDICT_DROP_INNER_NOT_IPV4;
	nexthdr = parse_ipv6hdr(nh, data_end, &inner);
	if (nexthdr < 0)
		return VERDICT_DROP_MALFORMED;
	/* As for IPv4: all of the packet arrived (a few bytes more are Ethernet
	 * padding or a frame check sequence), and not a second datagram. */
	inner_len = sizeof(*inner) + bpf_ntohs(inner->payload_len);
	inner_present = frame_len - (__u32)((void *)inner - data);
	if (inner_len > inner_present)
		return VERDICT_DROP_MALFORMED;
	if (!inner->payload_len && nexthdr == IPPROTO_HOPOPTS)
		return VERDICT_DROP_MALFORMED;
	if (inner_present - inner_len >= XNET_MIN_VXLAN_PAYLOAD)
		return VERDICT_DROP_GRO_MERGED;
	if (!ip6_in_prefix(&inner->daddr, cfg6->subnet_addr, cfg6->subnet_mask))
		return VERDICT_DROP_NOT_LOCAL;
	src_route = route6_of(&inner->saddr);
	if (!src_route)
		return VERDICT_DROP_UNKNOWN_SOURCE;
	if (ip4_word(src_route->remote_ip) != ip->saddr)
		return VERDICT_DROP_SPOOFED;
	if ((ip->tos & ECN_MASK) == ECN_CE && !ipv6_ecn(inner))
		return VERDICT_DROP_CE_NOT_ECT;

	m->peer_ip = ip->saddr;
	m->inner_off = (void *)inner - data;
	m->outer_ce = (ip->tos & ECN_MASK) == ECN_CE;
	m->inner_ipv6 = 1;
	ip6_copy(m->inner_daddr6, &inner->daddr);
	return VERDICT_DECAP;
}

/*
 * vxlan_classify applies docs/design.md's acceptance rules to one frame.
 *
 * It returns VERDICT_PASS for everything that is not VXLAN for us (another
 * protocol, another address, port or VNI, an outer fragment, a truncated
 * outer header): such packets go on untouched, because this program sits on
 * the host's main NIC and must never disturb SSH, etcd or anything else. It
 * returns VERDICT_DECAP with m filled for a packet to deliver, and a
 * VERDICT_DROP_* reason for VXLAN for us that breaks a rule.
 *
 * frame_len is the length of the whole frame, which on TC may be more than
 * [data, data_end): a paged skb (a GSO packet above all) has only its headers
 * in the linear part, so the caller passes skb->len. XDP passes
 * data_end - data.
 */
static __always_inline int vxlan_classify(void *data, void *data_end, __u32 frame_len,
					  const struct host_config *cfg, struct vxlan_match *m)
{
	struct hdr_cursor nh = {.pos = data};
	struct ethhdr *eth, *inner_eth;
	struct iphdr *ip, *inner_ip;
	struct udphdr *udp;
	struct vxlanhdr *vxh;
	struct route *src_route;
	__u32 inner_len, inner_present;

	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP))
		return VERDICT_PASS;
	if (parse_iphdr(&nh, data_end, &ip) != IPPROTO_UDP)
		return VERDICT_PASS;
	if (ip->daddr != ip4_word(cfg->local_ip))
		return VERDICT_PASS;
	/* A fragment of an outer packet is not ours to judge: the stack
	 * reassembles it (our VXLAN senders never fragment: DF clear but the
	 * overlay MTU leaves room for the headers). */
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return VERDICT_PASS;
	if (parse_udphdr(&nh, data_end, &udp) < 0)
		return VERDICT_PASS;
	if (udp->dest != bpf_htons(cfg->port))
		return VERDICT_PASS;
	if (parse_vxlanhdr(&nh, data_end, &vxh) < 0)
		return VERDICT_PASS;
	/* The header must be exactly what the kernel's vxlan, as flannel sets
	 * it up, accepts: the I flag and nothing else in the flags word, our
	 * VNI, and 0 in the reserved byte after it. The kernel drops headers
	 * with any reserved bit set (they belong to extensions such as GBP
	 * that neither side negotiated), and wire.Decode, the Go decap, applies
	 * the same rule. VNI 0 is a VNI like any other. Another VNI on our port
	 * belongs to someone else (or no one): the stack answers it as it would
	 * without us. */
	if (vxh->flags != VXLAN_FLAG_I || vxh->vni != bpf_htonl(cfg->vni << 8))
		return VERDICT_PASS;

	/* From here on the packet is VXLAN for us: what breaks a rule is dropped. */
	m->strip_len = nh.pos - data;
	if (parse_ethhdr(&nh, data_end, &inner_eth) < 0)
		return VERDICT_DROP_MALFORMED;
	if (!mac_equal(inner_eth->h_dest, cfg->vtep_mac))
		return VERDICT_DROP_BAD_VTEP_MAC;
	if (inner_eth->h_proto == bpf_htons(ETH_P_IPV6))
		return vxlan_classify_inner6(data, data_end, frame_len, ip, &nh, m);
	if (inner_eth->h_proto != bpf_htons(ETH_P_IP))
		return VERDICT_DROP_INNER_NOT_IPV4;
	if (parse_iphdr(&nh, data_end, &inner_ip) < 0)
		return VERDICT_DROP_MALFORMED;
	/* The inner packet must be all there: its tot_len covers at least its
	 * own header and at most the bytes that arrived. A shorter inner packet
	 * would be delivered for the container's stack to drop, after counting
	 * as decapsulated and bypassing the host stack's own length checks
	 * (bpf_redirect_peer skips them). A few more bytes than tot_len are
	 * Ethernet padding of a short inner frame or a frame check sequence:
	 * the receiving stack trims them, as it does for any frame. tot_len 0 (IPv4 BIG TCP, over 64 KB) is refused too:
	 * the encap cannot carry such packets either (the outer tot_len is 16
	 * bits), so no peer of ours sends them. */
	inner_len = bpf_ntohs(inner_ip->tot_len);
	inner_present = frame_len - (__u32)((void *)inner_ip - data);
	if (inner_len < (__u32)inner_ip->ihl * 4 || inner_len > inner_present)
		return VERDICT_DROP_MALFORMED;
	/* What follows the inner packet must be too short to be another VXLAN
	 * datagram (a VXLAN header, an inner Ethernet and an IPv4 header): UDP
	 * GRO on the underlay NIC (rx-udp-gro-forwarding, rx-gro-list) merges
	 * datagrams of one flow into one skb when no socket owns the port, as
	 * here, and rewrites the outer lengths to cover them all. Delivered as
	 * one packet, all inner packets but the first would be lost without a
	 * trace, and there is no helper to cut them apart again. A legitimate
	 * tunnel GSO packet carries one inner packet as long as the skb. */
	if (inner_present - inner_len >= XNET_MIN_VXLAN_PAYLOAD)
		return VERDICT_DROP_GRO_MERGED;
	if ((inner_ip->daddr & ip4_word(cfg->subnet_mask)) != ip4_word(cfg->subnet_addr))
		return VERDICT_DROP_NOT_LOCAL;
	/* Anti-spoofing: the inner source must belong to a peer's lease and
	 * the packet must come from that peer's PublicIP. */
	src_route = route_of(inner_ip->saddr);
	if (!src_route)
		return VERDICT_DROP_UNKNOWN_SOURCE;
	if (ip4_word(src_route->remote_ip) != ip->saddr)
		return VERDICT_DROP_SPOOFED;

	/* RFC 6040: congestion experienced on the way must reach the inner
	 * packet, and an inner packet that is not ECN-capable cannot carry the
	 * mark: it is dropped, as the kernel's vxlan drops it (a router would
	 * have dropped it had the outer header been not ECN-capable too). */
	if ((ip->tos & ECN_MASK) == ECN_CE && !(inner_ip->tos & ECN_MASK))
		return VERDICT_DROP_CE_NOT_ECT;

	m->peer_ip = ip->saddr;
	m->inner_daddr = inner_ip->daddr;
	m->inner_off = (void *)inner_ip - data;
	m->outer_ce = (ip->tos & ECN_MASK) == ECN_CE;
	return VERDICT_DECAP;
}

#endif /* XNET_PARSE_H */
