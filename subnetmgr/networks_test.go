package subnetmgr

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

func testNetwork(name, subnet string) Network {
	p := netip.MustParsePrefix(subnet)
	return Network{Name: name, Subnet: p, VNI: int(addrToU32(p.Addr()) >> 8), Port: 8474, BlockLen: 24, Options: map[string]string{}}
}

func TestNetworkKeysAndRecordsRoundTrip(t *testing.T) {
	const prefix = "/coreos.com/network"
	if got := NetworkKey(prefix, "foo"); got != "/coreos.com/network/networks/foo" {
		t.Errorf("NetworkKey = %q", got)
	}
	if got := NetworkEndpointKey(prefix, "foo", netip.MustParseAddr("10.250.3.2")); got != "/coreos.com/network/network-endpoints/foo/10.250.3.2" {
		t.Errorf("NetworkEndpointKey = %q", got)
	}
	n := testNetwork("foo", "10.250.0.0/16")
	n.Options["xnet.block-len"] = "24"
	data, err := EncodeNetwork(n)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeNetwork("foo", data)
	if err != nil || !got.Same(n) {
		t.Fatalf("DecodeNetwork(%s) = %+v, %v; want %+v", data, got, err, n)
	}
	p := n.BlockPool()
	if p.Dir != "network-blocks/foo" || p.Len != 24 || p.Min.String() != "10.250.1.0" || p.Max.String() != "10.250.255.0" {
		t.Errorf("BlockPool = %+v: want blocks 10.250.1.0-10.250.255.0 /24 under network-blocks/foo", p)
	}
	if err := p.check(); err != nil {
		t.Errorf("BlockPool is not a pool the lease engine serves: %v", err)
	}
}

func TestNetworkRecordChecksNameTheField(t *testing.T) {
	for _, tc := range []struct {
		desc string
		edit func(*Network)
		want string
	}{
		{"a name Docker would refuse", func(n *Network) { n.Name = "-x/y" }, "network name"},
		{"host bits in the subnet", func(n *Network) { n.Subnet = netip.MustParsePrefix("10.250.0.1/16") }, "Subnet"},
		{"VNI 0", func(n *Network) { n.VNI = 0 }, "VNI"},
		{"no port", func(n *Network) { n.Port = 0 }, "Port"},
		{"blocks as large as the network", func(n *Network) { n.BlockLen = 16 }, "BlockLen"},
	} {
		n := testNetwork("foo", "10.250.0.0/16")
		tc.edit(&n)
		if err := n.Check(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Check() = %v, want an error naming %s", tc.desc, err, tc.want)
		}
	}
	if _, err := DecodeNetwork("foo", []byte(`{"Subnet":"nonsense"}`)); err == nil {
		t.Errorf("a record with a malformed subnet decodes")
	}
}

func TestCreateNetworkRefusesTakenNamesAndOverlapsAndAcceptsTheSameNetworkTwice(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv, testPrefix(t), time.Hour)
	ctx := context.Background()
	overlay := netip.MustParsePrefix("10.244.0.0/16")
	foo := testNetwork("foo", "10.250.0.0/16")
	if _, err := m.CreateNetwork(ctx, foo, overlay); err != nil {
		t.Fatal(err)
	}
	if got, err := m.CreateNetwork(ctx, foo, overlay); err != nil || !got.Same(foo) {
		t.Errorf("creating the same network again = %+v, %v; want the existing record", got, err)
	}
	for _, tc := range []struct {
		desc string
		n    Network
		want string
	}{
		{"the name with another subnet", testNetwork("foo", "10.251.0.0/16"), "network foo exists with subnet 10.250.0.0/16"},
		{"a subnet inside another network's", testNetwork("bar", "10.250.16.0/20"), "overlaps network foo"},
		{"a subnet holding another network's", testNetwork("bar", "10.248.0.0/13"), "overlaps network foo"},
		{"the overlay Network", testNetwork("bar", "10.244.0.0/16"), "overlaps 10.244.0.0/16"},
	} {
		_, err := m.CreateNetwork(ctx, tc.n, overlay)
		var conflict *NetworkConflictError
		if !errors.As(err, &conflict) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: CreateNetwork = %v, want a conflict saying %q", tc.desc, err, tc.want)
		}
	}
	opts := testNetwork("foo", "10.250.0.0/16")
	opts.Options["xnet.block-len"] = "26"
	if _, err := m.CreateNetwork(ctx, opts, overlay); err == nil || !strings.Contains(err.Error(), "no option -o xnet.block-len") {
		t.Errorf("the name with other options: %v, want a conflict naming the option", err)
	}
	s, err := m.ListNetworks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Networks) != 1 || !s.Networks["foo"].Same(foo) {
		t.Errorf("etcd holds %+v, want only foo", s.Networks)
	}
}

func TestCreateNetworkIsSerializable(t *testing.T) {
	// Ten hosts create ten overlapping networks at once: exactly one may win.
	srv := etcdtest.Start(t)
	prefix := testPrefix(t)
	var wg sync.WaitGroup
	results := make([]error, 10)
	for i := range results {
		m, _ := newTestManager(t, srv, prefix, time.Hour)
		wg.Go(func() {
			n := testNetwork("net"+string(rune('a'+i)), "10.250.0.0/16")
			n.Subnet = netip.PrefixFrom(n.Subnet.Addr(), 16+i%4).Masked()
			_, results[i] = m.CreateNetwork(context.Background(), n)
		})
	}
	wg.Wait()
	won := 0
	for _, err := range results {
		if err == nil {
			won++
		}
	}
	if won != 1 {
		t.Errorf("%d of 10 overlapping creates succeeded, want 1: %v", won, results)
	}
}

