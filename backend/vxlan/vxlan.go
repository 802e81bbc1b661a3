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
// flannel also writes net.ipv6.conf.<dev>.accept_ra=0; we skip it, because /proc/sys follows
// the calling thread's netns and the backend may run through a handle bound to another
// namespace (a host that forwards, as every container host does, ignores router
// advertisements anyway).
//
// Dual stack (EnableIPv6): as flannel, a second device carries IPv6 over the IPv6 underlay,
//
//	ip link add xnet-v6.1 type vxlan id 1 dstport 8472 local <PublicIPv6> dev <iface> nolearning
//
// with MTU underlay - 70 (the outer IPv6 header is 20 bytes longer), <our IPv6 subnet
// addr>/128 as its address, a MAC derived from PublicIPv6 (backend.VtepMACv6) published as
// BackendV6Data, and per peer the same three entries on it:
//
//	ip -6 route replace <peer IPv6 subnet> via <its subnet addr> dev xnet-v6.1 onlink
//	ip -6 neigh replace <its subnet addr> lladdr <peer BackendV6Data VtepMAC> dev xnet-v6.1 nud permanent
//	bridge fdb replace <that MAC> dev xnet-v6.1 dst <peer PublicIPv6> self permanent
//
// flannel needs an IPv6 underlay on every host; xnet does not. The rule (backend.VXLANPeerV6):
// a peer's IPv6 subnet goes through xnet-v6.<VNI> when both we and the peer have an IPv6 VTEP
// (we: a PublicIPv6; the peer: a PublicIPv6 and a BackendV6Data VtepMAC other than its IPv4
// one). Otherwise (we have no PublicIPv6, or the peer has none, or it is a udp host or an
// ebpf host without an IPv6 underlay, which publish no IPv6 VTEP) its IPv6 traffic rides the IPv4 device as
// inner IPv6: `<peer IPv6 subnet> via <its subnet addr> dev xnet.1 onlink` and a permanent
// neighbour entry for that address with the peer's IPv4 VtepMAC; the peer's fdb entry on xnet.1
// is already there. Without a PublicIPv6 we publish our IPv4 VTEP as BackendV6Data, make no
// xnet-v6.<VNI> (and delete one an earlier run left), and xnet.1 takes our /128. With
// DirectRouting a peer whose PublicIPv6 is on our IPv6 segment gets `<IPv6 subnet> via
// <PublicIPv6> dev <underlay>`, as flannel does.
//
// IPv6 only (EnableIPv4 false): only xnet-v6.<VNI> exists (an xnet.<VNI> of an earlier run is
// deleted), MTU underlay - 70, and every peer gets the three entries above on it, read from its
// IPv6-only lease (backend.ParseVXLANPeerIPv6Only); exactly flannel's layout, so flannel and
// xnet hosts share the overlay. It needs our PublicIPv6: New refuses to build without one.
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
	"encoding/json"
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

// DeviceNameV6 is the vxlan device on the IPv6 underlay of a dual-stack overlay: "xnet-v6.1",
// as flannel names its own "flannel-v6.<VNI>".
func DeviceNameV6(vni int) string { return fmt.Sprintf("xnet-v6.%d", vni) }

// maxIfName is the longest interface name Linux accepts (IFNAMSIZ - 1): DeviceNameV6 of a VNI
// of eight digits is one byte too long.
const maxIfName = 15

// Backend is the kernel VXLAN backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.VXLAN // guarded by mu after New
	nl            *netlink.Handle
	ownsNL        bool

	mu            sync.Mutex
	setup         bool
	direct        *backend.DirectRouter
	directRouting bool // the config's Backend.DirectRouting
	// ipv6Only is an IPv6-only overlay (the config's EnableIPv4 false): only xnet-v6.<VNI>,
	// peers keyed by their IPv6 subnet.
	ipv6Only bool
	dev      int // ifindex of our vxlan device once Setup ran
	// dev6 is the ifindex of xnet-v6.<VNI> once a dual-stack Setup with a PublicIPv6 made it;
	// 0 otherwise (IPv6 then rides dev).
	dev6 int
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
	v6       *peerV6 // nil for an IPv4-only peer, or when we are not dual stack
}

// v6Path is how a peer's IPv6 subnet is reached (see the package comment).
type v6Path int

const (
	v6OverIPv4 v6Path = iota // inner IPv6 through xnet.<VNI> to the peer's IPv4 VTEP
	v6OwnVTEP                // through xnet-v6.<VNI> to the peer's IPv6 VTEP
	v6Direct                 // DirectRouting: via the peer's PublicIPv6 on the underlay
)

func (k v6Path) String() string {
	return [...]string{"vxlan over the IPv4 underlay", "vxlan over the IPv6 underlay", "direct"}[k]
}

