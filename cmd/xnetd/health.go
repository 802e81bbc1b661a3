package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// The peers' health is kept in its own file beside the state file (healthFile), written by the
// prober's side of the daemon, never by the event loop: at 5,000 peers one write costs tens of
// milliseconds, which the event loop must not spend while leases change. It is written at most
// once per healthWriteInterval when a peer's reachability changed, and every healthRefresh to
// bring RTTs and loss up to date; `xnetd status` merges it into the peers it shows.
const (
	healthRefresh       = 10 * time.Second
	healthWriteInterval = time.Second
)

// healthFile is where the running daemon keeps its peers' health.
func healthFile(stateFile string) string {
	return filepath.Join(filepath.Dir(stateFile), "health.json")
}

// healthRecord is the content of the health file.
type healthRecord struct {
	// PID is the daemon that wrote it: status ignores a file left by an earlier process.
	PID       int                                `json:"pid"`
	UpdatedAt time.Time                          `json:"updated_at"`
	Peers     map[netip.Prefix]health.PeerHealth `json:"peers"`
}

// healthProbes is the daemon's health prober (package health): it probes every peer over the
// overlay and the underlay, and answers the peers' probes. It is best effort: a prober that
// cannot start is logged and the daemon runs without one; the datapath never depends on it.
// Its methods are nil-safe and called from the event loop.
type healthProbes struct {
	p *health.Prober // set once at start; nil when the prober did not start
	// overlay6: peers' IPv6 overlay is probed too (a dual-stack overlay, see overlay6Address).
	overlay6 bool
	path     string
	updates  chan struct{}
	cancel   context.CancelFunc
	done     chan struct{} // closed when the writer has stopped
	closed   bool
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

// overlay6Address is a host's IPv6 overlay address in a dual-stack overlay, probed as a third
// path (health.Overlay6) so that a broken IPv6 datapath shows while IPv4 works: our IPv6
// subnet's first address, the /128 the backend's device holds. Invalid when the overlay is
// not dual stack or the host has no IPv6 subnet, and for host-gw, whose overlay address is
// docker0's and comes and goes with Docker (its IPv6 routes are the kernel's, which xnetd
// check looks at).
func overlay6Address(cfg subnetmgr.Config, backendType string, subnet6 netip.Prefix) netip.Addr {
	if !cfg.EnableIPv6 || cfg.IPv6Only() || !subnet6.IsValid() || backendType == subnetmgr.BackendHostGW {
		return netip.Addr{}
	}
	return subnet6.Masked().Addr()
}

// startHealth starts probing (no peers yet: setPeers) and answering on health.DefaultPort, and
// the writer of the health file.
func (d *daemonRun) startHealth(ctx context.Context) *healthProbes {
	h := &healthProbes{path: healthFile(d.o.stateFile), updates: make(chan struct{}, 1), done: make(chan struct{})}
	// In an IPv6-only overlay both paths are IPv6: from our IPv6 subnet's first address (the
	// /128 the backend's device holds, as it holds <subnet>.0 in IPv4) and from PublicIPv6.
	overlay, optional := overlayAddress(d.chosen.name, d.lease.ID())
	underlay, network := d.iface.IfaceIP, d.cfg.Network
	if d.cfg.IPv6Only() {
		underlay, network = d.iface.PublicIPv6, d.cfg.IPv6Network
	}
	overlay6 := overlay6Address(d.cfg, d.chosen.name, d.lease.IPv6Subnet)
	h.overlay6 = overlay6.IsValid()
	p, err := health.Start(health.Options{
		Overlay: overlay, OverlayOptional: optional, Underlay: underlay, Network: network,
		Overlay6: overlay6, Network6: d.cfg.IPv6Network,
		Logger: d.log, OnChange: func() {
			select {
			case h.updates <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		d.log.Warn("health probes disabled: peers' reachability is not reported", "err", err)
		return h
	}
	h.p = p
	d.m.SetHealth(h)
	d.log.Info("health probes", "port", health.DefaultPort, "overlay", p.LocalAddr(health.Overlay), "underlay", p.LocalAddr(health.Underlay), "file", h.path)
	ctx, h.cancel = context.WithCancel(ctx)
	go h.writeLoop(ctx, d.log)
	return h
}

// writeLoop writes the health file on changes (at most once per healthWriteInterval) and every
// healthRefresh, until ctx ends.
func (h *healthProbes) writeLoop(ctx context.Context, log *slog.Logger) {
	defer close(h.done)
	refresh := time.NewTicker(healthRefresh)
	defer refresh.Stop()
	throttle := time.NewTimer(0)
	defer throttle.Stop()
	pending, ready := true, false
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.updates:
			pending = true
		case <-refresh.C:
			pending = true
		case <-throttle.C:
			ready = true
		}
		if !pending || !ready {
			continue
		}
		rec := healthRecord{PID: os.Getpid(), UpdatedAt: time.Now(), Peers: h.p.Snapshot()}
		if data, err := json.Marshal(rec); err != nil {
			log.Warn("health file not written", "err", err)
		} else if err := writeFileAtomic(h.path, data, 0o644); err != nil {
			log.Warn("health file not written", "file", h.path, "err", err)
		}
		pending, ready = false, false
		throttle.Reset(healthWriteInterval)
	}
}

// close stops the prober and removes the health file: a stopped daemon probes nothing.
func (h *healthProbes) close() {
	if !h.running() {
		return
	}
	h.cancel()
	<-h.done
	h.p.Close()
	h.closed = true
	_ = os.Remove(h.path)
}

func (h *healthProbes) running() bool { return h != nil && h.p != nil && !h.closed }

// setPeers probes exactly these peers. A peer the backend refused is not in the datapath: only
// its underlay is probed.
func (h *healthProbes) setPeers(peers []peerState) {
	if !h.running() {
		return
	}
	out := make([]health.Peer, 0, len(peers))
	for _, ps := range peers {
		// Subnet is the lease's ID (its IPv6 subnet in an IPv6-only overlay), host() its
		// PublicIP or PublicIPv6 alike.
		hp := health.Peer{Subnet: ps.Subnet, PublicIP: ps.host()}
		if ps.Error != "" {
			hp.OverlayWhy = "the backend refused the peer: it is not in the datapath"
		} else {
			hp.Overlay, hp.OverlayOptional = overlayAddress(ps.BackendType, ps.Subnet)
			// Only peers with an IPv6 subnet have an IPv6 overlay (a peer of a dual-stack
			// overlay may run IPv4 only); host-gw peers' is docker0's (see overlay6Address).
			if h.overlay6 && ps.IPv6Subnet.IsValid() && ps.BackendType != subnetmgr.BackendHostGW {
				hp.Overlay6 = ps.IPv6Subnet.Masked().Addr()
			}
		}
		out = append(out, hp)
	}
	h.p.SetPeers(out)
}

// PathHealth is the prober's view for Prometheus (metrics.HealthSource); called from scrapes.
func (h *healthProbes) PathHealth() []metrics.PathHealth {
	var out []metrics.PathHealth
	for subnet, ph := range h.p.Snapshot() {
		paths := health.Paths[:]
		if ph.Overlay6 != nil {
			paths = append(paths, health.Overlay6)
		}
		for _, path := range paths {
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

// attachHealth puts the running daemon's health file into the report's peers.
func attachHealth(rep *statusReport, stateFile string) {
	if !rep.Running {
		return
	}
	data, err := os.ReadFile(healthFile(stateFile))
	if err != nil {
		return
	}
	var rec healthRecord
	if json.Unmarshal(data, &rec) != nil || rec.PID != rep.PID {
		return
	}
	for i := range rep.Peers {
		if h, ok := rec.Peers[rep.Peers[i].Subnet.Masked()]; ok {
			rep.Peers[i].Health = &h
		}
	}
}

// healthCell is one path of a peer in the status table.
func healthCell(h *health.PeerHealth, path health.Path) string {
	if h == nil {
		return "-"
	}
	if path == health.Overlay && h.Overlay6 != nil {
		return h.Overlay.Brief() + ", v6 " + h.Overlay6.Brief()
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
