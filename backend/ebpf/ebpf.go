// Package ebpf is xnet's eBPF backend: VXLAN in BPF programs (package bpf), wire-compatible with
// the kernel's vxlan device as flannel sets it up, without any vxlan device on the data path but
// one: VXLAN over an IPv6 underlay goes through a metadata-mode vxlan device (tunnel.go).
//
// It owns what the datapath is attached to on this host and what its maps say: the config
// entry, one route and one counter entry per peer, the TC attachments on every container veth
// (it follows Docker's docker0 through netlink), the routed device xnet0 for the host's own
// traffic, a down vxlan device on docker0 that only gives containers headroom for the outer
// headers (headroom.go), in a dual-stack overlay with an IPv6 underlay the vxlan device xnet6
// that carries IPv6 over it (tunnel.go), and the decap attachment on the underlay NIC. It does
// not own leases (subnetmgr), loading and pinning (loader) or map layouts (maps).
//
// Design history:
//
// Where to encapsulate: at TC ingress of each container's host-side veth, so a container's
// packet for another host goes from its veth straight to the underlay NIC (bpf_redirect)
// without the bridge, routing or netfilter; that was the fastest variant measured. The host's
// own traffic to remote containers takes a route over xnet0, one end of a veth pair with ARP off
// (the kernel has no dummy device), whose TC egress runs the same encapsulation. xnet0 carries
// our VTEP MAC and subnet.0/32, as flannel's vxlan device does, so a kernel VXLAN peer sees the
// same addresses whichever backend we run.
//
// Where to decapsulate: TC ingress of the underlay NIC hands packets for a known container to
// its veth peer (bpf_redirect_peer: no host stack, so rp_filter cannot drop them) and the rest
// into xnet0's ingress, where the host forwards them as overlay traffic. Containers are learned
// by the encap program from what they send, so nothing here has to enter container namespaces.
// --decap=auto adds XDP in driver mode on NICs that are not veths: XDP strips the outer headers
// before GRO and marks the frame, and the TC program delivers it. On a veth native XDP cuts TCP
// throughput eightfold (it turns TSO off on the peer), so auto keeps TC there, and an explicit
// --decap=xdp on a veth runs XDP in generic mode, which keeps TSO (about 10% below TC).
//
// A restart changes nothing on the packet path: links are pinned and re-adopted (package
// loader), routes and counters live in pinned maps, and Setup/AddPeer rewrite the same values.
// What the maps hold for a lease deleted while xnetd was down goes when the daemon, after
// applying its first full lease list, calls PrunePeers with every lease it kept.
package ebpf

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Names of what the backend creates or follows on the host.
const (
	HostDevice     = "xnet0"  // routed device for the host's own overlay traffic
	hostDevicePeer = "xnet0p" // its veth peer (must be up for xnet0 to carry traffic)
	// DockerBridge is Docker's default bridge. Nothing depends on the name: the container
	// bridges are the ones holding our gateway address (findBridges).
	DockerBridge = "docker0"
)

// Host routing modes (--host-routing).
const (
	HostRoutingBPF    = "bpf"
	HostRoutingKernel = "kernel"
)

// Flow steering modes (--flow-steering, rps.go).
const (
	FlowSteeringOff = "off"
	FlowSteeringRPS = "rps"
)

// Decap modes (--decap).
const (
	DecapAuto = "auto"
	DecapXDP  = "xdp"
	DecapTC   = "tc"
)

