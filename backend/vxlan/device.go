package vxlan

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
)

// sysModuleDir exists when the vxlan module is loaded or built in.
const sysModuleDir = "/sys/module/vxlan"

// kernelModulesDir is /lib/modules/<release>, where modules.builtin and modules.dep say whether
// vxlan can be loaded on demand (creating a vxlan link autoloads it).
func kernelModulesDir() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
}

// probeKernel decides, without changing the host, whether the kernel can create vxlan devices:
// the module is loaded (sysModule exists), or modulesDir's modules.builtin or modules.dep lists
// vxlan.ko so the kernel will load it when Setup creates the device. It is a cheap file check
// rather than a trial device because the constructor must not touch the host (--backend=auto
// builds backends it may not use). A kernel that passes the probe and still refuses the device
// is reported by Setup, also wrapping backend.ErrUnavailable.
func probeKernel(sysModule, modulesDir string) error {
	if _, err := os.Stat(sysModule); err == nil {
		return nil
	}
	if modulesDir != "" {
		for _, f := range []string{"modules.builtin", "modules.dep"} {
			data, err := os.ReadFile(filepath.Join(modulesDir, f))
			if err == nil && bytes.Contains(data, []byte("/vxlan.ko")) {
				return nil
			}
		}
	}
	return fmt.Errorf("vxlan: kernel has no vxlan support (%s missing, vxlan.ko not in %s/modules.{builtin,dep}): use --backend=udp or a kernel with CONFIG_VXLAN: %w",
		sysModule, modulesDir, backend.ErrUnavailable)
}

// wantDevice is the device flannel would create:
//
//	ip link add xnet.1 type vxlan id 1 dstport 8472 local <iface address> dev <iface> nolearning
//
// As in flannel, local is the interface's own address (the outer source must be an address of
// this host) while the lease publishes PublicIP; they differ only with --public-ip behind NAT.
func (b *Backend) wantDevice() *netlink.Vxlan {
	return &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         DeviceName(b.VNI),
			HardwareAddr: backend.VtepMAC(b.Iface.PublicIP),
			MTU:          backend.OverlayMTU(b.Iface.MTU),
		},
		VxlanId:      b.VNI,
		VtepDevIndex: b.Iface.Index,
		SrcAddr:      net.IP(b.localIP().AsSlice()),
		Port:         b.Port,
		Learning:     false,
	}
}

// wantDeviceV6 is flannel's IPv6 device, on the IPv6 underlay:
//
//	ip link add xnet-v6.1 type vxlan id 1 dstport 8472 local <PublicIPv6> dev <iface> nolearning
//
// with the MTU 70 below the underlay's and the MAC derived from PublicIPv6. flannel's local is
// the interface's IPv6 address; ours is PublicIPv6, which xnetd takes from the interface
// unless --public-ipv6 says otherwise.
func (b *Backend) wantDeviceV6() *netlink.Vxlan {
	return &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         DeviceNameV6(b.VNI),
			HardwareAddr: backend.VtepMACv6(b.Iface.PublicIPv6),
			MTU:          backend.OverlayMTUv6(b.Iface.MTU),
		},
		VxlanId:      b.VNI,
		VtepDevIndex: b.Iface.Index,
		SrcAddr:      net.IP(b.Iface.PublicIPv6.AsSlice()),
		Port:         b.Port,
		Learning:     false,
	}
}

// localIP is the device's outer source address: the interface's address, else PublicIP.
func (b *Backend) localIP() netip.Addr {
	if b.Iface.IfaceIP.Is4() {
		return b.Iface.IfaceIP
	}
	return b.Iface.PublicIP
}

// ensureDevice adopts an existing compatible device without disturbing it (a restarted daemon
// must not cut traffic) and recreates an incompatible one.
func (b *Backend) ensureDevice(want *netlink.Vxlan) (*netlink.Vxlan, error) {
	existing, err := b.nl.LinkByName(want.Name)
	switch {
	case err == nil:
		reason := incompatibility(want, existing)
		if reason == "" {
			return b.adopt(existing.(*netlink.Vxlan), want)
		}
		b.Log.Warn("existing device is incompatible; recreating it", "reason", reason)
		if err := b.nl.LinkDel(existing); err != nil {
			return nil, fmt.Errorf("vxlan: delete incompatible %s (%s): %w", want.Name, reason, err)
		}
	case errors.As(err, &netlink.LinkNotFoundError{}):
	default:
		return nil, fmt.Errorf("vxlan: look up %s: %w", want.Name, err)
	}
	if err := b.nl.LinkAdd(want); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EAFNOSUPPORT) {
			return nil, fmt.Errorf("vxlan: create %s: kernel refuses vxlan links (%v): %w", want.Name, err, backend.ErrUnavailable)
		}
		return nil, fmt.Errorf("vxlan: create %s (vni %d dstport %d local %v dev %s): %w", want.Name, b.VNI, b.Port, want.SrcAddr, b.Iface.Name, err)
	}
	link, err := b.nl.LinkByName(want.Name)
	if err != nil {
		return nil, fmt.Errorf("vxlan: look up created %s: %w", want.Name, err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		return nil, fmt.Errorf("vxlan: created %s is a %s link, not vxlan", want.Name, link.Type())
	}
	b.Log.Info("created vxlan device", "link", vx.Name, "ifindex", vx.Index)
	return vx, nil
}

