package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/bpf/testpkt"
)

// Return codes of the programs as BPF_PROG_TEST_RUN reports them.
const (
	tcPass     = 0xffffffff // TC_ACT_UNSPEC (-1): TCX_NEXT, untouched
	tcOK       = 0          // TC_ACT_OK: to the stack
	tcDrop     = 2          // TC_ACT_SHOT
	tcRedirect = 7          // TC_ACT_REDIRECT
	xdpDrop    = 1
	xdpPass    = 2
)

// The host under test and its one peer.
var (
	localIP    = netip.MustParseAddr("198.18.0.11")
	peerIP     = netip.MustParseAddr("198.18.0.12")
	strangerIP = netip.MustParseAddr("198.18.0.99")
	localNet   = netip.MustParsePrefix("10.244.1.0/24")
	peerNet    = netip.MustParsePrefix("10.244.2.0/24")
	localVtep  = backend.VtepMAC(localIP)
	peerVtep   = backend.VtepMAC(peerIP)
	nicMAC     = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x11}
	peerNicMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x12}
	ctrMAC     = net.HardwareAddr{0x02, 0x42, 10, 244, 1, 5}
	gwMAC      = net.HardwareAddr{0x02, 0x42, 0, 0, 0, 1}

	ctrIP      = netip.MustParseAddr("10.244.1.5") // a learned local container
	newCtrIP   = netip.MustParseAddr("10.244.1.6") // a local container not learned yet
	remoteIP   = netip.MustParseAddr("10.244.2.3") // a container on the peer
	hostIfidx  = uint32(4242)
	ctrIfindex = uint32(4243)
)

const (
	xnetMetaDecapped = 0x786e6574 // XNET_META_DECAPPED
	vni              = 1
	port             = 8472
)

type objects struct {
	XnetPrograms
	XnetMaps
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
}

// load loads the programs with fresh, unpinned maps and the fixture's config, routes and
// endpoints.
func load(t testing.TB, underlayIfindex uint32) *objects {
	t.Helper()
	requireRoot(t)
	spec, err := LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs objects
	if err := xdpMetaSupported(); err != nil {
		// Some kernels (this project's 6.18 CI VM among them) refuse bpf_xdp_adjust_meta in
		// every XDP program, so decap_xdp cannot load there; the TC programs are still tested.
		t.Logf("decap_xdp not loaded, XDP halves of the tests skipped: %v", err)
		var tc struct {
			DecapTc        *ebpf.Program `ebpf:"decap_tc"`
			EncapContainer *ebpf.Program `ebpf:"encap_container"`
			EncapHost      *ebpf.Program `ebpf:"encap_host"`
			DeliverBridge  *ebpf.Program `ebpf:"deliver_bridge"`
			DecapTunnel    *ebpf.Program `ebpf:"decap_tunnel"`
			XnetMaps
		}
		loadAndAssign(t, spec, &tc)
		objs.DecapTc, objs.EncapContainer, objs.EncapHost, objs.XnetMaps = tc.DecapTc, tc.EncapContainer, tc.EncapHost, tc.XnetMaps
		objs.DeliverBridge, objs.DecapTunnel = tc.DeliverBridge, tc.DecapTunnel
	} else {
		loadAndAssign(t, spec, &objs)
	}
	t.Cleanup(func() { objs.XnetPrograms.Close(); objs.XnetMaps.Close() })

	cfg := XnetHostConfig{
		LocalIp:         ip4(localIP),
		SubnetAddr:      ip4(localNet.Addr()),
		SubnetMask:      ip4(netip.MustParseAddr("255.255.255.0")),
		Vni:             vni,
		UnderlayIfindex: underlayIfindex,
		HostIfindex:     hostIfidx,
		Port:            port,
		UnderlayMtu:     1500,
	}
	copy(cfg.VtepMac[:], localVtep)
	copy(cfg.UnderlayMac[:], nicMAC)
	must(t, objs.Config.Put(uint32(0), cfg))
	rt := XnetRoute{RemoteIp: ip4(peerIP)}
	copy(rt.VtepMac[:], peerVtep)
	must(t, objs.Routes.Put(XnetRouteKey{Prefixlen: 24, Addr: ip4(peerNet.Addr())}, rt))
	// A peer whose PublicIP has no route on the test underlay.
	unreachable := XnetRoute{RemoteIp: ip4(netip.MustParseAddr("203.0.113.1"))}
	must(t, objs.Routes.Put(XnetRouteKey{Prefixlen: 24, Addr: ip4(netip.MustParseAddr("10.244.3.0"))}, unreachable))
	ep := XnetEndpoint{Ifindex: ctrIfindex}
	copy(ep.Mac[:], ctrMAC)
	copy(ep.GwMac[:], gwMAC)
	must(t, objs.Endpoints.Put(ip4(ctrIP), ep))
	zero := make([]XnetPeerStats, ebpf.MustPossibleCPU())
	must(t, objs.Peers.Put(underlayKey(peerIP), zero))
	return &objs
}

