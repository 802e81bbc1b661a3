// Package testpkt builds the frames the datapath tests feed to the BPF programs and inject on
// the wire: Ethernet, IPv4 (with options, fragments), UDP, TCP and VXLAN, with correct
// checksums. It exists for tests only; the datapath itself never builds packets in Go.
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

// IP protocols used by the tests.
const (
	ProtoTCP = 6
	ProtoUDP = 17
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

// TCP returns a minimal TCP segment (ACK|PSH) with its checksum over the pseudo header.
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

func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	s, d := src.As4(), dst.As4()
	var sum uint32
	sum += uint32(s[0])<<8 | uint32(s[1])
	sum += uint32(s[2])<<8 | uint32(s[3])
	sum += uint32(d[0])<<8 | uint32(d[1])
	sum += uint32(d[2])<<8 | uint32(d[3])
	sum += uint32(proto)
	sum += uint32(length)
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
