package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ebpfbackend "github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/health"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/maps"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// `xnetd check` verifies this host's part of the overlay end to end, once, and names what is
// wrong with the fix: the daemon, the lease in etcd, the files Docker starts from, the underlay
// interface, the backend's device, the BPF programs (ebpf), the datapath's routes against the
// leases in etcd, firewall rules on the backend's port (VXLAN, wireguard's) and the health
// port, and finally every peer probed over the overlay and the underlay from here. It takes
// run's flags (so one /etc/default/xnetd serves both) and reads the daemon's state file; it
// changes nothing.
//
// In an IPv6-only overlay (EnableIPv4 false) the same checks look at IPv6 (check_ipv6only.go):
// leases by their IPv6 subnet and PublicIPv6, the IPv6 keys of the files, the underlay's IPv6
// address and routes, the IPv6 device and routes of the backend, and rules dropping its UDP
// port or the health port over IPv6. Peers are probed there over IPv6: from our IPv6 subnet's
// first address to theirs, and from our PublicIPv6 to theirs.
//
// Exit code 0 when everything holds, 1 when something does not (each failure printed with its
// fix), 2 for a bad flag. A peer unreachable over the overlay while nothing here is wrong points
// at the peer: the output says to run the check there.

// Check verdicts.
const (
	checkOK   = "ok"
	checkFail = "FAIL"
	checkWarn = "warn"
	checkSkip = "skip"
)

// checkResult is one check: what was looked at, what is wrong and how to fix it.
type checkResult struct {
	Check    string   `json:"check"`
	Status   string   `json:"status"`
	Detail   string   `json:"detail"`
	Problems []string `json:"problems,omitempty"`
	Fix      string   `json:"fix,omitempty"`
}

// checkReport is what `xnetd check --output json` prints.
type checkReport struct {
	Subnet   netip.Prefix  `json:"subnet"`
	PublicIP netip.Addr    `json:"public_ip"`
	Iface    string        `json:"iface"`
	Backend  string        `json:"backend"`
	Checks   []checkResult `json:"checks"`
	Peers    []checkPeer   `json:"peers"`
	// Failed names the checks that failed, in order.
	Failed []string `json:"failed"`
}

type checkPeer struct {
	Subnet   netip.Prefix      `json:"subnet"`
	PublicIP netip.Addr        `json:"public_ip"`
	Health   health.PeerHealth `json:"health"`
}

// checkFailed is the command's error when a check failed (exit code 1).
type checkFailed struct{ failed []string }

func (e *checkFailed) Error() string {
	return fmt.Sprintf("check found %d problem(s) on this host: %s", len(e.failed), strings.Join(e.failed, ", "))
}

// checkLease is a peer lease as the checks compare it with the datapath.
type checkLease struct {
	Subnet      netip.Prefix
	PublicIP    netip.Addr
	BackendType string
	VtepMAC     string
	// IPv6Subnet is the lease's IPv6 subnet in a dual-stack overlay (its IPv6 overlay is
	// probed), invalid otherwise.
	IPv6Subnet netip.Prefix
	// PublicIPv6 is the lease's IPv6 underlay address in a dual-stack overlay (host-gw routes
	// its IPv6 subnet there), invalid otherwise.
	PublicIPv6 netip.Addr
	// Refused is why the daemon's backend refused the lease ("" when programmed).
	Refused string
}

type checker struct {
	o         options
	log       *slog.Logger
	st        state
	haveState bool
	cfg       subnetmgr.Config
	backend   string
	subnet    netip.Prefix
	publicIP  netip.Addr
	ifaceName string
	nic       netlink.Link // nil when the interface is missing
	ifaceIP   netip.Addr
	// peers are the peer leases from etcd, or the daemon's last view when etcd did not answer
	// (peersFrom says which).
	peers     []checkLease
	peersFrom string
	rep       checkReport
}

func cmdCheck(args []string, stdout, stderr io.Writer, lookup func(string) (string, bool)) error {
	fs, raw := runFlagSet("xnetd check")
	var output string
	var timeout time.Duration
	fs.StringVarP(&output, "output", "o", "text", "text|json")
	fs.DurationVar(&timeout, "check-timeout", 20*time.Second, "longest the probes of every peer may take")
	if err := parseFlags(fs, args, lookup); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage: xnetd check [flags]: verify this host's datapath end to end; exit 1 naming what is wrong\n\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
		}
		return err
	}
	if output != "text" && output != "json" {
		return usagef("--output %q is not a format: use text or json", output)
	}
	o, err := raw.validate(newRegistry().Names())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+15*time.Second)
	defer cancel()
	c := &checker{o: o, log: newLogger(stderr, max(o.logLevel, slog.LevelWarn))}
	c.run(ctx, timeout)

	if output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(c.rep); err != nil {
			return err
		}
	} else {
		printCheck(stdout, c.rep)
	}
	if len(c.rep.Failed) > 0 {
		return &checkFailed{failed: c.rep.Failed}
	}
	return nil
}

// run runs every check.
func (c *checker) run(ctx context.Context, probeTimeout time.Duration) {
	c.add(c.checkDaemon(ctx))
	c.add(c.checkEtcd(ctx))
	c.rep.Subnet, c.rep.PublicIP, c.rep.Iface, c.rep.Backend = c.subnet, c.publicIP, c.ifaceName, c.backend
	c.add(c.checkFiles())
	c.add(c.checkUnderlay())
	c.add(c.checkDevice())
	c.add(c.checkBPF())
	c.add(c.checkRoutes())
	c.add(c.checkFirewall(ctx))
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	c.add(c.checkPeers(pctx))
}

// ipv6Only says whether the overlay is IPv6 only: every check then looks at IPv6, and the
// subnet and PublicIP of a lease are its IPv6 subnet and PublicIPv6.
func (c *checker) ipv6Only() bool { return c.cfg.IPv6Only() }

func (c *checker) add(r checkResult) {
	c.rep.Checks = append(c.rep.Checks, r)
	if r.Status == checkFail {
		c.rep.Failed = append(c.rep.Failed, r.Check)
	}
}