// peerV6 is the IPv6 half of a dual-stack peer as programmed.
type peerV6 struct {
	subnet     netip.Prefix
	publicIPv6 netip.Addr
	mac        net.HardwareAddr // of the VTEP receiving its IPv6 traffic (the IPv4 one for v6OverIPv4)
	path       v6Path
	why        string
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
	if opts.Config.IPv6Only() && !ipv6Underlay(opts.Iface) {
		return nil, fmt.Errorf("vxlan: an IPv6-only overlay (EnableIPv4 false) is carried over the IPv6 underlay, and %s has no global IPv6 address: add one or set --public-ipv6", opts.Iface.Name)
	}
	if opts.Config.EnableIPv6 && ipv6Underlay(opts.Iface) {
		if name := DeviceNameV6(core.VNI); len(name) > maxIfName {
			return nil, fmt.Errorf("vxlan: the IPv6 device's name %q is longer than %d bytes: use a VNI below 10000000 in a dual-stack overlay", name, maxIfName)
		}
		if opts.Iface.MTU <= backend.VXLANOverheadV6 {
			return nil, fmt.Errorf("vxlan: interface %s MTU %d leaves no room for the %d-byte VXLAN overhead over IPv6", opts.Iface.Name, opts.Iface.MTU, backend.VXLANOverheadV6)
		}
	}
	device := DeviceName(core.VNI)
	if opts.Config.IPv6Only() {
		device = DeviceNameV6(core.VNI)
	}
	core.Log = core.Log.With("device", device)
	return &Backend{VXLAN: core, nl: h, peers: map[netip.Prefix]peer{}, ipv6Only: opts.Config.IPv6Only(),
		direct: backend.NewDirectRouter(h, opts.Iface), directRouting: opts.Config.Backend.DirectRouting}, nil
}

// ipv6Underlay says whether we have an IPv6 underlay address for xnet-v6.<VNI>.
func ipv6Underlay(iface backend.ExternalInterface) bool {
	return iface.PublicIPv6.Is6() && !iface.PublicIPv6.Is4In6()
}

// Mode: the kernel's vxlan device does the work.
func (b *Backend) Mode() (string, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	why := "kernel VXLAN device " + DeviceName(b.VNI)
	if b.ipv6Only {
		return "kernel", "kernel VXLAN device " + DeviceNameV6(b.VNI) + " on the IPv6 underlay (IPv6 only)"
	}
	if b.dev6 != 0 {
		why += " and " + DeviceNameV6(b.VNI) + " on the IPv6 underlay"
	}
	return "kernel", why
}

// ReceivesOnIPv6Underlay: with a PublicIPv6 the IPv6 device listens there (flannel's layout).
func (b *Backend) ReceivesOnIPv6Underlay() bool { return ipv6Underlay(b.Iface) }

// LeaseAttrsV6 publishes, in a dual-stack overlay, the VNI and the MAC of xnet-v6.<VNI> when
// we have a PublicIPv6; without one, our IPv4 VTEP's BackendData, so peers send our IPv6
// traffic to xnet.<VNI> (backend.VXLANPeerV6).
func (b *Backend) LeaseAttrsV6() (json.RawMessage, error) {
	data, err := backend.VXLANLeaseDataV6(b.VNI, b.Iface.PublicIP, b.Iface.PublicIPv6, ipv6Underlay(b.Iface))
	if err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	return data, nil
}

// MTU is the underlay MTU minus the VXLAN overhead: over IPv6 (70) in an IPv6-only overlay,
// whose only device is on the IPv6 underlay, else over IPv4 (50).
func (b *Backend) MTU() int {
	if b.ipv6Only {
		return backend.OverlayMTUv6(b.Iface.MTU)
	}
	return b.VXLAN.MTU()
}

