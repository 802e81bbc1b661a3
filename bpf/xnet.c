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
 *
 * Encapsulating where the container's packet enters the host skips the
 * bridge, routing and netfilter; decapsulating at the NIC's ingress and
 * handing the packet to the container's veth peer (bpf_redirect_peer) skips
 * them on the way in, and with them rp_filter, which would drop decapsulated
 * packets arriving on the NIC.
 *
 * Large TCP segments stay large: bpf_skb_adjust_room with the UDP-tunnel
 * encap flags turns a GSO packet into a UDP-tunnel GSO packet, segmented by
 * the NIC or by the stack at the last moment. BPF_F_ADJ_ROOM_FIXED_GSO keeps
 * gso_size, the inner MSS, unchanged (otherwise it shrinks by our 50 bytes on
 * encap and grows on decap, and the segments no longer fit the MTU).
 * Checksums: the inner L4 checksum of a CHECKSUM_PARTIAL packet is still to
 * be filled when it crosses veths; adjust_room keeps csum_start pointing at
 * the inner L4 header, so whoever finally segments or transmits (or the
 * receiver, which trusts CHECKSUM_PARTIAL) sees a consistent packet. The
 * outer UDP checksum is 0 as RFC 7348 allows, the outer IPv4 checksum is
 * computed here.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Keeps enum verdict in the BTF (it only appears as constants otherwise), so
 * bpf2go can generate the Go constants from it. */
const enum verdict *unused_verdict __attribute__((unused));

#ifndef AF_INET
#define AF_INET 2
#endif

/* TC_ACT_UNSPEC is TCX_NEXT under TCX and "continue" for cls_bpf: traffic that
 * is not ours goes on to the next program or the stack, untouched. */
#define XNET_TC_PASS TC_ACT_UNSPEC

#define ECN_MASK 0x3
#define ECN_CE 0x3
#define ECN_ECT0 0x2

static __always_inline const struct host_config *get_config(void)
{
	__u32 zero = 0;
	const struct host_config *cfg = bpf_map_lookup_elem(&config, &zero);

	/* An unconfigured datapath (the Go side has not written our lease
	 * yet) must behave as if it were not attached. */
	if (!cfg || !ip4_word(cfg->local_ip))
		return 0;
	return cfg;
}

static __always_inline void count(__u32 verdict, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &verdict);

	/* Per-CPU values: no atomics needed. */
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void count_peer(__u32 peer_ip, __u32 bytes, int rx)
{
	struct peer_stats *p = bpf_map_lookup_elem(&peers, &peer_ip);

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

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The outer IPv4 header is always 20 bytes: sum its ten 16-bit words. */
static __always_inline __u16 iph_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return csum_fold(sum);
}

/* The kernel's udp_flow_src_port: scale the flow hash into the port range, so
 * one flow keeps one source port (no reordering) and flows spread over the
 * underlay's ECMP and RSS. */
static __always_inline __u16 flow_src_port(__u32 hash)
{
	return (__u16)((((__u64)hash * (XNET_SRC_PORT_MAX + 1 - XNET_SRC_PORT_MIN)) >> 32) +
		       XNET_SRC_PORT_MIN);
}

/* The outer headers, in wire order, written in one go after adjust_room.
 * Every member falls on its natural alignment (0, 20, 28, 36), so no packing
 * is needed; only the trailing padding differs from the wire. */
struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr vxlan;
	struct ethhdr inner_eth;
};

/*
 * encap wraps the IPv4 packet in skb into VXLAN for the peer owning its
 * destination and redirects it out of the underlay NIC. no_route is the
 * verdict for a destination no peer owns: PASS where such traffic is simply
 * not ours (a container talking to the world), DROP where it can only be
 * overlay traffic (xnet0).
 */
