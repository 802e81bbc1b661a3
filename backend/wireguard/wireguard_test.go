package wireguard

import (
	"encoding/json"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// flannelLeaseAttrs is flannel's wireguardLeaseAttrs (pkg/backend/wireguard, v0.28), the
// struct whose json.Marshal is the BackendData of every flannel wireguard lease.
type flannelLeaseAttrs struct {
	PublicKey string
	Port      uint16
}

func mustKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// bareBackend is a Backend with a key and a config, enough for what needs no device.
func bareBackend(t *testing.T, wg subnetmgr.WireGuardConfig) *Backend {
	k := mustKey(t)
	name, port := mainDevice(wg, false)
	return &Backend{wg: wg, key: hostKey{private: k, public: k.PublicKey()}, devName: name, port: port}
}

func TestLeaseDataIsWhatFlannelWrites(t *testing.T) {
	b := bareBackend(t, subnetmgr.WireGuardConfig{ListenPort: 51820})
	typ, data, err := b.LeaseAttrs()
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(&flannelLeaseAttrs{PublicKey: b.key.public.String(), Port: 51820})
	if typ != "wireguard" || string(data) != string(want) {
		t.Errorf("LeaseAttrs = %s %s, want wireguard %s", typ, data, want)
	}
	// The documented shape, literally.
	if lit := `{"PublicKey":"` + b.key.public.String() + `","Port":51820}`; string(data) != lit {
		t.Errorf("BackendData %s, want %s", data, lit)
	}
}

func TestPeerLeasesAreReadAsFlannelReadsThem(t *testing.T) {
	b := bareBackend(t, subnetmgr.WireGuardConfig{ListenPort: 51820})
	peerKey := mustKey(t).PublicKey()
	subnet := netip.MustParsePrefix("10.244.7.0/24")
	ip := netip.MustParseAddr("198.18.0.17")
	lease := func(typ, data string) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: subnet, PublicIP: ip, BackendType: typ, BackendData: json.RawMessage(data)}
	}
	ok := []struct {
		desc     string
		lease    subnetmgr.Lease
		endpoint string
	}{
		{"flannel's lease", lease("wireguard", `{"PublicKey":"`+peerKey.String()+`","Port":51820}`), "198.18.0.17:51820"},
		{"another ListenPort is where the peer is reached", lease("wireguard", `{"PublicKey":"`+peerKey.String()+`","Port":41000}`), "198.18.0.17:41000"},
		{"flannel before v0.22 published no Port: our own", lease("wireguard", `{"PublicKey":"`+peerKey.String()+`"}`), "198.18.0.17:51820"},
	}
	for _, tc := range ok {
		p, err := b.parsePeer(tc.lease)
		if err != nil || p.key != peerKey || p.endpoint.String() != tc.endpoint || p.subnet != subnet || p.lease.subnet6.IsValid() {
			t.Errorf("%s: parsePeer = %+v %v; want %v %s %v and no IPv6", tc.desc, p, err, peerKey, tc.endpoint, subnet)
		}
	}
	bad := []struct {
		desc  string
		lease subnetmgr.Lease
	}{
		{"a vxlan host's lease", lease("vxlan", `{"VNI":1,"VtepMAC":"0e:78:c6:12:00:11"}`)},
		{"no BackendData", lease("wireguard", ``)},
		{"a key that is not one", lease("wireguard", `{"PublicKey":"bm90IGEga2V5","Port":51820}`)},
		{"our own public key (a copied state directory)", lease("wireguard", `{"PublicKey":"`+b.key.public.String()+`","Port":51820}`)},
		{"an IPv6 PublicIP", func() subnetmgr.Lease {
			l := lease("wireguard", `{"PublicKey":"`+peerKey.String()+`","Port":51820}`)
			l.PublicIP = netip.MustParseAddr("2001:db8::17")
			return l
		}()},
	}
	for _, tc := range bad {
		if _, err := b.parsePeer(tc.lease); err == nil || !strings.Contains(err.Error(), "10.244.7.0/24") {
			t.Errorf("%s: parsePeer error %v, want one naming the lease", tc.desc, err)
		}
	}
}

