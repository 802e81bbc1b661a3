package ebpf

// DirectRouting in the ebpf backend (Cilium's BPF host routing, flannel's "DirectRouting"): a
// peer on our L2 segment, as backend.DirectRouter decides it (its PublicIP inside a connected
// subnet of the underlay NIC, host-gw's rule), gets route.direct set in the routes map, and
// the programs send its subnet's packets plain out of the underlay (to the peer's MAC from the
// neighbour table, bpf_redirect_neigh while it is unresolved) and deliver plain packets from it
// straight into containers (bpf_redirect_peer), after checking
// that their Ethernet source is that peer (bpf/direct.h). No kernel route is involved: the
// host's own traffic takes xnet0 as for VXLAN peers and encap_host sends it plain too. The
// decision is made again at every AddPeer, so a peer whose lease moves it onto or off our
// segment switches path with one map update.
//
// IPv6 the same way (peerPath6, bpf/direct6.h): a peer whose PublicIPv6 is on our IPv6 segment
// gets routes6.direct, in a dual-stack overlay (decided apart from its IPv4 path) and in an
// IPv6-only one, and its IPv6 subnet goes plain via its PublicIPv6. It takes an IPv6 underlay
// address of ours (the source the FIB lookup asks from); without one IPv6 stays in VXLAN. The
// programs cache its next hop in the same nexthops map, keyed by its PublicIPv6, and the same
// invalidation applies: a changed path drops the entry, and PrunePeers drops what no kept lease
// names.

import (
	"net/netip"

	"github.com/xnet-dev/xnet/backend"
)

// directState is the backend's DirectRouting: whether the config turns it on, the decision, and
// how each programmed peer is reached. Guarded by the backend's mu.
type directState struct {
	enabled bool
	router  *backend.DirectRouter // netlink in the backend's namespace: call it through exec
	paths   map[netip.Prefix]backend.PeerPath
}

func newDirectState(opts backend.Options) directState {
	return directState{
		enabled: opts.Config.Backend.DirectRouting,
		router:  backend.NewDirectRouter(nil, opts.Iface),
		paths:   map[netip.Prefix]backend.PeerPath{},
	}
}

// peerPath decides how the peer on subnet at publicIP is reached and records it, logging a
// change. A new or changed path also drops the cached next hop towards the peer: the nexthops
// cache is what decap checks a direct peer's MAC against, and after the underlay changed (this
// host or the peer moved to another segment) its entry may still name the old next hop, a
// router, for up to XNET_NEXTHOP_TTL_JIFFIES. Called with mu held.
func (b *Backend) peerPath(subnet netip.Prefix, publicIP netip.Addr) backend.PeerPath {
	path := backend.PeerPath{Why: "DirectRouting is off"}
	if b.direct.enabled {
		// The NIC's addresses are read in the backend's namespace; Path cannot fail (a peer
		// it cannot judge gets VXLAN, which works from anywhere).
		_ = b.exec.do(func() error { path = b.direct.router.Path(true, publicIP); return nil })
	}
	if old, ok := b.direct.paths[subnet]; b.direct.enabled && (!ok || old.Direct != path.Direct) {
		b.Log.Info("peer path", "subnet", subnet, "public_ip", publicIP, "direct", path.Direct, "why", path.Why)
		if err := b.m.DeleteNexthop(publicIP); err != nil {
			b.Log.Warn("dropping the cached next hop of a peer whose path changed", "public_ip", publicIP, "err", err)
		}
	}
	b.direct.paths[subnet] = path
	return path
}

// forgetPath drops what peerPath recorded for subnet. Called with mu held.
func (b *Backend) forgetPath(subnet netip.Prefix) { delete(b.direct.paths, subnet) }

// peerPath6 is peerPath for the IPv6 subnet of a peer at publicIPv6 (invalid when it publishes
// none): direct when DirectRouting is on, we have an IPv6 underlay address and publicIPv6 is on
// our IPv6 segment. Called with mu held.
func (b *Backend) peerPath6(subnet netip.Prefix, publicIPv6 netip.Addr) backend.PeerPath {
	path := backend.PeerPath{Why: "DirectRouting is off"}
	switch {
	case !b.direct.enabled:
	case !b.ipv6Underlay:
		path.Why = "VXLAN: we have no IPv6 underlay address"
	case !publicIPv6.Is6() || publicIPv6.Is4In6():
		path.Why = "VXLAN: the peer publishes no PublicIPv6"
	default:
		_ = b.exec.do(func() error { path = b.direct.router.Path(true, publicIPv6); return nil })
	}
	if old, ok := b.direct.paths[subnet]; b.direct.enabled && (!ok || old.Direct != path.Direct) {
		b.Log.Info("peer path", "ipv6_subnet", subnet, "public_ipv6", publicIPv6, "direct", path.Direct, "why", path.Why)
		// The nexthops cache holds IPv6 next hops too, keyed by PublicIPv6: peerPath's reason.
		if publicIPv6.IsValid() {
			if err := b.m.DeleteNexthop(publicIPv6); err != nil {
				b.Log.Warn("dropping the cached next hop of a peer whose path changed", "public_ipv6", publicIPv6, "err", err)
			}
		}
	}
	b.direct.paths[subnet] = path
	return path
}