// Backend is the eBPF backend. Its methods are safe for concurrent use.
type Backend struct {
	backend.VXLAN // guarded by mu after New
	decap         string
	bpffs         string
	exec          *executor
	hostRouting   string // HostRoutingBPF or HostRoutingKernel
	bridgeName    string // --bridge; "" finds the bridges by our gateway address
	rpsMask       string // rps_cpus for container veths (rps.go); "" leaves them alone
	linkBuffer    int    // receive buffer of the link subscription
	linkResyncs   atomic.Int64

	mu      sync.Mutex
	ld      *loader.Loader
	m       *maps.Maps
	host    int              // ifindex of xnet0
	config  maps.Config      // what Setup wrote into the config map; SetHostRouting rewrites it
	veths   map[int]struct{} // container veths carrying the encap program
	bridges map[int]string   // container bridges by ifindex (findBridges)
	frags   *fragReceiver    // reassembled datagrams (fragments.go); nil when it could not start
	// peers is, by peer subnet (the lease's ID), the address its counters are keyed by: its
	// PublicIP, or in an IPv6-only overlay its PublicIPv6.
	peers  map[netip.Prefix]netip.Addr
	direct directState // DirectRouting (direct.go)
	v6     ipv6State   // the IPv6 side of a dual-stack overlay (ipv6.go)
	// ipv6Underlay: a dual-stack (or IPv6-only) overlay and an IPv6 underlay address, so we
	// run an IPv6 VTEP (tunnel.go). Set by New.
	ipv6Underlay bool
	// ipv6Only: an IPv6-only overlay (ipv6only.go); ipv6Underlay is then true. Set by New.
	ipv6Only  bool
	status    Status
	stopWatch func()
	// headroomErr is the last failure to set up HeadroomDevice ("" when fine), so a repeated
	// one is logged once.
	headroomErr string
}

// New checks that the datapath can load here (loader.Probe: without changing the host) and
// returns the backend. It returns an error wrapping backend.ErrUnavailable when BPF cannot
// load. It works in the network namespace of the calling thread.
func New(opts backend.Options) (backend.Backend, error) {
	b, err := NewBackend(opts)
	if err != nil {
		return nil, err // a nil interface, not a nil *Backend inside one
	}
	return b, nil
}

// NewBackend is New with the concrete type (Status, Counters).
func NewBackend(opts backend.Options) (*Backend, error) {
	core, err := backend.NewVXLAN(subnetmgr.BackendEBPF, opts)
	if err != nil {
		return nil, err
	}
	decap := opts.Decap
	if decap == "" {
		decap = DecapAuto
	}
	if decap != DecapAuto && decap != DecapXDP && decap != DecapTC {
		return nil, fmt.Errorf("ebpf: --decap=%q: use auto, xdp or tc", decap)
	}
	hostRouting, why := opts.HostRouting, opts.HostRoutingWhy
	switch hostRouting {
	case "", HostRoutingBPF:
		hostRouting = HostRoutingBPF
	case HostRoutingKernel:
	default:
		return nil, fmt.Errorf("ebpf: --host-routing=%q: use bpf or kernel", hostRouting)
	}
	if why == "" {
		why = "--host-routing=" + hostRouting
	}
	bpffs := opts.BPFFS
	if bpffs == "" {
		bpffs = loader.DefaultDir
	}
	if opts.Config.IPv6Only() && !hasIPv6Underlay(opts) {
		return nil, fmt.Errorf("ebpf: an IPv6-only overlay (EnableIPv4 false) is carried over the IPv6 underlay, and %s has no global IPv6 address with room for the %d-byte VXLAN overhead: add one or set --public-ipv6",
			opts.Iface.Name, backend.VXLANOverheadV6)
	}
	if len(core.VtepMAC) == 0 {
		// An IPv6-only host without an IPv4 address has no IPv4 VTEP MAC: xnet0 and the config
		// map take the IPv6 VTEP's, as stable across restarts. Nothing publishes it as an IPv4
		// VTEP (LeaseAttrs publishes no BackendData without an IPv4 PublicIP).
		core.VtepMAC = backend.VtepMACv6(opts.Iface.PublicIPv6)
	}
	if err := loader.Probe(); err != nil {
		return nil, fmt.Errorf("ebpf: %w: %w", err, backend.ErrUnavailable)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("ebpf: get the current network namespace: %w", err)
	}
	ex, err := newExecutor(ns)
	ns.Close()
	if err != nil {
		return nil, err
	}
	var mask string
	switch opts.FlowSteering {
	case "", FlowSteeringOff:
	case FlowSteeringRPS:
		if mask, err = rpsMask(); err != nil {
			return nil, fmt.Errorf("ebpf: --flow-steering=rps: %w", err)
		}
	default:
		return nil, fmt.Errorf("ebpf: --flow-steering=%q: use off or rps", opts.FlowSteering)
	}
	return &Backend{
		VXLAN: core, decap: decap, bpffs: bpffs, exec: ex, rpsMask: mask,
		hostRouting: hostRouting, linkBuffer: linkWatchBuffer, bridgeName: opts.Bridge,
		status: Status{HostRouting: hostRouting, HostRoutingWhy: why},
		veths:  map[int]struct{}{},
		peers:  map[netip.Prefix]netip.Addr{},
		direct: newDirectState(opts),
		v6:     newIPv6State(), ipv6Underlay: hasIPv6Underlay(opts), ipv6Only: opts.Config.IPv6Only(),
	}, nil
}