func printCheck(w io.Writer, rep checkReport) {
	publicIP := "PublicIP"
	if rep.PublicIP.Is6() {
		publicIP = "PublicIPv6" // an IPv6-only overlay
	}
	fmt.Fprintf(w, "xnetd check: %v (%s %v) on %s, backend %s\n", rep.Subnet, publicIP, rep.PublicIP, orDash(rep.Iface), orDash(rep.Backend))
	for _, r := range rep.Checks {
		fmt.Fprintf(w, "%-5s %-9s %s\n", r.Status, r.Check, r.Detail)
		for _, p := range r.Problems {
			fmt.Fprintf(w, "%16s%s\n", "- ", p)
		}
		if r.Fix != "" {
			fmt.Fprintf(w, "%16s%s\n", "fix: ", r.Fix)
		}
	}
	if len(rep.Failed) == 0 {
		fmt.Fprintln(w, "everything checked holds")
	}
}

// checkDaemon reads the state file and asks whether the daemon runs and is ready.
func (c *checker) checkDaemon(ctx context.Context) checkResult {
	r := checkResult{Check: "daemon"}
	st, err := readState(c.o.stateFile)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("no state of the daemon (%v): xnetd has not run on this host, or with another --state-file/--subnet-file", unwrapPath(err))
		r.Fix = "systemctl start xnetd (or give check the flags the daemon runs with)"
		return r
	}
	c.st, c.haveState = st, true
	c.backend, c.cfg, c.subnet, c.publicIP, c.ifaceName = st.Backend, st.Config, st.Lease.Subnet.Masked(), st.PublicIP, st.Iface
	if c.ipv6Only() {
		c.publicIP = st.Lease.PublicIPv6 // the lease's Subnet is its IPv6 one (its ID)
	}
	alive, why := daemonAlive(st.PID)
	if !alive {
		r.Status = checkFail
		r.Detail = fmt.Sprintf("xnetd is not running (%s): lease changes of peers are not followed and our lease is not renewed", why)
		if st.Backend == subnetmgr.BackendUDP {
			r.Detail += "; the udp datapath is the daemon itself: no container traffic crosses hosts"
		}
		r.Fix = "systemctl start xnetd; journalctl -u xnetd says why it stopped"
		return r
	}
	ready := false
	if st.MetricsAddr != "" {
		_, ready, _, _ = scrape(ctx, st.MetricsAddr)
	} else {
		ready = st.Ready
	}
	if !ready {
		r.Status, r.Detail = checkFail, fmt.Sprintf("xnetd runs (%s) but is not ready: it has not programmed its peers yet", why)
		r.Fix = "wait a few seconds; journalctl -u xnetd says what it waits for (etcd, the config, a lease)"
		return r
	}
	r.Status, r.Detail = checkOK, fmt.Sprintf("running (%s), ready, backend %s (%s)", why, st.Backend, st.Mode)
	return r
}

// checkEtcd reads the config and the leases, and finds ours.
func (c *checker) checkEtcd(ctx context.Context) checkResult {
	r := checkResult{Check: "lease"}
	if !c.subnet.IsValid() {
		if sf, err := subnetmgr.ReadSubnetFile(c.o.subnetFile); err == nil {
			c.subnet = sf.Subnet.Masked()
			if !sf.Subnet.IsValid() {
				c.subnet = sf.IPv6Subnet.Masked() // an IPv6-only overlay's file
			}
		}
	}
	if c.ifaceName == "" {
		c.ifaceName = c.o.iface
	}
	if !c.publicIP.IsValid() {
		c.publicIP = c.o.publicIP
		if c.ipv6Only() {
			c.publicIP = c.o.publicIPv6
		}
	}
	c.peersFromState("the daemon's last view (etcd did not answer)")

	mgr, err := subnetmgr.New(subnetmgr.Options{
		Endpoints: c.o.etcdEndpoints, Prefix: c.o.etcdPrefix, CertFile: c.o.etcdCertFile, KeyFile: c.o.etcdKeyFile,
		CAFile: c.o.etcdCAFile, Username: c.o.etcdUsername, Password: c.o.etcdPassword, Logger: c.log,
	})
	if err != nil {
		r.Status, r.Detail, r.Fix = checkFail, fmt.Sprintf("etcd client: %v", err), "fix the --etcd-* flags (XNETD_ETCD_* in /etc/default/xnetd)"
		return r
	}
	defer mgr.Close()
	ectx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cfg, err := mgr.GetConfig(ectx)
	if err != nil {
		r.Status = checkFail
		r.Detail = fmt.Sprintf("etcd %s: cannot read %s: %v", strings.Join(c.o.etcdEndpoints, ","), subnetmgr.ConfigKey(c.o.etcdPrefix), err)
		r.Fix = "check that etcd answers from here (etcdctl --endpoints " + strings.Join(c.o.etcdEndpoints, ",") + " endpoint health) and the --etcd-* flags"
		return r
	}
	if c.cfg.Network.IsValid() && cfg.Network != c.cfg.Network {
		r.Problems = append(r.Problems, fmt.Sprintf("the config's Network is %v but xnetd runs with %v", cfg.Network, c.cfg.Network))
		r.Fix = "systemctl restart xnetd, then Docker: the Network changed under them"
	}
	if c.ipv6Only() && cfg.IPv6Network != c.cfg.IPv6Network {
		r.Problems = append(r.Problems, fmt.Sprintf("the config's IPv6Network is %v but xnetd runs with %v", cfg.IPv6Network, c.cfg.IPv6Network))
		r.Fix = "systemctl restart xnetd, then Docker: the IPv6Network changed under them"
	}
	c.cfg = cfg
	if c.backend == "" {
		c.backend = cfg.Backend.Type
	}
	leases, _, err := mgr.ListLeases(ectx)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("etcd: list leases: %v", err)
		r.Fix = "check that etcd answers from here and the --etcd-* flags"
		return r
	}
	refused := c.refusedByDaemon()
	c.peers, c.peersFrom = nil, "etcd"
	var ours *subnetmgr.Lease
	// In an IPv6-only overlay every lease's PublicIP is 0.0.0.0: hosts are told apart by their
	// PublicIPv6, and a VTEP MAC is in BackendV6Data.
	host, data, publicIP := func(l subnetmgr.Lease) netip.Addr { return l.PublicIP }, func(l subnetmgr.Lease) json.RawMessage { return l.BackendData }, "PublicIP"
	if c.ipv6Only() {
		host, data, publicIP = func(l subnetmgr.Lease) netip.Addr { return l.PublicIPv6 }, func(l subnetmgr.Lease) json.RawMessage { return l.BackendV6Data }, "PublicIPv6"
	}
	for i, l := range leases {
		switch id := l.ID().Masked(); {
		case id == c.subnet:
			ours = &leases[i]
		case host(l) == c.publicIP:
			r.Problems = append(r.Problems, fmt.Sprintf("another lease %v carries our %s %v (a stale lease of this host?)", id, publicIP, host(l)))
		default:
			cl := checkLease{Subnet: id, PublicIP: host(l), BackendType: l.BackendType, Refused: refused[id]}
			if !c.ipv6Only() {
				dual := subnetmgr.ForFamilies(c.cfg, l)
				cl.IPv6Subnet, cl.PublicIPv6 = dual.IPv6Subnet.Masked(), dual.PublicIPv6
			}
			if d, err := subnetmgr.ParseVXLANData(data(l)); err == nil {
				cl.VtepMAC = d.VtepMAC
			}
			c.peers = append(c.peers, cl)
		}
	}
	switch {
	case !c.subnet.IsValid():
		r.Problems = append(r.Problems, "this host has no subnet: no state file and no subnet file")
		r.Fix = "systemctl start xnetd"
	case ours == nil:
		r.Problems = append(r.Problems, fmt.Sprintf("no lease for our subnet %v in etcd: another host may take it", c.subnet))
		r.Fix = "systemctl restart xnetd: it takes its subnet back (a different one means Docker must restart too)"
	case host(*ours) != c.publicIP:
		r.Problems = append(r.Problems, fmt.Sprintf("the lease of %v carries %s %v, not ours (%v): another host holds our subnet", c.subnet, publicIP, host(*ours), c.publicIP))
		r.Fix = "find the host at " + host(*ours).String() + "; restart xnetd here to get a subnet of our own, then Docker"
	case !ours.Expiration.IsZero() && time.Until(ours.Expiration) <= 0:
		r.Problems = append(r.Problems, fmt.Sprintf("the lease of %v expired at %s", c.subnet, ours.Expiration.Format(time.RFC3339)))
		r.Fix = "systemctl restart xnetd"
	}
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, fmt.Sprintf("%d leases in etcd", len(leases))
		return r
	}
	expiry := "a reservation (no TTL)"
	if !ours.Expiration.IsZero() {
		expiry = fmt.Sprintf("expires %s (in %s)", ours.Expiration.Format(time.RFC3339), time.Until(ours.Expiration).Round(time.Minute))
	}
	r.Status = checkOK
	r.Detail = fmt.Sprintf("%v with %s %v in etcd, %s; %d peer leases", c.subnet, publicIP, c.publicIP, expiry, len(c.peers))
	return r
}

