package hostgw

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var dualNetwork = func() subnetmgr.Config {
	c := testNetwork
	c.EnableIPv6 = true
	c.IPv6Network = netip.MustParsePrefix("fd00:10:244::/48")
	c.IPv6SubnetLen = 64
	return c
}()

// subnet6Of is host i's IPv6 subnet: fd00:10:244:(i+1)::/64.
func subnet6Of(i int) netip.Prefix {
	return netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
}

func withIPv6Underlay(t *testing.T, hosts ...*testHost) {
	t.Helper()
	for _, h := range hosts {
		if err := h.AddIPv6Underlay(t.Context()); err != nil {
			t.Fatal(err)
		}
		h.iface.PublicIPv6 = h.UnderlayIPv6
	}
}

func dualLeaseOf(i int, h *testHost) subnetmgr.Lease {
	l := leaseOf(i, h)
	l.IPv6Subnet, l.PublicIPv6 = subnet6Of(i), h.iface.PublicIPv6
	return l
}

func startDualBackend(t *testing.T, i int, h *testHost) *Backend {
	t.Helper()
	b, err := NewWithHandle(backend.Options{Iface: h.iface, Config: dualNetwork, Logger: harness.TestLogger(t)}, h.nl)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(t.Context(), dualLeaseOf(i, h), dualNetwork); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}

// overlayRoutes6 is `ip -6 route` restricted to the IPv6Network, one route per line.
func wantRoutes6(t *testing.T, h *testHost, want ...string) {
	t.Helper()
	var got []string
	for l := range strings.SplitSeq(h.sh(t, "ip", "-6", "route", "show", "root", "fd00:10:244::/48"), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			got = append(got, l)
		}
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("IPv6 overlay routes:\n got  %q\n want %q", got, want)
	}
}

func TestIPv6SubnetIsRoutedViaPublicIPv6(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	b := startDualBackend(t, 0, h)
	if data, err := b.LeaseAttrsV6(); data != nil || err != nil {
		t.Errorf("LeaseAttrsV6 = %s, %v; want nothing", data, err)
	}
	peer := func(pub6 string) subnetmgr.Lease {
		l := subnetmgr.Lease{Subnet: subnetOf(4), PublicIP: netip.MustParseAddr("198.18.0.15"), BackendType: "host-gw", IPv6Subnet: subnet6Of(4)}
		if pub6 != "" {
			l.PublicIPv6 = netip.MustParseAddr(pub6)
		}
		return l
	}
	steps := []struct {
		name        string
		lease       subnetmgr.Lease
		remove      bool
		routes6     []string
		unreachable string // the reason Status gives for fd00:10:244:5::/64, "" for none
	}{
		{"a peer with a PublicIPv6 on our segment", peer("fd00:198:18::15"), false,
			[]string{"fd00:10:244:5::/64 via fd00:198:18::15 dev eth0 metric 1024 pref medium"}, ""},
		{"adding it again changes nothing", peer("fd00:198:18::15"), false,
			[]string{"fd00:10:244:5::/64 via fd00:198:18::15 dev eth0 metric 1024 pref medium"}, ""},
		{"a new PublicIPv6 replaces the route", peer("fd00:198:18::16"), false,
			[]string{"fd00:10:244:5::/64 via fd00:198:18::16 dev eth0 metric 1024 pref medium"}, ""},
		{"a PublicIPv6 off our segment: no route, and why", peer("2001:db8::15"), false, nil, "2001:db8::15 is in no subnet of eth0 (fd00:198:18::/64)"},
		{"no PublicIPv6: no route, and why", peer(""), false, nil, "the peer publishes no PublicIPv6"},
		{"back on our segment", peer("fd00:198:18::15"), false,
			[]string{"fd00:10:244:5::/64 via fd00:198:18::15 dev eth0 metric 1024 pref medium"}, ""},
		{"an IPv4-only version of the lease: the IPv6 route goes", func() subnetmgr.Lease {
			l := peer("")
			l.IPv6Subnet = netip.Prefix{}
			return l
		}(), false, nil, ""},
		{"routed again", peer("fd00:198:18::15"), false,
			[]string{"fd00:10:244:5::/64 via fd00:198:18::15 dev eth0 metric 1024 pref medium"}, ""},
		{"removed", peer("fd00:198:18::15"), true, nil, ""},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			do := b.AddPeer
			if s.remove {
				do = b.RemovePeer
			}
			if err := do(s.lease); err != nil {
				t.Fatalf("an IPv6 problem must not fail the peer: %v", err)
			}
			wantRoutes6(t, h, s.routes6...)
			if s.remove {
				wantRoutes(t, h)
			} else {
				wantRoutes(t, h, "10.244.5.0/24 via 198.18.0.15 dev eth0") // IPv4 as ever
			}
			why, listed := b.Status().Unreachable["fd00:10:244:5::/64"]
			if s.unreachable == "" && listed || !strings.Contains(why, s.unreachable) {
				t.Errorf("Status().Unreachable[fd00:10:244:5::/64] = %q (listed %v), want %q", why, listed, s.unreachable)
			}
		})
	}
}

