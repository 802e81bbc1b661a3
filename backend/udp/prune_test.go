package udp

import (
	"context"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// TestRestartedBackendPrunesRoutesOfLeasesThatWentAway: xnetd routes peers A and B into xnet0,
// stops (the persistent TUN keeps the routes), B's lease is deleted meanwhile. A new backend,
// after Setup and PrunePeers([A]), keeps A's route and deletes B's, and what an older build
// routed into xnet0 for forged leases (outside the overlay, the whole Network): xnet0 is xnet's,
// everything on it not kept goes.
func TestRestartedBackendPrunesRoutesOfLeasesThatWentAway(t *testing.T) {
	ns := newNS(t)
	a, b := testLease("10.244.2.0/24", h2IP), testLease("10.244.3.0/24", h3IP)
	first := newIn(t, ns, Tuning{Queues: 1})
	if err := first.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	for _, l := range []subnetmgr.Lease{a, b} {
		if err := first.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	ns.ip(t, "route add 192.0.2.0/24 dev xnet0")
	ns.ip(t, "route add 10.244.0.0/16 dev xnet0")
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	second := newIn(t, ns, Tuning{Queues: 1})
	if err := second.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	if err := second.AddPeer(a); err != nil { // the first full lease list
		t.Fatal(err)
	}
	for range 2 { // a second prune finds nothing more to do
		if err := second.PrunePeers([]subnetmgr.Lease{ownLease(), a}); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for l := range strings.SplitSeq(strings.TrimSpace(ns.ip(t, "-4 route show dev xnet0")), "\n") {
		got = append(got, strings.Fields(l)[0])
	}
	if want := "10.244.2.0/24"; strings.Join(got, " ") != want {
		t.Errorf("routes into xnet0 after the prune: %v, want %s", got, want)
	}
	if c := second.Counters(); len(c.Peers) != 1 || c.Peers[0].Subnet != a.Subnet {
		t.Errorf("peers after the prune: %+v, want only %v", c.Peers, a.Subnet)
	}
}
