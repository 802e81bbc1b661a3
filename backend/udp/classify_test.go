package udp

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/tunoffload"
	"github.com/xnet-dev/xnet/bpf/testpkt"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/wire"
)

// The receive rules, without a kernel: host h1 (198.18.0.11, 10.244.1.0/24) receiving from
// its peers h2 (198.18.0.12, 10.244.2.0/24) and h3 (198.18.0.13, 10.244.3.0/24).

var (
	h1IP, h2IP, h3IP = netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12"), netip.MustParseAddr("198.18.0.13")
	h1Subnet         = netip.MustParsePrefix("10.244.1.0/24")
	h1Subnet6        = netip.MustParsePrefix("fd00:10:244:1::/64")
	h1Local          = localSubnets{v4: h1Subnet}                // an IPv4-only overlay
	h1Dual           = localSubnets{v4: h1Subnet, v6: h1Subnet6} // a dual-stack one
	h1MAC            = mustMAC(backend.VtepMAC(h1IP))
	rxExpect         = wire.Expect{VNI: 1, MAC: h1MAC, MaxInner: 1450}
)

func mustMAC(hw []byte) wire.MAC {
	m, ok := wire.MACFrom(hw)
	if !ok {
		panic("bad MAC")
	}
	return m
}

func testLease(subnet string, publicIP netip.Addr) subnetmgr.Lease {
	data, err := backend.VXLANLeaseData(1, publicIP)
	if err != nil {
		panic(err)
	}
	return subnetmgr.Lease{Subnet: netip.MustParsePrefix(subnet), PublicIP: publicIP, BackendType: "vxlan", BackendData: data}
}

// parsePeer is AddPeer's first step for tests: the lease as the core reads it, then the peer
// the packet path uses.
func parsePeer(lease subnetmgr.Lease, vni, port int, log *slog.Logger) (*peerDP, error) {
	p, err := backend.ParseVXLANPeer(lease, vni, log)
	if err != nil {
		return nil, err
	}
	return newPeerDP(p, port), nil
}

// testTable holds h2 and h3, with IPv6 subnets fd00:10:244:2::/64 and fd00:10:244:3::/64.
func testTable(t testing.TB) *peerTable {
	peers := map[netip.Prefix]*peerDP{}
	for i, l := range []subnetmgr.Lease{testLease("10.244.2.0/24", h2IP), testLease("10.244.3.0/24", h3IP)} {
		p, err := parsePeer(l, 1, 8472, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		p.subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i+2))
		peers[p.subnet] = p
	}
	return newPeerTable(peers)
}

// datagram is what h2 would send h1: VXLAN + Ethernet + IPv4/UDP from src to dst.
func datagram(vni uint32, dstMAC wire.MAC, src, dst string, size int) []byte {
	inner := testpkt.IPv4{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: testpkt.ProtoUDP}.
		Packet(testpkt.UDP(1000, 2000, make([]byte, size-28)))
	b := make([]byte, wire.HeaderLen, wire.HeaderLen+len(inner))
	wire.Encode(b, wire.Header{VNI: vni, Dst: dstMAC, Src: mustMAC(backend.VtepMAC(h2IP))})
	return append(b, inner...)
}

