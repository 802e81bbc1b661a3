// Command demo is `make demo`: three simulated hosts in network namespaces, an embedded etcd,
// xnetd on every host, and what a new user wants to see: each host's lease and backend, which
// containers reach which (measured with pings, not assumed), and a few seconds of throughput
// between containers on different hosts. Everything it makes is removed on exit and on Ctrl-C.
//
// Containers are real Docker containers when Debian's docker.io is installed: one dockerd per
// host, inside the host's namespace, started from the DOCKER_NETWORK_OPTIONS xnetd wrote, with
// its iptables rules on, as on a real host. Without it (or with -docker=off) namespaces on a
// docker0 bridge play the containers, without Docker's firewall. The demo says which it used.
//
// It needs root, Go and iproute2; throughput also needs iperf3 (skipped with a note if absent).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

const network = "10.244.0.0/16"

type options struct {
	xnetd      string
	backend    string
	hosts      int
	containers int
	duration   time.Duration
	leaseWait  time.Duration
	verbose    bool
	keep       bool
	docker     string
}

// container is what the demo measures between: a Docker container or a namespace playing one.
type container struct {
	Name string
	NS   *harness.Namespace
	Host *harness.Host
	IP   netip.Addr
}

func main() {
	var o options
	flag.StringVar(&o.xnetd, "xnetd", "", "xnetd binary (default: build ./cmd/xnetd into a temp dir)")
	flag.StringVar(&o.backend, "backend", "ebpf", "Backend.Type written to the network config (ebpf, vxlan, udp, host-gw)")
	flag.IntVar(&o.hosts, "hosts", 3, "simulated hosts")
	flag.IntVar(&o.containers, "containers", 2, "containers per host")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of the throughput test")
	flag.DurationVar(&o.leaseWait, "lease-wait", 20*time.Second, "how long to wait for every host's lease")
	flag.BoolVar(&o.verbose, "v", false, "print xnetd's log of every host at the end")
	flag.BoolVar(&o.keep, "keep", false, "keep the cluster up until Ctrl-C, and print how to look inside it")
	flag.StringVar(&o.docker, "docker", "auto", "containers: real Docker (on), namespaces playing them (off), or real Docker when installed (auto)")
	flag.Parse()
	if o.hosts < 2 || o.containers < 1 {
		fmt.Fprintln(os.Stderr, "demo: -hosts must be >= 2 and -containers >= 1")
		os.Exit(2)
	}
	if o.docker != "auto" && o.docker != "on" && o.docker != "off" {
		fmt.Fprintf(os.Stderr, "demo: -docker %q: use auto, on or off\n", o.docker)
		os.Exit(2)
	}
	// Ctrl-C cancels ctx; run returns through its deferred Close, so nothing stays behind.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, o, os.Stdout)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "demo: interrupted; everything it made has been removed")
		} else {
			fmt.Fprintln(os.Stderr, "demo:", err)
		}
		os.Exit(1)
	}
}

func step(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "==> "+format+"\n", args...)
}

