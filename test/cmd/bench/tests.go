package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/xnet-dev/xnet/test/harness"
)

// metric is one number in the table. Lower is better only for CPU cost, loss and retransmits.
type metric struct {
	id, label, unit string
	higherBetter    bool
}

var metrics = []metric{
	{"tcp1_gbps", "TCP 1 stream", "Gbit/s", true},
	{"tcp4_gbps", "TCP 4 streams", "Gbit/s", true},
	{"udp64_kpps", "UDP 64 B, 4 senders", "kpps delivered", true},
	{"udp64_loss_pct", "UDP 64 B loss", "%", false},
	{"tcp_rr_tps", "TCP_RR 1 B/1 B", "trans/s", true},
	{"cpu_s_per_gb", "CPU per GB (TCP 1 stream)", "CPU s/GB", false},
	{"tcp1_retransmits", "TCP 1 stream retransmits", "segments", false},
}

// benchTest produces one or more metrics per run.
type benchTest struct {
	id   string // what -tests takes to select exactly this test
	name string
	run  func(ctx context.Context, m *mode, d time.Duration) (map[string]float64, error)
}

var tests = []benchTest{
	{"tcp1", "tcp 1 stream", tcp1},
	{"tcp4", "tcp 4 streams", tcp4},
	{"udp64", "udp 64-byte packets", udp64},
	{"rr", "tcp request/response", tcpRR},
}

func tcp1(ctx context.Context, m *mode, d time.Duration) (map[string]float64, error) {
	before, err := readCPUBusy()
	if err != nil {
		return nil, err
	}
	r, err := harness.RunIperf3(ctx, m.client.Namespace, harness.Iperf3Options{Server: m.target(), Port: iperfBasePort, Duration: d})
	if err != nil {
		return nil, err
	}
	after, err := readCPUBusy()
	if err != nil {
		return nil, err
	}
	out := map[string]float64{"tcp1_gbps": r.BitsPerSecond / 1e9, "tcp1_retransmits": float64(r.Retransmits)}
	// Below 10 MB moved the quotient is noise from other load, not the datapath's cost.
	if gb := float64(r.ReceivedBytes) / 1e9; gb >= 0.01 {
		out["cpu_s_per_gb"] = (after - before) / gb
	}
	return out, nil
}

func tcp4(ctx context.Context, m *mode, d time.Duration) (map[string]float64, error) {
	r, err := harness.RunIperf3(ctx, m.client.Namespace, harness.Iperf3Options{Server: m.target(), Port: iperfBasePort, Duration: d, Streams: 4})
	if err != nil {
		return nil, err
	}
	return map[string]float64{"tcp4_gbps": r.BitsPerSecond / 1e9}, nil
}

// udp64 runs several iperf3 senders at once (one saturates near 100k packets/s on a small VM,
// which would hide the datapath) and sums what the receivers got.
func udp64(ctx context.Context, m *mode, d time.Duration) (map[string]float64, error) {
	results := make([]harness.Iperf3Result, udpSenders)
	errs := make([]error, udpSenders)
	var wg sync.WaitGroup
	for i := range udpSenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = harness.RunIperf3(ctx, m.client.Namespace, harness.Iperf3Options{
				Server: m.target(), Port: iperfBasePort + i, Duration: d, UDP: true, Length: 64, Bitrate: "0"})
		}()
	}
	wg.Wait()
	var pps float64
	var sent, recv int64
	for i, r := range results {
		if errs[i] != nil {
			return nil, errs[i]
		}
		pps += r.PacketsPerSecond()
		sent += r.PacketsSent
		recv += r.PacketsRecv
	}
	loss := 0.0
	if sent > 0 {
		loss = 100 * (1 - float64(recv)/float64(sent))
	}
	return map[string]float64{"udp64_kpps": pps / 1e3, "udp64_loss_pct": loss}, nil
}

func tcpRR(ctx context.Context, m *mode, d time.Duration) (map[string]float64, error) {
	tps, err := runRR(ctx, m.client.Namespace, netipAddrPort(m.target(), rrPort), d)
	if err != nil {
		return nil, err
	}
	return map[string]float64{"tcp_rr_tps": tps}, nil
}

// readCPUBusy returns the machine's busy CPU seconds so far (every state but idle and iowait),
// from the first line of /proc/stat, in USER_HZ (100 per second on Linux).
func readCPUBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	fields := strings.Fields(line)
	if len(fields) < 8 || fields[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy float64
	for i, f := range fields[1:] {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat field %d: %w", i+1, err)
		}
		// user nice system idle iowait irq softirq steal guest guest_nice; guest time is
		// already counted in user, so stop before it.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		busy += v
	}
	return busy / 100, nil
}
