// Package metrics is what xnetd tells operators through Prometheus: the metric names, the
// collectors behind them, the /metrics and /healthz handler, and the two small optional
// interfaces a backend implements to show more than the daemon knows by itself:
//
//   - CounterSource: per-peer packets and bytes, datapath verdicts and drops by reason;
//   - ModeReporter: which variant of the datapath runs and why (ebpf: XDP or TC decap).
//
// The daemon's health prober reports through HealthSource (SetHealth): reachability, RTT and
// loss per peer and path (health.go).
//
// Backends do not import this package to be measured unless they implement one of these; the
// daemon checks with a type assertion. ParseCounters reads a scrape back into Counters, so
// `xnetd status` shows the live counters of a running daemon through its metrics endpoint.
//
// It owns no state of the datapath and never talks to etcd: the daemon feeds it (SetLease,
// ObserveReconcile, ...) and the collectors read the sources at scrape time. Every metric lives
// in a Registry of its own (never Prometheus' global default registry), so several daemons in
// one test process do not collide.
package metrics

import (
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// Metric names. Every name starts with xnet_.
const (
	NameLeasesKnown      = "xnet_leases_known"
	NameLeaseExpiry      = "xnet_lease_expiry_timestamp_seconds"
	NameLeaseInfo        = "xnet_lease_info"
	NameEtcdErrors       = "xnet_etcd_errors_total"
	NameWatchResyncs     = "xnet_watch_resyncs_total"
	NameWatchProbes      = "xnet_watch_progress_requests_total"
	NameReconcile        = "xnet_reconcile_duration_seconds"
	NameBackendInfo      = "xnet_backend_info"
	NameReady            = "xnet_ready"
	NamePeers            = "xnet_peers"
	NamePeerErrors       = "xnet_peer_errors"
	NameLeaseEvents      = "xnet_lease_events_total"
	NamePeerPackets      = "xnet_peer_packets_total"
	NamePeerBytes        = "xnet_peer_bytes_total"
	NameVerdicts         = "xnet_datapath_verdicts_total"
	NameDrops            = "xnet_datapath_drops_total"
	NameCounterReadFails = "xnet_counter_read_errors_total"
	NameLeasesRefused    = "xnet_leases_refused_total"
	NameConflicts        = "xnet_lease_conflicts"
	NameConflictsTotal   = "xnet_lease_conflicts_total"
)

// Directions of the per-peer counters (label "direction").
const (
	DirectionTx = "tx" // from our containers to the peer's
	DirectionRx = "rx" // from the peer's containers to ours
)

// PeerCounters are one peer's traffic as the datapath counted it since it was programmed.
type PeerCounters struct {
	Subnet    netip.Prefix `json:"subnet"`
	TxPackets uint64       `json:"tx_packets"`
	TxBytes   uint64       `json:"tx_bytes"`
	RxPackets uint64       `json:"rx_packets"`
	RxBytes   uint64       `json:"rx_bytes"`
}

// Counters is one snapshot of a datapath's counters. Maps may be nil.
type Counters struct {
	Peers []PeerCounters `json:"peers,omitempty"`
	// Verdicts counts packets per decision of the datapath ("encap", "decap", "pass", ...).
	Verdicts map[string]uint64 `json:"verdicts,omitempty"`
	// Drops counts dropped packets per reason, in snake_case words an operator can act on
	// ("bad_vni", "spoofed_source", "unknown_peer", "not_our_subnet", ...).
	Drops map[string]uint64 `json:"drops,omitempty"`
}

// CounterSource is implemented by backends whose datapath counts packets. Counters must be
// cheap enough to call on every scrape (a map walk, not a per-packet log) and safe to call
// concurrently with AddPeer/RemovePeer.
type CounterSource interface {
	Counters() (Counters, error)
}

// ModeReporter is implemented by backends that run in more than one way: mode is a short word
// ("xdp", "tc", "kernel") and reason says why it was chosen, for `xnetd status` and the log.
type ModeReporter interface {
	Mode() (mode, reason string)
}

// Metrics holds xnetd's collectors and the readiness flag behind /healthz.
type Metrics struct {
	reg *prometheus.Registry

	leasesKnown prometheus.Gauge
	leaseExpiry prometheus.Gauge
	leaseInfo   *prometheus.GaugeVec
	reconcile   prometheus.Histogram
	backendInfo *prometheus.GaugeVec
	ready       prometheus.Gauge
	peers       prometheus.Gauge
	peerErrors  prometheus.Gauge
	leaseEvents *prometheus.CounterVec
	// refused counts peer leases the trust rule refused, by reason (subnetmgr.Refused*);
	// conflicts and conflictsSeen are claims that contradict each other, by kind: those
	// standing now, and every one detected.
	refused       *prometheus.CounterVec
	conflicts     *prometheus.GaugeVec
	conflictsSeen *prometheus.CounterVec

	isReady atomic.Bool
	live    *liveCollector
	health  *healthCollector
}

// New builds the metrics. stats is read at every scrape (it may be nil before the etcd client
// exists).
func New(stats func() subnetmgr.Stats) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		leasesKnown: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NameLeasesKnown, Help: "Leases in etcd this host knows of, its own included.",
		}),
		leaseExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NameLeaseExpiry, Help: "When this host's lease expires unless renewed (Unix seconds).",
		}),
		leaseInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameLeaseInfo, Help: "This host's lease (value 1): its subnet and, in a dual-stack overlay, its IPv6 subnet (empty otherwise).",
		}, []string{"subnet", "ipv6_subnet"}),
		reconcile: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: NameReconcile, Help: "Time to apply one batch of lease events to the datapath.",
			// From one route (~100 us) to thousands of peers at start (~1 s).
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9),
		}),
		backendInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameBackendInfo, Help: "The backend in use (value 1) and its mode.",
		}, []string{"backend", "mode"}),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NameReady, Help: "1 once the datapath is programmed with the initial peer list.",
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NamePeers, Help: "Peer leases applied to the datapath.",
		}),
		peerErrors: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: NamePeerErrors, Help: "Peer leases the backend refused (see xnetd status for why).",
		}),
		leaseEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameLeaseEvents, Help: "Lease events received from etcd, by type.",
		}, []string{"type"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameLeasesRefused, Help: "Peer leases not programmed because the trust rule refused them, by reason (each lease version counted once; xnetd status says which).",
		}, []string{"reason"}),
		conflicts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: NameConflicts, Help: "Claims in etcd that contradict each other now, by kind: a PublicIP named by several leases, our own subnet rewritten with another PublicIP.",
		}, []string{"kind"}),
		conflictsSeen: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: NameConflictsTotal, Help: "Contradicting claims detected, by kind (a write-back within a second may clear one before any scrape).",
		}, []string{"kind"}),
		live:   &liveCollector{stats: stats},
		health: &healthCollector{},
	}
	m.reg.MustRegister(m.leasesKnown, m.leaseExpiry, m.leaseInfo, m.reconcile, m.backendInfo, m.ready,
		m.peers, m.peerErrors, m.leaseEvents, m.refused, m.conflicts, m.conflictsSeen, m.live, m.health)
	return m
}

