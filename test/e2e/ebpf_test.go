package e2e

// End-to-end tests of the eBPF datapath: each simulated host runs backend/ebpf in-process
// (built inside its namespace, pinning under the host's own bpffs), with leases fabricated
// the way etcd would hand them out: 10.244.(i+1).0/24 for host i.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/bpf/testpkt"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

func ebConfig() subnetmgr.Config {
	return subnetmgr.Config{
		Network:   netip.MustParsePrefix("10.244.0.0/16"),
		SubnetLen: 24,
		SubnetMin: netip.MustParseAddr("10.244.1.0"),
		SubnetMax: netip.MustParseAddr("10.244.254.0"),
		Backend:   subnetmgr.BackendConfig{Type: subnetmgr.BackendEBPF, VNI: 1, Port: 8472},
	}
}

func ebSubnet(h *harness.Host) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(h.Index + 1), 0}), 24)
}

func ebGateway(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
}

// ebLease is the lease a VXLAN-speaking host (ebpf or kernel vxlan) publishes.
func ebLease(t *testing.T, h *harness.Host) subnetmgr.Lease {
	t.Helper()
	data, err := backend.VXLANLeaseData(1, h.UnderlayIP)
	if err != nil {
		t.Fatal(err)
	}
	return subnetmgr.Lease{Subnet: ebSubnet(h), PublicIP: h.UnderlayIP, BackendType: subnetmgr.BackendVXLAN,
		BackendData: data, Expiration: time.Now().Add(24 * time.Hour)}
}

type ebNode struct {
	host    *harness.Host
	backend *ebpf.Backend
	lease   subnetmgr.Lease
}

type ebTestWriter struct{ t *testing.T }

func (w ebTestWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// ebStart runs the ebpf backend on h: New in the host's namespace, Setup with h's lease, then
// docker0 and containers appear after it, as they do when Docker starts after xnetd.
func ebStart(t *testing.T, h *harness.Host, containers int) *ebNode {
	return ebStartDecap(t, h, containers, ebpf.DecapAuto)
}

// ebStartDecap is ebStart with a --decap mode.
func ebStartDecap(t *testing.T, h *harness.Host, containers int, decap string) *ebNode {
	t.Helper()
	var link netlink.Link
	if err := h.Do(func() (err error) { link, err = netlink.LinkByName("eth0"); return err }); err != nil {
		t.Fatal(err)
	}
	a := link.Attrs()
	opts := backend.Options{
		Iface:  backend.ExternalInterface{Name: a.Name, Index: a.Index, MTU: a.MTU, MAC: a.HardwareAddr, PublicIP: h.UnderlayIP, IfaceIP: h.UnderlayIP},
		Config: ebConfig(), Decap: decap, BPFFS: h.BPFFS,
		Logger: slog.New(slog.NewTextHandler(ebTestWriter{t}, nil)).With("host", h.Name),
	}
	var b *ebpf.Backend
	if err := h.Do(func() (err error) { b, err = ebpf.NewBackend(opts); return err }); err != nil {
		t.Fatalf("%s: ebpf.New: %v", h.Name, err)
	}
	t.Cleanup(func() { _ = b.Close(true) })
	lease := ebLease(t, h)
	if err := b.Setup(t.Context(), lease, ebConfig()); err != nil {
		t.Fatalf("%s: Setup: %v", h.Name, err)
	}
	if err := h.SetupDocker0(ebGateway(lease.Subnet), b.MTU()); err != nil {
		t.Fatal(err)
	}
	for range containers {
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
	}
	return &ebNode{host: h, backend: b, lease: lease}
}

func ebReaches(t *testing.T, from *harness.Namespace, to netip.Addr) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, received, err := harness.Ping(ctx, from, to, 3, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("ping %v from %s: %v", to, from.Name, err)
	}
	return received > 0
}

// ebRequireMesh: every container reaches every other, and every host every remote container.
func ebRequireMesh(t *testing.T, hosts []*harness.Host) {
	t.Helper()
	var cs []*harness.Container
	for _, h := range hosts {
		cs = append(cs, h.Containers()...)
	}
	for _, from := range cs {
		for _, to := range cs {
			if from != to && !ebReaches(t, from.Namespace, to.IP) {
				t.Errorf("container %v on %s cannot reach container %v on %s", from.IP, from.Host.Name, to.IP, to.Host.Name)
			}
		}
	}
	for _, h := range hosts {
		for _, to := range cs {
			if to.Host != h && !ebReaches(t, h.Namespace, to.IP) {
				t.Errorf("host %s cannot reach container %v on %s", h.Name, to.IP, to.Host.Name)
			}
		}
	}
}

