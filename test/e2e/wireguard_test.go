package e2e

// End-to-end tests of the wireguard backend as an operator runs it: xnetd on three hosts with
// Backend.Type "wireguard" in the config (this VM's kernel has no WireGuard, so each runs the
// embedded wireguard-go), etcd, containers. What the underlay sees is captured with tcpdump in
// the underlay namespace. Helpers here are prefixed wg.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

const wgConfig = `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}`

func TestWireGuardHostsConnectTheirContainersEncrypted(t *testing.T) {
	nodes, topo := xnetdtest.Cluster(t, 3, wgConfig)
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers that do not reach each other:\n%s", strings.Join(failed, "\n"))
	}

	t.Run("every host publishes its key as flannel does and keeps the private key 0600", func(t *testing.T) {
		leases := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)
		for _, n := range nodes {
			l := leases[n.State(t).Lease.Subnet]
			data, err := subnetmgr.ParseWireGuardData(l.BackendData)
			if l.BackendType != "wireguard" || err != nil || data.Port != 51820 {
				t.Errorf("%s's lease: %s %s (%v), want wireguard with its key and Port 51820", n.Name, l.BackendType, l.BackendData, err)
				continue
			}
			if want := fmt.Sprintf(`{"PublicKey":"%s","Port":51820}`, data.PublicKey); string(l.BackendData) != want {
				t.Errorf("%s's BackendData %s, want exactly %s", n.Name, l.BackendData, want)
			}
			keyFile := filepath.Join(n.StateDir, wireguard.KeyFile)
			fi, err := os.Stat(keyFile)
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: key file %s: %v %v, want mode 0600", n.Name, keyFile, fi, err)
				continue
			}
			raw, _ := os.ReadFile(keyFile)
			if k, err := wgtypes.ParseKey(strings.TrimSpace(string(raw))); err != nil || k.PublicKey().String() != data.PublicKey {
				t.Errorf("%s: the key file's public key is not the published one (%v)", n.Name, err)
			}
		}
	})

	t.Run("status names the backend and the embedded datapath", func(t *testing.T) {
		var st struct {
			Backend string `json:"backend"`
			Mode    string `json:"mode"`
		}
		nodes[0].StatusInto(t, &st)
		if st.Backend != "wireguard" || st.Mode != string(wireguard.DatapathEmbedded) {
			t.Errorf("status: backend %q mode %q, want wireguard %s", st.Backend, st.Mode, wireguard.DatapathEmbedded)
		}
	})

	t.Run("TCP transfers arrive intact both ways", func(t *testing.T) {
		udpTransfer(t, cs[0], cs[1], 32<<20)
		udpTransfer(t, cs[1], cs[0], 8<<20)
	})

	t.Run("status shows our public key and, per peer, the last handshake and the bytes each way", func(t *testing.T) {
		wgCheckStatus(t, topo, nodes)
	})

	t.Run("the underlay carries no payload in clear, and forged or replayed datagrams deliver nothing", func(t *testing.T) {
		wgNothingInClearNothingReplayed(t, topo, nodes[0], nodes[1], cs[0], cs[1])
	})

	t.Run("kill -9 and restart keeps the key and reconnects", func(t *testing.T) {
		before := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)[nodes[0].State(t).Lease.Subnet]
		if err := nodes[0].Proc.Kill(); err != nil {
			t.Fatal(err)
		}
		nodes[0].StartDaemon(t)
		nodes[0].WaitReady(t)
		after := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)[nodes[0].State(t).Lease.Subnet]
		if string(after.BackendData) != string(before.BackendData) {
			t.Errorf("the restarted host publishes %s, it published %s", after.BackendData, before.BackendData)
		}
		// Towards the restarted host first, which sends nothing itself: the others still hold
		// sessions with its previous process, and only its greeting replaces them before
		// WireGuard gives up on those (15 s).
		for _, c := range cs[1:] {
			if took, ok := wgReachWithin(t, c, cs[0], 2*time.Second); !ok {
				t.Errorf("%s's container does not reach the restarted %s's within %v", c.Host.Name, nodes[0].Name, took)
			}
		}
		if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
			t.Errorf("after the restart:\n%s", strings.Join(failed, "\n"))
		}
	})

	t.Run("teardown removes the device and routes", func(t *testing.T) {
		n := nodes[2]
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		n.Teardown(t, topo)
	})
}

