package ebpf

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var ipv6OnlyConfig = subnetmgr.Config{
	EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"), IPv6SubnetLen: 64,
	Backend: subnetmgr.BackendConfig{Type: subnetmgr.BackendEBPF, VNI: 1, Port: 8472},
}

// ipv6OnlyLease is a lease of an IPv6-only overlay as flannel's vxlan node publishes it.
func ipv6OnlyLease(t *testing.T, subnet, publicIPv6 string) subnetmgr.Lease {
	t.Helper()
	ip6 := netip.MustParseAddr(publicIPv6)
	data, err := backend.VXLANLeaseDataV6(1, netip.IPv4Unspecified(), ip6, true)
	if err != nil {
		t.Fatal(err)
	}
	return subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6,
		BackendType: subnetmgr.BackendVXLAN, BackendV6Data: data, Expiration: time.Now().Add(time.Hour)}
}

// TestIPv6OnlyAfterAnIPv4Run: a host that ran an IPv4 overlay starts in an IPv6-only one on
// the same pins. What a user sees (containers reaching each other, flannel hosts too) is
// backend/conformance's TestIPv6Only; this is what the host and the pinned maps hold: xnet0
// without IPv4, the config entry IPv6 only, each peer one routes6 entry over the IPv6 underlay
// keyed by its IPv6 subnet, per-peer counters keyed by its PublicIPv6, a peer outside the
// IPv6Network refused, and after PrunePeers nothing of the IPv4 run in the maps.
func TestIPv6OnlyAfterAnIPv4Run(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, IPv6Underlay: true})
	h := topo.Hosts()[0]
	first := startOn(t, h, vxlanLease(t, "10.244.1.0/24", h.UnderlayIP.String()))
	if err := first.AddPeer(vxlanLease(t, "10.244.2.0/24", "198.18.0.12")); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	opts := backend.Options{Iface: iface, Config: ipv6OnlyConfig, Decap: DecapTC, BPFFS: h.BPFFS, Logger: harness.TestLogger(t)}
	if err := h.Do(func() error { _, err := NewBackend(opts); return err }); err == nil || !strings.Contains(err.Error(), "--public-ipv6") {
		t.Fatalf("NewBackend in an IPv6-only overlay without a PublicIPv6: %v, want an error naming --public-ipv6", err)
	}
	opts.Iface.PublicIPv6 = h.UnderlayIPv6
	var b *Backend
	if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	if mtu := b.MTU(); mtu != 1430 {
		t.Errorf("MTU %d, want 1430 (VXLAN over IPv6)", mtu)
	}
	local := ipv6OnlyLease(t, "fd00:10:244:1::/64", h.UnderlayIPv6.String())
	if err := b.Setup(t.Context(), local, ipv6OnlyConfig); err != nil {
		t.Fatal(err)
	}
	kept := ipv6OnlyLease(t, "fd00:10:244:2::/64", "fd00:198:18::c")
	gone := ipv6OnlyLease(t, "fd00:10:244:3::/64", "fd00:198:18::d")
	for _, l := range []subnetmgr.Lease{kept, gone, local} {
		if err := b.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	outside := ipv6OnlyLease(t, "fd00:99::/64", "fd00:198:18::e")
	if err := b.AddPeer(outside); !errors.Is(err, backend.ErrIncompatiblePeer) {
		t.Errorf("AddPeer of a lease outside the IPv6Network: %v, want ErrIncompatiblePeer", err)
	}
	// What DirectRouting leaves in the nexthops cache, keyed by PublicIPv6, next to the IPv4
	// one of the earlier run.
	for _, ip := range []netip.Addr{kept.PublicIPv6, gone.PublicIPv6} {
		if err := b.m.Nexthops.Put(ip.As16(), bpf.XnetNexthop{Ifindex: 2, Expires: 1 << 62}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.PrunePeers([]subnetmgr.Lease{local, kept}); err != nil {
		t.Fatal(err)
	}

	m, err := maps.OpenPinned(h.BPFFS)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	cfg, ok, err := m.GetConfig()
	if err != nil || !ok || !cfg.IPv6Only || cfg.LocalIP.IsValid() || cfg.Subnet.IsValid() {
		t.Errorf("config %+v (%v %v): want IPv6 only, without an IPv4 address or lease", cfg, ok, err)
	}
	routes6, err := m.ListRoutes6()
	want := maps.Route6{Subnet: kept.IPv6Subnet, PublicIP: netip.IPv4Unspecified(), VtepMAC: backend.VtepMACv6(kept.PublicIPv6),
		PublicIPv6: kept.PublicIPv6}
	if err != nil || len(routes6) != 1 || routes6[0].Subnet != want.Subnet || routes6[0].PublicIPv6 != want.PublicIPv6 ||
		routes6[0].VtepMAC.String() != want.VtepMAC.String() || routes6[0].Direct {
		t.Errorf("routes6 %+v (%v), want only %+v", routes6, err, want)
	}
	// Counters and next hops are keyed by PublicIPv6 here: the kept peer's stay.
	want6 := []netip.Addr{kept.PublicIPv6}
	if p := readPinned(t, h.BPFFS); len(p.routes) != 0 || !slices.Equal(p.counters, want6) || !slices.Equal(p.nexthops, want6) {
		t.Errorf("after the prune: %+v, want no IPv4 state of the earlier run and only the kept peer's counters and next hop, by %v", p, kept.PublicIPv6)
	}
	err = h.Do(func() error {
		x0, err := netlink.LinkByName(HostDevice)
		if err != nil {
			return err
		}
		addrs, _ := netlink.AddrList(x0, netlink.FAMILY_V4)
		routes, _ := netlink.RouteList(x0, netlink.FAMILY_V4)
		if len(addrs)+len(routes) != 0 {
			t.Errorf("%s keeps IPv4: %v %v", HostDevice, addrs, routes)
		}
		_, err = netlink.LinkByName(TunnelDevice)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := b.Status(); err != nil || st.IPv6Peers[kept.IPv6Subnet.String()] != kept.IPv6Subnet.String() || len(st.IPv6Peers) != 1 {
		t.Errorf("status IPv6 peers %v (%v), want only %v", st.IPv6Peers, err, kept.IPv6Subnet)
	}
	if c, err := b.Counters(); err != nil || len(c.Peers) != 1 || c.Peers[0].Subnet != kept.IPv6Subnet {
		t.Errorf("metrics peers %+v (%v), want only %v", c.Peers, err, kept.IPv6Subnet)
	}
}
