package subnetmgr

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Config defaults and limits, as flannel has them.
const (
	defaultSubnetLen = 24
	defaultVNI       = 1
	defaultPort      = 8472
	// flannel's wireguard defaults.
	defaultWireGuardPort   = 51820
	defaultWireGuardPortV6 = 51821
	defaultWireGuardMode   = "separate"
	// minOverlayMTU is the smallest overlay MTU a config may lead to: every IPv4 host must
	// accept 576-byte datagrams.
	minOverlayMTU = 576
	// A network must hold at least four subnets (flannel's rule): the first is never handed
	// out, which leaves three hosts.
	minSubnetsPerNetwork = 4
	maxSubnetLen         = 30
	// flannel's IPv6 defaults and limits: a /64 per host (SLAAC-sized), at most a /126.
	defaultIPv6SubnetLen = 64
	maxIPv6SubnetLen     = 126
)

// WireGuardOverhead is what WireGuard adds to a packet as flannel counts it (outer IPv6 header
// 40, UDP 8, type 4, receiver index 4, counter 8, tag 16): the overlay MTU is the underlay MTU
// (or Backend.MTU) minus 80, whatever the underlay's family, as flannel's.
const WireGuardOverhead = 80

// validBackendTypes lists what Backend.Type may be, in the order error messages name them.
var validBackendTypes = []string{BackendEBPF, BackendVXLAN, BackendUDP, BackendHostGW, BackendWireGuard}

// validWireGuardModes are flannel's Mode values ("ipv6" only with EnableIPv6: peers publish a
// PublicIPv6 only in a dual-stack overlay).
var validWireGuardModes = []string{"separate", "auto", "ipv4", "ipv6"}

// ConfigError says which field of <prefix>/config is invalid and what would be valid.
type ConfigError struct {
	Field  string // "Network", "SubnetLen", "Backend.Type", ... or "" for the document itself
	Reason string
}

func (e *ConfigError) Error() string {
	if e.Field == "" {
		return "network config: " + e.Reason
	}
	return fmt.Sprintf("network config field %s: %s", e.Field, e.Reason)
}

