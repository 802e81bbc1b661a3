package subnetmgr

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// KeepLease renews lease renewMargin before it expires, retrying with backoff through etcd
// outages, re-acquiring the same subnet if the key was lost and is still free (and another
// subnet if a different host took it meanwhile). It calls onChange with each new version of
// the lease (a renewal moves Expiration; a lost subnet changes Subnet) and returns ctx.Err()
// when ctx ends.
//
// Renewal refreshes the etcd lease behind the key (KeepAliveOnce), so the key itself does not
// change and no watcher sees an event. A reservation (no TTL) has nothing to renew: it is
// only checked at the same cadence, and taken back if it disappeared.
//
// It also watches our key, and acts within moments of a write that is not ours:
//   - our lease (attached to our etcd lease, in a key we created: lease.CreateRevision) with
//     another PublicIP, another value, or detached from our etcd lease is written back, in a
//     transaction that loses to any change made meanwhile and to the key having been deleted
//     and created again. The key is ours because we created it: the key's current etcd lease
//     is no proof, since a plain `etcdctl put` detaches the key from it. Honest hosts never
//     write a key they did not create or reclaim with their own PublicIP, so two of them never
//     write one key back and forth.
//   - a reservation we hold whose PublicIP an administrator rewrote has moved to that host: we
//     say so and take another subnet.
//   - a key created anew by someone else (another CreateRevision) is no longer ours: we take
//     another subnet, loudly, as before.
func (m *Manager) KeepLease(ctx context.Context, cfg Config, attrs LeaseAttrs, lease Lease, renewMargin time.Duration, onChange func(Lease)) error {
	return m.KeepPoolLease(ctx, OverlayPool(cfg), attrs, lease, renewMargin, onChange)
}

// KeepPoolLease is KeepLease for a lease of pool p (from AcquirePoolLease).
func (m *Manager) KeepPoolLease(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease, renewMargin time.Duration, onChange func(Lease)) error {
	if err := p.check(); err != nil {
		return fmt.Errorf("keep lease: %w", err)
	}
	if renewMargin <= 0 || renewMargin >= m.ttl {
		half := m.ttl / 2
		m.log.Warn("subnet lease renew margin is not below the lease TTL; renewing at half the TTL instead",
			"renew_margin", renewMargin, "ttl", m.ttl, "using", half)
		renewMargin = half
	}
	// wake fires when our key is written by someone else, or (WatchOwnKey) deleted: renew at
	// once, which writes it back, gives it up or re-creates it.
	wake := make(chan struct{}, 1)
	watchKey := func(l Lease) context.CancelFunc {
		wctx, cancel := context.WithCancel(ctx)
		go m.watchOwnKey(wctx, p, l.key(m.prefix, p.Dir), attrs, l.EtcdLeaseID != 0, wake)
		return cancel
	}
	stopWatch := watchKey(lease)
	defer func() { stopWatch() }()
	bo := m.newBackoff()
	failing := false
	for {
		var wait time.Duration
		if !failing {
			if lease.Expiration.IsZero() {
				wait = m.ttl - renewMargin
			} else {
				wait = max(time.Until(lease.Expiration)-renewMargin, m.retryMin)
			}
		}
		if err := sleepOrWake(ctx, wait, wake); err != nil {
			return err
		}
		nl, err := m.renew(ctx, p, attrs, lease)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			d := bo.next()
			m.log.Log(ctx, retryLevel(err), "cannot renew our subnet lease, retrying", "subnet", lease.ID(), "err", err,
				"expires", lease.Expiration, "retry_in", d.Round(time.Millisecond))
			failing = true
			if err := sleep(ctx, d); err != nil {
				return err
			}
			continue
		}
		if failing {
			m.log.Info("subnet lease renewed again after failures", "subnet", nl.ID())
		}
		failing = false
		bo.reset()
		if nl.Subnet != lease.Subnet || nl.IPv6Subnet != lease.IPv6Subnet {
			stopWatch()
			stopWatch = watchKey(nl)
		}
		lease = nl
		if onChange != nil {
			onChange(lease)
		}
	}
}