func run(ctx context.Context, o options, w io.Writer) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it builds network namespaces (run `sudo make demo`)")
	}
	if o.xnetd == "" {
		dir, err := os.MkdirTemp("", "xnet-demo-build-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		step(w, "building xnetd")
		if o.xnetd, err = harness.Build(ctx, dir); err != nil {
			return err
		}
	}
	if o.xnetd, err = filepath.Abs(o.xnetd); err != nil {
		return err
	}
	if _, err := os.Stat(o.xnetd); err != nil {
		return fmt.Errorf("-xnetd %s: %w (run `make build` first, or leave -xnetd empty to build)", o.xnetd, err)
	}

	step(w, "building %d hosts in network namespaces, with an embedded etcd", o.hosts)
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	topo, err := harness.New(ctx, harness.Options{Hosts: o.hosts, WithEtcd: true, Logger: logger})
	if err != nil {
		return err
	}
	defer func() {
		step(w, "cleaning up (run %s)", topo.ID())
		if cerr := topo.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
	}()
	fmt.Fprintf(w, "    run id %s, underlay %s on bridge br0, etcd at %s\n", topo.ID(), harness.UnderlayPrefix, topo.EtcdEndpoint())

	cfg := fmt.Sprintf(`{"Network":%q,"Backend":{"Type":%q}}`, network, o.backend)
	step(w, "writing the network config: %s", cfg)
	if _, err := topo.EtcdClient().Put(ctx, subnetmgr.ConfigKey(subnetmgr.DefaultPrefix), cfg); err != nil {
		return fmt.Errorf("write config: %w", err)
	}

	step(w, "starting xnetd on every host")
	hosts := topo.Hosts()
	daemons := make([]*harness.Process, len(hosts))
	for i, h := range hosts {
		if daemons[i], err = h.StartXnetd(o.xnetd, "--log-level", "info"); err != nil {
			return err
		}
	}
	if o.verbose {
		defer func() {
			for i, h := range hosts {
				fmt.Fprintf(w, "\n--- xnetd log of %s ---\n%s", h.Name, daemons[i].Output())
			}
		}()
	}

	step(w, "waiting for the leases (up to %v)", o.leaseWait)
	files := waitSubnetFiles(ctx, hosts, daemons, o.leaseWait)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	leases, leaseErr := listLeases(ctx, topo)
	printHosts(ctx, w, o.xnetd, hosts, daemons, files, leases, leaseErr)

	useDocker, why := o.docker != "off", harness.DockerMissing()
	if useDocker && why != "" {
		if o.docker == "on" {
			return fmt.Errorf("-docker=on: %s", why)
		}
		useDocker = false
	}
	var containers []container
	var dockers []*harness.Docker
	if useDocker {
		step(w, "starting real Docker on every host: %s from the DOCKER_NETWORK_OPTIONS xnetd wrote, iptables on", harness.DockerdPath)
		dockers, err = startDockers(ctx, w, hosts, files)
		defer func() {
			for _, d := range dockers {
				if d != nil {
					if serr := d.Stop(); serr != nil {
						err = errors.Join(err, fmt.Errorf("stop Docker of %s: %w", d.Host.Name, serr))
					}
				}
			}
		}()
		if err != nil {
			return err
		}
		if containers, err = dockerRun(ctx, dockers, o.containers); err != nil {
			return err
		}
	} else {
		reason := "-docker=off"
		if why != "" {
			reason = why
		}
		step(w, "playing Docker with namespaces on a docker0 bridge, without Docker's iptables (real Docker not used: %s)", reason)
		if containers, err = standIns(hosts, files, o.containers); err != nil {
			return err
		}
	}
	if len(containers) == 0 {
		fmt.Fprintln(w, "\nNo host got a lease, so there are no containers to connect. The xnetd logs above say why.")
		return nil
	}

	step(w, "measuring reachability: 3 pings from every container to every other one")
	matrix := reachability(ctx, containers)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	printMatrix(w, containers, matrix)
	if useDocker {
		printForwardDrops(w, dockers)
	}

	throughput(ctx, w, containers, matrix, o.duration)
	if o.keep && ctx.Err() == nil {
		keepUntilInterrupted(ctx, w, hosts, o.xnetd, useDocker)
		return nil
	}
	return ctx.Err()
}

// standIns plays Docker on every host that got a subnet: docker0 from the subnet file, then
// namespaces on veths into it.
func standIns(hosts []*harness.Host, files []subnetFileResult, perHost int) ([]container, error) {
	var cs []container
	for i, h := range hosts {
		if files[i].err != nil {
			continue
		}
		gw := netip.PrefixFrom(files[i].f.Subnet.Addr().Next(), files[i].f.Subnet.Bits())
		if err := h.SetupDocker0(gw, files[i].f.MTU); err != nil {
			return nil, err
		}
		for range perHost {
			c, err := h.AddContainer()
			if err != nil {
				return nil, err
			}
			cs = append(cs, container{Name: c.Role(), NS: c.Namespace, Host: h, IP: c.IP})
		}
	}
	return cs, nil
}

