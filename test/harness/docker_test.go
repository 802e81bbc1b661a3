package harness

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestReadDockerOptsSplitsTheValueAsSystemdDoes(t *testing.T) {
	for _, tt := range []struct {
		desc, file string
		want       []string
	}{
		{"what xnetd writes", "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450\"\n",
			[]string{"--bip=10.244.5.1/24", "--ip-masq=true", "--mtu=1450"}},
		{"unquoted, after other lines", "# written by xnetd\nX=1\nDOCKER_NETWORK_OPTIONS=--bip=10.244.5.1/24\n",
			[]string{"--bip=10.244.5.1/24"}},
		{"single quotes", "DOCKER_NETWORK_OPTIONS='--mtu=1450  --ip-masq=false'", []string{"--mtu=1450", "--ip-masq=false"}},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "docker")
			if err := os.WriteFile(path, []byte(tt.file), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ReadDockerOpts(path)
			if err != nil || strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("ReadDockerOpts(%q) = %q, %v; want %q", tt.file, got, err, tt.want)
			}
		})
	}
	path := filepath.Join(t.TempDir(), "docker")
	if err := os.WriteFile(path, []byte("FLANNEL_MTU=1450\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadDockerOpts(path); err == nil {
		t.Error("ReadDockerOpts of a file without DOCKER_NETWORK_OPTIONS succeeded")
	}
}

// A real dockerd in a simulated host: it takes the --bip and --mtu it is given, puts its
// iptables rules in the host's namespace only, runs busybox containers that the test reaches
// with Ping and Exec, and Stop leaves no process, mount, cgroup, namespace or file behind.
func TestDockerRunsBusyboxInAHostAndStopLeavesNothingBehind(t *testing.T) {
	if why := DockerMissing(); why != "" {
		t.Skip(why)
	}
	// Paths Docker and containerd use whatever their flags say.
	fixedPaths := map[string]bool{}
	for _, p := range []string{"/etc/docker/key.json", "/run/docker", "/run/containerd", "/var/lib/docker"} {
		_, err := os.Stat(p)
		fixedPaths[p] = err == nil
	}
	topo := NewForTest(t, Options{Hosts: 1})
	h := topo.Hosts()[0]
	ctx := ctxFor(t, 90*time.Second)
	d, err := h.StartDocker(ctx, "--bip=10.244.7.1/24", "--ip-masq=true", "--mtu=1450")
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			d.Stop()
		}
	})
	t.Logf("dockerd answered %v after start (storage driver %s); log so far %d bytes", d.StartTime.Round(time.Millisecond), d.StorageDriver, len(d.Output()))

	start := time.Now()
	c, err := d.Run(ctx, "web", "sleep", "86400")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("docker run took %v", time.Since(start).Round(time.Millisecond))
	if !netip.MustParsePrefix("10.244.7.0/24").Contains(c.IP) {
		t.Errorf("container address %v is not in --bip's subnet 10.244.7.0/24", c.IP)
	}
	if out, err := c.Exec(ctx, "cat", "/sys/class/net/eth0/mtu"); err != nil || strings.TrimSpace(out) != "1450" {
		t.Errorf("container eth0 mtu: %q %v, want 1450 from --mtu", out, err)
	}
	if out, err := c.Exec(ctx, "ping", "-c", "1", "-W", "2", "10.244.7.1"); err != nil {
		t.Errorf("busybox ping from the container to docker0: %v\n%s", err, out)
	}
	if sent, got, err := Ping(ctx, c.Namespace, netip.MustParseAddr("10.244.7.1"), 2, 20*time.Millisecond); err != nil || got != sent {
		t.Errorf("harness Ping from the container's attached namespace: %d/%d %v", got, sent, err)
	}
	out, err := h.Run(ctx, "iptables", "-S", "FORWARD")
	if err != nil || !strings.Contains(out, "-P FORWARD DROP") || !strings.Contains(out, "-j DOCKER-USER") {
		t.Errorf("iptables in the host: want Docker's FORWARD policy DROP and DOCKER-USER chain: %v\n%s", err, out)
	}
	if out, _ := h.Run(ctx, "sysctl", "-n", "net.ipv4.ip_forward"); strings.TrimSpace(out) != "1" {
		t.Errorf("ip_forward in the host is %q, want 1", out)
	}

	shim := d.execRoot() + "/"
	cgroups := cgroupDirs(d.cgroupParent)
	if len(cgroups) == 0 {
		t.Errorf("no cgroup %s while a container runs: the cleanup check below would be vacuous", d.cgroupParent)
	}
	start = time.Now()
	stopped = true
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Stop took %v", time.Since(start).Round(time.Millisecond))
	if d.proc.Pid != 0 && processAlive(d.proc.Pid) {
		t.Errorf("dockerd pid %d still alive", d.proc.Pid)
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline")); err == nil && strings.Contains(string(b), shim) {
			t.Errorf("process %s still runs: %q", p.Name(), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	if left := cgroupDirs(d.cgroupParent); len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
	if mounts, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mounts), d.Dir) || strings.Contains(string(mounts), c.Namespace.Name) {
		t.Errorf("mounts of the Docker left in the machine's mount table")
	}
	if _, err := os.Stat(d.Dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists: %v", d.Dir, err)
	}
	if _, err := os.Stat(c.Namespace.Path()); !os.IsNotExist(err) {
		t.Errorf("container namespace %s still attached: %v", c.Namespace.Path(), err)
	}
	for p, existed := range fixedPaths {
		if _, err := os.Stat(p); err == nil && !existed {
			t.Errorf("%s appeared on the machine: Docker's fixed paths must stay in its private mounts", p)
		}
	}
}
