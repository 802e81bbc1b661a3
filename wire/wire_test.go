package wire

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/bpf/testpkt"
)

var (
	ourMAC   = MAC{0x0e, 0x78, 198, 18, 0, 11}
	theirMAC = MAC{0x0e, 0x78, 198, 18, 0, 12}
	expect   = Expect{VNI: 1, MAC: ourMAC, MaxInner: 1450}
)

// innerUDP is an IPv4/UDP packet of size bytes from 10.244.2.2 to 10.244.1.2.
func innerUDP(size int) []byte {
	return testpkt.IPv4{
		Src: netip.MustParseAddr("10.244.2.2"), Dst: netip.MustParseAddr("10.244.1.2"), Proto: testpkt.ProtoUDP,
	}.Packet(testpkt.UDP(40000, 53, make([]byte, size-28)))
}

// frame is Encode's header for vni/dst in front of inner.
func frame(vni uint32, dst MAC, inner []byte) []byte {
	b := make([]byte, HeaderLen, HeaderLen+len(inner))
	Encode(b, Header{VNI: vni, Dst: dst, Src: theirMAC})
	return append(b, inner...)
}

// edit returns a copy of b changed by f.
func edit(b []byte, f func([]byte)) []byte {
	c := append([]byte(nil), b...)
	f(c)
	return c
}

func TestEncodeWritesRFC7348HeaderAndInnerEthernet(t *testing.T) {
	b := make([]byte, HeaderLen)
	Encode(b, Header{VNI: 0xabcdef, Dst: ourMAC, Src: theirMAC})
	want := []byte{
		0x08, 0, 0, 0, // flags: I; reserved
		0xab, 0xcd, 0xef, 0, // VNI; reserved
		0x0e, 0x78, 198, 18, 0, 11, // inner dst
		0x0e, 0x78, 198, 18, 0, 12, // inner src
		0x08, 0x00, // IPv4
	}
	if !bytes.Equal(b, want) {
		t.Errorf("Encode = % x\nwant     % x", b, want)
	}
	// The same bytes as the frames the BPF tests build by hand.
	if tp := testpkt.VXLAN(0xabcdef, testpkt.Eth(ourMAC.HardwareAddr(), theirMAC.HardwareAddr(), testpkt.EtherTypeIPv4, nil)); !bytes.Equal(b, tp) {
		t.Errorf("Encode disagrees with testpkt: % x vs % x", b, tp)
	}
}

func TestOverheadIsBackendVXLANOverhead(t *testing.T) {
	if OuterLen+HeaderLen != backend.VXLANOverhead {
		t.Errorf("outer %d + header %d != backend.VXLANOverhead %d", OuterLen, HeaderLen, backend.VXLANOverhead)
	}
}

func TestDecode(t *testing.T) {
	good := frame(1, ourMAC, innerUDP(100))
	cases := []struct {
		name    string
		payload []byte
		want    Problem
	}{
		{"a well-formed frame is accepted", good, OK},
		{"Ethernet padding after the inner packet is cut off", append(append([]byte(nil), good...), 0, 0, 0, 0), OK},
		{"an inner packet of exactly MaxInner is accepted", frame(1, ourMAC, innerUDP(1450)), OK},
		{"empty", nil, NotVXLAN},
		{"shorter than the VXLAN header", good[:7], NotVXLAN},
		{"I flag clear", edit(good, func(b []byte) { b[0] = 0 }), NotVXLAN},
		{"a reserved flag bit set", edit(good, func(b []byte) { b[0] = 0x0c }), NotVXLAN},
		{"GBP's G flag set", edit(good, func(b []byte) { b[0] = 0x88 }), NotVXLAN},
		{"reserved bits after the flags set", edit(good, func(b []byte) { b[3] = 1 }), NotVXLAN},
		{"the reserved byte after the VNI set", edit(good, func(b []byte) { b[7] = 1 }), NotVXLAN},
		{"text", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), NotVXLAN},
		{"another VNI", frame(2, ourMAC, innerUDP(100)), WrongVNI},
		{"VXLAN header only", good[:VXLANHeaderLen], Malformed},
		{"inner Ethernet cut", good[:HeaderLen-1], Malformed},
		{"another VTEP MAC", frame(1, theirMAC, innerUDP(100)), BadVtepMAC},
		{"broadcast MAC", frame(1, MAC{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, innerUDP(100)), BadVtepMAC},
		{"ARP inside", edit(good, func(b []byte) { b[20], b[21] = 0x08, 0x06 }), InnerNotIPv4},
		{"IPv6 inside", edit(good, func(b []byte) { b[20], b[21] = 0x86, 0xdd }), InnerNotIPv4},
		{"no inner IPv4 header", good[:HeaderLen], Malformed},
		{"inner IPv4 header cut", good[:HeaderLen+19], Malformed},
		{"inner version 6 with IPv4 EtherType", edit(good, func(b []byte) { b[HeaderLen] = 0x65 }), Malformed},
		{"inner IHL below 5", edit(good, func(b []byte) { b[HeaderLen] = 0x44 }), Malformed},
		{"inner IHL beyond the packet", edit(good[:HeaderLen+24], func(b []byte) {
			b[HeaderLen] = 0x4f
			binary.BigEndian.PutUint16(b[HeaderLen+2:], 24)
		}), Malformed},
		{"inner total length below the header", edit(good, func(b []byte) { binary.BigEndian.PutUint16(b[HeaderLen+2:], 19) }), Malformed},
		{"truncated: total length beyond the datagram", good[:len(good)-1], Malformed},
		{"an inner packet over MaxInner", frame(1, ourMAC, innerUDP(1451)), Oversized},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, got := Decode(c.payload, expect)
			if got != c.want {
				t.Fatalf("Decode = %v, want %v", got, c.want)
			}
			if got != OK {
				return
			}
			total := int(binary.BigEndian.Uint16(c.payload[HeaderLen+2:]))
			if !bytes.Equal(f.Inner, c.payload[HeaderLen:HeaderLen+total]) {
				t.Errorf("Inner is not the inner packet cut to its total length")
			}
			if f.Dst != ourMAC || f.Src != theirMAC || f.VNI != 1 {
				t.Errorf("header %+v", f.Header)
			}
			if netip.AddrFrom4(f.InnerSrc) != netip.MustParseAddr("10.244.2.2") || netip.AddrFrom4(f.InnerDst) != netip.MustParseAddr("10.244.1.2") {
				t.Errorf("inner addresses %v -> %v", f.InnerSrc, f.InnerDst)
			}
		})
	}
}

