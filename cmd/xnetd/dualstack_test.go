package main

import (
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// dual is lease with an IPv6 subnet, created at etcd revision rev.
func dual(subnet, ip, subnet6 string, rev int64) subnetmgr.Lease {
	l := leaseAt(subnet, ip, rev)
	l.IPv6Subnet = netip.MustParsePrefix(subnet6)
	l.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0c"}`)
	return l
}

// The trust rule on the IPv6 part of leases: every refusal of the IPv4 rule has its IPv6 twin,
// a lease lying about IPv6 is refused whole, of two leases naming one IPv6 subnet the older is
// programmed (and the younger once the older goes), and an IPv4-only overlay never hands a
// backend a peer's IPv6 part.
func TestPeersIPv6TrustRule(t *testing.T) {
	cfg := testCfg
	cfg.EnableIPv6, cfg.IPv6Network, cfg.IPv6SubnetLen = true, netip.MustParsePrefix("fd00:10:244::/56"), 64
	own := dual("10.244.1.0/24", "198.18.0.11", "fd00:10:244:1::/64", 1)

	refusals := []struct {
		subnet6, reason string
	}{
		{"::/0", subnetmgr.RefusedOutsideNetwork},
		{"fd00:10:244::/48", subnetmgr.RefusedOutsideNetwork},
		{"fd00:99::/64", subnetmgr.RefusedOutsideNetwork},
		{"fd00:10:244:1::/64", subnetmgr.RefusedOverlapsOwnSubnet},
		{"fd00:10:244:1:8000::/65", subnetmgr.RefusedOverlapsOwnSubnet},
		{"fd00:10:244:2::/80", subnetmgr.RefusedWrongLength},
	}
	for _, tc := range refusals {
		r := &recorder{}
		obs := newObserved()
		p := newPeers(r, own, cfg, testLog(), obs)
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: dual("10.244.2.0/24", "198.18.0.12", tc.subnet6, 2)}})
		if len(r.calls) != 0 || obs.refused[tc.reason] != 1 {
			t.Errorf("IPv6 subnet %s: calls %v, refused %v; want the whole lease refused as %s", tc.subnet6, r.calls, obs.refused, tc.reason)
		}
	}

	t.Run("two leases name one IPv6 subnet", func(t *testing.T) {
		r := &recorder{}
		obs := newObserved()
		p := newPeers(r, own, cfg, testLog(), obs)
		p.grace = 0
		older := dual("10.244.3.0/24", "198.18.0.13", "fd00:10:244:3::/64", 5)
		younger := dual("10.244.4.0/24", "198.18.0.14", "fd00:10:244:3::/64", 9)
		// The younger arrives first and is programmed; the older displaces it.
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: younger}})
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: older}})
		want := []string{"add 10.244.4.0/24 198.18.0.14", "remove 10.244.4.0/24", "add 10.244.3.0/24 198.18.0.13"}
		if !equalStrings(r.calls, want) || obs.refused[subnetmgr.RefusedDuplicateIPv6Subnet] != 1 {
			t.Fatalf("calls %v refused %v; want %v and one duplicate_ipv6_subnet", r.calls, obs.refused, want)
		}
		// The older goes: the younger's claim stands alone now.
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventRemoved, Lease: older}})
		want = append(want, "remove 10.244.3.0/24", "add 10.244.4.0/24 198.18.0.14")
		if !equalStrings(r.calls, want) {
			t.Errorf("after the older left: calls %v, want %v", r.calls, want)
		}
	})

	t.Run("an IPv4-only overlay ignores a peer's IPv6 part", func(t *testing.T) {
		r := &capturing{}
		p := newPeers(r, lease("10.244.1.0/24", "198.18.0.11"), testCfg, testLog(), newObserved())
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: dual("10.244.2.0/24", "198.18.0.12", "::/0", 2)}})
		if len(r.added) != 1 || r.added[0].IPv6Subnet.IsValid() || r.added[0].BackendV6Data != nil {
			t.Errorf("backend got %+v; want the IPv4 part only", r.added)
		}
	})
}

