package vxlan

import (
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// TestRestartedBackendPrunesPeersWhoseLeasesWentAway: xnetd programs peers A and B, stops (the
// device and its entries stay), B's lease is deleted meanwhile. A new backend, after Setup and
// PrunePeers([A]), leaves A's route, neighbour and fdb entry and nothing of B's, nor what an
// older build programmed on the device for a forged lease outside the overlay Network: the
// device is xnet's, everything on it not kept goes.
func TestRestartedBackendPrunesPeersWhoseLeasesWentAway(t *testing.T) {
	h := newHosts(t, 1)[0]
	lease := func(i int, publicIP string) subnetmgr.Lease {
		data, err := backend.VXLANLeaseData(1, mustAddr(publicIP))
		if err != nil {
			t.Fatal(err)
		}
		return subnetmgr.Lease{Subnet: subnetOf(i), PublicIP: mustAddr(publicIP), BackendType: "vxlan", BackendData: data}
	}
	local, a, b := leaseOf(t, 0, h), lease(1, "198.18.0.12"), lease(2, "198.18.0.13")

	first, err := NewWithHandle(backend.Options{Iface: h.iface, Config: testNetwork, Logger: testLogger(t)}, h.nl)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Setup(t.Context(), local, testNetwork); err != nil {
		t.Fatal(err)
	}
	for _, l := range []subnetmgr.Lease{a, b} {
		if err := first.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	h.sh(t, "ip", "neigh", "add", "192.0.2.0", "lladdr", "0e:78:c6:12:00:63", "dev", "xnet.1", "nud", "permanent")
	h.sh(t, "ip", "route", "add", "192.0.2.0/24", "via", "192.0.2.0", "dev", "xnet.1", "onlink")
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	second := startBackend(t, 0, h, testNetwork)
	if err := second.AddPeer(a); err != nil { // the first full lease list
		t.Fatal(err)
	}
	routes, neighs, fdb := peerState(t, h)
	wantLines(t, "routes before the prune", routes, "10.244.2.0/24 via 10.244.2.0", "10.244.3.0/24 via 10.244.3.0", "192.0.2.0/24")
	wantLines(t, "neighbours before the prune", neighs, "10.244.2.0 lladdr", "10.244.3.0 lladdr", "192.0.2.0 lladdr")
	wantLines(t, "fdb before the prune", fdb, backend.VtepMAC(a.PublicIP).String(), backend.VtepMAC(b.PublicIP).String())

	for range 2 { // a second prune finds nothing more to do
		if err := second.PrunePeers([]subnetmgr.Lease{local, a}); err != nil {
			t.Fatal(err)
		}
	}
	routes, neighs, fdb = peerState(t, h)
	wantLines(t, "routes", routes, "10.244.2.0/24 via 10.244.2.0 onlink")
	wantLines(t, "neighbours", neighs, "10.244.2.0 lladdr "+backend.VtepMAC(a.PublicIP).String()+" PERMANENT")
	wantLines(t, "fdb", fdb, backend.VtepMAC(a.PublicIP).String()+" dst 198.18.0.12 self permanent")
	if got := h.sh(t, "ip", "-4", "-o", "addr", "show", "dev", "xnet.1"); !strings.Contains(got, "inet 10.244.1.0/32") {
		t.Errorf("our address after the prune: %q, want 10.244.1.0/32 kept", got)
	}
}
