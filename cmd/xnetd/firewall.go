package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/xnet-dev/xnet/fwrules"
)

// startForwardRules installs the iptables forward and no-masquerade rules for the Network, and
// the ip6tables ones for the IPv6Network of a dual-stack or IPv6-only overlay
// (--iptables-forward-rules), so Docker's FORWARD policy DROP and its MASQUERADE leave the
// overlay alone, and adds their keeper to rules, which keeps them in place while it runs
// (followRules). A first install that fails is fatal: without it the overlay would be silently
// dropped on a Docker host. With the flag off it removes the rules a previous run left.
func (d *daemonRun) startForwardRules(ctx context.Context, rules *fwrules.Monitor) error {
	if !d.o.iptablesForwardRules {
		if changes, err := fwrules.Remove(ctx); err != nil || len(changes) > 0 {
			d.log.Info("--iptables-forward-rules=false: removed the rules a previous run left", "changes", changes, "err", err)
		}
		return nil
	}
	// iptables' rules for the Network, ip6tables' for the IPv6Network: each family the overlay has.
	var network6 netip.Prefix
	if d.cfg.EnableIPv6 {
		network6 = d.cfg.IPv6Network
	}
	r, err := fwrules.New(d.cfg.Network, network6, d.log)
	if err != nil {
		return fmt.Errorf("--iptables-forward-rules: %w", err)
	}
	if d.o.dockerNetworks {
		r.AcceptInterfaces(dockerNetworkBridges)
	}
	rep, err := r.Ensure(ctx)
	if err != nil && ctx.Err() != nil {
		return nil // stopping anyway: serve sees ctx end next
	}
	if err != nil {
		return fmt.Errorf("--iptables-forward-rules (set it false to run without them): %w", err)
	}
	d.log.Info("iptables forward rules", "variant", rep.Variant, "why", rep.Why, "network", d.cfg.Network,
		"ip6tables_variant", rep.Variant6, "ip6tables_why", rep.Why6, "ipv6_network", network6, "changes", rep.Changes)
	rules.Add(r.Keeper(fwrules.DefaultInterval))
	return nil
}

// followRules runs rules (the forward rules' keeper and --host-routing=auto, whichever were
// added: one nf_tables subscription and one iptables-save per change for both) until the
// returned stop, which waits for it to end, so a teardown after it is not undone.
func followRules(ctx context.Context, rules *fwrules.Monitor) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		rules.Run(ctx)
	}()
	return func() { cancel(); <-done }
}

// removeForwardRules is the --teardown-on-exit part: a failure is logged.
func (d *daemonRun) removeForwardRules() {
	if _, err := fwrules.Remove(context.Background()); err != nil {
		d.log.Warn("remove iptables forward rules", "err", err)
	}
}

// teardownForwardRules is `xnetd teardown`'s part: it says what it removed.
func teardownForwardRules(stdout io.Writer) error {
	changes, err := fwrules.Remove(context.Background())
	if len(changes) > 0 {
		fmt.Fprintf(stdout, "removed iptables rules: %s\n", strings.Join(changes, "; "))
	}
	return err
}
