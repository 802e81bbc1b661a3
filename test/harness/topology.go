package harness

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Underlay addressing: the underlay namespace's bridge is the gateway, hosts count up from .11.
var (
	UnderlayPrefix  = netip.MustParsePrefix("198.18.0.0/24")
	UnderlayGateway = netip.MustParseAddr("198.18.0.1")
)

// With Options.FarHosts the underlay is two L2 segments, the two halves of UnderlayPrefix,
// joined by a router namespace: the near one on br0 (the gateway and etcd at .1 as always, the
// router at .126, hosts from .11), the far one on br1 (the router at .129, hosts from .139).
var (
	NearSegment = netip.MustParsePrefix("198.18.0.0/25")
	FarSegment  = netip.MustParsePrefix("198.18.0.128/25")
	RouterNear  = netip.MustParseAddr("198.18.0.126")
	RouterFar   = netip.MustParseAddr("198.18.0.129")
)

// Segments of a two-segment topology (Host.Segment).
const (
	Near = 0 // br0, NearSegment
	Far  = 1 // br1, FarSegment, behind the router
)

const (
	hostAddrBase    = 11  // host i (0-based) has 198.18.0.(11+i)
	farHostAddrBase = 139 // on the far segment, 198.18.0.(139+i)
	maxHosts        = 200
	maxSegmentHosts = 100             // per /25 of a two-segment topology, whichever segment a host is on
	nsPrefix        = "xn-"           // every namespace: xn-<id>-<role>
	dirPrefix       = "xnet-harness-" // every temp dir: $TMPDIR/xnet-harness-<id>
)

// Options describe a topology.
type Options struct {
	Hosts       int  // simulated hosts, each with eth0 on the underlay bridge (1..200)
	UnderlayMTU int  // MTU of br0 and every eth0; default 1500
	WithEtcd    bool // start an embedded etcd reachable at EtcdEndpoint() from every host
	// FarHosts puts the last FarHosts hosts on a second L2 segment behind a router namespace
	// (NearSegment, FarSegment), so one cluster has peers on its own segment and peers it
	// reaches only through the router: DirectRouting's two paths. 0 keeps one segment.
	FarHosts int
	// IPv6Underlay gives every host an IPv6 underlay address too (Host.AddIPv6Underlay; one
	// segment only), for dual-stack overlays whose IPv6 traffic crosses an IPv6 underlay.
	IPv6Underlay bool
	// RunID fixes the run id (lowercase letters and digits, 1-8 characters) instead of a random
	// one. Reusing a crashed run's id makes New remove that run's leftovers first.
	RunID  string
	Logger *slog.Logger // default: discard
}

// Topology is one set of simulated hosts. Close removes everything it made.
type Topology struct {
	id          string
	log         *slog.Logger
	mtu         int
	twoSegments bool
	ipv6        bool
	baseDir     string
	underlay    *Namespace
	router      *Namespace // nil with one segment
	hosts       []*Host
	etcd        *etcdServer

	mu        sync.Mutex
	procs     []*Process
	netnsList []string // in creation order
	closed    bool
}

var runIDPattern = regexp.MustCompile(`^[a-z0-9]{1,8}$`)

