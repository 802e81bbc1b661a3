package udp

import (
	"encoding/binary"
	"net/netip"
	"sort"
	"sync/atomic"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/wire"
)

// peerDP is one remote lease as the packet path needs it.
type peerDP struct {
	subnet   netip.Prefix
	subnet6  netip.Prefix // its IPv6 subnet in a dual-stack overlay; invalid otherwise
	publicIP netip.Addr
	mac      wire.MAC
	port     int        // outer destination port (the VXLAN port)
	stats    *peerStats // shared by every version of this peer's lease
}

// peerStats are one peer's counters, updated by the queues without a lock.
type peerStats struct {
	txPackets, txBytes atomic.Uint64
	rxPackets, rxBytes atomic.Uint64
}

// newPeerDP builds what the packet path needs to send to a peer on port.
func newPeerDP(p backend.VXLANPeer, port int) *peerDP {
	mac, _ := wire.MACFrom(p.VtepMAC) // ParseVXLANPeer guarantees 6 bytes
	return &peerDP{subnet: p.Subnet, publicIP: p.PublicIP, mac: mac, port: port, stats: &peerStats{}}
}

// peerTable finds the peer whose subnet (IPv4, or IPv6 in a dual-stack overlay) holds an
// address. It is immutable once built: AddPeer and RemovePeer build a new one and swap it in,
// so lookups on the packet path take no lock. Leases of one network share one prefix length,
// so a lookup is normally one map access; the table copes with several lengths anyway
// (longest first), because leases come from etcd.
type peerTable struct {
	levels  []tableLevel
	levels6 []tableLevel6
}

type tableLevel struct {
	mask  uint32
	peers map[uint32]*peerDP // by masked subnet address (host order)
}

type tableLevel6 struct {
	bits  int
	peers map[[16]byte]*peerDP // by masked IPv6 subnet address
}

func newPeerTable(peers map[netip.Prefix]*peerDP) *peerTable {
	byBits := map[int]map[uint32]*peerDP{}
	byBits6 := map[int]map[[16]byte]*peerDP{}
	for subnet, p := range peers {
		m := byBits[subnet.Bits()]
		if m == nil {
			m = map[uint32]*peerDP{}
			byBits[subnet.Bits()] = m
		}
		m[addrKey(subnet.Addr().As4())] = p
		if s6 := p.subnet6; s6.IsValid() {
			m6 := byBits6[s6.Bits()]
			if m6 == nil {
				m6 = map[[16]byte]*peerDP{}
				byBits6[s6.Bits()] = m6
			}
			m6[s6.Masked().Addr().As16()] = p
		}
	}
	t := &peerTable{}
	for bits, m := range byBits {
		t.levels = append(t.levels, tableLevel{mask: prefixMask(bits), peers: m})
	}
	sort.Slice(t.levels, func(i, j int) bool { return t.levels[i].mask > t.levels[j].mask })
	for bits, m := range byBits6 {
		t.levels6 = append(t.levels6, tableLevel6{bits: bits, peers: m})
	}
	sort.Slice(t.levels6, func(i, j int) bool { return t.levels6[i].bits > t.levels6[j].bits })
	return t
}

// lookup6 returns the peer whose IPv6 subnet holds addr, or nil.
func (t *peerTable) lookup6(addr [16]byte) *peerDP {
	for i := range t.levels6 {
		if p := t.levels6[i].peers[mask16(addr, t.levels6[i].bits)]; p != nil {
			return p
		}
	}
	return nil
}

// mask16 clears the bits of a after the first bits.
func mask16(a [16]byte, bits int) [16]byte {
	for i := range a {
		switch {
		case bits >= 8:
			bits -= 8
		case bits > 0:
			a[i] &= ^byte(0xff >> bits)
			bits = 0
		default:
			a[i] = 0
		}
	}
	return a
}

// lookup returns the peer owning addr, or nil.
func (t *peerTable) lookup(addr [4]byte) *peerDP {
	k := addrKey(addr)
	for i := range t.levels {
		if p := t.levels[i].peers[k&t.levels[i].mask]; p != nil {
			return p
		}
	}
	return nil
}

// all returns every peer, for counters.
func (t *peerTable) all() []*peerDP {
	var out []*peerDP
	for _, l := range t.levels {
		for _, p := range l.peers {
			out = append(out, p)
		}
	}
	return out
}

func addrKey(a [4]byte) uint32 { return binary.BigEndian.Uint32(a[:]) }

func prefixMask(bits int) uint32 {
	if bits <= 0 {
		return 0
	}
	return ^uint32(0) << (32 - bits)
}

// tableHolder publishes the current peerTable to the queues.
type tableHolder struct{ p atomic.Pointer[peerTable] }

var emptyTable = &peerTable{}

func (h *tableHolder) load() *peerTable {
	if t := h.p.Load(); t != nil {
		return t
	}
	return emptyTable
}

func (h *tableHolder) store(t *peerTable) { h.p.Store(t) }
