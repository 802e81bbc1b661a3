package docker

// End to end: xnet's Docker networks (xnetd --docker-networks) with real dockerds on two
// simulated hosts, as a user runs them: docker network create -d xnet --ipam-driver xnet on one
// host, containers on both, by address and by name, isolation between networks, a container on
// two networks, the docker0 overlay beside them, docker network rm. Helpers here are prefixed dn.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// dnCluster starts xnetd with --docker-networks on every host, each pointed at its own
// dockerd's socket and plugin directory, then the dockerds from the options xnetd wrote.
func dnCluster(t *testing.T, hosts int, config string) ([]*xnetdtest.Node, []*harness.Docker, *harness.Topology) {
	t.Helper()
	if why := harness.DockerMissing(); why != "" {
		t.Skip(why)
	}
	topo := harness.NewForTest(t, harness.Options{Hosts: hosts, WithEtcd: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), config)
	bin := harness.BuildXnetd(t)
	var nodes []*xnetdtest.Node
	for _, h := range topo.Hosts() {
		n := &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--docker-networks", "--log-level", "debug",
			"--docker-plugin-socket", filepath.Join(h.DockerPluginDir(), dockernet.DriverName+".sock"),
			"--docker-socket", h.DockerSocket()}}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.WaitPeers(t, hosts-1)
	}
	var hs []*harness.Host
	for _, n := range nodes {
		hs = append(hs, n.Host)
	}
	return nodes, harness.StartDockerForTest(t, hs...), topo
}

// dnRun is `docker run -d --name <name> --network <network> busybox sleep 86400`.
func dnRun(t *testing.T, d *harness.Docker, name, network string) *harness.DockerContainer {
	t.Helper()
	c, err := d.RunWith(dkCtx(t, 30*time.Second), name, []string{"--network", network}, "sleep", "86400")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dnIP is the container's address on network.
func dnIP(t *testing.T, c *harness.DockerContainer, network string) netip.Addr {
	t.Helper()
	out, err := c.Docker.CLI(dkCtx(t, 10*time.Second), "inspect", "-f", fmt.Sprintf(`{{(index .NetworkSettings.Networks %q).IPAddress}}`, network), c.ID)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("%s has no address on %s: %q", c.Name, network, out)
	}
	return ip
}

