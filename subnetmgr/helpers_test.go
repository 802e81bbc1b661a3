package subnetmgr

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// logBuf collects slog output for assertions; safe for concurrent writers.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testPrefix is unique per test so that leftovers of one test never meet another.
func testPrefix(t *testing.T) string {
	return "/xnet-test/" + strings.NewReplacer("/", "-", " ", "_").Replace(t.Name())
}

// newTestManager connects a manager to srv with short retries and a captured log.
func newTestManager(t *testing.T, srv *etcdtest.Server, prefix string, ttl time.Duration) (*Manager, *logBuf) {
	t.Helper()
	buf := &logBuf{}
	m, err := New(Options{
		Endpoints: []string{srv.Endpoint()},
		Prefix:    prefix,
		LeaseTTL:  ttl,
		Logger:    newTestLogger(buf),
		RetryMin:  20 * time.Millisecond,
		RetryMax:  300 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	m.requestTimeout = 2 * time.Second
	t.Cleanup(func() { m.Close() })
	return m, buf
}

func mustConfig(t *testing.T, js string) Config {
	t.Helper()
	cfg, err := ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", js, err)
	}
	return cfg
}

// hostIP is the underlay address of simulated host i (1-based): 198.18.0.11, .12, ...
func hostIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + i)}) }

// vxlanAttrs is what a VXLAN-speaking host publishes (VTEP MAC derived from its IP).
func vxlanAttrs(ip netip.Addr) LeaseAttrs {
	b := ip.As4()
	data := fmt.Sprintf(`{"VNI":1,"VtepMAC":"0e:78:%02x:%02x:%02x:%02x"}`, b[0], b[1], b[2], b[3])
	return LeaseAttrs{PublicIP: ip, BackendType: BackendVXLAN, BackendData: json.RawMessage(data)}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventLog runs WatchLeases and records every batch.
type eventLog struct {
	mu      sync.Mutex
	batches [][]Event
	done    chan error
}

func startWatch(t *testing.T, ctx context.Context, m *Manager) *eventLog {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	el := &eventLog{done: make(chan error, 1)}
	ch := make(chan []Event)
	go func() { el.done <- m.WatchLeases(ctx, ch) }()
	go func() {
		for {
			select {
			case b := <-ch:
				el.mu.Lock()
				el.batches = append(el.batches, b)
				el.mu.Unlock()
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-el.done
	})
	return el
}

// events returns every event so far, flattened, as "added 10.244.5.0/24 198.18.0.11".
func (el *eventLog) events() []string {
	el.mu.Lock()
	defer el.mu.Unlock()
	var out []string
	for _, b := range el.batches {
		for _, e := range b {
			out = append(out, fmt.Sprintf("%s %s %s", e.Type, e.Lease.Subnet, e.Lease.PublicIP))
		}
	}
	return out
}

func (el *eventLog) numBatches() int {
	el.mu.Lock()
	defer el.mu.Unlock()
	return len(el.batches)
}

// waitEvents waits until at least n events arrived, then returns them all.
func (el *eventLog) waitEvents(t *testing.T, n int, timeout time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ev := el.events()
		if len(ev) >= n {
			return ev
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: want %d events, got %d: %q", timeout, n, len(ev), ev)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: still waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func newTestLogger(buf *logBuf) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
