package loader

import (
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
)

// pinDir returns a unique pin directory under /sys/fs/bpf, removed (with everything pinned in
// it) when the test ends.
func pinDir(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for BPF and network namespaces")
	}
	b := make([]byte, 4)
	rand.Read(b)
	dir := filepath.Join(standardBPFFS, "xnet-test-"+hex.EncodeToString(b))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// netNS runs code in a fresh network namespace holding one veth pair (v0, v1), on a
// dedicated locked thread: attachments take ifindexes of the calling thread's namespace.
type netNS struct {
	work chan func()
	done chan struct{}
	v0   int // ifindex of v0
}

func newNetNS(t *testing.T) *netNS {
	t.Helper()
	n := &netNS{work: make(chan func()), done: make(chan struct{})}
	errc := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the namespace
		ns, err := netns.New()
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		err = netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "v0"}, PeerName: "v1"})
		if err == nil {
			var l netlink.Link
			if l, err = netlink.LinkByName("v0"); err == nil {
				n.v0 = l.Attrs().Index
				err = netlink.LinkSetUp(l)
			}
		}
		errc <- err
		for fn := range n.work {
			fn()
			n.done <- struct{}{}
		}
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(n.work) })
	return n
}

func (n *netNS) do(fn func()) {
	n.work <- fn
	<-n.done
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func load(t *testing.T, dir string, noTCX bool) *Loader {
	t.Helper()
	l, err := Load(Options{Dir: dir, Logger: quietLogger(), NoTCX: noTCX})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func TestMapsArePinnedWithReadableBTF(t *testing.T) {
	dir := pinDir(t)
	l := load(t, dir, false)
	for _, name := range maps.Names() {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("map %s not pinned: %v", name, err)
		}
	}
	r := maps.Route{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("198.18.0.19"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 19}}
	if err := l.Maps().PutRoute(r); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("bpftool"); err != nil {
		t.Skip("bpftool not installed")
	}
	out, err := exec.Command("bpftool", "map", "dump", "pinned", filepath.Join(dir, "routes")).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool: %v: %s", err, out)
	}
	// With BTF, bpftool prints field names rather than hex bytes, and addresses (ipv4_addr)
	// as their four bytes in wire order.
	for _, want := range []string{"prefixlen", "remote_ip", "vtep_mac", "[10,244,9,0", "[198,18,0,19"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("bpftool map dump lacks %q:\n%s", want, out)
		}
	}
	progs := []Program{EncapContainer, EncapHost, DecapTC, DeliverBridge}
	if l.XDPUnavailable() == nil {
		progs = append(progs, DecapXDP)
	} else if _, err := os.Stat(ProgramPin(dir, DecapXDP)); err == nil {
		t.Errorf("%s is pinned although the kernel refused it", ProgramPin(dir, DecapXDP))
	}
	for _, p := range progs {
		out, err := exec.Command("bpftool", "prog", "show", "pinned", ProgramPin(dir, p)).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "name "+string(p)) {
			t.Errorf("bpftool prog show pinned %s: %v\n%s", ProgramPin(dir, p), err, out)
		}
	}
}