func TestNetworkEndpointsLiveAsLongAsTheirBlock(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv, testPrefix(t), time.Hour)
	ctx := context.Background()
	foo := testNetwork("foo", "10.250.0.0/16")
	if _, err := m.CreateNetwork(ctx, foo); err != nil {
		t.Fatal(err)
	}
	attrs := vxlanAttrs(hostIP(1))
	block, err := m.AcquirePoolLease(ctx, foo.BlockPool(), attrs, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if block.Subnet.Bits() != 24 || !foo.Subnet.Contains(block.Subnet.Addr()) || block.Subnet.Addr().String() == "10.250.0.0" {
		t.Fatalf("block %v: want a /24 of %v other than the first", block.Subnet, foo.Subnet)
	}
	ep := NetworkEndpoint{Network: "foo", IP: block.Subnet.Addr().Next().Next(), Name: "b1", PublicIP: hostIP(1), Container: "c0ffee"}
	if err := m.PutNetworkEndpoint(ctx, ep, block); err != nil {
		t.Fatal(err)
	}
	outside := ep
	outside.IP = netip.MustParseAddr("10.250.0.9")
	if err := m.PutNetworkEndpoint(ctx, outside, block); err == nil {
		t.Errorf("an endpoint outside our block was published")
	}
	s, err := m.ListNetworks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Endpoints["foo"]; len(got) != 1 || got[0] != ep {
		t.Fatalf("endpoints = %+v, want %+v", got, ep)
	}
	if got := s.Blocks["foo"]; len(got) != 1 || got[0].Subnet != block.Subnet || got[0].PublicIP != hostIP(1) {
		t.Fatalf("blocks = %+v, want ours", got)
	}
	// The network is in use: rm marks it; the record stays.
	if removed, err := m.RemoveNetwork(ctx, "foo"); err != nil || removed {
		t.Fatalf("RemoveNetwork with a container on it = %v, %v; want marked, not removed", removed, err)
	}
	if s, _ := m.ListNetworks(ctx); !s.Networks["foo"].Removing {
		t.Errorf("record not marked Removing: %+v", s.Networks["foo"])
	}
	// Releasing the block (its etcd lease revoked) takes the endpoint with it.
	if err := m.ReleasePoolLease(ctx, foo.BlockPool(), block); err != nil {
		t.Fatal(err)
	}
	s, err = m.ListNetworks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Endpoints["foo"]) != 0 || len(s.Blocks["foo"]) != 0 {
		t.Errorf("after the block's release: blocks %v endpoints %v, want none", s.Blocks["foo"], s.Endpoints["foo"])
	}
	if removed, err := m.RemoveNetworkIfUnused(ctx, "foo", true); err != nil || !removed {
		t.Errorf("RemoveNetworkIfUnused once unused = %v, %v; want removed", removed, err)
	}
	if s, _ := m.ListNetworks(ctx); len(s.Networks) != 0 {
		t.Errorf("records left: %+v", s.Networks)
	}
}

func TestRemoveNetworkWithoutContainersDeletesItsBlocksAtOnce(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv, testPrefix(t), time.Hour)
	ctx := context.Background()
	foo := testNetwork("foo", "10.250.0.0/16")
	if _, err := m.CreateNetwork(ctx, foo); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		if _, err := m.AcquirePoolLease(ctx, foo.BlockPool(), vxlanAttrs(hostIP(i)), netip.Prefix{}); err != nil {
			t.Fatal(err)
		}
	}
	if removed, err := m.RemoveNetwork(ctx, "foo"); err != nil || !removed {
		t.Fatalf("RemoveNetwork = %v, %v", removed, err)
	}
	resp, err := srv.Client().Get(ctx, testPrefix(t)+"/network", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Errorf("%d keys left under %s/network*", resp.Count, testPrefix(t))
	}
}

func TestWatchNetworksSendsEveryChangeAndSkipsGarbage(t *testing.T) {
	srv := etcdtest.Start(t)
	prefix := testPrefix(t)
	m, logs := newTestManager(t, srv, prefix, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := make(chan NetworkState, 1)
	done := make(chan error, 1)
	go func() { done <- m.WatchNetworks(ctx, out) }()
	wait := func(desc string, ok func(NetworkState) bool) NetworkState {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case s := <-out:
				if ok(s) {
					return s
				}
			case <-deadline:
				t.Fatalf("no state where %s after 5 s", desc)
			}
		}
	}
	wait("nothing exists", func(s NetworkState) bool { return len(s.Networks) == 0 })
	if _, err := srv.Client().Put(ctx, NetworkKey(prefix, "junk"), "{not json"); err != nil {
		t.Fatal(err)
	}
	foo := testNetwork("foo", "10.250.0.0/16")
	if _, err := m.CreateNetwork(ctx, foo); err != nil {
		t.Fatal(err)
	}
	wait("foo exists", func(s NetworkState) bool { return s.Networks["foo"].Same(foo) })
	block, err := m.AcquirePoolLease(ctx, foo.BlockPool(), vxlanAttrs(hostIP(2)), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	wait("foo has a block", func(s NetworkState) bool {
		return len(s.Blocks["foo"]) == 1 && s.Blocks["foo"][0].Subnet == block.Subnet
	})
	if removed, err := m.RemoveNetwork(ctx, "foo"); err != nil || !removed {
		t.Fatal(removed, err)
	}
	s := wait("foo is gone", func(s NetworkState) bool { return len(s.Networks) == 0 && len(s.Blocks) == 0 })
	if _, ok := s.Networks["junk"]; ok {
		t.Errorf("a malformed record made it into the state")
	}
	if !strings.Contains(logs.String(), "junk") {
		t.Errorf("the malformed record was not logged:\n%s", logs)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("WatchNetworks returned %v after cancel", err)
	}
}
