package e2e

import (
	"net/http"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// With the ebpf datapath an operator sees, per peer, the packets and bytes each way, and the
// datapath's verdicts with every drop reason named: from the running daemon, in its metrics,
// and still after the daemon stopped (the counters live in pinned maps).
func TestXnetdStatusShowsPerPeerCountersAndDropReasons(t *testing.T) {
	// The config's "ebpf" means auto: ebpf where it loads, which it does here.
	nodes, topo := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	n := nodes[0]
	peerSubnet := nodes[1].State(t).Lease.Subnet.String()

	check := func(t *testing.T, c xnetdtest.Counters, wantRunning bool) {
		t.Helper()
		if c.Backend != subnetmgr.BackendEBPF || c.Running != wantRunning {
			t.Fatalf("status backend %q running %v, want ebpf running %v (%s)", c.Backend, c.Running, wantRunning, c.Counters)
		}
		if !strings.HasPrefix(c.Counters, "live") {
			t.Errorf("counters %q, want live counters", c.Counters)
		}
		if len(c.Peers) != 1 || c.Peers[0].Subnet != peerSubnet || c.Peers[0].TxPackets == nil ||
			*c.Peers[0].TxPackets < 3 || *c.Peers[0].RxPackets < 3 || *c.Peers[0].TxBytes == 0 || *c.Peers[0].RxBytes == 0 {
			t.Errorf("peer counters %+v, want %s with >= 3 packets each way after the pings", c.Peers, peerSubnet)
		}
		if len(c.Peers) == 1 && !strings.HasPrefix(c.Peers[0].Route, peerSubnet+" via ") {
			t.Errorf("peer route %q, want the BPF routes map's entry for %s", c.Peers[0].Route, peerSubnet)
		}
		if c.Verdicts["encap"] < 3 || c.Verdicts["decap"] < 3 {
			t.Errorf("verdicts %v, want encap and decap >= 3", c.Verdicts)
		}
		if _, ok := c.Drops["spoofed"]; !ok {
			t.Errorf("drops %v do not name the reason \"spoofed\"", c.Drops)
		}
	}

	t.Run("status of the running daemon", func(t *testing.T) {
		c := n.StatusCounters(t)
		check(t, c, true)
		if c.Mode == "" || c.Mode == "ebpf" {
			t.Errorf("mode %q does not say where decapsulation runs", c.Mode)
		}
		// The container that pinged is learned, with the fast path and why.
		if len(c.Endpoints) != 1 || c.Endpoints[0].Address != cs[0].IP.String() || c.Endpoints[0].Path != "fast" ||
			c.Endpoints[0].Bridge != "docker0" || c.Endpoints[0].Veth != cs[0].Veth || !strings.Contains(c.Endpoints[0].Why, "bpf_redirect_peer") {
			t.Errorf("endpoints %+v, want %v on %s (docker0) on the fast path", c.Endpoints, cs[0].IP, cs[0].Veth)
		}
	})

	t.Run("metrics carry the same counters", func(t *testing.T) {
		code, body := n.HTTPGet(t, "/metrics")
		if code != http.StatusOK {
			t.Fatalf("/metrics: HTTP %d", code)
		}
		fams := xnetdtest.ParseMetrics(t, body)
		if v, ok := xnetdtest.Metric(fams, "xnet_peer_packets_total", map[string]string{"peer": peerSubnet, "direction": "tx"}); !ok || v < 3 {
			t.Errorf("xnet_peer_packets_total{peer=%s,direction=tx} = %v (present %v), want >= 3", peerSubnet, v, ok)
		}
		if _, ok := xnetdtest.Metric(fams, "xnet_datapath_drops_total", map[string]string{"reason": "spoofed"}); !ok {
			t.Errorf("xnet_datapath_drops_total{reason=spoofed} missing")
		}
		if v, ok := xnetdtest.Metric(fams, "xnet_backend_info", map[string]string{"backend": "ebpf"}); !ok || v != 1 {
			t.Errorf("xnet_backend_info{backend=ebpf} = %v (present %v)", v, ok)
		}
	})

	t.Run("status after the daemon stopped still shows the datapath's counters", func(t *testing.T) {
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		check(t, n.StatusCounters(t), false)
	})

	t.Run("teardown detaches the datapath and removes its pins", func(t *testing.T) {
		n.Teardown(t, topo)
	})
}