// Setup loads (or re-adopts) the datapath, writes our config, brings up xnet0 with its route
// for the overlay, attaches decap to the underlay NIC, encap to xnet0 and to every container
// veth and deliver_bridge to every container bridge, and starts following docker0's veths.
// Calling it again is harmless.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	check := b.CheckSetup
	if b.ipv6Only {
		check = b.CheckSetupIPv6Only
	}
	if err := check(ctx, local, cfg); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.exec.do(func() error { return b.setupLocked(local, cfg) })
}

func (b *Backend) setupLocked(local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if b.ld == nil {
		ld, err := loader.Load(loader.Options{Dir: b.bpffs, Logger: b.Log})
		if err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		b.ld, b.m = ld, ld.Maps()
		b.status.Replaced = ld.Replaced()
		if n, err := ld.PruneDead(); err == nil && n > 0 {
			b.Log.Info("removed pins of attachments whose interface is gone", "count", n)
		}
	}
	b.SetLocal(local, cfg.Network)
	if b.ipv6Only {
		b.SetIPv6Network(cfg.IPv6Network)
	}
	b.status.BPFFS = b.bpffs

	host, err := b.ensureHostDevice(local, cfg.Network)
	if err != nil {
		return err
	}
	b.host = host
	hostLink, err := netlink.LinkByIndex(host)
	if err != nil {
		return fmt.Errorf("ebpf: %s (ifindex %d): %w", HostDevice, host, err)
	}
	nic, err := netlink.LinkByIndex(b.Iface.Index)
	if err != nil {
		return fmt.Errorf("ebpf: underlay interface %s (ifindex %d): %w", b.Iface.Name, b.Iface.Index, err)
	}
	localIP := b.Iface.IfaceIP
	if !localIP.IsValid() {
		localIP = b.Iface.PublicIP
	}
	// Config first: every program treats an unconfigured datapath as absent.
	b.config = maps.Config{
		LocalIP: localIP, Subnet: local.Subnet.Masked(), VNI: b.VNI, Port: b.Port,
		UnderlayIfindex: b.Iface.Index, UnderlayMTU: b.Iface.MTU, UnderlayMAC: nic.Attrs().HardwareAddr,
		HostIfindex: host, VtepMAC: b.VtepMAC, DirectRouting: b.direct.enabled,
		HostRoutingKernel: b.hostRouting == HostRoutingKernel,
	}
	if b.ipv6Only {
		// No IPv4 lease, and no IPv4 underlay address needed: the programs leave IPv4 alone.
		b.config.LocalIP, b.config.Subnet, b.config.IPv6Only = netip.Addr{}, netip.Prefix{}, true
	}
	if err := b.m.SetConfig(b.config); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	if err := b.setupIPv6(local, cfg, hostLink); err != nil {
		return err
	}

	a, err := b.ld.AttachTC(host, loader.Egress, loader.EncapHost)
	if err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	b.status.TCMode, b.status.TCWhy = a.Mode, a.Why
	if err := b.attachDecap(nic); err != nil {
		return err
	}
	if err := b.attachContainers(); err != nil {
		return err
	}
	if b.stopWatch == nil {
		stop, err := b.watchLinks()
		if err != nil {
			return err
		}
		b.stopWatch = stop
	}
	if b.frags == nil && b.v6.tunnel == 0 {
		// Best effort: without it only datagrams fragmented on the underlay are lost. With
		// TunnelDevice its socket owns the port and its program takes them (tunnel.go).
		if b.frags, err = b.startFragReceiver(localIP); err != nil {
			b.Log.Warn("datagrams fragmented on the underlay cannot be delivered", "err", err)
		}
	}
	b.Log.Info("ebpf datapath ready", "subnet", local.Subnet, "ipv6_subnet", b.v6.local, "underlay", b.Iface.Name, "local_ip", localIP,
		"decap", b.status.Decap, "decap_why", b.status.DecapWhy, "tc", b.status.TCMode, "containers", len(b.veths),
		"bpffs", b.bpffs)
	return nil
}