func loadAndAssign(t testing.TB, spec *ebpf.CollectionSpec, to any) {
	t.Helper()
	if err := spec.LoadAndAssign(to, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("verifier: %+v", ve)
		}
		t.Fatal(err)
	}
}

// xdpMetaSupported loads the smallest XDP program that calls bpf_xdp_adjust_meta, the helper
// decap_xdp marks its packets with.
func xdpMetaSupported() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.XDP,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R2, -4),
			asm.FnXdpAdjustMeta.Call(),
			asm.Mov.Imm(asm.R0, xdpPass),
			asm.Return(),
		},
	})
	if err != nil {
		return fmt.Errorf("probe bpf_xdp_adjust_meta in XDP: %w", err)
	}
	return prog.Close()
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// ip4 returns an IPv4 address as the maps hold it (ipv4_addr: wire-order bytes).
func ip4(a netip.Addr) [4]uint8 { return a.As4() }

// underlayKey is a peer's underlay address as the nexthops and peers maps key it (bpf/structs.h
// underlay_addr): an IPv6 address, or an IPv4 one mapped into IPv6.
func underlayKey(a netip.Addr) [16]uint8 { return a.As16() }

// addPeerCounters creates zeroed counters for the peer at addr, as the Go side's AddPeer does
// (the programs only count into existing entries).
func addPeerCounters(t testing.TB, objs *objects, addr netip.Addr) {
	t.Helper()
	must(t, objs.Peers.Put(underlayKey(addr), make([]XnetPeerStats, ebpf.MustPossibleCPU())))
}

// peerPackets sums the packets the peers map counted for addr, sent and received.
func peerPackets(t testing.TB, objs *objects, addr netip.Addr) (tx, rx uint64) {
	t.Helper()
	var per []XnetPeerStats
	must(t, objs.Peers.Lookup(underlayKey(addr), &per))
	for _, p := range per {
		tx += p.TxPackets
		rx += p.RxPackets
	}
	return tx, rx
}

// verdicts sums the per-CPU counters map.
func verdicts(t testing.TB, m *ebpf.Map) map[XnetVerdict]uint64 {
	t.Helper()
	out := map[XnetVerdict]uint64{}
	for v := XnetVerdict(0); v < XnetVerdictVERDICT_MAX; v++ {
		var per []XnetCounter
		must(t, m.Lookup(uint32(v), &per))
		for _, c := range per {
			out[v] += c.Packets
		}
	}
	return out
}

func run(t testing.TB, prog *ebpf.Program, in []byte) (uint32, []byte) {
	t.Helper()
	out := make([]byte, len(in)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		t.Fatalf("test run of %d bytes: %v", len(in), err)
	}
	return ret, out
}

