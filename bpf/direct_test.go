package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// The direct-routing fixture, on top of load's: the peer (198.18.0.12, whose MAC the underlay
// namespace knows) is on our segment, so its route is direct; a second segment peer has no
// neighbour entry yet; 10.244.3.0/24 stays a VXLAN peer.
var (
	unresolvedIP  = netip.MustParseAddr("198.18.0.14") // on our segment, never heard of
	unresolvedNet = netip.MustParsePrefix("10.244.4.0/24")
	vxlanPeerCtr  = netip.MustParseAddr("10.244.3.3") // behind the VXLAN peer 203.0.113.1
	attackerMAC   = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
)

// setDirectRouting turns the host's Backend.DirectRouting on or off in the config entry.
func setDirectRouting(t testing.TB, objs *objects, on bool) {
	t.Helper()
	var cfg XnetHostConfig
	must(t, objs.Config.Lookup(uint32(0), &cfg))
	cfg.DirectRouting = 0
	if on {
		cfg.DirectRouting = 1
	}
	must(t, objs.Config.Put(uint32(0), cfg))
}

func setDirect(t testing.TB, objs *objects, subnet netip.Prefix, publicIP netip.Addr, direct bool) {
	t.Helper()
	rt := XnetRoute{RemoteIp: ip4(publicIP)}
	copy(rt.VtepMac[:], peerVtep)
	if direct {
		rt.Direct = 1
	}
	must(t, objs.Routes.Put(XnetRouteKey{Prefixlen: uint32(subnet.Bits()), Addr: ip4(subnet.Addr())}, rt))
}

// plainFrame is a routed IPv4 packet src -> dst as it arrives on (or leaves for) the underlay.
func plainFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, ttl uint8) []byte {
	ip := testpkt.IPv4{Src: src, Dst: dst, Proto: testpkt.ProtoTCP, TTL: ttl}.
		Packet(testpkt.TCP(src, dst, 40000, 5201, []byte("hello segment")))
	return testpkt.Eth(dstMAC, srcMAC, testpkt.EtherTypeIPv4, ip)
}

// withMACs is frame with the Ethernet addresses dstMAC and srcMAC.
func withMACs(frame []byte, dstMAC, srcMAC net.HardwareAddr) []byte {
	out := bytes.Clone(frame)
	copy(out[0:6], dstMAC)
	copy(out[6:12], srcMAC)
	return out
}

// routed is frame as a router forwards it: TTL one lower, header checksum fixed, Ethernet
// addresses dstMAC and srcMAC.
func routed(frame []byte, dstMAC, srcMAC net.HardwareAddr) []byte {
	out := withMACs(frame, dstMAC, srcMAC)
	out[14+8]--
	out[14+10], out[14+11] = 0, 0
	sum := testpkt.Checksum(out[14:34], 0)
	out[14+10], out[14+11] = byte(sum>>8), byte(sum)
	return out
}

