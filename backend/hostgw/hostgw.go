// Package hostgw is xnet's host-gw backend: no encapsulation, one static route per peer,
//
//	ip route replace <peer subnet> via <peer PublicIP> dev <iface>
//
// as flannel's host-gw backend (and the seed tutorial's static-route mode) does. It is
// DirectRouting without a fallback: the per-peer decision and the route are backend.DirectRouter,
// which the VXLAN-speaking backends use for their peers on our segment. It only works when every
// host is on one L2 segment: the peer's PublicIP must be a neighbour on our NIC. A peer that is
// not (its PublicIP is outside every connected subnet of the NIC) gets no route, since the
// kernel would reject or blackhole it: AddPeer reports it with ErrUnreachablePeer and the
// reason (xnetd shows it in status), and Status lists it until its lease changes or goes. It
// is also the throughput ceiling the benchmark compares the others to.
//
// In a dual-stack overlay a peer's IPv6 subnet is routed the same way via its PublicIPv6,
//
//	ip -6 route replace <peer IPv6 subnet> via <peer PublicIPv6> dev <iface>
//
// as flannel's host-gw does, when the PublicIPv6 is on our IPv6 segment (the same check against
// the NIC's IPv6 subnets). A peer without a PublicIPv6, or with one off our segment, is
// unreachable over IPv6 in this mode: AddPeer logs it, lists it in Status under its IPv6
// subnet, and routes its IPv4 subnet all the same (it is not an error: its IPv4 half works).
// host-gw publishes no BackendV6Data.
//
// IPv6 only (EnableIPv4 false): only the IPv6 routes, keyed by the peers' IPv6 subnets, and a
// peer whose PublicIPv6 is off our segment is an ErrUnreachablePeer as an IPv4 one is.
//
// Routes outlive xnetd, which is what keeps containers connected across a restart; the route of
// a lease deleted while xnetd was down goes when the daemon, after its first full lease list,
// calls PrunePeers.
//
// It owns the routes to peer subnets on the underlay NIC. It does not own the NIC, its
// addresses, leases (package subnetmgr) or masquerading (package ipmasq).
package hostgw

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// ErrUnreachablePeer marks a peer whose PublicIP is not on our L2 segment: host-gw cannot route
// to it. Put the hosts on one segment or use an encapsulating backend (with DirectRouting, it
// routes the peers on our segment as host-gw does and encapsulates for the others).
var ErrUnreachablePeer = errors.New("peer is not on this host's L2 segment")

// Backend is the host-gw backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.Base // guarded by mu after New
	nl           *netlink.Handle
	ownsNL       bool
	direct       *backend.DirectRouter

	mu    sync.Mutex
	setup bool
	// unreachable holds the peers AddPeer could not route, by subnet (IPv4 or IPv6), with the
	// reason.
	unreachable map[netip.Prefix]string
	// routed6 is the IPv6 subnet this process routed per peer (by IPv4 subnet), so a lease
	// whose IPv6 subnet changed or went has the old route removed.
	routed6 map[netip.Prefix]netip.Prefix
	// ipv6Only is an IPv6-only overlay (the config's EnableIPv4 false): IPv6 routes only.
	ipv6Only bool
}

// Status is what host-gw knows beyond its routes: the peers it cannot reach, by subnet (an IPv6
// subnet for a peer unreachable over IPv6 only), and why.
type Status struct {
	Unreachable map[string]string `json:"unreachable"`
}

// New builds the backend. It works in the network namespace the calling thread is in when New
// is called (its netlink socket is opened there). Every Linux kernel can run it.
func New(opts backend.Options) (backend.Backend, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("host-gw: open netlink socket: %w", err)
	}
	b, err := newBackend(opts, h)
	if err != nil {
		h.Close()
		return nil, err
	}
	b.ownsNL = true
	return b, nil
}

// NewWithHandle builds the backend on a netlink handle the caller owns (for example one made
// with netlink.NewHandleAt for another network namespace). Close does not close h.
func NewWithHandle(opts backend.Options, h *netlink.Handle) (*Backend, error) {
	if h == nil {
		return nil, errors.New("host-gw: NewWithHandle needs a netlink handle, got nil")
	}
	return newBackend(opts, h)
}

