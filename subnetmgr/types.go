// Package subnetmgr is xnet's control plane: it reads the network config from etcd, leases one
// subnet per host, renews that lease, and streams every host's lease to the caller as events.
//
// The etcd schema is flannel's (docs/design.md, etcd schema), so a host running flannel and a host running xnet
// share one etcd and one prefix. This package owns the etcd keys, the lease JSON, the config JSON
// and the subnet/Docker files; it knows nothing about datapaths (that is package backend).
package subnetmgr

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Backend types accepted in the config's Backend.Type and on the --backend flag.
const (
	BackendEBPF   = "ebpf"
	BackendVXLAN  = "vxlan"
	BackendUDP    = "udp"
	BackendHostGW = "host-gw"
	// BackendWireGuard encrypts: flannel's wireguard backend, on the wire and in the lease.
	// --backend=auto never picks it (it is not a fallback for the VXLAN-speaking ones).
	BackendWireGuard = "wireguard"
)

// Config is the operator's <prefix>/config, validated and with flannel's defaults filled in.
type Config struct {
	// EnableIPv4 is flannel's field (default true). False makes an IPv6-only overlay: Network
	// and its fields are then ignored, every lease holds only an IPv6 subnet and is stored
	// under flannel's key <prefix>/subnets/0.0.0.0-0&<ipv6>-<len> (Lease.ID).
	EnableIPv4 bool
	Network    netip.Prefix
	SubnetLen  int
	SubnetMin  netip.Addr
	SubnetMax  netip.Addr
	// EnableIPv6 makes the overlay dual stack (flannel's field): every lease also holds an
	// IPv6Network subnet of IPv6SubnetLen bits (default 64), from IPv6SubnetMin to
	// IPv6SubnetMax. With EnableIPv4 false it is the only family.
	EnableIPv6    bool
	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr
	Backend       BackendConfig
	// Raw is <prefix>/config as read, for the sections other packages own (package
	// macvlan's "Macvlan"), so they parse the same read instead of asking etcd again.
	Raw string `json:"-"`
}

// IPv6Only says whether the overlay is IPv6 only (EnableIPv4 false, EnableIPv6 true): leases
// hold no IPv4 subnet, and a lease's ID is its IPv6 subnet. A Config with a Network is not,
// whatever EnableIPv4 says: ParseConfig leaves Network empty in an IPv6-only config, and a
// Config built by hand with a Network and EnableIPv6 (as tests build them) is dual stack.
func (c Config) IPv6Only() bool { return !c.EnableIPv4 && c.EnableIPv6 && !c.Network.IsValid() }

// BackendConfig is the config's "Backend" object. VNI and Port default to 1 and 8472.
type BackendConfig struct {
	Type string
	VNI  int
	Port int
	// DirectRouting is flannel's option of the same name (default false): the VXLAN-speaking
	// backends route peers on our L2 segment without encapsulation and keep VXLAN for the rest.
	DirectRouting bool
	// WireGuard holds the wireguard backend's fields of the same object, with their defaults
	// filled in whatever the Type (--backend=wireguard may override another Type).
	WireGuard WireGuardConfig
}

// WireGuardConfig is what the wireguard backend reads from the "Backend" object: flannel's
// field names, meanings and defaults, so one config serves flannel and xnet hosts.
type WireGuardConfig struct {
	// ListenPort is the UDP port WireGuard listens on and publishes in the lease (51820).
	ListenPort int
	// ListenPortV6 is flannel's port for its IPv6 device (51821): xnet-wg-v6 listens on it in
	// a dual-stack overlay in separate mode.
	ListenPortV6 int
	// PSK is an optional pre-shared key (base64 of 32 bytes) mixed into every handshake; all
	// hosts must have the same. Never written out with the rest of the config.
	PSK string `json:"-"`
	// PersistentKeepaliveInterval sends a keepalive to every peer this often (JSON: seconds,
	// as flannel reads it); 0 turns keepalives off.
	PersistentKeepaliveInterval time.Duration
	// MTU is the underlay MTU the overlay MTU is derived from (minus WireGuard's 80 bytes);
	// 0 means the underlay interface's MTU.
	MTU int
	// Mode is flannel's address family choice: "separate" (default), "auto", "ipv4" or "ipv6"
	// (only with EnableIPv6), "ipv4" only with EnableIPv4. With an IPv4-only overlay the first
	// three all mean one device reaching peers at their IPv4 PublicIP; in a dual-stack or
	// IPv6-only one see backend/wireguard.
	Mode string
}

