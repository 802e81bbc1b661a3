package maps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/bpf"
)

// The IPv6 side of a dual-stack overlay: routes6 (peers' IPv6 subnets), config6 (our IPv6
// lease) and endpoints6 (learned container IPv6 addresses). Inner IPv6 crosses the same tunnel
// as IPv4, so a Route6 names the same peer (PublicIP, counters) as that peer's Route. On maps
// opened from the pins of a build without them (OpenPinned), reads return nothing.

// ip6 is an IPv6 address as the maps hold it (bpf/structs.h ipv6_addr): its 16 bytes in wire
// order.
func ip6(a netip.Addr) [16]uint8 { return a.As16() }

// Route6 is one remote IPv6 subnet and the peer that owns it.
type Route6 struct {
	Subnet   netip.Prefix     // the peer's IPv6Subnet
	PublicIP netip.Addr       // the peer's IPv4 PublicIP: the tunnel's outer destination; keys its counters
	VtepMAC  net.HardwareAddr // the inner destination MAC (BackendV6Data's VtepMAC)
	// PublicIPv6, when valid, is the peer's IPv6 VTEP: the subnet is reached in VXLAN over the
	// IPv6 underlay (bpf/underlay6.h), and VtepMAC is that VTEP's.
	PublicIPv6 netip.Addr
	// Direct: DirectRouting found PublicIPv6 (which must be set) on our IPv6 segment: the
	// subnet is routed plain via PublicIPv6, without VXLAN (bpf/direct6.h).
	Direct bool
}

func route6Key(subnet netip.Prefix) bpf.XnetRoute6Key {
	return bpf.XnetRoute6Key{Prefixlen: uint32(subnet.Bits()), Addr: ip6(subnet.Masked().Addr())}
}

// PutRoute6 adds or replaces the route of r.Subnet.
func (m *Maps) PutRoute6(r Route6) error {
	if !r.Subnet.Addr().Is6() || r.Subnet.Addr().Is4In6() || !r.PublicIP.Is4() {
		return fmt.Errorf("IPv6 route %v via %v: want an IPv6 subnet and an IPv4 PublicIP", r.Subnet, r.PublicIP)
	}
	mac, err := mac6(r.VtepMAC, "IPv6 route VtepMAC")
	if err != nil {
		return err
	}
	val := bpf.XnetRoute6{RemoteIp: ip4(r.PublicIP), VtepMac: mac}
	if r.Direct && !r.PublicIPv6.IsValid() {
		return fmt.Errorf("IPv6 route %v via %v: direct without a PublicIPv6 to route it via", r.Subnet, r.PublicIP)
	}
	if r.Direct {
		val.Direct = 1
	}
	if r.PublicIPv6.IsValid() {
		if !r.PublicIPv6.Is6() || r.PublicIPv6.Is4In6() {
			return fmt.Errorf("IPv6 route %v via %v: PublicIPv6 %v is not IPv6", r.Subnet, r.PublicIP, r.PublicIPv6)
		}
		val.Underlay6, val.RemoteIp6 = 1, ip6(r.PublicIPv6)
	}
	if err := m.Routes6.Put(route6Key(r.Subnet), val); err != nil {
		return fmt.Errorf("put IPv6 route %v -> %v: %w", r.Subnet, r.PublicIP, err)
	}
	return nil
}

// DeleteRoute6 removes the route of subnet; a missing route is not an error.
func (m *Maps) DeleteRoute6(subnet netip.Prefix) error {
	if err := m.Routes6.Delete(route6Key(subnet)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete IPv6 route %v: %w", subnet, err)
	}
	return nil
}

// ListRoutes6 lists every IPv6 route.
func (m *Maps) ListRoutes6() ([]Route6, error) {
	if m.Routes6 == nil {
		return nil, nil
	}
	var (
		key bpf.XnetRoute6Key
		val bpf.XnetRoute6
		out []Route6
	)
	it := m.Routes6.Iterate()
	for it.Next(&key, &val) {
		r := Route6{
			Subnet:   netip.PrefixFrom(netip.AddrFrom16(key.Addr), int(key.Prefixlen)),
			PublicIP: addrOf(val.RemoteIp),
			VtepMAC:  append(net.HardwareAddr(nil), val.VtepMac[:]...),
			Direct:   val.Direct != 0,
		}
		if val.Underlay6 != 0 {
			r.PublicIPv6 = netip.AddrFrom16(val.RemoteIp6)
		}
		out = append(out, r)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list IPv6 routes: %w", err)
	}
	return out, nil
}

