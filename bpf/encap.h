/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Putting packets into VXLAN and taking them out, for the programs in xnet.c.
 *
 * Encap, in the order encap() runs the steps, for the peer owning the inner
 * destination (its route, which send_to_peer in direct.h looked up: a peer on
 * our L2 segment with DirectRouting gets the packet plain instead): check the
 * packet will fit the underlay (a misfit goes to encap_too_big, which answers
 * it), find the underlay next hop (before the packet changes, so a failure
 * leaves it intact), make room for the outer headers (bpf_skb_adjust_room),
 * write them, send. Learning which veth a container sits behind (learn)
 * happens on the same path, first.
 *
 * Decap: vxlan_classify (parse.h) decides; strip the outer headers, then
 * deliver the inner frame to the container, to xnet0 or to the stack.
 *
 * Large TCP segments stay large: bpf_skb_adjust_room with the UDP-tunnel
 * encap flags (XNET_ENCAP_ROOM_FLAGS) turns a GSO packet into a UDP-tunnel
 * GSO packet, segmented by the NIC or by the stack at the last moment.
 * Checksums: the inner L4 checksum of a CHECKSUM_PARTIAL packet is still to be
 * filled when it crosses veths; adjust_room keeps csum_start pointing at the
 * inner L4 header, so whoever finally segments or transmits (or the receiver,
 * which trusts CHECKSUM_PARTIAL) sees a consistent packet. The outer UDP
 * checksum is 0 as RFC 7348 allows, the outer IPv4 checksum is computed here.
 */
#ifndef XNET_ENCAP_H
#define XNET_ENCAP_H

#include <stddef.h>
#include <linux/errno.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "icmp.h"
#include "pull.h"

/* The outer headers, in wire order, written in one go after adjust_room.
 * Every member falls on its natural alignment (0, 20, 28, 36), so no packing
 * is needed; only the trailing padding differs from the wire. */
struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr vxlan;
	struct ethhdr inner_eth;
};

/* underlay_hop: how encap sends to a peer, decided before the packet changes. */
struct underlay_hop {
	__u32 ifindex;            /* underlay NIC to send from */
	__u32 nh_ip;              /* !resolved: next hop for the kernel to resolve (0: it routes itself) */
	__u8 dmac[XNET_ETH_ALEN]; /* resolved: the next hop's MAC */
	__u8 smac[XNET_ETH_ALEN]; /* resolved: our NIC's MAC */
	__u8 resolved;            /* MACs known: a plain bpf_redirect will do */
};

/* The kernel's udp_flow_src_port: scale the flow hash into the port range, so
 * one flow keeps one source port (no reordering) and flows spread over the
 * underlay's ECMP and RSS. */
static __always_inline __u16 flow_src_port(__u32 hash)
{
	return (__u16)((((__u64)hash * (XNET_SRC_PORT_MAX + 1 - XNET_SRC_PORT_MIN)) >> 32) +
		       XNET_SRC_PORT_MIN);
}

/* encap_seg_len is the length of the longest IPv4 packet the inner packet
 * becomes on the overlay: the packet itself, or for a GSO packet, which is
 * cut into segments later, one segment: the inner IPv4 and L4 headers and
 * gso_size bytes of payload. */
static __always_inline __u32 encap_seg_len(const struct __sk_buff *skb, struct iphdr *inner)
{
	void *data_end = (void *)(long)skb->data_end;
	__u32 l3 = inner->ihl * 4, l4 = 0;

	if (!skb->gso_size)
		return skb->len - sizeof(struct ethhdr);
	if (inner->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)inner + l3;

		/* A GSO packet has its headers in the linear part; the check
		 * is for the verifier. */
		if ((void *)(tcp + 1) <= data_end)
			l4 = tcp->doff * 4;
	} else if (inner->protocol == IPPROTO_UDP) {
		l4 = sizeof(struct udphdr);
	}
	return l3 + l4 + skb->gso_size;
}

/* The gateway a container sends to: docker0, which has the lease's first
 * address (--bip). The kernel answers a container's packet it cannot route
 * from there, so the ICMP errors of the encap come from there too. */
static __always_inline __u32 container_gateway(const struct host_config *cfg)
{
	return ip4_word(cfg->subnet_addr) | bpf_htonl(1);
}