// TestDirect is the specification of the DirectRouting datapath, one row per packet: what the
// encap programs do with a packet for a peer on our segment, and what decap_tc does with plain
// routed packets arriving on the underlay.
func TestDirect(t *testing.T) {
	ifindex, nic, inNS := underlay(t)
	objs := load(t, ifindex)
	setDirectRouting(t, objs, true)
	setDirect(t, objs, peerNet, peerIP, true)
	setDirect(t, objs, unresolvedNet, unresolvedIP, true)

	toPeer := containerFrameTOS(ctrIP, remoteIP, 100, 0)
	ttl1 := testpkt.Eth(gwMAC, ctrMAC, testpkt.EtherTypeIPv4, testpkt.IPv4{Src: ctrIP, Dst: remoteIP, Proto: testpkt.ProtoTCP, TTL: 1}.
		Packet(testpkt.TCP(ctrIP, remoteIP, 40000, 5201, []byte("x"))))
	// A container whose MTU is the underlay's, not the overlay's: 1501 bytes of IPv4.
	tooBig := containerFrameTOS(ctrIP, remoteIP, 1501-40, 0)

	toUnresolved := containerFrameTOS(ctrIP, netip.MustParseAddr("10.244.4.4"), 100, 0)
	fromPeer := plainFrame(nicMAC, peerNicMAC, remoteIP, ctrIP, 64)
	fromPeerToNew := plainFrame(nicMAC, peerNicMAC, remoteIP, newCtrIP, 64)

	type row struct {
		name    string
		prog    func() *ebpf.Program
		in      []byte
		verdict XnetVerdict
		ret     uint32
		out     []byte // the packet as the program leaves it; nil: untouched
	}
	container := func() *ebpf.Program { return objs.EncapContainer }
	host := func() *ebpf.Program { return objs.EncapHost }
	decap := func() *ebpf.Program { return objs.DecapTc }
	rows := []row{
		// Out. The peer's neighbour entry is resolved, so the program writes its MAC.
		{"a container's packet to a peer on our segment leaves plain, routed (TTL - 1), to the peer's MAC",
			container, toPeer, XnetVerdictVERDICT_DIRECT_OUT, tcRedirect, routed(toPeer, peerNicMAC, nic)},
		{"host traffic in xnet0 to a peer on our segment leaves plain with its TTL (the host originated it)",
			host, toPeer, XnetVerdictVERDICT_DIRECT_OUT, tcRedirect, withMACs(toPeer, peerNicMAC, nic)},
		// bpf_redirect_neigh fills the Ethernet header when the kernel sends the packet,
		// after the test run: here it is still the container's.
		{"a packet to a segment peer whose neighbour entry is unresolved is left to bpf_redirect_neigh",
			container, toUnresolved, XnetVerdictVERDICT_DIRECT_OUT, tcRedirect, routed(toUnresolved, gwMAC, ctrMAC)},
		{"a container's packet with TTL 1 is left to the stack, which answers time exceeded",
			container, ttl1, XnetVerdictVERDICT_PASS, tcPass, nil},
		{"a container's packet larger than the underlay MTU is left to the stack",
			container, tooBig, XnetVerdictVERDICT_PASS_TOO_BIG, tcPass, nil},
		{"host traffic larger than the underlay MTU is dropped (xnet0's MTU was changed)",
			host, tooBig, XnetVerdictVERDICT_DROP_TOO_BIG, tcDrop, nil},
		{"a packet to a VXLAN peer next to the segment peers takes the encap path (this underlay cannot route its PublicIP)",
			container, containerFrame(ctrIP, vxlanPeerCtr, 10), XnetVerdictVERDICT_DROP_NO_NEXTHOP, tcDrop, nil},

		// In.
		{"a segment peer's packet to a learned container is delivered into its veth peer",
			decap, fromPeer, XnetVerdictVERDICT_DIRECT_IN, tcRedirect, routed(fromPeer, ctrMAC, gwMAC)},
		{"a segment peer's packet to a container not learned yet goes through xnet0",
			decap, fromPeerToNew, XnetVerdictVERDICT_DIRECT_IN, tcRedirect, routed(fromPeerToNew, localVtep, peerNicMAC)},
		{"a packet from a segment peer's subnet sent by another neighbour is dropped",
			decap, plainFrame(nicMAC, attackerMAC, remoteIP, ctrIP, 64), XnetVerdictVERDICT_DROP_DIRECT_SPOOFED, tcDrop, nil},
		{"a packet from a VXLAN peer's subnet arriving plain is dropped: that peer sends VXLAN",
			decap, plainFrame(nicMAC, peerNicMAC, vxlanPeerCtr, ctrIP, 64), XnetVerdictVERDICT_DROP_DIRECT_SPOOFED, tcDrop, nil},
		{"a packet from a segment peer whose neighbour entry is unresolved cannot be checked: the stack decides",
			decap, plainFrame(nicMAC, attackerMAC, netip.MustParseAddr("10.244.4.4"), ctrIP, 64), XnetVerdictVERDICT_PASS_UNVERIFIED, tcPass, nil},
		{"a LAN host reaching a container through a route is not ours to judge",
			decap, plainFrame(nicMAC, attackerMAC, strangerIP, ctrIP, 64), XnetVerdictVERDICT_PASS, tcPass, nil},
		{"a segment peer's packet for another subnet is not ours",
			decap, plainFrame(nicMAC, peerNicMAC, remoteIP, netip.MustParseAddr("10.244.9.9"), 64), XnetVerdictVERDICT_PASS, tcPass, nil},
		{"a segment peer's packet with TTL 1 is left to the stack, which answers time exceeded",
			decap, plainFrame(nicMAC, peerNicMAC, remoteIP, ctrIP, 1), XnetVerdictVERDICT_PASS, tcPass, nil},
	}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			before := verdicts(t, objs.Counters)
			var ret uint32
			var out []byte
			inNS(func() { ret, out = run(t, r.prog(), r.in) })
			checkCounted(t, "tc", before, verdicts(t, objs.Counters), r.verdict)
			if r.out == nil {
				expectUntouched(t, "tc", ret, r.ret, out, r.in)
				return
			}
			if ret != r.ret || !bytes.Equal(out[:len(r.out)], r.out) {
				t.Errorf("got %d\n% x\nwant %d\n% x", ret, out[:len(r.out)], r.ret, r.out)
			}
		})
	}

	t.Run("with DirectRouting off plain packets from a peer's subnet are the stack's, as without it", func(t *testing.T) {
		setDirectRouting(t, objs, false)
		defer setDirectRouting(t, objs, true)
		for _, in := range [][]byte{fromPeer, plainFrame(nicMAC, attackerMAC, vxlanPeerCtr, ctrIP, 64)} {
			before := verdicts(t, objs.Counters)
			var ret uint32
			var out []byte
			inNS(func() { ret, out = run(t, objs.DecapTc, in) })
			checkCounted(t, "tc", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_PASS)
			expectUntouched(t, "tc", ret, tcPass, out, in)
		}
	})

	t.Run("clearing the flag sends the same packet in VXLAN again", func(t *testing.T) {
		setDirect(t, objs, peerNet, peerIP, false)
		defer setDirect(t, objs, peerNet, peerIP, true)
		before := verdicts(t, objs.Counters)
		var ret uint32
		var out []byte
		inNS(func() { ret, out = run(t, objs.EncapContainer, toPeer) })
		checkCounted(t, "tc", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_ENCAP)
		if ret != tcRedirect || !bytes.Equal(out[64:64+len(toPeer)-14], toPeer[14:]) {
			t.Errorf("returned %d with\n% x\nwant the packet encapsulated", ret, out[:len(toPeer)+50])
		}
	})

	t.Run("per-peer counters count both directions of the direct path", func(t *testing.T) {
		var per []XnetPeerStats
		must(t, objs.Peers.Lookup(underlayKey(peerIP), &per))
		var tx, rx uint64
		for _, p := range per {
			tx += p.TxPackets
			rx += p.RxPackets
		}
		if tx < 2 || rx < 2 {
			t.Errorf("peer %s: %d packets sent and %d received counted, want at least 2 each", peerIP, tx, rx)
		}
	})
}