func newBackend(opts backend.Options, h *netlink.Handle) (*Backend, error) {
	base, err := backend.NewBase(subnetmgr.BackendHostGW, opts)
	if err != nil {
		return nil, err
	}
	base.Log = base.Log.With("iface", opts.Iface.Name)
	return &Backend{Base: base, nl: h, direct: backend.NewDirectRouter(h, opts.Iface), unreachable: map[netip.Prefix]string{},
		routed6: map[netip.Prefix]netip.Prefix{}, ipv6Only: opts.Config.IPv6Only()}, nil
}

// Status lists the peers AddPeer could not route and why.
func (b *Backend) Status() Status {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := Status{Unreachable: map[string]string{}}
	for s, why := range b.unreachable {
		st.Unreachable[s.String()] = why
	}
	return st
}

// Mode: plain routes, nothing added to packets.
func (b *Backend) Mode() (string, string) { return "routes", "static routes, no encapsulation" }

// LeaseAttrs publishes BackendType "host-gw" and no backend data, as flannel does.
func (b *Backend) LeaseAttrs() (string, json.RawMessage, error) {
	return subnetmgr.BackendHostGW, json.RawMessage("null"), nil
}

// LeaseAttrsV6 publishes no BackendV6Data: the route needs only the PublicIPv6.
func (b *Backend) LeaseAttrsV6() (json.RawMessage, error) { return nil, nil }

// ReceivesOnIPv6Underlay: peers route our IPv6 subnet via our PublicIPv6 when we have one.
func (b *Backend) ReceivesOnIPv6Underlay() bool {
	return b.Iface.PublicIPv6.Is6() && !b.Iface.PublicIPv6.Is4In6()
}

// MTU is the NIC's: nothing is added to packets.
func (b *Backend) MTU() int { return b.Iface.MTU }

// Setup checks the NIC is still the one we were built for. host-gw needs no device.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if b.ipv6Only {
		if err := b.CheckSetupIPv6Only(ctx, local, cfg); err != nil {
			return err
		}
	} else if err := b.CheckSetup(ctx, local, cfg); err != nil {
		return err
	} else if err := b.CheckSetupV6(local, cfg); err != nil {
		return err
	}
	link, err := b.nl.LinkByIndex(b.Iface.Index)
	if err != nil {
		return fmt.Errorf("host-gw: interface %s (index %d): %w", b.Iface.Name, b.Iface.Index, err)
	}
	if link.Attrs().Name != b.Iface.Name {
		return fmt.Errorf("host-gw: interface index %d is now %q, not %q: restart to re-detect the interface", b.Iface.Index, link.Attrs().Name, b.Iface.Name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.setup = true
	b.SetLocal(local, cfg.Network)
	b.SetIPv6Network(cfg.IPv6Network)
	b.Log.Info("host-gw ready", "subnet", local.Subnet, "public_ip", b.Iface.PublicIP, "ipv6_subnet", local.IPv6Subnet, "public_ipv6", b.Iface.PublicIPv6)
	return nil
}

// AddPeer routes the peer's subnet via its PublicIP on our NIC, replacing any route we had for
// that subnet. Our own lease is ignored. The peer's BackendType is not checked (flannel routes
// to the PublicIP of any lease); a non-host-gw peer is only noted at debug level.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("host-gw: AddPeer(%v) before Setup", lease.ID())
	}
	if b.ipv6Only {
		if !lease.IPv6Subnet.IsValid() || !lease.IPv6Subnet.Addr().Is6() || lease.IPv6Subnet.Addr().Is4In6() {
			return fmt.Errorf("host-gw: lease %v has no IPv6 subnet: skipped", lease.ID())
		}
		if b.IsOwn(lease) {
			return nil
		}
		return b.routeV6(lease, lease.IPv6Subnet.Masked())
	}
	if !lease.Subnet.IsValid() || !lease.Subnet.Addr().Is4() || !lease.PublicIP.Is4() {
		return fmt.Errorf("host-gw: lease %v (PublicIP %v) is not IPv4: skipped", lease.Subnet, lease.PublicIP)
	}
	if b.IsOwn(lease) {
		return nil
	}
	if lease.BackendType != subnetmgr.BackendHostGW {
		b.Log.Debug("routing to a peer of another backend type", "subnet", lease.Subnet, "type", lease.BackendType)
	}
	subnet := lease.Subnet.Masked()
	return errors.Join(b.routeV4(lease, subnet), b.routeV6(lease, subnet))
}