/*
 * encap_too_big deals with a packet that will not fit the underlay once
 * encapsulated; no packet vanishes without the sender hearing of it.
 *
 * From a container (answer set): with DF, the container gets an ICMP
 * "fragmentation needed" with the overlay MTU and its path MTU discovery
 * does the rest, as with the kernel's vxlan (within the rate limit of
 * icmp_allowed: beyond it the packet is dropped unanswered); without DF it goes to the
 * kernel, which routes it into xnet0 (whose MTU is the overlay's), fragments
 * it there and encap_host sends the fragments. A GSO packet counts by its
 * segments; TCP's always carry DF.
 *
 * In xnet0 (answer clear) the stack has already held the packet to xnet0's
 * MTU, the overlay MTU: a misfit means xnet0's MTU was changed, and the drop
 * is counted.
 */
static __always_inline int encap_too_big(struct __sk_buff *skb, const struct host_config *cfg, struct iphdr *inner,
					 int answer)
{
	__u32 len = skb->len;

	if (!answer) {
		count(VERDICT_DROP_TOO_BIG, len);
		return TC_ACT_SHOT;
	}
	if (!(inner->frag_off & bpf_htons(IP_DF))) {
		count(VERDICT_PASS_TOO_BIG, len);
		return XNET_TC_PASS;
	}
	if (!icmp_allowed()) {
		count(VERDICT_DROP_ICMP_RATELIMIT, len);
		return TC_ACT_SHOT;
	}
	if (icmp_frag_needed(skb, container_gateway(cfg), cfg->underlay_mtu - XNET_VXLAN_OVERHEAD) < 0) {
		count(VERDICT_DROP_HELPER, len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_ICMP_FRAG_NEEDED, len);
	/* Out of the veth it came in on: into the container. */
	return bpf_redirect(skb->ifindex, 0);
}

/* hop_from_cache fills hop from the nexthops cache while the entry of key (an
 * underlay_addr) is fresh: a FIB walk and neighbour lookup cost about a fifth
 * of the encap at small packets. */
static __always_inline int hop_from_cache(const void *key, __u64 now, struct underlay_hop *hop)
{
	struct nexthop *nh = bpf_map_lookup_elem(&nexthops, key);

	if (!nh || now >= nh->expires)
		return 0;
	hop->ifindex = nh->ifindex;
	mac_copy(hop->dmac, nh->dmac);
	mac_copy(hop->smac, nh->smac);
	hop->resolved = 1;
	return 1;
}

/* hop_from_answer fills hop from a successful bpf_fib_lookup and caches the
 * answer under key (an underlay_addr), for either family. */
static __always_inline void hop_from_answer(const struct bpf_fib_lookup *fib, const void *key, __u64 now,
					    struct underlay_hop *hop)
{
	struct nexthop fresh = {.ifindex = fib->ifindex, .expires = now + XNET_NEXTHOP_TTL_JIFFIES};

	mac_copy(fresh.dmac, fib->dmac);
	mac_copy(fresh.smac, fib->smac);
	bpf_map_update_elem(&nexthops, key, &fresh, BPF_ANY);
	hop->ifindex = fib->ifindex;
	mac_copy(hop->dmac, fib->dmac);
	mac_copy(hop->smac, fib->smac);
	hop->resolved = 1;
}

/* hop_from_fib asks the FIB for the next hop towards remote_ip (IPv4, network
 * order) and caches a complete answer under key, remote_ip as an
 * underlay_addr. It returns -1 when the underlay cannot reach the peer.
 * NO_NEIGH (the first packet to a peer) is left for bpf_redirect_neigh to
 * resolve and is not cached. */
static __always_inline int hop_from_fib(struct __sk_buff *skb, const struct host_config *cfg, __u32 remote_ip,
					const void *key, __u64 now, struct underlay_hop *hop)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ipv4_src = ip4_word(cfg->local_ip);
	fib.ipv4_dst = remote_ip;
	/* No tot_len: with one, the lookup compares it to the MTU and refuses
	 * every GSO packet (FRAG_NEEDED); without, it checks the skb, which
	 * knows a GSO packet is cut to size later. Sizes were checked against
	 * the underlay MTU before (encap_seg_len). */
	fib.ifindex = cfg->underlay_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		hop_from_answer(&fib, key, now, hop);
		return 0;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		hop->ifindex = fib.ifindex;
		hop->nh_ip = fib.ipv4_dst; /* the gateway, or the peer itself on-link */
		return 0;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		/* bpf_fib_lookup insists on forwarding being enabled on the
		 * underlay NIC even for output lookups; bpf_redirect_neigh
		 * without a next hop does its own route lookup instead. */
		hop->ifindex = cfg->underlay_ifindex;
		hop->nh_ip = 0;
		return 0;
	default:
		return -1;
	}
}

