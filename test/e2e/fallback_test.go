package e2e

// The auto fallback of docs/design.md, Choosing a backend, end to end: the real xnetd binary on a host that
// genuinely cannot run the ebpf or the kernel VXLAN backend, without mocks, and an ordinary
// xnetd on the other host, which picks ebpf: a mixed udp + ebpf cluster. What the restricted
// host lacks is confined to its one xnetd process:
//   - VXLAN: in a mount namespace of its own, an empty tmpfs lies over /sys/module and over
//     /lib/modules/<release> (where that exists), the two places the vxlan backend's probe
//     looks, so the host looks like a kernel built without CONFIG_VXLAN.
//   - BPF, one of two ways (fbWays): a seccomp filter that answers EPERM to bpf(), as a
//     container runtime's default profile does; or CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON
//     out of the bounding set, as in a container granted only CAP_NET_ADMIN (this machine
//     has kernel.unprivileged_bpf_disabled set, so bpf() then answers EPERM too; a test must
//     not change that global sysctl). CAP_NET_ADMIN stays either way: the udp backend needs
//     it for the TUN device and routes.
// Helpers here are prefixed fb.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// Capability numbers from linux/capability.h.
const (
	fbCapNetAdmin = 12
	fbCapSysAdmin = 21
	fbCapPerfmon  = 38
	fbCapBPF      = 39
)

// fbExecEnv makes this test binary, re-executed with it, install the seccomp filter that
// refuses bpf() and exec the command in its arguments (see init below).
const fbExecEnv = "XNET_E2E_FALLBACK_EXEC"

// init is the helper process of the seccomp way: the filter belongs to the thread that
// installs it and survives execve, so the thread installs it and execs xnetd in place (same
// pid, nothing else of the test binary runs).
func init() {
	if os.Getenv(fbExecEnv) != "no-bpf" {
		return
	}
	runtime.LockOSThread()
	err := fbDenyBPF()
	if err == nil {
		os.Unsetenv(fbExecEnv)
		err = syscall.Exec(os.Args[1], os.Args[1:], os.Environ())
	}
	fmt.Fprintf(os.Stderr, "%s helper: %v\n", fbExecEnv, err)
	os.Exit(111)
}

// fbDenyBPF installs on the calling thread a seccomp filter under which bpf() fails with EPERM
// and every other system call runs as before.
func fbDenyBPF() error {
	var arch uint32
	switch runtime.GOARCH {
	case "amd64":
		arch = unix.AUDIT_ARCH_X86_64
	case "arm64":
		arch = unix.AUDIT_ARCH_AARCH64
	default:
		return fmt.Errorf("no seccomp audit arch known for GOARCH %s", runtime.GOARCH)
	}
	// struct seccomp_data: int nr at offset 0, u32 arch at offset 4.
	filter := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 4},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: arch, Jt: 0, Jf: 3},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: unix.SYS_BPF, Jt: 0, Jf: 1},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_SECCOMP): %w", err)
	}
	return nil
}

// fbStatus is the part of `xnetd status --output json` about the backend choice.
type fbStatus struct {
	Running         bool   `json:"running"`
	Ready           bool   `json:"ready"`
	Backend         string `json:"backend"`
	Mode            string `json:"mode"`
	SkippedBackends []struct {
		Name   string `json:"name"`
		Reason string `json:"reason"`
	} `json:"skipped_backends"`
	Verdicts map[string]uint64 `json:"verdicts"`
}

// fbWay is one way of taking BPF away from xnetd.
type fbWay struct {
	name string
	// prefix goes between `env -i PATH=...` and the xnetd command line.
	prefix func(t *testing.T) []string
	// check says, from /proc/<pid>/status, that xnetd runs restricted as intended.
	check func(t *testing.T, status map[string]string)
}

