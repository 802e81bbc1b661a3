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

// peerTable finds the peer whose subnet holds an address. It is immutable once built: AddPeer
// and RemovePeer build a new one and swap it in, so lookups on the packet path take no lock.
// Leases of one network share one prefix length, so a lookup is normally one map access; the
// table copes with several lengths anyway (longest first), because leases come from etcd.
type peerTable struct {
	levels []tableLevel
}

type tableLevel struct {
	mask  uint32
	peers map[uint32]*peerDP // by masked subnet address (host order)
}

func newPeerTable(peers map[netip.Prefix]*peerDP) *peerTable {
	byBits := map[int]map[uint32]*peerDP{}
	for subnet, p := range peers {
		m := byBits[subnet.Bits()]
		if m == nil {
			m = map[uint32]*peerDP{}
			byBits[subnet.Bits()] = m
		}
		m[addrKey(subnet.Addr().As4())] = p
	}
	t := &peerTable{}
	for bits, m := range byBits {
		t.levels = append(t.levels, tableLevel{mask: prefixMask(bits), peers: m})
	}
	sort.Slice(t.levels, func(i, j int) bool { return t.levels[i].mask > t.levels[j].mask })
	return t
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
