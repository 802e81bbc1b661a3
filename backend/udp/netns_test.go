package udp

// The backend's life cycle against a real kernel, in a network namespace of its own: the
// device, its address and routes, the sockets, the re-attachment at a restart. What every
// backend must show a user (traffic between containers, removal, refused leases, restart,
// prune, teardown) is tested in backend/conformance, and udp against the others in test/e2e.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

type testNS struct {
	name string
	h    netns.NsHandle
}

// newNS makes a namespace with 198.18.0.11 on its loopback (the "PublicIP").
func newNS(t *testing.T) *testNS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, TUN)")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "xud" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns := &testNS{name: name}
	ns.ip(t, "link set lo up")
	ns.ip(t, "addr add 198.18.0.11/32 dev lo")
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ns.h = h
	return ns
}

func (n *testNS) ip(t *testing.T, args string) string {
	t.Helper()
	out, err := n.try("ip " + args)
	if err != nil {
		t.Fatalf("ip %s: %v: %s", args, err, out)
	}
	return out
}

func (n *testNS) try(cmd string) (string, error) {
	out, err := exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.name, "--"}, strings.Fields(cmd)...)...).CombinedOutput()
	return string(out), err
}

// do runs fn on a thread in the namespace.
func (n *testNS) do(t *testing.T, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(n.h); err != nil {
			t.Error(err)
			return
		}
		fn()
	}()
	<-done
}

var testCfg = subnetmgr.Config{
	Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24,
	Backend: subnetmgr.BackendConfig{Type: "udp", VNI: 1, Port: 8472},
}

func testOpts() backend.Options {
	return backend.Options{
		Iface:  backend.ExternalInterface{Name: "lo", Index: 1, MTU: 1500, PublicIP: h1IP, IfaceIP: h1IP},
		Config: testCfg,
		Logger: slog.New(slog.DiscardHandler),
	}
}