func TestRestartAdoptsMapsAndLinks(t *testing.T) {
	dir := pinDir(t)
	ns := newNetNS(t)
	first := load(t, dir, false)
	r := maps.Route{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("198.18.0.19"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 19}}
	if err := first.Maps().PutRoute(r); err != nil {
		t.Fatal(err)
	}
	var a Attachment
	var err error
	ns.do(func() { a, err = first.AttachTC(ns.v0, Ingress, DecapTC) })
	if err != nil || a.Mode != ModeTCX || a.Adopted {
		t.Fatalf("first attach: %+v, %v; want a new TCX link", a, err)
	}
	linkID := pinnedLinkID(t, filepath.Join(dir, "link_ingress_"+strconv.Itoa(ns.v0)))
	first.Close() // the process "dies": nothing may detach

	second := load(t, dir, false)
	if got := second.Replaced(); len(got) != 0 {
		t.Fatalf("maps of the same build were replaced: %v", got)
	}
	routes, err := second.Maps().ListRoutes()
	if err != nil || len(routes) != 1 || routes[0].Subnet != r.Subnet {
		t.Fatalf("routes after restart: %+v, %v; want the route written before", routes, err)
	}
	ns.do(func() { a, err = second.AttachTC(ns.v0, Ingress, DecapTC) })
	if err != nil || !a.Adopted {
		t.Fatalf("second attach: %+v, %v; want the pinned link adopted", a, err)
	}
	if id := pinnedLinkID(t, filepath.Join(dir, "link_ingress_"+strconv.Itoa(ns.v0))); id != linkID {
		t.Fatalf("link %d replaced by %d: a restart must update the link, not re-create it", linkID, id)
	}
	if n := tcxPrograms(t, ns, ebpf.AttachTCXIngress); n != 1 {
		t.Fatalf("%d programs on v0 ingress, want exactly 1", n)
	}
}

