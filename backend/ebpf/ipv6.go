package ebpf

// IPv6 in a dual-stack overlay (subnetmgr.Config.EnableIPv6): containers' IPv6 packets cross the
// same tunnel as their IPv4 ones, unless both hosts have an IPv6 underlay (below). The programs
// (bpf/ipv6.h) encapsulate an inner IPv6 packet (EtherType 0x86DD) in the same VXLAN over the
// IPv4 underlay, to the same peer, with the same VNI and VTEP MACs, and decapsulate it under the
// same rules, so one program, one pair of MACs and one set of per-peer counters serve both
// families. The Go side adds per host the config6 entry (our IPv6 lease and the gateway Docker
// puts in it, and our IPv6 VTEP when we have one), per peer one routes6 entry (its IPv6Subnet,
// pointing at the same PublicIP and VTEP MAC as its IPv4 route, or at its IPv6 VTEP), and on xnet0 the
// IPv6 twin of its IPv4 setup (our subnet's first address, /128, and a route for the IPv6
// Network), so the host reaches remote containers over IPv6 too. Containers' IPv6 addresses
// are learned as their IPv4 ones are: from what they send (endpoints6).
//
// What we publish, and what a flannel host makes of it. flannel's dual stack runs a second
// VXLAN device for IPv6 on the IPv6 underlay, and reads BackendV6Data as that device's
// {"VNI","VtepMAC"}, reached at PublicIPv6. So:
//   - With an IPv6 underlay address (PublicIPv6) we have such a VTEP too: TunnelDevice, a
//     metadata-mode vxlan device the programs send through and receive from (tunnel.go,
//     bpf/underlay6.h). We publish its MAC (backend.VtepMACv6, another MAC than our IPv4 VTEP's,
//     as xnet's vxlan backend publishes its xnet-v6.<VNI>) as BackendV6Data, and xnetd publishes
//     PublicIPv6 with it (backend.IPv6Receiver). A flannel host then sends us IPv6 in VXLAN over
//     the IPv6 underlay, and we send it its IPv6 the same way.
//   - Without one we publish nothing for IPv6 (xnetd publishes neither PublicIPv6 nor
//     BackendV6Data for a backend that does not receive on the IPv6 underlay: flannel v0.28
//     dereferences a lease's PublicIPv6 as soon as its BackendV6Data decodes). flannel skips
//     our lease's IPv6 then (it logs the missing BackendV6Data), as for any host without an
//     IPv6 underlay; xnet peers reach our IPv6 inside their IPv4 VXLAN.
//   - A peer with an IPv6 VTEP of its own (a PublicIPv6, and a BackendV6Data VtepMAC other than
//     its BackendData one: backend.ParseVXLANPeerV6) gets its IPv6 subnet over the IPv6
//     underlay when we have one. When we have none, its IPv6 rides the IPv4 VXLAN to its IPv4
//     VTEP (with that VTEP's MAC), as xnet's vxlan backend sends it: an xnet host takes IPv6 on
//     either VTEP. (A flannel host routes it too, but cannot answer: it reaches our IPv6 only
//     through an IPv6 VTEP of ours.)
//   - A peer without one (an xnet host without an IPv6 underlay, or an ebpf or udp host of an
//     older build) is reached inside the IPv4 VXLAN with its BackendData VTEP MAC: the one
//     device of such a host carries both families.
// With DirectRouting a peer whose PublicIPv6 is on our IPv6 segment gets its IPv6 subnet routed
// plain via that address (peerPath6 in direct.go, bpf/direct6.h), decided apart from its IPv4
// path; every other peer's IPv6 crosses in VXLAN, also when its IPv4 goes plain.
// Over the IPv6 underlay the overlay MTU is 20 bytes smaller (backend.VXLANOverheadV6): the
// programs answer a container's larger IPv6 packets to such a peer with Packet Too Big, and
// xnet0's IPv6 route carries that MTU for the host's own traffic.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// ipv6MinMTU is the smallest link MTU IPv6 allows (RFC 8200 5); the kernel turns IPv6 off on
// an interface with less.
const ipv6MinMTU = 1280