func TestDecodeWithoutMaxInnerTakesAnySize(t *testing.T) {
	if _, p := Decode(frame(1, ourMAC, innerUDP(9000)), Expect{VNI: 1, MAC: ourMAC}); p != OK {
		t.Errorf("MaxInner 0: Decode = %v, want ok", p)
	}
}

func TestDecodeDoesNotAllocate(t *testing.T) {
	good := frame(1, ourMAC, innerUDP(100))
	if n := testing.AllocsPerRun(100, func() { _, _ = Decode(good, expect) }); n != 0 {
		t.Errorf("Decode allocates %v times per call", n)
	}
}

func TestProblemNames(t *testing.T) {
	seen := map[string]bool{}
	for p := OK; p < numProblems; p++ {
		n := p.String()
		if n == "" || n == "unknown" || seen[n] {
			t.Errorf("problem %d has name %q", p, n)
		}
		seen[n] = true
	}
	if Problem(200).String() != "unknown" {
		t.Errorf("out of range problem named %q", Problem(200).String())
	}
}

// FuzzDecode holds Decode to never reading out of bounds and to its contract on what it
// accepts. `go test` runs the seeds; `go test -fuzz FuzzDecode ./wire` explores.
func FuzzDecode(f *testing.F) {
	good := frame(1, ourMAC, innerUDP(100))
	f.Add(good)
	f.Add(good[:HeaderLen+20])
	f.Add(frame(2, ourMAC, innerUDP(60)))
	f.Add(frame(1, theirMAC, innerUDP(60)))
	f.Add(frame(1, ourMAC, innerUDP(1451)))
	f.Add(edit(good, func(b []byte) { b[HeaderLen] = 0x4f }))
	f.Add([]byte{0x08})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, payload []byte) {
		fr, p := Decode(payload, expect)
		if p >= numProblems {
			t.Fatalf("unknown problem %d", p)
		}
		if p != OK {
			return
		}
		if len(payload) < HeaderLen+IPv4HeaderLen || binary.BigEndian.Uint32(payload[0:4]) != FlagVNI<<24 || payload[7] != 0 ||
			fr.VNI != expect.VNI || fr.Dst != expect.MAC {
			t.Fatalf("accepted a frame that breaks a header rule: % x", payload)
		}
		if len(fr.Inner) < IPv4HeaderLen || len(fr.Inner) > expect.MaxInner || int(binary.BigEndian.Uint16(fr.Inner[2:4])) != len(fr.Inner) {
			t.Fatalf("Inner of %d bytes does not match its total length field", len(fr.Inner))
		}
		if &fr.Inner[0] != &payload[HeaderLen] {
			t.Fatalf("Inner is not a sub-slice of the datagram")
		}
		// What we accept we can write back byte for byte.
		again := make([]byte, HeaderLen, HeaderLen+len(fr.Inner))
		Encode(again, fr.Header)
		again = append(again, fr.Inner...)
		if fr2, p2 := Decode(again, expect); p2 != OK || fr2.Header != fr.Header || !bytes.Equal(fr2.Inner, fr.Inner) {
			t.Fatalf("re-encoded frame decodes as %v %+v", p2, fr2.Header)
		}
	})
}

