package udp

import (
	"encoding/binary"

	"github.com/xnet-dev/xnet/backend/tunoffload"
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

// completePartialChecksum fills in the TCP or UDP checksum of an IPv4 or IPv6 packet (already
// checked by wire.Decode) if it is a pseudo-header-only partial checksum. It reports whether it
// did. In IPv6 only a TCP or UDP header right after the fixed header is looked at (a kernel
// sender's partial checksums come so).
func completePartialChecksum(pkt []byte) bool {
	var proto byte
	var l4 []byte
	var pseudo uint64
	if pkt[0]>>4 == 6 {
		proto, l4 = pkt[6], pkt[40:]
		pseudo = pseudoHeaderSum6(pkt, len(l4))
	} else {
		if binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 {
			return false // a fragment: its transport header is not (all) here
		}
		proto, l4 = pkt[9], pkt[int(pkt[0]&0x0f)*4:]
		pseudo = tunoffload.PseudoHeaderSum(pkt, len(l4))
	}
	var at int
	switch proto {
	case 6: // TCP
		at = 16
	case 17: // UDP
		at = 6
	default:
		return false
	}
	if len(l4) < at+2 {
		return false
	}
	field := binary.BigEndian.Uint16(l4[at:])
	if field != tunoffload.Fold(pseudo) || (proto == 17 && field == 0) {
		return false
	}
	segment := tunoffload.Sum(l4)
	if tunoffload.Fold(pseudo+segment) == 0xffff {
		return false // it verifies: a real checksum that happens to look partial
	}
	// Complete it: the checksum is the complement of pseudo header + segment with the field
	// taken out (adding ^field subtracts it in ones' complement).
	c := ^tunoffload.Fold(pseudo + segment + uint64(^field))
	if proto == 17 && c == 0 {
		c = 0xffff // UDP sends a computed 0 as 0xffff (0 means "no checksum")
	}
	binary.BigEndian.PutUint16(l4[at:], c)
	return true
}

// pseudoHeaderSum6 is the unfolded sum of the IPv6 pseudo header (RFC 8200, 8.1) for an
// l4Len-byte segment of an IPv6 packet whose next header is the transport's.
func pseudoHeaderSum6(pkt []byte, l4Len int) uint64 {
	return tunoffload.Sum(pkt[8:40]) + uint64(pkt[6]) + uint64(l4Len)
}
