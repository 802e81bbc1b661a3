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

// ParseSubnetKey is the inverse of SubnetKey. It refuses anything flannel would not have
// written: a non-IPv4 address, a length out of 0..32, or host bits set.
func ParseSubnetKey(prefix, key string) (netip.Prefix, error) {
	return ParsePoolKey(prefix, SubnetsDir, key)
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

// leaseJSON is flannel's LeaseAttrs on the wire. Fields flannel may add (PublicIPv6,
// BackendV6Data) are ignored on read and never written.
type leaseJSON struct {
	PublicIP    string
	BackendType string          `json:",omitempty"`
	BackendData json.RawMessage `json:",omitempty"`
}

// EncodeLeaseValue is the JSON stored under a lease key, exactly as flannel writes it:
// {"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"..."}}.
func EncodeLeaseValue(attrs LeaseAttrs) ([]byte, error) {
	if !attrs.PublicIP.Is4() {
		return nil, fmt.Errorf("lease PublicIP %v: must be an IPv4 address", attrs.PublicIP)
	}
	v := leaseJSON{PublicIP: attrs.PublicIP.String(), BackendType: attrs.BackendType}
	if len(attrs.BackendData) > 0 {
		var compact bytes.Buffer
		if err := json.Compact(&compact, attrs.BackendData); err != nil {
			return nil, fmt.Errorf("lease BackendData %q: not valid JSON: %w", attrs.BackendData, err)
		}
		v.BackendData = compact.Bytes()
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
	if len(v.BackendData) > 0 {
		attrs.BackendData = append(json.RawMessage(nil), v.BackendData...)
	}
	return attrs, nil
}

// sameAttrs says whether two leases publish the same thing (what a peer programs).
func sameAttrs(a, b Lease) bool {
	return a.PublicIP == b.PublicIP && a.BackendType == b.BackendType &&
		bytes.Equal(normJSON(a.BackendData), normJSON(b.BackendData))
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
// Docker gets as --bip and what the subnet file calls the subnet.
func GatewayOf(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Masked().Addr().Next(), subnet.Bits())
}
