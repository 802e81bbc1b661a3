package conformance

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// ipv6OnlyBehaviours are the behaviours of an IPv6-only overlay (EnableIPv4 false), run in
// order on one IPv6-only cluster per backend that carries one (ebpf, vxlan, host-gw and
// wireguard, the latter once per device layout, ipv6OnlyWireGuardModes; xnetd refuses the others
// at start, see cmd/xnetd's TestBackendChoiceIPv6Only).
var ipv6OnlyBehaviours = []struct {
	name string
	run  func(t *testing.T, c *cluster)
}{
	{"containers reach each other over IPv6 (ICMPv6, TCP both ways) and nothing IPv4 is programmed", ipv6OnlyPeersAdded},
	{"a removed peer is unreachable and the others are not; added again it is reachable", ipv6OnlyPeerRemoved},
	{"IPv6 traffic to a peer moves its counters, named by its IPv6 subnet, and the verdict counters", ipv6OnlyCountersMove},
	{"a restarted backend adopts the datapath", ipv6OnlyRestartAdopts},
	{"a host laid out as flannel's IPv6-only vxlan, its lease as flannel writes it, is reached both ways", ipv6OnlyFlannelPeer},
	{"teardown leaves nothing of xnet on the host", teardownLeavesNothing},
}

// carriesIPv6Only are the backends that run an IPv6-only overlay.
var carriesIPv6Only = []string{subnetmgr.BackendEBPF, subnetmgr.BackendVXLAN, subnetmgr.BackendHostGW, subnetmgr.BackendWireGuard}

// ipv6OnlyWireGuardModes are wireguard's Modes with a different device in an IPv6-only
// overlay, and that device: flannel's separate mode has only the IPv6 one (xnet-wg-v6 on
// ListenPortV6), auto (and ipv6, the same there) the one xnet-wg on ListenPort.
var ipv6OnlyWireGuardModes = []struct{ mode, device string }{
	{"separate", "xnet-wg-v6"},
	{"auto", "xnet-wg"},
}

func TestIPv6Only(t *testing.T) {
	for _, r := range backends {
		t.Run(r.testName(), func(t *testing.T) {
			if !slices.Contains(carriesIPv6Only, r.name) {
				t.Skipf("%s does not carry an IPv6-only overlay: xnetd refuses it at start", r.name)
			}
			if r.name != subnetmgr.BackendWireGuard {
				runIPv6OnlyBehaviours(t, newIPv6OnlyCluster(t, r, ""))
				return
			}
			for _, m := range ipv6OnlyWireGuardModes {
				t.Run("Mode="+m.mode, func(t *testing.T) { runIPv6OnlyBehaviours(t, newIPv6OnlyCluster(t, r, m.mode)) })
			}
		})
	}
}

func runIPv6OnlyBehaviours(t *testing.T, c *cluster) {
	for _, b := range ipv6OnlyBehaviours {
		if !t.Run(b.name, func(t *testing.T) { b.run(t, c) }) {
			t.Fatalf("stopped after %q failed: the behaviours after it start from where it left the hosts", b.name)
		}
	}
}