// routeV4 routes the peer's IPv4 subnet, or reports why it cannot.
func (b *Backend) routeV4(lease subnetmgr.Lease, subnet netip.Prefix) error {
	path, err := b.direct.Decide(lease.PublicIP)
	if err != nil {
		return fmt.Errorf("host-gw: lease %v: %w", lease.Subnet, err)
	}
	if !path.Direct {
		// No route: one via an address that is not a neighbour is refused by the kernel, or
		// would send the subnet's traffic to whoever answers. A route we had for the subnet
		// (the peer was on our segment before it moved) goes, or it would blackhole.
		if err := b.direct.DeleteRoute(subnet); err != nil {
			b.Log.Warn("removing the route of a peer that left our segment", "subnet", subnet, "err", err)
		}
		b.unreachable[subnet] = path.Why
		err := fmt.Errorf("host-gw: lease %v: PublicIP %s, so it is unreachable in host-gw mode (DirectRouting without a fallback): put the hosts on one L2 segment or use the vxlan/ebpf backend with DirectRouting: %w",
			lease.Subnet, path.Why, ErrUnreachablePeer)
		b.Log.Warn("peer unreachable in host-gw mode", "subnet", lease.Subnet, "public_ip", lease.PublicIP, "err", err)
		return err
	}
	delete(b.unreachable, subnet)
	if err := b.direct.RouteVia(subnet, lease.PublicIP); err != nil {
		return fmt.Errorf("host-gw: %w", err)
	}
	b.Log.Debug("peer routed", "subnet", lease.Subnet, "via", lease.PublicIP, "why", path.Why)
	return nil
}

// routeV6 routes the peer's IPv6 subnet via its PublicIPv6 in a dual-stack overlay when that is
// on our IPv6 segment; otherwise it logs and lists the peer as unreachable over IPv6, which is
// not an error. The route of an IPv6 subnet the peer no longer holds goes.
func (b *Backend) routeV6(lease subnetmgr.Lease, subnet netip.Prefix) error {
	var want netip.Prefix
	if b.DualStack() && lease.IPv6Subnet.IsValid() && lease.IPv6Subnet.Addr().Is6() && !lease.IPv6Subnet.Addr().Is4In6() {
		want = lease.IPv6Subnet.Masked()
	}
	if old, ok := b.routed6[subnet]; ok && old != want {
		delete(b.routed6, subnet)
		delete(b.unreachable, old)
		if err := b.direct.DeleteRoute(old); err != nil {
			return fmt.Errorf("host-gw: lease %v: remove the route of its former IPv6 subnet: %w", lease.Subnet, err)
		}
	}
	if !want.IsValid() {
		return nil
	}
	b.routed6[subnet] = want
	name := lease.ID()
	why := "the peer publishes no PublicIPv6"
	if lease.PublicIPv6.Is6() && !lease.PublicIPv6.Is4In6() {
		path, err := b.direct.Decide(lease.PublicIPv6)
		if err != nil {
			return fmt.Errorf("host-gw: lease %v: %w", name, err)
		}
		if path.Direct {
			delete(b.unreachable, want)
			if err := b.direct.RouteVia(want, lease.PublicIPv6); err != nil {
				return fmt.Errorf("host-gw: %w", err)
			}
			b.Log.Debug("peer routed over IPv6", "subnet", name, "ipv6_subnet", want, "via", lease.PublicIPv6, "why", path.Why)
			return nil
		}
		why = "PublicIPv6 " + path.Why
	}
	// As for IPv4: no route is better than one via an address that is not a neighbour.
	if err := b.direct.DeleteRoute(want); err != nil {
		b.Log.Warn("removing the IPv6 route of a peer no longer on our segment", "ipv6_subnet", want, "err", err)
	}
	b.unreachable[want] = why
	if b.ipv6Only {
		// The only family: as for IPv4 in the other overlays, an error the daemon shows.
		err := fmt.Errorf("host-gw: lease %v: %s, so it is unreachable in host-gw mode (DirectRouting without a fallback): put the hosts on one L2 segment or use the vxlan backend: %w",
			name, why, ErrUnreachablePeer)
		b.Log.Warn("peer unreachable in host-gw mode", "subnet", name, "public_ipv6", lease.PublicIPv6, "err", err)
		return err
	}
	b.Log.Warn("peer unreachable over IPv6 in host-gw mode; its IPv4 subnet is routed", "subnet", lease.Subnet,
		"ipv6_subnet", want, "public_ipv6", lease.PublicIPv6, "why", why)
	return nil
}

