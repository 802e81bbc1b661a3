package main

import (
	"slices"
	"testing"
)

func TestModeOfSpellings(t *testing.T) {
	cases := []struct {
		name, want, backend string
		extra               []string
		direct, fromHost    bool
	}{
		{"ebpf", "ebpf", "ebpf", nil, false, false},
		{"ebpf-tc", "ebpf-tc", "ebpf", []string{"--decap=tc"}, false, false},
		{"ebpf-direct", "ebpf-direct", "ebpf", nil, true, false},
		{"ebpf-tc+direct", "ebpf-tc+direct", "ebpf", []string{"--decap=tc"}, true, false},
		{"vxlan+direct", "vxlan+direct", "vxlan", nil, true, false},
		{"ebpf-direct+host", "ebpf-direct+host", "ebpf", nil, true, true},
		{"ebpf-tc+v6", "ebpf-tc+v6", "ebpf", []string{"--decap=tc"}, false, false},
	}
	if !modeOf("vxlan+v6").v6 || modeOf("vxlan").v6 || modeOf("vxlan+v6").v6ul {
		t.Errorf("+v6 does not set (only) the IPv6 mode")
	}
	if m := modeOf("ebpf-tc+v6ul"); !m.v6 || !m.v6ul || m.backend != "ebpf" || m.name != "ebpf-tc+v6ul" {
		t.Errorf("modeOf(ebpf-tc+v6ul) = %+v: want IPv6 over an IPv6 underlay, backend ebpf", m)
	}
	for _, c := range cases {
		m := modeOf(c.name)
		if m.name != c.want || m.backend != c.backend || !slices.Equal(m.extra, c.extra) || m.direct != c.direct || m.fromHost != c.fromHost {
			t.Errorf("modeOf(%q) = name %q backend %q extra %q direct %v fromHost %v, want %q %q %q %v %v",
				c.name, m.name, m.backend, m.extra, m.direct, m.fromHost, c.want, c.backend, c.extra, c.direct, c.fromHost)
		}
	}
}
