package backend

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// Base is what every backend knows and checks the same way: its name, the underlay interface,
// its logger and, once Setup ran, our lease and the overlay Network. Backends embed it and
// guard the lease fields with their own mutex (SetLocal is called under it).
type Base struct {
	name  string
	Iface ExternalInterface
	Log   *slog.Logger

	local    subnetmgr.Lease
	network  netip.Prefix
	network6 netip.Prefix
}

// NewBase checks what every backend needs of the underlay (a resolved interface and an IPv4
// PublicIP) and returns the Base for the backend called name. In an IPv6-only overlay a host
// may have no IPv4 address at all: a PublicIPv6 then does instead (PublicIP stays the zero
// Addr, which no lease carries, so IsOwn does not take a peer's 0.0.0.0 for ours).
func NewBase(name string, opts Options) (Base, error) {
	if opts.Iface.Index <= 0 || opts.Iface.Name == "" {
		return Base{}, fmt.Errorf("%s: external interface not resolved (name %q, index %d): pass --iface", name, opts.Iface.Name, opts.Iface.Index)
	}
	ipv6Only := opts.Config.IPv6Only() && !opts.Iface.PublicIP.IsValid() && opts.Iface.PublicIPv6.Is6()
	if !opts.Iface.PublicIP.Is4() && !ipv6Only {
		return Base{}, fmt.Errorf("%s: PublicIP %v is not an IPv4 address: set --public-ip", name, opts.Iface.PublicIP)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return Base{name: name, Iface: opts.Iface, Log: log.With("backend", name)}, nil
}

// Name is the backend's config name ("ebpf", "vxlan", ...), the prefix of its errors.
func (b *Base) Name() string { return b.name }

// CheckSetup is the precondition of every Setup: our lease has an IPv4 subnet, the config a
// Network, and ctx is still live.
func (b *Base) CheckSetup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if !local.Subnet.IsValid() || !local.Subnet.Addr().Is4() {
		return fmt.Errorf("%s: our lease has no IPv4 subnet (%v)", b.name, local.Subnet)
	}
	if !cfg.Network.IsValid() {
		return fmt.Errorf("%s: config has no Network", b.name)
	}
	return ctx.Err()
}

// CheckSetupIPv6Only is CheckSetup for an IPv6-only overlay (cfg.IPv6Only), which only the
// backends that carry one call: our lease has an IPv6 subnet inside the IPv6Network and no
// IPv4 one, and ctx is still live.
func (b *Base) CheckSetupIPv6Only(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if !cfg.IPv6Only() {
		return fmt.Errorf("%s: the config is not IPv6 only", b.name)
	}
	if local.Subnet.IsValid() || !local.IPv6Subnet.IsValid() {
		return fmt.Errorf("%s: in an IPv6-only overlay our lease must hold an IPv6 subnet and no IPv4 one (has %v, %v)", b.name, local.Subnet, local.IPv6Subnet)
	}
	if !cfg.IPv6Network.IsValid() {
		return fmt.Errorf("%s: config has no IPv6Network", b.name)
	}
	if err := b.CheckSetupV6(local, cfg); err != nil {
		return err
	}
	return ctx.Err()
}

// IPv6Only says whether our lease, as Setup recorded it, is IPv6 only (no IPv4 subnet).
func (b *Base) IPv6Only() bool { return !b.local.Subnet.IsValid() && b.local.IPv6Subnet.IsValid() }

// HasNetwork says whether Setup recorded an overlay network of either family: routes strictly
// inside one are ours to tear down and prune.
func (b *Base) HasNetwork() bool { return b.network.IsValid() || b.network6.IsValid() }

// SetLocal records our lease (its subnets masked) and the overlay Network after Setup.
func (b *Base) SetLocal(local subnetmgr.Lease, network netip.Prefix) {
	local.Subnet = local.Subnet.Masked()
	if local.IPv6Subnet.IsValid() {
		local.IPv6Subnet = local.IPv6Subnet.Masked()
	}
	b.local, b.network = local, network
}

// SetIPv6Network records the overlay's IPv6Network after a dual-stack Setup.
func (b *Base) SetIPv6Network(network6 netip.Prefix) { b.network6 = network6 }

// IPv6Network is the overlay's IPv6Network as Setup recorded it (invalid unless dual stack).
func (b *Base) IPv6Network() netip.Prefix { return b.network6 }