// A dual-stack overlay of wireguard hosts, two with an IPv6 underlay and one without (flannel's
// default, separate mode): containers reach each other over IPv6; between the first two it
// crosses the IPv6 underlay as WireGuard to xnet-wg-v6's port 51821, to the third inside
// xnet-wg over IPv4, never in clear; status shows both devices with the IPv6 endpoints and
// subnets.
func TestWireGuardCarriesIPv6Encrypted(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true})
	for _, h := range topo.Hosts()[:2] {
		if err := h.AddIPv6Underlay(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	nodes := xnetdtest.Start(t, topo, fmt.Sprintf(xnetdtest.DualStackConfig, "wireguard"))
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.DualStackMesh(cs); len(failed) > 0 {
		t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
	}
	a, b, c := nodes[0], nodes[1], nodes[2]

	t.Run("status shows xnet-wg-v6 with the IPv6 peer, and the other host's IPv6 subnet on xnet-wg", func(t *testing.T) {
		var st struct {
			WireGuard struct {
				Peers []wgPeerStatus `json:"peers"`
				V6    struct {
					Device     string         `json:"device"`
					ListenPort int            `json:"listen_port"`
					Peers      []wgPeerStatus `json:"peers"`
				} `json:"v6"`
			} `json:"wireguard"`
		}
		a.StatusInto(t, &st)
		v6 := st.WireGuard.V6
		bSub6, cSub6 := b.State(t).Lease.IPv6Subnet, c.State(t).Lease.IPv6Subnet
		if v6.Device != wireguard.DeviceNameV6 || v6.ListenPort != 51821 || len(v6.Peers) != 1 ||
			v6.Peers[0].Endpoint != netip.AddrPortFrom(b.UnderlayIPv6, 51821).String() || !slices.Equal(v6.Peers[0].Subnets, []netip.Prefix{bSub6}) {
			t.Errorf("status v6 %+v: want %s on 51821 with %s's IPv6 subnet %v at [%v]:51821", v6, wireguard.DeviceNameV6, b.Name, bSub6, b.UnderlayIPv6)
		}
		found := false
		for _, p := range st.WireGuard.Peers {
			found = found || slices.Contains(p.Subnets, cSub6)
		}
		if !found {
			t.Errorf("no peer of %s holds %s's IPv6 subnet %v: %+v", wireguard.DeviceName, c.Name, cSub6, st.WireGuard.Peers)
		}
		text, err := a.Run(t.Context(), a.Bin, "status", "--subnet-file", a.SubnetFile())
		if err != nil || !strings.Contains(text, "wireguard: xnet-wg-v6 (wireguard-go)") || !strings.Contains(text, bSub6.String()) {
			t.Errorf("xnetd status (%v) does not show %s with %v:\n%s", err, wireguard.DeviceNameV6, bSub6, text)
		}
	})

	t.Run("TCP over IPv6 arrives intact both ways", func(t *testing.T) {
		harness.TransferIntact(t, cs[0], cs[1], cs[1].IPv6, 8<<20)
		harness.TransferIntact(t, cs[2], cs[0], cs[0].IPv6, 8<<20)
	})

	for _, tc := range []struct {
		desc     string
		to       *xnetdtest.Node
		cTo      *harness.Container
		wgPort   netip.AddrPort // where the datagrams to tc.to go
		from     netip.Addr     // and whence
		clearDst netip.Addr     // an underlay address of tc.to's, to send the control marker to
	}{
		{"over the IPv6 underlay", b, cs[1], netip.AddrPortFrom(b.UnderlayIPv6, 51821), a.UnderlayIPv6, b.UnderlayIPv6},
		{"to a host without an IPv6 underlay", c, cs[2], netip.AddrPortFrom(c.UnderlayIP, 51820), a.UnderlayIP, c.UnderlayIP},
	} {
		t.Run("IPv6 between containers is not in clear on the underlay "+tc.desc, func(t *testing.T) {
			wgWantSealed(t, topo, a, cs[0], tc.to, tc.cTo, tc.wgPort, tc.from, tc.clearDst)
		})
	}
}

// wgWantSealed sends marked UDP datagrams from cFrom (on from) to cTo's IPv6 address (on to)
// while the underlay is captured on to's port, and a control marker in clear from from to
// clearDst, an underlay address of to: the control marker must be in the capture (it sees the
// traffic), the marked ones must not, and WireGuard transport data from src to wgPort at least
// as long as them must.
func wgWantSealed(t *testing.T, topo *harness.Topology, from *xnetdtest.Node, cFrom *harness.Container, to *xnetdtest.Node, cTo *harness.Container,
	wgPort netip.AddrPort, src, clearDst netip.Addr) {
	t.Helper()
	marker, control := wgMarker(t, "overlay6"), wgMarker(t, "clear")
	const count = 20
	sink := wgSinkOn(t, cTo, cTo.IPv6, 7777)
	pcap := filepath.Join(t.TempDir(), "underlay.pcap")
	// On the receiver's port of the bridge: frames forwarded between ports never pass br0.
	dump, err := topo.Underlay().Start("tcpdump", "--immediate-mode", "-i", to.Name, "-U", "-s", "0", "-w", pcap, "udp")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(dump.Output(), "listening on"); time.Sleep(20 * time.Millisecond) {
		if dump.Exited() || time.Now().After(deadline) {
			t.Fatalf("tcpdump did not start: %s", dump.Output())
		}
	}
	wgSend(t, cFrom.Namespace, netip.AddrPortFrom(cTo.IPv6, 7777), marker, count)
	wgSend(t, from.Namespace, netip.AddrPortFrom(clearDst, 9), control, 1) // discard port: in clear
	if got := sink.wait(count, 5*time.Second); got != count {
		t.Fatalf("%s's container received %d of %d marked datagrams", to.Name, got, count)
	}
	time.Sleep(200 * time.Millisecond)
	if err := dump.Stop(); err != nil {
		t.Fatal(err)
	}
	capture, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(capture, control) {
		t.Fatalf("the capture lacks the marker sent in clear: it sees nothing (%d bytes, %s)", len(capture), dump.Output())
	}
	if bytes.Contains(capture, marker) {
		t.Errorf("the marker sent between containers over IPv6 is in clear on the underlay")
	}
	// WireGuard transport data (type 4) at least as long as the marked datagrams: a batch
	// wireguard-go sends with UDP GSO crosses the veths as one frame, so bytes are counted,
	// not datagrams.
	sent := 0
	for _, d := range wgUDP(t, capture) {
		if d.src.Addr() == src && d.dst == wgPort && len(d.payload) >= 32+len(marker) && d.payload[0] == 4 {
			sent += len(d.payload)
		}
	}
	if want := count * (32 + len(marker)); sent < want {
		t.Errorf("the capture holds %d bytes of WireGuard data from %v to %v, want at least the %d of the marked datagrams", sent, src, wgPort, want)
	}
}

// An IPv6-only overlay of wireguard hosts (flannel's separate mode, the default): each runs
// only xnet-wg-v6 on port 51821 with its peers at [PublicIPv6]:51821 and their IPv6 subnets,
// and what containers send each other crosses the underlay sealed; with Mode auto the one
// device is xnet-wg on 51820.
func TestWireGuardIPv6OnlyEncrypted(t *testing.T) {
	for _, tc := range []struct {
		mode, device string
		port         uint16
	}{
		{"separate", wireguard.DeviceNameV6, 51821},
		{"auto", wireguard.DeviceName, 51820},
	} {
		t.Run("Mode="+tc.mode, func(t *testing.T) {
			config := fmt.Sprintf(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":%q}}`, tc.mode)
			nodes, topo := xnetdtest.ClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: true}, config)
			cs := xnetdtest.Containers(t, nodes)
			if failed := xnetdtest.IPv6Mesh(cs); len(failed) > 0 {
				t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
			}
			a, b := nodes[0], nodes[1]
			var st struct {
				WireGuard struct {
					Device     string         `json:"device"`
					ListenPort uint16         `json:"listen_port"`
					Peers      []wgPeerStatus `json:"peers"`
					V6         *struct{}      `json:"v6"`
				} `json:"wireguard"`
			}
			a.StatusInto(t, &st)
			wg, bSub := st.WireGuard, b.State(t).Lease.Subnet
			if wg.Device != tc.device || wg.ListenPort != tc.port || wg.V6 != nil || len(wg.Peers) != 1 ||
				wg.Peers[0].Endpoint != netip.AddrPortFrom(b.UnderlayIPv6, tc.port).String() || !slices.Equal(wg.Peers[0].Subnets, []netip.Prefix{bSub}) {
				t.Errorf("status %+v: want %s on %d alone, its one peer %s's IPv6 subnet %v at [%v]:%d", wg, tc.device, tc.port, b.Name, bSub, b.UnderlayIPv6, tc.port)
			}
			harness.TransferIntact(t, cs[0], cs[1], cs[1].IPv6, 8<<20)
			harness.TransferIntact(t, cs[1], cs[0], cs[0].IPv6, 8<<20)
			wgWantSealed(t, topo, a, cs[0], b, cs[1], netip.AddrPortFrom(b.UnderlayIPv6, tc.port), a.UnderlayIPv6, b.UnderlayIPv6)
		})
	}
}

