// Package backend defines what a datapath is to xnetd: the Backend interface, the options every
// backend is built from, and a registry from config names ("ebpf", "vxlan", "udp", "host-gw")
// to constructors. Each backend lives in its own sub-package and exports New(Options).
//
// It also holds what backends share (core.go): Base, the checks and lease bookkeeping of every
// backend, and VXLAN, the core the VXLAN-speaking backends (ebpf, vxlan, udp) embed, with the
// rules they must agree on in one place: the VTEP MAC a host derives from its PublicIP, what
// a host publishes in its lease, how a peer lease is read, and the overlay MTU (underlay - 50).
// Config defaults and validation are not here: subnetmgr.ParseConfig settles them, and
// backends trust the Config they get.
package backend

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"

	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Backend is one datapath. xnetd builds it, asks it what to publish in the lease, acquires the
// lease, calls Setup once, then AddPeer/RemovePeer for every lease event of other hosts.
type Backend interface {
	// LeaseAttrs is what this host publishes in its lease (BackendType and BackendData).
	LeaseAttrs() (backendType string, data json.RawMessage, err error)
	// Setup prepares the local datapath for our lease (devices, programs, routes).
	Setup(ctx context.Context, local subnetmgr.Lease, net subnetmgr.Config) error
	// AddPeer / RemovePeer reconcile one remote lease into the datapath; idempotent.
	AddPeer(peer subnetmgr.Lease) error
	RemovePeer(peer subnetmgr.Lease) error
	// MTU is the MTU containers must use (Docker's --mtu).
	MTU() int
	// Mode says how the backend runs here, in a short word ("tc+tcx", "kernel", "routes"),
	// and why, for `xnetd status`, the log and xnet_backend_info.
	Mode() (mode, reason string)
	// Close stops the control side; the datapath stays up unless teardown is asked for.
	Close(teardown bool) error
}

// DualStack is implemented by backends that carry IPv6 container traffic. In a dual-stack
// overlay (Config.EnableIPv6) Setup's local lease and every peer lease AddPeer gets may hold an
// IPv6Subnet (a peer's only when the trust rule accepted it; a peer without one is reached
// over IPv4 only), and PublicIPv6/BackendV6Data when the host has an IPv6 underlay address.
// xnetd refuses EnableIPv6 with a backend that does not implement DualStack.
type DualStack interface {
	// LeaseAttrsV6 is what this host publishes as BackendV6Data (nil: nothing).
	LeaseAttrsV6() (json.RawMessage, error)
}

// IPv6Receiver is implemented by dual-stack backends that can take IPv6 container traffic
// arriving on our IPv6 underlay address (vxlan's IPv6 device, ebpf's metadata-mode one,
// host-gw's routes). xnetd publishes PublicIPv6 only when ReceivesOnIPv6Underlay says so: a peer
// configured as flannel sends IPv6 to a PublicIPv6, and a backend that listens only on IPv4
// (udp) would drop it there.
type IPv6Receiver interface {
	ReceivesOnIPv6Underlay() bool
}

// IPv6LeaseAttrs is what a dual-stack host publishes for IPv6 besides its subnets: its IPv6
// underlay address (PublicIPv6) and b's BackendV6Data, both or neither. Both only when b takes
// IPv6 on that address (IPv6Receiver): flannel reads the pair as an IPv6 VTEP at PublicIPv6 (and
// v0.28 dereferences PublicIPv6 without a check once BackendV6Data parses). Without them peers
// send our IPv6 to our IPv4 VTEP (ParseVXLANPeerV6), where udp (and ebpf without an IPv6
// underlay) take it. b must
// implement DualStack.
func IPv6LeaseAttrs(b Backend, iface ExternalInterface) (publicIPv6 netip.Addr, data json.RawMessage, err error) {
	ds, ok := b.(DualStack)
	if !ok {
		return netip.Addr{}, nil, fmt.Errorf("backend does not carry IPv6 (no DualStack)")
	}
	r, ok := b.(IPv6Receiver)
	if !ok || !r.ReceivesOnIPv6Underlay() || !iface.PublicIPv6.IsValid() {
		return netip.Addr{}, nil, nil
	}
	if data, err = ds.LeaseAttrsV6(); err != nil {
		return netip.Addr{}, nil, err
	}
	return iface.PublicIPv6, data, nil
}

// PeerPruner is implemented by backends whose per-peer state survives a restart of xnetd
// (pinned BPF maps, kernel routes and neighbour entries). A lease deleted while xnetd was down
// never produces a removal event, so after the first full lease list has been applied the
// daemon calls PrunePeers with every peer lease it knows, and the backend removes whatever
// else it still holds for remote subnets. Leases it does not hold are not added here.
type PeerPruner interface {
	PrunePeers(keep []subnetmgr.Lease) error
}

