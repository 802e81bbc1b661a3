package ebpf

import (
	"context"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/harness"
)

// TestReceiverCoalescesDecapsulatedTCP: the TC decap pulls the headers it reads into the linear
// part of a paged skb, and bpf_redirect_peer hands that same skb to the container's TCP. Had the
// pull taken payload bytes with it (it once pulled a fixed 144 bytes, 28 of them payload behind a
// TCP header with timestamps), the receiver could not merge one segment into the one before
// (skb_try_coalesce refuses a kmalloc'ed head with data in it): every 64 KB segment stayed an skb
// of its own in the receive and out-of-order queues, and a single stream had 1.8 times the
// spurious retransmits it has now. The receiving container's TCP must coalesce, as it does behind
// a routed path: with a reader slower than the stream, most segments that arrive behind a queued
// one are merged into it (TCPRcvCoalesce, TCPBacklogCoalesce). The old pull left both at 0.
func TestReceiverCoalescesDecapsulatedTCP(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	pair := newPeeredPair(t, topo, func(h *harness.Host) *Backend { return newOn(t, h, DecapTC) })
	from, to := pair.containers[0], pair.containers[1]
	before := tcpCounters(t, to)
	const total = 16 << 20
	slowTransfer(t, from, to, total)
	after := tcpCounters(t, to)

	segs := after["TcpInSegs"] - before["TcpInSegs"]
	merged := after["TcpExtTCPRcvCoalesce"] - before["TcpExtTCPRcvCoalesce"] +
		after["TcpExtTCPBacklogCoalesce"] - before["TcpExtTCPBacklogCoalesce"]
	st, err := pair.backends[1].Status()
	if err != nil {
		t.Fatal(err)
	}
	rx := st.Peers[pair.leases[0].PublicIP.String()]
	t.Logf("%d bytes: %d segments received, %d merged into the one before; %d packets decapsulated, %d bytes each on average",
		total, segs, merged, rx.RxPackets, rx.RxBytes/max(rx.RxPackets, 1))
	if rx.RxPackets == 0 || rx.RxBytes/rx.RxPackets <= 1500 {
		t.Fatalf("decapsulated %d packets of %d bytes on average: the test needs GSO packets, whose payload is paged, to see what the pull takes", rx.RxPackets, rx.RxBytes/max(rx.RxPackets, 1))
	}
	// Behind a routed path about half of them are merged with this reader; the old pull
	// merged none (a tiny segment can still be copied into a tail's spare room).
	if merged*10 < segs {
		t.Errorf("the receiving container's TCP merged %d of %d segments: decapsulated segments cannot be coalesced (payload in the skb head?)", merged, segs)
	}
}

// slowTransfer sends n bytes over TCP from one container to another, the receiver pausing after
// every 256 KB it reads so that segments arrive while earlier ones still wait in its queue.
func slowTransfer(t *testing.T, from, to *harness.Container, n int) {
	t.Helper()
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(to.IP.String(), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		var read int64
		defer func() { got <- read }()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 256<<10)
		for {
			m, err := io.ReadFull(c, buf)
			read += int64(m)
			if err != nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if read := <-got; read != int64(n) {
		t.Fatalf("received %d bytes of %d", read, n)
	}
}

// tcpCounters reads the TCP counters of a container's namespace as nstat names them
// ("TcpInSegs", "TcpExtTCPRcvCoalesce").
func tcpCounters(t *testing.T, c *harness.Container) map[string]uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	out, err := c.Run(ctx, "cat", "/proc/net/snmp", "/proc/net/netstat")
	if err != nil {
		t.Fatalf("read the counters of %s: %v", c.Role(), err)
	}
	// Each group is two lines: "Prefix: name name ..." and "Prefix: value value ...".
	counters := map[string]uint64{}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) != len(values) || len(names) == 0 || names[0] != values[0] {
			t.Fatalf("unexpected counter lines in %s: %q, %q", c.Role(), lines[i], lines[i+1])
		}
		prefix := strings.TrimSuffix(names[0], ":")
		for j := 1; j < len(names); j++ {
			if v, err := strconv.ParseUint(values[j], 10, 64); err == nil {
				counters[prefix+names[j]] = v
			}
		}
	}
	return counters
}
