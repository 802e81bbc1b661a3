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
)

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

// ClaimsFirst reports whether lease a's claim to its PublicIP comes before b's: the key etcd
// created first (the lower CreateRevision) keeps the PublicIP. Revisions are the same on every
// host, so every host keeps the same lease. Two leases of one revision cannot both be in etcd;
// between leases built by hand (revision 0) the lower subnet comes first.
func ClaimsFirst(a, b Lease) bool {
	if a.CreateRevision != b.CreateRevision {
		return a.CreateRevision < b.CreateRevision
	}
	return comparePrefix(a.Subnet, b.Subnet) < 0
}
