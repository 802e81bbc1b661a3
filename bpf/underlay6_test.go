package bpf

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// The IPv6 underlay fixture, on top of loadDualStack's: we have an IPv6 VTEP (our PublicIPv6,
// xnet6's ifindex and MAC in config6), and a second peer has one too, owning peer6Net6.
var (
	localIP6    = netip.MustParseAddr("fd00:198:18::b")
	peer6IP6    = netip.MustParseAddr("fd00:198:18::e")
	peer6IP     = netip.MustParseAddr("198.18.0.14")
	peer6Net6   = netip.MustParseAddr("fd00:10:244:4::")
	peer6Ctr    = netip.MustParseAddr("fd00:10:244:4::3")
	localVtep6  = backend.VtepMACv6(localIP6)
	peer6Vtep6  = backend.VtepMACv6(peer6IP6)
	tunnelIfidx = uint32(4244)
)

// loadUnderlay6 is loadDualStack with an IPv6 VTEP of ours and a peer reached through it; with
// tunnel false, config6 names no tunnel device (an earlier build's, or one being removed).
func loadUnderlay6(t testing.TB, underlayIfindex uint32, tunnel bool) *objects {
	t.Helper()
	objs := loadDualStack(t, underlayIfindex)
	var cfg XnetHostConfig6
	must(t, objs.Config6.Lookup(uint32(0), &cfg))
	cfg.LocalIp6 = ip6(localIP6)
	copy(cfg.VtepMac6[:], localVtep6)
	if tunnel {
		cfg.TunnelIfindex = tunnelIfidx
	}
	must(t, objs.Config6.Put(uint32(0), cfg))
	rt := XnetRoute6{RemoteIp: ip4(peer6IP), Underlay6: 1, RemoteIp6: ip6(peer6IP6)}
	copy(rt.VtepMac[:], peer6Vtep6)
	must(t, objs.Routes6.Put(XnetRoute6Key{Prefixlen: 64, Addr: ip6(peer6Net6)}, rt))
	// Its IPv4 subnet too, as AddPeer writes it: without it the fallback over IPv4 has no
	// counters to count into, which changes nothing else.
	v4 := XnetRoute{RemoteIp: ip4(peer6IP)}
	copy(v4.VtepMac[:], backend.VtepMAC(peer6IP))
	must(t, objs.Routes.Put(XnetRouteKey{Prefixlen: 24, Addr: ip4(netip.MustParseAddr("10.244.4.0"))}, v4))
	return objs
}

