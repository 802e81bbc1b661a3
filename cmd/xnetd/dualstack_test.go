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
