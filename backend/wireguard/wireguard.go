// Package wireguard is xnet's encrypting backend: container traffic between hosts travels as
// WireGuard, exactly as flannel's wireguard backend sends it and publishes it in etcd, so a
// flannel host and an xnet host with Backend.Type "wireguard" on one etcd reach each other's
// containers. It runs on the kernel's WireGuard where the kernel has it, and otherwise on
// wireguard-go embedded in xnetd; Mode says which and why.
//
// It owns the device xnet-wg (its address, MTU and the routes on it), the host's private key
// (KeyFile in the state directory) and the device's peers. It does not own leases (package
// subnetmgr), the config's defaults and checks (subnetmgr.ParseConfig), masquerading or the
// underlay NIC.
//
// Design history (why it looks like this):
//
//   - The lease is flannel's: BackendType "wireguard", BackendData {"PublicKey":"<base64>",
//     "Port":<ListenPort>}; a peer is reached at its PublicIP and that Port (a lease without
//     Port, from flannel before v0.22, at our own ListenPort, as flannel reads it). The config
//     fields are flannel's too (ListenPort, PSK, PersistentKeepaliveInterval, MTU, Mode), and
//     so is the overlay MTU: the underlay's (or Backend.MTU) minus 80.
//   - A peer's AllowedIPs are exactly the subnets of its leases (normally one). WireGuard
//     delivers a decrypted packet only when its source is in the sender's AllowedIPs, so this
//     cryptokey routing is the anti-spoofing check the VXLAN backends do by hand: a peer can
//     send only as its own containers. Peers are WireGuard public keys, so two leases with one
//     key (a host's old lease that has not expired yet) are one peer with both subnets.
//   - Routes: the whole Network into xnet-wg, as flannel does, so a packet for a subnet no
//     peer holds (a removed peer, a lease not seen yet) is dropped by WireGuard instead of
//     leaving by the default route unencrypted; and one route per peer subnet, so `ip route`
//     shows which peers are programmed, as on the other backends, and so a restarted embedded
//     datapath (whose peers lived in the old process) still sees which subnets it served
//     until the lease list and PrunePeers settle them.
//   - The key is generated on the first Setup (New only reads it: constructors do not change
//     the host) and kept 0600 in flannel's format, so it survives restarts and the lease the
//     peers have programmed stays valid. A state directory on tmpfs (/run/xnet) loses it at
//     reboot, as flannel's /run/flannel/wgkey does; the new key reaches the peers through our
//     lease, whose change they apply like any other.
//   - Kernel WireGuard when the kernel has it (generic netlink family "wireguard", or an
//     installed module that creating the link loads); otherwise wireguard-go in xnetd, over
//     a TUN with TSO/USO offloads (IFF_VNET_HDR: the kernel hands over 64 KB TCP segments,
//     wireguard-go cuts, encrypts and sends them with UDP GSO, receives with UDP GRO and
//     coalesces again on the TUN) - the same mechanics that made the udp backend fast. The
//     kernel device keeps forwarding while xnetd restarts; the embedded one is the process,
//     so a restart drops packets for that moment (xnet-wg is a persistent TUN: the packets
//     are dropped, not leaked unencrypted).
//   - Everything the datapath opens (TUN fd, netlink sockets, wireguard-go's UDP sockets,
//     which its goroutines open whenever the device comes up) is opened in the namespace New
//     ran in: xnetd has only one, the tests run a backend per simulated host.
//   - Counters: wireguard-go counts only bytes on the wire per peer, so the embedded datapath
//     counts packets itself at the TUN (counters.go), per peer subnet and per verdict. The
//     kernel's device offers per-peer bytes only; Counters reports those.
package wireguard

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// DeviceName is the WireGuard device of this backend (flannel's is flannel-wg).
const DeviceName = "xnet-wg"

// Datapath is where WireGuard runs.
type Datapath string

const (
	// DatapathAuto is the kernel's WireGuard when the kernel has it, else the embedded one.
	DatapathAuto Datapath = ""
	// DatapathKernel is the kernel's WireGuard, configured with wgctrl.
	DatapathKernel Datapath = "kernel"
	// DatapathEmbedded is wireguard-go in xnetd, over a TUN device.
	DatapathEmbedded Datapath = "wireguard-go"
)

