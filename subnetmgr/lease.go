package subnetmgr

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// This file is the one place that knows the etcd key and the JSON of a lease.

// SubnetsDir is the key directory of the overlay's subnet leases: <prefix>/subnets/.
const SubnetsDir = "subnets"

// ConfigKey is the key of the network config under prefix.
func ConfigKey(prefix string) string { return strings.TrimSuffix(prefix, "/") + "/config" }

// SubnetsPrefix is the key prefix every lease key starts with.
func SubnetsPrefix(prefix string) string { return PoolPrefix(prefix, SubnetsDir) }

// SubnetKey is the etcd key of the lease on subnet: <prefix>/subnets/10.244.5.0-24.
func SubnetKey(prefix string, subnet netip.Prefix) string { return PoolKey(prefix, SubnetsDir, subnet) }

// DualSubnetKey is the etcd key of a dual-stack lease, flannel's form:
// <prefix>/subnets/10.244.5.0-24&fc00:0:0:5::-64. Without subnet6 it is SubnetKey.
func DualSubnetKey(prefix string, subnet, subnet6 netip.Prefix) string {
	return LeaseKey(prefix, SubnetsDir, subnet, subnet6)
}

// ParseSubnetKey is the inverse of SubnetKey and DualSubnetKey, returning the IPv4 subnet
// (ParseDualSubnetKey returns both). It refuses anything flannel would not have written: a
// non-IPv4 address, a length out of 0..32, host bits set, a malformed IPv6 part.
func ParseSubnetKey(prefix, key string) (netip.Prefix, error) {
	v4, _, err := ParseLeaseKey(prefix, SubnetsDir, key)
	return v4, err
}

// ParseDualSubnetKey is ParseSubnetKey returning the IPv6 subnet too (the zero Prefix when
// the key has none).
func ParseDualSubnetKey(prefix, key string) (v4, v6 netip.Prefix, err error) {
	return ParseLeaseKey(prefix, SubnetsDir, key)
}

// noIPv4Subnet is what flannel writes as the IPv4 subnet of an IPv6-only lease: its zero
// IP4Net, so the key is <prefix>/subnets/0.0.0.0-0&fc00:0:0:1::-64.
var noIPv4Subnet = netip.PrefixFrom(netip.IPv4Unspecified(), 0)

// LeaseKey is the key of the lease on subnet (and subnet6, when valid) in the pool in dir:
// PoolKey, with flannel's "&<ipv6>-<len>" suffix for a dual-stack lease. An IPv6-only lease
// (subnet invalid, subnet6 valid) is flannel's 0.0.0.0-0&<ipv6>-<len>.
func LeaseKey(prefix, dir string, subnet, subnet6 netip.Prefix) string {
	if !subnet.IsValid() && subnet6.IsValid() {
		subnet = noIPv4Subnet
	}
	k := PoolKey(prefix, dir, subnet)
	if subnet6.IsValid() {
		k += "&" + subnet6.Addr().String() + "-" + strconv.Itoa(subnet6.Bits())
	}
	return k
}

// key is the etcd key of l in the pool in dir.
func (l Lease) key(prefix, dir string) string { return LeaseKey(prefix, dir, l.Subnet, l.IPv6Subnet) }

// Key is the etcd key of l, an overlay lease, under prefix.
func (l Lease) Key(prefix string) string { return l.key(prefix, SubnetsDir) }

