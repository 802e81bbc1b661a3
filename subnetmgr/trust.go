package subnetmgr

import (
	"fmt"
	"net/netip"
)

// The trust rule: which leases of other hosts may reach a datapath.
//
// Anyone who can write under <prefix>/subnets/ can write any key there (etcd RBAC grants key
// ranges, and a host must be able to create whichever free subnet it picks). A lease is only a
// claim, and a datapath that believed every claim could be told to route 0.0.0.0/1, a subnet
// outside the overlay, or part of our own subnet to any address. So a peer lease is programmed
// only when its subnet
//
//   - lies strictly inside Network (not outside it, not equal to it, not covering it),
//   - does not overlap our own subnet, and
//   - has exactly SubnetLen bits.
//
// Lease keys have no host bits (ParseSubnetKey), so two different subnets of SubnetLen bits
// never overlap: the rule "overlaps no other live lease" holds by construction, and an
// overlapping pair always has one lease of another length, which is the one refused whatever
// the order the two were created in. (Refusing "the younger of two overlapping leases" instead
// would let an attacker's older /23 knock out the honest /24s inside it.)
//
// What the subnet rule cannot see is a PublicIP: two leases may name one host. The peer
// programs only the claim etcd saw first (ClaimsFirst), so every host decides alike without
// talking to the others, and the decision does not depend on the order events arrive in.
// Our own subnet is ours to defend: KeepLease writes back a key we created when someone
// rewrites it (see renew in keep.go).

// Refusal reasons: the reason label of xnet_leases_refused_total and the "refused" field of
// `xnetd status`.
const (
	// RefusedOutsideNetwork: the subnet is not strictly inside Network.
	RefusedOutsideNetwork = "outside_network"
	// RefusedOverlapsOwnSubnet: the subnet overlaps ours (ebpf encapsulates at container
	// ingress, where bridged local packets pass too: such a route would capture them).
	RefusedOverlapsOwnSubnet = "overlaps_own_subnet"
	// RefusedWrongLength: the subnet does not have exactly SubnetLen bits.
	RefusedWrongLength = "wrong_length"
	// RefusedDuplicatePublicIP: another lease etcd created earlier names the same PublicIP,
	// or the PublicIP is ours.
	RefusedDuplicatePublicIP = "duplicate_public_ip"
	// RefusedDuplicateIPv6Subnet: another lease etcd created earlier holds the same IPv6
	// subnet (keys name the IPv4 subnet, so etcd cannot keep IPv6 subnets unique).
	RefusedDuplicateIPv6Subnet = "duplicate_ipv6_subnet"
)

// The IPv6 part of a dual-stack lease follows the same rule against IPv6Network and
// IPv6SubnetLen (CheckPeerIPv6), and a lease whose IPv6 part is refused is refused whole: a
// host that lies about one family is not believed about the other. Of two leases naming one
// IPv6 subnet, only the one etcd created first is programmed, as for a PublicIP. In an
// IPv4-only overlay the IPv6 part of a peer's lease is ignored.

// Refusal says why a peer lease is not programmed: Reason is one of the Refused* words,
// Detail a sentence naming the values.
type Refusal struct {
	Reason string
	Detail string
}

func (r *Refusal) String() string { return r.Reason + ": " + r.Detail }

// CheckPeerSubnet applies the subnet part of the trust rule to subnet, a lease of another
// host, for a host whose own subnet is own under cfg. It returns nil when the subnet may be
// programmed. Of several reasons it gives the most telling: outside the Network first, then
// overlapping our subnet, then the length.
func CheckPeerSubnet(cfg Config, own, subnet netip.Prefix) *Refusal {
	network := cfg.Network
	switch {
	case !subnet.IsValid() || !subnet.Addr().Is4():
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("%v is not an IPv4 subnet of Network %v", subnet, network)}
	case subnet.Bits() <= network.Bits() && subnet.Contains(network.Addr()):
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("%v covers the whole Network %v", subnet, network)}
	case !network.Contains(subnet.Addr()):
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("%v is outside Network %v", subnet, network)}
	case own.IsValid() && subnet.Overlaps(own):
		return &Refusal{RefusedOverlapsOwnSubnet, fmt.Sprintf("%v overlaps our subnet %v", subnet, own.Masked())}
	case subnet.Bits() != cfg.SubnetLen:
		return &Refusal{RefusedWrongLength, fmt.Sprintf("%v is a /%d; every lease in Network %v is a /%d (SubnetLen)",
			subnet, subnet.Bits(), network, cfg.SubnetLen)}
	}
	return nil
}

