package macvlan

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// lanConfig is the test LAN: 10.0.0.0/24, router at .254, /28 ranges .16-.224 (14 ranges).
const lanConfig = `{"Network":"10.244.0.0/16","Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254"}}`

// testEnv is one embedded etcd with a prefix unique to the test.
type testEnv struct {
	t      *testing.T
	srv    *etcdtest.Server
	prefix string
	ttl    time.Duration
}

func newEnv(t *testing.T, config string) *testEnv {
	t.Helper()
	e := &testEnv{t: t, srv: etcdtest.Start(t), prefix: "/xnet-test/" + strings.ReplaceAll(t.Name(), "/", "-"), ttl: time.Hour}
	if _, err := e.srv.Client().Put(t.Context(), subnetmgr.ConfigKey(e.prefix), config); err != nil {
		t.Fatalf("put config: %v", err)
	}
	return e
}

// syncBuf collects one host's log for assertions.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// host is one simulated host: its own etcd client, options file and log.
type host struct {
	sm   *subnetmgr.Manager
	mv   *Manager
	file string
	log  *syncBuf
}

// newHost makes host ip (a LAN address) load the config from etcd and prepare its manager.
// file is its options file ("" for a fresh one in a temp dir).
func (e *testEnv) newHost(ip netip.Addr, file string) *host {
	e.t.Helper()
	h := &host{log: &syncBuf{}, file: file}
	if h.file == "" {
		h.file = filepath.Join(e.t.TempDir(), "macvlan")
	}
	logger := slog.New(slog.NewTextHandler(h.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	sm, err := subnetmgr.New(subnetmgr.Options{Endpoints: []string{e.srv.Endpoint()}, Prefix: e.prefix, LeaseTTL: e.ttl,
		Logger: logger, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { sm.Close() })
	// Some tests' configs hold only a Macvlan section, which the overlay's GetConfig refuses.
	raw, err := sm.GetConfigJSON(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	cfg, present, err := FromConfig(subnetmgr.Config{Raw: string(raw)}, sm.Prefix(), true)
	if err != nil || !present {
		e.t.Fatalf("FromConfig: %v (present %v)", err, present)
	}
	h.sm = sm
	h.mv, err = New(sm, Options{Config: cfg, PublicIP: ip, Parent: "eth0", File: h.file, RenewMargin: e.ttl / 2, Logger: logger})
	if err != nil {
		e.t.Fatal(err)
	}
	return h
}

// keys returns every macvlan range key in etcd with the PublicIP it holds.
func (e *testEnv) keys(ctx context.Context) map[netip.Prefix]string {
	e.t.Helper()
	resp, err := e.srv.Client().Get(ctx, subnetmgr.PoolPrefix(e.prefix, Dir), clientv3.WithPrefix())
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[netip.Prefix]string{}
	for _, kv := range resp.Kvs {
		r, err := subnetmgr.ParsePoolKey(e.prefix, Dir, string(kv.Key))
		if err != nil {
			e.t.Fatalf("a key the engine wrote does not parse: %v", err)
		}
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		if err != nil {
			e.t.Fatal(err)
		}
		out[r] = attrs.PublicIP.String()
	}
	return out
}

func lanIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}) }

func TestRacingHostsNeverShareARange(t *testing.T) {
	e := newEnv(t, lanConfig)
	const hosts = 12 // of 14 ranges: most candidates are contested
	var (
		wg     sync.WaitGroup
		leases = make([]subnetmgr.Lease, hosts)
		errs   = make([]error, hosts)
	)
	hs := make([]*host, hosts)
	for i := range hosts {
		hs[i] = e.newHost(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), "") // PublicIPs off the LAN
	}
	start := make(chan struct{})
	for i := range hosts {
		wg.Go(func() {
			<-start
			leases[i], errs[i] = hs[i].mv.Acquire(t.Context())
		})
	}
	close(start)
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		for r, j := range seen {
			if r.Overlaps(l.Subnet) {
				t.Errorf("hosts %d and %d hold overlapping ranges %v and %v", j, i, r, l.Subnet)
			}
		}
		seen[l.Subnet] = i
		f, err := ReadOptionsFile(hs[i].file)
		if err != nil || f.Range != l.Subnet || f.Subnet != pfx("10.0.0.0/24") || f.Gateway != addr("10.0.0.254") || f.Parent != "eth0" {
			t.Errorf("host %d: options file %+v, %v; want its range %v", i, f, err, l.Subnet)
		}
	}
	keys := e.keys(t.Context())
	if len(keys) != hosts {
		t.Errorf("%d range keys in etcd, want one per host (%d): %v", len(keys), hosts, keys)
	}
	for r, i := range seen {
		if keys[r] != hs[i].mv.o.PublicIP.String() {
			t.Errorf("key of %v holds %q, want host %d's PublicIP", r, keys[r], i)
		}
	}
	t.Run("overlay leases do not see macvlan ranges", func(t *testing.T) {
		l, _, err := hs[0].sm.ListLeases(t.Context())
		if err != nil || len(l) != 0 {
			t.Errorf("ListLeases = %v, %v; want no overlay lease", l, err)
		}
	})
}

