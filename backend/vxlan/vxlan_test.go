package vxlan

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestDeviceIsSetUpAsFlannelDoes(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h, testNetwork)

	link, err := h.nl.LinkByName("xnet.1")
	if err != nil {
		t.Fatal(err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		t.Fatalf("xnet.1 is a %s link, want vxlan", link.Type())
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"VNI", vx.VxlanId, 1},
		{"dstport", vx.Port, 8472},
		{"local", vx.SrcAddr.String(), "198.18.0.11"},
		{"dev", vx.VtepDevIndex, h.iface.Index},
		{"learning", vx.Learning, false},
		{"MAC is VtepMAC(PublicIP)", vx.HardwareAddr.String(), backend.VtepMAC(h.iface.PublicIP).String()},
		{"MTU is underlay - 50", vx.MTU, h.iface.MTU - 50},
		{"up", vx.Flags&1 == 1, true},
		{"MTU()", b.MTU(), h.iface.MTU - 50},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.what, c.got, c.want)
		}
	}
	if got := h.sh(t, "ip", "-4", "-o", "addr", "show", "dev", "xnet.1"); !strings.Contains(got, "inet 10.244.1.0/32") || strings.Count(got, "inet ") != 1 {
		t.Errorf("addresses on xnet.1: %q, want exactly 10.244.1.0/32", got)
	}

	typ, data, err := b.LeaseAttrs()
	if err != nil {
		t.Fatal(err)
	}
	var vd subnetmgr.VXLANData
	if err := json.Unmarshal(data, &vd); err != nil {
		t.Fatal(err)
	}
	if typ != "vxlan" || vd.VNI != 1 || vd.VtepMAC != "0e:78:c6:12:00:0b" {
		t.Errorf("LeaseAttrs = %q %s, want vxlan {VNI 1, VtepMAC 0e:78:c6:12:00:0b}", typ, data)
	}
}

// peerState is what flannel's three commands leave for one peer, as iproute2 prints it.
func peerState(t *testing.T, h *testHost) (routes, neighs, fdb string) {
	t.Helper()
	return h.sh(t, "ip", "route", "show", "dev", "xnet.1"),
		h.sh(t, "ip", "neigh", "show", "dev", "xnet.1"),
		h.sh(t, "bridge", "fdb", "show", "dev", "xnet.1")
}

