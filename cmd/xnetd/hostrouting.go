package main

import (
	"log/slog"
	"os/exec"
	"strings"
)

// resolveHostRouting turns --host-routing into the ebpf backend's mode. With bpf host routing
// a container's packets to and from other hosts skip the host's routing and netfilter (that
// is what makes the fast path fast); a firewall rule the user put in Docker's DOCKER-USER
// chain would then apply to some packets and not others. So auto keeps the stack (kernel)
// when DOCKER-USER holds any rule besides Docker's own RETURN, and skips it otherwise.
func resolveHostRouting(flag string, log *slog.Logger) (mode, why string) {
	if flag != "auto" {
		return flag, "--host-routing=" + flag
	}
	rules, err := dockerUserRules()
	switch {
	case err != nil:
		return "bpf", "auto: no DOCKER-USER rules to honour (" + err.Error() + ")"
	case len(rules) > 0:
		log.Info("DOCKER-USER holds rules: container traffic takes the host's stack so they apply to every packet",
			"rules", rules)
		return "kernel", "auto: DOCKER-USER holds " + strings.Join(rules, "; ") + ", which bpf host routing would skip"
	}
	return "bpf", "auto: DOCKER-USER holds no rules"
}

// dockerUserRules lists the rules of the filter table's DOCKER-USER chain other than the
// RETURN Docker appends, as `iptables -S` prints them. Docker programs iptables (nft or
// legacy: whichever `iptables` is), so that is where the chain is read.
func dockerUserRules() ([]string, error) {
	out, err := exec.Command("iptables", "-w", "-t", "filter", "-S", "DOCKER-USER").CombinedOutput()
	if err != nil {
		return nil, &cmdError{strings.TrimSpace(string(out)), err}
	}
	var rules []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if !strings.HasPrefix(line, "-A DOCKER-USER") || line == "-A DOCKER-USER -j RETURN" {
			continue
		}
		rules = append(rules, line)
	}
	return rules, nil
}

type cmdError struct {
	out string
	err error
}

func (e *cmdError) Error() string {
	if e.out == "" {
		return "iptables -S DOCKER-USER: " + e.err.Error()
	}
	return "iptables -S DOCKER-USER: " + e.out
}

func (e *cmdError) Unwrap() error { return e.err }
