package udp

import (
	"net/netip"
	"sort"
	"sync/atomic"

	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/wire"
)

// verdict is what the datapath did with one packet. The names are bpf/xnet.h's verdicts in
// lower case (encap, decap, drop_malformed, ...), so `xnetd status` and the metrics show a udp
// host and an ebpf host the same way; the udp-only ones come after.
type verdict uint8

const (
	verdictEncap verdict = iota
	verdictDecap
	verdictDropMalformed
	verdictDropInnerNotIPv4
	verdictDropBadVtepMAC
	verdictDropNotLocal
	verdictDropUnknownSource
	verdictDropSpoofed
	verdictDropNoRoute
	// udp only: the socket owns the port, so what the eBPF decap passes to the stack (another
	// VNI, not VXLAN at all) is ours to drop here.
	verdictDropNotVXLAN
	verdictDropWrongVNI
	verdictDropOversized
	verdictDropSendError // the kernel refused a datagram (no route to the peer, buffer full)
	verdictDropTUNError  // the kernel refused a packet written to xnet0
	numVerdicts
)

var verdictNames = [numVerdicts]string{
	verdictEncap:             "encap",
	verdictDecap:             "decap",
	verdictDropMalformed:     "drop_malformed",
	verdictDropInnerNotIPv4:  "drop_inner_not_ipv4",
	verdictDropBadVtepMAC:    "drop_bad_vtep_mac",
	verdictDropNotLocal:      "drop_not_local",
	verdictDropUnknownSource: "drop_unknown_source",
	verdictDropSpoofed:       "drop_spoofed",
	verdictDropNoRoute:       "drop_no_route",
	verdictDropNotVXLAN:      "drop_not_vxlan",
	verdictDropWrongVNI:      "drop_wrong_vni",
	verdictDropOversized:     "drop_oversized",
	verdictDropSendError:     "drop_send_error",
	verdictDropTUNError:      "drop_tun_error",
}

func (v verdict) String() string {
	if v < numVerdicts {
		return verdictNames[v]
	}
	return "unknown"
}

// verdictOf maps what wire.Decode found to the verdict counted for it.
func verdictOf(p wire.Problem) verdict {
	switch p {
	case wire.OK:
		return verdictDecap
	case wire.NotVXLAN:
		return verdictDropNotVXLAN
	case wire.WrongVNI:
		return verdictDropWrongVNI
	case wire.BadVtepMAC:
		return verdictDropBadVtepMAC
	case wire.InnerNotIPv4:
		return verdictDropInnerNotIPv4
	case wire.Oversized:
		return verdictDropOversized
	default:
		return verdictDropMalformed
	}
}

// counters are the process-wide verdict counters. Each queue counts a batch in a local tally
// and adds it here once per batch, so the shared cache lines are touched once per batch, not
// once per packet.
type counters struct {
	verdicts [numVerdicts]struct{ packets, bytes atomic.Uint64 }
}

func newCounters() *counters { return &counters{} }

// tally is one queue's counts for one batch.
type tally [numVerdicts]struct{ packets, bytes uint64 }

func (t *tally) add(v verdict, bytes int) {
	t[v].packets++
	t[v].bytes += uint64(bytes)
}

func (c *counters) flush(t *tally) {
	for v := range t {
		if t[v].packets != 0 {
			c.verdicts[v].packets.Add(t[v].packets)
			c.verdicts[v].bytes.Add(t[v].bytes)
			t[v].packets, t[v].bytes = 0, 0
		}
	}
}

// Counter is the packets and bytes (inner IPv4 or IPv6 bytes) of one verdict.
type Counter struct {
	Packets uint64
	Bytes   uint64
}

// PeerCounters is the traffic exchanged with one peer, by its PublicIP.
type PeerCounters struct {
	PublicIP  netip.Addr
	Subnet    netip.Prefix
	TxPackets uint64
	TxBytes   uint64
	RxPackets uint64
	RxBytes   uint64
}

// Counters is a snapshot of the datapath's counters. Verdicts holds every verdict name, zero
// or not, so a dashboard sees the full set from the start.
type Counters struct {
	Verdicts map[string]Counter
	Peers    []PeerCounters // sorted by PublicIP
}

// Status is what `xnetd status` shows for a udp host.
type Status struct {
	Device      string
	Port        int
	VNI         int
	MTU         int
	Queues      int
	SendSockets int
	// What the kernel granted: TUN segmentation offload (IFF_VNET_HDR), UDP GSO on send,
	// UDP GRO on receive. Each missing one costs throughput, not correctness.
	TUNOffload bool
	UDPGSO     bool
	UDPGRO     bool
	Counters   Counters
}

// Traffic returns the verdict and per-peer counters so far, bytes included. Peers removed
// since are not listed; their traffic stays in the verdict totals.
func (b *Backend) Traffic() Counters {
	c := Counters{Verdicts: make(map[string]Counter, numVerdicts)}
	for v := verdict(0); v < numVerdicts; v++ {
		c.Verdicts[v.String()] = Counter{
			Packets: b.stats.verdicts[v].packets.Load(),
			Bytes:   b.stats.verdicts[v].bytes.Load(),
		}
	}
	for _, p := range b.tables.load().all() {
		c.Peers = append(c.Peers, PeerCounters{
			PublicIP:  p.publicIP,
			Subnet:    p.subnet,
			TxPackets: p.stats.txPackets.Load(),
			TxBytes:   p.stats.txBytes.Load(),
			RxPackets: p.stats.rxPackets.Load(),
			RxBytes:   p.stats.rxBytes.Load(),
		})
	}
	sort.Slice(c.Peers, func(i, j int) bool { return c.Peers[i].PublicIP.Less(c.Peers[j].PublicIP) })
	return c
}

// Status returns the datapath's settings, what the kernel granted, and the counters.
func (b *Backend) Status() Status {
	b.mu.Lock()
	s := Status{Device: DeviceName, Port: b.Port, VNI: b.VNI, MTU: b.MTU()}
	if b.dp != nil {
		s.Queues = len(b.dp.res.queues)
		s.SendSockets = len(b.dp.res.send)
		s.TUNOffload, s.UDPGSO, s.UDPGRO = b.dp.res.offload, b.dp.res.gso, b.dp.res.gro
	}
	b.mu.Unlock()
	s.Counters = b.Traffic()
	return s
}

// Counters is Traffic for metrics and `xnetd status` (metrics.CounterSource).
func (b *Backend) Counters() (metrics.Counters, error) {
	t := b.Traffic()
	verdicts := make(map[string]uint64, len(t.Verdicts))
	for name, c := range t.Verdicts {
		verdicts[name] = c.Packets
	}
	peers := make([]metrics.PeerCounters, 0, len(t.Peers))
	for _, p := range t.Peers {
		peers = append(peers, metrics.PeerCounters{Subnet: p.Subnet, TxPackets: p.TxPackets, TxBytes: p.TxBytes, RxPackets: p.RxPackets, RxBytes: p.RxBytes})
	}
	return metrics.NewCounters(verdicts, peers), nil
}
