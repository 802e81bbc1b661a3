// Package udp is xnet's user-space backend: a TUN device (xnet0) that the kernel routes the
// remote subnets into, and UDP sockets that carry the same VXLAN format as the ebpf and vxlan
// backends, so a udp host and kernel-VXLAN or eBPF hosts share one cluster. It is the fallback
// for hosts that have neither BPF nor the kernel's vxlan module.
//
// It owns xnet0 (its address, MTU and the per-peer routes on it), the UDP sockets on
// PublicIP:<port>, and the goroutines that move packets between them, with their counters. It
// does not own leases (package subnetmgr), masquerading (package ipmasq), the VXLAN byte
// layout (package wire) or the underlay NIC.
//
// Design history (why it looks like this):
//
// flannel's udp backend read one packet from its TUN, wrote one datagram, and did the same
// the other way: two system calls and two copies per packet, about 0.25 Gbit/s on one TCP
// stream. The cost is per packet, not per byte, so this backend moves large batches instead:
//
//   - The TUN is opened with IFF_VNET_HDR and TSO offload (TUNSETOFFLOAD), so the kernel hands
//     us TCP segments of up to 64 KB (0.25 -> 2+ Gbit/s on the test VM, the largest step).
//   - We cut them into overlay-MTU packets without copying the payload (segment.go): each
//     segment gets its own headers (VXLAN + inner Ethernet + IPv4 + TCP) in a small slab and
//     its checksum computed in place, and all segments of one flow leave in one sendmsg with
//     UDP_SEGMENT (UDP GSO), header and payload as separate iovecs; the kernel writes the outer
//     headers. Without UDP GSO: about a quarter of the throughput.
//   - The receiving sockets have UDP_GRO, so the kernel hands back many datagrams of one flow
//     at once, read with recvmmsg; without it, about half. sendmmsg and recvmmsg are called
//     directly with arrays kept per goroutine (mmsg.go), not through x/net's ReadBatch and
//     WriteBatch, which allocate several objects per call.
//   - Received TCP segments of one flow are coalesced again into one large segment and written
//     to the TUN with one writev (package tunoffload), by reference into the receive buffer.
//     wireguard-go's tun package does both cut and coalescing well but copies every packet
//     twice on the way; the by-reference versions cost measurably less CPU per GB, and
//     Tuning.CopyingSplit / CopyingGRO keep wireguard-go's for comparison.
//   - A queue per CPU: xnet0 is IFF_MULTI_QUEUE and the receiving sockets share the port with
//     SO_REUSEPORT; each queue has one reader per direction, so the kernel's flow hashing
//     spreads flows over CPUs and one flow stays in order.
//   - Inner checksums are summed with 64-bit add-with-carry in native byte order (tunoffload.Sum),
//     twice as fast as the first loop; every byte is summed once on each side (the sender
//     fills each segment's checksum; the receiver verifies each one before coalescing, since
//     the wire format's senders leave the outer UDP checksum 0 and the kernel trusts a coalesced
//     segment's data).
//
// Where the rest goes (perf, one TCP stream between two namespaces on the 2-core VM): most of
// the CPU is the kernel's, in the four copies a user-space datapath cannot avoid (TUN read,
// sendmmsg, recvmmsg, TUN write: about a quarter of it) and in the network stack that the
// sendmmsg and the TUN write run inline (the receiving host's bridge and UDP socket, the
// forwarding to the container and its TCP receive); checksums are about 7% and the Go
// scheduler about 5%. Looked at and not used:
//
//   - Linux 6.17's UDP-tunnel GSO on TUN (TUN_F_UDP_TUNNEL_GSO, the virtio-net tunnel header)
//     lets the process behind a TUN hand the kernel already-encapsulated GSO packets, which is
//     what a VM's virtio-net does. Here it would mean writing our VXLAN packets into xnet0, so
//     the kernel routes packets with our own PublicIP as source arriving on xnet0: that needs
//     accept_local on xnet0, rp_filter off (host-wide if "all" is 1), and forwarding plus a
//     FORWARD-chain accept for them - host-wide changes a fallback backend must not make.
//     Reading xnet0 gives plain TCP TSO packets either way, so the option changes nothing
//     on the read side.
//   - MSG_ZEROCOPY on the sending sockets: a packet delivered to a local namespace over a veth
//     is copied anyway (skb_orphan_frags_rx), and the buffers would have to wait for the
//     completion notifications.
//   - A tx queue split in a reader (read, cut, checksum) and a sender (sendmmsg) with three
//     buffers in turn: 5.11-5.13 vs 4.96-5.06 Gbit/s median over 12 interleaved rounds, but
//     2-6% more CPU per GB for the hand-offs: within the noise, so not kept.
//   - One queue instead of one per CPU: the same rate for one stream (4.44 vs 4.36 Gbit/s).
//
// The rate at a fixed 2 Gbit/s costs about 1.5x the CPU per GB of the full rate (3.2 vs 2.2 s):
// smaller batches, more wake-ups per byte. Compare variants' CPU at a fixed rate
// (XNET_UDP_BENCH_RATE) and their throughput in interleaved rounds: on the shared 2-core VM
// the throughput of one run moves by a third with the other tenants' load.
//
// The outer source port is "a hash of the inner flow in 32768-60999" (docs/design.md, Encapsulation). A UDP socket
// has one source port, so the sending side is a small pool of sockets bound to PublicIP:0 -
// the kernel gives each an ephemeral port, by default from 32768-60999, the range the kernel's
// vxlan driver also uses - and a flow hash picks the socket. The pool sockets never read; a
// drop-all socket filter keeps stray datagrams from queueing on them. The outer DF bit is
// clear (IP_PMTUDISC_DONT), as the wire format asks; the UDP checksum is filled (UDP GSO needs it;
// checksum 0 is allowed, not required).
//
// Dual stack (EnableIPv6): peers' IPv6 subnets are routed into xnet0 as well, and inner IPv6
// packets travel in the same VXLAN over the IPv4 underlay (inner EtherType 0x86DD, inner MACs
// as for IPv4), which is what the ebpf backend sends and what the kernel's vxlan device takes
// on its IPv4 VTEP. So BackendV6Data repeats BackendData: peers send our IPv6 traffic to the one
// VTEP we have (backend.VXLANPeerV6). Decapsulation holds IPv6 to the IPv4 rules with the IPv6
// subnets: destination in our IPv6 subnet, source in the IPv6 subnet of the lease whose
// PublicIP sent it. xnet0 gets our IPv6 subnet's address as a /128. TSO segments are cut for
// IPv6/TCP as for IPv4; received IPv6 segments are not coalesced (each is written alone). A
// kernel-VXLAN peer's IPv6 TCP super-frames are passed on as TSO, as IPv4 ones are. With
// DirectRouting a peer whose PublicIPv6 is on our IPv6 segment has its IPv6 subnet routed via
// that address on the underlay, as the vxlan backend does.
//
// Network namespaces: everything that is bound to a namespace - the netlink handle, the TUN
// fds, the sockets - is opened in the namespace of the thread that calls New (captured there),
// Setup entering it on a locked thread when the caller runs elsewhere. After that the
// goroutines run on any thread: an fd stays in the namespace it was created in. xnetd calls New
// from its own (only) namespace; tests call New inside harness.Namespace.Do.
//
// Restart: xnet0 is a persistent TUN (TUNSETPERSIST), so a stopped daemon leaves the device and
// its routes in place and a restarted one re-attaches its queues: packets for remote subnets
// never leak out of the underlay NIC unencapsulated by the default route. A user-space datapath
// cannot forward while its process is not running, but the kernel can queue for it: under a
// service manager with an fd store (systemd's FileDescriptorStoreMax=, package fdstore) Setup
// stores every TUN queue and receiving socket there, and while the store holds them the queues
// stay attached and the port bound. What the kernel routes into xnet0 meanwhile waits on the
// queues (up to xnet0's txqueuelen, 500 packets each), what peers send waits on the sockets (up
// to their 4 MB buffers). The next process takes them back (takeQueues: all of them or none,
// checked to be xnet0's queues and our port's sockets in our namespace) and starts reading them
// once its first lease list is programmed (PrunePeers), so the packets of a kill -9 and restart
// are delivered late instead of lost. Without a store (no NOTIFY_SOCKET) the idle TUN drops
// them, and the closed port what peers send, for the moment of the restart.
// The route of a lease deleted while the daemon was down goes when the daemon, after its first
// full lease list, calls PrunePeers.
// Close(true) deletes xnet0.
package udp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/wire"
)