// Backend is the wireguard backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.Base
	wg      subnetmgr.WireGuardConfig
	psk     *wgtypes.Key
	mtu     int // the overlay's
	ns      netns.NsHandle
	nl      *netlink.Handle
	stats   *counters
	want    Datapath // as asked: auto, kernel or embedded
	kernel  bool     // the kernel has WireGuard
	kernWhy string

	mu       sync.Mutex
	key      hostKey
	datapath Datapath // what runs (or will run, before Setup)
	why      string
	setup    bool
	// listed is set by the first PrunePeers, which follows the first full lease list.
	listed  bool
	dev     wgDevice
	link    int                          // ifindex of xnet-wg once Setup ran
	peers   map[wgtypes.Key]*peer        // what AddPeer programmed, by public key
	subnets map[netip.Prefix]wgtypes.Key // which peer holds each programmed subnet
}

// peer is one WireGuard peer: a public key, where it listens, and its leases' subnets.
type peer struct {
	key      wgtypes.Key
	endpoint netip.AddrPort
	subnets  []netip.Prefix // sorted; its AllowedIPs
}

// New builds the backend: the kernel's WireGuard if the kernel has it, else the embedded one.
// It reads (or, for Setup to save, generates) the private key and captures the network
// namespace of the calling thread. It changes nothing on the host.
func New(opts backend.Options) (backend.Backend, error) {
	b, err := NewWithDatapath(opts, DatapathAuto)
	if err != nil {
		return nil, err // a nil interface, not a nil *Backend inside one
	}
	return b, nil
}

// NewWithDatapath is New with the datapath chosen by the caller (tests, benchmarks). A
// datapath the host cannot run is an error wrapping backend.ErrUnavailable.
func NewWithDatapath(opts backend.Options, want Datapath) (*Backend, error) {
	base, err := backend.NewBase(subnetmgr.BackendWireGuard, opts)
	if err != nil {
		return nil, err
	}
	wg := opts.Config.Backend.WireGuard
	underlay := opts.Iface.MTU
	if wg.MTU != 0 {
		underlay = wg.MTU
	}
	mtu := underlay - subnetmgr.WireGuardOverhead
	if mtu < 576 {
		return nil, fmt.Errorf("wireguard: MTU %d (of %s) leaves %d bytes for the overlay after WireGuard's %d, below IPv4's 576", underlay, opts.Iface.Name, mtu, subnetmgr.WireGuardOverhead)
	}
	var psk *wgtypes.Key
	if wg.PSK != "" {
		k, err := wgtypes.ParseKey(wg.PSK)
		if err != nil {
			return nil, fmt.Errorf("wireguard: config Backend.PSK: %w", err)
		}
		psk = &k
	}
	if opts.StateDir == "" {
		return nil, errors.New("wireguard: no state directory for the private key (backend.Options.StateDir)")
	}
	log := base.Log.With("device", DeviceName)
	key, err := loadKey(filepath.Join(opts.StateDir, KeyFile), log)
	if err != nil {
		return nil, fmt.Errorf("wireguard: %w", err)
	}

	// The namespace handle and the netlink socket come from one locked thread, so they are the
	// same namespace (as in package udp: no setns, which would need CAP_SYS_ADMIN).
	runtime.LockOSThread()
	ns, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("wireguard: open the network namespace of the calling thread: %w", err)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE, unix.NETLINK_GENERIC)
	runtime.UnlockOSThread()
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("wireguard: open netlink socket: %w", err)
	}
	b := &Backend{
		Base: base, wg: wg, psk: psk, mtu: mtu, ns: ns, nl: h, stats: newCounters(), want: want, key: key,
		peers: map[wgtypes.Key]*peer{}, subnets: map[netip.Prefix]wgtypes.Key{},
	}
	b.Log = log
	b.kernel, b.kernWhy = kernelWireGuard(h)
	if err := b.choose(); err != nil {
		b.closeHandles()
		return nil, err
	}
	return b, nil
}

