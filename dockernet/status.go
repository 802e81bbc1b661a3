package dockernet

import (
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/google/nftables"

	"github.com/xnet-dev/xnet/backend/vxlan"
)

// Status is what `xnetd status` shows about Docker networks (JSON in the state file).
type Status struct {
	Driver       string          `json:"driver"`
	PluginSocket string          `json:"plugin_socket"`
	DockerSocket string          `json:"docker_socket"`
	Docker       string          `json:"docker"` // "connected", or why not
	DNS          netip.Addr      `json:"dns,omitzero"`
	DNSError     string          `json:"dns_error,omitempty"`
	Isolation    string          `json:"isolation"` // the nftables table, or why it is missing
	Networks     []NetworkStatus `json:"networks"`
}

// NetworkStatus is one network of the cluster as this host sees it.
type NetworkStatus struct {
	Name     string       `json:"name"`
	Subnet   netip.Prefix `json:"subnet"`
	VNI      int          `json:"vni"`
	Port     int          `json:"port"`
	BlockLen int          `json:"block_len"`
	// Block is this host's block (zero when the network is not set up here).
	Block  netip.Prefix `json:"block,omitzero"`
	Bridge string       `json:"bridge,omitempty"`
	Device string       `json:"device,omitempty"`
	// Blocks are every host's block, ours included.
	Blocks []BlockStatus `json:"blocks"`
	// Endpoints are this host's containers on the network.
	Endpoints []EndpointStatus `json:"endpoints"`
	// RemoteEndpoints counts the other hosts' containers.
	RemoteEndpoints int `json:"remote_endpoints"`
	// Refused counts packets the isolation dropped: from or to another network.
	Refused uint64 `json:"refused"`
	State   string `json:"state"` // ready, removing, not set up
	Problem string `json:"problem,omitempty"`
}

// BlockStatus is one host's block of a network.
type BlockStatus struct {
	Block    netip.Prefix `json:"block"`
	PublicIP netip.Addr   `json:"public_ip"`
}

// EndpointStatus is one container on a network.
type EndpointStatus struct {
	Name      string     `json:"name"`
	IP        netip.Addr `json:"ip"`
	Container string     `json:"container"`
}

// Status reports the networks of the cluster and what this host has of each.
func (m *Manager) Status() Status {
	var refused map[int]uint64
	if conn, err := nftables.New(); err == nil {
		refused, _ = refusedCounts(conn)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s := Status{Driver: DriverName, PluginSocket: m.o.PluginSocket, DockerSocket: m.o.DockerSocket, Docker: "connected",
		DNS: m.o.DNS, Isolation: "nftables table ip " + IsolationTable}
	if m.dockerErr != nil {
		s.Docker = m.dockerErr.Error()
	}
	if m.dnsErr != nil {
		s.DNSError = m.dnsErr.Error()
	}
	if m.isoErr != nil {
		s.Isolation = m.isoErr.Error()
	}
	names := map[string]bool{}
	for n := range m.state.Networks {
		names[n] = true
	}
	for n := range m.nets {
		names[n] = true
	}
	for _, name := range slices.Sorted(maps.Keys(names)) {
		rec, inEtcd := m.state.Networks[name]
		ln := m.nets[name]
		if !inEtcd && ln != nil {
			rec = ln.rec
		}
		ns := NetworkStatus{Name: name, Subnet: rec.Subnet, VNI: rec.VNI, Port: rec.Port, BlockLen: rec.BlockLen,
			Refused: refused[rec.VNI], State: "not set up here", Blocks: []BlockStatus{}, Endpoints: []EndpointStatus{}}
		for _, b := range m.state.Blocks[name] {
			ns.Blocks = append(ns.Blocks, BlockStatus{Block: b.Subnet, PublicIP: b.PublicIP})
		}
		for _, ep := range m.state.Endpoints[name] {
			if ep.PublicIP == m.o.Iface.PublicIP {
				ns.Endpoints = append(ns.Endpoints, EndpointStatus{Name: ep.Name, IP: ep.IP, Container: ep.Container})
			} else {
				ns.RemoteEndpoints++
			}
		}
		if ln != nil {
			ns.Block, ns.Problem = ln.block.Subnet, ln.problem
			if ln.dp != nil {
				ns.Bridge, ns.Device, ns.State = BridgeName(rec.VNI), vxlan.DeviceName(rec.VNI), "ready"
			}
		}
		switch {
		case rec.Removing:
			ns.State = "removing"
		case !inEtcd:
			ns.State = "gone from etcd, leaving this host"
		}
		s.Networks = append(s.Networks, ns)
	}
	return s
}

// Print writes the status section of `xnetd status`.
func (s Status) Print(w io.Writer) {
	dns := "none"
	if s.DNS.IsValid() {
		dns = s.DNS.String()
		if s.DNSError != "" {
			dns += " (" + s.DNSError + ")"
		}
	}
	fmt.Fprintf(w, "docker networks (%d): driver %s, plugin %s, docker %s (%s), dns %s\n",
		len(s.Networks), s.Driver, s.PluginSocket, s.DockerSocket, s.Docker, dns)
	if len(s.Networks) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  NAME\tSUBNET\tVNI\tBLOCK HERE\tBLOCKS\tCONTAINERS HERE\tELSEWHERE\tREFUSED\tSTATE")
	for _, n := range s.Networks {
		block := "-"
		if n.Block.IsValid() {
			block = n.Block.String()
		}
		var blocks []string
		for _, b := range n.Blocks {
			blocks = append(blocks, b.Block.String()+"@"+b.PublicIP.String())
		}
		var eps []string
		for _, e := range n.Endpoints {
			eps = append(eps, e.Name+"="+e.IP.String())
		}
		state := n.State
		if n.Problem != "" {
			state += ": " + n.Problem
		}
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\t%s\t%d\t%d\t%s\n", n.Name, n.Subnet, n.VNI, block,
			orDash(strings.Join(blocks, " ")), orDash(strings.Join(eps, " ")), n.RemoteEndpoints, n.Refused, state)
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
