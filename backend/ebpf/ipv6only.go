package ebpf

// An IPv6-only overlay (subnetmgr.Config.IPv6Only: EnableIPv4 false). Our lease and every
// peer's hold an IPv6 subnet and no IPv4 one, under flannel's key 0.0.0.0-0&<v6>-<len> with
// PublicIP 0.0.0.0, so there is no IPv4 tunnel to carry anything: every peer is reached over the
// IPv6 underlay through TunnelDevice, as a dual-stack peer with an IPv6 VTEP is (tunnel.go,
// bpf/underlay6.h), and a PublicIPv6 is required (New refuses to build without one).
//
// What differs from dual stack:
//   - Peers are keyed by their IPv6 subnet (Lease.ID()), parsed as flannel's IPv6-only vxlan
//     node publishes itself (backend.ParseVXLANPeerIPv6Only: a PublicIPv6 and BackendV6Data),
//     and get one routes6 entry each, PublicIP 0.0.0.0. The IPv4 maps hold nothing of ours:
//     PrunePeers empties routes, peer counters and IPv4 next hops an earlier run left (the
//     nexthops cache keeps the PublicIPv6 of kept DirectRouting peers).
//   - Per-peer counters are keyed by the PublicIPv6 (the programs count a route6 without a
//     PublicIP under its remote_ip6), and b.peers maps each IPv6 subnet to that address, so
//     Counters, `xnetd status` and the metrics name them by IPv6 subnet as the other modes do
//     by subnet.
//   - We publish what flannel's IPv6-only vxlan node does: PublicIP 0.0.0.0 and no BackendData
//     (xnetd), PublicIPv6 and BackendV6Data {VNI, VtepMAC of xnet6} (LeaseAttrsV6), so flannel
//     hosts, xnet vxlan hosts and ebpf hosts of an IPv6-only overlay reach each other.
//   - The config entry says ipv6_only and holds no IPv4 address or lease: the programs leave
//     IPv4 alone (Docker's default IPv4 on docker0 stays the host's business), and decap_tunnel
//     drops what reaches xnet6 over the IPv4 underlay.
//   - xnet0 has no IPv4 address or route (an earlier run's are removed), only the IPv6 ones.
//   - The container bridges are those holding an IPv6 address inside our IPv6 subnet: docker0
//     started with --ipv6 --fixed-cidr-v6 still has Docker's default IPv4 address, and its IPv6
//     gateway is what says it serves our lease.
//   - The overlay MTU (Docker's --mtu, xnet0's) is the underlay's less 70, as for flannel's
//     IPv6 device.
//   - DirectRouting routes a peer whose PublicIPv6 is on our IPv6 segment plain (peerPath6 in
//     direct.go, bpf/direct6.h), as vxlan does there.

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// MTU is the overlay MTU: over the IPv6 underlay (70 bytes of headers) in an IPv6-only overlay,
// whose every peer is reached there, else over IPv4 (50).
func (b *Backend) MTU() int {
	if b.ipv6Only {
		return backend.OverlayMTUv6(b.Iface.MTU)
	}
	return b.VXLAN.MTU()
}

// addPeerIPv6Only is AddPeer in an IPv6-only overlay. Called with mu held.
func (b *Backend) addPeerIPv6Only(lease subnetmgr.Lease) error {
	if b.IsOwn(lease) {
		return nil
	}
	p, err := backend.ParseVXLANPeerIPv6Only(lease)
	if err != nil {
		b.Log.Warn("skipping peer lease", "subnet", lease.ID(), "public_ipv6", lease.PublicIPv6, "err", err)
		return fmt.Errorf("ebpf: %w", err)
	}
	if why := b.subnet6Problem(p.Subnet, p.Subnet); why != "" {
		if b.v6.unreachable[p.Subnet] != why {
			b.Log.Warn("peer's IPv6 subnet not programmed", "subnet", p.Subnet, "public_ipv6", p.PublicIPv6, "why", why)
		}
		b.v6.unreachable[p.Subnet] = why
		return fmt.Errorf("ebpf: lease %v: %s: %w", p.Subnet, why, backend.ErrIncompatiblePeer)
	}
	delete(b.v6.unreachable, p.Subnet)
	r := maps.Route6{Subnet: p.Subnet, PublicIP: netip.IPv4Unspecified(), VtepMAC: p.VtepMAC, PublicIPv6: p.PublicIPv6,
		Direct: b.peerPath6(p.Subnet, p.PublicIPv6).Direct}
	if err := b.countPeer(p.Subnet, p.PublicIPv6); err != nil {
		return err
	}
	if err := b.m.PutRoute6(r); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	b.peers[p.Subnet] = p.PublicIPv6
	b.v6.peers[p.Subnet] = p.Subnet
	b.Log.Debug("peer programmed", "ipv6_subnet", p.Subnet, "public_ipv6", p.PublicIPv6, "vtep_mac", p.VtepMAC.String(), "direct", r.Direct)
	return nil
}

