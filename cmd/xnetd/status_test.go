package main

import (
	"bytes"
	"encoding/json"
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

// A lease the trust rule refused shows its reason in the PROBLEM column, and contradicting
// claims get a section of their own, in text and in JSON.
func TestStatusShowsRefusedLeasesAndConflicts(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	rep := statusReport{
		Running: true, Daemon: "running, pid 7", Ready: true, Backend: "vxlan", Mode: "kernel",
		Lease: leaseState{Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: netip.MustParseAddr("198.18.0.11")},
		Peers: []peerStatus{{peerState: peerState{
			leaseState: leaseState{Subnet: netip.MustParsePrefix("0.0.0.0/1"), PublicIP: netip.MustParseAddr("198.18.0.12")},
			Refused:    "outside_network", Error: "0.0.0.0/1 covers the whole Network 10.244.0.0/16",
		}}},
		Conflicts: []conflictState{{Kind: conflictDuplicatePublicIP, PublicIP: netip.MustParseAddr("198.18.0.12"),
			Subnets: []netip.Prefix{netip.MustParsePrefix("10.244.9.0/24"), netip.MustParsePrefix("10.244.2.0/24")},
			Kept:    netip.MustParsePrefix("10.244.9.0/24"), Since: now.Add(-time.Minute),
			Detail: "2 leases name PublicIP 198.18.0.12; only 10.244.9.0/24, created first, is programmed"}},
	}
	var b bytes.Buffer
	printStatus(&b, rep, now)
	out := b.String()
	if line := lineWith(out, "0.0.0.0/1"); !strings.Contains(line, "refused (outside_network): 0.0.0.0/1 covers the whole Network 10.244.0.0/16") {
		t.Errorf("the refused lease's line does not say why: %q\n%s", line, out)
	}
	if !strings.Contains(out, "conflicts (1):\n  duplicate_public_ip 198.18.0.12 since 09:59:00: 2 leases name PublicIP 198.18.0.12; only 10.244.9.0/24, created first, is programmed\n") {
		t.Errorf("status lacks the conflict:\n%s", out)
	}
	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"refused":"outside_network"`, `"conflicts":[{"kind":"duplicate_public_ip","public_ip":"198.18.0.12","subnets":["10.244.9.0/24","10.244.2.0/24"],"kept":"10.244.9.0/24"`} {
		if !strings.Contains(string(js), want) {
			t.Errorf("status JSON lacks %s:\n%s", want, js)
		}
	}
}
