package ebpf

// VXLAN over the IPv6 underlay (bpf/underlay6.h says how the packets go).
//
// A dual-stack host with an IPv6 underlay address (PublicIPv6) runs, as flannel does, an IPv6
// VTEP of its own, published as BackendV6Data {"VNI","VtepMAC"} with our PublicIPv6: peers with
// one too (flannel's vxlan, xnet's vxlan or ebpf) then carry IPv6 between us over the IPv6
// underlay. Here that VTEP is TunnelDevice, a metadata-mode ("external") kernel vxlan device:
// the programs cannot build VXLAN over IPv6 themselves with GSO and valid UDP checksums
// (bpf_skb_adjust_room has no flag for SKB_GSO_UDP_TUNNEL_CSUM, and a kernel vxlan device on
// IPv6 drops zero-checksum datagrams unless told otherwise, flannel's included), so the encap
// hands the inner frame to this device with the outer addresses and VNI in its tunnel key and the
// kernel does the rest. It has no addresses, routes or fdb entries: the routes6 map says where
// each IPv6 subnet goes. Its MAC is our IPv6 VTEP MAC (backend.VtepMACv6 of PublicIPv6, as
// xnet's vxlan backend derives it), so a peer that programmed it keeps it across our restarts.
//
// A metadata-mode device opens its UDP port on IPv4 as well (the kernel has no way to ask for
// IPv6 only), on every address: the IPv4 VXLAN for us never gets there (decap_tc takes it
// first), but reassembled fragments do, and the device's program judges them as decap_tc would
// have, so the fragment receiver (fragments.go), which would need the same port, does not run.
//
// Like xnet0 it outlives the process: a restart adopts it (and its program's pinned link gets
// the new program in place); teardown deletes it; a host without an IPv6 underlay now deletes
// the one an earlier run made.

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/loader"
)

// TunnelDevice is the metadata-mode vxlan device that carries VXLAN over the IPv6 underlay.
const TunnelDevice = "xnet6"

// ensureTunnelDevice creates (or adopts) TunnelDevice, up, with our IPv6 VTEP MAC and the MTU of
// the overlay over IPv6, and puts decap_tunnel on its TC ingress. It returns its ifindex. Called
// with mu held, in the backend's namespace.
func (b *Backend) ensureTunnelDevice() (int, error) {
	mac := backend.VtepMACv6(b.Iface.PublicIPv6)
	mtu := backend.OverlayMTUv6(b.Iface.MTU)
	link, err := netlink.LinkByName(TunnelDevice)
	if err == nil {
		vx, ok := link.(*netlink.Vxlan)
		switch {
		case !ok:
			return 0, fmt.Errorf("ebpf: %s exists and is a %s, not ours: delete it", TunnelDevice, link.Type())
		case !vx.FlowBased || vx.Port != b.Port:
			// Ours from a run with another port (or changed by hand): made again.
			if err := netlink.LinkDel(link); err != nil {
				return 0, fmt.Errorf("ebpf: delete %s to make it again: %w", TunnelDevice, err)
			}
			link = nil
		}
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return 0, fmt.Errorf("ebpf: look up %s: %w", TunnelDevice, err)
		}
		link = nil
	}
	if link == nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: TunnelDevice, MTU: mtu, HardwareAddr: mac},
			FlowBased: true,
			Port:      b.Port,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return 0, fmt.Errorf("ebpf: create vxlan device %s (external, dstport %d): %w", TunnelDevice, b.Port, err)
		}
		if link, err = netlink.LinkByName(TunnelDevice); err != nil {
			return 0, fmt.Errorf("ebpf: look up %s: %w", TunnelDevice, err)
		}
		b.Log.Info("vxlan device for the IPv6 underlay created", "device", TunnelDevice, "mac", mac.String(), "mtu", mtu,
			"port", b.Port)
	}
	if link.Attrs().HardwareAddr.String() != mac.String() {
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MAC %s: %w", TunnelDevice, mac, err)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return 0, fmt.Errorf("ebpf: set %s MTU %d: %w", TunnelDevice, mtu, err)
		}
	}
	idx := link.Attrs().Index
	// The program before the device comes up: nothing it receives may reach the stack unjudged.
	if _, err := b.ld.AttachTC(idx, loader.Ingress, loader.DecapTunnel); err != nil {
		return 0, fmt.Errorf("ebpf: %w", err)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return 0, fmt.Errorf("ebpf: set %s up: %w", TunnelDevice, err)
		}
	}
	return idx, nil
}

// removeTunnelDevice deletes TunnelDevice and its program's pinned link, if there are any.
// Called with mu held, in the backend's namespace.
func (b *Backend) removeTunnelDevice() error {
	link, err := netlink.LinkByName(TunnelDevice)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("ebpf: look up %s: %w", TunnelDevice, err)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return nil // not ours
	}
	var errs []error
	if b.ld != nil {
		errs = append(errs, b.ld.Detach(link.Attrs().Index, loader.Ingress))
	}
	if err := netlink.LinkDel(link); err != nil {
		errs = append(errs, fmt.Errorf("ebpf: delete %s: %w", TunnelDevice, err))
	}
	return errors.Join(errs...)
}
