package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/macvlan"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// state is what the daemon records in --state-file (state.json next to the subnet file) on
// every change, for `xnetd status` and `xnetd teardown`. It is the daemon's view; the live
// counters come from the metrics endpoint or the pinned maps.
type state struct {
	PID             int              `json:"pid"`
	Version         string           `json:"version"`
	StartedAt       time.Time        `json:"started_at"`
	UpdatedAt       time.Time        `json:"updated_at"`
	Ready           bool             `json:"ready"`
	Backend         string           `json:"backend"`
	Mode            string           `json:"mode"`
	ModeReason      string           `json:"mode_reason,omitempty"`
	SkippedBackends []skipped        `json:"skipped_backends,omitempty"`
	Iface           string           `json:"iface"`
	PublicIP        netip.Addr       `json:"public_ip"`
	Config          subnetmgr.Config `json:"config"`
	Lease           leaseState       `json:"lease"`
	// Macvlan is this host's macvlan range (nil without a Macvlan section in the config).
	Macvlan *macvlan.Status `json:"macvlan,omitempty"`
	Peers   []peerState     `json:"peers"`
	// Conflicts are claims in etcd that contradict each other now (see peers).
	Conflicts      []conflictState `json:"conflicts,omitempty"`
	IPMasq         bool            `json:"ip_masq"`
	MetricsAddr    string          `json:"metrics_addr,omitempty"`
	SubnetFile     string          `json:"subnet_file"`
	DockerOptsFile string          `json:"docker_opts_file"`
	BPFFS          string          `json:"bpffs"`
	// DockerNetworks are the xnet Docker networks (nil without --docker-networks).
	DockerNetworks *dockernet.Status `json:"docker_networks,omitempty"`
}

// leaseState is one lease as status shows it.
type leaseState struct {
	// Subnet is the lease's ID: its IPv4 subnet, or its IPv6 subnet in an IPv6-only overlay
	// (IPv6Subnet then repeats it).
	Subnet      netip.Prefix `json:"subnet"`
	PublicIP    netip.Addr   `json:"public_ip"`
	BackendType string       `json:"backend_type"`
	VtepMAC     string       `json:"vtep_mac,omitempty"`
	Expiration  time.Time    `json:"expiration,omitzero"`
	// IPv6Subnet and PublicIPv6 are the lease's IPv6 parts in a dual-stack overlay.
	IPv6Subnet netip.Prefix `json:"ipv6_subnet,omitzero"`
	PublicIPv6 netip.Addr   `json:"public_ipv6,omitzero"`
}

// subnets is the lease's subnets as one cell: "10.244.5.0/24" or
// "10.244.5.0/24,fd00:10:244:5::/64", or "fd00:10:244:5::/64" in an IPv6-only overlay.
func (s leaseState) subnets() string {
	if s.IPv6Subnet.IsValid() && s.IPv6Subnet != s.Subnet {
		return s.Subnet.String() + "," + s.IPv6Subnet.String()
	}
	return s.Subnet.String()
}

// host is the underlay address that names the lease's host: its PublicIP, or its PublicIPv6
// in an IPv6-only overlay (where PublicIP is 0.0.0.0).
func (s leaseState) host() netip.Addr {
	if s.PublicIP.IsValid() && !s.PublicIP.IsUnspecified() {
		return s.PublicIP
	}
	return s.PublicIPv6
}

// peerState is a peer lease and what the backend made of it.
type peerState struct {
	leaseState
	// Refused is why the trust rule keeps the lease out of the datapath (a
	// subnetmgr.Refused* word; "" when it may be programmed).
	Refused string `json:"refused,omitempty"`
	// Error says why the lease is not programmed: the trust rule's explanation, or the
	// backend's error ("" when programmed).
	Error string `json:"error,omitempty"`
	// RemovalDue is set when the peer's lease is gone from etcd: the peer stays in the
	// datapath until then, in case the lease comes back (see removalGrace).
	RemovalDue time.Time `json:"removal_due,omitzero"`
	// lease is the whole lease, for the backend's RemovePeer and PrunePeers.
	lease subnetmgr.Lease
}