// choose settles the datapath New reports in Mode (Setup may still fall back from the kernel).
func (b *Backend) choose() error {
	tunErr := tunAvailable()
	switch {
	case b.want == DatapathKernel && !b.kernel:
		return fmt.Errorf("wireguard: kernel datapath asked for, but %s: %w", b.kernWhy, backend.ErrUnavailable)
	case b.want == DatapathEmbedded && tunErr != nil:
		return fmt.Errorf("wireguard: embedded datapath asked for, but %v: %w", tunErr, backend.ErrUnavailable)
	case b.want == DatapathKernel || b.want == DatapathAuto && b.kernel:
		b.datapath, b.why = DatapathKernel, b.kernWhy
	case tunErr != nil:
		return fmt.Errorf("wireguard: neither kernel WireGuard (%s) nor wireguard-go (%v) can run here: %w", b.kernWhy, tunErr, backend.ErrUnavailable)
	case b.want == DatapathEmbedded:
		b.datapath, b.why = DatapathEmbedded, "wireguard-go in xnetd, as asked"
	default:
		b.datapath, b.why = DatapathEmbedded, "wireguard-go in xnetd: "+b.kernWhy
	}
	return nil
}

// Mode is "kernel" or "wireguard-go", and why.
func (b *Backend) Mode() (string, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	why := b.why
	if u, ok := b.dev.(*userDevice); ok {
		why += fmt.Sprintf(" (TUN offload %v)", u.offload)
	}
	return string(b.datapath), why
}

// LeaseAttrs publishes BackendType "wireguard" with our public key and listen port, as flannel
// does.
func (b *Backend) LeaseAttrs() (string, json.RawMessage, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	data, err := json.Marshal(subnetmgr.WireGuardData{PublicKey: b.key.public.String(), Port: uint16(b.wg.ListenPort)})
	if err != nil {
		return "", nil, fmt.Errorf("wireguard: encode backend data: %w", err)
	}
	return subnetmgr.BackendWireGuard, data, nil
}

// MTU is the underlay MTU (or Backend.MTU) minus WireGuard's 80 bytes, as flannel's.
func (b *Backend) MTU() int { return b.mtu }

// Setup saves a generated key, brings up xnet-wg (kernel or embedded) with our key and listen
// port, gives it our subnet's network address as a /32 and routes the Network into it. A
// second call only records a changed lease.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if err := b.CheckSetup(ctx, local, cfg); err != nil {
		return err
	}
	if b.wg.ListenPort == 0 {
		// Port 0 would listen anywhere and publish 0, which peers read as their own port.
		return errors.New("wireguard: config has no ListenPort: build it with subnetmgr.ParseConfig")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return errors.New("wireguard: Setup after Close")
	}
	local.Subnet = local.Subnet.Masked()
	if b.setup {
		changed := b.Local().Subnet != local.Subnet
		b.SetLocal(local, cfg.Network)
		if changed {
			return b.ensureAddress()
		}
		return nil
	}
	if err := b.key.save(); err != nil {
		return fmt.Errorf("wireguard: %w", err)
	}
	b.SetLocal(local, cfg.Network)
	if err := b.openDevice(); err != nil {
		return err
	}
	if err := b.configureLink(); err != nil {
		b.dev.close()
		b.dev = nil
		return err
	}
	b.setup = true
	b.Log.Info("wireguard datapath ready", "datapath", b.datapath, "public_key", b.key.public.String(),
		"listen_port", b.wg.ListenPort, "mtu", b.mtu, "psk", b.psk != nil, "keepalive", b.wg.PersistentKeepaliveInterval,
		"address", netip.PrefixFrom(local.Subnet.Addr(), 32))
	return nil
}

// openDevice starts the chosen datapath with our key and port. When the kernel was chosen
// only because a module is installed and creating the device fails, auto falls back to the
// embedded one.
func (b *Backend) openDevice() error {
	port := b.wg.ListenPort
	cfg := wgtypes.Config{PrivateKey: &b.key.private, ListenPort: &port}
	if b.datapath == DatapathKernel {
		k, err := openKernelDevice(b.nl, b.ns, b.mtu)
		if err == nil {
			if err = k.configure(cfg); err != nil {
				k.close()
			}
		}
		if err == nil {
			b.dev = k
			return nil
		}
		if b.want == DatapathKernel || tunAvailable() != nil {
			return err
		}
		b.Log.Warn("kernel WireGuard failed; using wireguard-go in xnetd", "err", err)
		b.datapath, b.why = DatapathEmbedded, fmt.Sprintf("wireguard-go in xnetd: kernel WireGuard failed (%v)", err)
	}
	u, err := b.openEmbedded()
	if err != nil {
		return err
	}
	if err := u.configure(cfg); err != nil {
		u.close()
		return fmt.Errorf("wireguard: %w", err)
	}
	if err := u.up(); err != nil {
		u.close()
		return fmt.Errorf("wireguard: listen port %d: %w", port, err)
	}
	b.dev = u
	return nil
}