// vxlanFrame is what a peer sends: outer headers from outerSrc to us around an inner IPv4
// packet innerSrc -> innerDst.
type vxlanFrame struct {
	outerSrc   netip.Addr
	outerDst   netip.Addr
	ipOptions  []byte
	fragField  uint16
	dstPort    uint16
	vni        uint32
	noIFlag    bool
	editVXLAN  func(hdr []byte) // changes the 8-byte VXLAN header after it is built
	innerDstMA net.HardwareAddr
	innerType  uint16
	innerSrc   netip.Addr
	innerDst   netip.Addr
	outerTOS   uint8
	innerTOS   uint8
	// innerRaw, when set, is the inner packet (of type innerType) instead of the IPv4 one.
	innerRaw []byte
}

func (f vxlanFrame) inner() []byte {
	return testpkt.IPv4{Src: f.innerSrc, Dst: f.innerDst, Proto: testpkt.ProtoTCP, TOS: f.innerTOS}.
		Packet(testpkt.TCP(f.innerSrc, f.innerDst, 40000, 5201, []byte("hello overlay")))
}

func (f vxlanFrame) bytes() []byte {
	innerType := f.innerType
	if innerType == 0 {
		innerType = testpkt.EtherTypeIPv4
	}
	innerPayload := f.inner()
	switch {
	case f.innerRaw != nil:
		innerPayload = f.innerRaw
	case innerType != testpkt.EtherTypeIPv4:
		innerPayload = bytes.Repeat([]byte{0xab}, 28)
	}
	innerEth := testpkt.Eth(f.innerDstMA, peerVtep, innerType, innerPayload)
	vx := testpkt.VXLAN(f.vni, innerEth)
	if f.noIFlag {
		vx[0] = 0
	}
	if f.editVXLAN != nil {
		f.editVXLAN(vx[:8])
	}
	outer := testpkt.IPv4{Src: f.outerSrc, Dst: f.outerDst, Proto: testpkt.ProtoUDP, Flags: f.fragField, Options: f.ipOptions, TOS: f.outerTOS}.
		Packet(testpkt.UDP(45000, f.dstPort, vx))
	return testpkt.Eth(nicMAC, peerNicMAC, testpkt.EtherTypeIPv4, outer)
}

// fromPeer is a well-formed packet from the peer's container to our learned container.
func fromPeer() vxlanFrame {
	return vxlanFrame{
		outerSrc: peerIP, outerDst: localIP, dstPort: port, vni: vni,
		innerDstMA: localVtep, innerSrc: remoteIP, innerDst: ctrIP,
	}
}

// The ECN codepoints of RFC 3168, in the low two bits of the TOS byte.
const (
	ecnECT1 = 0x01
	ecnECT0 = 0x02
	ecnCE   = 0x03
)

func withTOS(f vxlanFrame, outer, inner uint8) vxlanFrame {
	f.outerTOS, f.innerTOS = outer, inner
	return f
}

func with(f vxlanFrame, change func(*vxlanFrame)) vxlanFrame {
	change(&f)
	return f
}

// decapCase is one row of the decap specification: the same input runs through the TC and the
// XDP program, which must agree.
type decapCase struct {
	name    string
	in      []byte
	verdict XnetVerdict
	// For accepted packets: what TC delivers (Ethernet + inner IPv4) and its return code.
	tcOut []byte
	tcRet uint32
}

