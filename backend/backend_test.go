package backend

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
)

func TestVtepMACIsStableUnicastAndLocallyAdministered(t *testing.T) {
	ip := netip.MustParseAddr("198.18.0.11")
	mac := VtepMAC(ip)
	if mac.String() != "0e:78:c6:12:00:0b" {
		t.Fatalf("VtepMAC(%v) = %v, want 0e:78:c6:12:00:0b", ip, mac)
	}
	if mac[0]&1 != 0 || mac[0]&2 == 0 {
		t.Fatalf("VtepMAC %v must be unicast and locally administered", mac)
	}
	if OverlayMTU(1500) != 1450 {
		t.Fatalf("OverlayMTU(1500) = %d, want 1450", OverlayMTU(1500))
	}
}

func TestParseVXLANPeer(t *testing.T) {
	good := subnetmgr.Lease{
		Subnet:      netip.MustParsePrefix("10.244.5.0/24"),
		PublicIP:    netip.MustParseAddr("198.18.0.12"),
		BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`),
	}
	with := func(f func(*subnetmgr.Lease)) subnetmgr.Lease { l := good; f(&l); return l }
	cases := []struct {
		name    string
		lease   subnetmgr.Lease
		wantErr string // "" for accepted
	}{
		{"a flannel vxlan lease is accepted", good, ""},
		{"another VNI is accepted (flannel does)", with(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VNI":7,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`) }), ""},
		{"host-gw lease", with(func(l *subnetmgr.Lease) { l.BackendType = "host-gw" }), `BackendType "host-gw"`},
		{"no BackendData", with(func(l *subnetmgr.Lease) { l.BackendData = nil }), "BackendData is empty"},
		{"null BackendData", with(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`null`) }), "BackendData is empty"},
		{"BackendData not JSON", with(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{`) }), "BackendData {"},
		{"VtepMAC missing", with(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VNI":1}`) }), "not an Ethernet MAC"},
		{"VtepMAC too long", with(func(l *subnetmgr.Lease) {
			l.BackendData = json.RawMessage(`{"VtepMAC":"00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01"}`)
		}), "not an Ethernet MAC"},
		{"VtepMAC multicast", with(func(l *subnetmgr.Lease) { l.BackendData = json.RawMessage(`{"VtepMAC":"01:00:5e:00:00:01"}`) }), "multicast"},
		{"IPv6 PublicIP", with(func(l *subnetmgr.Lease) { l.PublicIP = netip.MustParseAddr("2001:db8::1") }), "PublicIP is not IPv4"},
		{"no subnet", with(func(l *subnetmgr.Lease) { l.Subnet = netip.Prefix{} }), "subnet is not IPv4"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := ParseVXLANPeer(c.lease, 1, nil)
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				if p.Subnet != c.lease.Subnet || p.PublicIP != c.lease.PublicIP || p.VtepMAC.String() != "aa:bb:cc:dd:ee:ff" {
					t.Fatalf("parsed %+v from %+v", p, c.lease)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrIncompatiblePeer) || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), "10.244.5.0/24") && c.lease.Subnet.IsValid() {
				t.Fatalf("error %v: want one wrapping ErrIncompatiblePeer, naming the lease and saying %q", err, c.wantErr)
			}
		})
	}
}

func TestIsOwnLease(t *testing.T) {
	local := subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.5.0/24"), PublicIP: netip.MustParseAddr("198.18.0.11")}
	me := local.PublicIP
	for _, c := range []struct {
		lease subnetmgr.Lease
		own   bool
	}{
		{local, true},
		{subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: me}, true}, // an older lease of ours
		{subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("198.18.0.12")}, false},
	} {
		if got := IsOwnLease(local, me, c.lease); got != c.own {
			t.Errorf("IsOwnLease(%v from %v) = %v, want %v", c.lease.Subnet, c.lease.PublicIP, got, c.own)
		}
	}
}

