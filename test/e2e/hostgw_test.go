package e2e

import (
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/backend/hostgw"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestHostGWContainersOnThreeHostsReachEachOther(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	var nodes []*dpNode
	for _, h := range topo.Hosts() {
		containers := 1
		if h.Index == 0 {
			containers = 2
		}
		nodes = append(nodes, dpStart(t, h, hostgw.New, dpConfig("host-gw"), containers))
	}
	dpMesh(t, nodes)
	for _, n := range nodes {
		for _, p := range nodes {
			if p == n {
				continue
			}
			want := p.lease.Subnet.String() + " via " + p.host.UnderlayIP.String() + " dev eth0"
			if got := dpRouteTo(t, n.host, p.lease.Subnet); !strings.HasPrefix(got, want) {
				t.Errorf("%s: route %q, want %q", n.host.Name, got, want)
			}
		}
	}
	dpRequireFullMesh(t, nodes)

	t.Run("RemovePeer cuts only that peer", func(t *testing.T) { dpRequireRemovePeerCutsOnlyThatPeer(t, nodes) })
}
