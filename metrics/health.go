package metrics

import (
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names of the peer health probes (package health).
const (
	NamePeerReachable  = "xnet_peer_reachable"
	NamePeerRTT        = "xnet_peer_rtt_seconds"
	NamePeerProbeLoss  = "xnet_peer_probe_loss_ratio"
	NamePeerProbesLost = "xnet_peer_probes_lost_total"
)

// PathHealth is one peer's reachability over one path ("overlay" or "underlay"), as the daemon's
// prober last measured it.
type PathHealth struct {
	Subnet netip.Prefix
	Path   string
	// Known is false until the path has a verdict (and for a path that is not probed):
	// xnet_peer_reachable is absent then rather than a misleading 0 or 1.
	Known     bool
	Reachable bool
	// RTTP50 is the median round trip over the recent window; Answered, RTTSum and Lost count
	// since the prober started; Loss is the recent window's lost share.
	RTTP50   time.Duration
	Answered uint64
	RTTSum   time.Duration
	Lost     uint64
	Loss     float64
}

// HealthSource reports every peer's path health at scrape time; it must be cheap (a copy of
// what the prober holds) and safe for concurrent use.
type HealthSource interface {
	PathHealth() []PathHealth
}

// SetHealth sets where the peer health metrics come from (nil: none).
func (m *Metrics) SetHealth(src HealthSource) { m.health.set(src) }

var (
	descPeerReachable = prometheus.NewDesc(NamePeerReachable,
		"1 when the peer answers health probes over the path (overlay: through the datapath, as container traffic; underlay: to its PublicIP), 0 when it stopped.",
		[]string{"subnet", "path"}, nil)
	descPeerRTT = prometheus.NewDesc(NamePeerRTT,
		"Round trip of the health probes to the peer over the path; the quantile is over the last 20 probes.",
		[]string{"subnet", "path"}, nil)
	descPeerLoss = prometheus.NewDesc(NamePeerProbeLoss,
		"Share of the last 20 health probes to the peer over the path that went unanswered.",
		[]string{"subnet", "path"}, nil)
	descPeerLost = prometheus.NewDesc(NamePeerProbesLost,
		"Health probes to the peer over the path that went unanswered.", []string{"subnet", "path"}, nil)
)

// healthCollector reads the prober at scrape time.
type healthCollector struct {
	mu  sync.Mutex
	src HealthSource
}

func (c *healthCollector) set(src HealthSource) {
	c.mu.Lock()
	c.src = src
	c.mu.Unlock()
}

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeerReachable, descPeerRTT, descPeerLoss, descPeerLost} {
		ch <- d
	}
}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	src := c.src
	c.mu.Unlock()
	if src == nil {
		return
	}
	for _, h := range src.PathHealth() {
		subnet := h.Subnet.String()
		if h.Known {
			v := 0.0
			if h.Reachable {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descPeerReachable, prometheus.GaugeValue, v, subnet, h.Path)
		}
		if h.Answered > 0 {
			ch <- prometheus.MustNewConstSummary(descPeerRTT, h.Answered, h.RTTSum.Seconds(),
				map[float64]float64{0.5: h.RTTP50.Seconds()}, subnet, h.Path)
		}
		if h.Answered+h.Lost > 0 {
			ch <- prometheus.MustNewConstMetric(descPeerLoss, prometheus.GaugeValue, h.Loss, subnet, h.Path)
			ch <- prometheus.MustNewConstMetric(descPeerLost, prometheus.CounterValue, float64(h.Lost), subnet, h.Path)
		}
	}
}