// incompatibility says why an existing link cannot be adopted, "" if it can. MAC and MTU are
// not reasons: they can be changed in place.
func incompatibility(want *netlink.Vxlan, have netlink.Link) string {
	vx, ok := have.(*netlink.Vxlan)
	if !ok {
		return fmt.Sprintf("link type %s, want vxlan", have.Type())
	}
	switch {
	case vx.VxlanId != want.VxlanId:
		return fmt.Sprintf("vni %d, want %d", vx.VxlanId, want.VxlanId)
	case vx.Port != want.Port:
		return fmt.Sprintf("dstport %d, want %d", vx.Port, want.Port)
	case !vx.SrcAddr.Equal(want.SrcAddr):
		return fmt.Sprintf("local %v, want %v", vx.SrcAddr, want.SrcAddr)
	case vx.VtepDevIndex != want.VtepDevIndex:
		return fmt.Sprintf("dev ifindex %d, want %d", vx.VtepDevIndex, want.VtepDevIndex)
	case vx.Learning != want.Learning:
		return fmt.Sprintf("learning %v, want %v", vx.Learning, want.Learning)
	case vx.L2miss || vx.L3miss:
		return "l2miss/l3miss set"
	case vx.FlowBased:
		return "external (flow-based) mode set"
	case vx.GBP:
		return "gbp set"
	case len(vx.Group) > 0 && !vx.Group.IsUnspecified():
		return fmt.Sprintf("group %v set", vx.Group)
	}
	return ""
}

// adopt fixes MAC and MTU of an existing device in place.
func (b *Backend) adopt(have, want *netlink.Vxlan) (*netlink.Vxlan, error) {
	b.Log.Info("adopting existing vxlan device", "link", have.Name, "ifindex", have.Index)
	if have.HardwareAddr.String() != want.HardwareAddr.String() {
		if err := b.nl.LinkSetHardwareAddr(have, want.HardwareAddr); err != nil {
			// Some drivers refuse a MAC change while up: retry down.
			if !errors.Is(err, unix.EBUSY) {
				return nil, fmt.Errorf("vxlan: set %s address %v: %w", want.Name, want.HardwareAddr, err)
			}
			if err := b.nl.LinkSetDown(have); err != nil {
				return nil, fmt.Errorf("vxlan: set %s down for MAC change: %w", want.Name, err)
			}
			if err := b.nl.LinkSetHardwareAddr(have, want.HardwareAddr); err != nil {
				return nil, fmt.Errorf("vxlan: set %s address %v: %w", want.Name, want.HardwareAddr, err)
			}
		}
		have.HardwareAddr = want.HardwareAddr
	}
	if have.MTU != want.MTU {
		if err := b.nl.LinkSetMTU(have, want.MTU); err != nil {
			return nil, fmt.Errorf("vxlan: set %s mtu %d: %w", want.Name, want.MTU, err)
		}
		have.MTU = want.MTU
	}
	return have, nil
}

// ensureAddress leaves exactly want as the device's address of family (none when want is
// invalid), as flannel does: <subnet addr>/32 for IPv4, <IPv6 subnet addr>/128 for IPv6 (the
// full-length prefix keeps the kernel from adding a connected route for the whole subnet on the
// device). Other addresses of that family on our device are stale (an old lease) and removed;
// the device is ours. IPv6 link-local addresses are the kernel's and stay. An IPv6 address is
// added without duplicate address detection: nothing on a VXLAN device could answer it, and a
// tentative address would not be usable as a source for a second.
func (b *Backend) ensureAddress(link *netlink.Vxlan, family int, want netip.Prefix) error {
	addrs, err := b.nl.AddrList(link, family)
	if err != nil {
		return fmt.Errorf("vxlan: list addresses of %s: %w", link.Name, err)
	}
	have := false
	for _, a := range addrs {
		p, _ := backend.PrefixOf(a.IPNet)
		if p == want {
			have = true
			continue
		}
		if p.Addr().IsLinkLocalUnicast() {
			continue
		}
		b.Log.Info("removing stale address", "link", link.Name, "address", p)
		if err := b.nl.AddrDel(link, &a); err != nil {
			return fmt.Errorf("vxlan: remove stale address %v from %s: %w", p, link.Name, err)
		}
	}
	if have || !want.IsValid() {
		return nil
	}
	addr := &netlink.Addr{IPNet: backend.IPNet(want)}
	if family == unix.AF_INET6 {
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := b.nl.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("vxlan: add address %v to %s: %w", want, link.Name, err)
	}
	return nil
}

// deleteDevice deletes our vxlan device called name, if there is one.
func (b *Backend) deleteDevice(name string) error {
	link, err := b.nl.LinkByName(name)
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vxlan: look up %s to delete it: %w", name, err)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return fmt.Errorf("vxlan: %s is a %s link, not ours: not deleting it", name, link.Type())
	}
	if err := b.nl.LinkDel(link); err != nil {
		return fmt.Errorf("vxlan: delete %s: %w", name, err)
	}
	if name == DeviceName(b.VNI) {
		b.peers = map[netip.Prefix]peer{}
	}
	b.Log.Info("deleted vxlan device", "link", name)
	return nil
}
