package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// removalGrace is how long a peer whose lease left etcd stays in the datapath, in case the
// lease comes back. A gone lease must leave every host's datapath within 5 s; this leaves 2 s of
// that for the watch to deliver the removal.
//
// Design history: a removal used to reach the backend at once. After an etcd outage, a host
// whose lease expired meanwhile is missing from the list its peers resync from until it has
// re-created its lease, about a second later: its peers cut it off for that second (512
// packets lost in the reliability test). A removal now waits out the grace; the lease coming
// back cancels it (and the backend hears nothing if the lease is unchanged).
const removalGrace = 3 * time.Second

// Conflict kinds: the kind label of xnet_lease_conflicts and the kind of a conflict in
// `xnetd status`.
const (
	// conflictDuplicatePublicIP: several leases name one PublicIP; only the one etcd created
	// first is programmed (subnetmgr.ClaimsFirst), or none when the PublicIP is ours.
	conflictDuplicatePublicIP = "duplicate_public_ip"
	// conflictOwnSubnetRewritten: our own subnet's key names another PublicIP; the lease
	// keeper writes it back (subnetmgr.KeepLease).
	conflictOwnSubnetRewritten = "own_subnet_rewritten"
)

// peerObserver is what the daemon counts of the peers' decisions (*metrics.Metrics).
type peerObserver interface {
	LeaseEvent(eventType string)
	LeaseRefused(reason string)
	ConflictDetected(kind string)
}

// peers applies lease events to the backend and remembers every other host's lease with what
// the backend made of it. It is used from one goroutine (the daemon's event loop).
//
// Only leases the trust rule accepts reach the backend (see subnetmgr/trust.go): the subnet
// must be one this network hands out and not overlap ours, and of the leases naming one
// PublicIP only the one etcd created first is programmed. A refused lease is kept in known
// with its reason, logged and counted once per version, and never handed to PrunePeers, so
// what an older build programmed for it goes at the next start.
type peers struct {
	b       backend.Backend
	own     subnetmgr.Lease
	cfg     subnetmgr.Config
	log     *slog.Logger
	obs     peerObserver
	known   map[netip.Prefix]peerState
	ownSeen bool // our own lease is in etcd (counted in leasesKnown)
	// claims holds, by PublicIP, every live lease that passed the subnet rule: the claimants
	// of that PublicIP, of which only the first (subnetmgr.ClaimsFirst) is programmed, and
	// none when the PublicIP is ours.
	claims map[netip.Addr]map[netip.Prefix]subnetmgr.Lease
	// conflicts are the PublicIPs several leases claim now (ours included), ownRewrite our
	// own key naming another PublicIP: for `xnetd status` and the metrics.
	conflicts  map[netip.Addr]conflictState
	ownRewrite *conflictState
	// conflictsChanged is set when a conflict starts, changes or ends (see
	// takeConflictsChanged).
	conflictsChanged bool
	// grace is how long a removal waits (removalGrace; 0 removes at once). removing holds
	// when each peer whose lease is gone leaves the datapath; those peers stay in known,
	// with RemovalDue set, until then.
	grace    time.Duration
	removing map[netip.Prefix]time.Time
	now      func() time.Time
}

func newPeers(b backend.Backend, own subnetmgr.Lease, cfg subnetmgr.Config, log *slog.Logger, obs peerObserver) *peers {
	return &peers{b: b, own: own, cfg: cfg, log: log, obs: obs, known: map[netip.Prefix]peerState{},
		claims: map[netip.Addr]map[netip.Prefix]subnetmgr.Lease{}, conflicts: map[netip.Addr]conflictState{},
		grace: removalGrace, removing: map[netip.Prefix]time.Time{}, now: time.Now}
}

