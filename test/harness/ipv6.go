package harness

import (
	"context"
	"fmt"
	"net/netip"
	"time"
)

// IPv6 underlay addressing (Host.AddIPv6Underlay), next to the IPv4 one: br0 in the underlay
// namespace is the gateway, host i (0-based) is fd00:198:18::(11+i).
var (
	UnderlayPrefixV6  = netip.MustParsePrefix("fd00:198:18::/64")
	UnderlayGatewayV6 = netip.MustParseAddr("fd00:198:18::1")
)

// AddIPv6Underlay gives the host an IPv6 underlay address next to its IPv4 one, as a
// dual-stack machine has: eth0 gets fd00:198:18::(11+i)/64 and a default route via
// UnderlayGatewayV6 (which br0 gets), and UnderlayIPv6 is set. Addresses skip duplicate
// address detection, so they work at once. A host without it reaches the others over IPv4 only.
// One segment only: a two-segment topology's router does not route IPv6.
func (h *Host) AddIPv6Underlay(ctx context.Context) error {
	if h.topo.twoSegments {
		return fmt.Errorf("harness: %s: AddIPv6Underlay needs a one-segment topology", h.Name)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.UnderlayIPv6.IsValid() {
		return nil
	}
	gw := netip.PrefixFrom(UnderlayGatewayV6, UnderlayPrefixV6.Bits())
	if err := h.topo.underlay.IP(ctx, fmt.Sprintf("addr replace %s dev br0 nodad", gw)); err != nil {
		return fmt.Errorf("harness: IPv6 gateway on br0: %w", err)
	}
	a := UnderlayPrefixV6.Addr().As16()
	a[15] = byte(hostAddrBase + h.Index)
	ip := netip.AddrFrom16(a)
	err := h.IP(ctx,
		fmt.Sprintf("addr add %s/%d dev eth0 nodad", ip, UnderlayPrefixV6.Bits()),
		fmt.Sprintf("route add ::/0 via %s dev eth0", UnderlayGatewayV6))
	if err != nil {
		return fmt.Errorf("harness: IPv6 underlay of %s: %w", h.Name, err)
	}
	h.UnderlayIPv6 = ip
	return nil
}

// SetupDocker0IPv6 plays Docker with --ipv6 --fixed-cidr-v6: docker0 gets the IPv6 gateway
// address (e.g. fd00:10:244:5::1/64), the host forwards IPv6 (Docker turns
// net.ipv6.conf.all.forwarding on), and containers added from now on get an IPv6 address next
// to their IPv4 one and a default route via the gateway. Call it after SetupDocker0 and
// before AddContainer.
func (h *Host) SetupDocker0IPv6(gateway netip.Prefix) error {
	if !gateway.Addr().Is6() || gateway.Addr().Is4In6() || gateway.Bits() > 120 || gateway.Addr() == gateway.Masked().Addr() {
		return fmt.Errorf("harness: docker0 IPv6 gateway %s: want an IPv6 host address with its prefix length (<= /120), e.g. fd00:10:244:5::1/64", gateway)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case !h.docker0.IsValid():
		return fmt.Errorf("harness: %s has no docker0: call SetupDocker0 first", h.Name)
	case h.docker0v6.IsValid():
		return fmt.Errorf("harness: %s already has docker0 IPv6 %s", h.Name, h.docker0v6)
	case len(h.containers) > 0:
		return fmt.Errorf("harness: %s has containers already: call SetupDocker0IPv6 before AddContainer", h.Name)
	}
	if err := h.Sysctl("net.ipv6.conf.all.forwarding", "1"); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.IP(ctx, fmt.Sprintf("addr add %s dev %s nodad", gateway, h.bridgeNameLocked())); err != nil {
		return fmt.Errorf("harness: docker0 IPv6 on %s: %w", h.Name, err)
	}
	h.docker0v6 = gateway
	return nil
}

// Docker0IPv6 is docker0's IPv6 gateway address and prefix length, or the zero Prefix.
func (h *Host) Docker0IPv6() netip.Prefix {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.docker0v6
}

// addContainerIPv6 gives container n (1-based), in namespace ns with eth0 up, the n-th address
// after docker0's IPv6 gateway and a default route via it. h.mu is held.
func (h *Host) addContainerIPv6(ctx context.Context, ns *Namespace, n int) (netip.Addr, error) {
	ip := h.docker0v6.Addr()
	for range n {
		ip = ip.Next()
	}
	if !h.docker0v6.Contains(ip) {
		return netip.Addr{}, fmt.Errorf("harness: docker0 IPv6 %s on %s is full", h.docker0v6, h.Name)
	}
	err := ns.IP(ctx,
		fmt.Sprintf("addr add %s/%d dev eth0 nodad", ip, h.docker0v6.Bits()),
		fmt.Sprintf("route add ::/0 via %s dev eth0", h.docker0v6.Addr()))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("harness: container %d on %s: IPv6: %w", n, h.Name, err)
	}
	return ip, nil
}
