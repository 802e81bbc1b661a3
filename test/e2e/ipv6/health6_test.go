package ipv6

// Peer health in an IPv6-only overlay: the probes run over IPv6 on both paths (from our IPv6
// subnet's first address to the peer's through the datapath, and from PublicIPv6 to
// PublicIPv6), the status, the metrics and `xnetd check` name each peer by its IPv6 subnet, and
// a peer route dropped on one host is reported by its peer within 5 s, as in IPv4.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestHealthIPv6OnlyReportsADroppedRouteWithin5s(t *testing.T) {
	for _, backendName := range []string{"ebpf", "vxlan"} {
		t.Run(backendName, func(t *testing.T) {
			nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 3, IPv6Underlay: true},
				fmt.Sprintf(xnetdtest.IPv6OnlyConfig, backendName, false), "--backend", backendName)
			xnetdtest.WaitHealthy(t, nodes, 15*time.Second)
			a, b := nodes[0], nodes[1] // b breaks; a reports it
			aSubnet, bSubnet := a.State(t).Lease.Subnet, b.State(t).Lease.Subnet
			if !aSubnet.Addr().Is6() || !bSubnet.Addr().Is6() {
				t.Fatalf("leases %v and %v, want IPv6 subnets", aSubnet, bSubnet)
			}
			t.Run("both paths are probed over IPv6 and a healthy cluster passes xnetd check", func(t *testing.T) {
				h := a.PeerHealth(t, bSubnet)
				if h.Overlay.Target != bSubnet.Addr() || h.Underlay.Target != b.UnderlayIPv6 {
					t.Errorf("%s probes %v and %v, want %s's %v (overlay) and %v (underlay)", a.Name,
						h.Overlay.Target, h.Underlay.Target, b.Name, bSubnet.Addr(), b.UnderlayIPv6)
				}
				if h.Overlay.NoResponder || h.Underlay.NoResponder || h.Overlay.RTTLast <= 0 {
					t.Errorf("%s: %+v, want answers from %s's responder with an RTT", a.Name, h, b.Name)
				}
				xnetdtest.RequireHealthyCheck(t, nodes)
				out, _ := a.Check(t)
				if !strings.Contains(out, "2 of 2 peers answer over the overlay") {
					t.Errorf("xnetd check on %s does not say both peers answer over the overlay:\n%s", a.Name, out)
				}
			})

			var f xnetdtest.HealthFault
			switch backendName {
			case "ebpf":
				var restore func(*testing.T)
				f = xnetdtest.HealthFault{Name: "routes6 map entry deleted",
					Inject:    func(t *testing.T) { restore = dropRoute6(t, b, aSubnet) },
					CheckSays: []string{"FAIL  routes", fmt.Sprintf("the BPF routes6 map lacks %v", aSubnet), "FAIL  peers"},
					Restore:   func(t *testing.T) { restore(t) }}
			case "vxlan":
				route := strings.TrimSpace(b.Out(t, "ip", "-6", "route", "show", "exact", aSubnet.String()))
				if route == "" {
					t.Fatalf("%s has no route to %v", b.Name, aSubnet)
				}
				f = xnetdtest.HealthFault{Name: "the route to a peer's IPv6 subnet deleted",
					Inject:    func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "del", aSubnet.String(), "dev", "xnet-v6.1") },
					CheckSays: []string{"FAIL  routes", fmt.Sprintf("lacks %v", aSubnet), "FAIL  peers"},
					Restore: func(t *testing.T) {
						b.Sh(t, append([]string{"ip", "-6", "route", "add"}, strings.Fields(route)...)...)
					}}
			}
			f.Broken, f.Observer = b, a
			xnetdtest.RunHealthFault(t, nodes, f)
			if h := a.PeerHealth(t, bSubnet); h == nil || h.Overlay.State != health.StateReachable {
				t.Errorf("after the fault was undone: %+v, want the overlay reachable", h)
			}
		})
	}
}