// DualStack says whether our lease, as Setup recorded it, has an IPv6 subnet: the overlay
// carries IPv6 and peers' IPv6 subnets are programmed.
func (b *Base) DualStack() bool { return b.local.IPv6Subnet.IsValid() }

// Networks are the overlay's IPv4 Network and IPv6Network (invalid unless dual stack), for
// NetworkOf.
func (b *Base) Networks() []netip.Prefix { return []netip.Prefix{b.network, b.network6} }

// CheckSetupV6 is the dual-stack part of Setup's precondition: when our lease has an IPv6
// subnet it is IPv6 and, when the config names an IPv6Network, inside it.
func (b *Base) CheckSetupV6(local subnetmgr.Lease, cfg subnetmgr.Config) error {
	s := local.IPv6Subnet
	if !s.IsValid() {
		return nil
	}
	if !s.Addr().Is6() || s.Addr().Is4In6() {
		return fmt.Errorf("%s: our lease's IPv6 subnet %v is not IPv6", b.name, s)
	}
	if cfg.IPv6Network.IsValid() && (!cfg.IPv6Network.Contains(s.Addr()) || s.Bits() < cfg.IPv6Network.Bits()) {
		return fmt.Errorf("%s: our lease's IPv6 subnet %v is not inside IPv6Network %v", b.name, s, cfg.IPv6Network)
	}
	return nil
}

// Local is our lease as Setup recorded it (zero before Setup).
func (b *Base) Local() subnetmgr.Lease { return b.local }

// Network is the overlay Network as Setup recorded it (invalid before Setup).
func (b *Base) Network() netip.Prefix { return b.network }

// IsOwn reports whether lease is ours: our subnet, or an older lease of this host (our
// PublicIP under another subnet) that has not expired yet. Programming the latter as a peer
// would send packets back to ourselves.
func (b *Base) IsOwn(lease subnetmgr.Lease) bool {
	return IsOwnLease(b.local, b.Iface.PublicIP, lease)
}

// IsOwnLease is Base.IsOwn for callers without a Base (the daemon's lease bookkeeping). Leases
// are compared by ID (the IPv6 subnet of an IPv6-only lease); an IPv6-only lease, whose
// PublicIP is 0.0.0.0, is ours when it names our PublicIPv6.
func IsOwnLease(local subnetmgr.Lease, publicIP netip.Addr, lease subnetmgr.Lease) bool {
	if id := local.ID(); id.IsValid() && lease.ID().Masked() == id.Masked() {
		return true
	}
	return lease.PublicIP == publicIP ||
		!lease.Subnet.IsValid() && local.PublicIPv6.IsValid() && lease.PublicIPv6 == local.PublicIPv6
}

// RemovedSubnet is the subnet a RemovePeer call is about, or an error naming the backend when
// the lease has none; own is true for our own lease, which RemovePeer leaves alone.
func (b *Base) RemovedSubnet(lease subnetmgr.Lease) (subnet netip.Prefix, own bool, err error) {
	if !lease.Subnet.IsValid() || !lease.Subnet.Addr().Is4() {
		return netip.Prefix{}, false, fmt.Errorf("%s: RemovePeer: lease has no IPv4 subnet (%v)", b.name, lease.Subnet)
	}
	return lease.Subnet.Masked(), b.IsOwn(lease), nil
}

// VXLANOverhead is what VXLAN adds to every packet: outer IPv4 (20) + UDP (8) + VXLAN (8) +
// inner Ethernet (14).
const VXLANOverhead = 50

// OverlayMTU is the MTU of the overlay for an underlay MTU.
func OverlayMTU(underlayMTU int) int { return underlayMTU - VXLANOverhead }

// VXLANOverheadV6 is VXLANOverhead over an IPv6 underlay: the outer IPv6 header is 40 bytes,
// not 20 (flannel's IPv6 vxlan device is 70 below the underlay MTU).
const VXLANOverheadV6 = 70

// OverlayMTUv6 is the MTU of a VXLAN device on an IPv6 underlay.
func OverlayMTUv6(underlayMTU int) int { return underlayMTU - VXLANOverheadV6 }

