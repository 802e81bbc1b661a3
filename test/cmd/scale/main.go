// Command scale measures xnet's control plane at the size where users outgrow flannel, against
// a real embedded etcd (the harness's) with simulated nodes: leases written directly, watchers
// as goroutines. It measures, it asserts nothing (docs/design.md targets are printed next to each
// figure):
//
//  1. start: with -leases leases (5,000) in etcd, a new xnetd (the real binary, ebpf backend,
//     on a harness host) from exec to every lease in its pinned BPF routes map.
//  2. propagation: -watchers goroutine watchers (50), each a subnetmgr.Manager with its own etcd
//     connection applying WatchLeases events to its own BPF routes map the way the ebpf backend
//     does (maps.PutRoute / DeleteRoute), and -changes lease changes (1,000) written one at a
//     time: time from the writer's Put to the route in each watcher's map, p50/p99/max. The
//     xnetd from step 1 watches too; its latency is read from its log (millisecond stamps).
//  3. steady state: -nodes nodes (50) each holding a lease with subnetmgr.KeepLease and a
//     WatchLeases, etcd requests counted on the server (gRPC started counters) for -window:
//     requests per node per minute, with the daemon's lease TTL (24 h) and, to show the
//     count follows renewals, with -short-ttl.
//
// Run as root (network namespaces, BPF): go run ./test/cmd/scale, or make bench-scale.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

const prefix = subnetmgr.DefaultPrefix

// config is a /8 cut into /24s: room for 65,000 hosts.
const config = `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`

type options struct {
	leases, watchers, changes, nodes int
	window, shortTTL                 time.Duration
	changeEvery                      time.Duration
}

func main() {
	var o options
	flag.IntVar(&o.leases, "leases", 5000, "leases present when the new xnetd starts")
	flag.IntVar(&o.watchers, "watchers", 50, "goroutine watchers for the propagation measurement")
	flag.IntVar(&o.changes, "changes", 1000, "lease changes written during the propagation measurement")
	flag.DurationVar(&o.changeEvery, "change-every", 10*time.Millisecond, "pause between two lease changes")
	flag.IntVar(&o.nodes, "nodes", 50, "simulated nodes for the steady-state request count")
	flag.DurationVar(&o.window, "window", time.Minute, "steady-state measurement window")
	flag.DurationVar(&o.shortTTL, "short-ttl", 20*time.Second, "second steady-state run with this lease TTL (0 skips it)")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces and BPF)")
	}
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	topo, err := harness.New(ctx, harness.Options{Hosts: 1, WithEtcd: true, Logger: log})
	if err != nil {
		return err
	}
	defer topo.Close()
	cli := topo.EtcdClient()
	if _, err := cli.Put(ctx, subnetmgr.ConfigKey(prefix), config); err != nil {
		return err
	}
	fmt.Printf("xnet scale measurements, %s, %d CPUs\n\n", time.Now().Format(time.RFC3339), cpus())

	dir, err := os.MkdirTemp("", "xnet-scale-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin, err := harness.Build(ctx, dir)
	if err != nil {
		return err
	}

	// 1. A new xnetd with o.leases peers.
	if err := writeLeases(ctx, cli, 0, o.leases); err != nil {
		return err
	}
	h := topo.Hosts()[0]
	start := time.Now()
	proc, err := h.StartXnetd(bin, "--backend=ebpf", "--etcd-prefix", prefix)
	if err != nil {
		return err
	}
	defer proc.Stop()
	var all time.Duration
	for {
		if n := routeCount(h.BPFFS); n >= o.leases {
			all = time.Since(start)
			break
		}
		if proc.Exited() || time.Since(start) > 2*time.Minute {
			return fmt.Errorf("xnetd did not program %d routes:\n%s", o.leases, proc.Output())
		}
		time.Sleep(5 * time.Millisecond)
	}
	readyTook := regexp.MustCompile(`ready" peers=(\d+) .*took=(\S+)`).FindStringSubmatch(proc.Output())
	fmt.Printf("1. new xnetd, %d leases in etcd (target: all in its BPF maps in under 1 s)\n", o.leases)
	fmt.Printf("   exec to all %d routes in the pinned map: %v\n", o.leases, all.Round(time.Millisecond))
	if readyTook != nil {
		fmt.Printf("   xnetd's own log: ready with %s peers, took=%s (from its start to READY)\n", readyTook[1], readyTook[2])
	}
	fmt.Println()

	// 2. Propagation to o.watchers watchers plus that xnetd.
	if err := propagation(ctx, topo, o, proc, h); err != nil {
		return err
	}

	// 3. Steady state.
	for _, ttl := range []time.Duration{subnetmgr.DefaultLeaseTTL, o.shortTTL} {
		if ttl <= 0 {
			continue
		}
		if err := steady(ctx, topo, o, ttl); err != nil {
			return err
		}
	}
	return nil
}

