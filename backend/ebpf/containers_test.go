package ebpf

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/test/harness"
)

// A link subscription ends for good on its first receive error, and container churn can
// overflow its buffer. With a buffer too small for a burst of veths joining docker0, the watch
// must notice, subscribe again and resync: in the end every veth on docker0 carries the encap
// program and no deleted one is still tracked.
func TestLinkWatchRecoversFromOverflowDuringContainerChurn(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1})
	h := topo.Hosts()[0]
	if err := h.SetupDocker0(netip.MustParsePrefix("10.244.1.1/24"), 1450); err != nil {
		t.Fatal(err)
	}
	b := newOn(t, h, DecapTC)
	b.linkBuffer = 1 // the kernel rounds it up to its minimum: a few messages
	t.Cleanup(func() { _ = b.Close(true) })
	if err := b.Setup(t.Context(), vxlanLease(t, "10.244.1.0/24", h.UnderlayIP.String()), testConfig); err != nil {
		t.Fatal(err)
	}
	const pairs = 150
	err := h.Do(func() error {
		br, err := netlink.LinkByName(DockerBridge)
		if err != nil {
			return err
		}
		for i := range pairs {
			v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("xc%d", i), MasterIndex: br.Attrs().Index}, PeerName: fmt.Sprintf("xp%d", i)}
			if err := netlink.LinkAdd(v); err != nil {
				return fmt.Errorf("add veth %d: %w", i, err)
			}
		}
		// Half of them go again, as short-lived containers do.
		for i := 0; i < pairs; i += 2 {
			if err := netlink.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("xc%d", i)}}); err != nil {
				return fmt.Errorf("delete veth %d: %w", i, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[int]bool{}
	if err := h.Do(func() error {
		for i := 1; i < pairs; i += 2 {
			l, err := netlink.LinkByName(fmt.Sprintf("xc%d", i))
			if err != nil {
				return err
			}
			want[l.Attrs().Index] = true
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		b.mu.Lock()
		got := len(b.veths)
		missing, stale := 0, 0
		for idx := range want {
			if _, ok := b.veths[idx]; !ok {
				missing++
			}
		}
		for idx := range b.veths {
			if !want[idx] {
				stale++
			}
		}
		b.mu.Unlock()
		if missing == 0 && stale == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the churn the backend tracks %d veths: %d of the %d on docker0 lack encap, %d deleted ones are still tracked (link watch resyncs: %d)",
				got, missing, len(want), stale, b.linkResyncs.Load())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if b.linkResyncs.Load() == 0 {
		t.Fatalf("the burst of %d link events did not overflow a minimal buffer: this test proved nothing about recovery", pairs*3)
	}
	t.Logf("link watch resynced %d times; all %d veths on docker0 carry encap", b.linkResyncs.Load(), len(want))
}

// A container stopped while xnetd was down leaves its learned endpoint in the pinned map, keyed
// by its address and pointing at an interface that no longer exists. A new container with the
// same address (Docker hands addresses out again) must be reachable from another host after
// xnetd starts again, not blackholed into the dead interface.
func TestAContainerReplacedWhileXnetdWasDownIsReachable(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	leases := []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24")}
	var bs []*Backend
	var ctrs []*harness.Container
	for i, h := range hosts {
		b := startOn(t, h, vxlanLease(t, leases[i].String(), h.UnderlayIP.String()))
		bs = append(bs, b)
		if err := h.SetupDocker0(netip.PrefixFrom(leases[i].Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, c)
	}
	t.Cleanup(func() {
		for _, b := range bs {
			_ = b.Close(true)
		}
	})
	for i, b := range bs {
		if err := b.AddPeer(vxlanLease(t, leases[1-i].String(), hosts[1-i].UnderlayIP.String())); err != nil {
			t.Fatal(err)
		}
	}
	ping := func(what string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		if sent, got, err := harness.Ping(ctx, ctrs[0].Namespace, ctrs[1].IP, 5, 100*time.Millisecond); err != nil || got == 0 {
			t.Fatalf("%s: ping %v -> %v: %d of %d answered (%v)", what, ctrs[0].IP, ctrs[1].IP, got, sent, err)
		}
	}
	ping("before the restart") // host 2 learns its container from the replies

	// xnetd on host 2 stops; its container goes and a new one comes with the same address.
	if err := bs[1].Close(false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c := ctrs[1]
	newVeth := c.Veth + "n"
	if err := hosts[1].IP(ctx, "link del "+c.Veth,
		fmt.Sprintf("link add %s mtu %d type veth peer name eth0 mtu %d netns %s", newVeth, bs[1].MTU(), bs[1].MTU(), c.Namespace.Name),
		fmt.Sprintf("link set %s master docker0 up", newVeth)); err != nil {
		t.Fatal(err)
	}
	if err := c.Namespace.IP(ctx, fmt.Sprintf("addr add %s/24 dev eth0", c.IP), "link set eth0 up",
		fmt.Sprintf("route add default via %s dev eth0", leases[1].Addr().Next())); err != nil {
		t.Fatal(err)
	}
	bs[1] = startOn(t, hosts[1], vxlanLease(t, leases[1].String(), hosts[1].UnderlayIP.String()))
	if err := bs[1].AddPeer(vxlanLease(t, leases[0].String(), hosts[0].UnderlayIP.String())); err != nil {
		t.Fatal(err)
	}
	eps, err := bs[1].m.ListEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		if ep.IP == c.IP {
			var exists bool
			_ = hosts[1].Do(func() error { _, err := netlink.LinkByIndex(ep.Ifindex); exists = err == nil; return nil })
			if !exists {
				t.Fatalf("after the restart, endpoint %v still points at ifindex %d, which is gone", ep.IP, ep.Ifindex)
			}
		}
	}
	ping("after the container was replaced while xnetd was down")
}

// The container bridge is found by our gateway address, not by its name: a bridge that loses
// the address stops being served, and the same bridge renamed (a daemon.json "bridge", podman's
// or a CNI bridge) serves again once it holds the address; its containers then take the fast
// path (they are learned and delivered to directly) and reach another host's.
func TestTheContainerBridgeIsFoundByItsAddressNotItsName(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	leases := []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24")}
	var bs []*Backend
	var ctrs []*harness.Container
	for i, h := range hosts {
		b := startOn(t, h, vxlanLease(t, leases[i].String(), h.UnderlayIP.String()))
		t.Cleanup(func() { _ = b.Close(true) })
		bs = append(bs, b)
		if err := h.SetupDocker0(netip.PrefixFrom(leases[i].Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, c)
	}
	for i, b := range bs {
		if err := b.AddPeer(vxlanLease(t, leases[1-i].String(), hosts[1-i].UnderlayIP.String())); err != nil {
			t.Fatal(err)
		}
	}
	served := func(b *Backend) (veths int, bridges []string) {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.veths), append([]string(nil), b.status.Bridges...)
	}
	waitServed := func(what string, b *Backend, veths int, bridge string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			n, brs := served(b)
			if n == veths && (bridge == "" && len(brs) == 0 || len(brs) == 1 && brs[0] == bridge) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d container veths on bridges %q, want %d on %q", what, n, brs, veths, bridge)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	h, b := hosts[1], bs[1]
	gw := h.Docker0().String()
	waitServed("docker0 with our gateway address", b, 1, "docker0")

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := h.IP(ctx, "addr flush dev docker0"); err != nil {
		t.Fatal(err)
	}
	waitServed("the bridge without our address", b, 0, "")

	if err := h.IP(ctx, "link set docker0 down", "link set docker0 name cni0", "link set cni0 up", "addr add "+gw+" dev cni0"); err != nil {
		t.Fatal(err)
	}
	waitServed("the bridge renamed cni0 with our gateway address", b, 1, "cni0")

	if sent, got, err := harness.Ping(ctx, ctrs[0].Namespace, ctrs[1].IP, 3, 100*time.Millisecond); err != nil || got == 0 {
		t.Fatalf("ping %v -> %v behind cni0: %d of %d answered (%v)", ctrs[0].IP, ctrs[1].IP, got, sent, err)
	}
	eps, err := b.m.ListEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 1 || eps[0].IP != ctrs[1].IP {
		t.Fatalf("endpoints behind cni0 after the ping: %+v, want %v learned (the fast path)", eps, ctrs[1].IP)
	}
}
