package conformance

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/backend/hostgw"
	"github.com/xnet-dev/xnet/backend/udp"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// row is one backend under test.
type row struct {
	name string // its config name, the network config's Backend.Type
	new  backend.Constructor
	// kernelDatapath: the kernel forwards the packets (programs, devices, routes the backend
	// left), not the backend's process, so traffic flows while no backend runs.
	kernelDatapath bool
	// direct runs the backend with the config's Backend.DirectRouting: on the suite's one
	// segment every peer is then routed plain, as host-gw routes them.
	direct bool
}

// testName is the row's name in the test tree.
func (r row) testName() string {
	if r.direct {
		return r.name + "+DirectRouting"
	}
	return r.name
}

// backends is every backend xnetd can run. A new backend joins the suite with one row.
var backends = []row{
	{subnetmgr.BackendEBPF, ebpf.New, true, false},
	{subnetmgr.BackendVXLAN, vxlan.New, true, false},
	{subnetmgr.BackendUDP, udp.New, false, false}, // user space: a stopped daemon forwards nothing
	{subnetmgr.BackendHostGW, hostgw.New, true, false},
	{subnetmgr.BackendWireGuard, wireguard.New, false, false}, // the kernel's forwards alone; this VM runs wireguard-go
	{subnetmgr.BackendEBPF, ebpf.New, true, true},
	{subnetmgr.BackendVXLAN, vxlan.New, true, true},
	{subnetmgr.BackendUDP, udp.New, false, true},
}

// behaviours run in order on one cluster per backend, each starting from where the one before
// left it: every host has every other host's lease and a running backend, unless the
// behaviour says otherwise.
var behaviours = []struct {
	name string
	run  func(t *testing.T, c *cluster)
}{
	{"Mode says how the backend runs and why", modeIsReported},
	{"containers on different hosts reach each other once every host added the others' leases", peersAdded},
	{"adding a lease again changes nothing", leaseAddedAgain},
	{"our own lease given to AddPeer is ignored", ownLeaseIgnored},
	{"a removed peer's containers are unreachable and the other peers' are not", peerRemoved},
	{"removing a lease the backend does not hold is not an error", unknownLeaseRemoved},
	{"a lease the backend cannot program is refused and disturbs nothing", leaseRefused},
	{"traffic to a peer moves its counters and the verdict counters", countersMove},
	{"a restarted backend adopts the datapath", restartAdopts},
	{"after a restart, pruning removes the peers whose leases went away and keeps the others", pruneAfterRestart},
	{"teardown leaves nothing of xnet on the host", teardownLeavesNothing},
}

func TestBackends(t *testing.T) {
	for _, r := range backends {
		t.Run(r.testName(), func(t *testing.T) {
			c := newCluster(t, r)
			for _, b := range behaviours {
				if !t.Run(b.name, func(t *testing.T) { b.run(t, c) }) {
					t.Fatalf("stopped after %q failed: the behaviours after it start from where it left the hosts", b.name)
				}
			}
		})
	}
}

func modeIsReported(t *testing.T, c *cluster) {
	for _, n := range c.hosts {
		if mode, why := n.b.Mode(); mode == "" || why == "" {
			t.Errorf("%s: Mode() = %q, %q: want a mode and a reason", n.Name, mode, why)
		}
	}
}

func peersAdded(t *testing.T, c *cluster) {
	a, last := c.hosts[0], c.hosts[len(c.hosts)-1]
	for _, n := range c.hosts {
		if n == a {
			for _, o := range c.hosts[1 : len(c.hosts)-1] {
				n.addPeers(t, o.lease)
			}
			// What removing or pruning the last host's lease must bring the first one back to.
			c.withoutLast = a.state(t)
			n.addPeers(t, last.lease)
			continue
		}
		n.addPeers(t, c.others(n)...)
	}
	wantReach(t, mesh(c.hosts...)...)
}

func leaseAddedAgain(t *testing.T, c *cluster) {
	for _, n := range c.hosts {
		n.addPeers(t, c.others(n)...)
	}
	wantReach(t, mesh(c.hosts...)...)
}

// ownLeaseIgnored: xnetd's lease watch also reports our own lease. Programmed as a peer's, it
// would send our own containers' traffic back out to ourselves.
func ownLeaseIgnored(t *testing.T, c *cluster) {
	for _, n := range c.hosts {
		n.addPeers(t, n.lease)
	}
	wantReach(t, mesh(c.hosts...)...)
	for _, n := range c.hosts {
		if _, got, err := harness.Ping(t.Context(), n.Namespace, n.container.IP, 3, 100*time.Millisecond); err != nil || got == 0 {
			t.Errorf("%s no longer reaches its own container %s (%v)", n.Name, n.container.IP, err)
		}
	}
}

