package e2e

// End to end tests of the xnetd binary as an operator runs it: hosts in network namespaces, a
// real etcd, real datapaths. Helpers here are prefixed xd so they do not collide with the
// datapath tests' helpers in this package.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

const xdPrefix = subnetmgr.DefaultPrefix

// xdNode is one host running xnetd.
type xdNode struct {
	*harness.Host
	bin   string
	extra []string
	proc  *harness.Process

	// systemd plays systemd for this host's xnetd: its NOTIFY_SOCKET and its fd store,
	// which it passes to every restarted xnetd, as systemd does across restarts.
	systemd *harness.ServiceManager
}

// xdCluster builds a topology with etcd, writes config under the default prefix and starts
// xnetd on every host with extra flags, waiting until each reports ready.
func xdCluster(t *testing.T, hosts int, config string, extra ...string) ([]*xdNode, *harness.Topology) {
	t.Helper()
	return xdClusterOn(t, harness.Options{Hosts: hosts, WithEtcd: true}, config, extra...)
}

// xdClusterOn is xdCluster on a topology built with opts (opts.Hosts hosts, etcd included).
func xdClusterOn(t *testing.T, opts harness.Options, config string, extra ...string) ([]*xdNode, *harness.Topology) {
	t.Helper()
	opts.WithEtcd = true
	topo := harness.NewForTest(t, opts)
	return xdStart(t, topo, config, extra...), topo
}

// xdStart runs xnetd with config on every host of topo (built WithEtcd) and waits until each
// lists the others as peers.
func xdStart(t *testing.T, topo *harness.Topology, config string, extra ...string) []*xdNode {
	t.Helper()
	hosts := len(topo.Hosts())
	xdPut(t, topo, subnetmgr.ConfigKey(xdPrefix), config)
	bin := harness.BuildXnetd(t)
	// One after the other, so each host finds the earlier ones' leases at start.
	var nodes []*xdNode
	for _, h := range topo.Hosts() {
		n := &xdNode{Host: h, bin: bin, extra: extra}
		n.start(t)
		n.waitReady(t)
		nodes = append(nodes, n)
	}
	// The earlier hosts learn of the later ones through their lease watch.
	for _, n := range nodes {
		n.waitPeers(t, hosts-1)
	}
	return nodes
}

// waitPeers waits until the daemon's state lists want peers.
func (n *xdNode) waitPeers(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := n.state(t)
		if len(s.Peers) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s knows %d peers after 10s, want %d: %+v", n.Name, len(s.Peers), want, s.Peers)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// listenNotify starts the service manager that plays systemd for this host's xnetd.
func (n *xdNode) listenNotify(t *testing.T) {
	t.Helper()
	m, err := harness.NewServiceManager()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	n.systemd = m
}

// notifications is what xnetd told systemd so far.
func (n *xdNode) notifications() []string { return n.systemd.Notifications() }

func xdPut(t *testing.T, topo *harness.Topology, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := topo.EtcdClient().Put(ctx, key, value); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

func (n *xdNode) start(t *testing.T) {
	t.Helper()
	if n.systemd == nil {
		n.listenNotify(t)
	}
	// As systemd restarts a service: with NOTIFY_SOCKET, and the fds stored by the process
	// before (the test's environment passes on, XNETD_* aside).
	p, err := n.StartXnetdUnder(n.systemd, n.bin, n.extra...)
	if err != nil {
		t.Fatal(err)
	}
	n.proc = p
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("xnetd on %s (pid %d) said:\n%s", n.Name, p.Pid, p.Output())
		}
	})
}

func (n *xdNode) stateFile() string { return filepath.Join(n.StateDir, "state.json") }

// xdState is the part of state.json the tests look at.
type xdState struct {
	PID         int    `json:"pid"`
	Ready       bool   `json:"ready"`
	MetricsAddr string `json:"metrics_addr"`
	Lease       struct {
		Subnet     netip.Prefix `json:"subnet"`
		IPv6Subnet netip.Prefix `json:"ipv6_subnet"` // dual stack only
	} `json:"lease"`
	Peers []struct {
		Subnet netip.Prefix `json:"subnet"`
	} `json:"peers"`
}