// refusedByDaemon is, by subnet, why the daemon's backend refused a peer.
func (c *checker) refusedByDaemon() map[netip.Prefix]string {
	out := map[netip.Prefix]string{}
	for _, p := range c.st.Peers {
		if p.Error != "" {
			out[p.Subnet.Masked()] = p.Error
		}
	}
	return out
}

// peersFromState takes the daemon's last view of the peers, for when etcd does not answer.
func (c *checker) peersFromState(from string) {
	c.peers, c.peersFrom = nil, from
	for _, p := range c.st.Peers {
		if p.RemovalDue.IsZero() {
			cl := checkLease{Subnet: p.Subnet.Masked(), PublicIP: p.host(), BackendType: p.BackendType, VtepMAC: p.VtepMAC, Refused: p.Error}
			if !c.ipv6Only() && c.cfg.EnableIPv6 {
				cl.IPv6Subnet, cl.PublicIPv6 = p.IPv6Subnet.Masked(), p.PublicIPv6
			}
			c.peers = append(c.peers, cl)
		}
	}
}

// checkUnderlay looks at the interface other hosts reach us on, and our route to each peer.
func (c *checker) checkUnderlay() checkResult {
	r := checkResult{Check: "underlay"}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("netlink: %v", err)
		return r
	}
	defer nl.Close()
	var nic netlink.Link
	if c.ifaceName == "" {
		family := unix.AF_INET
		if c.ipv6Only() {
			family = unix.AF_INET6
		}
		nic, err = defaultRouteLink(nl, family)
	} else {
		nic, err = nl.LinkByName(c.ifaceName)
	}
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("underlay interface %q: %v", c.ifaceName, err)
		r.Fix = "give --iface the interface the daemon runs with, or bring that interface back"
		return r
	}
	c.nic = nic
	a := nic.Attrs()
	c.ifaceName, c.rep.Iface = a.Name, a.Name
	family := "IPv4"
	if c.ipv6Only() {
		family = "IPv6"
		c.ifaceIP = c.underlayIPv6(nl, nic)
	} else if ip, err := firstIPv4(nl, nic); err == nil {
		c.ifaceIP = ip
	}
	if !c.publicIP.IsValid() {
		c.publicIP, c.rep.PublicIP = c.ifaceIP, c.ifaceIP
	}
	switch {
	case a.Flags&net.FlagUp == 0:
		r.Problems = append(r.Problems, fmt.Sprintf("%s is down: no packet to or from any peer", a.Name))
		r.Fix = fmt.Sprintf("ip link set %s up (and restore its routes: ip route add default via <gateway> dev %s)", a.Name, a.Name)
	case a.OperState == netlink.OperDown || a.OperState == netlink.OperLowerLayerDown:
		r.Problems = append(r.Problems, fmt.Sprintf("%s has no carrier (oper state %s)", a.Name, a.OperState))
		r.Fix = "check its cable, switch port, or the VM's NIC"
	case !c.ifaceIP.IsValid() && c.ipv6Only() && c.publicIP.IsValid():
		r.Problems = append(r.Problems, fmt.Sprintf("%s does not hold our PublicIPv6 %v: peers send the overlay there", a.Name, c.publicIP))
		r.Fix = fmt.Sprintf("give it its address back (ip -6 addr add %v/64 dev %s, or the prefix it had), then systemctl restart xnetd", c.publicIP, a.Name)
	case !c.ifaceIP.IsValid():
		r.Problems = append(r.Problems, fmt.Sprintf("%s has no %s address", a.Name, family))
		r.Fix = "give it its address back (ip addr add ...), then systemctl restart xnetd"
	}
	if len(r.Problems) == 0 {
		var noRoute []string
		for _, p := range c.peers {
			routes, err := nl.RouteGet(p.PublicIP.AsSlice())
			if err != nil || len(routes) == 0 {
				noRoute = append(noRoute, fmt.Sprintf("%v (%v)", p.PublicIP, err))
			} else if routes[0].LinkIndex != a.Index {
				noRoute = append(noRoute, fmt.Sprintf("%v goes out another interface (ifindex %d)", p.PublicIP, routes[0].LinkIndex))
			}
		}
		if len(noRoute) > 0 {
			r.Problems = append(r.Problems, fmt.Sprintf("no route over %s to %d peers' %s: %s", a.Name, len(noRoute), c.publicIPName()+"s", strings.Join(firstN(noRoute, 5), "; ")))
			r.Fix = "restore the underlay routes (ip route)"
			if c.ipv6Only() {
				r.Fix = "restore the underlay's IPv6 routes (ip -6 route)"
			}
		}
	}
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, fmt.Sprintf("%s (%v)", a.Name, c.ifaceIP)
		return r
	}
	r.Status = checkOK
	r.Detail = fmt.Sprintf("%s up, %v, MTU %d, a route to every peer's %s", a.Name, c.ifaceIP, a.MTU, c.publicIPName())
	return r
}

