package health

// Probers in two simulated hosts of the shared harness (network namespaces with eth0 on one
// underlay bridge, 198.18.0.11/24 and .12/24). Each host also holds an "overlay" address on
// eth0 with an on-link route to the other's subnet: the datapath itself is the backends'
// business, here only that a path dropping probes is told apart from one that answers.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/harness"
)

var testNetwork = netip.MustParsePrefix("10.244.0.0/16")

type probeHost struct {
	*harness.Host
	subnet  netip.Prefix
	overlay netip.Addr
}

func (h *probeHost) sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := h.Run(t.Context(), args[0], args[1:]...); err != nil {
		t.Fatalf("%s: %v\n%s", h.Name, err, out)
	}
}

func (h *probeHost) peer() Peer {
	return Peer{Subnet: h.subnet, PublicIP: h.UnderlayIP, Overlay: h.overlay}
}

// probeHosts makes two hosts; host i has overlay address 10.244.(i+1).0 and routes the other's
// subnet on eth0.
func probeHosts(t *testing.T) [2]*probeHost {
	t.Helper()
	var hs [2]*probeHost
	for i, h := range harness.NewForTest(t, harness.Options{Hosts: 2}).Hosts() {
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		hs[i] = &probeHost{Host: h, subnet: subnet, overlay: subnet.Addr()}
		hs[i].sh(t, "ip", "addr", "add", hs[i].overlay.String()+"/32", "dev", "eth0")
	}
	// No "src": a route with a preferred source goes away with that address, and the probers
	// bind their source anyway.
	hs[0].sh(t, "ip", "route", "add", hs[1].subnet.String(), "dev", "eth0")
	hs[1].sh(t, "ip", "route", "add", hs[0].subnet.String(), "dev", "eth0")
	return hs
}