// wgPeerStatus is a peer of the wireguard section of `xnetd status --output json`.
type wgPeerStatus struct {
	Endpoint string         `json:"endpoint"`
	Subnets  []netip.Prefix `json:"subnets"`
}

// wgNothingInClearNothingReplayed captures the underlay while a's container sends marked
// datagrams to b's, and checks the marker never appears on the wire while a second marker sent
// in clear between the hosts does (the capture would have seen it). Then it sends b's
// WireGuard port what an attacker on the underlay could: every captured datagram again, each
// with its authentication tag changed, and garbage. None may reach b's container, and b must
// still answer a: its session and a's endpoint are undisturbed.
func wgNothingInClearNothingReplayed(t *testing.T, topo *harness.Topology, a, b *xnetdtest.Node, ca, cb *harness.Container) {
	marker, control := wgMarker(t, "overlay"), wgMarker(t, "clear")
	const count = 20
	sink := wgSink(t, cb, 7777)

	pcap := filepath.Join(t.TempDir(), "underlay.pcap")
	if _, err := exec.LookPath("tcpdump"); err != nil {
		t.Fatalf("tcpdump (installed by .ci/run): %v", err)
	}
	// On b's port of the bridge: frames the bridge forwards between its ports never pass br0.
	dump, err := topo.Underlay().Start("tcpdump", "--immediate-mode", "-i", b.Name, "-U", "-s", "0", "-w", pcap, "udp")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(dump.Output(), "listening on"); time.Sleep(20 * time.Millisecond) {
		if dump.Exited() || time.Now().After(deadline) {
			t.Fatalf("tcpdump did not start: %s", dump.Output())
		}
	}
	wgSend(t, ca.Namespace, netip.AddrPortFrom(cb.IP, 7777), marker, count)
	wgSend(t, a.Namespace, netip.AddrPortFrom(b.UnderlayIP, 9), control, 1) // discard port: in clear
	if got := sink.wait(count, 5*time.Second); got != count {
		t.Fatalf("%s's container received %d of %d marked datagrams", b.Name, got, count)
	}
	time.Sleep(200 * time.Millisecond) // tcpdump writes each packet as it comes (--immediate-mode -U)
	if err := dump.Stop(); err != nil {
		t.Fatal(err)
	}
	capture, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(capture, control) {
		t.Fatalf("the capture lacks the marker sent in clear: it sees nothing (%d bytes, %s)", len(capture), dump.Output())
	}
	if bytes.Contains(capture, marker) {
		t.Errorf("the marker sent between containers is in clear on the underlay")
	}
	wgPort := netip.AddrPortFrom(b.UnderlayIP, 51820)
	var data [][]byte
	for _, d := range wgUDP(t, capture) {
		// WireGuard transport data (type 4) from a to b, as long as a marked datagram.
		if d.src.Addr() == a.UnderlayIP && d.dst == wgPort && len(d.payload) >= 32+len(marker) && d.payload[0] == 4 {
			data = append(data, d.payload)
		}
	}
	if len(data) < count {
		t.Fatalf("the capture holds %d WireGuard datagrams from %s to %s, want the %d marked ones", len(data), a.Name, b.Name, count)
	}

	var attack [][]byte
	for _, d := range data {
		attack = append(attack, d) // replayed as captured
		forged := bytes.Clone(d)
		forged[len(forged)-1] ^= 0x55 // tag no longer authenticates
		attack = append(attack, forged)
		later := bytes.Clone(d)
		binary.LittleEndian.PutUint64(later[8:16], 1<<40) // a counter never used: still not authentic
		attack = append(attack, later)
	}
	attack = append(attack, append([]byte{4, 0, 0, 0}, make([]byte, 60)...), []byte("garbage"))
	// From the underlay's gateway address, as anyone on the segment could.
	err = topo.Underlay().Do(func() error {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(wgPort))
		if err != nil {
			return err
		}
		defer c.Close()
		for _, p := range attack {
			if _, err := c.Write(p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if got := sink.count(); got != count {
		t.Errorf("%d of %d replayed, forged or garbage datagrams reached %s's container", got-count, len(attack), b.Name)
	}
	// b still reaches a where a is (a forged packet did not move a's endpoint), and a b.
	if failed := xnetdtest.Mesh([]*harness.Container{ca, cb}); len(failed) > 0 {
		t.Errorf("after the replays:\n%s", strings.Join(failed, "\n"))
	}
	wgSend(t, ca.Namespace, netip.AddrPortFrom(cb.IP, 7777), marker, 1)
	if got := sink.wait(count+1, 5*time.Second); got != count+1 {
		t.Errorf("a fresh datagram after the replays: the container has %d, want %d", got, count+1)
	}
}

// wgReachWithin pings to's container from from's, one echo request at a time, until one is
// answered or d passed.
func wgReachWithin(t *testing.T, from, to *harness.Container, d time.Duration) (time.Duration, bool) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	for ctx.Err() == nil {
		if _, got, _ := harness.Ping(ctx, from.Namespace, to.IP, 1, 0); got > 0 {
			return time.Since(start), true
		}
	}
	return time.Since(start), false
}

func wgMarker(t *testing.T, what string) []byte {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("xnet-" + what + "-marker-" + hex.EncodeToString(b))
}

// wgSend sends payload count times from a UDP socket in ns to dst (IPv4 or IPv6).
func wgSend(t *testing.T, ns *harness.Namespace, dst netip.AddrPort, payload []byte, count int) {
	t.Helper()
	err := ns.Do(func() error {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		for range count {
			if _, err := c.Write(payload); err != nil {
				return err
			}
			time.Sleep(5 * time.Millisecond)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("send to %v from %s: %v", dst, ns.Name, err)
	}
}

// wgCounter counts the datagrams a UDP listener in a container received.
type wgCounter struct {
	mu sync.Mutex
	n  int
}

func (c *wgCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// wait waits until want datagrams arrived or timeout passed, and returns how many did.
func (c *wgCounter) wait(want int, timeout time.Duration) int {
	for deadline := time.Now().Add(timeout); c.count() < want && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	return c.count()
}

func wgSink(t *testing.T, c *harness.Container, port int) *wgCounter {
	t.Helper()
	return wgSinkOn(t, c, c.IP, port)
}

// wgSinkOn is wgSink on the container's address addr (its IP or IPv6).
func wgSinkOn(t *testing.T, c *harness.Container, addr netip.Addr, port int) *wgCounter {
	t.Helper()
	var conn *net.UDPConn
	if err := c.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", &net.UDPAddr{IP: addr.AsSlice(), Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s := &wgCounter{}
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := conn.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
			s.mu.Lock()
			s.n++
			s.mu.Unlock()
		}
	}()
	return s
}

// wgDatagram is one UDP datagram of a capture.
type wgDatagram struct {
	src, dst netip.AddrPort
	payload  []byte
}

// wgUDP reads the UDP datagrams (IPv4, and IPv6 without extension headers) out of a pcap file
// of an Ethernet interface.
func wgUDP(t *testing.T, file []byte) []wgDatagram {
	t.Helper()
	if len(file) < 24 {
		t.Fatalf("pcap file of %d bytes", len(file))
	}
	switch binary.LittleEndian.Uint32(file) {
	case 0xa1b2c3d4, 0xa1b23c4d: // microsecond and nanosecond pcap, written on this host
	default:
		t.Fatalf("not a little-endian pcap file (magic %x): tcpdump wrote pcapng?", file[:4])
	}
	if lt := binary.LittleEndian.Uint32(file[20:]); lt != 1 {
		t.Fatalf("pcap link type %d, want Ethernet (1)", lt)
	}
	var out []wgDatagram
	for rest := file[24:]; len(rest) >= 16; {
		n := int(binary.LittleEndian.Uint32(rest[8:]))
		if len(rest) < 16+n {
			break // the last record, cut short
		}
		frame := rest[16 : 16+n]
		rest = rest[16+n:]
		if len(frame) >= 14+40+8 && binary.BigEndian.Uint16(frame[12:]) == 0x86dd {
			ip := frame[14:]
			if ip[6] != 17 {
				continue
			}
			udp := ip[40:]
			end := int(binary.BigEndian.Uint16(udp[4:]))
			if end < 8 || end > len(udp) {
				continue
			}
			out = append(out, wgDatagram{
				src:     netip.AddrPortFrom(netip.AddrFrom16([16]byte(ip[8:24])), binary.BigEndian.Uint16(udp[0:])),
				dst:     netip.AddrPortFrom(netip.AddrFrom16([16]byte(ip[24:40])), binary.BigEndian.Uint16(udp[2:])),
				payload: udp[8:end],
			})
			continue
		}
		if len(frame) < 14+20+8 || binary.BigEndian.Uint16(frame[12:]) != 0x0800 {
			continue
		}
		ip := frame[14:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] != 17 || len(ip) < ihl+8 {
			continue
		}
		udp := ip[ihl:]
		end := int(binary.BigEndian.Uint16(udp[4:]))
		if end < 8 || end > len(udp) {
			continue
		}
		out = append(out, wgDatagram{
			src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(udp[0:])),
			dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(udp[2:])),
			payload: udp[8:end],
		})
	}
	return out
}

// TestXnetdWireGuardWithoutKernelOrTUNSaysWhy: --backend=wireguard on a host with neither
// kernel WireGuard nor /dev/net/tun (hidden here by an empty /dev/net in a private mount
// namespace) is a usage error that says both, and nothing is set up.
func TestXnetdWireGuardWithoutKernelOrTUNSaysWhy(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, WithEtcd: true})
	h := topo.Hosts()[0]
	if err := h.Do(func() error { _, err := netlink.GenlFamilyGet("wireguard"); return err }); err == nil || wgModuleInstalled() {
		t.Skip("this kernel has WireGuard: there is nothing to refuse")
	}
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	bin := harness.BuildXnetd(t)
	script := `mount -t tmpfs none /dev/net && exec "$0" "$@"`
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	args := append([]string{"--mount", "--propagation", "private", "sh", "-c", script, bin}, append(h.XnetdArgs(), "--backend=wireguard")...)
	out, err := h.Run(ctx, "unshare", args...)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("xnetd --backend=wireguard without kernel WireGuard or TUN: %v, want exit code 2\n%s", err, out)
	}
	for _, want := range []string{"--backend=wireguard", "neither kernel WireGuard", "/dev/net/tun"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q:\n%v", want, err)
		}
	}
	if links, _ := h.Run(ctx, "ip", "-o", "link", "show"); strings.Contains(links, "xnet") {
		t.Errorf("devices left by a refused start:\n%s", links)
	}
}

