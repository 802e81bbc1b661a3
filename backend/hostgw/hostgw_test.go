package hostgw

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var testNetwork = subnetmgr.Config{
	Network:   netip.MustParsePrefix("10.244.0.0/16"),
	SubnetLen: 24,
	Backend:   subnetmgr.BackendConfig{Type: "host-gw"},
}

// subnetOf is host i's lease subnet: 10.244.(i+1).0/24.
func subnetOf(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
}

func leaseOf(i int, h *testHost) subnetmgr.Lease {
	return subnetmgr.Lease{Subnet: subnetOf(i), PublicIP: h.iface.PublicIP, BackendType: "host-gw", BackendData: json.RawMessage("null")}
}

func startOptions(t *testing.T, h *testHost) backend.Options {
	return backend.Options{Iface: h.iface, Config: testNetwork, Logger: harness.TestLogger(t)}
}

func startBackend(t *testing.T, i int, h *testHost) *Backend {
	t.Helper()
	b, err := NewWithHandle(startOptions(t, h), h.nl)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(t.Context(), leaseOf(i, h), testNetwork); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}

// overlayRoutes is `ip route` restricted to the overlay Network, one route per line.
func overlayRoutes(t *testing.T, h *testHost) []string {
	t.Helper()
	var routes []string
	for l := range strings.SplitSeq(h.sh(t, "ip", "-4", "route", "show", "root", "10.244.0.0/16"), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			routes = append(routes, l)
		}
	}
	return routes
}

func wantRoutes(t *testing.T, h *testHost, want ...string) {
	t.Helper()
	got := overlayRoutes(t, h)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("overlay routes:\n got  %q\n want %q", got, want)
	}
}

func TestLeaseAttrsAndMTU(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h)
	typ, data, err := b.LeaseAttrs()
	if err != nil || typ != "host-gw" || string(data) != "null" {
		t.Errorf("LeaseAttrs = %q %s %v, want host-gw null", typ, data, err)
	}
	if b.MTU() != h.iface.MTU {
		t.Errorf("MTU = %d, want the NIC's %d", b.MTU(), h.iface.MTU)
	}
}

func TestPeerSubnetIsRoutedViaItsPublicIP(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h)
	peer := func(ip, typ string) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: subnetOf(4), PublicIP: netip.MustParseAddr(ip), BackendType: typ}
	}
	steps := []struct {
		name   string
		do     func() error
		routes []string
	}{
		{"a host-gw peer gets a route", func() error { return b.AddPeer(peer("198.18.0.15", "host-gw")) },
			[]string{"10.244.5.0/24 via 198.18.0.15 dev eth0"}},
		{"adding it again changes nothing", func() error { return b.AddPeer(peer("198.18.0.15", "host-gw")) },
			[]string{"10.244.5.0/24 via 198.18.0.15 dev eth0"}},
		{"a new PublicIP replaces the route", func() error { return b.AddPeer(peer("198.18.0.16", "host-gw")) },
			[]string{"10.244.5.0/24 via 198.18.0.16 dev eth0"}},
		{"a vxlan peer is routed to its PublicIP too (as flannel does)", func() error { return b.AddPeer(peer("198.18.0.17", "vxlan")) },
			[]string{"10.244.5.0/24 via 198.18.0.17 dev eth0"}},
		{"our own lease is ignored", func() error { return b.AddPeer(leaseOf(0, h)) },
			[]string{"10.244.5.0/24 via 198.18.0.17 dev eth0"}},
		{"an older lease of this host (our PublicIP, another subnet) is ignored", func() error { return b.AddPeer(leaseOf(8, h)) },
			[]string{"10.244.5.0/24 via 198.18.0.17 dev eth0"}},
		{"removal with an older lease still removes the route", func() error { return b.RemovePeer(peer("198.18.0.15", "host-gw")) },
			nil},
		{"removing again is fine", func() error { return b.RemovePeer(peer("198.18.0.15", "host-gw")) },
			nil},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		t.Run(s.name, func(t *testing.T) { wantRoutes(t, h, s.routes...) })
	}
}

