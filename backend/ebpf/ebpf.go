// Package ebpf is xnet's eBPF backend: VXLAN in BPF programs (package bpf), wire-compatible with
// the kernel's vxlan device as flannel sets it up, without any vxlan device.
//
// It owns what the datapath is attached to on this host and what its maps say: the config
// entry, one route and one counter entry per peer, the TC attachments on every container veth
// (it follows Docker's docker0 through netlink), the routed device xnet0 for the host's own
// traffic, a down vxlan device on docker0 that only gives containers headroom for the outer
// headers (headroom.go), and the decap attachment on the underlay NIC. It does not own leases (subnetmgr),
// loading and pinning (loader) or map layouts (maps).
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
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Names of what the backend creates or follows on the host.
const (
	HostDevice     = "xnet0"  // routed device for the host's own overlay traffic
	hostDevicePeer = "xnet0p" // its veth peer (must be up for xnet0 to carry traffic)
	DockerBridge   = "docker0"
)

// Defaults of the config's Backend.VNI and Backend.Port (Linux's and flannel's).
const (
	DefaultVNI  = 1
	DefaultPort = 8472
)

// Decap modes (--decap).
const (
	DecapAuto = "auto"
	DecapXDP  = "xdp"
	DecapTC   = "tc"
)

// Status is what `xnetd status` shows about the datapath.
type Status struct {
	Decap      string              `json:"decap"`      // "tc", "xdp-driver" or "xdp-generic"
	DecapWhy   string              `json:"decap_why"`  // why that hook
	TCMode     string              `json:"tc_mode"`    // "tcx" or "clsact"
	TCWhy      string              `json:"tc_why"`     // why
	BPFFS      string              `json:"bpffs"`      // pin directory
	Containers int                 `json:"containers"` // container veths with the encap program
	Replaced   []string            `json:"replaced"`   // maps replaced at start (layout change)
	Verdicts   map[string]uint64   `json:"verdicts"`   // packets per verdict
	Peers      map[string]PeerStat `json:"peers"`      // per peer PublicIP
	Endpoints  int                 `json:"endpoints"`  // containers learned for direct delivery
}

// PeerStat is one peer's traffic.
type PeerStat = maps.PeerStats

// Backend is the eBPF backend. Its methods are safe for concurrent use.
type Backend struct {
	iface backend.ExternalInterface
	vni   int
	port  int
	decap string
	bpffs string
	log   *slog.Logger
	exec  *executor

	mu        sync.Mutex
	ld        *loader.Loader
	m         *maps.Maps
	local     subnetmgr.Lease
	network   netip.Prefix
	host      int              // ifindex of xnet0
	veths     map[int]struct{} // container veths carrying the encap program
	peers     map[netip.Prefix]netip.Addr
	status    Status
	stopWatch func()
	// headroomErr is the last failure to set up HeadroomDevice ("" when fine), so a repeated
	// one is logged once.
	headroomErr string
}

// New checks that the datapath can load here (without changing the host: the programs are
// loaded unpinned and dropped again) and returns the backend. It returns an error wrapping
// backend.ErrUnavailable when BPF cannot load. It works in the network namespace of the calling
// thread.
func New(opts backend.Options) (backend.Backend, error) {
	return NewBackend(opts)
}

