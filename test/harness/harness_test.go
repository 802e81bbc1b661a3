package harness

import (
	"bufio"
	"context"
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
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestOptionsAreValidated(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	cases := []struct {
		desc string
		opts Options
		want string
	}{
		{"no hosts", Options{Hosts: 0}, "Options.Hosts=0"},
		{"too many hosts", Options{Hosts: 201}, "Options.Hosts=201"},
		{"tiny underlay MTU", Options{Hosts: 1, UnderlayMTU: 500}, "Options.UnderlayMTU=500"},
		{"run id with a dash could match other runs' names", Options{Hosts: 1, RunID: "a-b"}, `Options.RunID="a-b"`},
		{"run id too long for interface names", Options{Hosts: 1, RunID: "abcdefghi"}, "Options.RunID"},
		{"more far hosts than hosts", Options{Hosts: 2, FarHosts: 3}, "Options.FarHosts=3"},
		{"more hosts than a /25 segment holds", Options{Hosts: 101, FarHosts: 1}, "Options.FarHosts=1"},
	}
	for _, c := range cases {
		t.Run(c.desc, func(t *testing.T) {
			topo, err := New(context.Background(), c.opts)
			if err == nil {
				topo.Close()
				t.Fatalf("New(%+v) succeeded, want error mentioning %q", c.opts, c.want)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("New(%+v) = %v, want error mentioning %q", c.opts, err, c.want)
			}
		})
	}
	if err := CleanupStale(""); err == nil {
		t.Fatal(`CleanupStale("") succeeded: an empty id would match every run`)
	}
}

// The harness end to end: two hosts, etcd, docker0, containers; a command in a container
// prints the container's own address, containers reach each other across hosts once the
// host-gw routes are in, and etcd answers at its underlay address from inside a host.
func TestTwoHostsContainersRunCommandsAndReachEachOther(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 2, WithEtcd: true})
	ctx := ctxFor(t, 30*time.Second)
	hosts := topo.Hosts()
	var cs []*Container
	for i, h := range hosts {
		if err := h.SetupDocker0(netip.MustParsePrefix(fmt.Sprintf("10.244.%d.1/24", i+1)), 1500); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	if got, want := cs[1].IP, netip.MustParseAddr("10.244.2.2"); got != want {
		t.Fatalf("second host's first container has %s, want %s (first free address after the gateway)", got, want)
	}

	out, err := cs[0].Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, " 10.244.1.2/24 ") {
		t.Fatalf("container's `ip addr show dev eth0` printed %q, want its address 10.244.1.2/24", out)
	}
	route, err := cs[0].Run(ctx, "ip", "route", "show", "default")
	if err != nil || !strings.Contains(route, "via 10.244.1.1") {
		t.Fatalf("container default route = %q (%v), want via the docker0 gateway 10.244.1.1", route, err)
	}

	// Without routes between hosts the containers must not reach each other: Ping must be able
	// to say no.
	if _, recv, err := Ping(ctx, cs[0].Namespace, cs[1].IP, 1, 0); err != nil || recv != 0 {
		t.Fatalf("ping across hosts before any route: received %d (%v), want 0", recv, err)
	}
	if _, recv, err := Ping(ctx, cs[0].Namespace, hosts[0].UnderlayIP, 2, 10*time.Millisecond); err != nil || recv != 2 {
		t.Fatalf("container -> its host's underlay address: received %d of 2 (%v), want 2", recv, err)
	}
	if err := ConfigureHostGW(hosts); err != nil {
		t.Fatal(err)
	}
	sent, recv, err := Ping(ctx, cs[0].Namespace, cs[1].IP, 3, 10*time.Millisecond)
	if err != nil || sent != 3 || recv != 3 {
		t.Fatalf("ping across hosts with host-gw routes: %d/%d (%v), want 3/3", recv, sent, err)
	}

	if _, err := exec.LookPath("iperf3"); err == nil {
		srv, err := StartIperf3Server(ctx, cs[1].Namespace, 5201)
		if err != nil {
			t.Fatal(err)
		}
		r, err := RunIperf3(ctx, cs[0].Namespace, Iperf3Options{Server: cs[1].IP, Port: 5201, Duration: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if r.ReceivedBytes <= 0 || r.BitsPerSecond <= 0 || r.Seconds <= 0 {
			t.Fatalf("iperf3 across hosts: %+v, want bytes received", r)
		}
		// iperf3 exits 1 on SIGTERM, so Stop would report it: Kill.
		if err := srv.Kill(); err != nil {
			t.Fatalf("iperf3 server: %v", err)
		}
	}

	// etcd from inside a host namespace, at the address xnetd is given.
	var conn net.Conn
	err = hosts[1].Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", strings.TrimPrefix(topo.EtcdEndpoint(), "http://"), 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("dial etcd at %s from %s: %v", topo.EtcdEndpoint(), hosts[1].Name, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "GET /version HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("etcd /version via the underlay relay: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("etcd /version via the underlay relay: %s", resp.Status)
	}
	if _, err := topo.EtcdClient().Put(ctx, "/harness/check", "ok"); err != nil {
		t.Fatalf("etcd client of the test process: %v", err)
	}
}