func (n *xdNode) state(t *testing.T) xdState {
	t.Helper()
	data, err := os.ReadFile(n.stateFile())
	if err != nil {
		t.Fatalf("%s: %v", n.Name, err)
	}
	var s xdState
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatalf("%s: state file: %v", n.Name, err)
	}
	return s
}

// waitReady waits until this process (not an earlier one) recorded ready in its state file.
func (n *xdNode) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if data, err := os.ReadFile(n.stateFile()); err == nil {
			var s xdState
			if json.Unmarshal(data, &s) == nil && s.PID == n.proc.Pid && s.Ready {
				return
			}
		}
		if n.proc.Exited() {
			t.Fatalf("xnetd on %s exited before ready: %v\n%s", n.Name, n.proc.Wait(), n.proc.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("xnetd on %s not ready after 20s:\n%s", n.Name, n.proc.Output())
}

// xdStatus is `xnetd status --output json` as a user's script would read it.
type xdStatus struct {
	Running bool         `json:"running"`
	Daemon  string       `json:"daemon"`
	Ready   bool         `json:"ready"`
	Backend string       `json:"backend"`
	Network netip.Prefix `json:"network"`
	Lease   struct {
		Subnet     netip.Prefix `json:"subnet"`
		PublicIP   netip.Addr   `json:"public_ip"`
		Expiration time.Time    `json:"expiration"`
	} `json:"lease"`
	Peers []struct {
		Subnet    netip.Prefix `json:"subnet"`
		PublicIP  netip.Addr   `json:"public_ip"`
		VtepMAC   string       `json:"vtep_mac"`
		Route     string       `json:"route"`
		Error     string       `json:"error"`
		TxPackets *uint64      `json:"tx_packets"`
		// RemovalDue is set while the peer's lease is gone and its removal waits out the grace.
		RemovalDue time.Time `json:"removal_due"`
	} `json:"peers"`
	Counters string   `json:"counters"`
	Routes   []string `json:"routes"`
}

func (n *xdNode) status(t *testing.T) xdStatus {
	t.Helper()
	var s xdStatus
	n.statusInto(t, &s)
	return s
}

// statusInto runs `xnetd status --output json` in the host and decodes it into v.
func (n *xdNode) statusInto(t *testing.T, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.bin, "status", "--output", "json", "--subnet-file", n.SubnetFile())
	if err != nil {
		t.Fatalf("xnetd status on %s: %v", n.Name, err)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("xnetd status --output json on %s is not JSON: %v\n%s", n.Name, err, out)
	}
}

// xdParse parses a scrape with Prometheus' own text parser.
func xdParse(t *testing.T, body string) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

// httpGet fetches path from the daemon's metrics endpoint, which listens on the loopback of
// the host's namespace: the connection is dialled from inside it.
func (n *xdNode) httpGet(t *testing.T, path string) (int, string) {
	t.Helper()
	addr := n.state(t).MetricsAddr
	if addr == "" {
		t.Fatalf("%s: state file has no metrics_addr", n.Name)
	}
	var conn net.Conn
	if err := n.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	}); err != nil {
		t.Fatalf("%s: dial metrics %s: %v", n.Name, addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.0\r\nHost: %s\r\nAccept: text/plain\r\n\r\n", path, addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s: GET %s: %v", n.Name, path, err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := bufio.NewReader(resp.Body).WriteTo(&b); err != nil {
		t.Fatalf("%s: GET %s: %v", n.Name, path, err)
	}
	return resp.StatusCode, b.String()
}

func (n *xdNode) routeTo(t *testing.T, subnet netip.Prefix) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	family := "-4"
	if subnet.Addr().Is6() {
		family = "-6"
	}
	out, err := n.Run(ctx, "ip", family, "route", "show", subnet.String())
	if err != nil {
		t.Fatalf("%s: %v", n.Name, err)
	}
	return strings.TrimSpace(out)
}

