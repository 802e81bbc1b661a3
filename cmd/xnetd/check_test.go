package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/test/harness"
)

// The rules `nft` and iptables-nft make for "drop UDP to port P", as expressions.
func portExprs(l4 byte, offset uint32, port uint16, verdict expr.Any) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{l4}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(port >> 8), byte(port)}},
		&expr.Counter{},
		verdict,
	}
}

func TestFirewallRulesDroppingTheOverlayPortsAreRecognised(t *testing.T) {
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	ports := []int{8472, 8473}
	tests := []struct {
		name  string
		exprs []expr.Any
		want  int
	}{
		{"udp dport 8472 drop", portExprs(unix.IPPROTO_UDP, 2, 8472, drop), 8472},
		{"udp sport 8473 drop", portExprs(unix.IPPROTO_UDP, 0, 8473, drop), 8473},
		{"udp dport 8472 reject", portExprs(unix.IPPROTO_UDP, 2, 8472, &expr.Reject{}), 8472},
		{"iptables-nft -j REJECT", portExprs(unix.IPPROTO_UDP, 2, 8472, &expr.Target{Name: "REJECT"}), 8472},
		{"udp dport 8472 accept", portExprs(unix.IPPROTO_UDP, 2, 8472, accept), 0},
		{"tcp dport 8472 drop", portExprs(unix.IPPROTO_TCP, 2, 8472, drop), 0},
		{"udp dport 53 drop", portExprs(unix.IPPROTO_UDP, 2, 53, drop), 0},
		{"udp dport 8000-9000 drop", []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{0x1f, 0x40}, ToData: []byte{0x23, 0x28}},
			drop,
		}, 8472},
		{"a port compared after another load of the register does not count", []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x21, 0x18, 0, 0}},
			drop,
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ruleDropsPort(nil, nil, tt.exprs, ports)
			if (tt.want != 0) != ok || (ok && got != tt.want) {
				t.Errorf("ruleDropsPort = %d, %v; want %d", got, ok, tt.want)
			}
		})
	}
}

func TestLegacyIptablesRulesDroppingTheOverlayPortsAreRecognised(t *testing.T) {
	ports := []int{8472, 8473}
	for _, tt := range []struct {
		rule string
		want int
	}{
		{"-A INPUT -p udp -m udp --dport 8472 -j DROP", 8472},
		{"-A INPUT -p udp -m multiport --dports 53,8470:8479 -j REJECT --reject-with icmp-port-unreachable", 8472},
		{"-A OUTPUT -p udp -m udp --sport 8473 -j DROP", 8473},
		{"-A INPUT -p tcp -m tcp --dport 8472 -j DROP", 0},
		{"-A INPUT -p udp -m udp --dport 8472 -j ACCEPT", 0},
		{"-A INPUT -p udp -m udp --dport 4789 -j DROP", 0},
	} {
		if got := legacyRuleDropsPort(strings.Fields(tt.rule), ports); got != tt.want {
			t.Errorf("%q: %d, want %d", tt.rule, got, tt.want)
		}
	}
}

// Real rules in a host's nftables, as an administrator writes them: a set of ports, a plain
// match in a netdev egress chain, and a rule that does not drop.
func TestFirewallPortRulesReadsTheKernelsRuleset(t *testing.T) {
	h := harness.NewForTest(t, harness.Options{Hosts: 1}).Hosts()[0]
	for _, cmd := range []string{
		"add table inet fw",
		"add chain inet fw in { type filter hook input priority 0 ; }",
		"add rule inet fw in udp dport { 53, 8472 } drop",
		"add rule inet fw in udp dport 8473 accept",
		"add table netdev nd",
		"add chain netdev nd out { type filter hook egress device eth0 priority 0 ; }",
		"add rule netdev nd out udp sport 8473 drop",
	} {
		if out, err := h.Run(t.Context(), "nft", cmd); err != nil {
			t.Fatalf("nft %s: %v\n%s", cmd, err, out)
		}
	}
	var rules []portRule
	if err := h.Do(func() error {
		var err error
		rules, err = firewallPortRules(t.Context(), []int{8472, 8473})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rules {
		if strings.HasPrefix(r.Where, "nftables") {
			// Handles are the kernel's to number: keep the command without it.
			del, _, _ := strings.Cut(r.Delete, " handle ")
			got = append(got, fmt.Sprintf("%d %s netdev=%v: %s handle N", r.Port, r.Hook, r.Netdev, del))
		}
	}
	want := []string{
		"8472 input netdev=false: nft delete rule inet fw in handle N",
		"8473 egress netdev=true: nft delete rule netdev nd out handle N",
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("found\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
