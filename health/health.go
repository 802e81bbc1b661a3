// Package health tells, for every peer, whether its containers can be reached from this host,
// and over which path it breaks. A lease in etcd says a host exists; it does not say that the
// datapath between the two hosts carries packets.
//
// Every xnetd answers probes on one fixed UDP port (DefaultPort, 8473) at two addresses of its
// own, and probes every peer at both:
//
//   - overlay: from our overlay address to the peer's. With the VXLAN backends (ebpf, vxlan,
//     udp) that is <subnet>.0, the /32 that xnet0 or xnet.<VNI> holds, so the request is
//     encapsulated by our datapath (routes, encap program or device, the underlay, any firewall
//     on the VXLAN port) and decapsulated by the peer's, and the reply the other way. host-gw
//     has no device: its overlay address is docker0's gateway <subnet>.1, which exists once
//     Docker runs, and the probe takes the peer route as container traffic does;
//   - underlay: from our underlay address to the peer's PublicIP, without encapsulation.
//
// Either family: in an IPv6-only overlay the daemon hands IPv6 addresses for both (our IPv6
// subnet's first address, the /128 the device holds, and PublicIPv6), and the sockets, the
// address check and the ICMP answers follow the family of the address. A dual-stack overlay
// adds a third path, overlay6, from our IPv6 subnet's first address to the peer's
// (Options.Overlay6, Peer.Overlay6), so a broken IPv6 datapath shows while IPv4 works.
//
// Overlay unreachable while the underlay answers: the datapath is broken here, on the peer, or
// a firewall between drops the VXLAN port. Both unreachable: the host or its network is down.
// A host that runs no responder (flannel in a mixed cluster, a stopped xnetd whose datapath
// stays up) answers with ICMP port unreachable, which crossed the path both ways just as a
// reply would: it counts as reachable, marked NoResponder.
//
// It owns the probe wire format (wire.go), the schedule and the statistics per peer and path
// (prober.go, stats.go). It knows nothing of backends, leases or etcd: the daemon hands it the
// peers (SetPeers) and reads Snapshot; `xnetd check` runs ProbeOnce.
//
// Design history. The probes must scale to thousands of peers at a rate nobody notices, yet
// report a broken datapath within seconds in the clusters most people run. So each path of
// each peer is probed every Interval (1 s) with jitter, but never more than MaxRate probes a
// second in all (200): from 100 peers on the interval grows with the peer count (10 s at 1,000
// peers, 50 s at 5,000), and the traffic per host stays under 400 packets a second each way
// (docs/design.md, Health probes). A path is unreachable after DownAfter (2) probes in a row
// went unanswered within Timeout (1 s); after a first loss the next probe goes out at once
// rather than an interval later, so a break is reported within about Interval + 2 Timeouts.
// One answer makes it reachable again. The responder answers overlay requests only from inside
// the Network and underlay requests only from a known peer's PublicIP, with a reply of the
// request's size and at a capped rate, so it cannot be used to reflect traffic.
package health

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// DefaultPort is the UDP port every xnetd answers probes on, at its overlay and its underlay
// address. A firewall between hosts must let it through as it lets the VXLAN port through.
const DefaultPort = 8473

// Defaults of Options.
const (
	DefaultInterval  = time.Second
	DefaultMaxRate   = 200 // probes per second, both paths together
	DefaultTimeout   = time.Second
	DefaultDownAfter = 2
	// Window is how many recent probes of one path the loss ratio and the median RTT cover.
	Window = 20
)

// Path is the way a probe takes to a peer.
type Path string

// The paths.
const (
	Overlay  Path = "overlay"  // encapsulated by the datapath, as container traffic
	Underlay Path = "underlay" // straight to the peer's PublicIP
	// Overlay6 is the IPv6 overlay of a dual-stack overlay: our IPv6 subnet's first address to
	// the peer's, through the datapath's IPv6 side (an IPv6-only overlay's Overlay is IPv6
	// itself and has no Overlay6).
	Overlay6 Path = "overlay6"
)

// Paths lists the two every peer has, overlay first; Overlay6 only peers with an IPv6 overlay
// address have (PeerHealth.Overlay6).
var Paths = [2]Path{Overlay, Underlay}

// States of a path.
const (
	StateReachable   = "reachable"
	StateUnreachable = "unreachable"
	StateUnknown     = "unknown"    // no answer yet, and too few losses to say
	StateNotProbed   = "not probed" // Why says why
)

// Peer is one host to probe.
type Peer struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
	// Overlay is the peer's overlay address; invalid when the overlay is not probed, and
	// OverlayWhy says why (a lease the backend refused is not in the datapath).
	Overlay    netip.Addr
	OverlayWhy string
	// OverlayOptional marks an overlay address that exists only once Docker runs there
	// (host-gw's docker0): it is probed only after the peer's underlay reply says it is up.
	OverlayOptional bool
	// Overlay6 is the peer's IPv6 overlay address in a dual-stack overlay (its IPv6 subnet's
	// first address); invalid when it has none or the IPv6 overlay is not probed.
	Overlay6 netip.Addr
}

// PeerHealth is one peer's reachability over both paths.
type PeerHealth struct {
	Overlay  PathHealth `json:"overlay"`
	Underlay PathHealth `json:"underlay"`
	// Overlay6 is the IPv6 overlay of a dual-stack overlay; nil when the peer's is not probed.
	Overlay6 *PathHealth `json:"overlay6,omitempty"`
}

