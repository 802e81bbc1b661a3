package health

import (
	"context"
	"net/netip"
	"time"
)

// ProbeOnce probes every peer over both paths from ports of its own (beside a running daemon's
// prober) until each path has a verdict or ctx ends, and returns what it found. A path is
// unreachable after o.DownAfter probes in a row went unanswered (default 3 here: a one-shot
// check has no history to smooth a single lost packet). It works in the network namespace of
// the calling thread.
func ProbeOnce(ctx context.Context, o Options, peers []Peer) (map[netip.Prefix]PeerHealth, error) {
	o.Ephemeral = true
	o.OnChange = nil
	if o.DownAfter <= 0 {
		o.DownAfter = 3
	}
	if o.MaxRate <= 0 {
		o.MaxRate = 1000
	}
	if o.Interval <= 0 {
		o.Interval = 300 * time.Millisecond
	}
	p, err := Start(o)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	p.SetPeers(peers)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !p.settled() {
		select {
		case <-ctx.Done():
			return p.Snapshot(), nil
		case <-tick.C:
		}
	}
	return p.Snapshot(), nil
}
