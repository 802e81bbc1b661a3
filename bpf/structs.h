/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every struct the maps hold. bpf2go turns the types named with -type in
 * gen.go into Go types (package bpf), so the Go side reads and writes the maps
 * through the same layout by construction: change a struct here, run `make
 * generate`, and the loader notices that pinned maps of the old layout no
 * longer fit (loader.layoutOf compares BTF) and replaces them.
 *
 * Byte order: IPv4 addresses are byte arrays in wire order (ipv4_addr), so
 * `bpftool map dump` prints them as [10,244,77,0] rather than as a number
 * whose digits depend on the CPU's byte order; the programs read them as one
 * network-order word (ip4_word). Ports and other numbers the programs only do
 * arithmetic with are in host order. Each field says which.
 */
#ifndef XNET_STRUCTS_H
#define XNET_STRUCTS_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"

/* ipv4_addr: an IPv4 address as it travels on the wire. Every ipv4_addr sits
 * at a 4-byte aligned offset (the aligned attribute keeps it so), so the
 * programs may load it as one __u32 in network order. It is also the key type
 * of the peers and endpoints maps, and a named type, so the loader notices
 * when a pinned map's key used to be something else. */
typedef __u8 ipv4_addr[4] __attribute__((aligned(4)));

/* ip4_word reads an ipv4_addr as the network-order word the packet headers
 * hold (ipv4_addr is 4-byte aligned, so this is one load). */
static __always_inline __u32 ip4_word(const __u8 *a)
{
	return *(const __u32 *)a;
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, XNET_ETH_ALEN);
}

/* route_key: key of the routes LPM trie (a peer's subnet). */
struct route_key {
	__u32 prefixlen; /* host order, as the LPM trie wants it */
	ipv4_addr addr;
};

/* route: where a remote subnet lives, and how to reach it. */
struct route {
	ipv4_addr remote_ip;              /* peer PublicIP: outer destination, or next hop when direct */
	__u8 vtep_mac[XNET_ETH_ALEN];     /* peer VTEP MAC from its lease: inner destination MAC */
	/* 1: the peer is on our L2 segment and DirectRouting is on: its subnet is routed plain,
	 * via remote_ip, without VXLAN (direct.h); 0: VXLAN. The Go side decides per peer and
	 * decides again when the peer's lease changes. */
	__u8 direct;
	__u8 pad;
};

/* peer_stats: per-peer traffic (per CPU), keyed by the peer's underlay address
 * (underlay_addr): its PublicIP, or in an IPv6-only overlay, where it has
 * none, its PublicIPv6. */
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

/* nexthop: the underlay next hop towards a peer (an IPv4 or IPv6 underlay
 * address), as bpf_fib_lookup found it, kept for a moment so encap and the
 * DirectRouting paths do not walk the FIB for every packet. */
struct nexthop {
	__u32 ifindex;              /* underlay NIC to send from */
	__u8 dmac[XNET_ETH_ALEN];   /* next hop's MAC (the peer's, on one L2 segment) */
	__u8 smac[XNET_ETH_ALEN];   /* our NIC's MAC */
	__u64 expires;              /* jiffies: look the FIB up again after this */
};

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
	/* 1: the config's Backend.DirectRouting. Peers on our segment then send plain routed
	 * packets, and decap_tc checks those (direct.h); with 0 they are the stack's business. */
	__u8 direct_routing;
	/* 1: --host-routing=kernel. Container traffic takes the host's routing and netfilter
	 * both ways: encap_container only learns and passes, and deliver never hands a packet
	 * to a container itself but always into xnet0 (deliver_bridge may only shorten the
	 * last hop, after the host's forwarding). 0: bpf host routing, the fast path. */
	__u8 host_routing_kernel;
	/* 1: an IPv6-only overlay (the config's EnableIPv4 false). The host has no IPv4 lease:
	 * local_ip and the subnet are zero, and every IPv4 path stands aside (encap and learn
	 * pass IPv4, encap_host drops it, decap passes IPv4 VXLAN and plain IPv4 to the stack,
	 * decap_tunnel drops what came over the IPv4 underlay). Only IPv6 crosses, over the IPv6
	 * underlay through xnet6 (underlay6.h). */
	__u8 ipv6_only;
};

/* icmp_bucket: one CPU's ICMP error budget (maps.h icmp_allowed). */
struct icmp_bucket {
	__u64 last_ns;   /* bpf_ktime_get_ns of the last error asked for */
	__u64 credit_ns; /* time credit then, at most XNET_ICMP_BURST * XNET_ICMP_INTERVAL_NS */
};

/* The VXLAN header of RFC 7348 (no uapi header has it): flags (I bit = a VNI
 * is present), 24 reserved bits, the 24-bit VNI, 8 reserved bits. */
struct vxlanhdr {
	__be32 flags;
	__be32 vni;
};

/*
 * IPv6, in a dual-stack overlay (subnetmgr.Config.EnableIPv6). Separate maps
 * and structs rather than wider IPv4 ones: an IPv4-only host keeps the maps
 * and the per-packet work it had, and a dual-stack one adds only what IPv6
 * needs. Inner IPv6 packets cross the same tunnel as IPv4 (one VTEP, one VNI,
 * the IPv4 underlay), so what a route6 points at is the same peer as its
 * IPv4 route; except where both hosts have an IPv6 underlay, as flannel's
 * dual stack has it: then over that, to the peer's IPv6 VTEP (underlay6.h).
 */