// DeviceName is the TUN device of this backend.
const DeviceName = "xnet0"

// ErrIncompatiblePeer marks a peer lease this backend cannot use (backend.ParseVXLANPeer's rules).
var ErrIncompatiblePeer = backend.ErrIncompatiblePeer

// Tuning sets how the datapath runs; the zero value means the defaults. It exists so each
// optimisation can be measured on its own (test/ and make bench) and turned off on a kernel
// that lacks it.
type Tuning struct {
	// Queues is the number of TUN queues and receiving sockets, each with one reader per
	// direction. Default: the number of CPUs, at most 4.
	Queues int
	// SendSockets is the size of the sending socket pool (distinct outer source ports).
	// Default 8.
	SendSockets int
	// NoOffload opens the TUN without IFF_VNET_HDR: one packet per read and write.
	NoOffload bool
	// NoUDPGSO sends one datagram per segment (sendmmsg) instead of UDP_SEGMENT batches.
	NoUDPGSO bool
	// NoUDPGRO leaves UDP_GRO off on the receiving sockets.
	NoUDPGRO bool
	// CopyingGRO coalesces received packets with wireguard-go's TUN Write (which copies each
	// packet twice) instead of writing them by reference (tunoffload.Coalescer).
	CopyingGRO bool
	// CopyingSplit cuts TSO segments read from the TUN with wireguard-go's Read (which
	// copies each packet out) instead of sending the payload by reference (segment.go).
	CopyingSplit bool
}

