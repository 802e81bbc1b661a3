package e2e

// Trust: what a host does with leases in etcd that it must not believe. A peer lease is
// programmed only when its subnet lies strictly inside the Network, has exactly SubnetLen
// bits and overlaps neither our subnet nor another live lease; a PublicIP claimed by two
// leases is programmed for the one etcd created first; a host whose lease is rewritten with
// someone else's PublicIP writes it back within a second. Helpers are prefixed tr.

import (
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cilium "github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// trBad is a lease no host may program.
type trBad struct {
	what   string
	subnet netip.Prefix
	// reason is what host A (whose subnet is aSub) says; host B may say another one for the
	// lease inside A's subnet (for B it is just the wrong length).
	reason string
}

func trBadLeases(aSub, free netip.Prefix) []trBad {
	a := aSub.Addr().As4()
	f := free.Addr().As4()
	return []trBad{
		{"0.0.0.0-1, half the Internet", netip.MustParsePrefix("0.0.0.0/1"), "outside_network"},
		{"a /25 inside host A's subnet", netip.PrefixFrom(netip.AddrFrom4([4]byte{a[0], a[1], a[2], 128}), 25), "overlaps_own_subnet"},
		{"192.0.2.0-24, outside the Network", netip.MustParsePrefix("192.0.2.0/24"), "outside_network"},
		{"a /26 inside the Network", netip.PrefixFrom(netip.AddrFrom4([4]byte{f[0], f[1], f[2], 64}), 26), "wrong_length"},
	}
}

// trStatus is the part of `xnetd status --output json` about refused leases and conflicts.
type trStatus struct {
	Peers []struct {
		Subnet   netip.Prefix `json:"subnet"`
		PublicIP netip.Addr   `json:"public_ip"`
		Refused  string       `json:"refused"`
		Error    string       `json:"error"`
	} `json:"peers"`
	Conflicts []struct {
		Kind     string         `json:"kind"`
		PublicIP netip.Addr     `json:"public_ip"`
		Subnets  []netip.Prefix `json:"subnets"`
		Kept     netip.Prefix   `json:"kept"`
	} `json:"conflicts"`
}

func trStatusOf(t *testing.T, n *xnetdtest.Node) trStatus {
	t.Helper()
	var s trStatus
	n.StatusInto(t, &s)
	return s
}

// trRoutes is every destination the host's datapath sends somewhere: the main routing table
// and, with ebpf, the BPF routes map.
func trRoutes(t *testing.T, n *xnetdtest.Node, ebpf bool) map[netip.Prefix]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := n.Run(ctx, "ip", "-4", "-o", "route", "show", "table", "main")
	if err != nil {
		t.Fatalf("%s: ip route: %v", n.Name, err)
	}
	routes := map[netip.Prefix]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		dst := f[0]
		switch {
		case dst == "default":
			dst = "0.0.0.0/0"
		case !strings.Contains(dst, "/"):
			dst += "/32"
		}
		if p, err := netip.ParsePrefix(dst); err == nil {
			routes[p] = "kernel: " + line
		}
	}
	if ebpf {
		d, err := rlReadDatapath(n.BPFFS)
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		for s, ip := range d.routes {
			routes[s] = "bpf routes map: via " + ip.String()
		}
	}
	return routes
}

