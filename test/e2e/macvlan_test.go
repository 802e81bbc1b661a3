package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/macvlan"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// mvConfig puts the containers straight on the underlay LAN, as the seed tutorial's macvlan
// section does: the underlay subnet with its bridge as the router. /29 ranges from .8 make the
// first candidate, 198.18.0.8/29, cover the hosts' own addresses .11-.13: a host must skip it.
const mvConfig = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},
 "Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":29,"RangeMin":"198.18.0.8","RangeMax":"198.18.0.32"}}`

// mvNode is one host running xnetd with --macvlan, its options file and its containers.
type mvNode struct {
	*xnetdtest.Node
	file       string
	opts       macvlan.OptionsFile
	containers []mvContainer
}

type mvContainer struct {
	ns *harness.Namespace
	ip netip.Addr
}

// mvStatus is the macvlan part of `xnetd status --output json`.
type mvStatus struct {
	Running bool `json:"running"`
	Macvlan *struct {
		Name       string       `json:"name"`
		Subnet     netip.Prefix `json:"subnet"`
		Gateway    netip.Addr   `json:"gateway"`
		Range      netip.Prefix `json:"range"`
		Parent     string       `json:"parent"`
		Addresses  int          `json:"addresses"`
		File       string       `json:"file"`
		Expiration time.Time    `json:"expiration"`
	} `json:"macvlan"`
}

// mvAddContainer plays `docker run --network <macvlan net>`: a macvlan interface in bridge
// mode on the host's eth0, moved into a new namespace as its eth0, with addr and a default
// route via the gateway. The namespace is named like the harness's (xn-<id>-...), so the
// topology's cleanup also removes it if this test's cleanup does not run.
func mvAddContainer(t *testing.T, topo *harness.Topology, h *harness.Host, n int, addr netip.Addr, f macvlan.OptionsFile) mvContainer {
	t.Helper()
	ctx := t.Context()
	ns := &harness.Namespace{Name: fmt.Sprintf("xn-%s-%sm%d", topo.ID(), h.Name, n)}
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", ns.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns.Name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns.Name).Run() })
	link := fmt.Sprintf("mv%s%d", topo.ID(), n) // <= 11 characters, unique in the host
	if err := h.IP(ctx,
		fmt.Sprintf("link add link %s name %s type macvlan mode bridge", f.Parent, link),
		fmt.Sprintf("link set %s netns %s", link, ns.Name)); err != nil {
		t.Fatal(err)
	}
	if err := ns.IP(ctx,
		"link set lo up",
		fmt.Sprintf("link set %s name eth0", link),
		fmt.Sprintf("addr add %s/%d dev eth0", addr, f.Subnet.Bits()),
		"link set eth0 up",
		fmt.Sprintf("route add default via %s dev eth0", f.Gateway)); err != nil {
		t.Fatal(err)
	}
	return mvContainer{ns: ns, ip: addr}
}

// Three hosts run xnetd --macvlan at the same moment (the race the create-only transaction
// settles), each with its options file in its state dir; a host's setup would then be
// `docker network create $DOCKER_MACVLAN_OPTIONS`, which the test plays.
func TestMacvlanContainersOnThreeHostsGetDisjointRangesAndReachEachOther(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true})
	cli := topo.EtcdClient()
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), mvConfig)
	bin := harness.BuildXnetd(t)

	nodes := make([]*mvNode, len(topo.Hosts()))
	for i, h := range topo.Hosts() {
		file := filepath.Join(h.StateDir, "macvlan")
		nodes[i] = &mvNode{Node: &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--macvlan", "--macvlan-file", file}}, file: file}
		nodes[i].StartDaemon(t)
	}
	for _, n := range nodes {
		n.WaitReady(t)
	}

	// The options file is the contract with Docker: read it as a host's setup would.
	hostAddrs := []netip.Addr{harness.UnderlayGateway}
	for _, n := range nodes {
		hostAddrs = append(hostAddrs, n.UnderlayIP)
	}
	for _, n := range nodes {
		var err error
		if n.opts, err = macvlan.ReadOptionsFile(n.file); err != nil {
			t.Fatalf("%s: %v\n%s", n.Name, err, n.Proc.Output())
		}
		data, _ := os.ReadFile(n.file)
		want := fmt.Sprintf(`DOCKER_MACVLAN_OPTIONS="-d macvlan --subnet=198.18.0.0/24 --gateway=198.18.0.1 --ip-range=%s -o parent=eth0 xnet-macvlan"`, n.opts.Range)
		if !strings.Contains(string(data), want) {
			t.Errorf("%s: options file\n%s\nlacks %s", n.Name, data, want)
		}
		for _, a := range hostAddrs {
			if n.opts.Range.Contains(a) {
				t.Errorf("%s: range %v covers %v, a host's or the gateway's address", n.Name, n.opts.Range, a)
			}
		}
	}

	t.Run("status --output json shows the range next to the overlay lease", func(t *testing.T) {
		for _, n := range nodes {
			var s mvStatus
			n.StatusInto(t, &s)
			mv := s.Macvlan
			if mv == nil {
				t.Errorf("%s: status has no macvlan section", n.Name)
				continue
			}
			// A /29 holds 8 addresses; none of ours is the subnet's network, broadcast or gateway.
			if !s.Running || mv.Range != n.opts.Range || mv.Subnet.String() != "198.18.0.0/24" || mv.Gateway != harness.UnderlayGateway ||
				mv.Parent != "eth0" || mv.Name != "xnet-macvlan" || mv.File != n.file || mv.Addresses != 8 ||
				time.Until(mv.Expiration) < 23*time.Hour {
				t.Errorf("%s: status macvlan %+v (running %v), want range %v of 198.18.0.0/24 via %v, parent eth0, 8 addresses, file %s, expiring in ~24h",
					n.Name, *mv, s.Running, n.opts.Range, harness.UnderlayGateway, n.file)
			}
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		out, err := nodes[0].Run(ctx, bin, "status", "--subnet-file", nodes[0].SubnetFile())
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("macvlan:  %v of 198.18.0.0/24, gateway 198.18.0.1, parent eth0, network xnet-macvlan, 8 addresses, expires", nodes[0].opts.Range); !strings.Contains(out, want) {
			t.Errorf("xnetd status lacks %q:\n%s", want, out)
		}
	})

	t.Run("no two hosts' ranges overlap, in the files and in etcd", func(t *testing.T) {
		for i, a := range nodes {
			for _, b := range nodes[i+1:] {
				if a.opts.Range.Overlaps(b.opts.Range) {
					t.Errorf("%s holds %v and %s holds %v", a.Name, a.opts.Range, b.Name, b.opts.Range)
				}
			}
		}
		resp, err := cli.Get(t.Context(), subnetmgr.PoolPrefix(subnetmgr.DefaultPrefix, macvlan.Dir), clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) != len(nodes) {
			t.Errorf("%d keys under %s, want one per host", len(resp.Kvs), subnetmgr.PoolPrefix(subnetmgr.DefaultPrefix, macvlan.Dir))
		}
		held := map[string]netip.Addr{}
		for _, kv := range resp.Kvs {
			t.Logf("%s = %s", kv.Key, kv.Value)
			attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
			if err != nil {
				t.Fatalf("%s: %v", kv.Key, err)
			}
			if kv.Lease == 0 {
				t.Errorf("%s has no TTL: a range must expire with its host", kv.Key)
			}
			held[string(kv.Key)] = attrs.PublicIP
		}
		for _, n := range nodes {
			key := subnetmgr.PoolKey(subnetmgr.DefaultPrefix, macvlan.Dir, n.opts.Range)
			if held[key] != n.UnderlayIP {
				t.Errorf("%s: %s is held by %v in etcd, want %v", n.Name, key, held[key], n.UnderlayIP)
			}
		}
	})

	// Containers take their addresses from the host's range as Docker's IPAM would: h1 runs
	// two (so two containers of one host meet on the same parent), the others one each.
	cfg, _, err := macvlan.ParseConfig([]byte(mvConfig))
	if err != nil {
		t.Fatal(err)
	}
	var all []mvContainer
	for _, n := range nodes {
		count := 1
		if n.Index == 0 {
			count = 2
		}
		for i, a := range cfg.Addresses(n.opts.Range, count) {
			c := mvAddContainer(t, topo, n.Host, i+1, a, n.opts)
			n.containers = append(n.containers, c)
			all = append(all, c)
		}
	}

	t.Run("every container reaches every other and the gateway", func(t *testing.T) {
		var mu sync.Mutex
		var wg sync.WaitGroup
		var failures []string
		for _, from := range all {
			targets := []netip.Addr{harness.UnderlayGateway}
			for _, to := range all {
				if to != from {
					targets = append(targets, to.ip)
				}
			}
			for _, to := range targets {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
					defer cancel()
					sent, got, err := harness.Ping(ctx, from.ns, to, 3, 50*time.Millisecond)
					if err != nil || got < sent {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("%v -> %v: %d of %d replies (%v)", from.ip, to, got, sent, err))
						mu.Unlock()
					}
				})
			}
		}
		wg.Wait()
		for _, f := range failures {
			t.Error(f)
		}
		// The control: an address no container holds answers nothing, so the replies above
		// came from the containers themselves.
		unused := nodes[2].opts.Range.Addr().Next().Next().Next().Next()
		if _, got, err := harness.Ping(t.Context(), all[0].ns, unused, 2, 50*time.Millisecond); err != nil || got != 0 {
			t.Errorf("%v, held by no container, answered %d pings (%v)", unused, got, err)
		}
	})

	t.Run("a restarted xnetd gets its range back, graceful or kill -9", func(t *testing.T) {
		n := nodes[1]
		for _, stop := range []struct {
			how string
			do  func() error
		}{{"SIGTERM", func() error { return n.Proc.Stop() }}, {"kill -9", func() error { return n.Proc.Kill() }}} {
			if err := stop.do(); err != nil {
				t.Fatalf("%s: %v", stop.how, err)
			}
			n.StartDaemon(t)
			n.WaitReady(t)
			var s mvStatus
			n.StatusInto(t, &s)
			if s.Macvlan == nil || s.Macvlan.Range != n.opts.Range {
				t.Errorf("%s restarted after %s onto %+v, want its range %v: its containers' addresses would collide", n.Name, stop.how, s.Macvlan, n.opts.Range)
			}
			if f, err := macvlan.ReadOptionsFile(n.file); err != nil || f.Range != n.opts.Range {
				t.Errorf("%s: options file after %s says %v (%v), want %v", n.Name, stop.how, f.Range, err, n.opts.Range)
			}
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		if sent, got, err := harness.Ping(ctx, all[0].ns, n.containers[0].ip, 3, 50*time.Millisecond); err != nil || got != sent {
			t.Errorf("ping %v -> %v after the restarts: %d/%d %v", all[0].ip, n.containers[0].ip, got, sent, err)
		}
	})

	t.Run("teardown removes the options file and leaves the range to expire", func(t *testing.T) {
		n := nodes[2]
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		n.Teardown(t, topo)
		if _, err := os.Stat(n.file); err == nil {
			t.Errorf("%s still exists after teardown", n.file)
		}
		resp, err := cli.Get(t.Context(), subnetmgr.PoolKey(subnetmgr.DefaultPrefix, macvlan.Dir, n.opts.Range))
		if err != nil || len(resp.Kvs) != 1 {
			t.Errorf("range %v not in etcd after teardown (%v): teardown must leave it to expire", n.opts.Range, err)
		}
	})
}
