package wireguard

// The backend's own life cycle against the running kernel, on hosts of the shared harness
// (network namespaces with eth0 on one underlay): the device, its address and routes, the key
// file, the peers WireGuard holds and the counters. What every backend owes a user is
// backend/conformance's; wire-level checks (no clear text on the underlay, forged and
// replayed datagrams) are test/e2e's.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// testNode is one harness host running the backend.
type testNode struct {
	*harness.Host
	b     *Backend
	lease subnetmgr.Lease
}

func testConfig(t *testing.T, backendJSON string) subnetmgr.Config {
	t.Helper()
	cfg, err := subnetmgr.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":` + backendJSON + `}`))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// newBackendOn builds the backend in h's namespace, keeping its key in h's state directory.
func newBackendOn(t *testing.T, h *harness.Host, cfg subnetmgr.Config, dp Datapath) (*Backend, error) {
	t.Helper()
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	opts := backend.Options{Iface: iface, Config: cfg, StateDir: h.StateDir, Logger: harness.TestLogger(t).With("host", h.Name)}
	var b *Backend
	err = h.Do(func() (err error) { b, err = NewWithDatapath(opts, dp); return err })
	return b, err
}

// startNodes runs the backend on n hosts, each with docker0 at the backend's MTU and one
// container, and gives every host every other host's lease.
func startNodes(t *testing.T, n int, cfg subnetmgr.Config, dp Datapath) []*testNode {
	t.Helper()
	return startNodesOn(t, harness.NewForTest(t, harness.Options{Hosts: n}), cfg, dp)
}

// startNodesOn is startNodes on the hosts of topo.
func startNodesOn(t *testing.T, topo *harness.Topology, cfg subnetmgr.Config, dp Datapath) []*testNode {
	t.Helper()
	var nodes []*testNode
	for i, h := range topo.Hosts() {
		b, err := newBackendOn(t, h, cfg, dp)
		if err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		t.Cleanup(func() { _ = b.Close(true) })
		typ, data, err := b.LeaseAttrs()
		if err != nil {
			t.Fatal(err)
		}
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		lease := subnetmgr.Lease{Subnet: subnet, PublicIP: h.UnderlayIP, BackendType: typ, BackendData: data, Expiration: time.Now().Add(time.Hour)}
		if err := b.Setup(t.Context(), lease, cfg); err != nil {
			t.Fatalf("%s: Setup: %v", h.Name, err)
		}
		if err := h.SetupDocker0(netip.PrefixFrom(subnet.Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, &testNode{Host: h, b: b, lease: lease})
	}
	for _, n := range nodes {
		for _, p := range nodes {
			if err := n.b.AddPeer(p.lease); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.Name, p.lease.Subnet, err)
			}
		}
	}
	return nodes
}

func (n *testNode) container() *harness.Container { return n.Containers()[0] }

func (n *testNode) sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := n.Run(t.Context(), args[0], args[1:]...)
	if err != nil {
		t.Fatalf("%s: %s: %v", n.Name, strings.Join(args, " "), err)
	}
	return out
}

