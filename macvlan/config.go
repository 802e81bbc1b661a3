// Package macvlan leases each host one address range of the physical LAN for Docker's macvlan
// driver, and writes the `docker network create -d macvlan` arguments that use it.
//
// Docker's IPAM is per host: two hosts with the same macvlan network hand out the same
// addresses unless every container's --ip is picked by hand. Here each host takes one range of
// the LAN's subnet (the "Macvlan" section of <prefix>/config) under <prefix>/macvlan/, with the
// overlay's lease rules (package subnetmgr's Pool), and passes it to Docker as --ip-range, so
// two hosts' containers never collide.
//
// This package owns the "Macvlan" config section, the range lease under <prefix>/macvlan/ and
// the options file (/run/xnet/macvlan). It does not create Docker networks or interfaces
// (Docker does, from the options file), and it does not touch the overlay: the etcd engine,
// the key format and atomic file writes are subnetmgr's.
package macvlan

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// Design history. The first sketch checked a host's own LAN address against the config's
// whole [RangeMin, RangeMax] and refused to start: one host inside the span would have stopped
// the cluster. Now a config error is only what is wrong for every host (a range outside the
// subnet, one that covers the gateway, a range too small), and each leasing host skips ranges
// that cover its own addresses or the PublicIP of any host known to etcd (Pool.AvoidHosts).
// A host that comes up inside a range another host already holds cannot be fixed
// automatically; Acquire reports it as an error naming the fix.

// Config defaults and limits.
const (
	// DefaultName is the Docker network name when the config gives none.
	DefaultName = "xnet-macvlan"
	// DefaultRangeLen is the range length when the config gives none: 16 addresses per
	// host, 16 ranges in a /24. A subnet smaller than a /24 gets Subnet's length + 4, at
	// most /30.
	DefaultRangeLen = 28
	// maxRangeLen keeps at least four addresses per host: a /31 or /32 range is a typo.
	maxRangeLen = 30
	// Dir is the key directory of macvlan range leases: <prefix>/macvlan/<a.b.c.d>-<len>.
	Dir = "macvlan"
	// BackendType is what a macvlan range lease publishes as its BackendType.
	BackendType = "macvlan"
)

// Config is the "Macvlan" section of <prefix>/config, validated, with defaults filled in.
type Config struct {
	// Subnet is the LAN the containers join (Docker's --subnet).
	Subnet netip.Prefix
	// Gateway is the LAN's router (Docker's --gateway). Required: a wrong default would
	// cut containers off the world without an error.
	Gateway netip.Addr
	// RangeLen is the prefix length of each host's range (Docker's --ip-range).
	RangeLen int
	// RangeMin and RangeMax are the first addresses of the lowest and the highest range
	// handed out. They default to the second and the second-to-last range of Subnet (the
	// first and last hold the network and broadcast addresses and, usually, the router).
	RangeMin, RangeMax netip.Addr
	// Name is the Docker network's name (default DefaultName).
	Name string
	// Parent is the host interface the macvlan interfaces hang off; "" means each host's
	// underlay interface (xnetd's --iface).
	Parent string
}

// sectionJSON is the wire form of the "Macvlan" section. Pointers tell a missing field
// (take the default) from a zero one.
type sectionJSON struct {
	Subnet   *string
	Gateway  *string
	RangeLen *int
	RangeMin *string
	RangeMax *string
	Name     *string
	Parent   *string
}

// configErr is a *subnetmgr.ConfigError on field Macvlan.<field>, so xnetd reports every
// config mistake the same way.
func configErr(field, format string, args ...any) error {
	return &subnetmgr.ConfigError{Field: "Macvlan." + field, Reason: fmt.Sprintf(format, args...)}
}

var (
	// dockerName is what Docker accepts as a network name, and what is safe in an env file.
	dockerName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)
	// ifaceName is a Linux interface name (IFNAMSIZ-1, no '/', ':' or whitespace).
	ifaceName = regexp.MustCompile(`^[a-zA-Z0-9_.@-]{1,15}$`)
)

// ParseConfig reads the "Macvlan" section of the whole <prefix>/config JSON. present is false
// (and err nil) when the section is absent or null. An invalid section is a
// *subnetmgr.ConfigError naming the field (Macvlan.RangeMin, ...) and the fix. The overlay's
// fields are subnetmgr.ParseConfig's; only Network is read here, to refuse a LAN subnet that
// overlaps the overlay.
func ParseConfig(data []byte) (cfg Config, present bool, err error) {
	var doc struct {
		Network *string
		Macvlan json.RawMessage
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return Config{}, false, &subnetmgr.ConfigError{Reason: fmt.Sprintf("not valid JSON (%v)", err)}
	}
	section := strings.TrimSpace(string(doc.Macvlan))
	if section == "" || section == "null" {
		return Config{}, false, nil
	}
	var raw sectionJSON
	if err := json.Unmarshal(doc.Macvlan, &raw); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return Config{}, true, configErr(typeErr.Field, "has the wrong JSON type (%s); expected a %s", typeErr.Value, typeErr.Type)
		}
		return Config{}, true, &subnetmgr.ConfigError{Field: "Macvlan", Reason: fmt.Sprintf(
			`must be an object like {"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":28}: %v`, err)}
	}
	var overlay netip.Prefix
	if doc.Network != nil {
		overlay, _ = netip.ParsePrefix(*doc.Network) // an invalid Network is subnetmgr's error
	}
	cfg, err = parseSection(raw, overlay)
	return cfg, true, err
}

