package main

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
)

// stat is one (datapath, metric) cell: every sample, its median and range, and the median's
// ratio to each baseline's median (0 when a baseline has no value for it).
type stat struct {
	Backend     string    `json:"backend"`
	Metric      string    `json:"metric"`
	Unit        string    `json:"unit"`
	Samples     []float64 `json:"samples"`
	Median      float64   `json:"median"`
	Min         float64   `json:"min"`
	Max         float64   `json:"max"`
	RatioHostGW float64   `json:"ratio_to_host_gw,omitempty"`
	RatioVXLAN  float64   `json:"ratio_to_kernel_vxlan,omitempty"`
}

type results struct {
	System      systemInfo          `json:"system"`
	Rounds      int                 `json:"rounds"`
	DurationSec float64             `json:"duration_s"`
	Backends    []string            `json:"backends"`
	NotMeasured map[string]string   `json:"not_measured,omitempty"`
	Errors      map[string][]string `json:"errors,omitempty"`
	Notes       []string            `json:"notes"`
	Stats       []*stat             `json:"results"`

	byKey map[[2]string]*stat
}

func newResults(info systemInfo, o options, modes []*mode) *results {
	r := &results{
		System: info, Rounds: o.rounds, DurationSec: o.duration.Seconds(),
		NotMeasured: map[string]string{}, Errors: map[string][]string{}, byKey: map[[2]string]*stat{},
		Notes: []string{
			"Container to container across two hosts in network namespaces on one machine (veth underlay).",
			"Interleaved rounds: every datapath once per round, in the same order; medians with min-max.",
			"UDP: 4 iperf3 senders (-u -l 64 -b 0) to 4 receivers; kpps delivered is summed receiver-side.",
			"TCP_RR: one TCP connection, 1-byte request, 1-byte response, blocking sockets (netperf TCP_RR).",
			"CPU per GB: busy CPU seconds of the whole machine (/proc/stat) during the TCP 1-stream test " +
				"divided by GB received; it includes any other load on the machine.",
		},
	}
	for _, m := range modes {
		if m.err != nil {
			r.NotMeasured[m.name] = m.err.Error()
			continue
		}
		r.Backends = append(r.Backends, m.name)
	}
	return r
}

func (r *results) add(backend, metricID string, v float64) {
	k := [2]string{backend, metricID}
	s := r.byKey[k]
	if s == nil {
		s = &stat{Backend: backend, Metric: metricID}
		r.byKey[k] = s
	}
	s.Samples = append(s.Samples, v)
}

func (r *results) addError(backend, test string, err error) {
	r.Errors[backend] = append(r.Errors[backend], test+": "+err.Error())
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// finish computes medians and ratios, in table order: metric by metric, datapaths in run order.
func (r *results) finish() {
	for _, m := range metrics {
		for _, b := range r.Backends {
			s := r.byKey[[2]string{b, m.id}]
			if s == nil {
				continue
			}
			s.Unit = m.unit
			s.Median = median(s.Samples)
			s.Min, s.Max = slices.Min(s.Samples), slices.Max(s.Samples)
			r.Stats = append(r.Stats, s)
		}
		for _, b := range r.Backends {
			s := r.byKey[[2]string{b, m.id}]
			if s == nil {
				continue
			}
			// An IPv6 mode is held against the baselines' IPv6 twins.
			suffix := ""
			if modeOf(b).v6 {
				suffix = v6Suffix
			}
			if base := r.byKey[[2]string{baseHostGW + suffix, m.id}]; base != nil && base.Median != 0 {
				s.RatioHostGW = s.Median / base.Median
			}
			if base := r.byKey[[2]string{baseVXLAN + suffix, m.id}]; base != nil && base.Median != 0 {
				s.RatioVXLAN = s.Median / base.Median
			}
		}
	}
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func ratio(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", v)
}

func (r *results) printTable(w io.Writer) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tMETRIC\tMEDIAN\tMIN-MAX\tUNIT\tVS HOST-GW\tVS KERNEL VXLAN")
	last := ""
	for _, s := range r.Stats {
		if s.Metric != last && last != "" {
			fmt.Fprintln(tw, "\t\t\t\t\t\t")
		}
		last = s.Metric
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s-%s\t%s\t%s\t%s\n", s.Backend, metricLabel(s.Metric), num(s.Median),
			num(s.Min), num(s.Max), s.Unit, ratio(s.RatioHostGW), ratio(s.RatioVXLAN))
	}
	tw.Flush()
	for b, why := range r.NotMeasured {
		fmt.Fprintf(w, "not measured: %s: %s\n", b, why)
	}
	for b, errs := range r.Errors {
		fmt.Fprintf(w, "failed samples of %s: %s\n", b, strings.Join(errs, "; "))
	}
	fmt.Fprintf(w, "kernel %s, %d CPUs, %s\n", r.System.Kernel, r.System.CPUs, r.System.Tools["iperf3"])
}

