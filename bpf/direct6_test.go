package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/backend"
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

// A second DirectRouting peer on our IPv6 segment, whose neighbour entry the underlay namespace
// does not have: the first packets to it are the kernel's to resolve.
var (
	unresolved6IP6 = netip.MustParseAddr("fd00:198:18::f")
	unresolved6Net = netip.MustParseAddr("fd00:10:244:5::")
	unresolved6Ctr = netip.MustParseAddr("fd00:10:244:5::3")
)

// addUnresolvedDirect6 routes unresolved6Net plain via unresolved6IP6, as AddPeer does for a
// DirectRouting peer on our IPv6 segment. In an IPv6-only overlay it has no IPv4 PublicIP.
func addUnresolvedDirect6(t testing.TB, objs *objects, ipv6Only bool) {
	t.Helper()
	rt := XnetRoute6{RemoteIp: ip4(netip.MustParseAddr("198.18.0.15")), Underlay6: 1, Direct: 1, RemoteIp6: ip6(unresolved6IP6)}
	if ipv6Only {
		rt.RemoteIp = [4]uint8{}
	}
	copy(rt.VtepMac[:], backend.VtepMACv6(unresolved6IP6))
	must(t, objs.Routes6.Put(XnetRoute6Key{Prefixlen: 64, Addr: ip6(unresolved6Net)}, rt))
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
			addUnresolvedDirect6(t, objs, ipv6Only)
			// The peer's counters are keyed by its PublicIP; in an IPv6-only overlay, where it
			// has none, by its PublicIPv6. Both entries exist: only the right one may move.
			counted, notCounted := peer6IP, peer6IP6
			if ipv6Only {
				counted, notCounted = peer6IP6, peer6IP
			}
			addPeerCounters(t, objs, counted)
			addPeerCounters(t, objs, notCounted)

			toPeer := container6Frame(ctrIP6, peer6Ctr, 100, 0)
			hops1 := testpkt.Eth(gwMAC, ctrMAC, testpkt.EtherTypeIPv6,
				testpkt.IPv6{Src: ctrIP6, Dst: peer6Ctr, NextHeader: testpkt.ProtoTCP, HopLimit: 1}.
					Packet(testpkt.TCP(ctrIP6, peer6Ctr, 40000, 5201, []byte("x"))))
			fromPeer := plain6Frame(nic, peerNicMAC, peer6Ctr, ctrIP6, 64)
			toUnresolved := container6Frame(ctrIP6, unresolved6Ctr, 100, 0)
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
				// bpf_redirect_neigh fills the Ethernet header when the kernel sends the
				// packet, after the test run: here it is still the container's.
				{name: "a container's packet to a segment peer whose neighbour is unresolved is left to bpf_redirect_neigh",
					prog: container, in: toUnresolved, verdict: XnetVerdictVERDICT_DIRECT_OUT, ret: tcRedirect,
					out: routed6(toUnresolved, gwMAC, ctrMAC)},
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
					ret, out := runCounted(t, objs, inNS, c.prog(), c.in, skbContext{}, c.verdict)
					want := c.out
					if want == nil {
						want = c.in
					}
					if ret != c.ret || !bytes.Equal(out[:len(want)], want) {
						t.Errorf("returned %d, want %d\n got % x\nwant % x", ret, c.ret, out[:len(want)], want)
					}
				})
			}
			t.Run("the peer's next hop is cached under its PublicIPv6 and trusted until it expires, both ways", func(t *testing.T) {
				checkNexthopCache6(t, objs, inNS, nic)
			})
			t.Run("the peer's counters count both directions, under its PublicIP or, IPv6-only, its PublicIPv6", func(t *testing.T) {
				if tx, rx := peerPackets(t, objs, counted); tx < 2 || rx < 1 {
					t.Errorf("peer %s: %d packets sent and %d received counted, want at least 2 and 1", counted, tx, rx)
				}
				if tx, rx := peerPackets(t, objs, notCounted); tx+rx != 0 {
					t.Errorf("counted under %s too: %d sent, %d received", notCounted, tx, rx)
				}
			})
		})
	}
}

// checkNexthopCache6: the packets of TestDirect6 left the direct peer's next hop in the nexthops
// cache, keyed by its PublicIPv6, and none for the peer whose neighbour is unresolved. While an
// entry is fresh both directions take its MAC without asking the FIB (the send addresses it,
// the receive checks the sender against it); once it expires the FIB is asked again and the
// entry refreshed.
func checkNexthopCache6(t *testing.T, objs *objects, inNS func(func()), nic net.HardwareAddr) {
	t.Helper()
	setDirectRouting(t, objs, true) // the last row turned it off
	var nh XnetNexthop
	must(t, objs.Nexthops.Lookup(underlayKey(peer6IP6), &nh))
	if !bytes.Equal(nh.Dmac[:], peerNicMAC) || !bytes.Equal(nh.Smac[:], nic) || nh.Ifindex == 0 || nh.Expires == 0 {
		t.Fatalf("cached next hop of %s: %+v, want %s from %s with an expiry", peer6IP6, nh, peerNicMAC, nic)
	}
	if err := objs.Nexthops.Lookup(underlayKey(unresolved6IP6), &nh); err == nil {
		t.Errorf("a next hop %+v cached for %s, whose neighbour is unresolved", nh, unresolved6IP6)
	}
	other := net.HardwareAddr{0x02, 0xee, 0xee, 0xee, 0xee, 0x01}
	toPeer := container6Frame(ctrIP6, peer6Ctr, 100, 0)
	fromPeer := plain6Frame(nic, peerNicMAC, peer6Ctr, ctrIP6, 64)
	fromOther := withMACs(fromPeer, nic, other)
	for _, c := range []struct {
		name    string
		expires uint64
		wantDst net.HardwareAddr // where the container's packet goes
		accept  []byte           // the plain packet decap_tc takes as the peer's
		refuse  []byte           // the plain packet decap_tc calls spoofed
	}{
		{"a fresh entry is used without asking the FIB", 1 << 62, other, fromOther, fromPeer},
		{"an expired entry is looked up again and refreshed", 1, peerNicMAC, fromPeer, fromOther},
	} {
		t.Run(c.name, func(t *testing.T) {
			stale := nh
			copy(stale.Dmac[:], other)
			stale.Expires = c.expires
			must(t, objs.Nexthops.Put(underlayKey(peer6IP6), stale))
			var ret uint32
			var out []byte
			inNS(func() { ret, out = run(t, objs.EncapContainer, toPeer) })
			if ret != tcRedirect || !bytes.Equal(out[0:6], c.wantDst) {
				t.Errorf("sent with %d to %s, want %d to %s", ret, net.HardwareAddr(out[0:6]), tcRedirect, c.wantDst)
			}
			must(t, objs.Nexthops.Put(underlayKey(peer6IP6), stale))
			for _, in := range []struct {
				frame   []byte
				verdict XnetVerdict
			}{{c.accept, XnetVerdictVERDICT_DIRECT_IN}, {c.refuse, XnetVerdictVERDICT_DROP_DIRECT_SPOOFED}} {
				before := verdicts(t, objs.Counters)
				inNS(func() { _, _ = run(t, objs.DecapTc, in.frame) })
				checkCounted(t, "tc", before, verdicts(t, objs.Counters), in.verdict)
			}
		})
	}
	must(t, objs.Nexthops.Lookup(underlayKey(peer6IP6), &nh))
	if !bytes.Equal(nh.Dmac[:], peerNicMAC) || nh.Expires <= 1 {
		t.Fatalf("after the expired entry: %+v, want it refreshed to %s", nh, peerNicMAC)
	}
}
