package ebpf

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/bpf/testpkt"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// newDualOn is newOn for a dual-stack overlay on a host with an IPv6 underlay address, which
// the backend publishes as its IPv6 VTEP.
func newDualOn(t *testing.T, h *harness.Host) *Backend {
	t.Helper()
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	iface.PublicIPv6 = h.UnderlayIPv6
	opts := backend.Options{Iface: iface, Config: dualStackConfig, Decap: DecapTC, BPFFS: h.BPFFS, Logger: harness.TestLogger(t)}
	var b *Backend
	if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
		t.Fatal(err)
	}
	return b
}

// withIPv6VTEP is lease as a host with an IPv6 VTEP at publicIPv6 publishes it (flannel's
// dual stack, or an xnet host with an IPv6 underlay).
func withIPv6VTEP(t *testing.T, lease subnetmgr.Lease, publicIPv6 netip.Addr) subnetmgr.Lease {
	t.Helper()
	data, err := json.Marshal(subnetmgr.VXLANData{VNI: 1, VtepMAC: backend.VtepMACv6(publicIPv6).String()})
	if err != nil {
		t.Fatal(err)
	}
	lease.PublicIPv6, lease.BackendV6Data = publicIPv6, data
	return lease
}

// What decap_tunnel takes from the IPv6 underlay and what it drops: the acceptance and
// anti-spoofing rules of the IPv4 decap, with the outer source read from the tunnel key. A peer
// host sends hand-made VXLAN datagrams over the IPv6 underlay (a UDP socket: the kernel fills
// the checksum, as a peer's vxlan device does) to our PublicIPv6 and port 8472, from its
// PublicIPv6 or from another address of its own, and the verdict counters say what became of
// each.
func TestIPv6UnderlayAcceptanceRules(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2, IPv6Underlay: true})
	us, peerHost := topo.Hosts()[0], topo.Hosts()[1]
	b := newDualOn(t, us)
	t.Cleanup(func() { _ = b.Close(true) })
	local := dualStackLease(t, 0, us.UnderlayIP)
	if err := b.Setup(t.Context(), local, dualStackConfig); err != nil {
		t.Fatal(err)
	}
	peer := withIPv6VTEP(t, dualStackLease(t, 1, peerHost.UnderlayIP), peerHost.UnderlayIPv6)
	// A second peer, at addresses no host holds: its subnet is not the first peer's to send from.
	other := withIPv6VTEP(t, dualStackLease(t, 2, netip.MustParseAddr("198.18.0.99")), netip.MustParseAddr("fd00:198:18::99"))
	for _, l := range []subnetmgr.Lease{peer, other} {
		if err := b.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	routes, err := b.m.ListRoutes6()
	if err != nil || len(routes) != 2 {
		t.Fatalf("IPv6 routes %+v, %v; want both peers'", routes, err)
	}
	for _, r := range routes {
		if r.Subnet == peer.IPv6Subnet && (r.PublicIPv6 != peerHost.UnderlayIPv6 || r.VtepMAC.String() != backend.VtepMACv6(peerHost.UnderlayIPv6).String()) {
			t.Fatalf("the peer's IPv6 route %+v: want it over the IPv6 underlay to %v, %v", r, peerHost.UnderlayIPv6, backend.VtepMACv6(peerHost.UnderlayIPv6))
		}
	}
	// Another address of the peer's host, on the same segment: a sender that is not the peer.
	stranger := netip.MustParseAddr("fd00:198:18::77")
	if out, err := peerHost.Run(t.Context(), "ip", "-6", "addr", "add", stranger.String()+"/64", "dev", "eth0", "nodad"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}

	ourVTEP6 := backend.VtepMACv6(us.UnderlayIPv6)
	peerVTEP6 := backend.VtepMACv6(peerHost.UnderlayIPv6)
	ctr := local.IPv6Subnet.Addr().Next().Next()           // a container of ours
	peerCtr := peer.IPv6Subnet.Addr().Next().Next()        // one of the peer's
	otherCtr := other.IPv6Subnet.Addr().Next().Next()      // one of the other peer's
	nobody := netip.MustParseAddr("fd00:10:244:77::5")     // in no lease
	notOurs := peer.IPv6Subnet.Addr().Next().Next().Next() // the peer's, not ours
	echo6 := func(src, dst netip.Addr) []byte {
		return testpkt.IPv6{Src: src, Dst: dst, NextHeader: testpkt.ProtoICMPv6}.Packet(testpkt.ICMPv6(src, dst, 128, 0, make([]byte, 8)))
	}
	bigEcho6 := func(src, dst netip.Addr) []byte { // larger than the underlay MTU
		return testpkt.IPv6{Src: src, Dst: dst, NextHeader: testpkt.ProtoICMPv6}.Packet(testpkt.ICMPv6(src, dst, 128, 0, make([]byte, 2000)))
	}
	frame6 := func(dstMAC net.HardwareAddr, src, dst netip.Addr) []byte {
		return testpkt.Eth(dstMAC, peerVTEP6, testpkt.EtherTypeIPv6, echo6(src, dst))
	}
	peerV4 := peer.Subnet.Addr().Next().Next()
	ourV4 := local.Subnet.Addr().Next().Next()
	frame4 := testpkt.Eth(ourVTEP6, peerVTEP6, testpkt.EtherTypeIPv4,
		testpkt.IPv4{Src: peerV4, Dst: ourV4, Proto: 1 /* ICMP */}.Packet([]byte{8, 0, 0xf7, 0xff, 0, 0, 0, 0}))

	for _, c := range []struct {
		name    string
		from    netip.Addr
		to      netip.Addr
		vni     uint32
		frame   []byte
		verdict string
	}{
		{"from the peer's PublicIPv6, its container to ours: delivered", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame6(ourVTEP6, peerCtr, ctr), "decap"},
		{"from another address than the peer's PublicIPv6 (outer source spoofed)", stranger, us.UnderlayIPv6, 1, frame6(ourVTEP6, peerCtr, ctr), "drop_spoofed"},
		{"from the peer, an inner source in another peer's subnet", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame6(ourVTEP6, otherCtr, ctr), "drop_spoofed"},
		{"from the peer, an inner source in no peer's subnet", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame6(ourVTEP6, nobody, ctr), "drop_unknown_source"},
		{"an inner destination outside our lease", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame6(ourVTEP6, peerCtr, notOurs), "drop_not_local"},
		{"another VNI", peerHost.UnderlayIPv6, us.UnderlayIPv6, 2, frame6(ourVTEP6, peerCtr, ctr), "drop_wrong_vni"},
		{"our IPv4 VTEP's MAC as the inner destination", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame6(b.VtepMAC, peerCtr, ctr), "drop_bad_vtep_mac"},
		{"inner IPv4 over the IPv6 underlay", peerHost.UnderlayIPv6, us.UnderlayIPv6, 1, frame4, "drop_spoofed"},
		// Over IPv4 decap_tc takes whole datagrams; fragments it passes to the stack, which
		// reassembles them for xnet6's IPv4 socket: the same rules, with the peer's PublicIP.
		{"from the peer's PublicIP, fragmented on the IPv4 underlay: reassembled and delivered", peerHost.UnderlayIP, us.UnderlayIP, 1,
			testpkt.Eth(b.VtepMAC, backend.VtepMAC(peerHost.UnderlayIP), testpkt.EtherTypeIPv6, bigEcho6(peerCtr, ctr)), "decap"},
		{"from the peer's PublicIP, fragmented, an inner source in another peer's subnet", peerHost.UnderlayIP, us.UnderlayIP, 1,
			testpkt.Eth(b.VtepMAC, backend.VtepMAC(peerHost.UnderlayIP), testpkt.EtherTypeIPv6, bigEcho6(otherCtr, ctr)), "drop_spoofed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := verdictCounts(t, b)
			const n = 3
			for range n {
				sendUDP(t, peerHost, c.from, c.to, int(dualStackConfig.Backend.Port), testpkt.VXLAN(c.vni, c.frame))
			}
			var after map[string]uint64
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				after = verdictCounts(t, b)
				if after[c.verdict]-before[c.verdict] >= n || time.Now().After(deadline) {
					break
				}
			}
			if d := after[c.verdict] - before[c.verdict]; d != n {
				t.Errorf("%d datagrams counted %s, want %d (verdicts before %v, after %v)", d, c.verdict, n, before, after)
			}
			if c.verdict != "decap" {
				if d := after["decap"] - before["decap"]; d != 0 {
					t.Errorf("%d of them decapsulated", d)
				}
			}
		})
	}
}