func TestKeptSubnetsStale(t *testing.T) {
	network := netip.MustParsePrefix("10.244.0.0/16")
	kept := NewKeptSubnets(netip.MustParsePrefix("10.244.1.0/24"), []subnetmgr.Lease{
		{Subnet: netip.MustParsePrefix("10.244.2.0/24"), PublicIP: netip.MustParseAddr("198.18.0.12")},
		{Subnet: netip.MustParsePrefix("192.0.2.0/24"), PublicIP: netip.MustParseAddr("198.18.0.13")},
	})
	tests := []struct {
		name    string
		network netip.Prefix
		dst     string
		stale   bool
	}{
		{"a peer subnet no lease holds", network, "10.244.3.0/24", true},
		{"a kept lease's subnet", network, "10.244.2.0/24", false},
		{"our own subnet", network, "10.244.1.0/24", false},
		{"a /25 inside our own subnet (an older build's route for a forged lease)", network, "10.244.1.128/25", true},
		{"the whole Network", network, "10.244.0.0/16", true},
		{"0.0.0.0/1", network, "0.0.0.0/1", true},
		{"outside the Network", network, "198.51.100.0/24", true},
		{"a kept lease outside the Network still goes", network, "192.0.2.0/24", true},
		{"no Network known: any unkept subnet", netip.Prefix{}, "10.244.3.0/24", true},
		{"no Network known: a kept one stays", netip.Prefix{}, "192.0.2.0/24", false},
		{"no destination", network, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var dst netip.Prefix
			if tt.dst != "" {
				dst = netip.MustParsePrefix(tt.dst)
			}
			if got := kept.Stale(tt.network, dst); got != tt.stale {
				t.Errorf("Stale(%v, %s) = %v, want %v", tt.network, tt.dst, got, tt.stale)
			}
		})
	}
	if !kept.HasSubnetAddr(netip.MustParseAddr("10.244.2.0")) || kept.HasSubnetAddr(netip.MustParseAddr("10.244.3.0")) {
		t.Error("HasSubnetAddr must answer for kept subnets' addresses only")
	}
}

func TestKeptSubnetsStaleViaLeavesTheHostsOwnRoutes(t *testing.T) {
	network := netip.MustParsePrefix("10.244.0.0/16")
	peer, router := netip.MustParseAddr("198.18.0.12"), netip.MustParseAddr("198.18.0.1")
	kept := NewKeptSubnets(netip.MustParsePrefix("10.244.1.0/24"), []subnetmgr.Lease{
		{Subnet: netip.MustParsePrefix("10.244.2.0/24"), PublicIP: peer},
	})
	tests := []struct {
		name  string
		dst   string
		gw    netip.Addr
		stale bool
	}{
		{"a kept peer's route", "10.244.2.0/24", peer, false},
		{"a peer subnet no lease holds, whatever the gateway", "10.244.3.0/24", router, true},
		{"a /25 inside our own subnet", "10.244.1.128/25", router, true},
		{"0.0.0.0/1 via a peer (an older build's route for a forged lease)", "0.0.0.0/1", peer, true},
		{"a subnet outside the Network via a peer", "192.0.2.0/24", peer, true},
		{"0.0.0.0/1 via a router is the host's", "0.0.0.0/1", router, false},
		{"a route to another network via a router is the host's", "192.0.2.0/24", router, false},
		{"a supernet of the Network via a router is the host's", "10.0.0.0/8", router, false},
		{"the whole Network via a router is the host's", "10.244.0.0/16", router, false},
		{"the default route, even via a peer, is the host's", "0.0.0.0/0", peer, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := kept.StaleVia(network, netip.MustParsePrefix(tt.dst), tt.gw); got != tt.stale {
				t.Errorf("StaleVia(%s via %v) = %v, want %v", tt.dst, tt.gw, got, tt.stale)
			}
		})
	}
}

