package macvlan

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
)

const overlay = `"Network":"10.244.0.0/16",`

func TestParseConfigAcceptsAndFillsDefaults(t *testing.T) {
	cases := []struct {
		desc    string
		json    string
		present bool
		want    Config
	}{
		{"no Macvlan section: the host leases no range", `{` + overlay + `"Backend":{"Type":"vxlan"}}`, false, Config{}},
		{"a null section is no section", `{` + overlay + `"Macvlan":null}`, false, Config{}},
		{"the issue's example: Subnet and Gateway, /28 ranges by default, first and last range kept out",
			`{` + overlay + `"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254"}}`, true,
			Config{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), RangeLen: 28,
				RangeMin: addr("10.0.0.16"), RangeMax: addr("10.0.0.224"), Name: DefaultName}},
		{"every field given",
			`{` + overlay + `"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":27,"RangeMin":"10.0.0.64","RangeMax":"10.0.0.192","Name":"lan","Parent":"bond0.100"}}`, true,
			Config{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), RangeLen: 27,
				RangeMin: addr("10.0.0.64"), RangeMax: addr("10.0.0.192"), Name: "lan", Parent: "bond0.100"}},
		{"the test underlay: gateway .1, ranges from .32 keep hosts .11-.13 out",
			`{"Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":28,"RangeMin":"198.18.0.32"}}`, true,
			Config{Subnet: pfx("198.18.0.0/24"), Gateway: addr("198.18.0.1"), RangeLen: 28,
				RangeMin: addr("198.18.0.32"), RangeMax: addr("198.18.0.224"), Name: DefaultName}},
		{"a large LAN keeps 16-address ranges", `{"Macvlan":{"Subnet":"172.20.0.0/16","Gateway":"172.20.0.1"}}`, true,
			Config{Subnet: pfx("172.20.0.0/16"), Gateway: addr("172.20.0.1"), RangeLen: 28,
				RangeMin: addr("172.20.0.16"), RangeMax: addr("172.20.255.224"), Name: DefaultName}},
		{"a small LAN gets Subnet's length + 4", `{"Macvlan":{"Subnet":"192.168.1.0/26","Gateway":"192.168.1.1"}}`, true,
			Config{Subnet: pfx("192.168.1.0/26"), Gateway: addr("192.168.1.1"), RangeLen: 30,
				RangeMin: addr("192.168.1.4"), RangeMax: addr("192.168.1.56"), Name: DefaultName}},
		{"host bits in Subnet are masked, as flannel does for Network", `{"Macvlan":{"Subnet":"10.0.0.7/24","Gateway":"10.0.0.254"}}`, true,
			Config{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), RangeLen: 28,
				RangeMin: addr("10.0.0.16"), RangeMax: addr("10.0.0.224"), Name: DefaultName}},
		{"unknown fields are ignored", `{"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","Future":1}}`, true,
			Config{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), RangeLen: 28,
				RangeMin: addr("10.0.0.16"), RangeMax: addr("10.0.0.224"), Name: DefaultName}},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			got, present, err := ParseConfig([]byte(tc.json))
			if err != nil {
				t.Fatalf("ParseConfig(%s): %v", tc.json, err)
			}
			if present != tc.present || got != tc.want {
				t.Errorf("ParseConfig(%s)\n got %+v present=%v\nwant %+v present=%v", tc.json, got, present, tc.want, tc.present)
			}
		})
	}
}

