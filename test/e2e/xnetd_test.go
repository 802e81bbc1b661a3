// Package e2e holds the end-to-end tests of the xnetd binary and every backend on simulated
// hosts: the daemon's life (start, restart, kill -9, teardown, status, check, metrics), the
// datapaths, etcd faults, trust and security, peer health. IPv6 overlays are in test/e2e/ipv6,
// the tests with Docker in test/e2e/docker; the three packages run side by side under go test
// and share test/e2e/xnetdtest.
package e2e

// End to end tests of the xnetd binary as an operator runs it: hosts in network namespaces, a
// real etcd, real datapaths. The daemon on each host is an xnetdtest.Node, shared with the
// IPv6 and Docker end-to-end packages.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestXnetdOnThreeHostsConnectsTheirContainers(t *testing.T) {
	// The config names host-gw; xnetd takes it from etcd with no --backend.
	nodes, topo := xnetdtest.Cluster(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`)

	var leases map[netip.Prefix]subnetmgr.LeaseAttrs
	t.Run("each host holds one lease in etcd with its PublicIP", func(t *testing.T) {
		leases = xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)
		if len(leases) != 3 {
			t.Fatalf("%d leases in etcd, want 3: %v", len(leases), leases)
		}
		for _, n := range nodes {
			subnet := n.State(t).Lease.Subnet
			attrs, ok := leases[subnet]
			if !ok || attrs.PublicIP != n.UnderlayIP || attrs.BackendType != subnetmgr.BackendHostGW {
				t.Errorf("%s: lease %v in etcd is %+v, want PublicIP %v BackendType host-gw", n.Name, subnet, attrs, n.UnderlayIP)
			}
		}
	})

	t.Run("systemd hears READY only once the datapath holds every peer", func(t *testing.T) {
		// The last host started after the two others held leases: its READY must count both.
		last := nodes[2]
		got := strings.Join(last.Notifications(), "\n")
		want := fmt.Sprintf("READY=1\nSTATUS=ready: %v via host-gw, 2 peers", last.State(t).Lease.Subnet)
		if !strings.Contains(got, want) {
			t.Errorf("%s told systemd %q, want %q", last.Name, got, want)
		}
	})

	t.Run("subnet file and docker options match the lease", func(t *testing.T) {
		for _, n := range nodes {
			subnet := n.State(t).Lease.Subnet
			gw := netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
			env, err := os.ReadFile(n.SubnetFile())
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range []string{
				"XNET_NETWORK=10.244.0.0/16", "XNET_SUBNET=" + gw.String(), "XNET_MTU=1500", "XNET_IPMASQ=false",
				"FLANNEL_NETWORK=10.244.0.0/16", "FLANNEL_SUBNET=" + gw.String(), "FLANNEL_MTU=1500", "FLANNEL_IPMASQ=false",
			} {
				if !slices.Contains(strings.Split(string(env), "\n"), line) {
					t.Errorf("%s: %s lacks %q:\n%s", n.Name, n.SubnetFile(), line, env)
				}
			}
			docker, err := os.ReadFile(n.DockerOptsFile())
			if err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("DOCKER_NETWORK_OPTIONS=\" --bip=%s --ip-masq=true --mtu=1500\"\n", gw)
			if string(docker) != want {
				t.Errorf("%s: docker options %q, want %q", n.Name, docker, want)
			}
		}
	})

	cs := xnetdtest.Containers(t, nodes)
	t.Run("containers on different hosts reach each other", func(t *testing.T) {
		if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
			t.Errorf("pings lost:\n%s", strings.Join(failed, "\n"))
		}
	})

	t.Run("status --output json shows the lease, backend and every peer", func(t *testing.T) {
		s := nodes[0].Status(t)
		if !s.Running || !s.Ready || s.Backend != subnetmgr.BackendHostGW || s.Network.String() != "10.244.0.0/16" {
			t.Errorf("status running=%v ready=%v backend=%q network=%v, want running, ready, host-gw, 10.244.0.0/16 (%s)", s.Running, s.Ready, s.Backend, s.Network, s.Daemon)
		}
		if s.Lease.Subnet != nodes[0].State(t).Lease.Subnet || s.Lease.PublicIP != nodes[0].UnderlayIP ||
			time.Until(s.Lease.Expiration) < 23*time.Hour {
			t.Errorf("status lease %+v, want %v public %v expiring in ~24h", s.Lease, nodes[0].State(t).Lease.Subnet, nodes[0].UnderlayIP)
		}
		if len(s.Peers) != 2 {
			t.Fatalf("status shows %d peers, want 2: %+v", len(s.Peers), s.Peers)
		}
		bySubnet := map[netip.Prefix]*xnetdtest.Node{}
		for _, n := range nodes[1:] {
			bySubnet[n.State(t).Lease.Subnet] = n
		}
		for i, p := range s.Peers {
			peer := bySubnet[p.Subnet]
			if peer == nil {
				t.Errorf("peer %d: subnet %v is not another host's", i, p.Subnet)
				continue
			}
			want := fmt.Sprintf("%v via %v dev eth0", peer.State(t).Lease.Subnet, peer.UnderlayIP)
			if p.Subnet != peer.State(t).Lease.Subnet || p.PublicIP != peer.UnderlayIP || p.Route != want || p.Error != "" {
				t.Errorf("peer %d: %+v, want subnet %v public %v route %q", i, p, peer.State(t).Lease.Subnet, peer.UnderlayIP, want)
			}
		}
		if !strings.HasPrefix(s.Counters, "none:") {
			t.Errorf("counters %q: host-gw keeps none and status should say so", s.Counters)
		}
	})

	t.Run("metrics parse and describe the cluster; healthz is ready", func(t *testing.T) {
		n := nodes[0]
		if code, body := n.HTTPGet(t, "/healthz"); code != http.StatusOK {
			t.Errorf("/healthz: HTTP %d %q, want 200", code, body)
		}
		code, body := n.HTTPGet(t, "/metrics")
		if code != http.StatusOK {
			t.Fatalf("/metrics: HTTP %d", code)
		}
		fams := xnetdtest.ParseMetrics(t, body)
		for _, tt := range []struct {
			name   string
			labels map[string]string
			check  func(v float64) bool
			want   string
		}{
			{"xnet_leases_known", nil, func(v float64) bool { return v == 3 }, "3"},
			{"xnet_peers", nil, func(v float64) bool { return v == 2 }, "2"},
			{"xnet_ready", nil, func(v float64) bool { return v == 1 }, "1"},
			{"xnet_backend_info", map[string]string{"backend": "host-gw"}, func(v float64) bool { return v == 1 }, "1"},
			{"xnet_lease_expiry_timestamp_seconds", nil, func(v float64) bool {
				return v > float64(time.Now().Add(23*time.Hour).Unix()) && v < float64(time.Now().Add(25*time.Hour).Unix())
			}, "about now + 24h"},
			{"xnet_reconcile_duration_seconds", nil, func(v float64) bool { return v >= 1 }, ">= 1 observation"},
			{"xnet_etcd_errors_total", nil, func(v float64) bool { return v >= 0 }, "present"},
			{"xnet_watch_resyncs_total", nil, func(v float64) bool { return v == 0 }, "0"},
			{"xnet_lease_events_total", map[string]string{"type": "added"}, func(v float64) bool { return v >= 3 }, ">= 3"},
		} {
			v, ok := xnetdtest.Metric(fams, tt.name, tt.labels)
			if !ok || !tt.check(v) {
				t.Errorf("%s%v = %v (present %v), want %s", tt.name, tt.labels, v, ok, tt.want)
			}
		}
		for name := range fams {
			if !strings.HasPrefix(name, "xnet_") {
				t.Errorf("metric %s is not prefixed xnet_", name)
			}
		}
	})

	t.Run("a running host whose lease is deleted takes it back at once", func(t *testing.T) {
		n := nodes[1]
		subnet := n.State(t).Lease.Subnet
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := topo.EtcdClient().Delete(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, subnet)); err != nil {
			t.Fatal(err)
		}
		for {
			if attrs, ok := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)[subnet]; ok && attrs.PublicIP == n.UnderlayIP {
				break
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s did not take its lease %v back within 5s:\n%s", n.Name, subnet, n.Proc.Output())
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s took its lease back %v after the delete", n.Name, time.Since(start).Round(time.Millisecond))
		for nodes[0].RouteTo(t, subnet) == "" {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s has no route to %v again 5s after the delete", nodes[0].Name, subnet)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if sent, got, err := harness.Ping(ctx, cs[0].Namespace, cs[1].IP, 3, 50*time.Millisecond); err != nil || got != sent {
			t.Errorf("ping %s -> %s after the lease came back: %d/%d %v", nodes[0].Name, n.Name, got, sent, err)
		}
		if n.Proc.Exited() {
			t.Errorf("xnetd on %s exited: %v", n.Name, n.Proc.Wait())
		}
	})

	t.Run("a dead host's lease deleted in etcd leaves the other hosts' routes within seconds", func(t *testing.T) {
		gone := nodes[2]
		subnet := gone.State(t).Lease.Subnet
		if err := gone.Proc.Kill(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := topo.EtcdClient().Delete(ctx, subnetmgr.SubnetKey(xnetdtest.EtcdPrefix, subnet)); err != nil {
			t.Fatal(err)
		}
		// For a few seconds the peer stays, in case its lease comes back (a host re-creating
		// an expired lease after an etcd outage); status says so.
		for {
			var pending time.Time
			for _, p := range nodes[0].Status(t).Peers {
				if p.Subnet == subnet {
					pending = p.RemovalDue
				}
			}
			if !pending.IsZero() {
				if d := pending.Sub(start); d < 2*time.Second || d > 5*time.Second {
					t.Errorf("status: %v leaves at %v, %v after the delete; want within 2-5 s", subnet, pending, d)
				}
				break
			}
			if time.Since(start) > 2500*time.Millisecond {
				t.Errorf("status never showed %v as pending removal after its lease was deleted", subnet)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		for _, n := range nodes[:2] {
			for n.RouteTo(t, subnet) != "" {
				if time.Since(start) > 5*time.Second {
					t.Fatalf("%s still routes %v 5s after its lease was deleted: %s", n.Name, subnet, n.RouteTo(t, subnet))
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		t.Logf("route to %v gone from both peers %v after the delete", subnet, time.Since(start).Round(time.Millisecond))
		// The other pair is untouched.
		if route := nodes[0].RouteTo(t, nodes[1].State(t).Lease.Subnet); route == "" {
			t.Errorf("%s lost its route to %s too", nodes[0].Name, nodes[1].Name)
		}
		// The state file follows peer changes within a second (it is rewritten at most once
		// a second under churn).
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			s := nodes[0].Status(t)
			if len(s.Peers) == 1 && s.Peers[0].Subnet == nodes[1].State(t).Lease.Subnet {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("status 2 s after the routes left shows peers %+v, want only %s's", s.Peers, nodes[1].Name)
				break
			}
		}
	})
}

// A restart, graceful or kill -9, keeps the subnet and the datapath: a ping every 50 ms
// across both restarts loses nothing. Between stop and start, status says the daemon is down
// and still shows the datapath.
func TestXnetdRestartKeepsTheSubnetAndLosesNoPacket(t *testing.T) {
	// The config says ebpf (auto) as a cluster would; these hosts pin vxlan, the kernel device.
	nodes, topo := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`, "--backend=vxlan", "--ip-masq")
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("no connectivity before the restarts:\n%s", strings.Join(failed, "\n"))
	}
	n := nodes[0]
	subnet := n.State(t).Lease.Subnet

	type pingResult struct{ sent, got int }
	done := make(chan pingResult, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		sent, got, _ := harness.Ping(ctx, cs[0].Namespace, cs[1].IP, 100, 50*time.Millisecond) // 5 s
		done <- pingResult{sent, got}
	}()
	time.Sleep(500 * time.Millisecond)

	// Graceful: SIGTERM, exit 0, datapath left in place.
	if err := n.Proc.Stop(); err != nil {
		t.Errorf("xnetd on %s did not stop cleanly on SIGTERM: %v", n.Name, err)
	}
	if !strings.Contains(n.Proc.Output(), "datapath and lease left in place") {
		t.Errorf("xnetd did not say it left the datapath in place:\n%s", n.Proc.Output())
	}
	s := n.Status(t)
	if s.Running || !strings.Contains(s.Daemon, "not running") || len(s.Peers) != 1 || s.Peers[0].Route == "" {
		t.Errorf("status of a stopped daemon: running=%v daemon=%q peers=%+v, want not running with the peer's kernel route", s.Running, s.Daemon, s.Peers)
	}
	n.StartDaemon(t)
	n.WaitReady(t)
	if got := n.State(t).Lease.Subnet; got != subnet {
		t.Errorf("subnet after graceful restart %v, want %v", got, subnet)
	}
	time.Sleep(500 * time.Millisecond)

	// Crash: SIGKILL, no chance to clean up.
	if err := n.Proc.Kill(); err != nil {
		t.Errorf("kill -9: %v", err)
	}
	n.StartDaemon(t)
	n.WaitReady(t)
	if got := n.State(t).Lease.Subnet; got != subnet {
		t.Errorf("subnet after kill -9 and restart %v, want %v", got, subnet)
	}

	r := <-done
	if r.sent < 90 || r.got != r.sent {
		t.Errorf("ping through both restarts: %d of %d replies, want all", r.got, r.sent)
	} else {
		t.Logf("ping every 50 ms through a graceful restart and a kill -9: %d/%d replies", r.got, r.sent)
	}
	if leases := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix); len(leases) != 2 {
		t.Errorf("%d leases in etcd after the restarts, want still 2: %v", len(leases), leases)
	}

	t.Run("--ip-masq installs the masquerade table and tells Docker not to masquerade", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if out, err := n.Run(ctx, "nft", "list", "table", "ip", "xnet"); err != nil || !strings.Contains(out, "masquerade") {
			t.Errorf("nft list table ip xnet: %v\n%s", err, out)
		}
		if docker, _ := os.ReadFile(n.DockerOptsFile()); !strings.Contains(string(docker), "--ip-masq=false") {
			t.Errorf("docker options %q: Docker must not masquerade when xnetd does", docker)
		}
	})

	t.Run("teardown after stop removes the device, routes, table and files but not the lease", func(t *testing.T) {
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		n.Teardown(t, topo)
	})
}

