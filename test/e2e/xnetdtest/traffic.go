package xnetdtest

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/harness"
)

// Mesh pings every container from every other one over IPv4, in parallel; it returns what
// failed.
func Mesh(cs []*harness.Container) []string {
	return mesh(cs, func(c *harness.Container) []netip.Addr { return []netip.Addr{c.IP} })
}

// IPv6Mesh is Mesh over IPv6.
func IPv6Mesh(cs []*harness.Container) []string {
	return mesh(cs, func(c *harness.Container) []netip.Addr { return []netip.Addr{c.IPv6} })
}

// DualStackMesh is Mesh over IPv6 and IPv4.
func DualStackMesh(cs []*harness.Container) []string {
	return mesh(cs, func(c *harness.Container) []netip.Addr { return []netip.Addr{c.IPv6, c.IP} })
}

// mesh pings each of dsts(b) from every container a to every other one b, 3 echoes each, all
// pairs in parallel, and returns the failures sorted. Where IPv6 is pinged, one echo per pair
// goes first, unchecked: IPv6 neighbour discovery on the hosts and bridges may cost it, as the
// first packet to a new neighbour may be for ping(8).
func mesh(cs []*harness.Container, dsts func(*harness.Container) []netip.Addr) []string {
	var warm sync.WaitGroup
	for _, a := range cs {
		for _, b := range cs {
			if a == b || !slices.ContainsFunc(dsts(b), netip.Addr.Is6) {
				continue
			}
			warm.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				_, _, _ = harness.Ping(ctx, a.Namespace, b.IPv6, 1, 0)
			})
		}
	}
	warm.Wait()
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, a := range cs {
		for _, b := range cs {
			if a == b {
				continue
			}
			for _, dst := range dsts(b) {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					sent, got, err := harness.Ping(ctx, a.Namespace, dst, 3, 50*time.Millisecond)
					if err != nil || got != sent {
						src := a.IP
						if dst.Is6() {
							src = a.IPv6
						}
						mu.Lock()
						failed = append(failed, fmt.Sprintf("%s(%v) -> %s(%v): %d/%d replies %v", a.Host.Name, src, b.Host.Name, dst, got, sent, err))
						mu.Unlock()
					}
				})
			}
		}
	}
	wg.Wait()
	slices.Sort(failed)
	return failed
}

// SourceSeen is the source address a listener in to sees for a datagram from from to dst.
func SourceSeen(t *testing.T, from, to *harness.Namespace, dst netip.Addr) netip.Addr {
	t.Helper()
	a, err := harness.SourceSeen(from, to, dst, 3)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
