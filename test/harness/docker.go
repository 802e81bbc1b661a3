package harness

// Real Docker on a simulated host: one dockerd per host, started inside the host's network
// namespace from the DOCKER_NETWORK_OPTIONS xnetd wrote, as packaging/docker-xnet.conf does on
// a real machine.
//
// Design history.
//
// The namespaces that play containers elsewhere in the harness are what `docker run` makes,
// minus everything Docker adds around them: iptables rules (FORWARD policy DROP, the DOCKER-USER
// chain, masquerading under --ip-masq=true), ip_forward, a veth made and announced by
// libnetwork. xnet meets all of that on a real host, so the tests that matter to users run the
// real thing: Debian's docker.io 20.10 with its containerd and runc.
//
// Binaries: Debian's dockerd is /usr/sbin/dockerd and its CLI /usr/bin/docker. A machine may have
// another CLI first in PATH (this VM has a Docker 28 CLI in /usr/local/bin), so the harness
// names /usr/bin/docker by its full path, and gives dockerd a PATH of the system directories
// only, so it runs Debian's containerd, runc and iptables.
//
// Isolation: every dockerd has its own --data-root, --exec-root, -H unix socket, --pidfile,
// --config-file, key file and --cgroup-parent, all under the host's state directory, and its
// own containerd, which dockerd 20.10 starts under its exec-root when no --containerd is given.
// It runs in the host's network namespace (entered with nsenter --net, which leaves /sys alone)
// and in a mount namespace of its own (unshare --mount --propagation private): the overlay
// mounts of images and containers and the bind mounts of container namespaces then never
// appear in the machine's mount table, and they vanish with the last process of that mount
// namespace even if cleanup never runs. A few paths are fixed inside Docker and containerd
// whatever the flags say (/run/docker/plugins, /run/containerd/s for shim sockets): a private
// tmpfs on /run holds them; the host's DockerPluginDir is bound onto /run/docker/plugins in it, so
// a plugin (xnetd's network driver) listening there is found by this dockerd and by no other,
// and the machine's own /run/docker is never touched. Before that, the copy of the machine's mount table that the new
// mount namespace starts with is stripped of nsfs and bpffs mounts, which would otherwise keep
// other tests' network namespaces and BPF pins alive for as long as this dockerd runs.
//
// Containers' network namespaces are attached under the topology's naming scheme
// (`ip netns attach xn-<id>-<host>d<n> <pid>`), so Ping, Do and Run work in a real container
// as in a stand-in, and the topology's Close finds and removes them as it does its own.
//
// Image: no registry is reachable, so each dockerd imports a busybox image from a tar of
// busybox-static's /bin/busybox plus one symlink per applet, tagged busybox:latest, as the
// tutorial's `docker run busybox` expects.
//
// Storage: overlay2, falling back to vfs when the data root cannot hold overlay mounts (vfs
// copies the whole image per container; with a 2 MB image that costs little). Measured on the
// 2-core VM: dockerd answers 0.23-0.45 s after start with either; `docker run` takes about 0.22 s
// on overlay2 and 0.37-0.50 s on vfs; Stop takes 0.13-0.33 s.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Paths of Debian's Docker (docker.io, containerd, runc) and busybox-static.
const (
	DockerdPath   = "/usr/sbin/dockerd"
	DockerCLIPath = "/usr/bin/docker" // Debian's 20.10 CLI, not whatever docker comes first in PATH
	BusyboxPath   = "/bin/busybox"
	// BusyboxImage is the image every Docker of the harness has, imported at start.
	BusyboxImage = "busybox:latest"
)

// dockerPATH is the PATH dockerd runs with, so it finds Debian's containerd, runc and iptables.
const dockerPATH = "/usr/sbin:/usr/bin:/sbin:/bin"

// dockerStartTimeout bounds one dockerd start (API answering and the image imported).
const dockerStartTimeout = 60 * time.Second