// Setup creates (or adopts) the vxlan device, gives it our subnet's network address as a /32
// and brings it up. In a dual-stack overlay (our lease has an IPv6 subnet) it does the same
// for xnet-v6.<VNI> with our IPv6 subnet's address as a /128 when we have a PublicIPv6, and
// otherwise gives that /128 to xnet.<VNI>. Calling it again is harmless.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if b.ipv6Only {
		return b.setupIPv6Only(ctx, local, cfg)
	}
	if err := b.CheckSetup(ctx, local, cfg); err != nil {
		return err
	}
	if err := b.CheckSetupV6(local, cfg); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	link, err := b.ensureDevice(b.wantDevice())
	if err != nil {
		return err
	}
	if err := b.ensureAddress(link, unix.AF_INET, netip.PrefixFrom(local.Subnet.Masked().Addr(), 32)); err != nil {
		return err
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("vxlan: set %s up: %w", link.Name, err)
	}
	var addr6 netip.Prefix // our IPv6 subnet's address as a /128, when dual stack
	if local.IPv6Subnet.IsValid() {
		addr6 = netip.PrefixFrom(local.IPv6Subnet.Masked().Addr(), 128)
	}
	dev6 := 0
	if addr6.IsValid() && ipv6Underlay(b.Iface) {
		link6, err := b.ensureDevice(b.wantDeviceV6())
		if err != nil {
			return err
		}
		if err := b.ensureAddress(link6, unix.AF_INET6, addr6); err != nil {
			return err
		}
		if err := b.nl.LinkSetUp(link6); err != nil {
			return fmt.Errorf("vxlan: set %s up: %w", link6.Name, err)
		}
		dev6 = link6.Index
		addr6 = netip.Prefix{} // xnet.<VNI> gets none
		b.Log.Info("vxlan IPv6 device ready", "ipv6_device", link6.Name, "local", b.Iface.PublicIPv6, "mtu", link6.MTU,
			"mac", link6.HardwareAddr.String(), "address", netip.PrefixFrom(local.IPv6Subnet.Masked().Addr(), 128))
	} else if err := b.deleteDevice(DeviceNameV6(b.VNI)); err != nil {
		// An earlier run had an IPv6 underlay; we carry IPv6 on xnet.<VNI> now, or none.
		return err
	}
	if err := b.ensureAddress(link, unix.AF_INET6, addr6); err != nil {
		return err
	}
	b.setup = true
	b.SetLocal(local, cfg.Network)
	b.SetIPv6Network(cfg.IPv6Network)
	b.dev, b.dev6 = link.Index, dev6
	b.Log.Info("vxlan device ready", "vni", b.VNI, "port", b.Port, "local", b.localIP(), "public_ip", b.Iface.PublicIP,
		"underlay", b.Iface.Name, "mtu", link.MTU, "mac", link.HardwareAddr.String(),
		"address", netip.PrefixFrom(local.Subnet.Masked().Addr(), 32), "direct_routing", b.directRouting,
		"ipv6_subnet", local.IPv6Subnet, "ipv6_device", dev6 != 0)
	return nil
}

// setupIPv6Only is Setup in an IPv6-only overlay: xnet-v6.<VNI> with our IPv6 subnet's address
// as a /128, and no xnet.<VNI>.
func (b *Backend) setupIPv6Only(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if err := b.CheckSetupIPv6Only(ctx, local, cfg); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	// An earlier run of an IPv4 or dual-stack overlay made it; nothing may route through it now.
	if err := b.deleteDevice(DeviceName(b.VNI)); err != nil {
		return err
	}
	link6, err := b.ensureDevice(b.wantDeviceV6())
	if err != nil {
		return err
	}
	addr6 := netip.PrefixFrom(local.IPv6Subnet.Masked().Addr(), 128)
	if err := b.ensureAddress(link6, unix.AF_INET6, addr6); err != nil {
		return err
	}
	if err := b.nl.LinkSetUp(link6); err != nil {
		return fmt.Errorf("vxlan: set %s up: %w", link6.Name, err)
	}
	b.setup = true
	b.SetLocal(local, netip.Prefix{})
	b.SetIPv6Network(cfg.IPv6Network)
	b.dev, b.dev6 = 0, link6.Index
	b.Log.Info("vxlan IPv6-only device ready", "vni", b.VNI, "port", b.Port, "local", b.Iface.PublicIPv6, "underlay", b.Iface.Name,
		"mtu", link6.MTU, "mac", link6.HardwareAddr.String(), "address", addr6, "direct_routing", b.directRouting)
	return nil
}

// addPeerIPv6Only is AddPeer in an IPv6-only overlay: the three entries on xnet-v6.<VNI> (or,
// with DirectRouting and the peer's PublicIPv6 on our segment, the direct route), with the
// IPv6 half's bookkeeping, the peer keyed by its IPv6 subnet.
func (b *Backend) addPeerIPv6Only(lease subnetmgr.Lease) error {
	if b.IsOwn(lease) {
		return nil
	}
	pv, err := backend.ParseVXLANPeerIPv6Only(lease)
	if err != nil {
		b.Log.Warn("skipping peer lease", "subnet", lease.ID(), "public_ipv6", lease.PublicIPv6, "err", err)
		return fmt.Errorf("vxlan: %w", err)
	}
	v := &peerV6{subnet: pv.Subnet, publicIPv6: pv.PublicIPv6, mac: pv.VtepMAC, path: v6OwnVTEP, why: "IPv6-only overlay"}
	if b.directRouting {
		if path := b.direct.Path(true, pv.PublicIPv6); path.Direct {
			v.path, v.why = v6Direct, path.Why
		}
	}
	p := peer{subnet: pv.Subnet, v6: v}
	old, had := b.peers[p.subnet]
	if !had || old.v6 == nil || old.v6.path != v.path {
		b.Log.Info("peer path", "subnet", p.subnet, "public_ipv6", v.publicIPv6, "path", v.path.String(), "why", v.why)
	}
	b.peers[p.subnet] = p
	if err := b.programV6(p, old, had); err != nil {
		return fmt.Errorf("vxlan: peer %v: %w", p.subnet, err)
	}
	return nil
}

