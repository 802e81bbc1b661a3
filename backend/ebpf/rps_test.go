package ebpf

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/test/harness"
)

func TestCPUListMask(t *testing.T) {
	for _, tt := range []struct{ list, want string }{
		{"0\n", "00000001"},
		{"0-1\n", "00000003"},
		{"0-3,8", "0000010f"},
		{"0-31", "ffffffff"},
		{"0,32-33", "00000003,00000001"},
		{"4-5,64", "00000001,00000000,00000030"},
	} {
		got, err := cpuListMask(tt.list)
		if err != nil || got != tt.want {
			t.Errorf("cpuListMask(%q) = %q, %v; want %q", tt.list, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "x", "3-1", "-1", "0-"} {
		if got, err := cpuListMask(bad); err == nil {
			t.Errorf("cpuListMask(%q) = %q, want an error", bad, got)
		}
	}
	if maskValue("00000000,00000003") != maskValue("3") || maskValue("00000000") != "0" || maskValue("3") == maskValue("1") {
		t.Error("maskValue does not compare masks of different widths by value")
	}
}

// With --flow-steering=rps every container veth gets RPS over all CPUs, the veths that exist
// at Setup and the ones that come later, but not one whose mask the administrator set; a
// teardown gives the masks back. Without it the veths are left alone.
func TestFlowSteeringSetsRPSOnContainerVeths(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 1})
	h := topo.Hosts()[0]
	lease := vxlanLease(t, "10.244.1.0/24", h.UnderlayIP.String())
	mask, err := rpsMask()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromPath(h.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	rps := func(veth string) string {
		t.Helper()
		m, err := readRPS(ns, veth)
		if err != nil {
			t.Fatal(err)
		}
		return maskValue(m)
	}
	waitRPS := func(veth, want string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); rps(veth) != maskValue(want); {
			if time.Now().After(deadline) {
				t.Fatalf("rps_cpus of %s is %s, want %s", veth, rps(veth), maskValue(want))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	start := func(steering string) *Backend {
		t.Helper()
		iface, err := conformance.Underlay(h)
		if err != nil {
			t.Fatal(err)
		}
		opts := backend.Options{Iface: iface, Config: testConfig, Decap: DecapTC, BPFFS: h.BPFFS, FlowSteering: steering, Logger: harness.TestLogger(t)}
		var b *Backend
		if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = b.Close(true) })
		if err := b.Setup(t.Context(), lease, testConfig); err != nil {
			t.Fatal(err)
		}
		return b
	}

	if err := h.SetupDocker0(netip.MustParsePrefix("10.244.1.1/24"), 1450); err != nil {
		t.Fatal(err)
	}
	before, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	admin, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	if err := setRPS(ns, []string{admin.Veth}, "0", "1"); err != nil {
		t.Fatal(err)
	}

	b := start(FlowSteeringRPS)
	if mode, why := b.Mode(); !strings.Contains(mode, "flow steering rps") || !strings.Contains(why, mask) {
		t.Errorf("Mode() = %q, %q; want it to name flow steering and the mask %s", mode, why, mask)
	}
	waitRPS(before.Veth, mask)
	after, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	waitRPS(after.Veth, mask)
	if got := rps(admin.Veth); got != "1" {
		t.Errorf("the administrator's rps_cpus 1 on %s became %s", admin.Veth, got)
	}

	if err := b.Close(true); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*harness.Container{before, after} {
		if got := rps(c.Veth); got != "0" {
			t.Errorf("after teardown rps_cpus of %s is %s, want 0", c.Veth, got)
		}
	}
	if got := rps(admin.Veth); got != "1" {
		t.Errorf("teardown changed the administrator's rps_cpus on %s to %s", admin.Veth, got)
	}

	b = start(FlowSteeringOff)
	late, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		b.mu.Lock()
		n := len(b.veths)
		b.mu.Unlock()
		if n == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d container veths with the encap program, want 4", n)
		}
	}
	for _, c := range []*harness.Container{before, after, late} {
		if got := rps(c.Veth); got != "0" {
			t.Errorf("without flow steering rps_cpus of %s is %s, want 0", c.Veth, got)
		}
	}
}

// readRPS returns rx-0/rps_cpus of the named interface of ns.
func readRPS(ns netns.NsHandle, name string) (string, error) {
	var mask string
	err := inSysfs(ns, func(sys string) error {
		raw, err := os.ReadFile(filepath.Join(sys, "class/net", name, "queues/rx-0/rps_cpus"))
		mask = strings.TrimSpace(string(raw))
		return err
	})
	return mask, err
}
