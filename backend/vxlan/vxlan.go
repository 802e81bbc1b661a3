// Package vxlan is xnet's kernel VXLAN backend: one Linux vxlan device (xnet.<VNI>, xnet.1 by
// default) programmed exactly as flannel's vxlan backend programs flannel.<VNI>, so that a host
// running this backend and a host running flannel reach each other's containers. It is the
// compatibility reference for the ebpf backend and the fallback when BPF cannot load.
//
// It owns the device, its address, and the per-peer route, neighbour and fdb entries on it. It
// does not own leases (package subnetmgr), masquerading (package ipmasq), or the underlay NIC.
//
// Design history (why it looks like flannel's):
//
// flannel's first vxlan backend answered the kernel's L2/L3 miss notifications from user space:
// a restarted or slow daemon meant lost packets. Since flannel 0.9 it programs everything up
// front and the kernel never asks: per peer, one route, one permanent neighbour and one fdb
// entry:
//
//	ip route replace <peer subnet> via <peer subnet addr> dev xnet.1 onlink
//	ip neigh replace <peer subnet addr> lladdr <peer VtepMAC> dev xnet.1 nud permanent
//	bridge fdb replace <peer VtepMAC> dev xnet.1 dst <peer PublicIP> self permanent
//
// The route sends a remote subnet's traffic to a gateway address that exists only as a
// neighbour entry (the peer's subnet address, e.g. 10.244.5.0), the neighbour entry gives the
// inner destination MAC (the peer's VTEP MAC), and the fdb entry maps that MAC to the peer's
// underlay address. Nothing is learned, so nothing times out and a restart changes nothing.
// Nor does anything go by itself: the entries of a lease deleted while the daemon was down stay
// until PrunePeers, which the daemon calls after applying its first full lease list.
//
// We differ from flannel in one deliberate way: the device MAC is backend.VtepMAC(PublicIP), not
// random. flannel keeps whatever MAC an existing device has and publishes it; we derive it, so a
// host whose device was deleted (reboot, teardown) comes back with the MAC its peers already have.
// flannel also writes net.ipv6.conf.<dev>.accept_ra=0; we run IPv4 only and skip it, because
// /proc/sys follows the calling thread's netns and the backend may run through a handle bound to
// another namespace.
//
// DirectRouting ("Backend":{"DirectRouting":true}) is flannel's too: a peer whose PublicIP is on
// our L2 segment (backend.DirectRouter) gets `<peer subnet> via <PublicIP> dev <underlay>` instead
// of the three entries on the device, and its packets leave unencapsulated; the others keep
// VXLAN. The route replaces the device route for that subnet in one change (and back), so a
// peer whose lease moves it onto or off our segment switches path without a gap. Unlike flannel
// we remove the neighbour and fdb entries of a peer that became direct, and the direct routes
// at teardown and prune, as host-gw does.
package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// ErrIncompatiblePeer marks a peer lease this backend cannot program (backend.ParseVXLANPeer's
// rules). The daemon logs it and moves on.
var ErrIncompatiblePeer = backend.ErrIncompatiblePeer

// DeviceName is the vxlan device for a VNI: "xnet.1" by default, as flannel names its own
// "flannel.<VNI>".
func DeviceName(vni int) string { return fmt.Sprintf("xnet.%d", vni) }

// Backend is the kernel VXLAN backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.VXLAN // guarded by mu after New
	nl            *netlink.Handle
	ownsNL        bool

	mu            sync.Mutex
	setup         bool
	direct        *backend.DirectRouter
	directRouting bool // the config's Backend.DirectRouting
	dev           int  // ifindex of our vxlan device once Setup ran
	// peers is what this process programmed per peer subnet, so a changed lease (new MAC or
	// PublicIP) can have its old fdb entry removed. After a restart it is empty and RemovePeer
	// falls back to the lease and the neighbour table.
	peers map[netip.Prefix]peer
}

// peer is the part of a lease the datapath depends on, and how it is reached.
type peer struct {
	subnet   netip.Prefix
	publicIP netip.Addr
	mac      net.HardwareAddr
	path     backend.PeerPath
}