// Lease is one host's subnet as stored under <prefix>/subnets/<a.b.c.d>-<len>, or, in a
// dual-stack overlay, <prefix>/subnets/<a.b.c.d>-<len>&<ipv6>-<len>, or, in an IPv6-only
// overlay, <prefix>/subnets/0.0.0.0-0&<ipv6>-<len> (flannel's keys).
type Lease struct {
	// Subnet is the IPv4 subnet; the zero Prefix in an IPv6-only overlay (see ID).
	Subnet netip.Prefix
	// PublicIP is the host's IPv4 underlay address; 0.0.0.0 in an IPv6-only overlay, as
	// flannel writes it there (see Host).
	PublicIP    netip.Addr
	BackendType string          // "vxlan" for every VXLAN-speaking backend, "host-gw" otherwise
	BackendData json.RawMessage // {"VNI":1,"VtepMAC":"..."} for vxlan; may be null
	// IPv6Subnet is the lease's IPv6 subnet in a dual-stack overlay, the zero Prefix otherwise.
	IPv6Subnet netip.Prefix
	// PublicIPv6 is the host's IPv6 underlay address when it has one (flannel's field): IPv6
	// container traffic to it may cross an IPv6 underlay. Zero when absent.
	PublicIPv6 netip.Addr
	// BackendV6Data is flannel's per-family backend data for IPv6 (vxlan: the VNI and VtepMAC
	// of the device carrying IPv6); may be empty.
	BackendV6Data json.RawMessage
	// Expiration is when the etcd lease behind the key runs out; zero for a reservation
	// (a key with no TTL), which xnetd never takes unless its PublicIP is ours. Exact for
	// our own lease and in ListLeases; in WatchLeases events an estimate (a full TTL from
	// when the key was seen), since asking etcd costs one request per peer.
	Expiration time.Time
	// CreateRevision is the etcd revision that created the key (0 for a Lease not read from
	// etcd). Rewriting the key keeps it; only deleting and creating it again changes it. It
	// orders claims: of two leases naming one PublicIP, the one created first is kept
	// (ClaimsFirst), and a host owns the key it created (see KeepLease).
	CreateRevision int64
	// EtcdLeaseID is the etcd lease the key is attached to, 0 for a reservation.
	EtcdLeaseID int64
}

// ID is the subnet that names the lease: its IPv4 subnet, or its IPv6 subnet in an
// IPv6-only overlay. Whatever keys leases by subnet (peer tables, status, metrics) keys them by
// ID, so one code path serves both.
func (l Lease) ID() netip.Prefix {
	if l.Subnet.IsValid() {
		return l.Subnet
	}
	return l.IPv6Subnet
}

// Host is the underlay address that names the host holding l: its PublicIP, or its
// PublicIPv6 when PublicIP is unset or 0.0.0.0 (an IPv6-only overlay). A host finds its own
// lease by it, and of two leases naming one Host only the older is programmed.
func (l Lease) Host() netip.Addr { return l.Attrs().Host() }

// Host is Lease.Host for what a host publishes.
func (a LeaseAttrs) Host() netip.Addr {
	if a.PublicIP.IsValid() && !a.PublicIP.IsUnspecified() {
		return a.PublicIP
	}
	return a.PublicIPv6
}

// VXLANData is the BackendData of a lease whose BackendType is "vxlan".
type VXLANData struct {
	VNI     int    `json:"VNI"`
	VtepMAC string `json:"VtepMAC"`
}

