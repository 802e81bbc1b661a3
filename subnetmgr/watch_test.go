package subnetmgr

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"errors"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

func ev(typ EventType, l Lease) string { return fmt.Sprintf("%s %s %s", typ, l.Subnet, l.PublicIP) }

// TestWatchSeesOtherHosts: the first batch is every lease; then adds, changes and removes by
// other hosts arrive one by one, each once.
func TestWatchSeesOtherHosts(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	h1, _ := newTestManager(t, srv, prefix, time.Minute)
	h2, _ := newTestManager(t, srv, prefix, time.Minute)
	watcher, _ := newTestManager(t, srv, prefix, time.Minute)

	l1, err := h1.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el := startWatch(t, ctx, watcher)
	el.waitEvents(t, 1, 5*time.Second)
	if n := el.numBatches(); n != 1 {
		t.Fatalf("%d batches before any change, want the one initial batch", n)
	}

	l2, err := h2.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 2, 5*time.Second)
	// Host 2 restarts with another VTEP MAC: same subnet, changed BackendData.
	attrs := vxlanAttrs(hostIP(2))
	attrs.BackendData = []byte(`{"VNI":1,"VtepMAC":"0e:78:00:00:00:02"}`)
	if _, err := h2.AcquireLease(ctx, cfg, attrs, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 3, 5*time.Second)
	// Host 1 restarts with nothing new: no event.
	if _, err := h1.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Client().Delete(ctx, SubnetKey(prefix, l1.Subnet)); err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 4, 5*time.Second)
	time.Sleep(200 * time.Millisecond) // room for a duplicate to show up
	want := []string{ev(EventAdded, l1), ev(EventAdded, l2), ev(EventChanged, l2), ev(EventRemoved, l1)}
	if got := el.events(); !slices.Equal(got, want) {
		t.Errorf("events:\n got %q\nwant %q", got, want)
	}
	el.mu.Lock()
	changed := el.batches[2][0].Lease
	el.mu.Unlock()
	if !strings.Contains(string(changed.BackendData), "0e:78:00:00:00:02") || changed.Expiration.IsZero() {
		t.Errorf("changed event carries %+v, want the new BackendData and an expiration", changed)
	}

	// A watcher on an empty prefix still gets its (empty) initial batch.
	empty, _ := newTestManager(t, srv, prefix+"-empty", time.Minute)
	el2 := startWatch(t, ctx, empty)
	waitFor(t, 5*time.Second, "the empty initial batch", func() bool { return el2.numBatches() == 1 })
}

// TestWatchExpiredLease: a host that stops renewing disappears from every watcher's view.
func TestWatchExpiredLease(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	dying, _ := newTestManager(t, srv, prefix, 2*time.Second)
	watcher, _ := newTestManager(t, srv, prefix, time.Minute)

	el := startWatch(t, ctx, watcher)
	l, err := dying.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	got := el.waitEvents(t, 2, 10*time.Second)
	if want := []string{ev(EventAdded, l), ev(EventRemoved, l)}; !slices.Equal(got, want) {
		t.Errorf("events: got %q, want %q", got, want)
	}
	if leases, _, err := watcher.ListLeases(ctx); err != nil || len(leases) != 0 {
		t.Errorf("ListLeases after expiry = %v, %v; want none", leases, err)
	}
}

