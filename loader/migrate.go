package loader

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// carryOver copies the entries of old, a pinned map that Load replaces because the new build
// changed its layout, into its replacement nw, when the change only added to the layout: the
// same map type and key, and every member of the old value struct (padding aside) at the same
// offset with the same layout in the new one. The members the new build added, and what used to
// be padding, read zero in the carried entries, and every such change is made so that zero means
// "as before" (route.direct 0 is VXLAN, host_config.direct_routing 0 is off). It returns how
// many entries it carried, or why it carried none: the map then starts empty, as the backend
// rewrites its routes and config anyway, but until it has the datapath would drop the traffic
// of every peer, so carrying them keeps an upgrade under traffic lossless.
//
// Per-CPU maps (the counters) are not carried: counters restart on such an upgrade.
func carryOver(ms *ebpf.MapSpec, old, nw *ebpf.Map) (int, string) {
	info, err := old.Info()
	if err != nil {
		return 0, fmt.Sprintf("read map info: %v", err)
	}
	switch {
	case info.Type != ms.Type:
		return 0, fmt.Sprintf("map type changed from %v to %v", info.Type, ms.Type)
	case info.Type == ebpf.PerCPUHash || info.Type == ebpf.PerCPUArray || info.Type == ebpf.LRUCPUHash:
		return 0, "per-CPU values are not carried over"
	case info.KeySize != ms.KeySize || info.ValueSize > ms.ValueSize:
		return 0, fmt.Sprintf("key size %d -> %d, value size %d -> %d", info.KeySize, ms.KeySize, info.ValueSize, ms.ValueSize)
	}
	pinned, err := pinnedBTF(old)
	if err != nil {
		return 0, err.Error()
	}
	if ms.Key != nil && ms.Key.TypeName() != "" {
		got, err := pinned.AnyTypesByName(ms.Key.TypeName())
		want := layoutOf(ms.Key)
		if err != nil || !containsLayout(got, want) {
			return 0, "the key's layout changed"
		}
	}
	if why := extends(pinned, ms.Value, info.ValueSize); why != "" {
		return 0, why
	}

	key := make([]byte, info.KeySize)
	val := make([]byte, info.ValueSize)
	wide := make([]byte, ms.ValueSize)
	n := 0
	var errs []error
	it := old.Iterate()
	for it.Next(&key, &val) {
		clear(wide)
		copy(wide, val)
		if err := nw.Update(key, wide, ebpf.UpdateAny); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	if err := it.Err(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return n, fmt.Sprintf("%d entries not carried: %v", len(errs), err)
	}
	return n, ""
}

// extends says why the new value type want does not extend the old one (the pinned BTF's type
// of the same name and size oldSize), or "" when it does.
func extends(pinned *btf.Spec, want btf.Type, oldSize uint32) string {
	newStruct, ok := btf.UnderlyingType(want).(*btf.Struct)
	if !ok || want.TypeName() == "" {
		return "the value is not a named struct"
	}
	cands, err := pinned.AnyTypesByName(want.TypeName())
	if err != nil {
		return fmt.Sprintf("type %s missing from the pinned map's BTF", want.TypeName())
	}
	var oldStruct *btf.Struct
	for _, c := range cands {
		if s, ok := btf.UnderlyingType(c).(*btf.Struct); ok && s.Size == oldSize {
			if oldStruct != nil {
				return fmt.Sprintf("the pinned map's BTF holds several %s of %d bytes", want.TypeName(), oldSize)
			}
			oldStruct = s
		}
	}
	if oldStruct == nil {
		return fmt.Sprintf("no struct %s of %d bytes in the pinned map's BTF", want.TypeName(), oldSize)
	}
	for _, om := range oldStruct.Members {
		if strings.HasPrefix(om.Name, "pad") {
			continue
		}
		i := -1
		for j, nm := range newStruct.Members {
			if nm.Name == om.Name {
				i = j
			}
		}
		if i < 0 {
			return fmt.Sprintf("member %s is gone", om.Name)
		}
		nm := newStruct.Members[i]
		if nm.Offset != om.Offset || layoutOf(nm.Type) != layoutOf(om.Type) {
			return fmt.Sprintf("member %s moved or changed", om.Name)
		}
	}
	return ""
}

// pinnedBTF is the BTF the kernel holds for a map.
func pinnedBTF(m *ebpf.Map) (*btf.Spec, error) {
	info, err := m.Info()
	if err != nil {
		return nil, fmt.Errorf("read map info: %w", err)
	}
	id, ok := info.BTFID()
	if !ok {
		return nil, errors.New("pinned map has no BTF")
	}
	h, err := btf.NewHandleFromID(id)
	if err != nil {
		return nil, fmt.Errorf("open BTF %d: %w", id, err)
	}
	defer h.Close()
	spec, err := h.Spec(nil)
	if err != nil {
		return nil, fmt.Errorf("read BTF %d: %w", id, err)
	}
	return spec, nil
}

func containsLayout(types []btf.Type, layout string) bool {
	for _, t := range types {
		if layoutOf(t) == layout {
			return true
		}
	}
	return false
}
