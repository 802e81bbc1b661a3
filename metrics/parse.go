package metrics

import (
	"fmt"
	"io"
	"net/netip"
	"sort"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// ParseText parses a scrape in the Prometheus text format into metric families by name.
func ParseText(r io.Reader) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse metrics text: %w", err)
	}
	return fams, nil
}

// CountersFromFamilies rebuilds the datapath Counters from a scrape of our own endpoint: the
// inverse of what the collector exports. ok is false when the scrape holds no datapath
// counters at all (the backend has none).
func CountersFromFamilies(fams map[string]*dto.MetricFamily) (c Counters, ok bool, err error) {
	peers := map[netip.Prefix]*PeerCounters{}
	peer := func(s string) (*PeerCounters, error) {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("metric label peer=%q is not a subnet: %w", s, err)
		}
		if pc, ok := peers[p]; ok {
			return pc, nil
		}
		pc := &PeerCounters{Subnet: p}
		peers[p] = pc
		return pc, nil
	}
	for _, name := range []string{NamePeerPackets, NamePeerBytes} {
		fam := fams[name]
		if fam == nil {
			continue
		}
		ok = true
		for _, m := range fam.GetMetric() {
			labels := labelMap(m)
			pc, err := peer(labels["peer"])
			if err != nil {
				return Counters{}, false, err
			}
			v := uint64(m.GetCounter().GetValue())
			switch {
			case name == NamePeerPackets && labels["direction"] == DirectionTx:
				pc.TxPackets = v
			case name == NamePeerPackets && labels["direction"] == DirectionRx:
				pc.RxPackets = v
			case name == NamePeerBytes && labels["direction"] == DirectionTx:
				pc.TxBytes = v
			case name == NamePeerBytes && labels["direction"] == DirectionRx:
				pc.RxBytes = v
			}
		}
	}
	for name, dst := range map[string]*map[string]uint64{NameVerdicts: &c.Verdicts, NameDrops: &c.Drops} {
		fam := fams[name]
		if fam == nil {
			continue
		}
		ok = true
		label := "verdict"
		if name == NameDrops {
			label = "reason"
		}
		*dst = map[string]uint64{}
		for _, m := range fam.GetMetric() {
			(*dst)[labelMap(m)[label]] = uint64(m.GetCounter().GetValue())
		}
	}
	for _, pc := range peers {
		c.Peers = append(c.Peers, *pc)
	}
	sort.Slice(c.Peers, func(i, j int) bool { return c.Peers[i].Subnet.Addr().Less(c.Peers[j].Subnet.Addr()) })
	return c, ok, nil
}

func labelMap(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}