/* find_hop decides how to reach remote_ip (an ipv4_addr) on the underlay: the
 * cache, else the FIB. */
static __always_inline int find_hop(struct __sk_buff *skb, const struct host_config *cfg, const __u8 *remote_ip,
				    struct underlay_hop *hop)
{
	__u64 now = bpf_jiffies64();
	underlay_addr key;

	underlay_addr4(key, ip4_word(remote_ip));
	if (hop_from_cache(key, now, hop))
		return 0;
	return hop_from_fib(skb, cfg, ip4_word(remote_ip), key, now, hop);
}

/* encap_write_headers fills the outer IPv4, UDP, VXLAN and inner Ethernet
 * headers into the room adjust_room made behind the outer Ethernet header,
 * and the outer Ethernet addresses when the next hop's MAC is known (else
 * bpf_redirect_neigh fills them). tos is the inner packet's (an IPv6 packet's
 * traffic class), read before adjust_room invalidated the pointers into the
 * packet; inner_proto is its EtherType (network order). */
static __always_inline int encap_write_headers(struct __sk_buff *skb, const struct host_config *cfg,
					       const struct route *rt, const struct underlay_hop *hop, __u8 tos,
					       __u16 sport, __be16 inner_proto)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct vxlan_encap *h = data + sizeof(*eth);

	/* adjust_room put the 50 bytes in the linear part, but the verifier
	 * knows nothing of that: every pointer into the packet is unusable
	 * after the helper until it is checked against data_end again. */
	if ((void *)(h + 1) > data_end)
		return -1;

	h->ip.version = 4;
	h->ip.ihl = 5;
	/* The kernel's vxlan with TOS 0, as flannel sets it up: no DSCP on the
	 * outside (the inner packet's marking is not the underlay's business),
	 * and the ECN field as RFC 6040 encapsulates it: copied, except CE,
	 * which goes out as ECT(0) so the underlay can mark it again. */
	h->ip.tos = (tos & ECN_MASK) == ECN_CE ? ECN_ECT0 : tos & ECN_MASK;
	h->ip.tot_len = bpf_htons(skb->len - sizeof(*eth));
	h->ip.id = (__u16)bpf_get_prandom_u32();
	h->ip.frag_off = 0; /* DF clear, as the kernel's vxlan sends by default */
	h->ip.ttl = 64;
	h->ip.protocol = IPPROTO_UDP;
	h->ip.check = 0;
	h->ip.saddr = ip4_word(cfg->local_ip);
	h->ip.daddr = ip4_word(rt->remote_ip);
	h->ip.check = iph_csum(&h->ip);

	h->udp.source = bpf_htons(sport);
	h->udp.dest = bpf_htons(cfg->port);
	h->udp.len = bpf_htons(skb->len - sizeof(*eth) - sizeof(struct iphdr));
	h->udp.check = 0;

	h->vxlan.flags = VXLAN_FLAG_I;
	h->vxlan.vni = bpf_htonl(cfg->vni << 8);

	mac_copy(h->inner_eth.h_dest, rt->vtep_mac);
	mac_copy(h->inner_eth.h_source, cfg->vtep_mac);
	h->inner_eth.h_proto = inner_proto;

	eth->h_proto = bpf_htons(ETH_P_IP);
	if (hop->resolved) {
		mac_copy(eth->h_dest, hop->dmac);
		mac_copy(eth->h_source, hop->smac);
	}
	return 0;
}

/* encap_send sends the encapsulated packet towards hop. */
static __always_inline int encap_send(struct __sk_buff *skb, const struct underlay_hop *hop)
{
	if (hop->resolved)
		return bpf_redirect(hop->ifindex, 0);
	/* The kernel resolves the neighbour (queueing this packet meanwhile)
	 * and fills the Ethernet header. */
	if (hop->nh_ip) {
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = hop->nh_ip};

		return bpf_redirect_neigh(hop->ifindex, &nh, sizeof(nh), 0);
	}
	return bpf_redirect_neigh(hop->ifindex, 0, 0, 0);
}

