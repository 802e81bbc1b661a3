package udp

import (
	"encoding/binary"
)

// Inner checksums that were never filled in.
//
// A kernel VXLAN sender leaves the inner TCP/UDP checksum to "whoever transmits on the wire"
// (CHECKSUM_PARTIAL: the field holds only the pseudo-header sum). A physical NIC fills it in.
// A veth does not - its peer namespace trusts the skb's flag instead - and a UDP socket hands
// user space the bytes without the flag. So between network namespaces (our test topology,
// hosts that are containers or VMs on veths) a kernel-VXLAN host's inner segments reach us with
// checksums that any receiver would reject (TcpInCsumErrors), while the kernel's own vxlan
// receiver accepts them. We complete such a checksum when the field holds exactly the
// pseudo-header sum and the packet does not already verify: for a checksum filled in by a real
// sender that coincidence has a chance of 1 in 65536, and the packet must then also fail
// verification, which an intact one does not.

// completePartialChecksum fills in the TCP or UDP checksum of an IPv4 packet (already checked by
// wire.Decode) if it is a pseudo-header-only partial checksum. It reports whether it did.
func completePartialChecksum(pkt []byte) bool {
	ihl := int(pkt[0]&0x0f) * 4
	if binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 {
		return false // a fragment: its transport header is not (all) here
	}
	var at int
	switch pkt[9] {
	case 6: // TCP
		at = 16
	case 17: // UDP
		at = 6
	default:
		return false
	}
	l4 := pkt[ihl:]
	if len(l4) < at+2 {
		return false
	}
	field := binary.BigEndian.Uint16(l4[at:])
	pseudo := pseudoHeaderSum(pkt, len(l4))
	if field != fold(pseudo) || (pkt[9] == 17 && field == 0) {
		return false
	}
	segment := onesSum(l4)
	if fold(pseudo+segment) == 0xffff {
		return false // it verifies: a real checksum that happens to look partial
	}
	// Complete it: the checksum is the complement of pseudo header + segment with the field
	// taken out (adding ^field subtracts it in ones' complement).
	c := ^fold(pseudo + segment + uint64(^field))
	if pkt[9] == 17 && c == 0 {
		c = 0xffff // UDP sends a computed 0 as 0xffff (0 means "no checksum")
	}
	binary.BigEndian.PutUint16(l4[at:], c)
	return true
}

// pseudoHeaderSum is the unfolded sum of the IPv4 pseudo header for an l4Len-byte segment.
func pseudoHeaderSum(pkt []byte, l4Len int) uint64 {
	return uint64(binary.BigEndian.Uint16(pkt[12:14])) + uint64(binary.BigEndian.Uint16(pkt[14:16])) +
		uint64(binary.BigEndian.Uint16(pkt[16:18])) + uint64(binary.BigEndian.Uint16(pkt[18:20])) +
		uint64(pkt[9]) + uint64(l4Len)
}

// onesSum is the Internet checksum's sum of b (RFC 1071), unfolded. It adds the 32-bit halves
// of 64-bit words into four independent accumulators: no carry chain between additions, so
// the CPU runs them in parallel (a 32-bit half cannot overflow a 64-bit accumulator before 4 GB).
// In ones' complement arithmetic a 32-bit word's value equals the sum of its two 16-bit halves,
// so this is the same sum as RFC 1071's loop over 16-bit words.
func onesSum(b []byte) uint64 {
	var s0, s1, s2, s3 uint64
	for len(b) >= 32 {
		w0 := binary.BigEndian.Uint64(b[0:8])
		w1 := binary.BigEndian.Uint64(b[8:16])
		w2 := binary.BigEndian.Uint64(b[16:24])
		w3 := binary.BigEndian.Uint64(b[24:32])
		s0 += w0>>32 + w0&0xffffffff
		s1 += w1>>32 + w1&0xffffffff
		s2 += w2>>32 + w2&0xffffffff
		s3 += w3>>32 + w3&0xffffffff
		b = b[32:]
	}
	sum := s0 + s1 + s2 + s3
	for len(b) >= 4 {
		sum += uint64(binary.BigEndian.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		sum += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint64(b[0]) << 8
	}
	return sum
}

// fold reduces an unfolded ones' complement sum to 16 bits.
func fold(sum uint64) uint16 {
	for sum > 0xffff {
		sum = (sum >> 16) + (sum & 0xffff)
	}
	return uint16(sum)
}
