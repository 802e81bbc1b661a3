package conformance

// The fixture every behaviour runs on: three simulated hosts on one underlay, each running the
// backend under test as xnetd runs it (built and called inside the host's network namespace,
// set up with a lease whose BackendType and BackendData come from its own LeaseAttrs), with a
// docker0 at the backend's MTU and one container.
//
// A dual-stack cluster (newDualCluster) adds IPv6: the config's EnableIPv6 with IPv6Network
// fd00:10:244::/48, an IPv6 subnet fd00:10:244:<i+1>::/64 in every lease (BackendV6Data from
// the backend's LeaseAttrsV6), docker0 and the containers with IPv6 addresses, and an IPv6
// underlay address (fd00:198:18::<11+i>, the lease's PublicIPv6) on every host but the second,
// so that one peer is reached over IPv6 without an IPv6 underlay.
//
// An IPv6-only cluster (newIPv6OnlyCluster) is a dual-stack one without IPv4: the config's
// EnableIPv4 false, leases as flannel writes them there (no IPv4 subnet, PublicIP 0.0.0.0, no
// BackendData), an IPv6 underlay on every host, and docker0 with Docker's default IPv4 bridge
// address, which no backend routes.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// cluster is one topology running one backend.
type cluster struct {
	row  row
	dual bool // dual stack: see the file comment
	// ipv6Only: an IPv6-only overlay (dual is set too: the IPv6 half is the same)
	ipv6Only bool
	// mode is the config's Backend.Mode (wireguard's), empty for the default
	mode  string
	cfg   subnetmgr.Config
	ctx   context.Context // xnetd's: Setup's, alive as long as the cluster
	log   *slog.Logger
	hosts []*node
	// withoutLast is the first host's state (node.state) with every peer but the last host.
	withoutLast []string
}

// node is one host of the cluster and the backend running on it.
type node struct {
	*harness.Host
	cl        *cluster
	b         backend.Backend // nil while stopped, as between xnetd's exit and its restart
	lease     subnetmgr.Lease // ours: 10.244.<index+1>.0/24
	container *harness.Container
}

// newCluster builds three hosts running row's backend with each other's leases unknown yet.
func newCluster(t *testing.T, r row) *cluster { return buildCluster(t, r, false) }

// newDualCluster is newCluster for a dual-stack overlay. It skips the test when the row's
// backend does not implement backend.DualStack.
func newDualCluster(t *testing.T, r row) *cluster { return buildCluster(t, r, true) }

// withoutIPv6Underlay is the host (by index) a dual-stack cluster leaves without one.
const withoutIPv6Underlay = 1

// newIPv6OnlyCluster is newCluster for an IPv6-only overlay (see the file comment), with the
// config's Backend.Mode mode unless it is empty.
func newIPv6OnlyCluster(t *testing.T, r row, mode string) *cluster {
	t.Helper()
	return buildClusterWith(t, r, true, true, mode)
}

func buildCluster(t *testing.T, r row, dual bool) *cluster {
	t.Helper()
	return buildClusterWith(t, r, dual, false, "")
}