static __always_inline int encap(struct __sk_buff *skb, const struct host_config *cfg, struct iphdr *inner,
				 int no_route)
{
	struct bpf_fib_lookup fib = {};
	struct vxlan_encap *h;
	struct ethhdr *eth;
	struct route rt;
	struct route *found;
	struct nexthop *nh;
	void *data, *data_end;
	__u64 now;
	__u32 inner_len = skb->len - sizeof(struct ethhdr);
	__u8 tos = inner->tos;
	__u64 flags;
	long rc;

	found = route_of(inner->daddr);
	if (!found) {
		count(no_route, skb->len);
		return no_route == VERDICT_PASS ? XNET_TC_PASS : TC_ACT_SHOT;
	}
	/* Copy: the entry may change under us, and the packet pointers die
	 * with adjust_room anyway. */
	rt = *found;

	/* A GSO packet is cut into MTU-sized segments later; anything else
	 * must fit as it is. The overlay MTU handed to Docker makes this rare. */
	if (!skb->gso_size && inner_len + XNET_VXLAN_OVERHEAD > cfg->underlay_mtu) {
		count(VERDICT_DROP_TOO_BIG, skb->len);
		return TC_ACT_SHOT;
	}

	/* Next hop on the underlay, before the packet changes, so a failure
	 * leaves it intact: from the nexthops cache while it is fresh (a FIB
	 * walk and neighbour lookup cost about a fifth of the encap at small
	 * packets), else from the FIB. NO_NEIGH (first packet to a peer) is
	 * resolved by bpf_redirect_neigh below and not cached. */
	now = bpf_jiffies64();
	nh = bpf_map_lookup_elem(&nexthops, rt.remote_ip);
	if (nh && now < nh->expires) {
		fib.ifindex = nh->ifindex;
		mac_copy(fib.dmac, nh->dmac);
		mac_copy(fib.smac, nh->smac);
		rc = BPF_FIB_LKUP_RET_SUCCESS;
		goto resolved;
	}
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ipv4_src = ip4_word(cfg->local_ip);
	fib.ipv4_dst = ip4_word(rt.remote_ip);
	/* No tot_len: with one, the lookup compares it to the MTU and refuses
	 * every GSO packet (FRAG_NEEDED); without, it checks the skb, which
	 * knows a GSO packet is cut to size later. Non-GSO sizes were checked
	 * above against the underlay MTU. */
	fib.ifindex = cfg->underlay_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS: {
		struct nexthop fresh = {.ifindex = fib.ifindex, .expires = now + XNET_NEXTHOP_TTL_JIFFIES};

		mac_copy(fresh.dmac, fib.dmac);
		mac_copy(fresh.smac, fib.smac);
		bpf_map_update_elem(&nexthops, rt.remote_ip, &fresh, BPF_ANY);
		break;
	}
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		break;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		/* bpf_fib_lookup insists on forwarding being enabled on the
		 * underlay NIC even for output lookups; bpf_redirect_neigh
		 * without a next hop does its own route lookup instead. */
		fib.ifindex = cfg->underlay_ifindex;
		fib.ipv4_dst = 0;
		break;
	default:
		count(VERDICT_DROP_NO_NEXTHOP, skb->len);
		return TC_ACT_SHOT;
	}

resolved:
	flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr));
	__u32 hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, XNET_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, flags)) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	h = data + sizeof(*eth);
	if ((void *)(h + 1) > data_end) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}

	h->ip.version = 4;
	h->ip.ihl = 5;
	/* ECN as RFC 6040 encapsulates it: copy, but never CE on the outside. */
	h->ip.tos = (tos & ECN_MASK) == ECN_CE ? (tos & ~ECN_MASK) | ECN_ECT0 : tos;
	h->ip.tot_len = bpf_htons(skb->len - sizeof(*eth));
	h->ip.id = (__u16)bpf_get_prandom_u32();
	h->ip.frag_off = 0; /* DF clear, as the kernel's vxlan sends by default */
	h->ip.ttl = 64;
	h->ip.protocol = IPPROTO_UDP;
	h->ip.check = 0;
	h->ip.saddr = ip4_word(cfg->local_ip);
	h->ip.daddr = ip4_word(rt.remote_ip);
	h->ip.check = iph_csum(&h->ip);

	h->udp.source = bpf_htons(flow_src_port(hash));
	h->udp.dest = bpf_htons(cfg->port);
	h->udp.len = bpf_htons(skb->len - sizeof(*eth) - sizeof(struct iphdr));
	h->udp.check = 0;

	h->vxlan.flags = VXLAN_FLAG_I;
	h->vxlan.vni = bpf_htonl(cfg->vni << 8);

	mac_copy(h->inner_eth.h_dest, rt.vtep_mac);
	mac_copy(h->inner_eth.h_source, cfg->vtep_mac);
	h->inner_eth.h_proto = bpf_htons(ETH_P_IP);

	eth->h_proto = bpf_htons(ETH_P_IP);
	count(VERDICT_ENCAP, skb->len);
	count_peer(ip4_word(rt.remote_ip), skb->len, 0);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		mac_copy(eth->h_dest, fib.dmac);
		mac_copy(eth->h_source, fib.smac);
		return bpf_redirect(fib.ifindex, 0);
	}
	/* The kernel resolves the neighbour (queueing this packet meanwhile)
	 * and fills the Ethernet header. */
	if (fib.ipv4_dst) {
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst};

		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

/* learn records which veth a local container sits behind, so decap can hand
 * packets for it straight to that veth's peer. Only writes on change. */
static __always_inline void learn(struct __sk_buff *skb, const struct host_config *cfg, struct ethhdr *eth,
				  struct iphdr *ip)
{
	struct endpoint *known, ep = {};
	__u32 saddr = ip->saddr;

	if ((saddr & ip4_word(cfg->subnet_mask)) != ip4_word(cfg->subnet_addr))
		return;
	known = bpf_map_lookup_elem(&endpoints, &saddr);
	if (known && known->ifindex == skb->ifindex && mac_equal(known->mac, eth->h_source) &&
	    mac_equal(known->gw_mac, eth->h_dest))
		return;
	ep.ifindex = skb->ifindex;
	mac_copy(ep.mac, eth->h_source);
	mac_copy(ep.gw_mac, eth->h_dest);
	bpf_map_update_elem(&endpoints, &saddr, &ep, BPF_ANY);
}