// NewBackend is New with the concrete type (Status, Counters, Mode).
func NewBackend(opts backend.Options) (*Backend, error) {
	if opts.Iface.Index <= 0 || opts.Iface.Name == "" {
		return nil, fmt.Errorf("ebpf: external interface not resolved (name %q, index %d): pass --iface", opts.Iface.Name, opts.Iface.Index)
	}
	if !opts.Iface.PublicIP.Is4() {
		return nil, fmt.Errorf("ebpf: PublicIP %v is not an IPv4 address: set --public-ip", opts.Iface.PublicIP)
	}
	if opts.Iface.MTU <= backend.VXLANOverhead {
		return nil, fmt.Errorf("ebpf: interface %s MTU %d leaves no room for the %d-byte VXLAN overhead", opts.Iface.Name, opts.Iface.MTU, backend.VXLANOverhead)
	}
	vni, port := opts.Config.Backend.VNI, opts.Config.Backend.Port
	if vni == 0 {
		vni = DefaultVNI
	}
	if port == 0 {
		port = DefaultPort
	}
	if vni < 1 || vni > 1<<24-1 {
		return nil, fmt.Errorf("ebpf: Backend.VNI %d out of range: use 1..16777215", vni)
	}
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("ebpf: Backend.Port %d out of range: use 1..65535", port)
	}
	decap := opts.Decap
	if decap == "" {
		decap = DecapAuto
	}
	if decap != DecapAuto && decap != DecapXDP && decap != DecapTC {
		return nil, fmt.Errorf("ebpf: --decap=%q: use auto, xdp or tc", decap)
	}
	bpffs := opts.BPFFS
	if bpffs == "" {
		bpffs = loader.DefaultDir
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := probe(); err != nil {
		return nil, err
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
	return &Backend{
		iface: opts.Iface, vni: vni, port: port, decap: decap, bpffs: bpffs,
		log:   log.With("backend", "ebpf"),
		exec:  ex,
		veths: map[int]struct{}{},
		peers: map[netip.Prefix]netip.Addr{},
	}, nil
}

// probe loads the programs with unpinned maps and throws them away: the verifier's yes is the
// only reliable answer to "can the datapath run here".
func probe() error {
	spec, err := bpf.LoadXnet()
	if err != nil {
		return fmt.Errorf("ebpf: read the embedded datapath: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs struct {
		bpf.XnetPrograms
		bpf.XnetMaps
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		if errors.Is(err, unix.EPERM) {
			// cilium/ebpf suggests raising MEMLOCK here, but on kernels >= 5.11 (memcg
			// accounting) EPERM means privileges, not memory.
			return fmt.Errorf("ebpf: the kernel does not let xnetd load BPF (%v): it needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) and no seccomp filter on bpf(): %w", err, backend.ErrUnavailable)
		}
		return fmt.Errorf("ebpf: the kernel refuses the datapath programs: %v: %w", err, backend.ErrUnavailable)
	}
	objs.XnetPrograms.Close()
	objs.XnetMaps.Close()
	return nil
}

// LeaseAttrs publishes BackendType "vxlan" with our VNI and VTEP MAC: on the wire we are a
// kernel VXLAN device.
func (b *Backend) LeaseAttrs() (string, json.RawMessage, error) {
	data, err := backend.VXLANLeaseData(b.vni, b.iface.PublicIP)
	if err != nil {
		return "", nil, err
	}
	return subnetmgr.BackendVXLAN, data, nil
}

// MTU is the underlay MTU minus the VXLAN overhead.
func (b *Backend) MTU() int { return backend.OverlayMTU(b.iface.MTU) }

// Setup loads (or re-adopts) the datapath, writes our config, brings up xnet0 with its route
// for the overlay, attaches decap to the underlay NIC and encap to xnet0 and to every container
// veth, and starts following docker0's veths. Calling it again is harmless.
func (b *Backend) Setup(ctx context.Context, local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if !local.Subnet.IsValid() || !local.Subnet.Addr().Is4() {
		return fmt.Errorf("ebpf: our lease has no IPv4 subnet (%v)", local.Subnet)
	}
	if !cfg.Network.IsValid() {
		return fmt.Errorf("ebpf: config has no Network")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.exec.do(func() error { return b.setupLocked(local, cfg) })
}

func (b *Backend) setupLocked(local subnetmgr.Lease, cfg subnetmgr.Config) error {
	if b.ld == nil {
		ld, err := loader.Load(loader.Options{Dir: b.bpffs, Logger: b.log})
		if err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
		b.ld, b.m = ld, ld.Maps()
		b.status.Replaced = ld.Replaced()
		if n, err := ld.PruneDead(); err == nil && n > 0 {
			b.log.Info("removed pins of attachments whose interface is gone", "count", n)
		}
	}
	b.local, b.network = local, cfg.Network
	b.status.BPFFS = b.bpffs

	host, err := b.ensureHostDevice(local, cfg.Network)
	if err != nil {
		return err
	}
	b.host = host
	nic, err := netlink.LinkByIndex(b.iface.Index)
	if err != nil {
		return fmt.Errorf("ebpf: underlay interface %s (ifindex %d): %w", b.iface.Name, b.iface.Index, err)
	}
	localIP := b.iface.IfaceIP
	if !localIP.IsValid() {
		localIP = b.iface.PublicIP
	}
	// Config first: every program treats an unconfigured datapath as absent.
	if err := b.m.SetConfig(maps.Config{
		LocalIP: localIP, Subnet: local.Subnet.Masked(), VNI: b.vni, Port: b.port,
		UnderlayIfindex: b.iface.Index, UnderlayMTU: b.iface.MTU, UnderlayMAC: nic.Attrs().HardwareAddr,
		HostIfindex: host, VtepMAC: backend.VtepMAC(b.iface.PublicIP),
	}); err != nil {
		return fmt.Errorf("ebpf: %w", err)
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
	b.headroomPort()
	if b.stopWatch == nil {
		stop, err := b.watchLinks()
		if err != nil {
			return err
		}
		b.stopWatch = stop
	}
	b.log.Info("ebpf datapath ready", "subnet", local.Subnet, "underlay", b.iface.Name, "local_ip", localIP,
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
			b.log.Info("native XDP unavailable on the underlay, decapsulating in TC", "err", err)
			b.status.Decap, b.status.DecapWhy = DecapTC, fmt.Sprintf("auto: driver refused native XDP (%v)", err)
			return nil
		}
		return fmt.Errorf("ebpf: %w", err)
	}
	b.status.Decap, b.status.DecapWhy = a.Mode, why+"; "+a.Why
	return nil
}

// ensureHostDevice creates (or adopts) xnet0: a veth with ARP off, our VTEP MAC, the overlay
// MTU, subnet.0/32 as its address (so host traffic to the overlay has a source in our lease,
// as with flannel's device) and a route for the whole overlay Network. docker0's more specific
// route keeps local containers off it.
func (b *Backend) ensureHostDevice(local subnetmgr.Lease, network netip.Prefix) (int, error) {
	mtu := b.MTU()
	mac := backend.VtepMAC(b.iface.PublicIP)
	link, err := netlink.LinkByName(HostDevice)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return 0, fmt.Errorf("ebpf: look up %s: %w", HostDevice, err)
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: HostDevice, MTU: mtu, HardwareAddr: mac, Flags: net.FlagUp},
			PeerName: hostDevicePeer}
		if err := netlink.LinkAdd(veth); err != nil {
			return 0, fmt.Errorf("ebpf: create %s: %w", HostDevice, err)
		}
		if link, err = netlink.LinkByName(HostDevice); err != nil {
			return 0, fmt.Errorf("ebpf: look up %s: %w", HostDevice, err)
		}
	}
	if link.Type() != "veth" {
		return 0, fmt.Errorf("ebpf: %s exists and is a %s, not ours: delete it", HostDevice, link.Type())
	}
	if link.Attrs().HardwareAddr.String() != mac.String() {
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MAC %s: %w", HostDevice, mac, err)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MTU %d: %w", HostDevice, mtu, err)
		}
	}
	if err := netlink.LinkSetARPOff(link); err != nil {
		return 0, fmt.Errorf("ebpf: set %s arp off: %w", HostDevice, err)
	}
	if peer, err := netlink.LinkByName(hostDevicePeer); err == nil {
		if err := netlink.LinkSetUp(peer); err != nil {
			return 0, fmt.Errorf("ebpf: set %s up: %w", hostDevicePeer, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return 0, fmt.Errorf("ebpf: set %s up: %w", HostDevice, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: local.Subnet.Masked().Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return 0, fmt.Errorf("ebpf: address %s on %s: %w", addr.IPNet, HostDevice, err)
	}
	// Only our own address: an older lease's address would source packets from a subnet that
	// is no longer ours.
	if addrs, err := netlink.AddrList(link, unix.AF_INET); err == nil {
		for _, a := range addrs {
			if !a.IP.Equal(addr.IP) {
				_ = netlink.AddrDel(link, &a)
			}
		}
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixToIPNet(network), Scope: netlink.SCOPE_LINK,
		Src: addr.IP}
	if err := netlink.RouteReplace(route); err != nil {
		return 0, fmt.Errorf("ebpf: route %s dev %s: %w", network, HostDevice, err)
	}
	// Packets the decap delivers into xnet0 come from remote containers; the route above is
	// their way back, so strict rp_filter accepts them. Forwarding them to docker0 needs
	// forwarding on xnet0, which a Docker host has everywhere already.
	return link.Attrs().Index, nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// attachContainers puts the encap program on every veth enslaved to docker0.
func (b *Backend) attachContainers() error {
	bridge, err := netlink.LinkByName(DockerBridge)
	if err != nil {
		return nil // Docker has not started yet: watchLinks catches docker0's veths later
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("ebpf: list links: %w", err)
	}
	for _, l := range links {
		if l.Type() == "veth" && l.Attrs().MasterIndex == bridge.Attrs().Index {
			if err := b.attachContainer(l.Attrs().Index); err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *Backend) attachContainer(ifindex int) error {
	if _, ok := b.veths[ifindex]; ok {
		return nil
	}
	if _, err := b.ld.AttachTC(ifindex, loader.Ingress, loader.EncapContainer); err != nil {
		return fmt.Errorf("ebpf: container veth %d: %w", ifindex, err)
	}
	b.veths[ifindex] = struct{}{}
	b.status.Containers = len(b.veths)
	b.log.Debug("encap attached to container veth", "ifindex", ifindex)
	return nil
}

// watchLinks follows link changes: a veth that joins docker0 gets the encap program, a veth
// that goes away has its pin and learned containers removed.
func (b *Backend) watchLinks() (func(), error) {
	updates := make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	ns, err := b.exec.netns()
	if err != nil {
		return nil, err
	}
	var stopping atomic.Bool
	err = netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		Namespace: &ns,
		ErrorCallback: func(err error) {
			if !stopping.Load() { // closing the socket on stop reads as an error too
				b.log.Warn("link watch error: veths created meanwhile may lack the encap program until the next Setup", "err", err)
			}
		},
	})
	ns.Close()
	if err != nil {
		return nil, fmt.Errorf("ebpf: subscribe to link updates: %w", err)
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for u := range updates {
			b.handleLinkUpdate(u)
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			stopping.Store(true)
			close(done)
			// The subscription closes updates once it notices done.
			<-stopped
		})
	}, nil
}

func (b *Backend) handleLinkUpdate(u netlink.LinkUpdate) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ld == nil {
		return
	}
	idx := int(u.Index)
	if u.Header.Type == unix.RTM_DELLINK {
		if _, ok := b.veths[idx]; !ok {
			return
		}
		delete(b.veths, idx)
		b.status.Containers = len(b.veths)
		err := b.exec.do(func() error { return b.ld.Detach(idx, loader.Ingress) })
		n, errF := b.m.ForgetEndpoints(idx)
		b.log.Debug("container veth gone", "ifindex", idx, "forgotten_endpoints", n, "err", errors.Join(err, errF))
		return
	}
	if u.Link != nil && u.Attrs().Name == DockerBridge {
		// docker0 appeared, came back or changed its MTU or MAC: keep the headroom port in step.
		_ = b.exec.do(func() error { b.headroomPort(); return nil })
		return
	}
	if u.Link == nil || u.Link.Type() != "veth" || u.Attrs().MasterIndex == 0 {
		return
	}
	err := b.exec.do(func() error {
		bridge, err := netlink.LinkByName(DockerBridge)
		if err != nil || u.Attrs().MasterIndex != bridge.Attrs().Index {
			return nil
		}
		return b.attachContainer(idx)
	})
	if err != nil {
		b.log.Warn("cannot attach encap to a new container veth; its traffic to other hosts will not flow", "ifindex", idx, "name", u.Attrs().Name, "err", err)
	}
}

// AddPeer writes the peer's route and creates its counters. Our own lease (or an older lease of
// this host) is ignored.
func (b *Backend) AddPeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: AddPeer(%v) before Setup", lease.Subnet)
	}
	if b.isOwn(lease) {
		return nil
	}
	r, err := parsePeer(lease, b.vni, b.log)
	if err != nil {
		b.log.Warn("skipping peer lease", "subnet", lease.Subnet, "public_ip", lease.PublicIP, "err", err)
		return err
	}
	if old, ok := b.peers[r.Subnet]; ok && old != r.PublicIP && !b.publicIPInUse(old, r.Subnet) {
		_ = b.m.DeletePeer(old)
	}
	if err := b.m.AddPeer(r.PublicIP); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	if err := b.m.PutRoute(r); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	b.peers[r.Subnet] = r.PublicIP
	b.log.Debug("peer programmed", "subnet", r.Subnet, "public_ip", r.PublicIP, "vtep_mac", r.VtepMAC.String())
	return nil
}

