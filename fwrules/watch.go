package fwrules

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// nfnlgrpNFTables is the netlink multicast group nf_tables announces every committed change
// on (NFNLGRP_NFTABLES in linux/netfilter/nfnetlink.h; `nft monitor` listens to it).
const nfnlgrpNFTables = 7

// Settle is how long a Monitor waits after a ruleset change before it reads the rules: dockerd
// writes its rules in a burst of iptables calls, and reading in the middle of one would only
// repeat.
const Settle = 150 * time.Millisecond

// ChangeWatch reports changes to the nf_tables ruleset of the network namespace it was opened
// in. iptables-nft, Docker's iptables on current distributions, writes there, so Docker putting
// its MASQUERADE in front of ours at its start is seen the moment it happens instead of at
// Keep's next tick. iptables-legacy has no such notification; the interval covers it. A
// process holds one, in its Monitor.
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

// Consumer is one reader of the rules a Monitor serves.
type Consumer struct {
	// Every is how often Read gets a reading besides after changes. Unwatched is how often when
	// changes cannot be followed (no nf_tables notifications: iptables-legacy, or the
	// subscription failed); 0 means Every.
	Every, Unwatched time.Duration
	// Read gets each reading. It runs on Run's goroutine, so iptables runs in Run's network
	// namespace, and it must not block: the next reading, and every other consumer, wait.
	Read func(ctx context.Context, s *Snapshot)
}

// Monitor is one nf_tables change subscription, and one reading of the rules after each
// change, for every consumer that follows them: a daemon that keeps its forward rules and also
// looks at DOCKER-USER for --host-routing=auto holds one subscription, and one change costs
// one iptables-save per variant (Snapshot), not one per consumer. Consumers due on their own
// interval at the same moment share a reading too.
type Monitor struct {
	log       *slog.Logger
	consumers []Consumer
}

// NewMonitor is a Monitor without consumers; log may be nil.
func NewMonitor(log *slog.Logger) *Monitor {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Monitor{log: log}
}

// Add registers c. Call it before Run.
func (m *Monitor) Add(c Consumer) { m.consumers = append(m.consumers, c) }

// Run subscribes to nf_tables changes in the calling thread's network namespace and hands
// every consumer a reading at once (a change between its own first look and the subscription
// is not lost), then after each burst of changes has settled, and whenever a consumer's
// interval is up, until ctx ends. Consumers are called in the order they were added, on the
// calling goroutine. Without consumers it returns at once.
func (m *Monitor) Run(ctx context.Context) {
	if len(m.consumers) == 0 {
		return
	}
	var changed <-chan struct{}
	w, err := WatchChanges()
	if err != nil {
		m.log.Info("iptables rules: no nf_tables change notifications; reading them on an interval only", "err", err)
	} else {
		defer w.Close()
		changed = w.C
	}
	interval := func(c Consumer) time.Duration {
		if changed == nil && c.Unwatched > 0 {
			return c.Unwatched
		}
		return c.Every
	}
	due := make([]time.Time, len(m.consumers))
	// read hands one reading to every consumer, or with onlyDue to those whose interval is up.
	read := func(onlyDue bool) {
		s, now := NewSnapshot(), time.Now()
		for i, c := range m.consumers {
			if ctx.Err() != nil {
				return
			}
			if !onlyDue || !due[i].After(now) {
				c.Read(ctx, s)
				due[i] = time.Now().Add(interval(c))
			}
		}
	}
	next := func() time.Duration {
		return time.Until(slices.MinFunc(due, func(a, b time.Time) int { return a.Compare(b) }))
	}
	read(false)
	timer := time.NewTimer(next())
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-changed:
			if !ok {
				changed = nil // the subscription failed: intervals only from now on
				m.log.Info("iptables rules: the nf_tables change subscription ended; reading them on an interval only")
				for i, c := range m.consumers {
					if d := time.Now().Add(interval(c)); d.Before(due[i]) {
						due[i] = d
					}
				}
				break
			}
			w.Settled(ctx)
			read(false)
		case <-timer.C:
			read(true)
		}
		timer.Reset(next())
	}
}
