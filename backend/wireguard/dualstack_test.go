package wireguard

import (
	"encoding/json"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// dualBackend is a Backend in a dual-stack overlay with our lease set, enough for reading
// peer leases: ours6 is our PublicIPv6 (zero: no IPv6 underlay), v6Device whether xnet-wg-v6
// runs (Setup starts it in separate mode when we have an IPv6 underlay).
func dualBackend(t *testing.T, mode string, ours6 netip.Addr, v6Device bool) *Backend {
	t.Helper()
	b := bareBackend(t, subnetmgr.WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: mode})
	base, err := backend.NewBase(subnetmgr.BackendWireGuard, backend.Options{Iface: backend.ExternalInterface{
		Name: "eth0", Index: 2, MTU: 1500, PublicIP: netip.MustParseAddr("10.0.0.1"), PublicIPv6: ours6}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	b.Base = base
	b.SetLocal(subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64")},
		netip.MustParsePrefix("10.244.0.0/16"))
	if v6Device {
		b.dev6 = &userDevice{name: DeviceNameV6}
	}
	return b
}

// TestPeerIPv6GoesWhereFlannelSendsIt: which device carries a dual-stack peer's IPv6 subnet,
// and at which endpoint, for flannel's modes and the underlays the two hosts have.
func TestPeerIPv6GoesWhereFlannelSendsIt(t *testing.T) {
	peerKey := mustKey(t).PublicKey()
	v4Data := `{"PublicKey":"` + peerKey.String() + `","Port":51820}`
	public6, ula6 := netip.MustParseAddr("2001:db8:1::7"), netip.MustParseAddr("fd00:198:18::7")
	lease := func(public4 string, public6 netip.Addr, v6Data string) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: netip.MustParsePrefix("10.244.7.0/24"), PublicIP: netip.MustParseAddr(public4),
			BackendType: "wireguard", BackendData: json.RawMessage(v4Data),
			IPv6Subnet: netip.MustParsePrefix("fd00:10:244:7::/64"), PublicIPv6: public6, BackendV6Data: json.RawMessage(v6Data)}
	}
	v6Data := func(port int) string {
		return string(must(json.Marshal(subnetmgr.WireGuardData{PublicKey: peerKey.String(), Port: uint16(port)})))
	}
	otherKey := `{"PublicKey":"` + mustKey(t).PublicKey().String() + `","Port":51821}`
	cases := []struct {
		desc      string
		mode      string
		ours6     netip.Addr
		v6Device  bool
		lease     subnetmgr.Lease
		on6       bool
		endpoint  string // xnet-wg's
		endpoint6 string // xnet-wg-v6's
	}{
		{"separate, both with an IPv6 underlay: xnet-wg-v6 at [PublicIPv6]:its v6 port", ModeSeparate, ula6, true,
			lease("198.18.0.7", ula6, v6Data(51821)), true, "198.18.0.7:51820", "[fd00:198:18::7]:51821"},
		{"separate, a BackendV6Data without Port: our ListenPortV6", ModeSeparate, ula6, true,
			lease("198.18.0.7", ula6, `{"PublicKey":"`+peerKey.String()+`"}`), true, "198.18.0.7:51820", "[fd00:198:18::7]:51821"},
		{"separate, the peer without an IPv6 underlay: IPv6 on xnet-wg", ModeSeparate, ula6, true,
			lease("198.18.0.7", netip.Addr{}, ""), false, "198.18.0.7:51820", ""},
		{"separate, we without an IPv6 underlay: IPv6 on xnet-wg", ModeSeparate, netip.Addr{}, false,
			lease("198.18.0.7", ula6, v6Data(51821)), false, "198.18.0.7:51820", ""},
		{"separate, BackendV6Data with another key: IPv6 on xnet-wg", ModeSeparate, ula6, true,
			lease("198.18.0.7", ula6, otherKey), false, "198.18.0.7:51820", ""},
		{"ipv4: one device at PublicIP", ModeIPv4, ula6, false,
			lease("198.18.0.7", ula6, v6Data(51820)), false, "198.18.0.7:51820", ""},
		{"ipv6: one device at [PublicIPv6]", ModeIPv6, ula6, false,
			lease("198.18.0.7", ula6, v6Data(51820)), false, "[fd00:198:18::7]:51820", ""},
		{"ipv6, flannel's BackendV6Data with ListenPortV6: at its one device's port", ModeIPv6, ula6, false,
			lease("198.18.0.7", ula6, v6Data(51821)), false, "[fd00:198:18::7]:51820", ""},
		{"ipv6, the peer without an IPv6 underlay: at PublicIP", ModeIPv6, ula6, false,
			lease("198.18.0.7", netip.Addr{}, ""), false, "198.18.0.7:51820", ""},
		{"auto, public IPv4: at PublicIP", ModeAuto, public6, false,
			lease("198.18.0.7", public6, v6Data(51820)), false, "198.18.0.7:51820", ""},
		{"auto, private IPv4 and ULA IPv6: at PublicIP", ModeAuto, ula6, false,
			lease("192.168.0.7", ula6, v6Data(51820)), false, "192.168.0.7:51820", ""},
		{"auto, private IPv4 and both IPv6 public: at [PublicIPv6]", ModeAuto, netip.MustParseAddr("2001:db8:2::1"), false,
			lease("192.168.0.7", public6, v6Data(51820)), false, "[2001:db8:1::7]:51820", ""},
	}
	for _, tc := range cases {
		b := dualBackend(t, tc.mode, tc.ours6, tc.v6Device)
		p, err := b.parsePeer(tc.lease)
		if err != nil {
			t.Errorf("%s: %v", tc.desc, err)
			continue
		}
		ep6 := ""
		if p.endpoint6.IsValid() {
			ep6 = p.endpoint6.String()
		}
		if p.lease.subnet6 != tc.lease.IPv6Subnet || p.lease.on6 != tc.on6 || p.endpoint.String() != tc.endpoint || ep6 != tc.endpoint6 {
			t.Errorf("%s: IPv6 subnet %v on xnet-wg-v6 %v, endpoints %v %q; want %v %v %s %q", tc.desc,
				p.lease.subnet6, p.lease.on6, p.endpoint, ep6, tc.lease.IPv6Subnet, tc.on6, tc.endpoint, tc.endpoint6)
		}
	}
}

// TestLeaseV6DataIsWhatFlannelWrites: BackendV6Data is BackendData's shape with the port our
// IPv6 arrives on.
func TestLeaseV6DataIsWhatFlannelWrites(t *testing.T) {
	for mode, port := range map[string]string{ModeSeparate: "51821", ModeAuto: "51820", ModeIPv4: "51820", ModeIPv6: "51820"} {
		b := bareBackend(t, subnetmgr.WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: mode})
		data, err := b.LeaseAttrsV6()
		if want := `{"PublicKey":"` + b.key.public.String() + `","Port":` + port + `}`; err != nil || string(data) != want {
			t.Errorf("mode %s: LeaseAttrsV6 = %s %v, want %s", mode, data, err, want)
		}
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

var (
	_ backend.DualStack    = (*Backend)(nil)
	_ backend.IPv6Receiver = (*Backend)(nil)
)
