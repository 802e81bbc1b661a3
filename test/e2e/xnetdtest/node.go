package xnetdtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// EtcdPrefix is where the tests' xnetd keeps its config and leases: the default, as an
// operator's would.
const EtcdPrefix = subnetmgr.DefaultPrefix

// DualStackConfig is a dual-stack overlay's etcd config; %s is the backend type.
const DualStackConfig = `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"%s"}}`

// IPv6OnlyConfig is an IPv6-only overlay's etcd config; %s is the backend type, %v DirectRouting.
const IPv6OnlyConfig = `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"%s","DirectRouting":%v}}`

// Node is one host running xnetd.
type Node struct {
	*harness.Host
	Bin   string
	Extra []string
	Proc  *harness.Process

	// Systemd plays systemd for this host's xnetd: its NOTIFY_SOCKET and its fd store,
	// which it passes to every restarted xnetd, as systemd does across restarts.
	Systemd *harness.ServiceManager
}

// Cluster builds a topology with etcd, writes config under the default prefix and starts
// xnetd on every host with extra flags, waiting until each reports ready.
func Cluster(t *testing.T, hosts int, config string, extra ...string) ([]*Node, *harness.Topology) {
	t.Helper()
	return ClusterOn(t, harness.Options{Hosts: hosts, WithEtcd: true}, config, extra...)
}

// ClusterOn is Cluster on a topology built with opts (opts.Hosts hosts, etcd included).
func ClusterOn(t *testing.T, opts harness.Options, config string, extra ...string) ([]*Node, *harness.Topology) {
	t.Helper()
	opts.WithEtcd = true
	topo := harness.NewForTest(t, opts)
	return Start(t, topo, config, extra...), topo
}

// Start runs xnetd with config on every host of topo (built WithEtcd) and waits until each
// lists the others as peers.
func Start(t *testing.T, topo *harness.Topology, config string, extra ...string) []*Node {
	t.Helper()
	hosts := len(topo.Hosts())
	Put(t, topo, subnetmgr.ConfigKey(EtcdPrefix), config)
	bin := harness.BuildXnetd(t)
	// One after the other, so each host finds the earlier ones' leases at start.
	var nodes []*Node
	for _, h := range topo.Hosts() {
		n := &Node{Host: h, Bin: bin, Extra: extra}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	// The earlier hosts learn of the later ones through their lease watch.
	for _, n := range nodes {
		n.WaitPeers(t, hosts-1)
	}
	return nodes
}

// WaitPeers waits until the daemon's state lists want peers.
func (n *Node) WaitPeers(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := n.State(t)
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
func (n *Node) listenNotify(t *testing.T) {
	t.Helper()
	m, err := harness.NewServiceManager()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	n.Systemd = m
}

// Notifications is what xnetd told systemd so far.
func (n *Node) Notifications() []string { return n.Systemd.Notifications() }

// Put writes key in the topology's etcd, failing the test if it cannot.
func Put(t *testing.T, topo *harness.Topology, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := topo.EtcdClient().Put(ctx, key, value); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// StartDaemon starts (or restarts) xnetd on the host, under the host's stand-in for systemd;
// it does not wait for ready (WaitReady does).
func (n *Node) StartDaemon(t *testing.T) {
	t.Helper()
	if n.Systemd == nil {
		n.listenNotify(t)
	}
	// As systemd restarts a service: with NOTIFY_SOCKET, and the fds stored by the process
	// before (the test's environment passes on, XNETD_* aside).
	p, err := n.StartXnetdUnder(n.Systemd, n.Bin, n.Extra...)
	if err != nil {
		t.Fatal(err)
	}
	n.Proc = p
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("xnetd on %s (pid %d) said:\n%s", n.Name, p.Pid, p.Output())
		}
	})
}

func (n *Node) stateFile() string { return filepath.Join(n.StateDir, "state.json") }

