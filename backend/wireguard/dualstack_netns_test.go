package wireguard

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

// dualConfig is a dual-stack overlay's config with the Backend object backendJSON.
func dualConfig(t *testing.T, backendJSON string) subnetmgr.Config {
	t.Helper()
	cfg, err := subnetmgr.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","IPv6SubnetLen":64,"Backend":` + backendJSON + `}`))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startDualNodes is startNodes for a dual-stack overlay: host i gets an IPv6 underlay when
// underlay6[i] (its PublicIPv6, published with BackendV6Data as xnetd publishes them), the
// lease fd00:10:244:<i+1>::/64, and docker0 and its container an IPv6 address.
func startDualNodes(t *testing.T, cfg subnetmgr.Config, underlay6 ...bool) []*testNode {
	t.Helper()
	topo := harness.NewForTest(t, harness.Options{Hosts: len(underlay6)})
	var nodes []*testNode
	for i, h := range topo.Hosts() {
		if underlay6[i] {
			if err := h.AddIPv6Underlay(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		iface, err := conformance.Underlay(h)
		if err != nil {
			t.Fatal(err)
		}
		iface.PublicIPv6 = h.UnderlayIPv6
		opts := backend.Options{Iface: iface, Config: cfg, StateDir: h.StateDir, Logger: harness.TestLogger(t).With("host", h.Name)}
		var b *Backend
		if err := h.Do(func() (err error) { b, err = NewWithDatapath(opts, DatapathEmbedded); return err }); err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		t.Cleanup(func() { _ = b.Close(true) })
		typ, data, err := b.LeaseAttrs()
		if err != nil {
			t.Fatal(err)
		}
		ip6, data6, err := backend.IPv6LeaseAttrs(b, iface)
		if err != nil {
			t.Fatal(err)
		}
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
		subnet6 := netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
		lease := subnetmgr.Lease{Subnet: subnet, PublicIP: h.UnderlayIP, BackendType: typ, BackendData: data,
			IPv6Subnet: subnet6, PublicIPv6: ip6, BackendV6Data: data6, Expiration: time.Now().Add(time.Hour)}
		if err := h.Do(func() error { return b.Setup(t.Context(), lease, cfg) }); err != nil {
			t.Fatalf("%s: Setup: %v", h.Name, err)
		}
		if err := h.SetupDocker0(netip.PrefixFrom(subnet.Addr().Next(), 24), b.MTU()); err != nil {
			t.Fatal(err)
		}
		if err := h.SetupDocker0IPv6(netip.PrefixFrom(subnet6.Addr().Next(), 64)); err != nil {
			t.Fatal(err)
		}
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, &testNode{Host: h, b: b, lease: lease})
	}
	for _, n := range nodes {
		for _, p := range nodes {
			if err := n.Do(func() error { return n.b.AddPeer(p.lease) }); err != nil {
				t.Fatalf("%s: AddPeer(%v): %v", n.Name, p.lease.Subnet, err)
			}
		}
	}
	return nodes
}

// wantIPv6Mesh checks every container reaches every other over IPv6 (ping) and that TCP
// crosses IPv6 both ways between the first host and each other one.
func wantIPv6Mesh(t *testing.T, nodes []*testNode) {
	t.Helper()
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b && !harness.PingsWithin(t, a.container().Namespace, b.container().IPv6, 5*time.Second) {
				t.Errorf("%s's container does not reach %s's over IPv6", a.Name, b.Name)
			}
		}
	}
	for _, b := range nodes[1:] {
		for _, p := range [][2]*testNode{{nodes[0], b}, {b, nodes[0]}} {
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			err := harness.TCPExchange(ctx, p[0].container().Namespace, p[1].container().Namespace, p[1].container().IPv6, 1<<20)
			cancel()
			if err != nil {
				t.Errorf("TCP over IPv6 %s -> %s: %v", p[0].Name, p[1].Name, err)
			}
		}
	}
}

// peerOf is the status line of the peer holding subnet, or nil.
func peerOf(st *Status, subnet netip.Prefix) *PeerStatus {
	if st == nil {
		return nil
	}
	for i, p := range st.Peers {
		if slices.Contains(p.Subnets, subnet) {
			return &st.Peers[i]
		}
	}
	return nil
}

