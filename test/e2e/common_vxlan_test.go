package e2e

// Helpers for the end-to-end tests that drive a backend directly (no etcd, no xnetd): each host
// gets its backend built inside its namespace from the test process, a lease we fabricate
// (10.244.(i+1).0/24 for host i), docker0 and containers. The daemon's full path is tested
// elsewhere; these tests pin down what the datapath itself does.

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// dpConfig is the network config every host shares.
func dpConfig(backendType string) subnetmgr.Config {
	return subnetmgr.Config{
		Network:   netip.MustParsePrefix("10.244.0.0/16"),
		SubnetLen: 24,
		SubnetMin: netip.MustParseAddr("10.244.1.0"),
		SubnetMax: netip.MustParseAddr("10.244.254.0"),
		Backend:   subnetmgr.BackendConfig{Type: backendType, VNI: 1, Port: 8472},
	}
}

// dpSubnet is the subnet host i leases: 10.244.(i+1).0/24.
func dpSubnet(h *harness.Host) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(h.Index + 1), 0}), 24)
}

// dpGateway is what xnetd would write as --bip: the subnet's first host address.
func dpGateway(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
}

// dpIface is what xnetd would detect for --iface eth0 on host h.
func dpIface(t *testing.T, h *harness.Host) backend.ExternalInterface {
	t.Helper()
	var link netlink.Link
	if err := h.Do(func() (err error) { link, err = netlink.LinkByName("eth0"); return err }); err != nil {
		t.Fatalf("%s: eth0: %v", h.Name, err)
	}
	a := link.Attrs()
	return backend.ExternalInterface{Name: a.Name, Index: a.Index, MTU: a.MTU, MAC: a.HardwareAddr, PublicIP: h.UnderlayIP, IfaceIP: h.UnderlayIP}
}

// dpNode is one host running a backend.
type dpNode struct {
	host    *harness.Host
	backend backend.Backend
	lease   subnetmgr.Lease
}

// dpStart builds the backend with ctor inside h's namespace (its netlink socket stays
// there), publishes its lease attributes in a fabricated lease, runs Setup, then plays Docker
// with the backend's MTU and starts the given number of containers.
func dpStart(t *testing.T, h *harness.Host, ctor backend.Constructor, cfg subnetmgr.Config, containers int) *dpNode {
	t.Helper()
	opts := backend.Options{Iface: dpIface(t, h), Config: cfg, Logger: harness.TestLogger(t).With("host", h.Name)}
	var b backend.Backend
	if err := h.Do(func() (err error) { b, err = ctor(opts); return err }); err != nil {
		t.Fatalf("%s: build backend: %v", h.Name, err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	typ, data, err := b.LeaseAttrs()
	if err != nil {
		t.Fatal(err)
	}
	lease := subnetmgr.Lease{Subnet: dpSubnet(h), PublicIP: h.UnderlayIP, BackendType: typ, BackendData: data,
		Expiration: time.Now().Add(24 * time.Hour)}
	if err := b.Setup(t.Context(), lease, cfg); err != nil {
		t.Fatalf("%s: Setup: %v", h.Name, err)
	}
	if err := h.SetupDocker0(dpGateway(lease.Subnet), b.MTU()); err != nil {
		t.Fatal(err)
	}
	for range containers {
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
	}
	return &dpNode{host: h, backend: b, lease: lease}
}

// dpMesh tells every node about every other node's lease (and its own, which it must ignore).
func dpMesh(t *testing.T, nodes []*dpNode) {
	t.Helper()
	for _, n := range nodes {
		for _, p := range nodes {
			if err := n.backend.AddPeer(p.lease); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.host.Name, p.lease.Subnet, err)
			}
		}
	}
}

// dpReaches pings to from a namespace: true if any of three echo requests is answered.
func dpReaches(t *testing.T, from *harness.Namespace, to netip.Addr) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, received, err := harness.Ping(ctx, from, to, 3, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("ping %v from %s: %v", to, from.Name, err)
	}
	return received > 0
}

// dpAllContainers lists the containers of every dpNode, host by host.
func dpAllContainers(nodes []*dpNode) []*harness.Container {
	var cs []*harness.Container
	for _, n := range nodes {
		cs = append(cs, n.host.Containers()...)
	}
	return cs
}

// dpRequireFullMesh checks every container dpReaches every other container (same host and
// remote), and every host dpReaches every remote container (host-originated traffic).
func dpRequireFullMesh(t *testing.T, nodes []*dpNode) {
	t.Helper()
	cs := dpAllContainers(nodes)
	for _, from := range cs {
		for _, to := range cs {
			if from != to && !dpReaches(t, from.Namespace, to.IP) {
				t.Errorf("container %v on %s cannot reach container %v on %s", from.IP, from.Host.Name, to.IP, to.Host.Name)
			}
		}
	}
	for _, n := range nodes {
		for _, to := range cs {
			if to.Host != n.host && !dpReaches(t, n.host.Namespace, to.IP) {
				t.Errorf("host %s cannot reach container %v on %s", n.host.Name, to.IP, to.Host.Name)
			}
		}
	}
}

// dpRouteTo is `ip route show <subnet>` on a host.
func dpRouteTo(t *testing.T, h *harness.Host, subnet netip.Prefix) string {
	t.Helper()
	out, err := h.Run(t.Context(), "ip", "route", "show", subnet.String())
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// dpRequireRemovePeerCutsOnlyThatPeer: dpNode 0 forgets dpNode 1; dpNode 0's route to it goes, dpNode 0's
// containers no longer reach dpNode 1's, dpNode 2 still does; adding it back restores the path.
func dpRequireRemovePeerCutsOnlyThatPeer(t *testing.T, nodes []*dpNode) {
	t.Helper()
	a, b, c := nodes[0], nodes[1], nodes[2]
	target := b.host.Containers()[0].IP
	if err := a.backend.RemovePeer(b.lease); err != nil {
		t.Fatalf("RemovePeer: %v", err)
	}
	if r := dpRouteTo(t, a.host, b.lease.Subnet); r != "" {
		t.Errorf("%s still routes %v after RemovePeer: %q", a.host.Name, b.lease.Subnet, r)
	}
	if dpReaches(t, a.host.Containers()[0].Namespace, target) {
		t.Errorf("%s's container still dpReaches %v after RemovePeer", a.host.Name, target)
	}
	if !dpReaches(t, c.host.Containers()[0].Namespace, target) {
		t.Errorf("%s's container lost %v when only %s removed the peer", c.host.Name, target, a.host.Name)
	}
	if err := a.backend.AddPeer(b.lease); err != nil {
		t.Fatal(err)
	}
	if !dpReaches(t, a.host.Containers()[0].Namespace, target) {
		t.Errorf("%s's container does not reach %v after the peer came back", a.host.Name, target)
	}
}

// dpNFTables is an nftables connection into a host's namespace.
func dpNFTables(t *testing.T, h *harness.Host) *nftables.Conn {
	t.Helper()
	ns, err := netns.GetFromPath(h.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}