// start runs a prober in h's namespace, fast enough for a test.
func (h *probeHost) start(t *testing.T, mod func(*Options)) *Prober {
	t.Helper()
	o := Options{Overlay: h.overlay, Underlay: h.UnderlayIP, Network: testNetwork,
		Interval: 100 * time.Millisecond, Timeout: 300 * time.Millisecond}
	if mod != nil {
		mod(&o)
	}
	var p *Prober
	if err := h.Do(func() error {
		var err error
		p, err = Start(o)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// waitFor polls p's view of subnet until cond holds, and returns how long that took.
func waitFor(t *testing.T, p *Prober, subnet netip.Prefix, what string, within time.Duration, cond func(PeerHealth) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		h := p.Snapshot()[subnet]
		if cond(h) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s not seen within %v: %+v", what, within, h)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func bothUp(h PeerHealth) bool {
	return h.Overlay.State == StateReachable && h.Underlay.State == StateReachable
}

func TestProbersTellABrokenOverlayFromAWorkingUnderlay(t *testing.T) {
	hs := probeHosts(t)
	changes := make(chan struct{}, 100)
	a := hs[0].start(t, func(o *Options) {
		o.OnChange = func() {
			select {
			case changes <- struct{}{}:
			default:
			}
		}
	})
	b := hs[1].start(t, nil)
	a.SetPeers([]Peer{hs[1].peer()})
	b.SetPeers([]Peer{hs[0].peer()})

	t.Run("both paths answer", func(t *testing.T) {
		waitFor(t, a, hs[1].subnet, "both paths reachable", 3*time.Second, bothUp)
		waitFor(t, b, hs[0].subnet, "both paths reachable", 3*time.Second, bothUp)
		time.Sleep(300 * time.Millisecond)
		h := a.Snapshot()[hs[1].subnet]
		for _, p := range Paths {
			ph := h.Path(p)
			if ph.RTTLast <= 0 || ph.RTTP50 <= 0 || ph.Loss != 0 || ph.Answered == 0 || ph.WindowProbes == 0 {
				t.Errorf("%s: %+v, want RTTs, answers and no loss", p, ph)
			}
		}
		if h.Overlay.Target != hs[1].overlay || h.Underlay.Target != hs[1].UnderlayIP {
			t.Errorf("targets %v and %v, want %v and %v", h.Overlay.Target, h.Underlay.Target, hs[1].overlay, hs[1].UnderlayIP)
		}
		if len(changes) == 0 {
			t.Errorf("OnChange was not called when the paths became reachable")
		}
		if h.Problem() != "" {
			t.Errorf("Problem() = %q for a healthy peer", h.Problem())
		}
	})

	t.Run("probes dropped on the overlay make only the overlay unreachable", func(t *testing.T) {
		hs[1].sh(t, "nft", "add table ip hc")
		hs[1].sh(t, "nft", "add chain ip hc in { type filter hook input priority 0 ; }")
		hs[1].sh(t, "nft", fmt.Sprintf("add rule ip hc in ip daddr %v udp dport %d drop", hs[1].overlay, DefaultPort))
		took := waitFor(t, a, hs[1].subnet, "overlay unreachable", 3*time.Second, func(h PeerHealth) bool {
			return h.Overlay.State == StateUnreachable
		})
		h := a.Snapshot()[hs[1].subnet]
		if h.Underlay.State != StateReachable {
			t.Errorf("underlay %+v, want still reachable", h.Underlay)
		}
		if !strings.Contains(h.Problem(), "overlay unreachable") || !strings.Contains(h.Overlay.Why, "unanswered") {
			t.Errorf("Problem() %q, why %q", h.Problem(), h.Overlay.Why)
		}
		t.Logf("overlay reported unreachable %v after the drop rule (interval 100ms, timeout 300ms)", took.Round(time.Millisecond))
	})

	t.Run("one answer makes it reachable again", func(t *testing.T) {
		hs[1].sh(t, "nft", "delete table ip hc")
		waitFor(t, a, hs[1].subnet, "overlay reachable again", 3*time.Second, bothUp)
	})

	t.Run("a peer that leaves is no longer probed", func(t *testing.T) {
		a.SetPeers(nil)
		if got := len(a.Snapshot()); got != 0 {
			t.Errorf("%d peers after SetPeers(nil)", got)
		}
	})
}

// The responder answers only hosts it knows, and on the overlay only addresses inside the
// Network: it cannot be used to reflect traffic at a third party.
func TestResponderAnswersOnlyPeersAndTheNetwork(t *testing.T) {
	hs := probeHosts(t)
	a := hs[0].start(t, nil)

	// request sends one probe from h2's address on path to h1 and says whether it was answered.
	request := func(t *testing.T, from, to netip.Addr) bool {
		t.Helper()
		var answered bool
		err := hs[1].Do(func() error {
			c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)))
			if err != nil {
				return err
			}
			defer c.Close()
			msg := message{kind: kindRequest, seq: 42}.appendTo(nil)
			if _, err := c.WriteToUDPAddrPort(msg, netip.AddrPortFrom(to, DefaultPort)); err != nil {
				return err
			}
			_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			buf := make([]byte, 64)
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return nil // no answer
			}
			m, ok := parseMessage(buf[:n])
			answered = ok && m.kind == kindReply && m.seq == 42 && m.flags&flagOverlayUp != 0
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return answered
	}

	if request(t, hs[1].UnderlayIP, hs[0].UnderlayIP) {
		t.Errorf("the underlay responder answered a host that is not a peer")
	}
	a.SetPeers([]Peer{hs[1].peer()})
	if !request(t, hs[1].UnderlayIP, hs[0].UnderlayIP) {
		t.Errorf("the underlay responder did not answer a peer (with the overlay-up flag)")
	}
	if !request(t, hs[1].overlay, hs[0].overlay) {
		t.Errorf("the overlay responder did not answer an address in the Network")
	}
	outside := netip.MustParseAddr("192.0.2.7")
	hs[1].sh(t, "ip", "addr", "add", outside.String()+"/32", "dev", "eth0")
	hs[0].sh(t, "ip", "route", "add", outside.String(), "dev", "eth0")
	if request(t, outside, hs[0].overlay) {
		t.Errorf("the overlay responder answered %v, outside the Network %v", outside, testNetwork)
	}
}

// host-gw's overlay address is docker0's, which exists once Docker runs: until both hosts
// hold theirs, the overlay is "not probed" (not unreachable), and probed as soon as they do.
func TestOptionalOverlayIsProbedOnceBothHostsHoldTheirAddress(t *testing.T) {
	hs := probeHosts(t)
	hs[1].sh(t, "ip", "addr", "del", hs[1].overlay.String()+"/32", "dev", "eth0")
	a := hs[0].start(t, func(o *Options) { o.OverlayOptional = true })
	b := hs[1].start(t, func(o *Options) { o.OverlayOptional = true })
	optional := func(p Peer) Peer { p.OverlayOptional = true; return p }
	a.SetPeers([]Peer{optional(hs[1].peer())})
	b.SetPeers([]Peer{optional(hs[0].peer())})

	waitFor(t, a, hs[1].subnet, "overlay not probed while the peer lacks its address", 3*time.Second, func(h PeerHealth) bool {
		return h.Underlay.State == StateReachable && h.Overlay.State == StateNotProbed && strings.Contains(h.Overlay.Why, "the peer has not said")
	})
	waitFor(t, b, hs[0].subnet, "overlay not probed while this host lacks its address", 3*time.Second, func(h PeerHealth) bool {
		return h.Overlay.State == StateNotProbed && strings.Contains(h.Overlay.Why, "this host has no")
	})
	hs[1].sh(t, "ip", "addr", "add", hs[1].overlay.String()+"/32", "dev", "eth0")
	took := waitFor(t, a, hs[1].subnet, "overlay reachable once the peer holds its address", 5*time.Second, bothUp)
	waitFor(t, b, hs[0].subnet, "overlay reachable once this host holds its address", 5*time.Second, bothUp)
	t.Logf("overlay probed and reachable %v after the address appeared", took.Round(time.Millisecond))
}

func TestProbeOnceGivesEveryPathAVerdict(t *testing.T) {
	hs := probeHosts(t)
	b := hs[1].start(t, nil)
	b.SetPeers([]Peer{hs[0].peer()})
	gone := Peer{Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("198.18.0.99"),
		Overlay: netip.MustParseAddr("10.244.9.0")}
	refused := Peer{Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: hs[1].UnderlayIP, OverlayWhy: "refused by the backend"}
	hs[0].sh(t, "ip", "route", "add", gone.Subnet.String(), "dev", "eth0")

	var got map[netip.Prefix]PeerHealth
	start := time.Now()
	err := hs[0].Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		got, err = ProbeOnce(ctx, Options{Overlay: hs[0].overlay, Underlay: hs[0].UnderlayIP, Network: testNetwork,
			Timeout: 300 * time.Millisecond}, []Peer{hs[1].peer(), gone, refused})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ProbeOnce took %v", time.Since(start).Round(time.Millisecond))
	if h := got[hs[1].subnet]; !bothUp(h) {
		t.Errorf("live peer: %+v, want both paths reachable", h)
	}
	if h := got[gone.Subnet]; h.Overlay.State != StateUnreachable || h.Underlay.State != StateUnreachable {
		t.Errorf("absent peer: %+v, want both paths unreachable", h)
	}
	if h := got[refused.Subnet]; h.Overlay.State != StateNotProbed || h.Overlay.Why != "refused by the backend" || h.Underlay.State != StateReachable {
		t.Errorf("refused peer: %+v, want the overlay not probed with the reason and the underlay reachable", h)
	}
}

// A host without a responder (a flannel host in a mixed cluster, a stopped xnetd) answers
// with ICMP port unreachable, which crossed the path both ways: reachable, marked so, and no
// problem to report.
func TestAHostWithoutResponderIsReachableThroughItsICMPAnswer(t *testing.T) {
	hs := probeHosts(t)
	a := hs[0].start(t, nil)
	a.SetPeers([]Peer{hs[1].peer()})
	waitFor(t, a, hs[1].subnet, "both paths reachable through ICMP", 3*time.Second, bothUp)
	h := a.Snapshot()[hs[1].subnet]
	for _, p := range Paths {
		if ph := h.Path(p); !ph.NoResponder || ph.RTTLast <= 0 || !strings.Contains(ph.Brief(), "no responder") {
			t.Errorf("%s: %+v (%q), want reachable with no responder and an RTT", p, ph, ph.Brief())
		}
	}
	if h.Problem() != "" {
		t.Errorf("Problem() = %q", h.Problem())
	}
	// A responder that starts answering takes over.
	b := hs[1].start(t, nil)
	b.SetPeers([]Peer{hs[0].peer()})
	waitFor(t, a, hs[1].subnet, "answers from the responder", 3*time.Second, func(h PeerHealth) bool {
		return bothUp(h) && !h.Overlay.NoResponder && !h.Underlay.NoResponder
	})
}

// An IPv6-only overlay probes over IPv6 on both paths: from our IPv6 subnet's first address
// and from our IPv6 underlay address. A broken overlay is told from a working underlay as in
// IPv4, and a host without a responder answers with ICMPv6 port unreachable.
func TestIPv6ProbersTellABrokenOverlayFromAWorkingUnderlay(t *testing.T) {
	network := netip.MustParsePrefix("fd00:10:244::/48")
	var hs [2]*probeHost
	for i, h := range harness.NewForTest(t, harness.Options{Hosts: 2, IPv6Underlay: true}).Hosts() {
		subnet := netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i+1))
		hs[i] = &probeHost{Host: h, subnet: subnet, overlay: subnet.Addr()}
		hs[i].sh(t, "ip", "addr", "add", hs[i].overlay.String()+"/128", "dev", "eth0", "nodad")
	}
	// One route for the whole Network, as ebpf's xnet0 has: a route to exactly the peer's /64
	// would make its first address the subnet-router anycast address, to which the kernel sends
	// no ICMPv6 errors (and so no port unreachable from a host without a responder).
	hs[0].sh(t, "ip", "route", "add", network.String(), "dev", "eth0")
	hs[1].sh(t, "ip", "route", "add", network.String(), "dev", "eth0")
	peer := func(h *probeHost) Peer { return Peer{Subnet: h.subnet, PublicIP: h.UnderlayIPv6, Overlay: h.overlay} }
	start := func(h *probeHost) *Prober {
		return h.start(t, func(o *Options) { o.Underlay, o.Network = h.UnderlayIPv6, network })
	}

	a := start(hs[0])
	a.SetPeers([]Peer{peer(hs[1])})
	// No responder on hs[1] yet: its ICMPv6 port unreachable answers both paths.
	waitFor(t, a, hs[1].subnet, "both paths reachable through ICMPv6", 3*time.Second, func(h PeerHealth) bool {
		return bothUp(h) && h.Overlay.NoResponder && h.Underlay.NoResponder
	})

	b := start(hs[1])
	b.SetPeers([]Peer{peer(hs[0])})
	waitFor(t, a, hs[1].subnet, "answers from the responder", 3*time.Second, func(h PeerHealth) bool {
		return bothUp(h) && !h.Overlay.NoResponder && !h.Underlay.NoResponder
	})
	waitFor(t, b, hs[0].subnet, "both paths reachable", 3*time.Second, bothUp)
	if got := a.LocalAddr(Overlay); got != netip.AddrPortFrom(hs[0].overlay, DefaultPort) {
		t.Errorf("overlay socket on %v, want %v", got, netip.AddrPortFrom(hs[0].overlay, DefaultPort))
	}
	h := a.Snapshot()[hs[1].subnet]
	if h.Overlay.Target != hs[1].overlay || h.Underlay.Target != hs[1].UnderlayIPv6 || h.Overlay.RTTLast <= 0 {
		t.Errorf("targets %v and %v (RTT %v), want %v and %v", h.Overlay.Target, h.Underlay.Target, h.Overlay.RTTLast, hs[1].overlay, hs[1].UnderlayIPv6)
	}

	// The route to the peer's overlay gone: its overlay is unreachable, its underlay still answers.
	hs[0].sh(t, "ip", "route", "del", network.String(), "dev", "eth0")
	waitFor(t, a, hs[1].subnet, "overlay unreachable, underlay reachable", 5*time.Second, func(h PeerHealth) bool {
		return h.Overlay.State == StateUnreachable && h.Underlay.State == StateReachable
	})
	if p := a.Snapshot()[hs[1].subnet].Problem(); !strings.Contains(p, "while the underlay answers") {
		t.Errorf("Problem() = %q, want the overlay broken while the underlay answers", p)
	}
	hs[0].sh(t, "ip", "route", "add", network.String(), "dev", "eth0")
	waitFor(t, a, hs[1].subnet, "both paths reachable again", 5*time.Second, bothUp)
}

