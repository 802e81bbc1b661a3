// Package backend defines what a datapath is to xnetd: the Backend interface, the options every
// backend is built from, and a registry from config names ("ebpf", "vxlan", "udp", "host-gw")
// to constructors. Each backend lives in its own sub-package and exports New(Options).
//
// It also owns the two rules every VXLAN-speaking backend must agree on, so they live in one
// place: the VTEP MAC a host derives from its PublicIP, and the overlay MTU (underlay - 50).
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
	// Close stops the control side; the datapath stays up unless teardown is asked for.
	Close(teardown bool) error
}

// ExternalInterface is the underlay NIC and the address other hosts reach us on.
type ExternalInterface struct {
	Name     string
	Index    int
	MTU      int
	MAC      net.HardwareAddr
	PublicIP netip.Addr // our PublicIP (--public-ip, else the interface's address)
	IfaceIP  netip.Addr // the interface's own address
}

// Options is everything a backend constructor gets.
type Options struct {
	Iface  ExternalInterface
	Config subnetmgr.Config
	Decap  string // ebpf only: "auto", "xdp" or "tc"
	BPFFS  string // ebpf only: pin directory, default /sys/fs/bpf/xnet
	Logger *slog.Logger
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

// VXLANLeaseData is the BackendData every VXLAN-speaking backend publishes.
func VXLANLeaseData(vni int, publicIP netip.Addr) (json.RawMessage, error) {
	b, err := json.Marshal(subnetmgr.VXLANData{VNI: vni, VtepMAC: VtepMAC(publicIP).String()})
	if err != nil {
		return nil, fmt.Errorf("encode vxlan backend data: %w", err)
	}
	return b, nil
}
