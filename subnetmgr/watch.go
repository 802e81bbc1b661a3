package subnetmgr

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
)

// Design history. flannel's watcher turned a broken watch into "remove everything, then add
// what a fresh list returns", and treated one unparsable key under the prefix as a reason to
// do that: every peer route vanished for a moment. Here the watcher keeps its own view of
// every lease; a resync lists again and emits only the differences against that view, and a
// key that does not parse is logged and left out of the view without touching anything else.
// The watch starts at the list's own revision, so no change falls between the two; replaying
// that revision's changes makes no events (they are in the view already), and starting there
// rather than one later matters for the silence check below.
//
// Silent members. In a 3-member etcd cluster, a member that loses power sends no FIN or RST:
// the watch stream through it just goes quiet. Before the check below, a host whose watch ran
// through such a member saw new and removed leases only once gRPC's keepalive gave up on the
// connection (a ping after 10 s without reads, gRPC's minimum, then the ping timeout): 9-11 s
// late in the e2e test, and nothing was logged meanwhile. A quiet watch and a dead one look
// alike, so the watcher asks: after watchIdle without a response it sends a progress request
// on the watch stream (etcd answers with an empty response at the current revision), and a
// watch still silent watchReply later is declared dead: logged, counted as a resync, and
// replaced by a fresh list and a new watch (2.5-3.5 s after the power-off in the e2e test).
// Each watch gets a clientv3 Watcher of its own: the client shares one gRPC stream between
// watches whose contexts carry the same metadata, so a new watch on the shared watcher could
// join the dead stream, and closing our own watcher also ends a stream RequestProgress would
// open if ours had just closed.
//
// The request also gives the kernel something to time: gRPC sets the connection's
// TCP_USER_TIMEOUT to the client's DialKeepAliveTimeout, so bytes that a powered-off member
// never acknowledges end the whole connection within that timeout, and the balancer stops
// sending anything there, renewals included. When that happens first (something else wrote
// to the connection before our request did), clientv3 resumes the watch on another
// connection by itself, from the revision after its last response; the watcher counts the
// streams clientv3 opens for it and logs that at Info (nothing was missed). In a quiet
// cluster etcd then leaves the next progress request unanswered (see below): the watch is
// relisted, also at Info, a spare list after a connection that really broke. (A member
// that hangs right after such a resume is then reported at Info too; it is relisted all
// the same.)
//
// Cost at steady state: one small request and its answer on the existing stream per
// watchIdle of quiet, 30 a minute per host with the defaults; no new connection or RPC.
//
// etcd (3.7, read in its source) answers a progress request only when the store has reached
// the watch's start revision and the watch is in sync: a watch from the list's revision + 1
// would get no answer until something is written, which in a quiet cluster may be hours.
// And a watch is only declared dead once it has answered at least one progress request, so an
// etcd that ignores them (older than 3.4, or a proxy) or a server too busy to sync a new watch
// is never mistaken for a dead member: it keeps gRPC's keepalive as the only check.

// estimateExpiry fills in a watched lease's Expiration without asking etcd: a full TTL from
// when the key was seen. Asking (one TimeToLive per peer) took 0.5-0.8 s for 5,000 peers on
// the 2-core test VM, against 0.07 s for the list itself, and no consumer of peer leases
// needs the exact time; ListLeases asks etcd. A reservation keeps its zero Expiration.
func estimateExpiry(l storedLease, ttl time.Duration) storedLease {
	if l.leaseID() != 0 {
		l.Expiration = time.Now().Add(ttl)
	}
	return l
}

// watcher holds one WatchLeases call's view of the leases.
type watcher struct {
	m      *Manager
	events chan<- []Event
	view   map[string]storedLease // by key: two keys may name one IPv4 subnet with other IPv6 ones
	// badKeys holds the ModRevision of each malformed key already logged, so a resync does
	// not log the same garbage again.
	badKeys map[string]int64
}

