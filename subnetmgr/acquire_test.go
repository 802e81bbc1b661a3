package subnetmgr

import (
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// TestAcquireConcurrent: 100 hosts starting at once each get a different subnet; a range of
// three subnets serves three hosts and tells the other two it is full.
func TestAcquireConcurrent(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 40*time.Second)

	run := func(t *testing.T, prefix string, cfg Config, hosts int) ([]Lease, []error) {
		leases := make([]Lease, hosts)
		errs := make([]error, hosts)
		managers := make([]*Manager, hosts)
		for i := range hosts {
			managers[i], _ = newTestManager(t, srv, prefix, time.Minute)
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range hosts {
			wg.Go(func() {
				<-start
				leases[i], errs[i] = managers[i].AcquireLease(ctx, cfg, vxlanAttrs(hostIP(i+1)), netip.Prefix{})
			})
		}
		close(start)
		wg.Wait()
		return leases, errs
	}

	t.Run("100 hosts in a /16 of /24s", func(t *testing.T) {
		cfg := mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
		prefix := testPrefix(t)
		leases, errs := run(t, prefix, cfg, 100)
		owner := map[netip.Prefix]int{}
		for i, l := range leases {
			if errs[i] != nil {
				t.Fatalf("host %d: %v", i+1, errs[i])
			}
			if j, dup := owner[l.Subnet]; dup {
				t.Errorf("hosts %d and %d both got %s", j+1, i+1, l.Subnet)
			}
			owner[l.Subnet] = i
			if !subnetCompatible(cfg, l.Subnet) || l.PublicIP != hostIP(i+1) || l.Expiration.IsZero() {
				t.Errorf("host %d got %+v", i+1, l)
			}
		}
		// etcd agrees: exactly 100 keys, each holding its owner's PublicIP.
		resp, err := srv.Client().Get(ctx, SubnetsPrefix(prefix), clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) != 100 {
			t.Errorf("%d keys in etcd, want 100", len(resp.Kvs))
		}
		for _, kv := range resp.Kvs {
			subnet, _ := ParseSubnetKey(prefix, string(kv.Key))
			attrs, _ := DecodeLeaseValue(kv.Value)
			if i, ok := owner[subnet]; !ok || attrs.PublicIP != hostIP(i+1) || kv.Lease == 0 {
				t.Errorf("etcd holds %s = %s (lease %d), not what a host was told", kv.Key, kv.Value, kv.Lease)
			}
		}
	})

	t.Run("5 hosts in a /24 of /26s", func(t *testing.T) {
		cfg := mustConfig(t, `{"Network":"10.9.0.0/24","SubnetLen":26}`)
		leases, errs := run(t, testPrefix(t), cfg, 5)
		got := map[netip.Prefix]bool{}
		full := 0
		for i, err := range errs {
			switch {
			case err == nil:
				got[leases[i].Subnet] = true
			case errors.Is(err, ErrRangeFull):
				full++
				if !strings.Contains(err.Error(), "every /26 in [10.9.0.64, 10.9.0.192] of 10.9.0.0/24 is taken") {
					t.Errorf("range-full error does not say which range: %v", err)
				}
			default:
				t.Errorf("host %d: %v", i+1, err)
			}
		}
		want := map[netip.Prefix]bool{
			netip.MustParsePrefix("10.9.0.64/26"): true, netip.MustParsePrefix("10.9.0.128/26"): true,
			netip.MustParsePrefix("10.9.0.192/26"): true,
		}
		if len(got) != 3 || full != 2 {
			t.Errorf("%d hosts got a subnet (%v) and %d were told the range is full; want 3 and 2", len(got), got, full)
		}
		for s := range got {
			if !want[s] {
				t.Errorf("handed out %s; the first subnet 10.9.0.0/26 must never be", s)
			}
		}
	})
}

// TestAcquireReclaims: a restarting host gets its previous subnet back, found by PublicIP or
// by the subnet its subnet file recorded.
func TestAcquireReclaims(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	prefix := testPrefix(t)
	c := srv.Client()

	t.Run("by PublicIP", func(t *testing.T) {
		m1, _ := newTestManager(t, srv, prefix, time.Minute)
		first, err := m1.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(1)), netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		m1.Close() // the host dies; its lease stays in etcd

		// Restarted, with a new VTEP MAC (BackendData) and no subnet file.
		m2, log := newTestManager(t, srv, prefix, time.Minute)
		attrs := vxlanAttrs(hostIP(1))
		attrs.BackendData = []byte(`{"VNI":1,"VtepMAC":"0e:78:00:00:00:01"}`)
		again, err := m2.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		if again.Subnet != first.Subnet {
			t.Errorf("restart got %s, want our previous %s", again.Subnet, first.Subnet)
		}
		resp, _ := c.Get(ctx, SubnetKey(prefix, first.Subnet))
		if len(resp.Kvs) != 1 || !strings.Contains(string(resp.Kvs[0].Value), "0e:78:00:00:00:01") || resp.Kvs[0].Lease == 0 {
			t.Errorf("the reclaimed key was not updated to our new BackendData under a TTL: %v", resp.Kvs)
		}
		if !strings.Contains(log.String(), "reclaimed our previous lease") {
			t.Errorf("no log line about the reclaim:\n%s", log)
		}
	})

	t.Run("by subnet file", func(t *testing.T) {
		m, _ := newTestManager(t, srv, prefix, time.Minute)
		// The previous lease expired while the host was down: only the subnet file knows it.
		prev := netip.MustParsePrefix("10.244.77.0/24")
		l, err := m.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(2)), prev)
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet != prev {
			t.Errorf("got %s, want %s from the subnet file", l.Subnet, prev)
		}
		// Another host whose subnet file names the same, now taken, subnet gets another one.
		m3, _ := newTestManager(t, srv, prefix, time.Minute)
		other, err := m3.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(3)), prev)
		if err != nil {
			t.Fatal(err)
		}
		if other.Subnet == prev {
			t.Errorf("host 3 took %s, held by host 2", prev)
		}
		// A subnet file from another config (wrong length) is ignored.
		m4, _ := newTestManager(t, srv, prefix, time.Minute)
		l4, err := m4.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(4)), netip.MustParsePrefix("10.244.78.0/25"))
		if err != nil || l4.Subnet.Bits() != 24 {
			t.Errorf("with an incompatible previous subnet: %+v, %v", l4, err)
		}
	})
}

