package e2e

// Peer health with the real xnetd: every daemon probes every peer over the overlay (through
// the datapath, as container traffic) and the underlay; a peer whose datapath breaks shows as
// unreachable in `xnetd status` and xnet_peer_reachable within 5 s, and `xnetd check` on the
// host where the cause lies names it (and on the other hosts says to look there). Helpers are
// prefixed hc.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	dto "github.com/prometheus/client_model/go"
	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/maps"
)

// hcStatus is the peers part of `xnetd status --output json` with their health.
type hcStatus struct {
	Peers []struct {
		Subnet   netip.Prefix       `json:"subnet"`
		PublicIP netip.Addr         `json:"public_ip"`
		Health   *health.PeerHealth `json:"health"`
	} `json:"peers"`
}

// peerHealth is what n's status says of the peer with subnet (nil when it has no health yet).
func (n *xdNode) peerHealth(t *testing.T, subnet netip.Prefix) *health.PeerHealth {
	t.Helper()
	var s hcStatus
	n.statusInto(t, &s)
	for _, p := range s.Peers {
		if p.Subnet == subnet {
			return p.Health
		}
	}
	return nil
}

// hcWaitHealthy waits until every node's status shows every other node reachable over both
// paths.
func hcWaitHealthy(t *testing.T, nodes []*xdNode, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, n := range nodes {
		for _, p := range nodes {
			if p == n {
				continue
			}
			subnet := p.state(t).Lease.Subnet
			for {
				h := n.peerHealth(t, subnet)
				if h != nil && h.Overlay.State == health.StateReachable && h.Underlay.State == health.StateReachable {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s does not see %s (%v) reachable over both paths after %v: %+v", n.Name, p.Name, subnet, within, h)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
}

// check runs `xnetd check` with the daemon's flags and returns its output and exit code.
func (n *xdNode) check(t *testing.T) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.bin, append(append([]string{"check"}, n.XnetdArgs()...), n.extra...)...)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return out, 0
	case errors.As(err, &exit):
		return out + err.Error(), exit.ExitCode()
	}
	t.Fatalf("xnetd check on %s: %v", n.Name, err)
	return "", 0
}

// hcFault is one way a host's datapath breaks.
type hcFault struct {
	name     string
	broken   *xdNode // where the cause lies
	observer *xdNode // a peer that must report it
	// underlayToo: the underlay breaks as well (the host is cut off).
	underlayToo bool
	inject      func(t *testing.T)
	// checkSays is what `xnetd check` on the broken host must print.
	checkSays []string
	restore   func(t *testing.T)
}

// hcRun injects the fault, measures how long until the observer reports the broken host
// unreachable (status and metrics), runs xnetd check on both, restores and waits for health.
func hcRun(t *testing.T, nodes []*xdNode, f hcFault) {
	t.Helper()
	subnet := f.broken.state(t).Lease.Subnet
	brokenHost := f.broken.UnderlayIP
	if subnet.Addr().Is6() { // an IPv6-only overlay: hosts are named by their PublicIPv6
		brokenHost = f.broken.UnderlayIPv6
	}
	start := time.Now()
	f.inject(t)
	var took time.Duration
	for {
		h := f.observer.peerHealth(t, subnet)
		if h != nil && h.Overlay.State == health.StateUnreachable && (!f.underlayToo || h.Underlay.State == health.StateUnreachable) {
			took = time.Since(start)
			if !f.underlayToo && h.Underlay.State != health.StateReachable {
				t.Errorf("%s: underlay %+v, want still reachable: the status must tell which path broke", f.observer.Name, h.Underlay)
			}
			break
		}
		if time.Since(start) > 15*time.Second {
			t.Fatalf("%s does not report %s unreachable 15 s after: %s: %+v", f.observer.Name, f.broken.Name, f.name, h)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%s: %s reported %s unreachable (overlay%s) after %v", f.name, f.observer.Name, f.broken.Name,
		map[bool]string{true: " and underlay", false: ", underlay still answers"}[f.underlayToo], took.Round(10*time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("%s: reported after %v, want within 5 s", f.name, took.Round(10*time.Millisecond))
	}

	t.Run("status flags it in PROBLEM and metrics say unreachable", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := f.observer.Run(ctx, f.observer.bin, "status", "--subnet-file", f.observer.SubnetFile())
		if err != nil {
			t.Fatal(err)
		}
		want := "overlay unreachable since"
		if f.underlayToo {
			want = "unreachable over the overlay and the underlay"
		}
		if line := lineContaining(out, subnet.String()+" "); !strings.Contains(line, want) || !strings.Contains(line, "DOWN") {
			t.Errorf("status line of %v lacks DOWN and %q:\n%s", subnet, want, out)
		}
		_, body := f.observer.httpGet(t, "/metrics")
		v, ok := xdMetric(xdParse(t, body), "xnet_peer_reachable", map[string]string{"subnet": subnet.String(), "path": "overlay"})
		if !ok || v != 0 {
			t.Errorf("xnet_peer_reachable{subnet=%v,path=overlay} = %v (present %v), want 0", subnet, v, ok)
		}
	})

	t.Run("xnetd check names the cause on the broken host and points there from the others", func(t *testing.T) {
		var wg sync.WaitGroup
		var brokenOut, observerOut string
		var brokenCode, observerCode int
		wg.Add(2)
		go func() { defer wg.Done(); brokenOut, brokenCode = f.broken.check(t) }()
		go func() { defer wg.Done(); observerOut, observerCode = f.observer.check(t) }()
		wg.Wait()
		if brokenCode != 1 {
			t.Errorf("xnetd check on %s (broken) exit %d, want 1", f.broken.Name, brokenCode)
		}
		for _, w := range f.checkSays {
			if !strings.Contains(brokenOut, w) {
				t.Errorf("xnetd check on %s lacks %q:\n%s", f.broken.Name, w, brokenOut)
			}
		}
		if !strings.Contains(brokenOut, "fix: ") {
			t.Errorf("xnetd check on %s gives no fix:\n%s", f.broken.Name, brokenOut)
		}
		t.Logf("xnetd check on %s:\n%s", f.broken.Name, brokenOut)
		// The observer finds nothing wrong at home and says where to look.
		if observerCode != 1 || !strings.Contains(observerOut, "nothing wrong found on this host: run xnetd check on "+brokenHost.String()) {
			t.Errorf("xnetd check on %s (healthy) exit %d, want 1 pointing at %s:\n%s", f.observer.Name, observerCode, brokenHost, observerOut)
		}
		for _, l := range strings.Split(observerOut, "\n") {
			if strings.HasPrefix(l, "FAIL") && !strings.HasPrefix(l, "FAIL  peers") {
				t.Errorf("xnetd check on the healthy %s fails %q", f.observer.Name, l)
			}
		}
	})

	f.restore(t)
	hcWaitHealthy(t, nodes, 15*time.Second)
}

// hcSummary finds a summary metric by labels (xdMetric reads counters, gauges, histograms).
func hcSummary(fams map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Summary {
	for _, m := range fams[name].GetMetric() {
		match := true
		for k, v := range labels {
			match = match && slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == k && l.GetValue() == v })
		}
		if match {
			return m.GetSummary()
		}
	}
	return nil
}

func lineContaining(text, sub string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

func (n *xdNode) sh(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := n.Run(ctx, args[0], args[1:]...); err != nil {
		t.Fatalf("%s: %v\n%s", n.Name, err, out)
	}
}

func (n *xdNode) ifindex(t *testing.T, name string) int {
	t.Helper()
	var idx int
	if err := n.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err == nil {
			idx = l.Attrs().Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return idx
}

// hcHealthyCheck: on a healthy cluster `xnetd check` passes everywhere and the metrics say
// every peer is reachable over both paths.
func hcHealthyCheck(t *testing.T, nodes []*xdNode) {
	for _, n := range nodes {
		out, code := n.check(t)
		if code != 0 || !strings.Contains(out, "everything checked holds") {
			t.Errorf("xnetd check on the healthy %s: exit %d\n%s", n.Name, code, out)
		}
	}
	n := nodes[0]
	_, body := n.httpGet(t, "/metrics")
	fams := xdParse(t, body)
	for _, p := range nodes[1:] {
		for _, path := range health.Paths {
			labels := map[string]string{"subnet": p.state(t).Lease.Subnet.String(), "path": string(path)}
			if v, ok := xdMetric(fams, "xnet_peer_reachable", labels); !ok || v != 1 {
				t.Errorf("xnet_peer_reachable%v = %v (present %v), want 1", labels, v, ok)
			}
			if s := hcSummary(fams, "xnet_peer_rtt_seconds", labels); s == nil || s.GetSampleCount() == 0 || len(s.GetQuantile()) == 0 || s.GetQuantile()[0].GetValue() <= 0 {
				t.Errorf("xnet_peer_rtt_seconds%v = %v, want answered probes and a median RTT", labels, s)
			}
		}
	}
}

// With the ebpf datapath: a routes map entry deleted by hand, the decap program detached from
// the NIC, and the NIC down are each reported by a peer within 5 s and named by xnetd check on
// the host where they happened.
func TestHealthReportsABrokenEBPFDatapathWithin5sAndCheckNamesTheCause(t *testing.T) {
	nodes, _ := xdCluster(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	cs := xdContainers(t, nodes)
	hcWaitHealthy(t, nodes, 10*time.Second)
	if failed := xdMesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	t.Run("a healthy cluster passes xnetd check and exports reachability", func(t *testing.T) {
		hcHealthyCheck(t, nodes)
	})
	a, b := nodes[0], nodes[1]

	t.Run("a routes map entry deleted by hand", func(t *testing.T) {
		aSubnet := a.state(t).Lease.Subnet
		var saved maps.Route
		routes := func(t *testing.T) *maps.Maps {
			t.Helper()
			m, err := ebpf.LoadPinnedMap(filepath.Join(b.BPFFS, maps.RoutesName), nil)
			if err != nil {
				t.Fatal(err)
			}
			return &maps.Maps{Routes: m}
		}
		hcRun(t, nodes, hcFault{
			name: "routes map entry deleted", broken: b, observer: a,
			inject: func(t *testing.T) {
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
			checkSays: []string{"FAIL  routes", fmt.Sprintf("the BPF routes map lacks %v via %v", aSubnet, a.UnderlayIP), "systemctl restart xnetd"},
			restore: func(t *testing.T) {
				m := routes(t)
				defer m.Routes.Close()
				if err := m.PutRoute(saved); err != nil {
					t.Fatal(err)
				}
			},
		})
	})

	t.Run("the decap program detached from the NIC", func(t *testing.T) {
		pin := filepath.Join(b.BPFFS, fmt.Sprintf("link_ingress_%d", b.ifindex(t, "eth0")))
		hcRun(t, nodes, hcFault{
			name: "decap_tc detached", broken: b, observer: a,
			inject: func(t *testing.T) {
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
			checkSays: []string{"FAIL  bpf", "decap_tc is not attached to eth0's TC ingress", "systemctl restart xnetd"},
			restore: func(t *testing.T) {
				if err := b.proc.Stop(); err != nil {
					t.Fatal(err)
				}
				b.start(t)
				b.waitReady(t)
			},
		})
	})

	t.Run("the underlay link down", func(t *testing.T) {
		hcRun(t, nodes, hcFault{
			name: "eth0 down", broken: b, observer: a, underlayToo: true,
			inject:    func(t *testing.T) { b.sh(t, "ip", "link", "set", "eth0", "down") },
			checkSays: []string{"FAIL  underlay", "eth0 is down", "ip link set eth0 up"},
			restore: func(t *testing.T) {
				b.sh(t, "ip", "link", "set", "eth0", "up")
				b.sh(t, "ip", "route", "replace", "default", "via", "198.18.0.1", "dev", "eth0")
			},
		})
	})
}

// With the kernel VXLAN device: an nftables rule dropping the VXLAN port is reported by the
// peer within 5 s and named, with the command that removes it, by xnetd check where it is.
func TestHealthReportsAFirewallDroppingVXLANWithin5sAndCheckNamesTheRule(t *testing.T) {
	nodes, _ := xdCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	hcWaitHealthy(t, nodes, 10*time.Second)
	a, b := nodes[0], nodes[1]
	hcRun(t, nodes, hcFault{
		name: "nftables drops UDP 8472", broken: b, observer: a,
		inject: func(t *testing.T) {
			b.sh(t, "nft", "add table inet hcfw")
			b.sh(t, "nft", "add chain inet hcfw in { type filter hook input priority 0 ; }")
			b.sh(t, "nft", "add rule inet hcfw in udp dport 8472 drop")
		},
		checkSays: []string{"FAIL  firewall", "nftables table inet hcfw chain in (hook input) handle", "drops UDP 8472", "nft delete rule inet hcfw in handle"},
		restore:   func(t *testing.T) { b.sh(t, "nft", "delete table inet hcfw") },
	})
}

// host-gw has no overlay device: its overlay probes go between docker0's gateway addresses
// along the peer routes, so until Docker runs the overlay is "not probed" (no false alarm), and
// once docker0 exists on both hosts it is probed and reachable, and check passes.
func TestHealthOfHostGWProbesDocker0OnceDockerRuns(t *testing.T) {
	nodes, _ := xdCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`)
	a, b := nodes[0], nodes[1]
	subnet := b.state(t).Lease.Subnet
	deadline := time.Now().Add(10 * time.Second)
	for {
		h := a.peerHealth(t, subnet)
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
	xdContainers(t, nodes)
	start := time.Now()
	hcWaitHealthy(t, nodes, 15*time.Second)
	t.Logf("overlay probed and reachable %v after docker0 came up", time.Since(start).Round(10*time.Millisecond))
	if h := a.peerHealth(t, subnet); h.Overlay.Target != subnet.Addr().Next() {
		t.Errorf("overlay probes go to %v, want %s's docker0 %v", h.Overlay.Target, b.Name, subnet.Addr().Next())
	}
	if out, code := a.check(t); code != 0 {
		t.Errorf("xnetd check on %s: exit %d\n%s", a.Name, code, out)
	}

	t.Run("a stopped xnetd's datapath still answers, by ICMP, and its status shows no stale health", func(t *testing.T) {
		if err := b.proc.Stop(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			h := a.peerHealth(t, subnet)
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
		if h := b.peerHealth(t, a.state(t).Lease.Subnet); h != nil {
			t.Errorf("status of the stopped %s shows health %+v", b.Name, h)
		}
	})
}