// RemovePeer deletes the peer's route (and its counters when no other subnet uses its
// PublicIP). A peer that is not there is not an error.
func (b *Backend) RemovePeer(lease subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: RemovePeer(%v) before Setup", lease.Subnet)
	}
	if !lease.Subnet.IsValid() || !lease.Subnet.Addr().Is4() {
		return fmt.Errorf("ebpf: RemovePeer: lease has no IPv4 subnet (%v)", lease.Subnet)
	}
	if b.isOwn(lease) {
		return nil
	}
	subnet := lease.Subnet.Masked()
	ip, ok := b.peers[subnet]
	if !ok {
		ip = lease.PublicIP
	}
	delete(b.peers, subnet)
	if err := b.m.DeleteRoute(subnet); err != nil {
		return fmt.Errorf("ebpf: %w", err)
	}
	if ip.IsValid() && !b.publicIPInUse(ip, subnet) {
		if err := b.m.DeletePeer(ip); err != nil {
			return fmt.Errorf("ebpf: %w", err)
		}
	}
	return nil
}

// PrunePeers removes what the pinned maps still hold for peers that are not in keep
// (backend.PeerPruner): a restarted xnetd inherits the routes, counters and cached next hops of
// leases deleted while it was down, and no removal event will ever name them. Routes go by
// subnet; counter entries and cached next hops by PublicIP, kept while a kept lease or a kept
// route names it. Our own lease's subnet, the config entry, the verdict counters and the
// learned containers are this host's and never touched.
func (b *Backend) PrunePeers(keep []subnetmgr.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return fmt.Errorf("ebpf: PrunePeers before Setup")
	}
	kept := backend.NewKeptSubnets(b.local.Subnet, keep)
	keepIPs := map[netip.Addr]bool{}
	for _, l := range keep {
		if l.PublicIP.IsValid() {
			keepIPs[l.PublicIP] = true
		}
	}
	routes, err := b.m.ListRoutes()
	if err != nil {
		return fmt.Errorf("ebpf: prune: %w", err)
	}
	var errs []error
	var gone []netip.Prefix
	for _, r := range routes {
		if kept.Has(r.Subnet) {
			keepIPs[r.PublicIP] = true
			continue
		}
		if err := b.m.DeleteRoute(r.Subnet); err != nil {
			errs = append(errs, err)
			keepIPs[r.PublicIP] = true // still routed: keep counting it
			continue
		}
		gone = append(gone, r.Subnet)
	}
	for s := range b.peers {
		if !kept.Has(s) {
			delete(b.peers, s)
		}
	}
	var counters, nexthops int
	peers, err := b.m.ReadPeers()
	if err != nil {
		errs = append(errs, err)
	}
	for ip := range peers {
		if keepIPs[ip] {
			continue
		}
		if err := b.m.DeletePeer(ip); err != nil {
			errs = append(errs, err)
			continue
		}
		counters++
	}
	hops, err := b.m.ListNexthops()
	if err != nil {
		errs = append(errs, err)
	}
	for _, ip := range hops {
		if keepIPs[ip] {
			continue
		}
		if err := b.m.DeleteNexthop(ip); err != nil {
			errs = append(errs, err)
			continue
		}
		nexthops++
	}
	if len(gone)+counters+nexthops > 0 {
		b.log.Info("removed peers whose leases went away while xnetd was down", "routes", gone,
			"peer_counters", counters, "next_hops", nexthops)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ebpf: prune peers: %w", err)
	}
	return nil
}

