// Package wire is xnet's VXLAN wire format in Go: the 8-byte VXLAN header of RFC 7348 and the
// inner Ethernet header that follows it, as a UDP socket sees them (the payload of the outer
// UDP datagram), plus the inner IPv4 header checks every decapsulation must make before it
// hands a packet to the host. Encode writes the 22 bytes that go in front of an inner IPv4
// packet; Decode reads them back and says what is wrong when something is. In a dual-stack
// overlay the inner packet may be IPv6 (EtherType 0x86DD, as the kernel's vxlan device and
// flannel send it): Encode writes that EtherType when asked, and Decode accepts it when the
// caller's Expect says so, with the same checks made on the IPv6 header.
//
// It owns the byte layout and the rules that need nothing but the packet and our own identity
// (VNI, VTEP MAC, largest packet we deliver). It does not own the rules that need the set of
// leases (inner source owned by the outer source, inner destination in our subnet): those
// live with the datapath that holds the peers (backend/udp in Go, bpf/parse.h in C, which
// applies the same checks in the same order). It does not build outer IPv4/UDP headers: the
// only Go datapath sends through a UDP socket and the kernel writes them.
//
// Decode never trusts its input: every length is checked before it is read, nothing is
// allocated, and a fuzz target (FuzzDecode) holds it to that.
package wire

import (
	"encoding/binary"
	"net"
)

// Sizes of the headers, in bytes.
const (
	VXLANHeaderLen    = 8
	EthernetHeaderLen = 14
	// HeaderLen is what Encode writes and Decode strips: VXLAN + inner Ethernet, the part of
	// the UDP payload in front of the inner IPv4 packet.
	HeaderLen = VXLANHeaderLen + EthernetHeaderLen
	// OuterLen is the outer IPv4 (no options) + UDP headers the kernel adds to a datagram.
	// OuterLen + HeaderLen is backend.VXLANOverhead (50); a test checks they agree.
	OuterLen = 20 + 8
	// IPv4HeaderLen is the length of an IPv4 header without options.
	IPv4HeaderLen = 20
	// IPv6HeaderLen is the length of the IPv6 header (extension headers follow it).
	IPv6HeaderLen = 40
)

// Protocol constants of the format.
const (
	// FlagVNI is the I flag in the first byte of the VXLAN header: "the VNI field is valid".
	FlagVNI = 0x08
	// MaxVNI is the largest 24-bit VNI.
	MaxVNI = 1<<24 - 1
	// EtherTypeIPv4 is the inner EtherType of IPv4, all an IPv4-only overlay carries.
	EtherTypeIPv4 = 0x0800
	// EtherTypeIPv6 is the inner EtherType of IPv6, in a dual-stack overlay.
	EtherTypeIPv6 = 0x86DD
	// DefaultPort is the outer UDP destination port of Linux and flannel.
	DefaultPort = 8472
	// SourcePortMin and SourcePortMax bound the outer source port: Linux's default ephemeral
	// range, which is also what the kernel's vxlan driver and bpf/xnet.h use.
	SourcePortMin = 32768
	SourcePortMax = 60999
)

// MAC is an Ethernet address as it sits in the packet.
type MAC [6]byte

// MACFrom converts a net.HardwareAddr; ok is false unless it is 6 bytes long.
func MACFrom(hw net.HardwareAddr) (m MAC, ok bool) {
	if len(hw) != 6 {
		return m, false
	}
	copy(m[:], hw)
	return m, true
}

// HardwareAddr returns m as a net.HardwareAddr (a copy).
func (m MAC) HardwareAddr() net.HardwareAddr { return net.HardwareAddr(append([]byte(nil), m[:]...)) }

func (m MAC) String() string { return m.HardwareAddr().String() }

// Header is what Encode writes in front of an inner IPv4 or IPv6 packet.
type Header struct {
	VNI uint32 // 24 bits
	Dst MAC    // the receiver's VTEP MAC (from its lease)
	Src MAC    // the sender's VTEP MAC
	// EtherType is the inner packet's: EtherTypeIPv4, or EtherTypeIPv6 in a dual-stack
	// overlay. Encode writes 0 as EtherTypeIPv4; Decode always sets it.
	EtherType uint16
}

// Encode writes h as the HeaderLen bytes of b[:HeaderLen] (VXLAN header with the I flag, then
// an inner Ethernet header of type IPv4, or h.EtherType). It panics if b is shorter than
// HeaderLen, like binary.BigEndian.PutUint32 does: the caller reserves the room.
func Encode(b []byte, h Header) {
	_ = b[HeaderLen-1] // one bounds check for the whole header
	binary.BigEndian.PutUint32(b[0:4], FlagVNI<<24)
	binary.BigEndian.PutUint32(b[4:8], (h.VNI&MaxVNI)<<8)
	copy(b[8:14], h.Dst[:])
	copy(b[14:20], h.Src[:])
	et := h.EtherType
	if et == 0 {
		et = EtherTypeIPv4
	}
	binary.BigEndian.PutUint16(b[20:22], et)
}

// Problem says why Decode refused a datagram. The zero value, OK, means it did not.
type Problem uint8