func firstN(s []string, n int) []string {
	if len(s) <= n {
		return s
	}
	return append(s[:n:n], fmt.Sprintf("and %d more", len(s)-n))
}

// deviceName is the backend's overlay device ("" for host-gw).
func (c *checker) deviceName() string {
	if c.ipv6Only() {
		return c.deviceNameIPv6Only()
	}
	switch c.backend {
	case subnetmgr.BackendEBPF, subnetmgr.BackendUDP:
		return ebpfbackend.HostDevice // both name it xnet0
	case subnetmgr.BackendVXLAN:
		return vxlan.DeviceName(c.cfg.Backend.VNI)
	case subnetmgr.BackendWireGuard:
		return wireguard.DeviceName
	}
	return ""
}

// checkDevice looks at the backend's device: up, holding our overlay address.
func (c *checker) checkDevice() checkResult {
	r := checkResult{Check: "device"}
	name := c.deviceName()
	if name == "" || !c.subnet.IsValid() {
		r.Status, r.Detail = checkSkip, "backend "+orDash(c.backend)+" has no overlay device"
		return r
	}
	r.Fix = "systemctl restart xnetd: it sets the device up again"
	dev, err := netlink.LinkByName(name)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("%s is missing (%v): host traffic to the overlay has no way out", name, err)
		return r
	}
	want := c.subnet.Masked().Addr()
	if dev.Attrs().Flags&net.FlagUp == 0 {
		r.Problems = append(r.Problems, name+" is down")
	}
	family, bits := unix.AF_INET, 32
	if c.ipv6Only() {
		family, bits = unix.AF_INET6, 128
	}
	addrs, _ := netlink.AddrList(dev, family)
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.Equal(want.AsSlice()) }) {
		r.Problems = append(r.Problems, fmt.Sprintf("%s lacks our overlay address %v/%d", name, want, bits))
	}
	if c.ipv6Only() && c.backend == subnetmgr.BackendWireGuard {
		// The whole IPv6Network goes into the device, so traffic to a subnet no peer holds
		// is dropped there instead of leaving in clear by the default route.
		if !slices.ContainsFunc(mainRoutes(unix.AF_INET6), func(rt netlink.Route) bool {
			return rt.LinkIndex == dev.Attrs().Index && prefixOf(rt.Dst) == c.cfg.IPv6Network
		}) {
			r.Problems = append(r.Problems, fmt.Sprintf("no route %v dev %s: traffic to a subnet no peer holds leaves unencrypted by the default route", c.cfg.IPv6Network, name))
		}
	}
	if c.backend == subnetmgr.BackendWireGuard && !c.ipv6Only() {
		r.Problems = append(r.Problems, c.wireguardDeviceProblems(dev)...)
	}
	if c.backend == subnetmgr.BackendEBPF && c.cfg.Network.IsValid() {
		if !slices.ContainsFunc(mainRoutes(unix.AF_INET), func(rt netlink.Route) bool {
			return rt.LinkIndex == dev.Attrs().Index && prefixOf(rt.Dst) == c.cfg.Network
		}) {
			r.Problems = append(r.Problems, fmt.Sprintf("no route %v dev %s: the host's own traffic to containers elsewhere is not encapsulated", c.cfg.Network, name))
		}
	}
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, name
		return r
	}
	r.Status, r.Detail, r.Fix = checkOK, fmt.Sprintf("%s up with %v", name, want), ""
	return r
}