// HostRouter is implemented by backends whose datapath can take container traffic past the
// host's stack (ebpf). SetHostRouting switches between "bpf" and "kernel" while running, so a
// firewall rule that appears later applies to every packet from then on; why is shown in
// status.
type HostRouter interface {
	HostRouting() string
	SetHostRouting(mode, why string) error
}

// KeptSubnets is what a PrunePeers call keeps, by subnet: our own and every kept lease's (their
// IPv6 subnets too, in a dual-stack overlay); and the kept leases' PublicIPs and PublicIPv6s,
// the hosts a route via which may be xnet's (StaleVia).
type KeptSubnets struct {
	local  netip.Prefix
	local6 netip.Prefix // our IPv6 subnet in a dual-stack overlay, else invalid
	kept   map[netip.Prefix]bool
	gwAddr map[netip.Addr]bool
	hosts  map[netip.Addr]bool
}

// NewKeptSubnets is the set PrunePeers keeps for our lease local and the leases in keep.
func NewKeptSubnets(local netip.Prefix, keep []subnetmgr.Lease) KeptSubnets {
	return KeptFor(subnetmgr.Lease{Subnet: local}, keep)
}

// KeptFor is NewKeptSubnets for our whole lease: its IPv4 subnet and, in a dual-stack overlay,
// its IPv6 subnet are never stale. A kept lease keeps both of its subnets, and routes via both
// of its underlay addresses may be xnet's.
func KeptFor(local subnetmgr.Lease, keep []subnetmgr.Lease) KeptSubnets {
	k := KeptSubnets{local: local.Subnet.Masked(), kept: map[netip.Prefix]bool{}, gwAddr: map[netip.Addr]bool{},
		hosts: map[netip.Addr]bool{}}
	k.add(k.local)
	if local.IPv6Subnet.IsValid() {
		k.local6 = local.IPv6Subnet.Masked()
		k.add(k.local6)
	}
	for _, l := range keep {
		for _, s := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
			if s.IsValid() {
				k.add(s.Masked())
			}
		}
		for _, a := range []netip.Addr{l.PublicIP, l.PublicIPv6} {
			if a.IsValid() {
				k.hosts[a] = true
			}
		}
	}
	return k
}

func (k KeptSubnets) add(p netip.Prefix) {
	if !p.IsValid() {
		return
	}
	k.kept[p] = true
	k.gwAddr[p.Addr()] = true
}

// Has says whether subnet is kept.
func (k KeptSubnets) Has(subnet netip.Prefix) bool { return k.kept[subnet.Masked()] }

// HasSubnetAddr says whether a is the subnet address of a kept subnet (what the vxlan backend's
// per-peer route gateway and neighbour entry are keyed by).
func (k KeptSubnets) HasSubnetAddr(a netip.Addr) bool { return k.gwAddr[a] }

// Stale says whether dst, a destination found in a datapath only xnet writes (the vxlan and udp
// devices, the ebpf routes map) that outlived xnetd, is one no kept lease accounts for. Nothing
// but peer routes lives there, so every destination not kept is stale: a lease deleted while
// xnetd was down, and what an older build programmed for a lease the trust rule refuses
// (0.0.0.0/1, a subnet outside network, a /25 inside our own subnet). Our own subnet is never
// stale; a kept lease's subnet is stale all the same when it is not strictly inside network
// (when network is set: no lease the trust rule accepts is). network is the overlay network of
// dst's family (NetworkOf): the IPv6Network for an IPv6 destination.
//
// Design history: Stale used to answer only for destinations strictly inside network and
// outside our subnet, calling everything else "not ours". An older build programmed exactly
// those destinations from forged leases (a /1 overriding the default route, a /25 capturing
// our own containers' traffic), and a restart kept them.
func (k KeptSubnets) Stale(network, dst netip.Prefix) bool {
	dst = dst.Masked()
	switch {
	case !dst.IsValid():
		return false
	case dst == k.local || k.local6.IsValid() && dst == k.local6:
		return false
	case !k.Has(dst):
		return true
	}
	return network.IsValid() && !strictlyInside(network, dst)
}