// innerUDP6 is an IPv6/UDP packet of size bytes from fd00:10:244:2::2 to fd00:10:244:1::2
// (the UDP checksum is left 0: Decode does not look at it).
func innerUDP6(size int) []byte {
	p := make([]byte, size)
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(size-IPv6HeaderLen))
	p[6], p[7] = 17, 64
	src, dst := netip.MustParseAddr("fd00:10:244:2::2").As16(), netip.MustParseAddr("fd00:10:244:1::2").As16()
	copy(p[8:24], src[:])
	copy(p[24:40], dst[:])
	binary.BigEndian.PutUint16(p[40:], 40000)
	binary.BigEndian.PutUint16(p[42:], 53)
	binary.BigEndian.PutUint16(p[44:], uint16(size-IPv6HeaderLen))
	return p
}

// frame6 is Encode's header with EtherType IPv6 in front of inner.
func frame6(inner []byte) []byte {
	b := make([]byte, HeaderLen, HeaderLen+len(inner))
	Encode(b, Header{VNI: 1, Dst: ourMAC, Src: theirMAC, EtherType: EtherTypeIPv6})
	return append(b, inner...)
}

func TestDecodeIPv6(t *testing.T) {
	dual := expect
	dual.IPv6 = true
	good := frame6(innerUDP6(100))
	if et := binary.BigEndian.Uint16(good[20:22]); et != 0x86dd {
		t.Fatalf("Encode wrote EtherType %#x, want 0x86dd", et)
	}
	cases := []struct {
		name    string
		payload []byte
		expect  Expect
		want    Problem
	}{
		{"a well-formed IPv6 frame in a dual-stack overlay", good, dual, OK},
		{"Ethernet padding after the IPv6 packet is cut off", append(append([]byte(nil), good...), 0, 0, 0, 0), dual, OK},
		{"an IPv6 packet of exactly MaxInner", frame6(innerUDP6(1450)), dual, OK},
		{"IPv6 in an IPv4-only overlay", good, expect, InnerNotIPv4},
		{"an IPv4 packet still decodes in a dual-stack overlay", frame(1, ourMAC, innerUDP(100)), dual, OK},
		{"IPv6 header cut", good[:HeaderLen+39], dual, Malformed},
		{"version 4 with the IPv6 EtherType", edit(good, func(b []byte) { b[HeaderLen] = 0x45 }), dual, Malformed},
		{"payload length 0 (a jumbogram)", edit(good, func(b []byte) { b[HeaderLen+4], b[HeaderLen+5] = 0, 0 }), dual, Malformed},
		{"truncated: payload beyond the datagram", good[:len(good)-1], dual, Malformed},
		{"an IPv6 packet over MaxInner", frame6(innerUDP6(1451)), dual, Oversized},
		{"another VTEP MAC", edit(good, func(b []byte) { b[13] ^= 1 }), dual, BadVtepMAC},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, got := Decode(c.payload, c.expect)
			if got != c.want {
				t.Fatalf("Decode = %v, want %v", got, c.want)
			}
			if got != OK || !f.IsIPv6() {
				return
			}
			total := IPv6HeaderLen + int(binary.BigEndian.Uint16(c.payload[HeaderLen+4:]))
			if !bytes.Equal(f.Inner, c.payload[HeaderLen:HeaderLen+total]) {
				t.Errorf("Inner is not the inner packet cut to its length")
			}
			if netip.AddrFrom16(f.InnerSrc6) != netip.MustParseAddr("fd00:10:244:2::2") || netip.AddrFrom16(f.InnerDst6) != netip.MustParseAddr("fd00:10:244:1::2") {
				t.Errorf("inner addresses %v -> %v", f.InnerSrc6, f.InnerDst6)
			}
		})
	}
}

// FuzzDecodeIPv6 is FuzzDecode in a dual-stack overlay.
func FuzzDecodeIPv6(f *testing.F) {
	dual := expect
	dual.IPv6 = true
	good := frame6(innerUDP6(100))
	f.Add(good)
	f.Add(good[:HeaderLen+40])
	f.Add(frame(1, ourMAC, innerUDP(100)))
	f.Add(edit(good, func(b []byte) { b[HeaderLen+4] = 0xff }))
	f.Fuzz(func(t *testing.T, payload []byte) {
		fr, p := Decode(payload, dual)
		if p != OK {
			return
		}
		if !fr.IsIPv6() {
			if _, p4 := Decode(payload, expect); p4 != OK {
				t.Fatalf("an IPv4 frame the IPv4-only decode refuses (%v)", p4)
			}
			return
		}
		if len(fr.Inner) < IPv6HeaderLen+1 || len(fr.Inner) > dual.MaxInner || fr.Inner[0]>>4 != 6 ||
			IPv6HeaderLen+int(binary.BigEndian.Uint16(fr.Inner[4:6])) != len(fr.Inner) || &fr.Inner[0] != &payload[HeaderLen] {
			t.Fatalf("Inner of %d bytes does not match its payload length", len(fr.Inner))
		}
		if _, p4 := Decode(payload, expect); p4 != InnerNotIPv4 {
			t.Fatalf("IPv6 without Expect.IPv6: %v, want inner_not_ipv4", p4)
		}
	})
}