// ParseLeaseKey is the inverse of LeaseKey. v4 is the zero Prefix for an IPv6-only key
// (0.0.0.0-0&<ipv6>-<len>); 0.0.0.0-0 alone is an IPv4 key like any other (and no valid
// lease: it covers every address).
func ParseLeaseKey(prefix, dir, key string) (v4, v6 netip.Prefix, err error) {
	v4Key, v6Part, dual := strings.Cut(key, "&")
	if v4, err = ParsePoolKey(prefix, dir, v4Key); err != nil {
		return netip.Prefix{}, netip.Prefix{}, err
	}
	if !dual {
		return v4, netip.Prefix{}, nil
	}
	addr, bits, ok := strings.Cut(v6Part, "-")
	if !ok {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("key %q: IPv6 part %q: want <ipv6>-<len>, e.g. fc00:0:0:5::-64", key, v6Part)
	}
	ip, err := netip.ParseAddr(addr)
	if err != nil || !isIPv6(ip) {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("key %q: %q is not an IPv6 address", key, addr)
	}
	// One spelling per subnet (RFC 5952's, which flannel writes too), so a key and the lease
	// it names map one to one: LeaseKey(ParseLeaseKey(k)) == k.
	if ip.String() != addr {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("key %q: write the IPv6 address as %s", key, ip)
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 0 || n > 128 || strconv.Itoa(n) != bits {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("key %q: %q is not a prefix length 0-128", key, bits)
	}
	v6 = netip.PrefixFrom(ip, n)
	if v6.Masked() != v6 {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("key %q: %s has host bits set", key, v6)
	}
	if v4 == noIPv4Subnet {
		v4 = netip.Prefix{}
	}
	return v4, v6, nil
}

// PoolPrefix is the key prefix of every lease of the pool in dir: <prefix>/<dir>/.
func PoolPrefix(prefix, dir string) string {
	return strings.TrimSuffix(prefix, "/") + "/" + strings.Trim(dir, "/") + "/"
}

// PoolKey is the etcd key of the lease on r in the pool in dir: <prefix>/<dir>/<a.b.c.d>-<len>,
// the same form flannel uses for subnets, so every pool reads the same in etcdctl.
func PoolKey(prefix, dir string, r netip.Prefix) string {
	return PoolPrefix(prefix, dir) + r.Addr().String() + "-" + strconv.Itoa(r.Bits())
}

// ParsePoolKey is the inverse of PoolKey, with ParseSubnetKey's rules.
func ParsePoolKey(prefix, dir, key string) (netip.Prefix, error) {
	name, ok := strings.CutPrefix(key, PoolPrefix(prefix, dir))
	if !ok {
		return netip.Prefix{}, fmt.Errorf("key %q is not under %s", key, PoolPrefix(prefix, dir))
	}
	addr, bits, ok := strings.Cut(name, "-")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("key %q: want <a.b.c.d>-<len>, e.g. 10.244.5.0-24", key)
	}
	ip, err := netip.ParseAddr(addr)
	if err != nil || !ip.Is4() {
		return netip.Prefix{}, fmt.Errorf("key %q: %q is not an IPv4 address", key, addr)
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 0 || n > 32 || strconv.Itoa(n) != bits {
		return netip.Prefix{}, fmt.Errorf("key %q: %q is not a prefix length 0-32", key, bits)
	}
	p := netip.PrefixFrom(ip, n)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("key %q: %s has host bits set", key, p)
	}
	return p, nil
}

// leaseJSON is flannel's LeaseAttrs on the wire, the IPv6 fields as flannel's dual stack
// writes them (absent on an IPv4-only host).
type leaseJSON struct {
	PublicIP      string
	PublicIPv6    string          `json:",omitempty"`
	BackendType   string          `json:",omitempty"`
	BackendData   json.RawMessage `json:",omitempty"`
	BackendV6Data json.RawMessage `json:",omitempty"`
}