// removePeerIPv6Only is RemovePeer in an IPv6-only overlay: every path's entries for the
// lease's IPv6 subnet go.
func (b *Backend) removePeerIPv6Only(lease subnetmgr.Lease) error {
	if b.IsOwn(lease) {
		return nil
	}
	s := lease.IPv6Subnet
	if !s.IsValid() || !s.Addr().Is6() {
		return fmt.Errorf("vxlan: RemovePeer: lease has no IPv6 subnet (%v)", s)
	}
	subnet := s.Masked()
	p, known := b.peers[subnet]
	if !known || p.v6 == nil {
		p = peer{subnet: subnet, v6: b.removedV6(lease, peer{})}
	}
	var errs []error
	for _, path := range []v6Path{v6OwnVTEP, v6Direct} {
		prev := *p.v6
		prev.path = path
		errs = append(errs, b.removeV6Leftovers(prev, nil)...)
	}
	delete(b.peers, subnet)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vxlan: remove peer %v: %w", subnet, err)
	}
	b.Log.Debug("peer removed", "subnet", subnet, "public_ipv6", lease.PublicIPv6)
	return nil
}

// AddPeer programs the route, neighbour and fdb entry for one remote lease, replacing whatever
// was there for that subnet, and in a dual-stack overlay those of its IPv6 subnet. Our own
// lease is ignored. A lease that is not "vxlan" or whose BackendData is malformed is logged and
// skipped with an error wrapping ErrIncompatiblePeer.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("vxlan: AddPeer(%v) before Setup", lease.ID())
	}
	if b.ipv6Only {
		return b.addPeerIPv6Only(lease)
	}
	vp, own, err := b.Peer(lease)
	if own || err != nil {
		return err
	}
	p := peerOf(vp)
	p.path = b.direct.Path(b.directRouting, p.publicIP)
	p.v6 = b.pathV6(lease, vp)
	old, had := b.peers[p.subnet]
	if !had || old.path.Direct != p.path.Direct {
		b.Log.Info("peer path", "subnet", p.subnet, "public_ip", p.publicIP, "direct", p.path.Direct, "why", p.path.Why)
	}
	if p.v6 != nil && (!had || old.v6 == nil || old.v6.path != p.v6.path) {
		b.Log.Info("peer IPv6 path", "subnet", p.subnet, "ipv6_subnet", p.v6.subnet, "public_ipv6", p.v6.publicIPv6, "path", p.v6.path.String(), "why", p.v6.why)
	}
	if p.path.Direct {
		err = b.addDirectPeer(p, old, had)
	} else {
		err = b.addVXLANPeer(p, old, had)
	}
	if err != nil {
		return err
	}
	// Recorded before the IPv6 half: whatever of it got programmed is then removed with the peer.
	b.peers[p.subnet] = p
	if err := b.programV6(p, old, had); err != nil {
		return fmt.Errorf("vxlan: peer %v: IPv6 subnet %v: %w", p.subnet, p.v6.subnet, err)
	}
	b.Log.Debug("peer programmed", "subnet", p.subnet, "public_ip", p.publicIP, "vtep_mac", p.mac.String())
	return nil
}

// pathV6 decides how the peer's IPv6 subnet is reached (the package comment's rule); nil when
// we or the peer are IPv4 only, or its IPv6 subnet is unusable (logged).
func (b *Backend) pathV6(lease subnetmgr.Lease, vp backend.VXLANPeer) *peerV6 {
	if !b.DualStack() {
		return nil
	}
	pv, ok, err := backend.ParseVXLANPeerV6(lease, vp)
	if err != nil {
		b.Log.Warn("peer's IPv6 subnet skipped; reached over IPv4 only", "subnet", lease.Subnet, "err", err)
		return nil
	}
	if !ok {
		return nil
	}
	v := &peerV6{subnet: pv.Subnet, publicIPv6: pv.PublicIPv6, mac: vp.VtepMAC, path: v6OverIPv4}
	if b.directRouting && pv.PublicIPv6.Is6() {
		if path := b.direct.Path(true, pv.PublicIPv6); path.Direct {
			v.path, v.why = v6Direct, path.Why
			return v
		}
	}
	switch {
	case pv.OwnVTEP && b.dev6 != 0:
		v.path, v.mac, v.why = v6OwnVTEP, pv.VtepMAC, "both hosts have an IPv6 VTEP"
	case b.dev6 == 0:
		v.why = "we have no IPv6 underlay address"
	case !pv.PublicIPv6.IsValid():
		v.why = "the peer publishes no PublicIPv6"
	default:
		v.why = "the peer's BackendV6Data names its IPv4 VTEP (or none)"
	}
	return v
}

// needsFDB says whether the peer's fdb entry on xnet.<VNI> is in use: for its IPv4 traffic
// unless that is routed directly, and for IPv6 carried over IPv4.
func (p peer) needsFDB() bool {
	return !p.path.Direct || p.v6 != nil && p.v6.path == v6OverIPv4
}