func (t Tuning) withDefaults() Tuning {
	if t.Queues <= 0 {
		t.Queues = min(runtime.NumCPU(), 4)
	}
	if t.SendSockets <= 0 {
		t.SendSockets = 8
	}
	return t
}

// Backend is the udp backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.VXLAN // guarded by mu after New
	mac           wire.MAC
	tune          Tuning
	ns            netns.NsHandle // the namespace New ran in
	nl            *netlink.Handle
	stats         *counters
	tables        tableHolder
	fds           *fdstore.Store // the service manager's fd store; nil without one

	mu    sync.Mutex
	setup bool
	dev   int                      // ifindex of xnet0 once Setup ran
	peers map[netip.Prefix]*peerDP // what AddPeer programmed, by subnet
	dp    *datapath                // the running queues; nil before Setup and after Close
	// DirectRouting (flannel's option): a peer on our L2 segment is routed via its PublicIP on
	// the underlay instead of into xnet0, and its packets never reach this process. It stays in
	// peers all the same: a peer that does not see us as direct still sends VXLAN, and the
	// receive path checks those against its lease.
	direct        *backend.DirectRouter
	directRouting bool
	paths         map[netip.Prefix]backend.PeerPath
	// direct6 holds the peers (by IPv4 subnet) whose IPv6 subnet is routed directly.
	direct6 map[netip.Prefix]bool
}

// New builds the backend for opts with the default Tuning. It captures the network namespace
// of the calling thread: Setup creates the device and sockets there. It changes nothing on the
// host.
func New(opts backend.Options) (backend.Backend, error) {
	b, err := NewWithTuning(opts, Tuning{})
	if err != nil {
		return nil, err // a nil interface, not a nil *Backend inside one
	}
	return b, nil
}

// NewWithTuning is New with explicit datapath settings.
func NewWithTuning(opts backend.Options, tune Tuning) (*Backend, error) {
	core, err := backend.NewVXLAN(subnetmgr.BackendUDP, opts)
	if err != nil {
		return nil, err
	}
	if opts.Iface.MTU <= backend.VXLANOverhead+wire.IPv4HeaderLen {
		return nil, fmt.Errorf("udp: interface %q MTU %d leaves no room for an inner IPv4 header after the %d-byte VXLAN overhead", opts.Iface.Name, opts.Iface.MTU, backend.VXLANOverhead)
	}
	if err := unix.Access("/dev/net/tun", unix.R_OK|unix.W_OK); err != nil {
		return nil, fmt.Errorf("udp: /dev/net/tun: %v: %w", err, backend.ErrUnavailable)
	}
	mac, _ := wire.MACFrom(core.VtepMAC)
	core.Log = core.Log.With("device", DeviceName)
	// The namespace handle and the netlink socket come from one locked thread, so they are the
	// same namespace. NewHandleAt would setns(2) into it even though we are there already,
	// and setns needs CAP_SYS_ADMIN: a host that grants xnetd only CAP_NET_ADMIN (no BPF) must
	// still get this fallback.
	runtime.LockOSThread()
	ns, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("udp: open the network namespace of the calling thread: %w", err)
	}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	runtime.UnlockOSThread()
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("udp: open netlink socket: %w", err)
	}
	return &Backend{
		VXLAN:         core,
		mac:           mac,
		tune:          tune.withDefaults(),
		ns:            ns,
		nl:            nl,
		stats:         newCounters(),
		fds:           opts.FDStore,
		peers:         map[netip.Prefix]*peerDP{},
		direct:        backend.NewDirectRouter(nl, opts.Iface),
		directRouting: opts.Config.Backend.DirectRouting,
		paths:         map[netip.Prefix]backend.PeerPath{},
		direct6:       map[netip.Prefix]bool{},
	}, nil
}

