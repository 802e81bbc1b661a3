package loader

import (
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
)

func TestProbeEncapsulatesATestPacket(t *testing.T) {
	requireRoot(t)
	if err := Probe(); err != nil {
		t.Fatalf("Probe on this kernel (which runs the datapath): %v", err)
	}
}

// The probe must say no when the encapsulation does not happen, not only when loading fails:
// a datapath whose encap program passes the packet on untouched is as useless as none.
func TestProbeRefusesAnEncapThatDoesNotRedirect(t *testing.T) {
	requireRoot(t)
	spec, err := bpf.LoadXnet()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs struct {
		tcPrograms
		bpf.XnetMaps
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(err)
	}
	defer objs.EncapContainer.Close()
	defer objs.EncapHost.Close()
	defer objs.DecapTc.Close()
	defer objs.DeliverBridge.Close()
	defer objs.XnetMaps.Close()
	// decap_tc passes a container packet untouched (it is not VXLAN for us): what an encap
	// program on a kernel that cannot grow the packet would amount to.
	err = probeEncap(objs.DecapTc, maps.FromObjects(&objs.XnetMaps))
	if err == nil || !strings.Contains(err.Error(), "not TC_ACT_REDIRECT") {
		t.Fatalf("probe of a program that does not encapsulate: %v, want a refusal naming TC_ACT_REDIRECT", err)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
}