// CheckPeerIPv6 applies the subnet rule to the IPv6 part of l, a lease of another host, for a
// host whose own IPv6 subnet is own6 under cfg (a dual-stack overlay). A lease without an IPv6
// subnet passes: it is reached over IPv4 only.
func CheckPeerIPv6(cfg Config, own6 netip.Prefix, l Lease) *Refusal {
	subnet, network := l.IPv6Subnet, cfg.IPv6Network
	switch {
	case !subnet.IsValid():
		return nil
	case !isIPv6(subnet.Addr()):
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("IPv6 subnet %v is not an IPv6 subnet of IPv6Network %v", subnet, network)}
	case subnet.Bits() <= network.Bits() && subnet.Contains(network.Addr()):
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("IPv6 subnet %v covers the whole IPv6Network %v", subnet, network)}
	case !network.Contains(subnet.Addr()):
		return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("IPv6 subnet %v is outside IPv6Network %v", subnet, network)}
	case own6.IsValid() && subnet.Overlaps(own6):
		return &Refusal{RefusedOverlapsOwnSubnet, fmt.Sprintf("IPv6 subnet %v overlaps our IPv6 subnet %v", subnet, own6.Masked())}
	case subnet.Bits() != cfg.IPv6SubnetLen:
		return &Refusal{RefusedWrongLength, fmt.Sprintf("IPv6 subnet %v is a /%d; every IPv6 subnet in %v is a /%d (IPv6SubnetLen)",
			subnet, subnet.Bits(), network, cfg.IPv6SubnetLen)}
	}
	return nil
}

// ForFamilies is l as a datapath under cfg may use it: in an IPv4-only overlay without its
// IPv6 part, in an IPv6-only one without its IPv4 part (PublicIP 0.0.0.0, as flannel writes
// it there), whatever another host published. Its ID is then the subnet of the overlay's
// family.
func ForFamilies(cfg Config, l Lease) Lease {
	if !cfg.EnableIPv6 {
		l.IPv6Subnet, l.PublicIPv6, l.BackendV6Data = netip.Prefix{}, netip.Addr{}, nil
	}
	if cfg.IPv6Only() {
		l.Subnet, l.PublicIP, l.BackendData = netip.Prefix{}, netip.IPv4Unspecified(), nil
	}
	return l
}

// CheckPeer applies the whole trust rule's subnet part to l, a lease of another host, for a
// host whose own lease is own under cfg: the IPv4 subnet (unless the overlay is IPv6 only) and
// the IPv6 one (CheckPeerIPv6), which an IPv6-only overlay requires.
func CheckPeer(cfg Config, own, l Lease) *Refusal {
	if cfg.IPv6Only() {
		if !l.IPv6Subnet.IsValid() {
			return &Refusal{RefusedOutsideNetwork, fmt.Sprintf("lease %v has no IPv6 subnet, and the overlay is IPv6 only (IPv6Network %v)", l.ID(), cfg.IPv6Network)}
		}
	} else if r := CheckPeerSubnet(cfg, own.Subnet, l.Subnet.Masked()); r != nil {
		return r
	}
	return CheckPeerIPv6(cfg, own.IPv6Subnet, l)
}

// ClaimsFirst reports whether lease a's claim to its PublicIP comes before b's: the key etcd
// created first (the lower CreateRevision) keeps the PublicIP. Revisions are the same on every
// host, so every host keeps the same lease. Two leases of one revision cannot both be in etcd;
// between leases built by hand (revision 0) the lower subnet comes first.
func ClaimsFirst(a, b Lease) bool {
	if a.CreateRevision != b.CreateRevision {
		return a.CreateRevision < b.CreateRevision
	}
	return comparePrefix(a.ID(), b.ID()) < 0
}