// apply reconciles one batch. A changed lease is added again with its new data (AddPeer is
// idempotent and replaces what differs). A backend error refuses that peer only: it is logged,
// kept with its reason for `xnetd status`, and retried when the lease changes. A removed lease
// is only scheduled to leave the datapath after the grace (removeDue does it); the lease
// coming back cancels that. It reports whether the batch removed our own lease (and did not
// add it back).
func (p *peers) apply(events []subnetmgr.Event) (ownRemoved bool) {
	now := p.now()
	for _, ev := range events {
		if p.obs != nil {
			p.obs.LeaseEvent(ev.Type.String())
		}
		if ev.Lease.ID().Masked() == p.own.ID().Masked() {
			p.ownSeen = ev.Type != subnetmgr.EventRemoved
			ownRemoved = !p.ownSeen
			p.ownEvent(ev, now)
			continue
		}
		switch ev.Type {
		case subnetmgr.EventAdded, subnetmgr.EventChanged:
			p.put(ev, now)
		case subnetmgr.EventRemoved:
			p.drop(ev.Lease, now)
		}
	}
	return ownRemoved
}

// ownEvent notes what happened to our own key. It is never a peer; a foreign PublicIP in it
// is a conflict the lease keeper settles (it writes back a lease we created, and gives up a
// reservation an administrator moved).
func (p *peers) ownEvent(ev subnetmgr.Event, now time.Time) {
	l := ev.Lease
	if ev.Type == subnetmgr.EventRemoved || l.Host() == p.own.Host() {
		if p.ownRewrite != nil {
			p.log.Info("our lease names our PublicIP again", "subnet", l.ID(), "public_ip", p.own.Host(),
				"rewritten_for", now.Sub(p.ownRewrite.Since).Round(time.Millisecond))
			p.ownRewrite = nil
			p.conflictsChanged = true
		}
		p.log.Info("lease "+ev.Type.String(), "subnet", l.ID(), "public_ip", l.PublicIP, "skipped", "our lease")
		return
	}
	if p.own.Expiration.IsZero() {
		p.log.Warn("our reserved subnet now names another host's PublicIP: an administrator moved the reservation; the lease keeper gives it up",
			"subnet", l.ID(), "public_ip", p.own.Host(), "now", l.Host())
		return
	}
	if p.ownRewrite != nil && p.ownRewrite.PublicIP == l.Host() {
		return
	}
	p.conflictsChanged = true
	p.ownRewrite = &conflictState{Kind: conflictOwnSubnetRewritten, PublicIP: l.Host(),
		Subnets: []netip.Prefix{l.ID().Masked()}, Kept: l.ID().Masked(), Since: now,
		Detail: fmt.Sprintf("our lease %v was rewritten to name %v; it is ours (we created it), the lease keeper writes it back", l.ID(), l.Host())}
	if p.obs != nil {
		p.obs.ConflictDetected(conflictOwnSubnetRewritten)
	}
	p.log.Warn("our lease names another PublicIP; peers send our subnet there until the lease keeper writes it back",
		"subnet", l.ID(), "public_ip", p.own.Host(), "claimed_by", l.Host())
}

// put takes in a lease added or changed: refused by the subnet rule, or a claimant of its
// PublicIP; then the claims of its PublicIP (and of its old one) are settled again.
func (p *peers) put(ev subnetmgr.Event, now time.Time) {
	l := subnetmgr.ForFamilies(p.cfg, ev.Lease)
	key := l.ID().Masked()
	what := "lease " + ev.Type.String()
	old6 := p.known[key].lease.IPv6Subnet
	oldIP, claimed := p.unclaim(key)
	if r := p.check(l); r != nil {
		p.refuse(l, what, *r)
	} else {
		host := l.Host()
		if p.claims[host] == nil {
			p.claims[host] = map[netip.Prefix]subnetmgr.Lease{}
		}
		p.claims[host][key] = l
		p.settle(host, key, what, now)
	}
	if claimed && oldIP != l.Host() {
		p.settle(oldIP, key, what, now)
	}
	if old6.IsValid() && old6 != l.IPv6Subnet {
		p.recheckIPv6(old6, now)
	}
}