func peerRemoved(t *testing.T, c *cluster) {
	a, b, gone := c.hosts[0], c.hosts[1], c.hosts[2]
	if err := a.call(func(be backend.Backend) error { return be.RemovePeer(gone.lease) }); err != nil {
		t.Fatal(err)
	}
	wantNoReach(t, path{a, gone})
	wantReach(t, path{a, b}, path{b, a}, path{b, gone}, path{gone, b})
	a.wantState(t, "after RemovePeer, as before AddPeer", c.withoutLast)

	// The lease comes back (the host renewed it late): its containers are reachable again.
	a.addPeers(t, gone.lease)
	wantReach(t, mesh(c.hosts...)...)
}

func unknownLeaseRemoved(t *testing.T, c *cluster) {
	a := c.hosts[0]
	never := c.hosts[2].lease
	never.Subnet = netip.MustParsePrefix("10.244.77.0/24")
	never.PublicIP = netip.MustParseAddr("198.18.0.77")
	for range 2 {
		if err := a.call(func(be backend.Backend) error { return be.RemovePeer(never) }); err != nil {
			t.Errorf("RemovePeer(%v), never added: %v", never.Subnet, err)
		}
	}
	wantReach(t, mesh(c.hosts...)...)
}

// leaseRefused: a lease xnetd's watch delivers may be one this backend cannot program (another
// version's, or written by hand). AddPeer must say so and leave the peers it has alone.
func leaseRefused(t *testing.T, c *cluster) {
	a := c.hosts[0]
	// A lease as a fourth host running this backend would publish it, then spoiled.
	fresh := func(spoil func(*subnetmgr.Lease)) subnetmgr.Lease {
		l := c.hosts[2].lease
		l.Subnet = netip.MustParsePrefix("10.244.200.0/24")
		l.PublicIP = netip.MustParseAddr("198.18.0.200")
		spoil(&l)
		return l
	}
	cases := []struct {
		name  string
		lease subnetmgr.Lease
		skip  string // why the case does not apply to this backend
	}{
		{"IPv6 PublicIP", fresh(func(l *subnetmgr.Lease) { l.PublicIP = netip.MustParseAddr("2001:db8::200") }), ""},
		{"IPv6 subnet", fresh(func(l *subnetmgr.Lease) { l.Subnet = netip.MustParsePrefix("fd00:200::/64") }), ""},
		{"BackendData not JSON", fresh(func(l *subnetmgr.Lease) { l.BackendData = []byte(`{"VNI":`) }),
			skipUnless(a.publishesBackendData(), "the backend publishes no BackendData, so it reads none of its peers'")},
		{"BackendData missing", fresh(func(l *subnetmgr.Lease) { l.BackendData = nil }),
			skipUnless(a.publishesBackendData(), "the backend publishes no BackendData, so it reads none of its peers'")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip != "" {
				t.Skip(tc.skip)
			}
			if err := a.call(func(be backend.Backend) error { return be.AddPeer(tc.lease) }); err == nil {
				t.Errorf("AddPeer(%v via %v, %s) accepted", tc.lease.Subnet, tc.lease.PublicIP, tc.lease.BackendData)
			}
			wantReach(t, mesh(c.hosts...)...)
		})
	}
}

func skipUnless(applies bool, why string) string {
	if applies {
		return ""
	}
	return why
}

func countersMove(t *testing.T, c *cluster) { countersMoveOver(t, c, ipv4) }

// countersMoveOver: echo requests from the first host's container to the second's over f move
// the second host's per-peer counters (named by its lease's ID: its subnet, or its IPv6 subnet
// in an IPv6-only overlay) both ways, and the verdict counters.
func countersMoveOver(t *testing.T, c *cluster, f addrFamily) {
	a, b := c.hosts[0], c.hosts[1]
	src, ok := a.b.(metrics.CounterSource)
	if !ok {
		t.Skip("the backend does not implement metrics.CounterSource")
	}
	if c.row.direct && !c.row.kernelDatapath {
		t.Skip("with DirectRouting on one segment the kernel routes every packet: the backend's process counts none")
	}
	before, err := src.Counters()
	if err != nil {
		t.Fatal(err)
	}
	_, replies, err := harness.Ping(t.Context(), a.container.Namespace, f.of(b.container), 5, 20*time.Millisecond)
	if err != nil || replies == 0 {
		t.Fatalf("%s over %s: %d echo replies (%v)", path{a, b}, f.name, replies, err)
	}
	// A datapath may add a batch's counts after the packets went on (the udp backend does, per
	// batch): the counters must catch up, within a second.
	n := uint64(replies)
	var after metrics.Counters
	for deadline := time.Now().Add(time.Second); ; time.Sleep(20 * time.Millisecond) {
		if after, err = src.Counters(); err != nil {
			t.Fatal(err)
		}
		if sum(after.Verdicts)-sum(before.Verdicts) >= 2*n || time.Now().After(deadline) {
			break
		}
	}
	peer := b.lease.ID()
	was, is := peerCounters(before, peer), peerCounters(after, peer)
	if is == nil {
		t.Fatalf("Counters has no entry for peer %v: %+v", peer, after.Peers)
	}
	if was == nil {
		was = &metrics.PeerCounters{}
	}
	if is.TxPackets-was.TxPackets < n || is.TxBytes <= was.TxBytes {
		t.Errorf("peer %v sent %d packets, %d bytes while %d echo requests went to it, want at least as many", peer, is.TxPackets-was.TxPackets, is.TxBytes-was.TxBytes, n)
	}
	if is.RxPackets-was.RxPackets < n || is.RxBytes <= was.RxBytes {
		t.Errorf("peer %v received %d packets, %d bytes while %d echo replies came from it, want at least as many", peer, is.RxPackets-was.RxPackets, is.RxBytes-was.RxBytes, n)
	}
	if got := sum(after.Verdicts) - sum(before.Verdicts); got < 2*n {
		t.Errorf("the verdict counters moved by %d for %d packets each way: %v -> %v", got, n, before.Verdicts, after.Verdicts)
	}
}