// addVXLANPeer programs the three entries on xnet.<VNI> for the peer's IPv4 subnet.
func (b *Backend) addVXLANPeer(p, old peer, had bool) error {
	if had && old.mac.String() != p.mac.String() {
		// The fdb is keyed by MAC: a peer that changed MAC leaves its old entry behind unless
		// we remove it. A changed PublicIP with the same MAC is handled by the replace below.
		if err := backend.IgnoreMissing(b.nl.NeighDel(fdbEntry(b.dev, old.publicIP, old.mac))); err != nil {
			b.Log.Warn("removing old fdb entry of changed peer", "subnet", p.subnet, "mac", old.mac.String(), "err", err)
		}
	}
	// Order as flannel: neighbour, fdb, then the route, so the kernel never resolves the
	// gateway by ARP (it would never get an answer).
	neigh, fdb := neighEntry(b.dev, p.subnet.Addr(), p.mac), fdbEntry(b.dev, p.publicIP, p.mac)
	if err := b.nl.NeighSet(neigh); err != nil {
		return fmt.Errorf("vxlan: peer %v: neigh replace %v lladdr %v dev %s: %w", p.subnet, p.subnet.Addr(), p.mac, DeviceName(b.VNI), err)
	}
	if err := b.nl.NeighSet(fdb); err != nil {
		_ = b.nl.NeighDel(neigh)
		return fmt.Errorf("vxlan: peer %v: fdb replace %v dst %v: %w", p.subnet, p.mac, p.publicIP, err)
	}
	if err := b.nl.RouteReplace(onlinkRoute(b.dev, p.subnet)); err != nil {
		_ = b.nl.NeighDel(neigh)
		_ = b.nl.NeighDel(fdb)
		return fmt.Errorf("vxlan: peer %v: route replace %v via %v onlink: %w", p.subnet, p.subnet, p.subnet.Addr(), err)
	}
	return nil
}

// addDirectPeer routes a peer on our segment via its PublicIP on the underlay, replacing its
// device route (if it had one) in the same change, then removes its neighbour entry and, unless
// its IPv6 traffic still rides xnet.<VNI>, its fdb entry: nothing is sent through them any
// more, and a stale fdb entry would go on claiming the MAC.
func (b *Backend) addDirectPeer(p, old peer, had bool) error {
	if err := b.direct.RouteVia(p.subnet, p.publicIP); err != nil {
		return fmt.Errorf("vxlan: peer %v: %w", p.subnet, err)
	}
	if p.needsFDB() {
		if err := b.nl.NeighSet(fdbEntry(b.dev, p.publicIP, p.mac)); err != nil {
			return fmt.Errorf("vxlan: peer %v: fdb replace %v dst %v (for its IPv6 traffic): %w", p.subnet, p.mac, p.publicIP, err)
		}
	}
	stale := []peer{p}
	if had && old.mac.String() != p.mac.String() {
		stale = append(stale, old)
	}
	for _, o := range stale {
		if err := backend.IgnoreMissing(b.nl.NeighDel(neighEntry(b.dev, o.subnet.Addr(), o.mac))); err != nil {
			b.Log.Warn("removing the neighbour entry of a peer routed directly", "subnet", o.subnet, "err", err)
		}
		if o.mac.String() == p.mac.String() && p.needsFDB() {
			continue
		}
		if err := backend.IgnoreMissing(b.nl.NeighDel(fdbEntry(b.dev, o.publicIP, o.mac))); err != nil {
			b.Log.Warn("removing the fdb entry of a peer routed directly", "subnet", o.subnet, "mac", o.mac.String(), "err", err)
		}
	}
	b.Log.Debug("peer routed directly", "subnet", p.subnet, "via", p.publicIP)
	return nil
}