func ipv6OnlyPeersAdded(t *testing.T, c *cluster) {
	a := c.hosts[0]
	before := a.state(t)
	for _, n := range c.hosts {
		n.addPeers(t, c.others(n)...)
	}
	if slices.Equal(a.state(t), before) {
		t.Fatalf("%s's state did not change when the peers were added: this checks nothing", a.Name)
	}
	wantReachOver(t, ipv6, mesh(c.hosts...)...)
	wantTCP6(t, mesh(c.hosts...)...)
	for _, n := range c.hosts {
		for _, l := range n.state(t) {
			// Only the harness's IPv4 (eth0's, docker0's default bridge) may be there: no
			// device, route or neighbour of an IPv4 overlay.
			if strings.HasPrefix(l, "ip -br link: xnet.") || strings.Contains(l, "10.244.") {
				t.Errorf("%s: IPv4 overlay state in an IPv6-only overlay: %s", n.Name, l)
			}
		}
	}
	if c.row.name == subnetmgr.BackendEBPF {
		// The containers' packets took the programs both ways: encapsulated into xnet6 at the
		// veth, judged and delivered by decap_tunnel; with DirectRouting (the hosts share one
		// IPv6 segment) sent plain at the veth and judged and delivered by decap_tc.
		want := []string{"encap", "decap"}
		if c.row.direct {
			want = []string{"direct_out", "direct_in"}
		}
		for _, n := range c.hosts {
			n.wantVerdicts(t, want...)
		}
	}
	if c.row.name == subnetmgr.BackendVXLAN {
		if !slices.Contains(a.state(t), "ip -br link: xnet-v6.1") {
			t.Errorf("%s has no xnet-v6.1: %q", a.Name, a.state(t))
		}
	}
	for _, m := range ipv6OnlyWireGuardModes {
		if c.row.name != subnetmgr.BackendWireGuard || c.mode != m.mode {
			continue
		}
		// The one device of the mode, and nothing of the other.
		var devices []string
		for _, l := range a.state(t) {
			if d, ok := strings.CutPrefix(l, "ip -br link: "); ok && strings.HasPrefix(d, "xnet-wg") {
				devices = append(devices, d)
			}
		}
		if !slices.Equal(devices, []string{m.device}) {
			t.Errorf("%s: Mode %s: WireGuard devices %q, want only %s", a.Name, m.mode, devices, m.device)
		}
	}
	// The first host's state with every peer but the last, for the behaviours after this one.
	gone := c.hosts[2]
	if err := a.call(func(b backend.Backend) error { return b.RemovePeer(gone.lease) }); err != nil {
		t.Fatal(err)
	}
	c.withoutLast = a.state(t)
	a.addPeers(t, gone.lease)
}

func ipv6OnlyPeerRemoved(t *testing.T, c *cluster) {
	a, b, gone := c.hosts[0], c.hosts[1], c.hosts[2]
	if err := a.call(func(be backend.Backend) error { return be.RemovePeer(gone.lease) }); err != nil {
		t.Fatal(err)
	}
	wantNoReachOver(t, ipv6, path{a, gone})
	wantReachOver(t, ipv6, path{a, b}, path{b, a}, path{b, gone}, path{gone, b})
	a.wantState(t, "after RemovePeer, as before AddPeer", c.withoutLast)
	a.addPeers(t, gone.lease)
	wantReachOver(t, ipv6, mesh(c.hosts...)...)
}

func ipv6OnlyCountersMove(t *testing.T, c *cluster) { countersMoveOver(t, c, ipv6) }

func ipv6OnlyRestartAdopts(t *testing.T, c *cluster) {
	a := c.hosts[0]
	before := a.state(t)
	a.stop(t, false)
	t.Run("IPv6 keeps flowing while no backend runs", func(t *testing.T) {
		if !c.row.kernelDatapath {
			t.Skip("the datapath is the backend's process: nothing forwards while it is stopped")
		}
		wantReachOver(t, ipv6, mesh(c.hosts...)...)
	})
	a.start(t)
	a.addPeers(t, c.others(a)...)
	a.wantState(t, "after a restart with the same peers", before)
	wantReachOver(t, ipv6, mesh(c.hosts...)...)
	wantTCP6(t, path{a, c.hosts[2]}, path{c.hosts[2], a})
}