// Bad flags and a bad config stop xnetd before it touches the host: exit code 2 and one line
// that names the flag or config field.
func TestXnetdRefusesBadFlagsAndConfigWithExitCode2(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, WithEtcd: true})
	h := topo.Hosts()[0]
	bin := harness.BuildXnetd(t)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/good/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/badnet/network"), `{"Network":"10.244.0.0/33"}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/badtype/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/v6only/network"), `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/v6onlywg4/network"), `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":"ipv4"}}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/nofamily/network"), `{"EnableIPv4":false,"EnableIPv6":false,"Network":"10.244.0.0/16"}`)
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey("/badmacvlan/network"), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},"Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":31}}`)

	tests := []struct {
		name   string
		prefix string
		args   []string
		want   []string // in the last line of output
	}{
		{"unknown backend", "/good/network", []string{"--backend=ipip"}, []string{"--backend", "ipip", "use auto, ebpf, vxlan, udp, host-gw or wireguard"}},
		{"missing interface", "/good/network", []string{"--iface=nosuch0"}, []string{"--iface nosuch0", "no such interface"}},
		{"interface address not on this host", "/good/network", []string{"--iface=192.0.2.1"}, []string{"--iface 192.0.2.1", "no interface here has that address"}},
		{"bad public ip", "/good/network", []string{"--public-ip=10.0.0.300"}, []string{"--public-ip", "not an IPv4 address"}},
		{"bad renew margin", "/good/network", []string{"--subnet-lease-renew-margin=never"}, []string{"subnet-lease-renew-margin"}},
		{"invalid Network in the config", "/badnet/network", nil, []string{"/badnet/network/config", "Network"}},
		{"unknown Backend.Type in the config", "/badtype/network", nil, []string{"Backend.Type", "ipip"}},
		{"--macvlan without a Macvlan section in the config", "/good/network", []string{"--macvlan"}, []string{"/good/network/config", "no Macvlan section", "--macvlan"}},
		{"IPv6-only config with the udp backend", "/v6only/network", []string{"--backend=udp"}, []string{"--backend=udp", "EnableIPv4 false", "use ebpf or vxlan or host-gw or wireguard"}},
		{"IPv6-only config with wireguard in Mode ipv4", "/v6onlywg4/network", []string{"--backend=wireguard"}, []string{"/v6onlywg4/network/config", "Backend.Mode", "EnableIPv4 false"}},
		{"IPv6-only config on a host without an IPv6 underlay", "/v6only/network", nil, []string{"EnableIPv4 false", "no global IPv6 address", "--public-ipv6"}},
		// ebpf carries an IPv6-only overlay over the IPv6 underlay only, as vxlan does.
		{"IPv6-only config with the ebpf backend on a host without an IPv6 underlay", "/v6only/network", []string{"--backend=ebpf"}, []string{"--backend=ebpf", "EnableIPv4 false", "no global IPv6 address", "--public-ipv6"}},
		{"a config with neither address family", "/nofamily/network", nil, []string{"/nofamily/network/config", "EnableIPv4", "EnableIPv6"}},
		{"invalid Macvlan section (with or without --macvlan)", "/badmacvlan/network", nil, []string{"/badmacvlan/network/config", "Macvlan.RangeLen", "31"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := append([]string{"--etcd-prefix", tt.prefix, "--subnet-file", filepath.Join(dir, "subnet.env"),
				"--docker-opts-file", filepath.Join(dir, "docker"), "--macvlan-file", filepath.Join(dir, "macvlan")}, tt.args...)
			p, err := h.StartXnetd(bin, args...)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(15 * time.Second):
				p.Kill()
				t.Fatalf("xnetd did not exit:\n%s", p.Output())
			}
			var exit *exec.ExitError
			if err := p.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 2 {
				t.Errorf("exit %v, want exit code 2\n%s", err, p.Output())
			}
			lines := strings.Split(strings.TrimSpace(p.Output()), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "xnetd: ") {
				t.Errorf("last line %q is not xnetd's error line", last)
			}
			for _, w := range tt.want {
				if !strings.Contains(last, w) {
					t.Errorf("error line %q does not mention %q", last, w)
				}
			}
			// Nothing half configured: no files, no lease, no device, no route.
			for _, f := range []string{"subnet.env", "docker", "state.json", "macvlan"} {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("%s was written although xnetd refused to start", f)
				}
			}
			if leases := xnetdtest.Leases(t, topo, tt.prefix); len(leases) != 0 {
				t.Errorf("lease taken although xnetd refused to start: %v", leases)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if out, _ := h.Run(ctx, "ip", "-o", "link", "show", "type", "vxlan"); strings.TrimSpace(out) != "" {
				t.Errorf("a vxlan device exists although xnetd refused to start: %s", out)
			}
			if out, _ := h.Run(ctx, "ip", "-4", "route", "show", "root", "10.244.0.0/16"); strings.TrimSpace(out) != "" {
				t.Errorf("routes into the overlay exist although xnetd refused to start: %s", out)
			}
		})
	}
}

// Without --iface xnetd takes the default route's interface; --iface also takes an address.
// `xnetd status` (text) then tells an operator which one and what the daemon holds.
func TestXnetdFindsTheUnderlayInterface(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1, WithEtcd: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	n := &xnetdtest.Node{Host: topo.Hosts()[0], Bin: harness.BuildXnetd(t)}
	for _, tt := range []struct {
		name  string
		iface string
	}{
		{"the default route's interface when --iface is empty", "--iface="},
		{"the interface holding the address given to --iface", "--iface=" + n.UnderlayIP.String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n.Extra = []string{tt.iface}
			n.StartDaemon(t)
			n.WaitReady(t)
			want := fmt.Sprintf(`msg="underlay interface" iface=eth0 iface_ip=%s public_ip=%s`, n.UnderlayIP, n.UnderlayIP)
			if !strings.Contains(n.Proc.Output(), want) {
				t.Errorf("log lacks %q:\n%s", want, n.Proc.Output())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, err := n.Run(ctx, n.Bin, "status", "--subnet-file", n.SubnetFile())
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range []string{
				fmt.Sprintf("xnetd running, pid %d, ready", n.Proc.Pid),
				fmt.Sprintf("lease:    %v public %v, expires", n.State(t).Lease.Subnet, n.UnderlayIP),
				"backend:  vxlan (kernel: kernel VXLAN device xnet.1)",
				"network:  10.244.0.0/16 on eth0",
				"peers (0):",
			} {
				if !strings.Contains(out, w) {
					t.Errorf("xnetd status lacks %q:\n%s", w, out)
				}
			}
			if err := n.Proc.Stop(); err != nil {
				t.Error(err)
			}
		})
	}
}
