package ebpf

// IPv6 in a dual-stack overlay (subnetmgr.Config.EnableIPv6): containers' IPv6 packets cross the
// same tunnel as their IPv4 ones. The programs (bpf/ipv6.h) encapsulate an inner IPv6 packet
// (EtherType 0x86DD) in the same VXLAN over the IPv4 underlay, to the same peer, with the same
// VNI and VTEP MACs, and decapsulate it under the same rules, so one program, one pair of MACs
// and one set of per-peer counters serve both families. The Go side adds per host the config6
// entry (our IPv6 lease and the gateway Docker puts in it), per peer one routes6 entry (its
// IPv6Subnet, pointing at the same PublicIP and VTEP MAC as its IPv4 route), and on xnet0 the
// IPv6 twin of its IPv4 setup (our subnet's first address, /128, and a route for the IPv6
// Network), so the host reaches remote containers over IPv6 too. Containers' IPv6 addresses
// are learned as their IPv4 ones are: from what they send (endpoints6).
//
// What we publish, and what a flannel host makes of it. flannel's dual stack runs a second
// VXLAN device for IPv6 on the IPv6 underlay, and reads BackendV6Data as that device's
// {"VNI","VtepMAC"}, reached at PublicIPv6. So:
//   - BackendV6Data is exactly BackendData's JSON (the VTEP is one and the same), and only
//     published when this host has a PublicIPv6, as flannel publishes it: flannel v0.28
//     dereferences a lease's PublicIPv6 as soon as its BackendV6Data decodes, and a lease with
//     BackendV6Data but no PublicIPv6 would crash it. Without both it skips our lease (it logs
//     the missing BackendV6Data), which is what it does for any host without an IPv6 underlay.
//   - A flannel host then sends IPv6 in VXLAN over the IPv6 underlay to our PublicIPv6, and
//     expects the same back; this datapath speaks VXLAN over the IPv4 underlay only, so IPv6
//     between flannel hosts and xnet hosts does not flow (IPv4 does). A peer whose
//     BackendV6Data names another VTEP MAC than its BackendData is such a host (its IPv6 VTEP
//     lives on the IPv6 underlay): its IPv6 subnet is not programmed, and Status says why,
//     rather than sending it frames its IPv4 device would drop.
//   - A peer without BackendV6Data (an xnet host without an IPv6 underlay) is reached with its
//     BackendData VTEP MAC: the one device of an xnet host carries both families.
// IPv6 always crosses in VXLAN, also to peers that DirectRouting reaches plain over IPv4.

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
}

func newIPv6State() ipv6State {
	return ipv6State{peers: map[netip.Prefix]netip.Prefix{}, unreachable: map[netip.Prefix]string{}}
}

