package ipv6

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// An IPv6-only overlay (EnableIPv4 false) on three hosts, per backend that carries one: leases
// under flannel's 0.0.0.0-0&<ipv6>-<len> keys with flannel's value, subnet.env and the Docker
// options as flannel writes them there, `xnetd status` and the metrics naming each lease by its
// IPv6 subnet, nothing of an IPv4 overlay on the hosts, and containers reaching each other over
// IPv6 (ping, TCP both ways).
func TestIPv6OnlyThreeHosts(t *testing.T) {
	// ebpf+direct: DirectRouting, and the hosts share one IPv6 segment, so every peer is routed
	// plain via its PublicIPv6.
	for _, row := range []string{"ebpf", "ebpf+direct", "vxlan", "host-gw", "wireguard"} {
		backendName, direct := strings.CutSuffix(row, "+direct")
		t.Run(row, func(t *testing.T) {
			nodes, topo := xnetdtest.ClusterOn(t, harness.Options{Hosts: 3, IPv6Underlay: true},
				fmt.Sprintf(xnetdtest.IPv6OnlyConfig, backendName, direct), "--backend", backendName)
			subnets := checkIPv6OnlyLeases(t, topo, nodes, backendName)
			mtu := map[string]int{"ebpf": 1430, "vxlan": 1430, "host-gw": 1500, "wireguard": 1420}[backendName]
			for _, n := range nodes {
				checkIPv6OnlyFiles(t, n, subnets[n.UnderlayIPv6], mtu)
				checkIPv6OnlyStatus(t, n, subnets)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				links, _ := n.Run(ctx, "ip", "-br", "link", "show")
				routes, _ := n.Run(ctx, "ip", "-4", "route", "show", "table", "all")
				cancel()
				if strings.Contains(links, "xnet.1") || strings.Contains(routes, "10.244.") {
					t.Errorf("%s has IPv4 overlay state in an IPv6-only overlay:\n%s\n%s", n.Name, links, routes)
				}
				if backendName == "vxlan" && !strings.Contains(links, "xnet-v6.1") {
					t.Errorf("%s has no xnet-v6.1:\n%s", n.Name, links)
				}
				// flannel's separate mode (the default) with IPv4 off: only the IPv6 device.
				if backendName == "wireguard" && (!strings.Contains(links, "xnet-wg-v6") || strings.Contains(links, "xnet-wg ")) {
					t.Errorf("%s: want xnet-wg-v6 and no xnet-wg:\n%s", n.Name, links)
				}
				if backendName == "ebpf" && (!strings.Contains(links, "xnet6") || !strings.Contains(links, "xnet0")) {
					t.Errorf("%s has no xnet6 or xnet0:\n%s", n.Name, links)
				}
			}
			cs := xnetdtest.Containers(t, nodes)
			for _, c := range cs {
				if !c.IPv6.IsValid() {
					t.Fatalf("container on %s has no IPv6 address", c.Host.Name)
				}
			}
			if failed := xnetdtest.IPv6Mesh(cs); len(failed) > 0 {
				t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
			}
			harness.TransferIntact(t, cs[0], cs[1], cs[1].IPv6, 8<<20)
			harness.TransferIntact(t, cs[1], cs[0], cs[0].IPv6, 8<<20)
			harness.TransferIntact(t, cs[2], cs[0], cs[0].IPv6, 8<<20)
			if backendName == "ebpf" {
				// The fast path carried it: encapsulated into xnet6 at the veth, or with
				// DirectRouting sent plain, and nothing else.
				var st struct {
					Verdicts map[string]uint64 `json:"verdicts"`
				}
				nodes[0].StatusInto(t, &st)
				want, not := "encap", "direct_out"
				if direct {
					want, not = not, want
				}
				if st.Verdicts[want] == 0 || st.Verdicts[not] != 0 {
					t.Errorf("%s verdicts %v: want %s and no %s", nodes[0].Name, st.Verdicts, want, not)
				}
				checkIPv6OnlyPeerCounters(t, nodes, subnets)
			}
			// A restart takes the same lease back (from subnet.env and by PublicIPv6), adopts the
			// datapath and programs the same peers.
			r := nodes[0]
			before := r.State(t).Lease.Subnet
			if err := r.Proc.Stop(); err != nil {
				t.Fatal(err)
			}
			r.StartDaemon(t)
			r.WaitReady(t)
			r.WaitPeers(t, len(nodes)-1)
			if after := r.State(t).Lease.Subnet; after != before || !after.Addr().Is6() {
				t.Errorf("%s restarted with lease %v, had %v", r.Name, after, before)
			}
			if failed := xnetdtest.IPv6Mesh(cs); len(failed) > 0 {
				t.Errorf("after a restart of %s, pings failed:\n%s", r.Name, strings.Join(failed, "\n"))
			}
			harness.TransferIntact(t, cs[0], cs[2], cs[2].IPv6, 8<<20)
			t.Run("xnetd check passes on the healthy cluster and names each fault injected", func(t *testing.T) {
				checkIPv6OnlyFaults(t, nodes, backendName)
			})

			n := nodes[2]
			if err := n.Proc.Stop(); err != nil {
				t.Fatal(err)
			}
			n.Teardown(t, topo)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			routes, _ := n.Run(ctx, "ip", "-6", "route", "show", "root", "fd00:10:244::/56")
			for _, r := range strings.Split(strings.TrimSpace(routes), "\n") {
				if r != "" && !strings.Contains(r, "dev docker0 proto kernel") {
					t.Errorf("%s: IPv6 route into the overlay left after teardown: %s", n.Name, r)
				}
			}
			if links, _ := n.Run(ctx, "ip", "-br", "link", "show"); strings.Contains(links, "xnet") {
				t.Errorf("%s: xnet devices left after teardown:\n%s", n.Name, links)
			}
		})
	}
}