func TestChangedLayoutIsReplaced(t *testing.T) {
	dir := pinDir(t)
	if err := ensureBPFFS(dir, quietLogger()); err != nil {
		t.Fatal(err)
	}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	// An older "route": same 12 bytes, but the MAC first.
	oldRoute := &btf.Struct{Name: "route", Size: 12, Members: []btf.Member{
		{Name: "vtep_mac", Type: &btf.Array{Type: u8, Index: u32, Nelems: 6}, Offset: 0},
		{Name: "pad", Type: &btf.Int{Name: "short unsigned int", Size: 2}, Offset: 48},
		{Name: "remote_ip", Type: u32, Offset: 64},
	}}
	key := &btf.Struct{Name: "route_key", Size: 8, Members: []btf.Member{
		{Name: "prefixlen", Type: u32, Offset: 0}, {Name: "addr", Type: u32, Offset: 32},
	}}
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "routes", Type: ebpf.LPMTrie, KeySize: 8, ValueSize: 12,
		MaxEntries: 65536, Flags: 1 /* BPF_F_NO_PREALLOC */, Key: key, Value: oldRoute})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(dir, "routes")); err != nil {
		t.Fatal(err)
	}
	// And a config of another size.
	oldCfg, err := ebpf.NewMap(&ebpf.MapSpec{Name: "config", Type: ebpf.Array, KeySize: 4, ValueSize: 16, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer oldCfg.Close()
	if err := oldCfg.Pin(filepath.Join(dir, "config")); err != nil {
		t.Fatal(err)
	}

	l := load(t, dir, false)
	got := strings.Join(l.Replaced(), ",")
	if !strings.Contains(got, "routes") || !strings.Contains(got, "config") {
		t.Fatalf("replaced %q, want routes (layout) and config (size)", got)
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(dir, "routes"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	oldInfo, _ := old.Info()
	newInfo, _ := pinned.Info()
	oldID, _ := oldInfo.ID()
	newID, _ := newInfo.ID()
	if oldID == newID {
		t.Fatal("the pin still holds the old routes map")
	}
	if _, err := os.Stat(filepath.Join(dir, "tmp_routes")); !os.IsNotExist(err) {
		t.Fatalf("temporary pin left behind: %v", err)
	}
}

func TestClsactFallback(t *testing.T) {
	dir := pinDir(t)
	ns := newNetNS(t)
	l := load(t, dir, true)
	var a Attachment
	var err error
	for i := 0; i < 2; i++ { // the second attach replaces, never stacks
		ns.do(func() { a, err = l.AttachTC(ns.v0, Egress, EncapHost) })
		if err != nil || a.Mode != ModeClsact {
			t.Fatalf("attach %d: %+v, %v; want clsact", i, a, err)
		}
	}
	var filters []netlink.Filter
	ns.do(func() {
		lk, _ := netlink.LinkByIndex(ns.v0)
		filters, err = netlink.FilterList(lk, netlink.HANDLE_MIN_EGRESS)
	})
	if err != nil || len(filters) != 1 {
		t.Fatalf("egress filters: %d, %v; want exactly our one", len(filters), err)
	}
	if bf, ok := filters[0].(*netlink.BpfFilter); !ok || !bf.DirectAction || !strings.Contains(bf.Name, "encap_host") {
		t.Fatalf("filter %+v, want a direct-action cls_bpf running encap_host", filters[0])
	}
	ns.do(func() { err = l.Detach(ns.v0, Egress) })
	if err != nil {
		t.Fatal(err)
	}
	ns.do(func() {
		lk, _ := netlink.LinkByIndex(ns.v0)
		filters, err = netlink.FilterList(lk, netlink.HANDLE_MIN_EGRESS)
	})
	if len(filters) != 0 {
		t.Fatalf("filters left after Detach: %+v", filters)
	}
}

func TestXDPAndPruneDead(t *testing.T) {
	dir := pinDir(t)
	ns := newNetNS(t)
	l := load(t, dir, false)
	if err := l.XDPUnavailable(); err != nil {
		t.Skipf("this kernel cannot run the XDP decap program: %v", err)
	}
	var a Attachment
	var err error
	ns.do(func() { a, err = l.AttachXDP(ns.v0, XDPGenericOnly) })
	if err != nil || a.Mode != ModeXDPGeneric {
		t.Fatalf("generic XDP attach: %+v, %v", a, err)
	}
	ns.do(func() { a, err = l.AttachXDP(ns.v0, XDPDriverOrGeneric) })
	if err != nil || !a.Adopted || a.Mode != ModeXDPGeneric {
		t.Fatalf("second XDP attach: %+v, %v; want the pinned generic link adopted", a, err)
	}
	ns.do(func() { _, err = l.AttachTC(ns.v0, Ingress, DecapTC) })
	if err != nil {
		t.Fatal(err)
	}
	// The interface goes away (a container stopped while xnetd was down).
	ns.do(func() {
		lk, _ := netlink.LinkByIndex(ns.v0)
		err = netlink.LinkDel(lk)
	})
	if err != nil {
		t.Fatal(err)
	}
	n, err := l.PruneDead()
	if err != nil || n != 2 {
		t.Fatalf("PruneDead = %d, %v; want the 2 dead links removed", n, err)
	}
	if err := l.Teardown(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("pin directory still there after Teardown: %v", err)
	}
}

func pinnedLinkID(t *testing.T, pin string) link.ID {
	t.Helper()
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.ID
}

func tcxPrograms(t *testing.T, ns *netNS, attach ebpf.AttachType) int {
	t.Helper()
	var res *link.QueryResult
	var err error
	ns.do(func() { res, err = link.QueryPrograms(link.QueryOptions{Target: ns.v0, Attach: attach}) })
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// An upgrade from the first layout, which kept IPv4 addresses in __u32 (bpftool printed them as
// numbers), to ipv4_addr byte arrays: every map whose key or value holds an address is
// replaced, even where the size is unchanged, and the counters map, which holds none, is kept.
func TestUpgradeFromU32Addresses(t *testing.T) {
	dir := pinDir(t)
	if err := ensureBPFFS(dir, quietLogger()); err != nil {
		t.Fatal(err)
	}
	u32 := &btf.Typedef{Name: "__u32", Type: &btf.Int{Name: "unsigned int", Size: 4}}
	u64 := &btf.Typedef{Name: "__u64", Type: &btf.Int{Name: "unsigned long long", Size: 8}}
	u16 := &btf.Typedef{Name: "__u16", Type: &btf.Int{Name: "short unsigned int", Size: 2}}
	u8 := &btf.Typedef{Name: "__u8", Type: &btf.Int{Name: "unsigned char", Size: 1}}
	mac := &btf.Array{Type: u8, Index: u32, Nelems: 6}
	member := func(name string, typ btf.Type, byteOff int) btf.Member {
		return btf.Member{Name: name, Type: typ, Offset: btf.Bits(byteOff * 8)}
	}
	counter := &btf.Struct{Name: "counter", Size: 16, Members: []btf.Member{member("packets", u64, 0), member("bytes", u64, 8)}}
	old := []struct {
		spec         ebpf.MapSpec
		wantReplaced bool
	}{
		{ebpf.MapSpec{Name: "routes", Type: ebpf.LPMTrie, KeySize: 8, ValueSize: 12, MaxEntries: 65536, Flags: 1,
			Key:   &btf.Struct{Name: "route_key", Size: 8, Members: []btf.Member{member("prefixlen", u32, 0), member("addr", u32, 4)}},
			Value: &btf.Struct{Name: "route", Size: 12, Members: []btf.Member{member("remote_ip", u32, 0), member("vtep_mac", mac, 4), member("pad", u16, 10)}}}, true},
		{ebpf.MapSpec{Name: "peers", Type: ebpf.PerCPUHash, KeySize: 4, ValueSize: 32, MaxEntries: 16384, Key: u32,
			Value: &btf.Struct{Name: "peer_stats", Size: 32, Members: []btf.Member{
				member("tx_packets", u64, 0), member("tx_bytes", u64, 8), member("rx_packets", u64, 16), member("rx_bytes", u64, 24)}}}, true},
		{ebpf.MapSpec{Name: "endpoints", Type: ebpf.Hash, KeySize: 4, ValueSize: 20, MaxEntries: 16384, Key: u32,
			Value: &btf.Struct{Name: "endpoint", Size: 20, Members: []btf.Member{
				member("ifindex", u32, 0), member("mac", mac, 4), member("gw_mac", mac, 10), member("pad", u16, 16)}}}, true},
		{ebpf.MapSpec{Name: "config", Type: ebpf.Array, KeySize: 4, ValueSize: 40, MaxEntries: 1, Key: u32,
			Value: &btf.Struct{Name: "host_config", Size: 40, Members: []btf.Member{
				member("local_ip", u32, 0), member("subnet_addr", u32, 4), member("subnet_mask", u32, 8), member("vni", u32, 12),
				member("underlay_ifindex", u32, 16), member("host_ifindex", u32, 20), member("port", u16, 24),
				member("underlay_mtu", u16, 26), member("vtep_mac", mac, 28), member("underlay_mac", mac, 34)}}}, true},
		// The counters' layout did not change with the addresses: one entry per verdict of
		// this build, so it is adopted.
		{ebpf.MapSpec{Name: "counters", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: verdictCount(t), Key: u32, Value: counter}, false},
	}
	for _, o := range old {
		m, err := ebpf.NewMap(&o.spec)
		if err != nil {
			t.Fatalf("create old %s: %v", o.spec.Name, err)
		}
		defer m.Close()
		if err := m.Pin(filepath.Join(dir, o.spec.Name)); err != nil {
			t.Fatal(err)
		}
	}

	l := load(t, dir, false)
	replaced := l.Replaced()
	for _, o := range old {
		if got := slices.Contains(replaced, o.spec.Name); got != o.wantReplaced {
			t.Errorf("%s replaced = %v, want %v (replaced: %v)", o.spec.Name, got, o.wantReplaced, replaced)
		}
	}
	// The new pins work with the typed access and print addresses as bytes.
	m := l.Maps()
	r := maps.Route{Subnet: netip.MustParsePrefix("10.244.77.0/24"), PublicIP: netip.MustParseAddr("198.18.0.12"),
		VtepMAC: net.HardwareAddr{0x0e, 0, 0, 0, 0, 1}}
	if err := m.PutRoute(r); err != nil {
		t.Fatal(err)
	}
	if routes, err := m.ListRoutes(); err != nil || len(routes) != 1 || routes[0].Subnet != r.Subnet || routes[0].PublicIP != r.PublicIP {
		t.Fatalf("routes after upgrade: %+v, %v; want %v", routes, err, r)
	}
}

// verdictCount is the number of entries of this build's counters map (one per verdict).
func verdictCount(t *testing.T) uint32 {
	t.Helper()
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	return spec.Maps["counters"].MaxEntries
}

// An upgrade from the build before the dual-stack overlay: its pins are this build's maps except
// routes6, config6 and endpoints6, and a counters map with two verdicts less. The new maps are
// created and pinned, the counters replaced (they restart, as on every change of the verdict
// list), and every other map adopted with its entries: the peers' IPv4 routes keep working from
// the first packet the new programs see. `xnetd status` (maps.OpenPinned) reads the old pins
// too, before the upgrade.
func TestUpgradeFromABuildWithoutIPv6(t *testing.T) {
	dir := pinDir(t)
	first := load(t, dir, false)
	r := maps.Route{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("198.18.0.19"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 19}}
	if err := first.Maps().PutRoute(r); err != nil {
		t.Fatal(err)
	}
	first.Close()
	ipv6Maps := []string{maps.Routes6Name, maps.Config6Name, maps.Endpoints6Name}
	for _, name := range ipv6Maps {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	cs := *spec.Maps[maps.CountersName]
	cs.MaxEntries -= 2
	cs.Pinning = ebpf.PinNone
	oldCounters, err := ebpf.NewMap(&cs)
	if err != nil {
		t.Fatal(err)
	}
	defer oldCounters.Close()
	if err := os.Remove(filepath.Join(dir, maps.CountersName)); err != nil {
		t.Fatal(err)
	}
	if err := oldCounters.Pin(filepath.Join(dir, maps.CountersName)); err != nil {
		t.Fatal(err)
	}

	old, err := maps.OpenPinned(dir)
	if err != nil {
		t.Fatalf("status on the old build's pins: %v", err)
	}
	if routes, err := old.ListRoutes6(); err != nil || routes != nil {
		t.Errorf("IPv6 routes of a build without them: %v, %v; want none", routes, err)
	}
	if _, ok, err := old.GetConfig6(); ok || err != nil {
		t.Errorf("IPv6 config of a build without it: ok %v, %v; want none", ok, err)
	}
	if eps, err := old.ListEndpoints(); err != nil || len(eps) != 0 {
		t.Errorf("endpoints of the old build: %v, %v; want none", eps, err)
	}
	old.Close()

	l := load(t, dir, false)
	if got := l.Replaced(); !slices.Equal(got, []string{maps.CountersName}) {
		t.Errorf("replaced %v, want only %s", got, maps.CountersName)
	}
	for _, name := range ipv6Maps {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("new map %s not pinned: %v", name, err)
		}
	}
	if routes, err := l.Maps().ListRoutes(); err != nil || len(routes) != 1 || routes[0].Subnet != r.Subnet {
		t.Fatalf("routes after the upgrade: %+v, %v; want the one written before", routes, err)
	}
	r6 := maps.Route6{Subnet: netip.MustParsePrefix("fd00:10:244:9::/64"), PublicIP: r.PublicIP, VtepMAC: r.VtepMAC}
	if err := l.Maps().PutRoute6(r6); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("bpftool"); err != nil {
		return
	}
	out, err := exec.Command("bpftool", "map", "dump", "pinned", filepath.Join(dir, maps.Routes6Name)).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool: %v: %s", err, out)
	}
	// With BTF: field names, and the address as its 16 bytes in wire order.
	for _, want := range []string{"prefixlen", "remote_ip", "vtep_mac", "[253,0,0,16,2,68,0,9,0,0,0,0,0,0,0,0", "[198,18,0,19"} {
		if !strings.Contains(strings.Join(strings.Fields(string(out)), ""), strings.ReplaceAll(want, " ", "")) {
			t.Errorf("bpftool map dump of %s lacks %q:\n%s", maps.Routes6Name, want, out)
		}
	}
}
