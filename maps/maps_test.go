package maps

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/bpf"
)

// fresh creates the datapath's maps, unpinned, for one test.
func fresh(t *testing.T) *Maps {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create BPF maps")
	}
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	var objs bpf.XnetMaps
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	m := FromObjects(&objs)
	t.Cleanup(func() { m.Close() })
	return m
}

func TestRoutesRoundTrip(t *testing.T) {
	m := fresh(t)
	r := Route{Subnet: netip.MustParsePrefix("10.244.7.0/24"), PublicIP: netip.MustParseAddr("198.18.0.17"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 17}}
	if err := m.PutRoute(r); err != nil {
		t.Fatal(err)
	}
	got, err := m.ListRoutes()
	if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], r) {
		t.Fatalf("ListRoutes = %+v, %v; want [%+v]", got, err, r)
	}
	if err := m.DeleteRoute(r.Subnet); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteRoute(r.Subnet); err != nil {
		t.Fatalf("deleting a missing route: %v, want no error", err)
	}
	if got, _ := m.ListRoutes(); len(got) != 0 {
		t.Fatalf("routes after delete: %+v", got)
	}
	direct := Route{Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: netip.MustParseAddr("198.18.0.18"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 18}, Direct: true}
	if err := m.PutRoute(direct); err != nil {
		t.Fatal(err)
	}
	if got, err := m.ListRoutes(); err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], direct) {
		t.Fatalf("ListRoutes = %+v, %v; want the direct route [%+v]", got, err, direct)
	}
	if err := m.DeleteRoute(direct.Subnet); err != nil {
		t.Fatal(err)
	}
	if err := m.PutRoute(Route{Subnet: netip.MustParsePrefix("fd00::/64"), PublicIP: r.PublicIP, VtepMAC: r.VtepMAC}); err == nil {
		t.Fatal("an IPv6 subnet was accepted")
	}
}

func TestConfigRoundTrip(t *testing.T) {
	m := fresh(t)
	if _, ok, err := m.GetConfig(); ok || err != nil {
		t.Fatalf("unwritten config: ok %v err %v, want not ok", ok, err)
	}
	c := Config{LocalIP: netip.MustParseAddr("198.18.0.11"), Subnet: netip.MustParsePrefix("10.244.5.0/24"), VNI: 1, Port: 8472,
		UnderlayIfindex: 3, UnderlayMTU: 1500, UnderlayMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, HostIfindex: 9,
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 11}, DirectRouting: true}
	if err := m.SetConfig(c); err != nil {
		t.Fatal(err)
	}
	got, ok, err := m.GetConfig()
	if err != nil || !ok || !reflect.DeepEqual(got, c) {
		t.Fatalf("GetConfig = %+v %v %v, want %+v", got, ok, err, c)
	}
	zero := c
	zero.VNI = 0
	if err := m.SetConfig(zero); err != nil {
		t.Fatalf("VNI 0 refused: %v", err)
	}
	bad := c
	bad.VNI = 1 << 24
	if err := m.SetConfig(bad); err == nil {
		t.Fatal("VNI 2^24 accepted")
	}
	// An IPv6-only host has no IPv4 lease or underlay address, and is configured all the same.
	v6only := c
	v6only.LocalIP, v6only.Subnet, v6only.IPv6Only = netip.Addr{}, netip.Prefix{}, true
	if err := m.SetConfig(v6only); err != nil {
		t.Fatalf("IPv6-only config refused: %v", err)
	}
	if got, ok, err := m.GetConfig(); err != nil || !ok || !reflect.DeepEqual(got, v6only) {
		t.Fatalf("GetConfig = %+v %v %v, want %+v", got, ok, err, v6only)
	}
	mixed := v6only
	mixed.LocalIP = c.LocalIP
	if err := m.SetConfig(mixed); err == nil {
		t.Fatal("an IPv6-only config with an IPv4 LocalIP was accepted")
	}
}

func TestCountersAndPeers(t *testing.T) {
	m := fresh(t)
	names, err := VerdictNames()
	if err != nil {
		t.Fatal(err)
	}
	if names[0] != "encap" || names[bpf.XnetVerdictVERDICT_DROP_SPOOFED] != "drop_spoofed" {
		t.Fatalf("verdict names %v", names)
	}
	counters, err := m.ReadCounters()
	if err != nil || len(counters) != int(bpf.XnetVerdictVERDICT_MAX) {
		t.Fatalf("ReadCounters = %v, %v", counters, err)
	}
	// A peer by its PublicIP, and one of an IPv6-only overlay by its PublicIPv6: the programs
	// key both as underlay_addr (IPv4 mapped into IPv6), and ReadPeers gives back what AddPeer
	// was given.
	for _, peer := range []netip.Addr{netip.MustParseAddr("198.18.0.12"), netip.MustParseAddr("fd00:198:18::c")} {
		if err := m.AddPeer(peer); err != nil {
			t.Fatal(err)
		}
		// The programs count into the per-CPU entry; AddPeer again must not reset it.
		per := make([]bpf.XnetPeerStats, ebpf.MustPossibleCPU())
		per[0].RxPackets = 5
		if err := m.Peers.Put(peer.As16(), per); err != nil {
			t.Fatal(err)
		}
		if err := m.AddPeer(peer); err != nil {
			t.Fatal(err)
		}
		stats, err := m.ReadPeers()
		if err != nil || len(stats) != 1 || stats[peer].RxPackets != 5 {
			t.Fatalf("ReadPeers = %+v, %v; want 5 packets received from %v", stats, err, peer)
		}
		if err := m.DeletePeer(peer); err != nil {
			t.Fatal(err)
		}
		if stats, _ := m.ReadPeers(); len(stats) != 0 {
			t.Fatalf("peers after delete: %+v", stats)
		}
	}
}

