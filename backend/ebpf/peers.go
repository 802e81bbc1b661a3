package ebpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// AddPeer writes the peer's route and creates its counters. Our own lease (or an older lease of
// this host) is ignored. With DirectRouting the route says whether the peer is on our segment
// (direct.go), decided again at every call, so a changed lease moves the peer between paths.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: AddPeer(%v) before Setup", lease.ID())
	}
	if b.ipv6Only {
		return b.addPeerIPv6Only(lease)
	}
	p, own, err := b.Peer(lease)
	if own || err != nil {
		return err
	}
	r := maps.Route{Subnet: p.Subnet, PublicIP: p.PublicIP, VtepMAC: p.VtepMAC, Direct: b.peerPath(p.Subnet, p.PublicIP).Direct}
	if err := b.countPeer(r.Subnet, r.PublicIP); err != nil {
		return err
	}
	if err := b.m.PutRoute(r); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	b.peers[r.Subnet] = r.PublicIP
	if err := b.programPeerIPv6(lease, p); err != nil {
		return err
	}
	b.Log.Debug("peer programmed", "subnet", r.Subnet, "ipv6_subnet", b.v6.peers[r.Subnet], "public_ip", r.PublicIP,
		"vtep_mac", r.VtepMAC.String(), "direct", r.Direct)
	return nil
}

// RemovePeer deletes the peer's route (and its counters when no other subnet uses its
// PublicIP). A peer that is not there is not an error.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: RemovePeer(%v) before Setup", lease.ID())
	}
	if b.ipv6Only {
		return b.removePeerIPv6Only(lease)
	}
	subnet, own, err := b.RemovedSubnet(lease)
	if own || err != nil {
		return err
	}
	ip, ok := b.peers[subnet]
	if !ok {
		ip = lease.PublicIP
	}
	delete(b.peers, subnet)
	b.forgetPath(subnet)
	if err := b.removePeerIPv6(subnet, lease); err != nil {
		return err
	}
	if err := b.m.DeleteRoute(subnet); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	return b.uncountPeer(subnet, ip)
}

// PrunePeers removes what the pinned maps still hold for peers that are not in keep
// (backend.PeerPruner): a restarted xnetd inherits the routes, counters and cached next hops of
// leases deleted while it was down, and no removal event will ever name them. Routes go by
// subnet; counter entries and cached next hops by PublicIP (or PublicIPv6, which keys the next
// hop of a DirectRouting peer on our IPv6 segment), kept while a kept lease or a kept route
// names it. Our own lease's subnet, the config entry, the verdict counters and the learned
// containers are this host's and never touched.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: PrunePeers before Setup")
	}
	if b.ipv6Only {
		return b.prunePeersIPv6Only(keep)
	}
	kept := backend.NewKeptSubnets(b.Local().Subnet, keep)
	keepIPs := map[netip.Addr]bool{}
	for _, l := range keep {
		if l.PublicIP.IsValid() {
			keepIPs[l.PublicIP] = true
		}
		if l.PublicIPv6.IsValid() {
			keepIPs[l.PublicIPv6] = true
		}
	}
	routes, err := b.m.ListRoutes()
	if err != nil {
		return fmt.Errorf("ebpf: prune: %w", err)
	}
	var errs []error
	var gone []netip.Prefix
	for _, r := range routes {
		if kept.Has(r.Subnet) {
			keepIPs[r.PublicIP] = true
			continue
		}
		if err := b.m.DeleteRoute(r.Subnet); err != nil {
			errs = append(errs, err)
			keepIPs[r.PublicIP] = true // still routed: keep counting it
			continue
		}
		gone = append(gone, r.Subnet)
	}
	for s := range b.peers {
		if !kept.Has(s) {
			delete(b.peers, s)
			b.forgetPath(s)
		}
	}
	gone6, err := b.pruneIPv6(keep)
	if err != nil {
		errs = append(errs, err)
	}
	var counters, nexthops int
	peers, err := b.m.ReadPeers()
	if err != nil {
		errs = append(errs, err)
	}
	for ip := range peers {
		if keepIPs[ip] {
			continue
		}
		if err := b.m.DeletePeer(ip); err != nil {
			errs = append(errs, err)
			continue
		}
		counters++
	}
	hops, err := b.m.ListNexthops()
	if err != nil {
		errs = append(errs, err)
	}
	for _, ip := range hops {
		if keepIPs[ip] {
			continue
		}
		if err := b.m.DeleteNexthop(ip); err != nil {
			errs = append(errs, err)
			continue
		}
		nexthops++
	}
	if len(gone)+len(gone6)+counters+nexthops > 0 {
		b.Log.Info("removed peers whose leases went away while xnetd was down", "routes", gone, "ipv6_routes", gone6,
			"peer_counters", counters, "next_hops", nexthops)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: prune peers: %w", err)
	}
	return nil
}

// countPeer gives the peer of subnet, now at ip, its counter entry before its route is
// written (the programs count only into entries that exist), and drops the entry of the
// address the subnet had before unless another peer still has it. Called with mu held.
func (b *Backend) countPeer(subnet netip.Prefix, ip netip.Addr) error {
	if old, ok := b.peers[subnet]; ok && old != ip && !b.publicIPInUse(old, subnet) {
		_ = b.m.DeletePeer(old)
	}
	if err := b.m.AddPeer(ip); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	return nil
}

// uncountPeer drops the counter entry of ip, the address of subnet's removed peer, unless
// another peer has the same address. Called with mu held.
func (b *Backend) uncountPeer(subnet netip.Prefix, ip netip.Addr) error {
	if !ip.IsValid() || b.publicIPInUse(ip, subnet) {
		return nil
	}
	if err := b.m.DeletePeer(ip); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	return nil
}

func (b *Backend) publicIPInUse(ip netip.Addr, except netip.Prefix) bool {
	for s, p := range b.peers {
		if p == ip && s != except {
			return true
		}
	}
	return false
}