// New builds the backend for opts. It works in the network namespace the calling thread is in
// when New is called (it opens its netlink socket there). It returns an error wrapping
// backend.ErrUnavailable when the kernel has no vxlan support (see probeKernel).
func New(opts backend.Options) (backend.Backend, error) {
	if err := probeKernel(sysModuleDir, kernelModulesDir()); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("vxlan: open netlink socket: %w", err)
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
// with netlink.NewHandleAt for another network namespace, as the tests do). Close does not
// close h. It does not probe for kernel support: Setup reports it.
func NewWithHandle(opts backend.Options, h *netlink.Handle) (*Backend, error) {
	if h == nil {
		return nil, errors.New("vxlan: NewWithHandle needs a netlink handle, got nil")
	}
	return newBackend(opts, h)
}

func newBackend(opts backend.Options, h *netlink.Handle) (*Backend, error) {
	core, err := backend.NewVXLAN(subnetmgr.BackendVXLAN, opts)
	if err != nil {
		return nil, err
	}
	core.Log = core.Log.With("device", DeviceName(core.VNI))
	return &Backend{VXLAN: core, nl: h, peers: map[netip.Prefix]peer{},
		direct: backend.NewDirectRouter(h, opts.Iface), directRouting: opts.Config.Backend.DirectRouting}, nil
}

// Mode: the kernel's vxlan device does the work.
func (b *Backend) Mode() (string, string) {
	return "kernel", "kernel VXLAN device " + DeviceName(b.VNI)
}

// Setup creates (or adopts) the vxlan device, gives it our subnet's network address as a /32
// and brings it up. Calling it again is harmless.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if err := b.CheckSetup(ctx, local, cfg); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	link, err := b.ensureDevice()
	if err != nil {
		return err
	}
	if err := b.ensureAddress(link, local.Subnet.Masked(), cfg.Network); err != nil {
		return err
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("vxlan: set %s up: %w", link.Name, err)
	}
	b.setup = true
	b.SetLocal(local, cfg.Network)
	b.dev = link.Index
	b.Log.Info("vxlan device ready", "vni", b.VNI, "port", b.Port, "local", b.localIP(), "public_ip", b.Iface.PublicIP,
		"underlay", b.Iface.Name, "mtu", link.MTU, "mac", link.HardwareAddr.String(),
		"address", netip.PrefixFrom(local.Subnet.Masked().Addr(), 32), "direct_routing", b.directRouting)
	return nil
}

// AddPeer programs the route, neighbour and fdb entry for one remote lease, replacing whatever
// was there for that subnet. Our own lease is ignored. A lease that is not "vxlan" or whose
// BackendData is malformed is logged and skipped with an error wrapping ErrIncompatiblePeer.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("vxlan: AddPeer(%v) before Setup", lease.Subnet)
	}
	vp, own, err := b.Peer(lease)
	if own || err != nil {
		return err
	}
	p := peerOf(vp)
	p.path = b.direct.Path(b.directRouting, p.publicIP)
	if old, ok := b.peers[p.subnet]; !ok || old.path.Direct != p.path.Direct {
		b.Log.Info("peer path", "subnet", p.subnet, "public_ip", p.publicIP, "direct", p.path.Direct, "why", p.path.Why)
	}
	if p.path.Direct {
		return b.addDirectPeer(p)
	}
	if old, ok := b.peers[p.subnet]; ok && old.mac.String() != p.mac.String() {
		// The fdb is keyed by MAC: a peer that changed MAC leaves its old entry behind unless
		// we remove it. A changed PublicIP with the same MAC is handled by the replace below.
		if err := backend.IgnoreMissing(b.nl.NeighDel(b.fdbEntry(old))); err != nil {
			b.Log.Warn("removing old fdb entry of changed peer", "subnet", p.subnet, "mac", old.mac.String(), "err", err)
		}
	}
	// Order as flannel: neighbour, fdb, then the route, so the kernel never resolves the
	// gateway by ARP (it would never get an answer).
	if err := b.nl.NeighSet(b.neighEntry(p)); err != nil {
		return fmt.Errorf("vxlan: peer %v: neigh replace %v lladdr %v dev %s: %w", p.subnet, p.subnet.Addr(), p.mac, DeviceName(b.VNI), err)
	}
	if err := b.nl.NeighSet(b.fdbEntry(p)); err != nil {
		_ = b.nl.NeighDel(b.neighEntry(p))
		return fmt.Errorf("vxlan: peer %v: fdb replace %v dst %v: %w", p.subnet, p.mac, p.publicIP, err)
	}
	route := b.route(p.subnet)
	if err := b.nl.RouteReplace(route); err != nil {
		_ = b.nl.NeighDel(b.neighEntry(p))
		_ = b.nl.NeighDel(b.fdbEntry(p))
		return fmt.Errorf("vxlan: peer %v: route replace %v via %v onlink: %w", p.subnet, p.subnet, p.subnet.Addr(), err)
	}
	b.peers[p.subnet] = p
	b.Log.Debug("peer programmed", "subnet", p.subnet, "public_ip", p.publicIP, "vtep_mac", p.mac.String())
	return nil
}