/* ipv6_addr: an IPv6 address in wire order; bpftool prints its 16 bytes. Like
 * ipv4_addr it is 4-byte aligned, so the programs compare it as four
 * network-order words (ip6_words). */
typedef __u8 ipv6_addr[16] __attribute__((aligned(4)));

/* ip6_words reads an ipv6_addr (or an in6_addr, which is as aligned) as its
 * four network-order words. */
static __always_inline const __u32 *ip6_words(const void *a)
{
	return (const __u32 *)a;
}

/* ip6_copy copies an IPv6 address between 4-byte aligned places (an
 * ipv6_addr, an in6_addr, the __u32[4] of a helper's struct) word by word. */
static __always_inline void ip6_copy(void *dst, const void *src)
{
	__u32 *d = dst;
	const __u32 *s = ip6_words(src);

	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

static __always_inline int ip6_equal(const void *a, const void *b)
{
	const __u32 *x = ip6_words(a), *y = ip6_words(b);

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* ip6_in_prefix says whether addr lies in the prefix of net and mask. */
static __always_inline int ip6_in_prefix(const void *addr, const void *net, const void *mask)
{
	const __u32 *a = ip6_words(addr), *n = ip6_words(net), *m = ip6_words(mask);

	return (a[0] & m[0]) == n[0] && (a[1] & m[1]) == n[1] && (a[2] & m[2]) == n[2] && (a[3] & m[3]) == n[3];
}

/* underlay_addr: a peer's underlay address, of either family, as the nexthops
 * cache and the peers counters key it: an IPv6 address, or an IPv4 one mapped
 * into IPv6 (::ffff:a.b.c.d, RFC 4291 2.5.5.2). One cache, one lookup and one
 * way to invalidate an entry then serve the VXLAN and DirectRouting peers
 * reached over IPv4 and the DirectRouting peers reached over IPv6; and a peer
 * of an IPv6-only overlay, which has no IPv4 PublicIP, is counted under its
 * PublicIPv6. Wire order, 4-byte aligned as ipv6_addr is. */
typedef __u8 underlay_addr[16] __attribute__((aligned(4)));

/* underlay_addr4 writes the IPv4 address ip (network order) into key, an
 * underlay_addr. */
static __always_inline void underlay_addr4(void *key, __u32 ip)
{
	__u32 *k = key;

	k[0] = 0;
	k[1] = 0;
	k[2] = bpf_htonl(0xffff);
	k[3] = ip;
}

/* route6_key: key of the routes6 LPM trie (a peer's IPv6 subnet). */
struct route6_key {
	__u32 prefixlen; /* host order, as the LPM trie wants it */
	ipv6_addr addr;
};

/* route6: the peer owning a remote IPv6 subnet. */
struct route6 {
	ipv4_addr remote_ip;          /* the peer's PublicIP: outer destination (IPv4 underlay); keys its counters (route6_peer); 0.0.0.0 in an IPv6-only overlay */
	__u8 vtep_mac[XNET_ETH_ALEN]; /* inner destination MAC: the VtepMAC of the peer's BackendV6Data (else BackendData) */
	/* 1: the peer has an IPv6 VTEP (a PublicIPv6 and a BackendV6Data VtepMAC of its own) and so
	 * have we: VXLAN over the IPv6 underlay to remote_ip6, through the tunnel device
	 * (underlay6.h), and vtep_mac is that VTEP's. 0: inside the IPv4 VXLAN to remote_ip. */
	__u8 underlay6;
	/* 1: DirectRouting is on and remote_ip6 (the peer's PublicIPv6) is on our IPv6 segment:
	 * the subnet is routed plain, via remote_ip6, without VXLAN (direct6.h). */
	__u8 direct;
	ipv6_addr remote_ip6;         /* the peer's PublicIPv6 when underlay6 or direct: outer destination (next hop), accepted outer source; keys its counters without a PublicIP */
};

/* host_config6: this host's IPv6 side, entry 0 of the config6 map; written by
 * the Go side in a dual-stack overlay, all zero (IPv6 not ours: it passes
 * untouched, as on an IPv4-only host) otherwise. */
struct host_config6 {
	ipv6_addr subnet_addr; /* our IPv6 lease */
	ipv6_addr subnet_mask;
	/* The container bridge's address in the lease (Docker's --fixed-cidr-v6 puts its gateway
	 * on the first address): the containers' next hop, and the source of the ICMPv6 errors the
	 * encap answers in its place. */
	ipv6_addr gateway;
	/* Our IPv6 underlay address (PublicIPv6), when we receive VXLAN over the IPv6 underlay: the
	 * outer source towards route6s with underlay6. Zero without an IPv6 underlay. */
	ipv6_addr local_ip6;
	/* The metadata-mode vxlan device (xnet6) the encap hands IPv6-underlay packets to; 0: none. */
	__u32 tunnel_ifindex;
	/* Our IPv6 VTEP MAC (xnet6's, published as BackendV6Data's VtepMAC): the inner source MAC
	 * we send, the inner destination MAC we accept over the IPv6 underlay. */
	__u8 vtep_mac6[XNET_ETH_ALEN];
	__u16 pad;
};

#endif /* XNET_STRUCTS_H */