// VtepMAC derives a host's VTEP MAC from its PublicIP: locally administered, unicast, and
// stable across restarts, so a restarted host keeps the MAC its peers have programmed.
func VtepMAC(publicIP netip.Addr) net.HardwareAddr {
	ip := publicIP.As4()
	return net.HardwareAddr{0x0e, 0x78, ip[0], ip[1], ip[2], ip[3]}
}

// VtepMACv6 derives the MAC of a host's IPv6 VTEP (the vxlan backend's xnet-v6.<VNI>, on an
// IPv6 underlay) from its PublicIPv6, for the same reason as VtepMAC: a host that comes back
// keeps the MAC its peers have programmed. An IPv6 address does not fit in a MAC, so it is a
// hash: locally administered and unicast (0x0a, never VtepMAC's 0x0e), then 5 bytes of the
// SHA-256 of the address. It must differ from the IPv4 VTEP's MAC: that difference is how a
// peer tells an IPv6 VTEP from one that carries IPv6 over IPv4 (ParseVXLANPeerV6).
func VtepMACv6(publicIPv6 netip.Addr) net.HardwareAddr {
	ip := publicIPv6.As16()
	sum := sha256.Sum256(ip[:])
	return net.HardwareAddr{0x0a, sum[0], sum[1], sum[2], sum[3], sum[4]}
}

// VXLAN is the core every VXLAN-speaking backend (ebpf, vxlan, udp) embeds: Base plus the
// VNI and port the config settled (subnetmgr.ParseConfig is the only place that defaults and
// validates them), our VTEP MAC, what we publish in our lease, the overlay MTU and the one
// step that turns a lease into a peer.
type VXLAN struct {
	Base
	VNI     int
	Port    int
	VtepMAC net.HardwareAddr
}

// NewVXLAN checks the underlay has room for the VXLAN headers and returns the core for the
// backend called name.
func NewVXLAN(name string, opts Options) (VXLAN, error) {
	base, err := NewBase(name, opts)
	if err != nil {
		return VXLAN{}, err
	}
	if opts.Iface.MTU <= VXLANOverhead {
		return VXLAN{}, fmt.Errorf("%s: interface %s MTU %d leaves no room for the %d-byte VXLAN overhead", name, opts.Iface.Name, opts.Iface.MTU, VXLANOverhead)
	}
	v := VXLAN{Base: base, VNI: opts.Config.Backend.VNI, Port: opts.Config.Backend.Port}
	if opts.Iface.PublicIP.Is4() { // else an IPv6-only host without IPv4 (NewBase): no IPv4 VTEP
		v.VtepMAC = VtepMAC(opts.Iface.PublicIP)
	}
	return v, nil
}

// LeaseAttrs publishes BackendType "vxlan" with our VNI and VTEP MAC: on the wire every
// VXLAN-speaking backend is a kernel VXLAN device, as flannel's vxlan backend publishes it.
func (v *VXLAN) LeaseAttrs() (string, json.RawMessage, error) {
	if !v.Iface.PublicIP.Is4() {
		// An IPv6-only host without IPv4 (NewBase): an IPv6-only lease has no BackendData.
		return subnetmgr.BackendVXLAN, nil, nil
	}
	data, err := VXLANLeaseData(v.VNI, v.Iface.PublicIP)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", v.name, err)
	}
	return subnetmgr.BackendVXLAN, data, nil
}

// VXLANLeaseData is the BackendData a VXLAN-speaking host at publicIP publishes for vni.
func VXLANLeaseData(vni int, publicIP netip.Addr) (json.RawMessage, error) {
	b, err := json.Marshal(subnetmgr.VXLANData{VNI: vni, VtepMAC: VtepMAC(publicIP).String()})
	if err != nil {
		return nil, fmt.Errorf("encode vxlan backend data: %w", err)
	}
	return b, nil
}

// MTU is the underlay MTU minus the VXLAN overhead (Docker's --mtu).
func (v *VXLAN) MTU() int { return OverlayMTU(v.Iface.MTU) }

// ErrIncompatiblePeer marks a peer lease a VXLAN-speaking backend cannot program: not
// BackendType "vxlan", BackendData malformed, or not IPv4. The daemon logs it and moves on.
var ErrIncompatiblePeer = errors.New("peer lease cannot be programmed")

// VXLANPeer is what every VXLAN-speaking backend needs from a peer's lease.
type VXLANPeer struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
	VtepMAC  net.HardwareAddr
	VNI      int // as published
}

