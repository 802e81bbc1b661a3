package subnetmgr

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// keeper runs KeepLease and records every version of the lease it reports.
type keeper struct {
	mu       sync.Mutex
	versions []Lease
	done     chan error
}

func startKeep(t *testing.T, ctx context.Context, m *Manager, cfg Config, attrs LeaseAttrs, l Lease, margin time.Duration) *keeper {
	ctx, cancel := context.WithCancel(ctx)
	k := &keeper{done: make(chan error, 1)}
	go func() {
		k.done <- m.KeepLease(ctx, cfg, attrs, l, margin, func(nl Lease) {
			k.mu.Lock()
			k.versions = append(k.versions, nl)
			k.mu.Unlock()
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-k.done; err != context.Canceled {
			t.Errorf("KeepLease returned %v, want context.Canceled", err)
		}
	})
	return k
}

func (k *keeper) all() []Lease {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.versions)
}

// keyLease returns the value's PublicIP and the etcd lease ID of key, or ok false.
func keyLease(t *testing.T, ctx context.Context, c *clientv3.Client, key string) (netip.Addr, clientv3.LeaseID, bool) {
	t.Helper()
	resp, err := c.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return netip.Addr{}, 0, false
	}
	attrs, err := DecodeLeaseValue(resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	return attrs.PublicIP, clientv3.LeaseID(resp.Kvs[0].Lease), true
}

// TestKeepLeaseRenews: a lease kept alive outlives its TTL many times over, and renewals are
// invisible to watchers.
func TestKeepLeaseRenews(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	m, _ := newTestManager(t, srv, prefix, 2*time.Second)
	watcher, _ := newTestManager(t, srv, prefix, time.Minute)
	attrs := vxlanAttrs(hostIP(1))
	l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el := startWatch(t, ctx, watcher)
	k := startKeep(t, ctx, m, cfg, attrs, l, time.Second)
	time.Sleep(5 * time.Second) // 2.5 TTLs
	if _, _, ok := keyLease(t, ctx, srv.Client(), SubnetKey(prefix, l.Subnet)); !ok {
		t.Fatal("the kept lease expired")
	}
	versions := k.all()
	if len(versions) < 3 {
		t.Fatalf("%d renewals in 5s of a 2s lease renewed 1s before expiry, want at least 3", len(versions))
	}
	for i, v := range versions {
		if v.Subnet != l.Subnet || v.Expiration.Before(l.Expiration) {
			t.Errorf("renewal %d: %+v, want subnet %s and a later expiry than %v", i, v, l.Subnet, l.Expiration)
		}
	}
	if got := el.events(); len(got) != 1 {
		t.Errorf("watcher saw %q, want only the initial add: renewals are not changes", got)
	}
}

// TestKeepLeaseTakesBackLostKey: when our key vanished (its etcd lease ran out during an
// outage, or an operator deleted it), the same subnet is taken back if free; if another host
// took it, we move to another subnet and say so.
func TestKeepLeaseTakesBackLostKey(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	c := srv.Client()
	m, log := newTestManager(t, srv, prefix, 2*time.Second)
	attrs := vxlanAttrs(hostIP(1))
	l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	key := SubnetKey(prefix, l.Subnet)
	k := startKeep(t, ctx, m, cfg, attrs, l, time.Second)

	_, id, _ := keyLease(t, ctx, c, key)
	if _, err := c.Revoke(ctx, id); err != nil { // as if it expired: the key goes with it
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the same subnet taken back", func() bool {
		ip, newID, ok := keyLease(t, ctx, c, key)
		return ok && ip == attrs.PublicIP && newID != id
	})
	if !strings.Contains(log.String(), "our subnet lease was gone from etcd; re-acquired the same subnet") {
		t.Errorf("no log line about the lost key:\n%s", log)
	}

	// Now another host holds our subnet: our key went and the other host created it anew
	// (a rewrite of the key we created would be written back instead: takeback_test.go).
	before := len(k.all())
	if _, err := c.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	created, err := c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, `{"PublicIP":"198.18.0.99"}`)).Commit()
	if err != nil || !created.Succeeded {
		t.Fatalf("the other host's create: %v %v", created, err)
	}
	waitFor(t, 5*time.Second, "a new subnet after ours was taken", func() bool {
		v := k.all()
		return len(v) > before && v[len(v)-1].Subnet != l.Subnet
	})
	// And we never write it back: two honest hosts do not fight over a key.
	time.Sleep(time.Second)
	if resp, err := c.Get(ctx, key); err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].ModRevision != created.Header.Revision {
		t.Errorf("the other host's key was written after it created it: %v %v", resp, err)
	}
	moved := k.all()[len(k.all())-1]
	if ip, _, ok := keyLease(t, ctx, c, SubnetKey(prefix, moved.Subnet)); !ok || ip != attrs.PublicIP {
		t.Errorf("the new subnet %s is not ours in etcd", moved.Subnet)
	}
	if ip, _, _ := keyLease(t, ctx, c, key); ip.String() != "198.18.0.99" {
		t.Errorf("the other host's key was overwritten: %v", ip)
	}
	if !strings.Contains(log.String(), "our subnet lease was lost; acquiring another subnet") {
		t.Errorf("no error logged about losing the subnet:\n%s", log)
	}
}

// TestSurvivesEtcdRestart: etcd stopped for longer than the lease TTL and started again on
// the same data dir: we keep our lease, keep renewing it, and no watcher ever saw a removal.
func TestSurvivesEtcdRestart(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 40*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	m, log := newTestManager(t, srv, prefix, 3*time.Second)
	peer, _ := newTestManager(t, srv, prefix, time.Minute)
	watcher, _ := newTestManager(t, srv, prefix, time.Minute)
	attrs := vxlanAttrs(hostIP(1))
	l, err := m.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := peer.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el := startWatch(t, ctx, watcher)
	el.waitEvents(t, 2, 5*time.Second)
	k := startKeep(t, ctx, m, cfg, attrs, l, 2*time.Second)

	stopping := time.Now()
	srv.Stop()
	t.Logf("etcd stopped in %v", time.Since(stopping).Round(time.Millisecond))
	time.Sleep(4 * time.Second) // past the 3s TTL
	renewedDuringOutage := len(k.all())
	srv.Restart()
	restarted := time.Now()

	waitFor(t, 10*time.Second, "a renewal after etcd came back", func() bool { return len(k.all()) > renewedDuringOutage })
	after := k.all()[len(k.all())-1]
	if after.Subnet != l.Subnet {
		t.Errorf("after the outage we hold %s, want our %s", after.Subnet, l.Subnet)
	}
	if ip, _, ok := keyLease(t, ctx, srv.Client(), SubnetKey(prefix, l.Subnet)); !ok || ip != attrs.PublicIP {
		t.Errorf("our key after the outage: %v %v", ip, ok)
	}
	if m.Stats().EtcdErrors == 0 {
		t.Error("no etcd error counted during the outage")
	}
	if !strings.Contains(log.String(), "cannot renew our subnet lease, retrying") {
		t.Errorf("no log line about failed renewals:\n%s", log)
	}
	t.Logf("renewed %v after etcd restarted", time.Since(restarted).Round(time.Millisecond))

	// The watcher is still live and never reported a removal.
	q, err := peer.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(3)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 3, 10*time.Second)
	want := []string{ev(EventAdded, l), ev(EventAdded, p), ev(EventAdded, q)}
	if got := el.events(); !slices.Equal(sorted(got), sorted(want)) {
		t.Errorf("watcher events across the outage: %q, want %q", got, want)
	}
}