// startDockers starts a dockerd on every host that got a subnet, all at once; the slice has a
// nil for every host without one, and every started Docker even when another failed.
func startDockers(ctx context.Context, w io.Writer, hosts []*harness.Host, files []subnetFileResult) ([]*harness.Docker, error) {
	dockers := make([]*harness.Docker, len(hosts))
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		if files[i].err != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			dockers[i], errs[i] = h.StartDockerFromOptsFile(ctx)
		}()
	}
	wg.Wait()
	for _, d := range dockers {
		if d != nil {
			fmt.Fprintf(w, "    %s: dockerd %s, up in %v (storage %s)\n", d.Host.Name, strings.Join(d.NetworkOptions, " "),
				d.StartTime.Round(time.Millisecond), d.StorageDriver)
		}
	}
	return dockers, errors.Join(errs...)
}

// dockerRun is `docker run -d --name h1c1 busybox sleep` on every Docker, perHost times.
func dockerRun(ctx context.Context, dockers []*harness.Docker, perHost int) ([]container, error) {
	var cs []container
	for _, d := range dockers {
		if d == nil {
			continue
		}
		for k := range perHost {
			name := fmt.Sprintf("%sc%d", d.Host.Name, k+1)
			c, err := d.Run(ctx, name, "sleep", "86400")
			if err != nil {
				return nil, err
			}
			cs = append(cs, container{Name: name, NS: c.Namespace, Host: d.Host, IP: c.IP})
		}
	}
	return cs, nil
}

// printForwardDrops shows what Docker's FORWARD policy dropped in every host: on a host where
// the overlay's packets meet Docker's firewall, this is where they go.
func printForwardDrops(w io.Writer, dockers []*harness.Docker) {
	fmt.Fprintln(w, "\nDocker's firewall in every host (iptables -L FORWARD -v -n, first line): packets from the")
	fmt.Fprintln(w, "overlay into docker0 pass the FORWARD chain, and the policy counts those nothing accepted.")
	for _, d := range dockers {
		if d == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := d.Host.Run(ctx, "iptables", "-L", "FORWARD", "-v", "-n", "-x")
		cancel()
		if err != nil {
			fmt.Fprintf(w, "    %s: %v\n", d.Host.Name, err)
			continue
		}
		fmt.Fprintf(w, "    %s: %s\n", d.Host.Name, strings.SplitN(out, "\n", 2)[0])
	}
}

// keepUntilInterrupted prints how to enter the simulated hosts and waits for Ctrl-C.
func keepUntilInterrupted(ctx context.Context, w io.Writer, hosts []*harness.Host, xnetd string, docker bool) {
	step(w, "the cluster stays up until Ctrl-C; look inside it with:")
	for _, h := range hosts {
		fmt.Fprintf(w, "    nsenter --net=%s -- %s status --subnet-file %s\n", h.Path(), xnetd, h.SubnetFile())
	}
	if docker {
		for _, h := range hosts {
			fmt.Fprintf(w, "    DOCKER_HOST=unix://%s/dockerd/docker.sock %s ps\n", h.StateDir, harness.DockerCLIPath)
		}
		fmt.Fprintf(w, "    nsenter --net=%s -- iptables -L FORWARD -v -n\n", hosts[0].Path())
	}
	h := hosts[0]
	fmt.Fprintf(w, "    bpftool map dump pinned %s/routes\n", h.BPFFS)
	fmt.Fprintf(w, "    nsenter --net=%s -- bpftool net show\n", h.Path())
	<-ctx.Done()
}

type subnetFileResult struct {
	f   subnetmgr.SubnetFile
	err error
}