// openEmbedded starts wireguard-go on xnet-wg, first removing an xnet-wg that is not a TUN
// (the kernel device of an earlier start) or that a TUN of other flags holds.
func (b *Backend) openEmbedded() (*userDevice, error) {
	if link, err := b.nl.LinkByName(DeviceName); err == nil && link.Type() != "tuntap" {
		if err := b.nl.LinkDel(link); err != nil {
			return nil, fmt.Errorf("wireguard: replace %s (a %s link) with a TUN: %w", DeviceName, link.Type(), err)
		}
	}
	u, err := openUserDevice(b.ns, b.mtu, b.stats, b.handshakesCrossed, b.Log)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EBUSY) {
		if link, lerr := b.nl.LinkByName(DeviceName); lerr == nil {
			b.Log.Warn("replacing a TUN of other flags", "err", err)
			if derr := b.nl.LinkDel(link); derr == nil {
				u, err = openUserDevice(b.ns, b.mtu, b.stats, b.handshakesCrossed, b.Log)
			}
		}
	}
	return u, err
}

// configureLink sets xnet-wg's MTU, address and up state and routes the Network into it.
func (b *Backend) configureLink() error {
	link, err := b.nl.LinkByName(DeviceName)
	if err != nil {
		return fmt.Errorf("wireguard: find %s: %w", DeviceName, err)
	}
	b.link = link.Attrs().Index
	if link.Attrs().MTU != b.mtu {
		if err := b.nl.LinkSetMTU(link, b.mtu); err != nil {
			return fmt.Errorf("wireguard: set %s mtu %d: %w", DeviceName, b.mtu, err)
		}
	}
	// The overlay is IPv4 only: no link-local address, no router solicitations into the tunnel.
	if err := b.nl.LinkSetIP6AddrGenMode(link, nl.IN6_ADDR_GEN_MODE_NONE); err != nil {
		b.Log.Debug("cannot turn off IPv6 address generation", "err", err)
	}
	if err := b.ensureAddress(); err != nil {
		return err
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("wireguard: set %s up: %w", DeviceName, err)
	}
	if err := b.nl.RouteReplace(b.route(b.Network())); err != nil {
		return fmt.Errorf("wireguard: route %v dev %s: %w", b.Network(), DeviceName, err)
	}
	return nil
}

// ensureAddress gives xnet-wg exactly our subnet's network address as a /32, as flannel gives
// flannel-wg: the source the host uses towards remote containers, inside our subnet, so it
// is in our AllowedIPs on every peer and replies come back through the tunnel.
func (b *Backend) ensureAddress() error {
	want := netip.PrefixFrom(b.Local().Subnet.Addr(), 32)
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: b.link, Name: DeviceName}}
	addrs, err := b.nl.AddrList(link, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("wireguard: list addresses of %s: %w", DeviceName, err)
	}
	have := false
	for _, a := range addrs {
		if p, ok := netipPrefix(*a.IPNet); ok && p == want {
			have = true
			continue
		}
		if err := b.nl.AddrDel(link, &a); err != nil {
			return fmt.Errorf("wireguard: remove stale address %v from %s: %w", a.IPNet, DeviceName, err)
		}
	}
	if have {
		return nil
	}
	n := ipNet(want)
	if err := b.nl.AddrAdd(link, &netlink.Addr{IPNet: &n}); err != nil {
		return fmt.Errorf("wireguard: add address %v to %s: %w", want, DeviceName, err)
	}
	return nil
}

// ErrIncompatiblePeer marks a peer lease this backend cannot program.
var ErrIncompatiblePeer = backend.ErrIncompatiblePeer