// wgModuleInstalled says whether a wireguard module is installed for the running kernel.
func wgModuleInstalled() bool {
	rel, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return false
	}
	dir := filepath.Join("/lib/modules", strings.TrimSpace(string(rel)))
	for _, list := range []string{"modules.builtin", "modules.dep"} {
		if data, err := os.ReadFile(filepath.Join(dir, list)); err == nil && bytes.Contains(data, []byte("/wireguard.ko")) {
			return true
		}
	}
	return false
}

// TestWireGuardInteroperatesWithFlannel: host 1 is set up as flannel's wireguard backend sets
// up a node (pkg/backend/wireguard): device flannel-wg with its private key and listen port
// 51820, the subnet's network address as /32, a route for the whole Network, and per peer lease
// one WireGuard peer reached at PublicIP:Port with AllowedIPs its subnet; its lease is the JSON
// flannel writes. This kernel has no WireGuard, so the device is wireguard-go driven over the
// configuration protocol `wg set` speaks. Hosts 2 and 3 run xnetd. Every container reaches every
// other, and TCP crosses between the flannel host and an xnet host intact both ways.
func TestWireGuardInteroperatesWithFlannel(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), wgConfig)
	hosts := topo.Hosts()
	flannel := wgStartFlannel(t, topo, hosts[0], netip.MustParsePrefix("10.244.200.0/24"))

	bin := harness.BuildXnetd(t)
	var nodes []*xnetdtest.Node
	for _, h := range hosts[1:] {
		n := &xnetdtest.Node{Host: h, Bin: bin}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.WaitPeers(t, 2)
	}
	// flannel's handleSubnetEvents for the xnet hosts' leases.
	for subnet, l := range xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix) {
		if subnet != flannel.subnet {
			flannel.addPeer(t, subnet, l)
		}
	}
	cs := append([]*harness.Container{flannel.container}, xnetdtest.Containers(t, nodes)...)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers that do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	udpTransfer(t, cs[0], cs[1], 16<<20)
	udpTransfer(t, cs[2], cs[0], 16<<20)
}