// waitSubnetFiles waits for each host's subnet file, giving up on a host whose xnetd exited.
func waitSubnetFiles(ctx context.Context, hosts []*harness.Host, daemons []*harness.Process, wait time.Duration) []subnetFileResult {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	res := make([]subnetFileResult, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				f, err := subnetmgr.ReadSubnetFile(h.SubnetFile())
				if err == nil {
					res[i] = subnetFileResult{f: f}
					return
				}
				if !errors.Is(err, os.ErrNotExist) {
					res[i] = subnetFileResult{err: err}
					return
				}
				if daemons[i].Exited() {
					res[i] = subnetFileResult{err: fmt.Errorf("xnetd exited: %v", daemons[i].Wait())}
					return
				}
				select {
				case <-ctx.Done():
					res[i] = subnetFileResult{err: fmt.Errorf("no subnet file after %v", wait)}
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}
	wg.Wait()
	return res
}

func listLeases(ctx context.Context, topo *harness.Topology) (map[netip.Addr]subnetmgr.Lease, error) {
	m, err := subnetmgr.New(subnetmgr.Options{
		Endpoints: []string{topo.EtcdLoopbackEndpoint()},
		Logger:    slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	leases, _, err := m.ListLeases(ctx)
	if err != nil {
		return nil, err
	}
	byIP := map[netip.Addr]subnetmgr.Lease{}
	for _, l := range leases {
		byIP[l.PublicIP] = l
	}
	return byIP, nil
}

// xnetdStatus is the part of `xnetd status -o json` the demo shows.
type xnetdStatus struct {
	Running    bool   `json:"running"`
	Ready      bool   `json:"ready"`
	Backend    string `json:"backend"`
	Mode       string `json:"mode"`
	ModeReason string `json:"mode_reason"`
	Skipped    []struct {
		Name   string `json:"name"`
		Reason string `json:"reason"`
	} `json:"skipped_backends"`
}

func status(ctx context.Context, xnetd string, h *harness.Host) (xnetdStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := h.Run(ctx, xnetd, "status", "--subnet-file", h.SubnetFile(), "-o", "json")
	var s xnetdStatus
	if jerr := json.Unmarshal([]byte(out), &s); jerr != nil {
		if err != nil {
			return s, err
		}
		return s, fmt.Errorf("xnetd status: %w", jerr)
	}
	return s, nil
}

func printHosts(ctx context.Context, w io.Writer, xnetd string, hosts []*harness.Host, daemons []*harness.Process,
	files []subnetFileResult, leases map[netip.Addr]subnetmgr.Lease, leaseErr error) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tUNDERLAY (eth0)\tLEASE IN ETCD\tLEASE BACKEND\tDOCKER0 (--bip)\tMTU\tXNETD")
	var problems, notes []string
	for i, h := range hosts {
		lease, docker0, mtu := "-", "-", "-"
		leaseType := "-"
		if l, ok := leases[h.UnderlayIP]; ok {
			lease, leaseType = l.Subnet.String(), l.BackendType
		}
		if files[i].err == nil {
			f := files[i].f
			docker0 = netip.PrefixFrom(f.Subnet.Addr().Next(), f.Subnet.Bits()).String()
			mtu = fmt.Sprint(f.MTU)
		} else {
			problems = append(problems, fmt.Sprintf("%s: %v", h.Name, files[i].err))
			if out := lastLines(daemons[i].Output(), 5); out != "" {
				problems = append(problems, "last lines of its xnetd log:\n"+indent(out, "    "))
			}
		}
		state := "running"
		if daemons[i].Exited() {
			state = "exited"
		} else if s, err := status(ctx, xnetd, h); err == nil {
			for _, sk := range s.Skipped {
				notes = append(notes, fmt.Sprintf("%s: xnetd skipped backend %s: %s", h.Name, sk.Name, sk.Reason))
			}
			state = "backend " + s.Backend
			if s.Mode != "" && s.Mode != s.Backend {
				state += " (" + s.Mode + ")"
			}
			if !s.Ready {
				state += ", not ready"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", h.Name, h.UnderlayIP, lease, leaseType, docker0, mtu, state)
	}
	tw.Flush()
	if leaseErr != nil {
		fmt.Fprintf(w, "(could not list the leases in etcd: %v)\n", leaseErr)
	}
	for _, n := range notes {
		fmt.Fprintln(w, "  note:", n)
	}
	for _, p := range problems {
		fmt.Fprintln(w, "  problem:", p)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimSpace(strings.Join(lines, "\n"))
}

func indent(s, pre string) string {
	return pre + strings.ReplaceAll(s, "\n", "\n"+pre)
}

type pingResult struct{ sent, received int }

func reachability(ctx context.Context, cs []container) [][]pingResult {
	m := make([][]pingResult, len(cs))
	var wg sync.WaitGroup
	for i := range cs {
		m[i] = make([]pingResult, len(cs))
		for j := range cs {
			if i == j {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, r, err := harness.Ping(ctx, cs[i].NS, cs[j].IP, 3, 100*time.Millisecond)
				if err != nil {
					s, r = 3, 0
				}
				m[i][j] = pingResult{s, r}
			}()
		}
	}
	wg.Wait()
	return m
}

func cname(c container) string { return c.Name }

func printMatrix(w io.Writer, cs []container, m [][]pingResult) {
	fmt.Fprintln(w, "\nReachability (ping from row to column; ok = 3 of 3 replies, -- = none):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "FROM \\ TO\t\t")
	for _, c := range cs {
		fmt.Fprintf(tw, "%s\t", cname(c))
	}
	fmt.Fprintln(tw)
	fmt.Fprint(tw, "\t\t")
	for _, c := range cs {
		fmt.Fprintf(tw, "%s\t", c.IP)
	}
	fmt.Fprintln(tw)
	var broken []string
	pairs, ok := 0, 0
	for i, c := range cs {
		fmt.Fprintf(tw, "%s\t%s\t", cname(c), c.IP)
		for j := range cs {
			cell := "."
			if i != j {
				pairs++
				r := m[i][j]
				switch {
				case r.received == r.sent && r.sent > 0:
					cell = "ok"
					ok++
				case r.received == 0:
					cell = "--"
					broken = append(broken, cname(c)+"->"+cname(cs[j]))
				default:
					cell = fmt.Sprintf("%d/%d", r.received, r.sent)
					broken = append(broken, cname(c)+"->"+cname(cs[j])+" (lossy)")
				}
			}
			fmt.Fprintf(tw, "%s\t", cell)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	if len(broken) == 0 {
		fmt.Fprintf(w, "All %d pairs reach each other.\n", pairs)
		return
	}
	fmt.Fprintf(w, "%d of %d pairs reach each other. Not working: %s\n", ok, pairs, strings.Join(broken, ", "))
	sameHostOnly := true
	for i := range cs {
		for j := range cs {
			if i != j && cs[i].Host == cs[j].Host && m[i][j].received == 0 {
				sameHostOnly = false
			}
		}
	}
	if sameHostOnly {
		fmt.Fprintln(w, "Containers on the same host reach each other through docker0; the failing pairs are")
		fmt.Fprintln(w, "across hosts, which is the overlay's job: xnetd's datapath does not carry them yet.")
	}
}

// throughput runs iperf3 between the first containers of two different hosts that reach each
// other.
func throughput(ctx context.Context, w io.Writer, cs []container, m [][]pingResult, d time.Duration) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		fmt.Fprintln(w, "\nThroughput: skipped, iperf3 is not installed (apt-get install iperf3).")
		return
	}
	for i := range cs {
		for j := range cs {
			if cs[i].Host == cs[j].Host || m[i][j].received == 0 || m[j][i].received == 0 {
				continue
			}
			step(w, "measuring throughput %s -> %s for %v (iperf3, 1 TCP stream)", cname(cs[i]), cname(cs[j]), d)
			srv, err := harness.StartIperf3Server(ctx, cs[j].NS, 5201)
			if err != nil {
				fmt.Fprintln(w, "Throughput: iperf3 server:", err)
				return
			}
			defer srv.Kill()
			r, err := harness.RunIperf3(ctx, cs[i].NS, harness.Iperf3Options{Server: cs[j].IP, Port: 5201, Duration: d})
			if err != nil && ctx.Err() == nil {
				fmt.Fprintln(w, "Throughput:", err)
			}
			if err != nil {
				return
			}
			fmt.Fprintf(w, "Throughput %s (%s) -> %s (%s): %.2f Gbit/s received, %d TCP retransmits\n",
				cname(cs[i]), cs[i].Host.Name, cname(cs[j]), cs[j].Host.Name, r.BitsPerSecond/1e9, r.Retransmits)
			return
		}
	}
	fmt.Fprintln(w, "\nThroughput: skipped, no two containers on different hosts reach each other.")
}