// Mode: user space over a TUN device, with the offloads the kernel granted.
func (b *Backend) Mode() (string, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	why := "user space over a TUN device"
	if b.dp != nil {
		res := b.dp.res
		why += fmt.Sprintf(" (%d queues, TUN offload %v, UDP GSO %v, UDP GRO %v)", len(res.queues), res.offload, res.gso, res.gro)
	}
	return "tun", why
}

// LeaseAttrsV6 publishes our IPv4 VTEP again: IPv6 rides the same VXLAN over IPv4.
func (b *Backend) LeaseAttrsV6() (json.RawMessage, error) {
	data, err := backend.VXLANLeaseDataV6(b.VNI, b.Iface.PublicIP, b.Iface.PublicIPv6, false)
	if err != nil {
		return nil, fmt.Errorf("udp: %w", err)
	}
	return data, nil
}

// Setup creates (or re-attaches to) xnet0, gives it our subnet's network address as a /32
// (and, dual stack, our IPv6 subnet's as a /128), sets its MTU, brings it up, opens the sockets
// on PublicIP:port and starts the queues. A second call only records a changed lease.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if err := b.CheckSetup(ctx, local, cfg); err != nil {
		return err
	}
	if err := b.CheckSetupV6(local, cfg); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return errors.New("udp: Setup after Close")
	}
	local.Subnet = local.Subnet.Masked()
	if local.IPv6Subnet.IsValid() {
		local.IPv6Subnet = local.IPv6Subnet.Masked()
	}
	if b.setup {
		changed := b.Local().Subnet != local.Subnet || b.Local().IPv6Subnet != local.IPv6Subnet
		b.SetLocal(local, cfg.Network)
		b.SetIPv6Network(cfg.IPv6Network)
		if changed {
			b.dp.setLocal(b.localSubnets())
			if err := b.ensureAddress(); err != nil {
				return err
			}
		}
		return nil
	}
	b.SetLocal(local, cfg.Network)
	b.SetIPv6Network(cfg.IPv6Network)
	var res *resources
	err := b.inNamespace(func() error {
		var err error
		res, err = openResources(b.Iface.PublicIP, b.Port, b.tune, b.fds, b.ns, b.Log)
		return err
	})
	if err != nil {
		return err
	}
	link, err := b.nl.LinkByName(DeviceName)
	if err != nil {
		res.close()
		return fmt.Errorf("udp: find %s after creating it: %w", DeviceName, err)
	}
	b.dev = link.Attrs().Index
	if err := b.configureDevice(link); err != nil {
		res.close()
		return err
	}
	var hold time.Duration
	if res.adopted {
		// The taken-over queues hold what arrived while xnetd was down: read them only once
		// AddPeer has programmed the first lease list (PrunePeers follows it), or every packet
		// of a peer not programmed yet would be dropped.
		hold = backend.HandoverHold
	}
	b.dp = startDatapath(res, b.dpConfig(), &b.tables, b.stats, b.Log, hold)
	b.setup = true
	b.Log.Info("udp datapath ready", "vni", b.VNI, "port", b.Port, "public_ip", b.Iface.PublicIP,
		"mtu", b.MTU(), "queues", len(res.queues), "send_sockets", len(res.send),
		"tun_offload", res.offload, "udp_gso", res.gso, "udp_gro", res.gro, "taken_over", res.adopted,
		"address", netip.PrefixFrom(local.Subnet.Addr(), 32), "ipv6_subnet", local.IPv6Subnet)
	return nil
}