// addDirectPeer routes a peer on our segment via its PublicIP on the underlay, replacing its
// device route (if it had one) in the same change, then removes its neighbour and fdb entries:
// nothing is sent through them any more, and a stale fdb entry would go on claiming the MAC.
func (b *Backend) addDirectPeer(p peer) error {
	if err := b.direct.RouteVia(p.subnet, p.publicIP); err != nil {
		return fmt.Errorf("vxlan: peer %v: %w", p.subnet, err)
	}
	stale := []peer{p}
	if old, ok := b.peers[p.subnet]; ok && old.mac.String() != p.mac.String() {
		stale = append(stale, old)
	}
	for _, o := range stale {
		if err := backend.IgnoreMissing(b.nl.NeighDel(b.neighEntry(o))); err != nil {
			b.Log.Warn("removing the neighbour entry of a peer routed directly", "subnet", o.subnet, "err", err)
		}
		if err := backend.IgnoreMissing(b.nl.NeighDel(b.fdbEntry(o))); err != nil {
			b.Log.Warn("removing the fdb entry of a peer routed directly", "subnet", o.subnet, "mac", o.mac.String(), "err", err)
		}
	}
	b.peers[p.subnet] = p
	b.Log.Debug("peer routed directly", "subnet", p.subnet, "via", p.publicIP)
	return nil
}

// RemovePeer deletes what AddPeer programmed for the lease's subnet. Entries already gone are
// not an error. It works after a restart too: the VTEP MAC comes from what this process
// programmed, else from the lease, else from the neighbour entry on the device.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("vxlan: RemovePeer(%v) before Setup", lease.Subnet)
	}
	subnet, own, err := b.RemovedSubnet(lease)
	if own || err != nil {
		return err
	}
	p, known := b.peers[subnet]
	if !known {
		p = peer{subnet: subnet, publicIP: lease.PublicIP}
		if parsed, err := backend.ParseVXLANPeer(lease, b.VNI, nil); err == nil {
			p = peerOf(parsed)
		} else {
			p.mac = b.neighMAC(subnet.Addr())
		}
	}
	var errs []error
	if err := backend.IgnoreMissing(b.nl.RouteDel(b.route(subnet))); err != nil {
		errs = append(errs, fmt.Errorf("route del %v: %w", subnet, err))
	}
	// The direct route, whether this process made it or an earlier one did.
	if err := b.direct.DeleteRoute(subnet); err != nil {
		errs = append(errs, err)
	}
	if err := backend.IgnoreMissing(b.nl.NeighDel(b.neighEntry(p))); err != nil {
		errs = append(errs, fmt.Errorf("neigh del %v: %w", subnet.Addr(), err))
	}
	if p.mac != nil && p.publicIP.IsValid() {
		if err := backend.IgnoreMissing(b.nl.NeighDel(b.fdbEntry(p))); err != nil {
			errs = append(errs, fmt.Errorf("fdb del %v dst %v: %w", p.mac, p.publicIP, err))
		}
	}
	delete(b.peers, subnet)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vxlan: remove peer %v: %w", subnet, err)
	}
	b.Log.Debug("peer removed", "subnet", subnet, "public_ip", p.publicIP)
	return nil
}

