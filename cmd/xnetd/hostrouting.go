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
	return autoHostRouting(ctx, fwrules.NewSnapshot(), "", log)
}

// autoHostRouting is the mode auto picks from DOCKER-USER as rules reads it. It logs only what
// differs from lastWhy (the reason of the previous reading, "" at start): the rules are read
// after every nf_tables change and every 30 s, and an unchanged verdict is not news.
func autoHostRouting(ctx context.Context, rules *fwrules.Snapshot, lastWhy string, log *slog.Logger) (mode, why string) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	user, err := rules.DockerUserRules(ctx)
	switch {
	case err != nil:
		mode, why = "bpf", "auto: DOCKER-USER unreadable ("+err.Error()+")"
		if why != lastWhy {
			log.Warn("cannot read Docker's DOCKER-USER chain; container traffic skips the host's stack", "err", err)
		}
	case len(user) > 0:
		mode, why = "kernel", "auto: DOCKER-USER holds "+strings.Join(user, "; ")+", which bpf host routing would skip"
		if why != lastWhy {
			log.Info("DOCKER-USER holds rules: container traffic takes the host's stack so they apply to every packet",
				"rules", user)
		}
	default:
		mode, why = "bpf", "auto: DOCKER-USER holds no rules"
	}
	return mode, why
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

// watchHostRouting adds to rules a consumer that re-reads DOCKER-USER from each of its
// readings (after every nf_tables change, from the same iptables-save as the forward rules'
// keeper, and every hostRoutingSafety, or hostRoutingInterval without notifications) and sends
// a change when the mode auto would pick differs from the last one sent. It returns a nil
// channel (never ready) unless --host-routing is auto and the backend can switch.
func (d *daemonRun) watchHostRouting(rules *fwrules.Monitor, b any) <-chan hostRoutingChange {
	hr, ok := b.(backend.HostRouter)
	if !ok || d.o.hostRouting != "auto" {
		return nil
	}
	// One slot: a reading must not wait for the daemon's loop (the keeper shares it), so a
	// newer mode replaces one the loop has not taken yet.
	changes := make(chan hostRoutingChange, 1)
	current, lastWhy := hr.HostRouting(), d.hostRoutingWhy
	rules.Add(fwrules.Consumer{Every: hostRoutingSafety, Unwatched: hostRoutingInterval, Read: func(ctx context.Context, s *fwrules.Snapshot) {
		mode, why := autoHostRouting(ctx, s, lastWhy, d.log)
		lastWhy = why
		if mode == current {
			return
		}
		select {
		case <-changes:
		default:
		}
		changes <- hostRoutingChange{mode, why}
		current = mode
	}})
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