// TestAcquireReservation: a key without TTL is an operator's reservation. Other hosts skip
// it, even when it is the last free subnet; its owner takes it and it stays a reservation.
func TestAcquireReservation(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.9.0.0/24","SubnetLen":26}`)
	prefix := testPrefix(t)
	c := srv.Client()
	reserved := netip.MustParsePrefix("10.9.0.128/26")
	owner := hostIP(9)
	if _, err := c.Put(ctx, SubnetKey(prefix, reserved), `{"PublicIP":"`+owner.String()+`"}`); err != nil {
		t.Fatal(err)
	}

	m, _ := newTestManager(t, srv, prefix, time.Minute)
	for i := 1; i <= 2; i++ {
		l, err := m.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(i)), reserved) // even asking for it by subnet file
		if err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
		if l.Subnet == reserved {
			t.Fatalf("host %d took %s, reserved for %s", i, reserved, owner)
		}
	}
	if _, err := m.AcquireLease(ctx, cfg, vxlanAttrs(hostIP(3)), netip.Prefix{}); !errors.Is(err, ErrRangeFull) {
		t.Fatalf("a third host with only the reservation left: %v, want ErrRangeFull", err)
	}

	l, err := m.AcquireLease(ctx, cfg, vxlanAttrs(owner), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != reserved || !l.Expiration.IsZero() {
		t.Errorf("the owner got %s (expiration %v), want its reservation %s with no expiration", l.Subnet, l.Expiration, reserved)
	}
	resp, err := c.Get(ctx, SubnetKey(prefix, reserved))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("reservation key: %v %v", resp, err)
	}
	if kv := resp.Kvs[0]; kv.Lease != 0 || !strings.Contains(string(kv.Value), `"VtepMAC"`) {
		t.Errorf("reservation after its owner took it: value %s, lease %d; want our BackendData and still no TTL", kv.Value, kv.Lease)
	}
}
