/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Internet checksum helpers (RFC 1071) for the headers the programs write
 * or change. Only IPv4 header checksums are computed here: the outer UDP
 * checksum is 0 (RFC 7348 allows it over IPv4) and the inner L4 checksums are
 * the sender's business (the IPv4 TOS byte, the only inner field we change, is
 * not in the TCP or UDP pseudo-header).
 */
#ifndef XNET_CSUM_H
#define XNET_CSUM_H

#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

/* csum_fold folds a 32-bit one's-complement sum into the 16-bit checksum. Two
 * rounds: the first carry-add may itself carry once more. */
static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* iph_csum is the checksum of a 20-byte IPv4 header (no options: the only
 * kind the programs build) whose check field is 0: the sum of its ten 16-bit
 * words. The loop is unrolled, so the verifier sees ten fixed loads. */
static __always_inline __u16 iph_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return csum_fold(sum);
}

/* csum_replace2 updates a checksum for one 16-bit word of the data it covers
 * changing from old to new (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). The
 * words are taken as they sit in the packet: one's complement sums do not
 * care about byte order as long as every word is read the same way. */
static __always_inline void csum_replace2(__u16 *check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~*check + (__u16)~old + new;

	*check = csum_fold(sum);
}

#endif /* XNET_CSUM_H */
