package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// setDirect6 makes the IPv6 peer of loadUnderlay6 (peer6Net6, PublicIPv6 peer6IP6, whose MAC
// the underlay namespace knows) a DirectRouting peer on our IPv6 segment, or a VXLAN one again.
func setDirect6(t testing.TB, objs *objects, direct bool) {
	t.Helper()
	key := XnetRoute6Key{Prefixlen: 64, Addr: ip6(peer6Net6)}
	var rt XnetRoute6
	must(t, objs.Routes6.Lookup(key, &rt))
	rt.Direct = 0
	if direct {
		rt.Direct = 1
	}
	must(t, objs.Routes6.Put(key, rt))
}

// plain6Frame is a routed IPv6 packet src -> dst as it arrives on (or leaves for) the
// underlay, with hop limit hops.
func plain6Frame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, hops uint8) []byte {
	ip := testpkt.IPv6{Src: src, Dst: dst, NextHeader: testpkt.ProtoTCP, HopLimit: hops}.
		Packet(testpkt.TCP(src, dst, 40000, 5201, []byte("hello segment")))
	return testpkt.Eth(dstMAC, srcMAC, testpkt.EtherTypeIPv6, ip)
}

// routed6 is frame as a router forwards it: hop limit one lower, Ethernet addresses dstMAC and
// srcMAC.
func routed6(frame []byte, dstMAC, srcMAC net.HardwareAddr) []byte {
	out := withMACs(frame, dstMAC, srcMAC)
	out[14+7]--
	return out
}

// TestDirect6 is the specification of DirectRouting for IPv6, one row per packet: a peer on
// our IPv6 segment gets its IPv6 subnet plain via its PublicIPv6, and decap_tc delivers plain
// IPv6 from that peer's subnet only when its Ethernet source is that peer; in a dual-stack and
// in an IPv6-only overlay alike.
func TestDirect6(t *testing.T) {
	ifindex, nic, inNS := underlay(t)
	for _, ipv6Only := range []bool{false, true} {
		name := "dual stack"
		load := func() *objects { return loadUnderlay6(t, ifindex, true) }
		if ipv6Only {
			name = "IPv6 only"
			load = func() *objects { return loadIPv6Only(t, ifindex) }
		}
		t.Run(name, func(t *testing.T) {
			objs := load()
			setDirectRouting(t, objs, true)
			setDirect6(t, objs, true)

			toPeer := container6Frame(ctrIP6, peer6Ctr, 100, 0)
			hops1 := testpkt.Eth(gwMAC, ctrMAC, testpkt.EtherTypeIPv6,
				testpkt.IPv6{Src: ctrIP6, Dst: peer6Ctr, NextHeader: testpkt.ProtoTCP, HopLimit: 1}.
					Packet(testpkt.TCP(ctrIP6, peer6Ctr, 40000, 5201, []byte("x"))))
			fromPeer := plain6Frame(nic, peerNicMAC, peer6Ctr, ctrIP6, 64)
			container := func() *ebpf.Program { return objs.EncapContainer }
			host := func() *ebpf.Program { return objs.EncapHost }
			decap := func() *ebpf.Program { return objs.DecapTc }
			rows := []struct {
				name    string
				prog    func() *ebpf.Program
				in      []byte
				verdict XnetVerdict
				ret     uint32
				out     []byte // nil: untouched
				setup   func()
			}{
				{name: "a container's packet for the peer goes plain to the peer's MAC, hop limit one lower",
					prog: container, in: toPeer, verdict: XnetVerdictVERDICT_DIRECT_OUT, ret: tcRedirect,
					out: routed6(toPeer, peerNicMAC, nic)},
				{name: "the host's own packet from xnet0 goes plain, its hop limit as the kernel left it",
					prog: host, in: toPeer, verdict: XnetVerdictVERDICT_DIRECT_OUT, ret: tcRedirect,
					out: withMACs(toPeer, peerNicMAC, nic)},
				{name: "a container's packet whose hop limit runs out is the stack's to answer",
					prog: container, in: hops1, verdict: XnetVerdictVERDICT_PASS, ret: tcPass},
				{name: "plain IPv6 from the peer's subnet, sent by the peer, is delivered into the learned container",
					prog: decap, in: fromPeer, verdict: XnetVerdictVERDICT_DIRECT_IN, ret: tcRedirect,
					out: routed6(fromPeer, ctrMAC, gwMAC)},
				{name: "the same packet from another neighbour is spoofed",
					prog: decap, in: withMACs(fromPeer, nic, attackerMAC), verdict: XnetVerdictVERDICT_DROP_DIRECT_SPOOFED, ret: tcDrop},
				{name: "plain IPv6 from a subnet of no peer is not ours to judge",
					prog: decap, in: plain6Frame(nic, peerNicMAC, worldIP6, ctrIP6, 64), verdict: XnetVerdictVERDICT_PASS, ret: tcPass},
				{name: "plain IPv6 for an address outside our lease passes",
					prog: decap, in: plain6Frame(nic, peerNicMAC, peer6Ctr, worldIP6, 64), verdict: XnetVerdictVERDICT_PASS, ret: tcPass},
				{name: "a peer that is not on our segment sends VXLAN: plain IPv6 in its name is spoofed",
					prog: decap, in: fromPeer, verdict: XnetVerdictVERDICT_DROP_DIRECT_SPOOFED, ret: tcDrop,
					setup: func() { setDirect6(t, objs, false) }},
				{name: "and its subnet is reached in VXLAN again, through xnet6",
					prog: container, in: toPeer, verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect,
					out: testpkt.Eth(peer6Vtep6, localVtep6, testpkt.EtherTypeIPv6, toPeer[14:])},
				{name: "with DirectRouting off, plain IPv6 is the stack's business",
					prog: decap, in: fromPeer, verdict: XnetVerdictVERDICT_PASS, ret: tcPass,
					setup: func() { setDirect6(t, objs, true); setDirectRouting(t, objs, false) }},
			}
			for _, c := range rows {
				t.Run(c.name, func(t *testing.T) {
					if c.setup != nil {
						c.setup()
					}
					before := verdicts(t, objs.Counters)
					var (
						ret uint32
						out []byte
						err error
					)
					inNS(func() { ret, out, err = runCtxErr(c.prog(), c.in, skbContext{}) })
					must(t, err)
					checkCounted(t, "tc", before, verdicts(t, objs.Counters), c.verdict)
					want := c.out
					if want == nil {
						want = c.in
					}
					if ret != c.ret || !bytes.Equal(out[:len(want)], want) {
						t.Errorf("returned %d, want %d\n got % x\nwant % x", ret, c.ret, out[:len(want)], want)
					}
				})
			}
		})
	}
}