// localSubnets are our lease's subnets as the datapath delivers to them.
func (b *Backend) localSubnets() localSubnets {
	return localSubnets{v4: b.Local().Subnet, v6: b.Local().IPv6Subnet}
}

func (b *Backend) dpConfig() dpConfig {
	return dpConfig{
		expect:       wire.Expect{VNI: uint32(b.VNI), MAC: b.mac, MaxInner: b.MTU()},
		local:        b.localSubnets(),
		mac:          b.mac,
		port:         b.Port,
		copyingGRO:   b.tune.CopyingGRO,
		copyingSplit: b.tune.CopyingSplit,
	}
}

// configureDevice sets MTU, address, no IPv6 link-local, up.
func (b *Backend) configureDevice(link netlink.Link) error {
	if link.Attrs().MTU != b.MTU() {
		if err := b.nl.LinkSetMTU(link, b.MTU()); err != nil {
			return fmt.Errorf("udp: set %s mtu %d: %w", DeviceName, b.MTU(), err)
		}
	}
	// No link-local address: the kernel then sends no router solicitations or neighbour
	// discovery into the TUN for us to count as drops (a dual-stack overlay's IPv6 subnet
	// address is added by ensureAddress).
	if err := b.nl.LinkSetIP6AddrGenMode(link, nl.IN6_ADDR_GEN_MODE_NONE); err != nil {
		b.Log.Debug("cannot turn off IPv6 address generation on the TUN", "err", err)
	}
	if err := b.ensureAddress(); err != nil {
		return err
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("udp: set %s up: %w", DeviceName, err)
	}
	return nil
}

// ensureAddress gives xnet0 exactly our subnet's network address as a /32 (as flannel gives its
// vxlan device), and in a dual-stack overlay our IPv6 subnet's as a /128: the source addresses
// the host uses towards remote containers, inside our subnets, so replies come back through the
// overlay. Other addresses (an old lease's) go; IPv6 link-local ones are the kernel's.
func (b *Backend) ensureAddress() error {
	link := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Index: b.dev, Name: DeviceName}}
	want := map[netip.Prefix]bool{netip.PrefixFrom(b.Local().Subnet.Addr(), 32): true}
	if s6 := b.Local().IPv6Subnet; s6.IsValid() {
		want[netip.PrefixFrom(s6.Addr(), 128)] = true
	}
	addrs, err := b.nl.AddrList(link, unix.AF_UNSPEC)
	if err != nil {
		return fmt.Errorf("udp: list addresses of %s: %w", DeviceName, err)
	}
	for _, a := range addrs {
		p, ok := backend.PrefixOf(a.IPNet)
		if ok && (want[p] || p.Addr().IsLinkLocalUnicast()) {
			delete(want, p)
			continue
		}
		if err := b.nl.AddrDel(link, &a); err != nil {
			return fmt.Errorf("udp: remove stale address %v from %s: %w", a.IPNet, DeviceName, err)
		}
	}
	for p := range want {
		// IPv6 without duplicate address detection: nothing behind a TUN answers it.
		addr := &netlink.Addr{IPNet: backend.IPNet(p)}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := b.nl.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("udp: add address %v to %s: %w", p, DeviceName, err)
		}
	}
	return nil
}

