package vxlan

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// Dual stack: xnet-v6.<VNI> on the IPv6 underlay as flannel's flannel-v6.<VNI>, and IPv6 over
// xnet.<VNI> where a host has no IPv6 underlay.

var dualNetwork = func() subnetmgr.Config {
	c := testNetwork
	c.EnableIPv6 = true
	c.IPv6Network = netip.MustParsePrefix("fd00:10:244::/48")
	c.IPv6SubnetLen = 64
	return c
}()

// subnet6Of is host i's IPv6 subnet: fd00:10:244:(i+1)::/64.
func subnet6Of(i int) netip.Prefix {
	return netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
}

// withIPv6Underlay gives the hosts their IPv6 underlay addresses (fd00:198:18::11, ...).
func withIPv6Underlay(t *testing.T, hosts ...*testHost) {
	t.Helper()
	for _, h := range hosts {
		if err := h.AddIPv6Underlay(t.Context()); err != nil {
			t.Fatal(err)
		}
		h.iface.PublicIPv6 = h.UnderlayIPv6
	}
}

// dualLeaseOf is the lease host i publishes in a dual-stack overlay with this backend.
func dualLeaseOf(t *testing.T, i int, h *testHost) subnetmgr.Lease {
	t.Helper()
	l := leaseOf(t, i, h)
	data, err := backend.VXLANLeaseDataV6(1, h.iface.PublicIP, h.iface.PublicIPv6, h.iface.PublicIPv6.IsValid())
	if err != nil {
		t.Fatal(err)
	}
	l.IPv6Subnet, l.PublicIPv6, l.BackendV6Data = subnet6Of(i), h.iface.PublicIPv6, data
	return l
}

// startDualBackend builds and sets up our backend on host i with a dual-stack lease.
func startDualBackend(t *testing.T, i int, h *testHost) *Backend {
	t.Helper()
	b, err := NewWithHandle(backend.Options{Iface: h.iface, Config: dualNetwork, Logger: harness.TestLogger(t)}, h.nl)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(t.Context(), dualLeaseOf(t, i, h), dualNetwork); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}

func TestIPv6DeviceIsSetUpAsFlannelDoes(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	b := startDualBackend(t, 0, h)

	link, err := h.nl.LinkByName("xnet-v6.1")
	if err != nil {
		t.Fatal(err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		t.Fatalf("xnet-v6.1 is a %s link, want vxlan", link.Type())
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"VNI", vx.VxlanId, 1},
		{"dstport", vx.Port, 8472},
		{"local is PublicIPv6", vx.SrcAddr.String(), "fd00:198:18::b"},
		{"dev", vx.VtepDevIndex, h.iface.Index},
		{"learning", vx.Learning, false},
		{"MAC is VtepMACv6(PublicIPv6)", vx.HardwareAddr.String(), backend.VtepMACv6(h.iface.PublicIPv6).String()},
		{"MTU is underlay - 70", vx.MTU, h.iface.MTU - 70},
		{"up", vx.Flags&1 == 1, true},
		{"MTU() stays the IPv4 device's", b.MTU(), h.iface.MTU - 50},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.what, c.got, c.want)
		}
	}
	if got := h.sh(t, "ip", "-6", "-o", "addr", "show", "dev", "xnet-v6.1", "scope", "global"); !strings.Contains(got, "inet6 fd00:10:244:1::/128") || strings.Count(got, "inet6 ") != 1 {
		t.Errorf("global addresses on xnet-v6.1: %q, want exactly fd00:10:244:1::/128", got)
	}
	if got := h.sh(t, "ip", "-6", "-o", "addr", "show", "dev", "xnet.1", "scope", "global"); got != "" {
		t.Errorf("xnet.1 has global IPv6 addresses with an IPv6 device beside it: %q", got)
	}
	data, err := b.LeaseAttrsV6()
	if err != nil {
		t.Fatal(err)
	}
	var vd subnetmgr.VXLANData
	if err := json.Unmarshal(data, &vd); err != nil {
		t.Fatal(err)
	}
	if vd.VNI != 1 || vd.VtepMAC != vx.HardwareAddr.String() {
		t.Errorf("LeaseAttrsV6 = %s, want {VNI 1, VtepMAC %s} (the IPv6 device's MAC)", data, vx.HardwareAddr)
	}
	if _, v4, _ := b.LeaseAttrs(); string(v4) == string(data) {
		t.Errorf("BackendV6Data %s repeats BackendData: peers would take it for IPv6 over IPv4", data)
	}
}

