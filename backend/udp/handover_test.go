package udp

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// The handover as the backend does it, with a stand-in for systemd's fd store and the two
// processes played by two backends in the test: the first stores xnet0's queues and sockets,
// stops; a packet routed into xnet0 meanwhile waits on a queue the store keeps attached; the
// second takes the set back and sends that packet to its peer, once the peer is programmed.
func TestTakenOverQueuesSendWhatWaitedOnThem(t *testing.T) {
	ns := newNS(t)
	ns.ip(t, "addr add 198.18.0.12/32 dev lo") // the peer's PublicIP: we catch what is sent to it
	m := newServiceManager(t)
	tune := Tuning{Queues: 2}
	h2 := testLease("10.244.2.0/24", h2IP)

	first := newWithStore(t, ns, tune, m, nil)
	if err := first.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	if err := first.AddPeer(h2); err != nil {
		t.Fatal(err)
	}
	want := []string{"xnet-udp-tun-0", "xnet-udp-rx-0", "xnet-udp-tun-1", "xnet-udp-rx-1"}
	if got := storedSoon(m, len(want)); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("the store holds %v, want %v", got, want)
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}

	peer := listenIn(t, ns, "198.18.0.12:8472")
	marker := []byte("sent-while-xnetd-was-down")
	ns.do(t, func() {
		c, err := net.Dial("udp4", "10.244.2.5:9999")
		if err == nil {
			_, err = c.Write(marker)
			c.Close()
		}
		if err != nil {
			t.Error(err)
		}
	})
	if got := peer.wait(300 * time.Millisecond); got != nil {
		t.Fatalf("something reached the peer with no process running: %q", got)
	}

	log := &logBuffer{}
	second := newWithStore(t, ns, tune, m, log)
	if err := second.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log.String(), "took xnet0's queues and receiving sockets back") {
		t.Errorf("the second backend did not take the stored set:\n%s", log.String())
	}
	// xnetd programs the peers once it has listed the leases in etcd, some time after Setup:
	// read before then, the waiting packet would find no peer and be dropped.
	time.Sleep(200 * time.Millisecond)
	if err := second.AddPeer(h2); err != nil {
		t.Fatal(err)
	}
	if err := second.PrunePeers([]subnetmgr.Lease{h2}); err != nil {
		t.Fatal(err)
	}
	if got := peer.wait(5 * time.Second); !bytes.Contains(got, marker) {
		t.Errorf("the peer received %q, want the VXLAN datagram carrying %q", got, marker)
	}
	if socks, _ := ns.try("ss -ulnH"); strings.Count(socks, "198.18.0.11:8472") != 2 {
		t.Errorf("want exactly the two stored receiving sockets on 198.18.0.11:8472:\n%s", socks)
	}
}

// A stored set that is not what the backend would open is not taken: it is closed and removed
// from the store (so no stale queue or socket stays beside the new ones), the log says why,
// and a new set is opened and stored.
func TestAStoredSetThatDoesNotFitIsReplaced(t *testing.T) {
	ns := newNS(t)
	m := newServiceManager(t)
	first := newWithStore(t, ns, Tuning{Queues: 2}, m, nil)
	if err := first.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(false); err != nil {
		t.Fatal(err)
	}
	// The manager reads the store messages in its own time; under load Passed could come first.
	if got := storedSoon(m, 4); len(got) != 4 {
		t.Fatalf("the first backend stored %v, want two queues and two sockets", got)
	}
	passed, err := m.Passed()
	if err != nil {
		t.Fatal(err)
	}
	// What an older build might have stored under these names: the sockets where the queues
	// should be.
	for i := range passed {
		name := passed[i].Name
		switch {
		case strings.Contains(name, "-tun-"):
			passed[i].Name = strings.Replace(name, "-tun-", "-rx-", 1)
		case strings.Contains(name, "-rx-"):
			passed[i].Name = strings.Replace(name, "-rx-", "-tun-", 1)
		}
	}
	log := &logBuffer{}
	second := newWithPassed(t, ns, Tuning{Queues: 2}, m, passed, log)
	if err := second.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"not taking the stored queues and sockets back; opening new ones", "xnet-udp-tun-0: not a queue of a TUN device", "xnet-udp-rx-0: not a socket"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, log.String())
		}
	}
	if got := storedSoon(m, 4); len(got) != 4 {
		t.Errorf("the store holds %v, want the four new fds", got)
	}
	if socks, _ := ns.try("ss -ulnH"); strings.Count(socks, "198.18.0.11:8472") != 2 {
		t.Errorf("want only the two new receiving sockets on 198.18.0.11:8472 (the stored ones closed everywhere):\n%s", socks)
	}
}

// storedSoon is what m stores once it holds n fds, or after a second: the manager reads its
// socket on its own goroutine, as systemd reads it in its own time.
func storedSoon(m *harness.ServiceManager, n int) []string {
	deadline := time.Now().Add(time.Second)
	for len(m.Stored()) != n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return m.Stored()
}

func newServiceManager(t *testing.T) *harness.ServiceManager {
	t.Helper()
	m, err := harness.NewServiceManager()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// newWithStore is newIn with a store on m holding what m passes now.
func newWithStore(t *testing.T, ns *testNS, tune Tuning, m *harness.ServiceManager, log *logBuffer) *Backend {
	t.Helper()
	passed, err := m.Passed()
	if err != nil {
		t.Fatal(err)
	}
	return newWithPassed(t, ns, tune, m, passed, log)
}

func newWithPassed(t *testing.T, ns *testNS, tune Tuning, m *harness.ServiceManager, passed []fdstore.Passed, log *logBuffer) *Backend {
	t.Helper()
	store, err := fdstore.New(m.Socket(), passed)
	if err != nil {
		t.Fatal(err)
	}
	opts := testOpts()
	opts.FDStore = store
	if log != nil {
		opts.Logger = slog.New(slog.NewTextHandler(log, nil))
	}
	var b *Backend
	ns.do(t, func() { b, err = NewWithTuning(opts, tune) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}

// logBuffer keeps a backend's log for the test to read while its goroutines write.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// catcher is a UDP socket in a test namespace that keeps the first datagram it gets.
type catcher struct{ got chan []byte }

func listenIn(t *testing.T, ns *testNS, addr string) *catcher {
	t.Helper()
	var conn net.PacketConn
	ns.do(t, func() {
		var err error
		if conn, err = net.ListenPacket("udp4", addr); err != nil {
			t.Error(err)
		}
	})
	if conn == nil {
		t.FailNow()
	}
	t.Cleanup(func() { conn.Close() })
	c := &catcher{got: make(chan []byte, 16)}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			c.got <- bytes.Clone(buf[:n])
		}
	}()
	return c
}

// wait is the next datagram, or nil when none came within d.
func (c *catcher) wait(d time.Duration) []byte {
	select {
	case b := <-c.got:
		return b
	case <-time.After(d):
		return nil
	}
}
