// Command bench is `make bench`: the benchmark protocol of docs/design.md. It builds one two-host
// topology per datapath (identical in shape: same addresses, MTUs and container layout), then
// measures container to container across the hosts, interleaved (A B C A B C) for -rounds
// rounds: TCP throughput with 1 and 4 streams, UDP 64-byte packets/s delivered from 4 senders,
// TCP request/response transactions/s, and whole-machine CPU seconds per GB moved during the
// 1-stream test. It prints one table with each datapath as a ratio to the two baselines it
// configures itself (host-gw routes, the ceiling; a kernel VXLAN device set up as flannel
// does, what users run today), and writes results.json and chart.svg to -out.
//
// Why one topology per datapath rather than one topology switched between them: xnetd keeps its
// datapath in place when it stops (restarts must not cut traffic), so switching in place would
// let one datapath's leftovers carry or disturb the next one's traffic. Separate namespaces
// cannot interfere, and interleaving the rounds still exposes every datapath to the same
// machine load over time.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// Names of the two baselines in the table and results.json.
const (
	baseHostGW = "baseline host-gw"
	baseVXLAN  = "baseline kernel-vxlan"
)

const (
	iperfBasePort = 5201
	udpSenders    = 4
	rrPort        = 7000
)

type options struct {
	xnetd    string
	out      string
	backends []string
	rounds   int
	duration time.Duration
	verbose  bool
	tests    []benchTest
}

func main() {
	var o options
	var backends, testNames string
	flag.StringVar(&o.xnetd, "xnetd", "", "xnetd binary (needed with -backends; default: build ./cmd/xnetd)")
	flag.StringVar(&o.out, "out", "bench", "directory for results.json and chart.svg")
	flag.StringVar(&backends, "backends", "", "xnet backends to measure besides the baselines, comma-separated (ebpf,vxlan,udp,host-gw,wireguard; ebpf-tc and ebpf-xdp pass --decap; ebpf-direct, or the suffix +direct on any, turns the config's DirectRouting on; +bridge=NAME names the container bridge, +host sends from the host itself; +kernel takes the host's stack (--host-routing=kernel); +rps steers each container flow to one CPU (--flow-steering=rps); +v6 measures IPv6 in a dual-stack overlay against IPv6 baselines, +v6ul the same with IPv6 underlay addresses on the hosts (ebpf and vxlan then carry it as VXLAN over IPv6); NAME@BINARY measures NAME with another xnetd build, for an A/B of two builds in one interleaved run)")
	flag.StringVar(&testNames, "tests", "", "run only these comma-separated tests: tcp1, tcp4, udp64, rr, or words of their names (\"tcp\" selects the three TCP tests; default: all)")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved rounds (at least 1; DESIGN asks for 3 or more)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "length of each test (whole seconds)")
	flag.BoolVar(&o.verbose, "v", false, "log progress of every test")
	flag.Parse()
	for _, b := range strings.Split(backends, ",") {
		if b = strings.TrimSpace(b); b != "" {
			o.backends = append(o.backends, b)
		}
	}
	var err error
	if o.tests, err = selectTests(testNames); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if o.rounds < 1 || o.duration < time.Second {
		fmt.Fprintln(os.Stderr, "bench: -rounds must be >= 1 and -duration >= 1s")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "bench: interrupted; every topology has been removed")
		} else {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		os.Exit(1)
	}
}