func TestClassifyAppliesEveryAcceptanceRule(t *testing.T) {
	table := testTable(t)
	good := datagram(1, h1MAC, "10.244.2.5", "10.244.1.7", 100)
	cases := []struct {
		name     string
		payload  []byte
		outerSrc netip.Addr
		want     verdict
	}{
		{"from the peer that owns the source, to our subnet: delivered", good, h2IP, verdictDecap},
		{"our subnet's network address (xnet0's) is ours too", datagram(1, h1MAC, "10.244.2.5", "10.244.1.0", 100), h2IP, verdictDecap},
		{"not VXLAN at all", []byte("hello"), h2IP, verdictDropNotVXLAN},
		{"another VNI", datagram(7, h1MAC, "10.244.2.5", "10.244.1.7", 100), h2IP, verdictDropWrongVNI},
		{"truncated", good[:len(good)-10], h2IP, verdictDropMalformed},
		{"another VTEP MAC", datagram(1, mustMAC(backend.VtepMAC(h3IP)), "10.244.2.5", "10.244.1.7", 100), h2IP, verdictDropBadVtepMAC},
		{"inner ARP", func() []byte { b := append([]byte(nil), good...); b[21] = 0x06; return b }(), h2IP, verdictDropInnerNotIPv4},
		{"inner packet over the MTU", datagram(1, h1MAC, "10.244.2.5", "10.244.1.7", 1451), h2IP, verdictDropOversized},
		{"destination in another host's subnet", datagram(1, h1MAC, "10.244.2.5", "10.244.3.7", 100), h2IP, verdictDropNotLocal},
		{"destination outside the overlay", datagram(1, h1MAC, "10.244.2.5", "8.8.8.8", 100), h2IP, verdictDropNotLocal},
		{"source in no lease", datagram(1, h1MAC, "10.244.9.5", "10.244.1.7", 100), h2IP, verdictDropUnknownSource},
		{"source in our own subnet", datagram(1, h1MAC, "10.244.1.9", "10.244.1.7", 100), h2IP, verdictDropUnknownSource},
		{"spoofed: h3 sends with h2's container address", good, h3IP, verdictDropSpoofed},
		{"spoofed: a stranger sends with h2's container address", good, netip.MustParseAddr("198.18.0.99"), verdictDropSpoofed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, f, p := classify(c.payload, c.outerSrc.As4(), rxExpect, h1Local, table)
			if got != c.want {
				t.Fatalf("classify = %v, want %v", got, c.want)
			}
			if got == verdictDecap && (p == nil || p.publicIP != h2IP || len(f.Inner) == 0) {
				t.Errorf("accepted without the owning peer (%v) or an inner packet", p)
			}
		})
	}
}

func TestVerdictNamesAreUniqueAndMatchTheEBPFOnes(t *testing.T) {
	seen := map[string]bool{}
	for v := verdict(0); v < numVerdicts; v++ {
		n := v.String()
		if n == "unknown" || seen[n] {
			t.Errorf("verdict %d named %q", v, n)
		}
		seen[n] = true
	}
	// The names bpf/xnet.h's enum verdict gives the same outcomes, lower-cased.
	for _, n := range []string{"encap", "decap", "drop_malformed", "drop_inner_not_ipv4", "drop_bad_vtep_mac",
		"drop_not_local", "drop_unknown_source", "drop_spoofed", "drop_no_route"} {
		if !seen[n] {
			t.Errorf("no verdict named %q", n)
		}
	}
}

