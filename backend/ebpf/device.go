package ebpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// ensureHostDevice creates (or adopts) xnet0: a veth with ARP off, our VTEP MAC, the overlay
// MTU, subnet.0/32 as its address (so host traffic to the overlay has a source in our lease,
// as with flannel's device) and a route for the whole overlay Network. docker0's more specific
// route keeps local containers off it.
func (b *Backend) ensureHostDevice(local subnetmgr.Lease, network netip.Prefix) (int, error) {
	mtu := b.MTU()
	mac := b.VtepMAC
	link, err := netlink.LinkByName(HostDevice)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return 0, fmt.Errorf("ebpf: look up %s: %w", HostDevice, err)
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: HostDevice, MTU: mtu, HardwareAddr: mac, Flags: net.FlagUp},
			PeerName: hostDevicePeer}
		if err := netlink.LinkAdd(veth); err != nil {
			return 0, fmt.Errorf("ebpf: create %s: %w", HostDevice, err)
		}
		if link, err = netlink.LinkByName(HostDevice); err != nil {
			return 0, fmt.Errorf("ebpf: look up %s: %w", HostDevice, err)
		}
	}
	if link.Type() != "veth" {
		return 0, fmt.Errorf("ebpf: %s exists and is a %s, not ours: delete it", HostDevice, link.Type())
	}
	if link.Attrs().HardwareAddr.String() != mac.String() {
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MAC %s: %w", HostDevice, mac, err)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MTU %d: %w", HostDevice, mtu, err)
		}
	}
	if err := netlink.LinkSetARPOff(link); err != nil {
		return 0, fmt.Errorf("ebpf: set %s arp off: %w", HostDevice, err)
	}
	if peer, err := netlink.LinkByName(hostDevicePeer); err == nil {
		if err := netlink.LinkSetUp(peer); err != nil {
			return 0, fmt.Errorf("ebpf: set %s up: %w", hostDevicePeer, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return 0, fmt.Errorf("ebpf: set %s up: %w", HostDevice, err)
	}
	if !local.Subnet.IsValid() {
		// An IPv6-only lease: xnet0 carries the host's IPv6 only (setupIPv6), and what an
		// earlier IPv4 or dual-stack run gave it would route IPv4 into an overlay that has none.
		return link.Attrs().Index, removeHostIPv4(link)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: local.Subnet.Masked().Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return 0, fmt.Errorf("ebpf: address %s on %s: %w", addr.IPNet, HostDevice, err)
	}
	// Only our own address: an older lease's address would source packets from a subnet that
	// is no longer ours.
	if addrs, err := netlink.AddrList(link, unix.AF_INET); err == nil {
		for _, a := range addrs {
			if !a.IP.Equal(addr.IP) {
				_ = netlink.AddrDel(link, &a)
			}
		}
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: backend.IPNet(network), Scope: netlink.SCOPE_LINK,
		Src: addr.IP}
	if err := netlink.RouteReplace(route); err != nil {
		return 0, fmt.Errorf("ebpf: route %s dev %s: %w", network, HostDevice, err)
	}
	// Packets the decap delivers into xnet0 come from remote containers; the route above is
	// their way back, so strict rp_filter accepts them. Forwarding them to docker0 needs
	// forwarding on xnet0, which a Docker host has everywhere already.
	return link.Attrs().Index, nil
}

// removeHostIPv4 takes xnet0's IPv4 addresses and routes away (an IPv6-only overlay).
func removeHostIPv4(host netlink.Link) error {
	var errs []error
	routes, err := netlink.RouteList(host, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("ebpf: list IPv4 routes of %s: %w", HostDevice, err)
	}
	for _, r := range routes {
		errs = append(errs, backend.IgnoreMissing(netlink.RouteDel(&r)))
	}
	addrs, err := netlink.AddrList(host, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("ebpf: list IPv4 addresses of %s: %w", HostDevice, err)
	}
	for _, a := range addrs {
		errs = append(errs, backend.IgnoreMissing(netlink.AddrDel(host, &a)))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: remove the IPv4 setup of %s: %w", HostDevice, err)
	}
	return nil
}