func metricLabel(id string) string {
	for _, m := range metrics {
		if m.id == id {
			return m.label
		}
	}
	return id
}

func (r *results) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// svg draws one group of bars per metric, each bar the datapath's median as a ratio to host-gw
// (host-gw itself is 1.0), labelled with the ratio and the value. Hand-written SVG: no deps.
func (r *results) svg() string {
	colors := []string{"#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b"}
	var shown []metric
	for _, m := range metrics {
		if m.id != "tcp1_retransmits" && m.id != "udp64_loss_pct" {
			shown = append(shown, m)
		}
	}
	const (
		left, top, plotH, barW, gap, groupGap = 60, 70, 300, 26, 4, 40
	)
	nb := len(r.Backends)
	groupW := nb*(barW+gap) + groupGap
	width := left + len(shown)*groupW + 40
	height := top + plotH + 110
	maxRatio := 1.2
	for _, s := range r.Stats {
		maxRatio = math.Max(maxRatio, s.RatioHostGW*1.1)
	}
	y := func(v float64) float64 { return top + plotH - v/maxRatio*plotH }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="15" font-weight="bold">xnet datapaths, container to container across hosts: median as a ratio to host-gw</text>`+"\n", left)
	fmt.Fprintf(&b, `<text x="%d" y="38">kernel %s, %d CPUs, %d rounds x %.0f s, %s. CPU per GB: lower is better.</text>`+"\n",
		left, html.EscapeString(r.System.Kernel), r.System.CPUs, r.Rounds, r.DurationSec, r.System.Started.Format("2006-01-02 15:04 MST"))
	for _, t := range []float64{0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5} {
		if t > maxRatio {
			break
		}
		stroke := "#ddd"
		if t == 1 {
			stroke = "#555"
		}
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="%s"/>`+"\n", left, width-30, y(t), y(t), stroke)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%.1fx</text>`+"\n", left-6, y(t)+4, t)
	}
	for gi, m := range shown {
		gx := left + 20 + gi*groupW
		for bi, backend := range r.Backends {
			s := r.byKey[[2]string{backend, m.id}]
			if s == nil || s.RatioHostGW == 0 {
				continue
			}
			x := gx + bi*(barW+gap)
			fmt.Fprintf(&b, `<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s %s: %s %s (%s-%s)</title></rect>`+"\n",
				x, y(s.RatioHostGW), barW, y(0)-y(s.RatioHostGW), colors[bi%len(colors)],
				html.EscapeString(backend), html.EscapeString(m.label), num(s.Median), html.EscapeString(m.unit), num(s.Min), num(s.Max))
			fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="middle" font-size="9">%.2f</text>`+"\n", x+barW/2, y(s.RatioHostGW)-3, s.RatioHostGW)
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", gx+nb*(barW+gap)/2, top+plotH+16, html.EscapeString(m.label))
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" fill="#666">%s</text>`+"\n", gx+nb*(barW+gap)/2, top+plotH+30, html.EscapeString(m.unit))
	}
	for bi, backend := range r.Backends {
		lx := left + bi*170
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/>`+"\n", lx, top+plotH+55, colors[bi%len(colors)])
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", lx+16, top+plotH+65, html.EscapeString(backend))
	}
	b.WriteString("</svg>\n")
	return b.String()
}
