/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The IPv6 counterpart of icmp.h: ICMPv6 "Packet Too Big" (RFC 4443 3.2) to a
 * container whose IPv6 packet will not fit the underlay once encapsulated.
 * IPv6 routers never fragment, so there is no "DF clear" case to leave to the
 * kernel: every such packet from a container is answered, and the container's
 * path MTU discovery (which IPv6 requires) lowers its path MTU to the overlay's.
 * As for IPv4, the packet is rewritten into the reply and sent back out of the
 * veth it came in on.
 */
#ifndef XNET_ICMP6_H
#define XNET_ICMP6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in6.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "csum.h"

#define XNET_ICMPV6_PKT_TOOBIG 2

/* ICMPv6 types below 128 are errors (RFC 4443 2.1): no error is ever sent
 * about one (2.4 e). */
#define XNET_ICMPV6_INFO_MIN 128

/* The hop limit of the reply, the kernel's default for the ICMPv6 errors it
 * sends. */
#define XNET_ICMP6_HOP_LIMIT 64

/* How much of the original packet the reply quotes: its IPv6 header and the
 * 88 bytes behind it, which holds a TCP header with all its options behind an
 * extension header or two. RFC 4443 asks for as much as fits in 1280 bytes;
 * the reply is built on the BPF stack (512 bytes), and what the sender's
 * kernel needs to find its socket is the chain of headers up to the first 8
 * bytes of the upper layer. A multiple of 4, as bpf_csum_diff wants. */
#define XNET_ICMP6_QUOTE_LEN 128

/* The ICMPv6 header of a Packet Too Big. */
struct icmp6_too_big_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 mtu;
};

/* icmp6_reply: everything of the reply after its Ethernet header, built on
 * the stack and written into the packet in one go. */
struct icmp6_reply {
	struct ipv6hdr ip;
	struct icmp6_too_big_hdr icmp;
	__u8 quote[XNET_ICMP6_QUOTE_LEN];
};

/* The pseudo-header ICMPv6 checksums cover (RFC 8200 8.1), upper-layer length
 * and next header as 32-bit words. */
struct ipv6_pseudo_hdr {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__be32 len;
	__be32 nexthdr;
};

/*
 * icmp6_packet_too_big rewrites the IPv6 packet in skb (Ethernet at
 * skb->data) into an ICMPv6 Packet Too Big for its sender with the given MTU,
 * addressed from src (16 bytes, wire order) and sent back to the Ethernet
 * address it came from. The caller redirects it. Returns -1 if a helper
 * refused (the packet is then unusable) or the packet is shorter than the
 * quote, which a packet too big for any IPv6 link never is.
 */
static __always_inline int icmp6_packet_too_big(struct __sk_buff *skb, const void *src, __u32 mtu)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip = data + sizeof(*eth);
	struct icmp6_reply r = {};
	struct ipv6_pseudo_hdr ph = {};
	__u8 macs[2 * ETH_ALEN];
	__u32 sum;

	/* The caller parsed these headers; the verifier wants them checked
	 * again in this function. */
	if ((void *)(ip + 1) > data_end)
		return -1;
	mac_copy(macs, eth->h_source); /* back to the sender */
	mac_copy(macs + ETH_ALEN, eth->h_dest);

	r.ip.version = 6;
	r.ip.payload_len = bpf_htons(sizeof(r.icmp) + XNET_ICMP6_QUOTE_LEN);
	r.ip.nexthdr = IPPROTO_ICMPV6;
	r.ip.hop_limit = XNET_ICMP6_HOP_LIMIT;
	__builtin_memcpy(&r.ip.saddr, src, sizeof(r.ip.saddr));
	r.ip.daddr = ip->saddr;

	r.icmp.type = XNET_ICMPV6_PKT_TOOBIG;
	r.icmp.mtu = bpf_htonl(mtu);
	if (bpf_skb_load_bytes(skb, sizeof(*eth), r.quote, XNET_ICMP6_QUOTE_LEN) < 0)
		return -1;

	ph.saddr = r.ip.saddr;
	ph.daddr = r.ip.daddr;
	ph.len = bpf_htonl(sizeof(r.icmp) + XNET_ICMP6_QUOTE_LEN);
	ph.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + XNET_ICMP6_QUOTE_LEN, sum);
	r.icmp.checksum = csum_fold(sum);

	/* As icmp_frag_needed: cut the packet to the reply's length, which also
	 * unclones it and drops its GSO state. */
	if (bpf_skb_change_tail(skb, sizeof(*eth) + sizeof(r), 0))
		return -1;
	if (bpf_skb_store_bytes(skb, sizeof(*eth), &r, sizeof(r), 0))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return -1;
	return 0;
}

#endif /* XNET_ICMP6_H */
