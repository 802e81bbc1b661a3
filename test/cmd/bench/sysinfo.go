package main

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func netipAddrPort(a netip.Addr, port int) netip.AddrPort { return netip.AddrPortFrom(a, uint16(port)) }

// systemInfo is what a reader needs to compare two results files.
type systemInfo struct {
	Kernel   string            `json:"kernel"`
	CPUs     int               `json:"cpus"`
	CPUModel string            `json:"cpu_model"`
	Tools    map[string]string `json:"tools"`
	Started  time.Time         `json:"started"`
}

func collectSystemInfo(ctx context.Context, xnetd string) systemInfo {
	info := systemInfo{CPUs: runtime.NumCPU(), Tools: map[string]string{"go": runtime.Version()}, Started: time.Now().UTC()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		info.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				info.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	first := func(name string, args ...string) string {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, name, args...).Output()
		if err != nil && len(out) == 0 {
			return "unknown (" + err.Error() + ")"
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return line
	}
	info.Tools["iperf3"] = first("iperf3", "--version")
	info.Tools["iproute2"] = first("ip", "-V")
	if xnetd != "" {
		info.Tools["xnetd"] = first(xnetd, "version")
	}
	return info
}