// ParseVXLANData decodes a vxlan lease's BackendData. It is the only decoder of that JSON, so
// the daemon, its status and every backend read a lease the same way. It checks the shape, not
// the values: the MAC is the caller's to judge.
func ParseVXLANData(data json.RawMessage) (VXLANData, error) {
	if len(data) == 0 || string(data) == "null" {
		return VXLANData{}, errors.New(`BackendData is empty, want {"VNI":..,"VtepMAC":".."}`)
	}
	var d VXLANData
	if err := json.Unmarshal(data, &d); err != nil {
		return VXLANData{}, fmt.Errorf("BackendData %s: %w", data, err)
	}
	return d, nil
}

// WireGuardData is the BackendData of a lease whose BackendType is "wireguard", exactly as
// flannel writes it: {"PublicKey":"<base64>","Port":51820}.
type WireGuardData struct {
	PublicKey string `json:"PublicKey"`
	// Port is where the host's WireGuard listens; 0 (leases of flannel before v0.22) means
	// the reader's own ListenPort, as flannel reads it.
	Port uint16 `json:"Port"`
}

// ParseWireGuardData decodes a wireguard lease's BackendData, the only decoder of that JSON. It
// checks the shape and that PublicKey is a key (base64 of 32 bytes).
func ParseWireGuardData(data json.RawMessage) (WireGuardData, error) {
	if len(data) == 0 || string(data) == "null" {
		return WireGuardData{}, errors.New(`BackendData is empty, want {"PublicKey":"..","Port":..}`)
	}
	var d WireGuardData
	if err := json.Unmarshal(data, &d); err != nil {
		return WireGuardData{}, fmt.Errorf("BackendData %s: %w", data, err)
	}
	if k, err := base64.StdEncoding.DecodeString(d.PublicKey); err != nil || len(k) != wireGuardKeyLen {
		return WireGuardData{}, fmt.Errorf("BackendData PublicKey %q is not a WireGuard key (base64 of %d bytes)", d.PublicKey, wireGuardKeyLen)
	}
	return d, nil
}

// wireGuardKeyLen is the length of WireGuard's Curve25519 keys and of its pre-shared key.
const wireGuardKeyLen = 32

// EventType says what happened to a lease.
type EventType int

const (
	EventAdded EventType = iota + 1
	EventRemoved
	EventChanged
)

func (t EventType) String() string {
	switch t {
	case EventAdded:
		return "added"
	case EventRemoved:
		return "removed"
	case EventChanged:
		return "changed"
	}
	return "unknown"
}

// Event is one change to the set of leases. For EventRemoved, Lease holds the last known value.
type Event struct {
	Type  EventType
	Lease Lease
}

// LeaseAttrs is what a host publishes in its lease.
type LeaseAttrs struct {
	PublicIP    netip.Addr
	BackendType string
	BackendData json.RawMessage
	// PublicIPv6 and BackendV6Data are published only in a dual-stack overlay (both optional)
	// and in an IPv6-only one (PublicIPv6 required; PublicIP is then 0.0.0.0, BackendData empty).
	PublicIPv6    netip.Addr
	BackendV6Data json.RawMessage
}

// SubnetFile is the content of /run/xnet/subnet.env and /run/xnet/docker.
type SubnetFile struct {
	// Network is the overlay Network and Subnet our lease's IPv4 subnet (files show its first
	// host address as gateway: 10.244.5.1/24). Both are zero in an IPv6-only overlay.
	Network netip.Prefix
	Subnet  netip.Prefix
	// IPv6Network and IPv6Subnet are set in a dual-stack or IPv6-only overlay: Docker then
	// gets --ipv6 --fixed-cidr-v6=<IPv6Subnet>.
	IPv6Network netip.Prefix
	IPv6Subnet  netip.Prefix
	MTU         int
	IPMasq      bool
	// DNS, when valid, is given to Docker as --dns: the resolver of xnet's Docker networks
	// (package dockernet), so Docker's embedded DNS forwards it the names it does not know.
	DNS netip.Addr
}