// checkBPF looks at the pinned datapath: its config, and each program attached where it must be.
func (c *checker) checkBPF() checkResult {
	r := checkResult{Check: "bpf"}
	if c.backend != subnetmgr.BackendEBPF {
		r.Status, r.Detail = checkSkip, "backend "+orDash(c.backend)+" loads no BPF programs"
		return r
	}
	dir := c.bpffsDir()
	r.Fix = "systemctl restart xnetd: it loads, configures and attaches the programs again"
	m, err := maps.OpenPinned(dir)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("the datapath is not loaded: %v", err)
		return r
	}
	defer m.Close()
	if mc, ok, err := m.GetConfig(); err != nil || !ok {
		r.Problems = append(r.Problems, fmt.Sprintf("the config map holds no configuration (%v): every program passes traffic untouched", err))
	} else {
		switch {
		case c.ipv6Only() && !mc.IPv6Only:
			r.Problems = append(r.Problems, fmt.Sprintf("the config map is an IPv4 overlay's (subnet %v), the overlay is IPv6-only", mc.Subnet))
		case !c.ipv6Only() && mc.Subnet.Masked() != c.subnet:
			r.Problems = append(r.Problems, fmt.Sprintf("the config map says our subnet is %v, the lease %v", mc.Subnet, c.subnet))
		}
		if c.nic != nil && mc.UnderlayIfindex != c.nic.Attrs().Index {
			r.Problems = append(r.Problems, fmt.Sprintf("the config map sends to ifindex %d, %s is %d", mc.UnderlayIfindex, c.ifaceName, c.nic.Attrs().Index))
		}
		if !c.ipv6Only() && c.ifaceIP.IsValid() && mc.LocalIP != c.ifaceIP {
			r.Problems = append(r.Problems, fmt.Sprintf("the config map's underlay address is %v, %s has %v", mc.LocalIP, c.ifaceName, c.ifaceIP))
		}
	}
	if c.ipv6Only() {
		// Our IPv6 subnet is in config6 (in dual stack too; there its routes check says more).
		if c6, ok, err := m.GetConfig6(); err != nil || !ok {
			r.Problems = append(r.Problems, fmt.Sprintf("the config6 map holds no configuration (%v): IPv6 passes untouched", err))
		} else if c6.Subnet.Masked() != c.subnet {
			r.Problems = append(r.Problems, fmt.Sprintf("the config6 map says our IPv6 subnet is %v, the lease %v", c6.Subnet, c.subnet))
		}
	}
	type want struct {
		prog loader.Program
		dev  netlink.Link
		hook loader.Hook
		what string
	}
	var wants []want
	if c.nic != nil {
		wants = append(wants, want{loader.DecapTC, c.nic, loader.Ingress, "VXLAN from peers is not decapsulated"})
		if strings.HasPrefix(c.st.Mode, "xdp") {
			wants = append(wants, want{loader.DecapXDP, c.nic, loader.XDP, "decapsulation was set up in XDP"})
		}
	}
	if dev, err := netlink.LinkByName(ebpfbackend.HostDevice); err == nil {
		wants = append(wants, want{loader.EncapHost, dev, loader.Egress, "the host's own traffic to the overlay is dropped"})
	}
	if dev, err := netlink.LinkByName(ebpfbackend.TunnelDevice); err == nil {
		wants = append(wants, want{loader.DecapTunnel, dev, loader.Ingress, "VXLAN over the IPv6 underlay reaches the stack unchecked"})
	}
	// Both host-routing modes want the encap program on container veths: with kernel host
	// routing it only learns the containers deliver_bridge hands packets to.
	lost := "this container's packets take the slow path through the host"
	if strings.Contains(c.st.Mode, "host routing "+ebpfbackend.HostRoutingKernel) {
		lost = "overlay packets for this container cross the bridge, which cuts large ones into segments"
	}
	bridges, veths := containerLinks(c.subnet, c.o.bridge)
	for _, v := range veths {
		wants = append(wants, want{loader.EncapContainer, v, loader.Ingress, lost})
	}
	for _, br := range bridges {
		wants = append(wants, want{loader.DeliverBridge, br, loader.Egress, "overlay packets the host forwards to containers cross the bridge, which cuts large ones into segments"})
	}
	ids := map[loader.Program]ebpf.ProgramID{}
	attached := 0
	for _, w := range wants {
		id, ok := ids[w.prog]
		if !ok {
			var err error
			if id, err = pinnedProgID(loader.ProgramPin(dir, w.prog)); err != nil {
				r.Problems = append(r.Problems, fmt.Sprintf("program %s: %v", w.prog, err))
				continue
			}
			ids[w.prog] = id
		}
		on, err := progAttached(w.dev, w.hook, id)
		switch {
		case err != nil:
			r.Problems = append(r.Problems, fmt.Sprintf("%s on %s %s: %v", w.prog, w.dev.Attrs().Name, w.hook, err))
		case !on:
			r.Problems = append(r.Problems, fmt.Sprintf("%s is not attached to %s's %s %s: %s", w.prog, w.dev.Attrs().Name, hookKind(w.hook), w.hook, w.what))
		default:
			attached++
		}
	}
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, fmt.Sprintf("pinned in %s", dir)
		return r
	}
	r.Status, r.Detail, r.Fix = checkOK, fmt.Sprintf("configured for %v, %d programs attached where they belong (pins in %s)", c.subnet, attached, dir), ""
	return r
}

// bpffsDir is where the daemon pinned its datapath: where its state says, else --bpffs.
func (c *checker) bpffsDir() string {
	if c.haveState && c.st.BPFFS != "" {
		return c.st.BPFFS
	}
	return c.o.bpffs
}

func hookKind(h loader.Hook) string {
	if h == loader.XDP {
		return ""
	}
	return "TC"
}

// containerLinks are the container bridges as the ebpf backend finds them (the one --bridge
// names, or every bridge with an address in our subnet, whatever it is called: an IPv6 one in
// an IPv6-only overlay, whose subnet is the IPv6 lease) and the veths enslaved to them
// (containers' host ends).
func containerLinks(subnet netip.Prefix, name string) (bridges, veths []netlink.Link) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, nil
	}
	idx := map[int]bool{}
	for _, l := range links {
		if l.Type() != "bridge" {
			continue
		}
		if name != "" {
			if l.Attrs().Name == name {
				bridges, idx[l.Attrs().Index] = append(bridges, l), true
			}
			continue
		}
		family := unix.AF_INET
		if subnet.Addr().Is6() {
			family = unix.AF_INET6
		}
		addrs, _ := netlink.AddrList(l, family)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && subnet.Contains(ip.Unmap()) {
				bridges, idx[l.Attrs().Index] = append(bridges, l), true
				break
			}
		}
	}
	for _, l := range links {
		if idx[l.Attrs().MasterIndex] && l.Type() == "veth" {
			veths = append(veths, l)
		}
	}
	return bridges, veths
}

func pinnedProgID(pin string) (ebpf.ProgramID, error) {
	p, err := ebpf.LoadPinnedProgram(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return 0, fmt.Errorf("not pinned at %s: %w", pin, err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, fmt.Errorf("the kernel does not say the ID of %s", pin)
	}
	return id, nil
}

// progAttached says whether program id runs at hook of dev: a TCX link, a cls_bpf filter of
// clsact (kernels before 6.6), or the XDP program.
func progAttached(dev netlink.Link, hook loader.Hook, id ebpf.ProgramID) (bool, error) {
	if hook == loader.XDP {
		x := dev.Attrs().Xdp
		return x != nil && x.Attached && ebpf.ProgramID(x.ProgId) == id, nil
	}
	attach, parent := ebpf.AttachTCXIngress, uint32(netlink.HANDLE_MIN_INGRESS)
	if hook == loader.Egress {
		attach, parent = ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS
	}
	res, qerr := link.QueryPrograms(link.QueryOptions{Target: dev.Attrs().Index, Attach: attach})
	if qerr == nil {
		for _, p := range res.Programs {
			if p.ID == id {
				return true, nil
			}
		}
	}
	filters, ferr := netlink.FilterList(dev, parent)
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && ebpf.ProgramID(bf.Id) == id {
			return true, nil
		}
	}
	if qerr != nil && ferr != nil {
		return false, fmt.Errorf("query TCX (%v) and clsact (%v)", qerr, ferr)
	}
	return false, nil
}