func TestAPeerUnreachableOverIPv4IsStillRoutedOverIPv6(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	b := startDualBackend(t, 0, h)
	far := subnetmgr.Lease{Subnet: subnetOf(4), PublicIP: netip.MustParseAddr("203.0.113.9"), BackendType: "host-gw",
		IPv6Subnet: subnet6Of(4), PublicIPv6: netip.MustParseAddr("fd00:198:18::15")}
	if err := b.AddPeer(far); !errors.Is(err, ErrUnreachablePeer) {
		t.Fatalf("AddPeer = %v, want ErrUnreachablePeer for its IPv4 half", err)
	}
	wantRoutes(t, h)
	wantRoutes6(t, h, "fd00:10:244:5::/64 via fd00:198:18::15 dev eth0 metric 1024 pref medium")
}

func TestIPv6PruneAndTeardown(t *testing.T) {
	h := newHosts(t, 1)[0]
	withIPv6Underlay(t, h)
	// The host's own IPv6 routes: to another network, and to the whole IPv6Network, via a router.
	h.sh(t, "ip", "-6", "route", "add", "2001:db8::/64", "via", "fd00:198:18::1", "dev", "eth0")
	h.sh(t, "ip", "-6", "route", "add", "fd00:10:244::/48", "via", "fd00:198:18::1", "dev", "eth0", "metric", "100")
	first := startDualBackend(t, 0, h)
	lease := func(i int) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: subnetOf(i), PublicIP: netip.MustParseAddr(fmt.Sprintf("198.18.0.%d", 11+i)), BackendType: "host-gw",
			IPv6Subnet: subnet6Of(i), PublicIPv6: netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%x", 11+i))}
	}
	for _, i := range []int{1, 2} {
		if err := first.AddPeer(lease(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}
	second := startDualBackend(t, 0, h)
	for range 2 {
		if err := second.PrunePeers([]subnetmgr.Lease{dualLeaseOf(0, h), lease(1)}); err != nil {
			t.Fatal(err)
		}
	}
	wantRoutes(t, h, "10.244.2.0/24 via 198.18.0.12 dev eth0")
	wantRoutes6(t, h,
		"fd00:10:244:2::/64 via fd00:198:18::c dev eth0 metric 1024 pref medium",
		"fd00:10:244::/48 via fd00:198:18::1 dev eth0 metric 100 pref medium")
	if err := second.Close(true); err != nil {
		t.Fatal(err)
	}
	wantRoutes6(t, h, "fd00:10:244::/48 via fd00:198:18::1 dev eth0 metric 100 pref medium")
	if got := h.sh(t, "ip", "-6", "route", "show", "2001:db8::/64"); !strings.Contains(got, "via fd00:198:18::1") {
		t.Errorf("teardown removed a route outside the overlay: %q", got)
	}
}

func TestContainersReachEachOtherOverIPv6(t *testing.T) {
	hosts := newHosts(t, 2)
	withIPv6Underlay(t, hosts...)
	var backends []*Backend
	for i, h := range hosts {
		backends = append(backends, startDualBackend(t, i, h))
		if err := h.SetupDocker0(netip.PrefixFrom(subnetOf(i).Addr().Next(), 24), backends[i].MTU()); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0IPv6(netip.PrefixFrom(subnet6Of(i).Addr().Next(), 64)); err != nil {
			t.Fatal(err)
		}
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
	}
	a, b := hosts[0], hosts[1]
	if err := backends[0].AddPeer(dualLeaseOf(1, b)); err != nil {
		t.Fatal(err)
	}
	if err := backends[1].AddPeer(dualLeaseOf(0, a)); err != nil {
		t.Fatal(err)
	}
	ca, cb := a.Containers()[0], b.Containers()[0]
	for _, p := range [][2]*harness.Container{{ca, cb}, {cb, ca}} {
		from, to := p[0], p[1]
		if !harness.PingsWithin(t, from.Namespace, to.IPv6, 5*time.Second) {
			t.Errorf("%s -> %s (%v): no echo reply within 5s", from.Name, to.Name, to.IPv6)
		}
		if err := harness.TCPExchange(t.Context(), from.Namespace, to.Namespace, to.IPv6, 4<<20); err != nil {
			t.Errorf("TCP over IPv6 %s -> %s: %v", from.Name, to.Name, err)
		}
	}
	if err := backends[0].RemovePeer(dualLeaseOf(1, b)); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := harness.Ping(t.Context(), ca.Namespace, cb.IPv6, 3, 50*time.Millisecond); got > 0 {
		t.Errorf("%s still reaches %v after RemovePeer", ca.Name, cb.IPv6)
	}
}