func TestKeptForCoversIPv6Subnets(t *testing.T) {
	network6 := netip.MustParsePrefix("fd00:10:244::/48")
	peer6, router6 := netip.MustParseAddr("fd00:198:18::12"), netip.MustParseAddr("fd00:198:18::1")
	local := subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64")}
	kept := KeptFor(local, []subnetmgr.Lease{
		{Subnet: netip.MustParsePrefix("10.244.2.0/24"), PublicIP: netip.MustParseAddr("198.18.0.12"),
			IPv6Subnet: netip.MustParsePrefix("fd00:10:244:2::/64"), PublicIPv6: peer6},
		{Subnet: netip.MustParsePrefix("10.244.3.0/24"), PublicIP: netip.MustParseAddr("198.18.0.13")}, // IPv4 only
	})
	stale := []struct {
		name  string
		dst   string
		stale bool
	}{
		{"our own IPv6 subnet", "fd00:10:244:1::/64", false},
		{"a kept lease's IPv6 subnet", "fd00:10:244:2::/64", false},
		{"an IPv6 subnet no lease holds", "fd00:10:244:3::/64", true},
		{"a /80 inside our own IPv6 subnet", "fd00:10:244:1:1::/80", true},
		{"the whole IPv6Network", "fd00:10:244::/48", true},
		{"outside the IPv6Network", "2001:db8::/64", true},
		{"the IPv4 subnets stay as they were", "10.244.2.0/24", false},
	}
	for _, tt := range stale {
		dst := netip.MustParsePrefix(tt.dst)
		network := NetworkOf(dst, netip.MustParsePrefix("10.244.0.0/16"), network6)
		if got := kept.Stale(network, dst); got != tt.stale {
			t.Errorf("%s: Stale(%v, %s) = %v, want %v", tt.name, network, tt.dst, got, tt.stale)
		}
	}
	if !kept.HasSubnetAddr(netip.MustParseAddr("fd00:10:244:2::")) || kept.HasSubnetAddr(netip.MustParseAddr("fd00:10:244:3::")) {
		t.Error("HasSubnetAddr must answer for kept IPv6 subnets' addresses only")
	}
	via := []struct {
		name  string
		dst   string
		gw    netip.Addr
		stale bool
	}{
		{"a kept peer's IPv6 route", "fd00:10:244:2::/64", peer6, false},
		{"an IPv6 subnet no lease holds", "fd00:10:244:3::/64", router6, true},
		{"outside the IPv6Network via a kept peer's PublicIPv6", "2001:db8::/64", peer6, true},
		{"outside the IPv6Network via a router is the host's", "2001:db8::/64", router6, false},
		{"the IPv6 default route is the host's", "::/0", peer6, false},
	}
	for _, tt := range via {
		if got := kept.StaleVia(network6, netip.MustParsePrefix(tt.dst), tt.gw); got != tt.stale {
			t.Errorf("%s: StaleVia(%s via %v) = %v, want %v", tt.name, tt.dst, tt.gw, got, tt.stale)
		}
	}
	// Without our IPv6 subnet (NewKeptSubnets), our IPv6 subnet is as stale as any other.
	if !NewKeptSubnets(local.Subnet, nil).Stale(network6, local.IPv6Subnet) {
		t.Error("NewKeptSubnets kept an IPv6 subnet it was not given")
	}
}

func TestNetworkOf(t *testing.T) {
	v4, v6 := netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48")
	for _, c := range []struct {
		dst  string
		nets []netip.Prefix
		want netip.Prefix
	}{
		{"10.244.2.0/24", []netip.Prefix{v4, v6}, v4},
		{"fd00:10:244:2::/64", []netip.Prefix{v4, v6}, v6},
		{"fd00:10:244:2::/64", []netip.Prefix{v4, {}}, netip.Prefix{}},
		{"10.244.2.0/24", []netip.Prefix{{}, v6}, netip.Prefix{}},
	} {
		if got := NetworkOf(netip.MustParsePrefix(c.dst), c.nets...); got != c.want {
			t.Errorf("NetworkOf(%s, %v) = %v, want %v", c.dst, c.nets, got, c.want)
		}
	}
}

