package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// portRule is a firewall rule that drops or rejects UDP to or from one of the ports xnet needs.
type portRule struct {
	Where string // "nftables table inet filter chain input (hook input) handle 7", "iptables-legacy: -A INPUT ..."
	Port  int
	// Hook is the netfilter hook of the rule's chain ("input", "output", ..., "" when unknown:
	// a chain reached by a jump, or iptables-legacy).
	Hook string
	// Netdev: the chain is in the netdev family (ingress/egress of one device).
	Netdev bool
	// Family is the nftables family of the rule's table ("ip", "ip6", "inet", "netdev", ...;
	// "ip" for iptables-legacy, "ip6" for ip6tables-legacy): which packets it can see.
	Family string
	// Delete is the command that removes the rule.
	Delete string
}

// firewallPortRules finds, in nftables (which also holds iptables-nft's rules) and in
// iptables-legacy, rules that drop or reject UDP to or from one of ports. It reads only
// what a rule states directly: a port matched by value, range or set, then a drop or reject
// verdict. A chain's default policy is not considered. A rule that drops several of ports is
// reported under the first of them.
func firewallPortRules(ctx context.Context, ports []int) ([]portRule, error) {
	found, err := nftPortRules(ports)
	found = append(found, legacyPortRules(ctx, "iptables-legacy", ports)...)
	return found, err
}

// firewallPortRulesIPv6 is firewallPortRules for the rules that see IPv6 packets: nftables'
// but those of the ip (IPv4) and arp families, and ip6tables-legacy's.
func firewallPortRulesIPv6(ctx context.Context, ports []int) ([]portRule, error) {
	all, err := nftPortRules(ports)
	var found []portRule
	for _, r := range all {
		if r.Family != "ip" && r.Family != "arp" {
			found = append(found, r)
		}
	}
	found = append(found, legacyPortRules(ctx, "ip6tables-legacy", ports)...)
	return found, err
}

func nftPortRules(ports []int) ([]portRule, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	defer conn.CloseLasting()
	chains, err := conn.ListChains()
	if err != nil {
		return nil, fmt.Errorf("nftables: list chains: %w", err)
	}
	var found []portRule
	for _, ch := range chains {
		rules, err := conn.GetRules(ch.Table, ch)
		if err != nil {
			continue
		}
		for _, r := range rules {
			port, ok := ruleDropsPort(conn, ch.Table, r.Exprs, ports)
			if !ok {
				continue
			}
			fam := familyName(ch.Table.Family)
			hook := hookName(ch)
			where := fmt.Sprintf("nftables table %s %s chain %s", fam, ch.Table.Name, ch.Name)
			if hook != "" {
				where += " (hook " + hook + ")"
			}
			found = append(found, portRule{
				Where: fmt.Sprintf("%s handle %d", where, r.Handle), Port: port, Hook: hook,
				Netdev: ch.Table.Family == nftables.TableFamilyNetdev, Family: fam,
				Delete: fmt.Sprintf("nft delete rule %s %s %s handle %d", fam, ch.Table.Name, ch.Name, r.Handle),
			})
		}
	}
	return found, nil
}

// ruleDropsPort reads a rule's expressions: registers loaded with the L4 protocol or a UDP/TCP
// port, compared with UDP or one of ports, and a final drop or reject.
func ruleDropsPort(conn *nftables.Conn, table *nftables.Table, exprs []expr.Any, ports []int) (int, bool) {
	const (
		loadL4 = iota + 1
		loadPort
	)
	loaded := map[uint32]int{}
	notUDP, port, drops := false, 0, false
	matchPort := func(data []byte) int {
		if len(data) < 2 {
			return 0
		}
		p := int(binary.BigEndian.Uint16(data))
		if slices.Contains(ports, p) {
			return p
		}
		return 0
	}
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.Key == expr.MetaKeyL4PROTO && !e.SourceRegister {
				loaded[e.Register] = loadL4
			}
		case *expr.Payload:
			switch {
			case e.Base == expr.PayloadBaseNetworkHeader && e.Offset == 9 && e.Len == 1:
				loaded[e.DestRegister] = loadL4 // IPv4 protocol
			case e.Base == expr.PayloadBaseTransportHeader && (e.Offset == 0 || e.Offset == 2) && e.Len == 2:
				loaded[e.DestRegister] = loadPort // source or destination port
			default:
				delete(loaded, e.DestRegister)
			}
		case *expr.Cmp:
			if e.Op != expr.CmpOpEq {
				continue
			}
			switch loaded[e.Register] {
			case loadL4:
				notUDP = notUDP || len(e.Data) != 1 || e.Data[0] != unix.IPPROTO_UDP
			case loadPort:
				if p := matchPort(e.Data); p != 0 {
					port = p
				}
			}
		case *expr.Range:
			if e.Op == expr.CmpOpEq && loaded[e.Register] == loadPort && len(e.FromData) == 2 && len(e.ToData) == 2 {
				from, to := int(binary.BigEndian.Uint16(e.FromData)), int(binary.BigEndian.Uint16(e.ToData))
				if i := slices.IndexFunc(ports, func(p int) bool { return from <= p && p <= to }); i >= 0 {
					port = ports[i]
				}
			}
		case *expr.Lookup:
			if loaded[e.SourceRegister] != loadPort || e.Invert {
				continue
			}
			if p := lookupPort(conn, table, e.SetName, matchPort); p != 0 {
				port = p
			}
		case *expr.Verdict:
			drops = e.Kind == expr.VerdictDrop
		case *expr.Reject:
			drops = true
		case *expr.Target:
			drops = e.Name == "REJECT" || e.Name == "DROP"
		}
	}
	return port, port != 0 && drops && !notUDP
}

