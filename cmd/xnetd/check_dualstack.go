package main

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	ebpfbackend "github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// The IPv6 half of `xnetd check`'s routes check in a dual-stack overlay: each peer with an
// IPv6 subnet has its own route there, besides the one to its IPv4 subnet, and a datapath can
// lose one and keep the other. Where each backend keeps them:
//
//	ebpf       the routes6 map: the subnet to the peer's PublicIP (the tunnel's outer
//	           destination, also when the VXLAN crosses the IPv6 underlay)
//	vxlan      <subnet> via <its subnet address> onlink, on xnet-v6.<VNI> or on xnet.<VNI>
//	           (IPv6 inside the IPv4 VXLAN), or via its PublicIPv6 on the NIC (DirectRouting)
//	udp        <subnet> dev xnet0, or via its PublicIPv6 on the NIC (DirectRouting)
//	wireguard  <subnet> dev xnet-wg-v6 (separate mode) or xnet-wg
//	host-gw    <subnet> via its PublicIPv6 on the NIC, for a peer whose PublicIPv6 is on our
//	           IPv6 segment; the others have no IPv6 route in host-gw mode, by design

// dualStack says whether the routes check also looks at IPv6: a dual-stack overlay where our
// lease has an IPv6 subnet (without one the backends program no peer's).
func (c *checker) dualStack() bool {
	return c.cfg.EnableIPv6 && !c.ipv6Only() && c.haveState && c.st.Lease.IPv6Subnet.IsValid()
}

// checkRoutes6 compares the datapath's routes to the peers' IPv6 subnets with their leases. It
// returns the problems, what the check's detail says of IPv6 when all holds, and when not.
func (c *checker) checkRoutes6() (problems []string, detail, failed string, err error) {
	have, where, err := c.datapathRoutes6()
	if err != nil {
		return nil, "", "", err
	}
	want := map[netip.Prefix]routeWant{}
	var notRouted []string
	for _, p := range c.peers {
		if p.Refused != "" || !p.IPv6Subnet.IsValid() {
			continue
		}
		w, why := c.routeWant6(p)
		if why != "" {
			notRouted = append(notRouted, fmt.Sprintf("%v (%s)", p.IPv6Subnet, why))
			continue
		}
		want[p.IPv6Subnet] = w
	}
	held := func(subnet netip.Prefix) bool {
		return slices.ContainsFunc(c.peers, func(p checkLease) bool { return p.IPv6Subnet == subnet })
	}
	problems = c.routeProblems(where, "its containers are unreachable over IPv6 from here", want, have, held)
	if len(problems) > 0 {
		failed = fmt.Sprintf("%s does not match the %d peer leases' IPv6 subnets", where, len(want))
	}
	detail = fmt.Sprintf("%s their %d IPv6 subnets", where, len(want))
	if len(notRouted) > 0 {
		detail += fmt.Sprintf(" (not routed in host-gw mode: %s)", strings.Join(notRouted, ", "))
	}
	return problems, detail, failed, nil
}

// routeWant6 is the route the peer's IPv6 subnet must have, or why the backend gives it none.
func (c *checker) routeWant6(p checkLease) (routeWant, string) {
	w := routeWant{host: p.PublicIP}
	if p.PublicIPv6.IsValid() && c.backend != subnetmgr.BackendEBPF {
		w.host = p.PublicIPv6
	}
	switch c.backend {
	case subnetmgr.BackendEBPF:
		w.via = p.PublicIP
	case subnetmgr.BackendVXLAN:
		w.via = p.IPv6Subnet.Addr()
		if c.cfg.Backend.DirectRouting {
			w.direct = p.PublicIPv6
		}
	case subnetmgr.BackendUDP:
		if c.cfg.Backend.DirectRouting {
			w.direct = p.PublicIPv6
		}
	case subnetmgr.BackendHostGW:
		if !p.PublicIPv6.IsValid() {
			return w, "the peer publishes no PublicIPv6"
		}
		if c.nic != nil {
			nic := backend.ExternalInterface{Name: c.nic.Attrs().Name, Index: c.nic.Attrs().Index}
			if path, err := backend.NewDirectRouter(nil, nic).Decide(p.PublicIPv6); err == nil && !path.Direct {
				return w, "PublicIPv6 " + path.Why
			}
		}
		w.via = p.PublicIPv6
	}
	return w, ""
}

// datapathRoutes6 lists the routes to peers' IPv6 subnets in the backend's own terms.
func (c *checker) datapathRoutes6() (map[netip.Prefix]datapathRoute, string, error) {
	out := map[netip.Prefix]datapathRoute{}
	if c.backend == subnetmgr.BackendEBPF {
		m, err := maps.OpenPinned(c.bpffsDir())
		if err != nil {
			return nil, "", fmt.Errorf("the BPF routes6 map: %w", err)
		}
		defer m.Close()
		routes, err := m.ListRoutes6()
		if err != nil {
			return nil, "", fmt.Errorf("the BPF routes6 map: %w", err)
		}
		for _, rt := range routes {
			// The MAC is the IPv4 VTEP's or the IPv6 VTEP's, as the path goes: not compared.
			out[rt.Subnet.Masked()] = datapathRoute{via: rt.PublicIP}
		}
		return out, "the BPF routes6 map", nil
	}
	var devs []string
	switch c.backend {
	case subnetmgr.BackendVXLAN:
		devs = []string{vxlan.DeviceName(c.cfg.Backend.VNI), vxlan.DeviceNameV6(c.cfg.Backend.VNI)}
	case subnetmgr.BackendUDP:
		devs = []string{ebpfbackend.HostDevice}
	case subnetmgr.BackendWireGuard:
		devs = []string{wireguard.DeviceName, wireguard.DeviceNameV6}
	}
	onDev := map[int]bool{}
	for _, name := range devs {
		if l, err := netlink.LinkByName(name); err == nil {
			onDev[l.Attrs().Index] = true
		}
	}
	// Routes via a PublicIPv6 on the NIC: host-gw's, and DirectRouting's.
	if c.nic != nil && (c.backend == subnetmgr.BackendHostGW || c.cfg.Backend.DirectRouting) {
		onDev[c.nic.Attrs().Index] = true
		devs = append(devs, c.ifaceName)
	}
	network, ours := c.cfg.IPv6Network, c.st.Lease.IPv6Subnet.Masked()
	for _, rt := range mainRoutes(unix.AF_INET6) {
		dst := prefixOf(rt.Dst)
		if !dst.IsValid() || !network.Contains(dst.Addr()) || dst.Bits() <= network.Bits() || dst.Overlaps(ours) {
			continue
		}
		dr := datapathRoute{}
		if gw, ok := netip.AddrFromSlice(rt.Gw); ok {
			dr.via = gw
		}
		if !onDev[rt.LinkIndex] {
			dr.problem = fmt.Sprintf("routed out ifindex %d, not %s", rt.LinkIndex, strings.Join(devs, " or "))
			if c.backend == subnetmgr.BackendWireGuard {
				dr.problem += ": it leaves unencrypted"
			}
		}
		out[dst] = dr
	}
	return out, "the kernel's IPv6 routing table", nil
}