// dnWaitNetwork waits until the Docker of d has network name (want true) or not, and returns
// its subnet.
func dnWaitNetwork(t *testing.T, d *harness.Docker, name string, want bool, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		out, err := d.CLI(dkCtx(t, 10*time.Second), "network", "inspect", "-f", "{{.Driver}} {{range .IPAM.Config}}{{.Subnet}}{{end}}", name)
		if (err == nil) == want {
			if want && !strings.HasPrefix(out, dockernet.DriverName+" ") {
				t.Fatalf("network %s on %s has driver/subnet %q, want driver %s", name, d.Host.Name, out, dockernet.DriverName)
			}
			return strings.TrimSpace(strings.TrimPrefix(out, dockernet.DriverName+" "))
		}
		if time.Now().After(deadline) {
			t.Fatalf("network %s on %s: present=%v after %v, want %v (%v)", name, d.Host.Name, err == nil, within, want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dnResolve waits until from resolves name (through Docker's embedded DNS and xnetd's
// resolver) and returns the address.
func dnResolve(t *testing.T, from *harness.DockerContainer, name string, within time.Duration) (netip.Addr, string) {
	t.Helper()
	deadline := time.Now().Add(within)
	var out string
	for time.Now().Before(deadline) {
		out, _ = from.Exec(dkCtx(t, 10*time.Second), "nslookup", "-type=a", name)
		// busybox nslookup: "Name:\tr2\nAddress: 10.250.4.2"
		if i := strings.LastIndex(out, "Name:"); i >= 0 {
			for _, line := range strings.Split(out[i:], "\n") {
				if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Address:"); ok {
					if a, err := netip.ParseAddr(strings.TrimSpace(v)); err == nil {
						return a, out
					}
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return netip.Addr{}, out
}

// dnStatus is the docker_networks part of `xnetd status --output json`.
type dnStatus struct {
	DockerNetworks *dockernet.Status `json:"docker_networks"`
}

func dnNetworkStatus(t *testing.T, n *xnetdtest.Node, name string) dockernet.NetworkStatus {
	t.Helper()
	var s dnStatus
	n.StatusInto(t, &s)
	if s.DockerNetworks == nil {
		t.Fatalf("xnetd status on %s has no docker_networks section", n.Name)
	}
	for _, ns := range s.DockerNetworks.Networks {
		if ns.Name == name {
			return ns
		}
	}
	t.Fatalf("xnetd status on %s does not list network %s: %+v", n.Name, name, s.DockerNetworks)
	return dockernet.NetworkStatus{}
}

func dnEtcdKeys(t *testing.T, topo *harness.Topology, name string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var keys []string
	for _, p := range []string{subnetmgr.NetworkKey(xnetdtest.EtcdPrefix, name), subnetmgr.PoolPrefix(xnetdtest.EtcdPrefix, subnetmgr.NetworkBlocksDirOf(name)),
		subnetmgr.PoolPrefix(xnetdtest.EtcdPrefix, subnetmgr.NetworkEndpointsDir+"/"+name)} {
		resp, err := topo.EtcdClient().Get(ctx, p, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			if k := string(kv.Key); k == p || strings.HasSuffix(p, "/") {
				keys = append(keys, k)
			}
		}
	}
	return keys
}

// TestDockerNetworksSpanHostsWithoutSwarm is the seed tutorial's overlay network (docker network
// create on one host, containers on two hosts talking) with xnet as the driver and etcd as the
// store, and what a user expects around it.
func TestDockerNetworksSpanHostsWithoutSwarm(t *testing.T) {
	begin := time.Now()
	nodes, dockers, topo := dnCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	hA, hB := dockers[0], dockers[1]
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range nodes {
				if out, err := n.Run(context.Background(), n.Bin, "status", "--subnet-file", n.SubnetFile()); err == nil {
					t.Logf("xnetd status on %s:\n%s", n.Name, out)
				}
			}
		}
	})
	t.Logf("cluster and dockerds up after %v; dockerd flags %v", time.Since(begin).Round(time.Millisecond), hA.NetworkOptions)

	t.Run("a network created on one host appears on the other", func(t *testing.T) {
		start := time.Now()
		if _, err := hA.CLI(dkCtx(t, 30*time.Second), "network", "create", "-d", "xnet", "--ipam-driver", "xnet", "--subnet", "10.250.0.0/16", "red"); err != nil {
			t.Fatal(err)
		}
		if got := dnWaitNetwork(t, hB, "red", true, 15*time.Second); got != "10.250.0.0/16" {
			t.Errorf("red on %s has subnet %q, want 10.250.0.0/16", hB.Host.Name, got)
		}
		t.Logf("red on %s %v after docker network create on %s", hB.Host.Name, time.Since(start).Round(time.Millisecond), hA.Host.Name)
		// Without --subnet, on the other host: the first free /16 of the default range.
		if _, err := hB.CLI(dkCtx(t, 30*time.Second), "network", "create", "-d", "xnet", "--ipam-driver", "xnet", "blue"); err != nil {
			t.Fatal(err)
		}
		if got := dnWaitNetwork(t, hA, "blue", true, 15*time.Second); got != "10.192.0.0/16" {
			t.Errorf("blue on %s has subnet %q, want 10.192.0.0/16 (the first /16 of the default range)", hA.Host.Name, got)
		}
	})

	t.Run("bad input is refused through Docker naming the option", func(t *testing.T) {
		for _, tc := range []struct {
			desc string
			args []string
			want []string
		}{
			{"a subnet overlapping the overlay Network", []string{"--ipam-driver", "xnet", "--subnet", "10.244.128.0/17", "bad1"}, []string{"--subnet 10.244.128.0/17", "overlay Network 10.244.0.0/16"}},
			{"a subnet overlapping another network", []string{"--ipam-driver", "xnet", "--subnet", "10.250.128.0/17", "bad2"}, []string{"--subnet 10.250.128.0/17", "overlaps network red"}},
			{"another network's subnet under a new name", []string{"--ipam-driver", "xnet", "--subnet", "10.250.0.0/16", "bad3"}, []string{"--subnet 10.250.0.0/16 is network red's"}},
			{"an unknown option", []string{"--ipam-driver", "xnet", "--subnet", "10.251.0.0/16", "-o", "color=green", "bad4"}, []string{"-o color"}},
			{"a block larger than the network allows", []string{"--ipam-driver", "xnet", "--subnet", "10.251.0.0/16", "-o", "xnet.block-len=17", "bad5"}, []string{"-o xnet.block-len=17"}},
			{"Docker's default IPAM", []string{"--subnet", "10.251.0.0/16", "bad6"}, []string{"--ipam-driver"}},
			{"a subnet smaller than a /24", []string{"--ipam-driver", "xnet", "--subnet", "10.251.0.0/26", "bad7"}, []string{"--subnet 10.251.0.0/26"}},
			{"the name of an existing network", []string{"--ipam-driver", "xnet", "--subnet", "10.251.0.0/16", "red"}, []string{"red already exists"}},
		} {
			out, err := hB.CLI(dkCtx(t, 30*time.Second), append([]string{"network", "create", "-d", "xnet"}, tc.args...)...)
			if err == nil {
				t.Errorf("%s: docker network create succeeded (%s)", tc.desc, strings.TrimSpace(out))
				continue
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: error %q does not say %q", tc.desc, err, w)
				}
			}
			_, msg, _ := strings.Cut(err.Error(), "Error response from daemon: ")
			t.Logf("%s: %s", tc.desc, msg)
		}
		time.Sleep(500 * time.Millisecond)
		for _, name := range []string{"bad1", "bad2", "bad3", "bad4", "bad5", "bad6", "bad7"} {
			if keys := dnEtcdKeys(t, topo, name); len(keys) > 0 {
				t.Errorf("refused network %s left etcd keys %v", name, keys)
			}
		}
	})

	t.Run("a name taken elsewhere with other settings loses right after docker network create", func(t *testing.T) {
		// Docker names a new network to its driver only after creating it, so this conflict
		// cannot go back through Docker's create. Make it certain: a network cyan in etcd that
		// no host can set up (every block reserved by a host that does not exist), then the
		// same name with another subnet on host 1.
		// One transaction: a daemon that saw the network before its blocks were reserved
		// would lease one of them, and the reservation would then overwrite its lease.
		rec := `{"Subnet":"10.253.0.0/24","VNI":720128,"Port":8474,"BlockLen":26}`
		ops := []clientv3.Op{clientv3.OpPut(subnetmgr.NetworkKey(xnetdtest.EtcdPrefix, "cyan"), rec)}
		for _, b := range []string{"10.253.0.64", "10.253.0.128", "10.253.0.192"} {
			ops = append(ops, clientv3.OpPut(subnetmgr.PoolKey(xnetdtest.EtcdPrefix, subnetmgr.NetworkBlocksDirOf("cyan"), netip.MustParsePrefix(b+"/26")),
				`{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":720128,"VtepMAC":"0e:78:c6:12:00:63"}}`))
		}
		tctx, tcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := topo.EtcdClient().Txn(tctx).Then(ops...).Commit()
		tcancel()
		if err != nil {
			t.Fatalf("reserve cyan's blocks: %v", err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, _ = topo.EtcdClient().Delete(ctx, subnetmgr.NetworkKey(xnetdtest.EtcdPrefix, "cyan"))
			_, _ = topo.EtcdClient().Delete(ctx, subnetmgr.PoolPrefix(xnetdtest.EtcdPrefix, subnetmgr.NetworkBlocksDirOf("cyan")), clientv3.WithPrefix())
		})
		for start := time.Now(); ; time.Sleep(200 * time.Millisecond) {
			var s dnStatus
			nodes[0].StatusInto(t, &s)
			var cyan *dockernet.NetworkStatus
			for i := range s.DockerNetworks.Networks {
				if s.DockerNetworks.Networks[i].Name == "cyan" {
					cyan = &s.DockerNetworks.Networks[i]
				}
			}
			if cyan != nil && strings.Contains(cyan.Problem, "no block") {
				t.Logf("cyan on %s: %s: %s", nodes[0].Name, cyan.State, cyan.Problem)
				break
			}
			if time.Since(start) > 15*time.Second {
				t.Fatalf("cyan on %s: %+v after 15 s; want a problem saying there is no block", nodes[0].Name, cyan)
			}
		}
		if _, err := hA.CLI(dkCtx(t, 30*time.Second), "network", "create", "-d", "xnet", "--ipam-driver", "xnet", "--subnet", "10.254.0.0/16", "cyan"); err != nil {
			t.Fatalf("docker network create cyan with another subnet: %v (it cannot know the name yet, so it succeeds)", err)
		}
		dnWaitNetwork(t, hA, "cyan", false, 15*time.Second)
		if log := nodes[0].Proc.Output(); !strings.Contains(log, "lost to another host's network") || !strings.Contains(log, "network cyan exists with subnet 10.253.0.0/24") {
			t.Errorf("xnetd on %s did not say why cyan was removed again", nodes[0].Name)
		}
		var s dnStatus
		nodes[0].StatusInto(t, &s)
		for _, n := range s.DockerNetworks.Networks {
			if n.Subnet == netip.MustParsePrefix("10.254.0.0/16") {
				t.Errorf("the losing cyan (10.254.0.0/16) is still known: %+v", n)
			}
		}
	})

	r1, b1 := dnRun(t, hA, "r1", "red"), dnRun(t, hA, "b1", "blue")
	r2, b2, rb := dnRun(t, hB, "r2", "red"), dnRun(t, hB, "b2", "blue"), dnRun(t, hB, "rb", "red")
	if _, err := hB.CLI(dkCtx(t, 30*time.Second), "network", "connect", "blue", "rb"); err != nil {
		t.Fatal(err)
	}
	ip := map[string]netip.Addr{
		"r1": dnIP(t, r1, "red"), "r2": dnIP(t, r2, "red"), "b1": dnIP(t, b1, "blue"), "b2": dnIP(t, b2, "blue"),
		"rb/red": dnIP(t, rb, "red"), "rb/blue": dnIP(t, rb, "blue"),
	}
	t.Logf("containers: %v", ip)

	t.Run("each host hands out addresses from its own block", func(t *testing.T) {
		sA, sB := dnNetworkStatus(t, nodes[0], "red"), dnNetworkStatus(t, nodes[1], "red")
		if !sA.Block.IsValid() || !sB.Block.IsValid() || sA.Block.Overlaps(sB.Block) {
			t.Fatalf("blocks of red: %v on %s, %v on %s: want two disjoint blocks", sA.Block, nodes[0].Name, sB.Block, nodes[1].Name)
		}
		if !sA.Block.Contains(ip["r1"]) || !sB.Block.Contains(ip["r2"]) || !sB.Block.Contains(ip["rb/red"]) {
			t.Errorf("r1 %v not in %v, or r2 %v / rb %v not in %v", ip["r1"], sA.Block, ip["r2"], ip["rb/red"], sB.Block)
		}
		if sA.VNI == 0 || sA.VNI == dnNetworkStatus(t, nodes[0], "blue").VNI {
			t.Errorf("red's VNI %d: want its own", sA.VNI)
		}
	})

	t.Run("containers on two hosts on one network ping each other", func(t *testing.T) {
		for _, p := range []struct {
			from *harness.DockerContainer
			to   string
		}{{r1, "r2"}, {r2, "r1"}, {r1, "rb/red"}, {b1, "b2"}, {b2, "b1"}, {rb, "b1"}} {
			if got, out := dkPing(t, p.from, ip[p.to]); got != 3 {
				t.Errorf("%s -> %s (%v): %d of 3 replies\n%s", p.from.Name, p.to, ip[p.to], got, out)
			}
		}
	})

	t.Run("containers reach each other by name from any host", func(t *testing.T) {
		for _, p := range []struct {
			from *harness.DockerContainer
			name string
			want netip.Addr
		}{
			{r1, "r2", ip["r2"]}, {r2, "r1", ip["r1"]}, {b2, "b1", ip["b1"]},
			// A container on two networks is seen by each by its address there.
			{r1, "rb", ip["rb/red"]}, {b1, "rb", ip["rb/blue"]},
			{r1, "rb.red", ip["rb/red"]},
		} {
			got, out := dnResolve(t, p.from, p.name, 10*time.Second)
			if got != p.want {
				t.Errorf("%s resolves %s to %v, want %v\n%s", p.from.Name, p.name, got, p.want, out)
				continue
			}
			if out, err := p.from.Exec(dkCtx(t, 15*time.Second), "ping", "-c", "2", "-i", "0.2", "-W", "1", p.name); err != nil {
				t.Errorf("docker exec %s ping %s: %v\n%s", p.from.Name, p.name, err, out)
			}
		}
	})

	t.Run("containers on two networks do not reach each other", func(t *testing.T) {
		before := dnNetworkStatus(t, nodes[1], "blue").Refused + dnNetworkStatus(t, nodes[0], "blue").Refused
		for _, p := range []struct {
			from *harness.DockerContainer
			to   string
		}{{r1, "b2"}, {r1, "b1"}, {b1, "r2"}, {b2, "r1"}} {
			if got, _ := dkPing(t, p.from, ip[p.to]); got != 0 {
				t.Errorf("%s (not on %s's network) reaches %s (%v): %d of 3 replies", p.from.Name, p.to, p.to, ip[p.to], got)
			}
		}
		if got, _ := dnResolve(t, r1, "b2", 2*time.Second); got.IsValid() {
			t.Errorf("r1 (red) resolves b2 (blue only) to %v", got)
		}
		after := dnNetworkStatus(t, nodes[1], "blue").Refused + dnNetworkStatus(t, nodes[0], "blue").Refused
		if after <= before {
			t.Errorf("blue's refused counters did not move (%d, then %d) while red pinged blue", before, after)
		} else {
			t.Logf("blue refused %d packets from red", after-before)
		}
	})

	t.Run("the docker0 overlay keeps working beside them", func(t *testing.T) {
		d1, d2 := dkRun(t, dkHost{nodes[0], hA}, "d1"), dkRun(t, dkHost{nodes[1], hB}, "d2")
		for _, p := range [][2]*harness.DockerContainer{{d1, d2}, {d2, d1}} {
			if got, out := dkPing(t, p[0], p[1].IP); got != 3 {
				t.Errorf("docker0 %s -> %s (%v): %d of 3 replies\n%s", p[0].Name, p[1].Name, p[1].IP, got, out)
			}
		}
		// A docker0 container joins red as well and reaches both worlds.
		if _, err := hA.CLI(dkCtx(t, 30*time.Second), "network", "connect", "red", "d1"); err != nil {
			t.Fatal(err)
		}
		for _, to := range []netip.Addr{d2.IP, ip["r2"]} {
			if got, out := dkPing(t, d1, to); got != 3 {
				t.Errorf("d1 (docker0 + red) -> %v: %d of 3 replies\n%s", to, got, out)
			}
		}
	})

	t.Run("xnetd status lists networks, blocks and containers", func(t *testing.T) {
		s := dnNetworkStatus(t, nodes[1], "red")
		names := map[string]netip.Addr{}
		for _, e := range s.Endpoints {
			names[e.Name] = e.IP
		}
		if s.State != "ready" || names["r2"] != ip["r2"] || names["rb"] != ip["rb/red"] || len(s.Blocks) < 2 || s.RemoteEndpoints < 1 {
			t.Errorf("red on %s: %+v; want ready, r2 and rb here, two blocks and r1 elsewhere", nodes[1].Name, s)
		}
		out, err := nodes[1].Run(dkCtx(t, 10*time.Second), nodes[1].Bin, "status", "--subnet-file", nodes[1].SubnetFile())
		if err != nil || !strings.Contains(out, "docker networks (2)") || !strings.Contains(out, "rb="+ip["rb/red"].String()) {
			t.Errorf("xnetd status text lacks the docker networks section: %v\n%s", err, out)
		}
		if i := strings.Index(out, "docker networks"); i >= 0 {
			t.Logf("xnetd status on %s, its last section:\n%s", nodes[1].Name, out[i:])
		}
	})

	t.Run("kill -9 and restart of xnetd on both hosts under a 50 ms ping on a network loses nothing", func(t *testing.T) {
		ctx := dkCtx(t, 90*time.Second)
		done := make(chan [2]int, 1)
		go func() {
			sent, got, _ := harness.Ping(ctx, r1.Namespace, ip["r2"], 120, 50*time.Millisecond) // 6 s
			done <- [2]int{sent, got}
		}()
		for _, n := range nodes {
			time.Sleep(500 * time.Millisecond)
			if err := n.Proc.Kill(); err != nil {
				t.Errorf("kill -9 xnetd on %s: %v", n.Name, err)
			}
			n.StartDaemon(t)
			n.WaitReady(t)
		}
		if r := <-done; r[0] < 100 || r[1] != r[0] {
			t.Errorf("ping r1 -> r2 on red every 50 ms through kill -9 and restart of both xnetds: %d of %d replies", r[1], r[0])
		} else {
			t.Logf("%d of %d replies", r[1], r[0])
		}
		// The restarted daemons know what Docker handed out before: a new container gets a
		// fresh address, and is found by name.
		late := dnRun(t, hB, "late2", "red")
		lip := dnIP(t, late, "red")
		for name, a := range ip {
			if a == lip {
				t.Errorf("the new container got %v, which %s has", lip, name)
			}
		}
		if got, out := dnResolve(t, r1, "late2", 10*time.Second); got != lip {
			t.Errorf("r1 resolves late2 to %v after the restart, want %v\n%s", got, lip, out)
		}
		if got, out := dkPing(t, r1, lip); got != 3 {
			t.Errorf("r1 -> late2 (%v) after the restart: %d of 3 replies\n%s", lip, got, out)
		}
		// A container joined before the restart joins another network after it (its route
		// to the resolver must not be added twice, or Docker fails the join).
		if _, err := hB.CLI(ctx, "network", "connect", "blue", "r2"); err != nil {
			t.Errorf("docker network connect blue r2 after the restart: %v", err)
		} else if _, err := hB.CLI(ctx, "network", "disconnect", "blue", "r2"); err != nil {
			t.Error(err)
		}
		if err := late.Remove(ctx); err != nil {
			t.Error(err)
		}
	})

	t.Run("docker network rm on one host removes it everywhere once no container uses it", func(t *testing.T) {
		ctx := dkCtx(t, 60*time.Second)
		for _, c := range []*harness.DockerContainer{b1, b2} {
			if err := c.Remove(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := hB.CLI(ctx, "network", "disconnect", "blue", "rb"); err != nil {
			t.Fatal(err)
		}
		if _, err := hA.CLI(ctx, "network", "rm", "blue"); err != nil {
			t.Fatal(err)
		}
		dnWaitNetwork(t, hB, "blue", false, 15*time.Second)
		// red is still used on the other host: rm here marks it, the containers there keep it.
		if _, err := hA.CLI(ctx, "network", "disconnect", "red", "d1"); err != nil {
			t.Fatal(err)
		}
		if err := r1.Remove(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := hA.CLI(ctx, "network", "rm", "red"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		dnWaitNetwork(t, hB, "red", true, time.Second)
		if got, out := dkPing(t, r2, ip["rb/red"]); got != 3 {
			t.Errorf("r2 -> rb on red, removing: %d of 3 replies\n%s", got, out)
		}
		if c, err := hB.RunWith(ctx, "late", []string{"--network", "red"}, "sleep", "60"); err == nil || !strings.Contains(err.Error(), "being removed") {
			t.Errorf("a new container on red, which is being removed: %v, %v; want a refusal saying so", c, err)
		}
		for _, c := range []*harness.DockerContainer{r2, rb} {
			if err := c.Remove(ctx); err != nil {
				t.Fatal(err)
			}
		}
		dnWaitNetwork(t, hB, "red", false, 15*time.Second)
		deadline := time.Now().Add(10 * time.Second)
		for _, name := range []string{"red", "blue"} {
			for {
				keys := dnEtcdKeys(t, topo, name)
				if len(keys) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("etcd keys of removed network %s: %v", name, keys)
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		// The devices go right after the network leaves Docker.
		for _, n := range nodes {
			for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
				links, _ := n.Run(ctx, "ip", "-o", "link", "show")
				if !strings.Contains(links, "xnbr.") {
					break
				}
				if time.Since(start) > 5*time.Second {
					t.Errorf("%s: network bridges left 5 s after rm:\n%s", n.Name, links)
					break
				}
			}
		}
	})
	t.Run("xnetd teardown removes the networks' devices and isolation table", func(t *testing.T) {
		ctx := dkCtx(t, 60*time.Second)
		if _, err := hA.CLI(ctx, "network", "create", "-d", "xnet", "--ipam-driver", "xnet", "--subnet", "10.252.0.0/16", "green"); err != nil {
			t.Fatal(err)
		}
		dnWaitNetwork(t, hB, "green", true, 15*time.Second)
		n := nodes[1]
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		bridge := dockernet.BridgeName(dnNetworkStatus(t, n, "green").VNI)
		// A stop leaves the datapath for the next start.
		if links, _ := n.Run(ctx, "ip", "-o", "link", "show", bridge); !strings.Contains(links, bridge) {
			t.Fatalf("%s: %s gone after a plain stop", n.Name, bridge)
		}
		out, err := n.Run(ctx, n.Bin, append(append([]string{"teardown"}, n.XnetdArgs()...), n.Extra...)...)
		if err != nil {
			t.Fatalf("xnetd teardown: %v\n%s", err, out)
		}
		t.Logf("xnetd teardown on %s:\n%s", n.Name, out)
		if links, _ := n.Run(ctx, "ip", "-o", "link", "show"); strings.Contains(links, "xnbr.") || strings.Contains(links, "xnet.") {
			t.Errorf("%s: network devices left after teardown:\n%s", n.Name, links)
		}
		if tables, _ := n.Run(ctx, "nft", "list", "tables"); strings.Contains(tables, dockernet.IsolationTable) {
			t.Errorf("%s: isolation table left after teardown:\n%s", n.Name, tables)
		}
	})
	t.Logf("%s: %v in all", t.Name(), time.Since(begin).Round(time.Millisecond))
}

// TestDockerNetworkThroughputAgainstTheOverlay measures TCP throughput between containers on
// two hosts over an xnet Docker network (kernel VXLAN per network) and over the docker0 overlay
// (the ebpf backend), one after the other, three rounds. It only reports: XNET_DNET_BENCH=1.
func TestDockerNetworkThroughputAgainstTheOverlay(t *testing.T) {
	if os.Getenv("XNET_DNET_BENCH") == "" {
		t.Skip("XNET_DNET_BENCH=1 runs it")
	}
	_, dockers, _ := dnCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	hA, hB := dockers[0], dockers[1]
	if _, err := hA.CLI(dkCtx(t, 30*time.Second), "network", "create", "-d", "xnet", "--ipam-driver", "xnet", "--subnet", "10.250.0.0/16", "red"); err != nil {
		t.Fatal(err)
	}
	dnWaitNetwork(t, hB, "red", true, 15*time.Second)
	// Each client container is on both; each server container too: the path is chosen by
	// the address.
	cA, cB := dkRun(t, dkHost{nil, hA}, "ca"), dkRun(t, dkHost{nil, hB}, "cb")
	for _, c := range []*harness.DockerContainer{cA, cB} {
		if _, err := c.Docker.CLI(dkCtx(t, 30*time.Second), "network", "connect", "red", c.Name); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := harness.StartIperf3Server(dkCtx(t, 10*time.Second), cB.Namespace, 5201)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Kill() })
	paths := []struct {
		name string
		to   netip.Addr
	}{{"docker0 overlay (ebpf)", cB.IP}, {"xnet network (kernel VXLAN)", dnIP(t, cB, "red")}}
	results := map[string][]float64{}
	for round := 0; round < 3; round++ {
		for _, p := range paths {
			r, err := harness.RunIperf3(dkCtx(t, 60*time.Second), cA.Namespace, harness.Iperf3Options{Server: p.to, Port: 5201, Duration: 5 * time.Second})
			if err != nil {
				t.Fatalf("%s: %v", p.name, err)
			}
			results[p.name] = append(results[p.name], r.BitsPerSecond/1e9)
		}
	}
	b, _ := json.Marshal(results)
	t.Logf("TCP 1 stream, Gbit/s per round: %s", b)
}