func reaches(t *testing.T, from, to *testNode) bool {
	t.Helper()
	_, got, err := harness.Ping(t.Context(), from.container().Namespace, to.container().IP, 5, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	return got > 0
}

// TestEmbeddedDatapathCarriesTrafficBothWays is the embedded datapath (the only one this VM's
// kernel allows) end to end on two hosts: the TUN it made, its routes, WireGuard's view of the
// peer, and the counters.
func TestEmbeddedDatapathCarriesTrafficBothWays(t *testing.T) {
	cfg := testConfig(t, `{"Type":"wireguard","PersistentKeepaliveInterval":25}`)
	nodes := startNodes(t, 2, cfg, DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	for _, p := range [][2]*testNode{{a, b}, {b, a}} {
		if !reaches(t, p[0], p[1]) {
			t.Errorf("%s's container does not reach %s's", p[0].Name, p[1].Name)
		}
	}
	link := a.sh(t, "ip", "-d", "link", "show", DeviceName)
	for _, want := range []string{"mtu 1420", "UP", "tun type tun", "vnet_hdr", "persist"} {
		if !strings.Contains(link, want) {
			t.Errorf("%s lacks %q:\n%s", DeviceName, want, link)
		}
	}
	if addr := a.sh(t, "ip", "-4", "addr", "show", DeviceName); !strings.Contains(addr, "inet 10.244.1.0/32") {
		t.Errorf("%s address:\n%s", DeviceName, addr)
	}
	routes := a.sh(t, "ip", "-4", "route", "show", "dev", DeviceName)
	for _, want := range []string{"10.244.0.0/16 scope link", "10.244.2.0/24 scope link"} {
		if !strings.Contains(routes, want) {
			t.Errorf("routes on %s lack %q:\n%s", DeviceName, want, routes)
		}
	}
	if mode, why := a.b.Mode(); mode != "wireguard-go" || !strings.Contains(why, "TUN offload true") {
		t.Errorf("Mode() = %q, %q", mode, why)
	}

	st, err := a.b.Status()
	if err != nil {
		t.Fatal(err)
	}
	_, bData, _ := b.b.LeaseAttrs()
	bKey, _ := subnetmgr.ParseWireGuardData(bData)
	if len(st.Peers) != 1 {
		t.Fatalf("status lists %d peers, want 1: %+v", len(st.Peers), st.Peers)
	}
	p := st.Peers[0]
	if p.PublicKey != bKey.PublicKey || len(p.Subnets) != 1 || p.Subnets[0] != b.lease.Subnet {
		t.Errorf("peer %+v: want key %s with AllowedIPs exactly %v", p, bKey.PublicKey, b.lease.Subnet)
	}
	if p.Endpoint != fmt.Sprintf("%s:51820", b.UnderlayIP) || p.LastHandshake.IsZero() || time.Since(p.LastHandshake) > time.Minute || p.RxBytes == 0 || p.TxBytes == 0 {
		t.Errorf("peer %+v: want endpoint %s:51820, a recent handshake, bytes both ways", p, b.UnderlayIP)
	}
	if st.ListenPort != 51820 || st.MTU != 1420 || st.PSK {
		t.Errorf("status %+v", st)
	}

	c, err := a.b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Peers) != 1 || c.Peers[0].Subnet != b.lease.Subnet || c.Peers[0].TxPackets == 0 || c.Peers[0].RxPackets == 0 {
		t.Errorf("counters %+v: want packets both ways for %v", c.Peers, b.lease.Subnet)
	}
	if c.Verdicts["encap"] == 0 || c.Verdicts["decap"] == 0 {
		t.Errorf("verdicts %v", c.Verdicts)
	}
}

// TestTCPCrossesInTSOSizedWrites: a TCP stream crosses the embedded datapath intact both ways
// (what offloadTUN's cut and by-reference coalescing must not break: a wrong byte coalesced
// without its checksum checked would be delivered), and it leaves and enters xnet-wg as
// segments far larger than the MTU: the kernel hands over TSO segments and takes coalesced
// ones, so the datapath works per 64 KB, not per packet.
func TestTCPCrossesInTSOSizedWrites(t *testing.T) {
	nodes := startNodes(t, 2, testConfig(t, `{"Type":"wireguard"}`), DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	before := map[string]linkStats{a.Name: a.tunStats(t), b.Name: b.tunStats(t)}
	harness.TransferIntact(t, a.container(), b.container(), b.container().IP, 32<<20)
	harness.TransferIntact(t, b.container(), a.container(), a.container().IP, 8<<20)
	for _, n := range nodes {
		s := n.tunStats(t).minus(before[n.Name])
		// tx: what the kernel handed wireguard-go; rx: what wireguard-go wrote.
		for dir, c := range map[string][2]uint64{"read from": s.Tx, "written to": s.Rx} {
			if c[1] == 0 || c[0]/c[1] < 4*1420 {
				t.Errorf("%s: %d bytes in %d packets %s %s: want segments averaging more than 4 MTUs", n.Name, c[0], c[1], dir, DeviceName)
			}
		}
	}
}

// linkStats are a link's byte and packet counters, as {bytes, packets}.
type linkStats struct{ Rx, Tx [2]uint64 }

func (s linkStats) minus(o linkStats) linkStats {
	return linkStats{Rx: [2]uint64{s.Rx[0] - o.Rx[0], s.Rx[1] - o.Rx[1]}, Tx: [2]uint64{s.Tx[0] - o.Tx[0], s.Tx[1] - o.Tx[1]}}
}

// tunStats reads xnet-wg's counters (with ip: sysfs on a thread moved into the namespace
// still shows the namespace it was mounted in).
func (n *testNode) tunStats(t *testing.T) linkStats {
	t.Helper()
	var links []struct {
		Stats64 struct {
			Rx, Tx struct{ Bytes, Packets uint64 }
		}
	}
	if err := json.Unmarshal([]byte(n.sh(t, "ip", "-s", "-j", "link", "show", "dev", DeviceName)), &links); err != nil || len(links) != 1 {
		t.Fatalf("%s: ip -s -j link show: %v", n.Name, err)
	}
	st := links[0].Stats64
	return linkStats{Rx: [2]uint64{st.Rx.Bytes, st.Rx.Packets}, Tx: [2]uint64{st.Tx.Bytes, st.Tx.Packets}}
}

// TestPeerHasExactlyItsSubnets: a peer's AllowedIPs follow its leases: a second lease with the
// same key (the host's older one, not yet expired) adds its subnet, removing it takes only
// that subnet, a new key for a subnet replaces the old peer.
func TestPeerHasExactlyItsSubnets(t *testing.T) {
	nodes := startNodes(t, 2, testConfig(t, `{"Type":"wireguard"}`), DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	allowed := func() map[string][]netip.Prefix {
		t.Helper()
		st, err := a.b.Status()
		if err != nil {
			t.Fatal(err)
		}
		m := map[string][]netip.Prefix{}
		for _, p := range st.Peers {
			m[p.PublicKey] = p.Subnets
		}
		return m
	}
	_, bData, _ := b.b.LeaseAttrs()
	bKey, _ := subnetmgr.ParseWireGuardData(bData)
	older := b.lease
	older.Subnet = netip.MustParsePrefix("10.244.9.0/24")
	if err := a.b.AddPeer(older); err != nil {
		t.Fatal(err)
	}
	if got := allowed()[bKey.PublicKey]; len(got) != 2 {
		t.Errorf("AllowedIPs of %s with two leases: %v, want both subnets", b.Name, got)
	}
	if err := a.b.RemovePeer(older); err != nil {
		t.Fatal(err)
	}
	if got := allowed()[bKey.PublicKey]; len(got) != 1 || got[0] != b.lease.Subnet {
		t.Errorf("AllowedIPs after removing the older lease: %v, want %v", got, b.lease.Subnet)
	}
	if !reaches(t, a, b) {
		t.Errorf("removing %s's older lease cut its current one", b.Name)
	}

	// b loses its state directory and comes back with a new key under the same subnet.
	rekeyed := b.lease
	newKey := "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
	rekeyed.BackendData = []byte(`{"PublicKey":"` + newKey + `","Port":51820}`)
	if err := a.b.AddPeer(rekeyed); err != nil {
		t.Fatal(err)
	}
	got := allowed()
	if _, old := got[bKey.PublicKey]; old || len(got[newKey]) != 1 {
		t.Errorf("peers after a new key for %v: %v, want only the new key", b.lease.Subnet, got)
	}
	if err := a.b.RemovePeer(rekeyed); err != nil {
		t.Fatal(err)
	}
	if got := allowed(); len(got) != 0 {
		t.Errorf("peers after RemovePeer: %v", got)
	}
	if r := a.sh(t, "ip", "-4", "route", "show", b.lease.Subnet.String()); r != "" {
		t.Errorf("route left after RemovePeer: %q", r)
	}
	// The Network route stays: what is for the overlay never leaves unencrypted.
	if r := a.sh(t, "ip", "-4", "route", "get", b.container().IP.String()); !strings.Contains(r, "dev "+DeviceName) {
		t.Errorf("traffic for a removed peer's container leaves elsewhere: %q", r)
	}
}

func TestLeasesItCannotProgramAreRefused(t *testing.T) {
	nodes := startNodes(t, 2, testConfig(t, `{"Type":"wireguard"}`), DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	_, aData, _ := a.b.LeaseAttrs()
	spoil := func(f func(*subnetmgr.Lease)) subnetmgr.Lease {
		l := b.lease
		l.Subnet = netip.MustParsePrefix("10.244.50.0/24")
		l.PublicIP = netip.MustParseAddr("198.18.0.50")
		f(&l)
		return l
	}
	for name, l := range map[string]subnetmgr.Lease{
		"a vxlan host's": spoil(func(l *subnetmgr.Lease) {
			l.BackendType, l.BackendData = "vxlan", []byte(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:32"}`)
		}),
		"no key":             spoil(func(l *subnetmgr.Lease) { l.BackendData = []byte(`{"Port":51820}`) }),
		"our own public key": spoil(func(l *subnetmgr.Lease) { l.BackendData = aData }),
	} {
		if err := a.b.AddPeer(l); err == nil {
			t.Errorf("%s lease accepted", name)
		}
	}
	if !reaches(t, a, b) {
		t.Error("a refused lease disturbed the peer")
	}
}

// TestKeySurvivesRestarts: the key is written 0600 on the first Setup, read back by the next
// start (the same public key in the lease), and a file others can read is tightened.
func TestKeySurvivesRestarts(t *testing.T) {
	h := harness.NewForTest(t, harness.Options{Hosts: 1}).Hosts()[0]
	cfg := testConfig(t, `{"Type":"wireguard"}`)
	lease := subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: h.UnderlayIP}
	start := func() (*Backend, string) {
		t.Helper()
		b, err := newBackendOn(t, h, cfg, DatapathEmbedded)
		if err != nil {
			t.Fatal(err)
		}
		_, data, err := b.LeaseAttrs()
		if err != nil {
			t.Fatal(err)
		}
		return b, string(data)
	}
	keyFile := h.StateDir + "/" + KeyFile
	b, first := start()
	if out, _ := h.Run(t.Context(), "ls", keyFile); out != "" {
		t.Errorf("New wrote the key file before Setup: %s", out)
	}
	if err := b.Setup(t.Context(), lease, cfg); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	if mode, _ := h.Run(t.Context(), "stat", "-c", "%a", keyFile); strings.TrimSpace(mode) != "600" {
		t.Errorf("key file mode %q, want 600", mode)
	}
	b, again := start()
	if again != first {
		t.Errorf("restart publishes %s, first start published %s", again, first)
	}
	b.Close(true)
	if _, err := h.Run(t.Context(), "chmod", "0644", keyFile); err != nil {
		t.Fatal(err)
	}
	b, third := start()
	b.Close(true)
	if mode, _ := h.Run(t.Context(), "stat", "-c", "%a", keyFile); strings.TrimSpace(mode) != "600" || third != first {
		t.Errorf("a 0644 key file: now mode %q, publishes %s (was %s)", mode, third, first)
	}
}

func TestSetupFailsWhenTheListenPortIsTaken(t *testing.T) {
	h := harness.NewForTest(t, harness.Options{Hosts: 1}).Hosts()[0]
	cfg := testConfig(t, `{"Type":"wireguard","ListenPort":51999}`)
	var taken *net.UDPConn
	if err := h.Do(func() (err error) { taken, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 51999}); return err }); err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	b, err := newBackendOn(t, h, cfg, DatapathEmbedded)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(true)
	err = b.Setup(t.Context(), subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: h.UnderlayIP}, cfg)
	if err == nil || !strings.Contains(err.Error(), "51999") {
		t.Errorf("Setup with the port taken: %v, want an error naming the port", err)
	}
}

// TestKernelDatapath runs two hosts on the kernel's WireGuard. It needs a kernel with
// WireGuard (CONFIG_WIREGUARD), which the test VM's has not: then it skips, saying why.
func TestKernelDatapath(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	cfg := testConfig(t, `{"Type":"wireguard"}`)
	probe, err := newBackendOn(t, topo.Hosts()[0], cfg, DatapathKernel)
	if errors.Is(err, backend.ErrUnavailable) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	probe.Close(false) // New changed nothing
	nodes := startNodesOn(t, topo, cfg, DatapathKernel)
	a, b := nodes[0], nodes[1]
	if !reaches(t, a, b) || !reaches(t, b, a) {
		t.Fatal("containers on two kernel WireGuard hosts do not reach each other")
	}
	if mode, _ := a.b.Mode(); mode != "kernel" {
		t.Errorf("Mode() = %q", mode)
	}
	if link := a.sh(t, "ip", "-d", "link", "show", DeviceName); !strings.Contains(link, "wireguard") {
		t.Errorf("%s is not a kernel WireGuard link:\n%s", DeviceName, link)
	}
	// The kernel device forwards while no xnetd runs, and a restart adopts it with its peers.
	if err := a.b.Close(false); err != nil {
		t.Fatal(err)
	}
	if !reaches(t, a, b) {
		t.Error("traffic stopped with xnetd on a kernel WireGuard host")
	}
}

// TestHandshakesThatCrossDoNotStallTraffic: with a keepalive interval both hosts start a
// handshake the moment they add each other, which xnetd does on both at once; WireGuard alone
// then stalls for its 5 s retransmission whenever the two initiations cross. Each round adds
// the peers on both hosts at the same moment and wants traffic both ways well before that.
func TestHandshakesThatCrossDoNotStallTraffic(t *testing.T) {
	nodes := startNodes(t, 2, testConfig(t, `{"Type":"wireguard","PersistentKeepaliveInterval":25}`), DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	for round := range 8 {
		for _, n := range nodes {
			for _, p := range nodes {
				if err := n.b.RemovePeer(p.lease); err != nil {
					t.Fatal(err)
				}
			}
		}
		start := time.Now()
		var wg sync.WaitGroup
		for _, pair := range [][2]*testNode{{a, b}, {b, a}} {
			wg.Go(func() {
				if err := pair[0].b.AddPeer(pair[1].lease); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		for _, pair := range [][2]*testNode{{a, b}, {b, a}} {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
				defer cancel()
				for ctx.Err() == nil {
					if _, got, _ := harness.Ping(ctx, pair[0].container().Namespace, pair[1].container().IP, 1, 0); got > 0 {
						return
					}
				}
			})
		}
		wg.Wait()
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("round %d: traffic both ways took %v after both hosts added each other", round, took)
		}
	}
}