// renew brings our key in etcd back in line with lease, returning its new version.
func (m *Manager) renew(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease) (Lease, error) {
	key := lease.key(m.prefix, p.Dir)
	rctx, cancel := m.reqCtx(ctx)
	resp, err := m.client.Get(rctx, key)
	cancel()
	if err != nil {
		return Lease{}, m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		// Expired while etcd was out of reach for longer than the TTL, or deleted by hand:
		// take the same subnet back if it is still free, so peers and containers keep it.
		l, err := m.create(ctx, p.Dir, lease.Subnet, lease.IPv6Subnet, attrs)
		if err == nil {
			m.log.Warn("our subnet lease was gone from etcd; re-acquired the same subnet", "subnet", lease.ID())
			return l, nil
		}
		if !errors.Is(err, errConflict) {
			return Lease{}, err
		}
		return m.lost(ctx, p, attrs, lease, "another host took it while our lease was gone")
	}
	cur, _, perr := m.parseKVIn(p.Dir, resp.Kvs[0])
	// Ours: a key we created (or reclaimed) for our etcd lease and nobody deleted since.
	mine := lease.EtcdLeaseID != 0 && lease.CreateRevision != 0 && cur.CreateRevision == lease.CreateRevision
	if perr != nil || cur.Host() != attrs.Host() {
		holder := "a malformed value"
		if perr == nil {
			holder = "PublicIP " + cur.Host().String()
		}
		switch {
		case mine:
			return m.takeBack(ctx, p, attrs, lease, cur, "rewritten with "+holder)
		case lease.EtcdLeaseID == 0 && cur.leaseID() == 0:
			m.log.Warn("our reserved subnet now names another host: an administrator moved the reservation; giving it up and taking another subnet",
				"pool", p.Dir, "subnet", lease.ID(), "public_ip", attrs.PublicIP, "now", holder)
			l, err := m.AcquirePoolLease(ctx, p, attrs, netip.Prefix{})
			if err != nil {
				return Lease{}, fmt.Errorf("replace the reservation %s moved to %s: %w", lease.ID(), holder, err)
			}
			return l, nil
		}
		return m.lost(ctx, p, attrs, lease, "the key now holds "+holder)
	}
	ours := Lease{Subnet: lease.Subnet, IPv6Subnet: lease.IPv6Subnet, CreateRevision: cur.CreateRevision, EtcdLeaseID: cur.EtcdLeaseID}
	ours.setAttrs(attrs)
	if mine && cur.leaseID() == 0 {
		// Someone detached our key from our etcd lease: as a "reservation" its PublicIP could
		// next be rewritten as if an administrator moved it.
		return m.takeBack(ctx, p, attrs, lease, cur, "detached from our etcd lease")
	}
	// Our PublicIP with another value, attached to an etcd lease, is not written back at once:
	// a second host configured with our PublicIP (it reclaimed our key at start) writes that,
	// and two such hosts must not write the key back and forth on every write.
	if cur.leaseID() == 0 || !sameAttrs(cur.Lease, ours) {
		// A reservation, or our key with another value (an older build's BackendData):
		// rewrite it as AcquireLease would.
		return m.reclaim(ctx, p.Dir, cur, attrs)
	}
	rctx, cancel = m.reqCtx(ctx)
	ka, err := m.client.KeepAliveOnce(rctx, cur.leaseID())
	cancel()
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		// The etcd lease ran out between the read and now; the key goes with it. Move the
		// key to a fresh lease if it is still there.
		return m.reclaim(ctx, p.Dir, cur, attrs)
	}
	if err != nil {
		return Lease{}, m.etcdErr(err, "renew etcd lease of %s", key)
	}
	ours.Expiration = time.Now().Add(time.Duration(ka.TTL) * time.Second)
	return ours, nil
}

