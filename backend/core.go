package backend

import (
	"context"
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

	local   subnetmgr.Lease
	network netip.Prefix
}

// NewBase checks what every backend needs of the underlay (a resolved interface and an IPv4
// PublicIP) and returns the Base for the backend called name.
func NewBase(name string, opts Options) (Base, error) {
	if opts.Iface.Index <= 0 || opts.Iface.Name == "" {
		return Base{}, fmt.Errorf("%s: external interface not resolved (name %q, index %d): pass --iface", name, opts.Iface.Name, opts.Iface.Index)
	}
	if !opts.Iface.PublicIP.Is4() {
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

// SetLocal records our lease (its subnet masked) and the overlay Network after Setup.
func (b *Base) SetLocal(local subnetmgr.Lease, network netip.Prefix) {
	local.Subnet = local.Subnet.Masked()
	b.local, b.network = local, network
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

// IsOwnLease is Base.IsOwn for callers without a Base (the daemon's lease bookkeeping).
func IsOwnLease(local subnetmgr.Lease, publicIP netip.Addr, lease subnetmgr.Lease) bool {
	return (local.Subnet.IsValid() && lease.Subnet.Masked() == local.Subnet.Masked()) ||
		lease.PublicIP == publicIP
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

// VtepMAC derives a host's VTEP MAC from its PublicIP: locally administered, unicast, and
// stable across restarts, so a restarted host keeps the MAC its peers have programmed.
func VtepMAC(publicIP netip.Addr) net.HardwareAddr {
	ip := publicIP.As4()
	return net.HardwareAddr{0x0e, 0x78, ip[0], ip[1], ip[2], ip[3]}
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
	return VXLAN{Base: base, VNI: opts.Config.Backend.VNI, Port: opts.Config.Backend.Port, VtepMAC: VtepMAC(opts.Iface.PublicIP)}, nil
}

// LeaseAttrs publishes BackendType "vxlan" with our VNI and VTEP MAC: on the wire every
// VXLAN-speaking backend is a kernel VXLAN device, as flannel's vxlan backend publishes it.
func (v *VXLAN) LeaseAttrs() (string, json.RawMessage, error) {
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