// trWaitKnown waits until every host lists every lease in subnets among its peers: it has
// seen them, so what its datapath holds is its decision.
func trWaitKnown(t *testing.T, nodes []*xnetdtest.Node, subnets []netip.Prefix) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, n := range nodes {
		for {
			known := map[netip.Prefix]bool{}
			for _, p := range trStatusOf(t, n).Peers {
				known[p.Subnet] = true
			}
			var missing []netip.Prefix
			for _, s := range subnets {
				if !known[s] {
					missing = append(missing, s)
				}
			}
			if len(missing) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not list %v among its peers after 5 s", n.Name, missing)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func trMetric(t *testing.T, n *xnetdtest.Node, name string, labels map[string]string) float64 {
	t.Helper()
	_, body := n.HTTPGet(t, "/metrics")
	v, _ := xnetdtest.Metric(xnetdtest.ParseMetrics(t, body), name, labels)
	return v
}

// Leases a host must not believe (0.0.0.0-1, a /25 inside another host's /24, a subnet
// outside the Network, a /26) reach no host's datapath on any backend; each host says why in
// `xnetd status` and counts them; a restarted host removes what an older build programmed for
// them; containers keep reaching each other throughout.
func TestTrustBadLeasesReachNoDatapath(t *testing.T) {
	for _, tc := range []struct{ backend, config string }{
		{"ebpf", `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`},
		{"vxlan", `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`},
		{"udp", `{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}`},
		{"host-gw", `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`},
	} {
		t.Run(tc.backend, func(t *testing.T) { trBadLeasesOn(t, tc.backend, tc.config) })
	}
}

func trBadLeasesOn(t *testing.T, backendName, config string) {
	nodes, topo := xnetdtest.Cluster(t, 2, config, "--backend="+backendName)
	a, b := nodes[0], nodes[1]
	ebpf := backendName == "ebpf"
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other before any bad lease:\n%s", strings.Join(failed, "\n"))
	}
	cli := topo.EtcdClient()
	aSub := a.State(t).Lease.Subnet
	bad := trBadLeases(aSub, rlFreeSubnets(t, topo, 1)[0])
	var subnets []netip.Prefix
	for _, l := range bad {
		// Pointing at host B, as an attacker who controls B would write them.
		rlPutPeer(t, cli, l.subnet, b.UnderlayIP, time.Hour)
		subnets = append(subnets, l.subnet)
	}
	// Host A lists them whether it programs them or not (B, whose PublicIP they carry, may
	// only list them once it says why it refuses them).
	trWaitKnown(t, nodes[:1], subnets)

	for _, n := range nodes {
		routes := trRoutes(t, n, ebpf)
		for _, l := range bad {
			if r, ok := routes[l.subnet]; ok {
				t.Errorf("%s programmed the lease %v (%s): %s", n.Name, l.subnet, l.what, r)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	t.Run("status and metrics say why each lease is refused", func(t *testing.T) {
		trWaitKnown(t, nodes, subnets)
		for _, n := range nodes {
			byReason := map[string]int{}
			for _, p := range trStatusOf(t, n).Peers {
				for _, l := range bad {
					if p.Subnet != l.subnet {
						continue
					}
					if p.Refused == "" || p.Error == "" {
						t.Errorf("%s: status shows %v with refused %q, error %q: want a reason and an explanation", n.Name, l.subnet, p.Refused, p.Error)
					}
					if n == a && p.Refused != l.reason {
						t.Errorf("%s: %v (%s) refused as %q, want %q", n.Name, l.subnet, l.what, p.Refused, l.reason)
					}
					byReason[p.Refused]++
				}
			}
			for reason, count := range byReason {
				if got := trMetric(t, n, "xnet_leases_refused_total", map[string]string{"reason": reason}); int(got) != count {
					t.Errorf("%s: xnet_leases_refused_total{reason=%q} = %v, want %d", n.Name, reason, got, count)
				}
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		text, err := a.Run(ctx, a.Bin, "status", "--subnet-file", a.SubnetFile())
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(text, "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "0.0.0.0/1 ") && !strings.Contains(line, "outside_network") {
				t.Errorf("xnetd status: the PROBLEM of 0.0.0.0/1 does not say outside_network:\n%s", line)
			}
		}
		if !strings.Contains(text, "0.0.0.0/1 ") {
			t.Errorf("xnetd status does not list 0.0.0.0/1:\n%s", text)
		}
		// Logged once each, not again on every later change of the lease set.
		for _, l := range bad {
			if n := strings.Count(a.Proc.Output(), "subnet="+l.subnet.String()+" "); n != 1 {
				t.Errorf("%s logged %v %d times, want once:\n%s", a.Name, l.subnet, n, a.Proc.Output())
			}
		}
	})

	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Errorf("containers do not reach each other with the bad leases in etcd:\n%s", strings.Join(failed, "\n"))
	}

	t.Run("a restart removes what an older build programmed for them", func(t *testing.T) {
		if err := a.Proc.Kill(); err != nil {
			t.Fatal(err)
		}
		planted := trPlantOldBuild(t, a, b, aSub, backendName)
		before := trRoutes(t, a, ebpf)
		for _, s := range planted {
			if _, ok := before[s]; !ok {
				t.Fatalf("planting %v on %s did not work: the test would prove nothing", s, a.Name)
			}
		}
		a.StartDaemon(t)
		a.WaitReady(t)
		after := trRoutes(t, a, ebpf)
		for _, s := range planted {
			if r, ok := after[s]; ok {
				t.Errorf("%s still holds %v after the restart: %s", a.Name, s, r)
			}
		}
		if _, ok := after[b.State(t).Lease.Subnet]; !ok {
			t.Errorf("%s lost the route to host B's subnet in the restart", a.Name)
		}
		if backendName == "vxlan" {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			neighs, _ := a.Run(ctx, "ip", "neigh", "show", "dev", "xnet.1")
			for _, s := range planted {
				if strings.Contains(neighs, s.Addr().String()+" lladdr") {
					t.Errorf("%s still has the neighbour entry of %v on xnet.1:\n%s", a.Name, s, neighs)
				}
			}
		}
		if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
			t.Errorf("containers do not reach each other after the restart:\n%s", strings.Join(failed, "\n"))
		}
	})
}

// trPlantOldBuild writes into a's datapath (its xnetd stopped) what a build without the trust
// rule programmed for bad leases pointing at host b, and returns their subnets.
func trPlantOldBuild(t *testing.T, a, b *xnetdtest.Node, aSub netip.Prefix, backendName string) []netip.Prefix {
	t.Helper()
	s := aSub.Addr().As4()
	inside := netip.PrefixFrom(netip.AddrFrom4([4]byte{s[0], s[1], s[2], 128}), 25)
	outside := netip.MustParsePrefix("192.0.2.0/24")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	run := func(args ...string) {
		if out, err := a.Run(ctx, args[0], args[1:]...); err != nil {
			t.Fatalf("%s: %s: %v\n%s", a.Name, strings.Join(args, " "), err, out)
		}
	}
	mac := backend.VtepMAC(b.UnderlayIP)
	switch backendName {
	case "ebpf":
		planted := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), inside, outside}
		// Writable, as the older xnetd had it (OpenPinned is read-only, for status).
		routes, err := cilium.LoadPinnedMap(filepath.Join(a.BPFFS, maps.RoutesName), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer routes.Close()
		m := &maps.Maps{Routes: routes}
		for _, p := range planted {
			if err := m.PutRoute(maps.Route{Subnet: p, PublicIP: b.UnderlayIP, VtepMAC: mac}); err != nil {
				t.Fatal(err)
			}
		}
		return planted
	case "vxlan":
		// As the vxlan backend programs a peer: neighbour, then route via the subnet address
		// onlink. The kernel refuses 0.0.0.0 as a gateway, so the /1 is the other half.
		planted := []netip.Prefix{netip.MustParsePrefix("128.0.0.0/1"), inside, outside}
		for _, p := range planted {
			run("ip", "neigh", "replace", p.Addr().String(), "lladdr", mac.String(), "dev", "xnet.1", "nud", "permanent")
			run("ip", "route", "replace", p.String(), "via", p.Addr().String(), "dev", "xnet.1", "onlink")
		}
		return planted
	case "udp":
		planted := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), inside, outside}
		for _, p := range planted {
			run("ip", "route", "replace", p.String(), "dev", "xnet0", "scope", "link")
		}
		return planted
	case "host-gw":
		planted := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), inside, outside}
		for _, p := range planted {
			run("ip", "route", "replace", p.String(), "via", b.UnderlayIP.String(), "dev", "eth0")
		}
		return planted
	}
	t.Fatalf("no old-build state for backend %s", backendName)
	return nil
}

