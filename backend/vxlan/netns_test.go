package vxlan

// Test scaffolding: "hosts" from the shared harness (network namespaces with eth0 on one
// underlay bridge, 198.18.0.11/24, .12/24, ...), each with a netlink handle bound to its
// namespace, which is what NewWithHandle takes. What every backend must do on such hosts is
// backend/conformance's; the tests here are vxlan's own.

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

type testHost struct {
	*harness.Host
	nl    *netlink.Handle
	iface backend.ExternalInterface
}

// sh runs a command inside the host's namespace and fails the test if it fails.
func (h *testHost) sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := h.Run(t.Context(), args[0], args[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// newHosts makes n hosts on one underlay; host i has eth0 with 198.18.0.(11+i)/24.
func newHosts(t *testing.T, n int) []*testHost {
	t.Helper()
	var hosts []*testHost
	for _, h := range harness.NewForTest(t, harness.Options{Hosts: n}).Hosts() {
		iface, err := conformance.Underlay(h)
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, &testHost{Host: h, nl: conformance.NetlinkHandle(t, h), iface: iface})
	}
	return hosts
}

var testNetwork = subnetmgr.Config{
	Network:   netip.MustParsePrefix("10.244.0.0/16"),
	SubnetLen: 24,
	Backend:   subnetmgr.BackendConfig{Type: "vxlan", VNI: 1, Port: 8472},
}

// subnetOf is host i's lease subnet: 10.244.(i+1).0/24.
func subnetOf(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
}

// leaseOf is the lease host i publishes with this backend.
func leaseOf(t *testing.T, i int, h *testHost) subnetmgr.Lease {
	t.Helper()
	data, err := backend.VXLANLeaseData(1, h.iface.PublicIP)
	if err != nil {
		t.Fatal(err)
	}
	return subnetmgr.Lease{Subnet: subnetOf(i), PublicIP: h.iface.PublicIP, BackendType: "vxlan", BackendData: data}
}

// startBackend builds and sets up our backend on host i; closed with teardown at cleanup.
func startBackend(t *testing.T, i int, h *testHost, cfg subnetmgr.Config) *Backend {
	t.Helper()
	b, err := NewWithHandle(backend.Options{Iface: h.iface, Config: cfg, Logger: harness.TestLogger(t)}, h.nl)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Setup(t.Context(), leaseOf(t, i, h), cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}
