package wireguard

import (
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun"
)

// Verdicts the embedded datapath counts, named as the udp and ebpf backends name theirs so
// `xnetd status` and the metrics read the same for every backend.
const (
	verdictEncap   = "encap"         // a packet from our side encrypted to a peer
	verdictDecap   = "decap"         // a packet from a peer decrypted and delivered
	verdictNoRoute = "drop_no_route" // a packet for the overlay whose subnet no peer holds
	verdictSpoofed = "drop_spoofed"  // decrypted, but its source is not in the sender's subnet
)

// peerStats is one peer subnet's traffic: inner packets and their bytes each way.
type peerStats struct {
	txPackets, txBytes, rxPackets, rxBytes atomic.Uint64
}

// statsTable maps the peer subnets to their counters. It is replaced, never changed, so the
// packet path reads it without a lock.
type statsTable struct {
	// lengths are the distinct prefix lengths of each family's subnets: one lookup each per
	// packet.
	lengths4, lengths6 []int
	bySubnet           map[netip.Prefix]*peerStats // by the leases' IPv4 subnets, as reported
	// byPrefix is bySubnet with, in a dual-stack overlay, each lease's IPv6 subnet pointing at
	// the counters of its IPv4 subnet: a peer's traffic is one count, whichever family.
	byPrefix map[netip.Prefix]*peerStats
}

func (t *statsTable) lookup(a netip.Addr) *peerStats {
	lengths := t.lengths4
	if a.Is6() {
		lengths = t.lengths6
	}
	for _, l := range lengths {
		if p, err := a.Prefix(l); err == nil {
			if s := t.byPrefix[p]; s != nil {
				return s
			}
		}
	}
	return nil
}

// counters are the embedded datapath's counts: per peer subnet, and per verdict.
type counters struct {
	table                          atomic.Pointer[statsTable]
	encap, decap, noRoute, spoofed atomic.Uint64
}

func newCounters() *counters {
	c := &counters{}
	c.table.Store(&statsTable{bySubnet: map[netip.Prefix]*peerStats{}, byPrefix: map[netip.Prefix]*peerStats{}})
	return c
}

// setSubnets makes the table hold exactly subnets (the leases' IPv4 subnets, or IPv6 ones in an
// IPv6-only overlay), keeping the counts of the subnets it had; ipv6 maps a lease's IPv6
// subnet to its IPv4 subnet, whose counters its packets move.
func (c *counters) setSubnets(subnets []netip.Prefix, ipv6 map[netip.Prefix]netip.Prefix) {
	old := c.table.Load()
	t := &statsTable{bySubnet: make(map[netip.Prefix]*peerStats, len(subnets)), byPrefix: make(map[netip.Prefix]*peerStats, len(subnets)+len(ipv6))}
	addLength := func(lengths *[]int, bits int) {
		if !slices.Contains(*lengths, bits) {
			*lengths = append(*lengths, bits)
		}
	}
	for _, s := range subnets {
		st := old.bySubnet[s]
		if st == nil {
			st = &peerStats{}
		}
		t.bySubnet[s], t.byPrefix[s] = st, st
		if s.Addr().Is6() { // an IPv6-only overlay's leases are keyed by their IPv6 subnet
			addLength(&t.lengths6, s.Bits())
		} else {
			addLength(&t.lengths4, s.Bits())
		}
	}
	for s6, s := range ipv6 {
		if st := t.bySubnet[s]; st != nil {
			t.byPrefix[s6] = st
			addLength(&t.lengths6, s6.Bits())
		}
	}
	for _, l := range [][]int{t.lengths4, t.lengths6} {
		slices.Sort(l)
		slices.Reverse(l) // most specific first
	}
	c.table.Store(t)
}

