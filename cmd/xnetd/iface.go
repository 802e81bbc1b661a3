package main

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
)

// underlay resolves --iface (a name, an address, or empty for the default route's interface)
// and --public-ip into the interface every backend is built on. It only reads.
//
// In an IPv6-only overlay (ipv6Only) a host needs no IPv4 address: without --iface the
// interface is the one holding --public-ipv6 (publicIPv6) or, without that, the IPv6 default
// route's; IfaceIP and PublicIP are then the interface's IPv4 address and --public-ip when
// there are any, else the zero Addr.
func underlay(nl *netlink.Handle, iface string, publicIP netip.Addr, ipv6Only bool, publicIPv6 netip.Addr) (backend.ExternalInterface, error) {
	var link netlink.Link
	var ifaceIP netip.Addr
	switch ip, err := netip.ParseAddr(iface); {
	case iface == "" && ipv6Only && publicIPv6.IsValid():
		link, err = linkWithAddr(nl, publicIPv6)
		if err != nil {
			return backend.ExternalInterface{}, usagef("--public-ipv6 %v: no interface here has that address: add it, or give --iface", publicIPv6)
		}
	case iface == "" && ipv6Only:
		link, err = defaultRouteLink(nl, unix.AF_INET6)
		if err != nil {
			return backend.ExternalInterface{}, err
		}
	case iface == "":
		link, err = defaultRouteLink(nl, unix.AF_INET)
		if err != nil {
			return backend.ExternalInterface{}, err
		}
	case err == nil:
		link, err = linkWithAddr(nl, ip)
		if err != nil {
			return backend.ExternalInterface{}, err
		}
		if ip.Is4() {
			ifaceIP = ip
		}
	default:
		link, err = nl.LinkByName(iface)
		if err != nil {
			return backend.ExternalInterface{}, usagef("--iface %s: no such interface here (%v): give an interface name or address from `ip addr`", iface, err)
		}
	}
	attrs := link.Attrs()
	if !ifaceIP.IsValid() {
		ip, err := firstIPv4(nl, link)
		if err != nil && !ipv6Only {
			return backend.ExternalInterface{}, err
		}
		ifaceIP = ip // the zero Addr on an IPv6-only host without IPv4
	}
	if attrs.Flags&net.FlagUp == 0 {
		return backend.ExternalInterface{}, usagef("--iface %s is down: bring it up (ip link set %s up) or pick another interface", attrs.Name, attrs.Name)
	}
	if !publicIP.IsValid() {
		publicIP = ifaceIP
	}
	return backend.ExternalInterface{
		Name:     attrs.Name,
		Index:    attrs.Index,
		MTU:      attrs.MTU,
		MAC:      attrs.HardwareAddr,
		PublicIP: publicIP,
		IfaceIP:  ifaceIP,
	}, nil
}

// defaultRouteLink is the interface of the default route of family (unix.AF_INET or AF_INET6)
// with the lowest metric.
func defaultRouteLink(nl *netlink.Handle, family int) (netlink.Link, error) {
	routes, err := nl.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes to find the default route's interface: %w", err)
	}
	best := -1
	for i, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if r.LinkIndex <= 0 {
			continue
		}
		if best < 0 || r.Priority < routes[best].Priority {
			best = i
		}
	}
	if best < 0 && family == unix.AF_INET6 {
		return nil, usagef("--iface not given and there is no IPv6 default route (an IPv6-only overlay): give --iface NAME, --iface ADDRESS or --public-ipv6")
	}
	if best < 0 {
		return nil, usagef("--iface not given and there is no IPv4 default route: give --iface NAME or --iface ADDRESS")
	}
	link, err := nl.LinkByIndex(routes[best].LinkIndex)
	if err != nil {
		return nil, fmt.Errorf("default route's interface %d: %w", routes[best].LinkIndex, err)
	}
	return link, nil
}

func linkWithAddr(nl *netlink.Handle, ip netip.Addr) (netlink.Link, error) {
	addrs, err := nl.AddrList(nil, unix.AF_UNSPEC)
	if err != nil {
		return nil, fmt.Errorf("list addresses to find --iface %v: %w", ip, err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip {
			link, err := nl.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("interface of %v: %w", ip, err)
			}
			return link, nil
		}
	}
	return nil, usagef("--iface %v: no interface here has that address: give an address from `ip addr` or an interface name", ip)
}

func firstIPv4(nl *netlink.Handle, link netlink.Link) (netip.Addr, error) {
	addrs, err := nl.AddrList(link, unix.AF_INET)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		if a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			return ip.Unmap(), nil
		}
	}
	return netip.Addr{}, usagef("--iface %s has no global IPv4 address: add one or give --iface with another interface", link.Attrs().Name)
}