// Config6 is this host's IPv6 side as the programs see it.
type Config6 struct {
	Subnet  netip.Prefix // our IPv6 lease
	Gateway netip.Addr   // the container bridge's address in it: the source of our ICMPv6 errors
	// The IPv6 underlay, when we have one: our PublicIPv6 (the outer source), the ifindex of
	// the metadata-mode vxlan device that carries VXLAN over it, and our IPv6 VTEP MAC. All
	// zero without one.
	LocalIPv6     netip.Addr
	TunnelIfindex int
	VtepMACv6     net.HardwareAddr
}

// SetConfig6 writes the config6 entry: from the next packet on, IPv6 to and from our lease is
// the datapath's.
func (m *Maps) SetConfig6(c Config6) error {
	if !c.Subnet.Addr().Is6() || c.Subnet.Addr().Is4In6() || c.Subnet.Bits() == 0 || !c.Subnet.Contains(c.Gateway) {
		return fmt.Errorf("IPv6 config: subnet %v with gateway %v: want an IPv6 subnet (not /0) holding its gateway", c.Subnet, c.Gateway)
	}
	val := bpf.XnetHostConfig6{
		SubnetAddr: ip6(c.Subnet.Masked().Addr()),
		SubnetMask: [16]uint8(net.CIDRMask(c.Subnet.Bits(), 128)),
		Gateway:    ip6(c.Gateway),
	}
	if c.TunnelIfindex != 0 {
		if !c.LocalIPv6.Is6() || c.LocalIPv6.Is4In6() {
			return fmt.Errorf("IPv6 config: tunnel device %d without an IPv6 underlay address (%v)", c.TunnelIfindex, c.LocalIPv6)
		}
		mac, err := mac6(c.VtepMACv6, "IPv6 VTEP MAC")
		if err != nil {
			return err
		}
		val.LocalIp6, val.TunnelIfindex, val.VtepMac6 = ip6(c.LocalIPv6), uint32(c.TunnelIfindex), mac
	}
	if err := m.Config6.Put(uint32(0), val); err != nil {
		return fmt.Errorf("write IPv6 config: %w", err)
	}
	return nil
}

// ClearConfig6 zeroes the config6 entry: the programs treat IPv6 as not theirs, as on a host of
// an IPv4-only overlay.
func (m *Maps) ClearConfig6() error {
	if err := m.Config6.Put(uint32(0), bpf.XnetHostConfig6{}); err != nil {
		return fmt.Errorf("clear IPv6 config: %w", err)
	}
	return nil
}

// GetConfig6 reads the config6 entry; ok is false when none is set.
func (m *Maps) GetConfig6() (c Config6, ok bool, err error) {
	if m.Config6 == nil {
		return Config6{}, false, nil
	}
	var val bpf.XnetHostConfig6
	if err := m.Config6.Lookup(uint32(0), &val); err != nil {
		return Config6{}, false, fmt.Errorf("read IPv6 config: %w", err)
	}
	bits, _ := net.IPMask(val.SubnetMask[:]).Size()
	if bits == 0 {
		return Config6{}, false, nil
	}
	c = Config6{Subnet: netip.PrefixFrom(netip.AddrFrom16(val.SubnetAddr), bits), Gateway: netip.AddrFrom16(val.Gateway)}
	if val.TunnelIfindex != 0 {
		c.LocalIPv6, c.TunnelIfindex = netip.AddrFrom16(val.LocalIp6), int(val.TunnelIfindex)
		c.VtepMACv6 = append(net.HardwareAddr(nil), val.VtepMac6[:]...)
	}
	return c, true, nil
}

func (m *Maps) listEndpoints6() ([]Endpoint, error) {
	if m.Endpoints6 == nil {
		return nil, nil
	}
	var (
		key [16]uint8
		val bpf.XnetEndpoint
		out []Endpoint
	)
	it := m.Endpoints6.Iterate()
	for it.Next(&key, &val) {
		out = append(out, Endpoint{IP: netip.AddrFrom16(key), Ifindex: int(val.Ifindex), MAC: append(net.HardwareAddr(nil), val.Mac[:]...)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list IPv6 endpoints: %w", err)
	}
	return out, nil
}