func TestDecap(t *testing.T) {
	objs := load(t, 1)

	accepted := fromPeer()
	innerTo := func(dstMAC, srcMAC net.HardwareAddr, f vxlanFrame) []byte {
		return testpkt.Eth(dstMAC, srcMAC, testpkt.EtherTypeIPv4, f.inner())
	}
	toNewCtr := with(accepted, func(f *vxlanFrame) { f.innerDst = newCtrIP })
	withOptions := with(accepted, func(f *vxlanFrame) { f.ipOptions = []byte{1, 1, 1, 0} }) // NOP NOP NOP EOL
	notVXLAN := testpkt.Eth(nicMAC, peerNicMAC, testpkt.EtherTypeIPv4,
		testpkt.IPv4{Src: peerIP, Dst: localIP, Proto: testpkt.ProtoTCP}.Packet(testpkt.TCP(peerIP, localIP, 22, 40000, []byte("ssh"))))

	cases := []decapCase{
		{name: "a peer's container to a learned local container is delivered into its veth peer",
			in: accepted.bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, accepted), tcRet: tcRedirect},
		{name: "a local container not learned yet is reached through xnet0",
			in: toNewCtr.bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(localVtep, peerNicMAC, toNewCtr), tcRet: tcRedirect},
		{name: "outer IPv4 options are skipped",
			in: withOptions.bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withOptions), tcRet: tcRedirect},
		// RFC 6040 decapsulation, as the kernel's vxlan does it: a congestion mark on the
		// outside reaches the inner packet (with its checksum fixed); an inner packet that
		// cannot carry it is dropped; nothing else of the outer TOS is copied.
		{name: "outer CE is copied into an inner ECT(0) packet",
			in: withTOS(accepted, ecnCE, ecnECT0).bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withTOS(accepted, 0, ecnCE)), tcRet: tcRedirect},
		{name: "outer CE is copied into an inner ECT(1) packet, keeping its DSCP",
			in: withTOS(accepted, ecnCE, 0xb8|ecnECT1).bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withTOS(accepted, 0, 0xb8|ecnCE)), tcRet: tcRedirect},
		{name: "an inner CE packet stays CE",
			in: withTOS(accepted, ecnCE, ecnCE).bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withTOS(accepted, 0, ecnCE)), tcRet: tcRedirect},
		{name: "outer ECT(0) leaves the inner ECN field alone",
			in: withTOS(accepted, ecnECT0, ecnECT1).bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withTOS(accepted, 0, ecnECT1)), tcRet: tcRedirect},
		{name: "the outer DSCP is not copied into the inner packet",
			in: withTOS(accepted, 0xb8, 0).bytes(), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: innerTo(ctrMAC, gwMAC, withTOS(accepted, 0, 0)), tcRet: tcRedirect},
		{name: "outer CE on an inner packet that is not ECN-capable is dropped",
			in: withTOS(accepted, ecnCE, 0).bytes(), verdict: XnetVerdictVERDICT_DROP_CE_NOT_ECT},
		{name: "another UDP port is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.dstPort = 4789 }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "another VNI is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.vni = 2 }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "a VXLAN header without the I flag is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.noIFlag = true }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "a VXLAN header with a reserved flag bit set is not ours (the kernel's vxlan drops it too)",
			in: with(accepted, func(f *vxlanFrame) { f.editVXLAN = func(h []byte) { h[0] = 0x0c } }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "a VXLAN header with the GBP flag (an extension we do not speak) is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.editVXLAN = func(h []byte) { h[0] = 0x88 } }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "a VXLAN header with bits set in the reserved 24 bits after the flags is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.editVXLAN = func(h []byte) { h[3] = 0x01 } }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "a VXLAN header with the reserved byte after the VNI set is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.editVXLAN = func(h []byte) { h[7] = 0x01 } }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "VXLAN to another address is not ours",
			in: with(accepted, func(f *vxlanFrame) { f.outerDst = strangerIP }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "an outer first fragment is left to the stack",
			in: with(accepted, func(f *vxlanFrame) { f.fragField = 0x2000 }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "an outer later fragment is left to the stack",
			in: with(accepted, func(f *vxlanFrame) { f.fragField = 0x0010 }).bytes(), verdict: XnetVerdictVERDICT_PASS},
		{name: "TCP to the host (ssh) passes untouched", in: notVXLAN, verdict: XnetVerdictVERDICT_PASS},
		{name: "ARP passes untouched",
			in: testpkt.Eth(net.HardwareAddr{255, 255, 255, 255, 255, 255}, peerNicMAC, testpkt.EtherTypeARP, bytes.Repeat([]byte{1}, 28)), verdict: XnetVerdictVERDICT_PASS},
		{name: "IPv6 passes untouched",
			in: testpkt.Eth(nicMAC, peerNicMAC, testpkt.EtherTypeIPv6, bytes.Repeat([]byte{0x60}, 60)), verdict: XnetVerdictVERDICT_PASS},
		{name: "an inner frame for another VTEP MAC is dropped",
			in: with(accepted, func(f *vxlanFrame) { f.innerDstMA = peerVtep }).bytes(), verdict: XnetVerdictVERDICT_DROP_BAD_VTEP_MAC},
		{name: "an inner frame that is not IPv4 is dropped",
			in: with(accepted, func(f *vxlanFrame) { f.innerType = testpkt.EtherTypeARP }).bytes(), verdict: XnetVerdictVERDICT_DROP_INNER_NOT_IPV4},
		{name: "an inner destination outside our subnet is dropped",
			in: with(accepted, func(f *vxlanFrame) { f.innerDst = netip.MustParseAddr("10.244.9.9") }).bytes(), verdict: XnetVerdictVERDICT_DROP_NOT_LOCAL},
		{name: "an inner source in no lease is dropped",
			in: with(accepted, func(f *vxlanFrame) { f.innerSrc = netip.MustParseAddr("10.244.7.7") }).bytes(), verdict: XnetVerdictVERDICT_DROP_UNKNOWN_SOURCE},
		{name: "a spoofed outer source (not the lease owner of the inner source) is dropped",
			in: with(accepted, func(f *vxlanFrame) { f.outerSrc = strangerIP }).bytes(), verdict: XnetVerdictVERDICT_DROP_SPOOFED},
	}

	// Truncation at every header boundary (and one byte either side) of an accepted packet:
	// before the VXLAN header is complete it is not recognisably ours and passes; after, the
	// inner frame is broken and dropped.
	full := accepted.bytes()
	for _, cut := range []struct {
		at      int
		verdict XnetVerdict
	}{
		{13, XnetVerdictVERDICT_PASS}, {14, XnetVerdictVERDICT_PASS}, {33, XnetVerdictVERDICT_PASS},
		{34, XnetVerdictVERDICT_PASS}, {41, XnetVerdictVERDICT_PASS}, {42, XnetVerdictVERDICT_PASS},
		{49, XnetVerdictVERDICT_PASS}, {50, XnetVerdictVERDICT_DROP_MALFORMED},
		{63, XnetVerdictVERDICT_DROP_MALFORMED}, {64, XnetVerdictVERDICT_DROP_MALFORMED},
		{83, XnetVerdictVERDICT_DROP_MALFORMED},
		// The inner IPv4 header is complete from 84 bytes on, but its tot_len counts the TCP
		// segment too: the inner packet is still cut short until the last byte.
		{84, XnetVerdictVERDICT_DROP_MALFORMED}, {104, XnetVerdictVERDICT_DROP_MALFORMED},
		{len(full) - 1, XnetVerdictVERDICT_DROP_MALFORMED},
	} {
		cases = append(cases, decapCase{name: "truncated to " + strconv.Itoa(cut.at) + " bytes", in: full[:cut.at], verdict: cut.verdict})
	}

	// The inner tot_len against the bytes present. innerIP is where the inner IPv4 header starts
	// in full (outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet).
	const innerIP = 14 + 20 + 8 + 8 + 14
	withTotLen := func(n uint16) []byte {
		b := bytes.Clone(full)
		binary.BigEndian.PutUint16(b[innerIP+2:], n)
		return b
	}
	innerLen := len(full) - innerIP
	padding := make([]byte, 20)
	cases = append(cases,
		decapCase{name: "an inner tot_len one byte beyond the frame is dropped",
			in: withTotLen(uint16(innerLen + 1)), verdict: XnetVerdictVERDICT_DROP_MALFORMED},
		decapCase{name: "an inner tot_len shorter than the inner IPv4 header is dropped",
			in: withTotLen(19), verdict: XnetVerdictVERDICT_DROP_MALFORMED},
		decapCase{name: "an inner tot_len of 0 is dropped",
			in: withTotLen(0), verdict: XnetVerdictVERDICT_DROP_MALFORMED},
		decapCase{name: "an inner tot_len of just the header (an empty IPv4 packet) is delivered",
			in: withTotLen(20), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: append(testpkt.Eth(ctrMAC, gwMAC, testpkt.EtherTypeIPv4, nil), withTotLen(20)[innerIP:]...), tcRet: tcRedirect},
		decapCase{name: "padding after the inner packet is delivered as it came, for the stack to trim",
			in: append(bytes.Clone(full), padding...), verdict: XnetVerdictVERDICT_DECAP,
			tcOut: append(innerTo(ctrMAC, gwMAC, accepted), padding...), tcRet: tcRedirect},
	)

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { runDecapCase(t, objs, c) })
	}
}

