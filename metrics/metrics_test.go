package metrics

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// datapath is a backend with counters, as the ebpf and udp backends will be.
type datapath struct {
	c   Counters
	err error
}

func (d *datapath) Counters() (Counters, error) { return d.c, d.err }
func (d *datapath) Mode() (string, string)      { return "tc", "veth underlay: XDP would turn TSO off" }

func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "text/plain")
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics: HTTP %d: %s", rec.Code, rec.Body)
	}
	fams, err := ParseText(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	fam := fams[name]
	if fam == nil {
		t.Fatalf("metric %s missing", name)
	}
	for _, m := range fam.GetMetric() {
		got := labelMap(m)
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			match = match && got[labels[i]] == labels[i+1]
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	t.Fatalf("metric %s%v missing", name, labels)
	return 0
}

func TestEveryMetricIsExportedWithItsName(t *testing.T) {
	stats := subnetmgr.Stats{EtcdErrors: 3, WatchResyncs: 2, WatchProbes: 7}
	m := New(func() subnetmgr.Stats { return stats })
	dp := &datapath{c: Counters{
		Peers: []PeerCounters{
			{Subnet: netip.MustParsePrefix("10.244.2.0/24"), TxPackets: 10, TxBytes: 1000, RxPackets: 7, RxBytes: 700},
			{Subnet: netip.MustParsePrefix("10.244.3.0/24"), TxPackets: 1, TxBytes: 100, RxPackets: 2, RxBytes: 200},
		},
		Verdicts: map[string]uint64{"encap": 11, "decap": 9, "pass": 500},
		Drops:    map[string]uint64{"spoofed_source": 4, "bad_vni": 1},
	}}
	mode, _ := dp.Mode()
	m.SetBackend("ebpf", mode, dp)
	expiry := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	m.SetLease(subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64"), Expiration: expiry})
	m.SetPeers(3, 2, 0)
	m.ObserveReconcile(2 * time.Millisecond)
	m.ObserveReconcile(3 * time.Millisecond)
	m.LeaseEvent("added")
	m.LeaseRefused(subnetmgr.RefusedOutsideNetwork)
	m.LeaseRefused(subnetmgr.RefusedOutsideNetwork)
	m.ConflictDetected("duplicate_public_ip")
	m.SetConflicts(map[string]int{"duplicate_public_ip": 1, "own_subnet_rewritten": 0})

	fams := scrape(t, m.Handler())
	tests := []struct {
		name   string
		labels []string
		want   float64
	}{
		{NameLeasesKnown, nil, 3},
		{NamePeers, nil, 2},
		{NameLeaseExpiry, nil, float64(expiry.Unix())},
		{NameLeaseInfo, []string{"subnet", "10.244.1.0/24", "ipv6_subnet", "fd00:10:244:1::/64"}, 1},
		{NameEtcdErrors, nil, 3},
		{NameWatchResyncs, nil, 2},
		{NameWatchProbes, nil, 7},
		{NameReconcile, nil, 2}, // sample count
		{NameBackendInfo, []string{"backend", "ebpf", "mode", "tc"}, 1},
		{NameLeaseEvents, []string{"type", "added"}, 1},
		{NamePeerPackets, []string{"peer", "10.244.2.0/24", "direction", "tx"}, 10},
		{NamePeerBytes, []string{"peer", "10.244.2.0/24", "direction", "rx"}, 700},
		{NameVerdicts, []string{"verdict", "pass"}, 500},
		{NameDrops, []string{"reason", "spoofed_source"}, 4},
		{NameReady, nil, 0},
		{NameLeasesRefused, []string{"reason", "outside_network"}, 2},
		{NameConflicts, []string{"kind", "duplicate_public_ip"}, 1},
		{NameConflicts, []string{"kind", "own_subnet_rewritten"}, 0},
		{NameConflictsTotal, []string{"kind", "duplicate_public_ip"}, 1},
	}
	for _, tt := range tests {
		if got := value(t, fams, tt.name, tt.labels...); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	for name := range fams {
		if !strings.HasPrefix(name, "xnet_") {
			t.Errorf("metric %s is not prefixed xnet_", name)
		}
	}

	// status reads the counters back from the scrape: the same numbers.
	back, ok, err := CountersFromFamilies(fams)
	if err != nil || !ok {
		t.Fatalf("CountersFromFamilies: ok=%v err=%v", ok, err)
	}
	if !reflect.DeepEqual(back, dp.c) {
		t.Errorf("counters read back\n got %+v\nwant %+v", back, dp.c)
	}
}

func TestBackendWithoutCountersExportsNone(t *testing.T) {
	m := New(nil)
	m.SetBackend("vxlan", "kernel", nil)
	fams := scrape(t, m.Handler())
	if _, ok, _ := CountersFromFamilies(fams); ok {
		t.Error("a backend without CounterSource produced datapath counters")
	}
	if got := value(t, fams, NameEtcdErrors); got != 0 {
		t.Errorf("etcd errors %v without a stats source", got)
	}
}

func TestUnreadableCountersAreCountedNotFatal(t *testing.T) {
	m := New(nil)
	m.SetBackend("ebpf", "xdp", &datapath{err: errors.New("map gone")})
	fams := scrape(t, m.Handler())
	if got := value(t, fams, NameCounterReadFails); got != 1 {
		t.Errorf("%s = %v, want 1", NameCounterReadFails, got)
	}
}

func TestHealthzIsReadyOnlyOnceTheDatapathIsProgrammed(t *testing.T) {
	m := New(nil)
	h := m.Handler()
	get := func() int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
		return rec.Code
	}
	if code := get(); code != http.StatusServiceUnavailable {
		t.Errorf("before ready: HTTP %d, want 503", code)
	}
	m.SetReady(true)
	if code := get(); code != http.StatusOK {
		t.Errorf("ready: HTTP %d, want 200", code)
	}
	if got := value(t, scrape(t, h), NameReady); got != 1 {
		t.Errorf("%s = %v after SetReady(true)", NameReady, got)
	}
}
