/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * How much of a VXLAN frame decap_pull (encap.h) makes linear: the headers
 * vxlan_classify reads, to the end of the inner IP header, and not one byte
 * of what follows.
 *
 * Why not a fixed, generous length: bpf_skb_pull_data copies into a new
 * kmalloc'ed head whatever it pulls, and the inner TCP segment keeps that head
 * all the way into the receiving container's socket (bpf_redirect_peer hands
 * over the same skb). A head that holds payload bytes cannot be merged by the
 * receiver's TCP (skb_try_coalesce refuses a locked head with data in it), so
 * every 64 KB segment stays a separate skb in the receive and out-of-order
 * queues, and the sender's original stays "in a host queue" until the reader
 * frees it. Pulling the fixed worst case (XNET_CLASSIFY_BYTES, 144: IPv4
 * options and an inner IPv6 header) put the first 28 payload bytes of every
 * TCP segment with timestamps into the head, and a TCP stream between two
 * containers had 1.8 times the spurious (reordering) retransmits it has with
 * headers only (docs/design.md, Performance). The inner TCP header is left
 * where it is too: the receiver pulls what it needs, and a head of headers
 * only is what a routed packet has.
 */
#ifndef XNET_PULL_H
#define XNET_PULL_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xnet.h"

/* decap_pull_len returns the bytes from the outer Ethernet header to the end
 * of the inner IP header of a frame udp_to_us accepted (an outer IPv4 UDP
 * datagram to our port), at most skb->len. It reads the three header fields
 * that decide it with bpf_skb_load_bytes, which sees the paged part too; when
 * one cannot be read (a runt) it falls back to the fixed worst case, and
 * vxlan_classify judges the frame as before. An inner frame that is neither
 * IPv4 nor IPv6 is dropped by classify after the inner Ethernet header, so
 * that is all it needs. */
static __always_inline __u32 decap_pull_len(struct __sk_buff *skb)
{
	__u32 inner, want = XNET_CLASSIFY_BYTES;
	__u8 outer_vihl, inner_vihl;
	__be16 inner_proto;

	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &outer_vihl, sizeof(outer_vihl)) < 0)
		goto out;
	inner = sizeof(struct ethhdr) + (outer_vihl & 0xf) * 4 + sizeof(struct udphdr) + sizeof(struct vxlanhdr) +
		sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, inner - sizeof(inner_proto), &inner_proto, sizeof(inner_proto)) < 0)
		goto out;
	if (inner_proto == bpf_htons(ETH_P_IPV6)) {
		want = inner + sizeof(struct ipv6hdr);
	} else if (inner_proto == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, inner, &inner_vihl, sizeof(inner_vihl)) < 0)
			goto out;
		/* An ihl below 5 is malformed; classify needs the 20 fixed
		 * bytes to say so. */
		want = inner + ((inner_vihl & 0xf) < 5 ? sizeof(struct iphdr) : (inner_vihl & 0xf) * 4);
	} else {
		want = inner;
	}
out:
	return want < skb->len ? want : skb->len;
}

#endif /* XNET_PULL_H */
