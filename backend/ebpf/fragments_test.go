package ebpf

import (
	"bytes"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/bpf/testpkt"
	"github.com/xnet-dev/xnet/test/harness"
)

// A VXLAN datagram fragmented on the underlay (a path with a smaller MTU; the outer DF bit is
// clear) reaches an ebpf host as fragments, which the decap programs cannot take: the stack
// reassembles them, and the datagram must still reach the container, whether it carries IPv4
// or (in a dual-stack overlay) IPv6. One from a source the sender's lease does not hold must
// not.
func TestADatagramFragmentedOnTheUnderlayIsDelivered(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		name := "IPv4"
		if v6 {
			name = "IPv6 in a dual-stack overlay"
		}
		t.Run(name, func(t *testing.T) { testFragmentedDatagram(t, v6) })
	}
}

func testFragmentedDatagram(t *testing.T, v6 bool) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	var (
		bs     []*Backend
		leases []backendLease
	)
	for i, h := range hosts {
		l := dualStackLease(t, i, h.UnderlayIP)
		cfg := dualStackConfig
		if !v6 {
			l.IPv6Subnet, cfg = netip.Prefix{}, testConfig
		}
		b := newOn(t, h, DecapTC)
		t.Cleanup(func() { _ = b.Close(true) })
		if err := b.Setup(t.Context(), l, cfg); err != nil {
			t.Fatal(err)
		}
		bs, leases = append(bs, b), append(leases, backendLease{l.Subnet, l.IPv6Subnet})
	}
	for i, b := range bs {
		l := dualStackLease(t, 1-i, hosts[1-i].UnderlayIP)
		if !v6 {
			l.IPv6Subnet = netip.Prefix{}
		}
		if err := b.AddPeer(l); err != nil {
			t.Fatal(err)
		}
	}
	recv := hosts[1]
	if err := recv.SetupDocker0(netip.PrefixFrom(leases[1].v4.Addr().Next(), 24), bs[1].MTU()); err != nil {
		t.Fatal(err)
	}
	ctr, err := recv.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	dst, network := ctr.IP, "udp4"
	if v6 {
		dst, network = dockerIPv6(t, recv, leases[1].v6, ctr)[0], "udp6"
	}
	var listener *net.UDPConn
	if err := ctr.Namespace.Do(func() (err error) {
		listener, err = net.ListenUDP(network, &net.UDPAddr{Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer listener.Close()

	// The sender's own datapath plays no part: a plain UDP socket on its underlay address sends
	// the VXLAN datagram with DF clear through an eth0 whose MTU makes the kernel fragment it.
	send := func(innerSrc netip.Addr, marker []byte) {
		t.Helper()
		payload := append(marker, bytes.Repeat([]byte{'x'}, 1300)...)
		var frame []byte
		if innerSrc.Is4() {
			inner := testpkt.IPv4{Src: innerSrc, Dst: dst, Proto: testpkt.ProtoUDP, TTL: 64}.
				Packet(testpkt.UDP(5000, 9999, payload))
			frame = testpkt.Eth(backend.VtepMAC(recv.UnderlayIP), backend.VtepMAC(hosts[0].UnderlayIP), testpkt.EtherTypeIPv4, inner)
		} else {
			inner := testpkt.IPv6{Src: innerSrc, Dst: dst, NextHeader: testpkt.ProtoUDP}.
				Packet(testpkt.UDPWithChecksum(innerSrc, dst, 5000, 9999, payload))
			frame = testpkt.Eth(backend.VtepMAC(recv.UnderlayIP), backend.VtepMAC(hosts[0].UnderlayIP), testpkt.EtherTypeIPv6, inner)
		}
		datagram := testpkt.VXLAN(1, frame)
		err := hosts[0].Do(func() error {
			c, err := net.DialUDP("udp4", &net.UDPAddr{IP: hosts[0].UnderlayIP.AsSlice()}, &net.UDPAddr{IP: recv.UnderlayIP.AsSlice(), Port: 8472})
			if err != nil {
				return err
			}
			defer c.Close()
			raw, err := c.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			if err := raw.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DONT)
			}); err != nil {
				return err
			}
			if serr != nil {
				return serr
			}
			_, err = c.Write(datagram)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	ctx := t.Context()
	if err := hosts[0].IP(ctx, "link set eth0 mtu 900"); err != nil {
		t.Fatal(err)
	}

	genuine, spoofed := leases[0].v4.Addr().Next().Next(), netip.MustParseAddr("10.244.3.5")
	if v6 {
		genuine, spoofed = leases[0].v6.Addr().Next().Next(), netip.MustParseAddr("fd00:10:244:3::5")
	}
	send(genuine, []byte("genuine"))
	buf := make([]byte, 2048)
	_ = listener.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, _, err := listener.ReadFromUDP(buf)
	if err != nil || !bytes.HasPrefix(buf[:n], []byte("genuine")) {
		st, _ := bs[1].Status()
		t.Fatalf("the fragmented datagram did not reach the container: %v (read %q; fragments delivered %d, refused %d)", err, buf[:min(n, 16)], st.FragmentsDelivered, st.FragmentsRefused)
	}

	// The same from an inner source that no lease of the sender holds.
	send(spoofed, []byte("spoofed"))
	_ = listener.SetReadDeadline(time.Now().Add(1 * time.Second))
	if n, _, err := listener.ReadFromUDP(buf); err == nil {
		t.Fatalf("a fragmented datagram with a spoofed inner source reached the container: %q", buf[:min(n, 16)])
	}
	st, err := bs[1].Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.FragmentsDelivered != 1 || st.FragmentsRefused != 1 {
		t.Fatalf("fragments delivered %d, refused %d; want 1 and 1", st.FragmentsDelivered, st.FragmentsRefused)
	}
}

// backendLease is the two subnets of a host's lease in these tests.
type backendLease struct{ v4, v6 netip.Prefix }
