package e2e

// DirectRouting end to end (flannel's "DirectRouting", Calico's VXLAN CrossSubnet): in one
// cluster, peers on a host's own L2 segment get plain routed packets and the peer behind a
// router gets VXLAN, as a capture on the shared segment shows; a peer re-numbered onto the other
// segment switches path; plain packets spoofed in a peer's name never reach a container. The
// cluster is three hosts of a two-segment topology (harness Options.FarHosts): h1 and h2 on the
// near segment, h3 behind the router. Helpers are prefixed dr.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/bpf/testpkt"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// drConfig is the cluster's config for a backend with DirectRouting; hosts also pass
// --backend, so a fallback to another backend fails the test instead of passing it quietly.
func drConfig(backendName string) string {
	return fmt.Sprintf(`{"Network":"10.244.0.0/16","Backend":{"Type":%q,"DirectRouting":true}}`, backendName)
}

// drCluster starts xnetd with DirectRouting on the three hosts of a two-segment topology and
// one container per host.
func drCluster(t *testing.T, backendName string) ([]*xnetdtest.Node, []*harness.Container, *harness.Topology) {
	t.Helper()
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, FarHosts: 1, WithEtcd: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), drConfig(backendName))
	bin := harness.BuildXnetd(t)
	var nodes []*xnetdtest.Node
	for _, h := range topo.Hosts() {
		n := &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--backend", backendName}}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.WaitPeers(t, len(nodes)-1)
	}
	return nodes, xnetdtest.Containers(t, nodes), topo
}

// drFrame is one frame a capture saw: Ethernet and IPv4 addresses, ports when it has them.
type drFrame struct {
	srcMAC, dstMAC string
	src, dst       string // address, or address.port
	what           string // the rest: "UDP, length 106", "ICMP echo request, ..."
}

func (f drFrame) vxlan() bool {
	return strings.HasPrefix(f.what, "UDP") && (strings.HasSuffix(f.src, ".8472") || strings.HasSuffix(f.dst, ".8472"))
}

// between says whether the frame's IPv4 addresses are a and b, either way.
func (f drFrame) between(a, b netip.Addr) bool {
	ip := func(s string) string {
		if p := strings.Split(s, "."); len(p) == 5 {
			return strings.Join(p[:4], ".")
		}
		return s
	}
	s, d := ip(f.src), ip(f.dst)
	return s == a.String() && d == b.String() || s == b.String() && d == a.String()
}

// drCapture is tcpdump on one port of an underlay bridge, in the underlay namespace: what the
// segment carries to and from one host.
type drCapture struct {
	p    *harness.Process
	port string
}

// tcpdump -e -q prints "<src MAC> > <dst MAC>, IPv4, length N: <src> > <dst>: <what>".
var drLine = regexp.MustCompile(`^(\S+) > (\S+), IPv4, length \d+: (\S+) > (\S+): (.*)$`)

