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
// reassembles them, and the datagram must still reach the container. One from a source the
// sender's lease does not hold must not.
func TestADatagramFragmentedOnTheUnderlayIsDelivered(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	leases := []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24")}
	var bs []*Backend
	for i, h := range hosts {
		b := startOn(t, h, vxlanLease(t, leases[i].String(), h.UnderlayIP.String()))
		t.Cleanup(func() { _ = b.Close(true) })
		bs = append(bs, b)
		if err := b.AddPeer(vxlanLease(t, leases[1-i].String(), hosts[1-i].UnderlayIP.String())); err != nil {
			t.Fatal(err)
		}
	}
	recv := hosts[1]
	if err := recv.SetupDocker0(netip.PrefixFrom(leases[1].Addr().Next(), 24), bs[1].MTU()); err != nil {
		t.Fatal(err)
	}
	ctr, err := recv.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	var listener *net.UDPConn
	if err := ctr.Namespace.Do(func() (err error) {
		listener, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer listener.Close()

	// The sender's own datapath plays no part: a plain UDP socket on its underlay address sends
	// the VXLAN datagram with DF clear through an eth0 whose MTU makes the kernel fragment it.
	send := func(innerSrc netip.Addr, marker []byte) {
		t.Helper()
		inner := testpkt.IPv4{Src: innerSrc, Dst: ctr.IP, Proto: testpkt.ProtoUDP, TTL: 64}.
			Packet(testpkt.UDP(5000, 9999, append(marker, bytes.Repeat([]byte{'x'}, 1300)...)))
		frame := testpkt.Eth(backend.VtepMAC(recv.UnderlayIP), backend.VtepMAC(hosts[0].UnderlayIP), testpkt.EtherTypeIPv4, inner)
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

	send(leases[0].Addr().Next().Next(), []byte("genuine"))
	buf := make([]byte, 2048)
	_ = listener.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, _, err := listener.ReadFromUDP(buf)
	if err != nil || !bytes.HasPrefix(buf[:n], []byte("genuine")) {
		st, _ := bs[1].Status()
		t.Fatalf("the fragmented datagram did not reach the container: %v (read %q; fragments delivered %d, refused %d)", err, buf[:min(n, 16)], st.FragmentsDelivered, st.FragmentsRefused)
	}

	// The same from an inner source that no lease of the sender holds.
	send(netip.MustParseAddr("10.244.3.5"), []byte("spoofed"))
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
