package harness

import (
	"context"
	"net/netip"
	"testing"
	"time"
)

// The IPv6 baselines the benchmark holds xnet's IPv6 against: flannel's host-gw and vxlan IPv6
// halves, configured by hand over an IPv6 underlay, carry IPv6 between containers.
func TestIPv6Baselines(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mtu       int
		configure func([]*Host) error
	}{
		{"host-gw", 1500, ConfigureHostGW},
		{"flannel vxlan", 1430, ConfigureFlannelVXLAN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := NewForTest(t, Options{Hosts: 2, IPv6Underlay: true})
			hs := topo.Hosts()
			for i, h := range hs {
				if !h.UnderlayIPv6.IsValid() || !UnderlayIPv6Prefix.Contains(h.UnderlayIPv6) {
					t.Fatalf("%s has IPv6 underlay address %v", h.Name, h.UnderlayIPv6)
				}
				if err := h.SetupDocker0([]netip.Prefix{netip.MustParsePrefix("10.244.1.1/24"), netip.MustParsePrefix("10.244.2.1/24")}[i], tc.mtu); err != nil {
					t.Fatal(err)
				}
				if err := h.SetupDocker0IPv6([]netip.Prefix{netip.MustParsePrefix("fd00:10:244:1::1/64"), netip.MustParsePrefix("fd00:10:244:2::1/64")}[i]); err != nil {
					t.Fatal(err)
				}
			}
			if err := tc.configure(hs); err != nil {
				t.Fatal(err)
			}
			a, err := hs[0].AddContainer()
			if err != nil {
				t.Fatal(err)
			}
			b, err := hs[1].AddContainer()
			if err != nil {
				t.Fatal(err)
			}
			if !b.IP6.IsValid() || !hs[1].Docker0IPv6Subnet().Contains(b.IP6) {
				t.Fatalf("container IPv6 address %v, want one in %v", b.IP6, hs[1].Docker0IPv6Subnet())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			// The first echo may go to neighbour discovery; after that none may be lost.
			_, _, _ = Ping(ctx, a.Namespace, b.IP6, 1, 0)
			for _, pair := range [][2]*Container{{a, b}, {b, a}} {
				if sent, got, err := Ping(ctx, pair[0].Namespace, pair[1].IP6, 5, 20*time.Millisecond); err != nil || got != sent {
					t.Errorf("%s -> %s (%v): %d/%d replies, %v", pair[0].Role(), pair[1].Role(), pair[1].IP6, got, sent, err)
				}
			}
		})
	}
}