// checkRoutes compares the datapath's routes with the peer leases: the BPF routes map for
// ebpf, the kernel's routes (and fdb for vxlan) for the others; in a dual-stack overlay also
// the routes to the peers' IPv6 subnets (check_dualstack.go).
func (c *checker) checkRoutes() checkResult {
	r := checkResult{Check: "routes"}
	if !c.subnet.IsValid() || !c.network().IsValid() {
		r.Status, r.Detail = checkSkip, "no lease and Network to compare with"
		return r
	}
	have, where, err := c.datapathRoutes()
	if err != nil {
		r.Status, r.Detail, r.Fix = checkFail, err.Error(), "systemctl restart xnetd"
		return r
	}
	want := map[netip.Prefix]routeWant{}
	var refused []string
	for _, p := range c.peers {
		if p.Refused != "" {
			refused = append(refused, fmt.Sprintf("%v (%s)", p.Subnet, p.Refused))
			continue
		}
		w := routeWant{host: p.PublicIP, via: c.expectedVia(p), mac: p.VtepMAC}
		if c.directKernelRoutes() {
			// A peer on our segment is routed plain, via its PublicIP on the NIC.
			w.direct = p.PublicIP
		}
		want[p.Subnet] = w
	}
	held := func(subnet netip.Prefix) bool {
		return slices.ContainsFunc(c.peers, func(p checkLease) bool { return p.Subnet == subnet })
	}
	r.Problems = c.routeProblems(where, "its containers are unreachable from here", want, have, held)
	var mismatched []string
	if len(r.Problems) > 0 {
		mismatched = append(mismatched, fmt.Sprintf("%s does not match the %d peer leases", where, len(want)))
	}
	r.Detail = fmt.Sprintf("%s holds exactly the %d peer leases in %s", where, len(want), c.peersFrom)
	if c.dualStack() {
		problems, detail, failed, err := c.checkRoutes6()
		if err != nil {
			r.Status, r.Detail, r.Fix = checkFail, err.Error(), "systemctl restart xnetd"
			return r
		}
		r.Problems = append(r.Problems, problems...)
		if failed != "" {
			mismatched = append(mismatched, failed)
		}
		r.Detail += ", " + detail
	}
	sort.Strings(r.Problems)
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, strings.Join(mismatched, "; ")
		r.Fix = "systemctl restart xnetd: at start it programs every lease in etcd and removes the rest"
		return r
	}
	r.Status = checkOK
	if len(refused) > 0 {
		r.Detail += fmt.Sprintf("; refused by the backend (see xnetd status): %s", strings.Join(refused, ", "))
	}
	return r
}

// routeWant is the route a peer's subnet must have in the datapath.
type routeWant struct {
	host netip.Addr // the peer's underlay address, for the messages
	// via is the next hop the route must have when it has one (a device route of udp or
	// wireguard has none); a direct route (DirectRouting) may go via direct instead.
	via, direct netip.Addr
	mac         string // the VTEP MAC the route must carry, "" when not compared
}

// routeProblems compares the routes a datapath holds (have, as where calls it) with the ones
// the peers need (want); lost says what a missing route costs, and held whether some lease
// holds a subnet that has a route but is not wanted (refused, say).
func (c *checker) routeProblems(where, lost string, want map[netip.Prefix]routeWant, have map[netip.Prefix]datapathRoute, held func(netip.Prefix) bool) []string {
	var problems []string
	for subnet, w := range want {
		got, ok := have[subnet]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("%s lacks %v via %v (lease in %s): %s", where, subnet, w.host, c.peersFrom, lost))
		case got.via.IsValid() && w.via.IsValid() && got.via != w.via && (!w.direct.IsValid() || got.via != w.direct):
			problems = append(problems, fmt.Sprintf("%s sends %v via %v, the lease says %v", where, subnet, got.via, w.via))
		case got.mac != "" && w.mac != "" && !strings.EqualFold(got.mac, w.mac):
			problems = append(problems, fmt.Sprintf("%s has VTEP MAC %s for %v, the lease says %s", where, got.mac, subnet, w.mac))
		case got.problem != "":
			problems = append(problems, fmt.Sprintf("%v: %s", subnet, got.problem))
		}
	}
	for subnet, got := range have {
		if _, ok := want[subnet]; !ok && !held(subnet) {
			problems = append(problems, fmt.Sprintf("%s has %v via %v, which no lease in %s holds (a lease deleted in the last 3 s leaves then)", where, subnet, got.via, c.peersFrom))
		}
	}
	return problems
}

// network is the overlay network the checks look into: the Network, or the IPv6Network in an
// IPv6-only overlay.
func (c *checker) network() netip.Prefix {
	if c.ipv6Only() {
		return c.cfg.IPv6Network
	}
	return c.cfg.Network
}

// directKernelRoutes says whether peers on our segment may be routed via their PublicIP on the
// NIC in the kernel's routing table: vxlan's and udp's DirectRouting (ebpf keeps its direct
// peers in its routes map; host-gw routes every peer that way).
func (c *checker) directKernelRoutes() bool {
	return c.cfg.Backend.DirectRouting && (c.backend == subnetmgr.BackendVXLAN || c.backend == subnetmgr.BackendUDP)
}

// expectedVia is the next hop a peer's route must have: its PublicIP (ebpf's routes map,
// host-gw; the PublicIPv6 in an IPv6-only overlay), or its subnet address on the vxlan device.
func (c *checker) expectedVia(p checkLease) netip.Addr {
	if c.backend == subnetmgr.BackendVXLAN {
		return p.Subnet.Addr()
	}
	return p.PublicIP
}

type datapathRoute struct {
	via     netip.Addr
	mac     string
	problem string
}