// WatchLeases sends every current lease as one batch of EventAdded (an empty batch when there
// is none), then every change, until ctx ends (it then returns ctx.Err()). It survives
// compaction, broken watches and silent etcd members (noticed within watchIdle+watchReply,
// 3.5 s) by re-listing and sending only the differences, so a lease still in etcd is never
// reported removed. Malformed entries are logged and skipped.
// Expirations in events are estimates (see Lease.Expiration).
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []Event) error {
	w := &watcher{m: m, events: events, view: map[string]storedLease{}, badKeys: map[string]int64{}}
	rev, err := w.resync(ctx, true, false)
	if err != nil {
		return err
	}
	for {
		if m.beforeWatch != nil {
			m.beforeWatch(rev)
		}
		err := w.watchFrom(ctx, rev)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		m.watchResyncs.Add(1)
		var silent *silentError
		switch {
		case errors.As(err, &silent) && silent.resumed:
			m.log.Info("etcd watch connection failed; the watch resumed through another connection, "+
				"where etcd does not answer progress requests until the next write; relisting",
				"silent_for", silent.d.Round(100*time.Millisecond))
		case silent != nil:
			d := silent.d.Round(100 * time.Millisecond)
			m.log.Warn(fmt.Sprintf("etcd watch silent for %s; reconnecting", d), "silent_for", d,
				"why", "no answer to a progress request: the etcd member behind the watch is gone or hung")
		default:
			m.log.Warn("lease watch interrupted; resyncing from a fresh list", "reason", err)
		}
		if rev, err = w.resync(ctx, false, silent != nil); err != nil {
			return err
		}
	}
}

// streamCounter counts the gRPC streams clientv3 opens for one Watcher: more than one means
// the stream failed and clientv3 opened another and resumed the watch on it, by itself.
type streamCounter struct {
	pb.WatchClient
	opened atomic.Int64
}

func (c *streamCounter) Watch(ctx context.Context, opts ...grpc.CallOption) (pb.Watch_WatchClient, error) {
	c.opened.Add(1)
	return c.WatchClient.Watch(ctx, opts...)
}

// silentError is a watch that answered nothing, progress request included, for d. resumed:
// clientv3 had reopened its stream meanwhile, and etcd leaves progress requests on a watch
// resumed after the last revision unanswered until something is written (see the design
// history): likely not a dead member, so not a warning.
type silentError struct {
	d       time.Duration
	resumed bool
}

func (e *silentError) Error() string {
	return fmt.Sprintf("etcd watch silent for %s", e.d.Round(100*time.Millisecond))
}