// ipv6State is the backend's IPv6 side. Guarded by the backend's mu.
type ipv6State struct {
	local     netip.Prefix // our IPv6 lease; invalid on an IPv4-only overlay
	network   netip.Prefix // the overlay's IPv6Network
	subnetLen int          // the overlay's IPv6SubnetLen
	// peers is the IPv6 subnet programmed for each peer, by the peer's IPv4 subnet (the key of
	// a lease); unreachable says why a peer's IPv6 subnet is not programmed.
	peers       map[netip.Prefix]netip.Prefix
	unreachable map[netip.Prefix]string
	// tunnel is the ifindex of TunnelDevice while we carry IPv6 over the IPv6 underlay; 0
	// otherwise.
	tunnel int
}

func newIPv6State() ipv6State {
	return ipv6State{peers: map[netip.Prefix]netip.Prefix{}, unreachable: map[netip.Prefix]string{}}
}

// hasIPv6Underlay says whether, in a dual-stack overlay, this host runs an IPv6 VTEP: it has an
// IPv6 underlay address with room for the VXLAN headers over IPv6.
func hasIPv6Underlay(opts backend.Options) bool {
	a := opts.Iface.PublicIPv6
	return opts.Config.EnableIPv6 && a.Is6() && !a.Is4In6() && opts.Iface.MTU > backend.VXLANOverheadV6
}

// ReceivesOnIPv6Underlay (backend.IPv6Receiver): with an IPv6 underlay address, TunnelDevice
// takes VXLAN on it, so xnetd publishes our PublicIPv6.
func (b *Backend) ReceivesOnIPv6Underlay() bool { return b.ipv6Underlay }

// LeaseAttrsV6 is what this host publishes as BackendV6Data (backend.DualStack): our IPv6
// VTEP's {"VNI","VtepMAC"} when we have an IPv6 underlay; otherwise BackendData's, when the
// host has a PublicIPv6 (xnetd publishes it only with a receiver on the IPv6 underlay), and
// nothing without one (see the top of this file for why).
func (b *Backend) LeaseAttrsV6() (json.RawMessage, error) {
	if !b.Iface.PublicIPv6.IsValid() {
		return nil, nil
	}
	data, err := backend.VXLANLeaseDataV6(b.VNI, b.Iface.PublicIP, b.Iface.PublicIPv6, b.ipv6Underlay)
	if err != nil {
		return nil, fmt.Errorf("ebpf: %w", err)
	}
	return data, nil
}

// setupIPv6 makes the datapath's IPv6 side match our lease: config6 and xnet0's IPv6 address
// and route in a dual-stack overlay, none of them otherwise (an earlier run's are removed, and
// the programs leave IPv6 alone). Called with mu held, in the backend's namespace.
func (b *Backend) setupIPv6(local subnetmgr.Lease, cfg subnetmgr.Config, host netlink.Link) error {
	if !cfg.EnableIPv6 || !local.IPv6Subnet.IsValid() {
		if cfg.EnableIPv6 {
			b.Log.Warn("dual-stack overlay, but our lease has no IPv6 subnet: containers' IPv6 stays on this host")
		}
		b.v6.local, b.v6.network, b.v6.tunnel = netip.Prefix{}, netip.Prefix{}, 0
		if err := b.m.ClearConfig6(); err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		if err := b.removeTunnelDevice(); err != nil {
			return err
		}
		// Best effort: an IPv4-only host may have no IPv6 at all, and what an earlier
		// dual-stack run left on xnet0 only routes into an overlay no peer serves.
		if err := removeHostIPv6(host); err != nil {
			b.Log.Debug("IPv6 setup of xnet0 not removed", "err", err)
		}
		return nil
	}
	subnet := local.IPv6Subnet.Masked()
	if !subnet.Addr().Is6() || subnet.Addr().Is4In6() {
		return fmt.Errorf("ebpf: our lease's IPv6 subnet %v is not IPv6", local.IPv6Subnet)
	}
	b.v6.local, b.v6.network, b.v6.subnetLen = subnet, cfg.IPv6Network.Masked(), cfg.IPv6SubnetLen
	if b.MTU() < ipv6MinMTU {
		b.Log.Warn("the overlay MTU is below IPv6's minimum: containers' IPv6 will not work", "mtu", b.MTU(), "min", ipv6MinMTU)
	}
	// Docker's --fixed-cidr-v6 gives its bridge the first address of the subnet.
	cfg6 := maps.Config6{Subnet: subnet, Gateway: subnet.Addr().Next()}
	routeMTU := 0
	b.v6.tunnel = 0
	if b.ipv6Underlay {
		tunnel, err := b.ensureTunnelDevice()
		if err != nil {
			return err
		}
		b.v6.tunnel = tunnel
		cfg6.LocalIPv6, cfg6.TunnelIfindex, cfg6.VtepMACv6 = b.Iface.PublicIPv6, tunnel, backend.VtepMACv6(b.Iface.PublicIPv6)
		routeMTU = backend.OverlayMTUv6(b.Iface.MTU)
	}
	if err := b.m.SetConfig6(cfg6); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	// After config6 stopped naming it: until then the programs hand packets to it.
	if !b.ipv6Underlay {
		if err := b.removeTunnelDevice(); err != nil {
			return err
		}
	}
	// Not fatal: containers reach each other without it (IPv6 off on this host is the usual
	// cause), and the IPv4 overlay must not go down for the host's own IPv6.
	if err := ensureHostIPv6(host, subnet, b.v6.network, routeMTU); err != nil {
		b.Log.Error("xnet0 has no IPv6: this host cannot reach remote containers over IPv6, and IPv6 packets for a local container that has not sent anything yet are lost", "err", err)
	}
	return nil
}