// programV6 programs the IPv6 half of p (if any) on its path, then removes what the peer's
// previous version (old, when had) left that the new one does not replace.
func (b *Backend) programV6(p, old peer, had bool) error {
	var prev *peerV6
	if had {
		prev = old.v6
	}
	if v := p.v6; v != nil {
		gw := v.subnet.Addr()
		switch v.path {
		case v6Direct:
			if err := b.direct.RouteVia(v.subnet, v.publicIPv6); err != nil {
				return err
			}
		case v6OwnVTEP:
			neigh, fdb := neighEntry(b.dev6, gw, v.mac), fdbEntry(b.dev6, v.publicIPv6, v.mac)
			if err := b.nl.NeighSet(neigh); err != nil {
				return fmt.Errorf("neigh replace %v lladdr %v dev %s: %w", gw, v.mac, DeviceNameV6(b.VNI), err)
			}
			if err := b.nl.NeighSet(fdb); err != nil {
				return fmt.Errorf("fdb replace %v dst %v dev %s: %w", v.mac, v.publicIPv6, DeviceNameV6(b.VNI), err)
			}
			if err := b.replaceOnlinkV6(b.dev6, v.subnet); err != nil {
				return fmt.Errorf("route replace %v via %v dev %s onlink: %w", v.subnet, gw, DeviceNameV6(b.VNI), err)
			}
		case v6OverIPv4:
			// The fdb entry for v.mac (the peer's IPv4 VTEP) is the IPv4 half's.
			if err := b.nl.NeighSet(neighEntry(b.dev, gw, v.mac)); err != nil {
				return fmt.Errorf("neigh replace %v lladdr %v dev %s: %w", gw, v.mac, DeviceName(b.VNI), err)
			}
			if err := b.replaceOnlinkV6(b.dev, v.subnet); err != nil {
				return fmt.Errorf("route replace %v via %v dev %s onlink: %w", v.subnet, gw, DeviceName(b.VNI), err)
			}
		}
	}
	var errs []error
	if prev != nil {
		errs = b.removeV6Leftovers(*prev, p.v6)
	} else if p.v6 != nil && !had {
		// First sight in this process: an earlier run may have reached the peer's IPv6 subnet
		// through the other device (the peer or we gained or lost an IPv6 underlay meanwhile).
		// The route was replaced above; a neighbour entry there would linger.
		for _, path := range []v6Path{v6OverIPv4, v6OwnVTEP, v6Direct} {
			if path != p.v6.path {
				other := *p.v6
				other.path = path
				errs = append(errs, b.removeV6Leftovers(other, p.v6)...)
			}
		}
	}
	return errors.Join(errs...)
}

// replaceOnlinkV6 routes an IPv6 subnet via its subnet address onlink on dev. The kernel
// refuses (EINVAL) to replace a route whose onlink gateway another device's route covers, and
// the subnet's own route on another device (the peer's IPv6 path changed) always does: then
// that route goes first, and packets to the subnet are dropped for the moment in between.
func (b *Backend) replaceOnlinkV6(dev int, subnet netip.Prefix) error {
	err := b.nl.RouteReplace(onlinkRoute(dev, subnet))
	if !errors.Is(err, unix.EINVAL) {
		return err
	}
	for _, path := range []v6Path{v6OverIPv4, v6OwnVTEP, v6Direct} {
		if b.v6NeighDev(path) != dev {
			if derrs := b.deleteV6Route(subnet, path); len(derrs) > 0 {
				return errors.Join(append(derrs, err)...)
			}
		}
	}
	return b.nl.RouteReplace(onlinkRoute(dev, subnet))
}

// removeV6Leftovers removes what prev programmed that now (nil: nothing) does not replace: the
// route when the subnet changed, the neighbour entry when its device or address changed, the
// fdb entry on xnet-v6.<VNI> when its MAC changed or it is no longer used.
func (b *Backend) removeV6Leftovers(prev peerV6, now *peerV6) []error {
	var errs []error
	if now == nil || now.subnet != prev.subnet {
		errs = append(errs, b.deleteV6Route(prev.subnet, prev.path)...)
	}
	if dev := b.v6NeighDev(prev.path); dev != 0 && (now == nil || b.v6NeighDev(now.path) != dev || now.subnet.Addr() != prev.subnet.Addr()) {
		if err := backend.IgnoreMissing(b.nl.NeighDel(neighEntry(dev, prev.subnet.Addr(), prev.mac))); err != nil {
			errs = append(errs, fmt.Errorf("neigh del %v: %w", prev.subnet.Addr(), err))
		}
	}
	if prev.path == v6OwnVTEP && b.dev6 != 0 && prev.mac != nil && prev.publicIPv6.IsValid() && (now == nil || now.path != v6OwnVTEP || now.mac.String() != prev.mac.String()) {
		if err := backend.IgnoreMissing(b.nl.NeighDel(fdbEntry(b.dev6, prev.publicIPv6, prev.mac))); err != nil {
			errs = append(errs, fmt.Errorf("fdb del %v dst %v: %w", prev.mac, prev.publicIPv6, err))
		}
	}
	return errs
}

// v6NeighDev is the device holding the neighbour entry of a path (0: none).
func (b *Backend) v6NeighDev(path v6Path) int {
	switch path {
	case v6OwnVTEP:
		return b.dev6
	case v6OverIPv4:
		return b.dev
	}
	return 0
}

// deleteV6Route deletes the route to an IPv6 subnet that path made.
func (b *Backend) deleteV6Route(subnet netip.Prefix, path v6Path) []error {
	switch path {
	case v6Direct:
		if err := b.direct.DeleteRoute(subnet); err != nil {
			return []error{err}
		}
	case v6OwnVTEP, v6OverIPv4:
		dev := b.v6NeighDev(path)
		if dev == 0 {
			return nil
		}
		if err := backend.IgnoreMissing(b.nl.RouteDel(onlinkRoute(dev, subnet))); err != nil {
			return []error{fmt.Errorf("route del %v: %w", subnet, err)}
		}
	}
	return nil
}