// teardown runs `xnetd teardown` with the flags the daemon ran with, and checks what every
// backend leaves behind is gone: files, pins, routes into the overlay, xnet devices, the
// masquerade table. The lease stays in etcd (it expires by its TTL).
func (n *xdNode) teardown(t *testing.T, topo *harness.Topology) {
	t.Helper()
	subnet := n.state(t).Lease.Subnet
	// The operator's `systemctl stop xnetd` before the teardown: systemd closes the fds it
	// stored for the service (a restart keeps them).
	if n.systemd != nil {
		n.systemd.Flush()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.bin, append(append([]string{"teardown"}, n.XnetdArgs()...), n.extra...)...)
	if err != nil {
		t.Fatalf("xnetd teardown on %s: %v\n%s", n.Name, err, out)
	}
	t.Logf("xnetd teardown on %s:\n%s", n.Name, out)
	for _, f := range []string{n.SubnetFile(), n.DockerOptsFile(), n.stateFile()} {
		if _, err := os.Stat(f); err == nil {
			t.Errorf("%s still exists after teardown", f)
		}
	}
	entries, _ := os.ReadDir(n.BPFFS)
	for _, e := range entries {
		// The kernel's own iterators in the root of a bpffs mount are not pins of ours.
		if e.Name() != "maps.debug" && e.Name() != "progs.debug" {
			t.Errorf("pin %s left in %s after teardown", e.Name(), n.BPFFS)
		}
	}
	routes, _ := n.Run(ctx, "ip", "-4", "route", "show", "root", "10.244.0.0/16")
	for _, r := range strings.Split(strings.TrimSpace(routes), "\n") {
		// docker0's own subnet route is Docker's, not ours.
		if r != "" && !strings.Contains(r, "dev docker0 proto kernel") {
			t.Errorf("route into the overlay left after teardown: %s", r)
		}
	}
	if links, _ := n.Run(ctx, "ip", "-o", "link", "show"); strings.Contains(links, "xnet") {
		t.Errorf("xnet devices left after teardown:\n%s", links)
	}
	if _, err := n.Run(ctx, "nft", "list", "table", "ip", "xnet"); err == nil {
		t.Errorf("nftables table ip xnet left after teardown")
	}
	if _, ok := xdLeases(t, topo, xdPrefix)[subnet]; !ok {
		t.Errorf("teardown removed the lease %v from etcd; it must leave it to expire", subnet)
	}
}