// TestDualStackSeparateMode is flannel's default mode over an IPv6 underlay: hosts that both
// have one carry IPv6 on xnet-wg-v6 (same key, ListenPortV6, endpoints at PublicIPv6), and a
// host without one is reached over IPv6 all the same, inside xnet-wg over IPv4.
func TestDualStackSeparateMode(t *testing.T) {
	nodes := startDualNodes(t, dualConfig(t, `{"Type":"wireguard"}`), true, true, false)
	a, b, c := nodes[0], nodes[1], nodes[2]
	wantIPv6Mesh(t, nodes)

	for _, n := range nodes[:2] {
		if data, _ := n.b.LeaseAttrsV6(); !strings.Contains(string(data), `"Port":51821`) || string(n.lease.BackendV6Data) != string(data) {
			t.Errorf("%s publishes BackendV6Data %s, want its key with Port 51821", n.Name, n.lease.BackendV6Data)
		}
	}
	if c.lease.PublicIPv6.IsValid() || c.lease.BackendV6Data != nil {
		t.Errorf("%s without an IPv6 underlay publishes PublicIPv6 %v BackendV6Data %s", c.Name, c.lease.PublicIPv6, c.lease.BackendV6Data)
	}
	if link := a.sh(t, "ip", "-d", "link", "show", DeviceNameV6); !strings.Contains(link, "mtu 1420") || !strings.Contains(link, "tun type tun") {
		t.Errorf("%s on %s:\n%s", DeviceNameV6, a.Name, link)
	}
	if out, _ := c.Run(t.Context(), "ip", "link", "show", DeviceNameV6); strings.Contains(out, DeviceNameV6) {
		t.Errorf("%s without an IPv6 underlay has %s", c.Name, DeviceNameV6)
	}
	for dev, want := range map[string][]string{
		DeviceNameV6: {"inet6 fd00:10:244:1::/128"},
		DeviceName:   {"inet 10.244.1.0/32"},
	} {
		addrs := a.sh(t, "ip", "addr", "show", dev)
		for _, w := range want {
			if !strings.Contains(addrs, w) {
				t.Errorf("%s's addresses lack %q:\n%s", dev, w, addrs)
			}
		}
	}
	for dev, want := range map[string][]string{
		DeviceNameV6: {"fd00:10:244::/48", "fd00:10:244:2::/64"},
		DeviceName:   {"fd00:10:244:3::/64"},
	} {
		routes := a.sh(t, "ip", "-6", "route", "show", "dev", dev)
		for _, w := range want {
			if !strings.Contains(routes, w+" ") {
				t.Errorf("IPv6 routes on %s lack %s:\n%s", dev, w, routes)
			}
		}
	}

	st, err := a.b.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.V6 == nil || st.V6.Device != DeviceNameV6 || st.V6.ListenPort != 51821 || st.V6.PublicKey != st.PublicKey || len(st.V6.Peers) != 1 {
		t.Fatalf("status of %s: %+v, want one peer on %s, port 51821, our key", DeviceNameV6, st.V6, DeviceNameV6)
	}
	// The IPv6 of b, which has an IPv6 underlay, crossed xnet-wg-v6 (the only way to it there).
	if p := st.V6.Peers[0]; p.Endpoint != fmt.Sprintf("[%s]:51821", b.UnderlayIPv6) || !slices.Equal(p.Subnets, []netip.Prefix{b.lease.IPv6Subnet}) ||
		p.LastHandshake.IsZero() || p.RxBytes == 0 || p.TxBytes == 0 {
		t.Errorf("%s's peer %+v: want [%s]:51821 with AllowedIPs exactly %v, a handshake and bytes both ways", DeviceNameV6, p, b.UnderlayIPv6, b.lease.IPv6Subnet)
	}
	if p := peerOf(&st, b.lease.Subnet); p == nil || !slices.Equal(p.Subnets, []netip.Prefix{b.lease.Subnet}) || p.Endpoint != fmt.Sprintf("%s:51820", b.UnderlayIP) {
		t.Errorf("%s's peer for %s: %+v, want AllowedIPs exactly its IPv4 subnet at %s:51820", DeviceName, b.Name, p, b.UnderlayIP)
	}
	if p := peerOf(&st, c.lease.Subnet); p == nil || !slices.Equal(p.Subnets, []netip.Prefix{c.lease.Subnet, c.lease.IPv6Subnet}) {
		t.Errorf("%s's peer for %s (no IPv6 underlay): %+v, want AllowedIPs its IPv4 and IPv6 subnets", DeviceName, c.Name, p)
	}
	if mode, why := a.b.Mode(); mode != string(DatapathEmbedded) || !strings.Contains(why, DeviceNameV6) {
		t.Errorf("Mode() = %q, %q: want it to name %s", mode, why, DeviceNameV6)
	}

	t.Run("status read from outside the daemon shows both devices", func(t *testing.T) {
		var out Status
		err := a.Do(func() (err error) { out, err = ReadStatus(DatapathEmbedded, a.StateDir); return err })
		if err != nil || out.V6 == nil || len(out.V6.Peers) != 1 || out.V6.Peers[0].Endpoint != st.V6.Peers[0].Endpoint {
			t.Errorf("ReadStatus = %+v, %v: want %s with its peer", out, err, DeviceNameV6)
		}
	})

	t.Run("b's lease without its IPv6 underlay moves its IPv6 to xnet-wg", func(t *testing.T) {
		moved := b.lease
		moved.PublicIPv6, moved.BackendV6Data = netip.Addr{}, nil
		if err := a.Do(func() error { return a.b.AddPeer(moved) }); err != nil {
			t.Fatal(err)
		}
		st, err := a.b.Status()
		if err != nil {
			t.Fatal(err)
		}
		if len(st.V6.Peers) != 0 {
			t.Errorf("%s still holds %+v", DeviceNameV6, st.V6.Peers)
		}
		if p := peerOf(&st, b.lease.Subnet); p == nil || !slices.Equal(p.Subnets, []netip.Prefix{b.lease.Subnet, b.lease.IPv6Subnet}) {
			t.Errorf("%s's peer for %s: %+v, want both its subnets", DeviceName, b.Name, p)
		}
		if r := a.sh(t, "ip", "-6", "route", "show", b.lease.IPv6Subnet.String()); !strings.Contains(r, "dev "+DeviceName+" ") {
			t.Errorf("route to %v: %q, want it on %s", b.lease.IPv6Subnet, r, DeviceName)
		}
		if err := a.Do(func() error { return a.b.AddPeer(b.lease) }); err != nil {
			t.Fatal(err)
		}
		if r := a.sh(t, "ip", "-6", "route", "show", b.lease.IPv6Subnet.String()); !strings.Contains(r, "dev "+DeviceNameV6+" ") {
			t.Errorf("route to %v: %q, want it back on %s", b.lease.IPv6Subnet, r, DeviceNameV6)
		}
		wantIPv6Mesh(t, nodes[:2])
	})
}