func TestAFullSubnetFailsNamingTheFix(t *testing.T) {
	// Two ranges, .32 and .48; a third host finds none.
	e := newEnv(t, `{"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.0.32","RangeMax":"10.0.0.48"}}`)
	for i := 1; i <= 2; i++ {
		if _, err := e.newHost(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), "").mv.Acquire(t.Context()); err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
	}
	third := e.newHost(addr("192.0.2.3"), "")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, err := third.mv.Acquire(ctx)
	if !errors.Is(err, subnetmgr.ErrRangeFull) {
		t.Fatalf("Acquire on a full pool = %v, want ErrRangeFull at once", err)
	}
	for _, want := range []string{"10.0.0.0/24", "every /28 in [10.0.0.32, 10.0.0.48]", "Macvlan.RangeMin/RangeMax", "/macvlan/"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if _, statErr := ReadOptionsFile(third.file); statErr == nil {
		t.Errorf("a host without a range wrote an options file")
	}
}

func TestRestartKeepsTheRange(t *testing.T) {
	e := newEnv(t, lanConfig)
	ip := addr("192.0.2.10")
	first := e.newHost(ip, "")
	l1, err := first.mv.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		desc string
		// before runs between the first start and the restart.
		before func(t *testing.T)
	}{
		{"a plain restart finds the key by PublicIP", func(t *testing.T) {}},
		{"a restart after the key was lost (expired or deleted) takes the range the options file records",
			func(t *testing.T) {
				if _, err := e.srv.Client().Delete(t.Context(), subnetmgr.PoolKey(e.prefix, Dir, l1.Subnet)); err != nil {
					t.Fatal(err)
				}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			tc.before(t)
			// Other hosts come and go meanwhile; the range must not move.
			for i := range 3 {
				if _, err := e.newHost(netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + i)}), "").mv.Acquire(t.Context()); err != nil &&
					!errors.Is(err, subnetmgr.ErrRangeFull) {
					t.Fatal(err)
				}
			}
			again := e.newHost(ip, first.file)
			l2, err := again.mv.Acquire(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if l2.Subnet != l1.Subnet {
				t.Errorf("after a restart the host holds %v, want its range %v\nlog:\n%s", l2.Subnet, l1.Subnet, again.log)
			}
			if got := e.keys(t.Context())[l1.Subnet]; got != ip.String() {
				t.Errorf("key of %v holds %q after the restart, want %v", l1.Subnet, got, ip)
			}
		})
	}
	t.Run("a recorded range another host took meanwhile is not taken back", func(t *testing.T) {
		if _, err := e.srv.Client().Delete(t.Context(), subnetmgr.PoolKey(e.prefix, Dir, l1.Subnet)); err != nil {
			t.Fatal(err)
		}
		thief := e.newHost(addr("192.0.2.200"), "")
		if err := WriteOptionsFile(thief.file, OptionsFile{Name: "x", Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), Range: l1.Subnet, Parent: "eth0"}); err != nil {
			t.Fatal(err)
		}
		if l, err := thief.mv.Acquire(t.Context()); err != nil || l.Subnet != l1.Subnet {
			t.Fatalf("the other host got %v, %v; the test needs it on %v", l.Subnet, err, l1.Subnet)
		}
		back := e.newHost(ip, first.file)
		l3, err := back.mv.Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if l3.Subnet == l1.Subnet {
			t.Errorf("the restarted host took %v back from the host holding it", l3.Subnet)
		}
		if f, _ := ReadOptionsFile(first.file); f.Range != l3.Subnet {
			t.Errorf("options file records %v, want the new range %v", f.Range, l3.Subnet)
		}
	})
}

