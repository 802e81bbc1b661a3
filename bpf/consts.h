/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every constant of the datapath: sizes and ranges of the wire format, the
 * verdict enum (shared with Go: bpf2go generates XnetVerdict from it), and the
 * kernel flags the programs pass to helpers, with fallbacks for what the
 * build machine's uapi headers (Debian's 6.1) lack.
 */
#ifndef XNET_CONSTS_H
#define XNET_CONSTS_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#define XNET_ETH_ALEN 6

/* What VXLAN adds in front of an inner IPv4 packet: outer IPv4 (20, no
 * options), UDP (8), VXLAN (8), inner Ethernet (14). backend.VXLANOverhead is
 * the same number on the Go side; a test checks they agree. */
#define XNET_VXLAN_OVERHEAD 50

/* Source ports of the outer UDP header come from a hash of the inner flow and
 * stay inside Linux's default ephemeral range, as the kernel's vxlan does. */
#define XNET_SRC_PORT_MIN 32768
#define XNET_SRC_PORT_MAX 60999

/* The XDP program leaves this word in the packet metadata of a frame it has
 * validated and stripped, so the TC program on the same NIC delivers it
 * without parsing it again. A frame from the wire cannot carry metadata. */
#define XNET_META_DECAPPED 0x786e6574 /* "xnet" */

/* How long a nexthop entry is trusted: 256 jiffies, a quarter second to a
 * second depending on CONFIG_HZ. A changed neighbour MAC or route is picked up
 * within that time. */
#define XNET_NEXTHOP_TTL_JIFFIES 256

/* verdict: what the datapath did with one packet; the index of the counters
 * map. Append new reasons before VERDICT_MAX: the values are part of the map
 * layout (xnetd status prints them by name). */
enum verdict {
	VERDICT_ENCAP = 0,          /* encapsulated and sent to a peer */
	VERDICT_DECAP,              /* decapsulated and delivered */
	VERDICT_PASS,               /* not overlay traffic: left untouched */
	VERDICT_DROP_MALFORMED,     /* VXLAN for us, but the inner frame is truncated or bad */
	VERDICT_DROP_INNER_NOT_IPV4,/* VXLAN for us carrying something else than IPv4 (or IPv6, in a dual-stack overlay) */
	VERDICT_DROP_BAD_VTEP_MAC,  /* inner destination MAC is not our VTEP MAC */
	VERDICT_DROP_NOT_LOCAL,     /* inner destination is outside our subnet */
	VERDICT_DROP_UNKNOWN_SOURCE,/* inner source is in no peer's subnet */
	VERDICT_DROP_SPOOFED,       /* outer source is not the PublicIP of the inner source's lease */
	VERDICT_DROP_NO_ROUTE,      /* host traffic for the overlay with no peer owning the destination */
	VERDICT_DROP_TOO_BIG,       /* inner packet does not fit the underlay MTU once encapsulated */
	VERDICT_DROP_NO_NEXTHOP,    /* the underlay has no route to the peer */
	VERDICT_DROP_HELPER,        /* a kernel helper refused (adjust room, redirect) */
	VERDICT_DROP_NO_CONFIG,     /* the datapath is attached but not configured yet */
	VERDICT_DROP_BAD_SOURCE,    /* a container sent from an address another live veth holds, or from a non-unicast MAC */
	VERDICT_DROP_CE_NOT_ECT,    /* outer ECN CE on an inner packet that is not ECN-capable (RFC 6040 drops it) */
	VERDICT_DROP_GRO_MERGED,    /* several VXLAN datagrams merged into one skb by UDP GRO on the underlay */
	VERDICT_ICMP_FRAG_NEEDED,   /* too big for the underlay once encapsulated, DF set: answered with ICMP fragmentation needed */
	VERDICT_PASS_TOO_BIG,       /* too big for the underlay once encapsulated, DF clear: left to the kernel to fragment */
	VERDICT_DIRECT_OUT,         /* sent plain (no VXLAN) to a peer on our L2 segment (DirectRouting) */
	VERDICT_DIRECT_IN,          /* a plain routed packet from a peer on our segment, its L2 source checked, delivered */
	VERDICT_PASS_UNVERIFIED,    /* a plain routed packet from a segment peer's subnet whose L2 source cannot be checked (its neighbour entry is not resolved): left to the stack */
	VERDICT_DROP_DIRECT_SPOOFED,/* a plain routed packet from a peer's subnet not sent by that peer: another L2 neighbour sent it, or the peer is not on our segment (it sends VXLAN) */
	VERDICT_ICMP_PACKET_TOO_BIG,/* an IPv6 packet too big for the underlay once encapsulated: answered with ICMPv6 Packet Too Big */
	VERDICT_DROP_EXT_HEADERS,   /* an IPv6 packet whose extension headers had to be walked but are cut short or more than XNET_IPV6_MAX_EXT_HDRS */
	VERDICT_BRIDGE_TO_VETH,     /* an overlay packet the host forwarded from xnet0 into a container bridge, handed to the container's veth instead of the bridge's transmit (deliver_bridge) */
	VERDICT_DROP_ICMP_RATELIMIT,/* too big for the underlay once encapsulated, and the ICMP error that would answer it is over the rate limit (icmp_ratelimit in maps.h) */
	VERDICT_DROP_WRONG_VNI,     /* VXLAN on the tunnel device (IPv6 underlay) with another VNI than ours */
	VERDICT_MAX,
};