func TestIPv6DeviceNameMustFitIFNAMSIZ(t *testing.T) {
	opts := backend.Options{
		Iface: backend.ExternalInterface{Name: "eth0", Index: 2, MTU: 1500, PublicIP: mustAddr("198.18.0.11"),
			PublicIPv6: mustAddr("fd00:198:18::11")},
		Config: dualNetwork,
	}
	for _, c := range []struct {
		vni int
		ok  bool
	}{{9999999, true}, {10000000, false}, {16777215, false}} {
		opts.Config.Backend.VNI = c.vni
		_, err := NewWithHandle(opts, &netlink.Handle{})
		if (err == nil) != c.ok {
			t.Errorf("VNI %d (device %q, %d bytes): err %v, want ok %v", c.vni, DeviceNameV6(c.vni), len(DeviceNameV6(c.vni)), err, c.ok)
		}
	}
	// Without EnableIPv6 the name is never made.
	opts.Config = testNetwork
	opts.Config.Backend.VNI = 16777215
	if _, err := NewWithHandle(opts, &netlink.Handle{}); err != nil {
		t.Errorf("an IPv4-only overlay with VNI 16777215: %v", err)
	}
}

// peerState6 is what the IPv6 half leaves for peers, per device.
func peerState6(t *testing.T, h *testHost) (routes, neighs, fdb, routes4dev, neighs4dev string) {
	t.Helper()
	return h.sh(t, "ip", "-6", "route", "show", "dev", "xnet-v6.1", "proto", "boot"),
		h.sh(t, "ip", "-6", "neigh", "show", "dev", "xnet-v6.1", "nud", "permanent"),
		h.sh(t, "bridge", "fdb", "show", "dev", "xnet-v6.1"),
		h.sh(t, "ip", "-6", "route", "show", "dev", "xnet.1", "proto", "boot"),
		h.sh(t, "ip", "-6", "neigh", "show", "dev", "xnet.1", "nud", "permanent")
}

