package ebpf

// Headroom for the encapsulation, from the bridge.
//
// encap_container grows every container packet by the 50 bytes of outer headers. A container
// allocates its packets with the headroom its eth0 asks for (LL_RESERVED_SPACE: 16 bytes for a
// veth, 2 of them left once the Ethernet header is in), so bpf_skb_adjust_room had to
// reallocate the head of every packet: pskb_expand_head was about a third of the encap cost at
// 64-byte packets. Nothing on the host can set a veth's needed_headroom directly, but the Linux
// bridge propagates the largest needed_headroom of its ports to all of them
// (net/bridge/br_if.c: update_headroom on port add and delete), and a veth passes what the
// bridge asks for on to its peer (veth_set_rx_headroom), which is the container's eth0. veths
// themselves do not count (IFF_PHONY_HEADROOM), a vxlan device does: 14 + 50 bytes. So one
// vxlan device as a docker0 port makes every container, present and future, allocate 66 bytes
// of headroom, and adjust_room writes the outer headers in place.
//
// With the IPv6 underlay in use (TunnelDevice: a dual-stack host with a PublicIPv6, or an
// IPv6-only one) the outer headers are 70 bytes, which xnet6's transmit (the kernel's vxlan)
// has to find in front of the frame or it reallocates the head as adjust_room did. A vxlan
// device whose local address is IPv6 (here ::, any) asks for 14 + 70, so the port is made that
// way then: 70 covers the 50 of the IPv4 VXLAN the same host also sends. Which one a device is
// cannot be read back (the kernel reports no local address that is ::), so the VNI says it:
// headroomVNI for 14 + 50, headroomVNI6 for 14 + 70, and a port of the other kind is made again
// (the bridge recomputes its ports' headroom on every port change).
//
// The port must carry nothing: the device stays down (a bridge port whose device is down is
// disabled and gets no frame; a vxlan device that is down has no socket), its port does not
// learn or flood even if someone brings it up, it takes docker0's MAC (the bridge takes the
// lowest port MAC as its own when none was set, so a random one could change docker0's) and
// docker0's MTU (the bridge lowers its MTU to its smallest port's when none was set). Its VNI
// is the last one, so it cannot collide with a flannel-style device (VNI 1) on the same port.
// It is best effort: without it the datapath works the same, just slower.

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
)

// HeadroomDevice is the down vxlan device enslaved to the container bridge (docker0 or
// whatever holds our gateway address) for its needed_headroom.
const HeadroomDevice = "xnet-hr"

// The VNIs of HeadroomDevice: never used on the wire, chosen so no real vxlan device (flannel's
// is VNI 1) conflicts with it. headroomVNI is the one over an IPv4 underlay (14 + 50 bytes of
// headroom), headroomVNI6 the one with an IPv6 local address (14 + 70).
const (
	headroomVNI  = 1<<24 - 1
	headroomVNI6 = 1<<24 - 2
)

// headroomPortKind is what HeadroomDevice must be: its VNI and the headroom it asks for, the
// larger one while VXLAN over the IPv6 underlay is in use (TunnelDevice is up). Called with mu
// held.
func (b *Backend) headroomPortKind() (vni int, headroom int) {
	if b.v6.tunnel != 0 {
		return headroomVNI6, 14 + backend.VXLANOverheadV6
	}
	return headroomVNI, 14 + backend.VXLANOverhead
}