// TestDualStackOneDeviceModes: flannel's auto, ipv4 and ipv6 modes run one device, xnet-wg,
// whose peers have both subnets as AllowedIPs; auto and ipv4 reach them at their PublicIP (auto
// would take the IPv6 underlay only for a private PublicIP with both IPv6 addresses public),
// ipv6 at their PublicIPv6.
func TestDualStackOneDeviceModes(t *testing.T) {
	for _, tc := range []struct {
		mode     string
		endpoint func(*testNode) string
	}{
		{ModeIPv4, func(n *testNode) string { return fmt.Sprintf("%s:51820", n.UnderlayIP) }},
		{ModeAuto, func(n *testNode) string { return fmt.Sprintf("%s:51820", n.UnderlayIP) }},
		{ModeIPv6, func(n *testNode) string { return fmt.Sprintf("[%s]:51820", n.UnderlayIPv6) }},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			cfg := dualConfig(t, `{"Type":"wireguard"}`)
			// subnetmgr.ParseConfig takes separate, auto and ipv4; the backend reads ipv6 too.
			cfg.Backend.WireGuard.Mode = tc.mode
			nodes := startDualNodes(t, cfg, true, true)
			a, b := nodes[0], nodes[1]
			wantIPv6Mesh(t, nodes)
			if out, _ := a.Run(t.Context(), "ip", "link", "show", DeviceNameV6); strings.Contains(out, DeviceNameV6) {
				t.Errorf("mode %s made %s", tc.mode, DeviceNameV6)
			}
			if data := string(a.lease.BackendV6Data); !strings.Contains(data, `"Port":51820`) {
				t.Errorf("BackendV6Data %s, want the one device's port 51820", data)
			}
			st, err := a.b.Status()
			if err != nil {
				t.Fatal(err)
			}
			if st.V6 != nil || len(st.Peers) != 1 {
				t.Fatalf("status %+v: want one peer on %s only", st, DeviceName)
			}
			p := st.Peers[0]
			if !slices.Equal(p.Subnets, []netip.Prefix{b.lease.Subnet, b.lease.IPv6Subnet}) || p.Endpoint != tc.endpoint(b) || p.RxBytes == 0 {
				t.Errorf("peer %+v: want AllowedIPs exactly %v and %v at %s, bytes received", p, b.lease.Subnet, b.lease.IPv6Subnet, tc.endpoint(b))
			}
			if addrs := a.sh(t, "ip", "-6", "addr", "show", DeviceName); !strings.Contains(addrs, "inet6 fd00:10:244:1::/128") {
				t.Errorf("%s's IPv6 addresses:\n%s", DeviceName, addrs)
			}
			routes := a.sh(t, "ip", "-6", "route", "show", "dev", DeviceName)
			for _, w := range []string{"fd00:10:244::/48 ", "fd00:10:244:2::/64 "} {
				if !strings.Contains(routes, w) {
					t.Errorf("IPv6 routes on %s lack %s:\n%s", DeviceName, w, routes)
				}
			}
			// Only IPv6 crossed so far: the counters of b's lease moved with it.
			cnt, err := a.b.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if len(cnt.Peers) != 1 || cnt.Peers[0].Subnet != b.lease.Subnet || cnt.Peers[0].TxPackets == 0 || cnt.Peers[0].RxPackets == 0 ||
				cnt.Verdicts["encap"] == 0 || cnt.Verdicts["decap"] == 0 {
				t.Errorf("counters %+v %v: want IPv6 packets both ways counted for %v", cnt.Peers, cnt.Verdicts, b.lease.Subnet)
			}
		})
	}
}
