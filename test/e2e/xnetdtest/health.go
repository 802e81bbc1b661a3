package xnetdtest

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/xnet-dev/xnet/health"
)

// healthStatus is the peers part of `xnetd status --output json` with their health.
type healthStatus struct {
	Peers []struct {
		Subnet   netip.Prefix       `json:"subnet"`
		PublicIP netip.Addr         `json:"public_ip"`
		Health   *health.PeerHealth `json:"health"`
	} `json:"peers"`
}

// PeerHealth is what n's status says of the peer with subnet (nil when it has no health yet).
func (n *Node) PeerHealth(t *testing.T, subnet netip.Prefix) *health.PeerHealth {
	t.Helper()
	var s healthStatus
	n.StatusInto(t, &s)
	for _, p := range s.Peers {
		if p.Subnet == subnet {
			return p.Health
		}
	}
	return nil
}

// WaitHealthy waits until every node's status shows every other node reachable over both
// paths, answered by its health responder: a probe sent before the peer's responder listened
// comes back as ICMP port unreachable, which counts as reachable but marked NoResponder.
func WaitHealthy(t *testing.T, nodes []*Node, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, n := range nodes {
		for _, p := range nodes {
			if p == n {
				continue
			}
			subnet := p.State(t).Lease.Subnet
			for {
				h := n.PeerHealth(t, subnet)
				if h != nil && h.Overlay.State == health.StateReachable && h.Underlay.State == health.StateReachable &&
					!h.Overlay.NoResponder && !h.Underlay.NoResponder {
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

// Check runs `xnetd check` with the daemon's flags and returns its output and exit code.
func (n *Node) Check(t *testing.T) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.Bin, append(append([]string{"check"}, n.XnetdArgs()...), n.Extra...)...)
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

// HealthFault is one way a host's datapath breaks.
type HealthFault struct {
	Name     string
	Broken   *Node // where the cause lies
	Observer *Node // a peer that must report it
	// UnderlayToo: the underlay breaks as well (the host is cut off).
	UnderlayToo bool
	Inject      func(t *testing.T)
	// CheckSays is what `xnetd check` on the broken host must print.
	CheckSays []string
	Restore   func(t *testing.T)
}

// RunHealthFault injects the fault, measures how long until the observer reports the broken host
// unreachable (status and metrics), runs xnetd check on both, restores and waits for health.
func RunHealthFault(t *testing.T, nodes []*Node, f HealthFault) {
	t.Helper()
	subnet := f.Broken.State(t).Lease.Subnet
	brokenHost := f.Broken.UnderlayIP
	if subnet.Addr().Is6() { // an IPv6-only overlay: hosts are named by their PublicIPv6
		brokenHost = f.Broken.UnderlayIPv6
	}
	start := time.Now()
	f.Inject(t)
	var took time.Duration
	for {
		h := f.Observer.PeerHealth(t, subnet)
		if h != nil && h.Overlay.State == health.StateUnreachable && (!f.UnderlayToo || h.Underlay.State == health.StateUnreachable) {
			took = time.Since(start)
			if !f.UnderlayToo && h.Underlay.State != health.StateReachable {
				t.Errorf("%s: underlay %+v, want still reachable: the status must tell which path broke", f.Observer.Name, h.Underlay)
			}
			break
		}
		if time.Since(start) > 15*time.Second {
			t.Fatalf("%s does not report %s unreachable 15 s after: %s: %+v", f.Observer.Name, f.Broken.Name, f.Name, h)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%s: %s reported %s unreachable (overlay%s) after %v", f.Name, f.Observer.Name, f.Broken.Name,
		map[bool]string{true: " and underlay", false: ", underlay still answers"}[f.UnderlayToo], took.Round(10*time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("%s: reported after %v, want within 5 s", f.Name, took.Round(10*time.Millisecond))
	}

	t.Run("status flags it in PROBLEM and metrics say unreachable", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := f.Observer.Run(ctx, f.Observer.Bin, "status", "--subnet-file", f.Observer.SubnetFile())
		if err != nil {
			t.Fatal(err)
		}
		want := "overlay unreachable since"
		if f.UnderlayToo {
			want = "unreachable over the overlay and the underlay"
		}
		if line := LineContaining(out, subnet.String()+" "); !strings.Contains(line, want) || !strings.Contains(line, "DOWN") {
			t.Errorf("status line of %v lacks DOWN and %q:\n%s", subnet, want, out)
		}
		_, body := f.Observer.HTTPGet(t, "/metrics")
		v, ok := Metric(ParseMetrics(t, body), "xnet_peer_reachable", map[string]string{"subnet": subnet.String(), "path": "overlay"})
		if !ok || v != 0 {
			t.Errorf("xnet_peer_reachable{subnet=%v,path=overlay} = %v (present %v), want 0", subnet, v, ok)
		}
	})

	t.Run("xnetd check names the cause on the broken host and points there from the others", func(t *testing.T) {
		var wg sync.WaitGroup
		var brokenOut, observerOut string
		var brokenCode, observerCode int
		wg.Add(2)
		go func() { defer wg.Done(); brokenOut, brokenCode = f.Broken.Check(t) }()
		go func() { defer wg.Done(); observerOut, observerCode = f.Observer.Check(t) }()
		wg.Wait()
		if brokenCode != 1 {
			t.Errorf("xnetd check on %s (broken) exit %d, want 1", f.Broken.Name, brokenCode)
		}
		for _, w := range f.CheckSays {
			if !strings.Contains(brokenOut, w) {
				t.Errorf("xnetd check on %s lacks %q:\n%s", f.Broken.Name, w, brokenOut)
			}
		}
		if !strings.Contains(brokenOut, "fix: ") {
			t.Errorf("xnetd check on %s gives no fix:\n%s", f.Broken.Name, brokenOut)
		}
		t.Logf("xnetd check on %s:\n%s", f.Broken.Name, brokenOut)
		// The observer finds nothing wrong at home and says where to look.
		if observerCode != 1 || !strings.Contains(observerOut, "nothing wrong found on this host: run xnetd check on "+brokenHost.String()) {
			t.Errorf("xnetd check on %s (healthy) exit %d, want 1 pointing at %s:\n%s", f.Observer.Name, observerCode, brokenHost, observerOut)
		}
		for _, l := range strings.Split(observerOut, "\n") {
			if strings.HasPrefix(l, "FAIL") && !strings.HasPrefix(l, "FAIL  peers") {
				t.Errorf("xnetd check on the healthy %s fails %q", f.Observer.Name, l)
			}
		}
	})

	f.Restore(t)
	WaitHealthy(t, nodes, 15*time.Second)
}

// healthSummary finds a summary metric by labels (Metric reads counters, gauges, histograms).
func healthSummary(fams map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Summary {
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

// LineContaining is the first line of text that contains sub, or "".
func LineContaining(text, sub string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// RequireHealthyCheck: on a healthy cluster `xnetd check` passes everywhere and the metrics say
// every peer is reachable over both paths.
func RequireHealthyCheck(t *testing.T, nodes []*Node) {
	for _, n := range nodes {
		out, code := n.Check(t)
		if code != 0 || !strings.Contains(out, "everything checked holds") {
			t.Errorf("xnetd check on the healthy %s: exit %d\n%s", n.Name, code, out)
		}
	}
	n := nodes[0]
	_, body := n.HTTPGet(t, "/metrics")
	fams := ParseMetrics(t, body)
	for _, p := range nodes[1:] {
		for _, path := range health.Paths {
			labels := map[string]string{"subnet": p.State(t).Lease.Subnet.String(), "path": string(path)}
			if v, ok := Metric(fams, "xnet_peer_reachable", labels); !ok || v != 1 {
				t.Errorf("xnet_peer_reachable%v = %v (present %v), want 1", labels, v, ok)
			}
			if s := healthSummary(fams, "xnet_peer_rtt_seconds", labels); s == nil || s.GetSampleCount() == 0 || len(s.GetQuantile()) == 0 || s.GetQuantile()[0].GetValue() <= 0 {
				t.Errorf("xnet_peer_rtt_seconds%v = %v, want answered probes and a median RTT", labels, s)
			}
		}
	}
}