// check applies the subnet rules of both families to l and keeps IPv6 subnets unique: of two
// leases naming one, the one etcd created first is programmed. A claimant l comes before
// loses its claim here (it is refused, and its PublicIP settled again).
func (p *peers) check(l subnetmgr.Lease) *subnetmgr.Refusal {
	if r := subnetmgr.CheckPeer(p.cfg, p.own, l); r != nil {
		return r
	}
	if !l.IPv6Subnet.IsValid() {
		return nil
	}
	for ip, group := range p.claims {
		for key, o := range group {
			if o.IPv6Subnet != l.IPv6Subnet || key == l.ID().Masked() {
				continue
			}
			if subnetmgr.ClaimsFirst(o, l) {
				return &subnetmgr.Refusal{Reason: subnetmgr.RefusedDuplicateIPv6Subnet,
					Detail: fmt.Sprintf("IPv6 subnet %v is claimed first by %v (created at etcd revision %d, this lease at %d)",
						l.IPv6Subnet, o.ID(), o.CreateRevision, l.CreateRevision)}
			}
			p.unclaim(key)
			p.refuse(o, "IPv6 subnet claimed earlier by "+l.ID().String(), subnetmgr.Refusal{Reason: subnetmgr.RefusedDuplicateIPv6Subnet,
				Detail: fmt.Sprintf("IPv6 subnet %v is claimed first by %v (created at etcd revision %d, this lease at %d)",
					o.IPv6Subnet, l.ID(), l.CreateRevision, o.CreateRevision)})
			p.settle(ip, key, "claims to "+ip.String()+" settled again", p.now())
		}
	}
	return nil
}

// recheckIPv6 gives the leases refused for naming ipv6 (a subnet whose first claimant just
// went or moved) their chance again.
func (p *peers) recheckIPv6(ipv6 netip.Prefix, now time.Time) {
	for _, ps := range p.known {
		if ps.Refused == subnetmgr.RefusedDuplicateIPv6Subnet && ps.lease.IPv6Subnet == ipv6 {
			p.put(subnetmgr.Event{Type: subnetmgr.EventChanged, Lease: ps.lease}, now)
		}
	}
}

// drop takes out a removed lease: a refused one at once (it never was in the datapath), a
// programmed one after the grace. Its PublicIP's claims are settled again, so a lease it kept
// out is programmed now.
func (p *peers) drop(l subnetmgr.Lease, now time.Time) {
	key := l.ID().Masked()
	ip, claimed := p.unclaim(key)
	ps, ok := p.known[key]
	switch {
	case ok && ps.Refused != "":
		delete(p.known, key)
		p.log.Info("refused lease removed", "subnet", l.ID(), "public_ip", l.PublicIP)
	case !ok || p.grace <= 0:
		p.remove(key, l, "lease removed")
	default:
		if _, pending := p.removing[key]; !pending {
			due := now.Add(p.grace)
			p.removing[key] = due
			ps.RemovalDue = due
			p.known[key] = ps
			p.log.Info("lease removed; the peer leaves the datapath unless the lease is back within the grace", "subnet", l.ID(), "public_ip", l.PublicIP, "grace", p.grace)
		}
	}
	if claimed {
		p.settle(ip, key, "lease removed", now)
	}
	if ipv6 := ipv6Of(p.cfg, l); ipv6.IsValid() {
		p.recheckIPv6(ipv6, now)
	}
}

// ipv6Of is l's IPv6 subnet as the overlay uses it (none in an IPv4-only overlay).
func ipv6Of(cfg subnetmgr.Config, l subnetmgr.Lease) netip.Prefix {
	return subnetmgr.ForFamilies(cfg, l).IPv6Subnet
}

