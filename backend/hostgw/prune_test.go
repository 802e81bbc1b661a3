package hostgw

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// TestRestartedBackendPrunesRoutesOfLeasesThatWentAway: xnetd routes peers A and B, stops (the
// routes stay), B's lease is deleted meanwhile. A new backend, after Setup and PrunePeers([A]),
// keeps A's route and deletes B's and what an older build routed via a peer for forged leases
// (0.0.0.0/1, a subnet outside the overlay, a /25 inside our own subnet), and leaves every
// route that is not a peer's: outside the overlay or over the whole Network via a router, or
// not via a gateway.
func TestRestartedBackendPrunesRoutesOfLeasesThatWentAway(t *testing.T) {
	h := newHosts(t, 1)[0]
	peer := func(i int, ip string) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: subnetOf(i), PublicIP: netip.MustParseAddr(ip), BackendType: "host-gw"}
	}
	local, a, b := leaseOf(0, h), peer(1, "198.18.0.12"), peer(2, "198.18.0.13")

	first, err := NewWithHandle(startOptions(t, h), h.nl)
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
	// Routes that are not ours, on the same NIC.
	for _, r := range [][]string{
		{"192.0.2.0/24", "via", "198.18.0.1"},  // outside the overlay
		{"10.244.0.0/16", "via", "198.18.0.1"}, // the whole Network: someone's fallback
		{"10.244.9.0/24", "dev", "eth0"},       // no gateway
		{"0.0.0.0/1", "via", "198.18.0.1"},     // half the Internet via a router
		// An older build's routes for forged leases pointing at peer A.
		{"10.244.1.128/25", "via", "198.18.0.12"}, // inside our own subnet
		{"128.0.0.0/1", "via", "198.18.0.12"},
		{"198.51.100.0/24", "via", "198.18.0.12"}, // outside the overlay
	} {
		h.sh(t, append([]string{"ip", "route", "add"}, append(r, "dev", "eth0")...)...)
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	second := startBackend(t, 0, h)
	if err := second.AddPeer(a); err != nil { // the first full lease list
		t.Fatal(err)
	}
	for range 2 { // a second prune finds nothing more to do
		if err := second.PrunePeers([]subnetmgr.Lease{local, a}); err != nil {
			t.Fatal(err)
		}
	}
	wantRoutes(t, h,
		"10.244.0.0/16 via 198.18.0.1 dev eth0",
		"10.244.2.0/24 via 198.18.0.12 dev eth0",
		"10.244.9.0/24 dev eth0 scope link")
	for dst, via := range map[string]string{"192.0.2.0/24": "via 198.18.0.1", "0.0.0.0/1": "via 198.18.0.1",
		"128.0.0.0/1": "", "198.51.100.0/24": ""} {
		got := h.sh(t, "ip", "route", "show", dst)
		if via == "" && got != "" {
			t.Errorf("the prune left an older build's route via a peer: %q", got)
		}
		if via != "" && !strings.Contains(got, via) {
			t.Errorf("the prune removed the host's route %s %s: %q", dst, via, got)
		}
	}
}
