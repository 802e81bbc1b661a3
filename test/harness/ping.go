package harness

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// pingReplyWait is how long Ping waits for the last reply (ping -W1).
const pingReplyWait = time.Second

// Ping sends count ICMP echo requests from a namespace to an address, interval apart, and
// counts the replies that arrive within a second of the last request. to may be IPv4 or IPv6
// (ICMPv6 echo). A host that does not answer is not an error: err is only for what kept Ping
// from trying.
func Ping(ctx context.Context, from *Namespace, to netip.Addr, count int, interval time.Duration) (sent, received int, err error) {
	network, listen, proto := "ip4:icmp", "0.0.0.0", 1
	var request, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	switch {
	case to.Is6() && !to.Is4In6():
		network, listen, proto = "ip6:ipv6-icmp", "::", 58
		request, reply = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	case !to.Is4():
		return 0, 0, fmt.Errorf("harness: Ping %s: not an IPv4 or IPv6 address", to)
	}
	var conn *icmp.PacketConn
	// A raw ICMP socket sees every echo reply in the namespace; the random id keeps parallel
	// Pings from counting each other's replies. (The kernel fills in ICMPv6 checksums.)
	err = from.Do(func() error {
		var err error
		conn, err = icmp.ListenPacket(network, listen)
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("harness: icmp socket in %s: %w", from.Name, err)
	}
	defer conn.Close()
	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := int(binary.BigEndian.Uint16(idb[:]))

	var mu sync.Mutex
	got := map[int]bool{}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 1500)
		for {
			n, peer, err := conn.ReadFrom(buf)
			if err != nil {
				return // deadline or closed
			}
			if ip, ok := peer.(*net.IPAddr); !ok || !ip.IP.Equal(to.AsSlice()) {
				continue
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil || m.Type != reply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id {
				mu.Lock()
				got[e.Seq] = true
				mu.Unlock()
			}
		}
	}()

	dst := &net.IPAddr{IP: to.AsSlice()}
	for seq := 1; seq <= count && ctx.Err() == nil; seq++ {
		if seq > 1 {
			select {
			case <-ctx.Done():
				continue
			case <-time.After(interval):
			}
		}
		msg := icmp.Message{Type: request, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("xnet-harness")}}
		b, _ := msg.Marshal(nil)
		// A send error (no route, neighbour unreachable) is a lost ping, as for ping(8).
		_, _ = conn.WriteTo(b, dst)
		sent++
	}
	wait := pingReplyWait
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
		wait = time.Until(dl)
	}
	// Stop early once every reply is in.
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = conn.SetReadDeadline(time.Now())
	<-readerDone
	mu.Lock()
	defer mu.Unlock()
	return sent, len(got), nil
}

// PingsWithin says whether dst answers an echo request from ns within wait: a path that was
// just set up may lose its first packets (a device's queue starts with the link watch, up to a
// second after the link came up; neighbour discovery retries after a second).
func PingsWithin(t testing.TB, ns *Namespace, dst netip.Addr, wait time.Duration) bool {
	t.Helper()
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); {
		_, got, err := Ping(t.Context(), ns, dst, 3, 100*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if got > 0 {
			return true
		}
	}
	return false
}
