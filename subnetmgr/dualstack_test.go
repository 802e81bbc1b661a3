package subnetmgr

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// The dual-stack config: flannel's field names and defaults, each field's error naming it.
func TestParseConfigIPv6(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}`)
	want := Config{EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fc00::/48"), IPv6SubnetLen: 64,
		IPv6SubnetMin: netip.MustParseAddr("fc00:0:0:1::"), IPv6SubnetMax: netip.MustParseAddr("fc00:0:0:ffff::")}
	if cfg.EnableIPv6 != want.EnableIPv6 || cfg.IPv6Network != want.IPv6Network || cfg.IPv6SubnetLen != want.IPv6SubnetLen ||
		cfg.IPv6SubnetMin != want.IPv6SubnetMin || cfg.IPv6SubnetMax != want.IPv6SubnetMax {
		t.Errorf("defaults: got %v len %d [%v, %v], want %v len %d [%v, %v]", cfg.IPv6Network, cfg.IPv6SubnetLen,
			cfg.IPv6SubnetMin, cfg.IPv6SubnetMax, want.IPv6Network, want.IPv6SubnetLen, want.IPv6SubnetMin, want.IPv6SubnetMax)
	}
	// IPv6 fields without EnableIPv6 are flannel's too: ignored, the overlay stays IPv4.
	if c := mustConfig(t, `{"Network":"10.244.0.0/16","IPv6Network":"fc00::/48"}`); c.EnableIPv6 || c.IPv6Network.IsValid() {
		t.Errorf("IPv6Network without EnableIPv6 made the overlay dual stack: %+v", c)
	}
	// A small IPv6 network gets quarters, as a small IPv4 one does; explicit bounds are kept.
	c := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:1::/120","IPv6SubnetMin":"fd00:1::40","IPv6SubnetMax":"fd00:1::80"}`)
	if c.IPv6SubnetLen != 122 || c.IPv6SubnetMin != netip.MustParseAddr("fd00:1::40") || c.IPv6SubnetMax != netip.MustParseAddr("fd00:1::80") {
		t.Errorf("small network: got len %d [%v, %v]", c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
	}

	bad := []struct{ js, field, says string }{
		{`{"Network":"10.244.0.0/16","EnableIPv6":true}`, "IPv6Network", "missing"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"10.0.0.0/8"}`, "IPv6Network", "not an IPv6 CIDR"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"::ffff:10.0.0.0/104"}`, "IPv6Network", "not an IPv6 CIDR"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/125"}`, "IPv6Network", "too small"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":49}`, "IPv6SubnetLen", "between 50 and 126"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}`, "IPv6SubnetLen", "between 50 and 126"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::1"}`, "IPv6SubnetMin", "boundary"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMax":"fd00::"}`, "IPv6SubnetMax", "outside IPv6Network"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:9::","IPv6SubnetMax":"fc00:0:0:8::"}`, "IPv6SubnetMax", "below IPv6SubnetMin"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"10.0.0.0"}`, "IPv6SubnetMin", "not an IPv6 address"},
		{`{"Network":"10.244.0.0/16","EnableIPv6":"yes","IPv6Network":"fc00::/48"}`, "EnableIPv6", "wrong JSON type"},
	}
	for _, tc := range bad {
		_, err := ParseConfig([]byte(tc.js))
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != tc.field || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: got %v, want a ConfigError on %s saying %q", tc.js, err, tc.field, tc.says)
		}
	}
}

// Keys as flannel writes them for a dual-stack host, and only those.
func TestDualSubnetKey(t *testing.T) {
	const prefix = "/coreos.com/network"
	v4, v6 := netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fc00:0:0:1::/64")
	key := DualSubnetKey(prefix, v4, v6)
	if want := "/coreos.com/network/subnets/10.244.1.0-24&fc00:0:0:1::-64"; key != want {
		t.Fatalf("DualSubnetKey = %q, want flannel's %q", key, want)
	}
	if g4, g6, err := ParseDualSubnetKey(prefix, key); err != nil || g4 != v4 || g6 != v6 {
		t.Errorf("ParseDualSubnetKey(%q) = %v, %v, %v", key, g4, g6, err)
	}
	if g4, err := ParseSubnetKey(prefix, key); err != nil || g4 != v4 {
		t.Errorf("ParseSubnetKey(%q) = %v, %v; want the IPv4 part", key, g4, err)
	}
	if DualSubnetKey(prefix, v4, netip.Prefix{}) != SubnetKey(prefix, v4) {
		t.Errorf("without an IPv6 subnet the key is not the IPv4 key")
	}
	for _, bad := range []string{
		"10.244.1.0-24&",                    // empty IPv6 part
		"10.244.1.0-24&fc00:0:0:1::",        // no length
		"10.244.1.0-24&fc00:0:0:1::-129",    // length out of range
		"10.244.1.0-24&fc00:0:0:1::1-64",    // host bits
		"10.244.1.0-24&FC00:0:0:1::-64",     // another spelling of the same subnet
		"10.244.1.0-24&fc00:0000:0:1::-64",  // another spelling of the same subnet
		"10.244.1.0-24&::ffff:10.1.0.0-120", // IPv4-mapped
		"10.244.1.0-24&fe80::%eth0-64",      // a zone
		"10.244.1.0-24&10.1.0.0-16",         // IPv4 after the &
		"10.244.1.0-24&fc00::-64&fd00::-64", // two IPv6 parts
	} {
		if a, b, err := ParseDualSubnetKey(prefix, prefix+"/subnets/"+bad); err == nil {
			t.Errorf("ParseDualSubnetKey(%q) = %v, %v; want an error", bad, a, b)
		}
	}
}

// A dual-stack lease value exactly as flannel's vxlan backend writes it reads and writes back
// byte for byte.
func TestLeaseValueDualStackFlannelFormat(t *testing.T) {
	flannel := `{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"}}`
	attrs, err := DecodeLeaseValue([]byte(flannel))
	if err != nil {
		t.Fatal(err)
	}
	if attrs.PublicIPv6 != netip.MustParseAddr("fd00:198:18::11") {
		t.Errorf("PublicIPv6 = %v", attrs.PublicIPv6)
	}
	d6, err := ParseVXLANData(attrs.BackendV6Data)
	if err != nil || d6.VtepMAC != "aa:bb:cc:00:00:02" || d6.VNI != 1 {
		t.Errorf("BackendV6Data = %s (%+v, %v)", attrs.BackendV6Data, d6, err)
	}
	out, err := EncodeLeaseValue(attrs)
	if err != nil || string(out) != flannel {
		t.Errorf("EncodeLeaseValue = %s, %v\nwant %s", out, err, flannel)
	}
	for _, bad := range []string{
		`{"PublicIP":"198.18.0.11","PublicIPv6":"198.18.0.11"}`,
		`{"PublicIP":"198.18.0.11","PublicIPv6":"not-an-address"}`,
		`{"PublicIP":"198.18.0.11","PublicIPv6":"::ffff:198.18.0.11"}`,
	} {
		if _, err := DecodeLeaseValue([]byte(bad)); err == nil || !strings.Contains(err.Error(), "PublicIPv6") {
			t.Errorf("DecodeLeaseValue(%s) = %v, want an error naming PublicIPv6", bad, err)
		}
	}
	if _, err := EncodeLeaseValue(LeaseAttrs{PublicIP: hostIP(1), BackendV6Data: json.RawMessage(`{broken`)}); err == nil {
		t.Errorf("EncodeLeaseValue took malformed BackendV6Data")
	}
}