// TestEncapOverIPv6Underlay is the specification of the encap towards a peer with an IPv6 VTEP:
// the frame goes to xnet6 whole (the kernel's vxlan adds the outer headers from the tunnel key),
// addressed from our IPv6 VTEP MAC to the peer's; its size is held to the underlay MTU less 70
// bytes; and without the device it rides the IPv4 VXLAN as before.
func TestEncapOverIPv6Underlay(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	const (
		mtu6 = 1500 - 70
		fits = mtu6 - 60 // TCP payload of the largest IPv6 packet that fits
	)
	run := func(objs *objects, in []byte, host bool) (uint32, []byte) {
		t.Helper()
		prog := objs.EncapContainer
		if host {
			prog = objs.EncapHost
		}
		var (
			ret uint32
			out []byte
			err error
		)
		inNS(func() { ret, out, err = runCtxErr(prog, in, skbContext{}) })
		must(t, err)
		return ret, out
	}
	objs := loadUnderlay6(t, ifindex, true)
	for _, c := range []struct {
		name    string
		in      []byte
		host    bool
		verdict XnetVerdict
		ret     uint32
		out     []byte
	}{
		{name: "a container's packet goes to xnet6, from our IPv6 VTEP MAC to the peer's",
			in: container6Frame(ctrIP6, peer6Ctr, 100, 0), verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect,
			out: testpkt.Eth(peer6Vtep6, localVtep6, testpkt.EtherTypeIPv6, container6Frame(ctrIP6, peer6Ctr, 100, 0)[14:])},
		{name: "host traffic in xnet0 goes the same way",
			in: container6Frame(ctrIP6, peer6Ctr, 100, 0), host: true, verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect,
			out: testpkt.Eth(peer6Vtep6, localVtep6, testpkt.EtherTypeIPv6, container6Frame(ctrIP6, peer6Ctr, 100, 0)[14:])},
		{name: "the largest packet that fits the IPv6 underlay goes",
			in: container6Frame(ctrIP6, peer6Ctr, fits, 0), verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect,
			out: testpkt.Eth(peer6Vtep6, localVtep6, testpkt.EtherTypeIPv6, container6Frame(ctrIP6, peer6Ctr, fits, 0)[14:])},
		{name: "one byte more is answered with Packet Too Big, MTU 1430",
			in: container6Frame(ctrIP6, peer6Ctr, fits+1, 0), verdict: XnetVerdictVERDICT_ICMP_PACKET_TOO_BIG, ret: tcRedirect,
			out: packetTooBig(container6Frame(ctrIP6, peer6Ctr, fits+1, 0), mtu6)},
		{name: "a peer without an IPv6 VTEP is still reached inside the IPv4 VXLAN, with 1450 bytes",
			in: container6Frame(ctrIP6, remoteIP6, fits+1, 0), verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := verdicts(t, objs.Counters)
			ret, out := run(objs, c.in, c.host)
			checkCounted(t, "tc", before, verdicts(t, objs.Counters), c.verdict)
			if ret != c.ret {
				t.Fatalf("returned %d, want %d", ret, c.ret)
			}
			if c.out != nil && !bytes.Equal(out[:len(c.out)], c.out) {
				t.Errorf("sent\n% x\nwant\n% x", out[:len(c.out)], c.out)
			}
		})
	}

	t.Run("without xnet6 in config6 the peer is reached inside the IPv4 VXLAN", func(t *testing.T) {
		objs := loadUnderlay6(t, ifindex, false)
		before := verdicts(t, objs.Counters)
		in := container6Frame(ctrIP6, peer6Ctr, 100, 0)
		ret, out := run(objs, in, false)
		checkCounted(t, "tc", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_ENCAP)
		if ret != tcRedirect {
			t.Fatalf("returned %d, want %d", ret, tcRedirect)
		}
		if dst, _ := netip.AddrFromSlice(out[14+16 : 14+20]); out[12] != 0x08 || out[13] != 0 || dst != peer6IP || len(out) < len(in)+50 {
			t.Fatalf("sent % x: want IPv4 VXLAN to the peer's PublicIP %v", out[:64], peer6IP)
		}
	})
}

// decap_tunnel judges what xnet6 hands it by the tunnel key the kernel's vxlan recorded; a
// frame without one did not come through the tunnel and is dropped. (What it does with real
// tunnel traffic is backend/ebpf's TestIPv6UnderlayAcceptanceRules: a test run cannot give an
// skb a tunnel key.)
func TestDecapTunnelWithoutTunnelKey(t *testing.T) {
	objs := loadUnderlay6(t, 1, true)
	if objs.DecapTunnel == nil {
		t.Fatal("decap_tunnel not loaded")
	}
	in := testpkt.Eth(localVtep6, peer6Vtep6, testpkt.EtherTypeIPv6, tcp6(peer6Ctr, ctrIP6, 10, 0))
	before := verdicts(t, objs.Counters)
	ret, _ := run(t, objs.DecapTunnel, in)
	checkCounted(t, "tc", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_DROP_MALFORMED)
	if ret != tcDrop {
		t.Fatalf("returned %d, want %d", ret, tcDrop)
	}
}

