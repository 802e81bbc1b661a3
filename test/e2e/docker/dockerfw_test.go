package docker

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// dockerdStart is what dockerd 20.10 adds to iptables when it starts with --bip in subnet and
// --ip-masq=true: FORWARD policy DROP, its chains, and its rules inserted at the top of
// FORWARD and POSTROUTING (it uses -I), without flushing anything else. %[1]s is the subnet.
const dockerdStart = `*filter
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-I FORWARD 1 -i docker0 -o docker0 -j ACCEPT
-I FORWARD 1 -i docker0 ! -o docker0 -j ACCEPT
-I FORWARD 1 -o docker0 -j DOCKER
-I FORWARD 1 -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-I FORWARD 1 -j DOCKER-ISOLATION-STAGE-1
-I FORWARD 1 -j DOCKER-USER
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:DOCKER - [0:0]
-I PREROUTING 1 -m addrtype --dst-type LOCAL -j DOCKER
-I OUTPUT 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-I POSTROUTING 1 -s %[1]s ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
`

// playDockerd applies dockerdStart on host h with `iptables-restore` from PATH, as dockerd
// runs `iptables` from PATH.
func playDockerd(t *testing.T, h *harness.Host) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+h.Path(), "--", "iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(fmt.Sprintf(dockerdStart, h.Docker0Subnet()))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("dockerd's rules on %s: %v\n%s", h.Name, err, out)
	}
}

func iptablesSave(t *testing.T, h *harness.Host) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "iptables-save")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDockerFirewallContainersOnTwoHostsReachEachOther: dockerd starts after xnetd on every
// host (FORWARD policy DROP, its MASQUERADE inserted first in POSTROUTING), and containers on
// different hosts still reach each other, each seeing the other's own address, with every
// backend; without xnetd's forward rules Docker drops the overlay.
func TestDockerFirewallContainersOnTwoHostsReachEachOther(t *testing.T) {
	for _, tool := range []string{"iptables-restore", "iptables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian package iptables; .ci/run installs it)", tool)
		}
	}
	for _, c := range []struct {
		backend string
		extra   []string
		reach   bool
	}{
		{backend: "vxlan", reach: true},
		{backend: "udp", reach: true},
		{backend: "host-gw", reach: true},
		{backend: "ebpf", reach: true},
		{backend: "vxlan", extra: []string{"--iptables-forward-rules=false"}, reach: false},
	} {
		name := c.backend + strings.Join(c.extra, "")
		t.Run(name, func(t *testing.T) {
			config := fmt.Sprintf(`{"Network":"10.244.0.0/16","Backend":{"Type":%q}}`, c.backend)
			nodes, topo := xnetdtest.Cluster(t, 2, config, append([]string{"--backend=" + c.backend}, c.extra...)...)
			cs := xnetdtest.Containers(t, nodes)
			for _, n := range nodes {
				playDockerd(t, n.Host)
			}
			if !c.reach {
				if failed := xnetdtest.Mesh(cs); len(failed) != 2 {
					t.Errorf("with dockerd's FORWARD DROP and no forward rules %d of 2 directions failed, want both: %q", len(failed), failed)
				}
				return
			}
			// dockerd put its MASQUERADE in front of our jump; the next check (every 5 s) puts
			// ours back in front.
			for _, n := range nodes {
				deadline := time.Now().Add(8 * time.Second)
				for !postroutingFirst(iptablesSave(t, n.Host), "XNET-POSTRTG") {
					if time.Now().After(deadline) {
						t.Fatalf("%s: our POSTROUTING jump is not first 8 s after dockerd started:\n%s", n.Name, iptablesSave(t, n.Host))
					}
					time.Sleep(200 * time.Millisecond)
				}
			}
			if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
				t.Errorf("under dockerd's firewall: %q", failed)
			}
			if got := xnetdtest.SourceSeen(t, cs[0].Namespace, cs[1].Namespace, cs[1].IP); got != cs[0].IP {
				t.Errorf("the remote container saw %v, want the container's own %v", got, cs[0].IP)
			}
			if got := xnetdtest.SourceSeen(t, cs[1].Namespace, cs[0].Namespace, cs[0].IP); got != cs[1].IP {
				t.Errorf("the remote container saw %v, want the container's own %v", got, cs[1].IP)
			}
			n := nodes[0]
			if err := n.Proc.Stop(); err != nil {
				t.Fatal(err)
			}
			n.Teardown(t, topo)
			if s := iptablesSave(t, n.Host); strings.Contains(s, "XNET") || !strings.Contains(s, "-j MASQUERADE") {
				t.Errorf("after teardown, iptables-save: want dockerd's rules and none of ours:\n%s", s)
			}
		})
	}
}

// postroutingFirst says whether the first rule of nat POSTROUTING in iptables-save output
// jumps to chain.
func postroutingFirst(save, chain string) bool {
	for l := range strings.SplitSeq(save, "\n") {
		if strings.HasPrefix(l, "-A POSTROUTING ") {
			return strings.HasSuffix(l, "-j "+chain)
		}
	}
	return false
}
