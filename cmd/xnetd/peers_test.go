package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// recorder is a Backend that writes down what the daemon asked of it, to check the event
// handling; the datapaths themselves are tested in their packages and end to end.
type recorder struct {
	calls  []string
	refuse map[netip.Prefix]bool
}

func (r *recorder) LeaseAttrs() (string, json.RawMessage, error) { return "vxlan", nil, nil }
func (r *recorder) Setup(context.Context, subnetmgr.Lease, subnetmgr.Config) error {
	return nil
}
func (r *recorder) MTU() int                  { return 1450 }
func (r *recorder) Mode() (string, string)    { return "recorder", "test" }
func (r *recorder) Close(teardown bool) error { return nil }
func (r *recorder) AddPeer(l subnetmgr.Lease) error {
	r.calls = append(r.calls, fmt.Sprintf("add %v %v", l.Subnet, l.PublicIP))
	if r.refuse[l.Subnet] {
		return errors.New("incompatible peer")
	}
	return nil
}
func (r *recorder) RemovePeer(l subnetmgr.Lease) error {
	r.calls = append(r.calls, fmt.Sprintf("remove %v", l.Subnet))
	return nil
}

func lease(subnet, ip string) subnetmgr.Lease {
	return subnetmgr.Lease{Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip), BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0c"}`)}
}

func TestLeaseEventsBecomePeerCalls(t *testing.T) {
	own := lease("10.244.1.0/24", "198.18.0.11")
	tests := []struct {
		name         string
		events       []subnetmgr.Event
		refuse       []string
		wantCalls    []string
		wantPeers    []string // subnet[:error]
		wantKnown    int
		wantApplied  int
		wantRefusals int
		wantOwnGone  bool
		after        time.Duration // then removals due this long after the batch are done
	}{
		{
			name: "initial list: our own lease is skipped, the others are added",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: own},
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.3.0/24", "198.18.0.13")},
			},
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "add 10.244.3.0/24 198.18.0.13"},
			wantPeers: []string{"10.244.2.0/24", "10.244.3.0/24"}, wantKnown: 3, wantApplied: 2,
		},
		{
			name: "a changed lease is added again with its new data",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
				{Type: subnetmgr.EventChanged, Lease: lease("10.244.2.0/24", "198.18.0.22")},
			},
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "add 10.244.2.0/24 198.18.0.22"},
			wantPeers: []string{"10.244.2.0/24"}, wantKnown: 1, wantApplied: 1,
		},
		{
			name: "a removed lease is removed from the datapath",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
				{Type: subnetmgr.EventRemoved, Lease: lease("10.244.2.0/24", "198.18.0.12")},
			},
			after:     removalGrace,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24"},
			wantPeers: nil, wantKnown: 0,
		},
		{
			name: "our own lease removed is reported, so the daemon takes it back",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: own},
				{Type: subnetmgr.EventRemoved, Lease: own},
			},
			wantCalls: nil, wantPeers: nil, wantKnown: 0, wantOwnGone: true,
		},
		{
			name: "our own lease removed and added back in one batch needs nothing",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventRemoved, Lease: own},
				{Type: subnetmgr.EventAdded, Lease: own},
			},
			wantCalls: nil, wantPeers: nil, wantKnown: 1,
		},
		{
			name: "a stale lease with our PublicIP is never a peer",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.9.0/24", "198.18.0.11")},
			},
			wantCalls: nil, wantPeers: nil, wantKnown: 0,
		},
		{
			name: "a refused peer is kept with its reason and the others still go in",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.3.0/24", "198.18.0.13")},
			},
			refuse:    []string{"10.244.2.0/24"},
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "add 10.244.3.0/24 198.18.0.13"},
			wantPeers: []string{"10.244.2.0/24:incompatible peer", "10.244.3.0/24"}, wantKnown: 2, wantApplied: 1, wantRefusals: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{refuse: map[netip.Prefix]bool{}}
			for _, s := range tt.refuse {
				r.refuse[netip.MustParsePrefix(s)] = true
			}
			var types []string
			p := newPeers(r, own, slog.New(slog.NewTextHandler(io.Discard, nil)), func(t subnetmgr.EventType) { types = append(types, t.String()) })
			start := time.Now()
			p.now = func() time.Time { return start }
			if ownGone := p.apply(tt.events); ownGone != tt.wantOwnGone {
				t.Errorf("apply reported own lease removed %v, want %v", ownGone, tt.wantOwnGone)
			}
			p.removeDue(start.Add(tt.after))
			if got, want := strings.Join(r.calls, "; "), strings.Join(tt.wantCalls, "; "); got != want {
				t.Errorf("backend calls:\n got %s\nwant %s", got, want)
			}
			var peers []string
			for _, ps := range p.list() {
				s := ps.Subnet.String()
				if ps.Error != "" {
					s += ":" + ps.Error
				}
				peers = append(peers, s)
			}
			if got, want := strings.Join(peers, " "), strings.Join(tt.wantPeers, " "); got != want {
				t.Errorf("peers %q, want %q", got, want)
			}
			known, applied, refused := p.counts()
			if known != tt.wantKnown || applied != tt.wantApplied || refused != tt.wantRefusals {
				t.Errorf("counts known=%d applied=%d refused=%d, want %d %d %d", known, applied, refused, tt.wantKnown, tt.wantApplied, tt.wantRefusals)
			}
			if len(types) != len(tt.events) {
				t.Errorf("counted %d events, want %d", len(types), len(tt.events))
			}
		})
	}
}