// A container that floods packets too big for the underlay gets at most the ICMP budget of
// enum icmp_ratelimit back (a burst, then one per interval), and the rest is dropped and
// counted; after a pause the budget is back. Both families share it. The test runs on one CPU:
// the buckets are per CPU.
func TestICMPErrorsAreRateLimited(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	objs := loadDualStack(t, ifindex)
	const (
		burst    = int(XnetIcmpRatelimitXNET_ICMP_BURST)
		interval = time.Duration(XnetIcmpRatelimitXNET_ICMP_INTERVAL_NS)
		flood    = 2000
	)
	tooBig4 := tooBigFrame(1500, 0x4000, nil) // DF set
	tooBig6 := container6Frame(ctrIP6, remoteIP6, 1500, 0)
	answers := func() (answered, limited uint64) {
		v := verdicts(t, objs.Counters)
		return v[XnetVerdictVERDICT_ICMP_FRAG_NEEDED] + v[XnetVerdictVERDICT_ICMP_PACKET_TOO_BIG], v[XnetVerdictVERDICT_DROP_ICMP_RATELIMIT]
	}
	// send runs n oversize packets, alternating the families, on one CPU; it returns how long
	// that took and how many the program did not redirect back (an error or a wrong verdict).
	send := func(n int) (time.Duration, int) {
		var took time.Duration
		wrong := 0
		inNS(func() {
			// inNS's thread is locked to its goroutine; pinned to one CPU too, every run finds
			// the same bucket.
			var allowed, one unix.CPUSet
			if err := unix.SchedGetaffinity(0, &allowed); err != nil {
				wrong = n
				return
			}
			for cpu := 0; cpu < 1024; cpu++ {
				if allowed.IsSet(cpu) {
					one.Set(cpu)
					break
				}
			}
			if err := unix.SchedSetaffinity(0, &one); err != nil {
				wrong = n
				return
			}
			start := time.Now()
			for i := range n {
				in := tooBig4
				if i%2 == 1 {
					in = tooBig6
				}
				ret, _, err := runCtxErr(objs.EncapContainer, in, skbContext{})
				if err != nil || (ret != tcRedirect && ret != tcDrop) {
					wrong++
				}
			}
			took = time.Since(start)
		})
		return took, wrong
	}

	took, wrong := send(flood)
	answered, limited := answers()
	if wrong != 0 {
		t.Fatalf("%d of %d oversize packets neither answered nor dropped", wrong, flood)
	}
	budget := uint64(burst) + uint64(took/interval) + 1
	t.Logf("%d oversize packets in %v: %d answered (budget %d), %d dropped by the rate limit", flood, took, answered, budget, limited)
	if answered > budget {
		t.Errorf("%d ICMP errors for a flood of %d in %v: want at most %d (burst %d, one per %v)", answered, flood, took, budget, burst, interval)
	}
	if answered < uint64(burst) {
		t.Errorf("%d ICMP errors: want the whole burst of %d answered", answered, burst)
	}
	if answered+limited != flood {
		t.Errorf("%d answered + %d rate-limited, want %d in all", answered, limited, flood)
	}

	time.Sleep(time.Duration(burst) * interval)
	if _, wrong := send(burst); wrong != 0 {
		t.Fatalf("%d of %d packets after the pause neither answered nor dropped", wrong, burst)
	}
	if again, _ := answers(); again-answered < uint64(burst) {
		t.Errorf("after a pause of %v, %d of %d oversize packets answered: want all, the bucket refilled", time.Duration(burst)*interval, again-answered, burst)
	}
}

// loadIPv6Only is loadUnderlay6 on a host of an IPv6-only overlay: the config says ipv6_only
// and holds no IPv4 underlay address or lease, and the only routes are IPv6 ones over the IPv6
// underlay (PublicIP 0.0.0.0, as the lease publishes it).
func loadIPv6Only(t testing.TB, underlayIfindex uint32) *objects {
	t.Helper()
	objs := loadUnderlay6(t, underlayIfindex, true)
	var cfg XnetHostConfig
	must(t, objs.Config.Lookup(uint32(0), &cfg))
	cfg.LocalIp, cfg.SubnetAddr, cfg.SubnetMask, cfg.Ipv6Only = [4]uint8{}, [4]uint8{}, [4]uint8{}, 1
	must(t, objs.Config.Put(uint32(0), cfg))
	var rt XnetRoute6
	key := XnetRoute6Key{Prefixlen: 64, Addr: ip6(peer6Net6)}
	must(t, objs.Routes6.Lookup(key, &rt))
	rt.RemoteIp = [4]uint8{}
	must(t, objs.Routes6.Put(key, rt))
	return objs
}

