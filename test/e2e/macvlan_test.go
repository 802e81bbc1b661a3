package e2e

import (
	"context"
	"fmt"
	"log/slog"
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
	"github.com/xnet-dev/xnet/test/harness"
)

// mvConfig puts the containers straight on the underlay LAN, as the seed tutorial's macvlan
// section does: the underlay subnet with its bridge as the router. /29 ranges from .8 make the
// first candidate, 198.18.0.8/29, cover the hosts' own addresses .11-.13: a host must skip it.
const mvConfig = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},
 "Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":29,"RangeMin":"198.18.0.8","RangeMax":"198.18.0.32"}}`

// mvNode is one host leasing its macvlan range the way xnetd does (macvlan.Manager against the
// topology's etcd), and its containers.
type mvNode struct {
	host       *harness.Host
	mgr        *macvlan.Manager
	file       string
	opts       macvlan.OptionsFile
	containers []mvContainer
}

type mvContainer struct {
	ns *harness.Namespace
	ip netip.Addr
}

// mvManager connects a macvlan manager for host h to the topology's etcd, with h's underlay
// address as its PublicIP and eth0 as parent, and its options file in the host's state dir.
func mvManager(t *testing.T, topo *harness.Topology, h *harness.Host) (*macvlan.Manager, string) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(dpLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("host", h.Name)
	sm, err := subnetmgr.New(subnetmgr.Options{Endpoints: []string{topo.EtcdLoopbackEndpoint()}, Logger: log,
		RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sm.Close() })
	cfg, _, err := macvlan.Load(t.Context(), sm, true)
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	file := filepath.Join(h.StateDir, "macvlan")
	m, err := macvlan.New(sm, macvlan.Options{Config: cfg, PublicIP: h.UnderlayIP, Parent: "eth0", File: file,
		RenewMargin: time.Hour, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	return m, file
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

func TestMacvlanContainersOnThreeHostsGetDisjointRangesAndReachEachOther(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true})
	cli := topo.EtcdClient()
	if _, err := cli.Put(t.Context(), subnetmgr.ConfigKey(subnetmgr.DefaultPrefix), mvConfig); err != nil {
		t.Fatal(err)
	}

	// Every host leases at the same moment: the race the create-only transaction settles.
	nodes := make([]*mvNode, len(topo.Hosts()))
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, h := range topo.Hosts() {
		m, file := mvManager(t, topo, h)
		nodes[i] = &mvNode{host: h, mgr: m, file: file}
		wg.Go(func() { _, errs[i] = m.Acquire(t.Context()) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", nodes[i].host.Name, err)
		}
	}

	// The options file is the contract with Docker: read it as a host's setup would.
	hostAddrs := []netip.Addr{harness.UnderlayGateway}
	for _, n := range nodes {
		hostAddrs = append(hostAddrs, n.host.UnderlayIP)
	}
	for _, n := range nodes {
		var err error
		if n.opts, err = macvlan.ReadOptionsFile(n.file); err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(n.file)
		want := fmt.Sprintf(`DOCKER_MACVLAN_OPTIONS="-d macvlan --subnet=198.18.0.0/24 --gateway=198.18.0.1 --ip-range=%s -o parent=eth0 xnet-macvlan"`, n.opts.Range)
		if !strings.Contains(string(data), want) {
			t.Errorf("%s: options file\n%s\nlacks %s", n.host.Name, data, want)
		}
		if n.opts.Range != n.mgr.Lease().Subnet {
			t.Errorf("%s: the file says %v, the lease %v", n.host.Name, n.opts.Range, n.mgr.Lease().Subnet)
		}
		for _, a := range hostAddrs {
			if n.opts.Range.Contains(a) {
				t.Errorf("%s: range %v covers %v, a host's or the gateway's address", n.host.Name, n.opts.Range, a)
			}
		}
	}
	t.Run("no two hosts' ranges overlap, in the files and in etcd", func(t *testing.T) {
		for i, a := range nodes {
			for _, b := range nodes[i+1:] {
				if a.opts.Range.Overlaps(b.opts.Range) {
					t.Errorf("%s holds %v and %s holds %v", a.host.Name, a.opts.Range, b.host.Name, b.opts.Range)
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
		for _, kv := range resp.Kvs {
			t.Logf("%s = %s", kv.Key, kv.Value)
		}
	})

	// Containers take their addresses from the host's range as Docker's IPAM would: h1 runs
	// two (so two containers of one host meet on the same parent), the others one each.
	var all []mvContainer
	for _, n := range nodes {
		count := 1
		if n.host.Index == 0 {
			count = 2
		}
		cfg, _, err := macvlan.ParseConfig([]byte(mvConfig))
		if err != nil {
			t.Fatal(err)
		}
		for i, a := range cfg.Addresses(n.opts.Range, count) {
			c := mvAddContainer(t, topo, n.host, i+1, a, n.opts)
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

	t.Run("a restarted host gets its range back", func(t *testing.T) {
		n := nodes[1]
		m, _ := mvManager(t, topo, n.host)
		l, err := m.Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet != n.opts.Range {
			t.Errorf("%s restarted onto %v, want its range %v: its containers' addresses would move", n.host.Name, l.Subnet, n.opts.Range)
		}
	})
}