// In a dual-stack overlay the IPv6 overlay is probed as a third path (overlay6, for peers with
// an IPv6 subnet): with ebpf, one peer's routes6 entry deleted breaks only IPv6, and its peer
// reports only overlay6 unreachable within 5 s, in status, metrics and xnetd check.
func TestHealthDualStackEBPFReportsABrokenIPv6DatapathOnly(t *testing.T) {
	nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 3}, fmt.Sprintf(xnetdtest.DualStackConfig, "ebpf"), "--backend", "ebpf")
	a, b := nodes[0], nodes[1] // b's IPv6 datapath breaks; a reports it
	aSubnet6, bSubnet, bSubnet6 := a.State(t).Lease.IPv6Subnet, b.State(t).Lease.Subnet, b.State(t).Lease.IPv6Subnet
	if !aSubnet6.IsValid() || !bSubnet6.IsValid() {
		t.Fatalf("leases without IPv6 subnets: %v, %v", aSubnet6, bSubnet6)
	}
	// wait polls a's view of b until cond holds.
	wait := func(t *testing.T, what string, within time.Duration, cond func(h *health.PeerHealth) bool) time.Duration {
		t.Helper()
		start := time.Now()
		for {
			h := a.PeerHealth(t, bSubnet)
			if h != nil && cond(h) {
				return time.Since(start)
			}
			if time.Since(start) > within {
				t.Fatalf("%s: not seen within %v: %+v (overlay6 %+v)", what, within, h, h.Overlay6)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	allUp := func(h *health.PeerHealth) bool {
		return h.Overlay.State == health.StateReachable && h.Underlay.State == health.StateReachable &&
			h.Overlay6 != nil && h.Overlay6.State == health.StateReachable
	}
	wait(t, "all three paths reachable", 15*time.Second, allUp)
	if h := a.PeerHealth(t, bSubnet); h.Overlay6.Target != bSubnet6.Addr() || h.Overlay6.NoResponder {
		t.Errorf("overlay6 probes %v (no responder %v), want %s's responder at %v", h.Overlay6.Target, h.Overlay6.NoResponder, b.Name, bSubnet6.Addr())
	}
	overlay6Metric := func(t *testing.T, path string) (float64, bool) {
		_, body := a.HTTPGet(t, "/metrics")
		return xnetdtest.Metric(xnetdtest.ParseMetrics(t, body), "xnet_peer_reachable", map[string]string{"subnet": bSubnet.String(), "path": path})
	}
	if v, ok := overlay6Metric(t, "overlay6"); !ok || v != 1 {
		t.Errorf("xnet_peer_reachable{path=overlay6} = %v (present %v), want 1", v, ok)
	}
	if out, code := a.Check(t); code != 0 || !strings.Contains(out, "2 over the IPv6 overlay") {
		t.Errorf("xnetd check on the healthy %s: exit %d, want 0 and both peers over the IPv6 overlay\n%s", a.Name, code, out)
	}

	put := dropRoute6(t, b, aSubnet6)
	restored := false
	restore := func() {
		if !restored {
			restored = true
			put(t)
		}
	}
	defer restore()
	took := wait(t, "only overlay6 unreachable", 15*time.Second, func(h *health.PeerHealth) bool {
		return h.Overlay6 != nil && h.Overlay6.State == health.StateUnreachable
	})
	t.Logf("%s reported %s's IPv6 overlay unreachable after %v", a.Name, b.Name, took.Round(10*time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("reported after %v, want within 5 s", took.Round(10*time.Millisecond))
	}
	h := a.PeerHealth(t, bSubnet)
	if h.Overlay.State != health.StateReachable || h.Underlay.State != health.StateReachable {
		t.Errorf("overlay %q, underlay %q: want both still reachable, only IPv6 broken", h.Overlay.State, h.Underlay.State)
	}
	if p := h.Problem(); !strings.Contains(p, "IPv6 overlay unreachable") || !strings.Contains(p, "while the IPv4 overlay answers") {
		t.Errorf("Problem() = %q, want the IPv6 overlay broken while the IPv4 overlay answers", p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	out, err := a.Run(ctx, a.Bin, "status", "--subnet-file", a.SubnetFile())
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if line := xnetdtest.LineContaining(out, bSubnet.String()+","); !strings.Contains(line, "v6 DOWN") || !strings.Contains(line, "IPv6 overlay unreachable since") {
		t.Errorf("status line of %v lacks v6 DOWN and the problem:\n%s", bSubnet, out)
	}
	if v, ok := overlay6Metric(t, "overlay6"); !ok || v != 0 {
		t.Errorf("xnet_peer_reachable{path=overlay6} = %v (present %v), want 0", v, ok)
	}
	if v, ok := overlay6Metric(t, "overlay"); !ok || v != 1 {
		t.Errorf("xnet_peer_reachable{path=overlay} = %v (present %v), want 1", v, ok)
	}
	out, code := a.Check(t)
	if code != 1 || !strings.Contains(out, "FAIL  peers") || !strings.Contains(out, "IPv6 overlay unreachable to "+bSubnet6.Addr().String()) ||
		!strings.Contains(out, "run xnetd check on "+b.UnderlayIP.String()) {
		t.Errorf("xnetd check on %s: exit %d, want 1 naming %s's IPv6 overlay and pointing there:\n%s", a.Name, code, b.Name, out)
	}
	t.Logf("xnetd check on %s:\n%s", a.Name, out)

	restore()
	wait(t, "all three paths reachable again", 15*time.Second, allUp)
}