// removePeerIPv6Only is RemovePeer in an IPv6-only overlay: the lease's IPv6 subnet goes, and
// its counters unless another subnet's peer has the same PublicIPv6. Called with mu held.
func (b *Backend) removePeerIPv6Only(lease subnetmgr.Lease) error {
	s := lease.IPv6Subnet
	if !s.IsValid() || !s.Addr().Is6() {
		return fmt.Errorf("ebpf: RemovePeer: lease has no IPv6 subnet (%v)", s)
	}
	if b.IsOwn(lease) {
		return nil
	}
	subnet := s.Masked()
	ip, ok := b.peers[subnet]
	if !ok {
		ip = lease.PublicIPv6
	}
	delete(b.peers, subnet)
	delete(b.v6.peers, subnet)
	delete(b.v6.unreachable, subnet)
	b.forgetPath(subnet)
	if err := b.m.DeleteRoute6(subnet); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	return b.uncountPeer(subnet, ip)
}

// prunePeersIPv6Only is PrunePeers in an IPv6-only overlay: routes6 entries of IPv6 subnets
// no kept lease holds go, counters and cached next hops of addresses no kept lease has as its
// PublicIPv6 go, and so does everything in the IPv4 routes map (an earlier IPv4 or dual-stack
// run's: nothing of an IPv6-only overlay is there). Called with mu held.
func (b *Backend) prunePeersIPv6Only(keep []subnetmgr.Lease) error {
	kept := map[netip.Prefix]bool{}
	for _, l := range keep {
		if l.IPv6Subnet.IsValid() {
			kept[l.IPv6Subnet.Masked()] = true
		}
	}
	for s := range b.v6.peers {
		if !kept[s] {
			delete(b.v6.peers, s)
			delete(b.peers, s)
		}
	}
	for s := range b.direct.paths {
		if !kept[s] {
			b.forgetPath(s)
		}
	}
	for s := range b.v6.unreachable {
		if !kept[s] {
			delete(b.v6.unreachable, s)
		}
	}
	var errs []error
	var gone6, gone []netip.Prefix
	routes6, err := b.m.ListRoutes6()
	errs = append(errs, err)
	for _, r := range routes6 {
		if kept[r.Subnet.Masked()] {
			continue
		}
		if err := b.m.DeleteRoute6(r.Subnet); err != nil {
			errs = append(errs, err)
			continue
		}
		gone6 = append(gone6, r.Subnet)
	}
	routes, err := b.m.ListRoutes()
	errs = append(errs, err)
	for _, r := range routes {
		if err := b.m.DeleteRoute(r.Subnet); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, r.Subnet)
	}
	// Counters and cached next hops (DirectRouting's) are keyed by PublicIPv6 here: a kept
	// peer's stay, the rest (every IPv4 one) go.
	keepIPs := map[netip.Addr]bool{}
	for _, l := range keep {
		if l.PublicIPv6.IsValid() {
			keepIPs[l.PublicIPv6] = true
		}
	}
	peers, err := b.m.ReadPeers()
	errs = append(errs, err)
	droppedCounters := 0
	for ip := range peers {
		if keepIPs[ip] {
			continue
		}
		errs = append(errs, b.m.DeletePeer(ip))
		droppedCounters++
	}
	hops, err := b.m.ListNexthops()
	errs = append(errs, err)
	droppedHops := 0
	for _, ip := range hops {
		if keepIPs[ip] {
			continue
		}
		errs = append(errs, b.m.DeleteNexthop(ip))
		droppedHops++
	}
	if len(gone)+len(gone6)+droppedCounters+droppedHops > 0 {
		b.Log.Info("removed peers whose leases went away while xnetd was down, and IPv4 state an earlier run left",
			"ipv6_routes", gone6, "ipv4_routes", gone, "peer_counters", droppedCounters, "next_hops", droppedHops)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: prune peers: %w", err)
	}
	return nil
}
