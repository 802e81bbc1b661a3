package wireguard

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// ipv6OnlyBackend is a Backend in an IPv6-only overlay with our lease set, enough for reading
// peer leases and writing ours, as New builds it for mode.
func ipv6OnlyBackend(t *testing.T, mode string) *Backend {
	t.Helper()
	wg := subnetmgr.WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: mode}
	b := bareBackend(t, wg)
	b.ipv6Only = true
	b.devName, b.port = mainDevice(wg, true)
	base, err := backend.NewBase(subnetmgr.BackendWireGuard, backend.Options{Iface: backend.ExternalInterface{
		Name: "eth0", Index: 2, MTU: 1500, PublicIP: netip.MustParseAddr("10.0.0.1"), PublicIPv6: netip.MustParseAddr("fd00:198:18::1")},
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	b.Base = base
	b.SetLocal(subnetmgr.Lease{IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64")}, netip.Prefix{})
	b.SetIPv6Network(netip.MustParsePrefix("fd00:10:244::/48"))
	return b
}

// TestIPv6OnlyDeviceAndLeaseAreFlannels: in an IPv6-only overlay separate mode runs only the
// IPv6 device on ListenPortV6 (flannel's flannel-wg-v6), auto and ipv6 the one device on
// ListenPort, and BackendV6Data names the port that device listens on.
func TestIPv6OnlyDeviceAndLeaseAreFlannels(t *testing.T) {
	for _, tc := range []struct {
		mode, device string
		port         int
	}{
		{ModeSeparate, DeviceNameV6, 51821},
		{ModeAuto, DeviceName, 51820},
		{ModeIPv6, DeviceName, 51820},
	} {
		b := ipv6OnlyBackend(t, tc.mode)
		if b.devName != tc.device || b.port != tc.port {
			t.Errorf("mode %s: device %s port %d, want %s %d", tc.mode, b.devName, b.port, tc.device, tc.port)
		}
		data, err := b.LeaseAttrsV6()
		if want := `{"PublicKey":"` + b.key.public.String() + `","Port":` + strconv.Itoa(tc.port) + `}`; err != nil || string(data) != want {
			t.Errorf("mode %s: LeaseAttrsV6 = %s %v, want %s", tc.mode, data, err, want)
		}
	}
}

// TestIPv6OnlyPeerLeaseIsReadAsFlannelWritesIt: a peer's IPv6-only lease (no IPv4 subnet,
// PublicIP 0.0.0.0, BackendV6Data only) is keyed by its IPv6 subnet and reached at its
// PublicIPv6, on the port its mode's device listens on; leases without what that needs are
// refused as incompatible.
func TestIPv6OnlyPeerLeaseIsReadAsFlannelWritesIt(t *testing.T) {
	peerKey := mustKey(t).PublicKey()
	subnet6, ip6 := netip.MustParsePrefix("fd00:10:244:7::/64"), netip.MustParseAddr("fd00:198:18::7")
	v6Data := func(port string) json.RawMessage {
		if port == "" {
			return json.RawMessage(`{"PublicKey":"` + peerKey.String() + `"}`)
		}
		return json.RawMessage(`{"PublicKey":"` + peerKey.String() + `","Port":` + port + `}`)
	}
	lease := func(data json.RawMessage) subnetmgr.Lease {
		return subnetmgr.Lease{IPv6Subnet: subnet6, PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6, BackendType: "wireguard", BackendV6Data: data}
	}
	for _, tc := range []struct {
		desc, mode string
		lease      subnetmgr.Lease
		endpoint   string
	}{
		{"separate: its BackendV6Data port", ModeSeparate, lease(v6Data("51821")), "[fd00:198:18::7]:51821"},
		{"separate, no Port (flannel before v0.22): our ListenPortV6", ModeSeparate, lease(v6Data("")), "[fd00:198:18::7]:51821"},
		{"separate, another port published: that one", ModeSeparate, lease(v6Data("6000")), "[fd00:198:18::7]:6000"},
		{"auto, an xnet peer publishing its ListenPort", ModeAuto, lease(v6Data("51820")), "[fd00:198:18::7]:51820"},
		{"auto, flannel publishing ListenPortV6 while listening on ListenPort: our ListenPort", ModeAuto, lease(v6Data("51821")), "[fd00:198:18::7]:51820"},
		{"ipv6: our ListenPort", ModeIPv6, lease(v6Data("51821")), "[fd00:198:18::7]:51820"},
	} {
		b := ipv6OnlyBackend(t, tc.mode)
		p, err := b.parsePeer(tc.lease)
		if err != nil {
			t.Errorf("%s: %v", tc.desc, err)
			continue
		}
		if p.key != peerKey || p.subnet != subnet6 || p.endpoint.String() != tc.endpoint || p.lease.subnet6.IsValid() || p.endpoint6.IsValid() {
			t.Errorf("%s: %+v, want key %s subnet %v endpoint %s and nothing more", tc.desc, p, peerKey, subnet6, tc.endpoint)
		}
	}

	b := ipv6OnlyBackend(t, ModeSeparate)
	for desc, l := range map[string]subnetmgr.Lease{
		"no IPv6 subnet":            {PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6, BackendType: "wireguard", BackendV6Data: v6Data("51821")},
		"no PublicIPv6":             {IPv6Subnet: subnet6, PublicIP: netip.IPv4Unspecified(), BackendType: "wireguard", BackendV6Data: v6Data("51821")},
		"BackendData only":          {IPv6Subnet: subnet6, PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6, BackendType: "wireguard", BackendData: v6Data("51821")},
		"another backend":           {IPv6Subnet: subnet6, PublicIP: netip.IPv4Unspecified(), PublicIPv6: ip6, BackendType: "vxlan", BackendV6Data: v6Data("51821")},
		"our own key":               lease(json.RawMessage(`{"PublicKey":"` + b.key.public.String() + `"}`)),
		"an IPv4-mapped PublicIPv6": {IPv6Subnet: subnet6, PublicIP: netip.IPv4Unspecified(), PublicIPv6: netip.MustParseAddr("::ffff:198.18.0.7"), BackendType: "wireguard", BackendV6Data: v6Data("51821")},
	} {
		if _, err := b.parsePeer(l); !errors.Is(err, ErrIncompatiblePeer) {
			t.Errorf("%s: parsePeer = %v, want ErrIncompatiblePeer", desc, err)
		}
	}
}

// TestIPv6OnlyModeIPv4IsRefused: Mode ipv4 reaches peers at an IPv4 PublicIP an IPv6-only
// overlay has not; New says so naming Backend.Mode, before it touches the host.
func TestIPv6OnlyModeIPv4IsRefused(t *testing.T) {
	cfg := subnetmgr.Config{EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"), IPv6SubnetLen: 64,
		Backend: subnetmgr.BackendConfig{Type: subnetmgr.BackendWireGuard,
			WireGuard: subnetmgr.WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: ModeIPv4}}}
	if !cfg.IPv6Only() {
		t.Fatal("the config is not IPv6 only: this checks nothing")
	}
	iface := backend.ExternalInterface{Name: "eth0", Index: 2, MTU: 1500, PublicIP: netip.MustParseAddr("10.0.0.1"), PublicIPv6: netip.MustParseAddr("fd00:198:18::1")}
	_, err := New(backend.Options{Iface: iface, Config: cfg, StateDir: t.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "Backend.Mode") {
		t.Errorf("New with Mode ipv4 in an IPv6-only overlay: %v; want an error naming Backend.Mode", err)
	}
}
