package subnetmgr

import (
	"fmt"
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
	// Network is the network the ranges are cut from (for messages and reclaim checks).
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
	// WatchOwnKey makes KeepPoolLease watch our key and take the range back at once when it
	// is deleted or expires, instead of at the next renewal (up to a TTL later, while another
	// host may take it). The overlay leaves it off: xnetd takes its subnet back from the
	// lease events it watches anyway, and two takers would race.
	WatchOwnKey bool
}

// OverlayPool is the pool of the overlay's subnets under <prefix>/subnets/ for cfg.
func OverlayPool(cfg Config) Pool {
	return Pool{Dir: SubnetsDir, Network: cfg.Network, Len: cfg.SubnetLen, Min: cfg.SubnetMin, Max: cfg.SubnetMax}
}

// check refuses a pool the engine cannot work on; a Config from ParseConfig always passes.
func (p Pool) check() error {
	if p.Dir == "" {
		return fmt.Errorf("lease pool: empty key directory")
	}
	if !p.Network.IsValid() || !p.Network.Addr().Is4() {
		return fmt.Errorf("lease pool %s: network %v is not an IPv4 CIDR", p.Dir, p.Network)
	}
	if p.Len < p.Network.Bits() || p.Len > 32 {
		return fmt.Errorf("lease pool %s: range length /%d does not fit network %s", p.Dir, p.Len, p.Network)
	}
	for _, a := range []netip.Addr{p.Min, p.Max} {
		if !a.Is4() || !p.Network.Contains(a) || netip.PrefixFrom(a, p.Len).Masked().Addr() != a {
			return fmt.Errorf("lease pool %s: bound %v is not a /%d boundary inside %s", p.Dir, a, p.Len, p.Network)
		}
	}
	if p.Max.Less(p.Min) {
		return fmt.Errorf("lease pool %s: max %s is below min %s", p.Dir, p.Max, p.Min)
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

// LastAddr is the last address of p (its broadcast address for a subnet).
func LastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	return u32ToAddr(addrToU32(p.Addr()) | (^uint32(0) >> p.Bits()))
}