func drStartCapture(t *testing.T, topo *harness.Topology, port string) *drCapture {
	t.Helper()
	p, err := topo.Underlay().Start("tcpdump", "-i", port, "-n", "-e", "-q", "-t", "-l", "-Z", "root", "ip")
	if err != nil {
		t.Fatalf("tcpdump (bash .ci/run installs it): %v", err)
	}
	c := &drCapture{p: p, port: port}
	t.Cleanup(func() { _ = p.Kill() })
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(p.Output(), "listening on"); {
		if p.Exited() || time.Now().After(deadline) {
			t.Fatalf("tcpdump on %s did not start: %v\n%s", port, p.Wait(), p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c
}

// stop ends the capture and returns the frames it saw.
func (c *drCapture) stop(t *testing.T) []drFrame {
	t.Helper()
	time.Sleep(200 * time.Millisecond) // the last frames reach tcpdump's output
	if err := c.p.Stop(); err != nil {
		t.Fatalf("tcpdump on %s: %v\n%s", c.port, err, c.p.Output())
	}
	var frames []drFrame
	for l := range strings.Lines(c.p.Output()) {
		if m := drLine.FindStringSubmatch(strings.TrimSpace(l)); m != nil {
			frames = append(frames, drFrame{srcMAC: m[1], dstMAC: m[2], src: m[3], dst: m[4], what: m[5]})
		}
	}
	return frames
}

// drPing sends count echo requests from c to dst and fails unless all are answered.
func drPing(t *testing.T, from *harness.Container, to *harness.Container, count int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sent, got, err := harness.Ping(ctx, from.Namespace, to.IP, count, 20*time.Millisecond)
	if err != nil || got != sent {
		t.Fatalf("%s(%v) -> %s(%v): %d/%d replies (%v)", from.Host.Name, from.IP, to.Host.Name, to.IP, got, sent, err)
	}
}

// drMAC is the MAC of a host's eth0.
func drMAC(t *testing.T, h *harness.Host) string {
	t.Helper()
	var mac string
	if err := h.Do(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err == nil {
			mac = ifc.HardwareAddr.String()
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return mac
}

// drPaths is how a host's datapath reaches each peer subnet: "direct via <PublicIP>" or
// "vxlan via <PublicIP>" (ebpf: the pinned routes map), or the kernel's route (vxlan, udp).
func drPaths(t *testing.T, n *xnetdtest.Node, backendName string, subnets ...netip.Prefix) map[netip.Prefix]string {
	t.Helper()
	out := map[netip.Prefix]string{}
	if backendName == "ebpf" {
		m, err := maps.OpenPinned(n.BPFFS)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		routes, err := m.ListRoutes()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			path := "vxlan"
			if r.Direct {
				path = "direct"
			}
			out[r.Subnet] = path + " via " + r.PublicIP.String()
		}
		return out
	}
	for _, s := range subnets {
		out[s] = n.RouteTo(t, s)
	}
	return out
}

// drWantPath waits (the lease watch takes a moment) until n reaches subnet as want says:
// "direct" (routed plain via publicIP) or "vxlan".
func drWantPath(t *testing.T, n *xnetdtest.Node, backendName string, subnet netip.Prefix, publicIP netip.Addr, want string, within time.Duration) time.Time {
	t.Helper()
	ok := func(got string) bool {
		if backendName == "ebpf" {
			return got == want+" via "+publicIP.String()
		}
		if want == "direct" {
			return strings.HasPrefix(got, subnet.String()+" via "+publicIP.String()+" dev eth0")
		}
		return strings.Contains(got, subnet.String()) && !strings.Contains(got, "dev eth0")
	}
	var got string
	for deadline := time.Now().Add(within); ; time.Sleep(5 * time.Millisecond) {
		if got = drPaths(t, n, backendName, subnet)[subnet]; ok(got) {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s reaches %v by %q after %v, want %s via %v", n.Name, subnet, got, within, want, publicIP)
		}
	}
}

func TestDirectRoutingSameSegmentPeersGetPlainPacketsAndTheFarOneVXLAN(t *testing.T) {
	for _, backendName := range []string{"ebpf", "vxlan", "udp"} {
		t.Run(backendName, func(t *testing.T) {
			nodes, cs, topo := drCluster(t, backendName)
			h1, h2, h3 := nodes[0], nodes[1], nodes[2]
			sub := func(c *harness.Container) netip.Prefix { return c.Host.Docker0Subnet() }

			// Every host's view: the peer on its segment direct, the one behind the router VXLAN.
			for _, p := range []struct {
				from     *xnetdtest.Node
				to       *harness.Container
				via      netip.Addr
				wantPath string
			}{
				{h1, cs[1], h2.UnderlayIP, "direct"}, {h2, cs[0], h1.UnderlayIP, "direct"},
				{h1, cs[2], h3.UnderlayIP, "vxlan"}, {h3, cs[0], h1.UnderlayIP, "vxlan"}, {h3, cs[1], h2.UnderlayIP, "vxlan"},
			} {
				drWantPath(t, p.from, backendName, sub(p.to), p.via, p.wantPath, 5*time.Second)
			}

			capture := drStartCapture(t, topo, h1.Name)
			for _, pair := range [][2]*harness.Container{{cs[0], cs[1]}, {cs[1], cs[0]}, {cs[0], cs[2]}, {cs[2], cs[0]}} {
				drPing(t, pair[0], pair[1], 5)
			}
			frames := capture.stop(t)

			mac1, mac2 := drMAC(t, h1.Host), drMAC(t, h2.Host)
			var plainNear, vxlanNear, vxlanFar, plainFar int
			for _, f := range frames {
				switch {
				case f.vxlan() && f.between(h1.UnderlayIP, h2.UnderlayIP):
					vxlanNear++
				case f.vxlan() && f.between(h1.UnderlayIP, h3.UnderlayIP):
					vxlanFar++
				case strings.HasPrefix(f.what, "ICMP echo") && f.between(cs[0].IP, cs[1].IP):
					// Plain, and straight between the two hosts' NICs: no router in between.
					if f.srcMAC+f.dstMAC == mac1+mac2 || f.srcMAC+f.dstMAC == mac2+mac1 {
						plainNear++
					}
				case f.between(cs[0].IP, cs[2].IP):
					plainFar++
				}
			}
			// 10 requests and 10 replies each way between c1 and c2, and as many with c3.
			if vxlanNear != 0 || plainNear < 20 || vxlanFar < 20 || plainFar != 0 {
				var lines []string
				for _, f := range frames {
					lines = append(lines, fmt.Sprintf("%s > %s: %s > %s: %s", f.srcMAC, f.dstMAC, f.src, f.dst, f.what))
				}
				t.Fatalf("on h1's port of the near segment: %d VXLAN frames h1<->h2 (want 0), %d plain ICMP h1<->h2 between their NICs (want 20), "+
					"%d VXLAN frames h1<->h3 (want >= 20), %d plain frames c1<->c3 (want 0); captured:\n%s",
					vxlanNear, plainNear, vxlanFar, plainFar, strings.Join(lines, "\n"))
			}
			if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
				t.Fatalf("containers that do not reach each other:\n%s", strings.Join(failed, "\n"))
			}
			// `xnetd check` takes the direct peer's plain route on the NIC as right.
			if out, code := h1.Check(t); code != 0 {
				t.Errorf("xnetd check on h1 with a direct and a VXLAN peer: exit %d\n%s", code, out)
			}
			if backendName == "ebpf" {
				st := h1.Status(t)
				for _, p := range st.Peers {
					direct := strings.HasSuffix(p.Route, "(bpf, direct)")
					if direct != (p.PublicIP == h2.UnderlayIP) {
						t.Errorf("xnetd status on h1: peer %v (%v) route %q", p.Subnet, p.PublicIP, p.Route)
					}
				}
			}
		})
	}
}

// drMoveHost re-numbers n's host onto segment seg as an operator would: stop xnetd (the
// datapath stays), move the machine, delete its lease (whose PublicIP is the old address), and
// start xnetd, which takes its subnet back from its subnet file with the new PublicIP.
func drMoveHost(t *testing.T, topo *harness.Topology, n *xnetdtest.Node, subnet netip.Prefix, seg int) {
	t.Helper()
	if err := n.Proc.Stop(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.MoveToSegment(ctx, seg); err != nil {
		t.Fatal(err)
	}
	if _, err := topo.EtcdClient().Delete(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, subnet)); err != nil {
		t.Fatal(err)
	}
	n.StartDaemon(t)
	n.WaitReady(t)
	if got := n.State(t).Lease.Subnet; got != subnet {
		t.Fatalf("%s came back with %v, want its subnet %v", n.Name, got, subnet)
	}
}

func TestDirectRoutingPeerRenumberedOntoAnotherSegmentSwitchesPath(t *testing.T) {
	for _, backendName := range []string{"ebpf", "vxlan", "udp"} {
		t.Run(backendName, func(t *testing.T) { drRenumber(t, backendName) })
	}
}

func drRenumber(t *testing.T, backendName string) {
	nodes, cs, topo := drCluster(t, backendName)
	h1, h3 := nodes[0], nodes[2]
	c1, c3 := cs[0], cs[2]
	sub3 := c3.Host.Docker0Subnet()
	drWantPath(t, h1, backendName, sub3, h3.UnderlayIP, "vxlan", 5*time.Second)

	for _, move := range []struct {
		seg  int
		path string
	}{{harness.Near, "direct"}, {harness.Far, "vxlan"}} {
		t.Run("to the "+map[int]string{harness.Near: "near", harness.Far: "far"}[move.seg]+" segment", func(t *testing.T) {
			flows := rlStartFlows(t, c1, c3)
			time.Sleep(300 * time.Millisecond)
			start := time.Now()
			drMoveHost(t, topo, h3, sub3, move.seg)
			restarted := time.Now()
			switched := drWantPath(t, h1, backendName, sub3, h3.UnderlayIP, move.path, removalGraceE2E)
			time.Sleep(time.Second)
			t.Logf("h3 moved and its xnetd was ready again %v after the move started; h1's datapath had switched by %v",
				restarted.Sub(start).Round(time.Millisecond), switched.Sub(start).Round(time.Millisecond))
			for _, f := range flows {
				l := f.result()
				t.Logf("%s: %v", f.name, l)
				// Packets are lost only while the host is between addresses: from the move until
				// its peers know the new one, which must be within the removal grace.
				if l.Received == 0 || l.MaxGap > removalGraceE2E || time.Duration(l.Lost)*rlInterval > removalGraceE2E+rlInterval {
					t.Errorf("%s across the move: %v; want every loss within one outage of at most %v", f.name, l, removalGraceE2E)
				}
			}
			// After the switch the path is what the segment says, on the wire too.
			capture := drStartCapture(t, topo, h1.Name)
			drPing(t, c1, c3, 5)
			frames := capture.stop(t)
			var vx, plain int
			for _, f := range frames {
				switch {
				case f.vxlan() && f.between(h1.UnderlayIP, h3.UnderlayIP):
					vx++
				case strings.HasPrefix(f.what, "ICMP echo") && f.between(c1.IP, c3.IP):
					plain++
				}
			}
			if move.path == "direct" && (vx != 0 || plain < 10) || move.path == "vxlan" && (vx < 10 || plain != 0) {
				t.Errorf("after the move to %s: %d VXLAN and %d plain frames between h1 and h3, want %s", move.path, vx, plain, move.path)
			}
		})
	}
}

// removalGraceE2E is xnetd's removal grace (cmd/xnetd removalGrace): a host that goes away and
// comes back keeps its peers' datapath entry for that long, so it is what an outage around a
// re-numbering is measured against.
const removalGraceE2E = 3 * time.Second

// drSendRaw sends an IPv4 packet (header included) from ns to dst, routed by ns's kernel.
func drSendRaw(t *testing.T, ns *harness.Namespace, dst netip.Addr, pkt []byte) {
	t.Helper()
	if err := ns.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		return syscall.Sendto(fd, pkt, 0, &syscall.SockaddrInet4{Addr: dst.As4()})
	}); err != nil {
		t.Fatalf("raw send from %s: %v", ns.Name, err)
	}
}

func TestDirectRoutingSpoofedPlainPacketsDoNotReachContainers(t *testing.T) {
	nodes, cs, topo := drCluster(t, "ebpf")
	h1 := nodes[0]
	target, near, far := cs[0], cs[1], cs[2]
	for _, c := range []*harness.Container{near, far} {
		drPing(t, c, target, 2) // the target is learned, its peers' neighbours resolved
	}
	var rc *net.UDPConn
	if err := target.Do(func() (err error) {
		rc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: target.IP.AsSlice(), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	// verdict reads one of h1's datapath counters from `xnetd status`, which lists the
	// drop_<reason> verdicts under drops.
	verdict := func(name string) uint64 {
		var st struct {
			Verdicts map[string]uint64 `json:"verdicts"`
			Drops    map[string]uint64 `json:"drops"`
		}
		h1.StatusInto(t, &st)
		if reason, ok := strings.CutPrefix(name, "drop_"); ok {
			return st.Drops[reason]
		}
		return st.Verdicts[name]
	}
	// The attacker sits on the near segment (the underlay namespace, 198.18.0.1, which has a
	// leg there) and routes the target's subnet to h1, as any machine on the LAN can.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := topo.Underlay().IP(ctx, fmt.Sprintf("route add %s via %s dev br0", target.Host.Docker0Subnet(), h1.UnderlayIP)); err != nil {
		t.Fatal(err)
	}
	spoofed := []struct {
		name string
		src  netip.Addr
	}{
		{"in the name of a peer on the segment (h2's container)", near.IP},
		{"in the name of the peer behind the router (h3's container)", far.IP},
	}
	before := verdict("drop_direct_spoofed")
	for _, s := range spoofed {
		pkt := testpkt.IPv4{Src: s.src, Dst: target.IP, Proto: testpkt.ProtoUDP}.
			Packet(testpkt.UDP(1234, 9999, []byte("spoofed "+s.name)))
		for range 5 {
			drSendRaw(t, topo.Underlay(), target.IP, pkt)
		}
	}
	_ = rc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, from, err := rc.ReadFromUDP(make([]byte, 128)); err == nil {
		t.Fatalf("a spoofed plain packet (%d bytes from %v) reached the container", n, from)
	}
	if got := verdict("drop_direct_spoofed") - before; got != 10 {
		t.Errorf("drop_direct_spoofed counted %d, want the 10 injected packets", got)
	}
	// The genuine peers still get through, the one on the segment plain.
	inBefore := verdict("direct_in")
	for _, c := range []*harness.Container{near, far} {
		var sc *net.UDPConn
		if err := c.Do(func() (err error) {
			sc, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: target.IP.AsSlice(), Port: 9999})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		_, _ = sc.Write([]byte("genuine"))
		sc.Close()
		_ = rc.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, from, err := rc.ReadFromUDP(make([]byte, 128)); err != nil || from.IP.String() != c.IP.String() {
			t.Fatalf("the genuine datagram from %s(%v): from %v, %v", c.Host.Name, c.IP, from, err)
		}
	}
	if verdict("direct_in") == inBefore {
		t.Error("direct_in did not count the genuine datagram from the peer on the segment")
	}
}
