package subnetmgr

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
)

// Design history. The lease engine (create-only transaction, TTL, renewal, reclaim by
// PublicIP or by the range a host's file records, reservations) was written for the overlay's
// <prefix>/subnets/. Macvlan address ranges on the physical LAN need exactly the same rules
// (one range per host, never shared, kept across restarts), only cut from another network and
// kept under another key directory. Rather than a second copy, the engine works on a Pool; the
// overlay is the Pool OverlayPool(cfg), and AcquireLease/KeepLease are AcquirePoolLease and
// KeepPoolLease on it. What only one kind of range needs (a macvlan range must not cover the
// LAN address of a host) is expressed as data on the Pool (Avoid, AvoidHosts), not as a
// second code path.

// Pool is a set of equal-sized address ranges, leased one per host under their own key
// directory with the overlay's rules.
type Pool struct {
	// Dir is the key directory under the prefix: SubnetsDir for the overlay, "macvlan" for
	// macvlan ranges. Keys are <prefix>/<Dir>/<a.b.c.d>-<len>.
	Dir string
	// Network is the network the ranges are cut from (for messages and reclaim checks). It is
	// IPv4 but for the overlay of an IPv6-only config (OverlayPool).
	Network netip.Prefix
	// Len is the prefix length of every range.
	Len int
	// Min and Max are the first addresses of the lowest and highest range handed out.
	Min, Max netip.Addr
	// Avoid lists addresses no newly taken or reclaimed range may cover (the host's own
	// addresses, a gateway). A previous lease of ours that covers one is left alone.
	Avoid []netip.Addr
	// AvoidHosts also avoids the PublicIP of every lease under <prefix>/subnets/ and under
	// Dir: the LAN addresses of every host known to etcd.
	AvoidHosts bool
	// FullHint is the fix an operator gets when every range is taken; a generic one when "".
	FullHint string
	// IPv6, when set, makes the pool dual stack (the overlay with EnableIPv6): every lease
	// also holds one of these IPv6 ranges, named in its key after "&" (flannel's form).
	IPv6 *Ranges
	// WatchOwnKey makes KeepPoolLease watch our key and take the range back at once when it
	// is deleted or expires, instead of at the next renewal (up to a TTL later, while another
	// host may take it). The overlay leaves it off: xnetd takes its subnet back from the
	// lease events it watches anyway, and two takers would race.
	WatchOwnKey bool
}

// Ranges is a set of equal-sized ranges of either family: those of Len bits inside Network
// from Min to Max.
type Ranges struct {
	Network  netip.Prefix
	Len      int
	Min, Max netip.Addr
}

// ranges is Ranges as the free-range walk uses it.
type ranges = Ranges

// OverlayPool is the pool of the overlay's subnets under <prefix>/subnets/ for cfg. In an
// IPv6-only overlay the pool's ranges are the IPv6 ones (its Network is IPv6): each lease is
// then named by its IPv6 subnet (Lease.ID), under flannel's key 0.0.0.0-0&<ipv6>-<len>.
func OverlayPool(cfg Config) Pool {
	if cfg.IPv6Only() {
		return Pool{Dir: SubnetsDir, Network: cfg.IPv6Network, Len: cfg.IPv6SubnetLen, Min: cfg.IPv6SubnetMin, Max: cfg.IPv6SubnetMax}
	}
	p := Pool{Dir: SubnetsDir, Network: cfg.Network, Len: cfg.SubnetLen, Min: cfg.SubnetMin, Max: cfg.SubnetMax}
	if cfg.EnableIPv6 {
		p.IPv6 = &Ranges{Network: cfg.IPv6Network, Len: cfg.IPv6SubnetLen, Min: cfg.IPv6SubnetMin, Max: cfg.IPv6SubnetMax}
	}
	return p
}

// compatible says whether r is one of these ranges.
func (r Ranges) compatible(p netip.Prefix) bool {
	return p.IsValid() && p.Bits() == r.Len && p.Masked() == p && p.Addr().BitLen() == r.Network.Addr().BitLen() &&
		!p.Addr().Less(r.Min) && !r.Max.Less(p.Addr())
}

// takenIPv6 is the set of the dual-stack pool's IPv6 ranges held by keys6; nil for a pool
// without IPv6.
func (p Pool) takenIPv6(keys6 []netip.Prefix) *takenSet {
	if p.IPv6 == nil {
		return nil
	}
	return newTakenRanges(*p.IPv6, keys6, nil)
}

// ipv6Only says whether the pool's ranges are IPv6 (an IPv6-only overlay).
func (p Pool) ipv6Only() bool { return p.Network.Addr().Is6() }

// sameHost says whether l names the host that publishes attrs: by PublicIPv6 in an IPv6-only
// pool (as flannel finds its lease there; a dual-stack lease of ours from an older config
// has it too), by Host otherwise.
func (p Pool) sameHost(l Lease, attrs LeaseAttrs) bool {
	if p.ipv6Only() {
		return l.PublicIPv6.IsValid() && l.PublicIPv6 == attrs.PublicIPv6
	}
	return l.Host() == attrs.Host()
}

// primaryKeys are the ranges of snap's keys that the pool's own ranges may collide with: every
// IPv6 subnet named in a key in an IPv6-only pool (a dual-stack key holds one too).
func (p Pool) primaryKeys(snap snapshot) []netip.Prefix {
	if p.ipv6Only() {
		return snap.keys6
	}
	return snap.keys
}

