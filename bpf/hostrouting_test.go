package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// setHostRoutingKernel flips host_config.host_routing_kernel, as the ebpf backend does when
// --host-routing switches.
func setHostRoutingKernel(t *testing.T, objs *objects, on bool) {
	t.Helper()
	var cfg XnetHostConfig
	must(t, objs.Config.Lookup(uint32(0), &cfg))
	cfg.HostRoutingKernel = 0
	if on {
		cfg.HostRoutingKernel = 1
	}
	must(t, objs.Config.Put(uint32(0), cfg))
}

// With kernel host routing every container packet takes the host's routing and netfilter:
// encap_container sends nothing itself (it passes the packet untouched) and decap never hands a
// packet to a container, only into xnet0. The encap program still learns where containers are,
// without dropping anything, for deliver_bridge.
func TestKernelHostRoutingLeavesEveryPacketToTheStack(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	objs := load(t, ifindex)
	setHostRoutingKernel(t, objs, true)

	t.Run("a learned container's packet from the overlay is delivered into xnet0, not to the container", func(t *testing.T) {
		f := fromPeer()
		before := verdicts(t, objs.Counters)
		ret, out := run(t, objs.DecapTc, f.bytes())
		checkCounted(t, "tc", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_DECAP)
		want := testpkt.Eth(localVtep, peerNicMAC, testpkt.EtherTypeIPv4, f.inner())
		if ret != tcRedirect || !bytes.Equal(out[:len(want)], want) {
			t.Errorf("got %d\n% x\nwant %d (into xnet0)\n% x", ret, out[:len(want)], tcRedirect, want)
		}
	})

	newMAC := net.HardwareAddr{0x02, 0x42, 10, 244, 1, 6}
	toRemote := func(src netip.Addr, srcMAC net.HardwareAddr) []byte {
		ip := testpkt.IPv4{Src: src, Dst: remoteIP, Proto: testpkt.ProtoTCP}.
			Packet(testpkt.TCP(src, remoteIP, 40000, 5201, []byte("to the overlay")))
		return testpkt.Eth(gwMAC, srcMAC, testpkt.EtherTypeIPv4, ip)
	}
	// ctrIP sits behind a live interface here (the fixture's underlay NIC), so learn() keeps
	// it there.
	victim := XnetEndpoint{Ifindex: ifindex}
	copy(victim.Mac[:], ctrMAC)
	copy(victim.GwMac[:], gwMAC)
	for _, c := range []struct {
		name   string
		in     []byte
		learns bool
	}{
		{"a container's packet for a remote container passes to the stack, and the container is learned",
			toRemote(newCtrIP, newMAC), true},
		{"a packet from another live container's address passes to the stack (netfilter decides), and learns nothing",
			toRemote(ctrIP, newMAC), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			_ = objs.Endpoints.Delete(ip4(newCtrIP))
			must(t, objs.Endpoints.Put(ip4(ctrIP), victim))
			before := verdicts(t, objs.Counters)
			var (
				ret uint32
				out []byte
				err error
			)
			// ifindex 1 is the underlay namespace's lo: a live interface other than ctrIP's.
			inNS(func() { ret, out, err = runCtxErr(objs.EncapContainer, c.in, skbContext{Ifindex: 1}) })
			must(t, err)
			expectUntouched(t, "tc", ret, tcPass, out, c.in)
			after := verdicts(t, objs.Counters)
			for v := XnetVerdict(0); v < XnetVerdictVERDICT_MAX; v++ {
				if after[v] != before[v] {
					t.Errorf("counter %d moved by %d: a packet left to the stack is not counted here", v, after[v]-before[v])
				}
			}
			var ep XnetEndpoint
			learned := objs.Endpoints.Lookup(ip4(newCtrIP), &ep) == nil && bytes.Equal(ep.Mac[:], newMAC)
			if learned != c.learns {
				t.Errorf("learned %v (%+v), want %v", learned, ep, c.learns)
			}
			var got XnetEndpoint
			must(t, objs.Endpoints.Lookup(ip4(ctrIP), &got))
			if got != victim {
				t.Errorf("the learned container %v moved to %+v", ctrIP, got)
			}
		})
	}
}

