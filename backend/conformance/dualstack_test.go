package conformance

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// dualBehaviours are the behaviours of a dual-stack overlay (EnableIPv6), run in order on one
// dual-stack cluster per backend that implements backend.DualStack (the others are skipped:
// xnetd refuses EnableIPv6 with them). As in behaviours, each starts where the one before left
// the hosts. The second host has no IPv6 underlay (cluster_test.go): a VXLAN-speaking backend
// reaches it over IPv6 all the same, inside its IPv4 VXLAN, and wireguard inside its IPv4
// tunnel (xnet-wg; the other two hosts reach each other's IPv6 on xnet-wg-v6, over the IPv6
// underlay); host-gw cannot, and must not.
var dualBehaviours = []struct {
	name string
	run  func(t *testing.T, c *cluster)
}{
	{"containers reach each other over IPv6 (ICMPv6, TCP both ways) and IPv4 once every host added the others' dual-stack leases", dualPeersAdded},
	{"IPv6 between hosts with an IPv6 underlay crosses it as VXLAN over IPv6, to a host without one inside the IPv4 VXLAN", dualUnderlayTaken},
	{"adding a dual-stack lease again changes nothing", dualLeaseAddedAgain},
	{"a removed peer's IPv6 state goes and the other peers' stays", dualPeerRemoved},
	{"a peer whose lease loses its IPv6 subnet is reached over IPv4 only", dualPeerLosesIPv6},
	{"a restarted backend adopts the IPv6 datapath", dualRestartAdopts},
	{"after a restart, pruning removes the IPv6 state of leases that went away and keeps the rest", dualPruneAfterRestart},
	{"teardown leaves nothing of xnet on the host, IPv6 included", teardownLeavesNothing},
}

func TestDualStack(t *testing.T) {
	for _, r := range backends {
		t.Run(r.testName(), func(t *testing.T) {
			c := newDualCluster(t, r)
			for _, b := range dualBehaviours {
				if !t.Run(b.name, func(t *testing.T) { b.run(t, c) }) {
					t.Fatalf("stopped after %q failed: the behaviours after it start from where it left the hosts", b.name)
				}
			}
		})
	}
}

// carriesIPv6 says whether the backend can carry p's IPv6: a VXLAN-speaking one or wireguard
// carries it inside its own encapsulation from any host; host-gw routes it on the IPv6
// underlay, so both hosts need one (and publish it).
func carriesIPv6(p path) bool {
	switch p.from.lease.BackendType {
	case subnetmgr.BackendVXLAN, subnetmgr.BackendWireGuard:
		return true
	}
	return p.from.lease.PublicIPv6.IsValid() && p.to.lease.PublicIPv6.IsValid()
}

// wantIPv6 checks the IPv6 of each path: echo replies where the backend carries it, none where
// it does not.
func wantIPv6(t *testing.T, paths ...path) {
	t.Helper()
	var carried, not []path
	for _, p := range paths {
		if carriesIPv6(p) {
			carried = append(carried, p)
		} else {
			not = append(not, p)
		}
	}
	wantReachOver(t, ipv6, carried...)
	wantNoReachOver(t, ipv6, not...)
}

// wantTCP6 checks 1 MB of TCP crosses each path's IPv6 both ways, full-size segments included.
func wantTCP6(t *testing.T, paths ...path) {
	t.Helper()
	var carried []path
	for _, p := range paths {
		if carriesIPv6(p) {
			carried = append(carried, p)
		}
	}
	errs := make(chan error, len(carried))
	for _, p := range checkPaths(t, carried, func(ctx context.Context, p path) bool {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		err := harness.TCPExchange(ctx, p.from.container.Namespace, p.to.container.Namespace, p.to.container.IPv6, 1<<20)
		if err != nil {
			errs <- fmt.Errorf("%s: %w", p, err)
		}
		return err == nil
	}) {
		t.Errorf("%s: TCP over IPv6: %v", p, <-errs)
	}
}

func dualPeersAdded(t *testing.T, c *cluster) {
	peersAdded(t, c) // IPv4 reaches the whole mesh, and c.withoutLast holds IPv6 state too
	mesh := mesh(c.hosts...)
	wantIPv6(t, mesh...)
	wantTCP6(t, mesh...)
}