func buildClusterWith(t *testing.T, r row, dual, ipv6Only bool, mode string) *cluster {
	t.Helper()
	ipv6 := ""
	if dual {
		ipv6 = `"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","IPv6SubnetLen":64,`
	}
	if ipv6Only {
		ipv6 += `"EnableIPv4":false,`
	}
	backendMode := ""
	if mode != "" {
		backendMode = fmt.Sprintf(`,"Mode":%q`, mode)
	}
	cfg, err := subnetmgr.ParseConfig(fmt.Appendf(nil, `{"Network":"10.244.0.0/16","SubnetLen":24,%s"Backend":{"Type":%q,"DirectRouting":%v%s}}`, ipv6, r.name, r.direct, backendMode))
	if err != nil {
		t.Fatal(err)
	}
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	c := &cluster{row: r, dual: dual, ipv6Only: ipv6Only, mode: mode, cfg: cfg, ctx: t.Context(), log: harness.TestLogger(t).With("test", r.name)}
	for i, h := range topo.Hosts() {
		n := &node{Host: h, cl: c}
		n.lease.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		n.lease.PublicIP = h.UnderlayIP
		if ipv6Only {
			n.lease.Subnet, n.lease.PublicIP = netip.Prefix{}, netip.IPv4Unspecified()
		}
		if dual {
			n.lease.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
			if i != withoutIPv6Underlay || ipv6Only {
				if err := h.AddIPv6Underlay(t.Context()); err != nil {
					t.Fatal(err)
				}
			}
		}
		// Registered before start: whatever backend runs at the end is torn down, also when
		// the test fails half way (the topology's own cleanup, registered earlier, runs after).
		t.Cleanup(func() {
			if n.b != nil {
				_ = n.b.Close(true)
			}
		})
		n.start(t)
		docker0 := netip.PrefixFrom(n.lease.Subnet.Addr().Next(), 24)
		if ipv6Only {
			docker0 = harness.DockerDefaultBridge
		}
		if err := h.SetupDocker0(docker0, n.b.MTU()); err != nil {
			t.Fatal(err)
		}
		if dual {
			if err := h.SetupDocker0IPv6(netip.PrefixFrom(n.lease.IPv6Subnet.Addr().Next(), 64)); err != nil {
				t.Fatal(err)
			}
		}
		if n.container, err = h.AddContainer(); err != nil {
			t.Fatal(err)
		}
		c.hosts = append(c.hosts, n)
	}
	return c
}

// pinDir is where the host's backend pins what outlives it, as /sys/fs/bpf/xnet is on a real
// host: a directory in a bpffs mount.
func (n *node) pinDir() string { return filepath.Join(n.BPFFS, "xnet") }

// start builds the backend in the host's namespace and sets it up with our lease, as xnetd
// does at every start: the first start fills in what the lease publishes, a restart must
// publish the same (peers have programmed it).
func (n *node) start(t *testing.T) {
	t.Helper()
	if n.b != nil {
		t.Fatalf("%s: start while a backend runs", n.Name)
	}
	iface, err := Underlay(n.Host)
	if err != nil {
		t.Fatal(err)
	}
	iface.PublicIPv6 = n.UnderlayIPv6 // as xnetd resolves it: the interface's IPv6 address
	opts := backend.Options{Iface: iface, Config: n.cl.cfg, BPFFS: n.pinDir(), StateDir: n.StateDir, Logger: n.cl.log.With("host", n.Name)}
	var b backend.Backend
	if err := n.Do(func() (err error) { b, err = n.cl.row.new(opts); return err }); err != nil {
		t.Fatalf("%s: new backend: %v", n.Name, err)
	}
	n.b = b
	typ, data, err := n.b.LeaseAttrs()
	if err != nil {
		t.Fatalf("%s: LeaseAttrs: %v", n.Name, err)
	}
	var data6 []byte
	var ip6 netip.Addr
	if n.cl.dual {
		if _, ok := n.b.(backend.DualStack); !ok {
			t.Skipf("%s does not implement backend.DualStack: xnetd refuses it in a dual-stack overlay", n.cl.row.testName())
		}
		// What xnetd publishes: PublicIPv6 and BackendV6Data only where the backend takes IPv6.
		if ip6, data6, err = backend.IPv6LeaseAttrs(n.b, iface); err != nil {
			t.Fatalf("%s: IPv6 lease attributes: %v", n.Name, err)
		}
	}
	if n.cl.ipv6Only {
		data = nil // flannel's IPv6-only lease has no BackendData (xnetd drops it)
	}
	if n.lease.BackendType == "" {
		n.lease.BackendType, n.lease.BackendData, n.lease.BackendV6Data, n.lease.PublicIPv6 = typ, data, data6, ip6
		n.lease.Expiration = time.Now().Add(24 * time.Hour)
	} else if typ != n.lease.BackendType || string(data) != string(n.lease.BackendData) || string(data6) != string(n.lease.BackendV6Data) {
		t.Errorf("%s: the restarted backend publishes %s %s %s, the first published %s %s %s", n.Name, typ, data, data6,
			n.lease.BackendType, n.lease.BackendData, n.lease.BackendV6Data)
	}
	if err := n.call(func(b backend.Backend) error { return b.Setup(n.cl.ctx, n.lease, n.cl.cfg) }); err != nil {
		t.Fatalf("%s: Setup: %v", n.Name, err)
	}
}