// deliver_bridge, at the TC egress of a container bridge, takes overlay packets the host
// forwarded from xnet0 into the bridge and sends them out of the learned container's veth
// instead; everything else goes through the bridge as before. It works alike in both host
// routing modes.
func TestDeliverBridge(t *testing.T) {
	objs := load(t, 1)
	// What the host's forwarding hands the bridge: the kernel's neighbour entry of the
	// container as destination, the bridge's MAC as source.
	forwarded := func(dst netip.Addr, dstMAC net.HardwareAddr) []byte {
		ip := testpkt.IPv4{Src: remoteIP, Dst: dst, Proto: testpkt.ProtoTCP, TTL: 63}.
			Packet(testpkt.TCP(remoteIP, dst, 5201, 40000, []byte("from the overlay")))
		return testpkt.Eth(dstMAC, gwMAC, testpkt.EtherTypeIPv4, ip)
	}
	for _, kernel := range []bool{false, true} {
		setHostRoutingKernel(t, objs, kernel)
		for _, c := range []struct {
			name     string
			in       []byte
			cameFrom uint32 // ingress_ifindex: where the packet entered the host
			redirect bool
		}{
			{"an overlay packet forwarded from xnet0 to a learned container goes out of its veth",
				forwarded(ctrIP, ctrMAC), hostIfidx, true},
			{"an overlay packet to a container not learned yet crosses the bridge",
				forwarded(newCtrIP, ctrMAC), hostIfidx, false},
			{"a packet whose neighbour entry names another MAC than the learned one crosses the bridge",
				forwarded(ctrIP, net.HardwareAddr{0x02, 0x42, 10, 244, 1, 99}), hostIfidx, false},
			{"the host's own packet to a container crosses the bridge",
				forwarded(ctrIP, ctrMAC), 0, false},
			{"a packet routed in from the underlay NIC crosses the bridge",
				forwarded(ctrIP, ctrMAC), 1, false},
			{"ARP crosses the bridge",
				testpkt.Eth(ctrMAC, gwMAC, testpkt.EtherTypeARP, bytes.Repeat([]byte{1}, 28)), hostIfidx, false},
		} {
			name := c.name
			if kernel {
				name += " (kernel host routing)"
			}
			t.Run(name, func(t *testing.T) {
				before := verdicts(t, objs.Counters)
				ret, out := runCtx(t, objs.DeliverBridge, c.in, skbContext{IngressIfindex: c.cameFrom})
				after := verdicts(t, objs.Counters)
				if !c.redirect {
					expectUntouched(t, "tc", ret, tcPass, out, c.in)
					if d := after[XnetVerdictVERDICT_BRIDGE_TO_VETH] - before[XnetVerdictVERDICT_BRIDGE_TO_VETH]; d != 0 {
						t.Errorf("bridge_to_veth moved by %d", d)
					}
					return
				}
				checkCounted(t, "tc", before, after, XnetVerdictVERDICT_BRIDGE_TO_VETH)
				if ret != tcRedirect || !bytes.Equal(out[:len(c.in)], c.in) {
					t.Errorf("got %d, want %d (to the veth) with the frame as the kernel built it\n got % x\nwant % x", ret, tcRedirect, out[:len(c.in)], c.in)
				}
			})
		}
	}
}

// Kernel host routing holds for IPv6 too: a container's IPv6 packet for a peer passes to the
// stack untouched (and learns the container), and an IPv6 packet from the overlay for a learned
// container goes into xnet0, not into the container.
func TestKernelHostRoutingLeavesIPv6ToTheStack(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	objs := loadDualStack(t, ifindex)
	setHostRoutingKernel(t, objs, true)

	in := container6Frame(newCtrIP6, remoteIP6, 100, 0)
	var (
		ret uint32
		out []byte
		err error
	)
	inNS(func() { ret, out, err = runCtxErr(objs.EncapContainer, in, skbContext{Ifindex: 1}) })
	must(t, err)
	expectUntouched(t, "tc", ret, tcPass, out, in)
	var ep XnetEndpoint
	if err := objs.Endpoints6.Lookup(ip6(newCtrIP6), &ep); err != nil {
		t.Errorf("the container's IPv6 address was not learned: %v", err)
	}

	inner := tcp6(remoteIP6, ctrIP6, 13, 0)
	ret, out = run(t, objs.DecapTc, fromPeer6(inner).bytes())
	want := testpkt.Eth(localVtep, peerNicMAC, testpkt.EtherTypeIPv6, inner)
	if ret != tcRedirect || !bytes.Equal(out[:len(want)], want) {
		t.Errorf("decap of IPv6 for a learned container: got %d\n% x\nwant %d (into xnet0)\n% x", ret, out[:len(want)], tcRedirect, want)
	}
}
