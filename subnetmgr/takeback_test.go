package subnetmgr

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// Someone rewrites our dynamically acquired lease: we notice from our watch and write it back
// within a second, attached to our etcd lease, keep our subnet, log it at Error with both
// claimants, and write nothing more once it is ours again.
func TestKeepLeaseWritesBackOurRewrittenLeaseWithinASecond(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	c := srv.Client()
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	tests := []struct {
		name string
		// rewrite changes our key (with our etcd lease id) as an attacker would.
		rewrite  func(ctx context.Context, key string, id clientv3.LeaseID) error
		claimant string // what the Error line names as the other claimant
	}{
		{"a plain put with another host's PublicIP, which detaches the key from our etcd lease",
			func(ctx context.Context, key string, _ clientv3.LeaseID) error {
				_, err := c.Put(ctx, key, `{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:78:c6:12:00:63"}}`)
				return err
			}, "198.18.0.99"},
		{"a put that keeps our etcd lease (etcdctl put --ignore-lease)",
			func(ctx context.Context, key string, _ clientv3.LeaseID) error {
				_, err := c.Put(ctx, key, `{"PublicIP":"198.18.0.98"}`, clientv3.WithIgnoreLease())
				return err
			}, "198.18.0.98"},
		{"a put attached to the rewriter's own etcd lease",
			func(ctx context.Context, key string, _ clientv3.LeaseID) error {
				g, err := c.Grant(ctx, 3600)
				if err != nil {
					return err
				}
				_, err = c.Put(ctx, key, `{"PublicIP":"198.18.0.97"}`, clientv3.WithLease(g.ID))
				return err
			}, "198.18.0.97"},
		{"a value that is not a lease",
			func(ctx context.Context, key string, _ clientv3.LeaseID) error {
				_, err := c.Put(ctx, key, `garbage`, clientv3.WithIgnoreLease())
				return err
			}, "malformed"},
		{"a plain put, then our etcd lease revoked (the key survives: it was detached)",
			func(ctx context.Context, key string, id clientv3.LeaseID) error {
				if _, err := c.Put(ctx, key, `{"PublicIP":"198.18.0.96"}`); err != nil {
					return err
				}
				_, err := c.Revoke(ctx, id)
				return err
			}, "198.18.0.96"},
		{"our own value, detached from our etcd lease (next it could be rewritten as if a reservation moved)",
			func(ctx context.Context, key string, _ clientv3.LeaseID) error {
				resp, err := c.Get(ctx, key)
				if err != nil {
					return err
				}
				_, err = c.Put(ctx, key, string(resp.Kvs[0].Value))
				return err
			}, "detached"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := ctxFor(t, 30*time.Second)
			prefix := testPrefix(t)
			// A minute's TTL renewed 10 s before expiry: no periodic renewal in the test.
			m, log := newTestManager(t, srv, prefix, time.Minute)
			attrs := vxlanAttrs(hostIP(i + 1))
			l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
			if err != nil {
				t.Fatal(err)
			}
			key := SubnetKey(prefix, l.Subnet)
			_, id, _ := keyLease(t, ctx, c, key)
			k := startKeep(t, ctx, m, cfg, attrs, l, 10*time.Second)
			time.Sleep(100 * time.Millisecond) // the keeper's watch is up

			rewritten := time.Now()
			if err := tt.rewrite(ctx, key, id); err != nil {
				t.Fatal(err)
			}
			var back time.Duration
			waitFor(t, 5*time.Second, "our lease written back", func() bool {
				resp, err := c.Get(ctx, key)
				if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
					return false
				}
				a, err := DecodeLeaseValue(resp.Kvs[0].Value)
				if err == nil && sameAttrs(Lease{PublicIP: a.PublicIP, BackendType: a.BackendType, BackendData: a.BackendData},
					Lease{PublicIP: attrs.PublicIP, BackendType: attrs.BackendType, BackendData: attrs.BackendData}) {
					back = time.Since(rewritten)
					return true
				}
				return false
			})
			t.Logf("written back %v after the rewrite", back.Round(time.Millisecond))
			if back > time.Second {
				t.Errorf("written back %v after the rewrite, want within 1 s", back.Round(time.Millisecond))
			}
			// It stays ours: no second write, no move.
			resp, err := c.Get(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			settled := resp.Kvs[0].ModRevision
			time.Sleep(500 * time.Millisecond)
			if resp, err := c.Get(ctx, key); err != nil || resp.Kvs[0].ModRevision != settled {
				t.Errorf("our key was written again after it was ours: %v %v", resp, err)
			}
			for _, v := range k.all() {
				if v.Subnet != l.Subnet {
					t.Errorf("the keeper moved us to %v; the subnet %v is ours", v.Subnet, l.Subnet)
				}
			}
			if !logLine(log.String(), "level=ERROR", l.Subnet.String(), attrs.PublicIP.String(), tt.claimant) {
				t.Errorf("no Error line naming %v, our %v and %q:\n%s", l.Subnet, attrs.PublicIP, tt.claimant, log)
			}
			// The keeper goes on renewing the lease written back.
			if _, id, ok := keyLease(t, ctx, c, key); !ok || id == 0 {
				t.Fatalf("our key after the write-back: %v %v", id, ok)
			} else if ttl, err := c.TimeToLive(ctx, id); err != nil || ttl.TTL <= 0 {
				t.Errorf("the etcd lease %x behind our key is not alive: %+v %v", id, ttl, err)
			}
		})
	}
}

