package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// The files `make install` puts on a host say what the daemon relies on: systemd waits for
// READY, restarts on failure but not on a bad config (exit 2), reads flags from
// /etc/default/xnetd, keeps the user-space datapaths' fds across restarts; Docker starts
// after xnetd with the options xnetd wrote.
func TestPackagingFilesSayWhatTheDaemonReliesOn(t *testing.T) {
	tests := []struct {
		file  string
		lines []string // each must appear as a whole line
	}{
		{"xnetd.service", []string{
			"Type=notify", "Restart=always", "RestartPreventExitStatus=2",
			"After=network-online.target etcd.service", "Wants=network-online.target",
			"EnvironmentFile=-/etc/default/xnetd", "ExecStart=/usr/local/bin/xnetd run",
			"FileDescriptorStoreMax=16",
		}},
		{"docker-xnet.conf", []string{
			"After=xnetd.service", "Requires=xnetd.service", "EnvironmentFile=/run/xnet/docker", "ExecStart=",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("..", "..", "packaging", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			have := map[string]bool{}
			for _, l := range strings.Split(string(data), "\n") {
				have[strings.TrimSpace(l)] = true
			}
			for _, l := range tt.lines {
				if !have[l] {
					t.Errorf("%s lacks the line %q", tt.file, l)
				}
			}
			if tt.file == "docker-xnet.conf" && !strings.Contains(string(data), "$DOCKER_NETWORK_OPTIONS") {
				t.Errorf("docker-xnet.conf does not pass $DOCKER_NETWORK_OPTIONS to dockerd")
			}
		})
	}
}

// systemd itself accepts both units (when systemd-analyze is installed).
func TestPackagingUnitsVerifyWithSystemd(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed")
	}
	dir := t.TempDir()
	copyUnit := func(src, dst string) {
		data, err := os.ReadFile(filepath.Join("..", "..", "packaging", src))
		if err != nil {
			t.Fatal(err)
		}
		// verify checks that executables exist: point them at one that does.
		s := strings.ReplaceAll(string(data), "/usr/local/bin/xnetd", "/bin/true")
		s = strings.ReplaceAll(s, "/usr/bin/dockerd", "/bin/true")
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, dst)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	copyUnit("xnetd.service", "xnetd.service")
	copyUnit("docker-xnet.conf", "docker.service.d/xnet.conf")
	if err := os.WriteFile(filepath.Join(dir, "docker.service"), []byte("[Service]\nExecStart=/bin/true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("systemd-analyze", "verify", filepath.Join(dir, "xnetd.service"), filepath.Join(dir, "docker.service"))
	cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":")
	if out, err := cmd.CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestExampleConfigIsValid(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "packaging", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := subnetmgr.ParseConfig(data)
	if err != nil {
		t.Fatalf("packaging/config.json: %v", err)
	}
	if cfg.Network.String() != "10.244.0.0/16" || cfg.Backend.Type != subnetmgr.BackendEBPF {
		t.Errorf("example config parsed as %+v, want Network 10.244.0.0/16 and Backend.Type ebpf", cfg)
	}
}