func TestPeerTableFindsTheOwningSubnet(t *testing.T) {
	mk := func(subnet string, ip netip.Addr) *peerDP {
		p, err := parsePeer(testLease(subnet, ip), 1, 8472, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	peers := map[netip.Prefix]*peerDP{}
	for _, p := range []*peerDP{mk("10.244.2.0/24", h2IP), mk("10.244.3.0/24", h3IP), mk("10.244.8.0/22", h1IP), mk("10.244.8.128/25", h2IP)} {
		peers[p.subnet] = p
	}
	table := newPeerTable(peers)
	cases := []struct {
		addr string
		want string // owning subnet, "" for none
	}{
		{"10.244.2.0", "10.244.2.0/24"},
		{"10.244.2.255", "10.244.2.0/24"},
		{"10.244.3.77", "10.244.3.0/24"},
		{"10.244.4.1", ""},
		{"10.244.9.1", "10.244.8.0/22"},
		{"10.244.8.200", "10.244.8.128/25"}, // the longest prefix wins
		{"10.244.8.100", "10.244.8.0/22"},
		{"192.168.1.1", ""},
	}
	for _, c := range cases {
		p := table.lookup(netip.MustParseAddr(c.addr).As4())
		got := ""
		if p != nil {
			got = p.subnet.String()
		}
		if got != c.want {
			t.Errorf("lookup(%s) = %q, want %q", c.addr, got, c.want)
		}
	}
	if emptyTable.lookup([4]byte{10, 244, 2, 1}) != nil {
		t.Error("the empty table found a peer")
	}
}

func TestParsePeerRefusesLeasesItCannotUse(t *testing.T) {
	good := testLease("10.244.2.0/24", h2IP)
	with := func(f func(*subnetmgr.Lease)) subnetmgr.Lease { l := good; f(&l); return l }
	data := func(s string) json.RawMessage { return json.RawMessage(s) }
	cases := []struct {
		name  string
		lease subnetmgr.Lease
		ok    bool
	}{
		{"a vxlan lease", good, true},
		{"another VNI is used anyway (as flannel does)", with(func(l *subnetmgr.Lease) { l.BackendData = data(`{"VNI":2,"VtepMAC":"0e:78:c6:12:00:0c"}`) }), true},
		{"host-gw lease", with(func(l *subnetmgr.Lease) { l.BackendType = "host-gw" }), false},
		{"no backend data", with(func(l *subnetmgr.Lease) { l.BackendData = nil }), false},
		{"null backend data", with(func(l *subnetmgr.Lease) { l.BackendData = data("null") }), false},
		{"not JSON", with(func(l *subnetmgr.Lease) { l.BackendData = data("{") }), false},
		{"bad MAC", with(func(l *subnetmgr.Lease) { l.BackendData = data(`{"VNI":1,"VtepMAC":"zz"}`) }), false},
		{"multicast MAC", with(func(l *subnetmgr.Lease) { l.BackendData = data(`{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}`) }), false},
		{"IPv6 PublicIP", with(func(l *subnetmgr.Lease) { l.PublicIP = netip.MustParseAddr("2001:db8::1") }), false},
		{"no subnet", with(func(l *subnetmgr.Lease) { l.Subnet = netip.Prefix{} }), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := parsePeer(c.lease, 1, 8472, slog.New(slog.DiscardHandler))
			if c.ok != (err == nil) {
				t.Fatalf("parsePeer: %v, want ok=%v", err, c.ok)
			}
			if err != nil && !errors.Is(err, ErrIncompatiblePeer) {
				t.Errorf("error %v does not wrap ErrIncompatiblePeer", err)
			}
			if err == nil && (p.port != 8472 || p.publicIP != c.lease.PublicIP) {
				t.Errorf("outer destination %v:%d", p.publicIP, p.port)
			}
		})
	}
}

func TestFlowHashKeepsAFlowOnOneSocketAndSpreadsFlows(t *testing.T) {
	pkt := func(sport uint16, payload int) []byte {
		return testpkt.IPv4{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.2.2"), Proto: testpkt.ProtoTCP}.
			Packet(testpkt.TCP(netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.2.2"), sport, 5201, make([]byte, payload)))
	}
	if flowHash(pkt(40000, 10)) != flowHash(pkt(40000, 1000)) {
		t.Error("two packets of one flow hash differently")
	}
	used := map[uint32]bool{}
	for sport := uint16(40000); sport < 40064; sport++ {
		used[flowHash(pkt(sport, 10))%8] = true
	}
	if len(used) < 8 {
		t.Errorf("64 flows used only %d of 8 sockets", len(used))
	}
}

func TestGROSizeReadsTheControlMessage(t *testing.T) {
	oob := make([]byte, unix.CmsgSpace(4)+unix.CmsgSpace(4))
	// An unrelated control message first, then UDP_GRO.
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.IPPROTO_IP, unix.IP_TTL
	h.SetLen(unix.CmsgLen(4))
	second := oob[unix.CmsgSpace(4):]
	h = (*unix.Cmsghdr)(unsafe.Pointer(&second[0]))
	h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_GRO
	h.SetLen(unix.CmsgLen(4))
	binary.NativeEndian.PutUint32(second[unix.CmsgLen(0):], 1472)
	cases := []struct {
		name string
		oob  []byte
		want int
	}{
		{"none", nil, 0},
		{"after another message", oob, 1472},
		{"only another message", oob[:unix.CmsgSpace(4)], 0},
		{"cut short", oob[:len(oob)-6], 0},
	}
	for _, c := range cases {
		if got := groSize(c.oob); got != c.want {
			t.Errorf("%s: groSize = %d, want %d", c.name, got, c.want)
		}
	}
}

func TestTxGroupsFollowUDPGSORules(t *testing.T) {
	p, q := &peerDP{}, &peerDP{}
	g := txGroup{peer: p, sock: 1, first: 0, end: 1, stride: 1, segs: 1, segSize: 1472, payloadBytes: 1472}
	cases := []struct {
		name string
		g    txGroup
		peer *peerDP
		sock int
		n    int
		want bool
	}{
		{"same peer, socket and size", g, p, 1, 1472, true},
		{"a shorter last segment", g, p, 1, 100, true},
		{"after a shorter segment nothing more", func() txGroup { h := g; h.closed = true; return h }(), p, 1, 100, false},
		{"a longer segment", g, p, 1, 1473, false},
		{"another peer", g, q, 1, 1472, false},
		{"another socket (flow)", g, p, 2, 1472, false},
		{"over 64 KB", func() txGroup { h := g; h.payloadBytes = 44 * 1472; return h }(), p, 1, 1472, false},
		{"over the segment limit", func() txGroup { h := g; h.segs = maxGSOSegments; h.segSize = 100; return h }(), p, 1, 100, false},
	}
	for _, c := range cases {
		if got := c.g.accepts(c.peer, c.sock, c.n); got != c.want {
			t.Errorf("%s: accepts = %v, want %v", c.name, got, c.want)
		}
	}
}

// FuzzClassify runs arbitrary datagrams through the whole receive decision, including the
// checksum completion of what it accepts: it must never panic, and what it accepts must come
// from the owner of its source and be addressed to us. `go test` runs the seeds;
// `go test -fuzz FuzzClassify ./backend/udp` explores.
func FuzzClassify(f *testing.F) {
	table := testTable(f)
	good := datagram(1, h1MAC, "10.244.2.5", "10.244.1.7", 100)
	f.Add(good, []byte{198, 18, 0, 12})
	f.Add(good, []byte{198, 18, 0, 13})
	f.Add(good[:40], []byte{198, 18, 0, 12})
	f.Add(datagram(1, h1MAC, "10.244.9.5", "10.244.1.7", 60), []byte{198, 18, 0, 12})
	f.Add(datagram(2, h1MAC, "10.244.2.5", "10.244.1.7", 60), []byte{198, 18, 0, 12})
	f.Add([]byte("garbage"), []byte{1, 2, 3, 4})
	f.Add(datagram6("fd00:10:244:2::5", "fd00:10:244:1::7", 100), []byte{198, 18, 0, 12})
	f.Add(datagram6("fd00:10:244:2::5", "fd00:10:244:1::7", 100), []byte{198, 18, 0, 13})
	f.Fuzz(func(t *testing.T, payload, src []byte) {
		if len(src) != 4 {
			return
		}
		v, fr, p := classify(payload, [4]byte(src), rxExpect, h1Dual, table)
		_ = isSuperFrame(payload, rxExpect.MaxInner)
		if v >= numVerdicts {
			t.Fatalf("verdict %d", v)
		}
		if v != verdictDecap {
			return
		}
		if p == nil || p.publicIP.As4() != [4]byte(src) {
			t.Fatalf("accepted from %v (peer %v)", src, p)
		}
		if fr.IsIPv6() && (!p.subnet6.Contains(netip.AddrFrom16(fr.InnerSrc6)) || !h1Subnet6.Contains(netip.AddrFrom16(fr.InnerDst6))) ||
			!fr.IsIPv6() && (!p.subnet.Contains(netip.AddrFrom4(fr.InnerSrc)) || !h1Subnet.Contains(netip.AddrFrom4(fr.InnerDst))) {
			t.Fatalf("accepted %v %v -> %v %v from %v (peer %v)", fr.InnerSrc, fr.InnerSrc6, fr.InnerDst, fr.InnerDst6, src, p)
		}
		completePartialChecksum(append([]byte(nil), fr.Inner...))
	})
}

// datagram6 is what h2 would send h1 in a dual-stack overlay: VXLAN + Ethernet (IPv6) +
// IPv6/UDP from src to dst, with a correct UDP checksum.
func datagram6(src, dst string, size int) []byte {
	return frame6(udp6(netip.MustParseAddr(src), netip.MustParseAddr(dst), size))
}

// frame6 puts h2's VXLAN header for h1 with EtherType IPv6 in front of inner.
func frame6(inner []byte) []byte {
	b := make([]byte, wire.HeaderLen, wire.HeaderLen+len(inner))
	wire.Encode(b, wire.Header{VNI: 1, Dst: h1MAC, Src: mustMAC(backend.VtepMAC(h2IP)), EtherType: wire.EtherTypeIPv6})
	return append(b, inner...)
}

// udp6 is an IPv6/UDP packet of size bytes with its checksum filled in.
func udp6(src, dst netip.Addr, size int) []byte {
	p := make([]byte, size)
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(size-40))
	p[6], p[7] = 17, 64
	s, d := src.As16(), dst.As16()
	copy(p[8:24], s[:])
	copy(p[24:40], d[:])
	binary.BigEndian.PutUint16(p[40:], 1000)
	binary.BigEndian.PutUint16(p[42:], 2000)
	binary.BigEndian.PutUint16(p[44:], uint16(size-40))
	for i := 48; i < size; i++ {
		p[i] = byte(i)
	}
	binary.BigEndian.PutUint16(p[46:], ^tunoffload.Fold(pseudoHeaderSum6(p, size-40)+tunoffload.Sum(p[40:])))
	return p
}

func TestClassifyHoldsIPv6ToTheSameRules(t *testing.T) {
	table := testTable(t)
	good := datagram6("fd00:10:244:2::5", "fd00:10:244:1::7", 100)
	cases := []struct {
		name     string
		payload  []byte
		outerSrc netip.Addr
		local    localSubnets
		want     verdict
	}{
		{"from the peer that owns the IPv6 source, to our IPv6 subnet: delivered", good, h2IP, h1Dual, verdictDecap},
		{"IPv4 still delivered in a dual-stack overlay", datagram(1, h1MAC, "10.244.2.5", "10.244.1.7", 100), h2IP, h1Dual, verdictDecap},
		{"IPv6 in an IPv4-only overlay", good, h2IP, h1Local, verdictDropInnerNotIPv4},
		{"destination in another host's IPv6 subnet", datagram6("fd00:10:244:2::5", "fd00:10:244:3::7", 100), h2IP, h1Dual, verdictDropNotLocal},
		{"destination outside the overlay", datagram6("fd00:10:244:2::5", "2001:db8::7", 100), h2IP, h1Dual, verdictDropNotLocal},
		{"source in no lease's IPv6 subnet", datagram6("fd00:10:244:9::5", "fd00:10:244:1::7", 100), h2IP, h1Dual, verdictDropUnknownSource},
		{"source in our own IPv6 subnet", datagram6("fd00:10:244:1::9", "fd00:10:244:1::7", 100), h2IP, h1Dual, verdictDropUnknownSource},
		{"spoofed: h3 sends with h2's IPv6 container address", good, h3IP, h1Dual, verdictDropSpoofed},
		{"spoofed: h2 sends with h3's IPv6 container address", datagram6("fd00:10:244:3::5", "fd00:10:244:1::7", 100), h2IP, h1Dual, verdictDropSpoofed},
		{"IPv6 over the MTU", datagram6("fd00:10:244:2::5", "fd00:10:244:1::7", 1451), h2IP, h1Dual, verdictDropOversized},
		{"IPv6 truncated", good[:len(good)-1], h2IP, h1Dual, verdictDropMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, f, p := classify(c.payload, c.outerSrc.As4(), rxExpect, c.local, table)
			if got != c.want {
				t.Fatalf("classify = %v, want %v", got, c.want)
			}
			if got == verdictDecap && (p == nil || p.publicIP != h2IP || len(f.Inner) == 0) {
				t.Errorf("accepted without the owning peer (%v) or an inner packet", p)
			}
		})
	}
}

func TestPeerTableFindsTheOwningIPv6Subnet(t *testing.T) {
	peers := map[netip.Prefix]*peerDP{}
	for i, s6 := range []string{"fd00:10:244:2::/64", "fd00:10:244:3::/64", "fd00:10:245::/48", "fd00:10:245:8::/62"} {
		p := &peerDP{subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 2), 0}), 24), subnet6: netip.MustParsePrefix(s6)}
		peers[p.subnet] = p
	}
	peers[netip.MustParsePrefix("10.244.9.0/24")] = &peerDP{subnet: netip.MustParsePrefix("10.244.9.0/24")} // IPv4 only
	table := newPeerTable(peers)
	cases := []struct{ addr, want string }{
		{"fd00:10:244:2::", "fd00:10:244:2::/64"},
		{"fd00:10:244:2:ffff:ffff:ffff:ffff", "fd00:10:244:2::/64"},
		{"fd00:10:244:3::77", "fd00:10:244:3::/64"},
		{"fd00:10:244:4::1", ""},
		{"fd00:10:245:9::1", "fd00:10:245:8::/62"}, // the longest prefix wins
		{"fd00:10:245:c::1", "fd00:10:245::/48"},
		{"::ffff:10.244.2.1", ""},
	}
	for _, c := range cases {
		p := table.lookup6(netip.MustParseAddr(c.addr).As16())
		got := ""
		if p != nil {
			got = p.subnet6.String()
		}
		if got != c.want {
			t.Errorf("lookup6(%s) = %q, want %q", c.addr, got, c.want)
		}
	}
	if len(table.all()) != 5 {
		t.Errorf("all() lists %d peers, want each of the 5 once", len(table.all()))
	}
}