// checkIPv6OnlyLeases: one key per host, flannel's IPv6-only key and value (no BackendData,
// BackendV6Data for vxlan, ebpf and wireguard only), distinct IPv6 subnets; returns each host's
// subnet by its PublicIPv6.
func checkIPv6OnlyLeases(t *testing.T, topo *harness.Topology, nodes []*xnetdtest.Node, backendName string) map[netip.Addr]netip.Prefix {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := topo.EtcdClient().Get(ctx, subnetmgr.SubnetsPrefix(xnetdtest.EtcdPrefix), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	// ebpf hosts are VXLAN nodes on the wire, and publish themselves as flannel's vxlan does.
	published := backendName
	if backendName == "ebpf" {
		published = "vxlan"
	}
	byHost := map[netip.Addr]netip.Prefix{}
	for _, kv := range resp.Kvs {
		v4, v6, err := subnetmgr.ParseDualSubnetKey(xnetdtest.EtcdPrefix, string(kv.Key))
		if err != nil || v4.IsValid() || !v6.IsValid() || !strings.HasPrefix(string(kv.Key), subnetmgr.SubnetsPrefix(xnetdtest.EtcdPrefix)+"0.0.0.0-0&fd00:10:244:") {
			t.Errorf("key %s: want flannel's IPv6-only key 0.0.0.0-0&<ipv6>-64 (%v %v %v)", kv.Key, v4, v6, err)
			continue
		}
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		v := string(kv.Value)
		if err != nil || !strings.HasPrefix(v, `{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::`) ||
			!strings.Contains(v, `"BackendType":"`+published+`"`) || strings.Contains(v, `"BackendData"`) ||
			strings.Contains(v, `"BackendV6Data"`) != (published == "vxlan" || published == "wireguard") {
			t.Errorf("key %s = %s (%v): want flannel's IPv6-only value", kv.Key, kv.Value, err)
			continue
		}
		if _, dup := byHost[attrs.PublicIPv6]; dup || slices.Contains(mapsValues(byHost), v6) {
			t.Errorf("key %s: a host or IPv6 subnet twice", kv.Key)
		}
		byHost[attrs.PublicIPv6] = v6
	}
	for _, n := range nodes {
		if !byHost[n.UnderlayIPv6].IsValid() {
			t.Errorf("no lease for %s (PublicIPv6 %v) in %v", n.Name, n.UnderlayIPv6, byHost)
		}
	}
	if len(byHost) != len(nodes) {
		t.Fatalf("%d leases, want %d", len(byHost), len(nodes))
	}
	return byHost
}

func mapsValues(m map[netip.Addr]netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// checkIPv6OnlyFiles: subnet.env exactly as flannel writes it in an IPv6-only network (after
// xnet's XNET_* twins), and Docker's options without --bip.
func checkIPv6OnlyFiles(t *testing.T, n *xnetdtest.Node, subnet netip.Prefix, mtu int) {
	t.Helper()
	env, err := os.ReadFile(n.SubnetFile())
	if err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	for _, p := range []string{"XNET_", "FLANNEL_"} {
		// IPMASQ false: the harness runs xnetd without --ip-masq.
		fmt.Fprintf(&want, "%sIPV6_NETWORK=fd00:10:244::/56\n%sIPV6_SUBNET=%s\n%sMTU=%d\n%sIPMASQ=false\n", p, p, subnetmgr.GatewayOf(subnet), p, mtu, p)
	}
	if string(env) != want.String() {
		t.Errorf("%s subnet.env:\n%s\nwant:\n%s", n.Name, env, want.String())
	}
	opts, err := os.ReadFile(n.DockerOptsFile())
	if wantOpts := fmt.Sprintf("DOCKER_NETWORK_OPTIONS=\" --ipv6 --fixed-cidr-v6=%s --mtu=%d\"\n", subnet, mtu); err != nil || string(opts) != wantOpts {
		t.Errorf("%s Docker options %q (%v), want %q", n.Name, opts, err, wantOpts)
	}
}

// checkIPv6OnlyStatus: `xnetd status` names our lease and every peer by its IPv6 subnet, all
// programmed; the lease metric's subnet label is ours.
func checkIPv6OnlyStatus(t *testing.T, n *xnetdtest.Node, subnets map[netip.Addr]netip.Prefix) {
	t.Helper()
	var st struct {
		Lease struct {
			Subnet     netip.Prefix `json:"subnet"`
			IPv6Subnet netip.Prefix `json:"ipv6_subnet"`
		} `json:"lease"`
		Peers []struct {
			Subnet  netip.Prefix `json:"subnet"`
			Refused string       `json:"refused"`
			Error   string       `json:"error"`
		} `json:"peers"`
	}
	n.StatusInto(t, &st)
	own := subnets[n.UnderlayIPv6]
	if st.Lease.Subnet != own || st.Lease.IPv6Subnet != own {
		t.Errorf("%s status: lease %v / %v, want %v", n.Name, st.Lease.Subnet, st.Lease.IPv6Subnet, own)
	}
	if len(st.Peers) != len(subnets)-1 {
		t.Errorf("%s status: %d peers, want %d", n.Name, len(st.Peers), len(subnets)-1)
	}
	for _, p := range st.Peers {
		if !slices.Contains(mapsValues(subnets), p.Subnet) || p.Subnet == own || p.Refused != "" || p.Error != "" {
			t.Errorf("%s status: peer %+v", n.Name, p)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	text, err := n.Run(ctx, n.Bin, "status", "--subnet-file", n.SubnetFile())
	if err != nil || !strings.Contains(text, own.String()) || !strings.Contains(text, n.UnderlayIPv6.String()) ||
		strings.Contains(text, "invalid") || strings.Contains(text, "0.0.0.0") {
		t.Errorf("%s `xnetd status`: %v\n%s", n.Name, err, text)
	}
	if code, body := n.HTTPGet(t, "/metrics"); code != 200 || !strings.Contains(body, `subnet="`+own.String()+`"`) {
		t.Errorf("%s /metrics (%d): no lease info with subnet=%q", n.Name, code, own)
	}
}

// checkIPv6OnlyPeerCounters: after 8 MB from the first host's container to the second's and
// 8 MB from each other host's container to the first's, the first host's `xnetd status` and
// metrics show per-peer counters by IPv6 subnet (the datapath keys them by PublicIPv6) that saw
// at least that much: sent to the second host, received from both.
func checkIPv6OnlyPeerCounters(t *testing.T, nodes []*xnetdtest.Node, subnets map[netip.Addr]netip.Prefix) {
	t.Helper()
	n := nodes[0]
	second, third := subnets[nodes[1].UnderlayIPv6].String(), subnets[nodes[2].UnderlayIPv6].String()
	const moved = 8 << 20
	c := n.StatusCounters(t)
	got := map[string][2]uint64{}
	for _, p := range c.Peers {
		if p.TxBytes != nil && p.RxBytes != nil {
			got[p.Subnet] = [2]uint64{*p.TxBytes, *p.RxBytes}
		}
	}
	if got[second][0] < moved || got[second][1] < moved || got[third][1] < moved {
		t.Errorf("%s status peer counters (tx, rx bytes) %v (%s): want >= %d sent to %s and received from %s and %s",
			n.Name, got, c.Counters, moved, second, second, third)
	}
	code, body := n.HTTPGet(t, "/metrics")
	if code != 200 {
		t.Fatalf("%s /metrics: HTTP %d", n.Name, code)
	}
	fams := xnetdtest.ParseMetrics(t, body)
	for _, m := range []struct{ peer, direction string }{{second, "tx"}, {second, "rx"}, {third, "rx"}} {
		if v, ok := xnetdtest.Metric(fams, "xnet_peer_bytes_total", map[string]string{"peer": m.peer, "direction": m.direction}); !ok || v < moved {
			t.Errorf("%s xnet_peer_bytes_total{peer=%s,direction=%s} = %v (present %v), want >= %d", n.Name, m.peer, m.direction, v, ok, moved)
		}
	}
}

// checkIPv6OnlyFaults: `xnetd check` exits 0 on every host of a healthy IPv6-only cluster; on
// one host, each fault injected (Docker's options, a peer's route, vxlan's neighbour,
// wireguard's IPv6Network route, an unreachable peer PublicIPv6, an ip6 firewall rule on the
// backend's port) fails the check naming the problem and its fix, and once it is undone the
// check passes again. A rule of the ip (IPv4) family is not reported: it sees no IPv6.
func checkIPv6OnlyFaults(t *testing.T, nodes []*xnetdtest.Node, backendName string) {
	for _, n := range nodes {
		if out, code := n.Check(t); code != 0 || !strings.Contains(out, "everything checked holds") {
			t.Errorf("xnetd check on the healthy %s: exit %d\n%s", n.Name, code, out)
		} else if backendName == "ebpf" && !strings.Contains(out, "5 programs attached") {
			// decap on eth0 and on xnet6, encap on xnet0 and the container's veth, deliver on
			// the bridge that holds our IPv6 gateway.
			t.Errorf("xnetd check on the healthy %s does not count the 5 programs of an IPv6-only host:\n%s", n.Name, out)
		}
	}
	a, b := nodes[0], nodes[1] // b breaks; a is its peer
	aSubnet := a.State(t).Lease.Subnet
	device := map[string]string{"vxlan": "xnet-v6.1", "wireguard": "xnet-wg-v6", "host-gw": "eth0"}[backendName]
	port := map[string]string{"vxlan": "8472", "wireguard": "51821", "ebpf": "8472"}[backendName]
	var route string
	if backendName != "ebpf" { // ebpf's routes are in its routes6 map, not the kernel's table
		route = strings.TrimSpace(b.Out(t, "ip", "-6", "route", "show", "exact", aSubnet.String()))
		if route == "" {
			t.Fatalf("%s has no route to %v", b.Name, aSubnet)
		}
	}
	opts, err := os.ReadFile(b.DockerOptsFile())
	if err != nil {
		t.Fatal(err)
	}
	type fault struct {
		name            string
		inject, restore func(t *testing.T)
		says            []string
	}
	faults := []fault{
		{"Docker's options name another IPv6 subnet",
			func(t *testing.T) {
				if err := os.WriteFile(b.DockerOptsFile(), []byte(`DOCKER_NETWORK_OPTIONS=" --ipv6 --fixed-cidr-v6=fd00:10:244:ff::/64 --mtu=1400"`+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			},
			func(t *testing.T) {
				if err := os.WriteFile(b.DockerOptsFile(), opts, 0o644); err != nil {
					t.Fatal(err)
				}
			},
			[]string{"FAIL  files", "--fixed-cidr-v6=fd00:10:244:ff::/64", "systemctl restart xnetd"}},
		{"a peer's PublicIPv6 unreachable on the underlay",
			func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "add", "unreachable", a.UnderlayIPv6.String()+"/128") },
			func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "del", "unreachable", a.UnderlayIPv6.String()+"/128") },
			[]string{"FAIL  underlay", "peers' PublicIPv6s: " + a.UnderlayIPv6.String(), "ip -6 route"}},
	}
	if backendName == "ebpf" {
		var restore func(*testing.T)
		faults = append(faults, fault{"the routes6 map's entry for a peer deleted",
			func(t *testing.T) { restore = dropRoute6(t, b, aSubnet) },
			func(t *testing.T) { restore(t) },
			[]string{"FAIL  routes", fmt.Sprintf("the BPF routes6 map lacks %v", aSubnet), "systemctl restart xnetd"}})
		var config6 maps.Config6
		faults = append(faults, fault{"the config6 map's entry cleared",
			func(t *testing.T) {
				m := openConfig6(t, b)
				defer m.Config6.Close()
				var ok bool
				var err error
				if config6, ok, err = m.GetConfig6(); err != nil || !ok {
					t.Fatalf("%s's config6 map: %v (present %v)", b.Name, err, ok)
				}
				if err := m.ClearConfig6(); err != nil {
					t.Fatal(err)
				}
			},
			func(t *testing.T) {
				m := openConfig6(t, b)
				defer m.Config6.Close()
				if err := m.SetConfig6(config6); err != nil {
					t.Fatal(err)
				}
			},
			[]string{"FAIL  bpf", "the config6 map holds no configuration", "systemctl restart xnetd"}})
	} else {
		faults = append(faults, fault{"the route to a peer's IPv6 subnet deleted",
			func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "del", aSubnet.String(), "dev", device) },
			func(t *testing.T) { b.Sh(t, append([]string{"ip", "-6", "route", "add"}, strings.Fields(route)...)...) },
			[]string{"FAIL  routes", fmt.Sprintf("lacks %v", aSubnet), "systemctl restart xnetd"}})
	}
	switch backendName {
	case "vxlan":
		neigh := strings.Fields(b.Out(t, "ip", "-6", "neigh", "show", aSubnet.Addr().String(), "dev", device))
		i := slices.Index(neigh, "lladdr")
		if i < 0 || i+1 >= len(neigh) {
			t.Fatalf("%s has no neighbour %v on %s: %q", b.Name, aSubnet.Addr(), device, neigh)
		}
		mac := neigh[i+1]
		faults = append(faults, fault{"vxlan's neighbour entry for a peer deleted",
			func(t *testing.T) { b.Sh(t, "ip", "-6", "neigh", "del", aSubnet.Addr().String(), "dev", device) },
			func(t *testing.T) {
				b.Sh(t, "ip", "-6", "neigh", "replace", aSubnet.Addr().String(), "lladdr", mac, "dev", device, "nud", "permanent")
			},
			[]string{"FAIL  routes", "no permanent neighbour " + aSubnet.Addr().String()}})
	case "wireguard":
		faults = append(faults, fault{"wireguard's IPv6Network route deleted",
			func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "del", "fd00:10:244::/56", "dev", device) },
			func(t *testing.T) { b.Sh(t, "ip", "-6", "route", "add", "fd00:10:244::/56", "dev", device) },
			[]string{"FAIL  device", "no route fd00:10:244::/56 dev " + device, "leaves unencrypted"}})
	}
	if port != "" {
		faults = append(faults, fault{"an ip6 firewall rule drops the backend's port (and an ip one, which sees no IPv6)",
			func(t *testing.T) {
				b.Sh(t, "nft", "add table ip6 v6fw")
				b.Sh(t, "nft", "add chain ip6 v6fw in { type filter hook input priority 0 ; }")
				b.Sh(t, "nft", "add rule ip6 v6fw in udp dport "+port+" drop")
				b.Sh(t, "nft", "add table ip v4fw")
				b.Sh(t, "nft", "add chain ip v4fw in { type filter hook input priority 0 ; }")
				b.Sh(t, "nft", "add rule ip v4fw in udp dport "+port+" drop")
			},
			func(t *testing.T) { b.Sh(t, "nft", "delete table ip6 v6fw"); b.Sh(t, "nft", "delete table ip v4fw") },
			[]string{"FAIL  firewall", "nftables table ip6 v6fw chain in (hook input) handle", "drops UDP " + port + " over IPv6", "nft delete rule ip6 v6fw in handle"}})
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			f.inject(t)
			out, code := b.Check(t)
			f.restore(t)
			if code != 1 {
				t.Errorf("xnetd check on %s: exit %d, want 1\n%s", b.Name, code, out)
			}
			for _, want := range f.says {
				if !strings.Contains(out, want) {
					t.Errorf("xnetd check on %s does not say %q:\n%s", b.Name, want, out)
				}
			}
			if strings.Contains(out, "v4fw") {
				t.Errorf("xnetd check names a rule of the ip family, which sees no IPv6:\n%s", out)
			}
			if out, code := b.Check(t); code != 0 {
				t.Errorf("xnetd check on %s after the fault was undone: exit %d\n%s", b.Name, code, out)
			}
		})
	}
}