// runDecapCase runs one row of a decap table through decap_tc and, where it loads, decap_xdp.
func runDecapCase(t *testing.T, objs *objects, c decapCase) {
	t.Helper()
	// TC: BPF_PROG_TEST_RUN refuses SCHED_CLS frames shorter than Ethernet +
	// IPv4 when the EtherType says IPv4; only XDP sees those.
	if len(c.in) >= 34 || len(c.in) >= 14 && binary.BigEndian.Uint16(c.in[12:14]) != testpkt.EtherTypeIPv4 {
		before := verdicts(t, objs.Counters)
		ret, out := run(t, objs.DecapTc, c.in)
		checkCounted(t, "tc", before, verdicts(t, objs.Counters), c.verdict)
		switch c.verdict {
		case XnetVerdictVERDICT_DECAP:
			if ret != c.tcRet || !bytes.Equal(out[:len(c.tcOut)], c.tcOut) {
				t.Errorf("tc: got %d\n% x\nwant %d\n% x", ret, out[:len(c.tcOut)], c.tcRet, c.tcOut)
			}
		case XnetVerdictVERDICT_PASS:
			expectUntouched(t, "tc", ret, tcPass, out, c.in)
		default:
			expectUntouched(t, "tc", ret, tcDrop, out, c.in)
		}
	}
	if len(c.in) < 14 || objs.DecapXdp == nil {
		return // below an Ethernet header the kernel refuses to run XDP too
	}
	before := verdicts(t, objs.Counters)
	ret, out := run(t, objs.DecapXdp, c.in)
	checkCounted(t, "xdp", before, verdicts(t, objs.Counters), c.verdict)
	switch c.verdict {
	case XnetVerdictVERDICT_DECAP:
		// XDP strips up to the inner Ethernet frame, marks it in the metadata
		// (which the test run returns in front of the frame) and leaves
		// delivery to TC.
		// The inner Ethernet header as it came, the inner packet as TC delivers
		// it (the same bytes, unless ECN changed them).
		want := binary.NativeEndian.AppendUint32(nil, xnetMetaDecapped)
		want = append(want, c.in[len(c.in)-len(c.tcOut):][:14]...)
		want = append(want, c.tcOut[14:]...)
		if ret != xdpPass || !bytes.Equal(out[:len(want)], want) {
			t.Errorf("xdp: got %d\n% x\nwant %d\n% x", ret, out[:len(want)], xdpPass, want)
		}
	case XnetVerdictVERDICT_PASS:
		expectUntouched(t, "xdp", ret, xdpPass, out, c.in)
	default:
		expectUntouched(t, "xdp", ret, xdpDrop, out, c.in)
	}
}

