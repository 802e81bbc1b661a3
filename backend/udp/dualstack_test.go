package udp

// Dual stack against real kernels: IPv6 between containers on udp hosts, and between a udp host
// and a kernel-VXLAN host (the vxlan backend), whose inner IPv6 arrives as the kernel sends it
// (TSO super-frames over a veth included).

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var dualCfg = func() subnetmgr.Config {
	c := testCfg
	c.EnableIPv6 = true
	c.IPv6Network = netip.MustParsePrefix("fd00:10:244::/48")
	c.IPv6SubnetLen = 64
	return c
}()

// dualHost is a harness host running a dual-stack backend, with a container.
type dualHost struct {
	*harness.Host
	b     backend.Backend
	lease subnetmgr.Lease
}

// startDual starts the backend new builds on host i of hosts (in its namespace, as xnetd runs
// it), with a dual-stack lease (10.244.(i+1).0/24, fd00:10:244:(i+1)::/64), docker0 and one
// container.
func startDual(t *testing.T, h *harness.Host, i int, cfg subnetmgr.Config, newBackend backend.Constructor) *dualHost {
	t.Helper()
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	iface.PublicIPv6 = h.UnderlayIPv6
	cfg.Backend.Type = "udp"
	var b backend.Backend
	if err := h.Do(func() (err error) {
		b, err = newBackend(backend.Options{Iface: iface, Config: cfg, Logger: harness.TestLogger(t).With("host", h.Name)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Do(func() error { return b.Close(true) }) })
	d := &dualHost{Host: h, b: b}
	d.lease.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
	d.lease.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
	d.lease.PublicIP, d.lease.PublicIPv6 = iface.PublicIP, iface.PublicIPv6
	if d.lease.BackendType, d.lease.BackendData, err = b.LeaseAttrs(); err != nil {
		t.Fatal(err)
	}
	if d.lease.BackendV6Data, err = b.(backend.DualStack).LeaseAttrsV6(); err != nil {
		t.Fatal(err)
	}
	if err := h.Do(func() error { return b.Setup(t.Context(), d.lease, cfg) }); err != nil {
		t.Fatal(err)
	}
	if err := h.SetupDocker0(netip.PrefixFrom(d.lease.Subnet.Addr().Next(), 24), b.MTU()); err != nil {
		t.Fatal(err)
	}
	if err := h.SetupDocker0IPv6(netip.PrefixFrom(d.lease.IPv6Subnet.Addr().Next(), 64)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddContainer(); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *dualHost) addPeer(t *testing.T, l subnetmgr.Lease) {
	t.Helper()
	if err := d.Do(func() error { return d.b.AddPeer(l) }); err != nil {
		t.Fatal(err)
	}
}

func (d *dualHost) sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := d.Run(t.Context(), args[0], args[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// wantIPv6Traffic checks ICMPv6 and 4 MB of TCP each way between the hosts' containers.
func wantIPv6Traffic(t *testing.T, a, b *dualHost) {
	t.Helper()
	ca, cb := a.Containers()[0], b.Containers()[0]
	for _, p := range [][2]*harness.Container{{ca, cb}, {cb, ca}} {
		from, to := p[0], p[1]
		if !harness.PingsWithin(t, from.Namespace, to.IPv6, 5*time.Second) {
			t.Errorf("%s -> %s (%v): no echo reply within 5s", from.Name, to.Name, to.IPv6)
			continue
		}
		if err := harness.TCPExchange(t.Context(), from.Namespace, to.Namespace, to.IPv6, 4<<20); err != nil {
			t.Errorf("TCP over IPv6 %s -> %s: %v", from.Name, to.Name, err)
		}
	}
	if !harness.PingsWithin(t, ca.Namespace, cb.IP, 5*time.Second) {
		t.Errorf("IPv4 %s -> %s: no echo reply", ca.Name, cb.Name)
	}
	// What the udp hosts' datapaths counted: IPv6 passed, none of it dropped as malformed,
	// oversized or not IPv4 (TSO segments cut, super-frames passed on).
	for _, h := range []*dualHost{a, b} {
		u, ok := h.b.(*Backend)
		if !ok {
			continue
		}
		v := u.Status().Counters.Verdicts
		if v["decap"].Packets == 0 || v["encap"].Packets == 0 {
			t.Errorf("%s: the udp datapath moved nothing: %v", h.Name, v)
		}
		for _, drop := range []string{"drop_malformed", "drop_oversized", "drop_inner_not_ipv4", "drop_spoofed", "drop_unknown_source"} {
			if v[drop].Packets != 0 {
				t.Errorf("%s: %d packets %s", h.Name, v[drop].Packets, drop)
			}
		}
	}
}

func newUDP(opts backend.Options) (backend.Backend, error) {
	b, err := NewWithTuning(opts, Tuning{Queues: 2})
	if err != nil {
		return nil, err
	}
	return b, nil
}

func TestIPv6BetweenUDPHosts(t *testing.T) {
	hosts := harness.NewForTest(t, harness.Options{Hosts: 2}).Hosts()
	a, b := startDual(t, hosts[0], 0, dualCfg, newUDP), startDual(t, hosts[1], 1, dualCfg, newUDP)
	if v6, _ := a.b.(backend.DualStack).LeaseAttrsV6(); string(v6) != string(a.lease.BackendData) {
		t.Errorf("BackendV6Data %s, want BackendData %s: IPv6 rides the IPv4 VTEP", v6, a.lease.BackendData)
	}
	a.addPeer(t, b.lease)
	b.addPeer(t, a.lease)
	if r := a.sh(t, "ip", "-6", "route", "show", "fd00:10:244:2::/64"); !strings.Contains(r, "dev xnet0") {
		t.Errorf("route to the peer's IPv6 subnet: %q", r)
	}
	if addr := a.sh(t, "ip", "-6", "-o", "addr", "show", "dev", "xnet0", "scope", "global"); !strings.Contains(addr, "inet6 fd00:10:244:1::/128") || strings.Count(addr, "inet6") != 1 {
		t.Errorf("xnet0's global IPv6 addresses: %q, want fd00:10:244:1::/128", addr)
	}
	wantIPv6Traffic(t, a, b)

	// The peer loses its IPv6 subnet, then goes: its IPv6 route goes each time.
	v4only := b.lease
	v4only.IPv6Subnet = netip.Prefix{}
	a.addPeer(t, v4only)
	if r := a.sh(t, "ip", "-6", "route", "show", "fd00:10:244:2::/64"); r != "" {
		t.Errorf("route left for an IPv6 subnet the peer no longer holds: %q", r)
	}
	a.addPeer(t, b.lease)
	if err := a.Do(func() error { return a.b.RemovePeer(b.lease) }); err != nil {
		t.Fatal(err)
	}
	if r := a.sh(t, "ip", "-6", "route", "show", "fd00:10:244:2::/64"); r != "" {
		t.Errorf("route left after RemovePeer: %q", r)
	}
}

// TestIPv6WithAKernelVXLANHost: the udp host and a vxlan host (with an IPv6 underlay, so it
// has xnet-v6.1 too) reach each other's containers over IPv6 through the vxlan host's IPv4
// device, since the udp host's BackendV6Data names its IPv4 VTEP.
func TestIPv6WithAKernelVXLANHost(t *testing.T) {
	hosts := harness.NewForTest(t, harness.Options{Hosts: 2}).Hosts()
	for _, h := range hosts {
		if err := h.AddIPv6Underlay(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	vxCfg := dualCfg
	vxCfg.Backend.Type = "vxlan"
	a := startDual(t, hosts[0], 0, dualCfg, newUDP)
	b := startDual(t, hosts[1], 1, vxCfg, vxlan.New)
	a.addPeer(t, b.lease)
	b.addPeer(t, a.lease)
	if r := b.sh(t, "ip", "-6", "route", "show", "fd00:10:244:1::/64"); !strings.Contains(r, "dev xnet.1") {
		t.Errorf("the vxlan host's route to the udp host's IPv6 subnet: %q, want it on xnet.1", r)
	}
	wantIPv6Traffic(t, a, b)
}

func TestIPv6PruneKeepsOurOwnAndKeptRoutes(t *testing.T) {
	ns := newNS(t)
	var b *Backend
	var err error
	ns.do(t, func() { b, err = NewWithTuning(testOpts(), Tuning{Queues: 1}) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	own := ownLease()
	own.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:1::/64")
	if err := b.Setup(t.Context(), own, dualCfg); err != nil {
		t.Fatal(err)
	}
	lease := func(i int) subnetmgr.Lease {
		l := testLease(fmt.Sprintf("10.244.%d.0/24", i), netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + i)}))
		l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
		return l
	}
	for _, i := range []int{2, 3} {
		if err := b.AddPeer(lease(i)); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if err := b.PrunePeers([]subnetmgr.Lease{own, lease(2)}); err != nil {
			t.Fatal(err)
		}
	}
	routes := ns.ip(t, "-6 route show dev xnet0")
	for _, want := range []string{"fd00:10:244:2::/64", "fd00:10:244:1:: proto kernel"} {
		if !strings.Contains(routes, want) {
			t.Errorf("the prune removed %s:\n%s", want, routes)
		}
	}
	if strings.Contains(routes, "fd00:10:244:3::/64") {
		t.Errorf("the prune kept the gone peer's IPv6 route:\n%s", routes)
	}
}