func TestPeerGetsRouteNeighbourAndFDBEntry(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h, testNetwork)
	peer := subnetmgr.Lease{
		Subnet: subnetOf(4), PublicIP: mustAddr("198.18.0.15"), BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:05"}`),
	}
	for range 2 { // idempotent: the second add replaces, never duplicates
		if err := b.AddPeer(peer); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb := peerState(t, h)
	wantLines(t, "routes", routes, "10.244.5.0/24 via 10.244.5.0 onlink")
	wantLines(t, "neighbours", neighs, "10.244.5.0 lladdr aa:bb:cc:dd:ee:05 PERMANENT")
	wantLines(t, "fdb", fdb, "aa:bb:cc:dd:ee:05 dst 198.18.0.15 self permanent")

	// A changed lease (new MAC and PublicIP) replaces all three entries; the old MAC's fdb
	// entry does not linger.
	changed := peer
	changed.PublicIP = mustAddr("198.18.0.16")
	changed.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:06"}`)
	if err := b.AddPeer(changed); err != nil {
		t.Fatal(err)
	}
	routes, neighs, fdb = peerState(t, h)
	wantLines(t, "routes", routes, "10.244.5.0/24 via 10.244.5.0 onlink")
	wantLines(t, "neighbours", neighs, "10.244.5.0 lladdr aa:bb:cc:dd:ee:06 PERMANENT")
	wantLines(t, "fdb", fdb, "aa:bb:cc:dd:ee:06 dst 198.18.0.16 self permanent")

	for range 2 { // removing twice is fine
		if err := b.RemovePeer(changed); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb = peerState(t, h)
	wantLines(t, "routes", routes)
	wantLines(t, "neighbours", neighs)
	wantLines(t, "fdb", fdb)
}

func TestLeasesThatCannotBeProgrammedAreSkipped(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h, testNetwork)
	good := func(mod func(*subnetmgr.Lease)) subnetmgr.Lease {
		l := subnetmgr.Lease{Subnet: subnetOf(6), PublicIP: mustAddr("198.18.0.17"), BackendType: "vxlan",
			BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:07"}`)}
		mod(&l)
		return l
	}
	cases := []struct {
		name    string
		lease   subnetmgr.Lease
		wantErr bool
	}{
		{"our own lease is ignored without error", leaseOf(t, 0, h), false},
		{"an older lease of this host (our PublicIP) is ignored without error", good(func(l *subnetmgr.Lease) { l.PublicIP = h.iface.PublicIP }), false},
		{"a host-gw peer", good(func(l *subnetmgr.Lease) { l.BackendType = "host-gw"; l.BackendData = json.RawMessage("null") }), true},
		{"a udp (flannel's own format) peer", good(func(l *subnetmgr.Lease) { l.BackendType = "udp" }), true},
		{"null BackendData", good(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage("null") }), true},
		{"missing BackendData", good(func(l *subnetmgr.Lease) { l.BackendData = nil }), true},
		{"BackendData not JSON", good(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VNI":`) }), true},
		{"VtepMAC not a MAC", good(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"zz"}`) }), true},
		{"VtepMAC multicast", good(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}`) }), true},
		{"VtepMAC of 8 bytes", good(func(l *subnetmgr.Lease) {
			l.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff:00:11"}`)
		}), true},
		{"IPv6 PublicIP", good(func(l *subnetmgr.Lease) { l.PublicIP = mustAddr("fd00::1") }), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := b.AddPeer(c.lease)
			if c.wantErr != (err != nil) {
				t.Fatalf("AddPeer: err = %v, want error %v", err, c.wantErr)
			}
			if c.wantErr && (!errors.Is(err, ErrIncompatiblePeer) || !strings.Contains(err.Error(), c.lease.Subnet.String())) {
				t.Errorf("error %q should wrap ErrIncompatiblePeer and name the lease %v", err, c.lease.Subnet)
			}
			routes, neighs, fdb := peerState(t, h)
			wantLines(t, "routes", routes)
			wantLines(t, "neighbours", neighs)
			wantLines(t, "fdb", fdb)
		})
	}
}

