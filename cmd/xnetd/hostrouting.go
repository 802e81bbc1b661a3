package main

import (
	"context"
	"log/slog"
	"strings"
	"time"

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