// Registry is the registry every xnet metric is in (for tests and embedding).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SetStats replaces the function read for the etcd counters.
func (m *Metrics) SetStats(stats func() subnetmgr.Stats) { m.live.setStats(stats) }

// SetBackend records the backend in use and its counters (nil when it keeps none).
func (m *Metrics) SetBackend(name, mode string, counters CounterSource) {
	m.backendInfo.Reset()
	m.backendInfo.WithLabelValues(name, mode).Set(1)
	m.live.setSource(counters)
}

// SetLease records our lease: its subnets and expiry.
func (m *Metrics) SetLease(l subnetmgr.Lease) {
	ipv6 := ""
	if l.IPv6Subnet.IsValid() {
		ipv6 = l.IPv6Subnet.String()
	}
	m.leaseInfo.Reset()
	// The subnet label is the lease's ID: its IPv6 subnet in an IPv6-only overlay.
	m.leaseInfo.WithLabelValues(l.ID().String(), ipv6).Set(1)
	if l.Expiration.IsZero() {
		m.leaseExpiry.Set(0)
		return
	}
	m.leaseExpiry.Set(float64(l.Expiration.UnixNano()) / 1e9)
}

// SetPeers records how many leases are known (ours included), applied and refused.
func (m *Metrics) SetPeers(leasesKnown, applied, refused int) {
	m.leasesKnown.Set(float64(leasesKnown))
	m.peers.Set(float64(applied))
	m.peerErrors.Set(float64(refused))
}

// LeaseEvent counts one lease event of type t ("added", "removed", "changed").
func (m *Metrics) LeaseEvent(t string) { m.leaseEvents.WithLabelValues(t).Inc() }

// LeaseRefused counts one peer lease the trust rule refused, for reason.
func (m *Metrics) LeaseRefused(reason string) { m.refused.WithLabelValues(reason).Inc() }

// ConflictDetected counts one contradiction of kind detected.
func (m *Metrics) ConflictDetected(kind string) { m.conflictsSeen.WithLabelValues(kind).Inc() }

// SetConflicts records how many contradictions of each kind stand now; a kind is exported
// (as 0 when none stands) once it has been set.
func (m *Metrics) SetConflicts(byKind map[string]int) {
	for kind, n := range byKind {
		m.conflicts.WithLabelValues(kind).Set(float64(n))
	}
}

// ObserveReconcile records the time one batch of lease events took.
func (m *Metrics) ObserveReconcile(d time.Duration) { m.reconcile.Observe(d.Seconds()) }

// SetReady flips /healthz: 200 once the datapath is programmed, 503 before.
func (m *Metrics) SetReady(ready bool) {
	m.isReady.Store(ready)
	if ready {
		m.ready.Set(1)
	} else {
		m.ready.Set(0)
	}
}

// Ready reports what /healthz answers.
func (m *Metrics) Ready() bool { return m.isReady.Load() }

