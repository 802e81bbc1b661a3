package macvlan

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestOptionsFileIsOneDockerCommand(t *testing.T) {
	f := OptionsFile{Name: "xnet-macvlan", Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), Range: pfx("10.0.0.32/28"), Parent: "eth0"}
	path := filepath.Join(t.TempDir(), "run", "macvlan")
	if err := WriteOptionsFile(path, f); err != nil {
		t.Fatal(err)
	}
	want := []string{"-d", "macvlan", "--subnet=10.0.0.0/24", "--gateway=10.0.0.254", "--ip-range=10.0.0.32/28", "-o", "parent=eth0", "xnet-macvlan"}
	if !slices.Equal(f.Args(), want) {
		t.Errorf("Args() = %q, want %q", f.Args(), want)
	}

	t.Run("a shell that sources it gets exactly the docker network create arguments", func(t *testing.T) {
		out, err := exec.Command("sh", "-c", `. "$1" && printf '%s\n' $DOCKER_MACVLAN_OPTIONS`, "sh", path).CombinedOutput()
		if err != nil {
			t.Fatalf("sh: %v: %s", err, out)
		}
		if got := strings.Fields(string(out)); !slices.Equal(got, want) {
			t.Errorf("sourced $DOCKER_MACVLAN_OPTIONS splits into %q, want %q", got, want)
		}
	})
	t.Run("it reads back as written", func(t *testing.T) {
		got, err := ReadOptionsFile(path)
		if err != nil || got != f {
			t.Errorf("ReadOptionsFile = %+v, %v; want %+v", got, err, f)
		}
	})
	t.Run("the file is world-readable, as Docker's EnvironmentFile needs nothing more", func(t *testing.T) {
		st, err := os.Stat(path)
		if err != nil || st.Mode().Perm() != 0o644 {
			t.Errorf("mode %v, %v; want 0644", st.Mode(), err)
		}
	})
}

func TestOptionsFileRefusesWhatWouldBreakTheCommand(t *testing.T) {
	good := OptionsFile{Name: "lan", Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.254"), Range: pfx("10.0.0.32/28"), Parent: "eth0"}
	cases := []struct {
		desc string
		edit func(*OptionsFile)
	}{
		{"no range", func(f *OptionsFile) { f.Range = netip.Prefix{} }},
		{"a name a shell would split", func(f *OptionsFile) { f.Name = "my lan" }},
		{"a parent with a shell metacharacter", func(f *OptionsFile) { f.Parent = "eth0;reboot" }},
		{"no parent", func(f *OptionsFile) { f.Parent = "" }},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			f := good
			tc.edit(&f)
			path := filepath.Join(t.TempDir(), "macvlan")
			if err := WriteOptionsFile(path, f); err == nil {
				t.Errorf("WriteOptionsFile(%+v) succeeded", f)
			}
			if _, err := os.Stat(path); err == nil {
				t.Errorf("a refused file was written")
			}
		})
	}
	t.Run("a file with a garbled range is an error naming the variable", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "macvlan")
		if err := WriteOptionsFile(path, good); err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(path)
		if err := os.WriteFile(path, []byte(strings.Replace(string(data), "RANGE=10.0.0.32/28", "RANGE=10.0.0.32", 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadOptionsFile(path); err == nil || !strings.Contains(err.Error(), "XNET_MACVLAN_RANGE") {
			t.Errorf("ReadOptionsFile of a garbled file = %v, want an error naming XNET_MACVLAN_RANGE", err)
		}
	})
}