func TestPeerStateShowsTheVtepMAC(t *testing.T) {
	s := leaseStateOf(lease("10.244.2.0/24", "198.18.0.12"))
	if s.VtepMAC != "0e:78:c6:12:00:0c" {
		t.Errorf("VtepMAC %q", s.VtepMAC)
	}
}

// A peer whose lease leaves etcd stays in the datapath for removalGrace, shown as pending
// removal, and stays for good if the lease comes back within it (after an etcd outage, a host
// whose lease expired re-creates it about a second after its peers resynced without it).
func TestPeerRemovalWaitsOutTheGrace(t *testing.T) {
	own := lease("10.244.1.0/24", "198.18.0.11")
	peer := lease("10.244.2.0/24", "198.18.0.12")
	moved := lease("10.244.2.0/24", "198.18.0.22")
	added := subnetmgr.Event{Type: subnetmgr.EventAdded, Lease: peer}
	removed := subnetmgr.Event{Type: subnetmgr.EventRemoved, Lease: peer}
	type step struct {
		at     time.Duration // since the first step; due removals run first
		events []subnetmgr.Event
	}
	tests := []struct {
		name        string
		steps       []step
		end         time.Duration // due removals run at the end
		wantCalls   []string
		wantPending bool // the peer is listed with RemovalDue set
		wantKnown   int
		wantApplied int
	}{
		{
			name:      "a removed lease is still in the datapath within the grace, listed as pending",
			steps:     []step{{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}}},
			end:       time.Second + removalGrace - time.Millisecond,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12"}, wantPending: true,
			wantKnown: 0, wantApplied: 1,
		},
		{
			name:      "the peer leaves the datapath when the grace is up",
			steps:     []step{{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}}},
			end:       time.Second + removalGrace,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24"},
		},
		{
			name: "the same lease back within the grace: the backend hears nothing, the peer stays",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}},
				{2 * time.Second, []subnetmgr.Event{added}},
			},
			end:       time.Minute,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12"}, wantKnown: 1, wantApplied: 1,
		},
		{
			name: "the lease back with other data within the grace is added again, not removed",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}},
				{2 * time.Second, []subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: moved}}},
			},
			end:       time.Minute,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "add 10.244.2.0/24 198.18.0.22"}, wantKnown: 1, wantApplied: 1,
		},
		{
			name: "the lease back after the grace is added anew",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}},
				{time.Second + removalGrace, []subnetmgr.Event{added}},
			},
			end:       time.Minute,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24", "add 10.244.2.0/24 198.18.0.12"}, wantKnown: 1, wantApplied: 1,
		},
		{
			name: "removed and back in one batch (a resync) needs nothing",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed, added}},
			},
			end:       time.Minute,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12"}, wantKnown: 1, wantApplied: 1,
		},
		{
			name: "a second removal does not push the first one's time back",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}},
				{2 * time.Second, []subnetmgr.Event{removed}},
			},
			end:       time.Second + removalGrace,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24"},
		},
		{
			name: "a host back under another subnet: its old subnet leaves at once, before the new one goes in",
			steps: []step{
				{0, []subnetmgr.Event{added}}, {time.Second, []subnetmgr.Event{removed}},
				{2 * time.Second, []subnetmgr.Event{{Type: subnetmgr.EventAdded, Lease: lease("10.244.7.0/24", "198.18.0.12")}}},
			},
			end:       2 * time.Second,
			wantCalls: []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24", "add 10.244.7.0/24 198.18.0.12"}, wantKnown: 1, wantApplied: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{}
			p := newPeers(r, own, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
			start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			var now time.Time
			p.now = func() time.Time { return now }
			for _, st := range tt.steps {
				now = start.Add(st.at)
				p.removeDue(now)
				p.apply(st.events)
			}
			now = start.Add(tt.end)
			p.removeDue(now)
			next := p.nextRemoval()
			if got, want := strings.Join(r.calls, "; "), strings.Join(tt.wantCalls, "; "); got != want {
				t.Errorf("backend calls:\n got %s\nwant %s", got, want)
			}
			pending := false
			for _, ps := range p.list() {
				pending = pending || !ps.RemovalDue.IsZero()
			}
			if pending != tt.wantPending {
				t.Errorf("a peer listed as pending removal: %v, want %v (%+v)", pending, tt.wantPending, p.list())
			}
			if tt.wantPending && next != p.list()[0].RemovalDue {
				t.Errorf("nextRemoval says the next removal is at %v, the pending peer is due at %v", next, p.list()[0].RemovalDue)
			}
			if tt.wantPending && p.list()[0].RemovalDue != start.Add(time.Second+removalGrace) {
				t.Errorf("removal due %v, want the grace after the removal (%v)", p.list()[0].RemovalDue, start.Add(time.Second+removalGrace))
			}
			if known, applied, _ := p.counts(); known != tt.wantKnown || applied != tt.wantApplied {
				t.Errorf("counts known=%d applied=%d, want %d %d", known, applied, tt.wantKnown, tt.wantApplied)
			}
		})
	}
}

