package ebpf

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// iflaHeadroom is IFLA_HEADROOM (kernel 6.14 and later): a link's needed_headroom.
const iflaHeadroom = 68

// TestContainersGetHeadroomForTheOuterHeaders: with the backend set up, docker0 has a down,
// inert vxlan port (xnet-hr) with docker0's MAC and MTU, whose needed_headroom the bridge hands
// to every container's eth0, so container packets have room for the 50 outer bytes. Host 1 gets
// docker0 before Setup, host 2 after (the link watch adds the port); containers on both talk
// across the hosts; docker0's MAC and MTU stay what Docker set; teardown removes the port and
// the containers' headroom goes back to nothing.
func TestContainersGetHeadroomForTheOuterHeaders(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	var backends []*Backend
	var containers []*harness.Container
	for i, h := range hosts {
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		l := vxlanLease(t, subnet.String(), h.UnderlayIP.String())
		mtu := backend.OverlayMTU(1500)
		gw := netip.PrefixFrom(subnet.Addr().Next(), 24)
		var mac net.HardwareAddr
		setupDocker0 := func() {
			if err := h.SetupDocker0(gw, mtu); err != nil {
				t.Fatal(err)
			}
			if err := h.Do(func() error {
				br, err := netlink.LinkByName(DockerBridge)
				mac = br.Attrs().HardwareAddr
				return err
			}); err != nil {
				t.Fatal(err)
			}
		}
		if i == 0 {
			setupDocker0()
		}
		b := startOn(t, h, l)
		t.Cleanup(func() { _ = b.Close(true) })
		if i == 1 {
			setupDocker0()
		}
		backends = append(backends, b)
		for _, p := range hosts {
			if p != h {
				if err := b.AddPeer(vxlanLease(t, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(p.Index + 1), 0}), 24).String(), p.UnderlayIP.String())); err != nil {
					t.Fatal(err)
				}
			}
		}
		var br netlink.Link
		waitFor(t, "xnet-hr enslaved to docker0 on "+h.Name, func() bool {
			var port netlink.Link
			err := h.Do(func() (err error) {
				if br, err = netlink.LinkByName(DockerBridge); err != nil {
					return err
				}
				port, err = netlink.LinkByName(HeadroomDevice)
				return err
			})
			return err == nil && port.Attrs().MasterIndex == br.Attrs().Index && port.Attrs().MTU == mtu
		})
		// Before any container joins: a container's veth may lower the bridge's MAC, as with
		// Docker alone.
		if br.Attrs().MTU != mtu || br.Attrs().HardwareAddr.String() != mac.String() {
			t.Errorf("%s: docker0 MTU %d MAC %s with the port, want Docker's %d and %s", h.Name, br.Attrs().MTU, br.Attrs().HardwareAddr, mtu, mac)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		containers = append(containers, c)
	}

	for _, h := range hosts {
		err := h.Do(func() error {
			br, err := netlink.LinkByName(DockerBridge)
			if err != nil {
				return err
			}
			port, err := netlink.LinkByName(HeadroomDevice)
			if err != nil {
				return err
			}
			if port.Type() != "vxlan" || port.Attrs().Flags&net.FlagUp != 0 {
				t.Errorf("%s: %s is a %s with flags %v, want a vxlan device that is down", h.Name, HeadroomDevice, port.Type(), port.Attrs().Flags)
			}
			if br.Attrs().MTU != backend.OverlayMTU(1500) {
				t.Errorf("%s: docker0 MTU %d with a container, want Docker's %d", h.Name, br.Attrs().MTU, backend.OverlayMTU(1500))
			}
			pi, err := netlink.LinkGetProtinfo(port)
			if err != nil {
				return err
			}
			if pi.Learning || pi.Flood {
				t.Errorf("%s: bridge port %s: %s, want learning and flooding off", h.Name, HeadroomDevice, pi.String())
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	hr, ok := headroomOf(t, containers[0].Namespace, "eth0")
	if !ok {
		t.Log("this kernel does not report IFLA_HEADROOM (6.14+): the containers' headroom is not checked")
	} else if t.Logf("container eth0 needed_headroom: %d", hr); hr < 14+backend.VXLANOverhead {
		t.Errorf("container eth0 needed_headroom %d, want at least %d (Ethernet + VXLAN overhead)", hr, 14+backend.VXLANOverhead)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if sent, recv, err := harness.Ping(ctx, containers[0].Namespace, containers[1].IP, 3, 50*time.Millisecond); err != nil || recv == 0 {
		t.Fatalf("ping across hosts: %d of %d answered (%v)", recv, sent, err)
	}

	if err := backends[0].Close(true); err != nil {
		t.Fatal(err)
	}
	if err := hosts[0].Do(func() error {
		if _, err := netlink.LinkByName(HeadroomDevice); err == nil {
			t.Errorf("%s still exists after teardown", HeadroomDevice)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if hr, ok := headroomOf(t, containers[0].Namespace, "eth0"); ok && hr != 0 {
		t.Errorf("container eth0 needed_headroom %d after teardown, want 0", hr)
	}

	// Docker restarted: docker0 made anew, with another (random) MAC. The port joins it with
	// the new docker0's MAC; with the one it had, lower than any random bridge MAC, the bridge
	// would have taken that as its own.
	h := hosts[1]
	oldMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	if err := h.Do(func() error {
		port, err := netlink.LinkByName(HeadroomDevice)
		if err != nil {
			return err
		}
		return netlink.LinkSetHardwareAddr(port, oldMAC)
	}); err != nil {
		t.Fatal(err)
	}
	// As dockerd does: the bridge, then its --bip address (which makes it a container bridge).
	if err := h.IP(ctx, "link del docker0", "link add docker0 type bridge", "addr add "+h.Docker0().String()+" dev docker0"); err != nil {
		t.Fatal(err)
	}
	var br, port netlink.Link
	waitFor(t, "xnet-hr enslaved to the new docker0", func() bool {
		err := h.Do(func() (err error) {
			if br, err = netlink.LinkByName(DockerBridge); err != nil {
				return err
			}
			port, err = netlink.LinkByName(HeadroomDevice)
			return err
		})
		return err == nil && port.Attrs().MasterIndex == br.Attrs().Index
	})
	if br.Attrs().HardwareAddr.String() == oldMAC.String() || port.Attrs().HardwareAddr.String() != br.Attrs().HardwareAddr.String() {
		t.Errorf("new docker0 MAC %s, port MAC %s (it had %s): want the port to take the new docker0's MAC", br.Attrs().HardwareAddr, port.Attrs().HardwareAddr, oldMAC)
	}
}

// headroomOf reads a link's IFLA_HEADROOM in ns; ok is false when the kernel does not report it.
func headroomOf(t *testing.T, ns *harness.Namespace, name string) (hr int, ok bool) {
	t.Helper()
	err := ns.Do(func() error {
		req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
		req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
		req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
		msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfInfomsg:])
			if err != nil {
				return err
			}
			for _, a := range attrs {
				if a.Attr.Type == iflaHeadroom && len(a.Value) >= 2 {
					hr, ok = int(binary.NativeEndian.Uint16(a.Value)), true
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hr, ok
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestHeadroomFollowsTheUnderlayInUse: the headroom the container bridge hands its ports is
// that of the outer headers this host sends: 14 + 50 bytes over the IPv4 underlay, 14 + 70 while
// it carries VXLAN over the IPv6 underlay (xnet6: dual stack with a PublicIPv6, or an IPv6-only
// overlay), which the kernel's vxlan needs in front of the frame as adjust_room does. One host
// restarts on the same pins and docker0 in each mode, both ways, and docker0's and the
// container's needed_headroom follow.
func TestHeadroomFollowsTheUnderlayInUse(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, IPv6Underlay: true})
	h := topo.Hosts()[0]
	v4 := vxlanLease(t, "10.244.1.0/24", h.UnderlayIP.String())
	dual := dualStackLease(t, 0, h.UnderlayIP)
	v6only := ipv6OnlyLease(t, dual.IPv6Subnet.String(), h.UnderlayIPv6.String())
	if err := h.SetupDocker0(netip.PrefixFrom(v4.Subnet.Addr().Next(), 24), 1430); err != nil {
		t.Fatal(err)
	}
	if err := h.SetupDocker0IPv6(netip.PrefixFrom(dual.IPv6Subnet.Addr().Next(), 64)); err != nil {
		t.Fatal(err)
	}
	c, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	withIPv6 := iface
	withIPv6.PublicIPv6 = h.UnderlayIPv6
	const over4, over6 = 14 + backend.VXLANOverhead, 14 + backend.VXLANOverheadV6
	for _, m := range []struct {
		name     string
		iface    backend.ExternalInterface
		cfg      subnetmgr.Config
		local    subnetmgr.Lease
		headroom int
	}{
		{"IPv4 overlay", iface, testConfig, v4, over4},
		{"dual stack without an IPv6 underlay address: IPv6 rides the IPv4 VXLAN", iface, dualStackConfig, dual, over4},
		{"dual stack with an IPv6 underlay address", withIPv6, dualStackConfig, dual, over6},
		{"IPv6-only overlay", withIPv6, ipv6OnlyConfig, v6only, over6},
		{"IPv4 overlay again", iface, testConfig, v4, over4},
	} {
		t.Run(m.name, func(t *testing.T) {
			opts := backend.Options{Iface: m.iface, Config: m.cfg, Decap: DecapTC, BPFFS: h.BPFFS, Logger: harness.TestLogger(t)}
			var b *Backend
			if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = b.Close(false) })
			if err := b.Setup(t.Context(), m.local, m.cfg); err != nil {
				t.Fatal(err)
			}
			wantVNI := headroomVNI
			if m.headroom == over6 {
				wantVNI = headroomVNI6
			}
			var port *netlink.Vxlan
			waitFor(t, HeadroomDevice+" enslaved to docker0", func() bool {
				err := h.Do(func() error {
					br, err := netlink.LinkByName(DockerBridge)
					if err != nil {
						return err
					}
					l, err := netlink.LinkByName(HeadroomDevice)
					if err != nil {
						return err
					}
					if vx, ok := l.(*netlink.Vxlan); ok && vx.MasterIndex == br.Attrs().Index {
						port = vx
					}
					return nil
				})
				return err == nil && port != nil
			})
			if port.VxlanId != wantVNI || port.Flags&net.FlagUp != 0 {
				t.Errorf("%s: VNI %d, flags %v; want VNI %d, down", HeadroomDevice, port.VxlanId, port.Flags, wantVNI)
			}
			for _, l := range []struct {
				ns   *harness.Namespace
				name string
			}{{h.Namespace, DockerBridge}, {c.Namespace, "eth0"}} {
				hr, ok := headroomOf(t, l.ns, l.name)
				if !ok {
					t.Skip("this kernel does not report IFLA_HEADROOM (6.14+)")
				}
				if hr != m.headroom {
					t.Errorf("%s needed_headroom %d, want %d", l.name, hr, m.headroom)
				}
			}
		})
	}
}
