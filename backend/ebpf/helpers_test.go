package ebpf

import (
	"net/netip"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var testConfig = subnetmgr.Config{
	Network:   netip.MustParsePrefix("10.244.0.0/16"),
	SubnetLen: 24,
	Backend:   subnetmgr.BackendConfig{Type: subnetmgr.BackendEBPF, VNI: 1, Port: 8472},
}

func vxlanLease(t *testing.T, subnet string, publicIP string) subnetmgr.Lease {
	t.Helper()
	ip := netip.MustParseAddr(publicIP)
	data, err := backend.VXLANLeaseData(1, ip)
	if err != nil {
		t.Fatal(err)
	}
	return subnetmgr.Lease{Subnet: netip.MustParsePrefix(subnet), PublicIP: ip, BackendType: subnetmgr.BackendVXLAN,
		BackendData: data, Expiration: time.Now().Add(time.Hour)}
}

// startOn builds the backend inside h's namespace, pinning under h's bpffs, and sets it up with
// local, as xnetd does at every start.
func startOn(t *testing.T, h *harness.Host, local subnetmgr.Lease) *Backend {
	t.Helper()
	b := newOn(t, h, DecapTC)
	if err := b.Setup(t.Context(), local, testConfig); err != nil {
		t.Fatal(err)
	}
	return b
}

// newOn builds the backend inside h's namespace, pinning under h's bpffs.
func newOn(t *testing.T, h *harness.Host, decap string) *Backend {
	t.Helper()
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	opts := backend.Options{Iface: iface, Config: testConfig, Decap: decap, BPFFS: h.BPFFS, Logger: harness.TestLogger(t)}
	var b *Backend
	if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
		t.Fatal(err)
	}
	return b
}