// trLeaseValue is what host h's xnetd publishes, as the vxlan-speaking backends write it.
func trLeaseValue(t *testing.T, ip netip.Addr) string {
	t.Helper()
	data, err := backend.VXLANLeaseData(1, ip)
	if err != nil {
		t.Fatal(err)
	}
	v, err := subnetmgr.EncodeLeaseValue(subnetmgr.LeaseAttrs{PublicIP: ip, BackendType: subnetmgr.BackendVXLAN, BackendData: data})
	if err != nil {
		t.Fatal(err)
	}
	return string(v)
}

// trVia is the PublicIP host n's kernel VXLAN device sends subnet to: the one its VTEP MAC
// (the neighbour entry of the subnet's address) is derived from. ok is false without a route.
func trVia(t *testing.T, n *xnetdtest.Node, subnet netip.Prefix) (netip.Addr, bool) {
	t.Helper()
	if _, ok := trRoutes(t, n, false)[subnet]; !ok {
		return netip.Addr{}, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := n.Run(ctx, "ip", "neigh", "show", subnet.Addr().String(), "dev", "xnet.1")
	if err != nil {
		t.Fatalf("%s: ip neigh: %v", n.Name, err)
	}
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] != "lladdr" {
			continue
		}
		if mac, err := net.ParseMAC(f[i+1]); err == nil && len(mac) == 6 {
			return netip.AddrFrom4([4]byte{mac[2], mac[3], mac[4], mac[5]}), true
		}
	}
	return netip.Addr{}, false
}