// StaleVia is Stale for a route to dst via gw on a NIC xnet shares with the host's own routes
// (host-gw's underlay NIC), where only what xnet can tell is its own may go: a route strictly
// inside network (peers' subnets, or part of ours: Stale decides), or a route elsewhere via a
// host that holds a kept lease (host-gw routes via peers; an older build did so for 0.0.0.0/1
// or a subnet outside the Network). Everything else is the host's: the default route, a route
// to another network via a router, even one covering the Network. A forged lease pointing at an
// address that holds no lease therefore leaves its route behind on a host an older build ran
// on; it has to be deleted by hand.
func (k KeptSubnets) StaleVia(network, dst netip.Prefix, gw netip.Addr) bool {
	dst = dst.Masked()
	switch {
	case !dst.IsValid() || dst.Bits() == 0:
		return false
	case network.IsValid() && strictlyInside(network, dst):
		return k.Stale(network, dst)
	}
	return k.hosts[gw] && !k.Has(dst)
}

// strictlyInside says whether p lies inside network and is smaller than it.
func strictlyInside(network, p netip.Prefix) bool {
	return network.Contains(p.Addr()) && p.Bits() > network.Bits()
}

// NetworkOf is the one of networks (the overlay's IPv4 Network and, dual stack, its
// IPv6Network) of dst's address family, the zero Prefix when none is: what Stale and StaleVia
// judge a destination against when a device or NIC holds routes of both families.
func NetworkOf(dst netip.Prefix, networks ...netip.Prefix) netip.Prefix {
	for _, n := range networks {
		if n.IsValid() && n.Addr().Is4() == dst.Addr().Is4() {
			return n
		}
	}
	return netip.Prefix{}
}

// ExternalInterface is the underlay NIC and the address other hosts reach us on.
type ExternalInterface struct {
	Name     string
	Index    int
	MTU      int
	MAC      net.HardwareAddr
	PublicIP netip.Addr // our PublicIP (--public-ip, else the interface's address)
	IfaceIP  netip.Addr // the interface's own address
	// PublicIPv6 is our IPv6 underlay address in a dual-stack overlay (--public-ipv6, else the
	// interface's first global IPv6 address); zero when the host has none, and then IPv6
	// container traffic crosses the IPv4 underlay.
	PublicIPv6 netip.Addr
}

// Options is everything a backend constructor gets.
type Options struct {
	Iface  ExternalInterface
	Config subnetmgr.Config
	Decap  string // ebpf only: "auto", "xdp" or "tc"
	// HostRouting is ebpf only: "bpf" (containers' packets skip the host's routing and
	// netfilter both ways) or "kernel" (they take the host's stack, so its firewall rules
	// apply); empty means bpf. xnetd resolves --host-routing=auto before building backends.
	HostRouting string
	// HostRoutingWhy says why HostRouting was chosen, for status and logs.
	HostRoutingWhy string
	// Bridge is ebpf only: the container bridge by name (--bridge); empty finds every bridge
	// holding an address in our lease, whatever it is called.
	Bridge string
	// FlowSteering is ebpf only: "rps" turns on RPS on every container veth, so each flow a
	// container sends is processed by one CPU and keeps its order (--flow-steering); "" or
	// "off" leaves the veths as they are.
	FlowSteering string
	BPFFS        string // ebpf only: pin directory, default /sys/fs/bpf/xnet
	// StateDir is where a backend keeps what must outlive xnetd and is not in the kernel
	// (wireguard: its private key). xnetd passes the directory of its state file.
	StateDir string
	// FDStore, when a service manager runs xnetd, keeps the fds of a datapath that lives in
	// the process (TUN queues, sockets) across its restarts (see FDName); nil without one.
	FDStore *fdstore.Store
	Logger  *slog.Logger
}

// Constructor builds a backend. It must not change the host: that is Setup's job. It returns
// an error (wrapped ErrUnavailable when the host lacks what the backend needs) so that
// --backend=auto can move on to the next one.
type Constructor func(Options) (Backend, error)

// ErrUnavailable marks a backend that cannot run on this host (no BPF, no vxlan module, ...).
var ErrUnavailable = fmt.Errorf("backend unavailable on this host")

// Registry maps backend names to constructors. xnetd builds one in main from the
// sub-packages' New functions; there is no package-level registry.
type Registry struct {
	mu    sync.Mutex
	ctors map[string]Constructor
}

// Register adds a constructor under name. It panics on a duplicate name (a programming error).
func (r *Registry) Register(name string, c Constructor) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctors == nil {
		r.ctors = map[string]Constructor{}
	}
	if _, dup := r.ctors[name]; dup {
		panic("backend: duplicate registration of " + name)
	}
	r.ctors[name] = c
}

// Lookup returns the constructor registered under name.
func (r *Registry) Lookup(name string) (Constructor, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.ctors[name]
	return c, ok
}

// Names lists the registered backends, sorted.
func (r *Registry) Names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	names := make([]string, 0, len(r.ctors))
	for n := range r.ctors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
