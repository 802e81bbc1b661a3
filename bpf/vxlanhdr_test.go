package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/xnet-dev/xnet/wire"
)

// The BPF decap and wire.Decode (the udp backend's decap) must accept exactly the same VXLAN
// headers: the same cluster may run both. Every 8-byte header below goes through decap_tc and
// through wire.Decode; a header is ours for one exactly when it is ours for the other.
func TestVXLANHeaderRuleMatchesWire(t *testing.T) {
	objs := load(t, 1)
	headers := [][8]byte{
		{0x08, 0, 0, 0, 0, 0, vni, 0}, // the one header both accept
		{0x00, 0, 0, 0, 0, 0, vni, 0}, // I flag clear
		{0x0c, 0, 0, 0, 0, 0, vni, 0}, // a reserved flag bit
		{0x88, 0, 0, 0, 0, 0, vni, 0}, // GBP's G flag
		{0x08, 0x80, 0, 0, 0, 0, vni, 0},
		{0x08, 0, 0, 0x01, 0, 0, vni, 0},
		{0x08, 0, 0, 0, 0, 0, vni, 0x01}, // reserved byte after the VNI
		{0x08, 0, 0, 0, 0, 0, vni + 1, 0},
		{0xff, 0xff, 0xff, 0xff, 0, 0, vni, 0xff},
	}
	for _, h := range headers {
		t.Run(fmt.Sprintf("% x", h), func(t *testing.T) {
			frame := with(fromPeer(), func(f *vxlanFrame) { f.editVXLAN = func(b []byte) { copy(b, h[:]) } }).bytes()
			// The UDP payload: after outer Ethernet (14), IPv4 (20) and UDP (8).
			_, problem := wire.Decode(frame[42:], wire.Expect{VNI: vni, MAC: [6]byte(localVtep)})
			goOurs := problem != wire.NotVXLAN && problem != wire.WrongVNI

			before := verdicts(t, objs.Counters)
			ret, out := run(t, objs.DecapTc, frame)
			after := verdicts(t, objs.Counters)
			bpfOurs := after[XnetVerdictVERDICT_PASS] == before[XnetVerdictVERDICT_PASS]
			if !bpfOurs && (ret != tcPass || !bytes.Equal(out[:len(frame)], frame)) {
				t.Errorf("decap_tc counted the header as not ours but returned %d or changed the packet", ret)
			}
			if goOurs != bpfOurs {
				t.Errorf("wire.Decode says %v (ours: %v), decap_tc says ours: %v", problem, goOurs, bpfOurs)
			}
		})
	}
}

// VNI 0 is a valid VXLAN network identifier: the kernel's vxlan and flannel accept it when the
// network is configured with it, and so must the decap.
func TestDecapVNIZero(t *testing.T) {
	objs := load(t, 1)
	var cfg XnetHostConfig
	must(t, objs.Config.Lookup(uint32(0), &cfg))
	cfg.Vni = 0
	must(t, objs.Config.Put(uint32(0), cfg))
	for _, c := range []struct {
		name    string
		vni     uint32
		verdict XnetVerdict
	}{
		{"VNI 0 is ours when configured", 0, XnetVerdictVERDICT_DECAP},
		{"VNI 1 is then someone else's", 1, XnetVerdictVERDICT_PASS},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := with(fromPeer(), func(f *vxlanFrame) { f.vni = c.vni }).bytes()
			if binary.BigEndian.Uint32(in[46:50]) != c.vni<<8 {
				t.Fatalf("test frame has VNI word % x", in[46:50])
			}
			before := verdicts(t, objs.Counters)
			run(t, objs.DecapTc, in)
			checkCounted(t, "tc", before, verdicts(t, objs.Counters), c.verdict)
		})
	}
}