// Two segments: hosts on the near one are neighbours (one L2 hop, the peer's own MAC), the far
// host is reached through the router (its MAC is the router's), etcd answers on both, and a host
// moved to the other segment is re-numbered and becomes a neighbour.
func TestTwoSegmentsJoinedByARouter(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 3, FarHosts: 1, WithEtcd: true})
	ctx := ctxFor(t, 30*time.Second)
	h := topo.Hosts()
	want := []struct {
		ip  string
		seg int
	}{{"198.18.0.11", Near}, {"198.18.0.12", Near}, {"198.18.0.141", Far}}
	for i, w := range want {
		if h[i].UnderlayIP.String() != w.ip || h[i].Segment() != w.seg {
			t.Fatalf("%s: %s on segment %d, want %s on %d", h[i].Name, h[i].UnderlayIP, h[i].Segment(), w.ip, w.seg)
		}
	}
	// nextHop is the address h's kernel sends to for dst: the peer itself, or a router.
	nextHop := func(from *Host, dst netip.Addr) string {
		t.Helper()
		out, err := from.Run(ctx, "ip", "-4", "route", "get", dst.String())
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(out); len(f) > 2 && f[1] == "via" {
			return f[2]
		}
		return dst.String()
	}
	reach := func(from *Host, dst netip.Addr) {
		t.Helper()
		if _, recv, err := Ping(ctx, from.Namespace, dst, 3, 20*time.Millisecond); err != nil || recv == 0 {
			t.Fatalf("%s cannot reach %s (%v)", from.Name, dst, err)
		}
	}
	reach(h[0], h[1].UnderlayIP)
	reach(h[0], h[2].UnderlayIP)
	reach(h[2], UnderlayGateway)
	if got := nextHop(h[0], h[1].UnderlayIP); got != h[1].UnderlayIP.String() {
		t.Errorf("h1 -> h2 goes via %s, want directly (one segment)", got)
	}
	if got := nextHop(h[0], h[2].UnderlayIP); got != RouterNear.String() {
		t.Errorf("h1 -> h3 goes via %s, want the router %s", got, RouterNear)
	}
	if got := nextHop(h[2], h[0].UnderlayIP); got != RouterFar.String() {
		t.Errorf("h3 -> h1 goes via %s, want the router %s", got, RouterFar)
	}
	var conn net.Conn
	if err := h[2].Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", strings.TrimPrefix(topo.EtcdEndpoint(), "http://"), 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("etcd from the far segment: %v", err)
	}
	conn.Close()

	if err := h[2].MoveToSegment(ctx, Near); err != nil {
		t.Fatal(err)
	}
	if h[2].UnderlayIP.String() != "198.18.0.13" || h[2].Segment() != Near {
		t.Fatalf("moved h3: %s on segment %d, want 198.18.0.13 on the near segment", h[2].UnderlayIP, h[2].Segment())
	}
	reach(h[0], h[2].UnderlayIP)
	if got := nextHop(h[0], h[2].UnderlayIP); got != h[2].UnderlayIP.String() {
		t.Errorf("h1 -> moved h3 goes via %s, want directly", got)
	}
	if _, recv, _ := Ping(ctx, h[0].Namespace, netip.MustParseAddr("198.18.0.141"), 1, 0); recv != 0 {
		t.Error("h3's old far address still answers after the move")
	}
}