func TestCompletePartialChecksumIPv6(t *testing.T) {
	src, dst := netip.MustParseAddr("fd00:10:244:2::5"), netip.MustParseAddr("fd00:10:244:1::7")
	full := udp6(src, dst, 200)
	partial := append([]byte(nil), full...)
	// What a kernel sender leaves: the pseudo header's sum alone.
	binary.BigEndian.PutUint16(partial[46:], tunoffload.Fold(pseudoHeaderSum6(partial, 160)))
	if !completePartialChecksum(partial) {
		t.Fatal("a partial IPv6/UDP checksum was not completed")
	}
	if binary.BigEndian.Uint16(partial[46:]) != binary.BigEndian.Uint16(full[46:]) {
		t.Errorf("completed %#04x, want %#04x", binary.BigEndian.Uint16(partial[46:]), binary.BigEndian.Uint16(full[46:]))
	}
	if completePartialChecksum(full) {
		t.Error("a correct IPv6 checksum was rewritten")
	}
}

func TestFlowHashIPv6(t *testing.T) {
	pkt := func(sport uint16) []byte {
		p := udp6(netip.MustParseAddr("fd00:10:244:1::2"), netip.MustParseAddr("fd00:10:244:2::2"), 100)
		binary.BigEndian.PutUint16(p[40:], sport)
		return p
	}
	long := append(pkt(40000), make([]byte, 1000)...) // another packet of the same flow
	binary.BigEndian.PutUint16(long[4:6], uint16(len(long)-40))
	if flowHash(pkt(40000)) != flowHash(long) {
		t.Error("two packets of one flow hash differently")
	}
	used := map[uint32]bool{}
	for sport := uint16(40000); sport < 40064; sport++ {
		used[flowHash(pkt(sport))%8] = true
	}
	if len(used) < 8 {
		t.Errorf("64 IPv6 flows used only %d of 8 sockets", len(used))
	}
}
