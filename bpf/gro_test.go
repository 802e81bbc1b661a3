package bpf

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// UDP GRO on the underlay NIC (ethtool rx-udp-gro-forwarding, rx-gro-list) merges VXLAN
// datagrams of one flow into one skb when no socket claims the port, as with the ebpf backend:
// the outer IPv4 and UDP lengths then cover all of them, and behind the first inner packet come
// the others, VXLAN header and all. Generic XDP sees such an skb linearised. Delivering it as
// one packet would hand the container the first inner packet and lose the rest, counted as
// decapsulated. (The rows with GSO metadata were dropped before as well, but only because a
// test run leaves gso_type 0, which bpf_skb_adjust_room refuses; a real GRO skb is UDP_L4,
// which it accepts.)
func TestDecapGROMergedDatagrams(t *testing.T) {
	objs := load(t, 1)

	// The UDP payload of a datagram from the peer: VXLAN, inner Ethernet, inner IPv4.
	datagram := func(payload string) []byte {
		f := fromPeer()
		inner := testpkt.IPv4{Src: f.innerSrc, Dst: f.innerDst, Proto: testpkt.ProtoTCP}.
			Packet(testpkt.TCP(f.innerSrc, f.innerDst, 40000, 5201, []byte(payload)))
		return testpkt.VXLAN(vni, testpkt.Eth(localVtep, peerVtep, testpkt.EtherTypeIPv4, inner))
	}
	// frame puts UDP payloads behind one outer Ethernet, IPv4 and UDP header, as GRO leaves
	// them (the lengths of the outer headers cover everything).
	frame := func(payloads ...[]byte) []byte {
		udp := testpkt.UDP(45000, port, bytes.Join(payloads, nil))
		return testpkt.Eth(nicMAC, peerNicMAC, testpkt.EtherTypeIPv4,
			testpkt.IPv4{Src: peerIP, Dst: localIP, Proto: testpkt.ProtoUDP}.Packet(udp))
	}
	one := datagram("first of two")
	two := datagram("second of two")

	for _, c := range []struct {
		name    string
		in      []byte
		gso     skbContext
		verdict XnetVerdict
	}{
		{"two datagrams merged by UDP GRO are refused, not delivered as one",
			frame(one, two), skbContext{GsoSize: uint32(len(one)), GsoSegs: 2}, XnetVerdictVERDICT_DROP_GRO_MERGED},
		{"the same bytes without GSO metadata (generic XDP linearises the skb) are refused too",
			frame(one, two), skbContext{}, XnetVerdictVERDICT_DROP_GRO_MERGED},
		{"a merged datagram of the shortest VXLAN size (an empty inner IPv4 packet) is refused",
			frame(one, emptyInner(t, datagram(""))), skbContext{GsoSize: uint32(len(one)), GsoSegs: 2}, XnetVerdictVERDICT_DROP_GRO_MERGED},
		{"one datagram alone is delivered",
			frame(one), skbContext{}, XnetVerdictVERDICT_DECAP},
		// A test run cannot set gso_type, and bpf_skb_adjust_room refuses a GSO skb that is
		// neither TCP nor UDP_L4: the large tunnel packet goes in without GSO metadata
		// (backend/ebpf's gso_test sends real ones).
		{"a large packet whose inner packet fills the skb is delivered",
			frame(datagram(string(bytes.Repeat([]byte{'x'}, 3000)))), skbContext{}, XnetVerdictVERDICT_DECAP},
		{"bytes after the inner packet too few to be a datagram are padding, delivered for the stack to trim",
			frame(one, make([]byte, 8+14+20-1)), skbContext{}, XnetVerdictVERDICT_DECAP},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := binary.BigEndian.Uint16(c.in[14+2:]); int(got) != len(c.in)-14 {
				t.Fatalf("outer tot_len %d, frame of %d bytes", got, len(c.in))
			}
			before := verdicts(t, objs.Counters)
			ret, out := runCtx(t, objs.DecapTc, c.in, c.gso)
			checkCounted(t, "tc", before, verdicts(t, objs.Counters), c.verdict)
			if c.verdict != XnetVerdictVERDICT_DECAP {
				expectUntouched(t, "tc", ret, tcDrop, out, c.in)
			}
			if objs.DecapXdp == nil {
				return
			}
			before = verdicts(t, objs.Counters)
			ret, out = run(t, objs.DecapXdp, c.in)
			checkCounted(t, "xdp", before, verdicts(t, objs.Counters), c.verdict)
			if c.verdict != XnetVerdictVERDICT_DECAP {
				expectUntouched(t, "xdp", ret, xdpDrop, out, c.in)
			}
		})
	}
}

// emptyInner cuts a datagram's inner IPv4 packet down to its header (tot_len 20, checksum
// fixed).
func emptyInner(t *testing.T, d []byte) []byte {
	t.Helper()
	ip := bytes.Clone(d[8+14 : 8+14+20])
	binary.BigEndian.PutUint16(ip[2:], 20)
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], testpkt.Checksum(ip, 0))
	return append(bytes.Clone(d[:8+14]), ip...)
}