// DockerMissing says why real Docker cannot run here, or "" when it can: root, Debian's
// dockerd and CLI, containerd, runc, iptables and a static busybox.
func DockerMissing() string {
	if os.Geteuid() != 0 {
		return "real Docker needs root"
	}
	var missing []string
	for _, p := range []string{DockerdPath, DockerCLIPath} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	for _, name := range []string{"containerd", "containerd-shim-runc-v2", "runc", "iptables", "unshare", "nsenter"} {
		if _, err := lookPathIn(name, dockerPATH); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("real Docker needs Debian's docker.io, containerd, runc and iptables "+
			"(apt-get install docker.io containerd runc iptables busybox-static): missing %s", strings.Join(missing, ", "))
	}
	if err := checkStatic(BusyboxPath); err != nil {
		return fmt.Sprintf("the busybox image needs a static busybox (apt-get install busybox-static): %v", err)
	}
	return ""
}

func lookPathIn(name, path string) (string, error) {
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in %s", name, path)
}

// checkStatic fails unless path is an ELF executable without a dynamic loader: the image has
// no libc for a dynamic one.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (the busybox package, not busybox-static)", path)
		}
	}
	return nil
}

// Docker is a dockerd running in one simulated host's network namespace.
type Docker struct {
	Host *Host
	// Dir holds everything of this dockerd: data root, exec root, socket, pid file, config.
	Dir string
	// NetworkOptions are the network flags it was started with (from xnetd's docker opts file).
	NetworkOptions []string
	// StorageDriver is overlay2, or vfs where overlay2 would not start.
	StorageDriver string
	// StartTime is from starting dockerd to its API answering, image import excluded.
	StartTime time.Duration

	proc          *Process
	containerdPid int
	cgroupParent  string
	http          *http.Client

	mu         sync.Mutex
	containers []*DockerContainer
	seq        int
	stopped    bool
}

// DockerContainer is a container started by `docker run` on a Docker of the harness.
type DockerContainer struct {
	// Namespace is the container's network namespace, attached as xn-<id>-<host>d<n>.
	*Namespace
	Docker *Docker
	Name   string
	ID     string
	IP     netip.Addr // on docker0, or on the network it was started on
	Pid    int        // of the container's first process, in the machine's pid namespace
}

func (d *Docker) dataRoot() string   { return filepath.Join(d.Dir, "data") }
func (d *Docker) execRoot() string   { return filepath.Join(d.Dir, "exec") }
func (d *Docker) Socket() string     { return d.Host.DockerSocket() }
func (d *Docker) pidFile() string    { return filepath.Join(d.Dir, "docker.pid") }
func (d *Docker) configFile() string { return filepath.Join(d.Dir, "daemon.json") }
func (d *Docker) cliConfig() string  { return filepath.Join(d.Dir, "cli") }

// DockerSocket is where the Docker of this host answers its API (once StartDocker ran): known
// before it starts, so xnetd can be told where to reach it.
func (h *Host) DockerSocket() string { return filepath.Join(h.StateDir, "dockerd", "docker.sock") }

// DockerPluginDir is what the Docker of this host sees as /run/docker/plugins, the directory
// where dockerd looks for plugin sockets (<name>.sock). It exists once StartDocker ran.
func (h *Host) DockerPluginDir() string { return filepath.Join(h.StateDir, "docker-plugins") }

// ReadDockerOpts reads the options out of a DOCKER_NETWORK_OPTIONS file as systemd does for
// `EnvironmentFile=` and an unquoted $DOCKER_NETWORK_OPTIONS in ExecStart: the value without its
// quotes, split at whitespace.
func ReadDockerOpts(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "DOCKER_NETWORK_OPTIONS=")
		if !ok {
			continue
		}
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		return strings.Fields(v), nil
	}
	return nil, fmt.Errorf("%s has no DOCKER_NETWORK_OPTIONS line: %q", path, data)
}