// takeBack writes our value back into a key we created after someone else wrote it (how is
// what happened), attached to our etcd lease. The transaction only succeeds if the key is
// still the one we created and unchanged since we read it as cur; a failure is errConflict,
// and the keeper's retry reads the key again.
func (m *Manager) takeBack(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease, cur storedLease, how string) (Lease, error) {
	key := lease.key(m.prefix, p.Dir)
	m.log.Error("our lease was "+how+" by someone else; it is ours (we created the key for our etcd lease), writing it back",
		"pool", p.Dir, "subnet", lease.ID(), "public_ip", attrs.PublicIP,
		"etcd_lease", fmt.Sprintf("%x", lease.EtcdLeaseID), "key_etcd_lease", fmt.Sprintf("%x", cur.EtcdLeaseID))
	value, err := EncodeLeaseValue(attrs)
	if err != nil {
		return Lease{}, err
	}
	put := func(id clientv3.LeaseID) (bool, error) {
		rctx, cancel := m.reqCtx(ctx)
		defer cancel()
		resp, err := m.client.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", lease.CreateRevision),
				clientv3.Compare(clientv3.ModRevision(key), "=", cur.modRev)).
			Then(clientv3.OpPut(key, string(value), clientv3.WithLease(id))).
			Commit()
		if err != nil {
			return false, err
		}
		return resp.Succeeded, nil
	}
	id := clientv3.LeaseID(lease.EtcdLeaseID)
	ok, err := put(id)
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		// Our etcd lease is gone (revoked after the rewrite detached the key from it, so the
		// key survived): attach the key to a fresh one.
		if id, _, err = m.grant(ctx); err != nil {
			return Lease{}, err
		}
		if ok, err = put(id); err != nil || !ok {
			m.revoke(id)
		}
	}
	if err != nil {
		return Lease{}, m.etcdErr(err, "write back %s", key)
	}
	if !ok {
		return Lease{}, fmt.Errorf("write back %s: %w", key, errConflict)
	}
	nl := Lease{Subnet: lease.Subnet, IPv6Subnet: lease.IPv6Subnet, CreateRevision: lease.CreateRevision, EtcdLeaseID: int64(id), Expiration: m.expiryOf(ctx, id)}
	nl.setAttrs(attrs)
	m.log.Warn("our lease is ours again", "pool", p.Dir, "subnet", lease.ID(), "public_ip", attrs.PublicIP)
	return nl, nil
}

// lost handles our subnet held by someone else: take another one, loudly.
func (m *Manager) lost(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease, why string) (Lease, error) {
	m.log.Error("our subnet lease was lost; acquiring another subnet (containers on the old one lose connectivity)",
		"pool", p.Dir, "subnet", lease.ID(), "why", why)
	l, err := m.AcquirePoolLease(ctx, p, attrs, netip.Prefix{})
	if err != nil {
		return Lease{}, fmt.Errorf("replace lost lease %s: %w", lease.ID(), err)
	}
	return l, nil
}

// sleepOrWake waits d, until ctx ends, or until wake fires (a nil wake never does).
func sleepOrWake(ctx context.Context, d time.Duration, wake <-chan struct{}) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	case <-wake:
		// Let a burst of deletes (an operator's etcdctl del --prefix) settle into one renewal.
		_ = sleep(ctx, 10*time.Millisecond)
	}
	return ctx.Err()
}

// watchOwnKey signals wake when key, our lease's, is written with what renew acts on at once
// (another PublicIP, a malformed value, or, when leased is set, no etcd lease: see
// KeepLease), or, with p.WatchOwnKey, deleted, until ctx ends. It watches that one key, not
// the pool, so a host does not receive every other host's writes a second time. A broken
// watch resumes after the last revision it saw; when that revision is compacted away it wakes
// the keeper once to look.
func (m *Manager) watchOwnKey(ctx context.Context, p Pool, key string, attrs LeaseAttrs, leased bool, wake chan<- struct{}) {
	signal := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	bo := m.newBackoff()
	var rev int64 // the last revision seen; 0 before the first response
	for ctx.Err() == nil {
		opts := []clientv3.OpOption{}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev+1))
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range m.client.Watch(wctx, key, opts...) {
			if resp.CompactRevision != 0 {
				rev = 0
				signal()
				break
			}
			if resp.Err() != nil {
				break
			}
			bo.reset()
			rev = resp.Header.Revision
			for _, ev := range resp.Events {
				switch {
				case ev.Type == clientv3.EventTypeDelete && p.WatchOwnKey:
					m.log.Warn("our lease key was deleted; taking the range back now", "key", key)
					signal()
				case ev.Type == clientv3.EventTypePut && m.isForeignWrite(p, ev.Kv, attrs, leased):
					signal()
				}
			}
		}
		cancel()
		_ = sleep(ctx, bo.next())
	}
}

// isForeignWrite says whether kv, our key as just written, names another PublicIP, does not
// parse, or (leased: we hold it with an etcd lease) was detached from every etcd lease.
func (m *Manager) isForeignWrite(p Pool, kv *mvccpb.KeyValue, attrs LeaseAttrs, leased bool) bool {
	l, _, err := m.parseKVIn(p.Dir, kv)
	return err != nil || l.Host() != attrs.Host() || leased && l.leaseID() == 0
}
