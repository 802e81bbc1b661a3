package fwrules

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// family is one address family's iptables tools, by the name of its binary: iptables (IPv4)
// or ip6tables (IPv6). Each has its own variants, tables and Docker chains.
type family string

const (
	familyIPv4 family = "iptables"
	familyIPv6 family = "ip6tables"
)

// The two iptables variants, as `iptables --version` names them in parentheses.
const (
	modeNFT    = "nf_tables"
	modeLegacy = "legacy"
)

// commandTimeout bounds one iptables command: a wedged binary (or one waiting forever for the
// xtables lock) must not stop the daemon's checks for good.
const commandTimeout = 30 * time.Second

// variant is one iptables implementation installed on the host, with its save and restore
// companions.
type variant struct {
	name       string // "iptables-nft", "iptables-legacy" or "iptables" (ip6tables-... for IPv6)
	mode       string
	saveBin    string // path of <name>-save
	restoreBin string // path of <name>-restore
}

// foundVariants are the variants on PATH and the mode of plain `iptables` ("" without one).
type foundVariants struct {
	variants []variant
	pathMode string
}

// findVariants looks up iptables-nft and iptables-legacy (Debian and Ubuntu ship both), and
// plain `iptables` for the mode Docker will use; where only `iptables` exists (RHEL has no
// iptables-nft name, Alpine's may be legacy only) it stands for its own mode. For IPv6 the
// same with ip6tables.
func findVariants(ctx context.Context, fam family) (foundVariants, error) {
	var f foundVariants
	for _, c := range []struct{ name, mode string }{{string(fam) + "-nft", modeNFT}, {string(fam) + "-legacy", modeLegacy}} {
		if v, ok := lookVariant(c.name, c.mode); ok {
			f.variants = append(f.variants, v)
		}
	}
	bin, err := exec.LookPath(string(fam))
	if err != nil {
		return f, nil
	}
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return f, fmt.Errorf("%s --version: %w", bin, err)
	}
	f.pathMode = versionMode(string(out))
	for _, v := range f.variants {
		if v.mode == f.pathMode {
			return f, nil
		}
	}
	if v, ok := lookVariant(string(fam), f.pathMode); ok {
		f.variants = append(f.variants, v)
	}
	return f, nil
}

func lookVariant(name, mode string) (variant, bool) {
	v := variant{name: name, mode: mode}
	for _, p := range []struct {
		dst    *string
		suffix string
	}{{&v.saveBin, "-save"}, {&v.restoreBin, "-restore"}} {
		path, err := exec.LookPath(name + p.suffix)
		if err != nil {
			return v, false
		}
		*p.dst = path
	}
	return v, true
}

// versionMode reads the mode from `iptables --version`: "iptables v1.8.9 (nf_tables)" or
// "iptables v1.8.9 (legacy)"; versions before 1.8 print no mode and are legacy.
func versionMode(out string) string {
	if strings.Contains(out, "("+modeNFT+")") {
		return modeNFT
	}
	return modeLegacy
}

// save reads the variant's whole ruleset with <variant>-save. It creates nothing: legacy
// save lists only the tables the kernel already has, nft save only existing nftables tables.
func (v variant) save(ctx context.Context) (ruleset, error) {
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, v.saveBin)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s: %w: %s", v.saveBin, err, strings.TrimSpace(stderr.String()))
	}
	rs, err := parseSave(stdout.String())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", v.saveBin, err)
	}
	return rs, nil
}

// restore applies one batch with <variant>-restore --noflush: the rest of the table is
// untouched, and the batch commits as a whole or not at all. --wait queues behind Docker
// (which holds the xtables lock while it changes legacy tables) instead of failing.
func (v variant) restore(ctx context.Context, input string) error {
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, v.restoreBin, "--noflush", "--wait=10")
	cmd.Stdin = strings.NewReader(input)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s --noflush: %w: %s (input:\n%s)", v.restoreBin, err, strings.TrimSpace(out.String()), input)
	}
	return nil
}

// ruleset is what iptables-save printed, by table name.
type ruleset map[string]*table

// table is one table of a ruleset.
type table struct {
	name   string
	chains map[string]string // chain name -> policy ("-" for a user chain)
	rules  []rule            // in the order they are evaluated within each chain
}

// rule is one "-A <chain> <spec>" line.
type rule struct {
	chain  string
	spec   string // as iptables-save printed it: iptables-restore reads it back unchanged
	target string // the argument of the last -j, "" for none
}

// parseSave reads iptables-save output: "*table", ":chain policy [counters]",
// "-A chain spec", "COMMIT", and "#" comments.
func parseSave(out string) (ruleset, error) {
	rs := ruleset{}
	var cur *table
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			cur = &table{name: line[1:], chains: map[string]string{}}
			rs[cur.name] = cur
		case line == "COMMIT":
			cur = nil
		case cur == nil:
			return nil, fmt.Errorf("line %d %q outside a table", n, line)
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) < 2 {
				return nil, fmt.Errorf("line %d: chain line %q has no policy", n, line)
			}
			cur.chains[f[0]] = f[1]
		case strings.HasPrefix(line, "-A "):
			chain, spec, _ := strings.Cut(line[3:], " ")
			cur.rules = append(cur.rules, rule{chain: chain, spec: spec, target: target(spec)})
		default:
			return nil, fmt.Errorf("line %d: %q is not a table, chain or rule", n, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return rs, nil
}

// target is the argument of the last -j in spec (matches print before the target, so a -j
// inside a quoted comment comes first and loses).
func target(spec string) string {
	f := strings.Fields(spec)
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "--jump" {
			return f[i+1]
		}
	}
	return ""
}

// table returns the named table, empty when the variant does not have it.
func (rs ruleset) table(name string) *table {
	if t, ok := rs[name]; ok {
		return t
	}
	return &table{name: name, chains: map[string]string{}}
}

// rulesOf are chain's rules in order.
func (t *table) rulesOf(chain string) []rule {
	var out []rule
	for _, r := range t.rules {
		if r.chain == chain {
			out = append(out, r)
		}
	}
	return out
}

// chainRules are the specs of chain's rules, and whether the chain exists.
func (t *table) chainRules(chain string) ([]string, bool) {
	if _, ok := t.chains[chain]; !ok {
		return nil, false
	}
	var specs []string
	for _, r := range t.rulesOf(chain) {
		specs = append(specs, r.spec)
	}
	return specs, true
}

// hasDocker says whether dockerd set this variant up: it creates DOCKER-USER and DOCKER in
// filter, and DOCKER in nat, at its start.
func (rs ruleset) hasDocker() bool {
	f, n := rs.table("filter"), rs.table("nat")
	_, user := f.chains["DOCKER-USER"]
	_, fdocker := f.chains["DOCKER"]
	_, ndocker := n.chains["DOCKER"]
	return user || fdocker || ndocker
}

// foreignRules counts what someone other than us put in this variant: rules, user chains and
// built-in chains whose policy is not ACCEPT.
func (rs ruleset) foreignRules() int {
	ours := []string{ForwardChain, PostroutingChain}
	n := 0
	for _, t := range rs {
		for c, policy := range t.chains {
			if !slices.Contains(ours, c) && policy != "ACCEPT" {
				n++
			}
		}
		for _, r := range t.rules {
			if !slices.Contains(ours, r.chain) && !slices.Contains(ours, r.target) {
				n++
			}
		}
	}
	return n
}
