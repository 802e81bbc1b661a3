package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ebpfbackend "github.com/xnet-dev/xnet/backend/ebpf"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// The files check of `xnetd check`: subnet.env and the Docker options file against our lease,
// and docker0 against them, for each family the overlay has. What the daemon writes differs by
// family (subnetmgr.WriteSubnetFile, WriteDockerOpts): an IPv4 overlay gives Docker --bip and
// --mtu; a dual-stack one adds --ipv6 --fixed-cidr-v6 and the XNET_IPV6_* keys; an IPv6-only
// one, as flannel writes it there, has only the IPv6 keys, --ipv6 --fixed-cidr-v6 and --mtu,
// and no --bip (Docker keeps its default IPv4 bridge, outside the overlay). One parser reads
// every option, and filesWant says which ones the overlay needs.

// filesWant is what the files must say in this overlay: our subnet (and the Network) in IPv4,
// our IPv6 subnet (and the IPv6Network) in IPv6, each valid when the overlay has that family.
type filesWant struct {
	network, subnet   netip.Prefix // invalid in an IPv6-only overlay
	network6, subnet6 netip.Prefix // invalid without IPv6 (or without our IPv6 subnet)
}

// filesWant is the overlay's expectations: IPv4, dual stack (our IPv6 subnet is in the
// daemon's state; without it the IPv6 part is not checked), or IPv6 only (our subnet is the
// IPv6 one).
func (c *checker) filesWant() filesWant {
	if c.ipv6Only() {
		return filesWant{network6: c.cfg.IPv6Network, subnet6: c.subnet}
	}
	w := filesWant{network: c.cfg.Network, subnet: c.subnet}
	if c.cfg.EnableIPv6 && c.haveState && c.st.Lease.IPv6Subnet.IsValid() {
		w.network6, w.subnet6 = c.cfg.IPv6Network, c.st.Lease.IPv6Subnet.Masked()
	}
	return w
}

// checkFiles compares the subnet and Docker options files with the lease, and docker0 with
// them.
func (c *checker) checkFiles() checkResult {
	r := checkResult{Check: "files"}
	if !c.subnet.IsValid() {
		r.Status, r.Detail = checkSkip, "no subnet to compare the files with"
		return r
	}
	want := c.filesWant()
	gw := subnetmgr.GatewayOf(want.subnet)
	sf, err := subnetmgr.ReadSubnetFile(c.o.subnetFile)
	if err != nil {
		r.Status, r.Detail = checkFail, fmt.Sprintf("%s: %v", c.o.subnetFile, unwrapPath(err))
		r.Fix = "systemctl restart xnetd: it writes the file at start"
		return r
	}
	r.Problems = want.subnetFileProblems(c.o.subnetFile, sf)
	opts, err := readDockerOpts(c.o.dockerOptsFile)
	if err == nil {
		err = want.dockerOptsMissing(opts)
	}
	switch {
	case err != nil:
		r.Problems = append(r.Problems, fmt.Sprintf("%s: %v", c.o.dockerOptsFile, unwrapPath(err)))
	case want.subnet.IsValid() && opts.bip != gw:
		r.Problems = append(r.Problems, fmt.Sprintf("%s gives Docker --bip=%v, the lease's gateway is %v", c.o.dockerOptsFile, opts.bip, gw))
	case want.subnet6.IsValid() && opts.fixedCIDRv6 != want.subnet6:
		r.Problems = append(r.Problems, fmt.Sprintf("%s gives Docker --fixed-cidr-v6=%v, the lease is %v", c.o.dockerOptsFile, opts.fixedCIDRv6, want.subnet6))
	case opts.mtu != sf.MTU:
		r.Problems = append(r.Problems, fmt.Sprintf("%s gives Docker --mtu=%d, %s says XNET_MTU=%d", c.o.dockerOptsFile, opts.mtu, c.o.subnetFile, sf.MTU))
	}
	if len(r.Problems) > 0 {
		r.Status, r.Fix = checkFail, "systemctl restart xnetd (it rewrites both files), then systemctl restart docker"
		r.Detail = "the files Docker starts from do not match the lease"
		return r
	}
	if detail, problem := want.docker0Problem(c.o.dockerOptsFile); problem != "" {
		r.Status, r.Detail, r.Problems, r.Fix = checkFail, detail, []string{problem}, "systemctl restart docker"
		return r
	}
	var flags []string
	if want.subnet.IsValid() {
		flags = append(flags, fmt.Sprintf("--bip=%v", gw))
	}
	if want.subnet6.IsValid() {
		flags = append(flags, fmt.Sprintf("--fixed-cidr-v6=%v", want.subnet6))
	}
	r.Status = checkOK
	r.Detail = fmt.Sprintf("%s and %s match the lease: %s --mtu=%d", c.o.subnetFile, c.o.dockerOptsFile, strings.Join(flags, " "), sf.MTU)
	return r
}