// datapathRoutes lists the routes to peer subnets in the backend's own terms.
func (c *checker) datapathRoutes() (map[netip.Prefix]datapathRoute, string, error) {
	out := map[netip.Prefix]datapathRoute{}
	network := c.network()
	peerRoute := func(dst netip.Prefix) bool {
		return network.Contains(dst.Addr()) && dst.Bits() > network.Bits() && !dst.Overlaps(c.subnet)
	}
	if c.backend == subnetmgr.BackendEBPF {
		m, err := maps.OpenPinned(c.bpffsDir())
		if err != nil {
			return nil, "", fmt.Errorf("the BPF routes map: %w", err)
		}
		defer m.Close()
		if c.ipv6Only() {
			// Every peer is in routes6, reached at its PublicIPv6 (its IPv6 VTEP).
			routes, err := m.ListRoutes6()
			if err != nil {
				return nil, "", err
			}
			for _, rt := range routes {
				out[rt.Subnet.Masked()] = datapathRoute{via: rt.PublicIPv6, mac: rt.VtepMAC.String()}
			}
			return out, "the BPF routes6 map", nil
		}
		routes, err := m.ListRoutes()
		if err != nil {
			return nil, "", err
		}
		for _, rt := range routes {
			out[rt.Subnet.Masked()] = datapathRoute{via: rt.PublicIP, mac: rt.VtepMAC.String()}
		}
		return out, "the BPF routes map", nil
	}
	dev := c.deviceName()
	devIndex := -1
	if dev != "" {
		if l, err := netlink.LinkByName(dev); err == nil {
			devIndex = l.Attrs().Index
		}
	}
	var fdb map[string]netip.Addr
	if c.backend == subnetmgr.BackendVXLAN && devIndex > 0 {
		fdb = map[string]netip.Addr{}
		if neighs, err := netlink.NeighList(devIndex, unix.AF_BRIDGE); err == nil {
			for _, n := range neighs {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					fdb[strings.ToLower(n.HardwareAddr.String())] = ip.Unmap()
				}
			}
		}
	}
	family := unix.AF_INET
	if c.ipv6Only() {
		family = unix.AF_INET6
	}
	for _, rt := range mainRoutes(family) {
		dst := prefixOf(rt.Dst)
		if !dst.IsValid() || !peerRoute(dst) {
			continue
		}
		dr := datapathRoute{}
		if gw, ok := netip.AddrFromSlice(rt.Gw); ok {
			dr.via = gw.Unmap()
		}
		direct := c.directKernelRoutes() && c.nic != nil && rt.LinkIndex == c.nic.Attrs().Index
		switch {
		case direct:
			// DirectRouting: plain via the peer's PublicIP; no VTEP entries to compare.
			out[dst] = dr
			continue
		case c.backend == subnetmgr.BackendVXLAN, c.backend == subnetmgr.BackendUDP:
			if rt.LinkIndex != devIndex {
				dr.problem = fmt.Sprintf("routed out ifindex %d, not %s", rt.LinkIndex, dev)
			}
		case c.backend == subnetmgr.BackendHostGW:
			if c.nic != nil && rt.LinkIndex != c.nic.Attrs().Index {
				dr.problem = fmt.Sprintf("routed out ifindex %d, not %s", rt.LinkIndex, c.ifaceName)
			}
		case c.backend == subnetmgr.BackendWireGuard:
			if dev != "" && rt.LinkIndex != devIndex {
				dr.problem = fmt.Sprintf("routed out ifindex %d, not %s: it leaves unencrypted", rt.LinkIndex, dev)
			}
		}
		out[dst] = dr
	}
	if c.ipv6Only() && c.backend == subnetmgr.BackendVXLAN && devIndex > 0 {
		c.checkNeighboursV6(devIndex, dev, out)
	}
	// The vxlan device also needs the peer's VTEP MAC in its fdb, pointing at the PublicIP.
	for _, p := range c.peers {
		dr, ok := out[p.Subnet]
		if !ok || fdb == nil || p.VtepMAC == "" || c.directKernelRoutes() && dr.via == p.PublicIP {
			continue
		}
		if ip, ok := fdb[strings.ToLower(p.VtepMAC)]; !ok {
			dr.problem = fmt.Sprintf("no fdb entry %s dst %v on %s", p.VtepMAC, p.PublicIP, dev)
		} else if ip != p.PublicIP {
			dr.problem = fmt.Sprintf("the fdb entry %s on %s points at %v, the lease says %v", p.VtepMAC, dev, ip, p.PublicIP)
		}
		out[p.Subnet] = dr
	}
	return out, "the kernel's routing table", nil
}

// mainRoutes are the main table's routes of family (unix.AF_INET or AF_INET6).
func mainRoutes(family int) []netlink.Route {
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil
	}
	return routes
}

func prefixOf(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(addr.Unmap(), ones).Masked()
}

// checkFirewall finds rules that drop the VXLAN port or the health port.
func (c *checker) checkFirewall(ctx context.Context) checkResult {
	r := checkResult{Check: "firewall"}
	if c.ipv6Only() {
		return c.checkFirewallIPv6Only(ctx)
	}
	var ports []int
	switch c.backend {
	case subnetmgr.BackendHostGW:
	case subnetmgr.BackendWireGuard:
		ports, _ = c.wireguardPorts()
	default:
		vxlanPort := c.cfg.Backend.Port
		if vxlanPort == 0 {
			vxlanPort = 8472
		}
		ports = append(ports, vxlanPort)
	}
	ports = append(ports, health.DefaultPort)
	rules, err := firewallPortRules(ctx, ports)
	var notes, fixes []string
	if c.backend == subnetmgr.BackendWireGuard {
		var err6 error
		r.Problems, fixes, err6 = c.wireguardFirewallProblems(ctx)
		err = errors.Join(err, err6)
	}
	for _, fr := range rules {
		what := fmt.Sprintf("%s drops UDP %d", fr.Where, fr.Port)
		if fr.Port == health.DefaultPort {
			r.Problems = append(r.Problems, what+" (the health probes: peers' reachability cannot be measured)")
			continue
		}
		// The ebpf datapath decapsulates at TC ingress before netfilter and encapsulates into
		// the NIC past it: only a netdev egress hook sees its VXLAN packets.
		if c.backend == subnetmgr.BackendEBPF && !(fr.Netdev && fr.Hook == "egress") {
			notes = append(notes, what+" (the ebpf datapath runs before netfilter and is not affected; a fallback to vxlan or udp would be)")
			continue
		}
		if c.backend == subnetmgr.BackendWireGuard {
			r.Problems = append(r.Problems, what+" (wireguard: container traffic between hosts)")
			continue
		}
		r.Problems = append(r.Problems, what+" (VXLAN: container traffic between hosts)")
	}
	if len(r.Problems) > 0 {
		r.Status, r.Detail = checkFail, "firewall rules drop what the overlay needs"
		for _, fr := range rules {
			fixes = append(fixes, fr.Delete)
		}
		r.Fix = fmt.Sprintf("remove the rule (%s), or accept UDP %s from the peers' PublicIPs before it", strings.Join(fixes, "; "), joinInts(ports))
		return r
	}
	r.Status = checkOK
	r.Detail = fmt.Sprintf("no nftables or iptables rule drops UDP %s", joinInts(ports))
	if err != nil {
		r.Status, r.Detail = checkWarn, fmt.Sprintf("could not read every rule: %v", err)
	}
	if len(notes) > 0 {
		r.Status, r.Problems = checkWarn, notes
		r.Detail = "rules drop VXLAN where the ebpf datapath does not pass"
	}
	return r
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, " and ")
}