// attachDecap puts decap_tc on the underlay's TC ingress (always: it delivers what XDP
// decapsulated) and decap_xdp in XDP where --decap says so.
func (b *Backend) attachDecap(nic netlink.Link) error {
	idx := nic.Attrs().Index
	if _, err := b.ld.AttachTC(idx, loader.Ingress, loader.DecapTC); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	useXDP, why := false, ""
	switch b.decap {
	case DecapTC:
		why = "--decap=tc"
	case DecapXDP:
		useXDP, why = true, "--decap=xdp"
	default:
		if nic.Type() == "veth" {
			why = "auto: underlay is a veth, where native XDP turns TSO off on the peer and halves TCP throughput; TC ingress keeps it"
		} else {
			useXDP, why = true, "auto: physical NIC, XDP decapsulates before GRO"
		}
	}
	if !useXDP {
		if err := b.ld.Detach(idx, loader.XDP); err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		b.status.Decap, b.status.DecapWhy = DecapTC, why
		return nil
	}
	mode := loader.XDPDriverOrGeneric
	switch {
	case b.decap == DecapAuto:
		mode = loader.XDPDriverOnly
	case nic.Type() == "veth":
		// Native XDP on a veth turns TSO off on its peer: measured 1.5 Gbit/s on one TCP
		// stream against 12-13 in generic mode, which keeps TSO (and TC decap, 13-14).
		mode = loader.XDPGenericOnly
		why += "; underlay is a veth, where native XDP turns TSO off on the peer (8x slower TCP): generic mode"
	}
	a, err := b.ld.AttachXDP(idx, mode)
	if err != nil {
		if b.decap == DecapAuto {
			b.Log.Info("native XDP unavailable on the underlay, decapsulating in TC", "err", err)
			b.status.Decap, b.status.DecapWhy = DecapTC, fmt.Sprintf("auto: driver refused native XDP (%v)", err)
			return nil
		}
		return fmt.Errorf("ebpf: %w", err)
	}
	b.status.Decap, b.status.DecapWhy = a.Mode, why+"; "+a.Why
	return nil
}

// Close stops following links and releases the process's handles. The datapath stays attached
// unless teardown is asked: then every attachment, pin, xnet0 and its route go.
func (b *Backend) Close(teardown bool) error {
	b.mu.Lock()
	stop := b.stopWatch
	b.stopWatch = nil
	b.mu.Unlock()
	if stop != nil {
		stop()
	}
	b.mu.Lock()
	frags := b.frags
	b.frags = nil
	b.mu.Unlock()
	if frags != nil {
		frags.close() // outside mu: its reader takes mu for every datagram
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.exec == nil {
		return nil
	}
	var errs []error
	if b.ld != nil {
		if teardown {
			errs = append(errs, b.exec.do(func() error {
				var errs []error
				for idx := range b.veths {
					errs = append(errs, b.ld.Detach(idx, loader.Ingress))
					b.steerFlows(idx, false)
				}
				for idx := range b.bridges {
					errs = append(errs, b.ld.Detach(idx, loader.Egress))
				}
				errs = append(errs, b.ld.Detach(b.Iface.Index, loader.Ingress), b.ld.Detach(b.Iface.Index, loader.XDP),
					b.ld.Detach(b.host, loader.Egress))
				if l, err := netlink.LinkByName(HostDevice); err == nil {
					errs = append(errs, netlink.LinkDel(l))
				}
				errs = append(errs, b.removeTunnelDevice())
				errs = append(errs, removeHeadroomPort())
				errs = append(errs, b.ld.Teardown())
				return errors.Join(errs...)
			}))
		} else {
			errs = append(errs, b.ld.Close())
		}
		b.ld, b.m = nil, nil
	}
	b.exec.close()
	b.exec = nil
	return errors.Join(errs...)
}

var (
	_ backend.Backend      = (*Backend)(nil)
	_ backend.PeerPruner   = (*Backend)(nil)
	_ backend.DualStack    = (*Backend)(nil)
	_ backend.IPv6Receiver = (*Backend)(nil)
)
