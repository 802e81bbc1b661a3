package dockernet

import (
	"fmt"
	"net/netip"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// allocator hands out the container addresses of this host's block of one network. The block's
// first address is the VXLAN device's (<block>.0, as flannel's), the second the bridge's, the
// last the broadcast: containers get the rest. Because every host allocates only inside its own
// block, and blocks are leases no two hosts can hold, addresses never collide across hosts.
type allocator struct {
	block netip.Prefix
	used  map[netip.Addr]bool
	// next is where the search for a free address starts: after the last one handed out, so a
	// released address is not reused at once (a peer may still have it in a cache).
	next netip.Addr
}

func newAllocator(block netip.Prefix) *allocator {
	return &allocator{block: block, used: map[netip.Addr]bool{}, next: firstContainerAddr(block)}
}

func firstContainerAddr(block netip.Prefix) netip.Addr { return block.Addr().Next().Next() }
func lastContainerAddr(block netip.Prefix) netip.Addr  { return subnetmgr.LastAddr(block).Prev() }

// request takes want when it is valid (Docker's --ip, or the address a restarted container had)
// or the next free address.
func (a *allocator) request(want netip.Addr) (netip.Addr, error) {
	first, last := firstContainerAddr(a.block), lastContainerAddr(a.block)
	if want.IsValid() {
		if want.Less(first) || last.Less(want) {
			return netip.Addr{}, fmt.Errorf("--ip %s is not in this host's block %s of the network: pick one in %s-%s, or leave --ip out", want, a.block, first, last)
		}
		if a.used[want] {
			return netip.Addr{}, fmt.Errorf("--ip %s is in use by another container", want)
		}
		a.used[want] = true
		return want, nil
	}
	ip := a.next
	for range a.size() {
		if ip.Less(first) || last.Less(ip) {
			ip = first
		}
		if !a.used[ip] {
			a.used[ip] = true
			a.next = ip.Next()
			return ip, nil
		}
		ip = ip.Next()
	}
	return netip.Addr{}, fmt.Errorf("this host's block %s of the network is full (%d containers)", a.block, a.size())
}

func (a *allocator) size() int {
	return int(1<<(32-a.block.Bits())) - 3
}

func (a *allocator) release(ip netip.Addr) { delete(a.used, ip) }

// markUsed records an address Docker already gave out (found after a restart of xnetd).
func (a *allocator) markUsed(ip netip.Addr) {
	if a.block.Contains(ip) {
		a.used[ip] = true
	}
}