// EncodeLeaseValue is the JSON stored under a lease key, exactly as flannel writes it:
// {"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"..."}}.
func EncodeLeaseValue(attrs LeaseAttrs) ([]byte, error) {
	if !attrs.PublicIP.Is4() {
		return nil, fmt.Errorf("lease PublicIP %v: must be an IPv4 address", attrs.PublicIP)
	}
	v := leaseJSON{PublicIP: attrs.PublicIP.String(), BackendType: attrs.BackendType}
	if attrs.PublicIPv6.IsValid() {
		if !isIPv6(attrs.PublicIPv6) {
			return nil, fmt.Errorf("lease PublicIPv6 %v: must be an IPv6 address", attrs.PublicIPv6)
		}
		v.PublicIPv6 = attrs.PublicIPv6.String()
	}
	var err error
	if v.BackendData, err = compactJSON("BackendData", attrs.BackendData); err != nil {
		return nil, err
	}
	if v.BackendV6Data, err = compactJSON("BackendV6Data", attrs.BackendV6Data); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// DecodeLeaseValue parses the JSON under a lease key (ours or flannel's).
func DecodeLeaseValue(data []byte) (LeaseAttrs, error) {
	var v leaseJSON
	if err := json.Unmarshal(data, &v); err != nil {
		return LeaseAttrs{}, fmt.Errorf("lease value %.80q: not flannel lease JSON: %w", data, err)
	}
	ip, err := netip.ParseAddr(v.PublicIP)
	if err != nil || !ip.Is4() {
		return LeaseAttrs{}, fmt.Errorf("lease value %.80q: PublicIP %q is not an IPv4 address", data, v.PublicIP)
	}
	attrs := LeaseAttrs{PublicIP: ip, BackendType: v.BackendType}
	if v.PublicIPv6 != "" {
		ip6, err := netip.ParseAddr(v.PublicIPv6)
		if err != nil || !isIPv6(ip6) {
			return LeaseAttrs{}, fmt.Errorf("lease value %.80q: PublicIPv6 %q is not an IPv6 address", data, v.PublicIPv6)
		}
		attrs.PublicIPv6 = ip6
	}
	if len(v.BackendData) > 0 {
		attrs.BackendData = append(json.RawMessage(nil), v.BackendData...)
	}
	if len(v.BackendV6Data) > 0 {
		attrs.BackendV6Data = append(json.RawMessage(nil), v.BackendV6Data...)
	}
	return attrs, nil
}

// compactJSON checks and compacts an optional JSON field of a lease; empty stays empty.
func compactJSON(field string, d json.RawMessage) (json.RawMessage, error) {
	if len(d) == 0 {
		return nil, nil
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, d); err != nil {
		return nil, fmt.Errorf("lease %s %q: not valid JSON: %w", field, d, err)
	}
	return compact.Bytes(), nil
}

// isIPv6 says whether a is a plain IPv6 address (no IPv4-mapped form, no zone).
func isIPv6(a netip.Addr) bool { return a.Is6() && !a.Is4In6() && a.Zone() == "" }

// sameAttrs says whether two leases publish the same thing (what a peer programs).
func sameAttrs(a, b Lease) bool {
	return a.PublicIP == b.PublicIP && a.BackendType == b.BackendType &&
		bytes.Equal(normJSON(a.BackendData), normJSON(b.BackendData)) &&
		a.IPv6Subnet == b.IPv6Subnet && a.PublicIPv6 == b.PublicIPv6 &&
		bytes.Equal(normJSON(a.BackendV6Data), normJSON(b.BackendV6Data))
}

// Attrs is what l publishes, as the LeaseAttrs it was written from.
func (l Lease) Attrs() LeaseAttrs {
	return LeaseAttrs{PublicIP: l.PublicIP, BackendType: l.BackendType, BackendData: l.BackendData,
		PublicIPv6: l.PublicIPv6, BackendV6Data: l.BackendV6Data}
}

// setAttrs copies what attrs publishes into l.
func (l *Lease) setAttrs(a LeaseAttrs) {
	l.PublicIP, l.BackendType, l.BackendData = a.PublicIP, a.BackendType, a.BackendData
	l.PublicIPv6, l.BackendV6Data = a.PublicIPv6, a.BackendV6Data
}

// normJSON makes "absent" and "null" BackendData equal, and ignores whitespace.
func normJSON(d json.RawMessage) []byte {
	t := bytes.TrimSpace(d)
	if len(t) == 0 || bytes.Equal(t, []byte("null")) {
		return nil
	}
	var b bytes.Buffer
	if json.Compact(&b, t) != nil {
		return t
	}
	return b.Bytes()
}

// GatewayOf is the first host address of subnet with its length (10.244.5.1/24): what
// Docker gets as --bip and what the subnet file calls the subnet. For an IPv6 subnet it is
// the address Docker gives its bridge in --fixed-cidr-v6 (fc00:0:0:5::1/64).
func GatewayOf(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Masked().Addr().Next(), subnet.Bits())
}
