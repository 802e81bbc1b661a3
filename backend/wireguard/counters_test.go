package wireguard

import (
	"net/netip"
	"testing"
)

// TestRunTallyCountsEveryPacketOnce: counting a batch run by run gives each subnet exactly its
// packets and bytes, however runs of one address, another address of the same subnet, other
// subnets and addresses no peer holds interleave, and each direction its own counters.
func TestRunTallyCountsEveryPacketOnce(t *testing.T) {
	a, b := netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24")
	c := newCounters()
	// b's IPv6 subnet (dual stack) counts as b; an IPv6 address elsewhere as no peer's.
	c.setSubnets([]netip.Prefix{a, b}, map[netip.Prefix]netip.Prefix{netip.MustParsePrefix("fd00:10:244:2::/64"): b})
	addrs := map[string]netip.Addr{"a2": netip.MustParseAddr("10.244.1.2"), "a3": netip.MustParseAddr("10.244.1.3"),
		"b2": netip.MustParseAddr("10.244.2.2"), "none": netip.MustParseAddr("10.244.9.2"),
		"b6": netip.MustParseAddr("fd00:10:244:2::2"), "none6": netip.MustParseAddr("fd00:10:244:9::2")}
	batch := []struct {
		to   string
		size int
	}{{"a2", 1400}, {"a2", 1400}, {"a3", 100}, {"none", 60}, {"a2", 1400}, {"b2", 52}, {"b6", 72}, {"b2", 52}, {"none", 60}, {"a3", 7}, {"none6", 80}}
	for _, rx := range []bool{false, true} {
		r := runTally{table: c.table.Load(), rx: rx}
		for _, p := range batch {
			r.add(addrs[p.to], p.size)
		}
		r.flush()
		if r.matched != 8 || r.unmatched != 3 {
			t.Errorf("rx %v: %d matched, %d unmatched; want 8 and 3", rx, r.matched, r.unmatched)
		}
	}
	for _, w := range []struct {
		subnet         netip.Prefix
		packets, bytes uint64
	}{{a, 5, 4307}, {b, 3, 176}} {
		s := c.table.Load().bySubnet[w.subnet]
		got := [4]uint64{s.txPackets.Load(), s.txBytes.Load(), s.rxPackets.Load(), s.rxBytes.Load()}
		if want := [4]uint64{w.packets, w.bytes, w.packets, w.bytes}; got != want {
			t.Errorf("%v: tx packets, bytes, rx packets, bytes = %v, want %v", w.subnet, got, want)
		}
	}
}
