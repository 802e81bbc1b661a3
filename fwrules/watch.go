package fwrules

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// nfnlgrpNFTables is the netlink multicast group nf_tables announces every committed change
// on (NFNLGRP_NFTABLES in linux/netfilter/nfnetlink.h; `nft monitor` listens to it).
const nfnlgrpNFTables = 7

// Settle is how long Keep waits after a ruleset change before it checks: dockerd writes its
// rules in a burst of iptables calls, and checking in the middle of one would only repeat.
const Settle = 150 * time.Millisecond

// ChangeWatch reports changes to the nf_tables ruleset of the network namespace it was opened
// in. iptables-nft, Docker's iptables on current distributions, writes there, so Docker putting
// its MASQUERADE in front of ours at its start is seen the moment it happens instead of at
// Keep's next tick. iptables-legacy has no such notification; the ticker covers it.
type ChangeWatch struct {
	// C gets a value (coalesced) after changes, and is closed when the subscription ends.
	C      <-chan struct{}
	closed atomic.Bool
}

// WatchChanges subscribes in the calling thread's network namespace.
func WatchChanges() (*ChangeWatch, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("netfilter netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1 << (nfnlgrpNFTables - 1)}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("subscribe to nf_tables changes: %w", err)
	}
	// A blocked receive does not return when another thread closes the socket, so the reader
	// wakes twice a second to see whether Close was called.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netfilter netlink socket timeout: %w", err)
	}
	c := make(chan struct{}, 1)
	w := &ChangeWatch{C: c}
	go func() {
		defer close(c)
		defer unix.Close(fd)
		buf := make([]byte, 1<<16)
		for !w.closed.Load() {
			_, _, err := unix.Recvfrom(fd, buf, 0)
			switch err {
			case nil, unix.ENOBUFS: // ENOBUFS: changes came faster than we read, so there were some
			case unix.EAGAIN, unix.EINTR:
				continue
			default:
				return
			}
			select {
			case c <- struct{}{}:
			default:
			}
		}
	}()
	return w, nil
}

// Settled waits until changes have stopped for Settle (a burst is then one check), at most a
// second, or until ctx ends.
func (w *ChangeWatch) Settled(ctx context.Context) {
	quiet := time.NewTimer(Settle)
	defer quiet.Stop()
	limit := time.NewTimer(time.Second)
	defer limit.Stop()
	c := w.C
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-c:
			if !ok {
				c = nil
				continue
			}
			quiet.Reset(Settle)
		case <-quiet.C:
			return
		case <-limit.C:
			return
		}
	}
}

// Close ends the subscription within half a second.
func (w *ChangeWatch) Close() { w.closed.Store(true) }
