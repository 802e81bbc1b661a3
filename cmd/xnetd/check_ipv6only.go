package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ebpfbackend "github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// The parts of `xnetd check` that differ in an IPv6-only overlay (EnableIPv4 false): the
// backends' IPv6 devices and neighbours, and the firewall rules that see IPv6. What flannel
// writes there (subnet.env with only IPV6_NETWORK and IPV6_SUBNET, Docker options with
// --fixed-cidr-v6 and no --bip) is checked with every other overlay's files (check_files.go).

// publicIPName is what a lease's host address is called in the checks' output.
func (c *checker) publicIPName() string {
	if c.ipv6Only() {
		return "PublicIPv6"
	}
	return "PublicIP"
}

// underlayIPv6 is our IPv6 underlay address on nic: our PublicIPv6 when nic holds it (zero
// when it does not), else nic's first global IPv6 address.
func (c *checker) underlayIPv6(nl *netlink.Handle, nic netlink.Link) netip.Addr {
	if c.publicIP.IsValid() {
		addrs, _ := nl.AddrList(nic, unix.AF_INET6)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip == c.publicIP {
				return ip
			}
		}
		return netip.Addr{}
	}
	ip, _ := firstGlobalIPv6(nl, nic)
	return ip
}

// deviceNameIPv6Only is the backend's device in an IPv6-only overlay ("" for host-gw; for
// ebpf xnet0, which carries the host's own traffic into the programs).
func (c *checker) deviceNameIPv6Only() string {
	switch c.backend {
	case subnetmgr.BackendEBPF:
		return ebpfbackend.HostDevice // xnet0: our IPv6 /128 and the IPv6Network route
	case subnetmgr.BackendVXLAN:
		return vxlan.DeviceNameV6(c.cfg.Backend.VNI)
	case subnetmgr.BackendWireGuard:
		name, _ := wireguard.IPv6OnlyDevice(c.cfg.Backend.WireGuard)
		return name
	}
	return ""
}

// checkNeighboursV6 adds to routes the problem of each vxlan peer whose permanent IPv6
// neighbour on dev (its subnet address to its VTEP MAC, flannel's layout) is missing or names
// another MAC: the kernel would ask for it by neighbour discovery, which nothing answers.
func (c *checker) checkNeighboursV6(devIndex int, dev string, routes map[netip.Prefix]datapathRoute) {
	neighs, err := netlink.NeighList(devIndex, unix.AF_INET6)
	if err != nil {
		return
	}
	macs := map[netip.Addr]string{}
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
			macs[ip] = strings.ToLower(n.HardwareAddr.String())
		}
	}
	for _, p := range c.peers {
		dr, ok := routes[p.Subnet]
		if !ok || p.VtepMAC == "" || dr.problem != "" {
			continue
		}
		switch mac, ok := macs[p.Subnet.Addr()]; {
		case !ok:
			dr.problem = fmt.Sprintf("no permanent neighbour %v lladdr %s on %s", p.Subnet.Addr(), p.VtepMAC, dev)
		case mac != strings.ToLower(p.VtepMAC):
			dr.problem = fmt.Sprintf("the neighbour %v on %s has lladdr %s, the lease says %s", p.Subnet.Addr(), dev, mac, p.VtepMAC)
		}
		routes[p.Subnet] = dr
	}
}

// checkFirewallIPv6Only finds rules that see IPv6 and drop the backend's UDP port (vxlan's
// VXLAN port, wireguard's listen port: the device's, ListenPortV6 in separate mode; host-gw
// sends nothing of its own) or the health port.
func (c *checker) checkFirewallIPv6Only(ctx context.Context) checkResult {
	r := checkResult{Check: "firewall"}
	var port int
	switch c.backend {
	case subnetmgr.BackendVXLAN, subnetmgr.BackendEBPF:
		if port = c.cfg.Backend.Port; port == 0 {
			port = 8472
		}
	case subnetmgr.BackendWireGuard:
		_, port = wireguard.IPv6OnlyDevice(c.cfg.Backend.WireGuard)
	}
	ports := []int{health.DefaultPort}
	if port != 0 {
		ports = []int{port, health.DefaultPort}
	}
	rules, err := firewallPortRulesIPv6(ctx, ports)
	for _, fr := range rules {
		if fr.Port == health.DefaultPort {
			r.Problems = append(r.Problems, fmt.Sprintf("%s drops UDP %d over IPv6 (the health probes: peers' reachability cannot be measured)", fr.Where, fr.Port))
			continue
		}
		r.Problems = append(r.Problems, fmt.Sprintf("%s drops UDP %d over IPv6 (%s: container traffic between hosts)", fr.Where, fr.Port, c.backend))
	}
	if len(r.Problems) > 0 {
		var fixes []string
		for _, fr := range rules {
			fixes = append(fixes, fr.Delete)
		}
		r.Status, r.Detail = checkFail, "firewall rules drop what the overlay needs"
		r.Fix = fmt.Sprintf("remove the rule (%s), or accept UDP %s from the peers' PublicIPv6s before it", strings.Join(fixes, "; "), joinInts(ports))
		return r
	}
	r.Status, r.Detail = checkOK, fmt.Sprintf("no nftables or ip6tables rule drops UDP %s over IPv6", joinInts(ports))
	if err != nil {
		r.Status, r.Detail = checkWarn, fmt.Sprintf("could not read every rule: %v", err)
	}
	return r
}
