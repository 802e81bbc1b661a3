package ebpf

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// dualStackConfig is testConfig with IPv6: a /64 per host out of fd00:10:244::/48.
var dualStackConfig = func() subnetmgr.Config {
	c := testConfig
	c.EnableIPv6 = true
	c.IPv6Network = netip.MustParsePrefix("fd00:10:244::/48")
	c.IPv6SubnetLen = 64
	return c
}()

// dualStackLease is host i's lease (0-based): 10.244.<i+1>.0/24 and fd00:10:244:<i+1>::/64.
func dualStackLease(t *testing.T, i int, publicIP netip.Addr) subnetmgr.Lease {
	t.Helper()
	l := vxlanLease(t, fmt.Sprintf("10.244.%d.0/24", i+1), publicIP.String())
	l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
	return l
}

// dockerIPv6 plays Docker with --ipv6 --fixed-cidr-v6=<subnet>: IPv6 forwarding on (Docker turns
// it on), the bridge's address the subnet's first, and each container an address of it with a
// default route via the bridge. It returns the containers' addresses. No duplicate address
// detection: the addresses are usable at once.
func dockerIPv6(t *testing.T, h *harness.Host, subnet netip.Prefix, ctrs ...*harness.Container) []netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := h.Sysctl("net.ipv6.conf.all.forwarding", "1"); err != nil {
		t.Fatal(err)
	}
	gw := subnet.Addr().Next()
	if err := h.IP(ctx, fmt.Sprintf("addr add %s/%d dev %s nodad", gw, subnet.Bits(), h.BridgeName())); err != nil {
		t.Fatal(err)
	}
	var addrs []netip.Addr
	ip := gw
	for _, c := range ctrs {
		ip = ip.Next()
		if err := c.Namespace.IP(ctx, fmt.Sprintf("addr add %s/%d dev eth0 nodad", ip, subnet.Bits()),
			fmt.Sprintf("route add ::/0 via %s dev eth0", gw)); err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, ip)
	}
	for _, ns := range append([]*harness.Namespace{h.Namespace}, namespaces(ctrs)...) {
		waitAddressesSettled(t, ns)
	}
	return addrs
}

func namespaces(ctrs []*harness.Container) []*harness.Namespace {
	var out []*harness.Namespace
	for _, c := range ctrs {
		out = append(out, c.Namespace)
	}
	return out
}