// unclaim withdraws the lease on key from the claims of its PublicIP, returning that PublicIP
// if it was a claimant.
func (p *peers) unclaim(key netip.Prefix) (netip.Addr, bool) {
	ps, ok := p.known[key]
	if !ok {
		return netip.Addr{}, false
	}
	host := ps.lease.Host()
	group := p.claims[host]
	if _, claimant := group[key]; !claimant {
		return netip.Addr{}, false
	}
	delete(group, key)
	if len(group) == 0 {
		delete(p.claims, host)
	}
	return host, true
}

// settle programs the first claimant of ip and refuses the others (all of them when ip is
// ours: packets to it would come back to us), and records the conflict while there are
// several. trigger is the lease whose event this is, what the event.
func (p *peers) settle(ip netip.Addr, trigger netip.Prefix, what string, now time.Time) {
	var claimants []subnetmgr.Lease
	for _, l := range p.claims[ip] {
		claimants = append(claimants, l)
	}
	sort.Slice(claimants, func(i, j int) bool { return subnetmgr.ClaimsFirst(claimants[i], claimants[j]) })
	whatFor := func(l subnetmgr.Lease) string {
		if l.ID().Masked() == trigger {
			return what
		}
		return "claims to " + ip.String() + " settled again"
	}
	if ip == p.own.Host() {
		for _, l := range claimants {
			p.refuse(l, whatFor(l), subnetmgr.Refusal{Reason: subnetmgr.RefusedDuplicatePublicIP,
				Detail: fmt.Sprintf("PublicIP %v is ours (our lease %v)", ip, p.own.ID())})
		}
		p.setConflict(ip, append([]subnetmgr.Lease{p.own}, claimants...), p.own.ID().Masked(), now)
		return
	}
	if len(claimants) == 0 {
		p.setConflict(ip, nil, netip.Prefix{}, now)
		return
	}
	// Losers first: a backend keeping state per PublicIP (the vxlan fdb entry) loses it with
	// a loser that was in the datapath, and the winner's AddPeer then puts it back.
	first := claimants[0]
	for _, l := range claimants[1:] {
		p.refuse(l, whatFor(l), subnetmgr.Refusal{Reason: subnetmgr.RefusedDuplicatePublicIP,
			Detail: fmt.Sprintf("PublicIP %v is claimed first by %v (created at etcd revision %d, this lease at %d)",
				ip, first.ID(), first.CreateRevision, l.CreateRevision)})
	}
	p.program(first, whatFor(first))
	p.setConflict(ip, claimants, first.ID().Masked(), now)
}

// setConflict records that claimants (the one kept first) claim ip now, logging it at Error
// when it is new or its claimants changed; with fewer than two claimants (besides ours) it
// clears the conflict.
func (p *peers) setConflict(ip netip.Addr, claimants []subnetmgr.Lease, kept netip.Prefix, now time.Time) {
	old, had := p.conflicts[ip]
	if len(claimants) < 2 {
		if had {
			delete(p.conflicts, ip)
			p.conflictsChanged = true
			p.log.Info("one lease claims the PublicIP again; conflict over", "public_ip", ip, "kept", kept,
				"lasted", now.Sub(old.Since).Round(time.Millisecond))
		}
		return
	}
	subnets := make([]netip.Prefix, len(claimants))
	for i, l := range claimants {
		subnets[i] = l.ID().Masked()
	}
	if had && slices.Equal(old.Subnets, subnets) && old.Kept == kept {
		return
	}
	c := conflictState{Kind: conflictDuplicatePublicIP, PublicIP: ip, Subnets: subnets, Kept: kept, Since: now}
	if had {
		c.Since = old.Since
	}
	if ip == p.own.Host() {
		// Other hosts keep the lease etcd created first, which may not be ours.
		first := p.own
		for _, l := range claimants {
			if subnetmgr.ClaimsFirst(l, first) {
				first = l
			}
		}
		c.Detail = fmt.Sprintf("leases name our PublicIP %v besides our lease %v; other hosts program %v, created first", ip, p.own.ID(), first.ID())
		p.log.Error("several leases claim our PublicIP; we program none of them, other hosts program only the one etcd created first",
			"public_ip", ip, "ours", p.own.ID(), "claimants", subnets, "peers_program", first.ID())
	} else {
		c.Detail = fmt.Sprintf("%d leases name PublicIP %v; only %v, created first, is programmed", len(subnets), ip, kept)
		p.log.Error("several leases claim one PublicIP; only the one etcd created first is programmed",
			"public_ip", ip, "kept", kept, "claimants", subnets)
	}
	p.conflicts[ip] = c
	p.conflictsChanged = true
	if !had && p.obs != nil {
		p.obs.ConflictDetected(conflictDuplicatePublicIP)
	}
}

