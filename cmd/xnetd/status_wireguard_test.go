package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// A wireguard host's status shows our public key and, per peer, the last handshake and the
// bytes each way, in text and JSON; a device that cannot be read says why.
func TestStatusShowsTheWireGuardDevice(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	rep := statusReport{Running: true, Daemon: "running, pid 7", Backend: "wireguard", Mode: "wireguard-go",
		WireGuard: &wireguardReport{Status: wireguard.Status{
			Datapath: wireguard.DatapathEmbedded, Device: "xnet-wg", PublicKey: "OURKEY=", ListenPort: 51820,
			Peers: []wireguard.PeerStatus{
				{PublicKey: "PEERKEY1=", Endpoint: "198.18.0.12:51820", Subnets: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")},
					LastHandshake: now.Add(-42 * time.Second), RxBytes: 1234, TxBytes: 5678},
				{PublicKey: "PEERKEY2=", Endpoint: "198.18.0.13:51820", Subnets: []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}},
			},
		}}}
	var b bytes.Buffer
	printStatus(&b, rep, now)
	out := b.String()
	for _, want := range []string{
		"wireguard: xnet-wg (wireguard-go), public key OURKEY=, listen port 51820\n",
		"PEER PUBLIC KEY",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	for _, tt := range []struct{ key, want string }{
		{"PEERKEY1=", "PEERKEY1= 198.18.0.12:51820 10.244.2.0/24 2026-11-27T09:59:18Z (42s ago) 1234 5678"},
		{"PEERKEY2=", "PEERKEY2= 198.18.0.13:51820 10.244.3.0/24 never 0 0"},
	} {
		if line := strings.Join(strings.Fields(lineWith(out, tt.key)), " "); line != tt.want {
			t.Errorf("peer %s: %q, want %q", tt.key, line, tt.want)
		}
	}

	data, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		WireGuard struct {
			PublicKey string `json:"public_key"`
			Peers     []struct {
				PublicKey     string    `json:"public_key"`
				LastHandshake time.Time `json:"last_handshake"`
				RxBytes       int64     `json:"rx_bytes"`
				TxBytes       int64     `json:"tx_bytes"`
			} `json:"peers"`
		} `json:"wireguard"`
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if w := got.WireGuard; w.PublicKey != "OURKEY=" || len(w.Peers) != 2 || !w.Peers[0].LastHandshake.Equal(now.Add(-42*time.Second)) ||
		w.Peers[0].RxBytes != 1234 || w.Peers[0].TxBytes != 5678 {
		t.Errorf("JSON wireguard section %+v from %s", w, data)
	}
	if strings.Contains(string(data), `"unavailable"`) {
		t.Errorf("a readable device says unavailable: %s", data)
	}

	rep.WireGuard = &wireguardReport{Status: wireguard.Status{Datapath: wireguard.DatapathEmbedded, Device: "xnet-wg"},
		Unavailable: "the daemon is not running, and the embedded WireGuard runs inside it"}
	b.Reset()
	printStatus(&b, rep, now)
	if want := "wireguard: xnet-wg (wireguard-go): unavailable: the daemon is not running"; !strings.Contains(b.String(), want) {
		t.Errorf("status lacks %q:\n%s", want, b.String())
	}

	rep.WireGuard = nil
	b.Reset()
	printStatus(&b, rep, now)
	if strings.Contains(b.String(), "wireguard:") {
		t.Errorf("status of another backend shows a wireguard section:\n%s", b.String())
	}
}

