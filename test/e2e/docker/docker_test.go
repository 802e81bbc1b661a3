// Package docker holds the end-to-end tests with Docker: a real dockerd per simulated host
// (test/harness/docker.go) started from the options xnetd wrote, xnet's Docker networks, and
// dockerd's firewall rules played in front of xnetd's. It is a package of its own so that go test
// runs it beside the others (see test/e2e/xnetdtest for the helpers they share).
package docker

// End to end with real Docker: on two simulated hosts, xnetd writes DOCKER_NETWORK_OPTIONS and a
// real dockerd (Debian's docker.io 20.10, iptables on, as a user installs it) starts from them,
// as packaging/docker-xnet.conf does; containers are busybox started with `docker run`. Every
// backend must give a user following the flannel tutorial the same thing, through Docker's own
// firewall (ip_forward on, FORWARD policy DROP, the DOCKER-USER chain) and its --ip-masq rule.
// Helpers here are prefixed dk.

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/fwrules"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// dkBackends: each backend named in the config and pinned with --backend (so a backend that
// cannot run fails its case instead of falling back to another); other xnetd flags are left at
// their defaults, so xnetd does not masquerade and Docker gets --ip-masq=true, as in the tutorial.
var dkBackends = []struct{ name, config string }{
	{"ebpf", `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`},
	{"vxlan", `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`},
	{"udp", `{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}`},
	{"host-gw", `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`},
}

// dkHost is a simulated host running xnetd and a real dockerd.
type dkHost struct {
	node   *xnetdtest.Node
	docker *harness.Docker
}

func dkCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// dkRun starts a busybox that sleeps; the test fails if it cannot.
func dkRun(t *testing.T, h dkHost, name string) *harness.DockerContainer {
	t.Helper()
	c, err := h.docker.Run(dkCtx(t, 30*time.Second), name, "sleep", "86400")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dkPing is a user's `docker exec <from> ping`: 3 pings 200 ms apart; it says how many came back.
func dkPing(t *testing.T, from *harness.DockerContainer, to netip.Addr) (received int, out string) {
	t.Helper()
	out, _ = from.Exec(dkCtx(t, 15*time.Second), "ping", "-c", "3", "-i", "0.2", "-W", "1", to.String())
	m := regexp.MustCompile(`(\d+) packets received`).FindStringSubmatch(out)
	if m == nil {
		return 0, out
	}
	received, _ = strconv.Atoi(m[1])
	return received, out
}

// dkIPTables is `iptables -L <chain> -v -n -x` in a host: counters included, for the log.
func dkIPTables(t *testing.T, h dkHost, chain string) string {
	t.Helper()
	out, err := h.node.Run(dkCtx(t, 5*time.Second), "iptables", "-L", chain, "-v", "-n", "-x")
	if err != nil {
		return err.Error()
	}
	return out
}

// dkWaitNoMasqueradeFirst waits until h's nat POSTROUTING jumps to XNET-POSTRTG before any
// MASQUERADE rule (xnetd's keeper restores that order within fwrules.DefaultInterval).
func dkWaitNoMasqueradeFirst(t *testing.T, h dkHost) {
	t.Helper()
	deadline := time.Now().Add(3 * fwrules.DefaultInterval)
	for {
		out, err := h.node.Run(dkCtx(t, 5*time.Second), "iptables", "-t", "nat", "-S", "POSTROUTING")
		jump, masq := strings.Index(out, "-j XNET-POSTRTG"), strings.Index(out, "-j MASQUERADE")
		if err == nil && jump >= 0 && (masq < 0 || jump < masq) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: nat POSTROUTING does not jump to XNET-POSTRTG before Docker's MASQUERADE after %v (%v):\n%s",
				h.node.Name, 3*fwrules.DefaultInterval, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var dkPolicyDrops = regexp.MustCompile(`Chain FORWARD \(policy DROP (\d+) packets`)

// dkForwardPolicyDrops is how many packets the FORWARD chain's policy DROP took in a host.
func dkForwardPolicyDrops(t *testing.T, h dkHost) int {
	t.Helper()
	out := dkIPTables(t, h, "FORWARD")
	m := dkPolicyDrops.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("%s: FORWARD policy is not DROP, so this test would prove nothing about Docker's firewall:\n%s", h.node.Name, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// dkRuleDrops is the packet counter of the DOCKER-USER rule that drops src.
func dkRuleDrops(t *testing.T, h dkHost, src netip.Addr) int {
	t.Helper()
	for _, line := range strings.Split(dkIPTables(t, h, "DOCKER-USER"), "\n") {
		f := strings.Fields(line)
		// pkts bytes target prot opt in out source destination
		if len(f) >= 8 && f[2] == "DROP" && f[7] == src.String() {
			n, _ := strconv.Atoi(f[0])
			return n
		}
	}
	t.Fatalf("%s: no DOCKER-USER rule dropping %v:\n%s", h.node.Name, src, dkIPTables(t, h, "DOCKER-USER"))
	return 0
}

// dkTxPackets is what a container has sent on eth0 so far.
func dkTxPackets(t *testing.T, c *harness.DockerContainer) int {
	t.Helper()
	out, err := c.Exec(dkCtx(t, 10*time.Second), "cat", "/sys/class/net/eth0/statistics/tx_packets")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("tx_packets of %s: %q", c.Name, out)
	}
	return n
}

// TestDockerContainersOnTwoHostsWorkAsTheTutorialPromises is the flannel tutorial's test with
// real Docker, for every backend: two hosts, xnetd on each, dockerd started from the options
// xnetd wrote, busybox containers.
func TestDockerContainersOnTwoHostsWorkAsTheTutorialPromises(t *testing.T) {
	if why := harness.DockerMissing(); why != "" {
		t.Skip(why)
	}
	for _, b := range dkBackends {
		t.Run(b.name, func(t *testing.T) { dkScenario(t, b.name, b.config, "--backend="+b.name) })
	}
}

func dkScenario(t *testing.T, backendName, config string, xnetdFlags ...string) {
	begin := time.Now()
	nodes, _ := xnetdtest.Cluster(t, 2, config, xnetdFlags...)
	dockers := harness.StartDockerForTest(t, nodes[0].Host, nodes[1].Host)
	hA, hB := dkHost{nodes[0], dockers[0]}, dkHost{nodes[1], dockers[1]}
	for _, h := range []dkHost{hA, hB} {
		t.Logf("%s: dockerd %s answered after %v (%s)", h.node.Name, strings.Join(h.docker.NetworkOptions, " "),
			h.docker.StartTime.Round(time.Millisecond), h.docker.StorageDriver)
	}
	// Runs before the Dockers stop: what Docker's firewall counted, when something failed.
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range []dkHost{hA, hB} {
				t.Logf("%s: iptables -L FORWARD -v -n -x\n%s", h.node.Name, dkIPTables(t, h, "FORWARD"))
			}
		}
	})
	a, a2, b := dkRun(t, hA, "a1"), dkRun(t, hA, "a2"), dkRun(t, hB, "b1")
	t.Logf("up after %v: a %v and a2 %v on %s, b %v on %s", time.Since(begin).Round(time.Millisecond),
		a.IP, a2.IP, hA.node.Name, b.IP, hB.node.Name)

	t.Run("containers on two hosts ping each other both ways", func(t *testing.T) {
		for _, p := range [][2]*harness.DockerContainer{{a, b}, {b, a}} {
			if got, out := dkPing(t, p[0], p[1].IP); got != 3 {
				t.Errorf("docker exec %s ping %v (%s -> %s): %d of 3 replies\n%s", p[0].Name, p[1].IP,
					p[0].Docker.Host.Name, p[1].Docker.Host.Name, got, out)
			}
		}
	})

	t.Run("Docker's FORWARD policy DROP takes no overlay packet", func(t *testing.T) {
		before := []int{dkForwardPolicyDrops(t, hA), dkForwardPolicyDrops(t, hB)}
		for _, h := range []dkHost{hA, hB} {
			if out := dkIPTables(t, h, "FORWARD"); !strings.Contains(out, "DOCKER-USER") {
				t.Fatalf("%s: FORWARD does not jump to DOCKER-USER:\n%s", h.node.Name, out)
			}
		}
		ok := 0
		for _, p := range [][2]*harness.DockerContainer{{a, b}, {b, a}, {a2, b}} {
			got, _ := dkPing(t, p[0], p[1].IP)
			ok += got
		}
		for i, h := range []dkHost{hA, hB} {
			if d := dkForwardPolicyDrops(t, h) - before[i]; d > 0 {
				t.Errorf("%s: the FORWARD policy dropped %d packets while containers pinged across hosts (%d of 9 replies)", h.node.Name, d, ok)
			}
		}
		if ok != 9 {
			t.Errorf("%d of 9 pings across hosts answered", ok)
		}
	})

	t.Run("a container started later answers its first ping from the other host", func(t *testing.T) {
		late := dkRun(t, hB, "late")
		if n := dkTxPackets(t, late); n != 0 {
			t.Logf("note: %s sent %d packets before anyone pinged it (Docker announces it?)", late.Name, n)
		}
		out, err := a.Exec(dkCtx(t, 10*time.Second), "ping", "-c", "1", "-W", "2", late.IP.String())
		if err != nil {
			t.Errorf("the first ping from %s (%v on %s) to the new %s (%v on %s) got no reply: %v\n%s",
				a.Name, a.IP, hA.node.Name, late.Name, late.IP, hB.node.Name, err, out)
			// Tell "never reachable" from "reachable once it has spoken".
			dkPing(t, late, a.IP)
			if got, _ := dkPing(t, a, late.IP); got == 3 {
				t.Logf("once %s has sent traffic itself, %s reaches it", late.Name, a.Name)
			}
		}
	})

	t.Run("a 10 MB TCP transfer between containers on two hosts arrives intact", func(t *testing.T) {
		ctx := dkCtx(t, 60*time.Second)
		// b serves a random file with busybox httpd; a fetches it with busybox wget.
		if _, err := b.Exec(ctx, "sh", "-c", "mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=10 2>/dev/null && httpd -p 8080 -h /www"); err != nil {
			t.Fatal(err)
		}
		want, err := b.Exec(ctx, "sha256sum", "/www/blob")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		got, err := a.Exec(ctx, "sh", "-c", fmt.Sprintf("set -o pipefail; timeout 10 wget -q -O - http://%v:8080/blob | sha256sum", b.IP))
		if err != nil {
			t.Fatalf("wget from %s: %v", a.Name, err)
		}
		if w, g := strings.Fields(want)[0], strings.Fields(got)[0]; w != g {
			t.Errorf("sha256 of what %s received is %s, %s sent %s", a.Name, g, b.Name, w)
		} else {
			t.Logf("10 MB arrived intact in %v", time.Since(start).Round(time.Millisecond))
		}
	})

	t.Run("a container sees a peer on another host by the peer's own address", func(t *testing.T) {
		// dockerd inserts its MASQUERADE rule at the top of POSTROUTING when it starts, after
		// xnetd; xnetd's keeper puts XNET-POSTRTG back in front within its interval (5 s).
		for _, h := range []dkHost{hA, hB} {
			dkWaitNoMasqueradeFirst(t, h)
		}
		for _, p := range [][2]*harness.DockerContainer{{a, b}, {b, a}} {
			if got := xnetdtest.SourceSeen(t, p[0].Namespace, p[1].Namespace, p[1].IP); got != p[0].IP {
				t.Errorf("%s (on %s) sees %s (%v on %s) as %v: masqueraded inside the overlay Network",
					p[1].Name, p[1].Docker.Host.Name, p[0].Name, p[0].IP, p[0].Docker.Host.Name, got)
			}
		}
	})

	t.Run("a DOCKER-USER rule on the receiving host drops a peer's packets before and after first contact", func(t *testing.T) {
		ctx := dkCtx(t, 30*time.Second)
		rule := []string{"DOCKER-USER", "-s", a.IP.String(), "-j", "DROP"}
		if _, err := hB.node.Run(ctx, "iptables", append([]string{"-I"}, rule...)...); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if _, err := hB.node.Run(context.Background(), "iptables", append([]string{"-D"}, rule...)...); err != nil {
				t.Errorf("remove the rule: %v", err)
			}
		})
		// A datapath that skips the host's stack (ebpf with bpf host routing) would skip the
		// rule too: xnetd notices it and moves container traffic onto the stack.
		dkWaitStackHonoursDockerUser(t, hB.node)
		// After the containers have talked (pings, the transfer above).
		if got, out := dkPing(t, a, b.IP); got != 0 {
			t.Errorf("%s reaches %s on %s although DOCKER-USER there drops %v: %d of 3 replies\n%s", a.Name, b.Name, hB.node.Name, a.IP, got, out)
		}
		// First contact: a container that has never sent anything.
		fresh := dkRun(t, hB, "fresh")
		if got, out := dkPing(t, a, fresh.IP); got != 0 {
			t.Errorf("%s reaches the new %s on %s although DOCKER-USER there drops %v: %d of 3 replies\n%s", a.Name, fresh.Name, hB.node.Name, a.IP, got, out)
		}
		if n := dkRuleDrops(t, hB, a.IP); n < 6 {
			t.Errorf("the DOCKER-USER rule counted %d packets, want the 6 pings it should have dropped", n)
		}
		// The rule is about a alone: a2 still reaches both.
		for _, to := range []*harness.DockerContainer{b, fresh} {
			if got, out := dkPing(t, a2, to.IP); got != 3 {
				t.Errorf("%s (not in the rule) reaches %s: %d of 3 replies\n%s", a2.Name, to.Name, got, out)
			}
		}
	})

	t.Run("kill -9 and restart of xnetd on both hosts under a 50 ms ping loses nothing", func(t *testing.T) {
		ctx := dkCtx(t, 60*time.Second)
		type result struct{ sent, got int }
		done := make(chan result, 1)
		go func() {
			sent, got, _ := harness.Ping(ctx, a.Namespace, b.IP, 120, 50*time.Millisecond) // 6 s
			done <- result{sent, got}
		}()
		for _, n := range nodes {
			time.Sleep(500 * time.Millisecond)
			if err := n.Proc.Kill(); err != nil {
				t.Errorf("kill -9 xnetd on %s: %v", n.Name, err)
			}
			n.StartDaemon(t)
			n.WaitReady(t)
		}
		r := <-done
		if r.sent < 100 || r.got != r.sent {
			t.Errorf("ping %s -> %s every 50 ms through kill -9 and restart of both xnetds: %d of %d replies", a.Name, b.Name, r.got, r.sent)
		} else {
			t.Logf("%d of %d replies", r.got, r.sent)
		}
	})
	t.Logf("%s: %v in all", t.Name(), time.Since(begin).Round(time.Millisecond))
}

// dkWaitStackHonoursDockerUser waits until xnetd on n says its datapath takes the host's stack
// (status mode "host routing kernel") after a DOCKER-USER rule appeared, for backends that
// have a host-routing mode at all; the others always take the stack.
func dkWaitStackHonoursDockerUser(t *testing.T, n *xnetdtest.Node) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st struct {
			Mode       string `json:"mode"`
			ModeReason string `json:"mode_reason"`
			Endpoints  []struct {
				Address, Path, Why string
			} `json:"endpoints"`
		}
		n.StatusInto(t, &st)
		if !strings.Contains(st.Mode, "host routing") {
			return
		}
		if strings.Contains(st.Mode, "host routing kernel") {
			t.Logf("%s: %s (%s)", n.Name, st.Mode, st.ModeReason)
			// Every learned container says it takes the stack now, and why.
			for _, e := range st.Endpoints {
				if e.Path != "stack" || !strings.Contains(e.Why, "DOCKER-USER") {
					t.Errorf("%s: endpoint %+v, want the stack path because of DOCKER-USER", n.Name, e)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("xnetd on %s still runs %q 10 s after a DOCKER-USER rule appeared; want host routing kernel so the rule sees every packet", n.Name, st.Mode)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