// conflictState is a contradiction between claims in etcd (see the conflict kinds in
// peers.go).
type conflictState struct {
	Kind     string     `json:"kind"`
	PublicIP netip.Addr `json:"public_ip"`
	// Subnets are the leases claiming PublicIP, the one kept first (for
	// own_subnet_rewritten: our subnet).
	Subnets []netip.Prefix `json:"subnets"`
	// Kept is the lease that keeps the PublicIP here: programmed, or ours.
	Kept   netip.Prefix `json:"kept"`
	Since  time.Time    `json:"since"`
	Detail string       `json:"detail"`
}

func leaseStateOf(l subnetmgr.Lease) leaseState {
	s := leaseState{Subnet: l.ID(), PublicIP: l.PublicIP, BackendType: l.BackendType, Expiration: l.Expiration,
		IPv6Subnet: l.IPv6Subnet, PublicIPv6: l.PublicIPv6}
	if l.BackendType == subnetmgr.BackendVXLAN {
		data := l.BackendData
		if !l.Subnet.IsValid() {
			data = l.BackendV6Data // IPv6 only: the IPv6 VTEP is the only one
		}
		if d, err := subnetmgr.ParseVXLANData(data); err == nil {
			s.VtepMAC = d.VtepMAC
		}
	}
	return s
}

// writeState replaces path atomically (temp file + rename), so a reader never sees half.
func writeState(path string, s state) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeFileAtomic(path, append(data, '\n'), 0o644)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create directory of %s: %w", path, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name()) // no-op after the rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func readState(path string) (state, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return state{}, err
	}
	var s state
	if err := json.Unmarshal(data, &s); err != nil {
		return state{}, fmt.Errorf("state file %s is not xnetd's JSON: %w", path, err)
	}
	return s, nil
}

// daemonAlive says whether pid is a running xnetd. A pid alone is not enough: after a reboot
// or a crash the number may belong to another program, so the command line must name xnetd.
func daemonAlive(pid int) (bool, string) {
	if pid <= 0 {
		return false, "no pid recorded"
	}
	if err := syscall.Kill(pid, 0); err != nil && err != syscall.EPERM {
		return false, fmt.Sprintf("process %d is gone", pid)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false, fmt.Sprintf("process %d is gone", pid)
	}
	argv0, _, _ := strings.Cut(string(cmdline), "\x00")
	if !strings.Contains(filepath.Base(argv0), "xnetd") {
		return false, fmt.Sprintf("process %d is %q, not xnetd", pid, filepath.Base(argv0))
	}
	return true, fmt.Sprintf("pid %d", pid)
}

// stateWriteInterval is the most often the event loop rewrites the state file for peer
// changes; `xnetd status` may be this far behind on peers.
const stateWriteInterval = time.Second

// stateThrottle decides when the event loop rewrites the state file.
//
// Design history: serve used to write the whole state (every peer, JSON-indented) after every
// lease batch and renewal. With 5,000 peers and 100 lease changes a second that was O(peers)
// work per change, and the daemon fell seconds behind the lease changes it had to program
// (bench/scale.md). Now a peer change marks the state dirty: it is written at once when the
// last write is at least interval old (an isolated change shows at once), else once when the
// interval is up, so a burst costs at most one write a second. Ready, a change of our own
// lease and shutdown write at once (writeState), as status must never be wrong about those.
type stateThrottle struct {
	interval time.Duration
	last     time.Time // the last write
	due      time.Time // when the pending write is due; zero when the file is current
}

// changed records a change at now. It says whether to write now; if not, and no write was
// pending yet, arm is how long until the one now pending is due (0 when one already was).
func (s *stateThrottle) changed(now time.Time) (writeNow bool, arm time.Duration) {
	if !s.due.IsZero() {
		return false, 0
	}
	next := s.last.Add(s.interval)
	if !now.Before(next) {
		return true, 0
	}
	s.due = next
	return false, next.Sub(now)
}

// written records a write at now: nothing is pending any more.
func (s *stateThrottle) written(now time.Time) {
	s.last, s.due = now, time.Time{}
}
