package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/macvlan"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// statusReport is what `xnetd status` prints (as JSON with --output json). It joins three
// sources: the state file (the daemon's last view), the live counters (the running daemon's
// metrics endpoint), and the kernel's routes into the overlay (the datapath as it is now,
// which outlives the daemon).
type statusReport struct {
	Running         bool         `json:"running"`
	Daemon          string       `json:"daemon"`
	PID             int          `json:"pid"`
	Ready           bool         `json:"ready"`
	Version         string       `json:"version"`
	StateUpdatedAt  time.Time    `json:"state_updated_at"`
	Backend         string       `json:"backend"`
	Mode            string       `json:"mode"`
	ModeReason      string       `json:"mode_reason,omitempty"`
	SkippedBackends []skipped    `json:"skipped_backends,omitempty"`
	Iface           string       `json:"iface"`
	PublicIP        netip.Addr   `json:"public_ip"`
	Network         netip.Prefix `json:"network"`
	IPv6Network     netip.Prefix `json:"ipv6_network,omitzero"`
	IPMasq          bool         `json:"ip_masq"`
	Lease           leaseState   `json:"lease"`
	// Macvlan is this host's macvlan range for Docker, absent without a Macvlan section.
	Macvlan *macvlan.Status `json:"macvlan,omitempty"`
	Peers   []peerStatus    `json:"peers"`
	// Endpoints are the local containers the ebpf datapath learned and the path each takes
	// (nil for other backends).
	Endpoints []endpointStatus `json:"endpoints,omitempty"`
	// Conflicts are claims in etcd that contradict each other, as the daemon last saw them.
	Conflicts []conflictState   `json:"conflicts,omitempty"`
	Verdicts  map[string]uint64 `json:"verdicts,omitempty"`
	Drops     map[string]uint64 `json:"drops,omitempty"`
	// Counters says where the packet counters came from, or why there are none.
	Counters string `json:"counters"`
	// Routes are the datapath's routes into the overlay Network on this host right now: the
	// kernel's, and the BPF routes map's for ebpf.
	Routes []string `json:"routes"`
	// DockerNetworks are the xnet Docker networks (absent without --docker-networks).
	DockerNetworks *dockernet.Status `json:"docker_networks,omitempty"`
	// WireGuard is the wireguard backend's device (status_wireguard.go).
	WireGuard *wireguardReport `json:"wireguard,omitempty"`
}

// peerStatus is one peer with its live counters (nil when the backend keeps none).
type peerStatus struct {
	peerState
	TxPackets *uint64 `json:"tx_packets,omitempty"`
	TxBytes   *uint64 `json:"tx_bytes,omitempty"`
	RxPackets *uint64 `json:"rx_packets,omitempty"`
	RxBytes   *uint64 `json:"rx_bytes,omitempty"`
	// Route is the datapath's route to the peer's subnet, "" when there is none.
	Route string `json:"route,omitempty"`
	// Health is what the running daemon's probes found over the overlay and the underlay.
	Health *health.PeerHealth `json:"health,omitempty"`
}

type statusFlags struct {
	stateFile  string
	subnetFile string
	output     string
}

func statusFlagSet() (*pflag.FlagSet, *statusFlags) {
	f := &statusFlags{}
	fs := pflag.NewFlagSet("xnetd status", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&f.subnetFile, "subnet-file", "/run/xnet/subnet.env", "the daemon's --subnet-file (locates the state file)")
	fs.StringVar(&f.stateFile, "state-file", "", "the daemon's --state-file (default: state.json next to --subnet-file)")
	fs.StringVarP(&f.output, "output", "o", "text", "text|json")
	return fs, f
}

func cmdStatus(args []string, stdout io.Writer, lookup func(string) (string, bool)) error {
	fs, f := statusFlagSet()
	if err := parseFlags(fs, args, lookup); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.PrintDefaults()
		}
		return err
	}
	if f.output != "text" && f.output != "json" {
		return usagef("--output %q is not a format: use text or json", f.output)
	}
	if f.stateFile == "" {
		f.stateFile = defaultStateFile(f.subnetFile)
	}
	st, err := readState(f.stateFile)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no state file %s: xnetd has not run on this host, or it runs with another --state-file/--subnet-file", f.stateFile)
	}
	if err != nil {
		return err
	}
	rep := buildStatus(context.Background(), st)
	attachHealth(&rep, f.stateFile)
	attachWireGuard(&rep, st, f.stateFile)
	attachEndpoints(&rep, st)
	if f.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printStatus(stdout, rep, time.Now())
	return nil
}

