// Package ipv6 holds the end-to-end tests of IPv6 overlays with the real xnetd binary: dual
// stack, IPv6-only (with and without an IPv4 underlay), and peer health over IPv6. Tests that
// need a real dockerd live in test/e2e/docker, whatever the address family; WireGuard's IPv6
// cases stay with the rest of WireGuard in test/e2e. It is a package of its own so that go test
// runs it beside the others (see test/e2e/xnetdtest for the helpers they share).
package ipv6

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// A dual-stack overlay on three hosts, per backend: leases in flannel's dual-stack keys, the
// files Docker reads, and containers reaching each other over IPv6 (ping, TCP both ways) and
// still over IPv4. ipv6Underlay gives the hosts IPv6 underlay addresses (PublicIPv6): host-gw
// needs them, the VXLAN-speaking backends and wireguard carry IPv6 over the IPv4 underlay
// without (wireguard with them runs flannel's separate mode: IPv6 on xnet-wg-v6 over the IPv6
// underlay).
func TestDualStackThreeHosts(t *testing.T) {
	for _, tc := range []struct {
		backend      string
		ipv6Underlay bool
	}{
		{"ebpf", false},
		{"ebpf", true},
		{"vxlan", false},
		{"vxlan", true},
		{"udp", false},
		{"host-gw", true},
		{"wireguard", false},
		{"wireguard", true},
	} {
		name := tc.backend
		if tc.ipv6Underlay {
			name += "+ipv6-underlay"
		}
		t.Run(name, func(t *testing.T) {
			nodes, topo := xnetdtest.ClusterOn(t, harness.Options{Hosts: 3, IPv6Underlay: tc.ipv6Underlay},
				fmt.Sprintf(xnetdtest.DualStackConfig, tc.backend), "--backend", tc.backend)
			// Only backends that take IPv6 on the IPv6 underlay publish PublicIPv6 (and
			// BackendV6Data): flannel reads the pair as an IPv6 VTEP.
			vtep6 := tc.backend == "vxlan" || tc.backend == "ebpf" || tc.backend == "wireguard"
			publishes := tc.ipv6Underlay && (vtep6 || tc.backend == "host-gw")
			checkDualLeases(t, topo, nodes, publishes, publishes && vtep6)
			cs := xnetdtest.Containers(t, nodes)
			for _, c := range cs {
				if !c.IPv6.IsValid() {
					t.Fatalf("container on %s has no IPv6 address: the subnet file lacks the IPv6 subnet", c.Host.Name)
				}
				opts, err := os.ReadFile(c.Host.DockerOptsFile())
				if err != nil || !strings.Contains(string(opts), "--ipv6 --fixed-cidr-v6=fd00:10:244:") {
					t.Errorf("%s: Docker options %q (%v): want --ipv6 --fixed-cidr-v6", c.Host.Name, opts, err)
				}
			}
			if failed := xnetdtest.DualStackMesh(cs); len(failed) > 0 {
				t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
			}
			harness.TransferIntact(t, cs[0], cs[1], cs[1].IPv6, 8<<20)
			harness.TransferIntact(t, cs[2], cs[0], cs[0].IPv6, 8<<20)
		})
	}
}