// StartDockerFromOptsFile waits until xnetd has written this host's docker opts file and starts
// dockerd with the options in it, as the docker.service drop-in does on a real host.
func (h *Host) StartDockerFromOptsFile(ctx context.Context) (*Docker, error) {
	for {
		opts, err := ReadDockerOpts(h.DockerOptsFile())
		if err == nil {
			return h.StartDocker(ctx, opts...)
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("harness: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("harness: %s has no docker opts file %s yet: %w", h.Name, h.DockerOptsFile(), ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// StartDocker starts dockerd in the host's namespace with networkOptions (e.g. --bip=10.244.5.1/24
// --ip-masq=true --mtu=1450) and Docker's defaults otherwise (iptables on; ip_forward off until
// dockerd turns it on, so the FORWARD policy is DROP and DOCKER-USER is consulted), waits
// until its API answers and imports busybox:latest. Stop it with Stop; the caller owns that
// (StartDockerForTest does it in t.Cleanup). On error nothing of it is left running.
func (h *Host) StartDocker(ctx context.Context, networkOptions ...string) (*Docker, error) {
	if why := DockerMissing(); why != "" {
		return nil, errors.New("harness: " + why)
	}
	d := &Docker{
		Host:           h,
		Dir:            filepath.Join(h.StateDir, "dockerd"), // StateDir/docker is the opts file
		NetworkOptions: networkOptions,
		cgroupParent:   "xnet-" + h.topo.id + "-" + h.Name,
	}
	d.http = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", d.Socket())
		},
	}}
	if _, err := os.Stat(d.Dir); err == nil {
		return nil, fmt.Errorf("harness: %s already has a Docker in %s", h.Name, d.Dir)
	}
	// As on a freshly booted host, forwarding is off until Docker turns it on, and because Docker
	// turned it on it also sets the FORWARD policy to DROP (a host where something else enabled
	// forwarding first keeps ACCEPT). The harness's hosts forward from the start, for the
	// stand-in containers; Docker's hosts get Docker's firewall.
	if err := h.Sysctl("net.ipv4.ip_forward", "0"); err != nil {
		return nil, fmt.Errorf("harness: %w", err)
	}
	// A crashed run with the same id may have left its cgroups.
	_ = removeCgroups(d.cgroupParent)
	for _, dir := range []string{d.dataRoot(), d.execRoot(), d.cliConfig(), h.DockerPluginDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("harness: %w", err)
		}
	}
	// dockerd 20.10 writes an identity key to /etc/docker/key.json unless told otherwise, and
	// only its config file can tell it.
	config := fmt.Sprintf("{\"deprecated-key-path\": %q}\n", filepath.Join(d.Dir, "key.json"))
	if err := os.WriteFile(d.configFile(), []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("harness: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, dockerStartTimeout)
	defer cancel()
	err := d.start(ctx, "overlay2")
	if err != nil && d.proc != nil && strings.Contains(d.proc.Output(), "graphdriver") {
		// The data root's file system cannot take overlay mounts (e.g. it is itself overlayfs).
		h.topo.log.Warn("harness: dockerd would not start with overlay2, using vfs", "host", h.Name, "err", err)
		if err = os.RemoveAll(d.dataRoot()); err == nil {
			err = d.start(ctx, "vfs")
		}
	}
	if err == nil {
		err = d.importBusybox(ctx)
	}
	if err != nil {
		if serr := d.Stop(); serr != nil {
			err = fmt.Errorf("%w (and stopping it: %v)", err, serr)
		}
		return nil, err
	}
	return d, nil
}

// dockerdScript runs in dockerd's new mount namespace before exec'ing it: see the design
// history for why each mount is there.
const dockerdScript = `set -e
findmnt -rn -t nsfs,bpf -o TARGET | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
mount -t tmpfs -o mode=0755 xnet-docker-run /run
mkdir -p /run/docker/plugins
mount --bind "$XNET_DOCKER_PLUGIN_DIR" /run/docker/plugins
exec "$@"`

func (d *Docker) start(ctx context.Context, driver string) error {
	args := []string{
		"--data-root", d.dataRoot(),
		"--exec-root", d.execRoot(),
		"-H", "unix://" + d.Socket(),
		"--pidfile", d.pidFile(),
		"--config-file", d.configFile(),
		"--cgroup-parent", d.cgroupParent,
		"--storage-driver", driver,
	}
	args = append(args, d.NetworkOptions...)
	full := append([]string{"--mount", "--propagation", "private", "--", "sh", "-c", dockerdScript, "sh", DockerdPath}, args...)
	cmd := d.Host.command("unshare", full...)
	cmd.Env = []string{"PATH=" + dockerPATH, "XNET_DOCKER_PLUGIN_DIR=" + d.Host.DockerPluginDir()}
	begin := time.Now()
	p, err := d.Host.startCmd(cmd)
	if err != nil {
		return fmt.Errorf("harness: start dockerd on %s: %w", d.Host.Name, err)
	}
	d.proc = p
	for {
		if d.pingAPI(ctx) == nil {
			break
		}
		if p.Exited() {
			return fmt.Errorf("harness: dockerd on %s (storage driver %s) exited at start: %v\n%s", d.Host.Name, driver, p.Wait(), lastLines(p.Output(), 15))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: dockerd on %s not answering after %v: %w\n%s", d.Host.Name, time.Since(begin).Round(time.Millisecond), ctx.Err(), lastLines(p.Output(), 15))
		case <-time.After(20 * time.Millisecond):
		}
	}
	d.StartTime = time.Since(begin)
	d.StorageDriver = driver
	// dockerd 20.10 writes its managed containerd's pid here.
	if b, err := os.ReadFile(filepath.Join(d.execRoot(), "containerd", "containerd.pid")); err == nil {
		d.containerdPid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	return nil
}

func (d *Docker) pingAPI(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /_ping: %s", resp.Status)
	}
	return nil
}

// busyboxTar is a root file system with a static busybox and a symlink per applet in /bin, and
// the /tmp and /etc that busybox's tools expect.
func busyboxTar(ctx context.Context) ([]byte, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", BusyboxPath, err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Now()
	for _, dir := range []struct {
		name string
		mode int64
	}{{"bin/", 0o755}, {"etc/", 0o755}, {"tmp/", 0o1777}, {"root/", 0o700}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir.name, Mode: dir.mode, ModTime: now}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bin)), ModTime: now}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777, ModTime: now}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (d *Docker) importBusybox(ctx context.Context) error {
	if err := checkStatic(BusyboxPath); err != nil {
		return fmt.Errorf("harness: busybox image: %w", err)
	}
	img, err := busyboxTar(ctx)
	if err != nil {
		return fmt.Errorf("harness: busybox image: %w", err)
	}
	if _, err := d.cli(ctx, bytes.NewReader(img), "import", "--change", `CMD ["sh"]`, "-", BusyboxImage); err != nil {
		return fmt.Errorf("harness: import busybox into the Docker of %s: %w", d.Host.Name, err)
	}
	return nil
}

