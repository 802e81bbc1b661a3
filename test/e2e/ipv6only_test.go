package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

const ipv6OnlyConfig = `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"%s","DirectRouting":%v}}`

// An IPv6-only overlay (EnableIPv4 false) on three hosts, per backend that carries one: leases
// under flannel's 0.0.0.0-0&<ipv6>-<len> keys with flannel's value, subnet.env and the Docker
// options as flannel writes them there, `xnetd status` and the metrics naming each lease by its
// IPv6 subnet, nothing of an IPv4 overlay on the hosts, and containers reaching each other over
// IPv6 (ping, TCP both ways).
func TestIPv6OnlyThreeHosts(t *testing.T) {
	// ebpf+direct: DirectRouting, and the hosts share one IPv6 segment, so every peer is routed
	// plain via its PublicIPv6.
	for _, row := range []string{"ebpf", "ebpf+direct", "vxlan", "host-gw"} {
		backendName, direct := strings.CutSuffix(row, "+direct")
		t.Run(row, func(t *testing.T) {
			nodes, topo := xdClusterOn(t, harness.Options{Hosts: 3, IPv6Underlay: true},
				fmt.Sprintf(ipv6OnlyConfig, backendName, direct), "--backend", backendName)
			subnets := checkIPv6OnlyLeases(t, topo, nodes, backendName)
			mtu := map[string]int{"ebpf": 1430, "vxlan": 1430, "host-gw": 1500}[backendName]
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
				if backendName == "ebpf" && (!strings.Contains(links, "xnet6") || !strings.Contains(links, "xnet0")) {
					t.Errorf("%s has no xnet6 or xnet0:\n%s", n.Name, links)
				}
			}
			cs := xdContainers(t, nodes)
			for _, c := range cs {
				if !c.IPv6.IsValid() {
					t.Fatalf("container on %s has no IPv6 address", c.Host.Name)
				}
			}
			if failed := ipv6Mesh(cs); len(failed) > 0 {
				t.Fatalf("pings failed:\n%s", strings.Join(failed, "\n"))
			}
			transferTo(t, cs[0], cs[1], cs[1].IPv6, 8<<20)
			transferTo(t, cs[1], cs[0], cs[0].IPv6, 8<<20)
			transferTo(t, cs[2], cs[0], cs[0].IPv6, 8<<20)
			if backendName == "ebpf" {
				// The fast path carried it: encapsulated into xnet6 at the veth, or with
				// DirectRouting sent plain, and nothing else.
				var st struct {
					Verdicts map[string]uint64 `json:"verdicts"`
				}
				nodes[0].statusInto(t, &st)
				want, not := "encap", "direct_out"
				if direct {
					want, not = not, want
				}
				if st.Verdicts[want] == 0 || st.Verdicts[not] != 0 {
					t.Errorf("%s verdicts %v: want %s and no %s", nodes[0].Name, st.Verdicts, want, not)
				}
			}
			// A restart takes the same lease back (from subnet.env and by PublicIPv6), adopts the
			// datapath and programs the same peers.
			r := nodes[0]
			before := r.state(t).Lease.Subnet
			if err := r.proc.Stop(); err != nil {
				t.Fatal(err)
			}
			r.start(t)
			r.waitReady(t)
			r.waitPeers(t, len(nodes)-1)
			if after := r.state(t).Lease.Subnet; after != before || !after.Addr().Is6() {
				t.Errorf("%s restarted with lease %v, had %v", r.Name, after, before)
			}
			if failed := ipv6Mesh(cs); len(failed) > 0 {
				t.Errorf("after a restart of %s, pings failed:\n%s", r.Name, strings.Join(failed, "\n"))
			}
			transferTo(t, cs[0], cs[2], cs[2].IPv6, 8<<20)
			// Its checks are IPv4's: it says so rather than report problems that are not there.
			if out, code := nodes[0].check(t); code != 2 || !strings.Contains(out, "IPv6-only") || !strings.Contains(out, "EnableIPv4 false") {
				t.Errorf("xnetd check on an IPv6-only overlay: exit %d, want 2 naming EnableIPv4:\n%s", code, out)
			}

			n := nodes[2]
			if err := n.proc.Stop(); err != nil {
				t.Fatal(err)
			}
			n.teardown(t, topo)
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
// BackendV6Data for vxlan and ebpf only), distinct IPv6 subnets; returns each host's subnet by its
// PublicIPv6.
func checkIPv6OnlyLeases(t *testing.T, topo *harness.Topology, nodes []*xdNode, backendName string) map[netip.Addr]netip.Prefix {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := topo.EtcdClient().Get(ctx, subnetmgr.SubnetsPrefix(xdPrefix), clientv3.WithPrefix())
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
		v4, v6, err := subnetmgr.ParseDualSubnetKey(xdPrefix, string(kv.Key))
		if err != nil || v4.IsValid() || !v6.IsValid() || !strings.HasPrefix(string(kv.Key), subnetmgr.SubnetsPrefix(xdPrefix)+"0.0.0.0-0&fd00:10:244:") {
			t.Errorf("key %s: want flannel's IPv6-only key 0.0.0.0-0&<ipv6>-64 (%v %v %v)", kv.Key, v4, v6, err)
			continue
		}
		attrs, err := subnetmgr.DecodeLeaseValue(kv.Value)
		v := string(kv.Value)
		if err != nil || !strings.HasPrefix(v, `{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::`) ||
			!strings.Contains(v, `"BackendType":"`+published+`"`) || strings.Contains(v, `"BackendData"`) ||
			strings.Contains(v, `"BackendV6Data"`) != (published == "vxlan") {
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
func checkIPv6OnlyFiles(t *testing.T, n *xdNode, subnet netip.Prefix, mtu int) {
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
func checkIPv6OnlyStatus(t *testing.T, n *xdNode, subnets map[netip.Addr]netip.Prefix) {
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
	n.statusInto(t, &st)
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
	text, err := n.Run(ctx, n.bin, "status", "--subnet-file", n.SubnetFile())
	if err != nil || !strings.Contains(text, own.String()) || !strings.Contains(text, n.UnderlayIPv6.String()) ||
		strings.Contains(text, "invalid") || strings.Contains(text, "0.0.0.0") {
		t.Errorf("%s `xnetd status`: %v\n%s", n.Name, err, text)
	}
	if code, body := n.httpGet(t, "/metrics"); code != 200 || !strings.Contains(body, `subnet="`+own.String()+`"`) {
		t.Errorf("%s /metrics (%d): no lease info with subnet=%q", n.Name, code, own)
	}
}

// ipv6Mesh pings every container from every other one over IPv6, in parallel, after one
// unchecked echo per pair for neighbour discovery (see dualMesh); it returns what failed.
func ipv6Mesh(cs []*harness.Container) []string {
	var warm sync.WaitGroup
	for _, a := range cs {
		for _, b := range cs {
			if a != b {
				warm.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					defer cancel()
					_, _, _ = harness.Ping(ctx, a.Namespace, b.IPv6, 1, 0)
				})
			}
		}
	}
	warm.Wait()
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, a := range cs {
		for _, b := range cs {
			if a == b {
				continue
			}
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				sent, got, err := harness.Ping(ctx, a.Namespace, b.IPv6, 3, 50*time.Millisecond)
				if err != nil || got != sent {
					mu.Lock()
					failed = append(failed, fmt.Sprintf("%s -> %s(%v): %d/%d replies %v", a.Host.Name, b.Host.Name, b.IPv6, got, sent, err))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	slices.Sort(failed)
	return failed
}

// TestDockerIPv6OnlyEBPF: real Docker on two ebpf hosts of an IPv6-only overlay, dockerd started
// from the options xnetd wrote (--ipv6 --fixed-cidr-v6, and Docker's default IPv4 bridge, which
// is not the overlay's). The backend finds docker0 by its IPv6 gateway in our lease, and busybox
// containers reach each other over IPv6 through the fast path.
func TestDockerIPv6OnlyEBPF(t *testing.T) {
	if why := harness.DockerMissing(); why != "" {
		t.Skip(why)
	}
	nodes, _ := xdClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: true}, fmt.Sprintf(ipv6OnlyConfig, "ebpf", false), "--backend=ebpf")
	dockers := harness.StartDockerForTest(t, nodes[0].Host, nodes[1].Host)
	a, b := dkRun(t, dkHost{nodes[0], dockers[0]}, "a1"), dkRun(t, dkHost{nodes[1], dockers[1]}, "b1")
	a6, b6 := dkIPv6(t, a), dkIPv6(t, b)
	t.Logf("a1 %v (%v) on %s, b1 %v (%v) on %s", a6, a.IP, nodes[0].Name, b6, b.IP, nodes[1].Name)
	for _, p := range []struct {
		from *harness.DockerContainer
		to   netip.Addr
	}{{a, b6}, {b, a6}} {
		if got, out := dkPing(t, p.from, p.to); got != 3 {
			t.Errorf("docker exec %s ping %v: %d of 3 replies\n%s", p.from.Name, p.to, got, out)
		}
	}
	var st struct {
		Verdicts map[string]uint64 `json:"verdicts"`
	}
	nodes[0].statusInto(t, &st)
	if st.Verdicts["encap"] == 0 || st.Verdicts["decap"] == 0 {
		t.Errorf("%s verdicts %v: want the containers' IPv6 encapsulated and decapsulated by the programs", nodes[0].Name, st.Verdicts)
	}
}

// dkIPv6 is the global IPv6 address Docker gave the container (from --fixed-cidr-v6), once
// none of eth0's addresses is tentative. Docker adds the global one without DAD, but until the
// link-local one has passed it the container sends no MLD report, so docker0 (which snoops
// multicast) forwards it no neighbour solicitation for its address: the first packets to it
// are lost, whatever the network.
func dkIPv6(t *testing.T, c *harness.DockerContainer) netip.Addr {
	t.Helper()
	global := regexp.MustCompile(`inet6 ([0-9a-f:]+)/\d+ scope global`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := c.Exec(dkCtx(t, 10*time.Second), "ip", "-6", "addr", "show", "dev", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if m := global.FindStringSubmatch(out); m != nil && !strings.Contains(out, "tentative") {
			return netip.MustParseAddr(m[1])
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has no usable global IPv6 address after 10s:\n%s", c.Name, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
