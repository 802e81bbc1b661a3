package subnetmgr

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// defaultWireGuard is what ParseConfig fills in when the Backend object has no wireguard field.
var defaultWireGuard = WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: "separate"}

// testPSK is a pre-shared key as `wg genpsk` prints one.
const testPSK = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="

func TestParseConfig(t *testing.T) {
	a := netip.MustParseAddr
	p := netip.MustParsePrefix
	valid := []struct {
		desc string
		json string
		want Config
	}{
		{"a /16 gets /24s from the second to the last, ebpf with VNI 1 on 8472",
			`{"Network":"10.244.0.0/16"}`,
			Config{Network: p("10.244.0.0/16"), SubnetLen: 24, SubnetMin: a("10.244.1.0"), SubnetMax: a("10.244.255.0"),
				Backend: BackendConfig{Type: "ebpf", VNI: 1, Port: 8472}}},
		{"a /22 still gets /24s",
			`{"Network":"10.0.0.0/22"}`,
			Config{Network: p("10.0.0.0/22"), SubnetLen: 24, SubnetMin: a("10.0.1.0"), SubnetMax: a("10.0.3.0"),
				Backend: BackendConfig{Type: "ebpf", VNI: 1, Port: 8472}}},
		{"a network smaller than /22 is split in four",
			`{"Network":"10.0.0.0/24"}`,
			Config{Network: p("10.0.0.0/24"), SubnetLen: 26, SubnetMin: a("10.0.0.64"), SubnetMax: a("10.0.0.192"),
				Backend: BackendConfig{Type: "ebpf", VNI: 1, Port: 8472}}},
		{"the documented full config, every field given",
			`{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.254.0","Backend":{"Type":"ebpf","VNI":1,"Port":8472}}`,
			Config{Network: p("10.244.0.0/16"), SubnetLen: 24, SubnetMin: a("10.244.1.0"), SubnetMax: a("10.244.254.0"),
				Backend: BackendConfig{Type: "ebpf", VNI: 1, Port: 8472}}},
		{"flannel's vxlan config with its own fields, unknown ones ignored",
			`{"Network":"10.1.0.0/16","SubnetLen":25,"EnableIPv6":false,"Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"DirectRouting":true,"GBP":false}}`,
			Config{Network: p("10.1.0.0/16"), SubnetLen: 25, SubnetMin: a("10.1.0.128"), SubnetMax: a("10.1.255.128"),
				Backend: BackendConfig{Type: "vxlan", VNI: 4096, Port: 4789, DirectRouting: true}}},
		{"host-gw, Port 0 means the default port",
			`{"Network":"172.16.0.0/12","Backend":{"Type":"host-gw","Port":0}}`,
			Config{Network: p("172.16.0.0/12"), SubnetLen: 24, SubnetMin: a("172.16.1.0"), SubnetMax: a("172.31.255.0"),
				Backend: BackendConfig{Type: "host-gw", VNI: 1, Port: 8472}}},
		{"wireguard with flannel's defaults: port 51820, no PSK, no keepalive, the interface's MTU, separate",
			`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}`,
			Config{Network: p("10.244.0.0/16"), SubnetLen: 24, SubnetMin: a("10.244.1.0"), SubnetMax: a("10.244.255.0"),
				Backend: BackendConfig{Type: "wireguard", VNI: 1, Port: 8472, WireGuard: defaultWireGuard}}},
		{"wireguard as flannel's documentation configures it, every field given",
			`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":51000,"ListenPortV6":51001,` +
				`"PSK":"` + testPSK + `","PersistentKeepaliveInterval":25,"MTU":1400,"Mode":"auto"}}`,
			Config{Network: p("10.244.0.0/16"), SubnetLen: 24, SubnetMin: a("10.244.1.0"), SubnetMax: a("10.244.255.0"),
				Backend: BackendConfig{Type: "wireguard", VNI: 1, Port: 8472, WireGuard: WireGuardConfig{
					ListenPort: 51000, ListenPortV6: 51001, PSK: testPSK, PersistentKeepaliveInterval: 25 * time.Second, MTU: 1400, Mode: "auto"}}}},
		{"wireguard, zeros mean the defaults as for Port",
			`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":0,"MTU":0,"PSK":"","Mode":"","PersistentKeepaliveInterval":0}}`,
			Config{Network: p("10.244.0.0/16"), SubnetLen: 24, SubnetMin: a("10.244.1.0"), SubnetMax: a("10.244.255.0"),
				Backend: BackendConfig{Type: "wireguard", VNI: 1, Port: 8472, WireGuard: defaultWireGuard}}},
		{"udp, and a Network written with host bits is masked as flannel does",
			`{"Network":"10.5.3.0/16","Backend":{"Type":"udp"}}`,
			Config{Network: p("10.5.0.0/16"), SubnetLen: 24, SubnetMin: a("10.5.1.0"), SubnetMax: a("10.5.255.0"),
				Backend: BackendConfig{Type: "udp", VNI: 1, Port: 8472}}},
	}
	for _, tc := range valid {
		t.Run(tc.desc, func(t *testing.T) {
			if tc.want.Backend.WireGuard == (WireGuardConfig{}) {
				tc.want.Backend.WireGuard = defaultWireGuard // a case about other fields
			}
			tc.want.EnableIPv4 = true // flannel's default; every case here is an IPv4 overlay
			got, err := ParseConfig([]byte(tc.json))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if got != tc.want {
				t.Errorf("ParseConfig:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}

	invalid := []struct {
		desc  string
		json  string
		field string   // ConfigError.Field
		say   []string // substrings of the message: the bad value and what would be valid
	}{
		{"malformed JSON", `{"Network":"10.244.0.0/16"`, "", []string{"not valid JSON", `"Network"`}},
		{"not an object", `"10.244.0.0/16"`, "", []string{"not valid JSON"}},
		{"no Network", `{"SubnetLen":24}`, "Network", []string{"missing", "10.244.0.0/16"}},
		{"Network not a CIDR", `{"Network":"10.244.0.0"}`, "Network", []string{`"10.244.0.0"`, "IPv4 CIDR"}},
		{"Network IPv6", `{"Network":"fd00::/64"}`, "Network", []string{"IPv4 CIDR"}},
		{"Network too small", `{"Network":"10.0.0.0/29"}`, "Network", []string{"10.0.0.0/29", "/28 or larger"}},
		{"Network smaller than SubnetLen", `{"Network":"10.244.0.0/16","SubnetLen":8}`, "SubnetLen",
			[]string{"8", "10.244.0.0/16", "between 18 and 30"}},
		{"Network that leaves fewer than 4 subnets", `{"Network":"10.244.0.0/16","SubnetLen":17}`, "SubnetLen",
			[]string{"17", "between 18 and 30"}},
		{"SubnetLen too long", `{"Network":"10.244.0.0/16","SubnetLen":31}`, "SubnetLen", []string{"31", "between 18 and 30"}},
		{"SubnetLen a string", `{"Network":"10.244.0.0/16","SubnetLen":"24"}`, "SubnetLen", []string{"wrong JSON type", "int"}},
		{"SubnetMin outside Network", `{"Network":"10.244.0.0/16","SubnetMin":"10.245.1.0"}`, "SubnetMin",
			[]string{"10.245.1.0", "outside Network 10.244.0.0/16", "between 10.244.0.0 and 10.244.255.0"}},
		{"SubnetMin not an address", `{"Network":"10.244.0.0/16","SubnetMin":"ten"}`, "SubnetMin", []string{`"ten"`}},
		{"SubnetMin off the subnet boundary", `{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.7"}`, "SubnetMin",
			[]string{"10.244.1.7", "/24 boundary"}},
		{"SubnetMax outside Network", `{"Network":"10.244.0.0/16","SubnetMax":"11.0.0.0"}`, "SubnetMax",
			[]string{"11.0.0.0", "outside Network"}},
		{"SubnetMax below SubnetMin", `{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}`, "SubnetMax",
			[]string{"10.244.3.0", "below SubnetMin 10.244.9.0"}},
		{"unknown Backend.Type names the valid ones", `{"Network":"10.244.0.0/16","Backend":{"Type":"hostgw"}}`, "Backend.Type",
			[]string{`"hostgw"`, "ebpf, vxlan, udp, host-gw"}},
		{"flannel's ipip is not ours", `{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}`, "Backend.Type", []string{`"ipip"`}},
		{"Backend not an object", `{"Network":"10.244.0.0/16","Backend":"vxlan"}`, "Backend", []string{"object"}},
		{"VNI out of range", `{"Network":"10.244.0.0/16","Backend":{"VNI":16777216}}`, "Backend.VNI", []string{"16777216", "0 to 16777215"}},
		{"VNI a string", `{"Network":"10.244.0.0/16","Backend":{"VNI":"1"}}`, "Backend.VNI", []string{"wrong JSON type"}},
		{"Port out of range", `{"Network":"10.244.0.0/16","Backend":{"Port":70000}}`, "Backend.Port", []string{"70000", "1 to 65535"}},
		{"wireguard ListenPort out of range", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":65536}}`,
			"Backend.ListenPort", []string{"65536", "1 to 65535", "51820"}},
		{"wireguard ListenPortV6 negative", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPortV6":-1}}`,
			"Backend.ListenPortV6", []string{"-1", "1 to 65535"}},
		{"wireguard PSK not base64, and the value is not repeated", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"s3cr3t!"}}`,
			"Backend.PSK", []string{"base64 of 32"}},
		{"wireguard PSK of the wrong length", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"c2hvcnQ="}}`,
			"Backend.PSK", []string{"not a WireGuard key"}},
		{"wireguard keepalive as a duration string, which flannel does not read either",
			`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":"25s"}}`,
			"Backend.PersistentKeepaliveInterval", []string{"wrong JSON type"}},
		{"wireguard keepalive negative", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":-5}}`,
			"Backend.PersistentKeepaliveInterval", []string{"-5", "65535 seconds"}},
		{"wireguard MTU too small for an overlay", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","MTU":600}}`,
			"Backend.MTU", []string{"600", "656 to 65535"}},
		{"wireguard Mode ipv6 on an IPv4 overlay", `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}`,
			"Backend.Mode", []string{`"ipv6"`, "separate, auto, ipv4"}},
		{"DirectRouting a string", `{"Network":"10.244.0.0/16","Backend":{"DirectRouting":"true"}}`, "Backend.DirectRouting", []string{"wrong JSON type", "bool"}},
	}
	for _, tc := range invalid {
		t.Run(tc.desc, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.json))
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("ParseConfig(%s) = %v, want a *ConfigError", tc.json, err)
			}
			if ce.Field != tc.field {
				t.Errorf("field = %q, want %q (error: %v)", ce.Field, tc.field, err)
			}
			if tc.field != "" && !strings.Contains(err.Error(), "field "+tc.field+":") {
				t.Errorf("error %q does not name field %s", err, tc.field)
			}
			if strings.Contains(tc.json, `"PSK"`) && strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error %q repeats the PSK", err)
			}
			for _, s := range tc.say {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

// wireguard's Mode "ipv6" (peers reached at their PublicIPv6) is taken with EnableIPv6 only:
// hosts publish a PublicIPv6 only in a dual-stack overlay.
func TestParseConfigWireGuardModeIPv6(t *testing.T) {
	cfg, err := ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":"ipv6"}}`))
	if err != nil || cfg.Backend.WireGuard.Mode != "ipv6" {
		t.Fatalf("dual stack with Mode ipv6: %+v, %v; want it taken", cfg.Backend.WireGuard, err)
	}
	_, err = ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}`))
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.Field != "Backend.Mode" || !strings.Contains(err.Error(), "EnableIPv6") {
		t.Errorf("Mode ipv6 without EnableIPv6: %v; want a ConfigError on Backend.Mode naming EnableIPv6", err)
	}
}

// wireguard's Mode "ipv4" (peers reached at their IPv4 PublicIP) is refused in an IPv6-only
// overlay, where hosts publish PublicIP 0.0.0.0; the other modes are taken there.
func TestParseConfigWireGuardModeIPv4IPv6Only(t *testing.T) {
	const v6only = `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":%q}}`
	for _, mode := range []string{"", "separate", "auto", "ipv6"} {
		if _, err := ParseConfig(fmt.Appendf(nil, v6only, mode)); err != nil {
			t.Errorf("IPv6 only with Mode %q: %v; want it taken", mode, err)
		}
	}
	_, err := ParseConfig(fmt.Appendf(nil, v6only, "ipv4"))
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.Field != "Backend.Mode" || !strings.Contains(err.Error(), "EnableIPv4") {
		t.Errorf("Mode ipv4 in an IPv6-only overlay: %v; want a ConfigError on Backend.Mode naming EnableIPv4", err)
	}
}
