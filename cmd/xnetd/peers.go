package main

import (
	"bytes"
	"log/slog"
	"net/netip"
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

// peers applies lease events to the backend and remembers every other host's lease with what
// the backend made of it. It is used from one goroutine (the daemon's event loop).
type peers struct {
	b       backend.Backend
	own     subnetmgr.Lease
	log     *slog.Logger
	known   map[netip.Prefix]peerState
	ownSeen bool // our own lease is in etcd (counted in leasesKnown)
	onEvent func(subnetmgr.EventType)
	// grace is how long a removal waits (removalGrace; 0 removes at once). removing holds
	// when each peer whose lease is gone leaves the datapath; those peers stay in known,
	// with RemovalDue set, until then.
	grace    time.Duration
	removing map[netip.Prefix]time.Time
	now      func() time.Time
}

func newPeers(b backend.Backend, own subnetmgr.Lease, log *slog.Logger, onEvent func(subnetmgr.EventType)) *peers {
	return &peers{b: b, own: own, log: log, known: map[netip.Prefix]peerState{}, onEvent: onEvent,
		grace: removalGrace, removing: map[netip.Prefix]time.Time{}, now: time.Now}
}

// isOwn is our lease, or a lease carrying our PublicIP under another subnet: a stale lease of
// ours from before a subnet change, which must not be programmed as a peer (a route to our
// own address would loop).
func (p *peers) isOwn(l subnetmgr.Lease) (own bool, why string) {
	if l.Subnet.Masked() == p.own.Subnet.Masked() {
		return true, "our lease"
	}
	if l.PublicIP == p.own.PublicIP {
		return true, "a stale lease with our PublicIP"
	}
	return false, ""
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
		l := ev.Lease
		if p.onEvent != nil {
			p.onEvent(ev.Type)
		}
		if own, why := p.isOwn(l); own {
			if l.Subnet.Masked() == p.own.Subnet.Masked() {
				p.ownSeen = ev.Type != subnetmgr.EventRemoved
				ownRemoved = !p.ownSeen
			}
			p.log.Info("lease "+ev.Type.String(), "subnet", l.Subnet, "public_ip", l.PublicIP, "skipped", why)
			continue
		}
		key := l.Subnet.Masked()
		switch ev.Type {
		case subnetmgr.EventAdded, subnetmgr.EventChanged:
			if _, ok := p.removing[key]; ok {
				delete(p.removing, key)
				if prev := p.known[key]; prev.Error == "" && sameLease(prev.lease, l) {
					p.known[key] = peerState{leaseState: leaseStateOf(l), lease: l}
					p.log.Info("lease "+ev.Type.String()+" again before its removal was due; peer kept as it was", "subnet", l.Subnet, "public_ip", l.PublicIP)
					continue
				}
			}
			p.removeMovedHost(l)
			ps := peerState{leaseState: leaseStateOf(l), lease: l}
			if err := p.b.AddPeer(l); err != nil {
				ps.Error = err.Error()
				p.log.Warn("lease "+ev.Type.String()+": peer refused by the backend", "subnet", l.Subnet, "public_ip", l.PublicIP, "backend_type", l.BackendType, "err", err)
			} else {
				p.log.Info("lease "+ev.Type.String(), "subnet", l.Subnet, "public_ip", l.PublicIP, "backend_type", l.BackendType)
			}
			p.known[key] = ps
		case subnetmgr.EventRemoved:
			ps, ok := p.known[key]
			if !ok || p.grace <= 0 {
				p.remove(key, l, "lease removed")
				continue
			}
			if _, pending := p.removing[key]; pending {
				continue
			}
			due := now.Add(p.grace)
			p.removing[key] = due
			ps.RemovalDue = due
			p.known[key] = ps
			p.log.Info("lease removed; the peer leaves the datapath unless the lease is back within the grace", "subnet", l.Subnet, "public_ip", l.PublicIP, "grace", p.grace)
		}
	}
	return ownRemoved
}

// sameLease says whether b needs nothing of the backend that a did not (the same datapath).
func sameLease(a, b subnetmgr.Lease) bool {
	return a.PublicIP == b.PublicIP && a.BackendType == b.BackendType &&
		bytes.Equal(bytes.TrimSpace(a.BackendData), bytes.TrimSpace(b.BackendData))
}

// removeMovedHost removes at once a peer pending removal whose host is back under another
// subnet (l, same PublicIP): that host's old subnet is not coming back, and backends that
// keep per-host state by PublicIP must not have the old removal undo the new peer later.
func (p *peers) removeMovedHost(l subnetmgr.Lease) {
	for key := range p.removing {
		if old := p.known[key]; key != l.Subnet.Masked() && old.PublicIP == l.PublicIP {
			delete(p.removing, key)
			p.remove(key, old.lease, "lease removed earlier; its host is back under "+l.Subnet.String())
		}
	}
}

// remove takes one peer out of the datapath and out of known.
func (p *peers) remove(key netip.Prefix, l subnetmgr.Lease, why string) {
	if err := p.b.RemovePeer(l); err != nil {
		p.log.Warn(why+": backend could not remove the peer", "subnet", l.Subnet, "public_ip", l.PublicIP, "err", err)
	} else {
		p.log.Info(why+": peer removed", "subnet", l.Subnet, "public_ip", l.PublicIP)
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

// leases are every peer lease known, those pending removal included (they are still in the
// datapath).
func (p *peers) leases() []subnetmgr.Lease {
	out := make([]subnetmgr.Lease, 0, len(p.known))
	for _, ps := range p.known {
		out = append(out, ps.lease)
	}
	return out
}

// counts returns leases known (ours included; not those gone from etcd and pending
// removal), peers programmed (pending removal included: they are still in the datapath) and
// peers refused.
func (p *peers) counts() (leasesKnown, applied, refused int) {
	for _, ps := range p.known {
		if ps.Error != "" {
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
	sort.Slice(out, func(i, j int) bool { return out[i].Subnet.Addr().Less(out[j].Subnet.Addr()) })
	return out
}
