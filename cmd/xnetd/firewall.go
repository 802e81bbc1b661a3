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
// overlay alone, and keeps them in place in the background until the returned stop, which
// waits for the keeper to end (so a teardown after it is not undone). A first install that
// fails is fatal: without it the overlay would be silently dropped on a Docker host. With the
// flag off it removes the rules a previous run left.
func (d *daemonRun) startForwardRules(ctx context.Context) (stop func(), err error) {
	if !d.o.iptablesForwardRules {
		if changes, err := fwrules.Remove(ctx); err != nil || len(changes) > 0 {
			d.log.Info("--iptables-forward-rules=false: removed the rules a previous run left", "changes", changes, "err", err)
		}
		return func() {}, nil
	}
	// iptables' rules for the Network, ip6tables' for the IPv6Network: each family the overlay has.
	var network6 netip.Prefix
	if d.cfg.EnableIPv6 {
		network6 = d.cfg.IPv6Network
	}
	r, err := fwrules.New(d.cfg.Network, network6, d.log)
	if err != nil {
		return nil, fmt.Errorf("--iptables-forward-rules: %w", err)
	}
	if d.o.dockerNetworks {
		r.AcceptInterfaces(dockerNetworkBridges)
	}
	rep, err := r.Ensure(ctx)
	if err != nil && ctx.Err() != nil {
		return func() {}, nil // stopping anyway: serve sees ctx end next
	}
	if err != nil {
		return nil, fmt.Errorf("--iptables-forward-rules (set it false to run without them): %w", err)
	}
	d.log.Info("iptables forward rules", "variant", rep.Variant, "why", rep.Why, "network", d.cfg.Network,
		"ip6tables_variant", rep.Variant6, "ip6tables_why", rep.Why6, "ipv6_network", network6, "changes", rep.Changes)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Keep(ctx, fwrules.DefaultInterval)
	}()
	return func() { cancel(); <-done }, nil
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
