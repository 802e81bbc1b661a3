package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// registryOf builds a registry where each named backend either constructs (a recorder) or
// reports why it cannot run here; names not listed are not built in.
func registryOf(avail map[string]string) *backend.Registry {
	r := &backend.Registry{}
	for name, unavailable := range avail {
		r.Register(name, func(backend.Options) (backend.Backend, error) {
			if unavailable != "" {
				return nil, fmt.Errorf("%s: %s: %w", name, unavailable, backend.ErrUnavailable)
			}
			return &recorder{}, nil
		})
	}
	return r
}

func TestBackendChoice(t *testing.T) {
	all := map[string]string{"ebpf": "", "vxlan": "", "udp": "", "host-gw": ""}
	noBPF := map[string]string{"ebpf": "cannot load BPF", "vxlan": "", "udp": "", "host-gw": ""}
	tests := []struct {
		name        string
		flag        string
		configType  string
		avail       map[string]string
		want        string   // chosen backend, or "" for an error
		wantSkipped []string // "name: reason" substrings, in order
		wantErr     []string
	}{
		{"config ebpf means auto and ebpf wins where it loads", "", "ebpf", all, "ebpf", nil, nil},
		{"config without a type is ebpf, so auto", "", "", all, "ebpf", nil, nil},
		{"auto falls back to vxlan and says why ebpf was skipped", "", "ebpf", noBPF, "vxlan", []string{"ebpf: ebpf: cannot load BPF"}, nil},
		{"auto skips what is not built in", "auto", "vxlan", map[string]string{"ebpf": "cannot load BPF", "udp": ""}, "udp",
			[]string{"ebpf: ebpf: cannot load BPF", "vxlan: not built into this xnetd"}, nil},
		{"auto with nothing runnable names every reason", "auto", "", map[string]string{"ebpf": "no BPF", "vxlan": "no vxlan module", "udp": "no /dev/net/tun"}, "", nil,
			[]string{"no backend can run on this host", "ebpf: ebpf: no BPF", "vxlan: vxlan: no vxlan module", "udp: udp: no /dev/net/tun"}},
		{"config vxlan is exactly vxlan", "", "vxlan", all, "vxlan", nil, nil},
		{"config host-gw is exactly host-gw", "", "host-gw", all, "host-gw", nil, nil},
		{"the flag overrides the config for this host", "host-gw", "ebpf", all, "host-gw", nil, nil},
		{"an explicit ebpf that cannot load is an error, not a fallback", "ebpf", "vxlan", noBPF, "", nil,
			[]string{"--backend=ebpf", "cannot load BPF", "try --backend=auto"}},
		{"a config type that is not built in is an error naming the config", "", "udp", map[string]string{"vxlan": ""}, "", nil,
			[]string{`config Backend.Type "udp"`, "not built into this xnetd", "vxlan"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			cfg := subnetmgr.Config{Backend: subnetmgr.BackendConfig{Type: tt.configType}}
			c, err := pickBackend(registryOf(tt.avail), tt.flag, backend.Options{Config: cfg}, log)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("chose %s, want an error", c.name)
				}
				if _, ok := err.(*usageError); !ok {
					t.Errorf("error %T, want *usageError (exit 2: nothing was configured yet)", err)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not mention %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("pickBackend: %v", err)
			}
			if c.name != tt.want {
				t.Errorf("chose %s, want %s", c.name, tt.want)
			}
			var skipped []string
			for _, s := range c.skipped {
				skipped = append(skipped, s.Name+": "+s.Reason)
			}
			ok := len(skipped) == len(tt.wantSkipped)
			for i := 0; ok && i < len(skipped); i++ {
				ok = strings.HasPrefix(skipped[i], tt.wantSkipped[i])
			}
			if !ok {
				t.Errorf("skipped %q, want %q", skipped, tt.wantSkipped)
			}
			// One INFO line per decision: each skip and the choice.
			if n := strings.Count(logs.String(), "msg=\"backend skipped\""); n != len(tt.wantSkipped) {
				t.Errorf("%d 'backend skipped' log lines, want %d:\n%s", n, len(tt.wantSkipped), logs.String())
			}
			if !strings.Contains(logs.String(), "msg=\"backend chosen\" backend="+tt.want) {
				t.Errorf("no 'backend chosen' log line for %s:\n%s", tt.want, logs.String())
			}
		})
	}
}

