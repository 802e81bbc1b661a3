package main

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/fwrules"
)

// resolveHostRouting turns --host-routing into the ebpf backend's mode. With bpf host routing
// a container's packets to and from other hosts skip the host's routing and netfilter (that
// is what makes the fast path fast); a firewall rule the user put in Docker's DOCKER-USER
// chain would then apply to some packets and not others. So auto keeps the stack (kernel)
// when DOCKER-USER holds any rule besides Docker's own RETURN, and skips it otherwise.
func resolveHostRouting(ctx context.Context, flag string, log *slog.Logger) (mode, why string) {
	if flag != "auto" {
		return flag, "--host-routing=" + flag
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rules, err := fwrules.DockerUserRules(ctx)
	switch {
	case err != nil:
		log.Warn("cannot read Docker's DOCKER-USER chain; container traffic skips the host's stack", "err", err)
		return "bpf", "auto: DOCKER-USER unreadable (" + err.Error() + ")"
	case len(rules) > 0:
		log.Info("DOCKER-USER holds rules: container traffic takes the host's stack so they apply to every packet",
			"rules", rules)
		return "kernel", "auto: DOCKER-USER holds " + strings.Join(rules, "; ") + ", which bpf host routing would skip"
	}
	return "bpf", "auto: DOCKER-USER holds no rules"
}

// hostRoutingInterval is how often --host-routing=auto looks at DOCKER-USER again when it
// cannot be told of changes (iptables-legacy, or no netfilter netlink): a rule a user adds
// applies to every packet within this time (one iptables-save per interval). With change
// notifications it looks right after each change, and every hostRoutingSafety besides.
const (
	hostRoutingInterval = 2 * time.Second
	hostRoutingSafety   = 30 * time.Second
)

// hostRoutingChange is a host-routing mode the daemon's loop should switch the backend to.
type hostRoutingChange struct{ mode, why string }

// watchHostRouting re-reads DOCKER-USER after each nf_tables change (fwrules.WatchChanges) and
// on a ticker while ctx lives, and sends a change when the mode auto would pick differs from
// current. It returns a nil channel (never ready) unless --host-routing is auto and the
// backend can switch. It subscribes in the calling thread's network namespace.
func (d *daemonRun) watchHostRouting(ctx context.Context, b any) <-chan hostRoutingChange {
	hr, ok := b.(backend.HostRouter)
	if !ok || d.o.hostRouting != "auto" {
		return nil
	}
	interval := hostRoutingInterval
	w, err := fwrules.WatchChanges()
	var changed <-chan struct{}
	if err != nil {
		d.log.Info("--host-routing=auto: no nf_tables change notifications; reading DOCKER-USER on an interval", "every", interval, "err", err)
	} else {
		interval, changed = hostRoutingSafety, w.C
	}
	changes := make(chan hostRoutingChange)
	current := hr.HostRouting()
	go func() {
		if w != nil {
			defer w.Close()
		}
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			case _, ok := <-changed:
				if !ok {
					changed = nil
					t.Reset(hostRoutingInterval)
					continue
				}
				w.Settled(ctx)
			}
			mode, why := resolveHostRouting(ctx, "auto", d.log)
			if mode == current {
				continue
			}
			select {
			case changes <- hostRoutingChange{mode, why}:
				current = mode
			case <-ctx.Done():
				return
			}
		}
	}()
	return changes
}

// applyHostRouting switches the backend and refreshes what status and metrics say of its mode.
func (d *daemonRun) applyHostRouting(b backend.Backend, c hostRoutingChange) {
	hr, ok := b.(backend.HostRouter)
	if !ok {
		return
	}
	if err := hr.SetHostRouting(c.mode, c.why); err != nil {
		d.log.Warn("cannot switch host routing", "host_routing", c.mode, "err", err)
	}
	d.chosen.mode, d.chosen.modeReason = b.Mode()
	d.m.SetBackend(d.chosen.name, d.chosen.mode, counterSource(b))
	d.writeState()
}