// program puts l into the datapath as the peer on its subnet (nothing to do when it is
// there as it is).
func (p *peers) program(l subnetmgr.Lease, what string) {
	key := l.ID().Masked()
	prev, had := p.known[key]
	inDatapath := had && prev.Error == "" && prev.Refused == ""
	if _, ok := p.removing[key]; ok {
		delete(p.removing, key)
		if inDatapath && sameLease(prev.lease, l) {
			p.known[key] = peerState{leaseState: leaseStateOf(l), lease: l}
			p.log.Info(what+" again before its removal was due; peer kept as it was", "subnet", l.ID(), "public_ip", l.PublicIP)
			return
		}
	} else if inDatapath && sameLease(prev.lease, l) {
		p.known[key] = peerState{leaseState: leaseStateOf(l), lease: l}
		return
	}
	p.removeMovedHost(l)
	ps := peerState{leaseState: leaseStateOf(l), lease: l}
	if err := p.b.AddPeer(l); err != nil {
		ps.Error = err.Error()
		p.log.Warn(what+": peer refused by the backend", "subnet", l.ID(), "public_ip", l.PublicIP, "backend_type", l.BackendType, "err", err)
	} else {
		p.log.Info(what, "subnet", l.ID(), "public_ip", l.PublicIP, "backend_type", l.BackendType)
	}
	p.known[key] = ps
}

// refuse keeps l out of the datapath for r: a peer there before (or leaving) goes at once.
// A refusal is logged and counted once per lease version and reason.
func (p *peers) refuse(l subnetmgr.Lease, what string, r subnetmgr.Refusal) {
	key := l.ID().Masked()
	prev, had := p.known[key]
	if had && prev.Refused == r.Reason && prev.Error == r.Detail && sameLease(prev.lease, l) {
		prev.leaseState, prev.lease = leaseStateOf(l), l
		p.known[key] = prev
		return
	}
	if had && prev.Refused == "" {
		delete(p.removing, key)
		p.remove(key, prev.lease, what+": refused by the trust rule")
	}
	p.known[key] = peerState{leaseState: leaseStateOf(l), lease: l, Refused: r.Reason, Error: r.Detail}
	p.log.Warn(what+": refused by the trust rule, not programmed", "subnet", l.ID(), "public_ip", l.PublicIP,
		"reason", r.Reason, "why", r.Detail)
	if p.obs != nil {
		p.obs.LeaseRefused(r.Reason)
	}
}

// sameLease says whether b needs nothing of the backend that a did not (the same datapath).
func sameLease(a, b subnetmgr.Lease) bool {
	return a.PublicIP == b.PublicIP && a.BackendType == b.BackendType &&
		bytes.Equal(bytes.TrimSpace(a.BackendData), bytes.TrimSpace(b.BackendData)) &&
		a.IPv6Subnet == b.IPv6Subnet && a.PublicIPv6 == b.PublicIPv6 &&
		bytes.Equal(bytes.TrimSpace(a.BackendV6Data), bytes.TrimSpace(b.BackendV6Data))
}

