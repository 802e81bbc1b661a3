package bpf

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// On a kernel that refuses bpf_xdp_adjust_meta, decap_xdp cannot load and the table tests run
// TC alone. The rest of decap_xdp must still pass the verifier, or a change would only be
// noticed on a kernel that has the helper: load it with the helper call replaced by "the
// helper succeeded" (r0 = 0), only to verify it; it never runs.
func TestDecapXDPPassesTheVerifierWithoutMetadata(t *testing.T) {
	requireRoot(t)
	if xdpMetaSupported() == nil {
		t.Skip("this kernel loads decap_xdp as it is: the table tests run it")
	}
	spec, err := LoadXnet()
	must(t, err)
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	prog := spec.Programs["decap_xdp"]
	replaced := 0
	for i := range prog.Instructions {
		ins := &prog.Instructions[i]
		if ins.IsBuiltinCall() && ins.Constant == int64(asm.FnXdpAdjustMeta) {
			*ins = asm.Mov.Imm(asm.R0, 0).WithMetadata(ins.Metadata)
			replaced++
		}
	}
	if replaced != 1 {
		t.Fatalf("found %d calls of bpf_xdp_adjust_meta in decap_xdp, want 1", replaced)
	}
	var objs struct {
		DecapXdp *ebpf.Program `ebpf:"decap_xdp"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("verifier: %+v", ve)
		}
		t.Fatal(err)
	}
	objs.DecapXdp.Close()
}
