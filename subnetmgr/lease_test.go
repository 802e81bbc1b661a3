package subnetmgr

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

func TestSubnetKey(t *testing.T) {
	const prefix = "/coreos.com/network"
	subnet := netip.MustParsePrefix("10.244.5.0/24")
	key := SubnetKey(prefix, subnet)
	if key != "/coreos.com/network/subnets/10.244.5.0-24" {
		t.Errorf("SubnetKey = %q", key)
	}
	if SubnetKey(prefix+"/", subnet) != key {
		t.Errorf("a trailing slash on the prefix changes the key: %q", SubnetKey(prefix+"/", subnet))
	}
	if got, err := ParseSubnetKey(prefix, key); err != nil || got != subnet {
		t.Errorf("ParseSubnetKey(%q) = %v, %v; want %v", key, got, err, subnet)
	}
	bad := []struct{ desc, key string }{
		{"a foreign key under the prefix", prefix + "/subnets/garbage"},
		{"not under subnets/", prefix + "/config"},
		{"another prefix", "/atomic.io/network/subnets/10.244.5.0-24"},
		{"IPv6 (flannel's v6 leases live elsewhere)", prefix + "/subnets/fd00::-64"},
		{"length out of range", prefix + "/subnets/10.244.5.0-33"},
		{"length not a number", prefix + "/subnets/10.244.5.0-x"},
		{"length with a sign", prefix + "/subnets/10.244.5.0-+24"},
		{"host bits set", prefix + "/subnets/10.244.5.1-24"},
		{"a nested key", prefix + "/subnets/10.244.5.0-24/extra"},
	}
	for _, tc := range bad {
		if got, err := ParseSubnetKey(prefix, tc.key); err == nil {
			t.Errorf("%s: ParseSubnetKey(%q) = %v, want an error", tc.desc, tc.key, got)
		}
	}
}

// flannelLeaseFixtures are lease values as flannel writes them (its documented format, and
// the fields newer versions add).
var flannelLeaseFixtures = []struct {
	desc, value string
	want        LeaseAttrs
}{
	{"vxlan, as in flannel's docs",
		`{"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0b"}}`,
		LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan",
			BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0b"}`)}},
	{"a newer flannel with IPv6 fields set to null",
		`{"PublicIP":"198.18.0.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0c"},"BackendV6Data":null}`,
		LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.12"), BackendType: "vxlan",
			BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0c"}`)}},
	{"wireguard, as flannel v0.28 writes it (json.Marshal of its LeaseAttrs and wireguardLeaseAttrs)",
		`{"PublicIP":"198.18.0.15","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelWGPublicKey + `","Port":51820}}`,
		LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.15"), BackendType: "wireguard",
			BackendData: json.RawMessage(`{"PublicKey":"` + flannelWGPublicKey + `","Port":51820}`)}},
	{"host-gw without BackendData",
		`{"PublicIP":"198.18.0.13","BackendType":"host-gw"}`,
		LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.13"), BackendType: "host-gw"}},
	{"an operator's reservation, PublicIP only",
		`{"PublicIP":"198.18.0.14"}`,
		LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.14")}},
}

func TestLeaseValueFlannelFormat(t *testing.T) {
	for _, tc := range flannelLeaseFixtures {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := DecodeLeaseValue([]byte(tc.value))
			if err != nil {
				t.Fatalf("DecodeLeaseValue: %v", err)
			}
			if !sameAttrs(Lease{PublicIP: got.PublicIP, BackendType: got.BackendType, BackendData: got.BackendData},
				Lease{PublicIP: tc.want.PublicIP, BackendType: tc.want.BackendType, BackendData: tc.want.BackendData}) {
				t.Errorf("decoded %+v, want %+v", got, tc.want)
			}
			// What we write parses back to the same thing.
			enc, err := EncodeLeaseValue(got)
			if err != nil {
				t.Fatalf("EncodeLeaseValue: %v", err)
			}
			again, err := DecodeLeaseValue(enc)
			if err != nil || again.PublicIP != got.PublicIP || again.BackendType != got.BackendType ||
				string(again.BackendData) != string(got.BackendData) {
				t.Errorf("round trip of %s gave %+v (%v)", enc, again, err)
			}
		})
	}
	// Our own encoding is byte for byte flannel's.
	enc, err := EncodeLeaseValue(vxlanAttrs(netip.MustParseAddr("198.18.0.11")))
	if err != nil {
		t.Fatal(err)
	}
	if want := flannelLeaseFixtures[0].value; string(enc) != want {
		t.Errorf("EncodeLeaseValue:\n got %s\nwant %s", enc, want)
	}
	pretty := LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan",
		BackendData: json.RawMessage("{\n  \"VNI\": 1,\n  \"VtepMAC\": \"0e:78:c6:12:00:0b\"\n}")}
	if enc, _ := EncodeLeaseValue(pretty); string(enc) != flannelLeaseFixtures[0].value {
		t.Errorf("indented BackendData is not compacted: %s", enc)
	}
}