// A dual-stack cluster of two xnet wireguard hosts and one host set up exactly as flannel's
// wireguard backend (v0.28, Mode separate) sets up a dual-stack node: flannel-wg (IPv4, 51820)
// and flannel-wg-v6 (IPv6, 51821) with one key, its lease in flannel's dual-stack key and JSON,
// and the xnet hosts programmed from their leases as flannel's handleSubnetEvents does.
// Containers on all three reach each other over IPv6 and IPv4.
func TestWireGuardDualStackInteroperatesWithFlannel(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true, IPv6Underlay: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), fmt.Sprintf(xnetdtest.DualStackConfig, "wireguard"))
	hosts := topo.Hosts()
	fh := hosts[0]
	sub, sub6 := netip.MustParsePrefix("10.244.200.0/24"), netip.MustParsePrefix("fd00:10:244:c8::/64")
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	const mtu = 1500 - 80
	devs := map[string]*device.Device{}
	for name, port := range map[string]int{"flannel-wg": 51820, "flannel-wg-v6": 51821} {
		err := fh.Do(func() error {
			tdev, err := tun.CreateTUN(name, mtu)
			if err != nil {
				return err
			}
			d := device.NewDevice(tdev, conn.NewStdNetBind(), &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf})
			devs[name] = d
			if err := d.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\nreplace_peers=true\n", hex.EncodeToString(key[:]), port)); err != nil {
				return err
			}
			return d.Up()
		})
		if d := devs[name]; d != nil {
			t.Cleanup(d.Close)
		}
		if err != nil {
			t.Fatalf("%s on %s: %v", name, fh.Name, err)
		}
	}
	// flannel's Configure and ConfigureV6: the subnets' addresses as /32 and /128, the networks
	// routed into the devices.
	err = fh.IP(t.Context(),
		fmt.Sprintf("addr add %s/32 dev flannel-wg", sub.Addr()),
		"link set flannel-wg up",
		"route replace 10.244.0.0/16 dev flannel-wg scope link",
		fmt.Sprintf("addr add %s/128 dev flannel-wg-v6 nodad", sub6.Addr()),
		"link set flannel-wg-v6 up",
		"route replace fd00:10:244::/56 dev flannel-wg-v6")
	if err != nil {
		t.Fatal(err)
	}
	if err := fh.SetupDocker0(subnetmgr.GatewayOf(sub), mtu); err != nil {
		t.Fatal(err)
	}
	if err := fh.SetupDocker0IPv6(subnetmgr.GatewayOf(sub6)); err != nil {
		t.Fatal(err)
	}
	fc, err := fh.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	// The lease as flanneld v0.28 writes it (newSubnetAttrs): BackendV6Data with ListenPortV6.
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	grant, err := topo.EtcdClient().Grant(ctx, 3600)
	if err != nil {
		t.Fatal(err)
	}
	value := fmt.Sprintf(`{"PublicIP":"%s","PublicIPv6":"%s","BackendType":"wireguard","BackendData":{"PublicKey":"%s","Port":51820},"BackendV6Data":{"PublicKey":"%s","Port":51821}}`,
		fh.UnderlayIP, fh.UnderlayIPv6, key.PublicKey(), key.PublicKey())
	if _, err := topo.EtcdClient().Put(ctx, xnetdtest.EtcdPrefix+"/subnets/10.244.200.0-24&fd00:10:244:c8::-64", value, clientv3.WithLease(grant.ID)); err != nil {
		t.Fatal(err)
	}

	bin := harness.BuildXnetd(t)
	var nodes []*xnetdtest.Node
	for _, h := range hosts[1:] {
		n := &xnetdtest.Node{Host: h, Bin: bin}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.WaitPeers(t, 2)
	}
	// flannel's handleSubnetEvents in separate mode for the xnet hosts' leases.
	leases, _, err := xnetdtest.ListLeases(ctx, topo)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases {
		if l.Subnet == sub {
			continue
		}
		d4, err4 := subnetmgr.ParseWireGuardData(l.BackendData)
		d6, err6 := subnetmgr.ParseWireGuardData(l.BackendV6Data)
		if err4 != nil || err6 != nil || d6.PublicKey != d4.PublicKey || d6.Port != 51821 || !l.PublicIPv6.IsValid() {
			t.Fatalf("xnet lease %+v: want flannel's dual-stack wireguard lease (%v %v)", l, err4, err6)
		}
		pub, err := wgtypes.ParseKey(d4.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []struct {
			dev      string
			endpoint netip.AddrPort
			subnet   netip.Prefix
		}{
			{"flannel-wg", netip.AddrPortFrom(l.PublicIP, d4.Port), l.Subnet},
			{"flannel-wg-v6", netip.AddrPortFrom(l.PublicIPv6, d6.Port), l.IPv6Subnet},
		} {
			conf := fmt.Sprintf("public_key=%s\nendpoint=%s\nreplace_allowed_ips=true\nallowed_ip=%s\n", hex.EncodeToString(pub[:]), p.endpoint, p.subnet)
			if err := devs[p.dev].IpcSet(conf); err != nil {
				t.Fatal(err)
			}
		}
	}
	cs := append(xnetdtest.Containers(t, nodes), fc)
	for _, n := range nodes {
		if route := n.RouteTo(t, sub6); !strings.Contains(route, wireguard.DeviceNameV6) {
			t.Errorf("%s: route to the flannel host's IPv6 subnet %q, want it on %s", n.Name, route, wireguard.DeviceNameV6)
		}
	}
	if failed := xnetdtest.DualStackMesh(cs); len(failed) > 0 {
		t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
	}
	harness.TransferIntact(t, cs[0], fc, fc.IPv6, 8<<20)
	harness.TransferIntact(t, fc, cs[1], cs[1].IPv6, 8<<20)
}