func TestParseConfigRejectsWithFieldAndFix(t *testing.T) {
	cases := []struct {
		desc, section string
		field         string // the ConfigError's field
		fix           string // a piece of the reason that tells the operator what to do
	}{
		{"no Subnet", `{"Gateway":"10.0.0.254"}`, "Macvlan.Subnet", `e.g. "10.0.0.0/24"`},
		{"Subnet not a CIDR", `{"Subnet":"10.0.0.0","Gateway":"10.0.0.254"}`, "Macvlan.Subnet", "not an IPv4 CIDR"},
		{"IPv6 Subnet", `{"Subnet":"fd00::/64","Gateway":"fd00::1"}`, "Macvlan.Subnet", "not an IPv4 CIDR"},
		{"Subnet too small for ranges", `{"Subnet":"10.0.0.0/29","Gateway":"10.0.0.1"}`, "Macvlan.Subnet", "use a /28 or larger"},
		{"Subnet overlapping the overlay", `{"Subnet":"10.244.7.0/24","Gateway":"10.244.7.1"}`, "Macvlan.Subnet", "overlaps the overlay Network 10.244.0.0/16"},
		{"no Gateway", `{"Subnet":"10.0.0.0/24"}`, "Macvlan.Gateway", "set the LAN router's address"},
		{"Gateway outside Subnet", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.1.1"}`, "Macvlan.Gateway", "use one between 10.0.0.1 and 10.0.0.254"},
		{"Gateway is the broadcast address", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.255"}`, "Macvlan.Gateway", "not a host address"},
		{"RangeLen too small a range", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":31}`, "Macvlan.RangeLen", "too small a range"},
		{"RangeLen that does not split Subnet", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":24}`, "Macvlan.RangeLen", "use 25 to 30"},
		{"RangeLen of the wrong type", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":"28"}`, "Macvlan.RangeLen", "wrong JSON type"},
		{"RangeMin outside Subnet", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.1.0"}`, "Macvlan.RangeMin", "outside Subnet 10.0.0.0/24"},
		{"RangeMax outside Subnet", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMax":"192.168.0.0"}`, "Macvlan.RangeMax", "outside Subnet"},
		{"RangeMin off a range boundary", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.0.20"}`, "Macvlan.RangeMin", "e.g. 10.0.0.16"},
		{"RangeMax below RangeMin", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMin":"10.0.0.128","RangeMax":"10.0.0.64"}`, "Macvlan.RangeMax", "must not be empty"},
		{"the first range covers the gateway", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.1","RangeMin":"10.0.0.0"}`, "Macvlan.RangeMin", "set RangeMin to 10.0.0.16"},
		{"the default last range would cover a gateway at .254 moved into the span", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeMax":"10.0.0.240"}`, "Macvlan.RangeMax", "set RangeMax to 10.0.0.224"},
		{"a gateway in the middle of the ranges", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.100"}`, "Macvlan.RangeMax", "covers Gateway 10.0.0.100"},
		{"a Docker network name with a space", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","Name":"my lan"}`, "Macvlan.Name", "not a Docker network name"},
		{"a Parent that is no interface name", `{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","Parent":"eth0; rm -rf /"}`, "Macvlan.Parent", "not an interface name"},
		{"a section that is not an object", `[1,2]`, "Macvlan", "must be an object"},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			doc := `{` + overlay + `"Macvlan":` + tc.section + `}`
			_, present, err := ParseConfig([]byte(doc))
			var ce *subnetmgr.ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("ParseConfig(%s) = %v, want a *subnetmgr.ConfigError", doc, err)
			}
			if !present {
				t.Errorf("present = false for a section that is there")
			}
			if ce.Field != tc.field || !strings.Contains(ce.Reason, tc.fix) {
				t.Errorf("error %q\nwant field %s and a reason containing %q", err, tc.field, tc.fix)
			}
		})
	}
}

func TestAddressesAreDockersIPAMOrder(t *testing.T) {
	cfg, _, err := ParseConfig([]byte(`{"Macvlan":{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1","RangeLen":28,"RangeMin":"198.18.0.32"}}`))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		desc  string
		r     netip.Prefix
		n     int
		want  []netip.Addr
		count int // all addresses with n = 0
	}{
		{"a range inside the subnet starts at its own first address, as Docker hands it out",
			pfx("198.18.0.32/28"), 3, []netip.Addr{addr("198.18.0.32"), addr("198.18.0.33"), addr("198.18.0.34")}, 16},
		{"the subnet's network address and the gateway are skipped",
			pfx("198.18.0.0/28"), 2, []netip.Addr{addr("198.18.0.2"), addr("198.18.0.3")}, 14},
		{"the subnet's broadcast address is skipped",
			pfx("198.18.0.240/28"), 0, nil, 15},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			if tc.want != nil {
				if got := cfg.Addresses(tc.r, tc.n); !slices.Equal(got, tc.want) {
					t.Errorf("Addresses(%v, %d) = %v, want %v", tc.r, tc.n, got, tc.want)
				}
			}
			all := cfg.Addresses(tc.r, 0)
			if len(all) != tc.count {
				t.Errorf("Addresses(%v, 0) has %d addresses, want %d", tc.r, len(all), tc.count)
			}
			for _, a := range all {
				if !tc.r.Contains(a) || a == cfg.Gateway || a == cfg.Subnet.Addr() || a == subnetmgr.LastAddr(cfg.Subnet) {
					t.Errorf("Addresses(%v) hands out %v", tc.r, a)
				}
			}
		})
	}
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }
