package ebpf

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/metrics"
)

// Status is what `xnetd status` shows about the datapath.
type Status struct {
	Decap      string              `json:"decap"`      // "tc", "xdp-driver" or "xdp-generic"
	DecapWhy   string              `json:"decap_why"`  // why that hook
	TCMode     string              `json:"tc_mode"`    // "tcx" or "clsact"
	TCWhy      string              `json:"tc_why"`     // why
	BPFFS      string              `json:"bpffs"`      // pin directory
	Containers int                 `json:"containers"` // container veths with the encap program
	Replaced   []string            `json:"replaced"`   // maps replaced at start (layout change)
	Verdicts   map[string]uint64   `json:"verdicts"`   // packets per verdict
	Peers      map[string]PeerStat `json:"peers"`      // per peer PublicIP (PublicIPv6 in an IPv6-only overlay)
	Endpoints  int                 `json:"endpoints"`  // container addresses (IPv4 and IPv6) learned for direct delivery
	// HostRouting is "bpf" (container packets skip the host's stack) or "kernel".
	HostRouting    string `json:"host_routing"`
	HostRoutingWhy string `json:"host_routing_why"`
	// Bridges are the container bridges whose veths carry the encap program, and why.
	Bridges   []string `json:"bridges"`
	BridgeWhy string   `json:"bridge_why"`
	// Fragmented datagrams reassembled by the stack and delivered, or refused by the decap rules.
	FragmentsDelivered uint64 `json:"fragments_delivered"`
	FragmentsRefused   uint64 `json:"fragments_refused"`
	// LinkResyncs counts how often the link watch broke and was resubscribed.
	LinkResyncs int64 `json:"link_resyncs"`
	// DirectRouting is the config's Backend.DirectRouting; Paths says, by peer subnet, whether
	// the peer is routed plain on our segment or in VXLAN, and why.
	DirectRouting bool                        `json:"direct_routing"`
	Paths         map[string]backend.PeerPath `json:"paths,omitempty"`
	// IPv6Subnet is our IPv6 lease in a dual-stack overlay ("" otherwise). IPv6Peers is, by
	// peer subnet, the IPv6 subnet routed to that peer (counted in Peers, whichever underlay
	// it crosses: the routes6 map says which), and IPv6Unreachable why a peer's IPv6 subnet
	// is not.
	IPv6Subnet      string            `json:"ipv6_subnet,omitempty"`
	IPv6Peers       map[string]string `json:"ipv6_peers,omitempty"`
	IPv6Unreachable map[string]string `json:"ipv6_unreachable,omitempty"`
}

// PeerStat is one peer's traffic.
type PeerStat = maps.PeerStats

// Status reports the datapath's modes and counters.
func (b *Backend) Status() (Status, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.status
	st.LinkResyncs = b.linkResyncs.Load()
	st.DirectRouting = b.direct.enabled
	st.Paths = map[string]backend.PeerPath{}
	for s, p := range b.direct.paths {
		st.Paths[s.String()] = p
	}
	if b.v6.local.IsValid() {
		st.IPv6Subnet = b.v6.local.String()
		st.IPv6Peers, st.IPv6Unreachable = map[string]string{}, map[string]string{}
		for s, s6 := range b.v6.peers {
			st.IPv6Peers[s.String()] = s6.String()
		}
		for s, why := range b.v6.unreachable {
			st.IPv6Unreachable[s.String()] = why
		}
	}
	if b.frags != nil {
		st.FragmentsDelivered, st.FragmentsRefused = b.frags.delivered.Load(), b.frags.refused.Load()
	}
	if b.m == nil {
		return st, fmt.Errorf("ebpf: Status before Setup")
	}
	counters, err := b.m.ReadCounters()
	if err != nil {
		return st, err
	}
	st.Verdicts = map[string]uint64{}
	for name, c := range counters {
		st.Verdicts[name] = c.Packets
	}
	peers, err := b.m.ReadPeers()
	if err != nil {
		return st, err
	}
	st.Peers = map[string]PeerStat{}
	for ip, s := range peers {
		st.Peers[ip.String()] = s
	}
	if eps, err := b.m.ListEndpoints(); err == nil {
		st.Endpoints = len(eps)
	}
	return st, nil
}

// Mode says where decapsulation runs and why (metrics.ModeReporter).
func (b *Backend) Mode() (string, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.status.Decap == "" {
		return "ebpf", "not set up yet"
	}
	mode := b.status.Decap + "+" + b.status.TCMode + ", host routing " + b.hostRouting
	if b.direct.enabled {
		mode += ", direct routing"
	}
	why := b.status.DecapWhy + "; TC: " + b.status.TCWhy + "; host routing: " + b.status.HostRoutingWhy
	if b.rpsMask != "" {
		mode += ", flow steering rps"
		why += "; flow steering: --flow-steering=rps, RPS mask " + b.rpsMask + " on every container veth"
	}
	if b.ipv6Only {
		mode += ", IPv6 only"
		why += "; IPv6-only overlay: every peer over the IPv6 underlay"
	}
	if b.v6.tunnel != 0 {
		mode += ", IPv6 underlay"
		why += "; IPv6 underlay: " + TunnelDevice + " at " + b.Iface.PublicIPv6.String() + " to peers with an IPv6 VTEP"
	}
	return mode, why
}

// Counters reports per-peer and per-verdict counters (metrics.CounterSource).
func (b *Backend) Counters() (metrics.Counters, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		return metrics.Counters{}, fmt.Errorf("ebpf: Counters before Setup")
	}
	return ReadCounters(b.m, b.peers)
}

// ReadCounters reads the verdict counters and, for each peer subnet in peers (its PublicIP, or in
// an IPv6-only overlay its PublicIPv6, keys the peers map), that peer's traffic. It serves the running backend and `xnetd status`
// reading the pinned maps of a stopped daemon alike.
func ReadCounters(m *maps.Maps, peers map[netip.Prefix]netip.Addr) (metrics.Counters, error) {
	verdicts, err := m.ReadCounters()
	if err != nil {
		return metrics.Counters{}, err
	}
	packets := make(map[string]uint64, len(verdicts))
	for name, c := range verdicts {
		packets[name] = c.Packets
	}
	stats, err := m.ReadPeers()
	if err != nil {
		return metrics.Counters{}, err
	}
	subnets := make([]netip.Prefix, 0, len(peers))
	for s := range peers {
		subnets = append(subnets, s)
	}
	slices.SortFunc(subnets, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	var pc []metrics.PeerCounters
	for _, s := range subnets {
		if p, ok := stats[peers[s]]; ok {
			pc = append(pc, metrics.PeerCounters{Subnet: s, TxPackets: p.TxPackets, TxBytes: p.TxBytes, RxPackets: p.RxPackets, RxBytes: p.RxBytes})
		}
	}
	return metrics.NewCounters(packets, pc), nil
}
