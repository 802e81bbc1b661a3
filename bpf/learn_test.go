package bpf

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// The encap program learns which veth a local container sits behind from what the container
// sends, and the decap hands that container's traffic to that veth. A container (with
// NET_RAW) that sends one packet with a neighbour's source address must not steal the
// neighbour's traffic: an address bound to a live veth stays there until that veth is gone.
func TestLearn(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	objs := load(t, ifindex)

	// Two container veths in the underlay namespace, where the test runs happen: the packets
	// "arrive" on them (the test run's ifindex), and the kernel can tell they exist.
	var victimVeth, attackerVeth uint32
	var err error
	inNS(func() {
		err = func() error {
			for i, idx := range []*uint32{&victimVeth, &attackerVeth} {
				name := fmt.Sprintf("c%d", i)
				if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
					return err
				}
				l, err := netlink.LinkByName(name)
				if err != nil {
					return err
				}
				*idx = uint32(l.Attrs().Index)
			}
			return nil
		}()
	})
	must(t, err)
	const goneVeth = 999999 // no such interface

	victimMAC := net.HardwareAddr{0x02, 0x42, 10, 244, 1, 7}
	attackerMAC := net.HardwareAddr{0x02, 0x42, 10, 244, 1, 8}
	victimIP := netip.MustParseAddr("10.244.1.7")
	neighbourIP := netip.MustParseAddr("10.244.1.9")
	neighbourMAC := net.HardwareAddr{0x02, 0x42, 10, 244, 1, 9}
	frameTo := func(src netip.Addr, srcMAC net.HardwareAddr, dst netip.Addr, dstMAC net.HardwareAddr) []byte {
		ip := testpkt.IPv4{Src: src, Dst: dst, Proto: testpkt.ProtoUDP}.
			Packet(testpkt.UDP(40000, 5201, []byte("learn me")))
		return testpkt.Eth(dstMAC, srcMAC, testpkt.EtherTypeIPv4, ip)
	}
	endpoint := func(ifindex uint32, mac net.HardwareAddr) *XnetEndpoint {
		ep := &XnetEndpoint{Ifindex: ifindex}
		copy(ep.Mac[:], mac)
		copy(ep.GwMac[:], gwMAC)
		return ep
	}

	for _, c := range []struct {
		name    string
		known   *XnetEndpoint // the endpoint of victimIP before the packet; nil: none
		from    uint32        // the veth the packet arrives on
		srcMAC  net.HardwareAddr
		verdict XnetVerdict
		want    *XnetEndpoint // the endpoint of victimIP after the packet; nil: none
		dst     netip.Addr    // default remoteIP through gwMAC
		dstMAC  net.HardwareAddr
	}{
		{"a new container is learned from its first packet",
			nil, victimVeth, victimMAC, XnetVerdictVERDICT_ENCAP, endpoint(victimVeth, victimMAC), netip.Addr{}, nil},
		{"a container's own packets keep its endpoint",
			endpoint(victimVeth, victimMAC), victimVeth, victimMAC, XnetVerdictVERDICT_ENCAP, endpoint(victimVeth, victimMAC), netip.Addr{}, nil},
		{"a container that changed its MAC on its own veth is learned again",
			endpoint(victimVeth, attackerMAC), victimVeth, victimMAC, XnetVerdictVERDICT_ENCAP, endpoint(victimVeth, victimMAC), netip.Addr{}, nil},
		{"an address bound to another live veth does not move, and the spoofed packet is dropped",
			endpoint(victimVeth, victimMAC), attackerVeth, attackerMAC, XnetVerdictVERDICT_DROP_BAD_SOURCE, endpoint(victimVeth, victimMAC), netip.Addr{}, nil},
		{"an address whose veth is gone moves to the veth that sends from it now",
			endpoint(goneVeth, victimMAC), attackerVeth, attackerMAC, XnetVerdictVERDICT_ENCAP, endpoint(attackerVeth, attackerMAC), netip.Addr{}, nil},
		{"a broadcast source MAC is never learned",
			nil, victimVeth, net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, XnetVerdictVERDICT_DROP_BAD_SOURCE, nil, netip.Addr{}, nil},
		{"a multicast source MAC is never learned",
			nil, victimVeth, net.HardwareAddr{0x01, 0x00, 0x5e, 0, 0, 7}, XnetVerdictVERDICT_DROP_BAD_SOURCE, nil, netip.Addr{}, nil},
		{"a multicast source MAC does not replace a learned endpoint",
			endpoint(victimVeth, victimMAC), victimVeth, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, XnetVerdictVERDICT_DROP_BAD_SOURCE, endpoint(victimVeth, victimMAC), netip.Addr{}, nil},
		{"an all-zero source MAC is never learned",
			nil, victimVeth, net.HardwareAddr{0, 0, 0, 0, 0, 0}, XnetVerdictVERDICT_DROP_BAD_SOURCE, nil, netip.Addr{}, nil},
		// Only packets routed through the gateway say what the gateway's MAC is.
		{"a packet to a neighbour on the bridge keeps the gateway MAC learned",
			endpoint(victimVeth, victimMAC), victimVeth, victimMAC, XnetVerdictVERDICT_PASS, endpoint(victimVeth, victimMAC), neighbourIP, neighbourMAC},
		{"a broadcast keeps the gateway MAC learned",
			endpoint(victimVeth, victimMAC), victimVeth, victimMAC, XnetVerdictVERDICT_PASS, endpoint(victimVeth, victimMAC),
			netip.MustParseAddr("255.255.255.255"), net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{"a multicast keeps the gateway MAC learned",
			endpoint(victimVeth, victimMAC), victimVeth, victimMAC, XnetVerdictVERDICT_PASS, endpoint(victimVeth, victimMAC),
			netip.MustParseAddr("239.1.2.3"), net.HardwareAddr{0x01, 0x00, 0x5e, 1, 2, 3}},
		{"a new container is not learned from a packet to a neighbour",
			nil, victimVeth, victimMAC, XnetVerdictVERDICT_PASS, nil, neighbourIP, neighbourMAC},
		{"a packet to a neighbour from an address bound to another live veth is still dropped",
			endpoint(victimVeth, victimMAC), attackerVeth, attackerMAC, XnetVerdictVERDICT_DROP_BAD_SOURCE, endpoint(victimVeth, victimMAC), neighbourIP, neighbourMAC},
	} {
		t.Run(c.name, func(t *testing.T) {
			_ = objs.Endpoints.Delete(ip4(victimIP))
			if c.known != nil {
				must(t, objs.Endpoints.Put(ip4(victimIP), c.known))
			}
			dst, dstMAC := c.dst, c.dstMAC
			if !dst.IsValid() {
				dst, dstMAC = remoteIP, gwMAC
			}
			in := frameTo(victimIP, c.srcMAC, dst, dstMAC)
			ret, out := runCounted(t, objs, inNS, objs.EncapContainer, in, skbContext{Ifindex: c.from}, c.verdict)
			switch c.verdict {
			case XnetVerdictVERDICT_ENCAP:
			case XnetVerdictVERDICT_PASS:
				expectUntouched(t, "tc", ret, tcPass, out, in)
			default:
				expectUntouched(t, "tc", ret, tcDrop, out, in)
			}
			var got XnetEndpoint
			err = objs.Endpoints.Lookup(ip4(victimIP), &got)
			switch {
			case c.want == nil && err == nil:
				t.Errorf("learned %+v, want no endpoint", got)
			case c.want != nil && err != nil:
				t.Errorf("no endpoint (%v), want %+v", err, *c.want)
			case c.want != nil && (got.Ifindex != c.want.Ifindex || !bytes.Equal(got.Mac[:], c.want.Mac[:]) || got.GwMac != c.want.GwMac):
				t.Errorf("endpoint %+v, want %+v", got, *c.want)
			}
		})
	}
}
