package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/macvlan"
)

// The text status names the macvlan range next to the overlay lease, and a peer whose lease
// is gone as leaving, with when.
func TestStatusTextShowsTheMacvlanRangeAndPeersPendingRemoval(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	peer := func(subnet string, due time.Time, problem string) peerStatus {
		return peerStatus{peerState: peerState{
			leaseState: leaseState{Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr("198.18.0.12")},
			Error:      problem, RemovalDue: due,
		}}
	}
	rep := statusReport{
		Running: true, Daemon: "running, pid 7", Ready: true, Backend: "vxlan", Mode: "kernel",
		Lease: leaseState{Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: netip.MustParseAddr("198.18.0.11"), Expiration: now.Add(24 * time.Hour)},
		Macvlan: &macvlan.Status{Name: "xnet-macvlan", Subnet: netip.MustParsePrefix("198.18.0.0/24"), Gateway: netip.MustParseAddr("198.18.0.1"),
			Range: netip.MustParsePrefix("198.18.0.16/29"), Parent: "eth0", Addresses: 8, File: "/run/xnet/macvlan", Expiration: now.Add(24 * time.Hour)},
		Peers: []peerStatus{
			peer("10.244.2.0/24", time.Time{}, ""),
			peer("10.244.3.0/24", now.Add(2*time.Second), ""),
			peer("10.244.4.0/24", now.Add(time.Second), "incompatible peer"),
		},
	}
	var b bytes.Buffer
	printStatus(&b, rep, now)
	out := b.String()
	for _, want := range []string{
		"lease:    10.244.1.0/24 public 198.18.0.11, expires",
		"macvlan:  198.18.0.16/29 of 198.18.0.0/24, gateway 198.18.0.1, parent eth0, network xnet-macvlan, 8 addresses, expires 2026-11-28T10:00:00Z (in 24h0m0s) (/run/xnet/macvlan)",
		"lease gone from etcd: leaves the datapath at 10:00:02 unless it comes back\n",
		"lease gone from etcd: leaves the datapath at 10:00:01 unless it comes back; incompatible peer\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if line := lineWith(out, "10.244.2.0/24"); !strings.HasSuffix(strings.TrimSpace(line), " -") {
		t.Errorf("a peer in place shows a problem: %q", line)
	}

	rep.Macvlan = nil
	b.Reset()
	printStatus(&b, rep, now)
	if strings.Contains(b.String(), "macvlan") {
		t.Errorf("status without a macvlan range mentions one:\n%s", b.String())
	}
}

func lineWith(text, sub string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}