// PrunePeers removes the per-peer entries on our device that no lease in keep accounts for
// (backend.PeerPruner): the device outlives xnetd, so a restarted daemon inherits the route,
// neighbour and fdb entry of every lease deleted while it was down, and no removal event will
// ever name them. Routes and neighbours go by subnet (only those inside the overlay Network),
// fdb entries by VTEP MAC. Our own subnet and the device's address are never touched.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return errors.New("vxlan: PrunePeers before Setup")
	}
	kept := backend.NewKeptSubnets(b.Local().Subnet, keep)
	keepMACs := map[string]bool{}
	for _, l := range keep {
		// No logger: AddPeer has already warned about anything odd in these leases.
		if p, err := backend.ParseVXLANPeer(l, b.VNI, nil); err == nil {
			keepMACs[p.VtepMAC.String()] = true
		}
	}
	var errs []error
	var routes, neighs, fdb []string

	// Peer routes have a gateway (the peer's subnet address, onlink); the device's own do not.
	// A dump interrupted by a concurrent change is still a list of entries that existed:
	// deleting the unkept ones among them is right, and the next start catches the rest.
	gone, err := backend.DeleteRoutesWhere(b.nl, b.dev, func(dst netip.Prefix, gw netip.Addr) bool {
		return gw.IsValid() && kept.Stale(b.Network(), dst)
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", DeviceName(b.VNI), err))
	}
	for _, r := range gone {
		routes = append(routes, r.String())
	}
	ns, err := b.nl.NeighList(b.dev, unix.AF_INET)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		errs = append(errs, fmt.Errorf("list neighbours on %s: %w", DeviceName(b.VNI), err))
	}
	for _, n := range ns {
		ip, ok := netip.AddrFromSlice(n.IP)
		ip = ip.Unmap()
		if !ok || n.State&netlink.NUD_PERMANENT == 0 || !kept.Stale(b.Network(), netip.PrefixFrom(ip, 32)) || kept.HasSubnetAddr(ip) {
			continue
		}
		if err := backend.IgnoreMissing(b.nl.NeighDel(&n)); err != nil {
			errs = append(errs, fmt.Errorf("neigh del %v: %w", ip, err))
			continue
		}
		neighs = append(neighs, ip.String())
	}
	fs, err := b.nl.NeighList(b.dev, unix.AF_BRIDGE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		errs = append(errs, fmt.Errorf("list fdb of %s: %w", DeviceName(b.VNI), err))
	}
	for _, f := range fs {
		dst, ok := netip.AddrFromSlice(f.IP)
		// Only unicast MACs with a destination are peer entries.
		if !ok || len(f.HardwareAddr) != 6 || f.HardwareAddr[0]&1 == 1 || keepMACs[f.HardwareAddr.String()] {
			continue
		}
		if err := backend.IgnoreMissing(b.nl.NeighDel(b.fdbEntry(peer{publicIP: dst.Unmap(), mac: f.HardwareAddr}))); err != nil {
			errs = append(errs, fmt.Errorf("fdb del %v dst %v: %w", f.HardwareAddr, dst, err))
			continue
		}
		fdb = append(fdb, f.HardwareAddr.String()+" dst "+dst.Unmap().String())
	}
	direct, err := b.direct.PruneRoutes(b.Network(), kept)
	if err != nil {
		errs = append(errs, err)
	}
	for _, d := range direct {
		routes = append(routes, d.String()+" dev "+b.Iface.Name)
	}
	for s := range b.peers {
		if !kept.Has(s) {
			delete(b.peers, s)
		}
	}
	if len(routes)+len(neighs)+len(fdb) > 0 {
		b.Log.Info("removed peers whose leases went away while xnetd was down", "routes", routes, "neighbours", neighs, "fdb", fdb)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vxlan: prune peers: %w", err)
	}
	return nil
}

// Close releases the netlink socket. With teardown it also deletes the device, which takes
// its address, routes, neighbours and fdb entries with it; without, the datapath keeps
// forwarding for a restarted daemon to adopt.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return nil // closed already
	}
	var err error
	if teardown {
		err = b.deleteDevice()
		if b.Network().IsValid() {
			_, derr := b.direct.DeleteRoutesInside(b.Network())
			err = errors.Join(err, derr)
		}
	}
	if b.ownsNL {
		b.nl.Close()
	}
	b.nl = nil
	b.setup = false
	return err
}

func peerOf(p backend.VXLANPeer) peer {
	return peer{subnet: p.Subnet, publicIP: p.PublicIP, mac: p.VtepMAC}
}

// route is "<subnet> via <subnet addr> dev xnet.1 onlink".
func (b *Backend) route(subnet netip.Prefix) *netlink.Route {
	r := &netlink.Route{
		LinkIndex: b.dev,
		Scope:     netlink.SCOPE_UNIVERSE,
		Dst:       backend.IPNet(subnet),
		Gw:        net.IP(subnet.Addr().AsSlice()),
	}
	r.SetFlag(netlink.FLAG_ONLINK)
	return r
}

// neighEntry is the permanent ARP entry for the peer's gateway address.
func (b *Backend) neighEntry(p peer) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    b.dev,
		State:        netlink.NUD_PERMANENT,
		Type:         unix.RTN_UNICAST,
		IP:           net.IP(p.subnet.Addr().AsSlice()),
		HardwareAddr: p.mac,
	}
}

// fdbEntry maps the peer's VTEP MAC to its underlay address.
func (b *Backend) fdbEntry(p peer) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    b.dev,
		State:        netlink.NUD_PERMANENT,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		IP:           net.IP(p.publicIP.AsSlice()),
		HardwareAddr: p.mac,
	}
}

// neighMAC looks up the MAC of a neighbour on our device, nil if there is none.
func (b *Backend) neighMAC(ip netip.Addr) net.HardwareAddr {
	neighs, err := b.nl.NeighList(b.dev, unix.AF_INET)
	if err != nil {
		return nil
	}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
			return n.HardwareAddr
		}
	}
	return nil
}

var (
	_ backend.Backend    = (*Backend)(nil)
	_ backend.PeerPruner = (*Backend)(nil)
)