// subnetFileProblems compares the subnet file at path (read as sf) with the lease.
func (w filesWant) subnetFileProblems(path string, sf subnetmgr.SubnetFile) []string {
	var problems []string
	if !w.subnet.IsValid() {
		if sf.Subnet.IsValid() || sf.Network.IsValid() {
			return []string{fmt.Sprintf("%s sets XNET_NETWORK=%v and XNET_SUBNET=%v in an IPv6-only overlay (a file of an earlier IPv4 run)", path, sf.Network, sf.Subnet)}
		}
	} else {
		if sf.Subnet != subnetmgr.GatewayOf(w.subnet) && sf.Subnet.Masked() != w.subnet {
			problems = append(problems, fmt.Sprintf("%s says XNET_SUBNET=%v, the lease is %v", path, sf.Subnet, w.subnet))
		}
		if w.network.IsValid() && sf.Network != w.network {
			problems = append(problems, fmt.Sprintf("%s says XNET_NETWORK=%v, the config %v", path, sf.Network, w.network))
		}
	}
	if !w.subnet6.IsValid() {
		return problems
	}
	switch {
	case sf.IPv6Subnet.Masked() != w.subnet6:
		problems = append(problems, fmt.Sprintf("%s says XNET_IPV6_SUBNET=%v, the lease is %v", path, sf.IPv6Subnet, w.subnet6))
	case w.network6.IsValid() && sf.IPv6Network != w.network6:
		problems = append(problems, fmt.Sprintf("%s says XNET_IPV6_NETWORK=%v, the config %v", path, sf.IPv6Network, w.network6))
	}
	return problems
}

// dockerOptsMissing says what the options lack, or carry that they must not, for the
// overlay's families; nil when every option the comparison needs is there.
func (w filesWant) dockerOptsMissing(o dockerOpts) error {
	if !w.subnet.IsValid() && o.bip.IsValid() {
		return fmt.Errorf("--bip=%v gives Docker an IPv4 bridge address in an IPv6-only overlay", o.bip)
	}
	switch {
	case w.subnet.IsValid() && (!o.bip.IsValid() || o.mtu == 0):
		return fmt.Errorf("no --bip and --mtu in %q", o.text)
	case !w.subnet.IsValid() && (!o.fixedCIDRv6.IsValid() || o.mtu == 0):
		return fmt.Errorf("no --fixed-cidr-v6 and --mtu in %q", o.text)
	case w.subnet6.IsValid() && !o.fixedCIDRv6.IsValid():
		return fmt.Errorf("no --fixed-cidr-v6 in %q: Docker's containers get no IPv6 address in our IPv6 subnet %v", o.text, w.subnet6)
	case w.subnet6.IsValid() && !o.ipv6:
		return fmt.Errorf("--fixed-cidr-v6 without --ipv6 in %q: Docker ignores it and gives containers no IPv6", o.text)
	}
	return nil
}

// docker0Problem looks at docker0's addresses: Docker gives it --bip, and an address of
// --fixed-cidr-v6, when it starts, so other ones mean it started from an older file (or
// before the lease changed). It returns the check's detail and the problem, "" when docker0
// matches or does not exist.
func (w filesWant) docker0Problem(optsFile string) (detail, problem string) {
	br, err := netlink.LinkByName(ebpfbackend.DockerBridge)
	if err != nil {
		return "", ""
	}
	if w.subnet.IsValid() {
		gw := subnetmgr.GatewayOf(w.subnet)
		addrs, _ := netlink.AddrList(br, unix.AF_INET)
		var have []string
		match := len(addrs) == 0
		for _, a := range addrs {
			ones, _ := a.Mask.Size()
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte(a.IP.To4())), ones)
			have = append(have, p.String())
			match = match || p == gw
		}
		if !match {
			return "docker0 is not on the lease's subnet",
				fmt.Sprintf("docker0 has %s, the lease's gateway is %v: Docker started before xnetd wrote %s, or before the lease changed", strings.Join(have, ", "), gw, optsFile)
		}
	}
	if w.subnet6.IsValid() {
		addrs, _ := netlink.AddrList(br, unix.AF_INET6)
		var have []string
		match := true
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || ip.IsLinkLocalUnicast() {
				continue
			}
			ones, _ := a.Mask.Size()
			have = append(have, netip.PrefixFrom(ip, ones).String())
			match = match && w.subnet6.Contains(ip)
		}
		if !match {
			return "docker0 is not on the lease's IPv6 subnet",
				fmt.Sprintf("docker0 has %s, the lease is %v: Docker started before xnetd wrote %s, or before the lease changed", strings.Join(have, ", "), w.subnet6, optsFile)
		}
	}
	return "", ""
}