// RemovePeer deletes our route to the lease's subnet, whatever gateway it has now (the lease
// in a removal event may be older than the route). A missing route is not an error.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("host-gw: RemovePeer(%v) before Setup", lease.ID())
	}
	var subnet netip.Prefix
	if b.ipv6Only {
		// Keyed by the IPv6 subnet: the loop below removes its route.
		if b.IsOwn(lease) {
			return nil
		}
		subnet = lease.ID().Masked()
	} else {
		var own bool
		var err error
		if subnet, own, err = b.RemovedSubnet(lease); own || err != nil {
			return err
		}
	}
	delete(b.unreachable, subnet)
	if err := b.direct.DeleteRoute(subnet); err != nil {
		return fmt.Errorf("host-gw: %w", err)
	}
	// The IPv6 route, whether this process made it (for whichever IPv6 subnet) or an earlier one did.
	for _, s6 := range []netip.Prefix{b.routed6[subnet], lease.IPv6Subnet} {
		if !s6.IsValid() || !s6.Addr().Is6() {
			continue
		}
		delete(b.unreachable, s6.Masked())
		if err := b.direct.DeleteRoute(s6); err != nil {
			return fmt.Errorf("host-gw: %w", err)
		}
	}
	delete(b.routed6, subnet)
	return nil
}

// Close releases the netlink socket. With teardown it also deletes every gatewayed route on our
// NIC to a part of the overlay Network or IPv6Network (ours by construction, including those of
// an earlier run). A route to the whole Network is the host's (StaleVia) and stays.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return nil // closed already
	}
	var err error
	if teardown && b.setup && b.HasNetwork() {
		err = b.deleteRoutes()
	}
	if b.ownsNL {
		b.nl.Close()
	}
	b.nl = nil
	b.setup = false
	return err
}

func (b *Backend) deleteRoutes() error {
	if _, err := b.direct.DeleteRoutesInside(b.Networks()...); err != nil {
		return fmt.Errorf("host-gw: teardown: %w", err)
	}
	return nil
}

// PrunePeers deletes our routes to subnets no lease in keep holds (backend.PeerPruner): routes
// outlive xnetd, so a restarted daemon inherits the route of every lease deleted while it was
// down, and no removal event will ever name them. The NIC is shared with the host's own
// routes: a gatewayed route is ours when it leads strictly into the overlay Network, or
// elsewhere via a host holding a kept lease (backend.KeptSubnets.StaleVia), IPv6 routes judged
// against the IPv6Network; our own subnets and every other route stay.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return errors.New("host-gw: PrunePeers before Setup")
	}
	if !b.HasNetwork() {
		return nil // no Network: no route can be known to be ours
	}
	kept := backend.KeptFor(b.Local(), keep)
	for s := range b.unreachable {
		if !kept.Has(s) {
			delete(b.unreachable, s)
		}
	}
	for s := range b.routed6 {
		if !kept.Has(s) {
			delete(b.routed6, s)
		}
	}
	gone, err := b.direct.PruneRoutes(kept, b.Networks()...)
	if len(gone) > 0 {
		b.Log.Info("removed routes of peers whose leases went away while xnetd was down", "routes", gone)
	}
	if err != nil {
		return fmt.Errorf("host-gw: prune peers: %w", err)
	}
	return nil
}

var (
	_ backend.Backend    = (*Backend)(nil)
	_ backend.PeerPruner = (*Backend)(nil)
	_ backend.DualStack  = (*Backend)(nil)
)