// trWaitVia waits until every host but the owner sends subnet to ip.
func trWaitVia(t *testing.T, nodes []*xnetdtest.Node, subnet netip.Prefix, ip netip.Addr, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, n := range nodes {
		if n.UnderlayIP == ip {
			continue
		}
		for {
			got, ok := trVia(t, n, subnet)
			if ok && got == ip {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s sends %v to %v (routed %v), want %v", n.Name, subnet, got, ok, ip)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Two leases claiming one PublicIP: every host programs only the one etcd created first,
// says so at Error level, in `xnetd status` and in a metric, within a second. A host whose own
// lease is rewritten with another host's PublicIP (a plain `etcdctl put`) writes it back
// within a second, and every host ends up sending to both honest hosts again. (The control
// plane is the same for every backend; the kernel VXLAN device shows where each subnet goes.)
func TestTrustTwoLeasesClaimingOnePublicIP(t *testing.T) {
	nodes, topo := xnetdtest.Cluster(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`, "--backend=vxlan")
	a, b, c := nodes[0], nodes[1], nodes[2]
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other at the start:\n%s", strings.Join(failed, "\n"))
	}
	cli := topo.EtcdClient()
	bSub := b.State(t).Lease.Subnet

	t.Run("a newer lease with host B's PublicIP is refused everywhere", func(t *testing.T) {
		dup := rlFreeSubnets(t, topo, 1)[0]
		written := time.Now()
		rlPutPeer(t, cli, dup, b.UnderlayIP, time.Hour)
		trWaitKnown(t, []*xnetdtest.Node{a, c}, []netip.Prefix{dup})
		for _, n := range []*xnetdtest.Node{a, c} {
			if _, ok := trRoutes(t, n, false)[dup]; ok {
				t.Errorf("%s programmed the newer lease %v with host B's PublicIP", n.Name, dup)
			}
			if via, ok := trVia(t, n, bSub); !ok || via != b.UnderlayIP {
				t.Errorf("%s sends host B's own subnet %v to %v (routed %v), want %v", n.Name, bSub, via, ok, b.UnderlayIP)
			}
		}
		for _, n := range []*xnetdtest.Node{a, c} {
			deadline := written.Add(time.Second)
			for {
				var found bool
				for _, cf := range trStatusOf(t, n).Conflicts {
					found = found || cf.Kind == "duplicate_public_ip" && cf.PublicIP == b.UnderlayIP && cf.Kept == bSub
				}
				if found {
					t.Logf("%s shows the conflict %v after the write", n.Name, time.Since(written).Round(time.Millisecond))
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: no duplicate_public_ip conflict for %v keeping %v in status 1 s after the write: %+v", n.Name, b.UnderlayIP, bSub, trStatusOf(t, n))
				}
				time.Sleep(50 * time.Millisecond)
			}
			if got := trMetric(t, n, "xnet_lease_conflicts", map[string]string{"kind": "duplicate_public_ip"}); got != 1 {
				t.Errorf("%s: xnet_lease_conflicts{kind=duplicate_public_ip} = %v, want 1", n.Name, got)
			}
			if !trLogged(n, "level=ERROR", bSub.String(), dup.String(), b.UnderlayIP.String()) {
				t.Errorf("%s logged no Error naming both claimants of %v:\n%s", n.Name, b.UnderlayIP, n.Proc.Output())
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := cli.Delete(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, dup)); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for trMetric(t, a, "xnet_lease_conflicts", map[string]string{"kind": "duplicate_public_ip"}) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%s still counts a conflict 2 s after the newer lease was deleted", a.Name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("host A's lease rewritten with host B's PublicIP is written back within a second", func(t *testing.T) {
		aSub := a.State(t).Lease.Subnet
		key := subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, aSub)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		written := time.Now()
		if _, err := cli.Put(ctx, key, trLeaseValue(t, b.UnderlayIP)); err != nil {
			t.Fatal(err)
		}
		for {
			resp, err := cli.Get(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if len(resp.Kvs) == 1 {
				if attrs, err := subnetmgr.DecodeLeaseValue(resp.Kvs[0].Value); err == nil && attrs.PublicIP == a.UnderlayIP {
					t.Logf("%s wrote its lease back %v after the rewrite", a.Name, time.Since(written).Round(time.Millisecond))
					if resp.Kvs[0].Lease == 0 {
						t.Errorf("the lease written back has no TTL")
					}
					break
				}
			}
			if time.Since(written) > time.Second {
				t.Fatalf("%s did not write its lease back within 1 s of the rewrite:\n%s", a.Name, a.Proc.Output())
			}
			time.Sleep(10 * time.Millisecond)
		}
		trWaitVia(t, nodes, aSub, a.UnderlayIP, 2*time.Second)
		trWaitVia(t, nodes, bSub, b.UnderlayIP, 2*time.Second)
		if !trLogged(a, "level=ERROR", aSub.String(), a.UnderlayIP.String(), b.UnderlayIP.String()) {
			t.Errorf("%s logged no Error naming both claimants of its subnet:\n%s", a.Name, a.Proc.Output())
		}
		if got := trMetric(t, a, "xnet_lease_conflicts_total", map[string]string{"kind": "own_subnet_rewritten"}); got < 1 {
			t.Errorf("%s: xnet_lease_conflicts_total{kind=own_subnet_rewritten} = %v, want at least 1", a.Name, got)
		}
		if a.Proc.Exited() {
			t.Fatalf("%s exited: %v\n%s", a.Name, a.Proc.Wait(), a.Proc.Output())
		}
		if got := a.State(t).Lease.Subnet; got != aSub {
			t.Errorf("%s moved to %v; it must keep %v", a.Name, got, aSub)
		}
	})

	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Errorf("containers do not reach each other after the conflicts:\n%s", strings.Join(failed, "\n"))
	}
}

// trLogged reports whether one line of n's log holds every one of words.
func trLogged(n *xnetdtest.Node, words ...string) bool {
	for line := range strings.SplitSeq(n.Proc.Output(), "\n") {
		all := true
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			return true
		}
	}
	return false
}