// parsePeer checks a lease is a wireguard host's and returns its key, endpoint and subnet.
// Errors wrap ErrIncompatiblePeer and name the lease.
func (b *Backend) parsePeer(lease subnetmgr.Lease) (wgtypes.Key, netip.AddrPort, netip.Prefix, error) {
	bad := func(format string, args ...any) (wgtypes.Key, netip.AddrPort, netip.Prefix, error) {
		return wgtypes.Key{}, netip.AddrPort{}, netip.Prefix{}, fmt.Errorf("wireguard: lease %v (PublicIP %v): %s: %w", lease.Subnet, lease.PublicIP, fmt.Sprintf(format, args...), ErrIncompatiblePeer)
	}
	if !lease.Subnet.IsValid() || !lease.Subnet.Addr().Is4() {
		return bad("subnet is not IPv4")
	}
	if !lease.PublicIP.Is4() {
		return bad("PublicIP is not IPv4")
	}
	if lease.BackendType != subnetmgr.BackendWireGuard {
		return bad("BackendType %q is not %q", lease.BackendType, subnetmgr.BackendWireGuard)
	}
	data, err := subnetmgr.ParseWireGuardData(lease.BackendData)
	if err != nil {
		return bad("%v", err)
	}
	key, err := wgtypes.ParseKey(data.PublicKey)
	if err != nil {
		return bad("PublicKey: %v", err)
	}
	if key == b.key.public {
		return bad("PublicKey is ours: another host has a copy of our private key")
	}
	port := data.Port
	if port == 0 {
		port = uint16(b.wg.ListenPort) // flannel before v0.22 published no Port
	}
	return key, netip.AddrPortFrom(lease.PublicIP, port), lease.Subnet.Masked(), nil
}

// AddPeer makes the lease's host a peer: its key with its subnet in AllowedIPs, reached at
// PublicIP:Port, and a route for the subnet into xnet-wg. Our own lease (or an older one with
// our PublicIP) is ignored; a lease that is not a wireguard host's is refused with an error
// wrapping ErrIncompatiblePeer.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("wireguard: AddPeer(%v) before Setup", lease.Subnet)
	}
	if b.IsOwn(lease) {
		return nil
	}
	key, endpoint, subnet, err := b.parsePeer(lease)
	if err != nil {
		b.Log.Warn("skipping peer lease", "subnet", lease.Subnet, "public_ip", lease.PublicIP, "err", err)
		return err
	}
	if old, ok := b.subnets[subnet]; ok && old != key {
		// The host behind the subnet has a new key (its state directory was lost): the old
		// key loses the subnet, and the peer if it was its last.
		if err := b.detach(subnet); err != nil {
			return err
		}
	}
	p := b.peers[key]
	if p == nil {
		p = &peer{key: key}
	} else if p.endpoint.IsValid() && p.endpoint.Addr() != endpoint.Addr() {
		b.Log.Warn("a peer key moves to another PublicIP", "public_key", key.String(), "from", p.endpoint, "to", endpoint, "subnet", subnet)
	}
	np := &peer{key: key, endpoint: endpoint, subnets: sortedWith(p.subnets, subnet)}
	// The counters learn the subnet before the route exists, so the first packet is counted.
	b.peers[key], b.subnets[subnet] = np, key
	b.publishStats()
	rollback := func() {
		if len(p.subnets) == 0 {
			delete(b.peers, key)
		} else {
			b.peers[key] = p
		}
		delete(b.subnets, subnet)
		b.publishStats()
	}
	if err := b.dev.configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{b.peerConfig(np)}}); err != nil {
		rollback()
		return fmt.Errorf("wireguard: peer %v: %w", subnet, err)
	}
	if err := b.nl.RouteReplace(b.route(subnet)); err != nil {
		rollback()
		return fmt.Errorf("wireguard: peer %v: route replace %v dev %s: %w", subnet, subnet, DeviceName, err)
	}
	if u, ok := b.dev.(*userDevice); ok && len(p.subnets) == 0 && !b.listed {
		// A peer of our first lease list may still hold a session with our previous process
		// and send into it, unanswered, until WireGuard gives up on it (15 s). A handshake now
		// replaces it. Hosts that appear later greet us themselves when they start.
		u.initiate(key)
	}
	b.Log.Debug("peer programmed", "subnet", subnet, "endpoint", endpoint, "public_key", key.String())
	return nil
}

