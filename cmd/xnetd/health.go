package main

import (
	"context"
	"net/netip"
	"time"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// healthRefresh is how often the state file is rewritten just to bring the peers' RTTs and loss
// up to date; a change of reachability is written at once (within stateWriteInterval).
const healthRefresh = 10 * time.Second

// healthProbes is the daemon's health prober (package health): it probes every peer over the
// overlay and the underlay, and answers the peers' probes. It is best effort: a prober that
// cannot start is logged and the daemon runs without one; the datapath never depends on it.
// Its methods are nil-safe and, but for updates, called from the event loop only.
type healthProbes struct {
	p       *health.Prober // set once at start; nil when the prober did not start
	updates chan struct{}
	cancel  context.CancelFunc
	closed  bool
}

// overlayAddress is the address a host's overlay probes go to and come from: <subnet>.0 on the
// VXLAN backends' device (xnet0, xnet.<VNI>), docker0's gateway <subnet>.1 for host-gw, which
// has no device and exists once Docker runs (optional).
func overlayAddress(backendType string, subnet netip.Prefix) (addr netip.Addr, optional bool) {
	if backendType == subnetmgr.BackendHostGW {
		return subnetmgr.GatewayOf(subnet).Addr(), true
	}
	return subnet.Masked().Addr(), false
}

// startHealth starts probing (no peers yet: setPeers) and answering on health.DefaultPort.
func (d *daemonRun) startHealth(ctx context.Context) *healthProbes {
	h := &healthProbes{updates: make(chan struct{}, 1)}
	notify := func() {
		select {
		case h.updates <- struct{}{}:
		default:
		}
	}
	overlay, optional := overlayAddress(d.chosen.name, d.lease.Subnet)
	p, err := health.Start(health.Options{
		Overlay: overlay, OverlayOptional: optional, Underlay: d.iface.IfaceIP, Network: d.cfg.Network,
		Logger: d.log, OnChange: notify,
	})
	if err != nil {
		d.log.Warn("health probes disabled: peers' reachability is not reported", "err", err)
		return h
	}
	h.p = p
	d.m.SetHealth(h)
	d.log.Info("health probes", "port", health.DefaultPort, "overlay", p.LocalAddr(health.Overlay), "underlay", p.LocalAddr(health.Underlay))
	ctx, h.cancel = context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(healthRefresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				notify()
			}
		}
	}()
	return h
}

// close stops the prober; the state file then carries no health (a stopped daemon probes
// nothing).
func (h *healthProbes) close() {
	if h == nil || h.p == nil || h.closed {
		return
	}
	h.cancel()
	h.p.Close()
	h.closed = true
}

func (h *healthProbes) running() bool { return h != nil && h.p != nil && !h.closed }

// changes fires when a peer's reachability changed, and every healthRefresh.
func (h *healthProbes) changes() <-chan struct{} {
	if !h.running() {
		return nil
	}
	return h.updates
}

// setPeers probes exactly these peers. A peer the backend refused is not in the datapath: only
// its underlay is probed.
func (h *healthProbes) setPeers(peers []peerState) {
	if !h.running() {
		return
	}
	out := make([]health.Peer, 0, len(peers))
	for _, ps := range peers {
		hp := health.Peer{Subnet: ps.Subnet, PublicIP: ps.PublicIP}
		if ps.Error != "" {
			hp.OverlayWhy = "the backend refused the peer: it is not in the datapath"
		} else {
			hp.Overlay, hp.OverlayOptional = overlayAddress(ps.BackendType, ps.Subnet)
		}
		out = append(out, hp)
	}
	h.p.SetPeers(out)
}

// fill sets each peer's Health from the prober, for the state file.
func (h *healthProbes) fill(peers []peerState) {
	if !h.running() {
		return
	}
	snap := h.p.Snapshot()
	for i := range peers {
		if ph, ok := snap[peers[i].Subnet.Masked()]; ok {
			peers[i].Health = &ph
		}
	}
}

// PathHealth is the prober's view for Prometheus (metrics.HealthSource); called from scrapes.
func (h *healthProbes) PathHealth() []metrics.PathHealth {
	var out []metrics.PathHealth
	for subnet, ph := range h.p.Snapshot() {
		for _, path := range health.Paths {
			s := ph.Path(path)
			known := s.State == health.StateReachable || s.State == health.StateUnreachable
			out = append(out, metrics.PathHealth{
				Subnet: subnet, Path: string(path), Known: known, Reachable: s.State == health.StateReachable,
				RTTP50: time.Duration(s.RTTP50), Answered: s.Answered, RTTSum: s.RTTSum, Lost: s.Lost, Loss: s.Loss,
			})
		}
	}
	return out
}

// healthCell is one path of a peer in the status table.
func healthCell(h *health.PeerHealth, path health.Path) string {
	if h == nil {
		return "-"
	}
	return h.Path(path).Brief()
}

// healthProblem is what the peer's health adds to the PROBLEM column ("" when nothing).
func healthProblem(h *health.PeerHealth) string {
	if h == nil {
		return ""
	}
	return h.Problem()
}
