package backend

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// This file holds the route bookkeeping every kernel-routed backend needs: which of the routes
// on one of our devices may go (a prune, a teardown) is each backend's rule, listing and deleting
// them is the same everywhere.

// DeleteRoutesWhere deletes the IPv4 and IPv6 routes on interface ifindex (main table) for
// which del says yes, given the destination and the gateway (invalid for a device route), and
// returns the destinations it deleted. Routes the kernel made for an address of the interface
// (proto kernel: an IPv6 address's prefix route, fe80::/64) are never a backend's and never
// offered. A dump interrupted by a concurrent change still lists routes that existed: deleting
// the unwanted ones among them is right, and the next start catches the rest.
func DeleteRoutesWhere(nl *netlink.Handle, ifindex int, del func(dst netip.Prefix, gw netip.Addr) bool) ([]netip.Prefix, error) {
	routes, err := nl.RouteListFiltered(unix.AF_UNSPEC, &netlink.Route{LinkIndex: ifindex}, netlink.RT_FILTER_OIF)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, fmt.Errorf("list routes on ifindex %d: %w", ifindex, err)
	}
	var errs []error
	var gone []netip.Prefix
	for _, r := range routes {
		dst, ok := PrefixOf(r.Dst)
		if !ok || r.Protocol == unix.RTPROT_KERNEL {
			continue
		}
		gw, _ := netip.AddrFromSlice(r.Gw)
		if !del(dst, gw.Unmap()) {
			continue
		}
		if err := IgnoreMissing(nl.RouteDel(&r)); err != nil {
			errs = append(errs, fmt.Errorf("route del %v: %w", dst, err))
			continue
		}
		gone = append(gone, dst)
	}
	return gone, errors.Join(errs...)
}

// IgnoreMissing turns "no such entry" (or no such device) into success: deleting is idempotent.
func IgnoreMissing(err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// PrefixOf is n as a netip.Prefix (IPv4 unmapped); false for nil or a malformed n.
func PrefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// IPNet is p as a *net.IPNet, masked, for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