// watchFrom applies watch responses from rev on until the watch breaks or goes silent
// (*silentError), returning why.
func (w *watcher) watchFrom(ctx context.Context, rev int64) error {
	m := w.m
	// A Watcher of our own: a new gRPC stream (see the design history), counted.
	streams := &streamCounter{WatchClient: pb.NewWatchClient(m.client.ActiveConnection())}
	wt := clientv3.NewWatchFromWatchClient(streams, m.client)
	defer wt.Close()
	// WithRequireLeader: a member cut off from its cluster ends the watch instead of
	// silently serving nothing, and we resync through another member.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	// Watch returns once etcd has confirmed the watch, which a silent member never does.
	begun := time.Now()
	opening := time.AfterFunc(m.watchIdle+m.watchReply, cancel)
	wch := wt.Watch(wctx, SubnetsPrefix(m.prefix), clientv3.WithPrefix(), clientv3.WithRev(rev))
	if !opening.Stop() && ctx.Err() == nil {
		m.etcdErrors.Add(1)
		return &silentError{d: time.Since(begun)}
	}

	opened := streams.opened.Load()
	timer := time.NewTimer(m.watchIdle)
	defer timer.Stop()
	heard := time.Now() // the last response, or the end of handing its events on
	var asked time.Time // when the unanswered progress request went out; zero if none
	answered := false   // this watch has answered a progress request
	for {
		var resp clientv3.WatchResponse
		var ok bool
		select {
		case resp, ok = <-wch:
		case <-timer.C:
			select {
			case resp, ok = <-wch: // a response that came with the timer counts
			default:
				switch {
				case asked.IsZero():
					asked = time.Now()
					m.watchProbes.Add(1)
					pctx, pcancel := context.WithTimeout(wctx, m.watchReply) // same stream: same metadata
					_ = wt.RequestProgress(pctx)                             // a failure shows as silence
					pcancel()
					timer.Reset(time.Until(asked.Add(m.watchReply)))
				case answered:
					m.etcdErrors.Add(1)
					return &silentError{d: time.Since(heard), resumed: streams.opened.Load() > opened}
				default:
					// Never answered: an etcd that ignores progress requests, or one still
					// syncing this watch. Keep asking, but decide nothing from it.
					asked = time.Time{}
					timer.Reset(m.watchIdle)
				}
				continue
			}
		}
		if !ok {
			return fmt.Errorf("watch channel closed")
		}
		if n := streams.opened.Load(); n > opened {
			// The stream's connection failed (a member stopped, or the kernel gave up on a
			// powered-off one before our progress request did) and clientv3 resumed the
			// watch where it was. Nothing is lost, so not a warning; but say which.
			opened = n
			m.etcdErrors.Add(1)
			m.log.Info("etcd watch connection failed; the watch resumed through another connection", "streams_opened", n)
		}
		if resp.CompactRevision != 0 {
			m.etcdErrors.Add(1)
			return fmt.Errorf("watch from revision %d: compacted up to %d", rev, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			m.etcdErrors.Add(1)
			return fmt.Errorf("watch: %v", err)
		}
		if resp.IsProgressNotify() {
			answered = true
		}
		if batch := w.apply(resp.Events); len(batch) > 0 {
			if err := w.send(ctx, batch); err != nil {
				return err
			}
		}
		heard, asked = time.Now(), time.Time{}
		timer.Reset(m.watchIdle)
	}
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
			if old, ok := w.view[key]; ok {
				delete(w.view, key)
				batch = append(batch, Event{Type: EventRemoved, Lease: old.Lease})
			}
		}
	}
	return batch
}

// put records l in the view and returns the event it makes, if any. A rewrite that changes
// nothing a peer uses (a renewal by re-put, as flannel does) is no event; a key deleted and
// created again between two lists is, even with the same value: its CreateRevision, which
// orders claims to a PublicIP (ClaimsFirst), is new.
func (w *watcher) put(l storedLease) []Event {
	key := l.Key(w.m.prefix)
	old, ok := w.view[key]
	w.view[key] = l
	switch {
	case !ok:
		return []Event{{Type: EventAdded, Lease: l.Lease}}
	case !sameAttrs(old.Lease, l.Lease) || old.CreateRevision != l.CreateRevision:
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
//
// After a silent watch (quick), the list may go to the same silent member: the balancer picks
// members round robin and keeps a hung one (one whose kernel still acknowledges) until gRPC's
// keepalive gives up on it. So the first try gets quickListTimeout, each retry twice the last
// up to the usual request timeout: a hung member costs seconds, a list that is merely slow
// still gets its time.
func (w *watcher) resync(ctx context.Context, initial, quick bool) (int64, error) {
	bo := w.m.newBackoff()
	limit := w.m.requestTimeout
	if quick {
		limit = min(limit, quickListTimeout)
	}
	var snap snapshot
	for {
		lctx, cancel := context.WithTimeout(ctx, limit)
		var err error
		snap, err = w.m.listQuiet(lctx, SubnetsDir, w.logBad)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		limit = min(2*limit, w.m.requestTimeout)
		d := bo.next()
		w.m.log.Log(ctx, retryLevel(err), "cannot list leases, retrying", "err", err, "retry_in", d.Round(time.Millisecond))
		if err := sleep(ctx, d); err != nil {
			return 0, err
		}
	}
	batch := []Event{}
	seen := make(map[string]bool, len(snap.leases))
	for _, l := range snap.leases {
		seen[l.Key(w.m.prefix)] = true
		batch = append(batch, w.put(estimateExpiry(l, w.m.ttl))...)
	}
	for key, old := range w.view {
		if !seen[key] {
			delete(w.view, key)
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