func buildStatus(ctx context.Context, st state) statusReport {
	rep := statusReport{
		PID: st.PID, Version: st.Version, StateUpdatedAt: st.UpdatedAt,
		Backend: st.Backend, Mode: st.Mode, ModeReason: st.ModeReason, SkippedBackends: st.SkippedBackends,
		Iface: st.Iface, PublicIP: st.PublicIP, Network: st.Config.Network, IPv6Network: st.Config.IPv6Network, IPMasq: st.IPMasq, Lease: st.Lease,
		Macvlan: st.Macvlan, Conflicts: st.Conflicts, DockerNetworks: st.DockerNetworks,
	}
	alive, why := daemonAlive(st.PID)
	rep.Running = alive
	if alive {
		rep.Daemon = "running, " + why
	} else {
		rep.Daemon = "not running: " + why + " (showing its last state and the datapath as the kernel has it)"
	}

	var counters metrics.Counters
	pinned, bpfRoutes, pinnedErr := pinnedDatapath(st)
	switch {
	case pinnedErr == nil:
		// The ebpf datapath counts in pinned maps: live whether the daemon runs or not.
		counters = pinned
		rep.Counters = "live, from the pinned maps in " + st.BPFFS
		if alive && st.MetricsAddr != "" {
			_, rep.Ready, _, _ = scrape(ctx, st.MetricsAddr)
		}
	case st.Backend == subnetmgr.BackendEBPF && !alive:
		rep.Counters = "unavailable: " + pinnedErr.Error()
	case !alive:
		rep.Counters = "none: the daemon is not running"
	case st.MetricsAddr == "":
		rep.Counters = "none: the daemon runs without --metrics-addr"
	default:
		c, ready, src, err := scrape(ctx, st.MetricsAddr)
		rep.Ready = ready
		switch {
		case err != nil:
			rep.Counters = "unavailable: " + err.Error()
		case src == "":
			rep.Counters = "none: backend " + st.Backend + " keeps no packet counters"
		default:
			rep.Counters = src
			counters = c
		}
	}
	rep.Verdicts, rep.Drops = counters.Verdicts, counters.Drops

	routes := kernelRoutes(st.Config.Network)
	for subnet, r := range bpfRoutes {
		routes[subnet] = r
	}
	byPeer := map[netip.Prefix]metrics.PeerCounters{}
	for _, pc := range counters.Peers {
		byPeer[pc.Subnet.Masked()] = pc
	}
	for _, p := range st.Peers {
		ps := peerStatus{peerState: p, Route: routes[p.Subnet.Masked()]}
		if pc, ok := byPeer[p.Subnet.Masked()]; ok {
			ps.TxPackets, ps.TxBytes, ps.RxPackets, ps.RxBytes = &pc.TxPackets, &pc.TxBytes, &pc.RxPackets, &pc.RxBytes
		}
		rep.Peers = append(rep.Peers, ps)
	}
	for _, r := range routes {
		rep.Routes = append(rep.Routes, r)
	}
	sort.Strings(rep.Routes)
	return rep
}

