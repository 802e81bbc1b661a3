package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Per peer, status shows both paths with RTT (last/median) and loss, and a leased peer that
// does not answer over the overlay is a PROBLEM, saying whether the underlay still answers.
func TestStatusTextShowsPeerReachabilityAndFlagsAnUnreachablePeer(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	up := health.PathHealth{State: health.StateReachable, RTTLast: health.Duration(310 * time.Microsecond), RTTP50: health.Duration(280 * time.Microsecond)}
	down := health.PathHealth{State: health.StateUnreachable, Since: now.Add(-3 * time.Second), Loss: 0.1, Why: "2 probes in a row unanswered"}
	peer := func(subnet string, h *health.PeerHealth) peerStatus {
		return peerStatus{peerState: peerState{
			leaseState: leaseState{Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr("198.18.0.12")},
		}, Health: h}
	}
	rep := statusReport{
		Running: true, Daemon: "running, pid 7", Ready: true, Backend: "ebpf", Mode: "tc+tcx",
		Lease: leaseState{Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: netip.MustParseAddr("198.18.0.11")},
		Peers: []peerStatus{
			peer("10.244.2.0/24", &health.PeerHealth{Overlay: up, Underlay: up}),
			peer("10.244.3.0/24", &health.PeerHealth{Overlay: down, Underlay: up}),
			peer("10.244.4.0/24", &health.PeerHealth{Overlay: down, Underlay: down}),
			peer("10.244.5.0/24", nil),
		},
	}
	var b bytes.Buffer
	printStatus(&b, rep, now)
	out := b.String()
	if !strings.Contains(out, "OVERLAY (RTT LAST/P50, LOSS)") || !strings.Contains(out, "UNDERLAY") {
		t.Errorf("no OVERLAY and UNDERLAY columns:\n%s", out)
	}
	for _, tt := range []struct {
		subnet string
		want   []string
	}{
		{"10.244.2.0/24", []string{"up 0.31ms/0.28ms 0%"}},
		{"10.244.3.0/24", []string{"DOWN 10%", "overlay unreachable since 09:59:57 while the underlay answers"}},
		{"10.244.4.0/24", []string{"unreachable over the overlay and the underlay since 09:59:57"}},
	} {
		line := lineWith(out, tt.subnet)
		for _, w := range tt.want {
			if !strings.Contains(line, w) {
				t.Errorf("line of %s lacks %q: %q", tt.subnet, w, line)
			}
		}
	}
	if n := strings.Count(lineWith(out, "10.244.2.0/24"), "up 0.31ms/0.28ms 0%"); n != 2 {
		t.Errorf("a peer reachable both ways shows %d reachable paths, want 2", n)
	}
	for _, healthy := range []string{"10.244.2.0/24", "10.244.5.0/24"} {
		if line := lineWith(out, healthy); !strings.HasSuffix(strings.TrimSpace(line), " -") {
			t.Errorf("a reachable (or not yet probed) peer shows a problem: %q", line)
		}
	}
}

func TestOverlayAddressIsTheDeviceAddressOrDocker0sForHostGW(t *testing.T) {
	subnet := netip.MustParsePrefix("10.244.7.0/24")
	for _, tt := range []struct {
		backendType string
		want        string
		optional    bool
	}{
		{subnetmgr.BackendVXLAN, "10.244.7.0", false},
		{subnetmgr.BackendEBPF, "10.244.7.0", false},
		{subnetmgr.BackendUDP, "10.244.7.0", false},
		{subnetmgr.BackendHostGW, "10.244.7.1", true},
	} {
		addr, optional := overlayAddress(tt.backendType, subnet)
		if addr.String() != tt.want || optional != tt.optional {
			t.Errorf("%s: %v optional %v, want %s optional %v", tt.backendType, addr, optional, tt.want, tt.optional)
		}
	}
}