// pruner is a recorder whose backend keeps peers across restarts (backend.PeerPruner).
type pruner struct {
	recorder
	kept []string
	err  error
}

func (p *pruner) PrunePeers(keep []subnetmgr.Lease) error {
	for _, l := range keep {
		p.kept = append(p.kept, fmt.Sprintf("%v %v", l.Subnet, l.PublicIP))
	}
	return p.err
}

// After the first full lease list, a backend that keeps peers across restarts is told every
// peer lease known (not ours, not a stale one with our PublicIP, refused ones too: it holds
// nothing for them), so it can drop peers whose leases went while xnetd was down.
func TestFirstLeaseListPrunesPeersTheBackendStillHolds(t *testing.T) {
	own := lease("10.244.1.0/24", "198.18.0.11")
	first := []subnetmgr.Event{
		{Type: subnetmgr.EventAdded, Lease: own},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.9.0/24", "198.18.0.11")},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.3.0/24", "198.18.0.13")},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tt := range []struct {
		name string
		err  error
	}{
		{"the backend prunes", nil},
		{"a failed prune is logged, not fatal", errors.New("map busy")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := &pruner{recorder: recorder{refuse: map[netip.Prefix]bool{netip.MustParsePrefix("10.244.3.0/24"): true}}, err: tt.err}
			d := &daemonRun{log: log, chosen: chosenBackend{name: "ebpf", b: b}, peers: newPeers(b, own, log, nil)}
			d.peers.apply(first)
			d.prunePeers()
			slices.Sort(b.kept)
			if got, want := strings.Join(b.kept, ", "), "10.244.2.0/24 198.18.0.12, 10.244.3.0/24 198.18.0.13"; got != want {
				t.Errorf("PrunePeers kept %q, want %q", got, want)
			}
		})
	}
	t.Run("a backend without per-peer state across restarts is not asked", func(t *testing.T) {
		b := &recorder{}
		d := &daemonRun{log: log, chosen: chosenBackend{name: "udp", b: b}, peers: newPeers(b, own, log, nil)}
		d.peers.apply(first)
		d.prunePeers() // must not panic or call anything else
		if len(b.calls) != 2 {
			t.Errorf("backend calls %q, want only the two adds", b.calls)
		}
	})
}