// scrape reads the running daemon's /healthz and /metrics. src is "" when the scrape has no
// datapath counters.
func scrape(ctx context.Context, addr string) (c metrics.Counters, ready bool, src string, err error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	client := &http.Client{}
	get := func(path string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
		if err != nil {
			return nil, err
		}
		// Text, not protobuf: ParseText reads what an operator's curl would see.
		req.Header.Set("Accept", "text/plain")
		return client.Do(req)
	}
	if resp, err := get("/healthz"); err == nil {
		ready = resp.StatusCode == http.StatusOK
		resp.Body.Close()
	}
	resp, err := get("/metrics")
	if err != nil {
		return c, ready, "", fmt.Errorf("scrape %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return c, ready, "", fmt.Errorf("scrape %s: HTTP %s", addr, resp.Status)
	}
	fams, err := metrics.ParseText(resp.Body)
	if err != nil {
		return c, ready, "", err
	}
	c, ok, err := metrics.CountersFromFamilies(fams)
	if err != nil || !ok {
		return c, ready, "", err
	}
	return c, ready, "live, from http://" + addr + "/metrics", nil
}

// pinnedDatapath reads the ebpf datapath from its pinned maps: the counters, with the per-peer
// ones (keyed by PublicIP in the map, PublicIPv6 in an IPv6-only overlay) mapped to the peers'
// subnets, and the routes and routes6
// maps, which are that datapath's routing table.
func pinnedDatapath(st state) (metrics.Counters, map[netip.Prefix]string, error) {
	if st.Backend != subnetmgr.BackendEBPF || st.BPFFS == "" {
		return metrics.Counters{}, nil, errors.New("not an ebpf datapath")
	}
	m, err := maps.OpenPinned(st.BPFFS)
	if err != nil {
		return metrics.Counters{}, nil, err
	}
	defer m.Close()
	routes := map[netip.Prefix]string{}
	if list, err := m.ListRoutes(); err == nil {
		for _, r := range list {
			routes[r.Subnet.Masked()] = fmt.Sprintf("%v via %v mac %v (bpf)", r.Subnet, r.PublicIP, r.VtepMAC)
			if r.Direct { // DirectRouting: plain on our segment, no VXLAN
				routes[r.Subnet.Masked()] = fmt.Sprintf("%v via %v (bpf, direct)", r.Subnet, r.PublicIP)
			}
		}
	}
	if list, err := m.ListRoutes6(); err == nil {
		for _, r := range list {
			routes[r.Subnet.Masked()] = fmt.Sprintf("%v via %v mac %v (bpf)", r.Subnet, r.PublicIP, r.VtepMAC)
			if r.PublicIPv6.IsValid() { // the peer's IPv6 VTEP, through the IPv6-underlay vxlan device
				routes[r.Subnet.Masked()] = fmt.Sprintf("%v via %v mac %v (bpf, IPv6 underlay)", r.Subnet, r.PublicIPv6, r.VtepMAC)
			}
		}
	}
	c, err := pinnedCounters(m, st)
	return c, routes, err
}

func pinnedCounters(m *maps.Maps, st state) (metrics.Counters, error) {
	peers := make(map[netip.Prefix]netip.Addr, len(st.Peers))
	for _, p := range st.Peers {
		// The peers map keys a peer by its PublicIP, or in an IPv6-only overlay (PublicIP
		// 0.0.0.0) by its PublicIPv6: the address that names its host.
		peers[p.Subnet] = p.host()
	}
	return ebpf.ReadCounters(m, peers)
}

// kernelRoutes lists this namespace's routes into network, by destination.
func kernelRoutes(network netip.Prefix) map[netip.Prefix]string {
	out := map[netip.Prefix]string{}
	if !network.IsValid() {
		return out
	}
	routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return out
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		addr, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		dst := netip.PrefixFrom(addr.Unmap(), ones).Masked()
		if !network.Contains(dst.Addr()) || dst.Bits() < network.Bits() {
			continue
		}
		desc := dst.String()
		if r.Gw != nil {
			desc += " via " + r.Gw.String()
		}
		if link, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			desc += " dev " + link.Attrs().Name
		}
		if r.Flags&unix.RTNH_F_ONLINK != 0 {
			desc += " onlink"
		}
		out[dst] = desc
	}
	return out
}

