package subnetmgr

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Design history. flannel's watcher turned a broken watch into "remove everything, then add
// what a fresh list returns", and treated one unparsable key under the prefix as a reason to
// do that: every peer route vanished for a moment. Here the watcher keeps its own view of
// every lease; a resync lists again and emits only the differences against that view, and a
// key that does not parse is logged and left out of the view without touching anything else.
// The watch starts at the revision right after the list, so no change falls between the two
// and none is seen twice.

// estimateExpiry fills in a watched lease's Expiration without asking etcd: a full TTL from
// when the key was seen. Asking (one TimeToLive per peer) took 0.5-0.8 s for 5,000 peers on
// the 2-core test VM, against 0.07 s for the list itself, and no consumer of peer leases
// needs the exact time; ListLeases asks etcd. A reservation keeps its zero Expiration.
func estimateExpiry(l storedLease, ttl time.Duration) storedLease {
	if l.leaseID != 0 {
		l.Expiration = time.Now().Add(ttl)
	}
	return l
}

// watcher holds one WatchLeases call's view of the leases.
type watcher struct {
	m      *Manager
	events chan<- []Event
	view   map[netip.Prefix]storedLease
	// badKeys holds the ModRevision of each malformed key already logged, so a resync does
	// not log the same garbage again.
	badKeys map[string]int64
}

// WatchLeases sends every current lease as one batch of EventAdded (an empty batch when there
// is none), then every change, until ctx ends (it then returns ctx.Err()). It survives
// compaction and broken watches by re-listing and sending only the differences, so a lease
// still in etcd is never reported removed. Malformed entries are logged and skipped.
// Expirations in events are estimates (see Lease.Expiration).
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []Event) error {
	w := &watcher{m: m, events: events, view: map[netip.Prefix]storedLease{}, badKeys: map[string]int64{}}
	rev, err := w.resync(ctx, true)
	if err != nil {
		return err
	}
	for {
		if m.beforeWatch != nil {
			m.beforeWatch(rev)
		}
		err := w.watchFrom(ctx, rev+1)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		m.watchResyncs.Add(1)
		m.log.Warn("lease watch interrupted; resyncing from a fresh list", "reason", err)
		if rev, err = w.resync(ctx, false); err != nil {
			return err
		}
	}
}

// watchFrom applies watch responses from rev on until the watch breaks, returning why.
func (w *watcher) watchFrom(ctx context.Context, rev int64) error {
	// WithRequireLeader: a member cut off from its cluster ends the watch instead of
	// silently serving nothing, and we resync through another member.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := w.m.client.Watch(wctx, SubnetsPrefix(w.m.prefix), clientv3.WithPrefix(), clientv3.WithRev(rev))
	for resp := range wch {
		if resp.CompactRevision != 0 {
			w.m.etcdErrors.Add(1)
			return fmt.Errorf("watch from revision %d: compacted up to %d", rev, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			w.m.etcdErrors.Add(1)
			return fmt.Errorf("watch: %v", err)
		}
		if batch := w.apply(resp.Events); len(batch) > 0 {
			if err := w.send(ctx, batch); err != nil {
				return err
			}
		}
	}
	return fmt.Errorf("watch channel closed")
}

// apply folds a watch response's events into the view and returns what changed.
func (w *watcher) apply(evs []*clientv3.Event) []Event {
	var batch []Event
	for _, ev := range evs {
		key := string(ev.Kv.Key)
		switch ev.Type {
		case clientv3.EventTypePut:
			l, _, err := w.m.parseKV(ev.Kv)
			if err != nil {
				w.logBad(key, ev.Kv.ModRevision, err)
				continue
			}
			delete(w.badKeys, key)
			batch = append(batch, w.put(estimateExpiry(l, w.m.ttl))...)
		case clientv3.EventTypeDelete:
			delete(w.badKeys, key)
			subnet, err := ParseSubnetKey(w.m.prefix, key)
			if err != nil {
				continue
			}
			if old, ok := w.view[subnet]; ok {
				delete(w.view, subnet)
				batch = append(batch, Event{Type: EventRemoved, Lease: old.Lease})
			}
		}
	}
	return batch
}

// put records l in the view and returns the event it makes, if any. A rewrite that changes
// nothing a peer uses (a renewal by re-put, as flannel does) is no event.
func (w *watcher) put(l storedLease) []Event {
	old, ok := w.view[l.Subnet]
	w.view[l.Subnet] = l
	switch {
	case !ok:
		return []Event{{Type: EventAdded, Lease: l.Lease}}
	case !sameAttrs(old.Lease, l.Lease):
		return []Event{{Type: EventChanged, Lease: l.Lease}}
	}
	return nil
}

func (w *watcher) logBad(key string, modRev int64, err error) {
	if w.badKeys[key] == modRev {
		return
	}
	w.badKeys[key] = modRev
	w.m.log.Warn("skipping malformed entry under the subnets prefix", "key", key, "err", err)
}

// resync lists the leases (retrying with backoff until ctx ends), sends the differences to
// the view (everything, as one batch, when initial) and returns the list's revision.
func (w *watcher) resync(ctx context.Context, initial bool) (int64, error) {
	bo := w.m.newBackoff()
	var snap snapshot
	for {
		var err error
		if snap, err = w.m.listQuiet(ctx, SubnetsDir, w.logBad); err == nil {
			break
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		d := bo.next()
		w.m.log.Log(ctx, retryLevel(err), "cannot list leases, retrying", "err", err, "retry_in", d.Round(time.Millisecond))
		if err := sleep(ctx, d); err != nil {
			return 0, err
		}
	}
	batch := []Event{}
	seen := make(map[netip.Prefix]bool, len(snap.leases))
	for _, l := range snap.leases {
		seen[l.Subnet] = true
		batch = append(batch, w.put(estimateExpiry(l, w.m.ttl))...)
	}
	for subnet, old := range w.view {
		if !seen[subnet] {
			delete(w.view, subnet)
			batch = append(batch, Event{Type: EventRemoved, Lease: old.Lease})
		}
	}
	if initial || len(batch) > 0 {
		if err := w.send(ctx, batch); err != nil {
			return 0, err
		}
	}
	return snap.rev, nil
}

func (w *watcher) send(ctx context.Context, batch []Event) error {
	select {
	case w.events <- batch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
