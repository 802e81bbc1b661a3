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

// peeredPair is two hosts of topo, each with a backend newBackend builds there (not set up yet),
// set up on its own /24 (10.244.1.0/24, 10.244.2.0/24), a docker0 holding the gateway, one
// container, and every lease as a peer.
type peeredPair struct {
	backends   []*Backend
	leases     []subnetmgr.Lease
	containers []*harness.Container
}

func newPeeredPair(t *testing.T, topo *harness.Topology, newBackend func(*harness.Host) *Backend) peeredPair {
	t.Helper()
	var p peeredPair
	for i, h := range topo.Hosts() {
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		l := vxlanLease(t, subnet.String(), h.UnderlayIP.String())
		b := newBackend(h)
		t.Cleanup(func() { _ = b.Close(true) })
		if err := b.Setup(t.Context(), l, testConfig); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0(netip.PrefixFrom(subnet.Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		p.backends, p.leases, p.containers = append(p.backends, b), append(p.leases, l), append(p.containers, c)
	}
	for _, b := range p.backends {
		for _, l := range p.leases {
			if err := b.AddPeer(l); err != nil {
				t.Fatal(err)
			}
		}
	}
	return p
}
