// Package testpkt builds the frames the datapath tests feed to the BPF programs and inject on
// the wire: Ethernet, IPv4 (with options, fragments), IPv6 (with extension headers), UDP, TCP,
// ICMPv6 and VXLAN, with correct checksums. It exists for tests only; the datapath itself never builds packets in Go.
package testpkt

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// Ethernet types used by the tests.
const (
	EtherTypeIPv4 = 0x0800
	EtherTypeARP  = 0x0806
	EtherTypeIPv6 = 0x86dd
)

// IP protocols (and IPv6 next headers) used by the tests.
const (
	ProtoHopOpts  = 0
	ProtoTCP      = 6
	ProtoUDP      = 17
	ProtoRouting  = 43
	ProtoFragment = 44
	ProtoICMPv6   = 58
	ProtoNoNext   = 59
	ProtoDstOpts  = 60
)

// Eth returns an Ethernet header followed by payload.
func Eth(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	b := make([]byte, 14, 14+len(payload))
	copy(b[0:6], dst)
	copy(b[6:12], src)
	binary.BigEndian.PutUint16(b[12:14], etherType)
	return append(b, payload...)
}

// IPv4 describes an IPv4 header; zero fields get the usual defaults (TTL 64).
type IPv4 struct {
	Src, Dst netip.Addr
	Proto    uint8
	TOS      uint8
	ID       uint16
	Flags    uint16 // the 16-bit flags+fragment offset field (0x2000 = MF, 0x4000 = DF)
	TTL      uint8
	Options  []byte // padded to a multiple of 4 by the caller
}

// Packet returns the header (checksum filled) followed by payload.
func (h IPv4) Packet(payload []byte) []byte {
	hl := 20 + len(h.Options)
	b := make([]byte, hl, hl+len(payload))
	b[0] = 0x40 | byte(hl/4)
	b[1] = h.TOS
	binary.BigEndian.PutUint16(b[2:4], uint16(hl+len(payload)))
	binary.BigEndian.PutUint16(b[4:6], h.ID)
	binary.BigEndian.PutUint16(b[6:8], h.Flags)
	ttl := h.TTL
	if ttl == 0 {
		ttl = 64
	}
	b[8] = ttl
	b[9] = h.Proto
	src, dst := h.Src.As4(), h.Dst.As4()
	copy(b[12:16], src[:])
	copy(b[16:20], dst[:])
	copy(b[20:], h.Options)
	binary.BigEndian.PutUint16(b[10:12], Checksum(b[:hl], 0))
	return append(b, payload...)
}

// UDP returns a UDP header with checksum 0 (allowed for IPv4) followed by payload.
func UDP(srcPort, dstPort uint16, payload []byte) []byte {
	b := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:2], srcPort)
	binary.BigEndian.PutUint16(b[2:4], dstPort)
	binary.BigEndian.PutUint16(b[4:6], uint16(8+len(payload)))
	return append(b, payload...)
}

// IPv6 describes a fixed IPv6 header; zero fields get the usual defaults (hop limit 64).
type IPv6 struct {
	Src, Dst     netip.Addr
	NextHeader   uint8 // of the fixed header: the first extension header's type, or the upper layer
	TrafficClass uint8
	FlowLabel    uint32
	HopLimit     uint8
}

// Packet returns the header followed by payload (extension headers, then the upper layer),
// its payload length covering payload.
func (h IPv6) Packet(payload []byte) []byte {
	b := make([]byte, 40, 40+len(payload))
	binary.BigEndian.PutUint32(b[0:4], 6<<28|uint32(h.TrafficClass)<<20|h.FlowLabel&0xfffff)
	binary.BigEndian.PutUint16(b[4:6], uint16(len(payload)))
	b[6] = h.NextHeader
	hl := h.HopLimit
	if hl == 0 {
		hl = 64
	}
	b[7] = hl
	src, dst := h.Src.As16(), h.Dst.As16()
	copy(b[8:24], src[:])
	copy(b[24:40], dst[:])
	return append(b, payload...)
}