func TestRestartAdoptsTheDeviceAndKeepsPeers(t *testing.T) {
	h := newHosts(t, 1)[0]
	first := startBackend(t, 0, h, testNetwork)
	peer := subnetmgr.Lease{Subnet: subnetOf(2), PublicIP: mustAddr("198.18.0.13"), BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}`)}
	if err := first.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	before, _ := h.nl.LinkByName("xnet.1")
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}
	second := startBackend(t, 0, h, testNetwork)
	after, err := h.nl.LinkByName("xnet.1")
	if err != nil {
		t.Fatal(err)
	}
	if before.Attrs().Index != after.Attrs().Index {
		t.Errorf("device recreated on restart: ifindex %d -> %d", before.Attrs().Index, after.Attrs().Index)
	}
	routes, neighs, fdb := peerState(t, h)
	wantLines(t, "routes after restart", routes, "10.244.3.0/24 via 10.244.3.0 onlink")
	wantLines(t, "neighbours after restart", neighs, "10.244.3.0 lladdr aa:bb:cc:dd:ee:03 PERMANENT")
	wantLines(t, "fdb after restart", fdb, "aa:bb:cc:dd:ee:03 dst 198.18.0.13 self permanent")

	// The new process never programmed this peer and the removal event carries a lease
	// whose data it cannot parse: the MAC comes from the neighbour table.
	gone := peer
	gone.BackendData = nil
	if err := second.RemovePeer(gone); err != nil {
		t.Fatal(err)
	}
	routes, neighs, fdb = peerState(t, h)
	wantLines(t, "routes", routes)
	wantLines(t, "neighbours", neighs)
	wantLines(t, "fdb", fdb)
}

func TestExistingDevice(t *testing.T) {
	cases := []struct {
		name     string
		create   string // ip link add xnet.1 <create> dev eth0
		recreate bool
	}{
		{"as we make it is adopted", "address 0e:78:c6:12:00:0b mtu 1450 type vxlan id 1 dstport 8472 local 198.18.0.11 nolearning", false},
		{"with another MAC and MTU is adopted and fixed", "address 02:00:00:00:00:01 mtu 1400 type vxlan id 1 dstport 8472 local 198.18.0.11 nolearning", false},
		{"with another port is recreated", "type vxlan id 1 dstport 4789 local 198.18.0.11 nolearning", true},
		{"with another local is recreated", "type vxlan id 1 dstport 8472 local 198.18.0.99 nolearning", true},
		{"with learning on is recreated", "type vxlan id 1 dstport 8472 local 198.18.0.11 learning", true},
		{"of another type is replaced", "type bridge", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHosts(t, 1)[0]
			args := append([]string{"ip", "link", "add", "xnet.1"}, strings.Fields(c.create)...)
			if strings.Contains(c.create, "vxlan") {
				args = append(args, "dev", "eth0")
			}
			h.sh(t, args...)
			h.sh(t, "ip", "addr", "add", "10.99.0.1/24", "dev", "xnet.1") // stale address
			before, _ := h.nl.LinkByName("xnet.1")
			startBackend(t, 0, h, testNetwork)
			after, err := h.nl.LinkByName("xnet.1")
			if err != nil {
				t.Fatal(err)
			}
			if recreated := before.Attrs().Index != after.Attrs().Index; recreated != c.recreate {
				t.Errorf("recreated = %v, want %v", recreated, c.recreate)
			}
			if incompat := incompatibility(startBackendWant(t, h), after); incompat != "" {
				t.Errorf("device after Setup still differs: %s", incompat)
			}
			if got, want := after.Attrs().HardwareAddr.String(), backend.VtepMAC(h.iface.PublicIP).String(); got != want {
				t.Errorf("MAC %s, want %s", got, want)
			}
			if got := after.Attrs().MTU; got != h.iface.MTU-50 {
				t.Errorf("MTU %d, want %d", got, h.iface.MTU-50)
			}
			if got := h.sh(t, "ip", "-4", "-o", "addr", "show", "dev", "xnet.1"); strings.Count(got, "inet ") != 1 || !strings.Contains(got, "10.244.1.0/32") {
				t.Errorf("addresses: %q, want only 10.244.1.0/32", got)
			}
		})
	}
}

func startBackendWant(t *testing.T, h *testHost) *netlink.Vxlan {
	b, err := NewWithHandle(backend.Options{Iface: h.iface, Config: testNetwork}, h.nl)
	if err != nil {
		t.Fatal(err)
	}
	return b.wantDevice()
}

func TestCloseTeardownDeletesTheDeviceAndOnlyThen(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h, testNetwork)
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	if _, err := h.nl.LinkByName("xnet.1"); err != nil {
		t.Fatalf("Close(false) removed the device: %v", err)
	}
	b = startBackend(t, 0, h, testNetwork)
	if err := b.Close(true); err != nil {
		t.Fatal(err)
	}
	if _, err := h.nl.LinkByName("xnet.1"); err == nil {
		t.Fatal("Close(true) left the device")
	}
	if err := b.Close(true); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := b.AddPeer(leaseOf(t, 1, h)); err == nil {
		t.Error("AddPeer after Close succeeded")
	}
}

func TestTwoHostsReachEachOtherThroughTheDevice(t *testing.T) {
	hosts := newHosts(t, 2)
	a, b := hosts[0], hosts[1]
	ba := startBackend(t, 0, a, testNetwork)
	bb := startBackend(t, 1, b, testNetwork)
	if err := ba.AddPeer(leaseOf(t, 1, b)); err != nil {
		t.Fatal(err)
	}
	if err := bb.AddPeer(leaseOf(t, 0, a)); err != nil {
		t.Fatal(err)
	}
	// 10.244.2.0 exists only on b's xnet.1: a reaches it through the tunnel.
	if !reaches(t, a, mustAddr("10.244.2.0")) {
		t.Fatal("a cannot reach b's vxlan address")
	}
	if err := ba.RemovePeer(leaseOf(t, 1, b)); err != nil {
		t.Fatal(err)
	}
	if reaches(t, a, mustAddr("10.244.2.0")) {
		t.Fatal("a still reaches b after RemovePeer")
	}
}

func TestProbeKernel(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return filepath.Dir(p)
	}
	loaded := filepath.Join(dir, "sys-vxlan")
	if err := os.Mkdir(loaded, 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name       string
		sysModule  string
		modulesDir string
		available  bool
	}{
		{"module loaded", loaded, "", true},
		{"loadable module", "/nonexistent", write("dep/modules.dep", "kernel/drivers/net/vxlan/vxlan.ko.xz: kernel/net/ipv4/udp_tunnel.ko.xz\n"), true},
		{"built in", "/nonexistent", write("builtin/modules.builtin", "kernel/drivers/net/vxlan/vxlan.ko\n"), true},
		{"absent", "/nonexistent", write("none/modules.dep", "kernel/drivers/net/veth.ko.xz:\n"), false},
		{"no module lists", "/nonexistent", "/nonexistent", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := probeKernel(c.sysModule, c.modulesDir)
			if c.available && err != nil {
				t.Fatalf("probe: %v, want available", err)
			}
			if !c.available && !errors.Is(err, backend.ErrUnavailable) {
				t.Fatalf("probe: %v, want ErrUnavailable", err)
			}
		})
	}
}

// wantLines checks that out (iproute2 output) has exactly the given lines, in any order,
// each matched as a prefix after trimming.
func wantLines(t *testing.T, what, out string, want ...string) {
	t.Helper()
	var got []string
	for l := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			got = append(got, l)
		}
	}
	ok := len(got) == len(want)
	for i := 0; ok && i < len(want); i++ {
		found := false
		for _, g := range got {
			found = found || strings.HasPrefix(g, want[i])
		}
		ok = found
	}
	if !ok {
		t.Errorf("%s:\n got  %q\n want %q", what, got, want)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestBehindNATTheDeviceUsesTheInterfaceAddressAndPublishesPublicIP(t *testing.T) {
	h := newHosts(t, 1)[0]
	h.iface.PublicIP = mustAddr("203.0.113.7") // --public-ip, not on any interface
	startBackend(t, 0, h, testNetwork)
	link, err := h.nl.LinkByName("xnet.1")
	if err != nil {
		t.Fatal(err)
	}
	vx := link.(*netlink.Vxlan)
	if got := vx.SrcAddr.String(); got != "198.18.0.11" {
		t.Errorf("local %s, want the interface address 198.18.0.11", got)
	}
	if got, want := vx.HardwareAddr.String(), backend.VtepMAC(h.iface.PublicIP).String(); got != want {
		t.Errorf("MAC %s, want VtepMAC(PublicIP) %s, which is what the lease publishes", got, want)
	}
}

// reaches pings dst from host h: true if any of three echo requests is answered.
func reaches(t *testing.T, h *testHost, dst netip.Addr) bool {
	t.Helper()
	_, received, err := harness.Ping(t.Context(), h.Namespace, dst, 3, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	return received > 0
}