// removeMovedHost removes at once a peer pending removal whose host is back under another
// subnet (l, same PublicIP): that host's old subnet is not coming back, and backends that
// keep per-host state by PublicIP must not have the old removal undo the new peer later.
func (p *peers) removeMovedHost(l subnetmgr.Lease) {
	for key := range p.removing {
		if old := p.known[key]; key != l.ID().Masked() && old.lease.Host() == l.Host() {
			delete(p.removing, key)
			p.remove(key, old.lease, "lease removed earlier; its host is back under "+l.ID().String())
		}
	}
}

// remove takes one peer out of the datapath and out of known.
func (p *peers) remove(key netip.Prefix, l subnetmgr.Lease, why string) {
	if err := p.b.RemovePeer(l); err != nil {
		p.log.Warn(why+": backend could not remove the peer", "subnet", l.ID(), "public_ip", l.PublicIP, "err", err)
	} else {
		p.log.Info(why+": peer removed", "subnet", l.ID(), "public_ip", l.PublicIP)
	}
	delete(p.known, key)
}

// removeDue removes every peer whose removal is due at now and returns how many it removed;
// nextRemoval then says when the next one is due.
func (p *peers) removeDue(now time.Time) (removed int) {
	for key, due := range p.removing {
		if due.After(now) {
			continue
		}
		delete(p.removing, key)
		p.remove(key, p.known[key].lease, "lease gone for the grace period")
		removed++
	}
	return removed
}

// nextRemoval is when the next pending removal is due (zero when none is).
func (p *peers) nextRemoval() time.Time {
	var next time.Time
	for _, due := range p.removing {
		if next.IsZero() || due.Before(next) {
			next = due
		}
	}
	return next
}

// leases are every peer lease the datapath may hold, those pending removal included (they are
// still in it): what PrunePeers keeps. Leases the trust rule refused are not among them, so
// whatever an older build programmed for them goes.
func (p *peers) leases() []subnetmgr.Lease {
	out := make([]subnetmgr.Lease, 0, len(p.known))
	for _, ps := range p.known {
		if ps.Refused == "" {
			out = append(out, ps.lease)
		}
	}
	return out
}

// takeConflictsChanged says whether the conflicts changed since it was last asked: the
// daemon then writes the state file at once rather than within its rate limit, since an
// operator looking at `xnetd status` after an alert must see the conflict.
func (p *peers) takeConflictsChanged() bool {
	changed := p.conflictsChanged
	p.conflictsChanged = false
	return changed
}

// conflictCounts is how many conflicts of each kind stand now.
func (p *peers) conflictCounts() map[string]int {
	own := 0
	if p.ownRewrite != nil {
		own = 1
	}
	return map[string]int{conflictDuplicatePublicIP: len(p.conflicts), conflictOwnSubnetRewritten: own}
}

// conflictList is every conflict standing now: our own key first, then by PublicIP.
func (p *peers) conflictList() []conflictState {
	var out []conflictState
	for _, c := range p.conflicts {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PublicIP.Less(out[j].PublicIP) })
	if p.ownRewrite != nil {
		out = append([]conflictState{*p.ownRewrite}, out...)
	}
	return out
}

// counts returns leases known (ours included; not those gone from etcd and pending
// removal), peers programmed (pending removal included: they are still in the datapath) and
// peers refused (by the trust rule or the backend).
func (p *peers) counts() (leasesKnown, applied, refused int) {
	for _, ps := range p.known {
		if ps.Error != "" || ps.Refused != "" {
			refused++
		} else {
			applied++
		}
	}
	leasesKnown = len(p.known) - len(p.removing)
	if p.ownSeen {
		leasesKnown++
	}
	return leasesKnown, applied, refused
}

// list is every peer, sorted by subnet.
func (p *peers) list() []peerState {
	out := make([]peerState, 0, len(p.known))
	for _, ps := range p.known {
		out = append(out, ps)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].lease.ID().Addr().Less(out[j].lease.ID().Addr()) })
	return out
}