func parseSection(raw sectionJSON, overlay netip.Prefix) (Config, error) {
	var cfg Config
	if raw.Subnet == nil || *raw.Subnet == "" {
		return Config{}, configErr("Subnet", `missing; set the LAN's IPv4 CIDR, e.g. "10.0.0.0/24"`)
	}
	subnet, err := netip.ParsePrefix(*raw.Subnet)
	if err != nil || !subnet.Addr().Is4() {
		return Config{}, configErr("Subnet", "%q is not an IPv4 CIDR; set the LAN's subnet, e.g. \"10.0.0.0/24\"", *raw.Subnet)
	}
	cfg.Subnet = subnet.Masked()
	if cfg.Subnet.Bits() > maxRangeLen-2 {
		return Config{}, configErr("Subnet", "%s is too small to split into ranges of at least 4 addresses: use a /%d or larger", cfg.Subnet, maxRangeLen-2)
	}
	if overlay.IsValid() && overlay.Masked().Overlaps(cfg.Subnet) {
		return Config{}, configErr("Subnet", "%s overlaps the overlay Network %s: containers could not tell the two apart; use the LAN's own subnet", cfg.Subnet, overlay.Masked())
	}

	if raw.Gateway == nil || *raw.Gateway == "" {
		return Config{}, configErr("Gateway", "missing; set the LAN router's address in %s, e.g. %q", cfg.Subnet, cfg.Subnet.Addr().Next().String())
	}
	gw, err := netip.ParseAddr(*raw.Gateway)
	if err != nil || !gw.Is4() {
		return Config{}, configErr("Gateway", "%q is not an IPv4 address; set the LAN router's address in %s", *raw.Gateway, cfg.Subnet)
	}
	if !cfg.Subnet.Contains(gw) || gw == cfg.Subnet.Addr() || gw == subnetmgr.LastAddr(cfg.Subnet) {
		return Config{}, configErr("Gateway", "%s is not a host address of Subnet %s; use one between %s and %s",
			gw, cfg.Subnet, cfg.Subnet.Addr().Next(), subnetmgr.LastAddr(cfg.Subnet).Prev())
	}
	cfg.Gateway = gw

	lo := cfg.Subnet.Bits() + 1
	switch {
	case raw.RangeLen == nil || *raw.RangeLen == 0:
		cfg.RangeLen = max(DefaultRangeLen, min(cfg.Subnet.Bits()+4, maxRangeLen))
	case *raw.RangeLen > maxRangeLen:
		return Config{}, configErr("RangeLen", "%d is too small a range (a /%d holds %d addresses per host); use %d to %d (%d gives each host 16 addresses)",
			*raw.RangeLen, *raw.RangeLen, 1<<(32-min(*raw.RangeLen, 32)), lo, maxRangeLen, DefaultRangeLen)
	case *raw.RangeLen < lo:
		return Config{}, configErr("RangeLen", "%d does not split Subnet %s into ranges; use %d to %d (%d gives each host 16 addresses)",
			*raw.RangeLen, cfg.Subnet, lo, maxRangeLen, DefaultRangeLen)
	default:
		cfg.RangeLen = *raw.RangeLen
	}

	first := netip.PrefixFrom(cfg.Subnet.Addr(), cfg.RangeLen)
	lastStart := netip.PrefixFrom(subnetmgr.LastAddr(cfg.Subnet), cfg.RangeLen).Masked().Addr()
	valid := fmt.Sprintf("a /%d boundary between %s and %s", cfg.RangeLen, first.Addr(), lastStart)
	parseBound := func(field string, val *string, def netip.Addr) (netip.Addr, error) {
		if val == nil || *val == "" {
			return def, nil
		}
		a, err := netip.ParseAddr(*val)
		if err != nil || !a.Is4() {
			return netip.Addr{}, configErr(field, "%q is not an IPv4 address; use %s", *val, valid)
		}
		if !cfg.Subnet.Contains(a) {
			return netip.Addr{}, configErr(field, "%s is outside Subnet %s; use %s", a, cfg.Subnet, valid)
		}
		if netip.PrefixFrom(a, cfg.RangeLen).Masked().Addr() != a {
			return netip.Addr{}, configErr(field, "%s is not on a /%d boundary; use %s (e.g. %s)",
				a, cfg.RangeLen, valid, netip.PrefixFrom(a, cfg.RangeLen).Masked().Addr())
		}
		return a, nil
	}
	if cfg.RangeMin, err = parseBound("RangeMin", raw.RangeMin, subnetmgr.LastAddr(first).Next()); err != nil {
		return Config{}, err
	}
	if cfg.RangeMax, err = parseBound("RangeMax", raw.RangeMax, netip.PrefixFrom(lastStart.Prev(), cfg.RangeLen).Masked().Addr()); err != nil {
		return Config{}, err
	}
	if cfg.RangeMax.Less(cfg.RangeMin) {
		if raw.RangeMin == nil && raw.RangeMax == nil {
			return Config{}, configErr("RangeLen", "%d leaves no range between the first and the last /%d of Subnet %s (the defaults of RangeMin and RangeMax); use %d to %d",
				cfg.RangeLen, cfg.RangeLen, cfg.Subnet, cfg.Subnet.Bits()+2, maxRangeLen)
		}
		return Config{}, configErr("RangeMax", "%s is below RangeMin %s; the ranges [RangeMin, RangeMax] must not be empty: set RangeMax to RangeMin or above",
			cfg.RangeMax, cfg.RangeMin)
	}
	if err := cfg.checkGatewayOutsideRanges(); err != nil {
		return Config{}, err
	}

	cfg.Name = DefaultName
	if raw.Name != nil && *raw.Name != "" {
		if !dockerName.MatchString(*raw.Name) {
			return Config{}, configErr("Name", "%q is not a Docker network name; use letters, digits, '_', '.', '-', starting with a letter or digit", *raw.Name)
		}
		cfg.Name = *raw.Name
	}
	if raw.Parent != nil && *raw.Parent != "" {
		if !ifaceName.MatchString(*raw.Parent) {
			return Config{}, configErr("Parent", "%q is not an interface name (1-15 characters, no '/', ':' or spaces); leave it out to use each host's --iface", *raw.Parent)
		}
		cfg.Parent = *raw.Parent
	}
	return cfg, nil
}