func TestLeaseValueMalformed(t *testing.T) {
	for _, tc := range []struct{ desc, value, say string }{
		{"not JSON", `{"PublicIP":`, "not flannel lease JSON"},
		{"a JSON string", `"198.18.0.11"`, "not flannel lease JSON"},
		{"no PublicIP", `{"BackendType":"vxlan"}`, "PublicIP"},
		{"PublicIP not an address", `{"PublicIP":"host-a"}`, `"host-a"`},
		{"PublicIP IPv6", `{"PublicIP":"fd00::1"}`, "IPv4"},
	} {
		_, err := DecodeLeaseValue([]byte(tc.value))
		if err == nil || !strings.Contains(err.Error(), tc.say) {
			t.Errorf("%s: DecodeLeaseValue(%s) = %v, want an error saying %q", tc.desc, tc.value, err, tc.say)
		}
	}
	if _, err := EncodeLeaseValue(LeaseAttrs{}); err == nil {
		t.Error("EncodeLeaseValue without PublicIP: no error")
	}
	if _, err := EncodeLeaseValue(LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendData: json.RawMessage("{")}); err == nil {
		t.Error("EncodeLeaseValue with broken BackendData: no error")
	}
}

// flannelWGPublicKey is a public key as `wg pubkey` prints one.
const flannelWGPublicKey = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="

func TestParseWireGuardData(t *testing.T) {
	for _, tc := range []struct {
		desc, data string
		want       WireGuardData
	}{
		{"flannel's", `{"PublicKey":"` + flannelWGPublicKey + `","Port":51820}`, WireGuardData{flannelWGPublicKey, 51820}},
		{"flannel before v0.22, without Port", `{"PublicKey":"` + flannelWGPublicKey + `"}`, WireGuardData{flannelWGPublicKey, 0}},
	} {
		got, err := ParseWireGuardData(json.RawMessage(tc.data))
		if err != nil || got != tc.want {
			t.Errorf("%s: ParseWireGuardData(%s) = %+v, %v; want %+v", tc.desc, tc.data, got, err, tc.want)
		}
	}
	// What we write is byte for byte what flannel's json.Marshal(&wireguardLeaseAttrs{...}) writes.
	enc, err := json.Marshal(WireGuardData{PublicKey: flannelWGPublicKey, Port: 51820})
	if want := `{"PublicKey":"` + flannelWGPublicKey + `","Port":51820}`; err != nil || string(enc) != want {
		t.Errorf("json.Marshal(WireGuardData) = %s, %v; want %s", enc, err, want)
	}
	for _, tc := range []struct{ desc, data, say string }{
		{"missing", ``, "empty"},
		{"null", `null`, "empty"},
		{"not JSON", `{"PublicKey":`, "BackendData"},
		{"no key", `{"Port":51820}`, "not a WireGuard key"},
		{"a key too short", `{"PublicKey":"c2hvcnQ=","Port":51820}`, "not a WireGuard key"},
		{"a port beyond 16 bits, which flannel cannot decode either", `{"PublicKey":"` + flannelWGPublicKey + `","Port":70000}`, "BackendData"},
		{"vxlan's data", `{"VNI":1,"VtepMAC":"0e:78:c6:12:00:0b"}`, "not a WireGuard key"},
	} {
		if _, err := ParseWireGuardData(json.RawMessage(tc.data)); err == nil || !strings.Contains(err.Error(), tc.say) {
			t.Errorf("%s: ParseWireGuardData(%s) = %v, want an error saying %q", tc.desc, tc.data, err, tc.say)
		}
	}
}