// checkPeers probes every peer over the overlay and the underlay from here.
func (c *checker) checkPeers(ctx context.Context) checkResult {
	r := checkResult{Check: "peers"}
	if !c.subnet.IsValid() {
		r.Status, r.Detail = checkSkip, "no subnet to probe from"
		return r
	}
	if len(c.peers) == 0 {
		r.Status, r.Detail = checkOK, "no peers in "+c.peersFrom
		return r
	}
	overlay, optional := overlayAddress(c.backend, c.subnet)
	// A dual-stack overlay probes the IPv6 overlay too (overlay6Address): our IPv6 subnet is
	// in the daemon's state.
	var overlay6 netip.Addr
	if c.haveState && !c.ipv6Only() {
		overlay6 = overlay6Address(c.cfg, c.backend, c.st.Lease.IPv6Subnet)
	}
	var peers []health.Peer
	for _, p := range c.peers {
		hp := health.Peer{Subnet: p.Subnet, PublicIP: p.PublicIP}
		if p.Refused != "" {
			hp.OverlayWhy = "refused by the backend: " + p.Refused
		} else {
			hp.Overlay, hp.OverlayOptional = overlayAddress(p.BackendType, p.Subnet)
			if overlay6.IsValid() && p.IPv6Subnet.IsValid() && p.BackendType != subnetmgr.BackendHostGW {
				hp.Overlay6 = p.IPv6Subnet.Masked().Addr()
			}
		}
		peers = append(peers, hp)
	}
	underlayIP := c.ifaceIP
	if !underlayIP.IsValid() {
		underlayIP = c.publicIP
	}
	res, err := health.ProbeOnce(ctx, health.Options{Overlay: overlay, OverlayOptional: optional, Underlay: underlayIP,
		Network: c.network(), Overlay6: overlay6, Network6: c.cfg.IPv6Network, Logger: c.log}, peers)
	if err != nil {
		r.Status, r.Detail = checkFail, err.Error()
		return r
	}
	var rtts []time.Duration
	var overlayDown, overlay6Down, overlay6Up, notProbed int
	for _, p := range c.peers {
		h := res[p.Subnet]
		c.rep.Peers = append(c.rep.Peers, checkPeer{Subnet: p.Subnet, PublicIP: p.PublicIP, Health: h})
		if h.Overlay6 != nil && h.Overlay6.State == health.StateReachable {
			overlay6Up++
		}
		if h.Overlay6 != nil && h.Overlay6.State == health.StateUnreachable {
			overlay6Down++
			r.Problems = append(r.Problems, fmt.Sprintf("%v (%v): IPv6 overlay unreachable to %v (%s)", p.Subnet, p.PublicIP, h.Overlay6.Target, h.Overlay6.Why))
		}
		switch h.Overlay.State {
		case health.StateReachable:
			rtts = append(rtts, time.Duration(h.Overlay.RTTP50))
			continue
		case health.StateNotProbed:
			notProbed++
			if p.Refused == "" && h.Underlay.State == health.StateReachable {
				r.Problems = append(r.Problems, fmt.Sprintf("%v (%v): overlay not probed: %s", p.Subnet, p.PublicIP, h.Overlay.Why))
			}
			continue
		}
		overlayDown++
		switch h.Underlay.State {
		case health.StateReachable:
			r.Problems = append(r.Problems, fmt.Sprintf("%v (%v): overlay unreachable, the underlay answers (%s)", p.Subnet, p.PublicIP, h.Overlay.Why))
		default:
			r.Problems = append(r.Problems, fmt.Sprintf("%v (%v): unreachable over the overlay and the underlay (%s)", p.Subnet, p.PublicIP, h.Underlay.Why))
		}
	}
	sort.Strings(r.Problems)
	if overlayDown > 0 || overlay6Down > 0 {
		r.Status = checkFail
		var down []string
		if overlayDown > 0 {
			down = append(down, fmt.Sprintf("%d of %d peers do not answer over the overlay", overlayDown, len(c.peers)))
		}
		if overlay6Down > 0 {
			down = append(down, fmt.Sprintf("%d of %d peers do not answer over the IPv6 overlay", overlay6Down, len(c.peers)))
		}
		r.Detail = fmt.Sprintf("%s (UDP %d to their overlay address)", strings.Join(down, ", "), health.DefaultPort)
		if len(c.rep.Failed) > 0 {
			r.Fix = "fix the problems above on this host first: they explain this (" + strings.Join(c.rep.Failed, ", ") + ")"
		} else {
			var where []string
			for _, p := range c.rep.Peers {
				if p.Health.Overlay.State == health.StateUnreachable || p.Health.Path(health.Overlay6).State == health.StateUnreachable {
					where = append(where, p.PublicIP.String())
				}
			}
			r.Fix = fmt.Sprintf("nothing wrong found on this host: run xnetd check on %s, and check the firewalls between for UDP %d and %d",
				strings.Join(firstN(where, 5), ", "), c.cfg.Backend.Port, health.DefaultPort)
		}
		return r
	}
	slices.Sort(rtts)
	r.Status = checkOK
	r.Detail = fmt.Sprintf("%d of %d peers answer over the overlay", len(rtts), len(c.peers))
	if len(rtts) > 0 {
		r.Detail += fmt.Sprintf(" (median RTT %v)", health.Duration(rtts[(len(rtts)-1)/2]))
	}
	if overlay6.IsValid() {
		r.Detail += fmt.Sprintf(", %d over the IPv6 overlay", overlay6Up)
	}
	if notProbed > 0 {
		r.Detail += fmt.Sprintf(", %d not probed over the overlay", notProbed)
		if len(r.Problems) > 0 {
			r.Status = checkWarn
		}
	}
	return r
}
