package e2e

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/ipmasq"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestVXLANContainersOnThreeHostsReachEachOther(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	var nodes []*dpNode
	for _, h := range topo.Hosts() {
		containers := 1
		if h.Index == 0 {
			containers = 2 // two on one host: same-host traffic must keep working too
		}
		nodes = append(nodes, dpStart(t, h, vxlan.New, dpConfig("vxlan"), containers))
	}
	dpMesh(t, nodes)
	dpRequireFullMesh(t, nodes)

	t.Run("RemovePeer cuts only that peer", func(t *testing.T) { dpRequireRemovePeerCutsOnlyThatPeer(t, nodes) })
}

// TestVXLANInteroperatesWithFlannel: host 1 is set up by hand exactly as flannel's vxlan
// backend sets up a node (device flannel.1 with a MAC of its choice, one route, neighbour and
// fdb entry per peer); hosts 2 and 3 run our backend and are fed host 1's lease, as etcd would
// give it to them. Containers must reach each other in both directions.
func TestVXLANInteroperatesWithFlannel(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	hosts := topo.Hosts()
	cfg := dpConfig("vxlan")

	var ours []*dpNode
	for _, h := range hosts[1:] {
		ours = append(ours, dpStart(t, h, vxlan.New, cfg, 1))
	}
	flannel := startFlannelVXLAN(t, hosts[0], cfg)
	for _, n := range ours {
		flannel.addPeer(t, n.lease)
		for _, p := range append([]subnetmgr.Lease{flannel.lease}, ours[0].lease, ours[1].lease) {
			if err := n.backend.AddPeer(p); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.host.Name, p.Subnet, err)
			}
		}
	}
	fc := hosts[0].Containers()[0]
	for _, n := range ours {
		c := n.host.Containers()[0]
		if !dpReaches(t, fc.Namespace, c.IP) {
			t.Errorf("flannel host's container %v cannot reach %v on %s (xnet)", fc.IP, c.IP, n.host.Name)
		}
		if !dpReaches(t, c.Namespace, fc.IP) {
			t.Errorf("container %v on %s (xnet) cannot reach the flannel host's container %v", c.IP, n.host.Name, fc.IP)
		}
	}
	// The xnet hosts programmed the flannel host exactly as flannel would: its random MAC,
	// not one derived from its PublicIP.
	neigh, err := hosts[1].Run(t.Context(), "ip", "neigh", "show", "10.244.1.0", "dev", "xnet.1")
	if err != nil || !strings.Contains(neigh, flannel.mac.String()) {
		t.Errorf("neighbour for the flannel host: %q (%v), want lladdr %s", neigh, err, flannel.mac)
	}
}

// flannelNode is a host configured by hand as flannel's vxlan backend would configure it.
type flannelNode struct {
	host  *harness.Host
	mac   net.HardwareAddr
	lease subnetmgr.Lease
}

// startFlannelVXLAN does, with iproute2, what flanneld's vxlan backend does at start: a
// vxlan device flannel.<VNI> with a random MAC, learning off, the subnet's network address as
// /32, up; then docker0 with the overlay MTU and one container. Its lease is what flanneld
// would write to etcd.
func startFlannelVXLAN(t *testing.T, h *harness.Host, cfg subnetmgr.Config) *flannelNode {
	t.Helper()
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		t.Fatal(err)
	}
	mac[0] = mac[0]&^1 | 2 // unicast, locally administered, as flannel's mac.NewHardwareAddr
	subnet := dpSubnet(h)
	iface := dpIface(t, h)
	dev := fmt.Sprintf("flannel.%d", cfg.Backend.VNI)
	err := h.IP(t.Context(),
		fmt.Sprintf("link add %s address %s mtu %d type vxlan id %d dstport %d local %s dev eth0 nolearning",
			dev, mac, iface.MTU-50, cfg.Backend.VNI, cfg.Backend.Port, h.UnderlayIP),
		fmt.Sprintf("addr add %s/32 dev %s", subnet.Addr(), dev),
		fmt.Sprintf("link set %s up", dev))
	if err != nil {
		t.Fatalf("configure %s like flannel: %v", h.Name, err)
	}
	t.Cleanup(func() { _, _ = h.Run(t.Context(), "ip", "link", "del", dev) })
	if err := h.SetupDocker0(dpGateway(subnet), iface.MTU-50); err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddContainer(); err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(subnetmgr.VXLANData{VNI: cfg.Backend.VNI, VtepMAC: mac.String()})
	if err != nil {
		t.Fatal(err)
	}
	return &flannelNode{host: h, mac: mac, lease: subnetmgr.Lease{
		Subnet: subnet, PublicIP: h.UnderlayIP, BackendType: "vxlan", BackendData: data,
		Expiration: time.Now().Add(24 * time.Hour),
	}}
}

// addPeer is flannel's handleSubnetEvents for one added lease: neighbour, fdb, route.
func (f *flannelNode) addPeer(t *testing.T, peer subnetmgr.Lease) {
	t.Helper()
	var data subnetmgr.VXLANData
	if err := json.Unmarshal(peer.BackendData, &data); err != nil {
		t.Fatal(err)
	}
	gw := peer.Subnet.Addr()
	if err := f.host.IP(t.Context(), fmt.Sprintf("neigh replace %s lladdr %s dev flannel.1 nud permanent", gw, data.VtepMAC)); err != nil {
		t.Fatal(err)
	}
	if out, err := f.host.Run(t.Context(), "bridge", "fdb", "replace", data.VtepMAC, "dev", "flannel.1", "dst", peer.PublicIP.String(), "self", "permanent"); err != nil {
		t.Fatalf("bridge fdb replace: %v\n%s", err, out)
	}
	if err := f.host.IP(t.Context(), fmt.Sprintf("route replace %s via %s dev flannel.1 onlink", peer.Subnet, gw)); err != nil {
		t.Fatal(err)
	}
}

// TestVXLANWithIPMasqContainersReachTheOutsideAsTheirHost: with ipmasq on, a container's
// traffic to the underlay (outside the overlay) leaves with its host's address, while traffic
// to a container on another host keeps the container's address.
func TestVXLANWithIPMasqContainersReachTheOutsideAsTheirHost(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	cfg := dpConfig("vxlan")
	var nodes []*dpNode
	for _, h := range topo.Hosts() {
		n := dpStart(t, h, vxlan.New, cfg, 1)
		nodes = append(nodes, n)
		conn, table := dpNFTables(t, h), "xnet-"+topo.ID()
		if err := ipmasq.Setup(conn, table, cfg.Network, n.lease.Subnet); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ipmasq.Teardown(conn, table) })
	}
	dpMesh(t, nodes)
	c1, c2 := nodes[0].host.Containers()[0], nodes[1].host.Containers()[0]
	gateway := netip.MustParseAddr("198.18.0.1") // the underlay namespace's bridge address
	if got := xnetdtest.SourceSeen(t, c1.Namespace, topo.Underlay(), gateway); got != nodes[0].host.UnderlayIP {
		t.Errorf("the underlay saw %v, want the host's %v", got, nodes[0].host.UnderlayIP)
	}
	if got := xnetdtest.SourceSeen(t, c1.Namespace, c2.Namespace, c2.IP); got != c1.IP {
		t.Errorf("the remote container saw %v, want the container's own %v", got, c1.IP)
	}
}
