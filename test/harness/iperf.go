package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// iperf3 drivers shared by the demo and the benchmark. The numbers come from iperf3's JSON
// report (-J) and are always the receiver's side: what was delivered, not what was offered.

// StartIperf3Server starts `iperf3 -s -p port` in ns and waits until it listens.
func StartIperf3Server(ctx context.Context, ns *Namespace, port int) (*Process, error) {
	p, err := ns.Start("iperf3", "-s", "-p", strconv.Itoa(port))
	if err != nil {
		return nil, err
	}
	hexPort := fmt.Sprintf(":%04X ", port)
	for {
		// /proc/<pid>/net shows the sockets of the process's network namespace.
		for _, f := range []string{"tcp", "tcp6"} {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", p.Pid, f))
			for _, line := range strings.Split(string(b), "\n") {
				fields := strings.Fields(line)
				// local_address is field 1, st field 3 (0A = LISTEN).
				if len(fields) > 3 && strings.HasSuffix(fields[1]+" ", hexPort) && fields[3] == "0A" {
					return p, nil
				}
			}
		}
		if p.Exited() {
			return nil, fmt.Errorf("iperf3 server in %s exited: %s", ns.Name, strings.TrimSpace(p.Output()))
		}
		select {
		case <-ctx.Done():
			_ = p.Kill()
			return nil, fmt.Errorf("iperf3 server in %s not listening on %d: %w", ns.Name, port, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Iperf3Options is one iperf3 client run.
type Iperf3Options struct {
	Server   netip.Addr
	Port     int
	Duration time.Duration // whole seconds (iperf3 -t takes an integer; 0 would mean forever)
	Streams  int           // -P; default 1
	UDP      bool          // -u, with Length and Bitrate
	Length   int           // -l; UDP payload bytes
	Bitrate  string
}

// Iperf3Result is the receiver-side summary of one run.
type Iperf3Result struct {
	Seconds       float64 // receiver's measured interval
	ReceivedBytes int64
	BitsPerSecond float64 // received
	Retransmits   int64   // TCP only, sender side
	PacketsSent   int64   // UDP only
	PacketsRecv   int64   // UDP only: delivered to the receiver
}

// PacketsPerSecond is the UDP delivery rate.
func (r Iperf3Result) PacketsPerSecond() float64 {
	if r.Seconds <= 0 {
		return 0
	}
	return float64(r.PacketsRecv) / r.Seconds
}

// Loss is the fraction of UDP packets sent but not delivered.
func (r Iperf3Result) Loss() float64 {
	if r.PacketsSent <= 0 {
		return 0
	}
	return 1 - float64(r.PacketsRecv)/float64(r.PacketsSent)
}

type iperf3Sum struct {
	Seconds       float64 `json:"seconds"`
	Bytes         int64   `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
	Retransmits   int64   `json:"retransmits"`
	Packets       int64   `json:"packets"`
	LostPackets   int64   `json:"lost_packets"`
}

type iperf3Report struct {
	Error string `json:"error"`
	End   struct {
		SumSent     iperf3Sum `json:"sum_sent"`
		SumReceived iperf3Sum `json:"sum_received"`
	} `json:"end"`
}

// RunIperf3 runs an iperf3 client in ns and returns the receiver-side result.
func RunIperf3(ctx context.Context, ns *Namespace, o Iperf3Options) (Iperf3Result, error) {
	if o.Streams == 0 {
		o.Streams = 1
	}
	secs := int((o.Duration + time.Second - 1) / time.Second)
	if secs < 1 {
		return Iperf3Result{}, fmt.Errorf("iperf3: Duration %v: want at least 1s", o.Duration)
	}
	args := []string{"-c", o.Server.String(), "-p", strconv.Itoa(o.Port), "-J",
		"-t", strconv.Itoa(secs), "-P", strconv.Itoa(o.Streams)}
	if o.UDP {
		args = append(args, "-u")
		if o.Length > 0 {
			args = append(args, "-l", strconv.Itoa(o.Length))
		}
		if o.Bitrate != "" {
			args = append(args, "-b", o.Bitrate)
		}
	}
	// iperf3 gives up on its own; the extra time covers connecting and the final exchange.
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+15*time.Second)
	defer cancel()
	out, runErr := ns.Run(ctx, "iperf3", args...)
	var rep iperf3Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		if runErr != nil {
			return Iperf3Result{}, runErr
		}
		return Iperf3Result{}, fmt.Errorf("iperf3 in %s: parse JSON report: %w", ns.Name, err)
	}
	if rep.Error != "" {
		return Iperf3Result{}, fmt.Errorf("iperf3 in %s to %s:%d: %s", ns.Name, o.Server, o.Port, rep.Error)
	}
	if runErr != nil {
		return Iperf3Result{}, runErr
	}
	r := Iperf3Result{
		Seconds:       rep.End.SumReceived.Seconds,
		ReceivedBytes: rep.End.SumReceived.Bytes,
		BitsPerSecond: rep.End.SumReceived.BitsPerSecond,
		Retransmits:   rep.End.SumSent.Retransmits,
	}
	if o.UDP {
		// The receiver counts up to the highest sequence number it saw and the gaps below it.
		r.PacketsSent = rep.End.SumSent.Packets
		r.PacketsRecv = rep.End.SumReceived.Packets - rep.End.SumReceived.LostPackets
	}
	return r, nil
}