// ensureHostIPv6 gives xnet0 the IPv6 twin of its IPv4 setup: our subnet's first address (/128,
// as flannel's IPv6 device holds it) and a route for the IPv6 Network with it as source, so the
// host's own IPv6 traffic to remote containers takes encap_host and has a source the peers
// accept. xnet0 has ARP off, which for IPv6 means no neighbour discovery: the kernel addresses
// the frames to xnet0's own MAC, as for IPv4. mtu, when not 0, is the route's MTU: the overlay's
// over the IPv6 underlay, smaller than xnet0's, since encap_host can only drop what does not fit.
func ensureHostIPv6(host netlink.Link, subnet, network netip.Prefix, mtu int) error {
	// A host created with net.ipv6.conf.default.disable_ipv6=1 has it off on xnet0 too.
	sysctl := filepath.Join("/proc/sys/net/ipv6/conf", host.Attrs().Name, "disable_ipv6")
	if err := os.WriteFile(sysctl, []byte("0"), 0o644); err != nil {
		return fmt.Errorf("ebpf: turn IPv6 on on %s (%s): %w", HostDevice, sysctl, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: subnet.Addr().AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}
	if err := netlink.AddrReplace(host, addr); err != nil {
		return fmt.Errorf("ebpf: address %s on %s: %w", addr.IPNet, HostDevice, err)
	}
	if err := removeHostIPv6Addrs(host, addr.IP); err != nil {
		return err
	}
	route := &netlink.Route{LinkIndex: host.Attrs().Index, Dst: backend.IPNet(network), Src: addr.IP, MTU: mtu}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("ebpf: route %s dev %s: %w", network, HostDevice, err)
	}
	// Only this route: an older IPv6 Network's would send traffic into the overlay that no
	// peer owns.
	routes, err := netlink.RouteList(host, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("ebpf: list IPv6 routes of %s: %w", HostDevice, err)
	}
	for _, r := range routes {
		if r.Dst != nil && !linkLocal(r.Dst.IP) && r.Dst.String() != network.String() {
			_ = netlink.RouteDel(&r)
		}
	}
	return nil
}

// removeHostIPv6 takes xnet0's IPv6 address and routes away again (link-local ones stay, as
// the kernel manages them): the overlay is IPv4 only now.
func removeHostIPv6(host netlink.Link) error {
	routes, err := netlink.RouteList(host, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("ebpf: list IPv6 routes of %s: %w", HostDevice, err)
	}
	var errs []error
	for _, r := range routes {
		if r.Dst != nil && !linkLocal(r.Dst.IP) {
			errs = append(errs, backend.IgnoreMissing(netlink.RouteDel(&r)))
		}
	}
	errs = append(errs, removeHostIPv6Addrs(host, nil))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: remove the IPv6 setup of %s: %w", HostDevice, err)
	}
	return nil
}

// removeHostIPv6Addrs removes every IPv6 address of xnet0 but keep and the link-local ones.
func removeHostIPv6Addrs(host netlink.Link, keep net.IP) error {
	addrs, err := netlink.AddrList(host, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("ebpf: list IPv6 addresses of %s: %w", HostDevice, err)
	}
	var errs []error
	for _, a := range addrs {
		if !linkLocal(a.IP) && !a.IP.Equal(keep) {
			errs = append(errs, backend.IgnoreMissing(netlink.AddrDel(host, &a)))
		}
	}
	return errors.Join(errs...)
}

