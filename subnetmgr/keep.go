package subnetmgr

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

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
	// wake fires when our key is deleted (WatchOwnKey): renew at once, which re-creates it.
	var wake <-chan struct{}
	var ownKey atomic.Pointer[string]
	if p.WatchOwnKey {
		key := PoolKey(m.prefix, p.Dir, lease.Subnet)
		ownKey.Store(&key)
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		w := make(chan struct{}, 1)
		go m.watchDeletes(wctx, p.Dir, &ownKey, w)
		wake = w
	}
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
			m.log.Log(ctx, retryLevel(err), "cannot renew our subnet lease, retrying", "subnet", lease.Subnet, "err", err,
				"expires", lease.Expiration, "retry_in", d.Round(time.Millisecond))
			failing = true
			if err := sleep(ctx, d); err != nil {
				return err
			}
			continue
		}
		if failing {
			m.log.Info("subnet lease renewed again after failures", "subnet", nl.Subnet)
		}
		failing = false
		bo.reset()
		lease = nl
		if p.WatchOwnKey {
			key := PoolKey(m.prefix, p.Dir, lease.Subnet)
			ownKey.Store(&key)
		}
		if onChange != nil {
			onChange(lease)
		}
	}
}

// renew brings our key in etcd back in line with lease, returning its new version.
func (m *Manager) renew(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease) (Lease, error) {
	key := PoolKey(m.prefix, p.Dir, lease.Subnet)
	rctx, cancel := m.reqCtx(ctx)
	resp, err := m.client.Get(rctx, key)
	cancel()
	if err != nil {
		return Lease{}, m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		// Expired while etcd was out of reach for longer than the TTL, or deleted by hand:
		// take the same subnet back if it is still free, so peers and containers keep it.
		l, err := m.create(ctx, p.Dir, lease.Subnet, attrs)
		if err == nil {
			m.log.Warn("our subnet lease was gone from etcd; re-acquired the same subnet", "subnet", lease.Subnet)
			return l, nil
		}
		if !errors.Is(err, errConflict) {
			return Lease{}, err
		}
		return m.lost(ctx, p, attrs, lease, "another host took it while our lease was gone")
	}
	cur, _, perr := m.parseKVIn(p.Dir, resp.Kvs[0])
	if perr != nil || cur.PublicIP != attrs.PublicIP {
		holder := "a malformed value"
		if perr == nil {
			holder = "PublicIP " + cur.PublicIP.String()
		}
		return m.lost(ctx, p, attrs, lease, "the key now holds "+holder)
	}
	ours := Lease{Subnet: lease.Subnet, PublicIP: attrs.PublicIP, BackendType: attrs.BackendType, BackendData: attrs.BackendData}
	if cur.leaseID == 0 || !sameAttrs(cur.Lease, ours) {
		// A reservation, or our key with another value (an older build's BackendData):
		// rewrite it as AcquireLease would.
		return m.reclaim(ctx, p.Dir, cur, attrs)
	}
	rctx, cancel = m.reqCtx(ctx)
	ka, err := m.client.KeepAliveOnce(rctx, cur.leaseID)
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

// lost handles our subnet held by someone else: take another one, loudly.
func (m *Manager) lost(ctx context.Context, p Pool, attrs LeaseAttrs, lease Lease, why string) (Lease, error) {
	m.log.Error("our subnet lease was lost; acquiring another subnet (containers on the old one lose connectivity)",
		"pool", p.Dir, "subnet", lease.Subnet, "why", why)
	l, err := m.AcquirePoolLease(ctx, p, attrs, netip.Prefix{})
	if err != nil {
		return Lease{}, fmt.Errorf("replace lost lease %s: %w", lease.Subnet, err)
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

// watchDeletes signals wake whenever the key *ownKey points to is deleted under
// <prefix>/<dir>/, until ctx ends. A broken watch is restarted from now: a delete it missed
// is found by the next periodic renewal, as without the watch.
func (m *Manager) watchDeletes(ctx context.Context, dir string, ownKey *atomic.Pointer[string], wake chan<- struct{}) {
	bo := m.newBackoff()
	for ctx.Err() == nil {
		wch := m.client.Watch(clientv3.WithRequireLeader(ctx), PoolPrefix(m.prefix, dir), clientv3.WithPrefix(),
			clientv3.WithFilterPut())
		for resp := range wch {
			if resp.Err() != nil {
				break
			}
			bo.reset()
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete && string(ev.Kv.Key) == *ownKey.Load() {
					m.log.Warn("our lease key was deleted; taking the range back now", "key", string(ev.Kv.Key))
					select {
					case wake <- struct{}{}:
					default:
					}
				}
			}
		}
		_ = sleep(ctx, bo.next())
	}
}