// LeaseAttrsV6 is what this host publishes as BackendV6Data (backend.DualStack): the same
// {"VNI","VtepMAC"} as BackendData, when the host has a PublicIPv6, and nothing otherwise (see
// the top of this file for why).
func (b *Backend) LeaseAttrsV6() (json.RawMessage, error) {
	if !b.Iface.PublicIPv6.IsValid() {
		return nil, nil
	}
	data, err := backend.VXLANLeaseData(b.VNI, b.Iface.PublicIP)
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
		b.v6.local, b.v6.network = netip.Prefix{}, netip.Prefix{}
		if err := b.m.ClearConfig6(); err != nil {
			return fmt.Errorf("ebpf: %w", err)
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
	if err := b.m.SetConfig6(maps.Config6{Subnet: subnet, Gateway: subnet.Addr().Next()}); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	// Not fatal: containers reach each other without it (IPv6 off on this host is the usual
	// cause), and the IPv4 overlay must not go down for the host's own IPv6.
	if err := ensureHostIPv6(host, subnet, b.v6.network); err != nil {
		b.Log.Error("xnet0 has no IPv6: this host cannot reach remote containers over IPv6, and IPv6 packets for a local container that has not sent anything yet are lost", "err", err)
	}
	return nil
}

// ensureHostIPv6 gives xnet0 the IPv6 twin of its IPv4 setup: our subnet's first address (/128,
// as flannel's IPv6 device holds it) and a route for the IPv6 Network with it as source, so the
// host's own IPv6 traffic to remote containers takes encap_host and has a source the peers
// accept. xnet0 has ARP off, which for IPv6 means no neighbour discovery: the kernel addresses
// the frames to xnet0's own MAC, as for IPv4.
func ensureHostIPv6(host netlink.Link, subnet, network netip.Prefix) error {
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
	route := &netlink.Route{LinkIndex: host.Attrs().Index, Dst: backend.IPNet(network), Src: addr.IP}
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

// peerIPv6 decides whether the peer of lease (already parsed as p) gets a routes6 entry, and
// with which VTEP MAC. why is "" for a peer without IPv6 (or on an IPv4-only overlay), and says
// why otherwise when the subnet cannot be programmed. Called with mu held.
func (b *Backend) peerIPv6(lease subnetmgr.Lease, p backend.VXLANPeer) (subnet netip.Prefix, mac net.HardwareAddr, why string) {
	if !b.v6.local.IsValid() || !lease.IPv6Subnet.IsValid() {
		return netip.Prefix{}, nil, ""
	}
	subnet = lease.IPv6Subnet.Masked()
	switch {
	case !subnet.Addr().Is6() || subnet.Addr().Is4In6():
		return netip.Prefix{}, nil, fmt.Sprintf("IPv6Subnet %v is not IPv6", lease.IPv6Subnet)
	case !b.v6.network.IsValid() || !b.v6.network.Contains(subnet.Addr()) || subnet.Bits() <= b.v6.network.Bits():
		return netip.Prefix{}, nil, fmt.Sprintf("IPv6Subnet %v is not strictly inside the IPv6Network %v", subnet, b.v6.network)
	case b.v6.subnetLen != 0 && subnet.Bits() != b.v6.subnetLen:
		return netip.Prefix{}, nil, fmt.Sprintf("IPv6Subnet %v is not a /%d", subnet, b.v6.subnetLen)
	case subnet.Overlaps(b.v6.local):
		return netip.Prefix{}, nil, fmt.Sprintf("IPv6Subnet %v overlaps ours, %v", subnet, b.v6.local)
	}
	for other, s := range b.v6.peers {
		if other != p.Subnet && s.Overlaps(subnet) {
			return netip.Prefix{}, nil, fmt.Sprintf("IPv6Subnet %v overlaps %v of the peer %v", subnet, s, other)
		}
	}
	mac = p.VtepMAC
	if len(lease.BackendV6Data) > 0 && string(lease.BackendV6Data) != "null" {
		d, err := subnetmgr.ParseVXLANData(lease.BackendV6Data)
		if err != nil {
			return netip.Prefix{}, nil, fmt.Sprintf("BackendV6Data: %v", err)
		}
		v6mac, err := net.ParseMAC(d.VtepMAC)
		if err != nil || len(v6mac) != 6 {
			return netip.Prefix{}, nil, fmt.Sprintf("BackendV6Data VtepMAC %q is not an Ethernet MAC", d.VtepMAC)
		}
		if v6mac.String() != p.VtepMAC.String() {
			return netip.Prefix{}, nil, fmt.Sprintf("its IPv6 VTEP (%s, BackendV6Data) is another device than its IPv4 one (%s): "+
				"a separate VXLAN device on the IPv6 underlay, as flannel runs it, which this datapath does not reach", v6mac, p.VtepMAC)
		}
	}
	return subnet, mac, ""
}

// programPeerIPv6 writes (or removes) the routes6 entry of the peer on p.Subnet as peerIPv6
// decides, removing the entry of an IPv6 subnet the peer no longer holds. Called with mu held.
func (b *Backend) programPeerIPv6(lease subnetmgr.Lease, p backend.VXLANPeer) error {
	subnet, mac, why := b.peerIPv6(lease, p)
	if old, ok := b.v6.peers[p.Subnet]; ok && old != subnet {
		if err := b.m.DeleteRoute6(old); err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		delete(b.v6.peers, p.Subnet)
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
	if err := b.m.PutRoute6(maps.Route6{Subnet: subnet, PublicIP: p.PublicIP, VtepMAC: mac}); err != nil {
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
	for s := range b.v6.peers {
		if !keptV4[s] {
			delete(b.v6.peers, s)
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