// capturing is a recorder that keeps the leases it was given.
type capturing struct {
	recorder
	added []subnetmgr.Lease
}

func (c *capturing) AddPeer(l subnetmgr.Lease) error {
	c.added = append(c.added, l)
	return c.recorder.AddPeer(l)
}

func equalStrings(a, b []string) bool { return slices.Equal(a, b) }

// EnableIPv6 with wireguard publishes what flannel's wireguard backend does: our PublicIPv6 and
// BackendV6Data with our key and the IPv6 device's port (separate mode); a backend that does
// not carry IPv6 is still refused before the host changes.
func TestDualStackAttrsOfWireGuard(t *testing.T) {
	cfg, err := subnetmgr.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard"}}`))
	if err != nil {
		t.Fatal(err)
	}
	iface := backend.ExternalInterface{Name: "lo", Index: 1, MTU: 1500,
		PublicIP: netip.MustParseAddr("198.18.0.11"), PublicIPv6: netip.MustParseAddr("fd00:198:18::b")}
	b, err := wireguard.New(backend.Options{Iface: iface, Config: cfg, StateDir: t.TempDir(), Logger: testLog()})
	if errors.Is(err, backend.ErrUnavailable) {
		t.Skipf("wireguard cannot run here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(false)
	var attrs subnetmgr.LeaseAttrs
	if err := dualStackAttrs(cfg, "wireguard", b, iface, &attrs); err != nil {
		t.Fatal(err)
	}
	_, v4, _ := b.LeaseAttrs()
	d4, err4 := subnetmgr.ParseWireGuardData(v4)
	d6, err6 := subnetmgr.ParseWireGuardData(attrs.BackendV6Data)
	if attrs.PublicIPv6 != iface.PublicIPv6 || err4 != nil || err6 != nil || d6.PublicKey != d4.PublicKey || d6.Port != 51821 {
		t.Errorf("PublicIPv6 %v BackendV6Data %s (%v): want %v and our key %s with Port 51821", attrs.PublicIPv6, attrs.BackendV6Data, err6, iface.PublicIPv6, d4.PublicKey)
	}

	err = dualStackAttrs(cfg, "recorder", &recorder{}, iface, &subnetmgr.LeaseAttrs{})
	var u *usageError
	if !errors.As(err, &u) {
		t.Errorf("a backend without backend.DualStack: %v, want a usage error", err)
	}
}

// v6only is a lease of an IPv6-only overlay as flannel writes it, created at etcd revision rev.
func v6only(subnet6, publicIPv6 string, rev int64) subnetmgr.Lease {
	return subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix(subnet6), PublicIP: netip.IPv4Unspecified(),
		PublicIPv6: netip.MustParseAddr(publicIPv6), BackendType: "vxlan", CreateRevision: rev,
		BackendV6Data: json.RawMessage(`{"VNI":1,"VtepMAC":"0a:78:c6:12:00:0c"}`)}
}

// The trust rule in an IPv6-only overlay: leases are named by their IPv6 subnet and hosts by
// their PublicIPv6; the IPv6 subnet rule applies alone (a lease without an IPv6 subnet is
// refused), a dual-stack lease loses its IPv4 part, and of two leases naming one PublicIPv6
// the older is programmed, none when it is ours.
func TestPeersIPv6Only(t *testing.T) {
	cfg := subnetmgr.Config{EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fd00:10:244::/56"), IPv6SubnetLen: 64}
	if !cfg.IPv6Only() {
		t.Fatal("the test config is not IPv6 only")
	}
	own := v6only("fd00:10:244:1::/64", "fd00:198:18::b", 1)

	refusals := []struct {
		desc   string
		lease  subnetmgr.Lease
		reason string
	}{
		{"the whole address space", v6only("::/0", "fd00:198:18::c", 2), subnetmgr.RefusedOutsideNetwork},
		{"outside IPv6Network", v6only("fd00:99::/64", "fd00:198:18::c", 2), subnetmgr.RefusedOutsideNetwork},
		{"inside our subnet", v6only("fd00:10:244:1:8000::/65", "fd00:198:18::c", 2), subnetmgr.RefusedOverlapsOwnSubnet},
		{"another length", v6only("fd00:10:244:2::/80", "fd00:198:18::c", 2), subnetmgr.RefusedWrongLength},
		{"no IPv6 subnet (an IPv4 host's lease)", leaseAt("10.244.2.0/24", "198.18.0.12", 2), subnetmgr.RefusedOutsideNetwork},
		{"our PublicIPv6 under another subnet", v6only("fd00:10:244:2::/64", "fd00:198:18::b", 2), subnetmgr.RefusedDuplicatePublicIP},
	}
	for _, tc := range refusals {
		r := &recorder{}
		obs := newObserved()
		p := newPeers(r, own, cfg, testLog(), obs)
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: tc.lease}})
		if len(r.calls) != 0 || obs.refused[tc.reason] != 1 {
			t.Errorf("%s: calls %v, refused %v; want it refused as %s", tc.desc, r.calls, obs.refused, tc.reason)
		}
	}

	t.Run("peers are programmed by IPv6 subnet, a dual-stack one without its IPv4 part", func(t *testing.T) {
		r := &capturing{}
		p := newPeers(r, own, cfg, testLog(), newObserved())
		p.apply([]subnetmgr.Event{
			{Type: subnetmgr.EventAdded, Lease: own},
			{Type: subnetmgr.EventAdded, Lease: v6only("fd00:10:244:2::/64", "fd00:198:18::c", 2)},
			{Type: subnetmgr.EventAdded, Lease: dual("10.244.3.0/24", "198.18.0.13", "fd00:10:244:3::/64", 3)},
		})
		want := []string{"add fd00:10:244:2::/64 0.0.0.0", "add fd00:10:244:3::/64 0.0.0.0"}
		if !equalStrings(r.calls, want) {
			t.Fatalf("calls %v, want %v", r.calls, want)
		}
		if l := r.added[1]; l.Subnet.IsValid() || l.BackendData != nil || l.ID() != netip.MustParsePrefix("fd00:10:244:3::/64") {
			t.Errorf("the dual-stack lease reached the backend as %+v; want its IPv6 part only", l)
		}
		known, applied, refused := p.counts()
		if known != 3 || applied != 2 || refused != 0 {
			t.Errorf("counts %d %d %d, want 3 known, 2 applied", known, applied, refused)
		}
		if list := p.list(); len(list) != 2 || list[0].Subnet != netip.MustParsePrefix("fd00:10:244:2::/64") {
			t.Errorf("status lists %+v; want the peers by IPv6 subnet", list)
		}
		p.grace = 0
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventRemoved, Lease: v6only("fd00:10:244:2::/64", "fd00:198:18::c", 2)}})
		if got := r.calls[len(r.calls)-1]; got != "remove fd00:10:244:2::/64" {
			t.Errorf("last call %q, want the peer removed by its IPv6 subnet", got)
		}
	})

	t.Run("two leases name one PublicIPv6: the older is programmed", func(t *testing.T) {
		r := &recorder{}
		obs := newObserved()
		p := newPeers(r, own, cfg, testLog(), obs)
		p.grace = 0
		younger := v6only("fd00:10:244:4::/64", "fd00:198:18::c", 9)
		older := v6only("fd00:10:244:3::/64", "fd00:198:18::c", 5)
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: younger}})
		p.apply([]subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: older}})
		want := []string{"add fd00:10:244:4::/64 0.0.0.0", "remove fd00:10:244:4::/64", "add fd00:10:244:3::/64 0.0.0.0"}
		if !equalStrings(r.calls, want) || obs.refused[subnetmgr.RefusedDuplicatePublicIP] != 1 {
			t.Errorf("calls %v refused %v; want %v and one duplicate_public_ip", r.calls, obs.refused, want)
		}
	})
}