func TestParseVXLANPeerV6(t *testing.T) {
	v4mac := "0e:78:c6:12:00:0c"
	base := subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), PublicIP: netip.MustParseAddr("198.18.0.12"),
		BackendType: "vxlan", BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"` + v4mac + `"}`)}
	with := func(f func(*subnetmgr.Lease)) subnetmgr.Lease { l := base; f(&l); return l }
	dual := func(l *subnetmgr.Lease) {
		l.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:2::/64")
		l.PublicIPv6 = netip.MustParseAddr("fd00:198:18::12")
		l.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"0a:01:02:03:04:05"}`)
	}
	cases := []struct {
		name    string
		lease   subnetmgr.Lease
		ok      bool
		ownVTEP bool
		mac     string
		err     bool
	}{
		{"an IPv4-only peer", base, false, false, "", false},
		{"a peer with an IPv6 VTEP of its own (flannel's flannel-v6.1)", with(dual), true, true, "0a:01:02:03:04:05", false},
		{"BackendV6Data repeating BackendData (udp, ebpf): IPv6 over IPv4", with(func(l *subnetmgr.Lease) {
			dual(l)
			l.BackendV6Data = l.BackendData
		}), true, false, v4mac, false},
		{"no PublicIPv6: IPv6 over IPv4", with(func(l *subnetmgr.Lease) { dual(l); l.PublicIPv6 = netip.Addr{} }), true, false, v4mac, false},
		{"no BackendV6Data: IPv6 over IPv4", with(func(l *subnetmgr.Lease) { dual(l); l.BackendV6Data = nil }), true, false, v4mac, false},
		{"a multicast IPv6 VTEP MAC: IPv6 over IPv4", with(func(l *subnetmgr.Lease) {
			dual(l)
			l.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"33:33:00:00:00:01"}`)
		}), true, false, v4mac, false},
		{"an IPv4 address as IPv6 subnet", with(func(l *subnetmgr.Lease) { dual(l); l.IPv6Subnet = netip.MustParsePrefix("10.9.0.0/24") }), false, false, "", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v4, err := ParseVXLANPeer(c.lease, 1, nil)
			if err != nil {
				t.Fatal(err)
			}
			p, ok, err := ParseVXLANPeerV6(c.lease, v4)
			if (err != nil) != c.err || ok != c.ok {
				t.Fatalf("ok %v err %v, want ok %v err %v", ok, err, c.ok, c.err)
			}
			if err != nil && !errors.Is(err, ErrIncompatiblePeer) {
				t.Errorf("error %v does not wrap ErrIncompatiblePeer", err)
			}
			if ok && (p.OwnVTEP != c.ownVTEP || p.VtepMAC.String() != c.mac) {
				t.Errorf("OwnVTEP %v VtepMAC %v, want %v %v", p.OwnVTEP, p.VtepMAC, c.ownVTEP, c.mac)
			}
		})
	}
}

func TestVtepMACv6IsStableUnicastAndNotTheIPv4One(t *testing.T) {
	a, b := netip.MustParseAddr("fd00:198:18::11"), netip.MustParseAddr("fd00:198:19::11")
	again := netip.MustParseAddr("fd00:198:18:0::11") // the same address, written another way
	if VtepMACv6(a).String() != VtepMACv6(again).String() || VtepMACv6(a).String() == VtepMACv6(b).String() {
		t.Errorf("VtepMACv6 not a stable function of the whole address: %v %v", VtepMACv6(a), VtepMACv6(b))
	}
	m := VtepMACv6(a)
	if m[0]&1 != 0 || m[0]&2 == 0 || m[0] == VtepMAC(netip.MustParseAddr("198.18.0.11"))[0] {
		t.Errorf("VtepMACv6 %v: want locally administered unicast, unlike any VtepMAC", m)
	}
	if OverlayMTUv6(1500) != 1430 {
		t.Errorf("OverlayMTUv6(1500) = %d, want 1430", OverlayMTUv6(1500))
	}
}

// A host without IPv4 can run an IPv6-only overlay (its PublicIPv6 stands for it, PublicIP
// stays the zero Addr, which no lease carries, so a peer's 0.0.0.0 is not taken for ours), and
// nothing else: every other overlay needs an IPv4 PublicIP. Its VXLAN core has no IPv4 VTEP and
// publishes no BackendData.
func TestNewBaseWithoutIPv4OnlyInAnIPv6OnlyOverlay(t *testing.T) {
	ipv6Only := subnetmgr.Config{EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"), IPv6SubnetLen: 64}
	dual := subnetmgr.Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.244.0.0/16"), EnableIPv6: true, IPv6Network: ipv6Only.IPv6Network}
	noIPv4 := ExternalInterface{Name: "eth0", Index: 2, MTU: 1500, PublicIPv6: netip.MustParseAddr("fd00:198:18::b")}
	for _, tc := range []struct {
		desc  string
		cfg   subnetmgr.Config
		iface ExternalInterface
		ok    bool
	}{
		{"IPv6 only, a PublicIPv6", ipv6Only, noIPv4, true},
		{"IPv6 only, no PublicIPv6 either", ipv6Only, ExternalInterface{Name: "eth0", Index: 2, MTU: 1500}, false},
		{"dual stack", dual, noIPv4, false},
	} {
		v, err := NewVXLAN("vxlan", Options{Iface: tc.iface, Config: tc.cfg})
		if (err == nil) != tc.ok {
			t.Errorf("%s: NewVXLAN: %v, want ok %v", tc.desc, err, tc.ok)
			continue
		}
		if err != nil {
			if !strings.Contains(err.Error(), "--public-ip") {
				t.Errorf("%s: %v does not name --public-ip", tc.desc, err)
			}
			continue
		}
		own := subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64"), PublicIP: netip.IPv4Unspecified(), PublicIPv6: noIPv4.PublicIPv6}
		peer := subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix("fd00:10:244:2::/64"), PublicIP: netip.IPv4Unspecified(), PublicIPv6: netip.MustParseAddr("fd00:198:18::c")}
		v.SetLocal(own, netip.Prefix{})
		if v.IsOwn(peer) || !v.IsOwn(own) {
			t.Errorf("%s: IsOwn(peer) %v, IsOwn(own) %v; want false, true", tc.desc, v.IsOwn(peer), v.IsOwn(own))
		}
		if typ, data, err := v.LeaseAttrs(); err != nil || typ != subnetmgr.BackendVXLAN || data != nil || v.VtepMAC != nil {
			t.Errorf("%s: LeaseAttrs = %s %s %v, VtepMAC %v; want vxlan, no BackendData, no IPv4 VTEP", tc.desc, typ, data, err, v.VtepMAC)
		}
	}
}