// dockerOpts is what Docker gets from the options file: the options the checks compare with
// the lease, each zero when the file does not give it.
type dockerOpts struct {
	bip         netip.Prefix // --bip: docker0's address and length (10.244.5.1/24)
	fixedCIDRv6 netip.Prefix // --fixed-cidr-v6, masked
	ipv6        bool         // --ipv6: without it Docker ignores --fixed-cidr-v6
	mtu         int          // --mtu
	// text is the file as it is, trimmed, for messages.
	text string
}

// dockerOptsVar is the variable the Docker drop-in (packaging/docker-xnet.conf) reads from
// the options file and passes to dockerd.
const dockerOptsVar = "DOCKER_NETWORK_OPTIONS"

// readDockerOpts reads the options file as systemd and dockerd read it: the drop-in's
// EnvironmentFile= takes the value of DOCKER_NETWORK_OPTIONS (quotes removed, the last
// assignment winning), its ExecStart's unquoted $DOCKER_NETWORK_OPTIONS splits the value at
// whitespace, and dockerd takes "--flag=value" and "--flag value" alike. A value that is not
// an address prefix or a number is an error; which options must be there is filesWant's to
// say.
func readDockerOpts(path string) (dockerOpts, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return dockerOpts{}, err
	}
	o := dockerOpts{text: strings.TrimSpace(string(data))}
	value, err := envFileValue(string(data), dockerOptsVar)
	if err != nil {
		return o, err
	}
	args := strings.Fields(value)
	for i := 0; i < len(args); i++ {
		name, v, hasValue := strings.Cut(args[i], "=")
		// dockerd's flags also take their value as the next argument.
		next := func() string {
			if !hasValue && i+1 < len(args) {
				i++
				return args[i]
			}
			return v
		}
		switch name {
		case "--bip":
			v = next()
			if o.bip, err = netip.ParsePrefix(v); err != nil {
				return o, fmt.Errorf("--bip=%s: %w", v, err)
			}
		case "--fixed-cidr-v6":
			v = next()
			p, err := netip.ParsePrefix(v)
			if err != nil {
				return o, fmt.Errorf("--fixed-cidr-v6=%s: %w", v, err)
			}
			o.fixedCIDRv6 = p.Masked()
		case "--mtu":
			v = next()
			if o.mtu, err = strconv.Atoi(v); err != nil {
				return o, fmt.Errorf("--mtu=%s: %w", v, err)
			}
		case "--ipv6":
			o.ipv6 = true
			if hasValue {
				if o.ipv6, err = strconv.ParseBool(v); err != nil {
					return o, fmt.Errorf("--ipv6=%s: %w", v, err)
				}
			}
		}
	}
	return o, nil
}

// envFileValue is the value of name in an EnvironmentFile= as systemd reads it: one KEY=VALUE
// per line, lines starting with # or ; ignored, whitespace around key and value dropped, and
// the value unquoted as a shell would ('...' literally, "..." with backslash escapes), the
// last assignment winning. "" when name is not assigned.
func envFileValue(data, name string) (string, error) {
	value := ""
	for line := range strings.SplitSeq(data, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(k) != name {
			continue
		}
		var err error
		if value, err = unquote(strings.TrimSpace(v)); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
	}
	return value, nil
}

// unquote removes shell quoting from s: '...' keeps its text as it is, "..." and unquoted
// text take a backslash as escaping the next character.
func unquote(s string) (string, error) {
	var b strings.Builder
	var quote byte // the open quote, 0 outside quotes
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quote == '\'' && ch == '\'', quote == '"' && ch == '"':
			quote = 0
		case quote == 0 && (ch == '\'' || ch == '"'):
			quote = ch
		case quote != '\'' && ch == '\\' && i+1 < len(s):
			i++
			b.WriteByte(s[i])
		default:
			b.WriteByte(ch)
		}
	}
	if quote != 0 {
		return "", errors.New("unterminated " + string(quote) + " quote")
	}
	return b.String(), nil
}