// runCounted runs prog on in with ctx inside the test underlay's namespace (inNS) and checks
// that exactly the counter of verdict want moved; it returns what the program returned and
// its output frame.
func runCounted(t *testing.T, objs *objects, inNS func(func()), prog *ebpf.Program, in []byte, ctx skbContext, want XnetVerdict) (uint32, []byte) {
	t.Helper()
	before := verdicts(t, objs.Counters)
	var (
		ret uint32
		out []byte
		err error
	)
	inNS(func() { ret, out, err = runCtxErr(prog, in, ctx) })
	must(t, err)
	checkCounted(t, "tc", before, verdicts(t, objs.Counters), want)
	return ret, out
}

func checkCounted(t *testing.T, hook string, before, after map[XnetVerdict]uint64, want XnetVerdict) {
	t.Helper()
	for v := XnetVerdict(0); v < XnetVerdictVERDICT_MAX; v++ {
		d := after[v] - before[v]
		if v == want && d != 1 || v != want && d != 0 {
			t.Errorf("%s: counter %d moved by %d (want %d counted once)", hook, v, d, want)
		}
	}
}

func expectUntouched(t *testing.T, hook string, ret, wantRet uint32, out, in []byte) {
	t.Helper()
	if ret != wantRet || !bytes.Equal(out[:len(in)], in) {
		t.Errorf("%s: got %d, want %d with the packet untouched\n got % x\nwant % x", hook, ret, wantRet, out[:len(in)], in)
	}
}

