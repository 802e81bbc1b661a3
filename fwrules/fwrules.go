// Package fwrules keeps the overlay forwarded and unmasqueraded on a host whose iptables
// firewall belongs to Docker: rules in the iptables filter FORWARD and nat POSTROUTING chains,
// in chains of our own, kept in place while Docker comes, goes and rebuilds its own.
//
// It owns two chains and one jump to each, in the iptables variant (iptables-nft or
// iptables-legacy) that holds Docker's rules:
//
//	filter XNET-FWD:      -s <Network> -j ACCEPT; -d <Network> -j ACCEPT (and -i/-o <pattern> -j ACCEPT per AcceptInterfaces)
//	       FORWARD:       -j XNET-FWD, after Docker's jumps to DOCKER-USER and DOCKER-ISOLATION-STAGE-1
//	nat    XNET-POSTRTG:  -s <Network> -d <Network> -j ACCEPT
//	       POSTROUTING:   -j XNET-POSTRTG, before every MASQUERADE or SNAT rule
//
// and, for a dual-stack or IPv6-only overlay, the same two chains for the IPv6Network in the
// ip6tables variant (ip6tables-nft or ip6tables-legacy) that holds Docker's IPv6 rules: Docker
// with --ipv6 and ip6tables enabled drops forwarded IPv6 in FORWARD and masquerades its IPv6
// subnet as it does for IPv4. Each family picks its variant on its own.
//
// It does not own Docker's chains, the FORWARD policy, ip_forward, or the masquerading of
// traffic that leaves the overlay (package ipmasq, with --ip-masq, in an nftables table).
//
// Design history. dockerd turns ip_forward on and sets the FORWARD policy to DROP; it accepts
// only what enters or leaves its own bridges in the ways it knows. Overlay traffic arrives on
// xnet.1 (vxlan), xnet0 (udp, and ebpf before the datapath knows a container) or the underlay
// NIC (host-gw) and is dropped on its way into docker0. And Docker's
// "-s <bip subnet> ! -o docker0 -j MASQUERADE" rewrites the source of container traffic that
// leaves through any of those, so a remote container sees the host's address or the
// container's depending on the backend. flannel answers both with chains of its own
// (FLANNEL-FWD, FLANNEL-POSTRTG); so do we, with these differences:
//
//   - The rules live where Docker's do. An ACCEPT in one nftables table does not overrule a
//     DROP in another (every base chain on the hook must accept the packet), so a table of our
//     own, like ipmasq's, cannot open Docker's FORWARD policy: the rules go into the filter and
//     nat tables of whichever iptables variant holds Docker's chains. Docker (and flannel) run
//     `iptables` from PATH; Debian ships both variants, and a host can have rules in both. The
//     variant is chosen again on every check: the one holding Docker's chains, else the one
//     holding any rules, else the one `iptables` on PATH is (see choose).
//   - The no-masquerade rule ACCEPTs rather than RETURNs: a RETURN from our chain would resume
//     POSTROUTING at the next rule, Docker's MASQUERADE. An ACCEPT ends the nat table's
//     POSTROUTING for the packet, so no later rule of that table rewrites it (other nat tables,
//     ipmasq's among them, still see it).
//   - Order is checked, not only presence. Docker inserts its MASQUERADE at the top of
//     POSTROUTING whenever it (re)creates it, so our jump must be moved back in front of it;
//     and our FORWARD jump must stay behind DOCKER-USER (the user's rules win) and
//     DOCKER-ISOLATION-STAGE-1 (Docker's isolation between its own networks wins).
//   - Every change is one iptables-restore --noflush batch per table, which the kernel applies
//     atomically: moving a jump is delete-and-insert in one step, so there is never a moment
//     without it, nor two of it. coreos/go-iptables (what flannel uses for its forward rules)
//     runs one iptables command per rule and has no save or restore, so it cannot do that;
//     the state is read with iptables-save, which, unlike `iptables -S`, does not create the
//     legacy tables it lists.
//
// Docker rebuilds its chains when it restarts, and a firewall reload can flush everything, so
// Keep checks every few seconds (flannel: 5 s) and repairs only what is missing or out of
// order: a check that finds everything in place changes nothing. It also checks right after
// each nf_tables change, through a Monitor: the one subscription to those changes, whose one
// reading of the rules (iptables-save) serves every consumer of a process, the keeper and
// xnetd's --host-routing=auto, which reads DOCKER-USER from it.
package fwrules

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Our chains and the comments on the jumps to them (`iptables -S FORWARD` shows why they are
// there).
const (
	ForwardChain     = "XNET-FWD"
	PostroutingChain = "XNET-POSTRTG"
	forwardComment   = "xnet: forward the overlay network"
	postroutComment  = "xnet: no masquerade inside the overlay network"
)

// DefaultInterval is how often Keep checks the rules (flannel's 5 s) besides after each
// nf_tables change: with iptables-legacy, after Docker restarts, the overlay may be cut off
// for up to this long.
const DefaultInterval = 5 * time.Second

// Docker's chains and targets that fix where our jumps go.
var (
	// forwardAfter are jumps in FORWARD that must come before ours.
	forwardAfter = []string{"DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"}
	// natTargets rewrite the source: our POSTROUTING jump comes before the first of them.
	natTargets = []string{"MASQUERADE", "SNAT"}
)

// Rules are the forward and no-masquerade rules for one overlay: its Network in iptables and
// its IPv6Network in ip6tables, each when the overlay has it.
type Rules struct {
	network  netip.Prefix // invalid in an IPv6-only overlay
	network6 netip.Prefix // invalid without IPv6
	log      *slog.Logger
	// ifaces are interface patterns whose forwarded traffic XNET-FWD also accepts.
	ifaces []string
}

// AcceptInterfaces makes XNET-FWD (iptables', IPv4) also accept what is forwarded into or out
// of interfaces matching patterns (iptables' -i syntax: "xnbr.+"): the bridges of xnet's
// Docker networks (package dockernet, IPv4 only), whose isolation from each other is enforced
// by their own table. Call it before Ensure and Keep.
func (r *Rules) AcceptInterfaces(patterns ...string) {
	r.ifaces = append(r.ifaces, patterns...)
}

// New checks network (an IPv4 prefix, or the zero Prefix in an IPv6-only overlay) and
// network6 (an IPv6 prefix, or the zero Prefix without IPv6), at least one given, and returns
// their rules; nothing is installed yet.
func New(network, network6 netip.Prefix, log *slog.Logger) (*Rules, error) {
	switch {
	case !network.IsValid() && !network6.IsValid():
		return nil, errors.New("fwrules: neither a Network nor an IPv6Network")
	case network.IsValid() && !network.Addr().Is4():
		return nil, fmt.Errorf("fwrules: Network %v is not an IPv4 prefix", network)
	case network6.IsValid() && (!network6.Addr().Is6() || network6.Addr().Is4In6()):
		return nil, fmt.Errorf("fwrules: IPv6Network %v is not an IPv6 prefix", network6)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Rules{network: network.Masked(), network6: network6.Masked(), log: log}, nil
}

// Report is what one Ensure found and did.
type Report struct {
	// Variant is the iptables binary the IPv4 rules are in ("iptables-nft", "iptables-legacy",
	// or "iptables" where the distribution has only that name); "" when there is no iptables
	// or no Network.
	Variant string
	// Why that variant (or why none).
	Why string
	// Variant6 and Why6 are the same for the IPv6 rules (ip6tables-nft, ...); "" without an
	// IPv6Network.
	Variant6, Why6 string
	// Changes says what was added, rewritten, moved or removed (IPv6's prefixed "ip6tables: ");
	// empty when all was in place.
	Changes []string
}

// Ensure makes the rules hold now, in the network namespace of the calling thread, for each
// family the overlay has: picks the variant, removes our chains from any other variant (a
// previous choice), and adds, rewrites or moves in the chosen one only what is missing, wrong
// or out of order. Without any iptables binary of a family there is no Docker firewall to
// open: that is a Report without Variant (Variant6), not an error.
func (r *Rules) Ensure(ctx context.Context) (Report, error) {
	return r.EnsureWith(ctx, NewSnapshot())
}

// EnsureWith is Ensure from the rules as s read them (or reads them, for what it has not read
// yet), so that one reading after a change serves Ensure and whatever else follows the rules
// (DockerUserRules for --host-routing=auto).
func (r *Rules) EnsureWith(ctx context.Context, s *Snapshot) (Report, error) {
	var rep Report
	if r.network.IsValid() {
		fr, err := r.ensure(ctx, s, familyIPv4, r.network, r.ifaces)
		rep.Variant, rep.Why, rep.Changes = fr.variant, fr.why, fr.changes
		if err != nil {
			return rep, err
		}
	}
	if r.network6.IsValid() {
		fr, err := r.ensure(ctx, s, familyIPv6, r.network6, nil)
		rep.Variant6, rep.Why6 = fr.variant, fr.why
		for _, c := range fr.changes {
			rep.Changes = append(rep.Changes, string(familyIPv6)+": "+c)
		}
		if err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// familyReport is what ensure found and did in one family.
type familyReport struct {
	variant, why string
	changes      []string
}

// ensure is Ensure for one family: network's rules (and ifaces') in fam's variants, as s reads
// them.
func (r *Rules) ensure(ctx context.Context, s *Snapshot, fam family, network netip.Prefix, ifaces []string) (familyReport, error) {
	found, err := s.variants(ctx, fam)
	if err != nil {
		return familyReport{}, err
	}
	if len(found.variants) == 0 {
		return familyReport{why: fmt.Sprintf("no %s binary on PATH: Docker cannot have a firewall here", fam)}, nil
	}
	states := make([]ruleset, len(found.variants))
	cands := make([]candidate, len(found.variants))
	for i, v := range found.variants {
		if states[i], err = s.ruleset(ctx, fam, i); err != nil {
			return familyReport{}, err
		}
		cands[i] = candidate{mode: v.mode, docker: states[i].hasDocker(), foreign: states[i].foreignRules()}
	}
	pick, why := choose(cands, found.pathMode, string(fam))
	rep := familyReport{variant: found.variants[pick].name, why: why}

	for i, v := range found.variants {
		if i == pick {
			continue
		}
		for _, b := range removalBatches(states[i]) {
			if err := v.restore(ctx, b.text); err != nil {
				return rep, fmt.Errorf("remove our chains from %s (not the variant in use): %w", v.name, err)
			}
			rep.changes = append(rep.changes, b.changes...)
		}
	}
	v := found.variants[pick]
	for _, b := range plan(states[pick], network, ifaces) {
		if err := v.restore(ctx, b.text); err != nil {
			return rep, fmt.Errorf("%s: %s: %w", v.name, strings.Join(b.changes, "; "), err)
		}
		rep.changes = append(rep.changes, b.changes...)
	}
	return rep, nil
}

// Keep runs Ensure every interval, and shortly after every change to the nf_tables ruleset of
// the calling thread's network namespace, until ctx ends, logging what it repaired: Keeper on
// a Monitor of its own. A daemon that also follows the rules for something else (xnetd's
// --host-routing=auto) adds Keeper to its one Monitor instead.
func (r *Rules) Keep(ctx context.Context, interval time.Duration) {
	m := NewMonitor(r.log)
	m.Add(r.Keeper(interval))
	m.Run(ctx)
}

// Keeper is the consumer that keeps the rules in place: Ensure from each reading (after every
// change, and every interval), logging what it repaired. A failure is logged when it first
// happens and when it clears, not on every reading.
func (r *Rules) Keeper(interval time.Duration) Consumer {
	failing := ""
	return Consumer{Every: interval, Read: func(ctx context.Context, s *Snapshot) {
		rep, err := r.EnsureWith(ctx, s)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if err.Error() != failing {
				r.log.Error("iptables forward rules: check failed; retrying", "every", interval, "err", err)
				failing = err.Error()
			}
			return
		case failing != "":
			r.log.Info("iptables forward rules: check works again", "variant", rep.Variant, "ip6tables_variant", rep.Variant6)
			failing = ""
		}
		if len(rep.Changes) > 0 {
			// Docker starting (after us, on every boot) or a firewall reload removed or
			// reordered our rules: the overlay was dropped or masqueraded until now.
			r.log.Info("iptables forward rules repaired", "variant", rep.Variant, "why", rep.Why,
				"ip6tables_variant", rep.Variant6, "ip6tables_why", rep.Why6, "changes", rep.Changes)
		}
	}}
}

// Remove deletes our chains and every jump to them from every iptables and ip6tables variant
// that holds them, in the network namespace of the calling thread. It needs no Network.
// Variants without our chains are only read (iptables-save), never touched.
func Remove(ctx context.Context) ([]string, error) {
	var all []variant
	for _, fam := range []family{familyIPv4, familyIPv6} {
		found, err := findVariants(ctx, fam)
		if err != nil {
			return nil, err
		}
		all = append(all, found.variants...)
	}
	var changes []string
	var errs []error
	for _, v := range all {
		rs, err := v.save(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, b := range removalBatches(rs) {
			if err := v.restore(ctx, b.text); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s: %w", v.name, strings.Join(b.changes, "; "), err))
				continue
			}
			for _, c := range b.changes {
				changes = append(changes, v.name+": "+c)
			}
		}
	}
	return changes, errors.Join(errs...)
}

// candidate is what choose knows of one variant.
type candidate struct {
	mode    string // modeNFT or modeLegacy
	docker  bool   // holds Docker's chains
	foreign int    // rules, user chains and non-ACCEPT policies that are not ours
}

// choose picks the variant whose tables Docker's traffic goes through: the one holding
// Docker's chains (both: the one Docker would run, `iptables` on PATH); else the one holding
// any rules, since whoever filters traffic there (Docker started with a custom PATH, a
// firewall) does it in that variant; else the one Docker will use when it starts, `iptables`
// on PATH, or nf_tables where PATH has no plain `iptables`. pathMode is the mode of that
// `iptables` ("" when there is none); bin is "iptables" or "ip6tables", for the reasons. cands
// is not empty.
func choose(cands []candidate, pathMode, bin string) (int, string) {
	onPath := -1
	for i, c := range cands {
		if c.mode == pathMode {
			onPath = i
		}
	}
	var docker, used []int
	for i, c := range cands {
		if c.docker {
			docker = append(docker, i)
		}
		if c.foreign > 0 {
			used = append(used, i)
		}
	}
	switch {
	case len(docker) == 1:
		return docker[0], "holds Docker's chains"
	case len(docker) > 1 && onPath >= 0:
		return onPath, "every variant holds Docker's chains; this is `" + bin + "` on PATH, which Docker runs"
	case len(docker) == 0 && len(used) == 1:
		return used[0], "holds the host's rules; the other variant is empty"
	case onPath >= 0:
		return onPath, "`" + bin + "` on PATH, which Docker runs"
	}
	for i, c := range cands {
		if c.mode == modeNFT {
			return i, "no `" + bin + "` on PATH; nf_tables is what Docker's own " + bin + " would be"
		}
	}
	return 0, "the only variant installed"
}

// batch is one iptables-restore input for one table, and what it changes.
type batch struct {
	text    string
	changes []string
}

// jumpSpec is the rule that jumps from a built-in chain into ours.
func jumpSpec(comment, chain string) string {
	return fmt.Sprintf("-m comment --comment %q -j %s", comment, chain)
}

// plan compares rs (one family's) with what should be there for network (and the interface
// patterns ifaces) and returns the batches that repair it, none when everything is in place.
// The specs are written as iptables-save (ip6tables-save) prints them, so a rule we wrote
// compares equal to itself on the next check.
func plan(rs ruleset, network netip.Prefix, ifaces []string) []batch {
	n := network.String()
	var out []batch
	fwd := []string{"-s " + n + " -j ACCEPT", "-d " + n + " -j ACCEPT"}
	for _, p := range ifaces {
		fwd = append(fwd, "-i "+p+" -j ACCEPT", "-o "+p+" -j ACCEPT")
	}
	if b, ok := rs.table("filter").repair(ForwardChain, fwd, "FORWARD", jumpSpec(forwardComment, ForwardChain), jumpAfter(forwardAfter)); ok {
		out = append(out, b)
	}
	post := []string{"-s " + n + " -d " + n + " -j ACCEPT"}
	if b, ok := rs.table("nat").repair(PostroutingChain, post, "POSTROUTING", jumpSpec(postroutComment, PostroutingChain), jumpBefore(natTargets)); ok {
		out = append(out, b)
	}
	return out
}

// placement says whether our jump at index i of a built-in chain's rules is where it must be,
// and, when it is not, whether to append (false) or insert it at the top (true).
type placement struct {
	ok  func(rules []rule, i int) bool
	top bool
}

// jumpAfter: our jump comes after every jump to one of targets.
func jumpAfter(targets []string) placement {
	return placement{ok: func(rules []rule, i int) bool {
		for j := i + 1; j < len(rules); j++ {
			if slices.Contains(targets, rules[j].target) {
				return false
			}
		}
		return true
	}}
}

// jumpBefore: our jump comes before every rule whose target is one of targets.
func jumpBefore(targets []string) placement {
	return placement{top: true, ok: func(rules []rule, i int) bool {
		for j := range i {
			if slices.Contains(targets, rules[j].target) {
				return false
			}
		}
		return true
	}}
}

// repair returns the batch that makes chain hold exactly want and gives builtin exactly one
// jump (spec) to it, placed as place says; ok is false when nothing needs doing. Declaring a
// chain in an iptables-restore --noflush batch creates it or empties it, and the deletion of
// the old jump and the insertion of the new one commit together.
func (t *table) repair(chain string, want []string, builtin, spec string, place placement) (batch, bool) {
	var lines, changes []string
	if have, exists := t.chainRules(chain); !exists || !slices.Equal(have, want) {
		lines = append(lines, ":"+chain+" - [0:0]")
		for _, w := range want {
			lines = append(lines, "-A "+chain+" "+w)
		}
		if exists {
			changes = append(changes, fmt.Sprintf("rewrote %s %s (%d rules, want %d)", t.name, chain, len(have), len(want)))
		} else {
			changes = append(changes, fmt.Sprintf("created %s %s", t.name, chain))
		}
	}
	rules := t.rulesOf(builtin)
	var jumps []int
	for i, rl := range rules {
		if rl.target == chain {
			jumps = append(jumps, i)
		}
	}
	if len(jumps) != 1 || !place.ok(rules, jumps[0]) {
		for _, i := range jumps {
			lines = append(lines, "-D "+builtin+" "+rules[i].spec)
		}
		if place.top {
			lines = append(lines, "-I "+builtin+" 1 "+spec)
		} else {
			lines = append(lines, "-A "+builtin+" "+spec)
		}
		switch len(jumps) {
		case 0:
			changes = append(changes, fmt.Sprintf("added the jump %s -> %s", builtin, chain))
		case 1:
			changes = append(changes, fmt.Sprintf("moved the jump %s -> %s (it was rule %d of %d)", builtin, chain, jumps[0]+1, len(rules)))
		default:
			changes = append(changes, fmt.Sprintf("replaced %d jumps %s -> %s by one", len(jumps), builtin, chain))
		}
	}
	if len(lines) == 0 {
		return batch{}, false
	}
	return batch{text: "*" + t.name + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n", changes: changes}, true
}

// removalBatches delete our chains, and every rule that jumps to them, from rs.
func removalBatches(rs ruleset) []batch {
	var out []batch
	for _, tc := range []struct{ table, chain string }{{"filter", ForwardChain}, {"nat", PostroutingChain}} {
		t := rs.table(tc.table)
		var lines []string
		for _, rl := range t.rules {
			if rl.target == tc.chain {
				lines = append(lines, "-D "+rl.chain+" "+rl.spec)
			}
		}
		jumps := len(lines)
		if _, exists := t.chainRules(tc.chain); exists {
			lines = append(lines, "-F "+tc.chain, "-X "+tc.chain)
		}
		if len(lines) == 0 {
			continue
		}
		out = append(out, batch{
			text:    "*" + tc.table + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n",
			changes: []string{fmt.Sprintf("removed %s %s and %d jump(s) to it", tc.table, tc.chain, jumps)},
		})
	}
	return out
}

// DockerUserRules lists the rules a user put in Docker's DOCKER-USER chain (filter table), as
// iptables-save prints them without the "-A DOCKER-USER" prefix, leaving out the RETURN Docker
// appends. It reads the variant that holds Docker's chains; where no variant has them there
// are none. xnetd's --host-routing=auto keeps container traffic on the host's stack when the
// list is not empty, so those rules see every packet; while it runs it reads them from the
// Monitor's readings (Snapshot.DockerUserRules), which the forward rules' keeper shares.
func DockerUserRules(ctx context.Context) ([]string, error) {
	return NewSnapshot().DockerUserRules(ctx)
}