// RemovePeer deletes what AddPeer programmed for the lease's subnets. Entries already gone are
// not an error. It works after a restart too: the VTEP MACs come from what this process
// programmed, else from the lease, else from the neighbour entries on the devices.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("vxlan: RemovePeer(%v) before Setup", lease.ID())
	}
	if b.ipv6Only {
		return b.removePeerIPv6Only(lease)
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
			p.mac = b.neighMAC(b.dev, subnet.Addr())
		}
		p.v6 = b.removedV6(lease, p)
	}
	var errs []error
	if err := backend.IgnoreMissing(b.nl.RouteDel(onlinkRoute(b.dev, subnet))); err != nil {
		errs = append(errs, fmt.Errorf("route del %v: %w", subnet, err))
	}
	// The direct route, whether this process made it or an earlier one did.
	if err := b.direct.DeleteRoute(subnet); err != nil {
		errs = append(errs, err)
	}
	if err := backend.IgnoreMissing(b.nl.NeighDel(neighEntry(b.dev, subnet.Addr(), p.mac))); err != nil {
		errs = append(errs, fmt.Errorf("neigh del %v: %w", subnet.Addr(), err))
	}
	if p.mac != nil && p.publicIP.IsValid() {
		if err := backend.IgnoreMissing(b.nl.NeighDel(fdbEntry(b.dev, p.publicIP, p.mac))); err != nil {
			errs = append(errs, fmt.Errorf("fdb del %v dst %v: %w", p.mac, p.publicIP, err))
		}
	}
	if v := p.v6; v != nil {
		// Wherever this or an earlier process put them: every path's entries go.
		for _, path := range []v6Path{v6OverIPv4, v6OwnVTEP, v6Direct} {
			prev := *v
			prev.path = path
			if path == v6OverIPv4 {
				prev.mac = p.mac
			}
			errs = append(errs, b.removeV6Leftovers(prev, nil)...)
		}
	}
	delete(b.peers, subnet)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vxlan: remove peer %v: %w", subnet, err)
	}
	b.Log.Debug("peer removed", "subnet", subnet, "public_ip", p.publicIP)
	return nil
}

// removedV6 is what a removal event's lease says of the peer's IPv6 half, for a peer this
// process did not program: its IPv6 subnet and the MAC of its IPv6 VTEP (from the lease, else
// from the neighbour entry on xnet-v6.<VNI>).
func (b *Backend) removedV6(lease subnetmgr.Lease, p peer) *peerV6 {
	if !lease.IPv6Subnet.IsValid() || !lease.IPv6Subnet.Addr().Is6() {
		return nil
	}
	v := &peerV6{subnet: lease.IPv6Subnet.Masked(), publicIPv6: lease.PublicIPv6}
	if pv, ok, err := backend.ParseVXLANPeerV6(lease, backend.VXLANPeer{VtepMAC: p.mac}); err == nil && ok && pv.OwnVTEP {
		v.mac = pv.VtepMAC
	} else if b.dev6 != 0 {
		v.mac = b.neighMAC(b.dev6, v.subnet.Addr())
	}
	return v
}

