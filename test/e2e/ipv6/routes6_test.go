package ipv6

import (
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// dropRoute6 deletes subnet's entry from n's pinned routes6 map (a fault: the ebpf datapath no
// longer reaches that peer's IPv6 subnet) and returns what puts it back. maps.OpenPinned opens
// read-only, as xnetd check does; a fault needs to write.
func dropRoute6(t *testing.T, n *xnetdtest.Node, subnet netip.Prefix) (restore func(*testing.T)) {
	t.Helper()
	open := func(t *testing.T) *maps.Maps {
		t.Helper()
		m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFS, maps.Routes6Name), nil)
		if err != nil {
			t.Fatal(err)
		}
		return &maps.Maps{Routes6: m}
	}
	m := open(t)
	defer m.Routes6.Close()
	routes, err := m.ListRoutes6()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(routes, func(r maps.Route6) bool { return r.Subnet == subnet })
	if i < 0 {
		t.Fatalf("%s's routes6 map has no %v: %+v", n.Name, subnet, routes)
	}
	saved := routes[i]
	if err := m.DeleteRoute6(subnet); err != nil {
		t.Fatal(err)
	}
	return func(t *testing.T) {
		t.Helper()
		m := open(t)
		defer m.Routes6.Close()
		if err := m.PutRoute6(saved); err != nil {
			t.Fatal(err)
		}
	}
}

// openConfig6 opens n's pinned config6 map for writing (maps.OpenPinned opens read-only).
func openConfig6(t *testing.T, n *xnetdtest.Node) *maps.Maps {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFS, maps.Config6Name), nil)
	if err != nil {
		t.Fatal(err)
	}
	return &maps.Maps{Config6: m}
}
