package tunoffload

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

var (
	src4 = netip.MustParseAddr("10.244.1.2")
	dst4 = netip.MustParseAddr("10.244.2.2")
	src6 = netip.MustParseAddr("fd00:10:244:1::2")
	dst6 = netip.MustParseAddr("fd00:10:244:2::2")
)

const (
	protoTCP = 6
	protoUDP = 17
)

// timestamps is a TCP header's options as Linux sends them on a stream: NOP, NOP, timestamps.
var timestamps = []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}

// payloadOf returns n bytes that differ from one offset to the next, so a misplaced segment
// shows.
func payloadOf(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// ipHeader returns an IPv4 or IPv6 header for a transport segment of l4Len bytes.
func ipHeader(v6 bool, proto uint8, l4Len int) []byte {
	if v6 {
		h := make([]byte, 40)
		h[0] = 0x60
		binary.BigEndian.PutUint16(h[4:], uint16(l4Len))
		h[6], h[7] = proto, 64
		s, d := src6.As16(), dst6.As16()
		copy(h[8:], s[:])
		copy(h[24:], d[:])
		return h
	}
	p := testpkt.IPv4{Src: src4, Dst: dst4, Proto: proto, ID: 0x1234, Flags: 0x4000}.Packet(make([]byte, l4Len))
	return p[:20]
}

// pseudo is the pseudo header of pkt's transport segment, for verifying its checksum.
func pseudo(pkt []byte, v6 bool) []byte {
	if v6 {
		p := make([]byte, 40)
		copy(p, pkt[8:40])
		binary.BigEndian.PutUint32(p[32:], uint32(len(pkt)-40))
		p[39] = pkt[6]
		return p
	}
	p := make([]byte, 12)
	copy(p, pkt[12:20])
	p[9] = pkt[9]
	binary.BigEndian.PutUint16(p[10:], uint16(len(pkt)-20))
	return p
}

// gsoFrame is what a TUN with offloads reads for a large TCP (or UDP) send: the virtio-net
// header and one packet carrying all of payload, its transport checksum left partial (the
// field holds the pseudo-header sum) as the kernel leaves it.
func gsoFrame(v6 bool, proto uint8, gsoType uint8, gsoSize int, tcpFlags byte, payload []byte) []byte {
	var l4 []byte
	if proto == protoTCP {
		l4 = make([]byte, 20+len(timestamps))
		binary.BigEndian.PutUint16(l4[0:], 40000)
		binary.BigEndian.PutUint16(l4[2:], 5201)
		binary.BigEndian.PutUint32(l4[4:], 0xfffff000) // wraps around within the frame
		binary.BigEndian.PutUint32(l4[8:], 77)
		l4[12] = byte(len(l4)/4) << 4
		l4[13] = tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 1000)
		copy(l4[20:], timestamps)
	} else {
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], 40000)
		binary.BigEndian.PutUint16(l4[2:], 53)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(payload)))
	}
	l4 = append(l4, payload...)
	pkt := append(ipHeader(v6, proto, len(l4)), l4...)
	iphl := 20
	if v6 {
		iphl = 40
	}
	at := TCPChecksumOffset
	if proto == protoUDP {
		at = UDPChecksumOffset
	}
	binary.BigEndian.PutUint16(pkt[iphl+at:], ^testpkt.Checksum(pseudo(pkt, v6), 0))
	h := make([]byte, HdrLen)
	h[0], h[1] = FlagNeedsCsum, gsoType
	binary.NativeEndian.PutUint16(h[2:], uint16(len(pkt))) // as forwarding sets it: not trusted
	binary.NativeEndian.PutUint16(h[4:], uint16(gsoSize))
	binary.NativeEndian.PutUint16(h[6:], uint16(iphl))
	binary.NativeEndian.PutUint16(h[8:], uint16(at))
	return append(h, pkt...)
}

func buffers(n, size int) ([][]byte, []int) {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
	}
	return bufs, make([]int, n)
}