// TestWatchSurvivesCompaction: changes made while the watcher was not watching, then
// compacted away, arrive as exactly their difference; nothing lost, nothing twice, and a
// lease that stayed is never removed.
func TestWatchSurvivesCompaction(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	hosts := make([]*Manager, 5)
	for i := range hosts {
		hosts[i], _ = newTestManager(t, srv, prefix, time.Minute)
	}
	acquire := func(i int, attrs LeaseAttrs) Lease {
		l, err := hosts[i].AcquireLease(ctx, cfg, attrs, netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	a, b, stays := acquire(1, vxlanAttrs(hostIP(1))), acquire(2, vxlanAttrs(hostIP(2))), acquire(4, vxlanAttrs(hostIP(4)))
	var c Lease
	watcher, log := newTestManager(t, srv, prefix, time.Minute)
	var once sync.Once
	watcher.beforeWatch = func(rev int64) {
		once.Do(func() {
			// Between the initial list and the watch: A goes, C comes, B changes, garbage
			// appears, and the history is compacted past the list's revision.
			if _, err := srv.Client().Delete(ctx, SubnetKey(prefix, a.Subnet)); err != nil {
				t.Error(err)
			}
			c = acquire(3, vxlanAttrs(hostIP(3)))
			changed := vxlanAttrs(hostIP(2))
			changed.BackendData = []byte(`{"VNI":1,"VtepMAC":"0e:78:00:00:00:02"}`)
			acquire(2, changed)
			if _, err := srv.Client().Put(ctx, SubnetsPrefix(prefix)+"garbage", "x"); err != nil {
				t.Error(err)
			}
			if compacted := srv.Compact(ctx); compacted <= rev {
				t.Errorf("compacted to %d, not past the list's revision %d", compacted, rev)
			}
		})
	}
	el := startWatch(t, ctx, watcher)
	initial := []string{ev(EventAdded, a), ev(EventAdded, b), ev(EventAdded, stays)}
	got := el.waitEvents(t, 6, 10*time.Second)
	if !slices.Equal(sorted(got[:3]), sorted(initial)) {
		t.Errorf("initial batch %q, want %q", got[:3], initial)
	}
	diff := []string{ev(EventRemoved, a), ev(EventAdded, c), ev(EventChanged, b)}
	if !slices.Equal(sorted(got[3:]), sorted(diff)) {
		t.Errorf("after compaction %q, want exactly %q", got[3:], diff)
	}
	if n := el.numBatches(); n != 2 {
		t.Errorf("%d batches, want 2 (the initial list, then the resync's difference)", n)
	}
	if s := watcher.Stats(); s.WatchResyncs != 1 {
		t.Errorf("Stats = %+v, want 1 resync", s)
	}
	// The watch carries on from the resync's revision.
	d := acquire(0, vxlanAttrs(hostIP(5)))
	el.waitEvents(t, 7, 5*time.Second)
	time.Sleep(200 * time.Millisecond)
	if got := el.events(); len(got) != 7 || got[6] != ev(EventAdded, d) {
		t.Errorf("after the resync: %q, want one more event, %q", got[6:], ev(EventAdded, d))
	}
	if !strings.Contains(log.String(), "compacted") {
		t.Errorf("no log line says why the watcher resynced:\n%s", log)
	}
}

// TestMalformedEntries: foreign keys and unparsable leases under the prefix are logged and
// skipped by List, Acquire and Watch, and never cause a removal.
func TestMalformedEntries(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	c := srv.Client()
	put := func(key, value string) {
		t.Helper()
		if _, err := c.Put(ctx, key, value); err != nil {
			t.Fatal(err)
		}
	}
	badJSON := netip.MustParsePrefix("10.244.3.0/24")
	put(SubnetsPrefix(prefix)+"garbage", "hello")
	put(SubnetKey(prefix, badJSON), "{not json")
	put(SubnetKey(prefix, netip.MustParsePrefix("10.244.4.0/24")), `{"PublicIP":"nope"}`)

	m, log := newTestManager(t, srv, prefix, time.Minute)
	good, err := m.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), badJSON)
	if err != nil {
		t.Fatal(err)
	}
	if good.Subnet == badJSON {
		t.Errorf("took %s, whose key exists (with a malformed value)", badJSON)
	}
	leases, _, err := m.ListLeases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != 1 || leases[0].Subnet != good.Subnet {
		t.Errorf("ListLeases = %+v, want only %s", leases, good.Subnet)
	}
	for _, want := range []string{
		`level=WARN msg="skipping malformed entry under the subnets prefix" key=` + SubnetsPrefix(prefix) + "garbage",
		"key=" + SubnetKey(prefix, badJSON) + ` err="key ` + SubnetKey(prefix, badJSON) + `: lease value`,
		`PublicIP \"nope\" is not an IPv4 address`,
	} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}

	watcher, wlog := newTestManager(t, srv, prefix, time.Minute)
	el := startWatch(t, ctx, watcher)
	el.waitEvents(t, 1, 5*time.Second)
	put(SubnetsPrefix(prefix)+"more-garbage", "x")
	put(SubnetKey(prefix, good.Subnet), "{broken") // a good lease overwritten with garbage
	if _, err := c.Delete(ctx, SubnetsPrefix(prefix)+"garbage"); err != nil {
		t.Fatal(err)
	}
	second, err := m.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 2, 5*time.Second)
	time.Sleep(200 * time.Millisecond)
	if got, want := el.events(), []string{ev(EventAdded, good), ev(EventAdded, second)}; !slices.Equal(got, want) {
		t.Errorf("events: got %q, want %q (no removal for garbage)", got, want)
	}
	if !strings.Contains(wlog.String(), "more-garbage") {
		t.Errorf("the watcher did not log the new garbage key:\n%s", wlog)
	}
}

