package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend/wireguard"
)

// wireguard in an IPv4 or dual-stack overlay (an IPv6-only one: check_ipv6only.go). xnet-wg
// holds <subnet>.0/32 and the Network is routed into it, so traffic to a subnet no peer holds
// is dropped there instead of leaving unencrypted by the default route. In a dual-stack overlay
// our IPv6 subnet's /128 and the IPv6Network go to xnet-wg-v6 (separate mode on a host with an
// IPv6 underlay, listening on ListenPortV6) or else to xnet-wg as well.

// wireguardV6Device is the device carrying our IPv6 in a dual-stack overlay, "" when the
// overlay is not dual stack or our lease has no IPv6 subnet.
func (c *checker) wireguardV6Device() string {
	if !c.cfg.EnableIPv6 || c.ipv6Only() || !c.haveState || !c.st.Lease.IPv6Subnet.IsValid() {
		return ""
	}
	mode := c.cfg.Backend.WireGuard.Mode
	if (mode == "" || mode == wireguard.ModeSeparate) && c.st.Lease.PublicIPv6.IsValid() {
		return wireguard.DeviceNameV6
	}
	return wireguard.DeviceName
}

// wireguardPorts are the UDP ports peers send to: ListenPort over IPv4, and ListenPortV6 over
// IPv6 when xnet-wg-v6 runs.
func (c *checker) wireguardPorts() (v4, v6 []int) {
	wg := c.cfg.Backend.WireGuard
	v4 = []int{cmpOr(wg.ListenPort, 51820)}
	if c.wireguardV6Device() == wireguard.DeviceNameV6 {
		v6 = []int{cmpOr(wg.ListenPortV6, 51821)}
	}
	return v4, v6
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// wireguardDeviceProblems are what is wrong with xnet-wg's Network route and the IPv6 side
// (xnet-wg-v6 or xnet-wg's IPv6 address and route) in a dual-stack overlay.
func (c *checker) wireguardDeviceProblems(dev netlink.Link) []string {
	var problems []string
	if !hasRoute(unix.AF_INET, dev, c.cfg.Network) {
		problems = append(problems, fmt.Sprintf("no route %v dev %s: traffic to a subnet no peer holds leaves unencrypted by the default route", c.cfg.Network, dev.Attrs().Name))
	}
	name6 := c.wireguardV6Device()
	if name6 == "" {
		return problems
	}
	dev6 := dev
	if name6 != dev.Attrs().Name {
		l, err := netlink.LinkByName(name6)
		if err != nil {
			return append(problems, fmt.Sprintf("%s is missing (%v): our IPv6 has no way out", name6, err))
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			problems = append(problems, name6+" is down")
		}
		dev6 = l
	}
	want := c.st.Lease.IPv6Subnet.Masked().Addr()
	addrs, _ := netlink.AddrList(dev6, unix.AF_INET6)
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.Equal(want.AsSlice()) }) {
		problems = append(problems, fmt.Sprintf("%s lacks our IPv6 overlay address %v/128", name6, want))
	}
	if !hasRoute(unix.AF_INET6, dev6, c.cfg.IPv6Network) {
		problems = append(problems, fmt.Sprintf("no route %v dev %s: IPv6 traffic to a subnet no peer holds leaves unencrypted by the default route", c.cfg.IPv6Network, name6))
	}
	return problems
}

// hasRoute says whether the main table routes dst into dev.
func hasRoute(family int, dev netlink.Link, dst netip.Prefix) bool {
	return slices.ContainsFunc(mainRoutes(family), func(rt netlink.Route) bool {
		return rt.LinkIndex == dev.Attrs().Index && prefixOf(rt.Dst) == dst
	})
}

// wireguardFirewallProblems are the rules dropping wireguard's IPv6 port over IPv6 (its IPv4
// port is in checkFirewall's list), with the commands that remove them.
func (c *checker) wireguardFirewallProblems(ctx context.Context) (problems, fixes []string, err error) {
	_, v6 := c.wireguardPorts()
	if len(v6) == 0 {
		return nil, nil, nil
	}
	rules, err := firewallPortRulesIPv6(ctx, v6)
	for _, fr := range rules {
		problems = append(problems, fmt.Sprintf("%s drops UDP %d over IPv6 (%s: IPv6 container traffic between hosts)", fr.Where, fr.Port, wireguard.DeviceNameV6))
		fixes = append(fixes, fr.Delete)
	}
	return problems, fixes, err
}
