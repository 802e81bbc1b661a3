package main

import (
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Endpoint paths, as `xnetd status` names them.
const (
	// pathFast: packets from the overlay go straight into the container (bpf_redirect_peer)
	// and its packets are encapsulated at its veth, past the host's routing and netfilter.
	pathFast = "fast"
	// pathStack: both ways through xnet0 and the host's forwarding (and so its firewall); the
	// bridge hop is shortened by deliver_bridge.
	pathStack = "stack"
	// pathStale: the learned veth is gone; the entry goes at the next link resync.
	pathStale = "stale"
)

// endpointStatus is one local container the ebpf datapath has learned, and the path its
// overlay traffic takes.
type endpointStatus struct {
	Address netip.Addr `json:"address"`
	Veth    string     `json:"veth"`
	Bridge  string     `json:"bridge,omitempty"`
	Path    string     `json:"path"`
	Why     string     `json:"why"`
}

// attachEndpoints lists, for the ebpf backend, every container the pinned maps have learned
// and which path its traffic takes and why. Containers not learned yet (they have not sent)
// take the stack path for what arrives for them; the text output says so.
func attachEndpoints(rep *statusReport, st state) {
	if st.Backend != subnetmgr.BackendEBPF || st.BPFFS == "" {
		return
	}
	m, err := maps.OpenPinned(st.BPFFS)
	if err != nil {
		return
	}
	defer m.Close()
	eps, err := m.ListEndpoints()
	if err != nil {
		return
	}
	cfg, ok, err := m.GetConfig()
	if err != nil || !ok {
		return
	}
	rep.Endpoints = []endpointStatus{}
	for _, ep := range eps {
		rep.Endpoints = append(rep.Endpoints, endpointPath(ep, cfg, st.ModeReason))
	}
	sort.Slice(rep.Endpoints, func(i, j int) bool { return rep.Endpoints[i].Address.Less(rep.Endpoints[j].Address) })
}

// endpointPath says which path ep's traffic takes under cfg (the datapath's config as pinned)
// and why; modeReason is the backend's reason text, whose host-routing part says why the
// stack path was chosen.
func endpointPath(ep maps.Endpoint, cfg maps.Config, modeReason string) endpointStatus {
	s := endpointStatus{Address: ep.IP, Veth: fmt.Sprintf("ifindex %d", ep.Ifindex)}
	link, err := netlink.LinkByIndex(ep.Ifindex)
	if err != nil {
		s.Path, s.Why = pathStale, fmt.Sprintf("its veth (ifindex %d) is gone; the entry goes at the next link resync", ep.Ifindex)
		return s
	}
	s.Veth = link.Attrs().Name
	if master := link.Attrs().MasterIndex; master > 0 {
		if br, err := netlink.LinkByIndex(master); err == nil {
			s.Bridge = br.Attrs().Name
		}
	}
	if cfg.HostRoutingKernel {
		why := "host routing kernel"
		if i := strings.Index(modeReason, "host routing: "); i >= 0 {
			why += " (" + strings.TrimPrefix(modeReason[i:], "host routing: ") + ")"
		}
		s.Path, s.Why = pathStack, why+": both ways through xnet0 and the host's forwarding and firewall; into "+s.Veth+" past the bridge"
		return s
	}
	on := "its bridge"
	if s.Bridge != "" {
		on = s.Bridge
	}
	s.Path, s.Why = pathFast, "learned on "+on+": encapsulated at "+s.Veth+"'s TC ingress, delivered into it with bpf_redirect_peer"
	return s
}

// printEndpoints writes the endpoints section of `xnetd status`.
func printEndpoints(w io.Writer, eps []endpointStatus) {
	if eps == nil {
		return
	}
	fmt.Fprintf(w, "\ncontainers (%d learned; one not learned yet, until it sends, is reached through xnet0 and the host's forwarding):\n", len(eps))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  ADDRESS\tVETH\tBRIDGE\tPATH\tWHY")
	for _, e := range eps {
		fmt.Fprintf(tw, "  %v\t%s\t%s\t%s\t%s\n", e.Address, e.Veth, orDash(e.Bridge), e.Path, e.Why)
	}
	tw.Flush()
}