func ebStatus(t *testing.T, n *ebNode) ebpf.Status {
	t.Helper()
	st, err := n.backend.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestEBPFContainersOnThreeHostsReachEachOther(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	var nodes []*ebNode
	for _, h := range topo.Hosts() {
		containers := 1
		if h.Index == 0 {
			containers = 2 // same-host traffic must keep working
		}
		nodes = append(nodes, ebStart(t, h, containers))
	}
	for _, n := range nodes {
		for _, p := range nodes {
			if err := n.backend.AddPeer(p.lease); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.host.Name, p.lease.Subnet, err)
			}
		}
	}
	ebRequireMesh(t, topo.Hosts())

	st := ebStatus(t, nodes[0])
	t.Logf("h1 status: decap %s (%s), tc %s, verdicts %v, peers %v", st.Decap, st.DecapWhy, st.TCMode, st.Verdicts, st.Peers)
	if st.Decap != ebpf.DecapTC || st.TCMode != "tcx" {
		t.Errorf("on a veth underlay on this kernel: decap %q tc %q, want tc decap over tcx", st.Decap, st.TCMode)
	}
	if st.Verdicts["encap"] == 0 || st.Verdicts["decap"] == 0 || st.Containers != 2 {
		t.Errorf("status %+v: want encap and decap counted and 2 container veths attached", st)
	}
	if p := st.Peers[topo.Hosts()[1].UnderlayIP.String()]; p.TxPackets == 0 || p.RxPackets == 0 {
		t.Errorf("per-peer counters of h2: %+v, want traffic both ways", p)
	}
}

// TestEBPFInteroperatesWithKernelVXLAN: h1 is a kernel VXLAN host set up the flannel way, h2
// and h3 run the eBPF datapath. Every pair of containers reaches each other.
func TestEBPFInteroperatesWithKernelVXLAN(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3})
	hosts := topo.Hosts()
	kernel := hosts[0]
	if err := kernel.SetupDocker0(ebGateway(ebSubnet(kernel)), backend.OverlayMTU(1500)); err != nil {
		t.Fatal(err)
	}
	if _, err := kernel.AddContainer(); err != nil {
		t.Fatal(err)
	}
	var ours []*ebNode
	for _, h := range hosts[1:] {
		ours = append(ours, ebStart(t, h, 1))
	}
	var flannelPeers []harness.FlannelPeer
	for _, n := range ours {
		flannelPeers = append(flannelPeers, harness.FlannelPeer{Subnet: n.lease.Subnet, PublicIP: n.host.UnderlayIP, VtepMAC: backend.VtepMAC(n.host.UnderlayIP)})
	}
	if err := kernel.ConfigureFlannelVXLAN(ebSubnet(kernel), flannelPeers); err != nil {
		t.Fatal(err)
	}
	leases := []subnetmgr.Lease{ebLease(t, kernel), ours[0].lease, ours[1].lease}
	for _, n := range ours {
		for _, l := range leases {
			if err := n.backend.AddPeer(l); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.host.Name, l.Subnet, err)
			}
		}
	}
	ebRequireMesh(t, hosts)
}

