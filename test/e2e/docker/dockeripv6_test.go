package docker

// Docker in IPv6-only overlays: dockerd's ip6tables firewall in front of xnetd's rules, and real
// dockerd started from the options xnetd wrote. Helpers of the Docker tests are prefixed dk.

import (
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// dockerdStart6 is dockerdStart for ip6tables, as dockerd with --ipv6 --fixed-cidr-v6 (and
// ip6tables on, Docker 27's default) adds it: FORWARD policy DROP, its chains, its rules first
// in FORWARD and POSTROUTING. %[1]s is the IPv6 subnet.
func dockerdStart6() string {
	return strings.Replace(dockerdStart, "! -d 127.0.0.0/8", "! -d ::1/128", 1)
}

// TestIPv6OnlyDockerFirewall: dockerd with IPv6 starts after xnetd on every host of an
// IPv6-only overlay (ip6tables FORWARD policy DROP, its MASQUERADE first in POSTROUTING), and
// containers on different hosts still reach each other over IPv6, each seeing the other's own
// address: xnetd keeps XNET-FWD and XNET-POSTRTG for the IPv6Network in ip6tables, and no
// iptables rule of its own.
func TestIPv6OnlyDockerFirewall(t *testing.T) {
	if _, err := exec.LookPath("ip6tables-restore"); err != nil {
		t.Fatalf("ip6tables-restore (installed by .ci/run): %v", err)
	}
	nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: true}, fmt.Sprintf(xnetdtest.IPv6OnlyConfig, "vxlan", false), "--backend", "vxlan")
	cs := xnetdtest.Containers(t, nodes)
	for _, n := range nodes {
		cmd := exec.Command("nsenter", "--net="+n.Path(), "--", "ip6tables-restore", "--noflush")
		cmd.Stdin = strings.NewReader(fmt.Sprintf(dockerdStart6(), n.Docker0IPv6().Masked()))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("dockerd's ip6tables rules on %s: %v\n%s", n.Name, err, out)
		}
	}
	// Docker put its MASQUERADE in front of our POSTROUTING jump: xnetd moves it back within
	// moments (it watches nf_tables).
	for _, n := range nodes {
		deadline := time.Now().Add(5 * time.Second)
		for {
			post := n.Out(t, "ip6tables", "-t", "nat", "-S", "POSTROUTING")
			fwd := n.Out(t, "ip6tables-save", "-t", "filter")
			if ours := strings.Index(post, "XNET-POSTRTG"); ours >= 0 && ours < strings.Index(post, "MASQUERADE") &&
				strings.Contains(fwd, "-A XNET-FWD -s fd00:10:244::/56 -j ACCEPT") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: ip6tables without our rules in place after 5 s:\n%s\n%s", n.Name, post, fwd)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if v4 := n.Out(t, "iptables-save"); strings.Contains(v4, "XNET-") {
			t.Errorf("%s: iptables rules of ours in an IPv6-only overlay:\n%s", n.Name, v4)
		}
	}
	if failed := xnetdtest.IPv6Mesh(cs); len(failed) > 0 {
		t.Fatalf("pings failed behind Docker's ip6tables firewall:\n%s", strings.Join(failed, "\n"))
	}
	src, err := harness.SourceSeen(cs[0].Namespace, cs[1].Namespace, cs[1].IPv6, 3)
	if err != nil || src != cs[0].IPv6 {
		t.Errorf("%s's container saw %v (%v), want the sender's own address %v (not masqueraded)", nodes[1].Name, src, err, cs[0].IPv6)
	}
}

// TestDockerIPv6OnlyEBPF: real Docker on two ebpf hosts of an IPv6-only overlay, dockerd started
// from the options xnetd wrote (--ipv6 --fixed-cidr-v6, and Docker's default IPv4 bridge, which
// is not the overlay's). The backend finds docker0 by its IPv6 gateway in our lease, and busybox
// containers reach each other over IPv6 through the fast path.
func TestDockerIPv6OnlyEBPF(t *testing.T) {
	if why := harness.DockerMissing(); why != "" {
		t.Skip(why)
	}
	nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: true}, fmt.Sprintf(xnetdtest.IPv6OnlyConfig, "ebpf", false), "--backend=ebpf")
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
	nodes[0].StatusInto(t, &st)
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