func linkLocal(ip net.IP) bool { return ip.IsLinkLocalUnicast() || ip.IsMulticast() }

// peerIPv6 decides whether the peer of lease (already parsed as p) gets a routes6 entry, with
// which VTEP MAC, and over which underlay (publicIPv6 valid: the IPv6 one). why is "" for a peer
// without IPv6 (or on an IPv4-only overlay), and says why otherwise when the subnet cannot be
// programmed. Called with mu held.
func (b *Backend) peerIPv6(lease subnetmgr.Lease, p backend.VXLANPeer) (subnet netip.Prefix, mac net.HardwareAddr, publicIPv6 netip.Addr, why string) {
	if !b.v6.local.IsValid() || !lease.IPv6Subnet.IsValid() {
		return netip.Prefix{}, nil, netip.Addr{}, ""
	}
	subnet = lease.IPv6Subnet.Masked()
	fail := func(format string, args ...any) (netip.Prefix, net.HardwareAddr, netip.Addr, string) {
		return netip.Prefix{}, nil, netip.Addr{}, fmt.Sprintf(format, args...)
	}
	if why := b.subnet6Problem(subnet, p.Subnet); why != "" {
		return fail("%s", why)
	}
	if len(lease.BackendV6Data) == 0 || string(lease.BackendV6Data) == "null" {
		return subnet, p.VtepMAC, netip.Addr{}, ""
	}
	d, err := subnetmgr.ParseVXLANData(lease.BackendV6Data)
	if err != nil {
		return fail("BackendV6Data: %v", err)
	}
	v6mac, err := net.ParseMAC(d.VtepMAC)
	if err != nil || len(v6mac) != 6 || v6mac[0]&1 == 1 {
		return fail("BackendV6Data VtepMAC %q is not an Ethernet MAC a VTEP can have (6 bytes, unicast)", d.VtepMAC)
	}
	if v6mac.String() == p.VtepMAC.String() {
		return subnet, p.VtepMAC, netip.Addr{}, "" // its IPv4 VTEP carries its IPv6 too
	}
	// Its IPv6 VTEP is another device, on the IPv6 underlay (flannel's layout): ours reaches it
	// there. Without an IPv6 underlay on both sides its IPv6 rides its IPv4 VTEP, as xnet's
	// vxlan backend sends it (backend.ParseVXLANPeerV6 is the rule).
	if !b.ipv6Underlay || !lease.PublicIPv6.Is6() || lease.PublicIPv6.Is4In6() {
		return subnet, p.VtepMAC, netip.Addr{}, ""
	}
	return subnet, v6mac, lease.PublicIPv6, ""
}

// subnet6Problem says why a peer's IPv6 subnet (masked) cannot be programmed, or "" when it
// can: it must be IPv6, strictly inside the IPv6Network, IPv6SubnetLen long, and overlap
// neither ours nor that of another peer than the one keyed key. Called with mu held.
func (b *Backend) subnet6Problem(subnet, key netip.Prefix) string {
	switch {
	case !subnet.Addr().Is6() || subnet.Addr().Is4In6():
		return fmt.Sprintf("IPv6Subnet %v is not IPv6", subnet)
	case !b.v6.network.IsValid() || !b.v6.network.Contains(subnet.Addr()) || subnet.Bits() <= b.v6.network.Bits():
		return fmt.Sprintf("IPv6Subnet %v is not strictly inside the IPv6Network %v", subnet, b.v6.network)
	case b.v6.subnetLen != 0 && subnet.Bits() != b.v6.subnetLen:
		return fmt.Sprintf("IPv6Subnet %v is not a /%d", subnet, b.v6.subnetLen)
	case subnet.Overlaps(b.v6.local):
		return fmt.Sprintf("IPv6Subnet %v overlaps ours, %v", subnet, b.v6.local)
	}
	for other, s := range b.v6.peers {
		if other != key && s.Overlaps(subnet) {
			return fmt.Sprintf("IPv6Subnet %v overlaps %v of the peer %v", subnet, s, other)
		}
	}
	return ""
}