func TestIPv6PeerGetsFlannelsEntriesOnTheIPv6Device(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	b := startDualBackend(t, 0, h)
	peer := subnetmgr.Lease{
		Subnet: subnetOf(4), PublicIP: mustAddr("198.18.0.15"), BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:05"}`),
		IPv6Subnet:  subnet6Of(4), PublicIPv6: mustAddr("fd00:198:18::15"),
		BackendV6Data: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:66:05"}`),
	}
	for range 2 { // idempotent
		if err := b.AddPeer(peer); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb, routes4, neighs4 := peerState6(t, h)
	wantLines(t, "IPv6 routes on xnet-v6.1", routes, "fd00:10:244:5::/64 via fd00:10:244:5:: metric 1024 onlink")
	wantLines(t, "neighbours on xnet-v6.1", neighs, "fd00:10:244:5:: lladdr aa:bb:cc:dd:66:05 PERMANENT")
	wantLines(t, "fdb of xnet-v6.1", fdb, "aa:bb:cc:dd:66:05 dst fd00:198:18::15 self permanent")
	wantLines(t, "IPv6 routes on xnet.1", routes4)
	wantLines(t, "IPv6 neighbours on xnet.1", neighs4)
	_, _, fdb4 := peerState(t, h)
	wantLines(t, "fdb of xnet.1", fdb4, "aa:bb:cc:dd:ee:05 dst 198.18.0.15 self permanent")

	// The peer now carries IPv6 on its IPv4 VTEP (a udp or ebpf host publishes BackendData
	// again as BackendV6Data): the route moves to xnet.1, its neighbour entry with the IPv4
	// VTEP's MAC, and nothing is left on xnet-v6.1.
	overV4 := peer
	overV4.BackendV6Data = peer.BackendData
	if err := b.AddPeer(overV4); err != nil {
		t.Fatal(err)
	}
	routes, neighs, fdb, routes4, neighs4 = peerState6(t, h)
	wantLines(t, "IPv6 routes on xnet-v6.1", routes)
	wantLines(t, "neighbours on xnet-v6.1", neighs)
	wantLines(t, "fdb of xnet-v6.1", fdb)
	wantLines(t, "IPv6 routes on xnet.1", routes4, "fd00:10:244:5::/64 via fd00:10:244:5:: metric 1024 onlink")
	wantLines(t, "IPv6 neighbours on xnet.1", neighs4, "fd00:10:244:5:: lladdr aa:bb:cc:dd:ee:05 PERMANENT")

	// And back, with another IPv6 subnet: the old one's route goes.
	moved := peer
	moved.IPv6Subnet = subnet6Of(6)
	if err := b.AddPeer(moved); err != nil {
		t.Fatal(err)
	}
	routes, neighs, fdb, routes4, neighs4 = peerState6(t, h)
	wantLines(t, "IPv6 routes on xnet-v6.1", routes, "fd00:10:244:7::/64 via fd00:10:244:7:: metric 1024 onlink")
	wantLines(t, "neighbours on xnet-v6.1", neighs, "fd00:10:244:7:: lladdr aa:bb:cc:dd:66:05 PERMANENT")
	wantLines(t, "fdb of xnet-v6.1", fdb, "aa:bb:cc:dd:66:05 dst fd00:198:18::15 self permanent")
	wantLines(t, "IPv6 routes on xnet.1", routes4)
	wantLines(t, "IPv6 neighbours on xnet.1", neighs4)

	// An IPv4-only version of the lease: nothing of IPv6 stays.
	v4only := peer
	v4only.IPv6Subnet, v4only.PublicIPv6, v4only.BackendV6Data = netip.Prefix{}, netip.Addr{}, nil
	if err := b.AddPeer(v4only); err != nil {
		t.Fatal(err)
	}
	routes, neighs, fdb, routes4, neighs4 = peerState6(t, h)
	for what, out := range map[string]string{"IPv6 routes on xnet-v6.1": routes, "neighbours on xnet-v6.1": neighs,
		"fdb of xnet-v6.1": fdb, "IPv6 routes on xnet.1": routes4, "IPv6 neighbours on xnet.1": neighs4} {
		wantLines(t, what, out)
	}

	if err := b.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	for range 2 { // removing twice is fine
		if err := b.RemovePeer(peer); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb, routes4, neighs4 = peerState6(t, h)
	for what, out := range map[string]string{"IPv6 routes on xnet-v6.1": routes, "neighbours on xnet-v6.1": neighs,
		"fdb of xnet-v6.1": fdb, "IPv6 routes on xnet.1": routes4, "IPv6 neighbours on xnet.1": neighs4} {
		wantLines(t, what+" after RemovePeer", out)
	}
}

func TestWithoutAnIPv6UnderlayIPv6RidesTheIPv4Device(t *testing.T) {
	h := newHosts(t, 1)[0] // no PublicIPv6
	b := startDualBackend(t, 0, h)
	if _, err := h.nl.LinkByName("xnet-v6.1"); err == nil {
		t.Error("xnet-v6.1 exists on a host without an IPv6 underlay")
	}
	if got := h.sh(t, "ip", "-6", "-o", "addr", "show", "dev", "xnet.1", "scope", "global"); !strings.Contains(got, "inet6 fd00:10:244:1::/128") || strings.Count(got, "inet6 ") != 1 {
		t.Errorf("global IPv6 addresses on xnet.1: %q, want exactly fd00:10:244:1::/128", got)
	}
	_, v4, _ := b.LeaseAttrs()
	if v6, err := b.LeaseAttrsV6(); err != nil || string(v6) != string(v4) {
		t.Errorf("LeaseAttrsV6 = %s (%v), want the IPv4 VTEP's BackendData %s", v6, err, v4)
	}
	// Even a peer with an IPv6 VTEP of its own is reached over IPv4: we have no IPv6 underlay.
	peer := subnetmgr.Lease{
		Subnet: subnetOf(4), PublicIP: mustAddr("198.18.0.15"), BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:05"}`),
		IPv6Subnet:  subnet6Of(4), PublicIPv6: mustAddr("fd00:198:18::15"),
		BackendV6Data: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:66:05"}`),
	}
	if err := b.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	wantLines(t, "IPv6 routes on xnet.1", h.sh(t, "ip", "-6", "route", "show", "dev", "xnet.1", "proto", "boot"), "fd00:10:244:5::/64 via fd00:10:244:5:: metric 1024 onlink")
	wantLines(t, "IPv6 neighbours on xnet.1", h.sh(t, "ip", "-6", "neigh", "show", "dev", "xnet.1", "nud", "permanent"), "fd00:10:244:5:: lladdr aa:bb:cc:dd:ee:05 PERMANENT")

	// A host that had an IPv6 underlay before and restarts without one loses xnet-v6.1.
	h.sh(t, "ip", "link", "add", "xnet-v6.1", "type", "vxlan", "id", "1", "dstport", "8472", "local", "fd00::99", "dev", "eth0")
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	startDualBackend(t, 0, h)
	if _, err := h.nl.LinkByName("xnet-v6.1"); err == nil {
		t.Error("a leftover xnet-v6.1 survived a Setup without an IPv6 underlay")
	}
}

func TestIPv6PruneAndTeardown(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	first := startDualBackend(t, 0, h)
	lease := func(i int, v6mac string) subnetmgr.Lease {
		return subnetmgr.Lease{
			Subnet: subnetOf(i), PublicIP: mustAddr(fmt.Sprintf("198.18.0.%d", 11+i)), BackendType: "vxlan",
			BackendData: json.RawMessage(fmt.Sprintf(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:%02x"}`, i)),
			IPv6Subnet:  subnet6Of(i), PublicIPv6: mustAddr(fmt.Sprintf("fd00:198:18::%x", 11+i)),
			BackendV6Data: json.RawMessage(fmt.Sprintf(`{"VNI":1,"VtepMAC":%q}`, v6mac)),
		}
	}
	kept := lease(1, "aa:bb:cc:dd:66:01")
	gone := lease(2, "aa:bb:cc:dd:66:02")
	goneOverV4 := lease(3, "aa:bb:cc:dd:ee:03") // its IPv4 VTEP: IPv6 rides xnet.1
	for _, l := range []subnetmgr.Lease{kept, gone, goneOverV4} {
		if err := first.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}
	second := startDualBackend(t, 0, h)
	for range 2 {
		if err := second.PrunePeers([]subnetmgr.Lease{dualLeaseOf(t, 0, h), kept}); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb, routes4, neighs4 := peerState6(t, h)
	wantLines(t, "IPv6 routes on xnet-v6.1", routes, "fd00:10:244:2::/64 via fd00:10:244:2:: metric 1024 onlink")
	wantLines(t, "neighbours on xnet-v6.1", neighs, "fd00:10:244:2:: lladdr aa:bb:cc:dd:66:01 PERMANENT")
	wantLines(t, "fdb of xnet-v6.1", fdb, "aa:bb:cc:dd:66:01 dst fd00:198:18::c self permanent")
	wantLines(t, "IPv6 routes on xnet.1", routes4)
	wantLines(t, "IPv6 neighbours on xnet.1", neighs4)
	if got := h.sh(t, "ip", "-6", "-o", "addr", "show", "dev", "xnet-v6.1", "scope", "global"); !strings.Contains(got, "fd00:10:244:1::/128") {
		t.Errorf("the prune took our own address: %q", got)
	}

	if err := second.Close(true); err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"xnet.1", "xnet-v6.1"} {
		if _, err := h.nl.LinkByName(dev); err == nil {
			t.Errorf("Close(true) left %s", dev)
		}
	}
}

// TestContainersReachEachOtherOverIPv6 runs ICMPv6 and TCP both ways between containers on two
// hosts, for each combination of IPv6 underlays: the IPv6 device, IPv6 inside the IPv4 one,
// and one host of each (both then use the IPv4 device).
func TestContainersReachEachOtherOverIPv6(t *testing.T) {
	cases := []struct {
		name         string
		ipv6Underlay [2]bool
		device       string // the one carrying IPv6 on host a
	}{
		{"both hosts have an IPv6 underlay", [2]bool{true, true}, "xnet-v6.1"},
		{"neither host has an IPv6 underlay", [2]bool{false, false}, "xnet.1"},
		{"only one host has an IPv6 underlay", [2]bool{true, false}, "xnet.1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hosts := newHosts(t, 2)
			var backends []*Backend
			for i, h := range hosts {
				if c.ipv6Underlay[i] {
					withIPv6Underlay(t, h)
				}
				backends = append(backends, startDualBackend(t, i, h))
				if err := h.SetupDocker0(netip.PrefixFrom(subnetOf(i).Addr().Next(), 24), backends[i].MTU()); err != nil {
					t.Fatal(err)
				}
				if err := h.SetupDocker0IPv6(netip.PrefixFrom(subnet6Of(i).Addr().Next(), 64)); err != nil {
					t.Fatal(err)
				}
				if _, err := h.AddContainer(); err != nil {
					t.Fatal(err)
				}
			}
			a, b := hosts[0], hosts[1]
			if err := backends[0].AddPeer(dualLeaseOf(t, 1, b)); err != nil {
				t.Fatal(err)
			}
			if err := backends[1].AddPeer(dualLeaseOf(t, 0, a)); err != nil {
				t.Fatal(err)
			}
			if r := a.sh(t, "ip", "-6", "route", "show", subnet6Of(1).String()); !strings.Contains(r, "dev "+c.device) {
				t.Errorf("route to b's IPv6 subnet: %q, want it on %s", r, c.device)
			}
			ca, cb := a.Containers()[0], b.Containers()[0]
			for _, p := range [][2]*harness.Container{{ca, cb}, {cb, ca}} {
				from, to := p[0], p[1]
				if !harness.PingsWithin(t, from.Namespace, to.IPv6, 5*time.Second) {
					t.Errorf("%s -> %s (%v): no echo reply within 5s", from.Name, to.Name, to.IPv6)
				}
				if err := harness.TCPExchange(t.Context(), from.Namespace, to.Namespace, to.IPv6, 4<<20); err != nil {
					t.Errorf("TCP over IPv6 %s -> %s: %v", from.Name, to.Name, err)
				}
			}
			// The IPv4 overlay is unchanged by it.
			if !harness.PingsWithin(t, ca.Namespace, cb.IP, 5*time.Second) {
				t.Errorf("IPv4 %s -> %s: no echo reply within 5s", ca.Name, cb.Name)
			}
			if err := backends[0].RemovePeer(dualLeaseOf(t, 1, b)); err != nil {
				t.Fatal(err)
			}
			if _, got, _ := harness.Ping(t.Context(), ca.Namespace, cb.IPv6, 3, 50*time.Millisecond); got > 0 {
				t.Errorf("%s still reaches %v after RemovePeer", ca.Name, cb.IPv6)
			}
		})
	}
}