func TestForgetEndpoints(t *testing.T) {
	m := fresh(t)
	for i, ifindex := range []uint32{7, 7, 8} {
		ip := netip.AddrFrom4([4]byte{10, 244, 5, byte(2 + i)})
		if err := m.Endpoints.Put(ip4(ip), bpf.XnetEndpoint{Ifindex: ifindex}); err != nil {
			t.Fatal(err)
		}
	}
	n, err := m.ForgetEndpoints(7)
	if err != nil || n != 2 {
		t.Fatalf("ForgetEndpoints(7) = %d, %v; want 2", n, err)
	}
	eps, _ := m.ListEndpoints()
	if len(eps) != 1 || eps[0].Ifindex != 8 {
		t.Fatalf("endpoints left: %+v, want only the one behind ifindex 8", eps)
	}
}

// The nexthops cache holds both families in one map, the programs keying IPv4 PublicIPs as
// ::ffff:a.b.c.d: ListNexthops gives them back as IPv4 and DeleteNexthop takes either.
func TestNexthopsListAndDelete(t *testing.T) {
	m := fresh(t)
	a, b := netip.MustParseAddr("198.18.0.12"), netip.MustParseAddr("198.18.0.13")
	a6, b6 := netip.MustParseAddr("fd00:198:18::c"), netip.MustParseAddr("fd00:198:18::d")
	for _, ip := range []netip.Addr{a, b, a6, b6} {
		// As the programs write them (bpf/structs.h underlay_addr4 for IPv4).
		if err := m.Nexthops.Put(ip.As16(), bpf.XnetNexthop{Ifindex: 2}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ip := range []netip.Addr{a, a6} {
		if err := m.DeleteNexthop(ip); err != nil {
			t.Fatal(err)
		}
		if err := m.DeleteNexthop(ip); err != nil {
			t.Fatalf("deleting a missing next hop: %v, want no error", err)
		}
	}
	got, err := m.ListNexthops()
	slices.SortFunc(got, netip.Addr.Compare)
	if err != nil || !reflect.DeepEqual(got, []netip.Addr{b, b6}) {
		t.Fatalf("ListNexthops = %v, %v; want [%v %v]", got, err, b, b6)
	}
	if err := m.DeleteNexthop(netip.Addr{}); err == nil {
		t.Errorf("DeleteNexthop of no address: no error")
	}
}

func TestIPv6RoutesRoundTrip(t *testing.T) {
	m := fresh(t)
	r := Route6{Subnet: netip.MustParsePrefix("fd00:10:244:7::/64"), PublicIP: netip.MustParseAddr("198.18.0.17"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 17}}
	// The same peer with an IPv6 VTEP, then without again: the entry follows.
	over6 := r
	over6.PublicIPv6, over6.VtepMAC = netip.MustParseAddr("fd00:198:18::17"), net.HardwareAddr{0x0a, 1, 2, 3, 4, 5}
	// On our IPv6 segment with DirectRouting: plain via its PublicIPv6.
	direct := over6
	direct.Direct = true
	for _, want := range []Route6{r, over6, direct, r} {
		if err := m.PutRoute6(want); err != nil {
			t.Fatal(err)
		}
		got, err := m.ListRoutes6()
		if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], want) {
			t.Fatalf("ListRoutes6 = %+v, %v; want [%+v]", got, err, want)
		}
	}
	if err := m.DeleteRoute6(r.Subnet); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteRoute6(r.Subnet); err != nil {
		t.Fatalf("deleting a missing IPv6 route: %v, want no error", err)
	}
	if got, _ := m.ListRoutes6(); len(got) != 0 {
		t.Fatalf("IPv6 routes after delete: %+v", got)
	}
	for _, bad := range []Route6{
		{Subnet: netip.MustParsePrefix("10.244.7.0/24"), PublicIP: r.PublicIP, VtepMAC: r.VtepMAC},
		{Subnet: r.Subnet, PublicIP: netip.MustParseAddr("fd00::1"), VtepMAC: r.VtepMAC},
		{Subnet: r.Subnet, PublicIP: r.PublicIP},
		{Subnet: r.Subnet, PublicIP: r.PublicIP, VtepMAC: r.VtepMAC, PublicIPv6: netip.MustParseAddr("198.18.0.17")},
		{Subnet: r.Subnet, PublicIP: r.PublicIP, VtepMAC: r.VtepMAC, Direct: true},
	} {
		if err := m.PutRoute6(bad); err == nil {
			t.Errorf("PutRoute6(%+v) accepted", bad)
		}
	}
}