// Path returns the health of one path (the zero PathHealth for an Overlay6 not probed).
func (h PeerHealth) Path(p Path) PathHealth {
	switch p {
	case Overlay:
		return h.Overlay
	case Overlay6:
		if h.Overlay6 == nil {
			return PathHealth{}
		}
		return *h.Overlay6
	}
	return h.Underlay
}

// PathHealth is what the probes of one path to one peer found.
type PathHealth struct {
	State string `json:"state"`
	// Why explains StateNotProbed and StateUnreachable.
	Why string `json:"why,omitempty"`
	// Since is when State began.
	Since time.Time `json:"since,omitzero"`
	// Target is the address probed.
	Target netip.Addr `json:"target,omitzero"`
	// RTTLast is the last answered probe's round trip; RTTP50 the median over the window.
	RTTLast Duration `json:"rtt_last_ms,omitempty"`
	RTTP50  Duration `json:"rtt_p50_ms,omitempty"`
	// Loss is the share of the window's probes that went unanswered (0 to 1); WindowProbes how
	// many probes that window holds (at most Window).
	Loss         float64 `json:"loss"`
	WindowProbes int     `json:"window_probes"`
	// Sent, Answered and Lost count since the prober started; RTTSum adds up every answered
	// probe's round trip (Prometheus' summary sum).
	Sent     uint64        `json:"sent"`
	Answered uint64        `json:"answered"`
	Lost     uint64        `json:"lost"`
	RTTSum   time.Duration `json:"-"`
	// LastAnswer is when the last answer arrived.
	LastAnswer time.Time `json:"last_answer,omitzero"`
	// NoResponder: the last answer was an ICMP port unreachable. The path works both ways,
	// but the host runs no health responder (flannel, or xnetd stopped or without probes).
	NoResponder bool `json:"no_responder,omitempty"`
}

// Duration is a round trip time; in JSON it is a number of milliseconds, as operators read
// RTTs.
type Duration time.Duration

// MarshalJSON writes milliseconds.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(float64(d) / float64(time.Millisecond))
}

// UnmarshalJSON reads milliseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var ms float64
	if err := json.Unmarshal(b, &ms); err != nil {
		return fmt.Errorf("RTT %s is not a number of milliseconds: %w", b, err)
	}
	*d = Duration(ms * float64(time.Millisecond))
	return nil
}

// String prints the duration rounded for a table: "0.31ms", "12ms".
func (d Duration) String() string {
	ms := float64(d) / float64(time.Millisecond)
	switch {
	case ms < 10:
		return fmt.Sprintf("%.2fms", ms)
	case ms < 100:
		return fmt.Sprintf("%.1fms", ms)
	}
	return fmt.Sprintf("%.0fms", ms)
}

// Problem is what an operator must know about the peer, "" when nothing: a path that is
// unreachable, with what that points at.
func (h PeerHealth) Problem() string {
	o, u := h.Overlay.State == StateUnreachable, h.Underlay.State == StateUnreachable
	since := func(p PathHealth) string {
		if p.Since.IsZero() {
			return ""
		}
		return " since " + p.Since.Format(time.TimeOnly)
	}
	switch {
	case o && u:
		return "unreachable over the overlay and the underlay" + since(h.Overlay) +
			": the host or the network to it is down (or a firewall drops UDP " + fmt.Sprint(DefaultPort) + ")"
	case o && h.Underlay.State == StateReachable:
		return "overlay unreachable" + since(h.Overlay) + " while the underlay answers: the datapath is broken here or there, or a firewall drops VXLAN; run xnetd check on both hosts"
	case o:
		return "overlay unreachable" + since(h.Overlay) + ": " + h.Overlay.Why
	case u && h.Overlay.State == StateReachable:
		return "underlay probes unanswered" + since(h.Underlay) + " while the overlay answers: UDP " + fmt.Sprint(DefaultPort) + " to its PublicIP is filtered?"
	case u:
		return "underlay unreachable" + since(h.Underlay) + ": " + h.Underlay.Why
	case h.Overlay6 != nil && h.Overlay6.State == StateUnreachable && h.Overlay.State != StateReachable:
		return "IPv6 overlay unreachable" + since(*h.Overlay6) + ": " + h.Overlay6.Why
	case h.Overlay6 != nil && h.Overlay6.State == StateUnreachable:
		return "IPv6 overlay unreachable" + since(*h.Overlay6) + " while the IPv4 overlay answers: the IPv6 datapath is broken here or there (its routes, its IPv6 device), or a firewall drops its port over IPv6; run xnetd check on both hosts"
	}
	return ""
}

// Brief is one path in a table cell: "up 0.31ms/0.28ms 0%", "DOWN 100%", "-".
func (p PathHealth) Brief() string {
	switch p.State {
	case StateReachable:
		if p.NoResponder {
			return fmt.Sprintf("up (ICMP, no responder) %v %.0f%%", p.RTTLast, p.Loss*100)
		}
		return fmt.Sprintf("up %v/%v %.0f%%", p.RTTLast, p.RTTP50, p.Loss*100)
	case StateUnreachable:
		return fmt.Sprintf("DOWN %.0f%%", p.Loss*100)
	case StateUnknown:
		return "pending"
	}
	return "-"
}
