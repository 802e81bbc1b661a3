package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
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
	r.calls = append(r.calls, fmt.Sprintf("add %v %v", l.ID(), l.PublicIP))
	if r.refuse[l.Subnet] {
		return errors.New("incompatible peer")
	}
	return nil
}
func (r *recorder) RemovePeer(l subnetmgr.Lease) error {
	r.calls = append(r.calls, fmt.Sprintf("remove %v", l.ID()))
	return nil
}

// observed is a peerObserver writing down what the daemon would count.
type observed struct {
	events    []string
	refused   map[string]int
	conflicts map[string]int
}

func newObserved() *observed {
	return &observed{refused: map[string]int{}, conflicts: map[string]int{}}
}
func (o *observed) LeaseEvent(t string)          { o.events = append(o.events, t) }
func (o *observed) LeaseRefused(reason string)   { o.refused[reason]++ }
func (o *observed) ConflictDetected(kind string) { o.conflicts[kind]++ }

// testCfg is the network every test host is in: /24 leases of 10.244.0.0/16.
var testCfg = subnetmgr.Config{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24}

func testLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// leaseAt is lease with the etcd revision that created its key.
func leaseAt(subnet, ip string, rev int64) subnetmgr.Lease {
	l := lease(subnet, ip)
	l.CreateRevision = rev
	return l
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
			name: "a lease with our PublicIP under another subnet is never a peer: refused, shown",
			events: []subnetmgr.Event{
				{Type: subnetmgr.EventAdded, Lease: lease("10.244.9.0/24", "198.18.0.11")},
			},
			wantCalls: nil, wantPeers: []string{"10.244.9.0/24:refused=duplicate_public_ip"}, wantKnown: 1, wantRefusals: 1,
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
			obs := newObserved()
			p := newPeers(r, own, testCfg, testLog(), obs)
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
				peers = append(peers, peerString(ps))
			}
			if got, want := strings.Join(peers, " "), strings.Join(tt.wantPeers, " "); got != want {
				t.Errorf("peers %q, want %q", got, want)
			}
			known, applied, refused := p.counts()
			if known != tt.wantKnown || applied != tt.wantApplied || refused != tt.wantRefusals {
				t.Errorf("counts known=%d applied=%d refused=%d, want %d %d %d", known, applied, refused, tt.wantKnown, tt.wantApplied, tt.wantRefusals)
			}
			if len(obs.events) != len(tt.events) {
				t.Errorf("counted %d events, want %d", len(obs.events), len(tt.events))
			}
		})
	}
}

// peerString is a peer as the tests compare it: subnet, then ":refused=<reason>" or
// ":<backend error>" when it is not programmed.
func peerString(ps peerState) string {
	switch {
	case ps.Refused != "":
		return ps.Subnet.String() + ":refused=" + ps.Refused
	case ps.Error != "":
		return ps.Subnet.String() + ":" + ps.Error
	}
	return ps.Subnet.String()
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
			p := newPeers(r, own, testCfg, testLog(), nil)
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
// peer lease it may hold (not ours, none the trust rule refused, so that what an older build
// programmed for them goes; those the backend refused too: it holds nothing for them), so it
// can drop peers whose leases went while xnetd was down.
func TestFirstLeaseListPrunesPeersTheBackendStillHolds(t *testing.T) {
	own := lease("10.244.1.0/24", "198.18.0.11")
	first := []subnetmgr.Event{
		{Type: subnetmgr.EventAdded, Lease: own},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.9.0/24", "198.18.0.11")},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.3.0/24", "198.18.0.13")},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.2.0/24", "198.18.0.12")},
		{Type: subnetmgr.EventAdded, Lease: lease("0.0.0.0/1", "198.18.0.14")},
		{Type: subnetmgr.EventAdded, Lease: lease("10.244.1.128/25", "198.18.0.14")},
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
			d := &daemonRun{log: log, chosen: chosenBackend{name: "ebpf", b: b}, peers: newPeers(b, own, testCfg, log, nil)}
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
		d := &daemonRun{log: log, chosen: chosenBackend{name: "udp", b: b}, peers: newPeers(b, own, testCfg, log, nil)}
		d.peers.apply(first)
		d.prunePeers() // must not panic or call anything else
		if len(b.calls) != 2 {
			t.Errorf("backend calls %q, want only the two adds", b.calls)
		}
	})
}