// Two honest hosts that both believe a key is theirs (configured with one PublicIP: the second
// reclaims the first's lease at start) never write it back and forth: a write-back only
// follows a value that is not ours.
func TestTwoHostsWithOneKeyNeverWriteItBackAndForth(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	c := srv.Client()
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	attrs := vxlanAttrs(hostIP(1))
	var keepers []*keeper
	var subnet netip.Prefix
	for range 2 {
		m, _ := newTestManager(t, srv, prefix, 2*time.Second)
		l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		subnet = l.Subnet
		keepers = append(keepers, startKeep(t, ctx, m, cfg, attrs, l, time.Second))
	}
	key := SubnetKey(prefix, subnet)
	resp, err := c.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("the shared key: %v %v", resp, err)
	}
	before := resp.Kvs[0].ModRevision
	time.Sleep(3 * time.Second) // three renewals of each
	resp, err = c.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("the shared key after 3 s: %v %v", resp, err)
	}
	if resp.Kvs[0].ModRevision != before {
		t.Errorf("the key both hosts hold was written %d times in 3 s, want never", resp.Kvs[0].Version-1)
	}
	for i, k := range keepers {
		if len(k.all()) < 2 {
			t.Errorf("host %d renewed %d times in 3 s of a 2 s lease", i+1, len(k.all()))
		}
		for _, v := range k.all() {
			if v.Subnet != subnet {
				t.Errorf("host %d moved to %v", i+1, v.Subnet)
			}
		}
	}
}

// A reservation we hold whose PublicIP an administrator rewrote has moved: we say so at once,
// leave it to its new owner and take another subnet.
func TestKeepLeaseGivesUpAReservationAnAdministratorMoved(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	c := srv.Client()
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	m, log := newTestManager(t, srv, prefix, time.Minute)
	attrs := vxlanAttrs(hostIP(1))
	reserved := netip.MustParsePrefix("10.244.7.0/24")
	key := SubnetKey(prefix, reserved)
	if _, err := c.Put(ctx, key, `{"PublicIP":"`+attrs.PublicIP.String()+`"}`); err != nil {
		t.Fatal(err)
	}
	l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
	if err != nil || l.Subnet != reserved {
		t.Fatalf("AcquireLease = %v, %v; want the reservation %v", l.Subnet, err, reserved)
	}
	k := startKeep(t, ctx, m, cfg, attrs, l, 10*time.Second)
	time.Sleep(100 * time.Millisecond)

	moved := time.Now()
	newOwner := `{"PublicIP":"198.18.0.42"}`
	if _, err := c.Put(ctx, key, newOwner); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "another subnet", func() bool {
		v := k.all()
		return len(v) > 0 && v[len(v)-1].Subnet != reserved
	})
	took := time.Since(moved)
	t.Logf("moved to %v %v after the reservation was given away", k.all()[len(k.all())-1].Subnet, took.Round(time.Millisecond))
	if took > time.Second {
		t.Errorf("took another subnet %v after the move, want within 1 s", took.Round(time.Millisecond))
	}
	if resp, err := c.Get(ctx, key); err != nil || string(resp.Kvs[0].Value) != newOwner || resp.Kvs[0].Lease != 0 {
		t.Errorf("the reservation after the move: %v %v, want %s untouched", resp, err, newOwner)
	}
	if !logLine(log.String(), "moved the reservation", reserved.String(), "198.18.0.42") {
		t.Errorf("no log line saying the reservation moved:\n%s", log)
	}
}