func TestEmbeddedWireGuardRunsOnOneProcOnTwoCPUs(t *testing.T) {
	embedded, kernel := string(wireguard.DatapathEmbedded), string(wireguard.DatapathKernel)
	cases := []struct {
		name    string
		backend string
		mode    string
		procs   int
		set     bool
		want    int
	}{
		{"embedded wireguard on 2 CPUs runs on 1", subnetmgr.BackendWireGuard, embedded, 2, false, 1},
		{"an operator's GOMAXPROCS stands", subnetmgr.BackendWireGuard, embedded, 2, true, 0},
		{"larger hosts keep the runtime's choice", subnetmgr.BackendWireGuard, embedded, 4, false, 0},
		{"one CPU stays one", subnetmgr.BackendWireGuard, embedded, 1, false, 0},
		{"the kernel's WireGuard is not ours to schedule", subnetmgr.BackendWireGuard, kernel, 2, false, 0},
		{"the udp backend keeps its queue per CPU", subnetmgr.BackendUDP, "", 2, false, 0},
	}
	for _, c := range cases {
		if got := embeddedWireGuardProcs(c.backend, c.mode, c.procs, c.set); got != c.want {
			t.Errorf("%s: got %d, want %d", c.name, got, c.want)
		}
	}
}

// An IPv6-only overlay (EnableIPv4 false) runs only on the backends that carry it: auto picks
// among those, and a backend asked for by name that does not is refused before it starts, as a
// usage error (exit 2) naming EnableIPv4 and what would do.
func TestBackendChoiceIPv6Only(t *testing.T) {
	all := map[string]string{"ebpf": "", "vxlan": "", "udp": "", "host-gw": "", "wireguard": ""}
	cfg := subnetmgr.Config{EnableIPv6: true}
	supported := ipv6OnlyBackends()
	for _, name := range []string{"ebpf", "udp", "wireguard", "vxlan", "host-gw"} {
		for _, by := range []struct{ flag, configType string }{{name, ""}, {"", name}} {
			if by.configType == "ebpf" {
				continue // config ebpf means auto
			}
			c := cfg
			c.Backend.Type = by.configType
			got, err := pickBackend(registryOf(all), by.flag, backend.Options{Config: c}, slog.New(slog.DiscardHandler))
			if slices.Contains(supported, name) {
				if err != nil || got.name != name {
					t.Errorf("%s (flag %q, config %q): chose %q, %v; want it", name, by.flag, by.configType, got.name, err)
				}
				continue
			}
			if _, ok := err.(*usageError); !ok || !strings.Contains(err.Error(), "EnableIPv4") {
				t.Errorf("%s (flag %q, config %q): chose %q, %v; want a usage error naming EnableIPv4", name, by.flag, by.configType, got.name, err)
				continue
			}
			for _, s := range supported {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("%s: error %q does not name %s, which carries IPv6 only", name, err, s)
				}
			}
		}
	}
	got, err := pickBackend(registryOf(all), "auto", backend.Options{Config: cfg}, slog.New(slog.DiscardHandler))
	switch {
	case len(supported) == 0:
		if err == nil || !strings.Contains(err.Error(), "EnableIPv4") {
			t.Errorf("auto: chose %q, %v; want an error naming EnableIPv4", got.name, err)
		}
	case err != nil || !slices.Contains(supported, got.name):
		t.Errorf("auto: chose %q, %v; want one of %v", got.name, err, supported)
	}
	// The ebpf backend carries it (over the IPv6 underlay), so auto picks it first, as in
	// the other modes; udp does not.
	if got.name != subnetmgr.BackendEBPF {
		t.Errorf("auto: chose %q, want ebpf", got.name)
	}
	if slices.Contains(supported, subnetmgr.BackendUDP) {
		t.Errorf("udp carries an IPv6-only overlay: %v", supported)
	}
}