func configErr(field, format string, args ...any) error {
	return &ConfigError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// configJSON is the wire form of <prefix>/config. Fields are strings or pointers so that a
// missing field (take the default) differs from a zero one; unknown fields are ignored.
type configJSON struct {
	Network       *string
	SubnetLen     *int
	SubnetMin     *string
	SubnetMax     *string
	EnableIPv4    *bool
	EnableIPv6    *bool
	IPv6Network   *string
	IPv6SubnetLen *int
	IPv6SubnetMin *string
	IPv6SubnetMax *string
	Backend       json.RawMessage
}

type backendJSON struct {
	Type *string
	VNI  *int
	Port *int
	// wireguard's, as flannel names them
	ListenPort                  *int
	ListenPortV6                *int
	PSK                         *string
	PersistentKeepaliveInterval *int64
	MTU                         *int
	Mode                        *string
	DirectRouting               *bool
}

// ParseConfig parses and validates <prefix>/config, filling in flannel's defaults. An invalid
// config is a *ConfigError naming the field and what would be valid.
func ParseConfig(data []byte) (Config, error) {
	var raw configJSON
	if err := json.Unmarshal(data, &raw); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" && !strings.HasPrefix(typeErr.Field, "Backend") {
			return Config{}, configErr(typeErr.Field, "has the wrong JSON type (%s); expected a %s", typeErr.Value, typeErr.Type)
		}
		return Config{}, configErr("", "not valid JSON (%v); expected an object like "+
			`{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`, err)
	}
	var cfg Config

	// flannel's defaults: EnableIPv4 true, EnableIPv6 false. Each family's fields are read
	// only when the family is on, so an IPv6-only config needs no Network (and one it has is
	// ignored, as flannel ignores it).
	cfg.EnableIPv4 = raw.EnableIPv4 == nil || *raw.EnableIPv4
	cfg.EnableIPv6 = raw.EnableIPv6 != nil && *raw.EnableIPv6
	if !cfg.EnableIPv4 && !cfg.EnableIPv6 {
		return Config{}, configErr("EnableIPv4", "and EnableIPv6 are both false, so the overlay has no address family; set EnableIPv4 true (the default), EnableIPv6 true, or both")
	}
	var err error
	if cfg.EnableIPv4 {
		if cfg.Network, cfg.SubnetLen, cfg.SubnetMin, cfg.SubnetMax, err = parseFamily(family4, raw.Network, raw.SubnetLen, raw.SubnetMin, raw.SubnetMax); err != nil {
			return Config{}, err
		}
	}
	if cfg.EnableIPv6 {
		if cfg.IPv6Network, cfg.IPv6SubnetLen, cfg.IPv6SubnetMin, cfg.IPv6SubnetMax, err = parseFamily(family6, raw.IPv6Network, raw.IPv6SubnetLen, raw.IPv6SubnetMin, raw.IPv6SubnetMax); err != nil {
			if !cfg.EnableIPv4 {
				var ce *ConfigError
				if errors.As(err, &ce) && ce.Field == "IPv6Network" {
					ce.Reason += " (EnableIPv4 is false: the IPv6-only overlay needs it)"
				}
			}
			return Config{}, err
		}
	}

	cfg.Backend, err = parseBackendConfig(raw.Backend)
	if err != nil {
		return Config{}, err
	}
	if cfg.Backend.Type == BackendWireGuard && cfg.Backend.WireGuard.Mode == "ipv6" && !cfg.EnableIPv6 {
		return Config{}, configErr("Backend.Mode", `"ipv6" reaches peers at their PublicIPv6, which hosts publish only in a dual-stack overlay: set EnableIPv6 and IPv6Network, or use one of separate, auto, ipv4`)
	}
	if cfg.Backend.Type == BackendWireGuard && cfg.Backend.WireGuard.Mode == "ipv4" && !cfg.EnableIPv4 {
		return Config{}, configErr("Backend.Mode", `"ipv4" reaches peers at their IPv4 PublicIP, which hosts do not publish in an IPv6-only overlay (EnableIPv4 false): use one of separate, auto, ipv6, or set EnableIPv4 true`)
	}
	return cfg, nil
}

// family names the config fields and limits of one address family.
type family struct {
	prefix       string // field name prefix: "" or "IPv6"
	v6           bool
	example      string
	defaultLen   int
	maxLen       int
	addrBits     int
	networkField string
}

var (
	family4 = family{prefix: "", example: "10.244.0.0/16", defaultLen: defaultSubnetLen, maxLen: maxSubnetLen, addrBits: 32, networkField: "Network"}
	family6 = family{prefix: "IPv6", v6: true, example: "fc00::/48", defaultLen: defaultIPv6SubnetLen, maxLen: maxIPv6SubnetLen, addrBits: 128, networkField: "IPv6Network"}
)

func (f family) name() string {
	if f.v6 {
		return "IPv6"
	}
	return "IPv4"
}

func (f family) is(a netip.Addr) bool { return a.IsValid() && a.Is6() == f.v6 && !a.Is4In6() }