// ipv6For is the IPv6 range our lease l should hold besides its IPv4 one: the one it holds
// when the pool still hands it out, else a free one (prev6 first), none in a pool without
// IPv6. In an IPv6-only pool the IPv6 range is the lease's ID, which it keeps. ok is false
// when l needs one and none is free.
func (p Pool) ipv6For(l storedLease, taken6 *takenSet, prev6 netip.Prefix) (netip.Prefix, bool) {
	if p.IPv6 == nil {
		if p.ipv6Only() {
			return l.IPv6Subnet, true
		}
		return netip.Prefix{}, true
	}
	if p.IPv6.compatible(l.IPv6Subnet) {
		return l.IPv6Subnet, true
	}
	sn6, err := p.pickIPv6(taken6, prev6)
	return sn6, err == nil
}

// pickIPv6 picks a free IPv6 range for a new lease of a dual-stack pool: prev6 when free, else
// one at random among the first free ones; the zero Prefix for a pool without IPv6.
func (p Pool) pickIPv6(taken6 *takenSet, prev6 netip.Prefix) (netip.Prefix, error) {
	if p.IPv6 == nil {
		return netip.Prefix{}, nil
	}
	if p.IPv6.compatible(prev6) && !taken6.held(prev6) {
		return prev6, nil
	}
	free := taken6.free(maxCandidates)
	if len(free) == 0 {
		return netip.Prefix{}, ErrRangeFull
	}
	return free[rand.N(len(free))], nil
}

// check refuses a pool the engine cannot work on; a Config from ParseConfig always passes.
func (p Pool) check() error {
	if p.Dir == "" {
		return fmt.Errorf("lease pool: empty key directory")
	}
	if p.ipv6Only() {
		if p.Dir != SubnetsDir || p.IPv6 != nil || !isIPv6(p.Network.Addr()) {
			return fmt.Errorf("lease pool %s: network %v: only the overlay's pool may be IPv6 only", p.Dir, p.Network)
		}
	} else if !p.Network.IsValid() || !p.Network.Addr().Is4() {
		return fmt.Errorf("lease pool %s: network %v is not an IPv4 CIDR", p.Dir, p.Network)
	}
	if p.Len < p.Network.Bits() || p.Len > p.Network.Addr().BitLen() {
		return fmt.Errorf("lease pool %s: range length /%d does not fit network %s", p.Dir, p.Len, p.Network)
	}
	for _, a := range []netip.Addr{p.Min, p.Max} {
		if !p.Network.Contains(a) || netip.PrefixFrom(a, p.Len).Masked().Addr() != a {
			return fmt.Errorf("lease pool %s: bound %v is not a /%d boundary inside %s", p.Dir, a, p.Len, p.Network)
		}
	}
	if p.Max.Less(p.Min) {
		return fmt.Errorf("lease pool %s: max %s is below min %s", p.Dir, p.Max, p.Min)
	}
	if r := p.IPv6; r != nil {
		if !r.Network.IsValid() || !isIPv6(r.Network.Addr()) || r.Len < r.Network.Bits() || r.Len > 128 {
			return fmt.Errorf("lease pool %s: IPv6 network %v with /%d ranges is not valid", p.Dir, r.Network, r.Len)
		}
		for _, a := range []netip.Addr{r.Min, r.Max} {
			if !r.Network.Contains(a) || netip.PrefixFrom(a, r.Len).Masked().Addr() != a {
				return fmt.Errorf("lease pool %s: IPv6 bound %v is not a /%d boundary inside %s", p.Dir, a, r.Len, r.Network)
			}
		}
		if r.Max.Less(r.Min) {
			return fmt.Errorf("lease pool %s: IPv6 max %s is below min %s", p.Dir, r.Max, r.Min)
		}
	}
	return nil
}

// compatible says whether r is a range this pool hands out (flannel's rule for keeping a
// previous lease after the config changed).
func (p Pool) compatible(r netip.Prefix) bool {
	return r.IsValid() && r.Bits() == p.Len && r.Masked() == r &&
		!r.Addr().Less(p.Min) && !p.Max.Less(r.Addr())
}

// subnetCompatible is compatible for the overlay's pool.
func subnetCompatible(cfg Config, subnet netip.Prefix) bool {
	return OverlayPool(cfg).compatible(subnet)
}

// avoidSet is the set of addresses a range we take must not cover.
type avoidSet []netip.Addr

// covered returns the first avoided address inside r, if any.
func (a avoidSet) covered(r netip.Prefix) (netip.Addr, bool) {
	for _, x := range a {
		if r.Contains(x) {
			return x, true
		}
	}
	return netip.Addr{}, false
}

// LastAddr is the last address of p (its broadcast address for an IPv4 subnet), either family.
func LastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// NextSubnet is the first address of the /length range after the one starting at a, either
// family; ok is false when a's range is the last of the address space.
func NextSubnet(a netip.Addr, length int) (next netip.Addr, ok bool) {
	b := a.AsSlice()
	if length <= 0 || length > len(b)*8 {
		return netip.Addr{}, false
	}
	i := (length - 1) / 8
	add := uint16(0x80 >> ((length - 1) % 8))
	for ; i >= 0 && add != 0; i-- {
		sum := uint16(b[i]) + add
		b[i], add = byte(sum), sum>>8
	}
	if add != 0 {
		return netip.Addr{}, false
	}
	next, _ = netip.AddrFromSlice(b)
	return next, true
}