func (b *Backend) publicIPInUse(ip netip.Addr, except netip.Prefix) bool {
	for s, p := range b.peers {
		if p == ip && s != except {
			return true
		}
	}
	return false
}

func (b *Backend) isOwn(lease subnetmgr.Lease) bool {
	return backend.IsOwnLease(b.local, b.iface.PublicIP, lease)
}

// parsePeer turns a vxlan lease into a route.
func parsePeer(lease subnetmgr.Lease, vni int, log *slog.Logger) (maps.Route, error) {
	p, err := backend.ParseVXLANPeer(lease, vni, log)
	if err != nil {
		return maps.Route{}, fmt.Errorf("ebpf: %w", err)
	}
	return maps.Route{Subnet: p.Subnet, PublicIP: p.PublicIP, VtepMAC: p.VtepMAC}, nil
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
				}
				errs = append(errs, b.ld.Detach(b.iface.Index, loader.Ingress), b.ld.Detach(b.iface.Index, loader.XDP),
					b.ld.Detach(b.host, loader.Egress))
				if l, err := netlink.LinkByName(HostDevice); err == nil {
					errs = append(errs, netlink.LinkDel(l))
				}
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

// Status reports the datapath's modes and counters.
func (b *Backend) Status() (Status, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.status
	if b.m == nil {
		return st, fmt.Errorf("ebpf: Status before Setup")
	}
	counters, err := b.m.ReadCounters()
	if err != nil {
		return st, err
	}
	st.Verdicts = map[string]uint64{}
	for name, c := range counters {
		st.Verdicts[name] = c.Packets
	}
	peers, err := b.m.ReadPeers()
	if err != nil {
		return st, err
	}
	st.Peers = map[string]PeerStat{}
	for ip, s := range peers {
		st.Peers[ip.String()] = s
	}
	if eps, err := b.m.ListEndpoints(); err == nil {
		st.Endpoints = len(eps)
	}
	return st, nil
}