// ensureHeadroomPort makes HeadroomDevice a down, inert port of docker0 with docker0's MAC and
// MTU, asking for the headroom of headroomPortKind. It changes nothing when all is in place (it
// runs on every docker0 link event, some of which its own changes cause) and nothing when
// docker0 is absent or not a bridge. It runs on the executor's thread, with mu held.
func (b *Backend) ensureHeadroomPort() error {
	name := b.primaryBridge()
	if name == "" {
		return nil // no container bridge yet: the link watch calls again when there is one
	}
	br, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if br.Type() != "bridge" {
		return nil
	}
	vni, headroom := b.headroomPortKind()
	link, err := netlink.LinkByName(HeadroomDevice)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("look up %s: %w", HeadroomDevice, err)
		}
		link = nil
	} else if vx, ok := link.(*netlink.Vxlan); ok && vx.VxlanId != vni {
		// Made for the other underlay (the host gained or lost its IPv6 underlay since).
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("delete %s (VNI %d) to make it for %d bytes of headroom: %w", HeadroomDevice, vx.VxlanId, headroom, err)
		}
		link = nil
	}
	if link == nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: HeadroomDevice, MTU: br.Attrs().MTU, HardwareAddr: br.Attrs().HardwareAddr},
			VxlanId:   vni,
		}
		if vni == headroomVNI6 {
			vx.SrcAddr = net.IPv6unspecified // an IPv6 device: the kernel's vxlan adds 70 bytes, not 50
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return fmt.Errorf("create vxlan device %s: %w", HeadroomDevice, err)
		}
		if link, err = netlink.LinkByName(HeadroomDevice); err != nil {
			return fmt.Errorf("look up %s: %w", HeadroomDevice, err)
		}
		b.Log.Info("docker0 port for packet headroom created: containers allocate room for the VXLAN headers",
			"device", HeadroomDevice, "headroom", fmt.Sprintf("%d bytes", headroom))
	}
	if link.Type() != "vxlan" {
		return fmt.Errorf("%s exists and is a %s, not ours: delete it", HeadroomDevice, link.Type())
	}
	attrs := link.Attrs()
	if attrs.Flags&net.FlagUp != 0 {
		if err := netlink.LinkSetDown(link); err != nil {
			return fmt.Errorf("set %s down: %w", HeadroomDevice, err)
		}
	}
	if attrs.MTU != br.Attrs().MTU {
		if err := netlink.LinkSetMTU(link, br.Attrs().MTU); err != nil {
			return fmt.Errorf("set %s MTU %d (docker0's): %w", HeadroomDevice, br.Attrs().MTU, err)
		}
	}
	if attrs.MasterIndex != br.Attrs().Index {
		// A docker0 made anew (Docker restarted) has another MAC than the one we copied.
		if mac := br.Attrs().HardwareAddr; attrs.HardwareAddr.String() != mac.String() {
			if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
				return fmt.Errorf("set %s MAC %s (docker0's): %w", HeadroomDevice, mac, err)
			}
		}
		if err := netlink.LinkSetMasterByIndex(link, br.Attrs().Index); err != nil {
			return fmt.Errorf("enslave %s to %s: %w", HeadroomDevice, name, err)
		}
		if err := setPortInert(attrs.Index); err != nil {
			return fmt.Errorf("bridge port %s: %w", HeadroomDevice, err)
		}
	}
	return nil
}

// setPortInert turns learning and every kind of flooding off on a bridge port, in one request
// (netlink has setters for only some of them).
func setPortInert(ifindex int) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_BRIDGE)
	msg.Index = int32(ifindex)
	req.AddData(msg)
	prot := nl.NewRtAttr(unix.IFLA_PROTINFO|unix.NLA_F_NESTED, nil)
	for _, attr := range []int{nl.IFLA_BRPORT_LEARNING, nl.IFLA_BRPORT_UNICAST_FLOOD, nl.IFLA_BRPORT_MCAST_FLOOD, nl.IFLA_BRPORT_BCAST_FLOOD} {
		prot.AddRtAttr(attr, []byte{0})
	}
	req.AddData(prot)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("learning and flooding off: %w", err)
	}
	return nil
}

// headroomPort runs ensureHeadroomPort and logs a failure once per distinct error: the datapath
// works without the port, and docker0 events would repeat the same warning.
func (b *Backend) headroomPort() {
	err := b.ensureHeadroomPort()
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != b.headroomErr && err != nil {
		b.Log.Warn("no headroom port on docker0: every container packet to another host is reallocated on encapsulation (slower, still delivered)", "err", err)
	}
	b.headroomErr = msg
}

// removeHeadroomPort deletes HeadroomDevice (teardown); the bridge then gives its ports back
// the headroom of the others.
func removeHeadroomPort() error {
	link, err := netlink.LinkByName(HeadroomDevice)
	if err != nil {
		return nil
	}
	if link.Type() != "vxlan" {
		return nil
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("ebpf: delete %s: %w", HeadroomDevice, err)
	}
	return nil
}