func fbWays() []fbWay {
	return []fbWay{
		{
			name: "seccomp refuses bpf()",
			prefix: func(t *testing.T) []string {
				self, err := os.Executable()
				if err != nil {
					t.Fatal(err)
				}
				return []string{fbExecEnv + "=no-bpf", self}
			},
			check: func(t *testing.T, st map[string]string) {
				if st["Seccomp"] != "2" || st["Seccomp_filters"] != "1" {
					t.Errorf("xnetd Seccomp %q filters %q, want 2 (filter mode) with 1 filter", st["Seccomp"], st["Seccomp_filters"])
				}
				// Every capability is still there: the refusal is the filter's alone.
				fbCheckCaps(t, st, "CapEff", map[string]int{"CAP_NET_ADMIN": fbCapNetAdmin, "CAP_BPF": fbCapBPF, "CAP_SYS_ADMIN": fbCapSysAdmin}, nil)
			},
		},
		{
			name: "no CAP_BPF, CAP_SYS_ADMIN or CAP_PERFMON",
			prefix: func(t *testing.T) []string {
				return []string{"setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-sys_admin,-perfmon", "--"}
			},
			check: func(t *testing.T, st map[string]string) {
				gone := map[string]int{"CAP_BPF": fbCapBPF, "CAP_SYS_ADMIN": fbCapSysAdmin, "CAP_PERFMON": fbCapPerfmon}
				fbCheckCaps(t, st, "CapEff", map[string]int{"CAP_NET_ADMIN": fbCapNetAdmin}, gone)
				fbCheckCaps(t, st, "CapBnd", nil, gone)
			},
			// udp.New must not need CAP_SYS_ADMIN (it once called setns(2) into its own
			// namespace through netlink.NewHandleAt): this case fails if it does again.
		},
	}
}

func TestAutoFallsBackToUDPWhereNeitherBPFNorVXLANCanRun(t *testing.T) {
	for _, tool := range []string{"setpriv", "unshare", "env"} {
		if _, err := exec.LookPath(tool); err != nil {
			// setpriv and unshare are util-linux, which every Debian system has (Essential).
			t.Skipf("%s not installed: it is what takes BPF and the vxlan module away from one xnetd", tool)
		}
	}
	for _, way := range fbWays() {
		t.Run(way.name, func(t *testing.T) { fbFallback(t, way) })
	}
}

func fbFallback(t *testing.T, way fbWay) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2, WithEtcd: true})
	// The shared config names ebpf, which means auto: each host runs what it can.
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	bin := harness.BuildXnetd(t)
	hosts := topo.Hosts()

	crippled := &xnetdtest.Node{Host: hosts[0], Bin: bin}
	crippled.Proc = fbStartWithoutBPFOrVXLAN(t, crippled.Host, way.prefix(t), bin)
	crippled.WaitReady(t)
	normal := &xnetdtest.Node{Host: hosts[1], Bin: bin}
	normal.StartDaemon(t)
	normal.WaitReady(t)
	nodes := []*xnetdtest.Node{crippled, normal}
	for _, n := range nodes {
		n.WaitPeers(t, 1)
	}

	t.Run("the restricted xnetd really lacks BPF and the vxlan module", func(t *testing.T) {
		st := fbProcStatus(t, crippled.Proc.Pid)
		way.check(t, st)
		// /proc/<pid>/root walks the process's own mount namespace.
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/root/sys/module/vxlan", crippled.Proc.Pid)); !os.IsNotExist(err) {
			t.Errorf("xnetd (pid %d) still sees /sys/module/vxlan (stat: %v)", crippled.Proc.Pid, err)
		}
	})

	t.Run("auto skipped ebpf and vxlan, saying why, and chose udp", func(t *testing.T) {
		var s fbStatus
		crippled.StatusInto(t, &s)
		if !s.Running || !s.Ready || s.Backend != subnetmgr.BackendUDP {
			t.Errorf("status running=%v ready=%v backend=%q, want running, ready, udp", s.Running, s.Ready, s.Backend)
		}
		want := []struct{ name, reason string }{
			{subnetmgr.BackendEBPF, "the kernel does not let xnetd load BPF"},
			{subnetmgr.BackendVXLAN, "kernel has no vxlan support"},
		}
		if len(s.SkippedBackends) != len(want) {
			t.Fatalf("skipped %+v, want ebpf then vxlan", s.SkippedBackends)
		}
		for i, w := range want {
			got := s.SkippedBackends[i]
			t.Logf("skipped %s: %s", got.Name, got.Reason)
			if got.Name != w.name || !strings.Contains(got.Reason, w.reason) {
				t.Errorf("skipped[%d] = %s: %q, want %s: ...%s...", i, got.Name, got.Reason, w.name, w.reason)
			}
		}
		// The refusal is the kernel's permission check, not some other failure to load.
		if r := s.SkippedBackends[0].Reason; !strings.Contains(r, "operation not permitted") {
			t.Errorf("ebpf was skipped for %q, want the kernel's EPERM (operation not permitted)", r)
		}
		log := crippled.Proc.Output()
		for _, line := range []string{
			`msg="backend skipped" backend=ebpf`,
			`msg="backend skipped" backend=vxlan`,
			`msg="backend chosen" backend=udp`,
		} {
			if !strings.Contains(log, line) {
				t.Errorf("xnetd log lacks %q:\n%s", line, log)
			}
		}
	})

	t.Run("the unrestricted host chose ebpf", func(t *testing.T) {
		var s fbStatus
		normal.StatusInto(t, &s)
		if s.Backend != subnetmgr.BackendEBPF || len(s.SkippedBackends) != 0 {
			t.Errorf("backend %q skipped %+v, want ebpf with nothing skipped", s.Backend, s.SkippedBackends)
		}
	})

	cs := xnetdtest.Containers(t, nodes)
	t.Run("containers on the udp and the ebpf host reach each other both ways", func(t *testing.T) {
		var before fbStatus
		crippled.StatusInto(t, &before)
		for _, pair := range [][2]*harness.Container{{cs[0], cs[1]}, {cs[1], cs[0]}} {
			from, to := pair[0], pair[1]
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			sent, got, err := harness.Ping(ctx, from.Namespace, to.IP, 3, 50*time.Millisecond)
			cancel()
			t.Logf("ping %s(%v) -> %s(%v): %d/%d replies", from.Host.Name, from.IP, to.Host.Name, to.IP, got, sent)
			if err != nil || sent == 0 || got != sent {
				t.Errorf("ping %s(%v) -> %s(%v): %d/%d replies, %v", from.Host.Name, from.IP, to.Host.Name, to.IP, got, sent, err)
			}
		}
		// The packets went through the user-space datapath of the udp host, each way.
		var after fbStatus
		crippled.StatusInto(t, &after)
		for _, v := range []string{"encap", "decap"} {
			if d := after.Verdicts[v] - before.Verdicts[v]; d < 6 {
				t.Errorf("udp host counted %d %s packets during 6 pings and 6 replies, want >= 6 (verdicts %v)", d, v, after.Verdicts)
			}
		}
	})
}