// lookupPort finds one of the ports among a set's elements (plain elements and the starts of
// intervals).
func lookupPort(conn *nftables.Conn, table *nftables.Table, name string, match func([]byte) int) int {
	set, err := conn.GetSetByName(table, name)
	if err != nil {
		return 0
	}
	elems, err := conn.GetSetElements(set)
	if err != nil {
		return 0
	}
	for i, el := range elems {
		if el.IntervalEnd {
			continue
		}
		if p := match(el.Key); p != 0 {
			return p
		}
		// An interval [start, next element's key) holds the port too.
		if set.Interval && i+1 < len(elems) && elems[i+1].IntervalEnd && len(el.Key) == 2 && len(elems[i+1].Key) == 2 {
			from, to := binary.BigEndian.Uint16(el.Key), binary.BigEndian.Uint16(elems[i+1].Key)
			for p := uint32(from); p < uint32(to); p++ {
				if m := match(binary.BigEndian.AppendUint16(nil, uint16(p))); m != 0 {
					return m
				}
			}
		}
	}
	return 0
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyNetdev:
		return "netdev"
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyARP:
		return "arp"
	}
	return strconv.Itoa(int(f))
}

func hookName(ch *nftables.Chain) string {
	if ch.Hooknum == nil {
		return ""
	}
	if ch.Table.Family == nftables.TableFamilyNetdev {
		switch *ch.Hooknum {
		case *nftables.ChainHookIngress:
			return "ingress"
		case *nftables.ChainHookEgress:
			return "egress"
		}
	}
	switch *ch.Hooknum {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookInput:
		return "input"
	case *nftables.ChainHookForward:
		return "forward"
	case *nftables.ChainHookOutput:
		return "output"
	case *nftables.ChainHookPostrouting:
		return "postrouting"
	}
	return ""
}

// legacyPortRules reads <tool>-save (iptables-legacy or ip6tables-legacy, when installed): its
// rules are invisible to nftables.
func legacyPortRules(ctx context.Context, tool string, ports []int) []portRule {
	family := "ip"
	if strings.HasPrefix(tool, "ip6") {
		family = "ip6"
	}
	path, err := exec.LookPath(tool + "-save")
	if err != nil {
		return nil
	}
	out, err := exec.CommandContext(ctx, path).Output()
	if err != nil {
		return nil
	}
	var found []portRule
	table := ""
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		line := sc.Text()
		if t, ok := strings.CutPrefix(line, "*"); ok {
			table = t
			continue
		}
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		if p := legacyRuleDropsPort(strings.Fields(line), ports); p != 0 {
			found = append(found, portRule{
				Where: fmt.Sprintf("%s table %s: %s", tool, table, line), Port: p, Family: family,
				Delete: fmt.Sprintf("%s -t %s -D%s", tool, table, strings.TrimPrefix(line, "-A")),
			})
		}
	}
	return found
}

// legacyRuleDropsPort reads one iptables-save rule: -p udp (or no -p), a port option naming
// one of ports, -j DROP or REJECT.
func legacyRuleDropsPort(f []string, ports []int) int {
	udp, port, drops := true, 0, false
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "-p", "--protocol":
			udp = f[i+1] == "udp" || f[i+1] == "17"
		case "--dport", "--sport", "--destination-port", "--source-port", "--dports", "--sports":
			for _, v := range strings.Split(f[i+1], ",") {
				lo, hi, isRange := strings.Cut(v, ":")
				from, err1 := strconv.Atoi(lo)
				to, err2 := strconv.Atoi(hi)
				if !isRange {
					to, err2 = from, err1
				}
				if err1 != nil || err2 != nil {
					continue
				}
				if i := slices.IndexFunc(ports, func(p int) bool { return from <= p && p <= to }); i >= 0 && port == 0 {
					port = ports[i]
				}
			}
		case "-j":
			drops = f[i+1] == "DROP" || f[i+1] == "REJECT"
		}
	}
	if udp && drops {
		return port
	}
	return 0
}