// CLI runs Debian's docker CLI against this dockerd and returns its stdout. The error has the
// command and its stderr.
func (d *Docker) CLI(ctx context.Context, args ...string) (string, error) {
	return d.cli(ctx, nil, args...)
}

func (d *Docker) cli(ctx context.Context, stdin *bytes.Reader, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, DockerCLIPath, args...)
	// Its own config dir: the CLI never reads or writes the user's ~/.docker.
	cmd.Env = []string{"PATH=" + dockerPATH, "DOCKER_HOST=unix://" + d.Socket(), "DOCKER_CONFIG=" + d.cliConfig()}
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return stdout.String(), fmt.Errorf("docker %s (on %s): %w: %s", strings.Join(args, " "), d.Host.Name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Run is `docker run -d --name <name> busybox <command...>` (e.g. "sleep", "86400"); the
// container's network namespace is attached under the topology's names, so Ping, Do and Run
// work inside it.
func (d *Docker) Run(ctx context.Context, name string, command ...string) (*DockerContainer, error) {
	return d.RunWith(ctx, name, nil, command...)
}

// RunWith is Run with extra `docker run` flags before the image (e.g. "--ip", "10.244.5.9").
func (d *Docker) RunWith(ctx context.Context, name string, flags []string, command ...string) (*DockerContainer, error) {
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return nil, fmt.Errorf("harness: Docker of %s is stopped", d.Host.Name)
	}
	d.seq++
	role := d.Host.Name + "d" + strconv.Itoa(d.seq)
	d.mu.Unlock()

	args := append([]string{"run", "-d", "--name", name}, flags...)
	args = append(append(args, BusyboxImage), command...)
	out, err := d.CLI(ctx, args...)
	if err != nil {
		return nil, fmt.Errorf("harness: %w", err)
	}
	c := &DockerContainer{Docker: d, Name: name, ID: strings.TrimSpace(out)}
	d.mu.Lock()
	d.containers = append(d.containers, c)
	d.mu.Unlock()
	// The docker0 address, else (a container started on another network) that network's.
	out, err = d.CLI(ctx, "inspect", "-f", "{{.State.Pid}} {{.NetworkSettings.IPAddress}}{{range .NetworkSettings.Networks}} {{.IPAddress}}{{end}}", c.ID)
	if err != nil {
		return nil, fmt.Errorf("harness: %w", err)
	}
	fields := strings.Fields(out)
	if len(fields) > 0 {
		c.Pid, _ = strconv.Atoi(fields[0])
	}
	if c.Pid == 0 {
		return nil, fmt.Errorf("harness: container %s on %s: inspect says %q", name, d.Host.Name, out)
	}
	if len(fields) < 2 {
		return nil, fmt.Errorf("harness: container %s on %s has no address: inspect says %q", name, d.Host.Name, out)
	}
	if c.IP, err = netip.ParseAddr(fields[1]); err != nil {
		return nil, fmt.Errorf("harness: container %s on %s: inspect says %q: %w", name, d.Host.Name, out, err)
	}
	ns := &Namespace{Name: d.Host.topo.nsName(role), topo: d.Host.topo}
	d.Host.topo.mu.Lock()
	d.Host.topo.netnsList = append(d.Host.topo.netnsList, ns.Name)
	d.Host.topo.mu.Unlock()
	if b, err := exec.CommandContext(ctx, "ip", "netns", "attach", ns.Name, strconv.Itoa(c.Pid)).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("harness: ip netns attach %s %d: %w: %s", ns.Name, c.Pid, err, strings.TrimSpace(string(b)))
	}
	c.Namespace = ns
	return c, nil
}