// TestConfigurationReachesWireguardGo configures a real wireguard-go device (down, so it opens
// no socket; a TUN of channels) with uapiSet and reads it back with uapiGet: the two speak the
// protocol as wireguard-go does.
func TestConfigurationReachesWireguardGo(t *testing.T) {
	dev := device.NewDevice(tuntest.NewChannelTUN().TUN(), conn.NewStdNetBind(), &device.Logger{Verbosef: device.DiscardLogf, Errorf: t.Logf})
	defer dev.Close()
	u := &userDevice{name: DeviceName, dev: dev, restarted: map[*device.Peer]time.Time{}}

	priv, psk := mustKey(t), mustKey(t)
	p1, p2 := mustKey(t).PublicKey(), mustKey(t).PublicKey()
	port, keepalive := 51820, 25*time.Second
	cidr := func(s ...string) []net.IPNet {
		var n []net.IPNet
		for _, c := range s {
			n = append(n, ipNet(netip.MustParsePrefix(c)))
		}
		return n
	}
	err := u.configure(wgtypes.Config{PrivateKey: &priv, ListenPort: &port, Peers: []wgtypes.PeerConfig{
		{PublicKey: p1, PresharedKey: &psk, Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.18.0.12:51820")),
			PersistentKeepaliveInterval: &keepalive, ReplaceAllowedIPs: true, AllowedIPs: cidr("10.244.2.0/24", "10.244.9.0/24")},
		{PublicKey: p2, Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.18.0.13:41000")), ReplaceAllowedIPs: true, AllowedIPs: cidr("10.244.3.0/24")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	// A peer's subnets replaced, the other removed, an update of a key the device does not
	// have ignored.
	err = u.configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{
		{PublicKey: p1, PresharedKey: &psk, Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.18.0.12:51820")),
			PersistentKeepaliveInterval: &keepalive, ReplaceAllowedIPs: true, AllowedIPs: cidr("10.244.2.0/24")},
		{PublicKey: p2, Remove: true},
		{PublicKey: mustKey(t).PublicKey(), UpdateOnly: true, PersistentKeepaliveInterval: &keepalive},
	}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := u.get()
	if err != nil {
		t.Fatal(err)
	}
	if got.PrivateKey != priv || got.PublicKey != priv.PublicKey() || got.Name != DeviceName {
		t.Errorf("device keys %v / %v, name %q", got.PrivateKey, got.PublicKey, got.Name)
	}
	if len(got.Peers) != 1 {
		t.Fatalf("device has %d peers, want 1: %+v", len(got.Peers), got.Peers)
	}
	p := got.Peers[0]
	var allowed []string
	for _, a := range p.AllowedIPs {
		allowed = append(allowed, a.String())
	}
	if p.PublicKey != p1 || p.PresharedKey != psk || p.Endpoint.String() != "198.18.0.12:51820" ||
		p.PersistentKeepaliveInterval != keepalive || !slices.Equal(allowed, []string{"10.244.2.0/24"}) || !p.LastHandshakeTime.IsZero() {
		t.Errorf("peer read back: %+v (allowed %v)", p, allowed)
	}
}

func TestUAPIGetRejectsWhatItCannotRead(t *testing.T) {
	for _, text := range []string{"listen_port\n", "listen_port=x\n", "public_key=zz\n", "private_key=00\n", "errno=-22\n"} {
		if _, err := uapiGet(text); err == nil {
			t.Errorf("uapiGet(%q) accepted", text)
		}
	}
	d, err := uapiGet("listen_port=51820\npublic_key=" + strings.Repeat("ab", 32) + "\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=7\ntx_bytes=9\nfuture_field=1\nerrno=0\n")
	if err != nil || d.ListenPort != 51820 || len(d.Peers) != 1 || d.Peers[0].ReceiveBytes != 7 || d.Peers[0].TransmitBytes != 9 ||
		!d.Peers[0].LastHandshakeTime.Equal(time.Unix(1700000000, 5)) {
		t.Errorf("uapiGet = %+v, %v", d, err)
	}
}

// TestKeyFile: generated in memory, written 0600 by save (through a rename: no temporary file
// stays), read back the same, a broken file is an error, a readable one is tightened.
func TestKeyFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(dir, KeyFile)
	log := slog.New(slog.DiscardHandler)
	k, err := loadKey(path, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("loadKey wrote %s (%v): only Setup may change the host", path, err)
	}
	if err := k.save(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v, %v: want mode 0600", fi, err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("state directory holds %d entries, want the key file alone", len(entries))
	}
	data, _ := os.ReadFile(path)
	if parsed, err := wgtypes.ParseKey(string(data)); err != nil || parsed != k.private {
		t.Errorf("key file holds %q (%v), want the private key as `wg genkey` prints it", data, err)
	}
	again, err := loadKey(path, log)
	if err != nil || again.public != k.public || !again.saved {
		t.Errorf("loadKey of the saved file: %v %v", again.public, err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadKey(path, log); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("a 0644 key file stays %v", fi.Mode().Perm())
	}
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadKey(path, log); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("a broken key file: %v, want an error naming it", err)
	}
}

// TestWireguardGoStillLogsWhatWeWatch: the spoofed-source counter and the crossed-handshake
// restart hang on wireguard-go's log lines; a version that words them differently must fail
// here, not silently stop counting.
func TestWireguardGoStillLogsWhatWeWatch(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "golang.zx2c4.com/wireguard").Output()
	if err != nil {
		t.Skipf("go list: %v", err)
	}
	src, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "device", "receive.go"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{logDisallowedSource, logDisallowedSourceV6, logInvalidResponse, logDeriveFailed} {
		if !strings.Contains(string(src), `"`+line+`"`) {
			t.Errorf("wireguard-go's device/receive.go no longer logs %q", line)
		}
	}
}
