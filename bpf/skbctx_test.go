package bpf

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/cilium/ebpf"
)

// skbContext is struct __sk_buff (uapi bpf.h) as BPF_PROG_TEST_RUN takes it: a SCHED_CLS test
// run may set ifindex (the device the packet arrives on), mark, priority, cb, tstamp, wire_len,
// gso_segs and gso_size; everything else must be zero. BPF_PROG_TEST_RUN gets it through
// encoding/binary, which adds no alignment padding: the blank fields are the C struct's.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTci, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TcIndex                                  uint32
	Cb                                                                          [5]uint32
	Hash, TcClassid, Data, DataEnd, NapiID, Family, RemoteIP4, LocalIP4         uint32
	RemoteIP6, LocalIP6                                                         [4]uint32
	RemotePort, LocalPort, DataMeta                                             uint32
	FlowKeys, Tstamp                                                            uint64
	WireLen, GsoSegs                                                            uint32
	Sk                                                                          uint64
	GsoSize                                                                     uint32
	TstampType                                                                  uint8
	_                                                                           [3]uint8
	Hwtstamp                                                                    uint64
}

// Offsets in struct __sk_buff, for programs written with package asm.
const (
	skbLen     = 0
	skbData    = 76
	skbDataEnd = 80
)

// runCtx is run with a context: the packet arrives on ctx.Ifindex, with ctx's GSO fields. It
// must not be called inside an underlay namespace function (t.Fatal there would end the
// namespace's thread): use runCtxErr there.
func runCtx(t testing.TB, prog *ebpf.Program, in []byte, ctx skbContext) (uint32, []byte) {
	t.Helper()
	ret, out, err := runCtxErr(prog, in, ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ret, out
}

func runCtxErr(prog *ebpf.Program, in []byte, ctx skbContext) (uint32, []byte, error) {
	out := make([]byte, len(in)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out, Context: ctx})
	if err != nil {
		return 0, nil, fmt.Errorf("test run of %d bytes on ifindex %d: %w", len(in), ctx.Ifindex, err)
	}
	return ret, out, nil
}

func TestSkbContextIsTheKernelsSize(t *testing.T) {
	if n := binary.Size(skbContext{}); n != 192 {
		t.Fatalf("skbContext encodes to %d bytes, struct __sk_buff has 192", n)
	}
}