// Exec is `docker exec <container> <command...>`; it returns stdout, and an error with stderr
// when the command fails.
func (c *DockerContainer) Exec(ctx context.Context, command ...string) (string, error) {
	return c.Docker.CLI(ctx, append([]string{"exec", c.ID}, command...)...)
}

// Remove is `docker rm -f`: the container is killed and gone, and so is its attached namespace.
func (c *DockerContainer) Remove(ctx context.Context) error {
	_, err := c.Docker.CLI(ctx, "rm", "-f", c.ID)
	if c.Namespace != nil {
		err = errors.Join(err, delNetns(c.Namespace.Name))
	}
	return err
}

// Containers are the containers started with Run, in order (removed ones included).
func (d *Docker) Containers() []*DockerContainer {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*DockerContainer(nil), d.containers...)
}

// Output is what dockerd logged so far.
func (d *Docker) Output() string {
	if d.proc == nil {
		return ""
	}
	return d.proc.Output()
}

// dockerStopGrace bounds dockerd's own shutdown before the harness kills what is left.
const dockerStopGrace = 10 * time.Second

// Stop removes every container (docker rm -f), stops dockerd (SIGTERM; once its containerd has
// exited, dockerd only waits on a reconnect loop, so it is killed then), kills by pid whatever is
// left of this Docker (containerd, shims, container processes in its cgroup), removes its
// cgroups and its directory. The mounts die with dockerd's mount namespace. Safe to call twice.
func (d *Docker) Stop() error {
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return nil
	}
	d.stopped = true
	containers := append([]*DockerContainer(nil), d.containers...)
	d.mu.Unlock()

	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if d.proc != nil && !d.proc.Exited() && len(containers) > 0 {
		ids := []string{"rm", "-f"}
		for _, c := range containers {
			ids = append(ids, c.ID)
		}
		if out, err := d.CLI(ctx, ids...); err != nil && !strings.Contains(err.Error(), "No such container") {
			errs = append(errs, fmt.Errorf("%w (%s)", err, out))
		}
	}
	for _, c := range containers {
		if c.Namespace != nil {
			if err := delNetns(c.Namespace.Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if d.proc != nil {
		_ = syscall.Kill(d.proc.Pid, syscall.SIGTERM)
		deadline := time.Now().Add(dockerStopGrace)
		for !d.proc.Exited() {
			// containerd goes last in dockerd's shutdown; what follows is a reconnect loop.
			if d.containerdPid != 0 && !processAlive(d.containerdPid) {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("harness: dockerd on %s (pid %d) still running %v after SIGTERM:\n%s",
					d.Host.Name, d.proc.Pid, dockerStopGrace, lastLines(d.proc.Output(), 10)))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		_ = d.proc.Kill()
	}
	if err := d.killLeftovers(); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroups(d.cgroupParent); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(d.Dir); err != nil {
		errs = append(errs, fmt.Errorf("harness: remove %s: %w", d.Dir, err))
	}
	return errors.Join(errs...)
}

// processAlive: the process exists and is not a zombie waiting for its parent to reap it.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(fields) > 0 && fields[0] != "Z"
}

// killLeftovers SIGKILLs this Docker's containerd, its shims (their command line names our
// exec root) and every process in its cgroups, and waits until they are gone.
func (d *Docker) killLeftovers() error {
	find := func() []int {
		pids := map[int]bool{}
		if d.containerdPid != 0 && processAlive(d.containerdPid) {
			pids[d.containerdPid] = true
		}
		for _, pid := range cgroupProcs(d.cgroupParent) {
			pids[pid] = processAlive(pid)
		}
		procs, _ := os.ReadDir("/proc")
		marker := []byte(d.execRoot() + "/")
		for _, p := range procs {
			pid, err := strconv.Atoi(p.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			if cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline")); err == nil && bytes.Contains(cmdline, marker) && processAlive(pid) {
				pids[pid] = true
			}
		}
		var out []int
		for pid, live := range pids {
			if live {
				out = append(out, pid)
			}
		}
		slices.Sort(out)
		return out
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids := find()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("harness: processes %v of the Docker of %s still alive after SIGKILL", pids, d.Host.Name)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cgroupDirs are the directories of a cgroup parent in every mounted hierarchy (cgroup v1
// controllers and the v2 unified tree).
func cgroupDirs(parent string) []string {
	var dirs []string
	for _, pattern := range []string{"/sys/fs/cgroup/" + parent, "/sys/fs/cgroup/*/" + parent} {
		m, _ := filepath.Glob(pattern)
		dirs = append(dirs, m...)
	}
	return dirs
}

func cgroupProcs(parent string) []int {
	var pids []int
	for _, dir := range cgroupDirs(parent) {
		_ = filepath.WalkDir(dir, func(path string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
				return nil
			}
			f, err := os.Open(path)
			if err != nil {
				return nil
			}
			defer f.Close()
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if pid, err := strconv.Atoi(strings.TrimSpace(sc.Text())); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// removeCgroups removes a cgroup parent and the containers' cgroups below it, deepest first.
func removeCgroups(parent string) error {
	var errs []error
	for _, dir := range cgroupDirs(parent) {
		var sub []string
		_ = filepath.WalkDir(dir, func(path string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				sub = append(sub, path)
			}
			return nil
		})
		for i := len(sub) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(sub[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("harness: rmdir cgroup %s: %w", sub[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// StartDockerForTest starts a Docker on each host from the docker opts file xnetd wrote there,
// all at once, and stops them in t.Cleanup (also when the test fails). It skips the test with
// the reason when real Docker is not installed, and logs each dockerd's output if the test
// failed.
func StartDockerForTest(tb testing.TB, hosts ...*Host) []*Docker {
	tb.Helper()
	if why := DockerMissing(); why != "" {
		tb.Skip("harness: " + why)
	}
	ds := make([]*Docker, len(hosts))
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), dockerStartTimeout)
			defer cancel()
			ds[i], errs[i] = h.StartDockerFromOptsFile(ctx)
		}()
	}
	wg.Wait()
	for _, d := range ds {
		if d == nil {
			continue
		}
		tb.Cleanup(func() {
			if tb.Failed() {
				tb.Logf("dockerd on %s (pid %d, %s) said, last lines:\n%s", d.Host.Name, d.proc.Pid, d.StorageDriver, lastLines(d.Output(), 20))
			}
			if err := d.Stop(); err != nil {
				tb.Errorf("stop Docker of %s: %v", d.Host.Name, err)
			}
		})
	}
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
	return ds
}

// lastLines is the end of a log, at most n lines.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
