package subnetmgr

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// An IPv6-only config as flannel takes it: EnableIPv4 false needs IPv6Network and no Network
// (one given is ignored); both families off, or IPv6-only without IPv6Network, name the fields.
func TestParseConfigIPv6Only(t *testing.T) {
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	want := Config{EnableIPv6: true, IPv6Network: p("fc00::/48"), IPv6SubnetLen: 64,
		IPv6SubnetMin: a("fc00:0:0:1::"), IPv6SubnetMax: a("fc00:0:0:ffff::"),
		Backend: BackendConfig{Type: "vxlan", VNI: 1, Port: 8472, WireGuard: defaultWireGuard}}
	for _, tc := range []struct{ desc, js string }{
		{"no Network at all", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`},
		{"an empty Network", `{"EnableIPv4":false,"EnableIPv6":true,"Network":"","IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`},
		{"a Network is ignored, even a malformed one", `{"EnableIPv4":false,"EnableIPv6":true,"Network":"bogus","SubnetLen":99,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := ParseConfig([]byte(tc.js))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if got != want {
				t.Errorf("ParseConfig:\n got %+v\nwant %+v", got, want)
			}
			if !got.IPv6Only() {
				t.Errorf("IPv6Only() = false")
			}
		})
	}
	if c := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}`); !c.EnableIPv4 || c.IPv6Only() {
		t.Errorf("dual stack: EnableIPv4 %v, IPv6Only %v; want true, false", c.EnableIPv4, c.IPv6Only())
	}
	if c := mustConfig(t, `{"EnableIPv4":true,"Network":"10.244.0.0/16"}`); !c.EnableIPv4 || c.EnableIPv6 {
		t.Errorf("explicit EnableIPv4 true: %+v", c)
	}

	bad := []struct{ desc, js, field, says string }{
		{"both families off", `{"EnableIPv4":false,"EnableIPv6":false,"IPv6Network":"fc00::/48"}`, "EnableIPv4", "EnableIPv6"},
		{"IPv4 off, IPv6 not asked for", `{"EnableIPv4":false,"Network":"10.244.0.0/16"}`, "EnableIPv4", "no address family"},
		{"IPv6 only without IPv6Network", `{"EnableIPv4":false,"EnableIPv6":true}`, "IPv6Network", "EnableIPv4 is false"},
		{"IPv6 only with an IPv4 IPv6Network", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"10.0.0.0/8"}`, "IPv6Network", "EnableIPv4 is false"},
		{"IPv6 only, a bad IPv6SubnetLen", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}`, "IPv6SubnetLen", "between 50 and 126"},
		{"IPv4 on without Network", `{"EnableIPv4":true,"EnableIPv6":true,"IPv6Network":"fc00::/48"}`, "Network", "missing"},
		{"EnableIPv4 of the wrong type", `{"EnableIPv4":"no","EnableIPv6":true,"IPv6Network":"fc00::/48"}`, "EnableIPv4", "wrong JSON type"},
	}
	for _, tc := range bad {
		_, err := ParseConfig([]byte(tc.js))
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != tc.field || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %s: got %v, want a ConfigError on %s saying %q", tc.desc, tc.js, err, tc.field, tc.says)
		}
	}
}

// flannel's key of an IPv6-only lease: its zero IP4Net, "&", the IPv6 subnet.
func TestIPv6OnlyKey(t *testing.T) {
	const prefix = "/coreos.com/network"
	v6 := netip.MustParsePrefix("fc00:0:0:1::/64")
	key := LeaseKey(prefix, SubnetsDir, netip.Prefix{}, v6)
	if want := "/coreos.com/network/subnets/0.0.0.0-0&fc00:0:0:1::-64"; key != want {
		t.Fatalf("LeaseKey = %q, want flannel's %q", key, want)
	}
	if got := (Lease{IPv6Subnet: v6}).Key(prefix); got != key {
		t.Errorf("Lease.Key = %q, want %q", got, key)
	}
	g4, g6, err := ParseDualSubnetKey(prefix, key)
	if err != nil || g4.IsValid() || g6 != v6 {
		t.Errorf("ParseDualSubnetKey(%q) = %v, %v, %v; want no IPv4 subnet and %v", key, g4, g6, err, v6)
	}
	if id := (Lease{IPv6Subnet: g6}).ID(); id != v6 {
		t.Errorf("ID = %v, want the IPv6 subnet %v", id, v6)
	}
	if id := (Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: v6}).ID(); id != netip.MustParsePrefix("10.244.1.0/24") {
		t.Errorf("a dual-stack lease's ID = %v, want its IPv4 subnet", id)
	}
	// 0.0.0.0-0 alone is an IPv4 key naming 0.0.0.0/0 (which no trust rule accepts), not an
	// IPv6-only lease.
	if g4, g6, err := ParseDualSubnetKey(prefix, prefix+"/subnets/0.0.0.0-0"); err != nil || g4 != netip.MustParsePrefix("0.0.0.0/0") || g6.IsValid() {
		t.Errorf("0.0.0.0-0 = %v, %v, %v", g4, g6, err)
	}
}

