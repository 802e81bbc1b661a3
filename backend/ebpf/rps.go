package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Flow steering on the container veths (--flow-steering=rps; docs/design.md, "One flow, one
// CPU").
//
// A container's packets enter the host through its veth's per-CPU backlog: the CPU that sent
// them processes them. A TCP sender sends from more than one CPU (its own system calls, and
// the softirq that handles the ACKs its peer's reader sends from another CPU), so one flow's
// segments run through two backlogs at once and a later one can overtake an earlier one. The
// receiver sees reordering, and the sender's RACK takes some of it for loss: those
// retransmits are spurious (they come back as D-SACKs and are undone).
//
// RPS on the host side of the veth puts every packet of a flow into the backlog of the one CPU
// its flow hash picks, so the flow keeps its order from the container to the wire. It costs
// an inter-processor interrupt whenever that CPU is not the sender's, and it takes the spread
// of work away from the scheduler: on the 2-CPU test machine it removed every retransmit and
// cost four TCP streams a quarter to a third of their throughput, so it is a choice, off by
// default.

// rpsMask is the rps_cpus value covering every online CPU.
func rpsMask() (string, error) {
	raw, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		return "", fmt.Errorf("read online CPUs: %w", err)
	}
	return cpuListMask(string(raw))
}

// cpuListMask turns a CPU list as the kernel prints it ("0-3,8") into a CPU mask as it parses
// one: hex words of 32 CPUs, the highest first, comma-separated.
func cpuListMask(list string) (string, error) {
	var words []uint32
	for _, part := range strings.Split(strings.TrimSpace(list), ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		first, err := strconv.Atoi(lo)
		last := first
		if err == nil && isRange {
			last, err = strconv.Atoi(hi)
		}
		if err != nil || first < 0 || last < first || last >= 1<<16 {
			return "", fmt.Errorf("CPU list %q: %q is not a CPU or a range of them", strings.TrimSpace(list), part)
		}
		for cpu := first; cpu <= last; cpu++ {
			for len(words) <= cpu/32 {
				words = append(words, 0)
			}
			words[cpu/32] |= 1 << (cpu % 32)
		}
	}
	out := make([]string, len(words))
	for i, w := range words {
		out[len(words)-1-i] = fmt.Sprintf("%08x", w)
	}
	return strings.Join(out, ","), nil
}

// maskValue is a CPU mask as a number-like string without separators and leading zeros, so
// masks printed with different widths compare equal ("00000000,00000003" and "3").
func maskValue(mask string) string {
	v := strings.TrimLeft(strings.ReplaceAll(strings.TrimSpace(mask), ",", ""), "0")
	if v == "" {
		return "0"
	}
	return v
}

// setRPS sets rx-0/rps_cpus of each named interface of the namespace ns to mask where it now
// holds from, and leaves it alone otherwise: a mask the administrator chose stays, and a
// teardown gives back only what xnet set. /sys shows the devices of the namespace it was
// mounted in, which need not be ns (a test host entered with nsenter --net keeps the
// machine's /sys), so the work happens on a thread of its own that enters ns and a private
// mount namespace and mounts a sysfs of ns over /sys there; the thread is discarded
// afterwards, and nothing else sees that mount. An interface that went away is skipped.
func setRPS(ns netns.NsHandle, names []string, from, mask string) error {
	if len(names) == 0 {
		return nil
	}
	return inSysfs(ns, func(sys string) error {
		var errs []error
		for _, name := range names {
			path := filepath.Join(sys, "class/net", name, "queues/rx-0/rps_cpus")
			cur, err := os.ReadFile(path)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err == nil && maskValue(string(cur)) == maskValue(from) {
				err = os.WriteFile(path, []byte(mask), 0)
			}
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
			}
		}
		return errors.Join(errs...)
	})
}

// inSysfs runs fn with the path of a sysfs that shows the devices of ns (see setRPS).
func inSysfs(ns netns.NsHandle, fn func(sys string) error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, namespaces and all.
		runtime.LockOSThread()
		errc <- func() error {
			if err := netns.Set(ns); err != nil {
				return fmt.Errorf("enter network namespace: %w", err)
			}
			if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
				return fmt.Errorf("private mount namespace: %w", err)
			}
			if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
				return fmt.Errorf("make mounts private: %w", err)
			}
			if err := unix.Mount("sysfs", "/sys", "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
				return fmt.Errorf("mount sysfs: %w", err)
			}
			return fn("/sys")
		}()
	}()
	if err := <-errc; err != nil {
		return fmt.Errorf("ebpf: flow steering (RPS) on container veths: %w", err)
	}
	return nil
}
