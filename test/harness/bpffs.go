package harness

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Each host gets a bpffs instance of its own, mounted in its state directory, rather than a
// directory under /sys/fs/bpf: a machine need not have /sys/fs/bpf mounted (this VM does not),
// mounting it there would change the whole machine for every other user, and a private
// instance cannot collide with another run's pins. xnetd gets the mount point as --bpffs.

func mountBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", dir, err)
	}
	return nil
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Field 5 is the mount point (octal escapes for spaces; our paths have none).
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := fields[4]
		if mp == dir || strings.HasPrefix(mp, dir+string(filepath.Separator)) {
			points = append(points, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	slices.Sort(points)
	for i := len(points) - 1; i >= 0; i-- {
		if err := unix.Unmount(points[i], unix.MNT_DETACH); err != nil && err != unix.EINVAL {
			return fmt.Errorf("unmount %s: %w", points[i], err)
		}
	}
	return nil
}