// TestWaitConfig: a missing config is waited for with a log line saying how to write it; an
// invalid one is an error at once, naming the field.
func TestWaitConfig(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 20*time.Second)
	prefix := testPrefix(t)
	m, log := newTestManager(t, srv, prefix, time.Minute)

	if _, err := m.GetConfig(ctx); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("GetConfig without a config: %v, want ErrNoConfig", err)
	}
	type result struct {
		cfg Config
		err error
	}
	done := make(chan result, 1)
	go func() {
		cfg, err := m.WaitConfig(ctx)
		done <- result{cfg, err}
	}()
	waitFor(t, 5*time.Second, "a log line about the missing config", func() bool {
		return strings.Contains(log.String(), "network config not found in etcd, waiting for it; write it with etcdctl put "+ConfigKey(prefix))
	})
	if _, err := srv.Client().Put(ctx, ConfigKey(prefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil || r.cfg.Network != netip.MustParsePrefix("10.244.0.0/16") || r.cfg.Backend.Type != "vxlan" {
		t.Fatalf("WaitConfig = %+v, %v", r.cfg, r.err)
	}

	if _, err := srv.Client().Put(ctx, ConfigKey(prefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"hostgw"}}`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := m.WaitConfig(ctx)
	if err == nil || !strings.Contains(err.Error(), ConfigKey(prefix)+": network config field Backend.Type: \"hostgw\"") {
		t.Errorf("WaitConfig with an invalid config: %v", err)
	}
	if time.Since(start) > time.Second {
		t.Errorf("an invalid config was retried for %v instead of failing at once", time.Since(start))
	}

	// etcd unreachable: WaitConfig logs and keeps waiting until ctx ends.
	down, dlog := newTestManagerAt(t, "http://127.0.0.1:1", prefix)
	sctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel()
	if _, err := down.WaitConfig(sctx); err == nil {
		t.Error("WaitConfig with etcd unreachable returned no error when ctx ended")
	}
	if !strings.Contains(dlog.String(), "cannot read network config from etcd, retrying") || down.Stats().EtcdErrors == 0 {
		t.Errorf("no retry logged or counted (stats %+v):\n%s", down.Stats(), dlog)
	}
}

// newTestManagerAt is newTestManager for an endpoint that is not an etcdtest server.
func newTestManagerAt(t *testing.T, endpoint, prefix string) (*Manager, *logBuf) {
	buf := &logBuf{}
	m, err := New(Options{Endpoints: []string{endpoint}, Prefix: prefix, DialTimeout: 200 * time.Millisecond,
		Logger:   newTestLogger(buf),
		RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m.requestTimeout = 300 * time.Millisecond
	t.Cleanup(func() { m.Close() })
	return m, buf
}

// TestWatchNoticesASilentMember: the etcd member carrying the lease watch hangs (its
// connections stay open and acknowledged, nothing answers). While it was healthy, the quiet
// watch's progress requests were answered and nothing was resynced; once it hangs, the watcher
// declares the watch silent (no answer to a progress request), says so at Warn, counts a
// resync and carries on through the other member, so a lease written meanwhile arrives within
// watchIdle + watchReply plus one list, instead of after gRPC's keepalive (10 s without a
// read plus its timeout); nothing is removed and nothing is reported twice.
func TestWatchNoticesASilentMember(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 40*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	host, _ := newTestManager(t, srv, prefix, time.Minute)
	l1, err := host.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}

	// Two "members" (relays to the one etcd); the watcher knows only A until its watch is
	// open, so the watch goes through A, then learns B.
	a, b := srv.NewRelay(t), srv.NewRelay(t)
	log := &logBuf{}
	m, err := New(Options{Endpoints: []string{a.Endpoint()}, Prefix: prefix, LeaseTTL: time.Minute,
		Logger: newTestLogger(log), RetryMin: 20 * time.Millisecond, RetryMax: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m.requestTimeout = 2 * time.Second
	// A shorter quiet time than the default 2 s keeps the suite quick; the reply deadline is
	// the default 1.5 s, which a loaded CI machine needs; the e2e power-off
	// test runs the defaults.
	m.watchIdle, m.watchReply = time.Second, 1500*time.Millisecond
	t.Cleanup(func() { m.Close() })
	el := startWatch(t, ctx, m)
	el.waitEvents(t, 1, 5*time.Second)
	m.client.SetEndpoints(a.Endpoint(), b.Endpoint())
	waitFor(t, 5*time.Second, "a connection through member B", func() bool { return b.Opened() > 0 })

	waitFor(t, 3*m.watchIdle+m.watchReply, "two progress requests on the quiet watch", func() bool {
		return m.Stats().WatchProbes >= 2
	})
	time.Sleep(100 * time.Millisecond) // the second one's answer
	if s := m.Stats(); s.WatchResyncs != 0 || strings.Contains(log.String(), "silent") {
		t.Fatalf("a healthy quiet watch was resynced (%+v):\n%s", s, log)
	}

	a.Freeze()
	frozen := time.Now()
	l2, err := host.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 2, 15*time.Second)
	delay := time.Since(frozen)
	t.Logf("member A hung: a lease written then arrived %v later (%d progress requests so far)",
		delay.Round(time.Millisecond), m.Stats().WatchProbes)
	// Worst case: the last answer just before the hang, the next request watchIdle later,
	// watchReply for its answer, and the list first trying the hung member (quickListTimeout).
	if bound := m.watchIdle + m.watchReply + quickListTimeout + 1500*time.Millisecond; delay > bound {
		t.Errorf("the new lease arrived %v after the member hung, want within %v", delay, bound)
	}
	time.Sleep(200 * time.Millisecond) // room for a duplicate or a removal to show up
	if got, want := el.events(), []string{ev(EventAdded, l1), ev(EventAdded, l2)}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	if s := m.Stats(); s.WatchResyncs < 1 {
		t.Errorf("Stats = %+v, want the silent watch counted as a resync", s)
	}
	if !strings.Contains(log.String(), "etcd watch silent for") || !strings.Contains(log.String(), "level=WARN") {
		t.Errorf("no Warn line says the watch went silent:\n%s", log)
	}
}

// TestWatchResumedByTheClient: the connection carrying the lease watch is cut (a member that
// crashed: FIN, not silence) in a quiet cluster. clientv3 resumes the watch through the other
// member by itself, after the last revision it saw, where etcd answers no progress request
// until something is written: the watcher relists once, says so at Info and warns about
// nothing, and carries on: a lease written afterwards arrives, nothing is removed or
// reported twice.
func TestWatchResumedByTheClient(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	host, _ := newTestManager(t, srv, prefix, time.Minute)
	l1, err := host.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	a, b := srv.NewRelay(t), srv.NewRelay(t)
	log := &logBuf{}
	m, err := New(Options{Endpoints: []string{a.Endpoint()}, Prefix: prefix, LeaseTTL: time.Minute,
		Logger: newTestLogger(log), RetryMin: 20 * time.Millisecond, RetryMax: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m.requestTimeout = 2 * time.Second
	// A shorter quiet time than the default 2 s keeps the suite quick; the reply deadline is
	// the default 1.5 s, which a loaded CI machine needs; the e2e power-off
	// test runs the defaults.
	m.watchIdle, m.watchReply = time.Second, 1500*time.Millisecond
	t.Cleanup(func() { m.Close() })
	el := startWatch(t, ctx, m)
	el.waitEvents(t, 1, 5*time.Second)
	m.client.SetEndpoints(a.Endpoint(), b.Endpoint())
	waitFor(t, 5*time.Second, "a connection through member B", func() bool { return b.Opened() > 0 })
	waitFor(t, 2*m.watchIdle, "an answered progress request", func() bool { return m.Stats().WatchProbes >= 1 })
	time.Sleep(100 * time.Millisecond)

	a.Cut()
	waitFor(t, 2*(m.watchIdle+m.watchReply), "the relist of the resumed watch", func() bool { return m.Stats().WatchResyncs >= 1 })
	if !strings.Contains(log.String(), `level=INFO msg="etcd watch connection failed; the watch resumed`) {
		t.Errorf("no Info line says the watch was resumed and relisted:\n%s", log)
	}
	l2, err := host.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 2, 5*time.Second)
	// Room for a duplicate, a removal or another relist to show up.
	time.Sleep(m.watchIdle + m.watchReply + 500*time.Millisecond)
	if got, want := el.events(), []string{ev(EventAdded, l1), ev(EventAdded, l2)}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	if s := m.Stats(); strings.Contains(log.String(), "level=WARN") || s.WatchResyncs != 1 {
		t.Errorf("a watch clientv3 resumed was warned about, or relisted more than once (%+v):\n%s", s, log)
	}
}