// dualUnderlayTaken proves the path on the wire: a count of the VXLAN datagrams on the first
// host's underlay NIC while its container exchanges IPv6 (echo and 1 MB of TCP) with each
// peer's. To the third host (both have an IPv6 underlay and publish their IPv6 VTEPs, as
// flannel's dual stack does) the datagrams are UDP over IPv6; to the second (no IPv6 underlay)
// they are IPv4 VXLAN carrying IPv6; and never the other way.
func dualUnderlayTaken(t *testing.T, c *cluster) {
	a, noV6, v6 := c.hosts[0], c.hosts[withoutIPv6Underlay], c.hosts[2]
	if a.lease.BackendType != subnetmgr.BackendVXLAN || !a.lease.PublicIPv6.IsValid() || !v6.lease.PublicIPv6.IsValid() {
		t.Skipf("%s publishes no IPv6 VTEP (%s, PublicIPv6 %v): nothing of it crosses the IPv6 underlay as VXLAN",
			c.row.testName(), a.lease.BackendType, a.lease.PublicIPv6)
	}
	over6 := harness.VXLANKind{Underlay6: true, Inner6: true}
	over4 := harness.VXLANKind{Inner6: true}
	type want struct {
		to        *node
		want, not harness.VXLANKind
		plain     bool // no VXLAN at all: IPv6 routed plain on the IPv6 segment
	}
	wants := []want{{v6, over6, over4, false}, {noV6, over4, over6, false}}
	if c.row.direct {
		// vxlan and ebpf with DirectRouting route IPv6 plain between hosts on one IPv6
		// segment, as flannel does; the host without an IPv6 underlay publishes no
		// PublicIPv6 to route it via, and gets it in VXLAN over IPv4.
		wants[0].plain = true
	}
	for _, w := range wants {
		p := path{a, w.to}
		count, err := a.CountVXLAN("eth0", c.cfg.Backend.Port)
		if err != nil {
			t.Fatal(err)
		}
		wantReachOver(t, ipv6, p, path{w.to, a})
		wantTCP6(t, p, path{w.to, a})
		got := count.Stop()
		if w.plain {
			if got[w.want] != 0 || got[w.not] != 0 {
				t.Errorf("%s: on %s's underlay NIC %d datagrams of %s and %d of %s (all: %v); want IPv6 routed plain, no VXLAN",
					p, a.Name, got[w.want], w.want, got[w.not], w.not, got)
			}
			continue
		}
		if got[w.want] == 0 || got[w.not] != 0 {
			t.Errorf("%s: on %s's underlay NIC %d datagrams of %s and %d of %s (all: %v); want some of the first, none of the second",
				p, a.Name, got[w.want], w.want, got[w.not], w.not, got)
		}
		// The TCP exchange leaves as GSO packets, segmented after the underlay NIC (a veth
		// passes UDP-tunnel GSO on): frames above its MTU. Over IPv6 that needs the
		// kernel to mark them UDP-tunnel GSO with checksums, which only a vxlan device does.
		if largest := count.LargestSent()[w.want]; largest <= 1500+14 {
			t.Errorf("%s: the largest datagram of %s %s's underlay NIC sent is %d bytes: want GSO packets above the MTU", p, w.want, a.Name, largest)
		}
	}
}

func dualLeaseAddedAgain(t *testing.T, c *cluster) {
	before := c.hosts[0].state(t)
	for _, n := range c.hosts {
		n.addPeers(t, c.others(n)...)
	}
	c.hosts[0].wantState(t, "after adding every lease again", before)
	wantIPv6(t, mesh(c.hosts...)...)
}

func dualPeerRemoved(t *testing.T, c *cluster) {
	a, b, gone := c.hosts[0], c.hosts[1], c.hosts[2]
	if err := a.call(func(be backend.Backend) error { return be.RemovePeer(gone.lease) }); err != nil {
		t.Fatal(err)
	}
	wantNoReachOver(t, ipv6, path{a, gone})
	wantIPv6(t, path{a, b}, path{b, a}, path{b, gone}, path{gone, b})
	a.wantState(t, "after RemovePeer, as before AddPeer", c.withoutLast)

	a.addPeers(t, gone.lease)
	wantIPv6(t, mesh(c.hosts...)...)
}