#ifndef AF_INET
#define AF_INET 2
#endif

/* What VXLAN adds in front of an inner packet over the IPv6 underlay: the
 * outer IPv6 header is 40 bytes, not 20. backend.VXLANOverheadV6 on the Go
 * side. */
#define XNET_VXLAN6_OVERHEAD 70

/* icmp_ratelimit: how many ICMP errors (fragmentation needed, Packet Too Big)
 * the encap may send, per CPU: one per XNET_ICMP_INTERVAL_NS on average, up to
 * XNET_ICMP_BURST at once. The kernel's own defaults for its ICMP errors
 * (net.ipv4.icmp_msgs_per_sec = 1000, icmp_msgs_burst = 50). A container that
 * floods oversize packets then costs the host at most that many replies, and
 * one that sends a few gets every answer. An enum so that bpf2go hands the
 * numbers to Go (tests check the budget with them). */
enum icmp_ratelimit {
	XNET_ICMP_BURST = 50,
	XNET_ICMP_INTERVAL_NS = 1000000,
};

#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff
#endif

/* The two ECN bits of the IPv4 TOS byte (RFC 3168). */
#define ECN_MASK 0x3
#define ECN_CE 0x3
#define ECN_ECT0 0x2

/* The I flag of the VXLAN header (RFC 7348): a VNI is present. */
#define VXLAN_FLAG_I bpf_htonl(0x08000000)

/* TC_ACT_UNSPEC is TCX_NEXT under TCX and "continue" for cls_bpf: traffic that
 * is not ours goes on to the next program or the stack, untouched. */
#define XNET_TC_PASS TC_ACT_UNSPEC

/* bpf_skb_adjust_room flags of the encap. The ENCAP_* flags mark the skb as
 * UDP-tunnel GSO with the inner headers where they now are, so a large TCP
 * packet stays large and is segmented (with our headers copied in front of
 * every segment) by the NIC or by the stack at the last moment. FIXED_GSO
 * keeps gso_size, the inner MSS: otherwise it shrinks by our 50 bytes on encap
 * (and grows back on decap) and the segments no longer fit the MTU. All of
 * them are in 6.1's uapi enum; the decap needs only FIXED_GSO (both IP
 * versions are 4, so none of 6.3's BPF_F_ADJ_ROOM_DECAP_* flags applies). */
#define XNET_ENCAP_ROOM_FLAGS                                                                                  \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |               \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(XNET_INNER_ETH_LEN))
#define XNET_DECAP_ROOM_FLAGS BPF_F_ADJ_ROOM_FIXED_GSO

/* The inner Ethernet header VXLAN carries in front of the inner IPv4 packet. */
#define XNET_INNER_ETH_LEN 14

/* Decap of an inner IPv6 packet from an IPv4 underlay: the skb's protocol must
 * become IPv6, or the stack behind bpf_redirect_peer (which does not look at
 * the Ethernet header again) hands it to IPv4. 6.3+; Debian's 6.1 uapi lacks
 * it. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif
#define XNET_DECAP6_ROOM_FLAGS (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV6)

/* IPv6 extension headers the datapath walks, where it has to know the upper
 * layer (the L4 header of a GSO packet, whether a too-big packet is an ICMPv6
 * error): at most this many. Linux's own stack sends at most a few; a longer
 * chain in a packet that needs the walk is dropped and counted. */
#define XNET_IPV6_MAX_EXT_HDRS 8

/* The shortest UDP payload that is a VXLAN datagram for us: VXLAN header,
 * inner Ethernet, an inner IPv4 header (an inner IPv6 header is longer).
 * Fewer bytes after an inner packet are padding; more can be another datagram
 * (vxlan_classify). */
#define XNET_MIN_VXLAN_PAYLOAD (8 + 14 + 20)

/* Bytes vxlan_classify may read: outer Ethernet, IPv4 with the longest
 * options, UDP, VXLAN, inner Ethernet and the longer of the inner headers, the
 * fixed IPv6 header (40; IPv4 without options is 20). */
#define XNET_CLASSIFY_BYTES (14 + 60 + 8 + 8 + 14 + 40)

#endif /* XNET_CONSTS_H */
