package loader

import (
	"net"
	"net/netip"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
)

// An upgrade from the build before DirectRouting: its routes had 2 bytes of padding where
// route.direct is now, and its host_config ended before direct_routing (and so before
// host_routing_kernel and ipv6_only, which came later still). Both maps are replaced
// (their layouts changed), and their entries come along, with the new members zero: the peers
// stay routed (in VXLAN) from the first packet the new programs see.
func TestUpgradeCarriesEntriesOverWhenTheLayoutOnlyGrew(t *testing.T) {
	dir := pinDir(t)
	if err := ensureBPFFS(dir, quietLogger()); err != nil {
		t.Fatal(err)
	}
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	cur := func(name string) *btf.Struct { return btf.UnderlyingType(spec.Maps[name].Value).(*btf.Struct) }
	member := func(s *btf.Struct, name string) btf.Member {
		for _, m := range s.Members {
			if m.Name == name {
				return m
			}
		}
		t.Fatalf("%s has no member %s", s.Name, name)
		return btf.Member{}
	}
	u16 := &btf.Typedef{Name: "__u16", Type: &btf.Int{Name: "short unsigned int", Size: 2}}
	route := cur("routes")
	oldRoute := &btf.Struct{Name: "route", Size: 12, Members: []btf.Member{
		member(route, "remote_ip"), member(route, "vtep_mac"), {Name: "pad", Type: u16, Offset: 80}}}
	cfg := cur("config")
	oldCfg := &btf.Struct{Name: "host_config", Size: 40}
	for _, m := range cfg.Members {
		if m.Name != "direct_routing" && m.Name != "host_routing_kernel" && m.Name != "ipv6_only" { // all came later
			oldCfg.Members = append(oldCfg.Members, m)
		}
	}
	rs := spec.Maps["routes"]
	oldRoutes, err := ebpf.NewMap(&ebpf.MapSpec{Name: "routes", Type: rs.Type, KeySize: rs.KeySize, ValueSize: 12,
		MaxEntries: rs.MaxEntries, Flags: rs.Flags, Key: rs.Key, Value: oldRoute})
	if err != nil {
		t.Fatal(err)
	}
	defer oldRoutes.Close()
	cs := spec.Maps["config"]
	oldConfig, err := ebpf.NewMap(&ebpf.MapSpec{Name: "config", Type: cs.Type, KeySize: 4, ValueSize: 40, MaxEntries: 1, Key: cs.Key, Value: oldCfg})
	if err != nil {
		t.Fatal(err)
	}
	defer oldConfig.Close()

	// What the older build wrote: a peer route (PublicIP, VTEP MAC, padding) and our config.
	peer := maps.Route{Subnet: netip.MustParsePrefix("10.244.7.0/24"), PublicIP: netip.MustParseAddr("198.18.0.17"),
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 17}}
	key := append([]byte{24, 0, 0, 0}, peer.Subnet.Addr().AsSlice()...)
	val := append(append(peer.PublicIP.AsSlice(), peer.VtepMAC...), 0, 0)
	if err := oldRoutes.Put(key, val); err != nil {
		t.Fatal(err)
	}
	want := maps.Config{LocalIP: netip.MustParseAddr("198.18.0.11"), Subnet: netip.MustParsePrefix("10.244.5.0/24"), VNI: 1, Port: 8472,
		UnderlayIfindex: 3, UnderlayMTU: 1500, UnderlayMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, HostIfindex: 9,
		VtepMAC: net.HardwareAddr{0x0e, 0x78, 198, 18, 0, 11}}
	var cfgBytes []byte
	func() { // encode with this build's layout, then cut to the old size
		fresh, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: cs.ValueSize, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer fresh.Close()
		m := &maps.Maps{Config: fresh}
		if err := m.SetConfig(want); err != nil {
			t.Fatal(err)
		}
		if err := fresh.Lookup(uint32(0), &cfgBytes); err != nil {
			t.Fatal(err)
		}
	}()
	if err := oldConfig.Put(uint32(0), cfgBytes[:40]); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]*ebpf.Map{"routes": oldRoutes, "config": oldConfig} {
		if err := m.Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}

	l := load(t, dir, false)
	if r := l.Replaced(); len(r) != 2 {
		t.Fatalf("replaced %v, want routes and config (their layouts grew)", r)
	}
	routes, err := l.Maps().ListRoutes()
	if err != nil || len(routes) != 1 || !reflect.DeepEqual(routes[0], peer) {
		t.Fatalf("routes after the upgrade: %+v (%v), want the older build's %+v, not direct", routes, err, peer)
	}
	got, ok, err := l.Maps().GetConfig()
	if err != nil || !ok || !reflect.DeepEqual(got, want) {
		t.Fatalf("config after the upgrade: %+v %v %v, want the older build's %+v", got, ok, err, want)
	}
}
