package e2e

// Peer health with the real xnetd: every daemon probes every peer over the overlay (through
// the datapath, as container traffic) and the underlay; a peer whose datapath breaks shows as
// unreachable in `xnetd status` and xnet_peer_reachable within 5 s, and `xnetd check` on the
// host where the cause lies names it (and on the other hosts says to look there). The fault
// runner (xnetdtest.RunHealthFault) is shared with the IPv6 health tests.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// With the ebpf datapath: a routes map entry deleted by hand, the decap program detached from
// the NIC, and the NIC down are each reported by a peer within 5 s and named by xnetd check on
// the host where they happened.
func TestHealthReportsABrokenEBPFDatapathWithin5sAndCheckNamesTheCause(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	cs := xnetdtest.Containers(t, nodes)
	xnetdtest.WaitHealthy(t, nodes, 10*time.Second)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	t.Run("a healthy cluster passes xnetd check and exports reachability", func(t *testing.T) {
		xnetdtest.RequireHealthyCheck(t, nodes)
	})
	a, b := nodes[0], nodes[1]

	t.Run("a routes map entry deleted by hand", func(t *testing.T) {
		aSubnet := a.State(t).Lease.Subnet
		var saved maps.Route
		routes := func(t *testing.T) *maps.Maps {
			t.Helper()
			m, err := ebpf.LoadPinnedMap(filepath.Join(b.BPFFS, maps.RoutesName), nil)
			if err != nil {
				t.Fatal(err)
			}
			return &maps.Maps{Routes: m}
		}
		xnetdtest.RunHealthFault(t, nodes, xnetdtest.HealthFault{
			Name: "routes map entry deleted", Broken: b, Observer: a,
			Inject: func(t *testing.T) {
				m := routes(t)
				defer m.Routes.Close()
				list, err := m.ListRoutes()
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range list {
					if r.Subnet == aSubnet {
						saved = r
					}
				}
				if !saved.Subnet.IsValid() {
					t.Fatalf("%s's routes map has no entry for %v: %v", b.Name, aSubnet, list)
				}
				if err := m.DeleteRoute(aSubnet); err != nil {
					t.Fatal(err)
				}
			},
			CheckSays: []string{"FAIL  routes", fmt.Sprintf("the BPF routes map lacks %v via %v", aSubnet, a.UnderlayIP), "systemctl restart xnetd"},
			Restore: func(t *testing.T) {
				m := routes(t)
				defer m.Routes.Close()
				if err := m.PutRoute(saved); err != nil {
					t.Fatal(err)
				}
			},
		})
	})

	t.Run("the decap program detached from the NIC", func(t *testing.T) {
		pin := filepath.Join(b.BPFFS, fmt.Sprintf("link_ingress_%d", b.Ifindex(t, "eth0")))
		xnetdtest.RunHealthFault(t, nodes, xnetdtest.HealthFault{
			Name: "decap_tc detached", Broken: b, Observer: a,
			Inject: func(t *testing.T) {
				lk, err := link.LoadPinnedLink(pin, nil)
				if err != nil {
					t.Fatal(err)
				}
				// Without the pin our handle is the last reference: closing it detaches.
				if err := lk.Unpin(); err != nil {
					t.Fatal(err)
				}
				lk.Close()
			},
			CheckSays: []string{"FAIL  bpf", "decap_tc is not attached to eth0's TC ingress", "systemctl restart xnetd"},
			Restore: func(t *testing.T) {
				if err := b.Proc.Stop(); err != nil {
					t.Fatal(err)
				}
				b.StartDaemon(t)
				b.WaitReady(t)
			},
		})
	})

	t.Run("the underlay link down", func(t *testing.T) {
		xnetdtest.RunHealthFault(t, nodes, xnetdtest.HealthFault{
			Name: "eth0 down", Broken: b, Observer: a, UnderlayToo: true,
			Inject:    func(t *testing.T) { b.Sh(t, "ip", "link", "set", "eth0", "down") },
			CheckSays: []string{"FAIL  underlay", "eth0 is down", "ip link set eth0 up"},
			Restore: func(t *testing.T) {
				b.Sh(t, "ip", "link", "set", "eth0", "up")
				b.Sh(t, "ip", "route", "replace", "default", "via", "198.18.0.1", "dev", "eth0")
			},
		})
	})
}