// handshakesCrossed is told by the embedded device that a handshake with the peer at
// endpoint, or whose abbreviated key (wireguard-go's "peer(AbCd…WxYz)") is peer, failed
// because both sides initiated at once. WireGuard has no tie-break for that: each side answers
// the other's initiation, which replaces its own, then rejects the answer to its own, and
// both wait out the 5 s retransmission before a packet flows (or, when the two sides' handshake
// workers raced, one side keeps a session the other cannot decrypt for as long). It happens
// whenever two hosts start talking in both directions at once: xnetd adds a new host on every
// host within milliseconds, and a keepalive interval makes both start a handshake right then.
// Whoever notices starts over, the host with the greater public key first and the other one
// later, so two restarts never cross: at worst the second redoes a handshake that worked.
// Packets waiting for the session stay queued.
func (b *Backend) handshakesCrossed(endpoint netip.AddrPort, peer string) {
	b.mu.Lock()
	u, ok := b.dev.(*userDevice)
	var key wgtypes.Key
	found := false
	for k, p := range b.peers {
		if endpoint.IsValid() && p.endpoint == endpoint || peer != "" && peer == abbreviated(k) {
			key, found = k, true
			break
		}
	}
	b.mu.Unlock()
	if !ok || !found {
		return
	}
	delay := restartFirst
	if bytes.Compare(b.key.public[:], key[:]) < 0 {
		delay = restartSecond
	}
	if u.restartHandshake(key, delay) {
		b.Log.Debug("handshakes crossed; started over", "public_key", key.String(), "after", delay)
	}
}

// restartFirst and restartSecond are how long the hosts with the greater and the lesser key
// wait before starting over. The first is longer than the resolution of an initiation's
// timestamp (2^24 ns: the peer takes one no newer than the last it saw for a replay) and than
// the shortest interval a peer accepts between two initiations (20 ms); the second leaves the
// first's handshake many round trips to complete.
const (
	restartFirst  = 25 * time.Millisecond
	restartSecond = 100 * time.Millisecond
)

// abbreviated is how wireguard-go names a peer in its log: peer(<first 4>…<last 4 of base64>).
func abbreviated(k wgtypes.Key) string {
	s := k.String()
	return "peer(" + s[:4] + "…" + s[39:43] + ")"
}

// peerConfig is p as the device must have it: exactly its subnets as AllowedIPs.
func (b *Backend) peerConfig(p *peer) wgtypes.PeerConfig {
	keepalive := b.wg.PersistentKeepaliveInterval
	allowed := make([]net.IPNet, len(p.subnets))
	for i, s := range p.subnets {
		allowed[i] = ipNet(s)
	}
	return wgtypes.PeerConfig{
		PublicKey:                   p.key,
		PresharedKey:                b.psk,
		Endpoint:                    net.UDPAddrFromAddrPort(p.endpoint),
		PersistentKeepaliveInterval: &keepalive,
		ReplaceAllowedIPs:           true,
		AllowedIPs:                  allowed,
	}
}

// detach takes subnet from the peer holding it: the peer keeps its other subnets, or goes.
func (b *Backend) detach(subnet netip.Prefix) error {
	key, ok := b.subnets[subnet]
	if !ok {
		return nil
	}
	p := b.peers[key]
	rest := slices.DeleteFunc(slices.Clone(p.subnets), func(s netip.Prefix) bool { return s == subnet })
	pc := wgtypes.PeerConfig{PublicKey: key, Remove: true}
	if len(rest) > 0 {
		pc = b.peerConfig(&peer{key: key, endpoint: p.endpoint, subnets: rest})
	}
	if err := b.dev.configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{pc}}); err != nil {
		return fmt.Errorf("wireguard: remove %v from peer %s: %w", subnet, key, err)
	}
	delete(b.subnets, subnet)
	if len(rest) == 0 {
		delete(b.peers, key)
	} else {
		b.peers[key] = &peer{key: key, endpoint: p.endpoint, subnets: rest}
	}
	b.publishStats()
	return nil
}

// RemovePeer takes the lease's subnet from its peer (the peer goes with its last subnet) and
// deletes the subnet's route. A lease the backend does not hold is not an error.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("wireguard: RemovePeer(%v) before Setup", lease.Subnet)
	}
	subnet, own, err := b.RemovedSubnet(lease)
	if own || err != nil {
		return err
	}
	if err := b.detach(subnet); err != nil {
		return err
	}
	if err := b.nl.RouteDel(b.route(subnet)); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("wireguard: remove peer %v: route del: %w", subnet, err)
	}
	b.Log.Debug("peer removed", "subnet", subnet, "public_ip", lease.PublicIP)
	return nil
}