// What can be wrong with a datagram, in the order Decode checks. The eBPF decap (bpf/parse.h)
// checks the same things in the same order.
const (
	OK Problem = iota
	// NotVXLAN: shorter than a VXLAN header, or a header the kernel's vxlan (as flannel sets it
	// up) drops: the flags word must be the I flag alone and the byte after the VNI 0. Reserved
	// bits belong to extensions (GBP, GPE, ...) neither side negotiated.
	NotVXLAN
	// WrongVNI: a VXLAN header for another network.
	WrongVNI
	// Malformed: the inner Ethernet or IP header is truncated or inconsistent (version,
	// header length, total or payload length).
	Malformed
	// BadVtepMAC: the inner destination MAC is not ours.
	BadVtepMAC
	// InnerNotIPv4: the inner frame carries something other than IPv4 (or IPv6, where
	// Expect.IPv6 accepts it).
	InnerNotIPv4
	// Oversized: the inner packet is larger than the largest we deliver (the overlay MTU).
	Oversized
	numProblems
)

var problemNames = [numProblems]string{
	OK:           "ok",
	NotVXLAN:     "not_vxlan",
	WrongVNI:     "wrong_vni",
	Malformed:    "malformed",
	BadVtepMAC:   "bad_vtep_mac",
	InnerNotIPv4: "inner_not_ipv4",
	Oversized:    "oversized",
}

// String is the problem's name in counters: lower case with underscores, the names of
// bpf/xnet.h's verdicts without their "VERDICT_DROP_" prefix where both have one.
func (p Problem) String() string {
	if p < numProblems {
		return problemNames[p]
	}
	return "unknown"
}

// Expect is what Decode compares the datagram against: our own identity.
type Expect struct {
	VNI uint32
	MAC MAC // our VTEP MAC
	// MaxInner is the largest inner packet accepted (IPv4 total length, IPv6 header plus
	// payload length), normally the overlay MTU; 0 means no limit beyond what fits in the
	// datagram.
	MaxInner int
	// IPv6 accepts inner IPv6 packets too (a dual-stack overlay); without it they are
	// InnerNotIPv4, as in an IPv4-only overlay.
	IPv6 bool
}

// Frame is a datagram Decode accepted.
type Frame struct {
	Header
	// Inner is the inner IPv4 or IPv6 packet: a sub-slice of the datagram, cut to the
	// packet's length (Ethernet padding after it is dropped).
	Inner []byte
	// InnerSrc and InnerDst are the inner IPv4 addresses, for the lease checks (zero for
	// IPv6).
	InnerSrc, InnerDst [4]byte
	// InnerSrc6 and InnerDst6 are the inner IPv6 addresses (zero for IPv4).
	InnerSrc6, InnerDst6 [16]byte
}

// IsIPv6 says whether the inner packet is IPv6.
func (f *Frame) IsIPv6() bool { return f.EtherType == EtherTypeIPv6 }

// Decode checks one UDP payload against the acceptance rules (docs/design.md, What decapsulation accepts) that need no lease and returns the
// inner packet. It reads only inside payload and never allocates.
func Decode(payload []byte, want Expect) (Frame, Problem) {
	var f Frame
	if len(payload) < VXLANHeaderLen || binary.BigEndian.Uint32(payload[0:4]) != FlagVNI<<24 || payload[7] != 0 {
		return f, NotVXLAN
	}
	f.VNI = binary.BigEndian.Uint32(payload[4:8]) >> 8
	if f.VNI != want.VNI {
		return f, WrongVNI
	}
	if len(payload) < HeaderLen {
		return f, Malformed
	}
	copy(f.Dst[:], payload[8:14])
	copy(f.Src[:], payload[14:20])
	if f.Dst != want.MAC {
		return f, BadVtepMAC
	}
	f.EtherType = binary.BigEndian.Uint16(payload[20:22])
	switch {
	case f.EtherType == EtherTypeIPv6 && want.IPv6:
		return decodeIPv6(payload[HeaderLen:], want, f)
	case f.EtherType != EtherTypeIPv4:
		return f, InnerNotIPv4
	}
	ip := payload[HeaderLen:]
	if len(ip) < IPv4HeaderLen || ip[0]>>4 != 4 {
		return f, Malformed
	}
	// IHL counts 32-bit words and is at least 5; the total length covers the header and must
	// be inside the datagram (a shorter datagram is a truncated packet; a longer one carries
	// padding, which we cut off so the host never sees it).
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ihl < IPv4HeaderLen || total < ihl || total > len(ip) {
		return f, Malformed
	}
	if want.MaxInner > 0 && total > want.MaxInner {
		return f, Oversized
	}
	f.Inner = ip[:total:total]
	copy(f.InnerSrc[:], ip[12:16])
	copy(f.InnerDst[:], ip[16:20])
	return f, OK
}

// decodeIPv6 is Decode's check of an inner IPv6 packet ip. The payload length covers the
// extension headers and must lie inside the datagram; 0 (a jumbogram, or nothing at all) is
// not something a VXLAN peer sends.
func decodeIPv6(ip []byte, want Expect, f Frame) (Frame, Problem) {
	if len(ip) < IPv6HeaderLen || ip[0]>>4 != 6 {
		return f, Malformed
	}
	pl := int(binary.BigEndian.Uint16(ip[4:6]))
	total := IPv6HeaderLen + pl
	if pl == 0 || total > len(ip) {
		return f, Malformed
	}
	if want.MaxInner > 0 && total > want.MaxInner {
		return f, Oversized
	}
	f.Inner = ip[:total:total]
	copy(f.InnerSrc6[:], ip[8:24])
	copy(f.InnerDst6[:], ip[24:40])
	return f, OK
}