// programPeerIPv6 writes (or removes) the routes6 entry of the peer on p.Subnet as peerIPv6
// decides, removing the entry of an IPv6 subnet the peer no longer holds. Called with mu held.
func (b *Backend) programPeerIPv6(lease subnetmgr.Lease, p backend.VXLANPeer) error {
	subnet, mac, publicIPv6, why := b.peerIPv6(lease, p)
	if old, ok := b.v6.peers[p.Subnet]; ok && old != subnet {
		if err := b.m.DeleteRoute6(old); err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		delete(b.v6.peers, p.Subnet)
		b.forgetPath(old)
	}
	if why != "" {
		// An earlier run (or build) may have programmed it.
		if err := b.deleteStaleRoute6(lease.IPv6Subnet, p.PublicIP); err != nil {
			return err
		}
		if b.v6.unreachable[p.Subnet] != why {
			b.Log.Warn("peer's IPv6 subnet not programmed: its containers are reached over IPv4 only", "subnet", p.Subnet,
				"ipv6_subnet", lease.IPv6Subnet, "public_ip", p.PublicIP, "why", why)
		}
		b.v6.unreachable[p.Subnet] = why
		return nil
	}
	delete(b.v6.unreachable, p.Subnet)
	if !subnet.IsValid() {
		return nil
	}
	r := maps.Route6{Subnet: subnet, PublicIP: p.PublicIP, VtepMAC: mac, PublicIPv6: publicIPv6}
	if b.peerPath6(subnet, lease.PublicIPv6).Direct {
		r.PublicIPv6, r.Direct = lease.PublicIPv6, true
	}
	if err := b.m.PutRoute6(r); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	b.v6.peers[p.Subnet] = subnet
	return nil
}

// removePeerIPv6 removes the routes6 entry of the peer on subnet: the one programmed, or the
// lease's (a restarted xnetd removing a peer it programmed in an earlier run). Called with mu
// held.
func (b *Backend) removePeerIPv6(subnet netip.Prefix, lease subnetmgr.Lease) error {
	subnet6, ok := b.v6.peers[subnet]
	delete(b.v6.peers, subnet)
	delete(b.v6.unreachable, subnet)
	b.forgetPath(subnet6)
	if !ok {
		return b.deleteStaleRoute6(lease.IPv6Subnet, lease.PublicIP)
	}
	if err := b.m.DeleteRoute6(subnet6); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	return nil
}

// deleteStaleRoute6 deletes the routes6 entry of subnet6 that an earlier run programmed for the
// peer at publicIP, unless a peer this run programmed holds subnet6 now. Called with mu held.
func (b *Backend) deleteStaleRoute6(subnet6 netip.Prefix, publicIP netip.Addr) error {
	if !subnet6.IsValid() || !subnet6.Addr().Is6() {
		return nil
	}
	subnet6 = subnet6.Masked()
	for _, s := range b.v6.peers {
		if s == subnet6 {
			return nil
		}
	}
	routes, err := b.m.ListRoutes6()
	if err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	for _, r := range routes {
		if r.Subnet == subnet6 && r.PublicIP == publicIP {
			if err := b.m.DeleteRoute6(subnet6); err != nil {
				return fmt.Errorf("ebpf: %w", err)
			}
		}
	}
	return nil
}

// pruneIPv6 removes the routes6 entries no kept lease accounts for (PrunePeers) and returns
// their subnets. Called with mu held.
func (b *Backend) pruneIPv6(keep []subnetmgr.Lease) ([]netip.Prefix, error) {
	kept := map[netip.Prefix]bool{}
	keptV4 := map[netip.Prefix]bool{}
	for _, l := range keep {
		if b.v6.local.IsValid() && l.IPv6Subnet.IsValid() {
			kept[l.IPv6Subnet.Masked()] = true
		}
		keptV4[l.Subnet.Masked()] = true
	}
	for s, s6 := range b.v6.peers {
		if !keptV4[s] {
			delete(b.v6.peers, s)
			b.forgetPath(s6)
		}
	}
	for s := range b.v6.unreachable {
		if !keptV4[s] {
			delete(b.v6.unreachable, s)
		}
	}
	routes, err := b.m.ListRoutes6()
	if err != nil {
		return nil, fmt.Errorf("ebpf: prune: %w", err)
	}
	var gone []netip.Prefix
	var errs []error
	for _, r := range routes {
		if kept[r.Subnet.Masked()] {
			continue
		}
		if err := b.m.DeleteRoute6(r.Subnet); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, r.Subnet)
	}
	return gone, errors.Join(errs...)
}
