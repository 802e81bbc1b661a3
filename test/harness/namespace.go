package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"
)

// netnsDir is where iproute2 keeps named network namespaces (bind mounts of nsfs files).
const netnsDir = "/run/netns"

// Namespace is one named network namespace of a topology: /run/netns/<Name>.
type Namespace struct {
	Name string
	topo *Topology
}

// Role is the name without the run prefix: "u", "h1", "h1c2".
func (n *Namespace) Role() string {
	if n.topo == nil {
		return n.Name
	}
	return strings.TrimPrefix(n.Name, nsPrefix+n.topo.id+"-")
}

// Path is the namespace's nsfs bind mount, for nsenter --net and netns.GetFromPath.
func (n *Namespace) Path() string { return filepath.Join(netnsDir, n.Name) }

// command builds a command that runs name inside the namespace, in its own process group.
func (n *Namespace) command(name string, args ...string) *exec.Cmd {
	full := append([]string{"--net=" + n.Path(), "--", name}, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// Run runs a command inside the namespace and returns its stdout. The error names the command
// and includes its stderr.
func (n *Namespace) Run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := n.command(name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("in netns %s: start %s: %w", n.Name, name, err)
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			// Kill the whole group: nsenter execs the command, so the group is the command and
			// whatever it forked.
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		case <-done:
		}
	}()
	err := cmd.Wait()
	close(done)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return stdout.String(), fmt.Errorf("in netns %s: %s %s: %w: %s", n.Name, name,
			strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Start runs a command inside the namespace in the background, capturing stdout and stderr.
// The topology stops it on Close if the caller has not.
func (n *Namespace) Start(name string, args ...string) (*Process, error) {
	return n.startCmd(n.command(name, args...))
}

func (n *Namespace) startCmd(cmd *exec.Cmd) (*Process, error) {
	p := &Process{cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = &p.out, &p.out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("in netns %s: start %s: %w", n.Name, strings.Join(cmd.Args, " "), err)
	}
	p.Pid = cmd.Process.Pid
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if n.topo != nil {
		n.topo.track(p)
	}
	return p, nil
}

// Do runs fn on an OS thread switched into the namespace. Sockets and netlink handles that fn
// creates stay in the namespace after Do returns. If the thread cannot be switched back, it is
// left locked so the Go runtime destroys it instead of reusing a thread in the wrong namespace.
func (n *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(n.Path())
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns %s: %w", n.Path(), err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", n.Name, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Stay locked: the thread dies with this goroutine.
			errc <- fmt.Errorf("return from netns %s: %w (fn: %v)", n.Name, err, ferr)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Sysctl sets a network sysctl of this namespace, e.g. Sysctl("net.ipv4.ip_forward", "1").
// /proc/sys/net shows the namespace of the thread that opens it, hence Do.
func (n *Namespace) Sysctl(key, value string) error {
	path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	err := n.Do(func() error { return os.WriteFile(path, []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("in netns %s: sysctl %s=%s: %w", n.Name, key, value, err)
	}
	return nil
}

// IP runs iproute2 commands in the namespace as one batch (`ip -n <ns> -batch -`), one command
// per line without the leading "ip". It stops at the first failing line and names it.
func (n *Namespace) IP(ctx context.Context, lines ...string) error {
	return ipBatch(ctx, n.Name, lines...)
}

func ipBatch(ctx context.Context, ns string, lines ...string) error {
	if len(lines) == 0 {
		return nil
	}
	cmd := exec.CommandContext(ctx, "ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip -n %s: %w: %s (commands: %q)", ns, err, strings.TrimSpace(string(out)), lines)
	}
	return nil
}

// addNetns creates a named namespace with its loopback up.
func addNetns(ctx context.Context, name string) error {
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return ipBatch(ctx, name, "link set lo up")
}

// delNetns removes a named namespace; the kernel frees it (and its links) once no process and
// no open file refers to it.
func delNetns(name string) error {
	out, err := exec.Command("ip", "netns", "del", name).CombinedOutput()
	if err != nil {
		if _, statErr := os.Stat(filepath.Join(netnsDir, name)); os.IsNotExist(statErr) {
			return nil
		}
		return fmt.Errorf("ip netns del %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}