func TestIPv6ConfigRoundTrip(t *testing.T) {
	m := fresh(t)
	if _, ok, err := m.GetConfig6(); ok || err != nil {
		t.Fatalf("GetConfig6 of a fresh map: ok %v, %v; want not set", ok, err)
	}
	for _, c := range []Config6{
		{Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"), Gateway: netip.MustParseAddr("fd00:10:244:5::1")},
		{Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"), Gateway: netip.MustParseAddr("fd00:10:244:5::1"),
			LocalIPv6: netip.MustParseAddr("fd00:198:18::11"), TunnelIfindex: 7, VtepMACv6: net.HardwareAddr{0x0a, 1, 2, 3, 4, 5}},
	} {
		if err := m.SetConfig6(c); err != nil {
			t.Fatal(err)
		}
		got, ok, err := m.GetConfig6()
		if err != nil || !ok || fmt.Sprint(got) != fmt.Sprint(c) {
			t.Fatalf("GetConfig6 = %+v, %v, %v; want %+v", got, ok, err, c)
		}
	}
	if err := m.ClearConfig6(); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := m.GetConfig6(); ok || err != nil {
		t.Fatalf("GetConfig6 after clear: ok %v, %v; want not set", ok, err)
	}
	for _, bad := range []Config6{
		{Subnet: netip.MustParsePrefix("10.244.5.0/24"), Gateway: netip.MustParseAddr("10.244.5.1")},
		{Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"), Gateway: netip.MustParseAddr("fd00:10:244:6::1")},
		{Subnet: netip.MustParsePrefix("::/0"), Gateway: netip.MustParseAddr("::1")},
		{Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"), Gateway: netip.MustParseAddr("fd00:10:244:5::1"), TunnelIfindex: 7,
			VtepMACv6: net.HardwareAddr{0x0a, 1, 2, 3, 4, 5}},
		{Subnet: netip.MustParsePrefix("fd00:10:244:5::/64"), Gateway: netip.MustParseAddr("fd00:10:244:5::1"), TunnelIfindex: 7,
			LocalIPv6: netip.MustParseAddr("fd00:198:18::11")},
	} {
		if err := m.SetConfig6(bad); err == nil {
			t.Errorf("SetConfig6(%+v) accepted", bad)
		}
	}
}

func TestForgetEndpointsOfBothFamilies(t *testing.T) {
	m := fresh(t)
	v4 := netip.MustParseAddr("10.244.5.2")
	v6a, v6b := netip.MustParseAddr("fd00:10:244:5::2"), netip.MustParseAddr("fd00:10:244:5::3")
	if err := m.Endpoints.Put(ip4(v4), bpf.XnetEndpoint{Ifindex: 7}); err != nil {
		t.Fatal(err)
	}
	for ip, ifindex := range map[netip.Addr]uint32{v6a: 7, v6b: 8} {
		if err := m.Endpoints6.Put(ip6(ip), bpf.XnetEndpoint{Ifindex: ifindex}); err != nil {
			t.Fatal(err)
		}
	}
	if eps, err := m.ListEndpoints(); err != nil || len(eps) != 3 {
		t.Fatalf("ListEndpoints = %+v, %v; want both families, 3 addresses", eps, err)
	}
	n, err := m.ForgetEndpoints(7)
	if err != nil || n != 2 {
		t.Fatalf("ForgetEndpoints(7) = %d, %v; want 2 (one IPv4, one IPv6)", n, err)
	}
	eps, _ := m.ListEndpoints()
	if len(eps) != 1 || eps[0].IP != v6b {
		t.Fatalf("endpoints left: %+v, want only %v", eps, v6b)
	}
}

// Every map of the datapath object has a name here and a place in Maps: the loader pins what
// ByName lists, and `xnetd status` opens what Names lists.
func TestNamesCoverEveryMap(t *testing.T) {
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	var inObject []string
	for name := range spec.Maps {
		if !strings.HasPrefix(name, ".") { // .bss and the like: BTF anchors, not pinned
			inObject = append(inObject, name)
		}
	}
	slices.Sort(inObject)
	names := slices.Sorted(slices.Values(Names()))
	byName := slices.Sorted(maps.Keys((&Maps{}).ByName()))
	if !slices.Equal(names, inObject) || !slices.Equal(byName, inObject) {
		t.Fatalf("Names %v, ByName %v; the object has %v", names, byName, inObject)
	}
}
