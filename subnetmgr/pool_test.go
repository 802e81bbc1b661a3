package subnetmgr

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

func TestPoolKeysLiveInTheirOwnDirectory(t *testing.T) {
	const prefix = "/coreos.com/network"
	r := netip.MustParsePrefix("10.0.0.32/28")
	key := PoolKey(prefix, "macvlan", r)
	if key != "/coreos.com/network/macvlan/10.0.0.32-28" {
		t.Errorf("PoolKey = %q", key)
	}
	if got, err := ParsePoolKey(prefix+"/", "/macvlan/", key); err != nil || got != r {
		t.Errorf("ParsePoolKey(%q) = %v, %v", key, got, err)
	}
	if _, err := ParseSubnetKey(prefix, key); err == nil {
		t.Errorf("a macvlan key parses as an overlay subnet key")
	}
	if SubnetKey(prefix, r) != PoolKey(prefix, SubnetsDir, r) {
		t.Errorf("the overlay's keys are not its pool's keys")
	}
}

func TestLastAddr(t *testing.T) {
	for _, tc := range []struct{ p, want string }{
		{"10.0.0.0/24", "10.0.0.255"},
		{"10.0.0.37/28", "10.0.0.47"},
		{"10.0.0.5/32", "10.0.0.5"},
		{"0.0.0.0/0", "255.255.255.255"},
	} {
		if got := LastAddr(netip.MustParsePrefix(tc.p)); got.String() != tc.want {
			t.Errorf("LastAddr(%s) = %v, want %s", tc.p, got, tc.want)
		}
	}
}

func TestAcquirePoolLeaseRefusesAPoolItCannotServe(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv, testPrefix(t), time.Hour)
	good := Pool{Dir: "macvlan", Network: netip.MustParsePrefix("10.0.0.0/24"), Len: 28,
		Min: netip.MustParseAddr("10.0.0.16"), Max: netip.MustParseAddr("10.0.0.32")}
	cases := []struct {
		desc string
		edit func(*Pool)
		want string
	}{
		{"no directory", func(p *Pool) { p.Dir = "" }, "empty key directory"},
		{"a bound off a range boundary", func(p *Pool) { p.Min = netip.MustParseAddr("10.0.0.17") }, "not a /28 boundary"},
		{"a bound outside the network", func(p *Pool) { p.Max = netip.MustParseAddr("10.0.1.0") }, "not a /28 boundary inside 10.0.0.0/24"},
		{"max below min", func(p *Pool) { p.Min, p.Max = p.Max, p.Min }, "below min"},
		{"ranges longer than the network", func(p *Pool) { p.Len = 20 }, "does not fit"},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			p := good
			tc.edit(&p)
			_, err := m.AcquirePoolLease(ctxFor(t, 5*time.Second), p, vxlanAttrs(hostIP(1)), netip.Prefix{})
			if err == nil || errors.Is(err, ErrRangeFull) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("AcquirePoolLease = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	t.Run("a range covering an avoided address is never taken; a pool left with none is full, saying why", func(t *testing.T) {
		p := good
		p.Avoid = []netip.Addr{netip.MustParseAddr("10.0.0.20")} // in the first of the two ranges
		l, err := m.AcquirePoolLease(ctxFor(t, 5*time.Second), p, vxlanAttrs(hostIP(1)), netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet != netip.MustParsePrefix("10.0.0.32/28") {
			t.Errorf("got %v, want the one range covering no avoided address", l.Subnet)
		}
		_, err = m.AcquirePoolLease(ctxFor(t, 5*time.Second), p, vxlanAttrs(hostIP(2)), netip.Prefix{})
		if !errors.Is(err, ErrRangeFull) || !strings.Contains(err.Error(), "1 more cover a host's address") {
			t.Errorf("AcquirePoolLease = %v, want ErrRangeFull counting the avoided ranges", err)
		}
	})
}
