package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// FuzzDecap feeds arbitrary frames to both decap programs. Whatever the input, a program may
// only pass it untouched, drop it untouched, or decapsulate it (and then count it as
// decapsulated, and deliver exactly the tail of the input). In a plain `go test` only the seeds
// run: the fixture's frames below and testdata/fuzz/FuzzDecap.
func FuzzDecap(f *testing.F) {
	objs := load(f, 1)
	accepted := fromPeer()
	for _, seed := range []vxlanFrame{
		accepted,
		with(accepted, func(fr *vxlanFrame) { fr.outerSrc = strangerIP }),
		with(accepted, func(fr *vxlanFrame) { fr.vni = 7 }),
		with(accepted, func(fr *vxlanFrame) { fr.ipOptions = []byte{1, 1, 1, 0} }),
		with(accepted, func(fr *vxlanFrame) { fr.innerDst = netip.MustParseAddr("10.244.1.77") }),
	} {
		f.Add(seed.bytes())
	}
	f.Fuzz(func(t *testing.T, in []byte) { checkDecapAnyFrame(t, objs, in) })
}

// FuzzDecapIPv6 is FuzzDecap on a dual-stack host, from frames carrying inner IPv6: the
// decapsulation of inner IPv6 packets keeps the same promise.
func FuzzDecapIPv6(f *testing.F) {
	objs := loadDualStack(f, 1)
	inner := tcp6(remoteIP6, ctrIP6, 13, 0)
	accepted := fromPeer6(inner)
	for _, seed := range []vxlanFrame{
		accepted,
		fromPeer6(tcp6(remoteIP6, ctrIP6, 13, 0, hopByHop(), dstOpts(16))),
		fromPeer6(tcp6(remoteIP6, newCtrIP6, 13, ecnECT0)),
		with(accepted, func(fr *vxlanFrame) { fr.outerSrc = strangerIP }),
		with(accepted, func(fr *vxlanFrame) { fr.outerTOS = ecnCE }),
	} {
		f.Add(seed.bytes())
	}
	f.Fuzz(func(t *testing.T, in []byte) { checkDecapAnyFrame(t, objs, in) })
}

// checkDecapAnyFrame runs one arbitrary frame through both decap programs: whatever the input,
// a program may only pass it untouched, drop it untouched, or decapsulate it (and then count it
// as decapsulated, and deliver exactly the tail of the input).
func checkDecapAnyFrame(t *testing.T, objs *objects, in []byte) {
	decapped := func(t *testing.T) uint64 {
		var per []XnetCounter
		must(t, objs.Counters.Lookup(uint32(XnetVerdictVERDICT_DECAP), &per))
		var n uint64
		for _, c := range per {
			n += c.Packets
		}
		return n
	}
	// The kernel runs neither program on less than an Ethernet header, and SCHED_CLS test
	// runs stop at about 4 KB.
	if len(in) < 14 || len(in) > 3800 {
		return
	}
	if objs.DecapXdp != nil {
		fuzzXDP(t, objs.DecapXdp, in, decapped)
	}

	before := decapped(t)
	out := make([]byte, len(in)+64)
	ret, err := objs.DecapTc.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		return // the kernel refuses some frames for SCHED_CLS test runs (IPv4 under 34 bytes)
	}
	switch ret {
	case tcPass, tcDrop:
		if !bytes.Equal(out[:len(in)], in) || decapped(t) != before {
			t.Fatalf("tc: returned %d but changed or counted the packet:\n in % x\nout % x", ret, in, out[:len(in)])
		}
	case tcRedirect, tcOK:
		if decapped(t) != before+1 {
			t.Fatalf("tc: delivered (%d) a packet it did not count as decapsulated:\n in % x", ret, in)
		}
	default:
		t.Fatalf("tc: returned %d, want pass, drop or a delivery", ret)
	}
}

func fuzzXDP(t *testing.T, prog *ebpf.Program, in []byte, decapped func(*testing.T) uint64) {
	out := make([]byte, len(in)+64)
	before := decapped(t)
	ret, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		t.Fatalf("xdp test run: %v", err)
	}
	switch {
	case ret == xdpDrop || ret == xdpPass && bytes.Equal(out[:len(in)], in):
		if decapped(t) != before {
			t.Fatalf("xdp: returned %d with the packet untouched but counted it as decapsulated", ret)
		}
	case ret == xdpPass:
		// Decapsulated: metadata word, then a strict tail of the input.
		meta := binary.NativeEndian.Uint32(out[:4])
		if decapped(t) != before+1 || meta != xnetMetaDecapped {
			t.Fatalf("xdp: changed a packet it did not count as decapsulated:\n in % x\nout % x", in, out)
		}
	default:
		t.Fatalf("xdp: returned %d, want only pass or drop", ret)
	}
}
