package hostgw

// Test scaffolding: "hosts" from the shared harness (network namespaces with eth0 on one
// underlay bridge, 198.18.0.11/24, .12/24, ...), each with a netlink handle bound to its
// namespace, which is what NewWithHandle takes. What every backend must do on such hosts is
// backend/conformance's; the tests here are host-gw's own.

import (
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
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