// checkGatewayOutsideRanges refuses bounds whose ranges cover the gateway: Docker would
// refuse the network on the host that got that range. The fix names the bound to move and
// the value that works.
func (c Config) checkGatewayOutsideRanges() error {
	if c.Gateway.Less(c.RangeMin) || subnetmgr.LastAddr(netip.PrefixFrom(c.RangeMax, c.RangeLen)).Less(c.Gateway) {
		return nil
	}
	gwRange := netip.PrefixFrom(c.Gateway, c.RangeLen).Masked()
	above := subnetmgr.LastAddr(gwRange).Next()
	below := netip.PrefixFrom(gwRange.Addr().Prev(), c.RangeLen).Masked().Addr()
	if gwRange.Addr() == c.RangeMin {
		return configErr("RangeMin", "the range %s covers Gateway %s; set RangeMin to %s (the next range) or move the gateway out of [RangeMin, RangeMax]",
			gwRange, c.Gateway, above)
	}
	return configErr("RangeMax", "the range %s covers Gateway %s; set RangeMax to %s (the range before it), or RangeMin to %s (the range after it), so that no range holds the gateway",
		gwRange, c.Gateway, below, above)
}

// Pool is the subnetmgr pool of this config's ranges. hostAddrs are the leasing host's own
// addresses: no range it takes may cover one of them, nor the gateway, nor the PublicIP of
// any host known to etcd.
func (c Config) Pool(hostAddrs ...netip.Addr) subnetmgr.Pool {
	avoid := append([]netip.Addr{c.Gateway}, hostAddrs...)
	return subnetmgr.Pool{
		Dir: Dir, Network: c.Subnet, Len: c.RangeLen, Min: c.RangeMin, Max: c.RangeMax,
		Avoid: avoid, AvoidHosts: true, WatchOwnKey: true,
		FullHint: "widen Macvlan.RangeMin/RangeMax, lengthen Macvlan.RangeLen for more, smaller ranges, or remove stale leases",
	}
}

// reserved says whether Docker's IPAM never hands out a (the subnet's network and broadcast
// addresses and the gateway).
func (c Config) reserved(a netip.Addr) bool {
	return a == c.Subnet.Addr() || a == subnetmgr.LastAddr(c.Subnet) || a == c.Gateway
}

// Addresses returns, in order, the first n addresses Docker's IPAM hands out from range r:
// the range's addresses from its first, without the subnet's network and broadcast addresses
// and the gateway. n <= 0 means all of them.
func (c Config) Addresses(r netip.Prefix, n int) []netip.Addr {
	var out []netip.Addr
	last := subnetmgr.LastAddr(r)
	for a := r.Masked().Addr(); ; a = a.Next() {
		if !c.reserved(a) {
			out = append(out, a)
			if n > 0 && len(out) == n {
				break
			}
		}
		if a == last {
			break
		}
	}
	return out
}