// AddPeer routes the peer's subnet (and, dual stack, its IPv6 subnet) into xnet0 and tells the
// datapath where it lives. Our own lease (or an older lease with our PublicIP) is ignored. A
// lease that is not "vxlan" or has malformed BackendData is skipped with an error wrapping
// ErrIncompatiblePeer.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("udp: AddPeer(%v) before Setup", lease.Subnet)
	}
	vp, own, err := b.Peer(lease)
	if own || err != nil {
		return err
	}
	p := newPeerDP(vp, b.Port)
	if b.DualStack() {
		pv, ok, err := backend.ParseVXLANPeerV6(lease, vp)
		if err != nil {
			b.Log.Warn("peer's IPv6 subnet skipped; reached over IPv4 only", "subnet", lease.Subnet, "err", err)
		} else if ok {
			p.subnet6 = pv.Subnet
		}
	}
	old, had := b.peers[p.subnet]
	if had && old.publicIP == p.publicIP {
		p.stats = old.stats // same peer, new lease version: keep its counters
	}
	// The datapath learns the peer before the routes exist, so the first packet the kernel
	// routes into xnet0 finds it.
	b.peers[p.subnet] = p
	b.publishPeers()
	path := b.direct.Path(b.directRouting, p.publicIP)
	if old, ok := b.paths[p.subnet]; !ok || old.Direct != path.Direct {
		b.Log.Info("peer path", "subnet", p.subnet, "public_ip", p.publicIP, "direct", path.Direct, "why", path.Why)
	}
	// Either route replaces the other in one change: a peer moving onto or off our segment
	// switches path without a gap.
	if path.Direct {
		err = b.direct.RouteVia(p.subnet, p.publicIP)
	} else if err = b.nl.RouteReplace(b.route(p.subnet)); err != nil {
		err = fmt.Errorf("route replace %v dev %s: %w", p.subnet, DeviceName, err)
	}
	if err != nil {
		delete(b.peers, p.subnet)
		delete(b.paths, p.subnet)
		b.publishPeers()
		return fmt.Errorf("udp: peer %v: %w", p.subnet, err)
	}
	b.paths[p.subnet] = path
	var oldSubnet6 netip.Prefix
	if had {
		oldSubnet6 = old.subnet6
	}
	if err := b.routeV6(p, lease.PublicIPv6, oldSubnet6); err != nil {
		return fmt.Errorf("udp: peer %v: %w", p.subnet, err)
	}
	b.Log.Debug("peer programmed", "subnet", p.subnet, "ipv6_subnet", p.subnet6, "public_ip", p.publicIP, "vtep_mac", p.mac.String(), "direct", path.Direct)
	return nil
}

// routeV6 routes the peer's IPv6 subnet (if any) into xnet0, or with DirectRouting via its
// PublicIPv6 when that is on our IPv6 segment, and removes the route of the IPv6 subnet it held
// before (old) when that changed.
func (b *Backend) routeV6(p *peerDP, publicIPv6 netip.Addr, old netip.Prefix) error {
	if old.IsValid() && old != p.subnet6 {
		if err := b.deleteRoutes(old); err != nil {
			return err
		}
	}
	if !p.subnet6.IsValid() {
		delete(b.direct6, p.subnet)
		return nil
	}
	direct := false
	if b.directRouting && publicIPv6.Is6() && !publicIPv6.Is4In6() {
		path := b.direct.Path(true, publicIPv6)
		if direct = path.Direct; direct != b.direct6[p.subnet] {
			b.Log.Info("peer IPv6 path", "subnet", p.subnet, "ipv6_subnet", p.subnet6, "public_ipv6", publicIPv6, "direct", direct, "why", path.Why)
		}
	}
	var err error
	if direct {
		err = b.direct.RouteVia(p.subnet6, publicIPv6)
	} else if err = b.nl.RouteReplace(b.route(p.subnet6)); err != nil {
		err = fmt.Errorf("route replace %v dev %s: %w", p.subnet6, DeviceName, err)
	}
	if err != nil {
		return err
	}
	b.direct6[p.subnet] = direct
	return nil
}

// deleteRoutes deletes our routes to subnet: into xnet0, and the direct one on the underlay,
// whether this process made them or an earlier one did. Missing routes are not an error.
func (b *Backend) deleteRoutes(subnet netip.Prefix) error {
	if err := backend.IgnoreMissing(b.nl.RouteDel(b.route(subnet))); err != nil {
		return fmt.Errorf("route del %v dev %s: %w", subnet, DeviceName, err)
	}
	return b.direct.DeleteRoute(subnet)
}

// RemovePeer deletes the peer's routes, then forgets it. Routes already gone are not an error.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return fmt.Errorf("udp: RemovePeer(%v) before Setup", lease.Subnet)
	}
	subnet, own, err := b.RemovedSubnet(lease)
	if own || err != nil {
		return err
	}
	gone := []netip.Prefix{subnet}
	if p, ok := b.peers[subnet]; ok && p.subnet6.IsValid() {
		gone = append(gone, p.subnet6)
	}
	if s6 := lease.IPv6Subnet; s6.IsValid() && s6.Addr().Is6() && !s6.Addr().Is4In6() {
		gone = append(gone, s6.Masked())
	}
	for _, s := range gone {
		if err := b.deleteRoutes(s); err != nil {
			return fmt.Errorf("udp: remove peer %v: %w", subnet, err)
		}
	}
	delete(b.peers, subnet)
	delete(b.paths, subnet)
	delete(b.direct6, subnet)
	b.publishPeers()
	b.Log.Debug("peer removed", "subnet", subnet, "public_ip", lease.PublicIP)
	return nil
}

