package e2e

import (
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// xnetd check with wireguard in a dual-stack overlay in separate mode (xnet-wg for IPv4,
// xnet-wg-v6 over the IPv6 underlay): a healthy cluster passes, naming the device, wireguard's
// ports and both overlays' probes; each fault (the Network's route out of xnet-wg, the
// IPv6Network's out of xnet-wg-v6, a peer's IPv6 subnet's out of xnet-wg-v6, a firewall rule
// on ListenPort, one on ListenPortV6 over IPv6) fails the check naming it, and once undone the
// check passes again.
func TestCheckWireGuardDevicesRoutesAndPorts(t *testing.T) {
	nodes, _ := xnetdtest.ClusterOn(t, harness.Options{Hosts: 2, IPv6Underlay: true}, fmtDual("wireguard"), "--backend", "wireguard")
	for _, n := range nodes {
		out, code := n.Check(t)
		for _, want := range []string{"everything checked holds", "ok    device    xnet-wg up with", "drops UDP 51820 and 8473", "1 over the IPv6 overlay"} {
			if code != 0 || !strings.Contains(out, want) {
				t.Errorf("xnetd check on the healthy %s: exit %d, want 0 and %q\n%s", n.Name, code, want, out)
			}
		}
	}
	b := nodes[1]
	aSubnet6 := nodes[0].State(t).Lease.IPv6Subnet.String()
	faults := []struct {
		name            string
		inject, restore []string
		says            []string
	}{
		{"the Network's route out of xnet-wg",
			[]string{"ip", "route", "del", "10.244.0.0/16", "dev", "xnet-wg"},
			[]string{"ip", "route", "add", "10.244.0.0/16", "dev", "xnet-wg"},
			[]string{"FAIL  device", "no route 10.244.0.0/16 dev xnet-wg", "leaves unencrypted"}},
		{"the IPv6Network's route out of xnet-wg-v6",
			[]string{"ip", "-6", "route", "del", "fd00:10:244::/56", "dev", "xnet-wg-v6"},
			[]string{"ip", "-6", "route", "add", "fd00:10:244::/56", "dev", "xnet-wg-v6"},
			[]string{"FAIL  device", "no route fd00:10:244::/56 dev xnet-wg-v6"}},
		{"the route to a peer's IPv6 subnet out of xnet-wg-v6",
			[]string{"ip", "-6", "route", "del", aSubnet6, "dev", "xnet-wg-v6"},
			[]string{"ip", "-6", "route", "add", aSubnet6, "dev", "xnet-wg-v6"},
			[]string{"FAIL  routes", "the kernel's IPv6 routing table lacks " + aSubnet6, "unreachable over IPv6"}},
		{"a rule dropping ListenPort",
			[]string{"sh", "-c", "nft add table ip wgfw && nft add chain ip wgfw in '{ type filter hook input priority 0 ; }' && nft add rule ip wgfw in udp dport 51820 drop"},
			[]string{"nft", "delete", "table", "ip", "wgfw"},
			[]string{"FAIL  firewall", "drops UDP 51820 (wireguard: container traffic between hosts)", "nft delete rule ip wgfw in handle"}},
		{"a rule dropping ListenPortV6 over IPv6",
			[]string{"sh", "-c", "nft add table ip6 wgfw6 && nft add chain ip6 wgfw6 in '{ type filter hook input priority 0 ; }' && nft add rule ip6 wgfw6 in udp dport 51821 drop"},
			[]string{"nft", "delete", "table", "ip6", "wgfw6"},
			[]string{"FAIL  firewall", "drops UDP 51821 over IPv6 (xnet-wg-v6", "nft delete rule ip6 wgfw6 in handle"}},
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			b.Sh(t, f.inject...)
			out, code := b.Check(t)
			b.Sh(t, f.restore...)
			if code != 1 {
				t.Errorf("xnetd check on %s: exit %d, want 1\n%s", b.Name, code, out)
			}
			for _, want := range f.says {
				if !strings.Contains(out, want) {
					t.Errorf("xnetd check on %s does not say %q:\n%s", b.Name, want, out)
				}
			}
			if out, code := b.Check(t); code != 0 {
				t.Errorf("xnetd check on %s after the fault was undone: exit %d\n%s", b.Name, code, out)
			}
		})
	}
}

func fmtDual(backend string) string {
	return strings.Replace(xnetdtest.DualStackConfig, "%s", backend, 1)
}
