package main

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/backend/hostgw"
	"github.com/xnet-dev/xnet/backend/udp"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// newRegistry lists the backends built into this binary. It is the only place that names the
// backend packages.
func newRegistry() *backend.Registry {
	r := &backend.Registry{}
	r.Register(subnetmgr.BackendEBPF, ebpf.New)
	r.Register(subnetmgr.BackendVXLAN, vxlan.New)
	r.Register(subnetmgr.BackendUDP, udp.New)
	r.Register(subnetmgr.BackendHostGW, hostgw.New)
	r.Register(subnetmgr.BackendWireGuard, wireguard.New)
	return r
}

// counterSource is b's metrics.CounterSource, if its datapath counts packets.
func counterSource(b backend.Backend) metrics.CounterSource {
	c, _ := b.(metrics.CounterSource)
	return c
}

// autoOrder is what --backend=auto tries, in order (docs/design.md, Choosing a backend).
func autoOrder() []string {
	return []string{subnetmgr.BackendEBPF, subnetmgr.BackendVXLAN, subnetmgr.BackendUDP}
}

// ipv6OnlyBackends are the backends that carry an IPv6-only overlay (EnableIPv4 false), in
// autoOrder's order. The others key their datapath by the IPv4 subnet and reach peers at their
// IPv4 PublicIP, so they are refused before they start rather than left half working.
func ipv6OnlyBackends() []string {
	return []string{subnetmgr.BackendEBPF, subnetmgr.BackendVXLAN, subnetmgr.BackendHostGW, subnetmgr.BackendWireGuard}
}

// checkIPv6Only refuses backend name for an IPv6-only cfg unless it carries one: a usage error
// (exit 2) naming EnableIPv4 and the backends that would do.
func checkIPv6Only(cfg subnetmgr.Config, source, name string) error {
	if !cfg.IPv6Only() || slices.Contains(ipv6OnlyBackends(), name) {
		return nil
	}
	if len(ipv6OnlyBackends()) == 0 {
		return usagef("%s: the config sets EnableIPv4 false (an IPv6-only overlay), which no backend of this xnetd carries: set EnableIPv4 true (IPv4 or dual stack)", source)
	}
	return usagef("%s: the config sets EnableIPv4 false (an IPv6-only overlay), which backend %s does not carry: use %s (--backend or Backend.Type), or set EnableIPv4 true",
		source, name, strings.Join(ipv6OnlyBackends(), " or "))
}

// wantedBackends says which backends to try for this host: the flag overrides the config's
// Backend.Type; "ebpf" in the config (or no type at all) means auto, because the config is
// shared by every host and each host falls back to what it can run, while an explicit
// --backend=ebpf means exactly ebpf.
func wantedBackends(flag string, cfg subnetmgr.Config) (names []string, source string) {
	switch {
	case flag == backendAuto:
		return autoOrder(), "--backend=auto"
	case flag != "":
		return []string{flag}, "--backend=" + flag
	case cfg.Backend.Type == "" || cfg.Backend.Type == subnetmgr.BackendEBPF:
		return autoOrder(), fmt.Sprintf("config Backend.Type %q (auto)", cfg.Backend.Type)
	default:
		return []string{cfg.Backend.Type}, fmt.Sprintf("config Backend.Type %q", cfg.Backend.Type)
	}
}

// skipped is a backend --backend=auto passed over, and why.
type skipped struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// chosenBackend is the result of pickBackend.
type chosenBackend struct {
	name       string
	b          backend.Backend
	mode       string
	modeReason string
	skipped    []skipped
}

// pickBackend builds the first of the wanted backends that can run here, logging why each
// skipped one was skipped. Constructors do not change the host, so trying is harmless. An
// error is a usage error: nothing is configured yet and the fix is a flag or the config.
func pickBackend(reg *backend.Registry, flag string, opts backend.Options, log *slog.Logger) (chosenBackend, error) {
	names, source := wantedBackends(flag, opts.Config)
	var c chosenBackend
	if opts.Config.IPv6Only() {
		// auto tries only those that carry it; a backend asked for by name is refused here.
		var ok []string
		for _, name := range names {
			if err := checkIPv6Only(opts.Config, source, name); err != nil && len(names) == 1 {
				return c, err
			} else if err == nil {
				ok = append(ok, name)
			}
		}
		if len(ok) == 0 {
			return c, checkIPv6Only(opts.Config, source, names[0])
		}
		names = ok
	}
	for _, name := range names {
		ctor, ok := reg.Lookup(name)
		if !ok {
			if len(names) == 1 {
				return c, usagef("%s: backend %q is not built into this xnetd (it has: %s): set --backend to one of those", source, name, strings.Join(reg.Names(), ", "))
			}
			c.skipped = append(c.skipped, skipped{name, "not built into this xnetd"})
			log.Info("backend skipped", "backend", name, "reason", "not built into this xnetd", "by", source)
			continue
		}
		b, err := ctor(opts)
		if err != nil {
			if len(names) == 1 {
				return c, usagef("%s: backend %s cannot run here: %v (try --backend=auto)", source, name, err)
			}
			c.skipped = append(c.skipped, skipped{name, err.Error()})
			log.Info("backend skipped", "backend", name, "reason", err.Error(), "unavailable", errors.Is(err, backend.ErrUnavailable), "by", source)
			continue
		}
		c.name, c.b = name, b
		c.mode, c.modeReason = b.Mode()
		log.Info("backend chosen", "backend", name, "mode", c.mode, "why", c.modeReason, "by", source)
		return c, nil
	}
	return c, usagef("%s: no backend can run on this host (%s): install what one of them needs or set --backend", source, describeSkipped(c.skipped))
}

func describeSkipped(s []skipped) string {
	parts := make([]string, len(s))
	for i, x := range s {
		parts[i] = x.Name + ": " + x.Reason
	}
	return strings.Join(parts, "; ")
}

// embeddedWireGuardProcs is the GOMAXPROCS to run with when the chosen backend is the embedded
// wireguard-go, or 0 to leave the runtime's choice: 1 when that choice is 2 (two usable CPUs)
// and the operator set no GOMAXPROCS. wireguard-go moves every batch of packets through
// several goroutines (TUN reader, encryption workers, sequential sender, and the same on
// receive); with two Ps they run on both CPUs, and every hand-off wakes the other thread, drags
// the packets' cache lines across, and takes buffers from the other P's pool cache, oldest
// first (cold). Measured with `go run ./test/cmd/bench -backends wireguard,wireguard@<same build
// with GOMAXPROCS=1> -rounds 3` on the 2-core VM: one P moved 21% more on one TCP stream, 16%
// more on four, the same 64-byte packets/s, at 18% less CPU per GB. Both simulated hosts share
// those two CPUs there; a host with two CPUs to itself was not measured, nor any larger host,
// which keep the runtime's choice.
func embeddedWireGuardProcs(backendName, mode string, procs int, gomaxprocsSet bool) int {
	if backendName != subnetmgr.BackendWireGuard || mode != string(wireguard.DatapathEmbedded) || gomaxprocsSet || procs != 2 {
		return 0
	}
	return 1
}