// PrunePeers deletes the routes into xnet0 of subnets no lease in keep holds
// (backend.PeerPruner): xnet0 is persistent, so a restarted daemon inherits the route of every
// lease deleted while it was down, and no removal event will ever name them. Left alone, such a
// route would swallow the traffic for a subnet no host owns. Only routes to subnets strictly
// inside the overlay Network (IPv6Network for IPv6 routes) are kept, never our own subnets.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.setup {
		return errors.New("udp: PrunePeers before Setup")
	}
	// The first lease list is programmed: queues taken over from the previous process may be
	// read now (see Setup).
	if b.dp.release() {
		b.Log.Info("reading the taken-over queues: the peers of the first lease list are programmed", "peers", len(b.peers))
	}
	if !b.Network().IsValid() {
		return nil // no Network: no route can be known to be ours
	}
	kept := backend.KeptFor(b.Local(), keep)
	nets := b.Networks()
	var errs []error
	gone, err := backend.DeleteRoutesWhere(b.nl, b.dev, func(dst netip.Prefix, _ netip.Addr) bool {
		return kept.Stale(backend.NetworkOf(dst, nets...), dst)
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", DeviceName, err))
	}
	direct, err := b.direct.PruneRoutes(kept, nets...)
	if err != nil {
		errs = append(errs, err)
	}
	gone = append(gone, direct...)
	pruned := false
	for s := range b.peers {
		if !kept.Has(s) {
			delete(b.peers, s)
			delete(b.paths, s)
			delete(b.direct6, s)
			pruned = true
		}
	}
	if pruned {
		b.publishPeers()
	}
	if len(gone) > 0 {
		b.Log.Info("removed routes of peers whose leases went away while xnetd was down", "routes", gone)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("udp: prune peers: %w", err)
	}
	return nil
}

// Close stops the queues and closes every fd. xnet0 is persistent: without teardown it stays,
// with its routes, for a restarted daemon to re-attach to (dropping packets meanwhile); with
// teardown it is deleted. Calling Close twice is harmless.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nl == nil {
		return nil
	}
	if b.dp != nil {
		b.dp.stop()
		b.dp = nil
	}
	var err error
	if teardown {
		link, lerr := b.nl.LinkByName(DeviceName)
		switch {
		case lerr == nil:
			if derr := b.nl.LinkDel(link); derr != nil {
				err = fmt.Errorf("udp: delete %s: %w", DeviceName, derr)
			}
		case !isLinkNotFound(lerr):
			err = fmt.Errorf("udp: find %s to delete it: %w", DeviceName, lerr)
		}
		if b.Network().IsValid() {
			if _, derr := b.direct.DeleteRoutesInside(b.Networks()...); derr != nil {
				err = errors.Join(err, fmt.Errorf("udp: teardown: %w", derr))
			}
		}
		// The device is gone; the service manager's copies of its queues and of the
		// sockets must not keep the port.
		if serr := removeStoredQueues(b.fds, b.tune.Queues); serr != nil {
			err = errors.Join(err, fmt.Errorf("udp: teardown: %w", serr))
		}
	}
	b.nl.Close()
	b.nl = nil
	b.ns.Close()
	b.setup = false
	return err
}

// route is "<subnet> dev xnet0" (IPv4 or IPv6): a TUN has no link layer, so no gateway or
// neighbour.
func (b *Backend) route(subnet netip.Prefix) *netlink.Route {
	return &netlink.Route{LinkIndex: b.dev, Scope: netlink.SCOPE_LINK, Dst: backend.IPNet(subnet)}
}

// publishPeers hands the datapath an immutable copy of the peer set (copy-on-write: the
// packet path reads it without a lock).
func (b *Backend) publishPeers() {
	b.tables.store(newPeerTable(b.peers))
}

// inNamespace runs fn on a thread in the namespace New captured (backend.InNamespace).
func (b *Backend) inNamespace(fn func() error) error { return backend.InNamespace(b.ns, fn) }

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

var (
	_ backend.Backend    = (*Backend)(nil)
	_ backend.PeerPruner = (*Backend)(nil)
	_ backend.DualStack  = (*Backend)(nil)
)
