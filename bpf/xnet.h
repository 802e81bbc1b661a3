/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every struct and constant the BPF programs share with Go. bpf2go turns the
 * types named with -type in gen.go into Go types (package bpf), so the Go side
 * reads and writes the maps through the same layout by construction: change a
 * struct here, run `make generate`, and the loader notices that pinned maps
 * of the old layout no longer fit (loader.layoutOf compares BTF) and replaces
 * them.
 *
 * Byte order: IPv4 addresses are byte arrays in wire order (ipv4_addr), so
 * `bpftool map dump` prints them as [10,244,77,0] rather than as a number
 * whose digits depend on the CPU's byte order; the programs read them as one
 * network-order word (ip4_word). Ports and other numbers the programs only do
 * arithmetic with are in host order. Each field says which.
 */
#ifndef XNET_H
#define XNET_H

#include <linux/types.h>

#define XNET_ETH_ALEN 6

/* ipv4_addr: an IPv4 address as it travels on the wire. Every ipv4_addr sits
 * at a 4-byte aligned offset (the aligned attribute keeps it so), so the
 * programs may load it as one __u32 in network order. It is also the key type
 * of the peers and endpoints maps, and a named type, so the loader notices
 * when a pinned map's key used to be something else. */
typedef __u8 ipv4_addr[4] __attribute__((aligned(4)));

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

/* verdict: what the datapath did with one packet; the index of the counters
 * map. Append new reasons before VERDICT_MAX: the values are part of the map
 * layout (xnetd status prints them by name). */
enum verdict {
	VERDICT_ENCAP = 0,          /* encapsulated and sent to a peer */
	VERDICT_DECAP,              /* decapsulated and delivered */
	VERDICT_PASS,               /* not overlay traffic: left untouched */
	VERDICT_DROP_MALFORMED,     /* VXLAN for us, but the inner frame is truncated or bad */
	VERDICT_DROP_INNER_NOT_IPV4,/* VXLAN for us carrying something else than IPv4 */
	VERDICT_DROP_BAD_VTEP_MAC,  /* inner destination MAC is not our VTEP MAC */
	VERDICT_DROP_NOT_LOCAL,     /* inner destination is outside our subnet */
	VERDICT_DROP_UNKNOWN_SOURCE,/* inner source is in no peer's subnet */
	VERDICT_DROP_SPOOFED,       /* outer source is not the PublicIP of the inner source's lease */
	VERDICT_DROP_NO_ROUTE,      /* host traffic for the overlay with no peer owning the destination */
	VERDICT_DROP_TOO_BIG,       /* inner packet does not fit the underlay MTU once encapsulated */
	VERDICT_DROP_NO_NEXTHOP,    /* the underlay has no route to the peer */
	VERDICT_DROP_HELPER,        /* a kernel helper refused (adjust room, redirect) */
	VERDICT_DROP_NO_CONFIG,     /* the datapath is attached but not configured yet */
	VERDICT_MAX,
};

/* route_key: key of the routes LPM trie (a peer's subnet). */
struct route_key {
	__u32 prefixlen; /* host order, as the LPM trie wants it */
	ipv4_addr addr;
};

/* route: where a remote subnet lives. */
struct route {
	ipv4_addr remote_ip;              /* peer PublicIP: outer destination */
	__u8 vtep_mac[XNET_ETH_ALEN];     /* peer VTEP MAC from its lease: inner destination MAC */
	__u16 pad;
};

/* peer_stats: per-peer traffic (per CPU), keyed by the peer's PublicIP. */
struct peer_stats {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
};

/* counter: packets and bytes of one verdict (per CPU). */
struct counter {
	__u64 packets;
	__u64 bytes;
};

/* endpoint: a local container, learned by the encap program from what the
 * container sends (so the decap can hand packets straight to it). */
struct endpoint {
	__u32 ifindex;                /* host side of the container's veth */
	__u8 mac[XNET_ETH_ALEN];      /* the container's MAC */
	__u8 gw_mac[XNET_ETH_ALEN];   /* the MAC the container sends to (docker0) */
	__u16 pad;
};

/* nexthop: the underlay next hop towards a peer, as bpf_fib_lookup found it,
 * kept for a moment so encap does not walk the FIB for every packet. */
struct nexthop {
	__u32 ifindex;              /* underlay NIC to send from */
	__u8 dmac[XNET_ETH_ALEN];   /* next hop's MAC (the peer's, on one L2 segment) */
	__u8 smac[XNET_ETH_ALEN];   /* our NIC's MAC */
	__u64 expires;              /* jiffies: look the FIB up again after this */
};

/* How long a nexthop entry is trusted: 256 jiffies, a quarter second to a
 * second depending on CONFIG_HZ. A changed neighbour MAC or route is picked up
 * within that time. */
#define XNET_NEXTHOP_TTL_JIFFIES 256

/* host_config: this host, written by the Go side; entry 0 of the config map. */
struct host_config {
	ipv4_addr local_ip;    /* underlay address: outer source, accepted outer destination */
	ipv4_addr subnet_addr; /* our lease */
	ipv4_addr subnet_mask;
	__u32 vni;           /* host order */
	__u32 underlay_ifindex;
	__u32 host_ifindex;  /* xnet0: host-bound and not-yet-learned traffic is delivered into it; 0 = pass to the stack */
	__u16 port;          /* VXLAN UDP port, host order */
	__u16 underlay_mtu;  /* host order */
	__u8 vtep_mac[XNET_ETH_ALEN];      /* our VTEP MAC (also xnet0's MAC) */
	__u8 underlay_mac[XNET_ETH_ALEN];  /* the underlay NIC's MAC */
};

#endif /* XNET_H */