// TestIPv6Only is the specification of the datapath in an IPv6-only overlay: it is configured
// without an IPv4 address, carries containers' IPv6 over the IPv6 underlay as in dual stack,
// and leaves every IPv4 packet alone, whatever IPv4 state an earlier run left in the maps.
func TestIPv6Only(t *testing.T) {
	ifindex, _, inNS := underlay(t)
	objs := loadIPv6Only(t, ifindex)
	// The peer has no PublicIP: its counters are keyed by its PublicIPv6.
	addPeerCounters(t, objs, peer6IP6)
	tunnelOut := testpkt.Eth(peer6Vtep6, localVtep6, testpkt.EtherTypeIPv6, container6Frame(ctrIP6, peer6Ctr, 100, 0)[14:])
	ipv4Frame := containerFrame(newCtrIP, remoteIP, 100)
	for _, c := range []struct {
		name    string
		prog    func() *ebpf.Program
		in      []byte
		verdict XnetVerdict
		ret     uint32
		out     []byte // nil: the packet as it came
	}{
		{name: "a container's IPv6 packet to a peer goes to xnet6",
			prog: func() *ebpf.Program { return objs.EncapContainer }, in: container6Frame(ctrIP6, peer6Ctr, 100, 0),
			verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect, out: tunnelOut},
		{name: "the host's IPv6 in xnet0 goes the same way",
			prog: func() *ebpf.Program { return objs.EncapHost }, in: container6Frame(ctrIP6, peer6Ctr, 100, 0),
			verdict: XnetVerdictVERDICT_ENCAP, ret: tcRedirect, out: tunnelOut},
		{name: "a container's IPv4 packet, even to an IPv4 route an earlier run left, passes unlearned",
			prog: func() *ebpf.Program { return objs.EncapContainer }, in: ipv4Frame,
			verdict: XnetVerdictVERDICT_PASS, ret: tcPass},
		{name: "IPv4 routed into xnet0 has nowhere to go",
			prog: func() *ebpf.Program { return objs.EncapHost }, in: ipv4Frame,
			verdict: XnetVerdictVERDICT_PASS, ret: tcDrop},
		{name: "IPv4 VXLAN to the underlay NIC is not ours: it passes to the stack",
			prog: func() *ebpf.Program { return objs.DecapTc }, in: fromPeer().bytes(),
			verdict: XnetVerdictVERDICT_PASS, ret: tcPass},
	} {
		t.Run(c.name, func(t *testing.T) {
			ret, out := runCounted(t, objs, inNS, c.prog(), c.in, skbContext{}, c.verdict)
			want := c.out
			if want == nil {
				want = c.in
			}
			if ret != c.ret || !bytes.Equal(out[:len(want)], want) {
				t.Errorf("returned %d, want %d\n got % x\nwant % x", ret, c.ret, out[:len(want)], want)
			}
		})
	}
	var ep XnetEndpoint
	if err := objs.Endpoints.Lookup(ip4(newCtrIP), &ep); err == nil {
		t.Errorf("the container's IPv4 address was learned (%+v)", ep)
	}
	if tx, _ := peerPackets(t, objs, peer6IP6); tx != 2 {
		t.Errorf("peer %s: %d packets sent counted, want the 2 sent to it", peer6IP6, tx)
	}
	if objs.DecapXdp != nil {
		before := verdicts(t, objs.Counters)
		in := fromPeer().bytes()
		ret, out := run(t, objs.DecapXdp, in)
		checkCounted(t, "xdp", before, verdicts(t, objs.Counters), XnetVerdictVERDICT_PASS)
		expectUntouched(t, "xdp", ret, xdpPass, out, in)
	}
}