// stop closes the backend: teardown false is xnetd exiting (the datapath stays), true is
// `xnetd teardown`.
func (n *node) stop(t *testing.T, teardown bool) {
	t.Helper()
	err := n.call(func(b backend.Backend) error { return b.Close(teardown) })
	n.b = nil
	if err != nil {
		t.Fatalf("%s: Close(%v): %v", n.Name, teardown, err)
	}
}

// call runs fn with the running backend in the host's namespace, where xnetd would call it.
func (n *node) call(fn func(backend.Backend) error) error {
	if n.b == nil {
		return fmt.Errorf("%s: no backend running", n.Name)
	}
	return n.Do(func() error { return fn(n.b) })
}

// addPeers gives the backend the leases as xnetd's lease events would, failing on an error.
func (n *node) addPeers(t *testing.T, leases ...subnetmgr.Lease) {
	t.Helper()
	for _, l := range leases {
		if err := n.call(func(b backend.Backend) error { return b.AddPeer(l) }); err != nil {
			t.Fatalf("%s: AddPeer(%v): %v", n.Name, l.ID(), err)
		}
	}
}

// others are the leases of every host but n.
func (c *cluster) others(n *node) []subnetmgr.Lease {
	var leases []subnetmgr.Lease
	for _, o := range c.hosts {
		if o != n {
			leases = append(leases, o.lease)
		}
	}
	return leases
}

// publishesBackendData says whether the backend's lease carries BackendData, in which case it
// needs its peers' to program them.
func (n *node) publishesBackendData() bool {
	d := strings.TrimSpace(string(n.lease.BackendData))
	return d != "" && d != "null"
}

// path is one direction of container traffic: from's container pings to's container.
type path struct{ from, to *node }

func (p path) String() string { return p.from.container.Role() + " -> " + p.to.container.Role() }

// mesh is every path between the containers of hosts.
func mesh(hosts ...*node) []path {
	var paths []path
	for _, a := range hosts {
		for _, b := range hosts {
			if a != b {
				paths = append(paths, path{a, b})
			}
		}
	}
	return paths
}

// reachWait bounds how long a path may take to answer the first time (the watch of a new
// container, neighbour resolution, a loaded CI machine).
const reachWait = 5 * time.Second

// wantReach checks each path gets echo replies, trying for up to reachWait; the paths are tried
// at once, so a full mesh costs one round trip when everything works.
func wantReach(t *testing.T, paths ...path) { t.Helper(); wantReachOver(t, ipv4, paths...) }

// wantNoReach checks no path gets a reply to any of three echo requests.
func wantNoReach(t *testing.T, paths ...path) { t.Helper(); wantNoReachOver(t, ipv4, paths...) }

// reaches says whether p gets a reply to any of three echo requests.
func reaches(t *testing.T, p path) bool { return reachesOver(t, ipv4, p) }

// addrFamily picks the container address a path pings: IPv4, or IPv6 in a dual-stack cluster.
type addrFamily struct {
	name string
	of   func(*harness.Container) netip.Addr
}

var (
	ipv4 = addrFamily{"IPv4", func(c *harness.Container) netip.Addr { return c.IP }}
	ipv6 = addrFamily{"IPv6", func(c *harness.Container) netip.Addr { return c.IPv6 }}
)

func wantReachOver(t *testing.T, f addrFamily, paths ...path) {
	t.Helper()
	for _, p := range checkPaths(t, paths, func(ctx context.Context, p path) bool {
		ctx, cancel := context.WithTimeout(ctx, reachWait)
		defer cancel()
		for ctx.Err() == nil {
			if _, got, err := harness.Ping(ctx, p.from.container.Namespace, f.of(p.to.container), 3, 100*time.Millisecond); err != nil || got > 0 {
				return err == nil
			}
		}
		return false
	}) {
		t.Errorf("%s over %s: no echo reply within %v", p, f.name, reachWait)
	}
}