// dualPeerLosesIPv6: a peer's lease is rewritten without its IPv6 subnet (the host restarted
// IPv4 only). Its IPv4 stays reachable; nothing of its IPv6 subnet stays on us.
func dualPeerLosesIPv6(t *testing.T, c *cluster) {
	a, gone := c.hosts[0], c.hosts[2]
	v4only := gone.lease
	v4only.IPv6Subnet, v4only.PublicIPv6, v4only.BackendV6Data = netip.Prefix{}, netip.Addr{}, nil
	a.addPeers(t, v4only)
	wantReach(t, path{a, gone}, path{gone, a})
	wantNoReachOver(t, ipv6, path{a, gone})
	for _, l := range a.state(t) {
		if strings.Contains(l, gone.lease.IPv6Subnet.Addr().String()) {
			t.Errorf("%s still shows %q for %s's former IPv6 subnet %v", a.Name, l, gone.Name, gone.lease.IPv6Subnet)
		}
	}
	a.addPeers(t, gone.lease)
	wantIPv6(t, mesh(c.hosts...)...)
}

func dualRestartAdopts(t *testing.T, c *cluster) {
	a := c.hosts[0]
	a.stop(t, false)
	t.Run("IPv6 keeps flowing while no backend runs", func(t *testing.T) {
		if !c.row.kernelDatapath {
			t.Skip("the datapath is the backend's process: nothing forwards while it is stopped")
		}
		wantIPv6(t, mesh(c.hosts...)...)
	})
	a.start(t)
	a.addPeers(t, c.others(a)...)
	t.Run("IPv6 flows again once the new backend has Setup and the same peers", func(t *testing.T) {
		wantIPv6(t, mesh(c.hosts...)...)
		wantTCP6(t, path{a, c.hosts[2]}, path{c.hosts[2], a})
	})
}

// dualPruneAfterRestart is pruneAfterRestart for IPv6: the lease that goes while xnetd is down
// is a dual-stack one (with an IPv6 underlay), the one that stays has none, and the
// administrator's IPv6 routes on the underlay NIC (outside the IPv6Network, and the whole
// IPv6Network as a fallback) stay.
func dualPruneAfterRestart(t *testing.T, c *cluster) {
	a, kept, gone := c.hosts[0], c.hosts[1], c.hosts[2]
	foreign := []string{
		fmt.Sprintf("2001:db8::/64 via %s dev eth0", harness.UnderlayGatewayV6),
		fmt.Sprintf("%s via %s dev eth0 metric 100", c.cfg.IPv6Network, harness.UnderlayGatewayV6),
	}
	a.stop(t, false)
	for _, r := range foreign {
		a.ip(t, "route add "+r)
	}
	a.start(t)
	a.addPeers(t, kept.lease)
	routed := false
	for _, l := range a.state(t) {
		routed = routed || strings.Contains(l, gone.lease.IPv6Subnet.String())
	}
	if !routed && !reachesOver(t, ipv6, path{a, gone}) {
		t.Fatalf("before the prune nothing of %s's IPv6 subnet %v is left on %s: this checks nothing", gone.Name, gone.lease.IPv6Subnet, a.Name)
	}
	pruner, ok := a.b.(backend.PeerPruner)
	if !ok {
		t.Skip("the backend does not implement backend.PeerPruner")
	}
	for range 2 {
		if err := a.call(func(backend.Backend) error { return pruner.PrunePeers([]subnetmgr.Lease{a.lease, kept.lease}) }); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range foreign {
		if out, _ := a.Run(t.Context(), "ip", "-6", "route", "show", "exact", strings.Fields(r)[0]); !strings.Contains(out, "via "+harness.UnderlayGatewayV6.String()) {
			t.Errorf("the prune removed the administrator's route %s", r)
			continue
		}
		a.ip(t, "route del "+r)
	}
	wantNoReachOver(t, ipv6, path{a, gone})
	wantIPv6(t, path{a, kept}, path{kept, a})
	wantReach(t, path{a, kept}, path{kept, a})
	a.wantState(t, "after the prune, as before the pruned peer was added", c.withoutLast)
}