// flannelV6OnlyValue is a lease value exactly as flannel's vxlan backend writes it in an
// IPv6-only network: PublicIP is its zero IP4, no BackendData.
const flannelV6OnlyValue = `{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::21","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:21"}}`

func TestLeaseValueIPv6OnlyFlannelFormat(t *testing.T) {
	attrs, err := DecodeLeaseValue([]byte(flannelV6OnlyValue))
	if err != nil {
		t.Fatal(err)
	}
	if attrs.Host() != netip.MustParseAddr("fd00:198:18::21") {
		t.Errorf("Host = %v, want the PublicIPv6 (PublicIP is 0.0.0.0)", attrs.Host())
	}
	if len(attrs.BackendData) != 0 {
		t.Errorf("BackendData = %s, want none", attrs.BackendData)
	}
	out, err := EncodeLeaseValue(attrs)
	if err != nil || string(out) != flannelV6OnlyValue {
		t.Errorf("EncodeLeaseValue = %s, %v\nwant %s", out, err, flannelV6OnlyValue)
	}
}

func v6OnlyAttrs(i int) LeaseAttrs {
	pub6 := netip.MustParseAddr("fd00:198:18::")
	for range 0x20 + i {
		pub6 = pub6.Next()
	}
	return LeaseAttrs{PublicIP: netip.IPv4Unspecified(), PublicIPv6: pub6, BackendType: BackendVXLAN,
		BackendV6Data: json.RawMessage(fmt.Sprintf(`{"VNI":1,"VtepMAC":"aa:bb:cc:00:01:%02x"}`, i))}
}