// PrunePeers removes the per-peer entries on our devices that no lease in keep accounts for
// (backend.PeerPruner): the devices outlive xnetd, so a restarted daemon inherits the route,
// neighbour and fdb entry of every lease deleted while it was down, and no removal event will
// ever name them. Routes and neighbours go by subnet (IPv4 and IPv6, each against the overlay
// network of its family), fdb entries by VTEP MAC. Our own subnets and the devices' addresses
// are never touched.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return errors.New("vxlan: PrunePeers before Setup")
	}
	kept := backend.KeptFor(b.Local(), keep)
	nets := b.Networks()
	keepMACs, keepMACs6 := map[string]bool{}, map[string]bool{}
	for _, l := range keep {
		if b.ipv6Only {
			if v, err := backend.ParseVXLANPeerIPv6Only(l); err == nil {
				keepMACs6[v.VtepMAC.String()] = true
			}
			continue
		}
		// No logger: AddPeer has already warned about anything odd in these leases.
		p, err := backend.ParseVXLANPeer(l, b.VNI, nil)
		if err != nil {
			continue
		}
		keepMACs[p.VtepMAC.String()] = true
		if v, ok, err := backend.ParseVXLANPeerV6(l, p); err == nil && ok && v.OwnVTEP {
			keepMACs6[v.VtepMAC.String()] = true
		}
	}
	var errs []error
	var routes, neighs, fdb []string
	devs := []struct {
		index    int
		name     string
		keepMACs map[string]bool
	}{{b.dev, DeviceName(b.VNI), keepMACs}}
	if b.dev == 0 { // IPv6 only: there is no xnet.<VNI>
		devs = devs[:0]
	}
	if b.dev6 != 0 {
		devs = append(devs, struct {
			index    int
			name     string
			keepMACs map[string]bool
		}{b.dev6, DeviceNameV6(b.VNI), keepMACs6})
	}
	for _, dev := range devs {
		// Peer routes have a gateway (the peer's subnet address, onlink); the device's own do
		// not. A dump interrupted by a concurrent change is still a list of entries that
		// existed: deleting the unkept ones among them is right, and the next start catches
		// the rest.
		gone, err := backend.DeleteRoutesWhere(b.nl, dev.index, func(dst netip.Prefix, gw netip.Addr) bool {
			return gw.IsValid() && kept.Stale(backend.NetworkOf(dst, nets...), dst)
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", dev.name, err))
		}
		for _, r := range gone {
			routes = append(routes, r.String()+" dev "+dev.name)
		}
		for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
			ns, err := b.nl.NeighList(dev.index, family)
			if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
				errs = append(errs, fmt.Errorf("list neighbours on %s: %w", dev.name, err))
			}
			for _, n := range ns {
				ip, ok := netip.AddrFromSlice(n.IP)
				ip = ip.Unmap()
				if !ok || n.State&netlink.NUD_PERMANENT == 0 || kept.HasSubnetAddr(ip) ||
					!kept.Stale(backend.NetworkOf(netip.PrefixFrom(ip, ip.BitLen()), nets...), netip.PrefixFrom(ip, ip.BitLen())) {
					continue
				}
				if err := backend.IgnoreMissing(b.nl.NeighDel(&n)); err != nil {
					errs = append(errs, fmt.Errorf("neigh del %v: %w", ip, err))
					continue
				}
				neighs = append(neighs, ip.String()+" dev "+dev.name)
			}
		}
		fs, err := b.nl.NeighList(dev.index, unix.AF_BRIDGE)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			errs = append(errs, fmt.Errorf("list fdb of %s: %w", dev.name, err))
		}
		for _, f := range fs {
			dst, ok := netip.AddrFromSlice(f.IP)
			// Only unicast MACs with a destination are peer entries.
			if !ok || len(f.HardwareAddr) != 6 || f.HardwareAddr[0]&1 == 1 || dev.keepMACs[f.HardwareAddr.String()] {
				continue
			}
			if err := backend.IgnoreMissing(b.nl.NeighDel(fdbEntry(dev.index, dst.Unmap(), f.HardwareAddr))); err != nil {
				errs = append(errs, fmt.Errorf("fdb del %v dst %v: %w", f.HardwareAddr, dst, err))
				continue
			}
			fdb = append(fdb, f.HardwareAddr.String()+" dst "+dst.Unmap().String()+" dev "+dev.name)
		}
	}
	direct, err := b.direct.PruneRoutes(kept, nets...)
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

// Close releases the netlink socket. With teardown it also deletes the devices, which takes
// their addresses, routes, neighbours and fdb entries with them, and the direct routes; without,
// the datapath keeps forwarding for a restarted daemon to adopt.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return nil // closed already
	}
	var err error
	if teardown {
		err = errors.Join(b.deleteDevice(DeviceName(b.VNI)), b.deleteDevice(DeviceNameV6(b.VNI)))
		if b.HasNetwork() {
			_, derr := b.direct.DeleteRoutesInside(b.Networks()...)
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

// onlinkRoute is "<subnet> via <subnet addr> dev <dev> onlink", IPv4 or IPv6.
func onlinkRoute(dev int, subnet netip.Prefix) *netlink.Route {
	r := &netlink.Route{
		LinkIndex: dev,
		Scope:     netlink.SCOPE_UNIVERSE,
		Dst:       backend.IPNet(subnet),
		Gw:        net.IP(subnet.Addr().AsSlice()),
	}
	r.SetFlag(netlink.FLAG_ONLINK)
	return r
}

// neighEntry is the permanent ARP (or NDP) entry for a peer's gateway address on dev.
func neighEntry(dev int, ip netip.Addr, mac net.HardwareAddr) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    dev,
		State:        netlink.NUD_PERMANENT,
		Type:         unix.RTN_UNICAST,
		IP:           net.IP(ip.AsSlice()),
		HardwareAddr: mac,
	}
}

// fdbEntry maps a peer's VTEP MAC to its underlay address on dev.
func fdbEntry(dev int, dst netip.Addr, mac net.HardwareAddr) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    dev,
		State:        netlink.NUD_PERMANENT,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		IP:           net.IP(dst.AsSlice()),
		HardwareAddr: mac,
	}
}

// neighMAC looks up the MAC of a neighbour on device dev, nil if there is none.
func (b *Backend) neighMAC(dev int, ip netip.Addr) net.HardwareAddr {
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	neighs, err := b.nl.NeighList(dev, family)
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
	_ backend.DualStack  = (*Backend)(nil)
)