/*
 * encap wraps the IPv4 packet in skb into VXLAN for the peer of route found
 * (the one owning its destination) and redirects it out of the underlay NIC.
 * from_container says where the packet comes from: a container's veth, where
 * a misfit is answered (encap_too_big), or xnet0, where what cannot go is
 * dropped.
 */
static __always_inline int encap(struct __sk_buff *skb, const struct host_config *cfg, struct iphdr *inner,
				 const struct route *found, int from_container)
{
	struct underlay_hop hop = {};
	struct route rt;
	__u8 tos = inner->tos;
	__u32 hash;

	/* Copy: the entry may change under us, and the packet pointers die
	 * with adjust_room anyway. */
	rt = *found;

	if (encap_seg_len(skb, inner) + XNET_VXLAN_OVERHEAD > cfg->underlay_mtu)
		return encap_too_big(skb, cfg, inner, from_container);
	if (find_hop(skb, cfg, rt.remote_ip, &hop) < 0) {
		count(VERDICT_DROP_NO_NEXTHOP, skb->len);
		return TC_ACT_SHOT;
	}

	/* The hash of the inner flow, before our headers hide it. */
	hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, XNET_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, XNET_ENCAP_ROOM_FLAGS) ||
	    encap_write_headers(skb, cfg, &rt, &hop, tos, flow_src_port(hash), bpf_htons(ETH_P_IP)) < 0) {
		count(VERDICT_DROP_HELPER, skb->len);
		return TC_ACT_SHOT;
	}
	count(VERDICT_ENCAP, skb->len);
	count_peer4(ip4_word(rt.remote_ip), skb->len, 0);
	return encap_send(skb, &hop);
}

/* ifindex_alive says whether an interface with this index exists in the
 * skb's network namespace. bpf_check_mtu looks the device up by index and
 * answers -ENODEV when there is none; whatever it says about the MTU does not
 * matter here. */
static __always_inline int ifindex_alive(struct __sk_buff *skb, __u32 ifindex)
{
	__u32 mtu_len = 0;

	return bpf_check_mtu(skb, ifindex, &mtu_len, 0, 0) != -ENODEV;
}

/* unicast_mac: not multicast or broadcast (the group bit, the lowest bit of
 * the first byte) and not all zeroes: what the kernel's is_valid_ether_addr
 * accepts as a source, and the bridge drops anything else. */
static __always_inline int unicast_mac(const __u8 *mac)
{
	return !(mac[0] & 1) && (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]);
}

/*
 * learn records which veth a local container sits behind, so decap can hand
 * packets for it straight to that veth's peer. Only writes on change.
 *
 * What a container sends is not to be trusted: one with NET_RAW can send a
 * packet from its neighbour's address. So an address bound to another veth
 * that still exists does not move (the first veth's owner keeps its traffic);
 * it moves only once that veth is gone (the container stopped, and a new one
 * got its address), which the kernel tells us here without waiting for the Go
 * side to forget the endpoint. A source MAC that is not unicast is never
 * learned: deliver would address the container with it. learn returns -1 for
 * a packet it refused: its source is not the sender's to use.
 */
static __always_inline int learn(struct __sk_buff *skb, const struct host_config *cfg, struct ethhdr *eth,
				 struct iphdr *ip)
{
	struct endpoint *known, ep = {};
	__u32 saddr = ip->saddr;
	__u32 mask = ip4_word(cfg->subnet_mask);
	int routed;

	if ((saddr & mask) != ip4_word(cfg->subnet_addr))
		return 0;
	if (!unicast_mac(eth->h_source))
		return -1;
	/* Only a packet the container routes through its gateway (to an address
	 * outside our lease, by unicast) carries the gateway's MAC as its
	 * Ethernet destination, which deliver puts back as the source; one to a
	 * neighbour on the bridge carries the neighbour's MAC, a broadcast or
	 * multicast a group's. Learning from those would rewrite the entry back
	 * and forth. The source check above and below still covers every packet. */
	routed = (ip->daddr & mask) != ip4_word(cfg->subnet_addr) && unicast_mac(eth->h_dest) &&
		 ip->daddr != 0xffffffff && (ip->daddr & bpf_htonl(0xf0000000)) != bpf_htonl(0xe0000000);
	known = bpf_map_lookup_elem(&endpoints, &saddr);
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
	bpf_map_update_elem(&endpoints, &saddr, &ep, BPF_ANY);
	return 0;
}