// ExtHeader returns an IPv6 options or routing extension header (hop-by-hop, destination
// options, routing: RFC 8200 4.3-4.4) whose next header is next, with body (the bytes after
// the first two, padded with zeroes, which read as Pad1 options, to a multiple of 8 bytes in
// all) followed by rest.
func ExtHeader(next uint8, body, rest []byte) []byte {
	n := (2 + len(body) + 7) / 8 * 8
	b := make([]byte, n, n+len(rest))
	b[0] = next
	b[1] = uint8(n/8 - 1)
	copy(b[2:], body)
	return append(b, rest...)
}

// FragmentHeader returns an IPv6 fragment header (RFC 8200 4.5) whose next header is next,
// at offset (in bytes, a multiple of 8), with the M flag when more follow, then rest.
func FragmentHeader(next uint8, offset int, more bool, id uint32, rest []byte) []byte {
	b := make([]byte, 8, 8+len(rest))
	b[0] = next
	field := uint16(offset/8) << 3
	if more {
		field |= 1
	}
	binary.BigEndian.PutUint16(b[2:4], field)
	binary.BigEndian.PutUint32(b[4:8], id)
	return append(b, rest...)
}

// ICMPv6 returns an ICMPv6 message of type and code with body (everything after the checksum)
// and its checksum over the IPv6 pseudo header of src and dst.
func ICMPv6(src, dst netip.Addr, typ, code uint8, body []byte) []byte {
	b := make([]byte, 4, 4+len(body))
	b[0], b[1] = typ, code
	b = append(b, body...)
	binary.BigEndian.PutUint16(b[2:4], Checksum(b, pseudoSum(src, dst, ProtoICMPv6, len(b))))
	return b
}

// UDPWithChecksum is UDP with its checksum over the pseudo header of src and dst (IPv4 or
// IPv6; over IPv6 the checksum is mandatory).
func UDPWithChecksum(src, dst netip.Addr, srcPort, dstPort uint16, payload []byte) []byte {
	b := UDP(srcPort, dstPort, payload)
	sum := Checksum(b, pseudoSum(src, dst, ProtoUDP, len(b)))
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(b[6:8], sum)
	return b
}

// TCP returns a minimal TCP segment (ACK|PSH) with its checksum over the pseudo header (IPv4
// or IPv6, as src and dst are).
func TCP(src, dst netip.Addr, srcPort, dstPort uint16, payload []byte) []byte {
	b := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(b[0:2], srcPort)
	binary.BigEndian.PutUint16(b[2:4], dstPort)
	binary.BigEndian.PutUint32(b[4:8], 1)
	b[12] = 5 << 4
	b[13] = 0x18
	binary.BigEndian.PutUint16(b[14:16], 65535)
	b = append(b, payload...)
	binary.BigEndian.PutUint16(b[16:18], Checksum(b, pseudoSum(src, dst, ProtoTCP, len(b))))
	return b
}

// VXLAN returns the 8-byte VXLAN header (I flag set) followed by the inner frame.
func VXLAN(vni uint32, inner []byte) []byte {
	b := make([]byte, 8, 8+len(inner))
	b[0] = 0x08
	binary.BigEndian.PutUint32(b[4:8], vni<<8)
	return append(b, inner...)
}

// pseudoSum is the sum of the pseudo header of IPv4 (RFC 793) or IPv6 (RFC 8200 8.1): the
// addresses, the upper-layer protocol and length. The IPv6 length is a 32-bit word, which adds
// up the same as IPv4's 16 bits for every length below 64 KB.
func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	var sum uint32
	for _, a := range [][]byte{src.AsSlice(), dst.AsSlice()} {
		for i := 0; i+1 < len(a); i += 2 {
			sum += uint32(a[i])<<8 | uint32(a[i+1])
		}
	}
	sum += uint32(proto)
	sum += uint32(length>>16) + uint32(length&0xffff)
	return sum
}

// Checksum is the Internet checksum of b, starting from a partial sum.
func Checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = (sum & 0xffff) + sum>>16
	}
	return ^uint16(sum)
}