SEC("tc")
int encap_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = data};
	const struct host_config *cfg;
	struct ethhdr *eth;
	struct iphdr *ip;

	cfg = get_config();
	if (!cfg)
		return XNET_TC_PASS;
	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP) || parse_iphdr(&nh, data_end, &ip) < 0) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	learn(skb, cfg, eth, ip);
	return encap(skb, cfg, ip, VERDICT_PASS);
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

	/* Everything routed into xnet0 is overlay traffic: what we cannot
	 * send is dropped here rather than looping through the stack. */
	cfg = get_config();
	if (!cfg) {
		count(VERDICT_DROP_NO_CONFIG, skb->len);
		return TC_ACT_SHOT;
	}
	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP) || parse_iphdr(&nh, data_end, &ip) < 0) {
		/* xnet0 has ARP off; IPv6 router solicitations and the like
		 * have nowhere to go. */
		count(VERDICT_PASS, skb->len);
		return TC_ACT_SHOT;
	}
	return encap(skb, cfg, ip, VERDICT_DROP_NO_ROUTE);
}

/*
 * deliver hands a decapsulated frame (Ethernet + inner IPv4 at skb->data) to
 * its destination: straight into a learned container (bpf_redirect_peer: the
 * packet appears on the container's eth0 without touching the host stack),
 * else into xnet0's ingress, where the host routes it like any packet that
 * arrived from the overlay (and rp_filter finds the overlay route back), else
 * to the stack.
 */
static __always_inline int deliver(struct __sk_buff *skb, const struct host_config *cfg, __u32 daddr)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint *ep;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	eth->h_proto = bpf_htons(ETH_P_IP);
	ep = bpf_map_lookup_elem(&endpoints, &daddr);
	if (ep) {
		mac_copy(eth->h_dest, ep->mac);
		mac_copy(eth->h_source, ep->gw_mac);
		return bpf_redirect_peer(ep->ifindex, 0);
	}
	if (cfg->host_ifindex) {
		/* xnet0's MAC is our VTEP MAC, so the frame is for it. */
		mac_copy(eth->h_dest, cfg->vtep_mac);
		return bpf_redirect(cfg->host_ifindex, BPF_F_INGRESS);
	}
	mac_copy(eth->h_dest, cfg->underlay_mac);
	return TC_ACT_OK;
}

/* The metadata word decap_xdp leaves on a frame it already decapsulated. */
static __always_inline int xdp_decapped(struct __sk_buff *skb)
{
	void *meta = (void *)(long)skb->data_meta;
	void *data = (void *)(long)skb->data;

	if (meta + sizeof(__u32) > data)
		return 0;
	return *(__u32 *)meta == XNET_META_DECAPPED;
}

/* Bytes vxlan_classify may read: outer Ethernet, IPv4 with the longest
 * options, UDP, VXLAN, inner Ethernet and IPv4 without options. */
#define CLASSIFY_BYTES (14 + 60 + 8 + 8 + 14 + 20)

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

	if (xdp_decapped(skb)) {
		struct hdr_cursor nh = {.pos = (void *)(long)skb->data};
		struct ethhdr *eth;
		struct iphdr *ip;

		data_end = (void *)(long)skb->data_end;
		if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP) ||
		    parse_iphdr(&nh, data_end, &ip) < 0)
			return TC_ACT_SHOT;
		return deliver(skb, cfg, ip->daddr);
	}

	/* Headers may straddle the linear part of a paged skb; pulling them
	 * in changes no byte of the packet. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + CLASSIFY_BYTES > data_end && skb->len > data_end - data)
		bpf_skb_pull_data(skb, skb->len < CLASSIFY_BYTES ? skb->len : CLASSIFY_BYTES);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	verdict = vxlan_classify(data, data_end, skb->len, cfg, &m);
	if (verdict == VERDICT_PASS) {
		count(VERDICT_PASS, skb->len);
		return XNET_TC_PASS;
	}
	if (verdict != VERDICT_DECAP) {
		count(verdict, skb->len);
		return TC_ACT_SHOT;
	}

	/* Remove outer IPv4, UDP, VXLAN and the inner Ethernet header; the
	 * outer Ethernet header stays and deliver rewrites it. */
	if (bpf_skb_adjust_room(skb, -(__s32)(m.strip_len), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_DECAP, skb->len);
	count_peer(m.peer_ip, skb->len, 1);
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
	__u32 *meta;
	int verdict;

	cfg = get_config();
	if (!cfg)
		return XDP_PASS;
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
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(__u32)))
		return XDP_PASS;
	meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return XDP_DROP;
	*meta = XNET_META_DECAPPED;

	/* Strip up to the inner Ethernet header: the stack sees the inner
	 * frame, so GRO on a physical NIC coalesces the inner TCP flow. */
	if (bpf_xdp_adjust_head(ctx, m.strip_len)) {
		count(VERDICT_DROP_HELPER, len);
		return XDP_DROP;
	}
	count(VERDICT_DECAP, len - m.strip_len);
	count_peer(m.peer_ip, len - m.strip_len, 1);
	return XDP_PASS;
}
