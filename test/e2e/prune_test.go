package e2e

// A lease deleted while a host's xnetd is down never reaches that host as a removal event: the
// restarted daemon must compare what its datapath still holds with its first lease list and
// drop the rest (backend.PeerPruner). The ebpf case is in reliability_test.go
// (TestReliabilityPeerLeaseGoneLeavesEveryHostWithin5s); this file has the other backends whose
// per-peer state outlives the daemon.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// prVXLANState is what the kernel VXLAN device holds for peers, as iproute2 prints it.
type prVXLANState struct{ routes, neighs, fdb, link string }

func prReadVXLAN(t *testing.T, n *xnetdtest.Node) prVXLANState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	run := func(args ...string) string {
		out, err := n.Run(ctx, args[0], args[1:]...)
		if err != nil {
			t.Fatalf("%s: %s: %v", n.Name, strings.Join(args, " "), err)
		}
		return out
	}
	return prVXLANState{
		routes: run("ip", "route", "show", "dev", "xnet.1"),
		neighs: run("ip", "neigh", "show", "dev", "xnet.1"),
		fdb:    run("bridge", "fdb", "show", "dev", "xnet.1"),
		link:   strings.Fields(run("ip", "-o", "link", "show", "xnet.1"))[0], // "<ifindex>:"
	}
}

// has reports whether the device holds the route, the neighbour or the fdb entry of the peer
// lease (subnet, publicIP), and which.
func (s prVXLANState) has(l subnetmgr.Lease) []string {
	var found []string
	if strings.Contains(s.routes, l.Subnet.String()+" via") {
		found = append(found, "route")
	}
	if strings.Contains(s.neighs, l.Subnet.Addr().String()+" lladdr") {
		found = append(found, "neighbour")
	}
	if strings.Contains(s.fdb, backend.VtepMAC(l.PublicIP).String()+" dst "+l.PublicIP.String()) {
		found = append(found, "fdb entry")
	}
	return found
}

// With the vxlan backend, a host that was down while a peer's lease was deleted comes back
// without that peer's route, neighbour and fdb entry on xnet.1, keeping the device (it is
// adopted, not re-created) and the entries of the peers that are still there.
func TestPruneVXLANHostDownWhileAPeerLeaseWentAwayDropsThatPeerWhenItComesBack(t *testing.T) {
	nodes, topo := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`, "--backend=vxlan")
	down, other := nodes[1], nodes[0]
	cli := topo.EtcdClient()
	sim := rlFreeSubnets(t, topo, 1)[0]
	rlPutPeer(t, cli, sim, rlSimIP(0), time.Hour)
	gone := subnetmgr.Lease{Subnet: sim, PublicIP: rlSimIP(0)}
	stays := subnetmgr.Lease{Subnet: other.State(t).Lease.Subnet, PublicIP: other.UnderlayIP}

	waitFor := func(what string, ok func(prVXLANState) bool) prVXLANState {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			s := prReadVXLAN(t, down)
			if ok(s) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s after 5 s:\nroutes:\n%s\nneighbours:\n%s\nfdb:\n%s", down.Name, what, s.routes, s.neighs, s.fdb)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	before := waitFor("the simulated peer is not programmed", func(s prVXLANState) bool { return len(s.has(gone)) == 3 })

	if err := down.Proc.Kill(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, sim)); err != nil {
		t.Fatal(err)
	}
	if got := prReadVXLAN(t, down).has(gone); len(got) != 3 {
		t.Fatalf("with xnetd down, %s holds only %v of the deleted peer: the test would prove nothing", down.Name, got)
	}

	down.StartDaemon(t)
	start := time.Now()
	down.WaitReady(t)
	after := waitFor("the deleted peer's entries are still there", func(s prVXLANState) bool { return len(s.has(gone)) == 0 })
	t.Logf("%s dropped the route, neighbour and fdb entry of %v %v after it started", down.Name, sim, time.Since(start).Round(time.Millisecond))
	if after.link != before.link {
		t.Errorf("xnet.1 was re-created (ifindex %s, was %s): the entries went with the device, not by pruning", after.link, before.link)
	}
	if got := after.has(stays); len(got) != 3 {
		t.Errorf("the peer that is still there (%v) has only %v left", stays.Subnet, got)
	}
}