// With the kernel VXLAN device: an nftables rule dropping the VXLAN port is reported by the
// peer within 5 s and named, with the command that removes it, by xnetd check where it is.
func TestHealthReportsAFirewallDroppingVXLANWithin5sAndCheckNamesTheRule(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	xnetdtest.WaitHealthy(t, nodes, 10*time.Second)
	a, b := nodes[0], nodes[1]
	xnetdtest.RunHealthFault(t, nodes, xnetdtest.HealthFault{
		Name: "nftables drops UDP 8472", Broken: b, Observer: a,
		Inject: func(t *testing.T) {
			b.Sh(t, "nft", "add table inet hcfw")
			b.Sh(t, "nft", "add chain inet hcfw in { type filter hook input priority 0 ; }")
			b.Sh(t, "nft", "add rule inet hcfw in udp dport 8472 drop")
		},
		CheckSays: []string{"FAIL  firewall", "nftables table inet hcfw chain in (hook input) handle", "drops UDP 8472", "nft delete rule inet hcfw in handle"},
		Restore:   func(t *testing.T) { b.Sh(t, "nft", "delete table inet hcfw") },
	})
}

// host-gw has no overlay device: its overlay probes go between docker0's gateway addresses
// along the peer routes, so until Docker runs the overlay is "not probed" (no false alarm), and
// once docker0 exists on both hosts it is probed and reachable, and check passes.
func TestHealthOfHostGWProbesDocker0OnceDockerRuns(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`)
	a, b := nodes[0], nodes[1]
	subnet := b.State(t).Lease.Subnet
	deadline := time.Now().Add(10 * time.Second)
	for {
		h := a.PeerHealth(t, subnet)
		// The overlay's first probe is due up to an interval after the underlay's: until
		// then it is unknown, which says nothing yet.
		if h != nil && h.Underlay.State == health.StateReachable && h.Overlay.State != health.StateUnknown {
			if h.Overlay.State != health.StateNotProbed || !strings.Contains(h.Overlay.Why, "docker0") || h.Problem() != "" {
				t.Errorf("before Docker: overlay %+v, problem %q; want not probed, waiting for docker0, no problem", h.Overlay, h.Problem())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("underlay not reachable after 10 s: %+v", h)
		}
		time.Sleep(100 * time.Millisecond)
	}
	xnetdtest.Containers(t, nodes)
	start := time.Now()
	xnetdtest.WaitHealthy(t, nodes, 15*time.Second)
	t.Logf("overlay probed and reachable %v after docker0 came up", time.Since(start).Round(10*time.Millisecond))
	if h := a.PeerHealth(t, subnet); h.Overlay.Target != subnet.Addr().Next() {
		t.Errorf("overlay probes go to %v, want %s's docker0 %v", h.Overlay.Target, b.Name, subnet.Addr().Next())
	}
	if out, code := a.Check(t); code != 0 {
		t.Errorf("xnetd check on %s: exit %d\n%s", a.Name, code, out)
	}

	t.Run("a stopped xnetd's datapath still answers, by ICMP, and its status shows no stale health", func(t *testing.T) {
		if err := b.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			h := a.PeerHealth(t, subnet)
			if h != nil && h.Overlay.NoResponder && h.Underlay.NoResponder {
				if h.Overlay.State != health.StateReachable || h.Underlay.State != health.StateReachable || h.Problem() != "" {
					t.Errorf("%s stopped: %+v, problem %q; want both paths reachable through ICMP, no problem", b.Name, h, h.Problem())
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s stopped 10 s ago: %+v, want answers by ICMP port unreachable", b.Name, h)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := os.Stat(filepath.Join(b.StateDir, "health.json")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("health.json left after a clean stop: %v", err)
		}
		if h := b.PeerHealth(t, a.State(t).Lease.Subnet); h != nil {
			t.Errorf("status of the stopped %s shows health %+v", b.Name, h)
		}
	})
}