/*
 * deliver hands a decapsulated frame (Ethernet + inner IPv4 at skb->data) to
 * its destination: straight into a learned container (bpf_redirect_peer: the
 * packet appears on the container's eth0 without touching the host stack),
 * else into xnet0's ingress, where the host routes it like any packet that
 * arrived from the overlay (and rp_filter finds the overlay route back), else
 * to the stack. With kernel host routing every packet takes xnet0, so the
 * host's forwarding and netfilter see it.
 */
static __always_inline int deliver(struct __sk_buff *skb, const struct host_config *cfg, __u32 daddr)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint *ep;

	/* After adjust_room (or on a frame XDP stripped) the verifier knows
	 * nothing of the packet's length yet. */
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	eth->h_proto = bpf_htons(ETH_P_IP);
	ep = cfg->host_routing_kernel ? 0 : bpf_map_lookup_elem(&endpoints, &daddr);
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

/*
 * bridge_to_veth takes the last hop of an overlay packet the host forwarded
 * from xnet0 into a container bridge (the stack path: kernel host routing, or
 * a container not learned yet) when the container behind the destination is
 * learned: it goes out of the container's veth instead of through the bridge's
 * transmit. That is not only one hop less. A GSO packet that crossed a veth
 * underlay still carries its encapsulation state after decap (the skb keeps
 * skb->encapsulation and SKB_GSO_UDP_TUNNEL, which bpf_skb_adjust_room cannot
 * clear), a bridge offers no features for encapsulated packets, and so the
 * bridge's transmit cut every such packet into MTU-sized segments with their
 * checksums computed in software, and the container received them one by one:
 * the stack path ran at a third of kernel VXLAN's throughput. A veth keeps them
 * whole. It runs after the host's routing, FORWARD and POSTROUTING, so
 * netfilter has had its say; the frame's destination MAC is the kernel's
 * neighbour entry for the container, and the packet goes to the veth only if
 * that is the learned container's MAC. Everything else passes to the bridge.
 */
static __always_inline int bridge_to_veth(struct __sk_buff *skb, const struct host_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct hdr_cursor nh = {.pos = data};
	struct endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 daddr;

	if (!cfg->host_ifindex || skb->ingress_ifindex != cfg->host_ifindex || cfg->ipv6_only)
		return XNET_TC_PASS;
	if (parse_ethhdr(&nh, data_end, &eth) != bpf_htons(ETH_P_IP) || parse_iphdr(&nh, data_end, &ip) < 0)
		return XNET_TC_PASS;
	daddr = ip->daddr;
	ep = bpf_map_lookup_elem(&endpoints, &daddr);
	if (!ep || !mac_equal(eth->h_dest, ep->mac))
		return XNET_TC_PASS;
	count(VERDICT_BRIDGE_TO_VETH, skb->len);
	return bpf_redirect(ep->ifindex, 0);
}

/* udp_to_us says whether the frame is IPv4 UDP to our address and VXLAN
 * port, not a fragment: the checks vxlan_classify makes before the VXLAN
 * header, no more. It reads with bpf_skb_load_bytes, which copies from the
 * paged part as well, so looking changes nothing in the skb. */
static __always_inline int udp_to_us(struct __sk_buff *skb, const struct host_config *cfg)
{
	struct iphdr ip;
	__be16 proto, dport;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0 ||
	    proto != bpf_htons(ETH_P_IP))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_UDP || ip.daddr != ip4_word(cfg->local_ip) ||
	    ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + ip.ihl * 4 + offsetof(struct udphdr, dest), &dport,
			       sizeof(dport)) < 0)
		return 0;
	return dport == bpf_htons(cfg->port);
}