// xdLeases reads every lease key from etcd.
func xdLeases(t *testing.T, topo *harness.Topology, prefix string) map[netip.Prefix]subnetmgr.LeaseAttrs {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := topo.EtcdClient().Get(ctx, subnetmgr.SubnetsPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[netip.Prefix]subnetmgr.LeaseAttrs{}
	for _, kv := range resp.Kvs {
		// By the lease's ID: its IPv4 subnet, its IPv6 one in an IPv6-only overlay.
		v4, v6, err := subnetmgr.ParseDualSubnetKey(prefix, string(kv.Key))
		if err != nil {
			t.Fatalf("key %s: %v", kv.Key, err)
		}
		subnet := subnetmgr.Lease{Subnet: v4, IPv6Subnet: v6}.ID()
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		if err != nil {
			t.Fatalf("key %s: %v", kv.Key, err)
		}
		if kv.Lease == 0 {
			t.Errorf("lease %s has no TTL: xnetd leases must expire", kv.Key)
		}
		out[subnet] = attrs
	}
	return out
}

// xdContainers plays Docker on every host from the subnet file xnetd wrote.
func xdContainers(t *testing.T, nodes []*xdNode) []*harness.Container {
	t.Helper()
	var cs []*harness.Container
	for _, n := range nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := n.SetupDocker0FromSubnetFile(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		c, err := n.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	return cs
}

// xdMesh pings every container from every other one, in parallel; it returns what failed.
func xdMesh(cs []*harness.Container) []string {
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, a := range cs {
		for _, b := range cs {
			if a == b {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				sent, got, err := harness.Ping(ctx, a.Namespace, b.IP, 3, 50*time.Millisecond)
				if err != nil || got != sent {
					mu.Lock()
					failed = append(failed, fmt.Sprintf("%s(%v) -> %s(%v): %d/%d replies %v", a.Host.Name, a.IP, b.Host.Name, b.IP, got, sent, err))
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	slices.Sort(failed)
	return failed
}

func TestXnetdOnThreeHostsConnectsTheirContainers(t *testing.T) {
	// The config names host-gw; xnetd takes it from etcd with no --backend.
	nodes, topo := xdCluster(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`)

	var leases map[netip.Prefix]subnetmgr.LeaseAttrs
	t.Run("each host holds one lease in etcd with its PublicIP", func(t *testing.T) {
		leases = xdLeases(t, topo, xdPrefix)
		if len(leases) != 3 {
			t.Fatalf("%d leases in etcd, want 3: %v", len(leases), leases)
		}
		for _, n := range nodes {
			subnet := n.state(t).Lease.Subnet
			attrs, ok := leases[subnet]
			if !ok || attrs.PublicIP != n.UnderlayIP || attrs.BackendType != subnetmgr.BackendHostGW {
				t.Errorf("%s: lease %v in etcd is %+v, want PublicIP %v BackendType host-gw", n.Name, subnet, attrs, n.UnderlayIP)
			}
		}
	})

	t.Run("systemd hears READY only once the datapath holds every peer", func(t *testing.T) {
		// The last host started after the two others held leases: its READY must count both.
		last := nodes[2]
		got := strings.Join(last.notifications(), "\n")
		want := fmt.Sprintf("READY=1\nSTATUS=ready: %v via host-gw, 2 peers", last.state(t).Lease.Subnet)
		if !strings.Contains(got, want) {
			t.Errorf("%s told systemd %q, want %q", last.Name, got, want)
		}
	})

	t.Run("subnet file and docker options match the lease", func(t *testing.T) {
		for _, n := range nodes {
			subnet := n.state(t).Lease.Subnet
			gw := netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
			env, err := os.ReadFile(n.SubnetFile())
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range []string{
				"XNET_NETWORK=10.244.0.0/16", "XNET_SUBNET=" + gw.String(), "XNET_MTU=1500", "XNET_IPMASQ=false",
				"FLANNEL_NETWORK=10.244.0.0/16", "FLANNEL_SUBNET=" + gw.String(), "FLANNEL_MTU=1500", "FLANNEL_IPMASQ=false",
			} {
				if !slices.Contains(strings.Split(string(env), "\n"), line) {
					t.Errorf("%s: %s lacks %q:\n%s", n.Name, n.SubnetFile(), line, env)
				}
			}
			docker, err := os.ReadFile(n.DockerOptsFile())
			if err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("DOCKER_NETWORK_OPTIONS=\" --bip=%s --ip-masq=true --mtu=1500\"\n", gw)
			if string(docker) != want {
				t.Errorf("%s: docker options %q, want %q", n.Name, docker, want)
			}
		}
	})

	cs := xdContainers(t, nodes)
	t.Run("containers on different hosts reach each other", func(t *testing.T) {
		if failed := xdMesh(cs); len(failed) > 0 {
			t.Errorf("pings lost:\n%s", strings.Join(failed, "\n"))
		}
	})

	t.Run("status --output json shows the lease, backend and every peer", func(t *testing.T) {
		s := nodes[0].status(t)
		if !s.Running || !s.Ready || s.Backend != subnetmgr.BackendHostGW || s.Network.String() != "10.244.0.0/16" {
			t.Errorf("status running=%v ready=%v backend=%q network=%v, want running, ready, host-gw, 10.244.0.0/16 (%s)", s.Running, s.Ready, s.Backend, s.Network, s.Daemon)
		}
		if s.Lease.Subnet != nodes[0].state(t).Lease.Subnet || s.Lease.PublicIP != nodes[0].UnderlayIP ||
			time.Until(s.Lease.Expiration) < 23*time.Hour {
			t.Errorf("status lease %+v, want %v public %v expiring in ~24h", s.Lease, nodes[0].state(t).Lease.Subnet, nodes[0].UnderlayIP)
		}
		if len(s.Peers) != 2 {
			t.Fatalf("status shows %d peers, want 2: %+v", len(s.Peers), s.Peers)
		}
		bySubnet := map[netip.Prefix]*xdNode{}
		for _, n := range nodes[1:] {
			bySubnet[n.state(t).Lease.Subnet] = n
		}
		for i, p := range s.Peers {
			peer := bySubnet[p.Subnet]
			if peer == nil {
				t.Errorf("peer %d: subnet %v is not another host's", i, p.Subnet)
				continue
			}
			want := fmt.Sprintf("%v via %v dev eth0", peer.state(t).Lease.Subnet, peer.UnderlayIP)
			if p.Subnet != peer.state(t).Lease.Subnet || p.PublicIP != peer.UnderlayIP || p.Route != want || p.Error != "" {
				t.Errorf("peer %d: %+v, want subnet %v public %v route %q", i, p, peer.state(t).Lease.Subnet, peer.UnderlayIP, want)
			}
		}
		if !strings.HasPrefix(s.Counters, "none:") {
			t.Errorf("counters %q: host-gw keeps none and status should say so", s.Counters)
		}
	})

	t.Run("metrics parse and describe the cluster; healthz is ready", func(t *testing.T) {
		n := nodes[0]
		if code, body := n.httpGet(t, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz: HTTP %d %q, want 200", code, body)
		}
		code, body := n.httpGet(t, "/metrics")
		if code != http.StatusOK {
			t.Fatalf("/metrics: HTTP %d", code)
		}
		fams := xdParse(t, body)
		for _, tt := range []struct {
			name   string
			labels map[string]string
			check  func(v float64) bool
			want   string
		}{
			{"xnet_leases_known", nil, func(v float64) bool { return v == 3 }, "3"},
			{"xnet_peers", nil, func(v float64) bool { return v == 2 }, "2"},
			{"xnet_ready", nil, func(v float64) bool { return v == 1 }, "1"},
			{"xnet_backend_info", map[string]string{"backend": "host-gw"}, func(v float64) bool { return v == 1 }, "1"},
			{"xnet_lease_expiry_timestamp_seconds", nil, func(v float64) bool {
				return v > float64(time.Now().Add(23*time.Hour).Unix()) && v < float64(time.Now().Add(25*time.Hour).Unix())
			}, "about now + 24h"},
			{"xnet_reconcile_duration_seconds", nil, func(v float64) bool { return v >= 1 }, ">= 1 observation"},
			{"xnet_etcd_errors_total", nil, func(v float64) bool { return v >= 0 }, "present"},
			{"xnet_watch_resyncs_total", nil, func(v float64) bool { return v == 0 }, "0"},
			{"xnet_lease_events_total", map[string]string{"type": "added"}, func(v float64) bool { return v >= 3 }, ">= 3"},
		} {
			v, ok := xdMetric(fams, tt.name, tt.labels)
			if !ok || !tt.check(v) {
				t.Errorf("%s%v = %v (present %v), want %s", tt.name, tt.labels, v, ok, tt.want)
			}
		}
		for name := range fams {
			if !strings.HasPrefix(name, "xnet_") {
				t.Errorf("metric %s is not prefixed xnet_", name)
			}
		}
	})

	t.Run("a running host whose lease is deleted takes it back at once", func(t *testing.T) {
		n := nodes[1]
		subnet := n.state(t).Lease.Subnet
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := topo.EtcdClient().Delete(ctx, subnetmgr.SubnetKey(xdPrefix, subnet)); err != nil {
			t.Fatal(err)
		}
		for {
			if attrs, ok := xdLeases(t, topo, xdPrefix)[subnet]; ok && attrs.PublicIP == n.UnderlayIP {
				break
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s did not take its lease %v back within 5s:\n%s", n.Name, subnet, n.proc.Output())
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s took its lease back %v after the delete", n.Name, time.Since(start).Round(time.Millisecond))
		for nodes[0].routeTo(t, subnet) == "" {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s has no route to %v again 5s after the delete", nodes[0].Name, subnet)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if sent, got, err := harness.Ping(ctx, cs[0].Namespace, cs[1].IP, 3, 50*time.Millisecond); err != nil || got != sent {
			t.Errorf("ping %s -> %s after the lease came back: %d/%d %v", nodes[0].Name, n.Name, got, sent, err)
		}
		if n.proc.Exited() {
			t.Errorf("xnetd on %s exited: %v", n.Name, n.proc.Wait())
		}
	})

	t.Run("a dead host's lease deleted in etcd leaves the other hosts' routes within seconds", func(t *testing.T) {
		gone := nodes[2]
		subnet := gone.state(t).Lease.Subnet
		if err := gone.proc.Kill(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := topo.EtcdClient().Delete(ctx, subnetmgr.SubnetKey(xdPrefix, subnet)); err != nil {
			t.Fatal(err)
		}
		// For a few seconds the peer stays, in case its lease comes back (a host re-creating
		// an expired lease after an etcd outage); status says so.
		for {
			var pending time.Time
			for _, p := range nodes[0].status(t).Peers {
				if p.Subnet == subnet {
					pending = p.RemovalDue
				}
			}
			if !pending.IsZero() {
				if d := pending.Sub(start); d < 2*time.Second || d > 5*time.Second {
					t.Errorf("status: %v leaves at %v, %v after the delete; want within 2-5 s", subnet, pending, d)
				}
				break
			}
			if time.Since(start) > 2500*time.Millisecond {
				t.Errorf("status never showed %v as pending removal after its lease was deleted", subnet)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		for _, n := range nodes[:2] {
			for n.routeTo(t, subnet) != "" {
				if time.Since(start) > 5*time.Second {
					t.Fatalf("%s still routes %v 5s after its lease was deleted: %s", n.Name, subnet, n.routeTo(t, subnet))
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		t.Logf("route to %v gone from both peers %v after the delete", subnet, time.Since(start).Round(time.Millisecond))
		// The other pair is untouched.
		if route := nodes[0].routeTo(t, nodes[1].state(t).Lease.Subnet); route == "" {
			t.Errorf("%s lost its route to %s too", nodes[0].Name, nodes[1].Name)
		}
		// The state file follows peer changes within a second (it is rewritten at most once
		// a second under churn).
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			s := nodes[0].status(t)
			if len(s.Peers) == 1 && s.Peers[0].Subnet == nodes[1].state(t).Lease.Subnet {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("status 2 s after the routes left shows peers %+v, want only %s's", s.Peers, nodes[1].Name)
				break
			}
		}
	})
}

func xdMetric(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	fam := fams[name]
	if fam == nil {
		return 0, false
	}
	for _, m := range fam.GetMetric() {
		match := true
		for k, v := range labels {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == k && l.GetValue() == v)
			}
			match = match && found
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// A restart, graceful or kill -9, keeps the subnet and the datapath: a ping every 50 ms
// across both restarts loses nothing. Between stop and start, status says the daemon is down
// and still shows the datapath.
func TestXnetdRestartKeepsTheSubnetAndLosesNoPacket(t *testing.T) {
	// The config says ebpf (auto) as a cluster would; these hosts pin vxlan, the kernel device.
	nodes, topo := xdCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`, "--backend=vxlan", "--ip-masq")
	cs := xdContainers(t, nodes)
	if failed := xdMesh(cs); len(failed) > 0 {
		t.Fatalf("no connectivity before the restarts:\n%s", strings.Join(failed, "\n"))
	}
	n := nodes[0]
	subnet := n.state(t).Lease.Subnet

	type pingResult struct{ sent, got int }
	done := make(chan pingResult, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		sent, got, _ := harness.Ping(ctx, cs[0].Namespace, cs[1].IP, 100, 50*time.Millisecond) // 5 s
		done <- pingResult{sent, got}
	}()
	time.Sleep(500 * time.Millisecond)

	// Graceful: SIGTERM, exit 0, datapath left in place.
	if err := n.proc.Stop(); err != nil {
		t.Errorf("xnetd on %s did not stop cleanly on SIGTERM: %v", n.Name, err)
	}
	if !strings.Contains(n.proc.Output(), "datapath and lease left in place") {
		t.Errorf("xnetd did not say it left the datapath in place:\n%s", n.proc.Output())
	}
	s := n.status(t)
	if s.Running || !strings.Contains(s.Daemon, "not running") || len(s.Peers) != 1 || s.Peers[0].Route == "" {
		t.Errorf("status of a stopped daemon: running=%v daemon=%q peers=%+v, want not running with the peer's kernel route", s.Running, s.Daemon, s.Peers)
	}
	n.start(t)
	n.waitReady(t)
	if got := n.state(t).Lease.Subnet; got != subnet {
		t.Errorf("subnet after graceful restart %v, want %v", got, subnet)
	}
	time.Sleep(500 * time.Millisecond)

	// Crash: SIGKILL, no chance to clean up.
	if err := n.proc.Kill(); err != nil {
		t.Errorf("kill -9: %v", err)
	}
	n.start(t)
	n.waitReady(t)
	if got := n.state(t).Lease.Subnet; got != subnet {
		t.Errorf("subnet after kill -9 and restart %v, want %v", got, subnet)
	}

	r := <-done
	if r.sent < 90 || r.got != r.sent {
		t.Errorf("ping through both restarts: %d of %d replies, want all", r.got, r.sent)
	} else {
		t.Logf("ping every 50 ms through a graceful restart and a kill -9: %d/%d replies", r.got, r.sent)
	}
	if leases := xdLeases(t, topo, xdPrefix); len(leases) != 2 {
		t.Errorf("%d leases in etcd after the restarts, want still 2: %v", len(leases), leases)
	}

	t.Run("--ip-masq installs the masquerade table and tells Docker not to masquerade", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if out, err := n.Run(ctx, "nft", "list", "table", "ip", "xnet"); err != nil || !strings.Contains(out, "masquerade") {
			t.Errorf("nft list table ip xnet: %v\n%s", err, out)
		}
		if docker, _ := os.ReadFile(n.DockerOptsFile()); !strings.Contains(string(docker), "--ip-masq=false") {
			t.Errorf("docker options %q: Docker must not masquerade when xnetd does", docker)
		}
	})

	t.Run("teardown after stop removes the device, routes, table and files but not the lease", func(t *testing.T) {
		if err := n.proc.Stop(); err != nil {
			t.Fatal(err)
		}
		n.teardown(t, topo)
	})
}

// Bad flags and a bad config stop xnetd before it touches the host: exit code 2 and one line
// that names the flag or config field.
func TestXnetdRefusesBadFlagsAndConfigWithExitCode2(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, WithEtcd: true})
	h := topo.Hosts()[0]
	bin := harness.BuildXnetd(t)
	xdPut(t, topo, subnetmgr.ConfigKey("/good/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/badnet/network"), `{"Network":"10.244.0.0/33"}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/badtype/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/v6only/network"), `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/v6onlywg4/network"), `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":"ipv4"}}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/nofamily/network"), `{"EnableIPv4":false,"EnableIPv6":false,"Network":"10.244.0.0/16"}`)
	xdPut(t, topo, subnetmgr.ConfigKey("/badmacvlan/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},"Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":31}}`)

	tests := []struct {
		name   string
		prefix string
		args   []string
		want   []string // in the last line of output
	}{
		{"unknown backend", "/good/network", []string{"--backend=ipip"}, []string{"--backend", "ipip", "use auto, ebpf, vxlan, udp, host-gw or wireguard"}},
		{"missing interface", "/good/network", []string{"--iface=nosuch0"}, []string{"--iface nosuch0", "no such interface"}},
		{"interface address not on this host", "/good/network", []string{"--iface=192.0.2.1"}, []string{"--iface 192.0.2.1", "no interface here has that address"}},
		{"bad public ip", "/good/network", []string{"--public-ip=10.0.0.300"}, []string{"--public-ip", "not an IPv4 address"}},
		{"bad renew margin", "/good/network", []string{"--subnet-lease-renew-margin=never"}, []string{"subnet-lease-renew-margin"}},
		{"invalid Network in the config", "/badnet/network", nil, []string{"/badnet/network/config", "Network"}},
		{"unknown Backend.Type in the config", "/badtype/network", nil, []string{"Backend.Type", "ipip"}},
		{"--macvlan without a Macvlan section in the config", "/good/network", []string{"--macvlan"}, []string{"/good/network/config", "no Macvlan section", "--macvlan"}},
		{"IPv6-only config with the udp backend", "/v6only/network", []string{"--backend=udp"}, []string{"--backend=udp", "EnableIPv4 false", "use ebpf or vxlan or host-gw or wireguard"}},
		{"IPv6-only config with wireguard in Mode ipv4", "/v6onlywg4/network", []string{"--backend=wireguard"}, []string{"/v6onlywg4/network/config", "Backend.Mode", "EnableIPv4 false"}},
		{"IPv6-only config on a host without an IPv6 underlay", "/v6only/network", nil, []string{"EnableIPv4 false", "no global IPv6 address", "--public-ipv6"}},
		// ebpf carries an IPv6-only overlay over the IPv6 underlay only, as vxlan does.
		{"IPv6-only config with the ebpf backend on a host without an IPv6 underlay", "/v6only/network", []string{"--backend=ebpf"}, []string{"--backend=ebpf", "EnableIPv4 false", "no global IPv6 address", "--public-ipv6"}},
		{"a config with neither address family", "/nofamily/network", nil, []string{"/nofamily/network/config", "EnableIPv4", "EnableIPv6"}},
		{"invalid Macvlan section (with or without --macvlan)", "/badmacvlan/network", nil, []string{"/badmacvlan/network/config", "Macvlan.RangeLen", "31"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := append([]string{"--etcd-prefix", tt.prefix, "--subnet-file", filepath.Join(dir, "subnet.env"),
				"--docker-opts-file", filepath.Join(dir, "docker"), "--macvlan-file", filepath.Join(dir, "macvlan")}, tt.args...)
			p, err := h.StartXnetd(bin, args...)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(15 * time.Second):
				p.Kill()
				t.Fatalf("xnetd did not exit:\n%s", p.Output())
			}
			var exit *exec.ExitError
			if err := p.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 2 {
				t.Errorf("exit %v, want exit code 2\n%s", err, p.Output())
			}
			lines := strings.Split(strings.TrimSpace(p.Output()), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "xnetd: ") {
				t.Errorf("last line %q is not xnetd's error line", last)
			}
			for _, w := range tt.want {
				if !strings.Contains(last, w) {
					t.Errorf("error line %q does not mention %q", last, w)
				}
			}
			// Nothing half configured: no files, no lease, no device, no route.
			for _, f := range []string{"subnet.env", "docker", "state.json", "macvlan"} {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("%s was written although xnetd refused to start", f)
				}
			}
			if leases := xdLeases(t, topo, tt.prefix); len(leases) != 0 {
				t.Errorf("lease taken although xnetd refused to start: %v", leases)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if out, _ := h.Run(ctx, "ip", "-o", "link", "show", "type", "vxlan"); strings.TrimSpace(out) != "" {
				t.Errorf("a vxlan device exists although xnetd refused to start: %s", out)
			}
			if out, _ := h.Run(ctx, "ip", "-4", "route", "show", "root", "10.244.0.0/16"); strings.TrimSpace(out) != "" {
				t.Errorf("routes into the overlay exist although xnetd refused to start: %s", out)
			}
		})
	}
}

// Without --iface xnetd takes the default route's interface; --iface also takes an address.
// `xnetd status` (text) then tells an operator which one and what the daemon holds.
func TestXnetdFindsTheUnderlayInterface(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, WithEtcd: true})
	xdPut(t, topo, subnetmgr.ConfigKey(xdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	n := &xdNode{Host: topo.Hosts()[0], bin: harness.BuildXnetd(t)}
	for _, tt := range []struct {
		name  string
		iface string
	}{
		{"the default route's interface when --iface is empty", "--iface="},
		{"the interface holding the address given to --iface", "--iface=" + n.UnderlayIP.String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n.extra = []string{tt.iface}
			n.start(t)
			n.waitReady(t)
			want := fmt.Sprintf(`msg="underlay interface" iface=eth0 iface_ip=%s public_ip=%s`, n.UnderlayIP, n.UnderlayIP)
			if !strings.Contains(n.proc.Output(), want) {
				t.Errorf("log lacks %q:\n%s", want, n.proc.Output())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, err := n.Run(ctx, n.bin, "status", "--subnet-file", n.SubnetFile())
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range []string{
				fmt.Sprintf("xnetd running, pid %d, ready", n.proc.Pid),
				fmt.Sprintf("lease:    %v public %v, expires", n.state(t).Lease.Subnet, n.UnderlayIP),
				"backend:  vxlan (kernel: kernel VXLAN device xnet.1)",
				"network:  10.244.0.0/16 on eth0",
				"peers (0):",
			} {
				if !strings.Contains(out, w) {
					t.Errorf("xnetd status lacks %q:\n%s", w, out)
				}
			}
			if err := n.proc.Stop(); err != nil {
				t.Error(err)
			}
		})
	}
}
