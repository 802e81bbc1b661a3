package ipv6

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

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
			nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: tc.ipv6Underlay}, fmt.Sprintf(xnetdtest.DualStackConfig, tc.backend), "--backend", tc.backend)
			// docker0 with both families' gateways (host-gw probes the overlay from it), and
			// containers that reach each other over both.
			if failed := xnetdtest.DualStackMesh(xnetdtest.Containers(t, nodes)); len(failed) > 0 {
				t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
			}
			xnetdtest.WaitHealthy(t, nodes, 15*time.Second)
			for _, n := range nodes {
				out, code := n.Check(t)
				if code != 0 || !strings.Contains(out, "everything checked holds") || !strings.Contains(out, tc.where+" their 1 IPv6 subnets") {
					t.Errorf("xnetd check on the healthy %s: exit %d, want 0 and %q\n%s", n.Name, code, tc.where+" their 1 IPv6 subnets", out)
				}
			}
			a, b := nodes[0], nodes[1] // b loses its route to a's IPv6 subnet
			aSubnet, aSubnet6 := a.State(t).Lease.Subnet, a.State(t).Lease.IPv6Subnet
			var restore func(*testing.T)
			if tc.backend == "ebpf" {
				restore = dropRoute6(t, b, aSubnet6)
			} else {
				route := strings.TrimSpace(b.Out(t, "ip", "-6", "route", "show", "exact", aSubnet6.String()))
				if !strings.Contains(route, "dev "+tc.device) {
					t.Fatalf("%s's route to %v is %q, want one on %s", b.Name, aSubnet6, route, tc.device)
				}
				b.Sh(t, "ip", "-6", "route", "del", aSubnet6.String(), "dev", tc.device)
				restore = func(t *testing.T) { b.Sh(t, append([]string{"ip", "-6", "route", "add"}, strings.Fields(route)...)...) }
			}
			out, code := b.Check(t)
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
			if out, code := b.Check(t); code != 0 {
				t.Errorf("xnetd check on %s after the route came back: exit %d\n%s", b.Name, code, out)
			}
		})
	}
}