// Peer is the one step from a lease to a peer: own is true (and nothing else set) for our own
// lease, which backends ignore; otherwise the lease is parsed by ParseVXLANPeer's rules, and a
// lease that fails them is logged here and returned as an error wrapping ErrIncompatiblePeer.
func (v *VXLAN) Peer(lease subnetmgr.Lease) (p VXLANPeer, own bool, err error) {
	if v.IsOwn(lease) {
		return VXLANPeer{}, true, nil
	}
	p, err = ParseVXLANPeer(lease, v.VNI, v.Log)
	if err != nil {
		v.Log.Warn("skipping peer lease", "subnet", lease.Subnet, "public_ip", lease.PublicIP, "err", err)
		return VXLANPeer{}, false, fmt.Errorf("%s: %w", v.name, err)
	}
	return p, false, nil
}

// ParseVXLANPeer checks a lease is one a VXLAN-speaking backend can send to and extracts what the
// datapath needs. Errors wrap ErrIncompatiblePeer and name the lease. A peer publishing another
// VNI than ourVNI is accepted with a warning (when log is set), as flannel does: it will drop
// what we send, and we what it sends.
func ParseVXLANPeer(lease subnetmgr.Lease, ourVNI int, log *slog.Logger) (VXLANPeer, error) {
	bad := func(format string, args ...any) (VXLANPeer, error) {
		return VXLANPeer{}, fmt.Errorf("lease %v (PublicIP %v): %s: %w", lease.Subnet, lease.PublicIP, fmt.Sprintf(format, args...), ErrIncompatiblePeer)
	}
	if !lease.Subnet.IsValid() || !lease.Subnet.Addr().Is4() {
		return bad("subnet is not IPv4")
	}
	if !lease.PublicIP.Is4() {
		return bad("PublicIP is not IPv4")
	}
	if lease.BackendType != subnetmgr.BackendVXLAN {
		return bad("BackendType %q is not %q", lease.BackendType, subnetmgr.BackendVXLAN)
	}
	data, err := subnetmgr.ParseVXLANData(lease.BackendData)
	if err != nil {
		return bad("%v", err)
	}
	mac, err := net.ParseMAC(data.VtepMAC)
	if err != nil || len(mac) != 6 {
		return bad("BackendData VtepMAC %q is not an Ethernet MAC", data.VtepMAC)
	}
	if mac[0]&1 == 1 {
		return bad("BackendData VtepMAC %q is a multicast MAC", data.VtepMAC)
	}
	if data.VNI != ourVNI && log != nil {
		log.Warn("peer publishes another VNI; its traffic will not match ours", "subnet", lease.Subnet, "peer_vni", data.VNI, "our_vni", ourVNI)
	}
	return VXLANPeer{Subnet: lease.Subnet.Masked(), PublicIP: lease.PublicIP, VtepMAC: mac, VNI: data.VNI}, nil
}

// VXLANPeerV6 is how a VXLAN-speaking backend reaches a dual-stack peer's IPv6 subnet.
//
// The rule, one for every VXLAN-speaking backend: a peer that publishes a PublicIPv6 and, as
// BackendV6Data, a VTEP MAC other than its IPv4 VTEP's has a VTEP of its own on its IPv6
// underlay (flannel's flannel-v6.<VNI>, the vxlan backend's xnet-v6.<VNI>): OwnVTEP, and
// VtepMAC is that VTEP's. Every other dual-stack peer (no PublicIPv6, no or malformed
// BackendV6Data, or BackendV6Data that repeats BackendData, as the udp backend and a vxlan host
// without an IPv6 underlay publish it) receives its IPv6 traffic on its IPv4 VTEP: inner IPv6
// in the same VXLAN over IPv4 as its IPv4 traffic, VtepMAC its IPv4 VTEP's. The MAC, not the
// PublicIPv6 alone, decides, because whether a host publishes a PublicIPv6 is the daemon's
// business and says nothing about where its datapath listens.
type VXLANPeerV6 struct {
	Subnet     netip.Prefix // the peer's IPv6 subnet, masked
	PublicIPv6 netip.Addr   // as published (may be invalid)
	VtepMAC    net.HardwareAddr
	OwnVTEP    bool
}