func printStatus(w io.Writer, rep statusReport, now time.Time) {
	state := "xnetd " + rep.Daemon
	if rep.Running {
		if rep.Ready {
			state += ", ready"
		} else {
			state += ", not ready yet"
		}
	}
	fmt.Fprintln(w, state)
	fmt.Fprintf(w, "version:  %s (state written %s ago)\n", rep.Version, now.Sub(rep.StateUpdatedAt).Round(time.Second))
	expiry := "no expiry (reservation)"
	if !rep.Lease.Expiration.IsZero() {
		expiry = fmt.Sprintf("expires %s (in %s)", rep.Lease.Expiration.Format(time.RFC3339), rep.Lease.Expiration.Sub(now).Round(time.Minute))
	}
	var publics []string
	if rep.Lease.PublicIP.IsValid() && !rep.Lease.PublicIP.IsUnspecified() { // 0.0.0.0 in an IPv6-only overlay
		publics = append(publics, rep.Lease.PublicIP.String())
	}
	if rep.Lease.PublicIPv6.IsValid() {
		publics = append(publics, rep.Lease.PublicIPv6.String())
	}
	public := strings.Join(publics, ",")
	fmt.Fprintf(w, "lease:    %s public %s, %s\n", rep.Lease.subnets(), public, expiry)
	if mv := rep.Macvlan; mv != nil {
		line := mv.String()
		if !mv.Expiration.IsZero() {
			line += fmt.Sprintf(", expires %s (in %s)", mv.Expiration.Format(time.RFC3339), mv.Expiration.Sub(now).Round(time.Minute))
		}
		fmt.Fprintf(w, "macvlan:  %s (%s)\n", line, mv.File)
	}
	mode := rep.Mode
	if rep.ModeReason != "" {
		mode += ": " + rep.ModeReason
	}
	fmt.Fprintf(w, "backend:  %s (%s)\n", rep.Backend, mode)
	for _, s := range rep.SkippedBackends {
		fmt.Fprintf(w, "          skipped %s: %s\n", s.Name, s.Reason)
	}
	var networks []string
	for _, n := range []netip.Prefix{rep.Network, rep.IPv6Network} {
		if n.IsValid() { // no Network in an IPv6-only overlay
			networks = append(networks, n.String())
		}
	}
	network := strings.Join(networks, ",")
	fmt.Fprintf(w, "network:  %s on %s, ip-masq %v\n", network, rep.Iface, rep.IPMasq)
	fmt.Fprintf(w, "counters: %s\n", rep.Counters)

	fmt.Fprintf(w, "\npeers (%d):\n", len(rep.Peers))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  SUBNET\tPUBLIC IP\tVTEP MAC\tTX PKTS\tTX BYTES\tRX PKTS\tRX BYTES\tOVERLAY (RTT LAST/P50, LOSS)\tUNDERLAY\tKERNEL ROUTE\tPROBLEM")
	for _, p := range rep.Peers {
		route := p.Route
		if route == "" {
			route = "-"
		}
		problem := p.Error
		if p.Refused != "" {
			problem = "refused (" + p.Refused + "): " + p.Error
		}
		if !p.RemovalDue.IsZero() {
			gone := fmt.Sprintf("lease gone from etcd: leaves the datapath at %s unless it comes back", p.RemovalDue.Format(time.TimeOnly))
			problem = strings.Join(slices.DeleteFunc([]string{gone, problem}, func(s string) bool { return s == "" }), "; ")
		}
		problem = strings.Join(slices.DeleteFunc([]string{problem, healthProblem(p.Health)}, func(s string) bool { return s == "" }), "; ")
		fmt.Fprintf(tw, "  %s\t%v\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.subnets(), p.host(), orDash(p.VtepMAC),
			num(p.TxPackets), num(p.TxBytes), num(p.RxPackets), num(p.RxBytes),
			healthCell(p.Health, health.Overlay), healthCell(p.Health, health.Underlay), route, orDash(problem))
	}
	tw.Flush()
	printEndpoints(w, rep.Endpoints)
	if len(rep.Conflicts) > 0 {
		fmt.Fprintf(w, "\nconflicts (%d):\n", len(rep.Conflicts))
		for _, c := range rep.Conflicts {
			fmt.Fprintf(w, "  %s %v since %s: %s\n", c.Kind, c.PublicIP, c.Since.Format(time.TimeOnly), c.Detail)
		}
	}
	printWireGuard(w, rep.WireGuard, now)
	if len(rep.Verdicts) > 0 {
		fmt.Fprintf(w, "\nverdicts: %s\n", joinCounts(rep.Verdicts))
	}
	if len(rep.Drops) > 0 {
		fmt.Fprintf(w, "drops:    %s\n", joinCounts(rep.Drops))
	}
	printDockerNetworks(w, rep.DockerNetworks)
}

func num(v *uint64) string {
	if v == nil {
		return "-"
	}
	return fmt.Sprint(*v)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func joinCounts(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

// readSubnetFileOrZero is ReadSubnetFile where a missing or unreadable file is "nothing".
func readSubnetFileOrZero(path string) subnetmgr.SubnetFile {
	f, err := subnetmgr.ReadSubnetFile(path)
	if err != nil {
		return subnetmgr.SubnetFile{}
	}
	return f
}