// newIn builds the backend on a thread in ns; every other call in the tests runs on the
// test's own goroutine, in the root namespace, as xnetd's goroutines would run anywhere.
func newIn(t *testing.T, ns *testNS, tune Tuning) *Backend {
	t.Helper()
	var b *Backend
	var err error
	ns.do(t, func() { b, err = NewWithTuning(testOpts(), tune) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	return b
}

func ownLease() subnetmgr.Lease { return testLease("10.244.1.0/24", h1IP) }

func TestSetupMakesXnet0InTheNamespaceNewRanIn(t *testing.T) {
	ns := newNS(t)
	b := newIn(t, ns, Tuning{Queues: 2})
	if err := b.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	link := ns.ip(t, "-d link show xnet0")
	for _, want := range []string{"mtu 1450", "UP", "tun type tun", "multi_queue", "vnet_hdr", "persist"} {
		if !strings.Contains(link, want) {
			t.Errorf("xnet0 lacks %q:\n%s", want, link)
		}
	}
	if addr := ns.ip(t, "-4 addr show xnet0"); !strings.Contains(addr, "inet 10.244.1.0/32") {
		t.Errorf("xnet0 address:\n%s", addr)
	}
	if out, err := exec.Command("ip", "link", "show", "xnet0").CombinedOutput(); err == nil && strings.Contains(string(out), "persist") {
		t.Errorf("a persistent xnet0 appeared in the root namespace: %s", out)
	}
	socks, _ := ns.try("ss -ulnH")
	if strings.Count(socks, "198.18.0.11:8472") != 2 {
		t.Errorf("want two receiving sockets (one per queue) on 198.18.0.11:8472:\n%s", socks)
	}
	st := b.Status()
	if st.Queues != 2 || st.SendSockets != 8 || !st.TUNOffload || !st.UDPGSO || !st.UDPGRO || st.MTU != 1450 {
		t.Errorf("status %+v", st)
	}
	if len(st.Counters.Verdicts) != int(numVerdicts) {
		t.Errorf("counters list %d verdicts, want all %d", len(st.Counters.Verdicts), numVerdicts)
	}
	// A second Setup with the same lease changes nothing.
	if err := b.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
}

func TestPeersAreRoutedIntoXnet0(t *testing.T) {
	ns := newNS(t)
	b := newIn(t, ns, Tuning{Queues: 1})
	if err := b.AddPeer(testLease("10.244.2.0/24", h2IP)); err == nil {
		t.Error("AddPeer before Setup succeeded")
	}
	if err := b.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	h2 := testLease("10.244.2.0/24", h2IP)
	if err := b.AddPeer(h2); err != nil {
		t.Fatal(err)
	}
	if r := ns.ip(t, "route show 10.244.2.0/24"); !strings.Contains(r, "dev xnet0 scope link") {
		t.Errorf("route to the peer: %q", r)
	}
	// An older lease with our PublicIP is ours, not a peer's: not routed into the overlay.
	older := testLease("10.244.9.0/24", h1IP)
	if err := b.AddPeer(older); err != nil {
		t.Fatal(err)
	}
	if r := ns.ip(t, "route show "+older.Subnet.String()); r != "" {
		t.Errorf("our older lease %v routed: %q", older.Subnet, r)
	}
	if err := b.AddPeer(subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.3.0/24"), PublicIP: h3IP, BackendType: "host-gw"}); err == nil {
		t.Error("a host-gw lease was accepted")
	}
	if c := b.Traffic(); len(c.Peers) != 1 || c.Peers[0].PublicIP != h2IP || c.Peers[0].Subnet != h2.Subnet {
		t.Errorf("peer counters %+v, want one entry for h2", c.Peers)
	}
	if err := b.RemovePeer(h2); err != nil {
		t.Fatal(err)
	}
	if r := ns.ip(t, "route show 10.244.2.0/24"); r != "" {
		t.Errorf("route left after RemovePeer: %q", r)
	}
	if c := b.Traffic(); len(c.Peers) != 0 {
		t.Errorf("removed peer still listed: %+v", c.Peers)
	}
}

// TestRestartReattachesXnet0: what a user sees of a restart and of a teardown is
// backend/conformance's; this is how the persistent TUN makes it so.
func TestRestartReattachesXnet0(t *testing.T) {
	ns := newNS(t)
	b := newIn(t, ns, Tuning{Queues: 2})
	if err := b.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatal(err)
	}
	if err := b.AddPeer(testLease("10.244.2.0/24", h2IP)); err != nil {
		t.Fatal(err)
	}
	index := ns.ip(t, "-o link show xnet0")[:3]
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(false); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// Stopped without teardown: the device and the route stay (packets are dropped, not
	// leaked to the default route).
	if r := ns.ip(t, "route show 10.244.2.0/24"); !strings.Contains(r, "dev xnet0") {
		t.Errorf("route gone after Close(false): %q", r)
	}
	b2 := newIn(t, ns, Tuning{Queues: 2})
	if err := b2.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatalf("Setup after a restart: %v", err)
	}
	if got := ns.ip(t, "-o link show xnet0")[:3]; got != index {
		t.Errorf("xnet0 was re-created (index %q, was %q), want re-attached", got, index)
	}
	if r := ns.ip(t, "route show 10.244.2.0/24"); !strings.Contains(r, "dev xnet0") {
		t.Errorf("route gone after the restart: %q", r)
	}
}

func TestSetupReplacesALeftoverXnet0WithOtherFlags(t *testing.T) {
	ns := newNS(t)
	ns.ip(t, "tuntap add dev xnet0 mode tun") // single queue, no vnet header, persistent
	b := newIn(t, ns, Tuning{Queues: 1})
	if err := b.Setup(context.Background(), ownLease(), testCfg); err != nil {
		t.Fatalf("Setup over a leftover TUN: %v", err)
	}
	if link := ns.ip(t, "-d link show xnet0"); !strings.Contains(link, "multi_queue") {
		t.Errorf("xnet0 not replaced:\n%s", link)
	}
}

func TestSetupFailsWhenThePortIsTaken(t *testing.T) {
	ns := newNS(t)
	var other *net.UDPConn
	ns.do(t, func() {
		var err error
		other, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(198, 18, 0, 11), Port: 8472})
		if err != nil {
			t.Error(err)
		}
	})
	if other == nil {
		return
	}
	defer other.Close()
	b := newIn(t, ns, Tuning{Queues: 1})
	err := b.Setup(context.Background(), ownLease(), testCfg)
	if err == nil || !strings.Contains(err.Error(), "8472") {
		t.Errorf("Setup with the port taken: %v, want an error naming the port", err)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	cases := []struct {
		name string
		edit func(*backend.Options)
	}{
		{"IPv6 PublicIP", func(o *backend.Options) { o.Iface.PublicIP = netip.MustParseAddr("2001:db8::1") }},
		{"MTU too small", func(o *backend.Options) { o.Iface.MTU = 60 }},
	}
	for _, c := range cases {
		o := testOpts()
		c.edit(&o)
		if b, err := New(o); err == nil {
			b.Close(false)
			t.Errorf("%s: New succeeded", c.name)
		}
	}
}