// underlay creates a network namespace holding the underlay NIC of the fixture (198.18.0.11/24,
// with the peer's MAC known) and returns the NIC and a function that runs code inside that
// namespace. bpf_fib_lookup in a test run looks at the namespace of the calling thread, so the
// encap test runs its programs through in; subtests run on other goroutines, hence the
// dedicated locked thread.
func underlay(t *testing.T) (ifindex uint32, mac net.HardwareAddr, in func(func())) {
	t.Helper()
	requireRoot(t)
	work := make(chan func())
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		ns, err := netns.New()
		if err != nil {
			ready <- err
			return
		}
		defer ns.Close()
		h, err := netlink.NewHandleAt(ns)
		if err != nil {
			ready <- err
			return
		}
		defer h.Close()
		var u0 netlink.Link
		err = func() error {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "u0", MTU: 1500}, PeerName: "u1"}
			if err := h.LinkAdd(veth); err != nil {
				return err
			}
			var err error
			if u0, err = h.LinkByName("u0"); err != nil {
				return err
			}
			if err := h.AddrAdd(u0, &netlink.Addr{IPNet: &net.IPNet{IP: localIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
				return err
			}
			if err := h.LinkSetUp(u0); err != nil {
				return err
			}
			// Without its peer up, u0 has no carrier and its routes are dead.
			u1, err := h.LinkByName("u1")
			if err != nil {
				return err
			}
			if err := h.LinkSetUp(u1); err != nil {
				return err
			}
			// Hosts forward (Docker needs it); bpf_fib_lookup checks it.
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/all/forwarding", []byte("1"), 0o644); err != nil {
				return err
			}
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/u0/forwarding", []byte("1"), 0o644); err != nil {
				return err
			}
			if err := h.NeighAdd(&netlink.Neigh{LinkIndex: u0.Attrs().Index, State: netlink.NUD_PERMANENT,
				IP: peerIP.AsSlice(), HardwareAddr: peerNicMAC}); err != nil {
				return err
			}
			// The IPv6 underlay (underlay6_test.go's addresses): our PublicIPv6, and the
			// IPv6 peer's, which has the same NIC MAC as the IPv4 peer.
			for _, f := range []string{"all", "u0"} {
				if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+f+"/forwarding", []byte("1"), 0o644); err != nil {
					return err
				}
			}
			if err := h.AddrAdd(u0, &netlink.Addr{IPNet: &net.IPNet{IP: localIP6.AsSlice(), Mask: net.CIDRMask(64, 128)},
				Flags: unix.IFA_F_NODAD}); err != nil {
				return err
			}
			return h.NeighAdd(&netlink.Neigh{LinkIndex: u0.Attrs().Index, State: netlink.NUD_PERMANENT,
				IP: peer6IP6.AsSlice(), HardwareAddr: peerNicMAC})
		}()
		if err == nil {
			ifindex, mac = uint32(u0.Attrs().Index), u0.Attrs().HardwareAddr
		}
		ready <- err
		for fn := range work {
			fn()
			ready <- nil
		}
	}()
	must(t, <-ready)
	t.Cleanup(func() { close(work) })
	return ifindex, mac, func(fn func()) {
		work <- fn
		<-ready
	}
}
