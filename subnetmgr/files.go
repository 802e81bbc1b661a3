package subnetmgr

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// WriteSubnetFile writes subnet.env atomically: XNET_* for xnet's own scripts and the same
// values as FLANNEL_* for scripts written for flannel (mk-docker-opts.sh and the like). A
// dual-stack overlay adds IPV6_NETWORK and IPV6_SUBNET (gateway form, as SUBNET), as flannel;
// an IPv6-only one (no Subnet) writes those without NETWORK and SUBNET, as flannel.
func WriteSubnetFile(path string, f SubnetFile) error {
	if err := f.check(); err != nil {
		return fmt.Errorf("write subnet file %s: %w", path, err)
	}
	var b bytes.Buffer
	for _, p := range []string{"XNET_", "FLANNEL_"} {
		if f.Subnet.IsValid() {
			fmt.Fprintf(&b, "%sNETWORK=%s\n", p, f.Network)
			fmt.Fprintf(&b, "%sSUBNET=%s\n", p, GatewayOf(f.Subnet))
		}
		if f.IPv6Subnet.IsValid() {
			fmt.Fprintf(&b, "%sIPV6_NETWORK=%s\n", p, f.IPv6Network)
			fmt.Fprintf(&b, "%sIPV6_SUBNET=%s\n", p, GatewayOf(f.IPv6Subnet))
		}
		fmt.Fprintf(&b, "%sMTU=%d\n", p, f.MTU)
		fmt.Fprintf(&b, "%sIPMASQ=%t\n", p, f.IPMasq)
	}
	return writeFileAtomic(path, b.Bytes())
}

// WriteDockerOpts writes the Docker options file atomically, for EnvironmentFile= in a
// docker.service drop-in. As flannel's mk-docker-opts.sh: when xnetd masquerades
// (IPMasq true) Docker must not masquerade as well, so Docker gets the opposite value. In an
// IPv6-only overlay Docker gets no --bip (its IPv4 bridge is not the overlay's) and no
// --ip-masq (an IPv4 option): " --ipv6 --fixed-cidr-v6=<subnet> --mtu=<mtu>".
func WriteDockerOpts(path string, f SubnetFile) error {
	if err := f.check(); err != nil {
		return fmt.Errorf("write docker options file %s: %w", path, err)
	}
	dns := ""
	if f.DNS.IsValid() {
		dns = " --dns=" + f.DNS.String()
	}
	ipv6 := ""
	if f.IPv6Subnet.IsValid() {
		// Docker gives its bridge the subnet's first address, as --bip's.
		ipv6 = " --ipv6 --fixed-cidr-v6=" + f.IPv6Subnet.Masked().String()
	}
	line := fmt.Sprintf("DOCKER_NETWORK_OPTIONS=\" --bip=%s --ip-masq=%t --mtu=%d%s%s\"\n", GatewayOf(f.Subnet), !f.IPMasq, f.MTU, ipv6, dns)
	if !f.Subnet.IsValid() {
		line = fmt.Sprintf("DOCKER_NETWORK_OPTIONS=\"%s --mtu=%d%s\"\n", ipv6, f.MTU, dns)
	}
	return writeFileAtomic(path, []byte(line))
}

func (f SubnetFile) check() error {
	switch {
	case !f.Network.IsValid() && !f.Subnet.IsValid() && f.IPv6Subnet.IsValid(): // IPv6 only
	case !f.Network.IsValid() || !f.Subnet.IsValid():
		return fmt.Errorf("both network (%v) and subnet (%v) must be set", f.Network, f.Subnet)
	}
	if f.MTU <= 0 {
		return fmt.Errorf("MTU %d must be positive", f.MTU)
	}
	if f.IPv6Subnet.IsValid() && (!f.IPv6Network.IsValid() || !f.IPv6Subnet.Addr().Is6()) {
		return fmt.Errorf("IPv6 subnet %v needs an IPv6 network (have %v)", f.IPv6Subnet, f.IPv6Network)
	}
	return nil
}

// ReadSubnetFile reads a subnet.env written by WriteSubnetFile, or by flannel (FLANNEL_*
// only). XNET_* values win when both are present. Subnet is returned masked (10.244.5.0/24).
// A file of an IPv6-only overlay has no NETWORK and SUBNET: Network and Subnet stay zero.
func ReadSubnetFile(path string) (SubnetFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return SubnetFile{}, fmt.Errorf("read subnet file: %w", err)
	}
	vars := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		vars[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"'`)
	}
	get := func(name string) (string, string, error) {
		for _, p := range []string{"XNET_", "FLANNEL_"} {
			if v, ok := vars[p+name]; ok {
				return p + name, v, nil
			}
		}
		return "", "", fmt.Errorf("subnet file %s: neither XNET_%s nor FLANNEL_%s is set", path, name, name)
	}
	var f SubnetFile
	name, v, err := get("NETWORK")
	_, _, noSubnet := get("SUBNET")
	_, _, noIPv6 := get("IPV6_SUBNET")
	ipv6Only := err != nil && noSubnet != nil && noIPv6 == nil
	if !ipv6Only {
		if err != nil {
			return SubnetFile{}, err
		}
		if f.Network, err = netip.ParsePrefix(v); err != nil {
			return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not a CIDR", path, name, v)
		}
		if name, v, err = get("SUBNET"); err != nil {
			return SubnetFile{}, err
		}
		gw, err := netip.ParsePrefix(v)
		if err != nil {
			return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not a gateway/len such as 10.244.5.1/24", path, name, v)
		}
		f.Subnet = gw.Masked()
	}
	if name, v, err = get("MTU"); err != nil {
		return SubnetFile{}, err
	}
	if f.MTU, err = strconv.Atoi(v); err != nil || f.MTU <= 0 {
		return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not a positive number", path, name, v)
	}
	if name, v, err = get("IPMASQ"); err != nil {
		return SubnetFile{}, err
	}
	if f.IPMasq, err = strconv.ParseBool(v); err != nil {
		return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not true or false", path, name, v)
	}
	// The IPv6 pair is optional (an IPv4-only overlay writes neither), but both or none.
	name6, v6, err6 := get("IPV6_NETWORK")
	nameS, s6, errS := get("IPV6_SUBNET")
	switch {
	case err6 != nil && errS != nil:
	case err6 != nil || errS != nil:
		return SubnetFile{}, fmt.Errorf("subnet file %s: IPV6_NETWORK and IPV6_SUBNET come together; one is missing", path)
	default:
		n, err := netip.ParsePrefix(v6)
		if err != nil || !n.Addr().Is6() {
			return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not an IPv6 CIDR", path, name6, v6)
		}
		gw, err := netip.ParsePrefix(s6)
		if err != nil || !gw.Addr().Is6() {
			return SubnetFile{}, fmt.Errorf("subnet file %s: %s=%q is not an IPv6 gateway/len such as fd00:10:244:5::1/64", path, nameS, s6)
		}
		f.IPv6Network, f.IPv6Subnet = n, gw.Masked()
	}
	return f, nil
}

// WriteFileAtomic is writeFileAtomic for the other files xnet writes on a host (package
// macvlan's options file), so every such file is replaced the same way.
func WriteFileAtomic(path string, data []byte) error { return writeFileAtomic(path, data) }

// writeFileAtomic writes data to a temporary file in path's directory and renames it over
// path, so a reader (Docker's EnvironmentFile, a script) sees the old file or the new one,
// never half of one.
func writeFileAtomic(path string, data []byte) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
