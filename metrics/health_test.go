package metrics

import (
	"net/netip"
	"testing"
	"time"
)

type prober []PathHealth

func (p prober) PathHealth() []PathHealth { return p }

func TestPeerHealthIsExportedPerSubnetAndPath(t *testing.T) {
	m := New(nil)
	a, b := netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("10.244.3.0/24")
	m.SetHealth(prober{
		{Subnet: a, Path: "overlay", Known: true, Reachable: true, RTTP50: 300 * time.Microsecond, Answered: 10, RTTSum: 3 * time.Millisecond},
		{Subnet: a, Path: "underlay", Known: true, Reachable: true, RTTP50: 200 * time.Microsecond, Answered: 10, RTTSum: 2 * time.Millisecond},
		{Subnet: b, Path: "overlay", Known: true, Reachable: false, Answered: 4, RTTSum: time.Millisecond, Lost: 6, Loss: 0.6},
		{Subnet: b, Path: "underlay", Known: false},
	})
	fams := scrape(t, m.Handler())
	for _, tt := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{NamePeerReachable, []string{"subnet", a.String(), "path", "overlay"}, 1},
		{NamePeerReachable, []string{"subnet", b.String(), "path", "overlay"}, 0},
		{NamePeerProbeLoss, []string{"subnet", b.String(), "path", "overlay"}, 0.6},
		{NamePeerProbesLost, []string{"subnet", b.String(), "path", "overlay"}, 6},
		{NamePeerProbeLoss, []string{"subnet", a.String(), "path", "underlay"}, 0},
	} {
		if got := value(t, fams, tt.name, tt.labels...); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	for _, m := range fams[NamePeerReachable].GetMetric() {
		if l := labelMap(m); l["subnet"] == b.String() && l["path"] == "underlay" {
			t.Errorf("%s reported for a path without a verdict yet", NamePeerReachable)
		}
	}
	var found bool
	for _, m := range fams[NamePeerRTT].GetMetric() {
		if l := labelMap(m); l["subnet"] == a.String() && l["path"] == "overlay" {
			found = true
			s := m.GetSummary()
			if s.GetSampleCount() != 10 || s.GetSampleSum() != 0.003 || len(s.GetQuantile()) != 1 || s.GetQuantile()[0].GetValue() != 0.0003 {
				t.Errorf("%s{%s overlay} = %v, want count 10, sum 0.003, p50 0.0003", NamePeerRTT, a, s)
			}
		}
	}
	if !found {
		t.Errorf("%s{%s overlay} missing", NamePeerRTT, a)
	}
}