func TestRangesNeverCoverAHostsAddress(t *testing.T) {
	// Ranges .32, .48 and .64 only. Host A's own LAN address is 10.0.0.40 (in .32), host B is
	// known to etcd by its overlay lease with PublicIP 10.0.0.50 (in .48).
	e := newEnv(t, `{"Network":"10.244.0.0/16","Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.0.32","RangeMax":"10.0.0.64"}}`)
	c := e.srv.Client()
	if _, err := c.Put(t.Context(), subnetmgr.SubnetKey(e.prefix, pfx("10.244.9.0/24")), `{"PublicIP":"10.0.0.50","BackendType":"vxlan"}`); err != nil {
		t.Fatal(err)
	}
	a := e.newHost(lanIP(40), "")
	l, err := a.mv.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != pfx("10.0.0.64/28") {
		t.Errorf("host at 10.0.0.40 with peer 10.0.0.50 got %v, want the only range covering neither, 10.0.0.64/28", l.Subnet)
	}
	t.Run("a host whose every free range covers a host's address gets ErrRangeFull saying so", func(t *testing.T) {
		b := e.newHost(lanIP(50), "")
		_, err := b.mv.Acquire(t.Context())
		if !errors.Is(err, subnetmgr.ErrRangeFull) || !strings.Contains(err.Error(), "2 more cover a host's address") {
			t.Errorf("Acquire = %v, want ErrRangeFull counting the 2 ranges skipped for host addresses", err)
		}
	})
	t.Run("our own address inside a range another host holds is reported with the fix", func(t *testing.T) {
		c := e.newHost(lanIP(70), "") // inside host A's 10.0.0.64/28
		if _, err := c.mv.Acquire(t.Context()); !errors.Is(err, subnetmgr.ErrRangeFull) {
			t.Fatalf("Acquire = %v, want ErrRangeFull", err)
		}
		// Acquire failed before the check; the check runs after a successful lease. Free a
		// range for c and acquire again.
		if _, err := e.srv.Client().Delete(t.Context(), subnetmgr.SubnetKey(e.prefix, pfx("10.244.9.0/24"))); err != nil {
			t.Fatal(err)
		}
		if _, err := c.mv.Acquire(t.Context()); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(c.log.String(), "inside the macvlan range of another host") || !strings.Contains(c.log.String(), "range=10.0.0.64/28") {
			t.Errorf("no error naming the range that covers our address; log:\n%s", c.log)
		}
	})
}

func TestAReservationIsOnlyTakenByItsHost(t *testing.T) {
	e := newEnv(t, `{"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.0.32","RangeMax":"10.0.0.48"}}`)
	reserved := pfx("10.0.0.48/28")
	owner := addr("192.0.2.9")
	if _, err := e.srv.Client().Put(t.Context(), subnetmgr.PoolKey(e.prefix, Dir, reserved), `{"PublicIP":"`+owner.String()+`"}`); err != nil {
		t.Fatal(err)
	}
	other, err := e.newHost(addr("192.0.2.1"), "").mv.Acquire(t.Context())
	if err != nil || other.Subnet == reserved {
		t.Fatalf("another host got %v, %v; want the free range, never the reservation", other.Subnet, err)
	}
	mine, err := e.newHost(owner, "").mv.Acquire(t.Context())
	if err != nil || mine.Subnet != reserved || !mine.Expiration.IsZero() {
		t.Errorf("the reservation's host got %v (expires %v), %v; want the reservation, still without TTL", mine.Subnet, mine.Expiration, err)
	}
}