// The trust rule decides what reaches the backend: a lease whose subnet this network does not
// hand out, or that overlaps ours, never does; of the leases naming one PublicIP only the one
// etcd created first does (none when the PublicIP is ours). Each refusal is shown with its
// reason and counted once; each contradiction is shown while it stands and counted once.
func TestTrustRuleDecidesWhatReachesTheBackend(t *testing.T) {
	own := leaseAt("10.244.1.0/24", "198.18.0.11", 3)
	own.Expiration = time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC) // a dynamic lease
	reservation := own
	reservation.Expiration = time.Time{}
	added := func(l subnetmgr.Lease) subnetmgr.Event { return subnetmgr.Event{Type: subnetmgr.EventAdded, Lease: l} }
	changed := func(l subnetmgr.Lease) subnetmgr.Event {
		return subnetmgr.Event{Type: subnetmgr.EventChanged, Lease: l}
	}
	removed := func(l subnetmgr.Lease) subnetmgr.Event {
		return subnetmgr.Event{Type: subnetmgr.EventRemoved, Lease: l}
	}
	b := leaseAt("10.244.9.0/24", "198.18.0.12", 10)
	dup := leaseAt("10.244.2.0/24", "198.18.0.12", 20) // B's PublicIP, created later, lower subnet
	a := leaseAt("10.244.5.0/24", "198.18.0.15", 5)
	aAsB := leaseAt("10.244.5.0/24", "198.18.0.12", 5) // A's key rewritten with B's PublicIP
	bData := leaseAt("10.244.9.0/24", "198.18.0.12", 10)
	bData.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0c","Extra":1}`)
	tests := []struct {
		name          string
		own           subnetmgr.Lease
		batches       [][]subnetmgr.Event
		wantCalls     []string
		wantPeers     []string // peerString of each peer known
		wantRefused   map[string]int
		wantConflicts []string // kind public_ip kept [subnets]
		wantDetected  map[string]int
	}{
		{
			name:        "0.0.0.0/1 covers the Network and half the Internet: refused",
			batches:     [][]subnetmgr.Event{{added(lease("0.0.0.0/1", "198.18.0.12"))}},
			wantPeers:   []string{"0.0.0.0/1:refused=outside_network"},
			wantRefused: map[string]int{subnetmgr.RefusedOutsideNetwork: 1},
		},
		{
			name:        "a /25 inside our subnet would capture our own traffic: refused",
			batches:     [][]subnetmgr.Event{{added(lease("10.244.1.128/25", "198.18.0.12"))}},
			wantPeers:   []string{"10.244.1.128/25:refused=overlaps_own_subnet"},
			wantRefused: map[string]int{subnetmgr.RefusedOverlapsOwnSubnet: 1},
		},
		{
			name:        "a subnet outside the Network: refused",
			batches:     [][]subnetmgr.Event{{added(lease("192.0.2.0/24", "198.18.0.12"))}},
			wantPeers:   []string{"192.0.2.0/24:refused=outside_network"},
			wantRefused: map[string]int{subnetmgr.RefusedOutsideNetwork: 1},
		},
		{
			name:        "a /26 in the Network, where leases are /24: refused",
			batches:     [][]subnetmgr.Event{{added(lease("10.244.7.64/26", "198.18.0.12"))}},
			wantPeers:   []string{"10.244.7.64/26:refused=wrong_length"},
			wantRefused: map[string]int{subnetmgr.RefusedWrongLength: 1},
		},
		{
			name: "an older /23 holding a peer's /24 is refused; the /24 is programmed",
			batches: [][]subnetmgr.Event{{
				added(leaseAt("10.244.2.0/23", "198.18.0.14", 2)), added(leaseAt("10.244.3.0/24", "198.18.0.13", 9)),
			}},
			wantCalls:   []string{"add 10.244.3.0/24 198.18.0.13"},
			wantPeers:   []string{"10.244.2.0/23:refused=wrong_length", "10.244.3.0/24"},
			wantRefused: map[string]int{subnetmgr.RefusedWrongLength: 1},
		},
		{
			name:          "a newer lease naming a peer's PublicIP is refused; the peer stays",
			batches:       [][]subnetmgr.Event{{added(b)}, {added(dup)}},
			wantCalls:     []string{"add 10.244.9.0/24 198.18.0.12"},
			wantPeers:     []string{"10.244.2.0/24:refused=duplicate_public_ip", "10.244.9.0/24"},
			wantRefused:   map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantConflicts: []string{"duplicate_public_ip 198.18.0.12 kept 10.244.9.0/24 [10.244.9.0/24 10.244.2.0/24]"},
			wantDetected:  map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:          "the older claimant listed after the newer one takes over: the newer leaves the datapath first",
			batches:       [][]subnetmgr.Event{{added(dup), added(b)}},
			wantCalls:     []string{"add 10.244.2.0/24 198.18.0.12", "remove 10.244.2.0/24", "add 10.244.9.0/24 198.18.0.12"},
			wantPeers:     []string{"10.244.2.0/24:refused=duplicate_public_ip", "10.244.9.0/24"},
			wantRefused:   map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantConflicts: []string{"duplicate_public_ip 198.18.0.12 kept 10.244.9.0/24 [10.244.9.0/24 10.244.2.0/24]"},
			wantDetected:  map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:         "the older claimant gone, the newer one is programmed at once and the conflict is over",
			batches:      [][]subnetmgr.Event{{added(b), added(dup)}, {removed(b)}},
			wantCalls:    []string{"add 10.244.9.0/24 198.18.0.12", "remove 10.244.9.0/24", "add 10.244.2.0/24 198.18.0.12"},
			wantPeers:    []string{"10.244.2.0/24"},
			wantRefused:  map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantDetected: map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:    "an older key rewritten with a peer's PublicIP wins it until it is written back; then both are programmed",
			batches: [][]subnetmgr.Event{{added(a), added(b)}, {changed(aAsB)}, {changed(a)}},
			wantCalls: []string{"add 10.244.5.0/24 198.18.0.15", "add 10.244.9.0/24 198.18.0.12",
				"remove 10.244.9.0/24", "add 10.244.5.0/24 198.18.0.12",
				"add 10.244.5.0/24 198.18.0.15", "add 10.244.9.0/24 198.18.0.12"},
			wantPeers:    []string{"10.244.5.0/24", "10.244.9.0/24"},
			wantRefused:  map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantDetected: map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:          "a lease naming our PublicIP is never programmed, and shows as a conflict over our PublicIP",
			batches:       [][]subnetmgr.Event{{added(own), added(leaseAt("10.244.9.0/24", "198.18.0.11", 9))}},
			wantPeers:     []string{"10.244.9.0/24:refused=duplicate_public_ip"},
			wantRefused:   map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantConflicts: []string{"duplicate_public_ip 198.18.0.11 kept 10.244.1.0/24 [10.244.1.0/24 10.244.9.0/24]"},
			wantDetected:  map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:          "our own lease rewritten with a peer's PublicIP is a conflict while it stands",
			batches:       [][]subnetmgr.Event{{added(own)}, {changed(leaseAt("10.244.1.0/24", "198.18.0.12", 3))}},
			wantConflicts: []string{"own_subnet_rewritten 198.18.0.12 kept 10.244.1.0/24 [10.244.1.0/24]"},
			wantDetected:  map[string]int{conflictOwnSubnetRewritten: 1},
		},
		{
			name:         "our own lease written back: the conflict is over, still counted",
			batches:      [][]subnetmgr.Event{{added(own)}, {changed(leaseAt("10.244.1.0/24", "198.18.0.12", 3))}, {changed(own)}},
			wantDetected: map[string]int{conflictOwnSubnetRewritten: 1},
		},
		{
			name:    "a reservation of ours given to another host is a move, not a conflict",
			own:     reservation,
			batches: [][]subnetmgr.Event{{added(reservation)}, {changed(leaseAt("10.244.1.0/24", "198.18.0.12", 3))}},
		},
		{
			name:          "a refusal is counted once, not again when the claims to its PublicIP are settled again",
			batches:       [][]subnetmgr.Event{{added(b), added(dup)}, {changed(bData)}, {changed(b)}},
			wantCalls:     []string{"add 10.244.9.0/24 198.18.0.12", "add 10.244.9.0/24 198.18.0.12", "add 10.244.9.0/24 198.18.0.12"},
			wantPeers:     []string{"10.244.2.0/24:refused=duplicate_public_ip", "10.244.9.0/24"},
			wantRefused:   map[string]int{subnetmgr.RefusedDuplicatePublicIP: 1},
			wantConflicts: []string{"duplicate_public_ip 198.18.0.12 kept 10.244.9.0/24 [10.244.9.0/24 10.244.2.0/24]"},
			wantDetected:  map[string]int{conflictDuplicatePublicIP: 1},
		},
		{
			name:        "a refused lease removed leaves nothing to remove",
			batches:     [][]subnetmgr.Event{{added(lease("0.0.0.0/1", "198.18.0.12"))}, {removed(lease("0.0.0.0/1", "198.18.0.12"))}},
			wantRefused: map[string]int{subnetmgr.RefusedOutsideNetwork: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			me := own
			if tt.own.Subnet.IsValid() {
				me = tt.own
			}
			r := &recorder{}
			obs := newObserved()
			p := newPeers(r, me, testCfg, testLog(), obs)
			for _, batch := range tt.batches {
				p.apply(batch)
			}
			if got, want := strings.Join(r.calls, "; "), strings.Join(tt.wantCalls, "; "); got != want {
				t.Errorf("backend calls:\n got %s\nwant %s", got, want)
			}
			var peers []string
			for _, ps := range p.list() {
				peers = append(peers, peerString(ps))
				if ps.Refused != "" && ps.Error == "" {
					t.Errorf("%v is refused as %s without an explanation", ps.Subnet, ps.Refused)
				}
			}
			if got, want := strings.Join(peers, " "), strings.Join(tt.wantPeers, " "); got != want {
				t.Errorf("peers %q, want %q", got, want)
			}
			if !maps.Equal(obs.refused, orEmpty(tt.wantRefused)) {
				t.Errorf("refusals counted %v, want %v", obs.refused, tt.wantRefused)
			}
			if !maps.Equal(obs.conflicts, orEmpty(tt.wantDetected)) {
				t.Errorf("conflicts counted %v, want %v", obs.conflicts, tt.wantDetected)
			}
			var conflicts []string
			for _, c := range p.conflictList() {
				conflicts = append(conflicts, fmt.Sprintf("%s %v kept %v %v", c.Kind, c.PublicIP, c.Kept, c.Subnets))
				if c.Detail == "" || c.Since.IsZero() {
					t.Errorf("conflict %+v has no detail or start", c)
				}
			}
			if got, want := strings.Join(conflicts, "; "), strings.Join(tt.wantConflicts, "; "); got != want {
				t.Errorf("conflicts:\n got %s\nwant %s", got, want)
			}
			counts := p.conflictCounts()
			if counts[conflictDuplicatePublicIP]+counts[conflictOwnSubnetRewritten] != len(tt.wantConflicts) {
				t.Errorf("conflictCounts %v, want %d in all", counts, len(tt.wantConflicts))
			}
			for _, l := range p.leases() {
				if ps := p.known[l.Subnet.Masked()]; ps.Refused != "" {
					t.Errorf("PrunePeers would keep %v, which the trust rule refused", l.Subnet)
				}
			}
		})
	}
}

func orEmpty(m map[string]int) map[string]int {
	if m == nil {
		return map[string]int{}
	}
	return m
}