// selectTests returns the tests a comma-separated word names, by id (tcp1) or by a word of the
// name ("tcp": the three TCP tests), all of them for "", so a change that can only move one
// metric gets more rounds in the same time.
func selectTests(words string) ([]benchTest, error) {
	if strings.TrimSpace(words) == "" {
		return tests, nil
	}
	var out []benchTest
	for _, t := range tests {
		for _, w := range strings.Split(words, ",") {
			if w = strings.TrimSpace(w); w != "" && (w == t.id || strings.Contains(t.name, w)) {
				out = append(out, t)
				break
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-tests %q matches no test", words)
	}
	return out, nil
}

// modeOf turns a -backends entry into a mode: a backend name, or "ebpf-<decap>" for the ebpf
// backend with --decap=<decap> (tc, xdp, auto), so both decap hooks can be measured in one run.
// "NAME@BINARY" is NAME run with another xnetd binary, named NAME@<binary's file name>: two
// builds measured in the same interleaved run see the same machine load, which consecutive runs
// on a shared VM do not (they differ by 10-20%).
//
// Two suffixes measure other paths than a container on docker0 to a container on docker0:
// "+bridge=NAME" names the container bridges NAME on both hosts (Docker with a daemon.json
// "bridge", podman, CNI), and "+host" sends from the first host itself to the remote container
// (the host's own traffic takes xnet0, not a container veth). They combine: ebpf-tc+host.
//
// "+v6" measures IPv6 container traffic in a dual-stack overlay; the run then also measures
// both baselines over IPv6 (flannel's host-gw and vxlan IPv6 halves, over an IPv6 underlay),
// and the ratios of a +v6 mode are to those. The hosts of a +v6 mode have no IPv6 underlay
// address (host-gw's excepted: it has no other way), so VXLAN-speaking backends carry IPv6
// inside their IPv4 VXLAN. "+v6ul" gives them one: ebpf and vxlan then run an IPv6 VTEP and
// carry IPv6 as VXLAN over the IPv6 underlay, as flannel's vxlan baseline does.
//
// "+rps" runs xnetd with --flow-steering=rps (RPS on the container veths).
//
// "+direct" turns the config's Backend.DirectRouting on: the two hosts share a segment, so the
// peer is routed plain (no VXLAN), the path to hold against host-gw. "ebpf-direct" is
// ebpf+direct, the spelling the README uses.
func modeOf(name string) *mode {
	spec, binary, _ := strings.Cut(name, "@")
	m := &mode{name: spec, backend: spec, xnetd: binary}
	if base, suffixes, ok := strings.Cut(spec, "+"); ok {
		m.backend = base
		for _, suf := range strings.Split(suffixes, "+") {
			switch {
			case suf == "host":
				m.fromHost = true
			case suf == "direct":
				m.direct = true
			case suf == "v6":
				m.v6 = true
			case suf == "v6ul":
				m.v6, m.v6ul = true, true
			case suf == "kernel":
				// The stack path: container traffic through xnet0 and the host's
				// forwarding both ways (what a DOCKER-USER rule makes auto choose).
				m.extra = append(m.extra, "--host-routing=kernel")
			case suf == "rps":
				// Each container flow on one CPU (--flow-steering=rps): no reordering, at a
				// throughput cost on few CPUs.
				m.extra = append(m.extra, "--flow-steering=rps")
			case strings.HasPrefix(suf, "bridge="):
				m.bridge = strings.TrimPrefix(suf, "bridge=")
			}
		}
	}
	if m.backend == "ebpf-direct" {
		m.backend, m.direct = "ebpf", true
	} else if decap, ok := strings.CutPrefix(m.backend, "ebpf-"); ok {
		m.backend, m.extra = "ebpf", append(m.extra, "--decap="+decap)
	}
	if binary != "" {
		m.name = spec + "@" + filepath.Base(binary)
	}
	return m
}

// mode is one datapath under test, on its own topology.
type mode struct {
	name    string
	backend string   // xnet backend name; "" for the baselines
	extra   []string // more xnetd flags (--decap for the ebpf-tc and ebpf-xdp spellings)
	xnetd   string   // another xnetd binary than -xnetd (NAME@BINARY)
	bridge  string   // the container bridge's name ("+bridge=NAME"; "" is docker0)
	// fromHost sends from the first host's own namespace instead of a container ("+host").
	fromHost bool
	// direct turns the config's Backend.DirectRouting on ("+direct", "ebpf-direct").
	direct bool
	// v6 sends IPv6 between the containers of a dual-stack overlay ("+v6", "+v6ul").
	v6 bool
	// v6ul gives the hosts IPv6 underlay addresses ("+v6ul"; always for the baselines and
	// host-gw, which need them).
	v6ul    bool
	topo    *harness.Topology
	client  *harness.Container // on h1
	server  *harness.Container // on h2
	daemons []*harness.Process
	rr      *rrServer
	err     error // set when the mode could not be set up; it is then skipped
}

func run(ctx context.Context, o options) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it builds network namespaces (run `sudo make bench`)")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		return errors.New("iperf3 is not installed (apt-get install iperf3)")
	}
	if len(o.backends) > 0 && o.xnetd == "" {
		dir, err := os.MkdirTemp("", "xnet-bench-build-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		if o.xnetd, err = harness.Build(ctx, dir); err != nil {
			return err
		}
	}
	if o.xnetd != "" {
		if o.xnetd, err = filepath.Abs(o.xnetd); err != nil {
			return err
		}
	}
	info := collectSystemInfo(ctx, o.xnetd)
	fmt.Printf("xnet bench: kernel %s, %d CPUs (%s), %s; %d rounds of %v per test\n",
		info.Kernel, info.CPUs, info.CPUModel, info.Tools["iperf3"], o.rounds, o.duration)

	modes := []*mode{{name: baseHostGW}, {name: baseVXLAN}}
	v6 := false
	for _, b := range o.backends {
		m := modeOf(b)
		if m.xnetd != "" {
			if m.xnetd, err = filepath.Abs(m.xnetd); err != nil {
				return err
			}
		}
		modes = append(modes, m)
		v6 = v6 || m.v6
	}
	if v6 {
		modes = slices.Insert(modes, 2, &mode{name: baseHostGW + v6Suffix, v6: true, v6ul: true}, &mode{name: baseVXLAN + v6Suffix, v6: true, v6ul: true})
	}
	defer func() {
		for _, m := range modes {
			if m.rr != nil {
				m.rr.close()
			}
			if m.topo != nil {
				if cerr := m.topo.Close(); cerr != nil {
					err = errors.Join(err, fmt.Errorf("cleanup of %s: %w", m.name, cerr))
				}
			}
		}
	}()
	// Setting up is independent per mode; in parallel it takes as long as the slowest.
	var wg sync.WaitGroup
	for _, m := range modes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.err = setup(ctx, m, o.xnetd)
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	for _, m := range modes {
		if m.err != nil {
			fmt.Printf("  %s: not measured: %v\n", m.name, m.err)
			if len(m.daemons) > 0 {
				fmt.Printf("    last lines of h1's xnetd log:\n%s\n", lastLines(m.daemons[0].Output(), 6))
			}
		}
	}

	res := newResults(info, o, modes)
	for round := 1; round <= o.rounds; round++ {
		for _, m := range modes {
			if m.err != nil {
				continue
			}
			fmt.Printf("round %d/%d: %s\n", round, o.rounds, m.name)
			for _, t := range o.tests {
				s, err := t.run(ctx, m, o.duration)
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if err != nil {
					fmt.Printf("  %s: %v\n", t.name, err)
					res.addError(m.name, t.name, err)
					continue
				}
				for metric, v := range s {
					res.add(m.name, metric, v)
				}
				if o.verbose {
					fmt.Printf("  %s: %v\n", t.name, s)
				}
			}
		}
	}
	res.finish()
	res.printTable(os.Stdout)
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	if err := res.writeJSON(filepath.Join(o.out, "results.json")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(o.out, "chart.svg"), []byte(res.svg()), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s and %s\n", filepath.Join(o.out, "results.json"), filepath.Join(o.out, "chart.svg"))
	return nil
}

// Subnets of the baselines' docker0 bridges (xnet modes get theirs from their leases).
var (
	baselineDocker0   = []netip.Prefix{netip.MustParsePrefix("10.244.1.1/24"), netip.MustParsePrefix("10.244.2.1/24")}
	baselineDocker0v6 = []netip.Prefix{netip.MustParsePrefix("fd00:10:244:1::1/64"), netip.MustParsePrefix("fd00:10:244:2::1/64")}
)

// v6Suffix names a mode's IPv6 twin; ratios of a +v6 mode are to the baselines with it.
const v6Suffix = "+v6"

// target is the server address the tests send to: its IPv6 address in a +v6 mode.
func (m *mode) target() netip.Addr {
	if m.v6 {
		return m.server.IPv6
	}
	return m.server.IP
}

func setup(ctx context.Context, m *mode, xnetd string) error {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	underlay6 := m.v6 && (m.v6ul || m.backend == "host-gw")
	topo, err := harness.New(ctx, harness.Options{Hosts: 2, WithEtcd: m.backend != "", IPv6Underlay: underlay6, Logger: logger})
	if err != nil {
		return err
	}
	m.topo = topo
	hosts := topo.Hosts()
	for _, h := range hosts {
		if m.bridge != "" {
			h.UseBridgeName(m.bridge)
		}
	}
	baseDocker0 := func(mtu int) error {
		for i, h := range hosts {
			if err := h.SetupDocker0(baselineDocker0[i], mtu); err != nil {
				return err
			}
			if m.v6 {
				if err := h.SetupDocker0IPv6(baselineDocker0v6[i]); err != nil {
					return err
				}
			}
		}
		return nil
	}
	switch strings.TrimSuffix(m.name, v6Suffix) {
	case baseHostGW:
		if err = baseDocker0(1500); err == nil {
			err = harness.ConfigureHostGW(hosts)
		}
	case baseVXLAN:
		// flannel's IPv6 device carries 20 bytes more of outer header than its IPv4 one.
		mtu := 1450
		if m.v6 {
			mtu = 1430
		}
		if err = baseDocker0(mtu); err == nil {
			err = harness.ConfigureFlannelVXLAN(hosts)
		}
	default:
		if m.xnetd != "" {
			xnetd = m.xnetd
		}
		err = setupXnet(ctx, m, xnetd)
	}
	if err != nil {
		return err
	}
	if m.client, err = hosts[0].AddContainer(); err != nil {
		return err
	}
	if m.fromHost {
		m.client = &harness.Container{Namespace: hosts[0].Namespace, Host: hosts[0], IP: hosts[0].UnderlayIP}
	}
	if m.server, err = hosts[1].AddContainer(); err != nil {
		return err
	}
	// The datapath may need a moment (xnetd programs peers as leases arrive).
	var recv int
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline) && ctx.Err() == nil; {
		if _, recv, _ = harness.Ping(ctx, m.client.Namespace, m.target(), 1, 0); recv == 1 {
			break
		}
	}
	if recv != 1 {
		return fmt.Errorf("%s (%s) does not reach %s (%s) across hosts", m.client.Role(), m.client.IP, m.server.Role(), m.target())
	}
	for i := range udpSenders {
		if _, err := harness.StartIperf3Server(ctx, m.server.Namespace, iperfBasePort+i); err != nil {
			return err
		}
	}
	m.rr, err = startRRServer(m.server.Namespace, netip.AddrPortFrom(m.target(), rrPort))
	return err
}