func TestKeepRenewsAndFollowsALostRange(t *testing.T) {
	e := newEnv(t, lanConfig)
	e.ttl = 2 * time.Second // renewal every second
	h := e.newHost(addr("192.0.2.1"), "")
	l, err := h.mv.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	changes := make(chan subnetmgr.Lease, 16)
	done := make(chan error, 1)
	go func() { done <- h.mv.Keep(ctx, func(l subnetmgr.Lease) { changes <- l }) }()
	t.Cleanup(func() { cancel(); <-done })

	next := func() subnetmgr.Lease {
		t.Helper()
		select {
		case l := <-changes:
			return l
		case err := <-done:
			t.Fatalf("Keep ended: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatalf("no renewal within 10s; log:\n%s", h.log)
		}
		return subnetmgr.Lease{}
	}
	// Three renewals outlive the 2s TTL: the key must still be there, with the same range.
	for range 3 {
		if r := next(); r.Subnet != l.Subnet || !r.Expiration.After(l.Expiration) {
			t.Fatalf("renewal gave %v expiring %v, want %v expiring after %v", r.Subnet, r.Expiration, l.Subnet, l.Expiration)
		} else {
			l = r
		}
	}
	if got := e.keys(t.Context())[l.Subnet]; got != "192.0.2.1" {
		t.Fatalf("after renewals the key of %v holds %q", l.Subnet, got)
	}
	// Another host takes our range while the key is gone: the next renewal moves us and
	// rewrites the options file.
	c := e.srv.Client()
	if _, err := c.Delete(t.Context(), subnetmgr.PoolKey(e.prefix, Dir, l.Subnet)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(t.Context(), subnetmgr.PoolKey(e.prefix, Dir, l.Subnet), `{"PublicIP":"192.0.2.99"}`); err != nil {
		t.Fatal(err)
	}
	moved := next()
	if moved.Subnet == l.Subnet {
		t.Fatalf("still on %v, which another host holds", l.Subnet)
	}
	if f, err := ReadOptionsFile(h.file); err != nil || f.Range != moved.Subnet {
		t.Errorf("options file %+v, %v; want the new range %v", f, err, moved.Subnet)
	}
	if s := h.mv.Status(); s.Range != moved.Subnet || s.Addresses != 16 || !strings.HasPrefix(s.String(), moved.Subnet.String()+" of 10.0.0.0/24") {
		t.Errorf("Status = %+v (%q), want the new range with 16 addresses", s, s)
	}
	if !strings.Contains(h.log.String(), "recreate the Docker network") {
		t.Errorf("no error telling the operator to recreate the network; log:\n%s", h.log)
	}
}

func TestADeletedRangeKeyComesBackAtOnce(t *testing.T) {
	e := newEnv(t, lanConfig) // TTL one hour: without the watch, the next renewal is half an hour away
	h := e.newHost(addr("192.0.2.1"), "")
	l, err := h.mv.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- h.mv.Keep(ctx, nil) }()
	t.Cleanup(func() { cancel(); <-done })
	key := subnetmgr.PoolKey(e.prefix, Dir, l.Subnet)
	// Deleted twice: the keeper must keep watching after it took the key back once.
	for round := range 2 {
		time.Sleep(200 * time.Millisecond) // the watch is up
		if _, err := e.srv.Client().Delete(t.Context(), key); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for e.keys(t.Context())[l.Subnet] != "192.0.2.1" {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the deleted key %s is not back after 5s; log:\n%s", round, key, h.log)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if got := h.mv.Lease(); got.Subnet != l.Subnet || got.Expiration.IsZero() {
			t.Errorf("round %d: lease after the take-back is %v expiring %v", round, got.Subnet, got.Expiration)
		}
	}
}

func TestLoad(t *testing.T) {
	cases := []struct {
		desc     string
		config   string
		required bool
		present  bool
		err      string
	}{
		{"no section and not required: no range", `{"Network":"10.244.0.0/16"}`, false, false, ""},
		{"no section but --macvlan: an error with an example", `{"Network":"10.244.0.0/16"}`, true, false, `"Macvlan":{"Subnet"`},
		{"a section: present", lanConfig, false, true, ""},
		{"an invalid section names the key and the field", `{"Macvlan":{"Subnet":"10.0.0.0/24"}}`, false, true, "/config: network config field Macvlan.Gateway"},
	}
	for i, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			_, present, err := FromConfig(subnetmgr.Config{Raw: tc.config}, "/test/network", tc.required)
			if present != tc.present || (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("case %d: FromConfig = present %v, err %v; want present %v, err containing %q", i, present, err, tc.present, tc.err)
			}
		})
	}
}

func ExampleOptionsFile_Args() {
	f := OptionsFile{Name: "xnet-macvlan", Subnet: netip.MustParsePrefix("10.0.0.0/24"), Gateway: netip.MustParseAddr("10.0.0.254"),
		Range: netip.MustParsePrefix("10.0.0.32/28"), Parent: "eth0"}
	fmt.Println("docker network create", strings.Join(f.Args(), " "))
	// Output: docker network create -d macvlan --subnet=10.0.0.0/24 --gateway=10.0.0.254 --ip-range=10.0.0.32/28 -o parent=eth0 xnet-macvlan
}