func peerCounters(c metrics.Counters, subnet netip.Prefix) *metrics.PeerCounters {
	for i := range c.Peers {
		if c.Peers[i].Subnet == subnet {
			return &c.Peers[i]
		}
	}
	return nil
}

func sum(m map[string]uint64) uint64 {
	var s uint64
	for _, v := range m {
		s += v
	}
	return s
}

// restartAdopts: xnetd restarts (upgrade, crash) on one host. What it programmed stays in the
// kernel; the new process adopts it.
func restartAdopts(t *testing.T, c *cluster) {
	a := c.hosts[0]
	a.stop(t, false)
	t.Run("traffic keeps flowing while no backend runs", func(t *testing.T) {
		if !c.row.kernelDatapath {
			t.Skip("the datapath is the backend's process: nothing forwards while it is stopped")
		}
		wantReach(t, mesh(c.hosts...)...)
	})
	a.start(t)
	a.addPeers(t, c.others(a)...)
	t.Run("traffic flows again once the new backend has Setup and the same peers", func(t *testing.T) {
		wantReach(t, mesh(c.hosts...)...)
	})
}

// pruneAfterRestart: a host's lease is deleted while xnetd is down on another, so no removal
// event ever tells the restarted process; PrunePeers after the first full lease list must. What
// the prune may remove is the backend's alone: routes an administrator added on the underlay
// NIC that no peer's lease explains (outside the overlay, the whole overlay Network as a
// fallback) stay. A route to a part of the Network is not among them: inside the Network every
// route is the overlay's, and one into our own subnet is what a forged lease leaves behind.
func pruneAfterRestart(t *testing.T, c *cluster) {
	a, kept, gone := c.hosts[0], c.hosts[1], c.hosts[2]
	foreign := []string{
		fmt.Sprintf("192.0.2.0/24 via %s dev eth0", harness.UnderlayGateway),
		fmt.Sprintf("%s via %s dev eth0 metric 100", c.cfg.Network, harness.UnderlayGateway),
	}
	a.stop(t, false)
	for _, r := range foreign {
		a.ip(t, "route add "+r)
	}
	a.start(t)
	a.addPeers(t, kept.lease) // the first full lease list: gone's lease is not in it
	if !reaches(t, path{a, gone}) && !a.routedTo(t, gone.lease.Subnet) {
		t.Fatalf("before the prune nothing of %s's peer %v is left on %s: this checks nothing", a.Name, gone.lease.Subnet, a.Name)
	}
	pruner, ok := a.b.(backend.PeerPruner)
	if !ok {
		t.Skip("the backend does not implement backend.PeerPruner")
	}
	for range 2 { // a second prune finds nothing more to do
		// Our own lease in keep, as the daemon passes every lease it listed, changes nothing.
		if err := a.call(func(backend.Backend) error { return pruner.PrunePeers([]subnetmgr.Lease{a.lease, kept.lease}) }); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range foreign {
		if out, _ := a.Run(t.Context(), "ip", "-4", "route", "show", "exact", strings.Fields(r)[0]); !strings.Contains(out, "via "+harness.UnderlayGateway.String()) {
			t.Errorf("the prune removed the administrator's route %s", r)
			continue
		}
		a.ip(t, "route del "+r)
	}
	wantNoReach(t, path{a, gone})
	wantReach(t, path{a, kept}, path{kept, a})
	a.wantState(t, "after the prune, as before the pruned peer was added", c.withoutLast)
}

func teardownLeavesNothing(t *testing.T, c *cluster) {
	for _, n := range c.hosts {
		if len(n.leftovers(t)) == 0 {
			t.Fatalf("%s shows nothing of the running backend: this checks nothing", n.Name)
		}
		n.stop(t, true)
	}
	for _, n := range c.hosts {
		// Detaching a program whose link pin is gone may complete after unlink returns.
		var left []string
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if left = n.leftovers(t); len(left) == 0 || time.Now().After(deadline) {
				break
			}
		}
		for _, l := range left {
			t.Errorf("%s after Close(true): %s", n.Name, l)
		}
	}
}