func newRunID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// New builds the topology: underlay namespace with br0, the host namespaces with eth0, and
// etcd if asked. On error it removes whatever it had made and returns nil.
func New(ctx context.Context, opts Options) (*Topology, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("harness: network namespaces need root (run as root or skip)")
	}
	if opts.Hosts < 1 || opts.Hosts > maxHosts {
		return nil, fmt.Errorf("harness: Options.Hosts=%d, want 1..%d", opts.Hosts, maxHosts)
	}
	if opts.FarHosts < 0 || opts.FarHosts > opts.Hosts || opts.FarHosts > 0 && opts.Hosts > maxSegmentHosts {
		return nil, fmt.Errorf("harness: Options.FarHosts=%d with %d hosts, want 0..Hosts and at most %d hosts on two segments", opts.FarHosts, opts.Hosts, maxSegmentHosts)
	}
	if opts.UnderlayMTU == 0 {
		opts.UnderlayMTU = 1500
	}
	if opts.UnderlayMTU < 1280 || opts.UnderlayMTU > 65535 {
		return nil, fmt.Errorf("harness: Options.UnderlayMTU=%d, want 1280..65535", opts.UnderlayMTU)
	}
	if opts.RunID == "" {
		opts.RunID = newRunID()
	} else if !runIDPattern.MatchString(opts.RunID) {
		return nil, fmt.Errorf("harness: Options.RunID=%q, want 1-8 lowercase letters or digits", opts.RunID)
	} else if err := CleanupStale(opts.RunID); err != nil {
		return nil, fmt.Errorf("harness: remove leftovers of run %s: %w", opts.RunID, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	t := &Topology{id: opts.RunID, log: log.With("run", opts.RunID), mtu: opts.UnderlayMTU, twoSegments: opts.FarHosts > 0}
	if err := t.build(ctx, opts); err != nil {
		if cerr := t.Close(); cerr != nil {
			err = fmt.Errorf("%w (and cleanup: %v)", err, cerr)
		}
		return nil, err
	}
	return t, nil
}

// NewForTest is New for tests: it skips when not root, fails the test on error, and closes the
// topology in t.Cleanup (also when the test fails).
func NewForTest(tb testing.TB, opts Options) *Topology {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("harness: needs root for network namespaces")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(tbWriter{tb}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t, err := New(ctx, opts)
	if err != nil {
		tb.Fatalf("harness.New: %v", err)
	}
	tb.Cleanup(func() {
		if err := t.Close(); err != nil {
			tb.Errorf("harness Close: %v", err)
		}
	})
	return t
}

type tbWriter struct{ tb testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (t *Topology) nsName(role string) string { return nsPrefix + t.id + "-" + role }

func (t *Topology) addNamespace(ctx context.Context, role string) (*Namespace, error) {
	n := &Namespace{Name: t.nsName(role), topo: t}
	t.mu.Lock()
	t.netnsList = append(t.netnsList, n.Name)
	t.mu.Unlock()
	if err := addNetns(ctx, n.Name); err != nil {
		return nil, err
	}
	return n, nil
}

func (t *Topology) build(ctx context.Context, opts Options) error {
	base, err := os.MkdirTemp("", dirPrefix+t.id+"-")
	if err != nil {
		return fmt.Errorf("harness: temp dir: %w", err)
	}
	t.baseDir = base
	if t.underlay, err = t.addNamespace(ctx, "u"); err != nil {
		return err
	}
	gw := netip.PrefixFrom(UnderlayGateway, UnderlayPrefix.Bits())
	if t.twoSegments {
		gw = netip.PrefixFrom(UnderlayGateway, NearSegment.Bits())
	}
	err = t.underlay.IP(ctx,
		"link add br0 type bridge",
		fmt.Sprintf("link set br0 mtu %d", t.mtu),
		fmt.Sprintf("addr add %s dev br0", gw),
		"link set br0 up")
	if err != nil {
		return err
	}
	if t.twoSegments {
		if err := t.addRouter(ctx); err != nil {
			return err
		}
	}
	t.ipv6 = opts.IPv6Underlay
	for i := 0; i < opts.Hosts; i++ {
		seg := Near
		if i >= opts.Hosts-opts.FarHosts {
			seg = Far
		}
		if err := t.addHost(ctx, i, seg); err != nil {
			return err
		}
	}
	if opts.WithEtcd {
		t.etcd, err = startEtcd(ctx, filepath.Join(t.baseDir, "etcd"), t.log)
		if err != nil {
			return err
		}
		var l net.Listener
		err = t.underlay.Do(func() error {
			var err error
			l, err = net.Listen("tcp4", netip.AddrPortFrom(UnderlayGateway, EtcdPort).String())
			return err
		})
		if err != nil {
			return fmt.Errorf("harness: etcd relay listener in %s: %w", t.underlay.Name, err)
		}
		t.etcd.serveRelay(l)
		if t.ipv6 {
			// A host without IPv4 (its eth0 holding only the IPv6 underlay address) reaches
			// etcd at EtcdEndpointV6.
			err = t.underlay.Do(func() error {
				var err error
				l, err = net.Listen("tcp6", netip.AddrPortFrom(UnderlayGatewayV6, EtcdPort).String())
				return err
			})
			if err != nil {
				return fmt.Errorf("harness: etcd IPv6 relay listener in %s: %w", t.underlay.Name, err)
			}
			t.etcd.serveRelayV6(l)
		}
	}
	return nil
}

// addRouter builds the far segment and the router joining it to the near one: bridge br1 in
// the underlay namespace (a plain L2 segment, no address there), and a namespace "r" with a leg
// on each bridge that forwards between them. The underlay namespace reaches the far segment
// through it, so etcd answers far hosts.
func (t *Topology) addRouter(ctx context.Context) error {
	r, err := t.addNamespace(ctx, "r")
	if err != nil {
		return err
	}
	t.router = r
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		// IPv6 copies "all" only to links that exist; later ones take "default".
		{"net.ipv6.conf.all.forwarding", "1"},
		{"net.ipv6.conf.default.forwarding", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
	} {
		if err := r.Sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	err = t.underlay.IP(ctx,
		"link add br1 type bridge",
		fmt.Sprintf("link set br1 mtu %d up", t.mtu),
		fmt.Sprintf("link add r-near type veth peer name near netns %s", r.Name),
		fmt.Sprintf("link add r-far type veth peer name far netns %s", r.Name),
		fmt.Sprintf("link set r-near mtu %d master br0 up", t.mtu),
		fmt.Sprintf("link set r-far mtu %d master br1 up", t.mtu))
	if err != nil {
		return err
	}
	err = r.IP(ctx,
		fmt.Sprintf("link set near mtu %d up", t.mtu),
		fmt.Sprintf("link set far mtu %d up", t.mtu),
		fmt.Sprintf("addr add %s/%d dev near", RouterNear, NearSegment.Bits()),
		fmt.Sprintf("addr add %s/%d dev far", RouterFar, FarSegment.Bits()))
	if err != nil {
		return err
	}
	return t.underlay.IP(ctx, fmt.Sprintf("route add %s via %s dev br0", FarSegment, RouterNear))
}

// segmentAddr is host i's underlay address on segment seg, and the commands that give eth0
// that address and the routes of the segment (run in the host's namespace).
func (t *Topology) segmentAddr(i, seg int) (netip.Addr, []string) {
	if !t.twoSegments {
		ip := netip.AddrFrom4([4]byte{198, 18, 0, byte(hostAddrBase + i)})
		return ip, []string{
			fmt.Sprintf("addr add %s/%d dev eth0", ip, UnderlayPrefix.Bits()),
			fmt.Sprintf("route add default via %s dev eth0", UnderlayGateway)}
	}
	if seg == Far {
		ip := netip.AddrFrom4([4]byte{198, 18, 0, byte(farHostAddrBase + i)})
		return ip, []string{
			fmt.Sprintf("addr add %s/%d dev eth0", ip, FarSegment.Bits()),
			fmt.Sprintf("route add default via %s dev eth0", RouterFar)}
	}
	ip := netip.AddrFrom4([4]byte{198, 18, 0, byte(hostAddrBase + i)})
	return ip, []string{
		fmt.Sprintf("addr add %s/%d dev eth0", ip, NearSegment.Bits()),
		fmt.Sprintf("route add default via %s dev eth0", UnderlayGateway),
		fmt.Sprintf("route add %s via %s dev eth0", FarSegment, RouterNear)}
}

func (t *Topology) addHost(ctx context.Context, i, seg int) error {
	name := "h" + strconv.Itoa(i+1)
	ns, err := t.addNamespace(ctx, name)
	if err != nil {
		return err
	}
	ip, addrCmds := t.segmentAddr(i, seg)
	h := &Host{
		Namespace:  ns,
		Index:      i,
		Name:       name,
		UnderlayIP: ip,
		StateDir:   filepath.Join(t.baseDir, name),
		BPFFS:      filepath.Join(t.baseDir, name, "bpffs"),
		topo:       t,
		segment:    seg,
	}
	t.hosts = append(t.hosts, h)
	if err := os.MkdirAll(h.StateDir, 0o755); err != nil {
		return fmt.Errorf("harness: state dir of %s: %w", name, err)
	}
	if err := mountBPFFS(h.BPFFS); err != nil {
		return fmt.Errorf("harness: bpffs of %s: %w", name, err)
	}
	// A host forwards between docker0 and eth0. rp_filter is 0 as in a new namespace (and many
	// clouds); tests that want a strict host set it with Sysctl before traffic flows. "default"
	// is set before any link exists so eth0 and docker0 inherit it.
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		// IPv6 copies "all" only to links that exist; later ones take "default".
		{"net.ipv6.conf.all.forwarding", "1"},
		{"net.ipv6.conf.default.forwarding", "1"},
		{"net.ipv4.conf.all.rp_filter", "0"},
		{"net.ipv4.conf.default.rp_filter", "0"},
	} {
		if err := ns.Sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	// Both ends are created in their namespaces: nothing appears in the root namespace.
	err = t.underlay.IP(ctx,
		fmt.Sprintf("link add %s type veth peer name eth0 netns %s", name, ns.Name),
		fmt.Sprintf("link set %s mtu %d master %s up", name, t.mtu, segmentBridge(seg)))
	if err != nil {
		return err
	}
	if err := ns.IP(ctx, append([]string{fmt.Sprintf("link set eth0 mtu %d up", t.mtu)}, addrCmds...)...); err != nil {
		return err
	}
	if t.ipv6 {
		return h.AddIPv6Underlay(ctx)
	}
	return nil
}

// segmentBridge is the underlay namespace's bridge of a segment.
func segmentBridge(seg int) string {
	if seg == Far {
		return "br1"
	}
	return "br0"
}

// ID is the run id that every name of this topology contains.
func (t *Topology) ID() string { return t.id }

// EtcdEndpoint is the etcd URL for processes inside the topology.
func (t *Topology) EtcdEndpoint() string {
	return "http://" + netip.AddrPortFrom(UnderlayGateway, EtcdPort).String()
}

// EtcdEndpointV6 is etcd's URL on the IPv6 underlay gateway, served with Options.IPv6Underlay
// (and WithEtcd): for hosts without an IPv4 address.
func (t *Topology) EtcdEndpointV6() string {
	return "http://" + netip.AddrPortFrom(UnderlayGatewayV6, EtcdPort).String()
}

// EtcdClient is a client for the test process itself (root namespace, loopback); nil without
// Options.WithEtcd. The topology closes it.
func (t *Topology) EtcdClient() *clientv3.Client {
	if t.etcd == nil {
		return nil
	}
	return t.etcd.client
}

// EtcdLoopbackEndpoint is the etcd URL for code running in the root namespace.
func (t *Topology) EtcdLoopbackEndpoint() string {
	if t.etcd == nil {
		return ""
	}
	return "http://" + t.etcd.loopback
}

// Underlay is the namespace holding br0 (198.18.0.1/24), e.g. for tcpdump on a host's port
// (named like the host: "h1"). With two segments it holds br1 too.
func (t *Topology) Underlay() *Namespace { return t.underlay }

// Router is the namespace joining the two segments (legs "near" and "far"); nil with one.
func (t *Topology) Router() *Namespace { return t.router }

// Hosts are the simulated hosts in order h1, h2, ...
func (t *Topology) Hosts() []*Host { return append([]*Host(nil), t.hosts...) }

// Namespaces lists the names of every namespace the topology made, in creation order.
func (t *Topology) Namespaces() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.netnsList...)
}

func (t *Topology) track(p *Process) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.procs = append(t.procs, p)
}

// Close stops every process the topology started, stops etcd, and removes every namespace,
// pin directory and temp directory of this run (also ones an earlier crashed run with the same
// id left behind). It is safe to call more than once and after a failed New.
func (t *Topology) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	procs := append([]*Process(nil), t.procs...)
	t.mu.Unlock()

	var errs []error
	// SIGTERM everything first and wait in parallel, so slow exits do not add up.
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = p.stop(syscall.SIGTERM, stopGrace)
		}()
	}
	wg.Wait()
	if t.etcd != nil {
		t.etcd.close()
	}
	if err := CleanupStale(t.id); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// CleanupStale removes what the run with this id left behind: processes living in its
