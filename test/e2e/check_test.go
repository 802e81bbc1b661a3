package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/xnet-dev/xnet/test/harness"
)

// TestCheckFollowsTheContainerBridge: `xnetd check` inspects the ebpf programs on the container
// bridge the daemon found, whatever it is called, and on the veths of its containers: a
// container veth that lost its program is reported by name.
func TestCheckFollowsTheContainerBridge(t *testing.T) {
	nodes, _ := xdCluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	for _, n := range nodes {
		n.UseBridgeName("cbr0")
	}
	cs := xdContainers(t, nodes)
	if failed := xdMesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	a := nodes[0]
	// The daemon attaches to a bridge it finds through the link watch: wait until check sees
	// the veth's program there too (4: decap on eth0, encap on xnet0, deliver on cbr0, encap on the veth; 2 when check
	// looked at docker0 only).
	var out string
	var code int
	for deadline := time.Now().Add(10 * time.Second); ; {
		out, code = a.check(t)
		if code == 0 && strings.Contains(out, "4 programs attached") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("xnetd check on %s with containers on cbr0: exit %d, want 0 and the programs on cbr0 and its veth counted:\n%s", a.Name, code, out)
		}
		time.Sleep(200 * time.Millisecond)
	}

	veth := cs[0].Veth
	pin := filepath.Join(a.BPFFS, fmt.Sprintf("link_ingress_%d", a.ifindex(t, veth)))
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatalf("the container veth %s on cbr0 has no pinned encap link: %v", veth, err)
	}
	if err := lk.Unpin(); err != nil {
		t.Fatal(err)
	}
	lk.Close()
	out, code = a.check(t)
	if code == 0 || !strings.Contains(out, "encap_container is not attached to "+veth+"'s TC ingress") {
		t.Errorf("xnetd check after the encap program left %s: exit %d, want a failure naming it:\n%s", veth, code, out)
	}
}

// TestCheckDualStackNamesAMissingIPv6Route: in a dual-stack overlay `xnetd check` compares the
// routes to the peers' IPv6 subnets too, where each backend keeps them (ebpf's routes6 map, the
// kernel's IPv6 routes on its device, or via the peer's PublicIPv6 for host-gw). A healthy
// cluster passes; with one peer's IPv6 route gone and its IPv4 route intact the check fails
// naming the IPv6 subnet as a routes problem, and it passes again once the route is back.
func TestCheckDualStackNamesAMissingIPv6Route(t *testing.T) {
	for _, tc := range []struct {
		backend      string
		ipv6Underlay bool
		device       string // where the kernel route to a peer's IPv6 subnet is ("" for ebpf)
		where        string
	}{
		{"ebpf", false, "", "the BPF routes6 map"},
		{"vxlan", true, "xnet-v6.1", "the kernel's IPv6 routing table"},
		{"udp", false, "xnet0", "the kernel's IPv6 routing table"},
		{"host-gw", true, "eth0", "the kernel's IPv6 routing table"},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			nodes, _ := xdClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: tc.ipv6Underlay}, fmtDual(tc.backend), "--backend", tc.backend)
			// docker0 with both families' gateways (host-gw probes the overlay from it), and
			// containers that reach each other over both.
			if failed := dualMesh(xdContainers(t, nodes)); len(failed) > 0 {
				t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
			}
			hcWaitHealthy(t, nodes, 15*time.Second)
			for _, n := range nodes {
				out, code := n.check(t)
				if code != 0 || !strings.Contains(out, "everything checked holds") || !strings.Contains(out, tc.where+" their 1 IPv6 subnets") {
					t.Errorf("xnetd check on the healthy %s: exit %d, want 0 and %q\n%s", n.Name, code, tc.where+" their 1 IPv6 subnets", out)
				}
			}
			a, b := nodes[0], nodes[1] // b loses its route to a's IPv6 subnet
			aSubnet, aSubnet6 := a.state(t).Lease.Subnet, a.state(t).Lease.IPv6Subnet
			var restore func(*testing.T)
			if tc.backend == "ebpf" {
				restore = dropRoute6(t, b, aSubnet6)
			} else {
				route := strings.TrimSpace(b.out(t, "ip", "-6", "route", "show", "exact", aSubnet6.String()))
				if !strings.Contains(route, "dev "+tc.device) {
					t.Fatalf("%s's route to %v is %q, want one on %s", b.Name, aSubnet6, route, tc.device)
				}
				b.sh(t, "ip", "-6", "route", "del", aSubnet6.String(), "dev", tc.device)
				restore = func(t *testing.T) { b.sh(t, append([]string{"ip", "-6", "route", "add"}, strings.Fields(route)...)...) }
			}
			out, code := b.check(t)
			restore(t)
			if code != 1 {
				t.Errorf("xnetd check on %s without its route to %v: exit %d, want 1\n%s", b.Name, aSubnet6, code, out)
			}
			for _, want := range []string{"FAIL  routes", fmt.Sprintf("%s lacks %v", tc.where, aSubnet6), "unreachable over IPv6 from here", "systemctl restart xnetd"} {
				if !strings.Contains(out, want) {
					t.Errorf("xnetd check on %s does not say %q:\n%s", b.Name, want, out)
				}
			}
			if strings.Contains(out, "lacks "+aSubnet.String()) {
				t.Errorf("xnetd check on %s blames the IPv4 route to %v, which is there:\n%s", b.Name, aSubnet, out)
			}
			if out, code := b.check(t); code != 0 {
				t.Errorf("xnetd check on %s after the route came back: exit %d\n%s", b.Name, code, out)
			}
		})
	}
}