// checkDualLeases: each host's key is flannel's "<v4>-<len>&<v6>-<len>", with PublicIPv6 when
// publishes (BackendV6Data too with v6Data), the IPv6 subnets differ, and the daemons' status
// shows them.
func checkDualLeases(t *testing.T, topo *harness.Topology, nodes []*xnetdtest.Node, publishes, v6Data bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := topo.EtcdClient().Get(ctx, subnetmgr.SubnetsPrefix(xnetdtest.EtcdPrefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Prefix]bool{}
	for _, kv := range resp.Kvs {
		v4, v6, err := subnetmgr.ParseDualSubnetKey(xnetdtest.EtcdPrefix, string(kv.Key))
		if err != nil || !v6.IsValid() || seen[v6] {
			t.Errorf("key %s (%v %v %v): want a dual-stack key with its own IPv6 subnet", kv.Key, v4, v6, err)
		}
		seen[v6] = true
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		if err != nil || attrs.PublicIPv6.IsValid() != publishes || (len(attrs.BackendV6Data) > 0) != v6Data {
			t.Errorf("key %s value %s: PublicIPv6 and BackendV6Data present %v %v, want %v %v", kv.Key, kv.Value,
				attrs.PublicIPv6.IsValid(), len(attrs.BackendV6Data) > 0, publishes, v6Data)
		}
	}
	if len(seen) != len(nodes) {
		t.Errorf("%d dual-stack keys, want %d", len(seen), len(nodes))
	}
	for _, n := range nodes {
		var st struct {
			IPv6Network netip.Prefix `json:"ipv6_network"`
			Lease       struct {
				IPv6Subnet netip.Prefix `json:"ipv6_subnet"`
			} `json:"lease"`
			Peers []struct {
				IPv6Subnet netip.Prefix `json:"ipv6_subnet"`
				Refused    string       `json:"refused"`
				Error      string       `json:"error"`
			} `json:"peers"`
		}
		n.StatusInto(t, &st)
		if !seen[st.Lease.IPv6Subnet] || st.IPv6Network.String() != "fd00:10:244::/56" {
			t.Errorf("%s status: IPv6 network %v, lease IPv6 subnet %v", n.Name, st.IPv6Network, st.Lease.IPv6Subnet)
		}
		for _, p := range st.Peers {
			if !seen[p.IPv6Subnet] || p.Refused != "" || p.Error != "" {
				t.Errorf("%s status: peer %+v", n.Name, p)
			}
		}
	}
}

// A dual-stack cluster of two xnet vxlan hosts, an xnet ebpf host, and one host set up exactly
// as flannel's vxlan backend sets up a dual-stack node (flannel.1 and flannel-v6.1 over the IPv6
// underlay), whose lease is written in flannel's exact key and JSON: the xnet hosts program it
// (its IPv6 subnet on xnet-v6.1, or in the ebpf host's routes6 map over the IPv6 underlay),
// flannel programs them from their leases, and containers on all four reach each other over
// IPv6 and IPv4, with TCP intact over IPv6 both ways between flannel and each xnet backend. The
// ebpf host's IPv6 to and from the flannel host crosses the IPv6 underlay (counted on the wire).
func TestDualStackWithAFlannelHost(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 4, WithEtcd: true, IPv6Underlay: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), fmt.Sprintf(xnetdtest.DualStackConfig, "vxlan"))
	bin := harness.BuildXnetd(t)
	hosts := topo.Hosts()
	flannel := hosts[3]
	flannelSub, flannelSub6 := netip.MustParsePrefix("10.244.200.0/24"), netip.MustParsePrefix("fd00:10:244:c8::/64")
	mac4, mac6 := backend.VtepMAC(flannel.UnderlayIP), harness.FlannelV6MAC(flannel.UnderlayIPv6)
	// Written by hand as flannel writes it: key, field order, a TTL'd etcd lease.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	grant, err := topo.EtcdClient().Grant(ctx, 3600)
	if err != nil {
		t.Fatal(err)
	}
	key := xnetdtest.EtcdPrefix + "/subnets/10.244.200.0-24&fd00:10:244:c8::-64"
	value := fmt.Sprintf(`{"PublicIP":"%s","PublicIPv6":"%s","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"%s"},"BackendV6Data":{"VNI":1,"VtepMAC":"%s"}}`,
		flannel.UnderlayIP, flannel.UnderlayIPv6, mac4, mac6)
	if _, err := topo.EtcdClient().Put(ctx, key, value, clientv3.WithLease(grant.ID)); err != nil {
		t.Fatal(err)
	}
	var nodes []*xnetdtest.Node
	for i, h := range hosts[:3] {
		b := "vxlan"
		if i == 2 {
			b = "ebpf"
		}
		n := &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--backend", b}}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	ebpfNode := nodes[2]
	for _, n := range nodes {
		n.WaitPeers(t, 3)
	}
	// The flannel host programs the xnet hosts from their leases, as flannel would.
	leases, _, err := xnetdtest.ListLeases(ctx, topo)
	if err != nil {
		t.Fatal(err)
	}
	var peers4, peers6 []harness.FlannelPeer
	for _, l := range leases {
		if l.Subnet == flannelSub {
			continue
		}
		d4, err4 := subnetmgr.ParseVXLANData(l.BackendData)
		d6, err6 := subnetmgr.ParseVXLANData(l.BackendV6Data)
		m4, _ := net.ParseMAC(d4.VtepMAC)
		m6, _ := net.ParseMAC(d6.VtepMAC)
		if err4 != nil || err6 != nil || !l.IPv6Subnet.IsValid() || !l.PublicIPv6.IsValid() || m4.String() == m6.String() {
			t.Fatalf("xnet lease %+v: want a dual-stack vxlan lease with PublicIPv6 and its own IPv6 VTEP (%v %v)", l, err4, err6)
		}
		peers4 = append(peers4, harness.FlannelPeer{Subnet: l.Subnet, PublicIP: l.PublicIP, VtepMAC: m4})
		peers6 = append(peers6, harness.FlannelPeer{Subnet: l.IPv6Subnet, PublicIP: l.PublicIPv6, VtepMAC: m6})
	}
	if err := flannel.SetupDocker0(subnetmgr.GatewayOf(flannelSub), 1450); err != nil {
		t.Fatal(err)
	}
	if err := flannel.SetupDocker0IPv6(subnetmgr.GatewayOf(flannelSub6)); err != nil {
		t.Fatal(err)
	}
	if err := flannel.ConfigureFlannelVXLAN(flannelSub, peers4); err != nil {
		t.Fatal(err)
	}
	if err := flannel.ConfigureFlannelVXLANv6(flannelSub6, peers6); err != nil {
		t.Fatal(err)
	}
	cs := xnetdtest.Containers(t, nodes)
	fc, err := flannel.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	cs = append(cs, fc)
	for _, n := range nodes[:2] {
		if route := n.RouteTo(t, flannelSub6); !strings.Contains(route, "xnet-v6.1") {
			t.Errorf("%s: route to the flannel host's IPv6 subnet %q, want it on xnet-v6.1", n.Name, route)
		}
	}
	var st struct {
		Routes []string `json:"routes"`
	}
	ebpfNode.StatusInto(t, &st)
	want := fmt.Sprintf("%v via %v mac %v (bpf, IPv6 underlay)", flannelSub6, flannel.UnderlayIPv6, mac6)
	if !slices.Contains(st.Routes, want) {
		t.Errorf("%s (ebpf) status: routes %q, want %q", ebpfNode.Name, st.Routes, want)
	}
	// xnetd check finds decap_tunnel where it belongs (the flannel host answers no health
	// probes, so the check as a whole may fail; its datapath line must not).
	if out, _ := ebpfNode.Check(t); !strings.Contains(out, "programs attached where they belong") || strings.Contains(out, string(loader.DecapTunnel)) {
		t.Errorf("xnetd check on %s (ebpf): want every program attached, decap_tunnel on %s included:\n%s", ebpfNode.Name, ebpf.TunnelDevice, out)
	}
	count, err := ebpfNode.CountVXLAN("eth0", 8472)
	if err != nil {
		t.Fatal(err)
	}
	if failed := xnetdtest.DualStackMesh(cs); len(failed) > 0 {
		count.Stop()
		t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
	}
	harness.TransferIntact(t, cs[0], fc, fc.IPv6, 8<<20)
	harness.TransferIntact(t, fc, cs[1], cs[1].IPv6, 8<<20)
	ec := cs[2] // the ebpf host's container
	harness.TransferIntact(t, ec, fc, fc.IPv6, 8<<20)
	harness.TransferIntact(t, fc, ec, ec.IPv6, 8<<20)
	harness.TransferIntact(t, ec, fc, fc.IP, 1<<20)
	harness.TransferIntact(t, fc, ec, ec.IP, 1<<20)
	// The ebpf host's own IPv6 (xnet0, encap_host, the route's 1430-byte MTU) to the flannel
	// container, and back to xnet0's address.
	self := &harness.Container{Namespace: ebpfNode.Namespace, Host: ebpfNode.Host, IP: ebpfNode.UnderlayIP}
	harness.TransferIntact(t, self, fc, fc.IPv6, 1<<20)
	// Every peer of the ebpf host has an IPv6 VTEP: none of its IPv6 rides the IPv4 VXLAN. Its
	// TCP leaves as GSO packets (frames above the MTU on the veth underlay), which the flannel
	// host's device took: their UDP checksums were filled.
	got, largest := count.Stop(), count.LargestSent()
	over6, over4 := harness.VXLANKind{Underlay6: true, Inner6: true}, harness.VXLANKind{Inner6: true}
	if got[over6] == 0 || got[over4] != 0 {
		t.Errorf("%s (ebpf) underlay NIC: %d datagrams of %s, %d of %s (all: %v): want its IPv6 over the IPv6 underlay only",
			ebpfNode.Name, got[over6], over6, got[over4], over4, got)
	}
	if largest[over6] <= 1500+14 {
		t.Errorf("%s (ebpf) underlay NIC: the largest datagram of %s it sent is %d bytes: want GSO packets above the MTU", ebpfNode.Name, over6, largest[over6])
	}
}
