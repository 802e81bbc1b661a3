package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/macvlan"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// Backend names on the --backend flag: the config's types plus "auto".
const backendAuto = "auto"

// options are the validated flags of `xnetd run` (and `xnetd teardown`, which takes the same
// flags so one /etc/default/xnetd serves both).
type options struct {
	etcdEndpoints  []string
	etcdPrefix     string
	etcdCertFile   string
	etcdKeyFile    string
	etcdCAFile     string
	etcdUsername   string
	etcdPassword   string
	iface          string // name or IP; "" = the default route's interface
	publicIP       netip.Addr
	publicIPv6     netip.Addr
	ipMasq         bool
	subnetFile     string
	dockerOptsFile string
	stateFile      string
	renewMargin    time.Duration
	backend        string // "" = the config's Backend.Type
	decap          string
	hostRouting    string
	bridge         string
	flowSteering   string
	metricsAddr    string // "" = no metrics endpoint
	bpffs          string
	teardownOnExit bool
	logLevel       slog.Level
	// macvlan requires the config's Macvlan section; without it a range is still leased
	// whenever the config has the section, so a cluster-wide section needs no per-host flag.
	macvlan     bool
	macvlanFile string

	// iptablesForwardRules keeps the overlay forwarded and unmasqueraded in the iptables
	// chains Docker uses (package fwrules).
	iptablesForwardRules bool

	// dockerNetworks serves the Docker network and IPAM driver "xnet" (package dockernet).
	dockerNetworks     bool
	dockerPluginSocket string
	dockerSocket       string
}

// usageError is a bad flag, environment variable or config: xnetd prints its one line and exits
// with code 2, before touching the host.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// envName is the environment variable that sets flag name: XNETD_ETCD_ENDPOINTS for
// --etcd-endpoints.
func envName(flag string) string {
	return "XNETD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// minutesOrDuration is --subnet-lease-renew-margin: flannel takes minutes as a bare integer
// ("60"); we also accept Go durations ("45m", "2h").
type minutesOrDuration struct{ d *time.Duration }

func (v minutesOrDuration) String() string {
	if v.d == nil {
		return ""
	}
	return v.d.String()
}

func (v minutesOrDuration) Set(s string) error {
	s = strings.TrimSpace(s)
	if n, err := strconv.Atoi(s); err == nil {
		*v.d = time.Duration(n) * time.Minute
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is neither minutes (60) nor a duration (1h30m)", s)
	}
	*v.d = d
	return nil
}

func (v minutesOrDuration) Type() string { return "minutes|duration" }

// rawFlags holds flag values before validation.
type rawFlags struct {
	etcdEndpoints string
	publicIP      string
	publicIPv6    string
	logLevel      string
	opts          options
}

// runFlagSet declares every flag of `xnetd run`.
func runFlagSet(name string) (*pflag.FlagSet, *rawFlags) {
	r := &rawFlags{opts: options{renewMargin: 60 * time.Minute}}
	o := &r.opts
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&r.etcdEndpoints, "etcd-endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated URLs")
	fs.StringVar(&o.etcdPrefix, "etcd-prefix", subnetmgr.DefaultPrefix, "etcd prefix holding config and subnets/ (flannel's)")
	fs.StringVar(&o.etcdCertFile, "etcd-certfile", "", "TLS client certificate for etcd")
	fs.StringVar(&o.etcdKeyFile, "etcd-keyfile", "", "TLS client key for etcd")
	fs.StringVar(&o.etcdCAFile, "etcd-cafile", "", "CA certificate that signed etcd's server certificate")
	fs.StringVar(&o.etcdUsername, "etcd-username", "", "etcd user name")
	fs.StringVar(&o.etcdPassword, "etcd-password", "", "etcd password (prefer XNETD_ETCD_PASSWORD in an EnvironmentFile)")
	fs.StringVar(&o.iface, "iface", "", "underlay interface, by name or address (default: the default route's interface; in an IPv6-only overlay the one holding --public-ipv6, else the IPv6 default route's)")
	fs.StringVar(&r.publicIP, "public-ip", "", "IPv4 address other hosts reach us on (default: the interface's address)")
	fs.StringVar(&r.publicIPv6, "public-ipv6", "", "dual stack and IPv6 only: IPv6 address other hosts reach us on (default: the interface's first global IPv6 address; none: IPv6 containers cross the IPv4 underlay, and an IPv6-only overlay is refused)")
	fs.BoolVar(&o.ipMasq, "ip-masq", false, "masquerade traffic from containers to outside the overlay network")
	fs.BoolVar(&o.iptablesForwardRules, "iptables-forward-rules", true, "accept the overlay network in iptables FORWARD and exempt it from masquerading, in the chains Docker uses (XNET-FWD, XNET-POSTRTG; for the IPv6Network the same in ip6tables)")
	fs.StringVar(&o.subnetFile, "subnet-file", "/run/xnet/subnet.env", "where to write XNET_* and FLANNEL_* variables")
	fs.Var(minutesOrDuration{&o.renewMargin}, "subnet-lease-renew-margin", "renew the lease this long before it expires: minutes (60) or a duration (1h)")
	fs.StringVar(&o.backend, "backend", "", "auto|ebpf|vxlan|udp|host-gw|wireguard (default: the config's Backend.Type; \"ebpf\" there means auto, which never picks wireguard)")
	fs.StringVar(&o.decap, "decap", "auto", "ebpf decapsulation: auto|xdp|tc")
	fs.StringVar(&o.bridge, "bridge", "", "ebpf: the container bridge by name; empty finds every bridge holding an address in our lease (docker0, a daemon.json \"bridge\", podman's or a CNI bridge)")
	fs.StringVar(&o.flowSteering, "flow-steering", "off", "ebpf: rps processes each flow a container sends on one CPU (RPS on its veth), so it keeps its order and TCP sees no reordering, at a throughput cost on hosts with few CPUs (see the README); off leaves the veths alone")
	fs.StringVar(&o.hostRouting, "host-routing", "auto", "ebpf: bpf (container packets skip the host's routing and netfilter) or kernel (they take the host's stack and its firewall, e.g. Docker's DOCKER-USER); auto picks kernel when DOCKER-USER holds rules")
	fs.StringVar(&o.dockerOptsFile, "docker-opts-file", "/run/xnet/docker", "where to write DOCKER_NETWORK_OPTIONS")
	fs.StringVar(&o.stateFile, "state-file", "", "where the daemon records its state for 'xnetd status' (default: state.json next to --subnet-file)")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "127.0.0.1:9469", "host:port for /metrics and /healthz; empty disables")
	fs.StringVar(&o.bpffs, "bpffs", "/sys/fs/bpf/xnet", "pin directory of the ebpf backend's maps and links")
	fs.BoolVar(&o.macvlan, "macvlan", false, "lease a macvlan range for Docker and fail when the config has no Macvlan section (default: lease one only when the config has it)")
	fs.StringVar(&o.macvlanFile, "macvlan-file", macvlan.DefaultFile, "where to write this host's macvlan range and its docker network create arguments")
	fs.BoolVar(&o.dockerNetworks, "docker-networks", false, "serve the Docker network and IPAM driver \"xnet\": docker network create -d xnet --ipam-driver xnet makes a network of every host")
	fs.StringVar(&o.dockerPluginSocket, "docker-plugin-socket", dockernet.DefaultPluginSocket, "where dockerd finds the xnet plugin (in its plugins directory)")
	fs.StringVar(&o.dockerSocket, "docker-socket", dockernet.DefaultDockerSocket, "this host's Docker API, where xnetd creates the cluster's networks")
	fs.BoolVar(&o.teardownOnExit, "teardown-on-exit", false, "remove the datapath when stopping (default: leave it forwarding for the next start)")
	fs.StringVar(&r.logLevel, "log-level", "info", "debug|info|warn|error")
	return fs, r
}