// IPv6-only leases in etcd, as flannel keeps them: hosts starting together get distinct /64s
// under 0.0.0.0-0&<ipv6>-<len> keys with flannel's value; a restart takes its lease back by
// PublicIPv6; the keeper renews it; the watch delivers leases (a flannel host's too, written
// byte for byte as flannel writes it) and their removal; a lease of ours from a dual-stack
// config is dropped for an IPv6-only one.
func TestAcquireIPv6Only(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := ctxFor(t, 60*time.Second)
	cfg := mustConfig(t, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`)
	prefix := testPrefix(t)

	const hosts = 8
	leases := make([]Lease, hosts)
	errs := make([]error, hosts)
	var wg sync.WaitGroup
	for i := range hosts {
		m, _ := newTestManager(t, srv, prefix, time.Minute)
		wg.Go(func() { leases[i], errs[i] = m.AcquireLease(ctx, cfg, v6OnlyAttrs(i+1), netip.Prefix{}) })
	}
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i+1, errs[i])
		}
		if l.Subnet.IsValid() || !OverlayPool(cfg).compatible(l.IPv6Subnet) || l.ID() != l.IPv6Subnet {
			t.Errorf("host %d got %v / %v, want only a /64 of %v", i+1, l.Subnet, l.IPv6Subnet, cfg.IPv6Network)
		}
		if j, dup := seen[l.IPv6Subnet]; dup {
			t.Errorf("hosts %d and %d both got %v", j+1, i+1, l.IPv6Subnet)
		}
		seen[l.IPv6Subnet] = i
	}
	resp, err := srv.Client().Get(ctx, SubnetsPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != hosts {
		t.Fatalf("%d keys in etcd, want %d", len(resp.Kvs), hosts)
	}
	for _, kv := range resp.Kvs {
		if !strings.HasPrefix(string(kv.Key), SubnetsPrefix(prefix)+"0.0.0.0-0&fd00:10:244:") ||
			!strings.HasPrefix(string(kv.Value), `{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::`) ||
			strings.Contains(string(kv.Value), `"BackendData"`) {
			t.Errorf("key %s = %s: want flannel's IPv6-only key and value", kv.Key, kv.Value)
		}
	}

	t.Run("restart takes the lease back by PublicIPv6", func(t *testing.T) {
		m, _ := newTestManager(t, srv, prefix, time.Minute)
		again, err := m.AcquireLease(ctx, cfg, v6OnlyAttrs(1), netip.Prefix{})
		if err != nil || again.IPv6Subnet != leases[0].IPv6Subnet || again.Subnet.IsValid() {
			t.Errorf("got %v %v (%v), want %v", again.Subnet, again.IPv6Subnet, err, leases[0].IPv6Subnet)
		}
	})

	t.Run("the subnet file's IPv6 subnet is taken when free", func(t *testing.T) {
		p := testPrefix(t)
		m, _ := newTestManager(t, srv, p, time.Minute)
		want := netip.MustParsePrefix("fd00:10:244:42::/64")
		l, err := m.AcquireLease(ctx, cfg, v6OnlyAttrs(1), want)
		if err != nil || l.IPv6Subnet != want {
			t.Errorf("got %v (%v), want the file's %v", l.IPv6Subnet, err, want)
		}
	})

	t.Run("the keeper renews the lease under its key", func(t *testing.T) {
		p := testPrefix(t)
		m, _ := newTestManager(t, srv, p, 3*time.Second)
		l, err := m.AcquireLease(ctx, cfg, v6OnlyAttrs(1), netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		kctx, cancel := context.WithCancel(ctx)
		defer cancel()
		renewed := make(chan Lease, 8)
		go func() {
			_ = m.KeepLease(kctx, cfg, v6OnlyAttrs(1), l, time.Second, func(nl Lease) { renewed <- nl })
		}()
		deadline := time.After(8 * time.Second)
		for n := 0; n < 2; {
			select {
			case nl := <-renewed:
				if nl.IPv6Subnet != l.IPv6Subnet || nl.Subnet.IsValid() {
					t.Fatalf("renewal moved the lease: %v %v", nl.Subnet, nl.IPv6Subnet)
				}
				n++
			case <-deadline:
				t.Fatal("no two renewals within 8s with a 3s TTL")
			}
		}
		// Past the TTL the key is still there, and still ours.
		if keys := keysUnder(t, srv, p); len(keys) != 1 || keys[0] != l.Key(p) {
			t.Errorf("keys %v, want only %s", keys, l.Key(p))
		}
	})

	t.Run("a dual-stack lease of ours is dropped for an IPv6-only one", func(t *testing.T) {
		p := testPrefix(t)
		m, _ := newTestManager(t, srv, p, time.Minute)
		dual := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
		a := v6OnlyAttrs(1)
		a.PublicIP = hostIP(1)
		old, err := m.AcquireDualLease(ctx, dual, a, netip.Prefix{}, netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		l, err := m.AcquireLease(ctx, cfg, v6OnlyAttrs(1), old.IPv6Subnet)
		if err != nil || l.Subnet.IsValid() {
			t.Fatalf("got %v %v (%v)", l.Subnet, l.IPv6Subnet, err)
		}
		if keys := keysUnder(t, srv, p); len(keys) != 1 || keys[0] != l.Key(p) {
			t.Errorf("keys %v, want only %s", keys, l.Key(p))
		}
	})

	t.Run("the watch delivers IPv6-only leases, flannel's too, and their removal", func(t *testing.T) {
		p := testPrefix(t)
		m, _ := newTestManager(t, srv, p, time.Minute)
		el := startWatch(t, ctx, m)
		l, err := m.AcquireLease(ctx, cfg, v6OnlyAttrs(1), netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		flannelKey := SubnetsPrefix(p) + "0.0.0.0-0&fd00:10:244:21::-64"
		if _, err := srv.Client().Put(ctx, flannelKey, flannelV6OnlyValue); err != nil {
			t.Fatal(err)
		}
		find := func(typ EventType, id netip.Prefix) *Lease {
			el.mu.Lock()
			defer el.mu.Unlock()
			for _, b := range el.batches {
				for _, e := range b {
					if e.Type == typ && e.Lease.ID() == id && !e.Lease.Subnet.IsValid() {
						return &e.Lease
					}
				}
			}
			return nil
		}
		waitFor(t, 10*time.Second, "both leases added", func() bool {
			return find(EventAdded, l.IPv6Subnet) != nil && find(EventAdded, netip.MustParsePrefix("fd00:10:244:21::/64")) != nil
		})
		fl := find(EventAdded, netip.MustParsePrefix("fd00:10:244:21::/64"))
		if fl.PublicIPv6 != netip.MustParseAddr("fd00:198:18::21") || fl.Host() != fl.PublicIPv6 || fl.BackendType != BackendVXLAN {
			t.Errorf("flannel's lease read as %+v", *fl)
		}
		if d, err := ParseVXLANData(fl.BackendV6Data); err != nil || d.VtepMAC != "aa:bb:cc:00:00:21" {
			t.Errorf("flannel's BackendV6Data = %s (%v)", fl.BackendV6Data, err)
		}
		listed, _, err := m.ListLeases(ctx)
		if err != nil || len(listed) != 2 {
			t.Fatalf("ListLeases = %d leases (%v), want 2", len(listed), err)
		}
		if _, err := srv.Client().Delete(ctx, l.Key(p)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "our lease removed", func() bool { return find(EventRemoved, l.IPv6Subnet) != nil })
	})
}

// subnet.env and the Docker options of an IPv6-only overlay, as flannel writes them (plus
// XNET_*), and read back.
func TestFilesIPv6Only(t *testing.T) {
	dir := t.TempDir()
	f := SubnetFile{IPv6Network: netip.MustParsePrefix("fd00:10:244::/56"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"),
		MTU: 1430, IPMasq: true}
	env := filepath.Join(dir, "subnet.env")
	if err := WriteSubnetFile(env, f); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(env)
	if err != nil {
		t.Fatal(err)
	}
	want := "XNET_IPV6_NETWORK=fd00:10:244::/56\nXNET_IPV6_SUBNET=fd00:10:244:5::1/64\nXNET_MTU=1430\nXNET_IPMASQ=true\n" +
		"FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:5::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n"
	if string(got) != want {
		t.Errorf("subnet.env:\n%s\nwant:\n%s", got, want)
	}
	back, err := ReadSubnetFile(env)
	if err != nil || back != f {
		t.Errorf("ReadSubnetFile = %+v, %v; want %+v", back, err, f)
	}
	opts := filepath.Join(dir, "docker")
	if err := WriteDockerOpts(opts, f); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(opts); string(got) != "DOCKER_NETWORK_OPTIONS=\" --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430\"\n" {
		t.Errorf("docker options: %s", got)
	}
	// A file with neither family is refused, as one with half of IPv4.
	if err := WriteSubnetFile(env, SubnetFile{MTU: 1430}); err == nil {
		t.Errorf("WriteSubnetFile took a file without subnets")
	}
}