// The other reference datapath: flannel's kernel VXLAN setup carries container traffic.
func TestFlannelVXLANBaselineCarriesTraffic(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 2})
	ctx := ctxFor(t, 30*time.Second)
	var cs []*Container
	for i, h := range topo.Hosts() {
		if err := h.SetupDocker0(netip.MustParsePrefix(fmt.Sprintf("10.244.%d.1/24", i+5)), 1450); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	if err := ConfigureFlannelVXLAN(topo.Hosts()); err != nil {
		t.Fatal(err)
	}
	if _, recv, err := Ping(ctx, cs[0].Namespace, cs[1].IP, 3, 10*time.Millisecond); err != nil || recv != 3 {
		t.Fatalf("ping across hosts over flannel.1: received %d of 3 (%v)", recv, err)
	}
	link, err := topo.Hosts()[0].Run(ctx, "ip", "-d", "link", "show", FlannelVXLANDevice)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"mtu 1450", "vxlan id 1 ", "dstport 8472", "nolearning", "0e:78:c6:12:00:0b"} {
		if !strings.Contains(link, want) {
			t.Errorf("flannel.1 lacks %q:\n%s", want, link)
		}
	}
}

func TestProcessStopAndOutput(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 1})
	h := topo.Hosts()[0]
	p, err := h.Start("sh", "-c", "echo started; ip -4 -o addr show dev eth0; exec sleep 60")
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.Output(), "198.18.0.11/24") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(p.Output(), "started") || !strings.Contains(p.Output(), "198.18.0.11/24") {
		t.Fatalf("output = %q, want the host's eth0 address", p.Output())
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop of a process that exits on SIGTERM: %v", err)
	}
	if !p.Exited() {
		t.Fatal("process still running after Stop")
	}
	fail, err := h.Start("sh", "-c", "exit 3")
	if err != nil {
		t.Fatal(err)
	}
	if err := fail.Wait(); err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("Wait = %v, want exit status 3", err)
	}
}