func dualAttrs(i int) LeaseAttrs {
	a := vxlanAttrs(hostIP(i))
	a.PublicIPv6 = netip.MustParseAddr("fd00:198:18::").Next()
	for range i {
		a.PublicIPv6 = a.PublicIPv6.Next()
	}
	a.BackendV6Data = a.BackendData
	return a
}

// Dual-stack leases: hosts starting together get distinct IPv6 subnets in flannel's keys, a
// restart takes both subnets back, an IPv4-only lease of ours gains an IPv6 subnet (and loses
// it when the config drops IPv6) in one move, and a full IPv6 range says which field to widen.
func TestAcquireDualStack(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 40*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
	prefix := testPrefix(t)

	const hosts = 20
	leases := make([]Lease, hosts)
	errs := make([]error, hosts)
	var wg sync.WaitGroup
	for i := range hosts {
		m, _ := newTestManager(t, srv, prefix, time.Minute)
		wg.Go(func() {
			leases[i], errs[i] = m.AcquireDualLease(ctx, cfg, dualAttrs(i+1), netip.Prefix{}, netip.Prefix{})
		})
	}
	wg.Wait()
	seen6 := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i+1, errs[i])
		}
		if !OverlayPool(cfg).IPv6.compatible(l.IPv6Subnet) {
			t.Errorf("host %d got IPv6 subnet %v, not a /64 of %v from %v", i+1, l.IPv6Subnet, cfg.IPv6Network, cfg.IPv6SubnetMin)
		}
		if j, dup := seen6[l.IPv6Subnet]; dup {
			t.Errorf("hosts %d and %d both got %v", j+1, i+1, l.IPv6Subnet)
		}
		seen6[l.IPv6Subnet] = i
	}
	// etcd holds flannel's keys with the IPv6 fields in the value.
	resp, err := srv.Client().Get(ctx, SubnetsPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != hosts {
		t.Fatalf("%d keys in etcd, want %d", len(resp.Kvs), hosts)
	}
	for _, kv := range resp.Kvs {
		if !strings.Contains(string(kv.Key), "&fd00:10:244:") || !strings.Contains(string(kv.Value), `"PublicIPv6":"fd00:198:18::`) {
			t.Errorf("key %s = %s: want flannel's dual-stack key and PublicIPv6", kv.Key, kv.Value)
		}
	}
	// Listing reads the IPv6 parts back.
	m, _ := newTestManager(t, srv, prefix, time.Minute)
	listed, _, err := m.ListLeases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range listed {
		if !l.IPv6Subnet.IsValid() || !l.PublicIPv6.IsValid() || len(l.BackendV6Data) == 0 {
			t.Errorf("listed lease lacks its IPv6 parts: %+v", l)
		}
	}

	t.Run("restart takes both subnets back", func(t *testing.T) {
		again, err := m.AcquireDualLease(ctx, cfg, dualAttrs(1), netip.Prefix{}, netip.Prefix{})
		if err != nil || again.Subnet != leases[0].Subnet || again.IPv6Subnet != leases[0].IPv6Subnet {
			t.Errorf("got %v %v (%v), want %v %v", again.Subnet, again.IPv6Subnet, err, leases[0].Subnet, leases[0].IPv6Subnet)
		}
	})

	t.Run("an IPv4-only lease of ours gains an IPv6 subnet, and loses it again", func(t *testing.T) {
		p := testPrefix(t)
		m, _ := newTestManager(t, srv, p, time.Minute)
		v4only := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
		old, err := m.AcquireLease(ctx, v4only, vxlanAttrs(hostIP(1)), netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		want6 := netip.MustParsePrefix("fd00:10:244:7::/64")
		dual, err := m.AcquireDualLease(ctx, cfg, dualAttrs(1), netip.Prefix{}, want6)
		if err != nil || dual.Subnet != old.Subnet || dual.IPv6Subnet != want6 {
			t.Fatalf("got %v %v (%v); want %v with the file's %v", dual.Subnet, dual.IPv6Subnet, err, old.Subnet, want6)
		}
		keys := keysUnder(t, srv, p)
		if len(keys) != 1 || keys[0] != DualSubnetKey(p, old.Subnet, want6) {
			t.Errorf("keys %v; want only the dual-stack key", keys)
		}
		back, err := m.AcquireLease(ctx, v4only, vxlanAttrs(hostIP(1)), netip.Prefix{})
		if err != nil || back.Subnet != old.Subnet || back.IPv6Subnet.IsValid() {
			t.Fatalf("back to IPv4 only: got %v %v (%v)", back.Subnet, back.IPv6Subnet, err)
		}
		if keys := keysUnder(t, srv, p); len(keys) != 1 || keys[0] != SubnetKey(p, old.Subnet) {
			t.Errorf("keys %v; want only the IPv4 key", keys)
		}
	})

	t.Run("the file's IPv6 subnet held by another host is not taken", func(t *testing.T) {
		p := testPrefix(t)
		m1, _ := newTestManager(t, srv, p, time.Minute)
		m2, _ := newTestManager(t, srv, p, time.Minute)
		want6 := netip.MustParsePrefix("fd00:10:244:9::/64")
		l1, err := m1.AcquireDualLease(ctx, cfg, dualAttrs(1), netip.Prefix{}, want6)
		if err != nil || l1.IPv6Subnet != want6 {
			t.Fatalf("first host: %v %v", l1.IPv6Subnet, err)
		}
		l2, err := m2.AcquireDualLease(ctx, cfg, dualAttrs(2), netip.Prefix{}, want6)
		if err != nil || l2.IPv6Subnet == want6 || !l2.IPv6Subnet.IsValid() {
			t.Errorf("second host asking for the same IPv6 subnet got %v (%v)", l2.IPv6Subnet, err)
		}
	})

	t.Run("a full IPv6 range names the fields to widen", func(t *testing.T) {
		p := testPrefix(t)
		small := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/62"}`)
		var err error
		for i := range 4 {
			m, _ := newTestManager(t, srv, p, time.Minute)
			if _, err = m.AcquireDualLease(ctx, small, dualAttrs(i+1), netip.Prefix{}, netip.Prefix{}); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrRangeFull) || !strings.Contains(err.Error(), "IPv6SubnetMin") {
			t.Errorf("the fourth host in a /62 of /64s (three usable) got %v; want ErrRangeFull naming IPv6SubnetMin/IPv6SubnetMax", err)
		}
	})
}

// The watch delivers dual-stack leases with their IPv6 parts, and their removal.
func TestWatchDualStack(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 30*time.Second)
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
	prefix := testPrefix(t)
	m, _ := newTestManager(t, srv, prefix, time.Minute)
	el := startWatch(t, ctx, m)
	l, err := m.AcquireDualLease(ctx, cfg, dualAttrs(1), netip.Prefix{}, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the added event with IPv6 parts", func() bool {
		el.mu.Lock()
		defer el.mu.Unlock()
		for _, b := range el.batches {
			for _, e := range b {
				if e.Type == EventAdded && e.Lease.IPv6Subnet == l.IPv6Subnet && e.Lease.PublicIPv6 == l.PublicIPv6 && len(e.Lease.BackendV6Data) > 0 {
					return true
				}
			}
		}
		return false
	})
	if _, err := srv.Client().Delete(ctx, l.Key(prefix)); err != nil {
		t.Fatal(err)
	}
	el.waitEvents(t, 2, 10*time.Second)
	if evs := el.events(); !strings.HasPrefix(evs[len(evs)-1], "removed "+l.Subnet.String()) {
		t.Errorf("events %v; want the dual-stack lease removed", evs)
	}
}

func keysUnder(t *testing.T, srv *etcdtest.Server, prefix string) []string {
	t.Helper()
	resp, err := srv.Client().Get(t.Context(), SubnetsPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range resp.Kvs {
		out = append(out, string(kv.Key))
	}
	return out
}