// Handler serves /metrics (Prometheus text or protobuf) and /healthz.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !m.isReady.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: datapath not programmed yet\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// liveCollector reads values owned by others at scrape time: subnetmgr's counters and the
// backend's datapath counters. Reading them on demand keeps the datapath free of any work
// for metrics between scrapes.
type liveCollector struct {
	mu        sync.Mutex
	stats     func() subnetmgr.Stats
	source    CounterSource
	readFails uint64
}

var (
	descEtcdErrors = prometheus.NewDesc(NameEtcdErrors, "Failed etcd requests.", nil, nil)
	descResyncs    = prometheus.NewDesc(NameWatchResyncs,
		"Full re-lists of the leases after a compacted, broken or silent watch.", nil, nil)
	descProbes = prometheus.NewDesc(NameWatchProbes,
		"Progress requests sent on a quiet lease watch to check that its etcd member still answers.", nil, nil)
	descPeerPackets = prometheus.NewDesc(NamePeerPackets,
		"Packets between our containers and a peer's, by direction.", []string{"peer", "direction"}, nil)
	descPeerBytes = prometheus.NewDesc(NamePeerBytes,
		"Bytes (inner packets) between our containers and a peer's, by direction.", []string{"peer", "direction"}, nil)
	descVerdicts = prometheus.NewDesc(NameVerdicts, "Datapath decisions, by verdict.", []string{"verdict"}, nil)
	descDrops    = prometheus.NewDesc(NameDrops, "Packets the datapath dropped, by reason.", []string{"reason"}, nil)
	descReadFail = prometheus.NewDesc(NameCounterReadFails,
		"Scrapes where the backend's counters could not be read.", nil, nil)
)

func (c *liveCollector) setStats(f func() subnetmgr.Stats) {
	c.mu.Lock()
	c.stats = f
	c.mu.Unlock()
}

func (c *liveCollector) setSource(s CounterSource) {
	c.mu.Lock()
	c.source = s
	c.mu.Unlock()
}

func (c *liveCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descEtcdErrors, descResyncs, descProbes, descPeerPackets, descPeerBytes, descVerdicts, descDrops, descReadFail} {
		ch <- d
	}
}

func (c *liveCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	stats, source := c.stats, c.source
	c.mu.Unlock()

	var s subnetmgr.Stats
	if stats != nil {
		s = stats()
	}
	ch <- prometheus.MustNewConstMetric(descEtcdErrors, prometheus.CounterValue, float64(s.EtcdErrors))
	ch <- prometheus.MustNewConstMetric(descResyncs, prometheus.CounterValue, float64(s.WatchResyncs))
	ch <- prometheus.MustNewConstMetric(descProbes, prometheus.CounterValue, float64(s.WatchProbes))

	if source != nil {
		counters, err := source.Counters()
		if err != nil {
			c.mu.Lock()
			c.readFails++
			c.mu.Unlock()
		} else {
			collectCounters(ch, counters)
		}
	}
	c.mu.Lock()
	fails := c.readFails
	c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descReadFail, prometheus.CounterValue, float64(fails))
}

func collectCounters(ch chan<- prometheus.Metric, cs Counters) {
	for _, p := range cs.Peers {
		peer := p.Subnet.String()
		ch <- prometheus.MustNewConstMetric(descPeerPackets, prometheus.CounterValue, float64(p.TxPackets), peer, DirectionTx)
		ch <- prometheus.MustNewConstMetric(descPeerPackets, prometheus.CounterValue, float64(p.RxPackets), peer, DirectionRx)
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(p.TxBytes), peer, DirectionTx)
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(p.RxBytes), peer, DirectionRx)
	}
	for verdict, n := range cs.Verdicts {
		ch <- prometheus.MustNewConstMetric(descVerdicts, prometheus.CounterValue, float64(n), verdict)
	}
	for reason, n := range cs.Drops {
		ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(n), reason)
	}
}

// DropPrefix marks a verdict that is a drop ("drop_spoofed"): the datapaths name their
// verdicts after bpf/xnet.h's enum, where every drop reason starts with it.
const DropPrefix = "drop_"

// NewCounters assembles one snapshot from a datapath's packet count per verdict (split by
// SplitVerdicts) and its per-peer counters. Every datapath that counts builds its Counters
// here, so a verdict or a drop reason reads the same in metrics and in `xnetd status`.
func NewCounters(verdicts map[string]uint64, peers []PeerCounters) Counters {
	c := Counters{Peers: peers}
	c.Verdicts, c.Drops = SplitVerdicts(verdicts)
	return c
}

// SplitVerdicts turns a datapath's verdict counts into Counters' Verdicts and Drops: a verdict
// named drop_<reason> is counted as a drop with that reason, the others as verdicts. Backends
// and `xnetd status` use it so a reason reads the same everywhere.
func SplitVerdicts(all map[string]uint64) (verdicts, drops map[string]uint64) {
	verdicts, drops = map[string]uint64{}, map[string]uint64{}
	for name, n := range all {
		if reason, ok := strings.CutPrefix(name, DropPrefix); ok {
			drops[reason] = n
		} else {
			verdicts[name] = n
		}
	}
	return verdicts, drops
}