// namespaces (SIGKILL), its namespaces (xn-<id>-*), its bpffs mounts and its temp directories
// ($TMPDIR/xnet-harness-<id>-*). Nothing of any other run is touched.
func CleanupStale(id string) error {
	if !runIDPattern.MatchString(id) {
		return fmt.Errorf("harness: CleanupStale(%q): not a run id (1-8 lowercase letters or digits)", id)
	}
	var errs []error
	prefix := nsPrefix + id + "-"
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	var names []string
	inodes := map[uint64]bool{}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		names = append(names, e.Name())
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(netnsDir, e.Name()), &st); err == nil {
			inodes[st.Ino] = true
		}
	}
	if err := killProcessesIn(inodes); err != nil {
		errs = append(errs, err)
	}
	// Containers first, hosts next, underlay last: each veth disappears with whichever of its
	// namespaces goes first, and nothing is left dangling on a bridge.
	for pass := 0; pass < 2; pass++ {
		for i := len(names) - 1; i >= 0; i-- {
			if err := delNetns(names[i]); err != nil && pass == 1 {
				errs = append(errs, err)
			}
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+id+"-*"))
	for _, d := range dirs {
		if err := unmountUnder(d); err != nil {
			errs = append(errs, err)
			continue // RemoveAll would descend into a still-mounted bpffs
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// killProcessesIn SIGKILLs every process whose network namespace is one of inodes and waits
// (up to 5 s) until they are gone, so the namespaces can be freed.
func killProcessesIn(inodes map[uint64]bool) error {
	if len(inodes) == 0 {
		return nil
	}
	find := func() []int {
		var pids []int
		procs, _ := os.ReadDir("/proc")
		for _, p := range procs {
			pid, err := strconv.Atoi(p.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join("/proc", p.Name(), "ns", "net"), &st); err != nil {
				continue
			}
			if inodes[st.Ino] {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids := find()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still alive in the run's namespaces after SIGKILL", pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