func setupXnet(ctx context.Context, m *mode, xnetd string) error {
	cfg := fmt.Sprintf(`{"Network":"10.244.0.0/16","Backend":{"Type":%q,"DirectRouting":%v}}`, m.backend, m.direct)
	if m.v6 {
		cfg = fmt.Sprintf(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":%q,"DirectRouting":%v}}`, m.backend, m.direct)
	}
	if _, err := m.topo.EtcdClient().Put(ctx, subnetmgr.ConfigKey(subnetmgr.DefaultPrefix), cfg); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	for _, h := range m.topo.Hosts() {
		p, err := h.StartXnetd(xnetd, append([]string{"--backend", m.backend}, m.extra...)...)
		if err != nil {
			return err
		}
		m.daemons = append(m.daemons, p)
	}
	for i, h := range m.topo.Hosts() {
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		// Docker starts after xnetd and takes --bip and --mtu from the file xnetd wrote.
		_, err := h.SetupDocker0FromSubnetFile(wctx)
		cancel()
		if err != nil {
			if m.daemons[i].Exited() {
				return fmt.Errorf("xnetd --backend=%s on %s exited: %v", m.backend, h.Name, m.daemons[i].Wait())
			}
			return err
		}
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "      " + strings.Join(lines, "\n      ")
}
