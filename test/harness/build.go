package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// XnetdPackage is the import path BuildXnetd builds.
const XnetdPackage = "github.com/xnet-dev/xnet/cmd/xnetd"

// Build builds xnetd into dir and returns the binary's path. It runs `go build` from the
// current directory, which must be inside the module (true for tests and `go run`).
func Build(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "xnetd")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, XnetdPackage)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", XnetdPackage, err, b)
	}
	return out, nil
}

// BuildXnetd builds xnetd once per test binary and returns its path; every test of the binary
// shares the build. The build lives in $TMPDIR/xnet-xnetd-<pid>-<start time>, guarded by a
// file lock; directories of test binaries that are gone are removed on the way. (A file, not a
// package variable, holds the result, so the package keeps no mutable state.)
func BuildXnetd(tb testing.TB) string {
	tb.Helper()
	self, err := processKey(os.Getpid())
	if err != nil {
		tb.Fatalf("harness: %v", err)
	}
	removeBuildsOfDeadProcesses()
	dir := filepath.Join(os.TempDir(), buildDirPrefix+self)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatalf("harness: build dir: %v", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatalf("harness: build lock: %v", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		tb.Fatalf("harness: build lock: %v", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	bin := filepath.Join(dir, "xnetd")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		tb.Fatalf("harness: %v", err)
	}
	built, err := Build(ctx, tmp)
	if err != nil {
		tb.Fatalf("harness: %v", err)
	}
	if err := os.Rename(built, bin); err != nil {
		tb.Fatalf("harness: %v", err)
	}
	os.RemoveAll(tmp)
	return bin
}

const buildDirPrefix = "xnet-xnetd-"

// processKey names a process uniquely over time: pid plus start time (pids are reused).
func processKey(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// Field 22 (starttime) counted after the ")" that ends the command name.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 20 {
		return "", fmt.Errorf("short /proc/%d/stat", pid)
	}
	return strconv.Itoa(pid) + "-" + fields[19], nil
}

func removeBuildsOfDeadProcesses() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), buildDirPrefix+"*"))
	for _, d := range dirs {
		key := strings.TrimPrefix(filepath.Base(d), buildDirPrefix)
		pid, err := strconv.Atoi(strings.SplitN(key, "-", 2)[0])
		if err != nil {
			continue
		}
		if live, err := processKey(pid); err == nil && live == key {
			continue
		}
		os.RemoveAll(d)
	}
}