// TestSplitCutsAsTheKernelWould: each packet of a cut GSO frame is a packet the kernel could
// have sent itself - its own lengths, IPv4 ID, TCP sequence number and flags, and checksums
// that verify - and together they carry the payload in order.
func TestSplitCutsAsTheKernelWould(t *testing.T) {
	const offset = 16 // wireguard-go's room for its message header
	cases := []struct {
		name    string
		v6      bool
		proto   uint8
		gsoType uint8
		gsoSize int
		flags   byte
		payLen  int
		segs    int
	}{
		{"TCP over IPv4, last segment shorter", false, protoTCP, GSOTCPv4, 1368, 0x18, 3*1368 + 100, 4},
		{"TCP over IPv4, segments of equal size", false, protoTCP, GSOTCPv4, 1000, 0x18, 5000, 5},
		{"TCP over IPv4 with FIN on the last", false, protoTCP, GSOTCPv4, 1000, 0x19, 2500, 3},
		{"TCP over IPv4 with CWR on the first only", false, protoTCP, GSOTCPv4 | GSOECNBit, 1000, 0x98, 2500, 3},
		{"TCP over IPv4, 64 KB", false, protoTCP, GSOTCPv4, 1368, 0x18, 65535 - 52, 48},
		{"TCP over IPv6", true, protoTCP, GSOTCPv6, 1348, 0x18, 3 * 1348, 3},
		{"UDP over IPv4", false, protoUDP, GSOUDPL4, 1392, 0, 2*1392 + 1, 3},
		{"UDP over IPv6", true, protoUDP, GSOUDPL4, 1372, 0, 3 * 1372, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			payload := payloadOf(c.payLen)
			frame := gsoFrame(c.v6, c.proto, c.gsoType, c.gsoSize, c.flags, payload)
			in := frame[HdrLen:]
			bufs, sizes := buffers(64, offset+MaxPacket)
			n, err := Split(frame, bufs, sizes, offset)
			if err != nil || n != c.segs {
				t.Fatalf("Split = %d, %v; want %d segments", n, err, c.segs)
			}
			iphl := 20
			if c.v6 {
				iphl = 40
			}
			hl := iphl + 8
			if c.proto == protoTCP {
				hl = iphl + 20 + len(timestamps)
			}
			var got []byte
			for i := range n {
				p := bufs[i][offset : offset+sizes[i]]
				last := i == n-1
				if !last && len(p) != hl+c.gsoSize {
					t.Errorf("segment %d: %d bytes, want %d", i, len(p), hl+c.gsoSize)
				}
				if c.v6 {
					if int(binary.BigEndian.Uint16(p[4:])) != len(p)-40 || !bytes.Equal(p[6:40], in[6:40]) {
						t.Errorf("segment %d: IPv6 header % x", i, p[:40])
					}
				} else {
					if int(binary.BigEndian.Uint16(p[2:])) != len(p) || binary.BigEndian.Uint16(p[4:]) != 0x1234+uint16(i) ||
						testpkt.Checksum(p[:20], 0) != 0 || !bytes.Equal(p[6:10], in[6:10]) || !bytes.Equal(p[12:20], in[12:20]) {
						t.Errorf("segment %d: IPv4 header % x", i, p[:20])
					}
				}
				l4 := p[iphl:]
				if testpkt.Checksum(l4, uint32(^testpkt.Checksum(pseudo(p, c.v6), 0))) != 0 {
					t.Errorf("segment %d: transport checksum does not verify", i)
				}
				if c.proto == protoTCP {
					wantSeq := 0xfffff000 + uint32(i*c.gsoSize)
					wantFlags := c.flags
					if !last {
						wantFlags &^= 0x01 | 0x08 // FIN and PSH go with the last segment
					}
					if i > 0 {
						wantFlags &^= 0x80 // CWR with the first
					}
					if binary.BigEndian.Uint32(l4[4:]) != wantSeq || l4[13] != wantFlags || !bytes.Equal(l4[8:12], in[iphl+8:iphl+12]) ||
						!bytes.Equal(l4[20:hl-iphl], timestamps) {
						t.Errorf("segment %d: TCP header % x, want seq %#x flags %#x", i, l4[:hl-iphl], wantSeq, wantFlags)
					}
				} else if int(binary.BigEndian.Uint16(l4[4:])) != len(l4) {
					t.Errorf("segment %d: UDP length %d, want %d", i, binary.BigEndian.Uint16(l4[4:]), len(l4))
				}
				got = append(got, p[hl:]...)
			}
			if !bytes.Equal(got, payload) {
				t.Errorf("the segments carry %d bytes that are not the %d sent", len(got), len(payload))
			}
		})
	}
}

