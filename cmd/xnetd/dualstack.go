package main

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// publicIPv6 is our IPv6 underlay address in a dual-stack overlay: --public-ipv6, else the
// underlay interface's first global IPv6 address, else none (IPv6 container traffic then
// crosses the IPv4 underlay, which every backend but host-gw can do). An IPv4-only overlay has
// none whatever the flag says.
func publicIPv6(cfg subnetmgr.Config, iface string, flag netip.Addr) (netip.Addr, error) {
	if !cfg.EnableIPv6 {
		return netip.Addr{}, nil
	}
	if flag.IsValid() {
		return flag, nil
	}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("netlink: %w", err)
	}
	defer nl.Close()
	link, err := nl.LinkByName(iface)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("underlay %s: %w", iface, err)
	}
	return firstGlobalIPv6(nl, link)
}

// firstGlobalIPv6 is link's first usable global IPv6 address (not link-local, tentative,
// failed or deprecated), the zero Addr when it has none.
func firstGlobalIPv6(nl *netlink.Handle, link netlink.Link) (netip.Addr, error) {
	addrs, err := nl.AddrList(link, unix.AF_INET6)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list IPv6 addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || a.Scope != unix.RT_SCOPE_UNIVERSE || ip.IsLinkLocalUnicast() || a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED|unix.IFA_F_DEPRECATED) != 0 {
			continue
		}
		return ip, nil
	}
	return netip.Addr{}, nil
}

// dualStackAttrs adds what a dual-stack overlay publishes to attrs: our IPv6 underlay address
// and the backend's BackendV6Data, when the backend receives IPv6 there; a backend that cannot carry IPv6 is a usage error, before
// the host changes.
func dualStackAttrs(cfg subnetmgr.Config, name string, b backend.Backend, iface backend.ExternalInterface, attrs *subnetmgr.LeaseAttrs) error {
	if !cfg.EnableIPv6 {
		return nil
	}
	if _, ok := b.(backend.DualStack); !ok {
		return usagef("the config sets EnableIPv6 but backend %s does not carry IPv6: pick a backend that does (--backend, README \"Dual stack\") or set EnableIPv6 false", name)
	}
	ip6, data, err := backend.IPv6LeaseAttrs(b, iface)
	if err != nil {
		return fmt.Errorf("backend %s: IPv6 lease attributes: %w", name, err)
	}
	attrs.PublicIPv6, attrs.BackendV6Data = ip6, data
	if cfg.IPv6Only() && !ip6.IsValid() {
		return usagef("the config sets EnableIPv4 false (an IPv6-only overlay), and this host has no IPv6 underlay address: give %s a global IPv6 address or set --public-ipv6", iface.Name)
	}
	return nil
}
