package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// standardBPFFS is where bpffs is normally mounted; a host without it gets it mounted there.
const standardBPFFS = "/sys/fs/bpf"

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// ensureBPFFS makes dir a directory on a bpffs, mounting one if there is none:
// on /sys/fs/bpf when dir is below it (sysfs allows no directories of ours), else on dir itself.
func ensureBPFFS(dir string, log *slog.Logger) error {
	dir = filepath.Clean(dir)
	existing := dir
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	if !isBPFFS(existing) {
		target := dir
		if existing == standardBPFFS || (existing == filepath.Dir(standardBPFFS) && isBelow(dir, standardBPFFS)) {
			target = standardBPFFS
		}
		if target == dir {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("create %s for bpffs: %w", dir, err)
			}
			if entries, _ := os.ReadDir(dir); len(entries) > 0 {
				return fmt.Errorf("--bpffs %s is not on a bpffs and not empty: mount bpffs there (mount -t bpf bpf %s) or pick another directory", dir, dir)
			}
		}
		if err := unix.Mount("bpf", target, "bpf", 0, "mode=0700"); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount bpffs on %s: %w", target, err)
		}
		log.Info("mounted bpffs", "path", target)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create pin directory %s: %w", dir, err)
	}
	if !isBPFFS(dir) {
		return fmt.Errorf("pin directory %s is not on a bpffs after mounting", dir)
	}
	return nil
}

func isBelow(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && (len(rel) < 3 || rel[:3] != "../")
}