// State is the part of state.json the tests look at.
type State struct {
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

// State reads the daemon's state file.
func (n *Node) State(t *testing.T) State {
	t.Helper()
	data, err := os.ReadFile(n.stateFile())
	if err != nil {
		t.Fatalf("%s: %v", n.Name, err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatalf("%s: state file: %v", n.Name, err)
	}
	return s
}

// WaitReady waits until this process (not an earlier one) recorded ready in its state file.
func (n *Node) WaitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if data, err := os.ReadFile(n.stateFile()); err == nil {
			var s State
			if json.Unmarshal(data, &s) == nil && s.PID == n.Proc.Pid && s.Ready {
				return
			}
		}
		if n.Proc.Exited() {
			t.Fatalf("xnetd on %s exited before ready: %v\n%s", n.Name, n.Proc.Wait(), n.Proc.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("xnetd on %s not ready after 20s:\n%s", n.Name, n.Proc.Output())
}

// Status is `xnetd status --output json` as a user's script would read it.
type Status struct {
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

// Status is `xnetd status --output json` run in the host.
func (n *Node) Status(t *testing.T) Status {
	t.Helper()
	var s Status
	n.StatusInto(t, &s)
	return s
}

// StatusInto runs `xnetd status --output json` in the host and decodes it into v.
func (n *Node) StatusInto(t *testing.T, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.Bin, "status", "--output", "json", "--subnet-file", n.SubnetFile())
	if err != nil {
		t.Fatalf("xnetd status on %s: %v", n.Name, err)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("xnetd status --output json on %s is not JSON: %v\n%s", n.Name, err, out)
	}
}

// ParseMetrics parses a scrape with Prometheus' own text parser.
func ParseMetrics(t *testing.T, body string) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams
}

// HTTPGet fetches path from the daemon's metrics endpoint, which listens on the loopback of
// the host's namespace: the connection is dialled from inside it.
func (n *Node) HTTPGet(t *testing.T, path string) (int, string) {
	t.Helper()
	addr := n.State(t).MetricsAddr
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

// RouteTo is `ip route show` of subnet in the host (IPv4 or IPv6 by the subnet), trimmed.
func (n *Node) RouteTo(t *testing.T, subnet netip.Prefix) string {
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

// Out runs a command in the host's namespace and returns its output, failing the test if it
// fails.
func (n *Node) Out(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := n.Run(ctx, args[0], args[1:]...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", n.Name, err, out)
	}
	return out
}

// Sh runs a command in the host's namespace, failing the test if it fails.
func (n *Node) Sh(t *testing.T, args ...string) {
	t.Helper()
	n.Out(t, args...)
}

// Ifindex is the index of the link named name in the host's namespace.
func (n *Node) Ifindex(t *testing.T, name string) int {
	t.Helper()
	var idx int
	if err := n.Do(func() error {
		l, err := netlink.LinkByName(name)
		if err == nil {
			idx = l.Attrs().Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return idx
}

// Teardown runs `xnetd teardown` with the flags the daemon ran with, and checks what every
// backend leaves behind is gone: files, pins, routes into the overlay, xnet devices, the
// masquerade table. The lease stays in etcd (it expires by its TTL).
func (n *Node) Teardown(t *testing.T, topo *harness.Topology) {
	t.Helper()
	subnet := n.State(t).Lease.Subnet
	// The operator's `systemctl stop xnetd` before the teardown: systemd closes the fds it
	// stored for the service (a restart keeps them).
	if n.Systemd != nil {
		n.Systemd.Flush()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := n.Run(ctx, n.Bin, append(append([]string{"teardown"}, n.XnetdArgs()...), n.Extra...)...)
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
	if _, ok := Leases(t, topo, EtcdPrefix)[subnet]; !ok {
		t.Errorf("teardown removed the lease %v from etcd; it must leave it to expire", subnet)
	}
}

// Leases reads every lease key from etcd.
func Leases(t *testing.T, topo *harness.Topology, prefix string) map[netip.Prefix]subnetmgr.LeaseAttrs {
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

// ListLeases reads every lease under the test prefix.
func ListLeases(ctx context.Context, topo *harness.Topology) ([]subnetmgr.Lease, int64, error) {
	resp, err := topo.EtcdClient().Get(ctx, subnetmgr.SubnetsPrefix(EtcdPrefix), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, err
	}
	var out []subnetmgr.Lease
	for _, kv := range resp.Kvs {
		v4, v6, err := subnetmgr.ParseDualSubnetKey(EtcdPrefix, string(kv.Key))
		if err != nil {
			return nil, 0, err
		}
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		if err != nil {
			return nil, 0, err
		}
		l := subnetmgr.Lease{Subnet: v4, IPv6Subnet: v6}
		l.PublicIP, l.BackendType, l.BackendData, l.PublicIPv6, l.BackendV6Data = attrs.PublicIP, attrs.BackendType, attrs.BackendData, attrs.PublicIPv6, attrs.BackendV6Data
		out = append(out, l)
	}
	return out, resp.Header.Revision, nil
}

// Containers plays Docker on every host from the subnet file xnetd wrote.
func Containers(t *testing.T, nodes []*Node) []*harness.Container {
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

// Metric finds a metric by name and labels in a parsed scrape: a counter's or gauge's value, or
// a histogram's sample count; false when no series matches.
func Metric(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
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

// Counters is the counters part of `xnetd status --output json`.
type Counters struct {
	Peers []struct {
		Subnet    string  `json:"subnet"`
		Route     string  `json:"route"`
		TxPackets *uint64 `json:"tx_packets"`
		RxPackets *uint64 `json:"rx_packets"`
		TxBytes   *uint64 `json:"tx_bytes"`
		RxBytes   *uint64 `json:"rx_bytes"`
	} `json:"peers"`
	Verdicts map[string]uint64 `json:"verdicts"`
	Drops    map[string]uint64 `json:"drops"`
	Counters string            `json:"counters"`
	Mode     string            `json:"mode"`
	Backend  string            `json:"backend"`
	Running  bool              `json:"running"`
	// Endpoints are the local containers the ebpf datapath learned, with their path.
	Endpoints []struct {
		Address string `json:"address"`
		Veth    string `json:"veth"`
		Bridge  string `json:"bridge"`
		Path    string `json:"path"`
		Why     string `json:"why"`
	} `json:"endpoints"`
}

// StatusCounters is the counters part of the host's `xnetd status --output json`.
func (n *Node) StatusCounters(t *testing.T) Counters {
	t.Helper()
	var c Counters
	n.StatusInto(t, &c)
	return c
}