func verdictCounts(t *testing.T, b *Backend) map[string]uint64 {
	t.Helper()
	st, err := b.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st.Verdicts
}

// sendUDP sends one UDP datagram from src (an address of h) to dst:port in h's namespace.
func sendUDP(t *testing.T, h *harness.Host, src, dst netip.Addr, port int, payload []byte) {
	t.Helper()
	err := h.Do(func() error {
		var d net.Dialer
		d.LocalAddr = &net.UDPAddr{IP: src.AsSlice()}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		conn, err := d.DialContext(ctx, "udp", netip.AddrPortFrom(dst, uint16(port)).String())
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write(payload)
		return err
	})
	if err != nil {
		t.Fatal(fmt.Errorf("send from %v to %v: %w", src, dst, err))
	}
}

// xnet6 outlives the process as xnet0 does: a restarted backend adopts the same device (a
// device made again would drop the traffic in flight and the peers' neighbour state), one
// without an IPv6 underlay deletes it, and teardown removes it.
func TestTunnelDeviceIsAdoptedAndRemoved(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, IPv6Underlay: true})
	h := topo.Hosts()[0]
	local := dualStackLease(t, 0, h.UnderlayIP)
	tunnel := func() (index int, external bool) {
		t.Helper()
		_ = h.Do(func() error {
			l, err := netlink.LinkByName(TunnelDevice)
			if err != nil {
				return nil
			}
			vx, ok := l.(*netlink.Vxlan)
			index, external = l.Attrs().Index, ok && vx.FlowBased && l.Attrs().HardwareAddr.String() == backend.VtepMACv6(h.UnderlayIPv6).String()
			return nil
		})
		return index, external
	}
	start := func(b *Backend) {
		t.Helper()
		if err := b.Setup(t.Context(), local, dualStackConfig); err != nil {
			t.Fatal(err)
		}
	}

	b := newDualOn(t, h)
	t.Cleanup(func() { _ = b.Close(true) })
	start(b)
	first, external := tunnel()
	if first == 0 || !external {
		t.Fatalf("after Setup with an IPv6 underlay: %s ifindex %d, external with our IPv6 VTEP MAC %v", TunnelDevice, first, external)
	}
	if !b.ReceivesOnIPv6Underlay() {
		t.Error("ReceivesOnIPv6Underlay is false with an IPv6 underlay")
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	b = newDualOn(t, h)
	start(b)
	if again, _ := tunnel(); again != first {
		t.Fatalf("after a restart %s has ifindex %d, was %d: made again, not adopted", TunnelDevice, again, first)
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}

	// A start without the IPv6 underlay (no --public-ipv6, the address gone).
	b = newOn(t, h, DecapTC)
	start(b)
	if idx, _ := tunnel(); idx != 0 {
		t.Fatalf("a backend without an IPv6 underlay kept %s (ifindex %d)", TunnelDevice, idx)
	}
	if b.ReceivesOnIPv6Underlay() {
		t.Error("ReceivesOnIPv6Underlay is true without an IPv6 underlay")
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}

	b = newDualOn(t, h)
	start(b)
	if idx, _ := tunnel(); idx == 0 {
		t.Fatalf("%s not made again", TunnelDevice)
	}
	if err := b.Close(true); err != nil {
		t.Fatal(err)
	}
	if idx, _ := tunnel(); idx != 0 {
		t.Fatalf("teardown left %s (ifindex %d)", TunnelDevice, idx)
	}
}