// wgFlannel is a host configured as flannel's wireguard backend configures one.
type wgFlannel struct {
	dev       *device.Device
	subnet    netip.Prefix
	container *harness.Container
}

func wgStartFlannel(t *testing.T, topo *harness.Topology, h *harness.Host, subnet netip.Prefix) *wgFlannel {
	t.Helper()
	key, err := wgtypes.GeneratePrivateKey() // flannel: /run/flannel/wgkey, made at first start
	if err != nil {
		t.Fatal(err)
	}
	f := &wgFlannel{subnet: subnet}
	const mtu = 1500 - 80 // flannel: the interface's MTU minus its overhead of 80
	err = h.Do(func() error {
		tdev, err := tun.CreateTUN("flannel-wg", mtu)
		if err != nil {
			return err
		}
		f.dev = device.NewDevice(tdev, conn.NewStdNetBind(), &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf})
		if err := f.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=51820\nreplace_peers=true\n", hex.EncodeToString(key[:]))); err != nil {
			return err
		}
		return f.dev.Up() // opens its UDP sockets here, in the host's namespace
	})
	if err != nil {
		t.Fatalf("flannel-wg on %s: %v", h.Name, err)
	}
	t.Cleanup(f.dev.Close)
	err = h.IP(t.Context(),
		fmt.Sprintf("addr add %s/32 dev flannel-wg", subnet.Addr()),
		"link set flannel-wg up",
		"route replace 10.244.0.0/16 dev flannel-wg scope link")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetupDocker0(netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits()), mtu); err != nil {
		t.Fatal(err)
	}
	if f.container, err = h.AddContainer(); err != nil {
		t.Fatal(err)
	}
	// The lease as flanneld v0.28 writes it (json.Marshal of its LeaseAttrs), with a TTL.
	value := fmt.Sprintf(`{"PublicIP":"%s","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"%s","Port":51820}}`,
		h.UnderlayIP, key.PublicKey())
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	grant, err := topo.EtcdClient().Grant(ctx, 3600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := topo.EtcdClient().Put(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, subnet), value, clientv3.WithLease(grant.ID)); err != nil {
		t.Fatal(err)
	}
	return f
}

