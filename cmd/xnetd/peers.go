package main

import (
	"log/slog"
	"net/netip"
	"sort"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// peers applies lease events to the backend and remembers every other host's lease with what
// the backend made of it. It is used from one goroutine (the daemon's event loop).
type peers struct {
	b       backend.Backend
	own     subnetmgr.Lease
	log     *slog.Logger
	known   map[netip.Prefix]peerState
	ownSeen bool // our own lease is in etcd (counted in leasesKnown)
	onEvent func(subnetmgr.EventType)
}

func newPeers(b backend.Backend, own subnetmgr.Lease, log *slog.Logger, onEvent func(subnetmgr.EventType)) *peers {
	return &peers{b: b, own: own, log: log, known: map[netip.Prefix]peerState{}, onEvent: onEvent}
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
// kept with its reason for `xnetd status`, and retried when the lease changes. It reports
// whether the batch removed our own lease (and did not add it back).
func (p *peers) apply(events []subnetmgr.Event) (ownRemoved bool) {
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
		switch ev.Type {
		case subnetmgr.EventAdded, subnetmgr.EventChanged:
			ps := peerState{leaseState: leaseStateOf(l)}
			if err := p.b.AddPeer(l); err != nil {
				ps.Error = err.Error()
				p.log.Warn("lease "+ev.Type.String()+": peer refused by the backend", "subnet", l.Subnet, "public_ip", l.PublicIP, "backend_type", l.BackendType, "err", err)
			} else {
				p.log.Info("lease "+ev.Type.String(), "subnet", l.Subnet, "public_ip", l.PublicIP, "backend_type", l.BackendType)
			}
			p.known[l.Subnet.Masked()] = ps
		case subnetmgr.EventRemoved:
			if err := p.b.RemovePeer(l); err != nil {
				p.log.Warn("lease removed: backend could not remove the peer", "subnet", l.Subnet, "public_ip", l.PublicIP, "err", err)
			} else {
				p.log.Info("lease removed", "subnet", l.Subnet, "public_ip", l.PublicIP)
			}
			delete(p.known, l.Subnet.Masked())
		}
	}
	return ownRemoved
}

// counts returns leases known (ours included), peers programmed and peers refused.
func (p *peers) counts() (leasesKnown, applied, refused int) {
	for _, ps := range p.known {
		if ps.Error != "" {
			refused++
		} else {
			applied++
		}
	}
	leasesKnown = len(p.known)
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
