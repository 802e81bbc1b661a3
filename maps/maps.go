// Package maps is typed Go access to the datapath's maps: routes (peer subnets), peers (per-peer
// counters), config (this host), counters (per verdict), endpoints (learned local containers)
// and nexthops (the programs' own cache of underlay next hops), and in a dual-stack overlay their
// IPv6 counterparts routes6, config6 and endpoints6 (ipv6.go). The backend writes through it and
// `xnetd status` reads through it, from the pins under the bpffs directory.
//
// It owns the translation between Go values (netip, net.HardwareAddr) and the map layouts of
// bpf/xnet.h (the generated bpf.Xnet* types). It does not load programs, create or pin maps:
// that is package loader.
package maps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/xnet-dev/xnet/bpf"
)

// Names of the pinned maps (the files under the bpffs directory).
const (
	RoutesName    = bpf.XnetMapRoutes
	PeersName     = bpf.XnetMapPeers
	ConfigName    = bpf.XnetMapConfig
	CountersName  = bpf.XnetMapCounters
	EndpointsName = bpf.XnetMapEndpoints
	NexthopsName  = bpf.XnetMapNexthops
	// The IPv6 side of a dual-stack overlay (ipv6.go).
	Routes6Name    = bpf.XnetMapRoutes6
	Config6Name    = bpf.XnetMapConfig6
	Endpoints6Name = bpf.XnetMapEndpoints6
	// ICMPBucketsName is the programs' own rate limit of the ICMP errors they send.
	ICMPBucketsName = bpf.XnetMapIcmpBuckets
)

// Names lists every map the datapath pins.
func Names() []string {
	return []string{RoutesName, PeersName, ConfigName, CountersName, EndpointsName, NexthopsName,
		Routes6Name, Config6Name, Endpoints6Name, ICMPBucketsName}
}

// Maps holds the datapath's maps. The zero value is unusable; get one from loader or
// OpenPinned.
type Maps struct {
	Routes, Peers, Config, Counters, Endpoints, Nexthops *ebpf.Map
	// Routes6, Config6 and Endpoints6 are nil when OpenPinned found the pins of a build without
	// IPv6; the IPv6 methods then read as empty.
	Routes6, Config6, Endpoints6 *ebpf.Map
	// ICMPBuckets is the programs' own state (bpf/maps.h icmp_allowed); nil from OpenPinned.
	ICMPBuckets *ebpf.Map
}

// FromObjects wraps maps loaded from the generated bindings.
func FromObjects(m *bpf.XnetMaps) *Maps {
	return &Maps{Routes: m.Routes, Peers: m.Peers, Config: m.Config, Counters: m.Counters, Endpoints: m.Endpoints, Nexthops: m.Nexthops,
		Routes6: m.Routes6, Config6: m.Config6, Endpoints6: m.Endpoints6, ICMPBuckets: m.IcmpBuckets}
}

// ByName is every map by its pin name, for the loader, which loads, replaces and pins them all
// alike.
func (m *Maps) ByName() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		RoutesName: m.Routes, PeersName: m.Peers, ConfigName: m.Config, CountersName: m.Counters,
		EndpointsName: m.Endpoints, NexthopsName: m.Nexthops,
		Routes6Name: m.Routes6, Config6Name: m.Config6, Endpoints6Name: m.Endpoints6, ICMPBucketsName: m.ICMPBuckets,
	}
}

// OpenPinned opens the maps pinned in dir (for `xnetd status`, which must not load programs).
// The IPv6 maps are optional: a daemon of an older build, still running, has none.
func OpenPinned(dir string) (*Maps, error) {
	open := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w (is xnetd running with --bpffs=%s?)", filepath.Join(dir, name), err, dir)
		}
		return m, nil
	}
	var m Maps
	var err error
	for _, f := range []struct {
		name     string
		dst      **ebpf.Map
		optional bool
	}{{RoutesName, &m.Routes, false}, {PeersName, &m.Peers, false}, {ConfigName, &m.Config, false}, {CountersName, &m.Counters, false},
		{EndpointsName, &m.Endpoints, false}, {NexthopsName, &m.Nexthops, false},
		{Routes6Name, &m.Routes6, true}, {Config6Name, &m.Config6, true}, {Endpoints6Name, &m.Endpoints6, true}} {
		if *f.dst, err = open(f.name); err != nil {
			if f.optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			m.Close()
			return nil, err
		}
	}
	return &m, nil
}

// Close closes the map handles (pins and the kernel's maps stay).
func (m *Maps) Close() error {
	var errs []error
	for _, mp := range []*ebpf.Map{m.Routes, m.Peers, m.Config, m.Counters, m.Endpoints, m.Nexthops, m.Routes6, m.Config6, m.Endpoints6, m.ICMPBuckets} {
		if mp != nil {
			errs = append(errs, mp.Close())
		}
	}
	return errors.Join(errs...)
}