// PrunePeers removes what the device and xnet-wg's routes hold for subnets no lease in keep
// holds (backend.PeerPruner): the kernel device keeps its peers while xnetd is down, and both
// datapaths keep their routes, so a lease deleted meanwhile would otherwise stay. Device
// peers AddPeer did not program since this start (their key is not a kept lease's) go.
// Only routes strictly inside the overlay Network are touched, never our own subnet's.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return errors.New("wireguard: PrunePeers before Setup")
	}
	b.listed = true
	kept := backend.NewKeptSubnets(b.Local().Subnet, keep)
	var errs []error
	for s := range b.subnets {
		if !kept.Has(s) {
			if err := b.detach(s); err != nil {
				errs = append(errs, err)
			}
		}
	}
	dev, err := b.dev.get()
	if err != nil {
		return fmt.Errorf("wireguard: prune peers: %w", err)
	}
	var gone []string
	for _, p := range dev.Peers {
		if _, ours := b.peers[p.PublicKey]; ours {
			continue
		}
		if err := b.dev.configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: p.PublicKey, Remove: true}}}); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, p.PublicKey.String())
	}
	if b.Network().IsValid() {
		routes, err := b.nl.RouteListFiltered(unix.AF_INET, &netlink.Route{LinkIndex: b.link}, netlink.RT_FILTER_OIF)
		// An interrupted dump still lists routes that existed; the rest waits for the next start.
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			errs = append(errs, fmt.Errorf("list routes on %s: %w", DeviceName, err))
		}
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			dst, ok := netipPrefix(*r.Dst)
			if !ok || !kept.Stale(b.Network(), dst) {
				continue
			}
			if err := b.nl.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("route del %v: %w", dst, err))
				continue
			}
			gone = append(gone, dst.String())
		}
	}
	if len(gone) > 0 {
		b.Log.Info("removed peers and routes whose leases went away while xnetd was down", "removed", gone)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("wireguard: prune peers: %w", err)
	}
	return nil
}

// Close stops xnetd's side. Without teardown xnet-wg stays with its routes (the kernel device
// with its peers, still forwarding; the embedded datapath's TUN idle, dropping); with
// teardown it is deleted, routes and peers with it. The key file stays: it is the host's
// identity, which its lease still publishes. Calling Close twice is harmless.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return nil
	}
	var errs []error
	if b.dev != nil {
		if err := b.dev.close(); err != nil {
			errs = append(errs, fmt.Errorf("wireguard: close device: %w", err))
		}
		b.dev = nil
	}
	if teardown {
		link, err := b.nl.LinkByName(DeviceName)
		var nf netlink.LinkNotFoundError
		switch {
		case err == nil:
			if err := b.nl.LinkDel(link); err != nil {
				errs = append(errs, fmt.Errorf("wireguard: delete %s: %w", DeviceName, err))
			}
		case !errors.As(err, &nf):
			errs = append(errs, fmt.Errorf("wireguard: find %s to delete it: %w", DeviceName, err))
		}
	}
	b.closeHandles()
	b.setup = false
	clear(b.peers)
	clear(b.subnets)
	return errors.Join(errs...)
}

func (b *Backend) closeHandles() {
	b.nl.Close()
	b.nl = nil
	b.ns.Close()
}

// route is "<dst> dev xnet-wg": WireGuard has no link layer, so no gateway or neighbour.
func (b *Backend) route(dst netip.Prefix) *netlink.Route {
	n := ipNet(dst)
	return &netlink.Route{LinkIndex: b.link, Scope: netlink.SCOPE_LINK, Dst: &n}
}

// publishStats hands the packet counters the current peer subnets.
func (b *Backend) publishStats() {
	b.stats.setSubnets(slices.Collect(func(yield func(netip.Prefix) bool) {
		for s := range b.subnets {
			if !yield(s) {
				return
			}
		}
	}))
}

