package udp

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/xnet-dev/xnet/backend/tunoffload"
	"github.com/xnet-dev/xnet/bpf/testpkt"
)

var (
	csSrc = netip.MustParseAddr("10.244.1.2")
	csDst = netip.MustParseAddr("10.244.2.2")
)

func tcpPacket(payload []byte) []byte {
	return testpkt.IPv4{Src: csSrc, Dst: csDst, Proto: testpkt.ProtoTCP}.Packet(testpkt.TCP(csSrc, csDst, 40000, 5201, payload))
}

// udpWithChecksum is an IPv4/UDP packet with its checksum filled in.
func udpWithChecksum(payload []byte) []byte {
	seg := testpkt.UDP(40000, 53, payload)
	sum := tunoffload.Fold(tunoffload.PseudoHeaderSum([]byte{9: 17, 12: 10, 13: 244, 14: 1, 15: 2, 16: 10, 17: 244, 18: 2, 19: 2}, len(seg)) + tunoffload.Sum(seg))
	c := ^sum
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(seg[6:], c)
	return testpkt.IPv4{Src: csSrc, Dst: csDst, Proto: testpkt.ProtoUDP}.Packet(seg)
}

// partial turns a packet's transport checksum into what CHECKSUM_PARTIAL leaves: the folded
// pseudo-header sum.
func partial(pkt []byte, at int) []byte {
	p := append([]byte(nil), pkt...)
	binary.BigEndian.PutUint16(p[20+at:], tunoffload.Fold(tunoffload.PseudoHeaderSum(p, len(p)-20)))
	return p
}

func TestCompletePartialChecksum(t *testing.T) {
	tcp := tcpPacket([]byte("some payload of odd length"))
	udp := udpWithChecksum(bytes.Repeat([]byte{0xab}, 100))
	frag := func(p []byte) []byte { p = append([]byte(nil), p...); p[6] = 0x20; return p } // MF set
	cases := []struct {
		name string
		in   []byte
		want []byte // nil: unchanged
	}{
		{"partial TCP is completed", partial(tcp, 16), tcp},
		{"partial UDP is completed", partial(udp, 6), udp},
		{"complete TCP is left alone", tcp, nil},
		{"complete UDP is left alone", udp, nil},
		{"UDP without checksum (0) is left alone", testpkt.IPv4{Src: csSrc, Dst: csDst, Proto: testpkt.ProtoUDP}.Packet(testpkt.UDP(1, 2, []byte("x"))), nil},
		{"a corrupt checksum that is not the pseudo-header sum is left for the receiver to reject", func() []byte {
			p := append([]byte(nil), tcp...)
			p[36] ^= 0xff
			return p
		}(), nil},
		{"a fragment is left alone", frag(partial(tcp, 16)), nil},
		{"ICMP is left alone", testpkt.IPv4{Src: csSrc, Dst: csDst, Proto: 1}.Packet(make([]byte, 8)), nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := append([]byte(nil), c.in...)
			changed := completePartialChecksum(got)
			want := c.want
			if want == nil {
				want = c.in
			}
			if changed != (c.want != nil) || !bytes.Equal(got, want) {
				t.Errorf("changed=%v\n got % x\nwant % x", changed, got, want)
			}
		})
	}
}