/* decap_pull makes the headers vxlan_classify reads linear, where direct
 * packet access sees them: a paged skb (a GSO packet above all) may carry only
 * part of them in its linear area. Only frames that are UDP to our port are
 * pulled: the program sits on the host's main NIC, and everything else there
 * (SSH, etcd, the host's own traffic) must reach the stack as it came, not
 * copied into a linear buffer at every packet. For those, classify sees no
 * more than what is linear and passes them on. */
static __always_inline void decap_pull(struct __sk_buff *skb, const struct host_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + XNET_CLASSIFY_BYTES <= data_end || skb->len <= data_end - data)
		return; /* all there already */
	if (!udp_to_us(skb, cfg))
		return;
	bpf_skb_pull_data(skb, decap_pull_len(skb)); /* headers only: pull.h says why */
}

/* decap_ecn6 is decap_ecn for an inner IPv6 header: the ECN field is the low
 * two bits of the traffic class, the upper nibble of the header's second byte,
 * and IPv6 has no header checksum to fix. The offset is bounded by a mask
 * (inner_off is at most 104, see decap_ecn), which the verifier follows
 * whatever order the compiler puts the checks in. */
static __always_inline void decap_ecn6(void *data, void *data_end, const struct vxlan_match *m)
{
	__u8 *tc = data + (m->inner_off & 0x7f) + 1;

	if ((void *)(tc + 1) <= data_end)
		*tc |= ECN_CE << 4;
}

/* decap_ecn copies a CE mark from the outer header into the inner IPv4
 * header of an accepted frame (RFC 6040; vxlan_classify already dropped what
 * cannot carry it) and fixes the inner header checksum, or into the traffic
 * class of an inner IPv6 header. It works on
 * [data, data_end) before the strip, so XDP and TC share it. */
static __always_inline void decap_ecn(void *data, void *data_end, const struct vxlan_match *m)
{
	struct iphdr *inner;
	__u16 *word, old;

	if (!m->outer_ce)
		return;
	if (m->inner_ipv6) {
		decap_ecn6(data, data_end, m);
		return;
	}
	/* The offset came through the stack: bound it, or the verifier will
	 * not let it move a packet pointer. Outer Ethernet, the longest outer
	 * IPv4 header, UDP, VXLAN and inner Ethernet. */
	if (m->inner_off > 14 + 60 + 8 + 8 + 14)
		return;
	inner = data + m->inner_off;
	if ((void *)(inner + 1) > data_end)
		return;
	/* The TOS byte shares its 16-bit word with version and IHL. */
	word = (__u16 *)inner;
	old = *word;
	inner->tos |= ECN_CE;
	csum_replace2(&inner->check, old, *word);
}

/* decap_strip removes the outer IPv4, UDP and VXLAN headers and the inner
 * Ethernet header of an accepted packet; the outer Ethernet header stays and
 * deliver rewrites it. That is strip_len bytes behind the outer Ethernet
 * header: strip_len counts the outer Ethernet header instead of the inner
 * one, and both are 14 bytes. */
static __always_inline int decap_strip(struct __sk_buff *skb, const struct vxlan_match *m)
{
	return bpf_skb_adjust_room(skb, -(__s32)m->strip_len, BPF_ADJ_ROOM_MAC, XNET_DECAP_ROOM_FLAGS) ? -1 : 0;
}

/* xdp_mark_decapped leaves XNET_META_DECAPPED in the metadata in front of
 * the frame, for decap_tc on the same NIC (xdp_decapped). */
static __always_inline int xdp_mark_decapped(struct xdp_md *ctx)
{
	__u32 *meta;

	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(__u32)))
		return -1;
	meta = (void *)(long)ctx->data_meta;
	/* The helper moved data_meta; the verifier wants it checked against
	 * data before the store. */
	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return -1;
	*meta = XNET_META_DECAPPED;
	return 0;
}

/* xdp_decapped says whether decap_xdp already validated and stripped this
 * frame: it left XNET_META_DECAPPED in the metadata in front of it. */
static __always_inline int xdp_decapped(struct __sk_buff *skb)
{
	void *meta = (void *)(long)skb->data_meta;
	void *data = (void *)(long)skb->data;

	/* No metadata (the usual case) leaves data_meta == data. */
	if (meta + sizeof(__u32) > data)
		return 0;
	return *(__u32 *)meta == XNET_META_DECAPPED;
}

#endif /* XNET_ENCAP_H */