// ip4 is an IPv4 address as the maps hold it (bpf/xnet.h ipv4_addr): its four bytes in wire
// order, which bpftool prints as [10,244,5,0].
func ip4(a netip.Addr) [4]uint8 { return a.As4() }

func addrOf(v [4]uint8) netip.Addr { return netip.AddrFrom4(v) }

// underlayKey is a peer's underlay address as the nexthops and peers maps key it (bpf/structs.h
// underlay_addr): IPv6, or IPv4 mapped into IPv6 (::ffff:a.b.c.d), 16 bytes in wire order.
func underlayKey(a netip.Addr) ([16]uint8, error) {
	if !a.IsValid() {
		return [16]uint8{}, fmt.Errorf("no underlay address")
	}
	return a.As16(), nil
}

// underlayAddr is the address of an underlay_addr key: IPv4 for a mapped one.
func underlayAddr(k [16]uint8) netip.Addr { return netip.AddrFrom16(k).Unmap() }

func mac6(mac net.HardwareAddr, field string) ([6]uint8, error) {
	var out [6]uint8
	if len(mac) != 6 {
		return out, fmt.Errorf("%s %q is not a 6-byte Ethernet MAC", field, mac)
	}
	copy(out[:], mac)
	return out, nil
}

// Route is one remote subnet and the peer that owns it.
type Route struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
	VtepMAC  net.HardwareAddr
	// Direct routes the subnet plain via PublicIP, without VXLAN: the peer is on our L2
	// segment and DirectRouting is on (bpf/direct.h).
	Direct bool
}

// PutRoute adds or replaces the route of r.Subnet.
func (m *Maps) PutRoute(r Route) error {
	if !r.Subnet.Addr().Is4() || !r.PublicIP.Is4() {
		return fmt.Errorf("route %v via %v: only IPv4 subnets and PublicIPs are supported", r.Subnet, r.PublicIP)
	}
	mac, err := mac6(r.VtepMAC, "route VtepMAC")
	if err != nil {
		return err
	}
	key := bpf.XnetRouteKey{Prefixlen: uint32(r.Subnet.Bits()), Addr: ip4(r.Subnet.Masked().Addr())}
	val := bpf.XnetRoute{RemoteIp: ip4(r.PublicIP), VtepMac: mac}
	if r.Direct {
		val.Direct = 1
	}
	if err := m.Routes.Put(key, val); err != nil {
		return fmt.Errorf("put route %v -> %v: %w", r.Subnet, r.PublicIP, err)
	}
	return nil
}

// DeleteRoute removes the route of subnet; a missing route is not an error.
func (m *Maps) DeleteRoute(subnet netip.Prefix) error {
	key := bpf.XnetRouteKey{Prefixlen: uint32(subnet.Bits()), Addr: ip4(subnet.Masked().Addr())}
	if err := m.Routes.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete route %v: %w", subnet, err)
	}
	return nil
}

