package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/xnet-dev/xnet/fwrules"
)

// startForwardRules installs the iptables forward and no-masquerade rules for the Network
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
	if d.cfg.IPv6Only() {
		// The rules are iptables' (IPv4) FORWARD rules for the Network; there is none.
		d.log.Info("--iptables-forward-rules: the rules are for IPv4 and the overlay is IPv6 only; none installed")
		return func() {}, nil
	}
	r, err := fwrules.New(d.cfg.Network, d.log)
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
	d.log.Info("iptables forward rules", "variant", rep.Variant, "why", rep.Why, "network", d.cfg.Network, "changes", rep.Changes)
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
