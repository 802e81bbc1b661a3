package ebpf

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// pinned is what the pinned maps hold for peers, as a restarted xnetd or `xnetd status` sees it.
type pinned struct {
	routes   []netip.Prefix
	counters []netip.Addr
	nexthops []netip.Addr
}

func readPinned(t *testing.T, dir string) pinned {
	t.Helper()
	m, err := maps.OpenPinned(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var p pinned
	routes, err := m.ListRoutes()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		p.routes = append(p.routes, r.Subnet)
	}
	peers, err := m.ReadPeers()
	if err != nil {
		t.Fatal(err)
	}
	for ip := range peers {
		p.counters = append(p.counters, ip)
	}
	if p.nexthops, err = m.ListNexthops(); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(p.routes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	slices.SortFunc(p.counters, netip.Addr.Compare)
	slices.SortFunc(p.nexthops, netip.Addr.Compare)
	return p
}

// TestPruneKeepsCountersAndNextHopsOfKeptPublicIPs: what a user sees of a prune (the pruned
// peer unreachable, the kept one reachable) is backend/conformance's; this is what the pinned
// maps hold. xnetd programs peers A, B and an older subnet of A's host, then stops. While it is
// down B's lease and the older subnet are deleted. A new backend on the same pins, after Setup
// and PrunePeers([A]), holds only A: its route, and, keyed by PublicIP, its counters (with
// their counts) and its cached next hop; our config is untouched.
func TestPruneKeepsCountersAndNextHopsOfKeptPublicIPs(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1})
	h := topo.Hosts()[0]
	local := vxlanLease(t, "10.244.1.0/24", h.UnderlayIP.String())
	a := vxlanLease(t, "10.244.2.0/24", "198.18.0.12")
	b := vxlanLease(t, "10.244.3.0/24", "198.18.0.13")
	aOld := vxlanLease(t, "10.244.4.0/24", "198.18.0.12") // A's host's earlier subnet, gone too

	first := startOn(t, h, local)
	for _, l := range []subnetmgr.Lease{a, b, aOld} {
		if err := first.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	// What the encap program leaves behind after sending to both peers: cached next hops and
	// counts.
	for _, ip := range []netip.Addr{a.PublicIP, b.PublicIP} {
		if err := first.m.Nexthops.Put(ip.As16(), bpf.XnetNexthop{Ifindex: 2, Expires: 1 << 62}); err != nil {
			t.Fatal(err)
		}
	}
	sent := make([]bpf.XnetPeerStats, len(mustPerCPU(t, first.m, a.PublicIP)))
	sent[0].TxPackets = 7
	if err := first.m.Peers.Put(a.PublicIP.As16(), sent); err != nil {
		t.Fatal(err)
	}
	before := readPinned(t, h.BPFFS)
	if len(before.routes) != 3 || len(before.counters) != 2 || len(before.nexthops) != 2 {
		t.Fatalf("before the restart: %+v, want 3 routes, 2 counter entries, 2 next hops", before)
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	second := startOn(t, h, local)
	t.Cleanup(func() { _ = second.Close(true) })
	// Setup and the first full list (which re-adds A) leave B as it was: nothing names it.
	if err := second.AddPeer(a); err != nil {
		t.Fatal(err)
	}
	if got := readPinned(t, h.BPFFS); !reflect.DeepEqual(got, before) {
		t.Fatalf("after Setup and AddPeer(A): %+v, want it unchanged %+v", got, before)
	}
	// Our own lease in keep (the daemon may pass every lease it listed) changes nothing.
	for range 2 { // and a second prune finds nothing more to do
		if err := second.PrunePeers([]subnetmgr.Lease{local, a}); err != nil {
			t.Fatal(err)
		}
	}
	want := pinned{routes: []netip.Prefix{a.Subnet}, counters: []netip.Addr{a.PublicIP}, nexthops: []netip.Addr{a.PublicIP}}
	if got := readPinned(t, h.BPFFS); !reflect.DeepEqual(got, want) {
		t.Fatalf("after PrunePeers([A]): %+v, want %+v", got, want)
	}
	st, err := second.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Peers[a.PublicIP.String()].TxPackets != 7 {
		t.Errorf("A's counters after the prune: %+v, want its 7 packets kept", st.Peers)
	}
	cfg, ok, err := second.m.GetConfig()
	if err != nil || !ok || cfg.Subnet != local.Subnet {
		t.Errorf("config after the prune: %+v ok=%v err=%v, want our subnet %v", cfg, ok, err, local.Subnet)
	}
	c, err := second.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Peers) != 1 || c.Peers[0].Subnet != a.Subnet {
		t.Errorf("metrics peers after the prune: %+v, want only %v", c.Peers, a.Subnet)
	}
}

func mustPerCPU(t *testing.T, m *maps.Maps, ip netip.Addr) []bpf.XnetPeerStats {
	t.Helper()
	var per []bpf.XnetPeerStats
	if err := m.Peers.Lookup(ip.As16(), &per); err != nil {
		t.Fatal(err)
	}
	return per
}