// parseFamily validates one family's Network, SubnetLen, SubnetMin and SubnetMax (or their
// IPv6 twins) with flannel's rules and defaults.
func parseFamily(f family, rawNet *string, rawLen *int, rawMin, rawMax *string) (network netip.Prefix, subnetLen int, lo, hi netip.Addr, err error) {
	fail := func(e error) (netip.Prefix, int, netip.Addr, netip.Addr, error) {
		return netip.Prefix{}, 0, netip.Addr{}, netip.Addr{}, e
	}
	if rawNet == nil || *rawNet == "" {
		return fail(configErr(f.networkField, "missing; set an %s CIDR such as %q", f.name(), f.example))
	}
	network, err = netip.ParsePrefix(*rawNet)
	if err != nil || !f.is(network.Addr()) {
		return fail(configErr(f.networkField, "%q is not an %s CIDR; set one such as %q", *rawNet, f.name(), f.example))
	}
	// flannel masks the address (10.244.1.0/16 means 10.244.0.0/16); so do we.
	network = network.Masked()
	if maxNet := f.maxLen - 2; network.Bits() > maxNet {
		return fail(configErr(f.networkField, "%s is too small: it must hold at least %d subnets of /%d, so be /%d or larger",
			network, minSubnetsPerNetwork, f.maxLen, maxNet))
	}
	lenField, minField, maxField := f.prefix+"SubnetLen", f.prefix+"SubnetMin", f.prefix+"SubnetMax"
	switch {
	case rawLen == nil || *rawLen == 0:
		// flannel: the default length, unless the Network is too small for four, then a quarter.
		subnetLen = f.defaultLen
		if network.Bits() > f.defaultLen-2 {
			subnetLen = network.Bits() + 2
		}
	default:
		subnetLen = *rawLen
		lo := network.Bits() + 2
		if subnetLen < lo || subnetLen > f.maxLen {
			return fail(configErr(lenField, "%d does not fit %s %s: it must leave at least %d subnets, so be between %d and %d",
				subnetLen, f.networkField, network, minSubnetsPerNetwork, lo, f.maxLen))
		}
	}
	first := network.Addr()
	second, _ := NextSubnet(first, subnetLen)
	last := netip.PrefixFrom(LastAddr(network), subnetLen).Masked().Addr()
	validRange := fmt.Sprintf("a multiple of /%d between %s and %s", subnetLen, first, last)
	parseBound := func(field string, val *string, def netip.Addr) (netip.Addr, error) {
		if val == nil || *val == "" {
			return def, nil
		}
		a, err := netip.ParseAddr(*val)
		if err != nil || !f.is(a) {
			return netip.Addr{}, configErr(field, "%q is not an %s address; use %s", *val, f.name(), validRange)
		}
		if !network.Contains(a) {
			return netip.Addr{}, configErr(field, "%s is outside %s %s; use %s", a, f.networkField, network, validRange)
		}
		if netip.PrefixFrom(a, subnetLen).Masked().Addr() != a {
			return netip.Addr{}, configErr(field, "%s is not on a /%d boundary; use %s", a, subnetLen, validRange)
		}
		return a, nil
	}
	// The first subnet is skipped by default (flannel: 10.x.0.0 next to the network address
	// confuses tools), the last one is the default maximum.
	if lo, err = parseBound(minField, rawMin, second); err != nil {
		return fail(err)
	}
	if hi, err = parseBound(maxField, rawMax, last); err != nil {
		return fail(err)
	}
	if hi.Less(lo) {
		return fail(configErr(maxField, "%s is below %s %s; the range [%s, %s] must not be empty",
			hi, minField, lo, minField, maxField))
	}
	return network, subnetLen, lo, hi, nil
}

func parseBackendConfig(data json.RawMessage) (BackendConfig, error) {
	b := BackendConfig{Type: BackendEBPF, VNI: defaultVNI, Port: defaultPort, WireGuard: WireGuardConfig{
		ListenPort: defaultWireGuardPort, ListenPortV6: defaultWireGuardPortV6, Mode: defaultWireGuardMode,
	}}
	if len(bytes.TrimSpace(data)) == 0 || bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		return b, nil
	}
	var raw backendJSON
	if err := json.Unmarshal(data, &raw); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return BackendConfig{}, configErr("Backend."+typeErr.Field, "has the wrong JSON type (%s); expected a %s", typeErr.Value, typeErr.Type)
		}
		return BackendConfig{}, configErr("Backend", `must be an object like {"Type":"ebpf","VNI":1,"Port":8472}: %v`, err)
	}
	if raw.Type != nil && *raw.Type != "" {
		b.Type = *raw.Type
		if !isValidBackendType(b.Type) {
			return BackendConfig{}, configErr("Backend.Type", "%q is not a known backend; use one of %s", b.Type, strings.Join(validBackendTypes, ", "))
		}
	}
	if raw.VNI != nil {
		// VNI 0 is a valid VXLAN network identifier and flannel accepts it; keep it.
		if *raw.VNI < 0 || *raw.VNI > 1<<24-1 {
			return BackendConfig{}, configErr("Backend.VNI", "%d is out of range; use 0 to %d (default %d)", *raw.VNI, 1<<24-1, defaultVNI)
		}
		b.VNI = *raw.VNI
	}
	if raw.Port != nil && *raw.Port != 0 { // flannel: Port 0 means the Linux default, 8472
		if *raw.Port < 1 || *raw.Port > 65535 {
			return BackendConfig{}, configErr("Backend.Port", "%d is out of range; use 1 to 65535 (default %d)", *raw.Port, defaultPort)
		}
		b.Port = *raw.Port
	}
	if raw.DirectRouting != nil {
		b.DirectRouting = *raw.DirectRouting
	}
	if err := parseWireGuard(&b.WireGuard, raw); err != nil {
		return BackendConfig{}, err
	}
	return b, nil
}