// ipv6OnlyFlannelPeer replaces the last host's backend by flannel's vxlan layout for an
// IPv6-only network (the harness's flannel-v6.1) and gives the others its lease as flannel
// writes it in etcd, byte for byte, read by subnetmgr: the containers reach each other.
func ipv6OnlyFlannelPeer(t *testing.T, c *cluster) {
	if !slices.Contains([]string{subnetmgr.BackendVXLAN, subnetmgr.BackendEBPF}, c.row.name) || c.row.direct {
		t.Skip("flannel's vxlan layout: for the VXLAN-speaking backends without DirectRouting")
	}
	a, b, fl := c.hosts[0], c.hosts[1], c.hosts[2]
	fl.stop(t, true)
	peers := []harness.FlannelPeer{{Subnet: fl.lease.IPv6Subnet, PublicIP: fl.UnderlayIPv6, VtepMAC: harness.FlannelV6MAC(fl.UnderlayIPv6)}}
	for _, n := range []*node{a, b} {
		peers = append(peers, harness.FlannelPeer{Subnet: n.lease.IPv6Subnet, PublicIP: n.UnderlayIPv6, VtepMAC: backend.VtepMACv6(n.UnderlayIPv6)})
	}
	if err := fl.ConfigureFlannelVXLANv6(fl.lease.IPv6Subnet, peers); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = fl.Run(t.Context(), "ip", "link", "del", harness.FlannelVXLANv6Device) })
	const prefix = "/coreos.com/network"
	key := fmt.Sprintf("%s/subnets/0.0.0.0-0&%s-%d", prefix, fl.lease.IPv6Subnet.Addr(), fl.lease.IPv6Subnet.Bits())
	value := fmt.Sprintf(`{"PublicIP":"0.0.0.0","PublicIPv6":"%s","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"%s"}}`,
		fl.UnderlayIPv6, harness.FlannelV6MAC(fl.UnderlayIPv6))
	sn4, sn6, err := subnetmgr.ParseDualSubnetKey(prefix, key)
	if err != nil {
		t.Fatal(err)
	}
	attrs, err := subnetmgr.DecodeLeaseValue([]byte(value))
	if err != nil {
		t.Fatal(err)
	}
	flannel := subnetmgr.Lease{Subnet: sn4, IPv6Subnet: sn6, PublicIP: attrs.PublicIP, PublicIPv6: attrs.PublicIPv6,
		BackendType: attrs.BackendType, BackendV6Data: attrs.BackendV6Data}
	for _, n := range []*node{a, b} {
		n.addPeers(t, flannel)
	}
	paths := []path{{a, fl}, {fl, a}, {b, fl}, {fl, b}}
	wantReachOver(t, ipv6, paths...)
	wantTCP6(t, paths...)
	// The flannel host goes; the next behaviour tears down what xnet runs.
	for _, n := range []*node{a, b} {
		if err := n.call(func(be backend.Backend) error { return be.RemovePeer(flannel) }); err != nil {
			t.Fatal(err)
		}
	}
	wantNoReachOver(t, ipv6, path{a, fl})
	if _, err := fl.Run(t.Context(), "ip", "link", "del", harness.FlannelVXLANv6Device); err != nil {
		t.Fatal(err)
	}
	fl.start(t)
	fl.addPeers(t, c.others(fl)...)
	for _, n := range []*node{a, b} {
		n.addPeers(t, fl.lease)
	}
	wantReachOver(t, ipv6, mesh(c.hosts...)...)
}

// TestIPv6OnlyLeaseNamesIPv6VTEP: what xnetd publishes in an IPv6-only overlay is flannel's form (see
// subnetmgr's TestLeaseValueIPv6OnlyFlannelFormat for the bytes); here, that the backend's part
// of it names an IPv6 VTEP a flannel host can send to.
func TestIPv6OnlyLeaseNamesIPv6VTEP(t *testing.T) {
	ip6 := netip.MustParseAddr("fd00:198:18::b")
	data, err := backend.VXLANLeaseDataV6(1, netip.MustParseAddr("198.18.0.11"), ip6, true)
	if err != nil {
		t.Fatal(err)
	}
	l := subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64"), PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6,
		BackendType: subnetmgr.BackendVXLAN, BackendV6Data: data}
	p, err := backend.ParseVXLANPeerIPv6Only(l)
	if err != nil || p.VtepMAC.String() != backend.VtepMACv6(ip6).String() || p.PublicIPv6 != ip6 {
		t.Errorf("ParseVXLANPeerIPv6Only = %+v, %v", p, err)
	}
	for _, bad := range []subnetmgr.Lease{
		{IPv6Subnet: l.IPv6Subnet, PublicIPv6: ip6, BackendType: "host-gw", BackendV6Data: data},
		{IPv6Subnet: l.IPv6Subnet, BackendType: subnetmgr.BackendVXLAN, BackendV6Data: data},
		{IPv6Subnet: l.IPv6Subnet, PublicIPv6: ip6, BackendType: subnetmgr.BackendVXLAN},
		{PublicIPv6: ip6, BackendType: subnetmgr.BackendVXLAN, BackendV6Data: data},
	} {
		if _, err := backend.ParseVXLANPeerIPv6Only(bad); err == nil {
			t.Errorf("ParseVXLANPeerIPv6Only(%+v) took it", bad)
		}
	}
}

// wantVerdicts checks the ebpf datapath of n counted packets under each verdict named.
func (n *node) wantVerdicts(t *testing.T, names ...string) {
	t.Helper()
	m, err := maps.OpenPinned(n.pinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	counters, err := m.ReadCounters()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		if counters[name].Packets == 0 {
			t.Errorf("%s: no packet counted as %s: %v", n.Name, name, counters)
		}
	}
}
