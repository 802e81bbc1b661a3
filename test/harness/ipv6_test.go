package harness

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
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
				if !h.UnderlayIPv6.IsValid() || !UnderlayPrefixV6.Contains(h.UnderlayIPv6) {
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
			if !b.IPv6.IsValid() || !hs[1].Docker0IPv6Subnet().Contains(b.IPv6) {
				t.Fatalf("container IPv6 address %v, want one in %v", b.IPv6, hs[1].Docker0IPv6Subnet())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			// The first echoes may go to neighbour discovery (a solicitation lost under load is
			// retried a second later); once one is answered none may be lost.
			for _, pair := range [][2]*Container{{a, b}, {b, a}} {
				for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
					if _, got, _ := Ping(ctx, pair[0].Namespace, pair[1].IPv6, 1, 0); got == 1 {
						break
					}
				}
			}
			for _, pair := range [][2]*Container{{a, b}, {b, a}} {
				if sent, got, err := Ping(ctx, pair[0].Namespace, pair[1].IPv6, 5, 20*time.Millisecond); err != nil || got != sent {
					t.Errorf("%s -> %s (%v): %d/%d replies, %v", pair[0].Role(), pair[1].Role(), pair[1].IPv6, got, sent, err)
				}
			}
		})
	}
}

// The harness's IPv6: an IPv6 underlay next to the IPv4 one, docker0 and containers with IPv6
// addresses, ICMPv6 pings and TCP between them (here over static IPv6 routes: what host-gw would
// program), and a Ping that can say no.
func TestIPv6UnderlayContainersPingAndTCP(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 2})
	ctx := ctxFor(t, 30*time.Second)
	hosts := topo.Hosts()
	var cs []*Container
	for i, h := range hosts {
		if err := h.AddIPv6Underlay(ctx); err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%x", 11+i)); h.UnderlayIPv6 != want {
			t.Fatalf("%s: UnderlayIPv6 %v, want %v", h.Name, h.UnderlayIPv6, want)
		}
		if err := h.SetupDocker0IPv6(netip.MustParsePrefix("fd00:10:244:1::1/64")); err == nil {
			t.Fatal("SetupDocker0IPv6 before SetupDocker0 succeeded")
		}
		if err := h.SetupDocker0(netip.MustParsePrefix(fmt.Sprintf("10.244.%d.1/24", i+1)), 1500); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0IPv6(netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::1/64", i+1))); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	if got, want := cs[1].IPv6, netip.MustParseAddr("fd00:10:244:2::2"); got != want {
		t.Fatalf("second host's container has %v, want %v", got, want)
	}
	if out, err := cs[0].Run(ctx, "ip", "-6", "route", "show", "default"); err != nil || !strings.Contains(out, "via fd00:10:244:1::1") {
		t.Fatalf("container's IPv6 default route %q (%v), want via fd00:10:244:1::1", out, err)
	}
	if _, recv, err := Ping(ctx, cs[0].Namespace, hosts[0].UnderlayIPv6, 2, 10*time.Millisecond); err != nil || recv != 2 {
		t.Fatalf("container -> its host's IPv6 underlay address: %d of 2 (%v)", recv, err)
	}
	if _, recv, err := Ping(ctx, cs[0].Namespace, cs[1].IPv6, 1, 0); err != nil || recv != 0 {
		t.Fatalf("IPv6 ping across hosts before any route: received %d (%v), want 0", recv, err)
	}
	for i, h := range hosts {
		o := hosts[1-i]
		if err := h.IP(ctx, fmt.Sprintf("route add fd00:10:244:%d::/64 via %s dev eth0", 2-i, o.UnderlayIPv6)); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, recv, err := Ping(ctx, cs[0].Namespace, cs[1].IPv6, 3, 100*time.Millisecond); err != nil || recv > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no IPv6 echo reply across hosts with routes")
		}
	}
	for _, p := range [][2]*Container{{cs[0], cs[1]}, {cs[1], cs[0]}} {
		if err := TCPExchange(ctx, p[0].Namespace, p[1].Namespace, p[1].IPv6, 1<<20); err != nil {
			t.Errorf("TCP over IPv6 %s -> %s: %v", p[0].Name, p[1].Name, err)
		}
	}
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := TCPExchange(short, cs[0].Namespace, cs[1].Namespace, cs[1].IP, 1<<20); err == nil {
		t.Error("TCP over IPv4 without IPv4 routes between the hosts succeeded: TCPExchange cannot say no")
	}
}