// ParseVXLANPeerV6 reads the IPv6 half of a lease whose IPv4 half parsed as v4. ok is false for
// a peer without an IPv6 subnet (an IPv4-only peer); an IPv6 subnet that is not IPv6 is an
// error wrapping ErrIncompatiblePeer.
func ParseVXLANPeerV6(lease subnetmgr.Lease, v4 VXLANPeer) (p VXLANPeerV6, ok bool, err error) {
	s := lease.IPv6Subnet
	if !s.IsValid() {
		return VXLANPeerV6{}, false, nil
	}
	if !s.Addr().Is6() || s.Addr().Is4In6() {
		return VXLANPeerV6{}, false, fmt.Errorf("lease %v (PublicIP %v): IPv6 subnet %v is not IPv6: %w", lease.Subnet, lease.PublicIP, s, ErrIncompatiblePeer)
	}
	p = VXLANPeerV6{Subnet: s.Masked(), PublicIPv6: lease.PublicIPv6, VtepMAC: v4.VtepMAC}
	if !lease.PublicIPv6.Is6() || lease.PublicIPv6.Is4In6() {
		return p, true, nil
	}
	data, err := subnetmgr.ParseVXLANData(lease.BackendV6Data)
	if err != nil {
		return p, true, nil
	}
	mac, err := net.ParseMAC(data.VtepMAC)
	if err != nil || len(mac) != 6 || mac[0]&1 == 1 || mac.String() == v4.VtepMAC.String() {
		return p, true, nil
	}
	p.VtepMAC, p.OwnVTEP = mac, true
	return p, true, nil
}

// ParseVXLANPeerIPv6Only reads the lease of a peer in an IPv6-only overlay, as flannel's vxlan
// backend publishes it there: an IPv6 subnet, a PublicIPv6 and, as BackendV6Data, the VNI and
// MAC of its IPv6 VTEP (OwnVTEP is true). Errors wrap ErrIncompatiblePeer and name the lease.
func ParseVXLANPeerIPv6Only(lease subnetmgr.Lease) (VXLANPeerV6, error) {
	bad := func(format string, args ...any) (VXLANPeerV6, error) {
		return VXLANPeerV6{}, fmt.Errorf("lease %v (PublicIPv6 %v): %s: %w", lease.ID(), lease.PublicIPv6, fmt.Sprintf(format, args...), ErrIncompatiblePeer)
	}
	s := lease.IPv6Subnet
	switch {
	case !s.IsValid() || !s.Addr().Is6() || s.Addr().Is4In6():
		return bad("no IPv6 subnet")
	case !lease.PublicIPv6.Is6() || lease.PublicIPv6.Is4In6():
		return bad("PublicIPv6 is not IPv6")
	case lease.BackendType != subnetmgr.BackendVXLAN:
		return bad("BackendType %q is not %q", lease.BackendType, subnetmgr.BackendVXLAN)
	}
	data, err := subnetmgr.ParseVXLANData(lease.BackendV6Data)
	if err != nil {
		return bad("BackendV6Data: %v", err)
	}
	mac, err := net.ParseMAC(data.VtepMAC)
	if err != nil || len(mac) != 6 || mac[0]&1 == 1 {
		return bad("BackendV6Data VtepMAC %q is not a unicast Ethernet MAC", data.VtepMAC)
	}
	return VXLANPeerV6{Subnet: s.Masked(), PublicIPv6: lease.PublicIPv6, VtepMAC: mac, OwnVTEP: true}, nil
}

// VXLANLeaseDataV6 is the BackendV6Data a VXLAN-speaking host publishes: with an IPv6 VTEP of
// its own (ownVTEP, at publicIPv6), that VTEP's MAC; otherwise its IPv4 VTEP's BackendData, so
// that peers send its IPv6 traffic there (VXLANPeerV6).
func VXLANLeaseDataV6(vni int, publicIP, publicIPv6 netip.Addr, ownVTEP bool) (json.RawMessage, error) {
	if !ownVTEP {
		return VXLANLeaseData(vni, publicIP)
	}
	b, err := json.Marshal(subnetmgr.VXLANData{VNI: vni, VtepMAC: VtepMACv6(publicIPv6).String()})
	if err != nil {
		return nil, fmt.Errorf("encode vxlan IPv6 backend data: %w", err)
	}
	return b, nil
}
