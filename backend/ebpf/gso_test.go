package ebpf

import (
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/test/harness"
)

// TestLargeTCPSegmentsPassTheDecapLengthChecks: the decap checks the inner IPv4 tot_len against
// the bytes of the frame. A TSO/GSO packet arrives as one skb of up to 64 KB whose bytes are
// mostly in pages, not in the linear part the program can read; TC must count skb->len, and
// generic XDP (which linearizes) data_end - data. 4 MB of TCP between containers on two hosts
// arrive intact with either decap, in large packets, and none is dropped as malformed.
func TestLargeTCPSegmentsPassTheDecapLengthChecks(t *testing.T) {
	for _, decap := range []string{DecapTC, DecapXDP} {
		t.Run(decap, func(t *testing.T) {
			if decap == DecapXDP {
				if err := loader.ProbeXDP(); err != nil {
					t.Skipf("this kernel cannot run the XDP decap program: %v", err)
				}
			}
			topo := harness.NewForTest(t, harness.Options{Hosts: 2})
			pair := newPeeredPair(t, topo, func(h *harness.Host) *Backend { return newOn(t, h, decap) })
			sent := tcpTransfer(t, pair.containers[0], pair.containers[1], 4<<20)
			st, err := pair.backends[1].Status()
			if err != nil {
				t.Fatal(err)
			}
			rx := st.Peers[pair.leases[0].PublicIP.String()]
			t.Logf("%s decap (%s): %d bytes sent, %d packets decapsulated, %d bytes each on average; verdicts %v",
				decap, st.Decap, sent, rx.RxPackets, rx.RxBytes/max(rx.RxPackets, 1), st.Verdicts)
			if n := st.Verdicts["drop_malformed"]; n != 0 {
				t.Errorf("%d packets dropped as malformed", n)
			}
			if rx.RxPackets == 0 || rx.RxBytes/rx.RxPackets <= 1500 {
				t.Errorf("decapsulated %d packets of %d bytes on average: want GSO packets above the MTU, or the test checks nothing", rx.RxPackets, rx.RxBytes/max(rx.RxPackets, 1))
			}
		})
	}
}

// tcpTransfer sends n random bytes over TCP from one container to another and fails unless
// they arrive intact; it returns n.
func tcpTransfer(t *testing.T, from, to *harness.Container, n int) int {
	t.Helper()
	payload := make([]byte, n)
	rand.Read(payload)
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(to.IP.String(), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan [32]byte, 1)
	go func() {
		var sum [32]byte
		defer func() { got <- sum }()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		h := sha256.New()
		io.Copy(h, c)
		copy(sum[:], h.Sum(nil))
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if <-got != sha256.Sum256(payload) {
		t.Fatal("the TCP payload did not arrive intact")
	}
	return n
}