func wantNoReachOver(t *testing.T, f addrFamily, paths ...path) {
	t.Helper()
	for _, p := range checkPaths(t, paths, func(ctx context.Context, p path) bool {
		_, got, err := harness.Ping(ctx, p.from.container.Namespace, f.of(p.to.container), 3, 100*time.Millisecond)
		return err == nil && got == 0
	}) {
		t.Errorf("%s: still reachable over %s", p, f.name)
	}
}

func reachesOver(t *testing.T, f addrFamily, p path) bool {
	_, got, err := harness.Ping(t.Context(), p.from.container.Namespace, f.of(p.to.container), 3, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	return got > 0
}

// checkPaths runs ok on every path in parallel and returns those for which it was false.
func checkPaths(t *testing.T, paths []path, ok func(context.Context, path) bool) []path {
	var mu sync.Mutex
	var failed []path
	var wg sync.WaitGroup
	for _, p := range paths {
		wg.Go(func() {
			if !ok(t.Context(), p) {
				mu.Lock()
				failed = append(failed, p)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return failed
}

// ip runs an iproute2 command in the host's namespace, failing the test if it fails.
func (n *node) ip(t *testing.T, args string) {
	t.Helper()
	if err := n.IP(t.Context(), args); err != nil {
		t.Fatal(err)
	}
}

// routedTo says whether the host's main routing table has a route for exactly subnet.
func (n *node) routedTo(t *testing.T, subnet netip.Prefix) bool {
	t.Helper()
	out, err := n.Run(t.Context(), "ip", "-4", "route", "show", "exact", subnet.String())
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out) != ""
}

// state is what the host's kernel shows of its datapath, as sorted lines: link names, IPv4
// routes of every table, permanent neighbours and permanent forwarding entries (what a backend
// programs; learned entries come and go with traffic); in a dual-stack cluster also the IPv6
// routes of every table into the IPv6Network and the permanent IPv6 neighbours. What it does
// not show (BPF maps, a process's memory) is the backend's own tests' business.
func (n *node) state(t *testing.T) []string {
	t.Helper()
	var lines []string
	cmds := [][]string{
		{"ip", "-br", "link", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-4", "neigh", "show", "nud", "permanent"},
		{"bridge", "fdb", "show"},
	}
	if n.cl.dual {
		cmds = append(cmds,
			[]string{"ip", "-6", "route", "show", "table", "all"},
			[]string{"ip", "-6", "neigh", "show", "nud", "permanent"})
	}
	for _, cmd := range cmds {
		out, err := n.Run(t.Context(), cmd[0], cmd[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		for l := range strings.Lines(out) {
			l = strings.TrimSpace(l)
			switch {
			case l == "" || cmd[0] == "bridge" && (!strings.Contains(l, "permanent") || multicastMAC(l)):
				continue // learned entries, and the kernel's for the multicast groups a device joined
			case cmd[2] == "link":
				l = strings.Fields(l)[0] // not the state: docker0's settles when it pleases
			case cmd[1] == "-6" && cmd[2] == "route" && !n.cl.inIPv6Network(l):
				continue // link-local, multicast and the underlay's: the kernel's, not a backend's
			}
			lines = append(lines, strings.Join(cmd[:3], " ")+": "+l)
		}
	}
	if n.cl.ipv6Only && n.cl.row.name == subnetmgr.BackendEBPF {
		lines = append(lines, n.ebpfRoutes(t)...)
	}
	slices.Sort(lines)
	return lines
}

// ebpfRoutes are the ebpf backend's routes as its pinned maps hold them (none when nothing is
// pinned): in an IPv6-only overlay its peers are there, not in the kernel's tables.
func (n *node) ebpfRoutes(t *testing.T) []string {
	t.Helper()
	m, err := maps.OpenPinned(n.pinDir())
	if err != nil {
		return nil
	}
	defer m.Close()
	var lines []string
	routes, err := m.ListRoutes()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		lines = append(lines, fmt.Sprintf("ebpf routes: %v via %v %v direct %v", r.Subnet, r.PublicIP, r.VtepMAC, r.Direct))
	}
	routes6, err := m.ListRoutes6()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes6 {
		lines = append(lines, fmt.Sprintf("ebpf routes6: %v via %v %v %v direct %v", r.Subnet, r.PublicIP, r.PublicIPv6, r.VtepMAC, r.Direct))
	}
	return lines
}

// wantState checks the host's state is want, naming the lines that differ.
func (n *node) wantState(t *testing.T, what string, want []string) {
	t.Helper()
	got := n.state(t)
	for _, l := range got {
		if !slices.Contains(want, l) {
			t.Errorf("%s: %s has %q", what, n.Name, l)
		}
	}
	for _, l := range want {
		if !slices.Contains(got, l) {
			t.Errorf("%s: %s lacks %q", what, n.Name, l)
		}
	}
}

// multicastMAC says whether a line of `bridge fdb show` is for a multicast MAC: the groups the
// kernel joins on a device (IPv6 joins more as its addresses pass duplicate address detection,
// seconds after a link came up), never a backend's entry.
func multicastMAC(line string) bool {
	mac, err := net.ParseMAC(strings.Fields(line)[0])
	return err == nil && len(mac) > 0 && mac[0]&1 == 1
}

// inIPv6Network says whether a line of `ip -6 route` is a route into the IPv6Network.
func (c *cluster) inIPv6Network(line string) bool {
	f := strings.Fields(line)
	if len(f) > 1 && slices.Contains([]string{"local", "anycast", "multicast", "unicast", "unreachable", "blackhole", "prohibit", "throw"}, f[0]) {
		f = f[1:]
	}
	if len(f) == 0 {
		return false
	}
	p, err := netip.ParsePrefix(f[0])
	if err != nil {
		a, aerr := netip.ParseAddr(f[0])
		if aerr != nil {
			return false
		}
		p = netip.PrefixFrom(a, 128)
	}
	return c.cfg.IPv6Network.Overlaps(p) && p.Bits() >= c.cfg.IPv6Network.Bits()
}

// leftovers lists what of a datapath the host shows: links named xnet*, routes into the
// overlay Network (or IPv6Network) other than docker0's, BPF programs attached to any link (XDP, TCX or a TC
// filter), and pins in the backend's pin directory. docker0, the containers' veths and eth0 are
// the harness's, not a backend's.
func (n *node) leftovers(t *testing.T) []string {
	t.Helper()
	var found []string
	err := n.Do(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		docker0, names := 0, map[int]string{}
		for _, l := range links {
			name := l.Attrs().Name
			names[l.Attrs().Index] = name
			if name == "docker0" {
				docker0 = l.Attrs().Index
			}
			if strings.HasPrefix(name, "xnet") {
				found = append(found, "link "+name)
			}
			found = append(found, bpfAttachments(l)...)
		}
		routes, err := netlink.RouteListFiltered(unix.AF_UNSPEC, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst == nil || r.LinkIndex == docker0 {
				continue
			}
			dst, _ := netip.AddrFromSlice(r.Dst.IP)
			dst = dst.Unmap()
			network := n.cl.cfg.Network
			if dst.Is6() {
				network = n.cl.cfg.IPv6Network // invalid unless dual stack: then nothing is in it
			}
			ones, _ := r.Dst.Mask.Size()
			if network.Contains(dst) && ones >= network.Bits() {
				found = append(found, fmt.Sprintf("route %v dev %s table %d", r.Dst, names[r.LinkIndex], r.Table))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: list links and routes: %v", n.Name, err)
	}
	pins, err := os.ReadDir(n.pinDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, p := range pins {
		found = append(found, "pin "+filepath.Join(n.pinDir(), p.Name()))
	}
	return found
}

// bpfAttachments lists the BPF programs attached to l, in the namespace of the calling thread.
func bpfAttachments(l netlink.Link) []string {
	var found []string
	name := l.Attrs().Name
	if x := l.Attrs().Xdp; x != nil && x.Attached {
		found = append(found, fmt.Sprintf("XDP program %d on %s", x.ProgId, name))
	}
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
		if err != nil {
			continue // a kernel without TCX has nothing attached there
		}
		for _, p := range res.Programs {
			found = append(found, fmt.Sprintf("%s program %d on %s", at, p.ID, name))
		}
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		filters, _ := netlink.FilterList(l, parent)
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				found = append(found, fmt.Sprintf("TC filter %s on %s", bf.Name, name))
			}
		}
	}
	return found
}
