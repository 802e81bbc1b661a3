package harness

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/xnet-dev/xnet/backend"
)

// The two reference datapaths of the benchmark, configured by hand exactly as their real
// counterparts do it, so the benchmark and interop tests compare against what users run.

// Flannel's vxlan backend defaults, which the kernel-VXLAN baseline reproduces.
const (
	FlannelVXLANDevice = "flannel.1"
	FlannelVNI         = 1
	FlannelPort        = 8472
)

// ConfigureHostGW gives every host a route to every other host's docker0 subnet via that host's
// underlay address (flannel's host-gw backend), and to its IPv6 subnet via its IPv6 underlay
// address when docker0 has one (SetupDocker0IPv6, Options.IPv6Underlay). Every host needs
// docker0 first.
func ConfigureHostGW(hosts []*Host) error {
	for _, h := range hosts {
		var lines []string
		for _, p := range hosts {
			if p == h {
				continue
			}
			sub := p.Docker0Subnet()
			if !sub.IsValid() {
				return fmt.Errorf("harness: host-gw: %s has no docker0 yet", p.Name)
			}
			lines = append(lines, fmt.Sprintf("route replace %s via %s dev eth0", sub, p.UnderlayIP))
			if sub6 := p.Docker0IPv6Subnet(); sub6.IsValid() {
				if !p.UnderlayIPv6.IsValid() {
					return fmt.Errorf("harness: host-gw IPv6: %s has no IPv6 underlay address (Options.IPv6Underlay)", p.Name)
				}
				lines = append(lines, fmt.Sprintf("route replace %s via %s dev eth0", sub6, p.UnderlayIPv6))
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := h.IP(ctx, lines...)
		cancel()
		if err != nil {
			return fmt.Errorf("harness: host-gw routes on %s: %w", h.Name, err)
		}
	}
	return nil
}

// FlannelPeer is one remote host as flannel's vxlan backend programs it.
type FlannelPeer struct {
	Subnet   netip.Prefix     // the peer's lease, e.g. 10.244.6.0/24
	PublicIP netip.Addr       // the peer's underlay address
	VtepMAC  net.HardwareAddr // the MAC of the peer's VXLAN device (from its lease)
}

// ConfigureFlannelVXLAN sets every host up as flannel's vxlan backend would, each host's lease
// being its docker0 subnet and its VTEP MAC backend.VtepMAC(UnderlayIP). Every host needs
// docker0 first.
func ConfigureFlannelVXLAN(hosts []*Host) error {
	peers := make([]FlannelPeer, len(hosts))
	for i, h := range hosts {
		sub := h.Docker0Subnet()
		if !sub.IsValid() {
			return fmt.Errorf("harness: flannel vxlan: %s has no docker0 yet", h.Name)
		}
		peers[i] = FlannelPeer{Subnet: sub, PublicIP: h.UnderlayIP, VtepMAC: backend.VtepMAC(h.UnderlayIP)}
	}
	for i, h := range hosts {
		others := append(append([]FlannelPeer(nil), peers[:i]...), peers[i+1:]...)
		if err := h.ConfigureFlannelVXLAN(peers[i].Subnet, others); err != nil {
			return err
		}
	}
	if !hosts[0].Docker0IPv6Subnet().IsValid() {
		return nil
	}
	// Dual stack: flannel's second device, over the IPv6 underlay.
	for i, h := range hosts {
		sub6 := h.Docker0IPv6Subnet()
		if !sub6.IsValid() || !h.UnderlayIPv6.IsValid() {
			return fmt.Errorf("harness: flannel vxlan IPv6: %s needs docker0's IPv6 subnet and an IPv6 underlay address", h.Name)
		}
		peers[i] = FlannelPeer{Subnet: sub6, PublicIP: h.UnderlayIPv6, VtepMAC: FlannelV6MAC(h.UnderlayIPv6)}
	}
	for i, h := range hosts {
		if err := h.ConfigureFlannelVXLANv6(peers[i].Subnet, peers); err != nil {
			return err
		}
	}
	return nil
}

// FlannelVXLANv6Device is the device flannel's vxlan backend carries IPv6 on.
const FlannelVXLANv6Device = "flannel-v6.1"

// FlannelV6MAC is the harness's stand-in for the random MAC flannel gives its IPv6 device.
func FlannelV6MAC(ip netip.Addr) net.HardwareAddr {
	b := ip.As16()
	return net.HardwareAddr{0x0e, 0x76, b[12], b[13], b[14], b[15]}
}

// ConfigureFlannelVXLANv6 is ConfigureFlannelVXLAN's IPv6 half as flannel does it: device
// flannel-v6.1 with local = the IPv6 underlay address, MTU eth0 - 70, the subnet address as a
// /128, and per peer (those in peers other than local) a route via the peer's subnet address
// onlink, a permanent neighbour and an fdb entry to its IPv6 underlay address.
func (h *Host) ConfigureFlannelVXLANv6(local netip.Prefix, peers []FlannelPeer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lines := []string{
		fmt.Sprintf("link add %s address %s type vxlan id %d dstport %d local %s dev eth0 nolearning",
			FlannelVXLANv6Device, FlannelV6MAC(h.UnderlayIPv6), FlannelVNI, FlannelPort, h.UnderlayIPv6),
		fmt.Sprintf("link set %s mtu %d up", FlannelVXLANv6Device, h.topo.mtu-70),
		fmt.Sprintf("addr add %s/128 dev %s nodad", local.Masked().Addr(), FlannelVXLANv6Device),
	}
	for _, p := range peers {
		if p.Subnet == local {
			continue
		}
		gw := p.Subnet.Masked().Addr()
		lines = append(lines,
			fmt.Sprintf("route replace %s via %s dev %s onlink", p.Subnet.Masked(), gw, FlannelVXLANv6Device),
			fmt.Sprintf("neigh replace %s lladdr %s dev %s nud permanent", gw, p.VtepMAC, FlannelVXLANv6Device))
	}
	if err := h.IP(ctx, lines...); err != nil {
		return fmt.Errorf("harness: flannel vxlan IPv6 device on %s: %w", h.Name, err)
	}
	for _, p := range peers {
		if p.Subnet == local {
			continue
		}
		if _, err := h.Run(ctx, "bridge", "fdb", "append", p.VtepMAC.String(), "dev", FlannelVXLANv6Device, "dst", p.PublicIP.String()); err != nil {
			return fmt.Errorf("harness: flannel vxlan IPv6 fdb for %s on %s: %w", p.Subnet, h.Name, err)
		}
	}
	return nil
}

// ConfigureFlannelVXLAN makes this host look exactly like a flannel vxlan host with lease
// local: device flannel.1 (VNI 1, port 8472, nolearning, local = UnderlayIP, dev eth0,
// MAC backend.VtepMAC(UnderlayIP)), MTU eth0 - 50, address <local>.0/32, and per peer a route,
// a permanent neighbour and an fdb entry (AddFlannelVXLANPeer).
func (h *Host) ConfigureFlannelVXLAN(local netip.Prefix, peers []FlannelPeer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	mtu := backend.OverlayMTU(h.topo.mtu)
	err := h.IP(ctx,
		fmt.Sprintf("link add %s address %s type vxlan id %d dstport %d local %s dev eth0 nolearning",
			FlannelVXLANDevice, backend.VtepMAC(h.UnderlayIP), FlannelVNI, FlannelPort, h.UnderlayIP),
		fmt.Sprintf("link set %s mtu %d up", FlannelVXLANDevice, mtu),
		fmt.Sprintf("addr add %s/32 dev %s", local.Masked().Addr(), FlannelVXLANDevice))
	if err != nil {
		return fmt.Errorf("harness: flannel vxlan device on %s: %w", h.Name, err)
	}
	for _, p := range peers {
		if err := h.AddFlannelVXLANPeer(p); err != nil {
			return err
		}
	}
	return nil
}

// AddFlannelVXLANPeer programs one peer into flannel.1 as flannel does: route to the peer's
// subnet via its .0 address on flannel.1 (onlink), a permanent neighbour entry for that address
// with the peer's VTEP MAC, and an fdb entry sending that MAC to the peer's underlay address.
func (h *Host) AddFlannelVXLANPeer(p FlannelPeer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gw := p.Subnet.Masked().Addr()
	err := h.IP(ctx,
		fmt.Sprintf("route replace %s via %s dev %s onlink", p.Subnet.Masked(), gw, FlannelVXLANDevice),
		fmt.Sprintf("neigh replace %s lladdr %s dev %s nud permanent", gw, p.VtepMAC, FlannelVXLANDevice))
	if err != nil {
		return fmt.Errorf("harness: flannel vxlan peer %s on %s: %w", p.Subnet, h.Name, err)
	}
	// `bridge` is a separate iproute2 tool; it runs inside the host namespace.
	if _, err := h.Run(ctx, "bridge", "fdb", "append", p.VtepMAC.String(), "dev", FlannelVXLANDevice, "dst", p.PublicIP.String()); err != nil {
		return fmt.Errorf("harness: flannel vxlan fdb for %s on %s: %w", p.Subnet, h.Name, err)
	}
	return nil
}