// ListRoutes lists every route.
func (m *Maps) ListRoutes() ([]Route, error) {
	var (
		key bpf.XnetRouteKey
		val bpf.XnetRoute
		out []Route
	)
	it := m.Routes.Iterate()
	for it.Next(&key, &val) {
		out = append(out, Route{
			Subnet:   netip.PrefixFrom(addrOf(key.Addr), int(key.Prefixlen)),
			PublicIP: addrOf(val.RemoteIp),
			VtepMAC:  append(net.HardwareAddr(nil), val.VtepMac[:]...),
			Direct:   val.Direct != 0,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return out, nil
}

// Config is this host as the programs see it.
type Config struct {
	LocalIP         netip.Addr   // underlay address: outer source, accepted outer destination
	Subnet          netip.Prefix // our lease
	VNI             int
	Port            int
	UnderlayIfindex int
	UnderlayMTU     int
	UnderlayMAC     net.HardwareAddr
	HostIfindex     int // xnet0; 0 delivers unknown destinations to the stack
	VtepMAC         net.HardwareAddr
	// DirectRouting is the config's Backend.DirectRouting: the programs check plain routed
	// packets from peers on our segment (bpf/direct.h).
	DirectRouting bool
	// HostRoutingKernel is --host-routing=kernel: container traffic takes the host's stack
	// both ways; the programs only learn containers and shorten the bridge hop.
	HostRoutingKernel bool
	// IPv6Only is an IPv6-only overlay (EnableIPv4 false): LocalIP and Subnet stay unset
	// (the host has no IPv4 lease) and the programs leave IPv4 alone.
	IPv6Only bool
}

// SetConfig writes the config entry. The programs read it per packet, so the change is atomic
// per packet.
func (m *Maps) SetConfig(c Config) error {
	switch {
	case c.IPv6Only && (c.LocalIP.IsValid() || c.Subnet.IsValid()):
		return fmt.Errorf("config: an IPv6-only config has no LocalIP or Subnet (got %v, %v)", c.LocalIP, c.Subnet)
	case !c.IPv6Only && (!c.LocalIP.Is4() || !c.Subnet.Addr().Is4()):
		return fmt.Errorf("config: LocalIP %v and Subnet %v must be IPv4", c.LocalIP, c.Subnet)
	}
	// VNI 0 is a valid VNI (the kernel's vxlan and flannel accept it).
	if c.VNI < 0 || c.VNI >= 1<<24 || c.Port <= 0 || c.Port > 65535 || c.UnderlayMTU <= 0 || c.UnderlayMTU > 65535 {
		return fmt.Errorf("config: VNI %d, Port %d or UnderlayMTU %d out of range", c.VNI, c.Port, c.UnderlayMTU)
	}
	vtep, err := mac6(c.VtepMAC, "config VtepMAC")
	if err != nil {
		return err
	}
	nic, err := mac6(c.UnderlayMAC, "config UnderlayMAC")
	if err != nil {
		return err
	}
	val := bpf.XnetHostConfig{
		Vni:             uint32(c.VNI),
		UnderlayIfindex: uint32(c.UnderlayIfindex),
		HostIfindex:     uint32(c.HostIfindex),
		Port:            uint16(c.Port),
		UnderlayMtu:     uint16(c.UnderlayMTU),
		VtepMac:         vtep,
		UnderlayMac:     nic,
	}
	if c.DirectRouting {
		val.DirectRouting = 1
	}
	if c.HostRoutingKernel {
		val.HostRoutingKernel = 1
	}
	if c.IPv6Only {
		val.Ipv6Only = 1
	} else {
		val.LocalIp, val.SubnetAddr = ip4(c.LocalIP), ip4(c.Subnet.Masked().Addr())
		val.SubnetMask = [4]uint8(net.CIDRMask(c.Subnet.Bits(), 32))
	}
	if err := m.Config.Put(uint32(0), val); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// GetConfig reads the config entry; ok is false when it was never written.
func (m *Maps) GetConfig() (c Config, ok bool, err error) {
	var val bpf.XnetHostConfig
	if err := m.Config.Lookup(uint32(0), &val); err != nil {
		return Config{}, false, fmt.Errorf("read config: %w", err)
	}
	if val.LocalIp == [4]uint8{} && val.Ipv6Only == 0 {
		return Config{}, false, nil
	}
	c = Config{
		VNI:               int(val.Vni),
		Port:              int(val.Port),
		UnderlayIfindex:   int(val.UnderlayIfindex),
		UnderlayMTU:       int(val.UnderlayMtu),
		UnderlayMAC:       append(net.HardwareAddr(nil), val.UnderlayMac[:]...),
		HostIfindex:       int(val.HostIfindex),
		VtepMAC:           append(net.HardwareAddr(nil), val.VtepMac[:]...),
		DirectRouting:     val.DirectRouting != 0,
		HostRoutingKernel: val.HostRoutingKernel != 0,
		IPv6Only:          val.Ipv6Only != 0,
	}
	if !c.IPv6Only {
		bits, _ := net.IPMask(val.SubnetMask[:]).Size()
		c.LocalIP, c.Subnet = addrOf(val.LocalIp), netip.PrefixFrom(addrOf(val.SubnetAddr), bits)
	}
	return c, true, nil
}

// Counter is packets and bytes summed over CPUs.
type Counter struct {
	Packets, Bytes uint64
}

// VerdictNames returns "encap", "decap", "pass", "drop_spoofed", ... in the order of enum verdict
// (bpf/xnet.h), read from the BTF of the embedded object so they cannot drift from the C.
func VerdictNames() ([]string, error) {
	spec, err := bpf.LoadXnet()
	if err != nil {
		return nil, err
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("verdict", &enum); err != nil {
		return nil, fmt.Errorf("enum verdict in the datapath's BTF: %w", err)
	}
	names := make([]string, bpf.XnetVerdictVERDICT_MAX)
	for _, v := range enum.Values {
		if v.Value < uint64(len(names)) {
			names[v.Value] = strings.ToLower(strings.TrimPrefix(v.Name, "VERDICT_"))
		}
	}
	return names, nil
}

// ReadCounters returns the per-verdict counters keyed by verdict name.
func (m *Maps) ReadCounters() (map[string]Counter, error) {
	names, err := VerdictNames()
	if err != nil {
		return nil, err
	}
	out := make(map[string]Counter, len(names))
	for i, name := range names {
		var per []bpf.XnetCounter
		if err := m.Counters.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		var c Counter
		for _, p := range per {
			c.Packets += p.Packets
			c.Bytes += p.Bytes
		}
		out[name] = c
	}
	return out, nil
}

// PeerStats is one peer's traffic, summed over CPUs.
type PeerStats struct {
	TxPackets, TxBytes, RxPackets, RxBytes uint64
}

// AddPeer makes sure the peer at addr has a counter entry (the programs only count into
// existing entries); existing counts are kept. addr is what the programs count the peer under:
// its PublicIP, or in an IPv6-only overlay, where it has none, its PublicIPv6 (bpf/maps.h
// route6_peer).
func (m *Maps) AddPeer(addr netip.Addr) error {
	key, err := underlayKey(addr)
	if err != nil {
		return fmt.Errorf("add peer counters: %w", err)
	}
	zero := make([]bpf.XnetPeerStats, ebpf.MustPossibleCPU())
	err = m.Peers.Update(key, zero, ebpf.UpdateNoExist)
	if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("add peer counters for %v: %w", addr, err)
	}
	return nil
}

// DeletePeer removes the counters of the peer at addr; missing is not an error.
func (m *Maps) DeletePeer(addr netip.Addr) error {
	key, err := underlayKey(addr)
	if err != nil {
		return fmt.Errorf("delete peer counters: %w", err)
	}
	if err := m.Peers.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete peer counters for %v: %w", addr, err)
	}
	return nil
}

// ReadPeers returns every peer's counters keyed by the address AddPeer was given (IPv4 as
// IPv4).
func (m *Maps) ReadPeers() (map[netip.Addr]PeerStats, error) {
	var (
		key [16]uint8
		per []bpf.XnetPeerStats
	)
	out := map[netip.Addr]PeerStats{}
	it := m.Peers.Iterate()
	for it.Next(&key, &per) {
		var s PeerStats
		for _, p := range per {
			s.TxPackets += p.TxPackets
			s.TxBytes += p.TxBytes
			s.RxPackets += p.RxPackets
			s.RxBytes += p.RxBytes
		}
		out[underlayAddr(key)] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read peer counters: %w", err)
	}
	return out, nil
}

// ListNexthops returns the peer underlay addresses the programs have cached an underlay next
// hop for: PublicIPs (IPv4), and the PublicIPv6 of DirectRouting peers on our IPv6 segment.
func (m *Maps) ListNexthops() ([]netip.Addr, error) {
	var (
		key [16]uint8
		val bpf.XnetNexthop
		out []netip.Addr
	)
	it := m.Nexthops.Iterate()
	for it.Next(&key, &val) {
		out = append(out, underlayAddr(key))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list next hops: %w", err)
	}
	return out, nil
}

// DeleteNexthop drops the cached next hop towards addr (a PublicIP or PublicIPv6); missing is
// not an error.
func (m *Maps) DeleteNexthop(addr netip.Addr) error {
	key, err := underlayKey(addr)
	if err != nil {
		return fmt.Errorf("delete next hop: %w", err)
	}
	if err := m.Nexthops.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete next hop of %v: %w", addr, err)
	}
	return nil
}

// Endpoint is a local container the encap program has seen.
type Endpoint struct {
	IP      netip.Addr
	Ifindex int // host side of its veth
	MAC     net.HardwareAddr
}

// ListEndpoints returns every learned container address, IPv4 and IPv6.
func (m *Maps) ListEndpoints() ([]Endpoint, error) {
	var (
		key [4]uint8
		val bpf.XnetEndpoint
		out []Endpoint
	)
	it := m.Endpoints.Iterate()
	for it.Next(&key, &val) {
		out = append(out, Endpoint{IP: addrOf(key), Ifindex: int(val.Ifindex), MAC: append(net.HardwareAddr(nil), val.Mac[:]...)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	v6, err := m.listEndpoints6()
	if err != nil {
		return nil, err
	}
	return append(out, v6...), nil
}

// ForgetEndpoints removes the learned container addresses behind ifindex (its veth is gone),
// IPv4 and IPv6, and returns how many there were.
func (m *Maps) ForgetEndpoints(ifindex int) (int, error) {
	eps, err := m.ListEndpoints()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, ep := range eps {
		if ep.Ifindex != ifindex {
			continue
		}
		if ep.IP.Is4() {
			err = m.Endpoints.Delete(ip4(ep.IP))
		} else {
			err = m.Endpoints6.Delete(ip6(ep.IP))
		}
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("forget endpoint %v: %w", ep.IP, err)
		}
		n++
	}
	return n, nil
}