func TestPeerOffOurSegmentIsRefusedWithAReason(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h)
	far := subnetmgr.Lease{Subnet: subnetOf(7), PublicIP: netip.MustParseAddr("203.0.113.9"), BackendType: "host-gw"}
	err := b.AddPeer(far)
	if !errors.Is(err, ErrUnreachablePeer) {
		t.Fatalf("AddPeer(off-segment peer) = %v, want ErrUnreachablePeer", err)
	}
	for _, want := range []string{"10.244.8.0/24", "203.0.113.9", "eth0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	wantRoutes(t, h)
}

// A peer that moves off our segment (its lease names a PublicIP outside eth0's subnets) loses
// its route, is listed in Status with the reason, and gets its route back when it returns.
func TestPeerLeavingOurSegmentIsReportedAndRoutedAgainOnReturn(t *testing.T) {
	h := newHosts(t, 1)[0]
	b := startBackend(t, 0, h)
	peer := func(ip string) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: subnetOf(4), PublicIP: netip.MustParseAddr(ip), BackendType: "host-gw"}
	}
	if err := b.AddPeer(peer("198.18.0.15")); err != nil {
		t.Fatal(err)
	}
	if err := b.AddPeer(peer("203.0.113.15")); !errors.Is(err, ErrUnreachablePeer) {
		t.Fatalf("AddPeer(moved off our segment) = %v, want ErrUnreachablePeer", err)
	}
	wantRoutes(t, h)
	if why := b.Status().Unreachable["10.244.5.0/24"]; !strings.Contains(why, "203.0.113.15 is in no subnet of eth0 (198.18.0.0/24)") {
		t.Errorf("Status().Unreachable[10.244.5.0/24] = %q, want the reason", why)
	}
	if err := b.AddPeer(peer("198.18.0.16")); err != nil {
		t.Fatal(err)
	}
	wantRoutes(t, h, "10.244.5.0/24 via 198.18.0.16 dev eth0")
	if st := b.Status(); len(st.Unreachable) != 0 {
		t.Errorf("Status() = %+v after the peer came back, want no unreachable peer", st)
	}
}

func TestTeardownRemovesOverlayRoutesOnly(t *testing.T) {
	h := newHosts(t, 1)[0]
	h.sh(t, "ip", "route", "add", "192.0.2.0/24", "via", "198.18.0.1", "dev", "eth0")
	b := startBackend(t, 0, h)
	if err := b.AddPeer(subnetmgr.Lease{Subnet: subnetOf(2), PublicIP: netip.MustParseAddr("198.18.0.13"), BackendType: "host-gw"}); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	wantRoutes(t, h, "10.244.3.0/24 via 198.18.0.13 dev eth0")

	b = startBackend(t, 0, h) // a restarted daemon tears down what the last one left
	if err := b.Close(true); err != nil {
		t.Fatal(err)
	}
	wantRoutes(t, h)
	if got := h.sh(t, "ip", "route", "show", "192.0.2.0/24"); !strings.Contains(got, "via 198.18.0.1") {
		t.Errorf("teardown removed a route outside the overlay: %q", got)
	}
}

func TestAHostReachesAPeerSubnetWithoutEncapsulation(t *testing.T) {
	hosts := newHosts(t, 2)
	a, b := hosts[0], hosts[1]
	b.sh(t, "ip", "addr", "add", "10.244.2.1/32", "dev", "lo") // stands for b's docker0 gateway
	ba := startBackend(t, 0, a)
	startBackend(t, 1, b)
	if err := ba.AddPeer(leaseOf(1, b)); err != nil {
		t.Fatal(err)
	}
	if !reaches(t, a, netip.MustParseAddr("10.244.2.1")) {
		t.Fatal("a cannot reach 10.244.2.1 on b through the route")
	}
	if err := ba.RemovePeer(leaseOf(1, b)); err != nil {
		t.Fatal(err)
	}
	// Without our route a's packets follow its default route to the underlay gateway, which
	// knows nothing of 10.244.0.0/16.
	if reaches(t, a, netip.MustParseAddr("10.244.2.1")) {
		t.Fatal("a still reaches 10.244.2.1 after RemovePeer")
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