func cpus() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "\nprocessor") + 1
}

// leaseOf is simulated node i: subnet 10.(i/256+1).(i%256).0/24 and PublicIP
// 198.19.(i/250).(i%250+1) (198.20.x for i >= 62,500 is never needed here).
func subnetOf(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i/256 + 1), byte(i % 256), 0}), 24)
}

func ipOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 19, byte(i / 250), byte(i%250 + 1)})
}

func leaseValue(ip netip.Addr) (string, error) {
	data, err := backend.VXLANLeaseData(1, ip)
	if err != nil {
		return "", err
	}
	v, err := subnetmgr.EncodeLeaseValue(subnetmgr.LeaseAttrs{PublicIP: ip, BackendType: subnetmgr.BackendVXLAN, BackendData: data})
	return string(v), err
}

// writeLeases writes simulated nodes [from, from+n) on one shared etcd lease, 100 per txn.
func writeLeases(ctx context.Context, cli *clientv3.Client, from, n int) error {
	g, err := cli.Grant(ctx, int64(subnetmgr.DefaultLeaseTTL/time.Second))
	if err != nil {
		return err
	}
	for i := from; i < from+n; i += 100 {
		var ops []clientv3.Op
		for j := i; j < min(i+100, from+n); j++ {
			v, err := leaseValue(ipOf(j))
			if err != nil {
				return err
			}
			ops = append(ops, clientv3.OpPut(subnetmgr.SubnetKey(prefix, subnetOf(j)), v, clientv3.WithLease(g.ID)))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("write leases %d..: %w", i, err)
		}
	}
	return nil
}

func routeCount(dir string) int {
	m, err := maps.OpenPinned(dir)
	if err != nil {
		return 0
	}
	defer m.Close()
	r, err := m.ListRoutes()
	if err != nil {
		return 0
	}
	return len(r)
}

// watcher is one goroutine node: its own Manager (etcd connection) and its own BPF maps.
type watcher struct {
	mgr  *subnetmgr.Manager
	ld   *loader.Loader
	m    *maps.Maps
	mu   sync.Mutex
	seen map[netip.Prefix]time.Time // when each subnet's route went into the map
	err  error
}

func (w *watcher) run(ctx context.Context, log *slog.Logger) {
	events := make(chan []subnetmgr.Event, 16)
	go func() { _ = w.mgr.WatchLeases(ctx, events) }()
	for {
		select {
		case <-ctx.Done():
			return
		case batch := <-events:
			for _, ev := range batch {
				var err error
				switch ev.Type {
				case subnetmgr.EventAdded, subnetmgr.EventChanged:
					var p backend.VXLANPeer
					if p, err = backend.ParseVXLANPeer(ev.Lease, 1, log); err == nil {
						err = w.m.PutRoute(maps.Route{Subnet: p.Subnet, PublicIP: p.PublicIP, VtepMAC: p.VtepMAC})
					}
				case subnetmgr.EventRemoved:
					err = w.m.DeleteRoute(ev.Lease.Subnet)
				}
				now := time.Now()
				w.mu.Lock()
				if err != nil && w.err == nil {
					w.err = err
				}
				if ev.Type != subnetmgr.EventRemoved {
					w.seen[ev.Lease.Subnet] = now
				}
				w.mu.Unlock()
			}
		}
	}
}