// Acquiring after the config changed, a host deletes its previous lease the config no longer
// allows (flannel does too), instead of leaving two leases with its PublicIP in etcd for a day.
func TestAcquireDeletesOurLeaseTheConfigNoLongerAllows(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	c := srv.Client()
	ctx := ctxFor(t, 30*time.Second)
	prefix := testPrefix(t)
	m, _ := newTestManager(t, srv, prefix, time.Minute)
	attrs := vxlanAttrs(hostIP(1))
	old, err := m.AcquireLease(ctx, mustConfig(t, `{"Network":"10.244.0.0/16","SubnetMax":"10.244.9.0"}`), attrs, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","SubnetMin":"10.244.100.0"}`)
	l, err := m.AcquireLease(ctx, cfg, attrs, old.Subnet)
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet == old.Subnet {
		t.Fatalf("kept %v, which the new config does not allow", old.Subnet)
	}
	if _, _, ok := keyLease(t, ctx, c, SubnetKey(prefix, old.Subnet)); ok {
		t.Errorf("our previous lease %v is still in etcd next to %v", old.Subnet, l.Subnet)
	}
}

// Watch events carry the key's create revision, which a rewrite keeps: every host orders two
// claims to one PublicIP alike.
func TestWatchEventsCarryTheCreateRevision(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	c := srv.Client()
	ctx := ctxFor(t, 30*time.Second)
	prefix := testPrefix(t)
	watcher, _ := newTestManager(t, srv, prefix, time.Minute)
	put := func(subnet, ip string) int64 {
		resp, err := c.Put(ctx, SubnetKey(prefix, netip.MustParsePrefix(subnet)), `{"PublicIP":"`+ip+`"}`)
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	first := put("10.244.9.0/24", "198.18.0.12")
	ch := make(chan []Event, 8)
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- watcher.WatchLeases(wctx, ch) }()
	t.Cleanup(func() { cancel(); <-done })
	next := func() Event {
		t.Helper()
		for {
			select {
			case b := <-ch:
				if len(b) > 0 {
					return b[0]
				}
			case <-ctx.Done():
				t.Fatal("no event")
			}
		}
	}
	if e := next(); e.Lease.CreateRevision != first {
		t.Errorf("listed lease has create revision %d, want %d", e.Lease.CreateRevision, first)
	}
	second := put("10.244.2.0/24", "198.18.0.12")
	e := next()
	if e.Lease.CreateRevision != second || !ClaimsFirst(Lease{Subnet: netip.MustParsePrefix("10.244.9.0/24"), CreateRevision: first}, e.Lease) {
		t.Errorf("watched lease %v has create revision %d, want %d, after the first one's", e.Lease.Subnet, e.Lease.CreateRevision, second)
	}
	put("10.244.9.0/24", "198.18.0.13")
	if e := next(); e.Type != EventChanged || e.Lease.CreateRevision != first {
		t.Errorf("rewritten lease: %v with create revision %d, want changed with %d", e.Type, e.Lease.CreateRevision, first)
	}
}

// logLine reports whether one line of log holds every one of words.
func logLine(log string, words ...string) bool {
	for line := range strings.SplitSeq(log, "\n") {
		all := true
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			return true
		}
	}
	return false
}
