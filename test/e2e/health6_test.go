package e2e

// Peer health in an IPv6-only overlay: the probes run over IPv6 on both paths (from our IPv6
// subnet's first address to the peer's through the datapath, and from PublicIPv6 to
// PublicIPv6), the status, the metrics and `xnetd check` name each peer by its IPv6 subnet, and
// a peer route dropped on one host is reported by its peer within 5 s, as in IPv4.

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestHealthIPv6OnlyReportsADroppedRouteWithin5s(t *testing.T) {
	for _, backendName := range []string{"ebpf", "vxlan"} {
		t.Run(backendName, func(t *testing.T) {
			nodes, _ := xdClusterOn(t, harness.Options{Hosts: 3, IPv6Underlay: true},
				fmt.Sprintf(ipv6OnlyConfig, backendName, false), "--backend", backendName)
			hcWaitHealthy(t, nodes, 15*time.Second)
			a, b := nodes[0], nodes[1] // b breaks; a reports it
			aSubnet, bSubnet := a.state(t).Lease.Subnet, b.state(t).Lease.Subnet
			if !aSubnet.Addr().Is6() || !bSubnet.Addr().Is6() {
				t.Fatalf("leases %v and %v, want IPv6 subnets", aSubnet, bSubnet)
			}
			t.Run("both paths are probed over IPv6 and a healthy cluster passes xnetd check", func(t *testing.T) {
				h := a.peerHealth(t, bSubnet)
				if h.Overlay.Target != bSubnet.Addr() || h.Underlay.Target != b.UnderlayIPv6 {
					t.Errorf("%s probes %v and %v, want %s's %v (overlay) and %v (underlay)", a.Name,
						h.Overlay.Target, h.Underlay.Target, b.Name, bSubnet.Addr(), b.UnderlayIPv6)
				}
				if h.Overlay.NoResponder || h.Underlay.NoResponder || h.Overlay.RTTLast <= 0 {
					t.Errorf("%s: %+v, want answers from %s's responder with an RTT", a.Name, h, b.Name)
				}
				hcHealthyCheck(t, nodes)
				out, _ := a.check(t)
				if !strings.Contains(out, "2 of 2 peers answer over the overlay") {
					t.Errorf("xnetd check on %s does not say both peers answer over the overlay:\n%s", a.Name, out)
				}
			})

			var f hcFault
			switch backendName {
			case "ebpf":
				var saved maps.Route6
				routes6 := func(t *testing.T) *maps.Maps {
					t.Helper()
					m, err := ebpf.LoadPinnedMap(filepath.Join(b.BPFFS, maps.Routes6Name), nil)
					if err != nil {
						t.Fatal(err)
					}
					return &maps.Maps{Routes6: m}
				}
				f = hcFault{name: "routes6 map entry deleted",
					inject: func(t *testing.T) {
						m := routes6(t)
						defer m.Routes6.Close()
						routes, err := m.ListRoutes6()
						if err != nil {
							t.Fatal(err)
						}
						i := slices.IndexFunc(routes, func(r maps.Route6) bool { return r.Subnet == aSubnet })
						if i < 0 {
							t.Fatalf("%s's routes6 map has no %v: %+v", b.Name, aSubnet, routes)
						}
						saved = routes[i]
						if err := m.DeleteRoute6(aSubnet); err != nil {
							t.Fatal(err)
						}
					},
					checkSays: []string{"FAIL  routes", fmt.Sprintf("the BPF routes6 map lacks %v", aSubnet), "FAIL  peers"},
					restore: func(t *testing.T) {
						m := routes6(t)
						defer m.Routes6.Close()
						if err := m.PutRoute6(saved); err != nil {
							t.Fatal(err)
						}
					}}
			case "vxlan":
				route := strings.TrimSpace(b.out(t, "ip", "-6", "route", "show", "exact", aSubnet.String()))
				if route == "" {
					t.Fatalf("%s has no route to %v", b.Name, aSubnet)
				}
				f = hcFault{name: "the route to a peer's IPv6 subnet deleted",
					inject:    func(t *testing.T) { b.sh(t, "ip", "-6", "route", "del", aSubnet.String(), "dev", "xnet-v6.1") },
					checkSays: []string{"FAIL  routes", fmt.Sprintf("lacks %v", aSubnet), "FAIL  peers"},
					restore: func(t *testing.T) {
						b.sh(t, append([]string{"ip", "-6", "route", "add"}, strings.Fields(route)...)...)
					}}
			}
			f.broken, f.observer = b, a
			hcRun(t, nodes, f)
			if h := a.peerHealth(t, bSubnet); h == nil || h.Overlay.State != health.StateReachable {
				t.Errorf("after the fault was undone: %+v, want the overlay reachable", h)
			}
		})
	}
}
