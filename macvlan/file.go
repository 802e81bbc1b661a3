package macvlan

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// DefaultFile is where xnetd writes the options file (--macvlan-file).
const DefaultFile = "/run/xnet/macvlan"

// OptionsFile is the content of /run/xnet/macvlan: one host's Docker macvlan network.
type OptionsFile struct {
	Name    string       // Docker network name
	Subnet  netip.Prefix // --subnet
	Gateway netip.Addr   // --gateway
	Range   netip.Prefix // --ip-range: this host's leased range
	Parent  string       // -o parent=
}

// Args are the arguments of `docker network create` for this host, in order:
// -d macvlan --subnet=... --gateway=... --ip-range=... -o parent=... <name>.
func (f OptionsFile) Args() []string {
	return []string{"-d", "macvlan",
		"--subnet=" + f.Subnet.String(),
		"--gateway=" + f.Gateway.String(),
		"--ip-range=" + f.Range.String(),
		"-o", "parent=" + f.Parent,
		f.Name}
}

func (f OptionsFile) check() error {
	switch {
	case !f.Subnet.IsValid() || !f.Range.IsValid() || !f.Gateway.IsValid():
		return fmt.Errorf("subnet (%v), gateway (%v) and range (%v) must all be set", f.Subnet, f.Gateway, f.Range)
	case !dockerName.MatchString(f.Name):
		return fmt.Errorf("network name %q is not a Docker network name", f.Name)
	case !ifaceName.MatchString(f.Parent):
		return fmt.Errorf("parent %q is not an interface name", f.Parent)
	}
	return nil
}

// WriteOptionsFile writes path atomically, as an environment file:
//
//	XNET_MACVLAN_NAME=xnet-macvlan
//	XNET_MACVLAN_SUBNET=10.0.0.0/24
//	XNET_MACVLAN_GATEWAY=10.0.0.254
//	XNET_MACVLAN_RANGE=10.0.0.32/28
//	XNET_MACVLAN_PARENT=eth0
//	DOCKER_MACVLAN_OPTIONS="-d macvlan --subnet=10.0.0.0/24 ... -o parent=eth0 xnet-macvlan"
//
// so a host's setup is `. /run/xnet/macvlan && docker network create $DOCKER_MACVLAN_OPTIONS`,
// or EnvironmentFile= plus ExecStart=/usr/bin/docker network create $DOCKER_MACVLAN_OPTIONS in
// a systemd unit (systemd splits an unbraced $VAR at spaces). Every value is checked, so the
// line is safe to split unquoted.
func WriteOptionsFile(path string, f OptionsFile) error {
	if err := f.check(); err != nil {
		return fmt.Errorf("write macvlan options file %s: %w", path, err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# this host's macvlan range, leased by xnetd; create the network with:\n")
	fmt.Fprintf(&b, "#   . %s && docker network create $DOCKER_MACVLAN_OPTIONS\n", path)
	fmt.Fprintf(&b, "XNET_MACVLAN_NAME=%s\n", f.Name)
	fmt.Fprintf(&b, "XNET_MACVLAN_SUBNET=%s\n", f.Subnet)
	fmt.Fprintf(&b, "XNET_MACVLAN_GATEWAY=%s\n", f.Gateway)
	fmt.Fprintf(&b, "XNET_MACVLAN_RANGE=%s\n", f.Range)
	fmt.Fprintf(&b, "XNET_MACVLAN_PARENT=%s\n", f.Parent)
	fmt.Fprintf(&b, "DOCKER_MACVLAN_OPTIONS=\"%s\"\n", strings.Join(f.Args(), " "))
	return subnetmgr.WriteFileAtomic(path, b.Bytes())
}

// ReadOptionsFile reads a file WriteOptionsFile wrote (the XNET_MACVLAN_* lines).
func ReadOptionsFile(path string) (OptionsFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return OptionsFile{}, fmt.Errorf("read macvlan options file: %w", err)
	}
	vars := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			vars[k] = strings.Trim(v, `"`)
		}
	}
	var f OptionsFile
	var errs []string
	prefix := func(name string, dst *netip.Prefix) {
		p, err := netip.ParsePrefix(vars[name])
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s=%q is not a CIDR", name, vars[name]))
		}
		*dst = p
	}
	prefix("XNET_MACVLAN_SUBNET", &f.Subnet)
	prefix("XNET_MACVLAN_RANGE", &f.Range)
	if f.Gateway, err = netip.ParseAddr(vars["XNET_MACVLAN_GATEWAY"]); err != nil {
		errs = append(errs, fmt.Sprintf("XNET_MACVLAN_GATEWAY=%q is not an address", vars["XNET_MACVLAN_GATEWAY"]))
	}
	f.Name, f.Parent = vars["XNET_MACVLAN_NAME"], vars["XNET_MACVLAN_PARENT"]
	if len(errs) > 0 {
		return OptionsFile{}, fmt.Errorf("macvlan options file %s: %s", path, strings.Join(errs, "; "))
	}
	if err := f.check(); err != nil {
		return OptionsFile{}, fmt.Errorf("macvlan options file %s: %w", path, err)
	}
	return f, nil
}