// Dual stack: the IPv6 overlay is a third path, and a broken IPv6 route shows on it alone.
func TestOverlay6IsProbedBesideTheIPv4Overlay(t *testing.T) {
	network6 := netip.MustParsePrefix("fd00:10:244::/48")
	hs := probeHosts(t)
	var o6 [2]netip.Addr
	for i, h := range hs {
		o6[i] = netip.MustParseAddr(fmt.Sprintf("fd00:10:244:%d::", i+1))
		h.sh(t, "ip", "addr", "add", o6[i].String()+"/128", "dev", "eth0", "nodad")
		h.sh(t, "ip", "route", "add", network6.String(), "dev", "eth0")
	}
	var ps [2]*Prober
	for i, h := range hs {
		ps[i] = h.start(t, func(o *Options) { o.Overlay6, o.Network6 = o6[i], network6 })
	}
	for i := range hs {
		peer := hs[1-i].peer()
		peer.Overlay6 = o6[1-i]
		ps[i].SetPeers([]Peer{peer})
	}
	a, b := ps[0], hs[1]
	allUp := func(h PeerHealth) bool {
		return bothUp(h) && h.Overlay6 != nil && h.Overlay6.State == StateReachable && !h.Overlay6.NoResponder
	}
	waitFor(t, a, b.subnet, "all three paths reachable", 3*time.Second, allUp)
	if h := a.Snapshot()[b.subnet]; h.Overlay6.Target != o6[1] || h.Overlay6.RTTLast <= 0 || h.Path(Overlay6).Target != o6[1] {
		t.Errorf("overlay6 %+v, want answers from %v", h.Overlay6, o6[1])
	}
	hs[0].sh(t, "ip", "route", "del", network6.String(), "dev", "eth0")
	waitFor(t, a, b.subnet, "overlay6 unreachable, the rest reachable", 5*time.Second, func(h PeerHealth) bool {
		return bothUp(h) && h.Overlay6 != nil && h.Overlay6.State == StateUnreachable
	})
	if p := a.Snapshot()[b.subnet].Problem(); !strings.Contains(p, "IPv6 overlay unreachable") {
		t.Errorf("Problem() = %q, want the IPv6 overlay unreachable", p)
	}
	hs[0].sh(t, "ip", "route", "add", network6.String(), "dev", "eth0")
	waitFor(t, a, b.subnet, "all three paths reachable again", 5*time.Second, allUp)
	// A peer without an IPv6 subnet has no overlay6.
	a.SetPeers([]Peer{b.peer()})
	waitFor(t, a, b.subnet, "two paths only", 3*time.Second, func(h PeerHealth) bool { return bothUp(h) && h.Overlay6 == nil })
}