// TestSplitPassesSinglePackets: a packet that is not a GSO packet comes out as it went in,
// its checksum completed when the kernel left it partial.
func TestSplitPassesSinglePackets(t *testing.T) {
	tcp := testpkt.IPv4{Src: src4, Dst: dst4, Proto: protoTCP}.Packet(testpkt.TCP(src4, dst4, 40000, 5201, []byte("hello")))
	partial := append([]byte(nil), tcp...)
	binary.BigEndian.PutUint16(partial[36:], ^testpkt.Checksum(pseudo(partial, false), 0))
	frameOf := func(flags byte, pkt []byte) []byte {
		h := make([]byte, HdrLen)
		h[0] = flags
		binary.NativeEndian.PutUint16(h[6:], 20)
		binary.NativeEndian.PutUint16(h[8:], TCPChecksumOffset)
		return append(h, pkt...)
	}
	for _, c := range []struct {
		name  string
		frame []byte
	}{
		{"complete checksum", frameOf(0, tcp)},
		{"partial checksum", frameOf(FlagNeedsCsum, partial)},
	} {
		t.Run(c.name, func(t *testing.T) {
			bufs, sizes := buffers(4, 2000)
			n, err := Split(c.frame, bufs, sizes, 16)
			if err != nil || n != 1 || !bytes.Equal(bufs[0][16:16+sizes[0]], tcp) {
				t.Errorf("Split = %d, %v: % x\nwant % x", n, err, bufs[0][16:16+sizes[0]], tcp)
			}
		})
	}
}

// TestSplitRefusesWhatItCannotCut: more segments than buffers is wireguard-go's
// ErrTooManySegments, with nothing written; a header that does not describe the packet is
// ErrMalformed.
func TestSplitRefusesWhatItCannotCut(t *testing.T) {
	good := gsoFrame(false, protoTCP, GSOTCPv4, 1000, 0x18, payloadOf(5000))
	bufs, sizes := buffers(4, 2000)
	if n, err := Split(good, bufs, sizes, 16); n != 0 || !errors.Is(err, ErrTooManySegments) || sizes[0] != 0 {
		t.Errorf("5 segments into 4 buffers: %d, %v, sizes %v", n, err, sizes)
	}
	with := func(f func(frame []byte)) []byte {
		frame := append([]byte(nil), good...)
		f(frame)
		return frame
	}
	cases := []struct {
		name  string
		frame []byte
	}{
		{"shorter than the virtio-net header", good[:HdrLen-1]},
		{"GSO size 0", with(func(f []byte) { f[4], f[5] = 0, 0 })},
		{"TCPv6 GSO on an IPv4 packet", with(func(f []byte) { f[1] = GSOTCPv6 })},
		{"unknown GSO type", with(func(f []byte) { f[1] = 3 })},
		{"transport header not where the IPv4 header ends", with(func(f []byte) { f[6] = 24 })},
		{"protocol is not TCP", with(func(f []byte) { f[HdrLen+9] = protoUDP })},
		{"headers only", good[:HdrLen+20+32]},
		{"TCP header length below 20", with(func(f []byte) { f[HdrLen+32] = 4 << 4 })},
		{"single packet larger than the buffer", append(make([]byte, HdrLen), make([]byte, 3000)...)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bufs, sizes := buffers(64, 2000)
			if n, err := Split(c.frame, bufs, sizes, 16); n != 0 || !errors.Is(err, ErrMalformed) {
				t.Errorf("Split = %d, %v; want ErrMalformed", n, err)
			}
		})
	}
}