// In a dual-stack overlay status shows IPv6 too: IPv6 subnets among xnet-wg's allowed IPs
// (peers without an IPv6 underlay, or the single-device modes), and in separate mode
// xnet-wg-v6 with its peers' IPv6 endpoints and subnets, in text and JSON.
func TestStatusShowsTheIPv6Device(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	p := netip.MustParsePrefix
	rep := statusReport{Running: true, Daemon: "running, pid 7", Backend: "wireguard", Mode: "wireguard-go",
		WireGuard: &wireguardReport{Status: wireguard.Status{
			Datapath: wireguard.DatapathEmbedded, Device: "xnet-wg", PublicKey: "OURKEY=", ListenPort: 51820,
			Peers: []wireguard.PeerStatus{
				{PublicKey: "PEERKEY1=", Endpoint: "198.18.0.12:51820", Subnets: []netip.Prefix{p("10.244.2.0/24"), p("fd00:10:244:2::/64")}},
				{PublicKey: "PEERKEY2=", Endpoint: "198.18.0.13:51820", Subnets: []netip.Prefix{p("10.244.3.0/24")}},
			},
			V6: &wireguard.Status{Datapath: wireguard.DatapathEmbedded, Device: "xnet-wg-v6", PublicKey: "OURKEY=", ListenPort: 51821,
				Peers: []wireguard.PeerStatus{
					{PublicKey: "PEERKEY2=", Endpoint: "[fd00:198:18::13]:51821", Subnets: []netip.Prefix{p("fd00:10:244:3::/64")}, RxBytes: 10, TxBytes: 20},
				}},
		}}}
	var b bytes.Buffer
	printStatus(&b, rep, now)
	out := b.String()
	for _, want := range []string{
		"wireguard: xnet-wg (wireguard-go), public key OURKEY=, listen port 51820\n",
		"wireguard: xnet-wg-v6 (wireguard-go), public key OURKEY=, listen port 51821\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	for _, want := range []string{
		"PEERKEY1= 198.18.0.12:51820 10.244.2.0/24,fd00:10:244:2::/64 never 0 0",
		"PEERKEY2= [fd00:198:18::13]:51821 fd00:10:244:3::/64 never 10 20",
	} {
		found := false
		for l := range strings.Lines(out) {
			found = found || strings.Join(strings.Fields(l), " ") == want
		}
		if !found {
			t.Errorf("status lacks the line %q:\n%s", want, out)
		}
	}
	data, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		WireGuard struct {
			V6 struct {
				Device string `json:"device"`
				Peers  []struct {
					Endpoint string   `json:"endpoint"`
					Subnets  []string `json:"subnets"`
				} `json:"peers"`
			} `json:"v6"`
		} `json:"wireguard"`
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if v6 := got.WireGuard.V6; v6.Device != "xnet-wg-v6" || len(v6.Peers) != 1 || v6.Peers[0].Endpoint != "[fd00:198:18::13]:51821" ||
		len(v6.Peers[0].Subnets) != 1 || v6.Peers[0].Subnets[0] != "fd00:10:244:3::/64" {
		t.Errorf("JSON v6 section %+v from %s", v6, data)
	}
}

// A stopped embedded WireGuard is reported under the device it ran: in an IPv6-only overlay in
// separate mode that is xnet-wg-v6 alone, in auto mode xnet-wg.
func TestStatusOfAStoppedIPv6OnlyWireGuardNamesItsDevice(t *testing.T) {
	for mode, want := range map[string]string{"separate": wireguard.DeviceNameV6, "auto": wireguard.DeviceName} {
		st := state{Backend: "wireguard", Mode: string(wireguard.DatapathEmbedded), Config: subnetmgr.Config{
			EnableIPv6: true, IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"),
			Backend: subnetmgr.BackendConfig{Type: "wireguard", WireGuard: subnetmgr.WireGuardConfig{ListenPort: 51820, ListenPortV6: 51821, Mode: mode}}}}
		var rep statusReport
		attachWireGuard(&rep, st, "/nonexistent/state.json")
		if rep.WireGuard == nil || rep.WireGuard.Device != want || rep.WireGuard.Unavailable == "" {
			t.Errorf("mode %s: %+v, want %s, unavailable", mode, rep.WireGuard, want)
		}
	}
}