// parseWireGuard reads the wireguard fields into wg, which holds the defaults. They are checked
// whatever the Type, as Port is: a host may run --backend=wireguard with any config.
func parseWireGuard(wg *WireGuardConfig, raw backendJSON) error {
	port := func(field string, v *int, def int, dst *int) error {
		if v == nil || *v == 0 { // 0: the default, as for Port
			return nil
		}
		if *v < 1 || *v > 65535 {
			return configErr(field, "%d is out of range; use 1 to 65535 (default %d)", *v, def)
		}
		*dst = *v
		return nil
	}
	if err := port("Backend.ListenPort", raw.ListenPort, defaultWireGuardPort, &wg.ListenPort); err != nil {
		return err
	}
	if err := port("Backend.ListenPortV6", raw.ListenPortV6, defaultWireGuardPortV6, &wg.ListenPortV6); err != nil {
		return err
	}
	if raw.PSK != nil && *raw.PSK != "" {
		// The key itself is never repeated in the error: configs end up in logs.
		if k, err := base64.StdEncoding.DecodeString(*raw.PSK); err != nil || len(k) != wireGuardKeyLen {
			return configErr("Backend.PSK", "is not a WireGuard key: use the base64 of %d random bytes, as `wg genpsk` prints", wireGuardKeyLen)
		}
		wg.PSK = *raw.PSK
	}
	if v := raw.PersistentKeepaliveInterval; v != nil {
		// flannel multiplies the number by time.Second; WireGuard's field is 16 bits.
		if *v < 0 || *v > 65535 {
			return configErr("Backend.PersistentKeepaliveInterval", "%d is out of range; use 0 (off, the default) to 65535 seconds", *v)
		}
		wg.PersistentKeepaliveInterval = time.Duration(*v) * time.Second
	}
	if raw.MTU != nil && *raw.MTU != 0 {
		lo := minOverlayMTU + WireGuardOverhead
		if *raw.MTU < lo || *raw.MTU > 65535 {
			return configErr("Backend.MTU", "%d is out of range; use %d to 65535 (the underlay MTU; the overlay gets %d less), or 0 for the interface's", *raw.MTU, lo, WireGuardOverhead)
		}
		wg.MTU = *raw.MTU
	}
	if raw.Mode != nil && *raw.Mode != "" {
		if !slices.Contains(validWireGuardModes, *raw.Mode) {
			return configErr("Backend.Mode", "%q is not a wireguard mode; use one of %s (default %s)", *raw.Mode, strings.Join(validWireGuardModes, ", "), defaultWireGuardMode)
		}
		wg.Mode = *raw.Mode
	}
	return nil
}

func isValidBackendType(t string) bool {
	for _, v := range validBackendTypes {
		if t == v {
			return true
		}
	}
	return false
}

// ValidBackendTypes returns the accepted Backend.Type values, for flag help and errors.
func ValidBackendTypes() []string { return append([]string(nil), validBackendTypes...) }

func addrToU32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func u32ToAddr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