func listNetns(t *testing.T) []string {
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func rootLinks(t *testing.T) []string {
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, i := range ifs {
		names = append(names, i.Name)
	}
	return names
}

func withPrefix(names []string, prefix string) []string {
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z"
}

func TestCloseRemovesEverythingItMade(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	linksBefore := rootLinks(t)
	topo, err := New(ctxFor(t, 30*time.Second), Options{Hosts: 2, WithEtcd: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	prefix := nsPrefix + topo.ID() + "-"
	var procs []*Process
	for i, h := range topo.Hosts() {
		if err := h.SetupDocker0(netip.MustParsePrefix(fmt.Sprintf("10.244.%d.1/24", i+1)), 1500); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		// A process that ignores SIGTERM, in a container, so Close has to escalate.
		p, err := c.Start("sh", "-c", "trap '' TERM; while :; do sleep 1; done")
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	made := withPrefix(listNetns(t), prefix)
	if want := []string{prefix + "u", prefix + "h1", prefix + "h2", prefix + "h1c1", prefix + "h2c1"}; !sameSet(made, want) {
		t.Fatalf("namespaces of the run = %v, want %v", made, want)
	}
	if got := topo.Namespaces(); !sameSet(got, made) {
		t.Fatalf("Namespaces() = %v, /run/netns has %v", got, made)
	}
	if links := rootLinks(t); !sameSet(links, linksBefore) {
		t.Fatalf("root namespace links changed while the topology is up: %v -> %v (the harness must add none)", linksBefore, links)
	}
	bpffs := topo.Hosts()[0].BPFFS
	if !isBPFFS(bpffs) {
		t.Fatalf("host's BPFFS %s is not a bpffs mount", bpffs)
	}
	stateDir := topo.Hosts()[0].StateDir
	if err := topo.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if left := withPrefix(listNetns(t), prefix); len(left) > 0 {
		t.Fatalf("namespaces left after Close: %v", left)
	}
	if links := rootLinks(t); !sameSet(links, linksBefore) {
		t.Fatalf("root namespace links after Close: %v, before: %v", links, linksBefore)
	}
	for _, p := range procs {
		if alive(p.Pid) {
			t.Errorf("pid %d still running after Close", p.Pid)
		}
	}
	for _, d := range []string{bpffs, stateDir} {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Close (%v)", d, err)
		}
	}
	if mounted(t, bpffs) {
		t.Errorf("%s still mounted after Close", bpffs)
	}
	if err := topo.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// crashEnv makes the test binary, re-run as a child, build a topology and exit without Close,
// as a test binary killed by a timeout would.
const crashEnv = "XNET_HARNESS_CRASH_RUN_ID"

func TestHelperCrashingRun(t *testing.T) {
	id := os.Getenv(crashEnv)
	if id == "" {
		t.Skip("helper for TestCleanupStaleRemovesOnlyThatRun")
	}
	topo, err := New(context.Background(), Options{Hosts: 2, RunID: id})
	if err != nil {
		fmt.Println("NEW FAILED:", err)
		os.Exit(2)
	}
	h := topo.Hosts()[0]
	if err := h.SetupDocker0(netip.MustParsePrefix("10.244.9.1/24"), 1500); err != nil {
		os.Exit(2)
	}
	if _, err := h.AddContainer(); err != nil {
		os.Exit(2)
	}
	os.Exit(0) // no Close: leftovers stay
}

func TestCleanupStaleRemovesOnlyThatRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	other := NewForTest(t, Options{Hosts: 1})
	crashID := newRunID()
	t.Cleanup(func() { CleanupStale(crashID) })

	child := exec.Command(os.Args[0], "-test.run=^TestHelperCrashingRun$", "-test.count=1")
	child.Env = append(os.Environ(), crashEnv+"="+crashID)
	if out, err := child.CombinedOutput(); err != nil {
		t.Fatalf("crashing child: %v\n%s", err, out)
	}
	prefix := nsPrefix + crashID + "-"
	left := withPrefix(listNetns(t), prefix)
	if len(left) != 4 {
		t.Fatalf("the crashed run left %v, want its 4 namespaces (u, h1, h2, h1c1)", left)
	}
	// A daemon that outlived its test (started without the parent-death signal).
	daemon := exec.Command("nsenter", "--net="+filepath.Join(netnsDir, prefix+"h1"), "--", "sleep", "300")
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	defer daemon.Process.Kill()
	// nsenter enters the namespace just after it starts: wait for that, or CleanupStale could
	// scan before the process is in there.
	var nsStat syscall.Stat_t
	if err := syscall.Stat(filepath.Join(netnsDir, prefix+"h1"), &nsStat); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", daemon.Process.Pid), &st) == nil && st.Ino == nsStat.Ino {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the leftover daemon never entered the crashed run's namespace")
		}
		time.Sleep(10 * time.Millisecond)
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+crashID+"-*"))
	if len(dirs) != 1 {
		t.Fatalf("crashed run's temp dirs: %v, want 1", dirs)
	}
	bpffs := filepath.Join(dirs[0], "h1", "bpffs")
	if !isBPFFS(bpffs) {
		t.Fatalf("crashed run's %s is not a bpffs mount", bpffs)
	}

	if err := CleanupStale(crashID); err != nil {
		t.Fatalf("CleanupStale: %v", err)
	}
	if left := withPrefix(listNetns(t), prefix); len(left) > 0 {
		t.Fatalf("left after CleanupStale: %v", left)
	}
	err := daemon.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("leftover daemon in the crashed run's namespace: wait = %v, want killed by SIGKILL", err)
	}
	if _, err := os.Stat(dirs[0]); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("crashed run's temp dir %s still there (%v)", dirs[0], err)
	}
	if mounted(t, dirs[0]) {
		t.Fatalf("crashed run's bpffs still mounted under %s", dirs[0])
	}
	// The other run is untouched.
	for _, n := range other.Namespaces() {
		if _, err := os.Stat(filepath.Join(netnsDir, n)); err != nil {
			t.Fatalf("CleanupStale(%s) removed %s of run %s: %v", crashID, n, other.ID(), err)
		}
	}
	ctx := ctxFor(t, 10*time.Second)
	if _, err := other.Hosts()[0].Run(ctx, "ip", "link", "show", "eth0"); err != nil {
		t.Fatalf("other run's host lost eth0: %v", err)
	}
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

func mounted(t *testing.T, under string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), " "+under)
}