func propagation(ctx context.Context, topo *harness.Topology, o options, xnetd *harness.Process, h *harness.Host) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var ws []*watcher
	for i := range o.watchers {
		mgr, err := subnetmgr.New(subnetmgr.Options{Endpoints: []string{topo.EtcdLoopbackEndpoint()}, Prefix: prefix, Logger: log})
		if err != nil {
			return err
		}
		defer mgr.Close()
		ld, err := loader.Load(loader.Options{Dir: filepath.Join(h.BPFFS, fmt.Sprintf("w%d", i)), Logger: log})
		if err != nil {
			return fmt.Errorf("watcher %d maps: %w", i, err)
		}
		defer ld.Close()
		w := &watcher{mgr: mgr, ld: ld, m: ld.Maps(), seen: map[netip.Prefix]time.Time{}}
		ws = append(ws, w)
		go w.run(wctx, log)
	}
	// Every watcher has the initial list (the step-1 leases) before the clock starts.
	deadline := time.Now().Add(2 * time.Minute)
	for _, w := range ws {
		for {
			w.mu.Lock()
			n := len(w.seen)
			w.mu.Unlock()
			if n >= o.leases {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("watcher has %d of %d initial leases after 2 minutes", n, o.leases)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	cli := topo.EtcdClient()
	logFrom := len(xnetd.Output())
	written, err := writeChanges(ctx, cli, o.leases+1000, o.changes, o.changeEvery)
	if err != nil {
		return err
	}
	var lat []time.Duration
	missing := 0
	for _, w := range ws {
		w.mu.Lock()
		if w.err != nil {
			w.mu.Unlock()
			return fmt.Errorf("watcher: %w", w.err)
		}
		for s, at := range written {
			if got, ok := w.seen[s]; ok {
				lat = append(lat, got.Sub(at))
			} else {
				missing++
			}
		}
		w.mu.Unlock()
	}
	fmt.Printf("2. %d lease changes (one every %v) seen by %d goroutine watchers (target: p99 < 100 ms)\n", o.changes, o.changeEvery, o.watchers)
	fmt.Printf("   etcd Put to route in each watcher's BPF map: %s; %d of %d had not arrived 2 s after the last Put\n", quantiles(lat), missing, o.changes*o.watchers)
	// The real daemon watched too: its "lease added" lines carry millisecond timestamps.
	xl := xnetdLatencies(xnetd.Output()[logFrom:], written)
	fmt.Printf("   the same changes in the xnetd of step 1 (%d peers; from its log, ms resolution): %s; %d of %d logged 2 s after the last Put\n",
		o.leases, quantiles(xl), len(xl), o.changes)

	// The daemon alone, with the goroutine watchers gone.
	cancel()
	time.Sleep(time.Second)
	logFrom = len(xnetd.Output())
	n := o.changes / 5
	written, err = writeChanges(ctx, cli, o.leases+1000+o.changes, n, o.changeEvery)
	if err != nil {
		return err
	}
	xl = xnetdLatencies(xnetd.Output()[logFrom:], written)
	fmt.Printf("   %d more changes with only that xnetd watching: %s; %d of %d logged 2 s after the last Put\n\n", n, quantiles(xl), len(xl), n)
	return nil
}

// writeChanges adds n simulated nodes from index base, one Put every pause, waits 2 s for
// the watchers, and returns when each Put was started.
func writeChanges(ctx context.Context, cli *clientv3.Client, base, n int, pause time.Duration) (map[netip.Prefix]time.Time, error) {
	g, err := cli.Grant(ctx, int64(subnetmgr.DefaultLeaseTTL/time.Second))
	if err != nil {
		return nil, err
	}
	written := map[netip.Prefix]time.Time{}
	for i := range n {
		s := subnetOf(base + i)
		v, err := leaseValue(ipOf(base + i))
		if err != nil {
			return nil, err
		}
		written[s] = time.Now()
		if _, err := cli.Put(ctx, subnetmgr.SubnetKey(prefix, s), v, clientv3.WithLease(g.ID)); err != nil {
			return nil, err
		}
		time.Sleep(pause)
	}
	time.Sleep(2 * time.Second)
	return written, nil
}

func quantiles(d []time.Duration) string {
	if len(d) == 0 {
		return "no samples"
	}
	slices.Sort(d)
	q := func(p float64) time.Duration {
		return d[min(len(d)-1, int(p*float64(len(d))))].Round(10 * time.Microsecond)
	}
	return fmt.Sprintf("p50 %v, p99 %v, max %v (%d samples)", q(0.50), q(0.99), d[len(d)-1].Round(10*time.Microsecond), len(d))
}

var leaseAdded = regexp.MustCompile(`^time=(\S+) level=INFO msg="lease added" subnet=(\S+) `)

func xnetdLatencies(out string, written map[netip.Prefix]time.Time) []time.Duration {
	var lat []time.Duration
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		m := leaseAdded.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		at, err := time.Parse("2006-01-02T15:04:05.000Z07:00", m[1])
		s, err2 := netip.ParsePrefix(m[2])
		if err != nil || err2 != nil {
			continue
		}
		if w, ok := written[s]; ok {
			// The log stamp is truncated to the millisecond: add half of one.
			lat = append(lat, at.Add(500*time.Microsecond).Sub(w))
		}
	}
	return lat
}

// steady runs o.nodes nodes holding leases of ttl for o.window and counts the etcd requests
// the server starts meanwhile, by method.
func steady(ctx context.Context, topo *harness.Topology, o options, ttl time.Duration) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cfg, err := subnetmgr.ParseConfig([]byte(config))
	if err != nil {
		return err
	}
	margin := 60 * time.Minute // xnetd's default --subnet-lease-renew-margin
	if margin >= ttl {
		margin = ttl / 2
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i := range o.nodes {
		mgr, err := subnetmgr.New(subnetmgr.Options{Endpoints: []string{topo.EtcdLoopbackEndpoint()}, Prefix: prefix,
			Logger: log, LeaseTTL: ttl})
		if err != nil {
			return err
		}
		defer mgr.Close()
		ip := netip.AddrFrom4([4]byte{198, 18, 1 + byte(i/250), byte(i%250 + 1)})
		data, _ := backend.VXLANLeaseData(1, ip)
		attrs := subnetmgr.LeaseAttrs{PublicIP: ip, BackendType: subnetmgr.BackendVXLAN, BackendData: data}
		l, err := mgr.AcquireLease(ctx, cfg, attrs, netip.Prefix{})
		if err != nil {
			return err
		}
		wg.Go(func() { _ = mgr.KeepLease(nctx, cfg, attrs, l, margin, nil) })
		events := make(chan []subnetmgr.Event, 1)
		wg.Go(func() { _ = mgr.WatchLeases(nctx, events) })
		wg.Go(func() {
			for {
				select {
				case <-nctx.Done():
					return
				case <-events:
				}
			}
		})
	}
	time.Sleep(5 * time.Second) // startup requests (acquire, list) settle
	before, err := grpcStarted()
	if err != nil {
		return err
	}
	time.Sleep(o.window)
	after, err := grpcStarted()
	if err != nil {
		return err
	}
	total := 0
	var parts []string
	for method, n := range after {
		if d := n - before[method]; d > 0 {
			total += int(d)
			parts = append(parts, fmt.Sprintf("%s %d", method, int(d)))
		}
	}
	slices.Sort(parts)
	perNodeMin := float64(total) / float64(o.nodes) / o.window.Minutes()
	fmt.Printf("3. steady state, %d nodes, lease TTL %v, renew margin %v, %v window\n", o.nodes, ttl, margin, o.window)
	fmt.Printf("   etcd requests started: %d (%s) = %.3f per node per minute\n", total, strings.Join(parts, ", "), perNodeMin)
	fmt.Printf("   expected from renewals alone (1 Range + 1 LeaseKeepAlive per %v): %.4f per node per minute\n\n",
		ttl-margin, 2/(ttl-margin).Minutes())
	return nil
}

// grpcStarted reads the embedded etcd's gRPC server counters (it registers them with the
// default Prometheus registry): requests and streams started, by method.
func grpcStarted() (map[string]float64, error) {
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "grpc_server_started_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			var method string
			for _, l := range m.GetLabel() {
				if l.GetName() == "grpc_method" {
					method = l.GetValue()
				}
			}
			out[method] += m.GetCounter().GetValue()
		}
		return out, nil
	}
	return nil, errors.New("no grpc_server_started_total in the default Prometheus registry: etcd's gRPC metrics are not there")
}