func sortedWith(subnets []netip.Prefix, s netip.Prefix) []netip.Prefix {
	out := slices.Clone(subnets)
	if !slices.Contains(out, s) {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// Status is what `xnetd status` can show of a wireguard host.
type Status struct {
	Datapath   Datapath     `json:"datapath"`
	Why        string       `json:"why"`
	Device     string       `json:"device"`
	PublicKey  string       `json:"public_key"`
	ListenPort int          `json:"listen_port"`
	MTU        int          `json:"mtu"`
	PSK        bool         `json:"psk"` // a pre-shared key is in use (never the key itself)
	Peers      []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as WireGuard sees it.
type PeerStatus struct {
	PublicKey string         `json:"public_key"`
	Endpoint  string         `json:"endpoint"` // where WireGuard last heard from it (roaming)
	Subnets   []netip.Prefix `json:"subnets"`  // its AllowedIPs
	// LastHandshake is zero until a handshake completed; WireGuard renews it every two
	// minutes while traffic flows.
	LastHandshake time.Time `json:"last_handshake,omitzero"`
	RxBytes       int64     `json:"rx_bytes"` // on the wire, as WireGuard counts them
	TxBytes       int64     `json:"tx_bytes"`
}

// Status reports our key and every peer's handshake and traffic, read from the device.
func (b *Backend) Status() (Status, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := Status{Datapath: b.datapath, Why: b.why, Device: DeviceName, PublicKey: b.key.public.String(),
		ListenPort: b.wg.ListenPort, MTU: b.mtu, PSK: b.psk != nil}
	if b.dev == nil {
		return st, errors.New("wireguard: Status before Setup")
	}
	dev, err := b.dev.get()
	if err != nil {
		return st, err
	}
	for _, p := range dev.Peers {
		ps := PeerStatus{PublicKey: p.PublicKey.String(), LastHandshake: p.LastHandshakeTime, RxBytes: p.ReceiveBytes, TxBytes: p.TransmitBytes}
		if p.Endpoint != nil {
			ps.Endpoint = p.Endpoint.String()
		}
		for _, a := range p.AllowedIPs {
			if pfx, ok := netipPrefix(a); ok {
				ps.Subnets = append(ps.Subnets, pfx)
			}
		}
		st.Peers = append(st.Peers, ps)
	}
	slices.SortFunc(st.Peers, func(x, y PeerStatus) int {
		if len(x.Subnets) == 0 || len(y.Subnets) == 0 {
			return len(x.Subnets) - len(y.Subnets)
		}
		return x.Subnets[0].Addr().Compare(y.Subnets[0].Addr())
	})
	return st, nil
}

// Counters is the datapath's traffic (metrics.CounterSource). The embedded datapath counts
// inner packets and bytes per peer subnet and per verdict; the kernel's device counts only
// bytes per peer, on the wire, and those are reported with no packets or verdicts.
func (b *Backend) Counters() (metrics.Counters, error) {
	b.mu.Lock()
	if b.datapath == DatapathKernel {
		defer b.mu.Unlock()
		if b.dev == nil {
			return metrics.Counters{}, nil
		}
		d, err := b.dev.get()
		if err != nil {
			return metrics.Counters{}, err
		}
		var peers []metrics.PeerCounters
		for _, p := range d.Peers {
			if len(p.AllowedIPs) == 0 {
				continue
			}
			if s, ok := netipPrefix(p.AllowedIPs[0]); ok {
				peers = append(peers, metrics.PeerCounters{Subnet: s, TxBytes: uint64(p.TransmitBytes), RxBytes: uint64(p.ReceiveBytes)})
			}
		}
		return metrics.NewCounters(nil, peers), nil
	}
	b.mu.Unlock()
	c := b.stats
	table := c.table.Load()
	peers := make([]metrics.PeerCounters, 0, len(table.bySubnet))
	for s, st := range table.bySubnet {
		peers = append(peers, metrics.PeerCounters{Subnet: s,
			TxPackets: st.txPackets.Load(), TxBytes: st.txBytes.Load(), RxPackets: st.rxPackets.Load(), RxBytes: st.rxBytes.Load()})
	}
	slices.SortFunc(peers, func(x, y metrics.PeerCounters) int { return x.Subnet.Addr().Compare(y.Subnet.Addr()) })
	return metrics.NewCounters(map[string]uint64{
		verdictEncap: c.encap.Load(), verdictDecap: c.decap.Load(),
		verdictNoRoute: c.noRoute.Load(), verdictSpoofed: c.spoofed.Load(),
	}, peers), nil
}

var (
	_ backend.Backend       = (*Backend)(nil)
	_ backend.PeerPruner    = (*Backend)(nil)
	_ metrics.CounterSource = (*Backend)(nil)
)
