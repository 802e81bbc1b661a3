package backend

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DirectRouter is what every backend that routes a peer without encapsulation shares: the
// decision whether a peer is on our L2 segment, and the kernel route to a peer subnet via the
// peer's PublicIP on the underlay NIC,
//
//	ip route replace <peer subnet> via <peer PublicIP> dev <iface>
//
// host-gw routes every peer that way and has no fallback; with flannel's "DirectRouting" the
// VXLAN-speaking backends route the peers on our segment that way (ebpf in its own datapath,
// not with this route) and keep VXLAN for the others.
//
// "On our segment" is host-gw's rule: the peer's PublicIP lies inside a connected subnet of an
// IPv4 address on the underlay NIC, so the kernel can resolve it by ARP and the route needs no
// gateway of its own. In a dual-stack overlay the same rule decides for a peer's PublicIPv6
// against the NIC's IPv6 subnets (link-local ones aside), and the route is
// `<peer IPv6 subnet> via <peer PublicIPv6> dev <iface>`. flannel asks the kernel for the route to the PublicIP instead (no gateway
// means direct); both agree on a plain LAN, and the connected subnet is what an operator reads
// off `ip addr`.
//
// The routes live on a NIC shared with the host's own routes, so only routes strictly inside
// the overlay Network, or via a host holding a lease, are ever taken for ours (KeptSubnets).
type DirectRouter struct {
	nl    *netlink.Handle
	iface ExternalInterface
}

// NewDirectRouter works on the underlay NIC iface through nl; a nil nl uses the namespace of the
// calling thread at each call (netlink's package functions).
func NewDirectRouter(nl *netlink.Handle, iface ExternalInterface) *DirectRouter {
	if nl == nil {
		nl = &netlink.Handle{}
	}
	return &DirectRouter{nl: nl, iface: iface}
}

// PeerPath is how one peer is reached: plain routing on our segment (Direct) or not, and why,
// in words for logs and status.
type PeerPath struct {
	Direct bool   `json:"direct"`
	Why    string `json:"why"`
}

// Decide says whether publicIP (a PublicIP, or a PublicIPv6) is on our L2 segment.
func (d *DirectRouter) Decide(publicIP netip.Addr) (PeerPath, error) {
	family := unix.AF_INET
	if !publicIP.Is4() {
		family = unix.AF_INET6
	}
	segs, err := d.segments(family)
	if err != nil {
		return PeerPath{}, err
	}
	for _, s := range segs {
		if s.Contains(publicIP) {
			return PeerPath{Direct: true, Why: fmt.Sprintf("%v is inside %v on %s", publicIP, s, d.iface.Name)}, nil
		}
	}
	return PeerPath{Why: fmt.Sprintf("%v is in no subnet of %s (%s)", publicIP, d.iface.Name, joinPrefixes(segs, family))}, nil
}

// Path is how a VXLAN-speaking backend reaches the peer at publicIP: direct when DirectRouting
// is on (enabled) and the peer is on our segment, VXLAN otherwise. When the NIC's addresses
// cannot be read the peer gets VXLAN, which works from anywhere, and the reason says why.
func (d *DirectRouter) Path(enabled bool, publicIP netip.Addr) PeerPath {
	if !enabled {
		return PeerPath{Why: "DirectRouting is off"}
	}
	p, err := d.Decide(publicIP)
	if err != nil {
		return PeerPath{Why: fmt.Sprintf("VXLAN: cannot tell whether %v is on our segment: %v", publicIP, err)}
	}
	if !p.Direct {
		p.Why += ": VXLAN"
	}
	return p
}

// PruneRoutes deletes our routes on the underlay NIC that kept no longer accounts for
// (KeptSubnets.StaleVia, against the one of networks of each route's family): those a
// restarted daemon inherits from peers whose leases went away while it was down. The host's
// own routes stay.
func (d *DirectRouter) PruneRoutes(kept KeptSubnets, networks ...netip.Prefix) ([]netip.Prefix, error) {
	return d.DeleteRoutesWhere(func(dst netip.Prefix, gw netip.Addr) bool {
		return kept.StaleVia(NetworkOf(dst, networks...), dst, gw)
	})
}

// DeleteRoutesInside deletes every gatewayed route on the underlay NIC strictly inside one of
// networks: the routes DirectRouting made, for a teardown.
func (d *DirectRouter) DeleteRoutesInside(networks ...netip.Prefix) ([]netip.Prefix, error) {
	return d.DeleteRoutesWhere(func(dst netip.Prefix, _ netip.Addr) bool {
		for _, n := range networks {
			if strictlyInside(n, dst) {
				return true
			}
		}
		return false
	})
}

// Segments are the connected IPv4 subnets of the underlay NIC, the L2 segments we are on.
func (d *DirectRouter) Segments() ([]netip.Prefix, error) { return d.segments(unix.AF_INET) }

// segments are the connected subnets of one family on the underlay NIC; for IPv6 without the
// link-local ones, which no peer publishes.
func (d *DirectRouter) segments(family int) ([]netip.Prefix, error) {
	// Only the index matters to AddrList; no need to look the link up first.
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: d.iface.Index, Name: d.iface.Name}}
	addrs, err := d.nl.AddrList(link, family)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", d.iface.Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		p, ok := PrefixOf(a.IPNet)
		if ok && p.Bits() < p.Addr().BitLen() && !p.Addr().IsLinkLocalUnicast() {
			out = append(out, p.Masked())
		}
	}
	return out, nil
}

// RouteVia routes subnet via gw on the underlay NIC, replacing whatever route that destination
// had in the main table (a VXLAN device's route for it included: the switch is one change).
func (d *DirectRouter) RouteVia(subnet netip.Prefix, gw netip.Addr) error {
	r := d.route(subnet)
	r.Gw = net.IP(gw.AsSlice())
	if err := d.nl.RouteReplace(r); err != nil {
		return fmt.Errorf("route replace %v via %v dev %s: %w", subnet, gw, d.iface.Name, err)
	}
	return nil
}

// DeleteRoute removes our route to subnet on the underlay NIC, whatever its gateway. A missing
// route is not an error.
func (d *DirectRouter) DeleteRoute(subnet netip.Prefix) error {
	if err := IgnoreMissing(d.nl.RouteDel(d.route(subnet))); err != nil {
		return fmt.Errorf("route del %v dev %s: %w", subnet, d.iface.Name, err)
	}
	return nil
}

// DeleteRoutesWhere deletes the gatewayed IPv4 and IPv6 routes on the underlay NIC (main table) for which
// del says yes, given destination and gateway, and returns what it deleted. Device routes
// (no gateway) on the NIC are the host's, never ours.
func (d *DirectRouter) DeleteRoutesWhere(del func(dst netip.Prefix, gw netip.Addr) bool) ([]netip.Prefix, error) {
	gone, err := DeleteRoutesWhere(d.nl, d.iface.Index, func(dst netip.Prefix, gw netip.Addr) bool {
		return gw.IsValid() && del(dst, gw)
	})
	if err != nil {
		return gone, fmt.Errorf("%s: %w", d.iface.Name, err)
	}
	return gone, nil
}

// route is the key of our route to a peer subnet (IPv4 or IPv6): destination and the
// underlay NIC.
func (d *DirectRouter) route(subnet netip.Prefix) *netlink.Route {
	return &netlink.Route{LinkIndex: d.iface.Index, Dst: IPNet(subnet)}
}

func joinPrefixes(ps []netip.Prefix, family int) string {
	if len(ps) == 0 {
		if family == unix.AF_INET6 {
			return "no IPv6 subnet"
		}
		return "no IPv4 subnet"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}