// countingTUN is the TUN device as wireguard-go sees it, counting every packet on its way:
// what Read returns is leaving for a peer (by destination), what Write gets was decrypted
// from one (by source). wireguard-go counts only bytes per peer, on the wire.
//
// It is also where a TUN taken over from a previous process waits: wireguard-go reads its TUN
// from the moment the device exists, and what waited there for a peer not configured yet would
// be dropped, so Read blocks until open is closed (userDevice.release).
type countingTUN struct {
	tun.Device
	c        *counters
	mtu      int
	open     chan struct{}
	openOnce sync.Once
	closed   chan struct{}
	stopOnce sync.Once
}

// Close ends a Read waiting for open, then closes the TUN.
func (t *countingTUN) Close() error {
	t.stopOnce.Do(func() { close(t.closed) })
	return t.Device.Close()
}

// MTU is the MTU we gave the TUN. The tun package asks the kernel by interface name, from
// whatever thread calls it, which is in another namespace than xnet-wg when a test runs the
// backend in a simulated host; only we change the MTU.
func (t *countingTUN) MTU() (int, error) { return t.mtu, nil }

func (t *countingTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	select {
	case <-t.open:
	case <-t.closed:
		return 0, os.ErrClosed
	}
	n, err := t.Device.Read(bufs, sizes, offset)
	r := runTally{table: t.c.table.Load()}
	for i := range n {
		pkt := bufs[i][offset : offset+sizes[i]]
		if dst, ok := ipAddr(pkt, false); ok {
			r.add(dst, len(pkt))
		}
	}
	r.flush()
	if r.matched > 0 {
		t.c.encap.Add(r.matched)
	}
	if r.unmatched > 0 {
		t.c.noRoute.Add(r.unmatched)
	}
	return n, err
}

func (t *countingTUN) Write(bufs [][]byte, offset int) (int, error) {
	// Counted before the write: wireguard-go's Write coalesces segments in bufs in place.
	r := runTally{table: t.c.table.Load(), rx: true}
	for _, b := range bufs {
		pkt := b[offset:]
		if src, ok := ipAddr(pkt, true); ok {
			r.add(src, len(pkt))
		}
	}
	r.flush()
	if d := r.matched + r.unmatched; d > 0 {
		t.c.decap.Add(d)
	}
	return t.Device.Write(bufs, offset)
}

// ipAddr is the source (src) or destination address of the IPv4 or IPv6 packet pkt; ok is
// false for anything else, which wireguard-go drops (no peer's AllowedIPs cover it).
func ipAddr(pkt []byte, src bool) (a netip.Addr, ok bool) {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		if src {
			return netip.AddrFrom4([4]byte(pkt[12:16])), true
		}
		return netip.AddrFrom4([4]byte(pkt[16:20])), true
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		if src {
			return netip.AddrFrom16([16]byte(pkt[8:24])), true
		}
		return netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return netip.Addr{}, false
}

// runTally counts a batch of packets by peer subnet, one run of packets to (or from) one
// address at a time: a batch is mostly one flow's segments, so it costs a table lookup and a
// few atomic adds per run rather than per packet.
type runTally struct {
	table              *statsTable
	rx                 bool // counting received packets (by source), else sent (by destination)
	addr               netip.Addr
	s                  *peerStats // addr's subnet's counters; nil if no peer holds it
	started            bool
	packets, bytes     uint64 // of the current run
	matched, unmatched uint64 // of the whole batch: packets with and without a peer subnet
}

func (r *runTally) add(addr netip.Addr, size int) {
	if !r.started || addr != r.addr {
		r.flush()
		r.addr, r.started = addr, true
		r.s = r.table.lookup(addr)
	}
	if r.s == nil {
		r.unmatched++
		return
	}
	r.matched++
	r.packets++
	r.bytes += uint64(size)
}

// flush adds the current run to its subnet's counters.
func (r *runTally) flush() {
	if r.s != nil && r.packets > 0 {
		if r.rx {
			r.s.rxPackets.Add(r.packets)
			r.s.rxBytes.Add(r.bytes)
		} else {
			r.s.txPackets.Add(r.packets)
			r.s.txBytes.Add(r.bytes)
		}
	}
	r.packets, r.bytes = 0, 0
}