// parseFlags parses args, then fills every flag not given on the command line from its
// XNETD_<NAME> variable (lookup is os.LookupEnv outside tests). The command line wins.
func parseFlags(fs *pflag.FlagSet, args []string, lookup func(string) (string, bool)) error {
	fs.SetOutput(discard{})
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return usagef("%v (see %s --help)", err, fs.Name())
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q: every setting is a --flag (see %s --help)", fs.Arg(0), fs.Name())
	}
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		v, ok := lookup(envName(f.Name))
		if !ok {
			return
		}
		if e := fs.Set(f.Name, v); e != nil {
			err = usagef("%s=%q (--%s): %v", envName(f.Name), v, f.Name, e)
		}
	})
	return err
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// validate checks every value and fills the derived ones. Each error names the flag and says
// what to do instead.
func (r *rawFlags) validate(backendNames []string) (options, error) {
	o := r.opts
	if o.stateFile == "" {
		o.stateFile = defaultStateFile(o.subnetFile)
	}

	for _, e := range strings.Split(r.etcdEndpoints, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return o, usagef("--etcd-endpoints: %q is not an http:// or https:// URL (example: http://127.0.0.1:2379)", e)
		}
		o.etcdEndpoints = append(o.etcdEndpoints, e)
	}
	if len(o.etcdEndpoints) == 0 {
		return o, usagef("--etcd-endpoints is empty: give at least one URL (example: http://127.0.0.1:2379)")
	}
	if !strings.HasPrefix(o.etcdPrefix, "/") || strings.HasSuffix(o.etcdPrefix, "/") {
		return o, usagef("--etcd-prefix %q must start with / and not end with / (example: /coreos.com/network)", o.etcdPrefix)
	}
	for _, f := range []struct{ flag, path string }{
		{"etcd-certfile", o.etcdCertFile}, {"etcd-keyfile", o.etcdKeyFile}, {"etcd-cafile", o.etcdCAFile},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return o, usagef("--%s %s: cannot read it (%v): give the path of a PEM file", f.flag, f.path, unwrapPath(err))
		}
	}
	if (o.etcdCertFile == "") != (o.etcdKeyFile == "") {
		return o, usagef("--etcd-certfile and --etcd-keyfile go together: give both or neither")
	}
	if o.etcdPassword != "" && o.etcdUsername == "" {
		return o, usagef("--etcd-password without --etcd-username: give the user name too")
	}

	if r.publicIP != "" {
		ip, err := netip.ParseAddr(r.publicIP)
		if err != nil || !ip.Is4() {
			return o, usagef("--public-ip %q is not an IPv4 address (example: 198.18.0.11)", r.publicIP)
		}
		o.publicIP = ip
	}
	if r.publicIPv6 != "" {
		ip, err := netip.ParseAddr(r.publicIPv6)
		if err != nil || !ip.Is6() || ip.Is4In6() || ip.Zone() != "" || ip.IsLinkLocalUnicast() {
			return o, usagef("--public-ipv6 %q is not a global IPv6 address (example: fd00:198:18::11)", r.publicIPv6)
		}
		o.publicIPv6 = ip
	}
	if o.renewMargin <= 0 || o.renewMargin >= subnetmgr.DefaultLeaseTTL {
		return o, usagef("--subnet-lease-renew-margin %v must be more than 0 and less than the lease TTL (%v): use minutes such as 60", o.renewMargin, subnetmgr.DefaultLeaseTTL)
	}
	for _, f := range []struct{ flag, path string }{
		{"subnet-file", o.subnetFile}, {"docker-opts-file", o.dockerOptsFile}, {"state-file", o.stateFile}, {"bpffs", o.bpffs},
		{"macvlan-file", o.macvlanFile}, {"docker-plugin-socket", o.dockerPluginSocket}, {"docker-socket", o.dockerSocket},
	} {
		if f.path == "" || !filepath.IsAbs(f.path) {
			return o, usagef("--%s %q must be an absolute path", f.flag, f.path)
		}
	}

	switch o.backend {
	case "", backendAuto:
	default:
		if !contains(subnetmgr.ValidBackendTypes(), o.backend) {
			return o, usagef("--backend %q is not a backend: use auto, ebpf, vxlan, udp, host-gw or wireguard", o.backend)
		}
		if !contains(backendNames, o.backend) {
			return o, usagef("--backend %s is not built into this xnetd (it has: %s): pick one of those", o.backend, strings.Join(backendNames, ", "))
		}
	}
	switch o.decap {
	case "auto", "xdp", "tc":
	default:
		return o, usagef("--decap %q is not a decapsulation mode: use auto, xdp or tc", o.decap)
	}
	switch o.flowSteering {
	case "off", "rps":
	default:
		return o, usagef("--flow-steering %q is not a flow-steering mode: use off or rps", o.flowSteering)
	}
	switch o.hostRouting {
	case "auto", "bpf", "kernel":
	default:
		return o, usagef("--host-routing %q is not a host-routing mode: use auto, bpf or kernel", o.hostRouting)
	}
	if o.metricsAddr != "" {
		host, port, err := net.SplitHostPort(o.metricsAddr)
		if err != nil {
			return o, usagef("--metrics-addr %q is not host:port (example: 127.0.0.1:9469; empty disables)", o.metricsAddr)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			return o, usagef("--metrics-addr %q: port %q is not a number in 0..65535", o.metricsAddr, port)
		}
		if host != "" {
			if _, err := netip.ParseAddr(host); err != nil && host != "localhost" {
				return o, usagef("--metrics-addr %q: host %q is not an IP address (example: 127.0.0.1:9469)", o.metricsAddr, host)
			}
		}
	}
	lvl, err := parseLogLevel(r.logLevel)
	if err != nil {
		return o, err
	}
	o.logLevel = lvl
	return o, nil
}

func parseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info", "":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, usagef("--log-level %q is not a level: use debug, info, warn or error", s)
}

// defaultStateFile puts state.json next to the subnet file (/run/xnet/state.json by default),
// so a host whose files live elsewhere (tests, a second instance) keeps them together.
func defaultStateFile(subnetFile string) string {
	return filepath.Join(filepath.Dir(subnetFile), "state.json")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// unwrapPath turns *fs.PathError into its bare cause: the path is already in our message.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
