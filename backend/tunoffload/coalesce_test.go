package tunoffload

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// segment is one TCP segment of the stream 10.244.1.2:40000 -> 10.244.2.2:5201 with the
// timestamps option, its checksum filled in.
func segment(seq uint32, flags byte, payload []byte) []byte {
	return segmentFrom(40000, seq, flags, payload)
}

func segmentFrom(srcPort uint16, seq uint32, flags byte, payload []byte) []byte {
	tcp := make([]byte, 20+len(timestamps), 20+len(timestamps)+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], srcPort)
	binary.BigEndian.PutUint16(tcp[2:], 5201)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], 77)
	tcp[12] = byte(len(tcp)/4) << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 1000)
	copy(tcp[20:], timestamps)
	tcp = append(tcp, payload...)
	pkt := testpkt.IPv4{Src: src4, Dst: dst4, Proto: protoTCP, Flags: 0x4000}.Packet(tcp)
	binary.BigEndian.PutUint16(pkt[36:], testpkt.Checksum(pkt[20:], uint32(^testpkt.Checksum(pseudo(pkt, false), 0))))
	return pkt
}

// writes runs packets through a Coalescer writing to one end of a SOCK_SEQPACKET pair (which
// keeps each writev one message) and returns the messages: what a TUN would have been given.
func writes(t *testing.T, verify bool, pkts ...[]byte) [][]byte {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	w, r := os.NewFile(uintptr(fds[0]), "w"), os.NewFile(uintptr(fds[1]), "r")
	defer w.Close()
	defer r.Close()
	rc, err := w.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c := NewCoalescer(rc, true, verify)
	for _, p := range pkts {
		c.Add(p)
	}
	c.Flush()
	if n, err := c.TakeErrors(); n > 0 {
		t.Fatalf("%d writes failed: %v", n, err)
	}
	var out [][]byte
	for {
		b := make([]byte, 2*MaxPacket)
		n, err := unix.Read(fds[1], b)
		if err == unix.EAGAIN {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b[:n])
	}
}

// TestCoalescerMergesARunOfOneFlow: consecutive segments of one flow leave as one TSO packet
// the kernel accepts (virtio-net header, one IPv4/TCP header with the whole length, the
// checksum left partial over it, PSH if the last had it), and what may not join is written as
// it came, in order.
func TestCoalescerMergesARunOfOneFlow(t *testing.T) {
	p1, p2, p3 := payloadOf(1368), payloadOf(1368 + 7)[7:], payloadOf(500)
	s1 := segment(1000, 0x10, p1)
	s2 := segment(1000+1368, 0x10, p2)
	s3 := segment(1000+2*1368, 0x18, p3) // shorter, with PSH: the last of a send

	out := writes(t, true, s1, s2, s3)
	if len(out) != 1 {
		t.Fatalf("%d writes, want 1", len(out))
	}
	m := out[0]
	h, pkt := m[:HdrLen], m[HdrLen:]
	hl := 20 + 20 + len(timestamps)
	if h[0] != FlagNeedsCsum || h[1] != GSOTCPv4 || binary.NativeEndian.Uint16(h[2:]) != uint16(hl) ||
		binary.NativeEndian.Uint16(h[4:]) != 1368 || binary.NativeEndian.Uint16(h[6:]) != 20 || binary.NativeEndian.Uint16(h[8:]) != TCPChecksumOffset {
		t.Errorf("virtio-net header % x", h)
	}
	want := append(append(append([]byte(nil), s1[hl:]...), s2[hl:]...), s3[hl:]...)
	if int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) || len(pkt) != hl+len(want) || testpkt.Checksum(pkt[:20], 0) != 0 ||
		!bytes.Equal(pkt[hl:], want) {
		t.Errorf("merged packet: length %d (field %d), want %d", len(pkt), binary.BigEndian.Uint16(pkt[2:]), hl+len(want))
	}
	if pkt[33] != 0x18 || binary.BigEndian.Uint32(pkt[24:]) != 1000 {
		t.Errorf("merged TCP header % x: want the first's sequence number and PSH from the last", pkt[20:hl])
	}
	if got, wantSum := binary.BigEndian.Uint16(pkt[36:]), ^testpkt.Checksum(pseudo(pkt, false), 0); got != wantSum {
		t.Errorf("checksum field %#04x, want the pseudo-header sum %#04x", got, wantSum)
	}

	// What may not join is written as it came (behind a zero virtio-net header), in order.
	corrupt := append([]byte(nil), s2...)
	corrupt[len(corrupt)-1] ^= 0xff
	gap := segment(1000+2*1368+1, 0x10, p1)
	ack := segment(5000, 0x10, nil)
	syn := segment(1000+1368, 0x12, p1)
	other := segmentFrom(40001, 1000+1368, 0x10, p1)
	udp := testpkt.IPv4{Src: src4, Dst: dst4, Proto: protoUDP}.Packet(testpkt.UDP(1, 2, []byte("x")))
	cases := []struct {
		name   string
		verify bool
		in     [][]byte
		want   []int // segments per write
	}{
		{"a run of three", true, [][]byte{s1, s2, s3}, []int{3}},
		{"a corrupt segment stays alone when verifying", true, [][]byte{s1, corrupt, s3}, []int{1, 1, 1}},
		{"a corrupt segment joins when the caller vouches for the data", false, [][]byte{s1, corrupt}, []int{2}},
		{"a gap in the sequence", true, [][]byte{s1, gap}, []int{1, 1}},
		{"a pure ACK between", true, [][]byte{s1, ack, s2}, []int{1, 1, 1}},
		{"a SYN does not join", true, [][]byte{s1, syn}, []int{1, 1}},
		{"another flow", true, [][]byte{s1, other}, []int{1, 1}},
		{"PSH ends the run", true, [][]byte{segment(1000, 0x18, p1), s2}, []int{1, 1}},
		{"a shorter segment ends the run", true, [][]byte{s1, segment(1000+1368, 0x10, p3), segment(1000+1368+500, 0x10, p3)}, []int{2, 1}},
		{"not TCP", true, [][]byte{s1, udp, s2}, []int{1, 1, 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := writes(t, c.verify, c.in...)
			if len(out) != len(c.want) {
				t.Fatalf("%d writes, want %d", len(out), len(c.want))
			}
			k := 0
			for i, m := range out {
				if c.want[i] == 1 {
					if !bytes.Equal(m[:HdrLen], zeroVirtioHdr[:]) || !bytes.Equal(m[HdrLen:], c.in[k]) {
						t.Errorf("write %d is not packet %d as it came", i, k)
					}
				} else if m[1] != GSOTCPv4 {
					t.Errorf("write %d is not a TSO packet", i)
				}
				k += c.want[i]
			}
		})
	}
}