// TestEBPFLargeTCPAndUDPArriveIntact: large TCP writes (GSO segments) and MTU-sized UDP
// datagrams cross the overlay with their content intact, the receiver's stack sees no
// checksum error, and GSO survives encapsulation (the encap counter saw packets larger than
// the MTU).
func TestEBPFLargeTCPAndUDPArriveIntact(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	a := ebStart(t, topo.Hosts()[0], 1)
	b := ebStart(t, topo.Hosts()[1], 1)
	for _, n := range []*ebNode{a, b} {
		for _, p := range []*ebNode{a, b} {
			if err := n.backend.AddPeer(p.lease); err != nil {
				t.Fatal(err)
			}
		}
	}
	sender, receiver := a.host.Containers()[0], b.host.Containers()[0]

	t.Run("TCP 16 MB in 1 MB writes", func(t *testing.T) {
		payload := make([]byte, 16<<20)
		rand.Read(payload)
		var ln net.Listener
		if err := receiver.Do(func() (err error) {
			ln, err = net.Listen("tcp4", net.JoinHostPort(receiver.IP.String(), "0"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		got := make(chan [32]byte, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- [32]byte{}
				return
			}
			defer c.Close()
			h := sha256.New()
			io.Copy(h, c)
			var sum [32]byte
			copy(sum[:], h.Sum(nil))
			got <- sum
		}()
		var c net.Conn
		if err := sender.Do(func() (err error) {
			c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		c.SetWriteDeadline(start.Add(20 * time.Second))
		for off := 0; off < len(payload); off += 1 << 20 {
			if _, err := c.Write(payload[off : off+1<<20]); err != nil {
				t.Fatalf("after %d bytes: %v\nsender: %+v\nreceiver: %+v", off, err, ebStatus(t, a), ebStatus(t, b))
			}
		}
		c.Close()
		select {
		case sum := <-got:
			if sum != sha256.Sum256(payload) {
				t.Fatal("TCP payload arrived corrupted")
			}
			t.Logf("16 MB in %v (%.2f Gbit/s, indicative only)", time.Since(start), float64(len(payload)*8)/time.Since(start).Seconds()/1e9)
		case <-time.After(30 * time.Second):
			t.Fatal("TCP transfer did not finish")
		}
		st := ebStatus(t, a)
		var encap = st.Verdicts["encap"]
		t.Logf("sender encap verdicts: %d packets", encap)
		if c, err := a.backend.Counters(); err == nil {
			for _, p := range c.Peers {
				if p.TxPackets > 0 {
					avg := p.TxBytes / p.TxPackets
					t.Logf("average encapsulated packet to %v: %d bytes", p.Subnet, avg)
					if avg <= 1500 {
						t.Errorf("average encapsulated packet %d bytes: GSO segments were not kept large", avg)
					}
				}
			}
		}
	})

	t.Run("UDP MTU-sized datagrams", func(t *testing.T) {
		const size = 1450 - 28 // overlay MTU minus IPv4 and UDP headers
		var rc *net.UDPConn
		if err := receiver.Do(func() (err error) {
			rc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: receiver.IP.AsSlice()})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		var sc *net.UDPConn
		if err := sender.Do(func() (err error) {
			sc, err = net.DialUDP("udp4", nil, rc.LocalAddr().(*net.UDPAddr))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer sc.Close()
		// Hash every datagram up front so the receiver, reading while we send (a socket
		// buffer holds only about 90 of them), can check each one.
		datagrams := make([][]byte, 200)
		sent := map[[32]byte]bool{}
		for i := range datagrams {
			datagrams[i] = make([]byte, size)
			rand.Read(datagrams[i])
			sent[sha256.Sum256(datagrams[i])] = true
		}
		type result struct{ received, bad int }
		done := make(chan result)
		go func() {
			var r result
			buf := make([]byte, 2048)
			for r.received+r.bad < len(datagrams) {
				rc.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, err := rc.Read(buf)
				if err != nil {
					break
				}
				if n == size && sent[sha256.Sum256(buf[:n])] {
					r.received++
				} else {
					r.bad++
				}
			}
			done <- r
		}()
		for i, d := range datagrams {
			if _, err := sc.Write(d); err != nil {
				t.Fatal(err)
			}
			if i%10 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		r := <-done
		received, bad := r.received, r.bad
		if bad > 0 || received < 190 {
			t.Fatalf("UDP: %d intact, %d corrupted of 200 sent", received, bad)
		}
	})

	t.Run("no checksum errors in the receiving container", func(t *testing.T) {
		out, err := receiver.Run(t.Context(), "cat", "/proc/net/snmp")
		if err != nil {
			t.Fatal(err)
		}
		for _, proto := range []string{"Tcp", "Udp"} {
			if n := snmpField(t, out, proto, "InCsumErrors"); n != 0 {
				t.Errorf("%s InCsumErrors = %d in the receiver", proto, n)
			}
		}
	})
}

// snmpField reads one counter from /proc/net/snmp (a header line and a value line per
// protocol).
func snmpField(t *testing.T, snmp, proto, field string) int {
	t.Helper()
	lines := strings.Split(snmp, "\n")
	for i := 0; i+1 < len(lines); i++ {
		if !strings.HasPrefix(lines[i], proto+":") || !strings.HasPrefix(lines[i+1], proto+":") {
			continue
		}
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j, n := range names {
			if n == field && j < len(values) {
				v, _ := strconv.Atoi(values[j])
				return v
			}
		}
	}
	t.Fatalf("no %s %s in /proc/net/snmp:\n%s", proto, field, snmp)
	return 0
}

// TestEBPFDropsSpoofedVXLANAndLeavesTheUnderlayAlone: a VXLAN packet injected from the underlay
// with a peer container's source address but not from that peer's PublicIP is dropped and
// counted; TCP between the hosts' own addresses keeps working meanwhile.
func TestEBPFDropsSpoofedVXLANAndLeavesTheUnderlayAlone(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	a := ebStart(t, topo.Hosts()[0], 1)
	b := ebStart(t, topo.Hosts()[1], 1)
	for _, n := range []*ebNode{a, b} {
		for _, p := range []*ebNode{a, b} {
			if err := n.backend.AddPeer(p.lease); err != nil {
				t.Fatal(err)
			}
		}
	}
	target, victim := a.host.Containers()[0], b.host.Containers()[0]

	// The target listens; nothing spoofed may reach it.
	var rc *net.UDPConn
	if err := target.Do(func() (err error) {
		rc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: target.IP.AsSlice(), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()

	inner := testpkt.IPv4{Src: victim.IP, Dst: target.IP, Proto: testpkt.ProtoUDP}.
		Packet(testpkt.UDP(1234, 9999, []byte("spoofed")))
	frame := testpkt.Eth(backend.VtepMAC(a.host.UnderlayIP), backend.VtepMAC(b.host.UnderlayIP), testpkt.EtherTypeIPv4, inner)
	vx := testpkt.VXLAN(1, frame)

	before := ebStatus(t, a).Verdicts["drop_spoofed"]
	var sc *net.UDPConn
	if err := topo.Underlay().Do(func() (err error) {
		sc, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: a.host.UnderlayIP.AsSlice(), Port: 8472})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	for range 5 {
		if _, err := sc.Write(vx); err != nil {
			t.Fatal(err)
		}
	}

	// Meanwhile the underlay carries ordinary TCP between the hosts.
	var ln net.Listener
	if err := a.host.Do(func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(a.host.UnderlayIP.String(), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	var c net.Conn
	if err := b.host.Do(func() (err error) {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("TCP between host addresses over the underlay: %v", err)
	}
	msg := []byte("underlay traffic is not ours")
	c.Write(msg)
	echo := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, echo); err != nil || !bytes.Equal(echo, msg) {
		t.Fatalf("underlay TCP echo: %q, %v", echo, err)
	}
	c.Close()
	if !ebReaches(t, b.host.Namespace, a.host.UnderlayIP) {
		t.Error("hosts cannot ping each other's underlay address")
	}

	rc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, _, err := rc.ReadFromUDP(make([]byte, 64)); err == nil {
		t.Fatalf("a spoofed packet reached the container: %q", fmt.Sprint(n))
	}
	if got := ebStatus(t, a).Verdicts["drop_spoofed"] - before; got != 5 {
		t.Fatalf("drop_spoofed counted %d, want the 5 injected packets", got)
	}
	// And the real peer still gets through.
	if !ebReaches(t, victim.Namespace, target.IP) {
		t.Fatal("the genuine peer's container no longer reaches the target")
	}
}

// TestEBPFXDPDecapDelivers: with --decap=xdp, XDP validates, strips and marks the frame, and the
// TC program delivers it: containers and hosts still reach each other. On the harness's veth
// underlay the backend picks generic XDP (native XDP would turn TSO off on the peer).
func TestEBPFXDPDecapDelivers(t *testing.T) {
	if err := loader.ProbeXDP(); err != nil {
		t.Skipf("this kernel cannot run the XDP decap program: %v", err)
	}
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	a := ebStartDecap(t, topo.Hosts()[0], 1, ebpf.DecapXDP)
	b := ebStartDecap(t, topo.Hosts()[1], 1, ebpf.DecapXDP)
	for _, n := range []*ebNode{a, b} {
		for _, p := range []*ebNode{a, b} {
			if err := n.backend.AddPeer(p.lease); err != nil {
				t.Fatal(err)
			}
		}
	}
	ebRequireMesh(t, topo.Hosts())
	st := ebStatus(t, a)
	// The harness's underlay is a veth: native XDP there would turn TSO off on the peer.
	if st.Decap != "xdp-generic" || st.Verdicts["decap"] == 0 {
		t.Fatalf("status %+v: want generic XDP decap (underlay is a veth) counting packets", st)
	}
	t.Logf("decap %s: %s", st.Decap, st.DecapWhy)
}