// Mode says where decapsulation runs and why (metrics.ModeReporter).
func (b *Backend) Mode() (string, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.status.Decap == "" {
		return "ebpf", "not set up yet"
	}
	return b.status.Decap + "+" + b.status.TCMode, b.status.DecapWhy + "; TC: " + b.status.TCWhy
}

// Counters reports per-peer and per-verdict counters (metrics.CounterSource).
func (b *Backend) Counters() (metrics.Counters, error) {
	st, err := b.Status()
	if err != nil {
		return metrics.Counters{}, err
	}
	b.mu.Lock()
	subnets := make([]netip.Prefix, 0, len(b.peers))
	for s := range b.peers {
		subnets = append(subnets, s)
	}
	sort.Slice(subnets, func(i, j int) bool { return subnets[i].Addr().Less(subnets[j].Addr()) })
	var c metrics.Counters
	for _, s := range subnets {
		p := st.Peers[b.peers[s].String()]
		c.Peers = append(c.Peers, metrics.PeerCounters{Subnet: s, TxPackets: p.TxPackets, TxBytes: p.TxBytes, RxPackets: p.RxPackets, RxBytes: p.RxBytes})
	}
	b.mu.Unlock()
	c.Verdicts, c.Drops = metrics.SplitVerdicts(st.Verdicts)
	return c, nil
}

