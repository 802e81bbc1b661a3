package wireguard

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/xnet-dev/xnet/test/harness"
)

// TestBindMovesDatagramsAsStdNetBindDoes holds udpBind to what wireguard-go expects of its
// Bind, between two hosts of the harness: a datagram arrives with the endpoint it came from and
// the local address it was sent to, replies leave from that address (the host has two), a
// batch leaves as the same datagrams in the same order whether or not UDP GSO joins them, a
// GSO'd burst from the peer comes back as its datagrams, and Close ends a waiting receive with
// net.ErrClosed.
func TestBindMovesDatagramsAsStdNetBindDoes(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	h1, h2 := topo.Hosts()[0], topo.Hosts()[1]
	second := netip.MustParseAddr("198.18.0.111")
	if _, err := h1.Run(t.Context(), "ip", "addr", "add", second.String()+"/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromPath(h1.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	b := newUDPBind(ns, harness.TestLogger(t))
	fns, port, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if port == 0 || len(fns) == 0 {
		t.Fatalf("Open(0) = %d receive functions, port %d", len(fns), port)
	}
	if _, _, err := b.Open(0); !errors.Is(err, conn.ErrBindAlreadyOpen) {
		t.Errorf("a second Open: %v, want ErrBindAlreadyOpen", err)
	}
	recv4 := fns[0]
	var peer *net.UDPConn
	if err := h2.Do(func() (err error) {
		peer, err = net.ListenUDP("udp4", &net.UDPAddr{IP: h2.UnderlayIP.AsSlice()})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	peerAddr := peer.LocalAddr().(*net.UDPAddr).AddrPort()
	bufs := make([][]byte, b.BatchSize())
	for i := range bufs {
		bufs[i] = make([]byte, 65536)
	}
	sizes, eps := make([]int, len(bufs)), make([]conn.Endpoint, len(bufs))
	// receive collects want datagrams from recv4, failing after a few seconds.
	receive := func(want int) ([][]byte, []conn.Endpoint) {
		t.Helper()
		var got [][]byte
		var from []conn.Endpoint
		deadline := time.AfterFunc(5*time.Second, func() { b.Close() })
		defer deadline.Stop()
		for len(got) < want {
			n, err := recv4(bufs, sizes, eps)
			if err != nil {
				t.Fatalf("receive after %d of %d datagrams: %v", len(got), want, err)
			}
			for i := range n {
				got = append(got, append([]byte(nil), bufs[i][:sizes[i]]...))
				from = append(from, eps[i])
			}
		}
		return got, from
	}

	if _, err := peer.WriteToUDPAddrPort([]byte("hello"), netip.AddrPortFrom(second, port)); err != nil {
		t.Fatal(err)
	}
	got, from := receive(1)
	ep := from[0]
	if string(got[0]) != "hello" || ep.DstToString() != peerAddr.String() || ep.SrcIP() != second {
		t.Fatalf("received %q from %s to %s, want \"hello\" from %s to %s", got[0], ep.DstToString(), ep.SrcIP(), peerAddr, second)
	}

	// A batch: equal sizes that GSO joins, a shorter one that ends the run, then more.
	var batch [][]byte
	for i, size := range []int{1000, 1000, 1000, 400, 1000, 1000, 30} {
		batch = append(batch, bytes.Repeat([]byte{byte(i + 1)}, size))
	}
	for _, gso := range []bool{true, false} {
		for _, s := range b.socks {
			s.gso.Store(gso)
		}
		if err := b.Send(batch, ep); err != nil {
			t.Fatalf("Send (GSO %v): %v", gso, err)
		}
		for i, want := range batch {
			_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 2000)
			n, src, err := peer.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("GSO %v: datagram %d: %v", gso, i, err)
			}
			if !bytes.Equal(buf[:n], want) || src != netip.AddrPortFrom(second, port) {
				t.Errorf("GSO %v: datagram %d: %d bytes of %d from %s, want %d of %d from %s:%d",
					gso, i, n, buf[0], src, len(want), want[0], second, port)
			}
		}
	}

	// The peer's GSO send of 10 datagrams comes back as 10 packets, in order.
	var burst []byte
	for i := range 10 {
		burst = append(burst, bytes.Repeat([]byte{byte(0x40 + i)}, 500)...)
	}
	oob := make([]byte, unix.CmsgSpace(2))
	c := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	c.Level, c.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
	c.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], 500)
	if _, _, err := peer.WriteMsgUDPAddrPort(burst, oob, netip.AddrPortFrom(h1.UnderlayIP, port)); err != nil {
		t.Fatal(err)
	}
	got, from = receive(10)
	for i, g := range got {
		if len(g) != 500 || g[0] != byte(0x40+i) || from[i].DstToString() != peerAddr.String() || from[i].SrcIP() != h1.UnderlayIP {
			t.Errorf("packet %d of the burst: %d bytes of %#x from %s to %s", i, len(g), g[0], from[i].DstToString(), from[i].SrcIP())
		}
	}

	done := make(chan error, 1)
	go func() {
		_, err := recv4(bufs, sizes, eps)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("receive after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a waiting receive")
	}
	if err := b.Send(batch, ep); err == nil {
		t.Error("Send after Close succeeded")
	}
}