// waitAddressesSettled waits until no IPv6 address in ns is tentative: while an interface's
// link-local address is still in duplicate address detection (a second or so after the link
// came up), its neighbour discovery does not answer yet, as with a container Docker just
// started.
func waitAddressesSettled(t *testing.T, ns *harness.Namespace) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var tentative []string
		err := ns.Do(func() error {
			addrs, err := netlink.AddrList(nil, netlink.FAMILY_V6)
			for _, a := range addrs {
				if a.Flags&unix.IFA_F_TENTATIVE != 0 {
					tentative = append(tentative, a.IPNet.String())
				}
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(tentative) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: IPv6 addresses %v still tentative after 10 s", ns.Name, tentative)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ping6 sends count ICMPv6 echo requests from a namespace to an address, interval apart, and
// returns how many were answered within a second of the last.
func ping6(t *testing.T, from *harness.Namespace, to netip.Addr, count int, interval time.Duration) int {
	t.Helper()
	var conn net.PacketConn
	if err := from.Do(func() (err error) { conn, err = net.ListenPacket("ip6:ipv6-icmp", "::"); return err }); err != nil {
		t.Fatalf("ICMPv6 socket in %s: %v", from.Name, err)
	}
	defer conn.Close()
	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	var mu sync.Mutex
	got := map[uint16]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, peer, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			// Echo reply (129), our id; the kernel hands raw sockets the ICMPv6 message.
			if a, ok := peer.(*net.IPAddr); !ok || !a.IP.Equal(to.AsSlice()) || n < 8 || buf[0] != 129 ||
				binary.BigEndian.Uint16(buf[4:6]) != id {
				continue
			}
			mu.Lock()
			got[binary.BigEndian.Uint16(buf[6:8])] = true
			mu.Unlock()
		}
	}()
	for seq := 1; seq <= count; seq++ {
		if seq > 1 {
			time.Sleep(interval)
		}
		// Type 128 (echo request), code 0, checksum (the kernel fills it in), id, sequence.
		msg := []byte{128, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint16(msg[4:6], id)
		binary.BigEndian.PutUint16(msg[6:8], uint16(seq))
		msg = append(msg, "xnet-ipv6"...)
		_, _ = conn.WriteTo(msg, &net.IPAddr{IP: to.AsSlice()})
	}
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= count {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = conn.SetReadDeadline(time.Now())
	<-done
	mu.Lock()
	defer mu.Unlock()
	return len(got)
}

// tcpTransfer6 sends n random bytes over TCP from a namespace to addr in another and fails
// unless they arrive intact.
func tcpTransfer6(t *testing.T, from, to *harness.Namespace, addr netip.Addr, n int) {
	t.Helper()
	payload := make([]byte, n)
	rand.Read(payload)
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp6", net.JoinHostPort(addr.String(), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan [32]byte, 1)
	go func() {
		var sum [32]byte
		defer func() { got <- sum }()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		h := sha256.New()
		io.Copy(h, c)
		copy(sum[:], h.Sum(nil))
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = net.DialTimeout("tcp6", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if <-got != sha256.Sum256(payload) {
		t.Fatalf("%d bytes of TCP to [%s] did not arrive intact", n, addr)
	}
}

// Containers on two hosts of a dual-stack overlay reach each other over IPv6 both ways, ping and
// TCP (large GSO segments included), across the VXLAN tunnel over the IPv4 underlay; the host
// reaches the other host's containers through xnet0; the datapath counts all of it.
func TestContainersReachEachOtherOverIPv6(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	var (
		bs     []*Backend
		leases []subnetmgr.Lease
		ctrs   []*harness.Container
		ips    []netip.Addr
	)
	for i, h := range hosts {
		l := dualStackLease(t, i, h.UnderlayIP)
		b := newOn(t, h, DecapTC)
		t.Cleanup(func() { _ = b.Close(true) })
		if err := b.Setup(t.Context(), l, dualStackConfig); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0(netip.PrefixFrom(l.Subnet.Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		bs, leases, ctrs = append(bs, b), append(leases, l), append(ctrs, c)
		ips = append(ips, dockerIPv6(t, h, l.IPv6Subnet, c)...)
	}
	for _, b := range bs {
		for _, l := range leases {
			if err := b.AddPeer(l); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := make([]Status, len(bs))
	for i, b := range bs {
		st, err := b.Status()
		if err != nil {
			t.Fatal(err)
		}
		before[i] = st
		if st.IPv6Subnet != leases[i].IPv6Subnet.String() || st.IPv6Peers[leases[1-i].Subnet.String()] != leases[1-i].IPv6Subnet.String() {
			t.Fatalf("host %d status: IPv6 subnet %q, IPv6 peers %v; want %v and the peer's %v", i, st.IPv6Subnet, st.IPv6Peers,
				leases[i].IPv6Subnet, leases[1-i].IPv6Subnet)
		}
	}

	for _, dir := range [][2]int{{0, 1}, {1, 0}} {
		from, to := dir[0], dir[1]
		if got := ping6(t, ctrs[from].Namespace, ips[to], 5, 50*time.Millisecond); got == 0 {
			t.Fatalf("ping6 container %d [%s] -> container %d [%s]: none of 5 answered", from, ips[from], to, ips[to])
		}
	}
	for _, dir := range [][2]int{{0, 1}, {1, 0}} {
		from, to := dir[0], dir[1]
		tcpTransfer6(t, ctrs[from].Namespace, ctrs[to].Namespace, ips[to], 4<<20)
	}
	// The host's own traffic takes xnet0 (source: our subnet's first address) and encap_host.
	if got := ping6(t, hosts[0].Namespace, ips[1], 3, 50*time.Millisecond); got == 0 {
		t.Fatalf("ping6 host 1 -> container on host 2 [%s]: none of 3 answered", ips[1])
	}
	tcpTransfer6(t, hosts[0].Namespace, ctrs[1].Namespace, ips[1], 1<<20)

	for i, b := range bs {
		st, err := b.Status()
		if err != nil {
			t.Fatal(err)
		}
		peer := leases[1-i].PublicIP.String()
		tx := st.Peers[peer].TxPackets - before[i].Peers[peer].TxPackets
		rx := st.Peers[peer].RxPackets - before[i].Peers[peer].RxPackets
		rxBytes := st.Peers[peer].RxBytes - before[i].Peers[peer].RxBytes
		encap := st.Verdicts["encap"] - before[i].Verdicts["encap"]
		decap := st.Verdicts["decap"] - before[i].Verdicts["decap"]
		t.Logf("host %d: to the peer %d packets, from it %d (%d bytes each on average); verdicts %v", i, tx, rx, rxBytes/max(rx, 1), st.Verdicts)
		if tx == 0 || rx == 0 || encap == 0 || decap == 0 {
			t.Errorf("host %d: peer counters tx %d rx %d, verdicts encap %d decap %d: want all moving", i, tx, rx, encap, decap)
		}
		for _, v := range []string{"drop_malformed", "drop_helper", "drop_spoofed", "drop_unknown_source", "drop_not_local", "drop_bad_source", "drop_ext_headers"} {
			if n := st.Verdicts[v]; n != 0 {
				t.Errorf("host %d: %d packets counted %s", i, n, v)
			}
		}
		// 4 MB of TCP each way: the tunnel carries large GSO packets, not MTU-sized ones.
		if rxBytes/max(rx, 1) <= 1500 {
			t.Errorf("host %d: %d packets from the peer of %d bytes on average: want GSO packets above the MTU", i, rx, rxBytes/max(rx, 1))
		}
		eps, err := b.m.ListEndpoints()
		if err != nil {
			t.Fatal(err)
		}
		learned := false
		for _, ep := range eps {
			learned = learned || ep.IP == ips[i]
		}
		if !learned {
			t.Errorf("host %d: container [%s] not learned (endpoints %v)", i, ips[i], eps)
		}
	}
}

// The routes6 entries follow the leases: a peer's IPv6 subnet is routed to the same peer as its
// IPv4 one, moves when the lease's IPv6 subnet changes, goes with the lease (RemovePeer, or
// PrunePeers after a restart), and is refused, with the reason in Status, when the trust rules
// or the peer's VTEP say it cannot be served.
func TestIPv6RoutesFollowTheLeases(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1})
	h := topo.Hosts()[0]
	b := newOn(t, h, DecapTC)
	t.Cleanup(func() { _ = b.Close(true) })
	local := dualStackLease(t, 0, h.UnderlayIP)
	if err := b.Setup(t.Context(), local, dualStackConfig); err != nil {
		t.Fatal(err)
	}
	if c, ok, err := b.m.GetConfig6(); err != nil || !ok || c.Subnet != local.IPv6Subnet || c.Gateway != netip.MustParseAddr("fd00:10:244:1::1") {
		t.Fatalf("IPv6 config %+v, %v, %v; want our lease with its first address as gateway", c, ok, err)
	}
	routes6 := func() map[netip.Prefix]netip.Addr {
		t.Helper()
		rs, err := b.m.ListRoutes6()
		if err != nil {
			t.Fatal(err)
		}
		out := map[netip.Prefix]netip.Addr{}
		for _, r := range rs {
			out[r.Subnet] = r.PublicIP
		}
		return out
	}
	peerIP := netip.MustParseAddr("198.18.0.12")
	peer := dualStackLease(t, 1, peerIP)
	if err := b.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 1 || got[peer.IPv6Subnet] != peerIP {
		t.Fatalf("IPv6 routes %v, want %v via %v", got, peer.IPv6Subnet, peerIP)
	}
	moved := peer
	moved.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:9::/64")
	if err := b.AddPeer(moved); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 1 || got[moved.IPv6Subnet] != peerIP {
		t.Fatalf("after the peer's IPv6 subnet changed: IPv6 routes %v, want only %v", got, moved.IPv6Subnet)
	}

	refused := []struct {
		name   string
		change func(*subnetmgr.Lease)
		why    string
	}{
		{"outside the IPv6 Network", func(l *subnetmgr.Lease) { l.IPv6Subnet = netip.MustParsePrefix("fd00:99::/64") }, "not strictly inside"},
		{"the whole IPv6 Network", func(l *subnetmgr.Lease) { l.IPv6Subnet = dualStackConfig.IPv6Network }, "not strictly inside"},
		{"of another length", func(l *subnetmgr.Lease) { l.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:9::/80") }, "is not a /64"},
		{"our own", func(l *subnetmgr.Lease) { l.IPv6Subnet = local.IPv6Subnet }, "overlaps ours"},
		{"with malformed BackendV6Data", func(l *subnetmgr.Lease) { l.BackendV6Data = json.RawMessage(`{"VtepMAC":"not a mac"}`) }, "not an Ethernet MAC"},
	}
	for _, c := range refused {
		l := moved
		c.change(&l)
		if err := b.AddPeer(l); err != nil {
			t.Fatalf("%s: AddPeer: %v", c.name, err)
		}
		st, _ := b.Status()
		if got := routes6(); len(got) != 0 {
			t.Errorf("a peer IPv6 subnet %s was programmed: %v", c.name, got)
		}
		if why := st.IPv6Unreachable[l.Subnet.String()]; !strings.Contains(why, c.why) {
			t.Errorf("a peer IPv6 subnet %s: status says %q, want %q", c.name, why, c.why)
		}
		if routes, _ := b.m.ListRoutes(); len(routes) != 1 {
			t.Errorf("a peer IPv6 subnet %s: the peer's IPv4 route is gone too: %v", c.name, routes)
		}
		// Back to a lease it serves.
		if err := b.AddPeer(moved); err != nil {
			t.Fatal(err)
		}
	}
	sameVTEP := moved
	sameVTEP.PublicIPv6 = netip.MustParseAddr("2001:db8::12")
	sameVTEP.BackendV6Data = sameVTEP.BackendData // an xnet host of an older build with an IPv6 underlay
	ownVTEP := moved
	ownVTEP.PublicIPv6 = netip.MustParseAddr("2001:db8::12")
	ownVTEP.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"52:54:00:00:00:12"}`) // flannel's IPv6 device
	for _, c := range []struct {
		name  string
		lease subnetmgr.Lease
	}{
		{"a peer publishing its one VTEP as BackendV6Data", sameVTEP},
		// We have no IPv6 underlay: its IPv6 rides the IPv4 VXLAN to its IPv4 VTEP, as xnet's
		// vxlan backend sends it.
		{"a peer with a separate IPv6 VTEP, seen from a host without an IPv6 underlay", ownVTEP},
	} {
		if err := b.AddPeer(c.lease); err != nil {
			t.Fatal(err)
		}
		rs, err := b.m.ListRoutes6()
		if err != nil || len(rs) != 1 || rs[0].Subnet != moved.IPv6Subnet || rs[0].PublicIP != peerIP || rs[0].PublicIPv6.IsValid() ||
			rs[0].VtepMAC.String() != backend.VtepMAC(peerIP).String() {
			t.Fatalf("%s: IPv6 routes %+v, %v; want %v via %v over IPv4 to its IPv4 VTEP %v", c.name, rs, err, moved.IPv6Subnet, peerIP, backend.VtepMAC(peerIP))
		}
	}

	if err := b.RemovePeer(moved); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 0 {
		t.Fatalf("after RemovePeer: IPv6 routes %v, want none", got)
	}

	// A restart: the routes stay pinned, the new process has not seen the peers.
	if err := b.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	gone := dualStackLease(t, 2, netip.MustParseAddr("198.18.0.13"))
	if err := b.AddPeer(gone); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(false); err != nil {
		t.Fatal(err)
	}
	b = newOn(t, h, DecapTC)
	t.Cleanup(func() { _ = b.Close(true) })
	if err := b.Setup(t.Context(), local, dualStackConfig); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 2 {
		t.Fatalf("after a restart: IPv6 routes %v, want both kept", got)
	}
	if err := b.PrunePeers([]subnetmgr.Lease{peer}); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 1 || got[peer.IPv6Subnet] != peerIP {
		t.Fatalf("after pruning: IPv6 routes %v, want only the kept lease's %v", got, peer.IPv6Subnet)
	}
	// RemovePeer of a lease this run never programmed removes its pinned route.
	if err := b.RemovePeer(peer); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 0 {
		t.Fatalf("after RemovePeer in the new run: IPv6 routes %v, want none", got)
	}

	// The overlay becomes IPv4 only again: IPv6 is no longer the datapath's.
	if err := b.Setup(t.Context(), local, testConfig); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := b.m.GetConfig6(); ok || err != nil {
		t.Fatalf("IPv4-only overlay: IPv6 config still set (%v)", err)
	}
	if err := b.AddPeer(peer); err != nil {
		t.Fatal(err)
	}
	if got := routes6(); len(got) != 0 {
		t.Fatalf("IPv4-only overlay: IPv6 routes %v, want none", got)
	}
}

// What this host publishes as BackendV6Data: its one VTEP, as BackendData, and only with a
// PublicIPv6 (a flannel host reads PublicIPv6 as soon as BackendV6Data decodes).
func TestLeaseAttrsV6(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1})
	h := topo.Hosts()[0]
	b := newOn(t, h, DecapTC)
	t.Cleanup(func() { _ = b.Close(true) })
	if data, err := b.LeaseAttrsV6(); err != nil || data != nil {
		t.Fatalf("without a PublicIPv6: BackendV6Data %s, %v; want none", data, err)
	}
	b.Iface.PublicIPv6 = netip.MustParseAddr("2001:db8::11")
	data, err := b.LeaseAttrsV6()
	if err != nil {
		t.Fatal(err)
	}
	_, v4, err := b.LeaseAttrs()
	if err != nil {
		t.Fatal(err)
	}
	if string(data) != string(v4) {
		t.Fatalf("BackendV6Data %s, want BackendData %s", data, v4)
	}
	// flannel's vxlanLeaseAttrs: VNI a number, VtepMAC a MAC string, nothing else.
	var flannel struct {
		VNI     uint32
		VtepMAC string
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&flannel); err != nil {
		t.Fatalf("BackendV6Data %s as flannel reads it: %v", data, err)
	}
	if mac, err := net.ParseMAC(flannel.VtepMAC); err != nil || mac.String() != backend.VtepMAC(h.UnderlayIP).String() || flannel.VNI != 1 {
		t.Fatalf("BackendV6Data %s: VNI %d, VtepMAC %q; want 1 and %s", data, flannel.VNI, flannel.VtepMAC, backend.VtepMAC(h.UnderlayIP))
	}
}

// IPv6 and IPv4 between the same two containers, interleaved, three rounds of one TCP stream
// each: what the IPv6 half of the datapath costs against the IPv4 one. It only reports:
// XNET_IPV6_BENCH=1.
func TestIPv6ThroughputAgainstIPv4(t *testing.T) {
	if os.Getenv("XNET_IPV6_BENCH") == "" {
		t.Skip("XNET_IPV6_BENCH=1 runs it")
	}
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	hosts := topo.Hosts()
	var (
		leases []subnetmgr.Lease
		ctrs   []*harness.Container
		ips    []netip.Addr
		bs     []*Backend
	)
	for i, h := range hosts {
		l := dualStackLease(t, i, h.UnderlayIP)
		b := newOn(t, h, DecapTC)
		t.Cleanup(func() { _ = b.Close(true) })
		if err := b.Setup(t.Context(), l, dualStackConfig); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0(netip.PrefixFrom(l.Subnet.Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		c, err := h.AddContainer()
		if err != nil {
			t.Fatal(err)
		}
		bs, leases, ctrs = append(bs, b), append(leases, l), append(ctrs, c)
		ips = append(ips, dockerIPv6(t, h, l.IPv6Subnet, c)...)
	}
	for _, b := range bs {
		for _, l := range leases {
			if err := b.AddPeer(l); err != nil {
				t.Fatal(err)
			}
		}
	}
	ctx := t.Context()
	srv, err := harness.StartIperf3Server(ctx, ctrs[1].Namespace, 5201)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Kill() })
	results := map[string][]float64{}
	for range 3 {
		for _, c := range []struct {
			name string
			to   netip.Addr
		}{{"IPv4", ctrs[1].IP}, {"IPv6", ips[1]}} {
			r, err := harness.RunIperf3(ctx, ctrs[0].Namespace, harness.Iperf3Options{Server: c.to, Port: 5201, Duration: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			results[c.name] = append(results[c.name], r.BitsPerSecond/1e9)
		}
	}
	for _, name := range []string{"IPv4", "IPv6"} {
		v := append([]float64(nil), results[name]...)
		slices.Sort(v)
		t.Logf("%s, one TCP stream between containers on two hosts: median %.2f Gbit/s (rounds %.2f)", name, v[len(v)/2], results[name])
	}
}