// An IPv6-only overlay runs on a host whose underlay interface has no IPv4 address at all:
// xnetd finds the interface without --iface by its IPv6 default route, or as the one holding
// --public-ipv6, reaches etcd over IPv6, and its containers reach the others' over IPv6; `xnetd
// check` passes there.
func TestIPv6OnlyHostWithoutIPv4(t *testing.T) {
	for _, backendName := range []string{"ebpf", "vxlan", "wireguard"} {
		t.Run(backendName, func(t *testing.T) {
			topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true, IPv6Underlay: true})
			v6only := topo.Hosts()[2]
			if out, err := v6only.Run(t.Context(), "ip", "-4", "addr", "flush", "dev", "eth0"); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), fmt.Sprintf(xnetdtest.IPv6OnlyConfig, backendName, false))
			bin := harness.BuildXnetd(t)
			// No --iface (XnetdArgs' is overridden): the IPv6 default route's interface, or
			// the one holding --public-ipv6; etcd over IPv6 for every host alike.
			extra := func(h *harness.Host) []string {
				args := []string{"--iface=", "--etcd-endpoints", topo.EtcdEndpointV6(), "--backend", backendName}
				if h.Index == 1 {
					args = append(args, "--public-ipv6", h.UnderlayIPv6.String())
				}
				return args
			}
			var nodes []*xnetdtest.Node
			for _, h := range topo.Hosts() {
				n := &xnetdtest.Node{Host: h, Bin: bin, Extra: extra(h)}
				n.StartDaemon(t)
				n.WaitReady(t)
				nodes = append(nodes, n)
			}
			for _, n := range nodes {
				n.WaitPeers(t, len(nodes)-1)
			}
			if addrs := nodes[2].Out(t, "ip", "-4", "-br", "addr", "show", "dev", "eth0"); strings.TrimSpace(addrs) != "" && strings.Contains(addrs, ".") {
				t.Fatalf("%s's eth0 has IPv4 still: %s", nodes[2].Name, addrs)
			}
			for _, n := range nodes {
				var st struct {
					Iface    string     `json:"iface"`
					PublicIP netip.Addr `json:"public_ip"`
					Lease    struct {
						PublicIPv6 netip.Addr `json:"public_ipv6"`
					} `json:"lease"`
				}
				n.StatusInto(t, &st)
				if st.Iface != "eth0" || st.Lease.PublicIPv6 != n.UnderlayIPv6 {
					t.Errorf("%s: underlay %q with PublicIPv6 %v, want eth0 with %v", n.Name, st.Iface, st.Lease.PublicIPv6, n.UnderlayIPv6)
				}
				if n == nodes[2] && st.PublicIP.IsValid() {
					t.Errorf("%s has no IPv4 address, yet xnetd took PublicIP %v", n.Name, st.PublicIP)
				}
			}
			cs := xnetdtest.Containers(t, nodes)
			if failed := xnetdtest.IPv6Mesh(cs); len(failed) > 0 {
				t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
			}
			harness.TransferIntact(t, cs[0], cs[2], cs[2].IPv6, 8<<20)
			harness.TransferIntact(t, cs[2], cs[1], cs[1].IPv6, 8<<20)
			if out, code := nodes[2].Check(t); code != 0 {
				t.Errorf("xnetd check on %s (no IPv4): exit %d\n%s", nodes[2].Name, code, out)
			}
			if backendName != "vxlan" {
				return
			}
			// Macvlan ranges are IPv4 on the parent's segment: a host without IPv4 refuses
			// the section at start, exit 2, before it changes anything.
			const prefix = "/v6macvlan/network"
			xnetdtest.Put(t, topo, subnetmgr.ConfigKey(prefix), `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"},`+
				`"Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":29,"RangeMin":"198.18.0.8","RangeMax":"198.18.0.32"}}`)
			dir := t.TempDir()
			p, err := nodes[2].StartXnetd(bin, append(extra(nodes[2].Host), "--etcd-prefix", prefix, "--subnet-file", filepath.Join(dir, "subnet.env"),
				"--docker-opts-file", filepath.Join(dir, "docker"), "--macvlan-file", filepath.Join(dir, "macvlan"), "--macvlan")...)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(15 * time.Second):
				p.Kill()
				t.Fatalf("xnetd with a Macvlan section on a host without IPv4 did not exit:\n%s", p.Output())
			}
			var exit *exec.ExitError
			if err := p.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(p.Output(), "Macvlan section leases IPv4 ranges on eth0, which has no IPv4 address") {
				t.Errorf("xnetd with a Macvlan section on a host without IPv4: %v, want exit code 2 naming the Macvlan section\n%s", err, p.Output())
			}
		})
	}
}
