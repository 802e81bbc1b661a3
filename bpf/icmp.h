/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one ICMP error the datapath sends: "fragmentation needed" (RFC 792
 * type 3 code 4, with the next-hop MTU of RFC 1191) to a container whose
 * packet will not fit the underlay once encapsulated. With the kernel's vxlan
 * the container learns the overlay MTU the same way: the kernel answers such
 * a packet when it routes it towards the vxlan device. Here the packet never
 * reaches a routing decision, so the encap answers in its place, as Cilium
 * does: the packet is rewritten into the reply and sent back out of the veth
 * it came in on.
 */
#ifndef XNET_ICMP_H
#define XNET_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"
#include "csum.h"

#ifndef IP_DF
#define IP_DF 0x4000
#endif

/* uapi's linux/icmp.h pulls in libc headers a BPF build cannot use. */
#define XNET_ICMP_DEST_UNREACH 3
#define XNET_ICMP_FRAG_NEEDED 4

/* The ICMP header of a "fragmentation needed" (RFC 1191). */
struct icmp_frag_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu; /* next-hop MTU */
};

/* What the kernel's icmp_send puts in the TOS of an error: the original's
 * TOS bits (not its precedence, not its ECN field) and precedence "internet
 * control". */
#define XNET_IPTOS_TOS_MASK 0x1e
#define XNET_IPTOS_PREC_INTERNETCONTROL 0xc0

/* The quote: the original IPv4 header (with its options) and the first 8
 * bytes of its payload, enough for the sender to find its socket (RFC 792;
 * TCP checks the sequence number in them). */
#define XNET_ICMP_QUOTE_MAX (60 + 8)

/* icmp_reply: everything of the reply after its Ethernet header, built on
 * the stack and written into the packet in one go. */
struct icmp_reply {
	struct iphdr ip;
	struct icmp_frag_hdr icmp;
	__u8 quote[XNET_ICMP_QUOTE_MAX];
};

/*
 * icmp_frag_needed rewrites the IPv4 packet in skb (Ethernet at skb->data)
 * into an ICMP "fragmentation needed" for its sender with the given next-hop
 * MTU, addressed from src (network order) and sent back to the Ethernet
 * address it came from. The caller redirects it. Returns -1 if a helper
 * refused, the packet is then unusable.
 */
static __always_inline int icmp_frag_needed(struct __sk_buff *skb, __u32 src, __u16 mtu)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct icmp_reply r = {};
	__u8 macs[2 * ETH_ALEN];
	__u32 quote_len, sum;

	/* The caller parsed these headers, but a pointer that comes through
	 * another function is new to the verifier: check again. */
	if ((void *)(ip + 1) > data_end)
		return -1;
	/* ihl is 4 bits: the quote is 28 to 68 bytes, a multiple of 4 as
	 * bpf_csum_diff wants, and always inside a packet too big to send. */
	quote_len = ip->ihl * 4 + 8;
	if (quote_len < sizeof(struct iphdr) + 8 || quote_len > XNET_ICMP_QUOTE_MAX)
		return -1;

	mac_copy(macs, eth->h_source); /* back to the sender */
	mac_copy(macs + ETH_ALEN, eth->h_dest);

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tos = (ip->tos & XNET_IPTOS_TOS_MASK) | XNET_IPTOS_PREC_INTERNETCONTROL;
	r.ip.tot_len = bpf_htons(sizeof(r.ip) + sizeof(r.icmp) + quote_len);
	/* DF and ID 0: an atomic datagram (RFC 6864), and at most 96 bytes
	 * never needs fragmenting. */
	r.ip.frag_off = bpf_htons(IP_DF);
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = src;
	r.ip.daddr = ip->saddr;
	r.ip.check = iph_csum(&r.ip);

	r.icmp.type = XNET_ICMP_DEST_UNREACH;
	r.icmp.code = XNET_ICMP_FRAG_NEEDED;
	r.icmp.mtu = bpf_htons(mtu);
	if (bpf_skb_load_bytes(skb, sizeof(*eth), r.quote, quote_len) < 0)
		return -1;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + quote_len, 0);
	r.icmp.checksum = csum_fold(sum);

	/* Cut the packet to the reply's length. The helper is meant for such
	 * replies: it also unclones the skb and drops its GSO state, so a GSO
	 * packet becomes one plain packet. */
	if (bpf_skb_change_tail(skb, sizeof(*eth) + sizeof(r.ip) + sizeof(r.icmp) + quote_len, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, sizeof(*eth), &r, sizeof(r.ip) + sizeof(r.icmp) + quote_len, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return -1;
	return 0;
}

#endif /* XNET_ICMP_H */