// fbStartWithoutBPFOrVXLAN starts xnetd on h with the flags StartXnetd passes, in a mount
// namespace of its own where /sys/module and /lib/modules/<release> are empty, behind prefix
// (what takes BPF away). Every step execs the next, so the returned process is xnetd itself
// and the mount namespace ends with it. The environment is emptied (PATH aside), as
// StartXnetd drops XNETD_*: nothing of the developer's shell changes what runs.
func fbStartWithoutBPFOrVXLAN(t *testing.T, h *harness.Host, prefix []string, bin string) *harness.Process {
	t.Helper()
	const script = `set -e
mount -t tmpfs -o size=64k,mode=755 xnet-no-modules /sys/module
rel=/lib/modules/$(uname -r)
if [ -d "$rel" ]; then mount -t tmpfs -o size=64k,mode=755 xnet-no-modules "$rel"; fi
exec env -i PATH="$PATH" "$@"`
	args := []string{"-m", "--propagation", "private", "sh", "-c", script, "fallback"}
	args = append(append(append(args, prefix...), bin), h.XnetdArgs()...)
	p, err := h.Start("unshare", args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.Stop()
		if t.Failed() {
			t.Logf("restricted xnetd on %s (pid %d) said:\n%s", h.Name, p.Pid, p.Output())
		}
	})
	return p
}

// fbProcStatus is /proc/<pid>/status as key: value.
func fbProcStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	st := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			st[k] = strings.TrimSpace(v)
		}
	}
	return st
}

// fbCheckCaps checks that the capability set named set (CapEff, CapBnd) holds every
// capability of have and none of gone.
func fbCheckCaps(t *testing.T, st map[string]string, set string, have, gone map[string]int) {
	t.Helper()
	caps, err := strconv.ParseUint(st[set], 16, 64)
	if err != nil {
		t.Fatalf("%s %q: %v", set, st[set], err)
	}
	for name, c := range have {
		if caps&(1<<c) == 0 {
			t.Errorf("xnetd lacks %s in %s %x", name, set, caps)
		}
	}
	for name, c := range gone {
		if caps&(1<<c) != 0 {
			t.Errorf("xnetd has %s in %s %x", name, set, caps)
		}
	}
}