// addPeer is flannel's AddPeer for one lease: endpoint PublicIP:Port, AllowedIPs the subnet.
func (f *wgFlannel) addPeer(t *testing.T, subnet netip.Prefix, l subnetmgr.LeaseAttrs) {
	t.Helper()
	data, err := subnetmgr.ParseWireGuardData(l.BackendData)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := wgtypes.ParseKey(data.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf("public_key=%s\nendpoint=%s\nreplace_allowed_ips=true\nallowed_ip=%s\n",
		hex.EncodeToString(pub[:]), netip.AddrPortFrom(l.PublicIP, data.Port), subnet)
	if err := f.dev.IpcSet(conf); err != nil {
		t.Fatal(err)
	}
}

// wgStatus is the wireguard section of `xnetd status --output json`.
type wgStatus struct {
	WireGuard struct {
		Datapath    string `json:"datapath"`
		PublicKey   string `json:"public_key"`
		ListenPort  int    `json:"listen_port"`
		Unavailable string `json:"unavailable"`
		Peers       []struct {
			PublicKey     string         `json:"public_key"`
			Endpoint      string         `json:"endpoint"`
			Subnets       []netip.Prefix `json:"subnets"`
			LastHandshake time.Time      `json:"last_handshake"`
			RxBytes       int64          `json:"rx_bytes"`
			TxBytes       int64          `json:"tx_bytes"`
		} `json:"peers"`
	} `json:"wireguard"`
}

// wgCheckStatus checks what `xnetd status` says of the first host's device against the leases
// in etcd, after the traffic so far and after more.
func wgCheckStatus(t *testing.T, topo *harness.Topology, nodes []*xnetdtest.Node) {
	t.Helper()
	leases := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)
	keyOf := func(n *xnetdtest.Node) string {
		d, err := subnetmgr.ParseWireGuardData(leases[n.State(t).Lease.Subnet].BackendData)
		if err != nil {
			t.Fatal(err)
		}
		return d.PublicKey
	}
	n := nodes[0]
	var before wgStatus
	n.StatusInto(t, &before)
	w := before.WireGuard
	if w.Unavailable != "" || w.Datapath != string(wireguard.DatapathEmbedded) || w.PublicKey != keyOf(n) || w.ListenPort != 51820 {
		t.Fatalf("status wireguard: %+v, want the embedded device with our published key %s on 51820", w, keyOf(n))
	}
	if len(w.Peers) != len(nodes)-1 {
		t.Fatalf("status lists %d WireGuard peers, want %d: %+v", len(w.Peers), len(nodes)-1, w.Peers)
	}
	byKey := map[string]int{}
	for i, p := range w.Peers {
		byKey[p.PublicKey] = i
	}
	for _, peer := range nodes[1:] {
		i, ok := byKey[keyOf(peer)]
		if !ok {
			t.Errorf("status has no peer with %s's key %s: %+v", peer.Name, keyOf(peer), w.Peers)
			continue
		}
		p := w.Peers[i]
		if len(p.Subnets) != 1 || p.Subnets[0] != peer.State(t).Lease.Subnet || p.Endpoint != peer.UnderlayIP.String()+":51820" {
			t.Errorf("peer %s: %+v, want its subnet %v at %v:51820", peer.Name, p, peer.State(t).Lease.Subnet, peer.UnderlayIP)
		}
		// WireGuard renews a session every 2 minutes while traffic flows.
		if p.LastHandshake.IsZero() || time.Since(p.LastHandshake) > 3*time.Minute || p.RxBytes == 0 || p.TxBytes == 0 {
			t.Errorf("peer %s: last handshake %v, rx %d, tx %d bytes; want a recent handshake and bytes both ways after the traffic so far", peer.Name, p.LastHandshake, p.RxBytes, p.TxBytes)
		}
	}
	for _, c := range nodes[1:] {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, _, _ = harness.Ping(ctx, n.Containers()[0].Namespace, c.Containers()[0].IP, 5, 20*time.Millisecond)
		cancel()
	}
	var after wgStatus
	n.StatusInto(t, &after)
	for _, p := range after.WireGuard.Peers {
		i, ok := byKey[p.PublicKey]
		if !ok {
			continue
		}
		if old := w.Peers[i]; p.RxBytes <= old.RxBytes || p.TxBytes <= old.TxBytes {
			t.Errorf("peer %s: rx %d -> %d, tx %d -> %d bytes after 5 pings; want both to grow", p.PublicKey, old.RxBytes, p.RxBytes, old.TxBytes, p.TxBytes)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	text, err := n.Run(ctx, n.Bin, "status", "--subnet-file", n.SubnetFile())
	if err != nil {
		t.Fatal(err)
	}
	if want := "wireguard: xnet-wg (wireguard-go), public key " + keyOf(n) + ", listen port 51820"; !strings.Contains(text, want) {
		t.Errorf("xnetd status lacks %q:\n%s", want, text)
	}
	for _, peer := range nodes[1:] {
		if line := xnetdtest.LineContaining(text, keyOf(peer)); !strings.Contains(line, peer.State(t).Lease.Subnet.String()) || !strings.Contains(line, " ago)") {
			t.Errorf("xnetd status shows %s's peer as %q, want its subnet and when it last shook hands:\n%s", peer.Name, line, text)
		}
	}
}