// executor runs functions on one OS thread inside the backend's network namespace: attaching
// takes ifindexes, and netlink and BPF resolve them in the namespace of the calling thread.
type executor struct {
	work chan func()
	ns   netns.NsHandle
}

func newExecutor(ns netns.NsHandle) (*executor, error) {
	dup, err := unix.Dup(int(ns))
	if err != nil {
		return nil, fmt.Errorf("ebpf: keep the network namespace: %w", err)
	}
	e := &executor{work: make(chan func()), ns: netns.NsHandle(dup)}
	errc := make(chan error)
	go func() {
		// Locked for good: the thread is discarded with the goroutine, never reused in
		// another namespace.
		runtime.LockOSThread()
		if err := netns.Set(e.ns); err != nil {
			errc <- fmt.Errorf("ebpf: enter network namespace: %w", err)
			return
		}
		errc <- nil
		for fn := range e.work {
			fn()
		}
	}()
	if err := <-errc; err != nil {
		e.ns.Close()
		return nil, err
	}
	return e, nil
}

func (e *executor) do(fn func() error) error {
	errc := make(chan error, 1)
	e.work <- func() { errc <- fn() }
	return <-errc
}

func (e *executor) netns() (netns.NsHandle, error) {
	dup, err := unix.Dup(int(e.ns))
	if err != nil {
		return netns.None(), fmt.Errorf("ebpf: duplicate netns handle: %w", err)
	}
	return netns.NsHandle(dup), nil
}

func (e *executor) close() {
	close(e.work)
	e.ns.Close()
}

var (
	_ backend.Backend    = (*Backend)(nil)
	_ backend.PeerPruner = (*Backend)(nil)
)
