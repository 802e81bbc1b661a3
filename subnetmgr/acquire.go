package subnetmgr

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// maxCandidates bounds how many free subnets are collected before one is picked at random:
// flannel picks among the first 100; a few more make two hosts starting together collide less.
const maxCandidates = 256

// expiryWorkers bounds the TimeToLive requests in flight when filling in peers' expiries.
const expiryWorkers = 16

// errConflict means a transaction lost a race with another host; retry at once.
var errConflict = errors.New("another host changed the subnet key first")

// storedLease is a well-formed lease key as etcd holds it.
type storedLease struct {
	Lease
	modRev int64
}

// leaseID is the etcd lease behind the key, 0 for a reservation.
func (l storedLease) leaseID() clientv3.LeaseID { return clientv3.LeaseID(l.EtcdLeaseID) }

// snapshot is one consistent read of one pool's keys (<prefix>/subnets/ for the overlay).
type snapshot struct {
	rev    int64
	leases []storedLease  // well-formed leases, sorted by subnet
	keys   []netip.Prefix // the ID of every key that names a subnet, well-formed value or not
	keys6  []netip.Prefix // the IPv6 subnets those keys name (dual-stack and IPv6-only keys)
}

// parseKV turns one key-value under <prefix>/subnets/ into a lease (see parseKVIn).
func (m *Manager) parseKV(kv *mvccpb.KeyValue) (l storedLease, subnetOK bool, err error) {
	return m.parseKVIn(SubnetsDir, kv)
}

// parseKVIn turns one key-value of the pool in dir into a lease. subnetOK says whether the key
// at least names a range (l.Subnet is then set, and the key occupies it even when its value
// is malformed).
func (m *Manager) parseKVIn(dir string, kv *mvccpb.KeyValue) (l storedLease, subnetOK bool, err error) {
	subnet, subnet6, err := ParseLeaseKey(m.prefix, dir, string(kv.Key))
	if err != nil {
		return storedLease{}, false, err
	}
	l = storedLease{Lease: Lease{Subnet: subnet, IPv6Subnet: subnet6, CreateRevision: kv.CreateRevision, EtcdLeaseID: kv.Lease},
		modRev: kv.ModRevision}
	attrs, err := DecodeLeaseValue(kv.Value)
	if err != nil {
		return l, true, fmt.Errorf("key %s: %w", kv.Key, err)
	}
	l.setAttrs(attrs)
	return l, true, nil
}

// list reads every key under <prefix>/<dir>/, logging and skipping malformed ones.
func (m *Manager) list(ctx context.Context, dir string) (snapshot, error) {
	return m.listQuiet(ctx, dir, func(key string, _ int64, err error) {
		m.log.Warn("skipping malformed entry under the "+dir+" prefix", "key", key, "err", err)
	})
}

// listQuiet is list with the caller deciding how to report malformed keys.
func (m *Manager) listQuiet(ctx context.Context, dir string, logBad func(key string, modRev int64, err error)) (snapshot, error) {
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, PoolPrefix(m.prefix, dir), clientv3.WithPrefix())
	if err != nil {
		return snapshot{}, m.etcdErr(err, "list leases under %s", PoolPrefix(m.prefix, dir))
	}
	snap := snapshot{rev: resp.Header.Revision}
	for _, kv := range resp.Kvs {
		l, subnetOK, err := m.parseKVIn(dir, kv)
		if subnetOK {
			snap.keys = append(snap.keys, l.ID())
			if l.IPv6Subnet.IsValid() {
				snap.keys6 = append(snap.keys6, l.IPv6Subnet)
			}
		}
		if err == nil {
			snap.leases = append(snap.leases, l)
		} else {
			logBad(string(kv.Key), kv.ModRevision, err)
		}
	}
	slices.SortFunc(snap.leases, func(a, b storedLease) int { return comparePrefix(a.ID(), b.ID()) })
	return snap, nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// fillExpiries asks etcd when each leased key's etcd lease runs out (one TimeToLive per
// lease, a bounded number in flight); reservations keep a zero Expiration.
func (m *Manager) fillExpiries(ctx context.Context, leases []storedLease) {
	var todo []int
	for i := range leases {
		if leases[i].leaseID() != 0 {
			todo = append(todo, i)
		}
	}
	var wg sync.WaitGroup
	work := make(chan int)
	for range min(expiryWorkers, len(todo)) {
		wg.Go(func() {
			for i := range work {
				leases[i].Expiration = m.expiryOf(ctx, leases[i].leaseID())
			}
		})
	}
	for _, i := range todo {
		work <- i
	}
	close(work)
	wg.Wait()
}

// expiryOf is when etcd lease id runs out. When etcd cannot say, the estimate is a full TTL
// from now: the key exists, so its lease was live a moment ago.
func (m *Manager) expiryOf(ctx context.Context, id clientv3.LeaseID) time.Time {
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.TimeToLive(rctx, id)
	if err != nil {
		m.etcdErrors.Add(1)
		m.log.Debug("cannot read a lease's TTL, estimating it", "lease_id", int64(id), "err", err)
		return time.Now().Add(m.ttl)
	}
	if resp.TTL < 0 { // expired, the key is about to go
		return time.Now()
	}
	return time.Now().Add(time.Duration(resp.TTL) * time.Second)
}

// ListLeases returns every well-formed lease (sorted by subnet) and the revision of the list.
// Each leased key's Expiration is exact (asked from etcd: one request per lease).
func (m *Manager) ListLeases(ctx context.Context) ([]Lease, int64, error) {
	return m.ListPoolLeases(ctx, SubnetsDir)
}

// ListPoolLeases is ListLeases for the pool whose keys live under <prefix>/<dir>/.
func (m *Manager) ListPoolLeases(ctx context.Context, dir string) ([]Lease, int64, error) {
	snap, err := m.list(ctx, dir)
	if err != nil {
		return nil, 0, err
	}
	m.fillExpiries(ctx, snap.leases)
	out := make([]Lease, len(snap.leases))
	for i, l := range snap.leases {
		out[i] = l.Lease
	}
	return out, snap.rev, nil
}

// AcquireLease reclaims our previous lease (same PublicIP, or prev, the subnet recorded in our
// subnet file; prev may be the zero Prefix) or takes a free subnet by a create-only
// transaction. It retries transaction conflicts at once and etcd errors with backoff until
// ctx ends; a full range is returned at once as an error wrapping ErrRangeFull.
func (m *Manager) AcquireLease(ctx context.Context, cfg Config, attrs LeaseAttrs, prev netip.Prefix) (Lease, error) {
	return m.acquire(ctx, OverlayPool(cfg), attrs, prev, netip.Prefix{})
}

// AcquireDualLease is AcquireLease for a dual-stack overlay, with prev6 the IPv6 subnet our
// file records (preferred when free, as prev is).
func (m *Manager) AcquireDualLease(ctx context.Context, cfg Config, attrs LeaseAttrs, prev, prev6 netip.Prefix) (Lease, error) {
	return m.acquire(ctx, OverlayPool(cfg), attrs, prev, prev6)
}

// AcquirePoolLease is AcquireLease for any pool: the same transaction, TTL, reclaim and
// reservation rules, under <prefix>/<p.Dir>/. It also skips every range that covers an
// address p avoids.
func (m *Manager) AcquirePoolLease(ctx context.Context, p Pool, attrs LeaseAttrs, prev netip.Prefix) (Lease, error) {
	return m.acquire(ctx, p, attrs, prev, netip.Prefix{})
}

func (m *Manager) acquire(ctx context.Context, p Pool, attrs LeaseAttrs, prev, prev6 netip.Prefix) (Lease, error) {
	if err := p.check(); err != nil {
		return Lease{}, fmt.Errorf("acquire lease: %w", err)
	}
	if _, err := EncodeLeaseValue(attrs); err != nil {
		return Lease{}, fmt.Errorf("acquire lease: %w", err)
	}
	if p.ipv6Only() && !attrs.PublicIPv6.IsValid() {
		// The host's PublicIPv6 is how it finds its lease again and how peers reach it.
		return Lease{}, fmt.Errorf("acquire lease: an IPv6-only overlay needs our PublicIPv6 (EnableIPv4 is false)")
	}
	bo := m.newBackoff()
	for {
		l, err := m.tryAcquire(ctx, p, attrs, prev, prev6)
		// An IPv6-only key names its IPv6 subnet, which the create-only transaction keeps
		// unique; only a dual-stack key needs settling.
		if err == nil && l.Subnet.IsValid() && l.IPv6Subnet.IsValid() {
			l, err = m.settleIPv6(ctx, p, l, attrs)
		}
		switch {
		case err == nil:
			return l, nil
		case errors.Is(err, ErrRangeFull):
			return Lease{}, err
		case ctx.Err() != nil:
			return Lease{}, fmt.Errorf("acquire lease: %w (last error: %v)", ctx.Err(), err)
		case errors.Is(err, errConflict):
			// Someone else won this subnet: look again at once, after a short random pause so
			// that the losers of one race do not race each other again in lockstep.
			if err := sleep(ctx, rand.N(m.retryMin/4+1)); err != nil {
				return Lease{}, fmt.Errorf("acquire lease: %w", err)
			}
		default:
			d := bo.next()
			m.log.Log(ctx, retryLevel(err), "cannot acquire a lease, retrying", "err", err, "retry_in", d.Round(time.Millisecond))
			if err := sleep(ctx, d); err != nil {
				return Lease{}, fmt.Errorf("acquire lease: %w", err)
			}
		}
	}
}

func (m *Manager) tryAcquire(ctx context.Context, p Pool, attrs LeaseAttrs, prev, prev6 netip.Prefix) (Lease, error) {
	snap, err := m.list(ctx, p.Dir)
	if err != nil {
		return Lease{}, err
	}
	avoid, err := m.avoidSet(ctx, p, snap)
	if err != nil {
		return Lease{}, err
	}
	// 1. Our own lease, found by PublicIP (PublicIPv6 in an IPv6-only pool: Host): a restart,
	// or an operator's reservation for us. The one our file records first, then the oldest:
	// peers keep the lease etcd created first when two name one host (ClaimsFirst), so that
	// is the one they program.
	var ours []storedLease
	for _, l := range snap.leases {
		if !p.sameHost(l.Lease, attrs) {
			continue
		}
		if !p.compatible(l.ID()) {
			m.dropIncompatible(ctx, p, l)
			continue
		}
		ours = append(ours, l)
	}
	taken6 := p.takenIPv6(snap.keys6)
	slices.SortStableFunc(ours, func(a, b storedLease) int {
		if (a.ID() == prev) != (b.ID() == prev) {
			if a.ID() == prev {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.CreateRevision, b.CreateRevision)
	})
	for _, l := range ours {
		if a, bad := avoid.covered(l.ID()); bad {
			m.log.Warn("our previous lease covers an address no range may cover now; leaving it to expire and taking another",
				"pool", p.Dir, "subnet", l.ID(), "address", a)
			continue
		}
		if want6, ok := p.ipv6For(l, taken6, prev6); !ok {
			return Lease{}, fmt.Errorf("acquire lease: every /%d in [%s, %s] of %s is taken (%d keys under %s): widen IPv6Network or IPv6SubnetMin/IPv6SubnetMax in the config, or remove stale leases: %w",
				p.IPv6.Len, p.IPv6.Min, p.IPv6.Max, p.IPv6.Network, len(snap.keys6), PoolPrefix(m.prefix, p.Dir), ErrRangeFull)
		} else if want6 != l.IPv6Subnet {
			// The key names the IPv6 subnet, so a lease gaining, changing or losing one moves
			// to another key, in one transaction.
			nl, err := m.rekey(ctx, p.Dir, l, want6, attrs)
			if err == nil {
				m.log.Info("reclaimed our previous lease with a new IPv6 subnet", "pool", p.Dir, "subnet", nl.Subnet,
					"ipv6_subnet", nl.IPv6Subnet, "was", l.IPv6Subnet)
			}
			return nl, err
		}
		nl, err := m.reclaim(ctx, p.Dir, l, attrs)
		if err == nil {
			m.log.Info("reclaimed our previous lease", "pool", p.Dir, "subnet", nl.ID(), "public_ip", attrs.Host(),
				"reservation", nl.Expiration.IsZero())
		}
		return nl, err
	}
	taken := newTakenSet(p, p.primaryKeys(snap), avoid)
	// 2. The range our file recorded, if nobody holds it now.
	if prev.IsValid() && p.compatible(prev) {
		if !taken.has(prev) {
			sn6, err := p.pickIPv6(taken6, prev6)
			if err != nil {
				return Lease{}, m.ipv6Full(p, snap, err)
			}
			l, err := m.create(ctx, p.Dir, prev, sn6, attrs)
			if err == nil {
				m.log.Info("reclaimed the subnet from our subnet file", "pool", p.Dir, "subnet", prev)
			}
			return l, err
		}
		m.log.Info("the subnet from our subnet file is held by another host or covers an avoided address; taking a new one",
			"pool", p.Dir, "subnet", prev)
	}
	// 3. A random free range.
	free := taken.free(maxCandidates)
	if len(free) == 0 {
		hint := p.FullHint
		if hint == "" {
			hint = "widen the range in the config or remove stale leases"
		}
		avoided := ""
		if taken.avoided > 0 {
			avoided = fmt.Sprintf(", %d more cover a host's address", taken.avoided)
		}
		return Lease{}, fmt.Errorf("acquire lease: every /%d in [%s, %s] of %s is taken (%d keys under %s%s); %s: %w",
			p.Len, p.Min, p.Max, p.Network, len(snap.keys), PoolPrefix(m.prefix, p.Dir), avoided, hint, ErrRangeFull)
	}
	sn6, err := p.pickIPv6(taken6, prev6)
	if err != nil {
		return Lease{}, m.ipv6Full(p, snap, err)
	}
	l, err := m.create(ctx, p.Dir, free[rand.N(len(free))], sn6, attrs)
	if err == nil {
		m.log.Info("acquired a new lease", "pool", p.Dir, "subnet", l.Subnet, "ipv6_subnet", l.IPv6Subnet, "public_ip", attrs.Host())
	}
	return l, err
}

// settleIPv6 makes sure no older key names l's IPv6 subnet. Keys name the IPv4 subnet, which
// the create-only transaction makes unique, but two hosts starting together may pick one IPv6
// subnet under two IPv4 keys. The older key keeps it (peers decide alike: ClaimsFirst), and
// the younger moves to another IPv6 subnet, checking again, until no older key shares it.
func (m *Manager) settleIPv6(ctx context.Context, p Pool, l Lease, attrs LeaseAttrs) (Lease, error) {
	for {
		snap, err := m.list(ctx, p.Dir)
		if err != nil {
			return Lease{}, err
		}
		var mine *storedLease
		shared := false
		for i, o := range snap.leases {
			switch {
			case o.Subnet == l.Subnet && o.IPv6Subnet == l.IPv6Subnet:
				mine = &snap.leases[i]
			case o.IPv6Subnet == l.IPv6Subnet && ClaimsFirst(o.Lease, l):
				shared = true
			}
		}
		if mine == nil {
			return Lease{}, fmt.Errorf("our lease %s vanished just after we took it: %w", l.Key(m.prefix), errConflict)
		}
		if !shared {
			return l, nil
		}
		sn6, err := p.pickIPv6(p.takenIPv6(snap.keys6), netip.Prefix{})
		if err != nil {
			return Lease{}, m.ipv6Full(p, snap, err)
		}
		m.log.Info("another host took the same IPv6 subnet first; moving to another", "subnet", l.Subnet,
			"ipv6_subnet", l.IPv6Subnet, "new_ipv6_subnet", sn6)
		nl, err := m.rekey(ctx, p.Dir, *mine, sn6, attrs)
		if err != nil {
			return Lease{}, err
		}
		l = nl
	}
}

// ipv6Full is the error of a dual-stack pool whose IPv6 ranges are all taken.
func (m *Manager) ipv6Full(p Pool, snap snapshot, err error) error {
	return fmt.Errorf("acquire lease: every IPv6 /%d in [%s, %s] of %s is taken (%d dual-stack keys under %s): widen IPv6Network or IPv6SubnetMin/IPv6SubnetMax in the config, or remove stale leases: %w",
		p.IPv6.Len, p.IPv6.Min, p.IPv6.Max, p.IPv6.Network, len(snap.keys6), PoolPrefix(m.prefix, p.Dir), err)
}

// avoidSet is p.Avoid plus, with p.AvoidHosts, every PublicIP published under the overlay's
// and the pool's keys.
func (m *Manager) avoidSet(ctx context.Context, p Pool, snap snapshot) (avoidSet, error) {
	out := avoidSet(append([]netip.Addr(nil), p.Avoid...))
	if !p.AvoidHosts {
		return out, nil
	}
	for _, l := range snap.leases {
		out = append(out, l.PublicIP)
	}
	if p.Dir != SubnetsDir {
		overlay, err := m.listQuiet(ctx, SubnetsDir, func(string, int64, error) {})
		if err != nil {
			return nil, err
		}
		for _, l := range overlay.leases {
			out = append(out, l.PublicIP)
		}
	}
	return out, nil
}

// dropIncompatible deletes a lease of ours (our PublicIP, an etcd lease behind it) that the
// pool no longer hands out, as flannel does when its config changed: left to expire, it would
// name our PublicIP next to the lease we take now for up to a day, and peers keep the older of
// two such leases. A reservation is an operator's and stays. Best effort, guarded by the
// key's ModRevision: a failure only leaves the lease to expire.
func (m *Manager) dropIncompatible(ctx context.Context, p Pool, l storedLease) {
	if l.leaseID() == 0 {
		return
	}
	key := l.key(m.prefix, p.Dir)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Txn(rctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", l.modRev)).
		Then(clientv3.OpDelete(key)).Commit()
	switch {
	case err != nil:
		m.etcdErrors.Add(1)
		m.log.Warn("cannot delete our previous lease, which the config no longer allows; it expires by its TTL",
			"pool", p.Dir, "subnet", l.ID(), "err", err)
	case resp.Succeeded:
		m.log.Info("deleted our previous lease: the config no longer allows it", "pool", p.Dir, "subnet", l.ID())
	}
}

// grant creates an etcd lease with our TTL (whole seconds, at least one).
func (m *Manager) grant(ctx context.Context) (clientv3.LeaseID, time.Time, error) {
	secs := int64((m.ttl + time.Second - 1) / time.Second)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Grant(rctx, secs)
	if err != nil {
		return 0, time.Time{}, m.etcdErr(err, "grant an etcd lease of %ds", secs)
	}
	return resp.ID, time.Now().Add(time.Duration(resp.TTL) * time.Second), nil
}

// revoke drops an etcd lease we granted but did not use. Best effort: unused, it expires anyway.
func (m *Manager) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := m.client.Revoke(ctx, id); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		m.etcdErrors.Add(1)
		m.log.Debug("cannot revoke an unused etcd lease; it will expire", "lease_id", int64(id), "err", err)
	}
}

// create takes subnet (and subnet6, in a dual-stack pool; subnet is the IPv6 one in an
// IPv6-only pool) by a transaction that only creates
// the key if it does not exist, so two hosts can never hold the same subnet.
func (m *Manager) create(ctx context.Context, dir string, subnet, subnet6 netip.Prefix, attrs LeaseAttrs) (Lease, error) {
	value, err := EncodeLeaseValue(attrs)
	if err != nil {
		return Lease{}, err
	}
	id, exp, err := m.grant(ctx)
	if err != nil {
		return Lease{}, err
	}
	if subnet.Addr().Is6() { // an IPv6-only pool's range: the key's IPv6 part
		subnet, subnet6 = netip.Prefix{}, subnet
	}
	key := LeaseKey(m.prefix, dir, subnet, subnet6)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Txn(rctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(value), clientv3.WithLease(id))).
		Commit()
	if err != nil {
		m.revoke(id)
		return Lease{}, m.etcdErr(err, "create %s", key)
	}
	if !resp.Succeeded {
		m.revoke(id)
		return Lease{}, fmt.Errorf("create %s: %w", key, errConflict)
	}
	l := Lease{Subnet: subnet, IPv6Subnet: subnet6, Expiration: exp, CreateRevision: resp.Header.Revision, EtcdLeaseID: int64(id)}
	l.setAttrs(attrs)
	return l, nil
}

// rekey moves our lease l to the key naming subnet6 as its IPv6 subnet (zero: none), in one
// transaction that deletes the old key only if unchanged since we read it and creates the new
// one only if nobody holds it. A reservation stays a reservation.
func (m *Manager) rekey(ctx context.Context, dir string, l storedLease, subnet6 netip.Prefix, attrs LeaseAttrs) (Lease, error) {
	value, err := EncodeLeaseValue(attrs)
	if err != nil {
		return Lease{}, err
	}
	oldKey, newKey := l.key(m.prefix, dir), LeaseKey(m.prefix, dir, l.Subnet, subnet6)
	var opts []clientv3.OpOption
	var id clientv3.LeaseID
	var exp time.Time
	if l.leaseID() != 0 {
		if id, exp, err = m.grant(ctx); err != nil {
			return Lease{}, err
		}
		opts = append(opts, clientv3.WithLease(id))
	}
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(oldKey), "=", l.modRev), clientv3.Compare(clientv3.CreateRevision(newKey), "=", 0)).
		Then(clientv3.OpDelete(oldKey), clientv3.OpPut(newKey, string(value), opts...)).Commit()
	if err != nil || !resp.Succeeded {
		if id != 0 {
			m.revoke(id)
		}
		if err != nil {
			return Lease{}, m.etcdErr(err, "move %s to %s", oldKey, newKey)
		}
		return Lease{}, fmt.Errorf("move %s to %s: %w", oldKey, newKey, errConflict)
	}
	if l.leaseID() != 0 {
		m.revoke(l.leaseID())
	}
	nl := Lease{Subnet: l.Subnet, IPv6Subnet: subnet6, Expiration: exp, CreateRevision: resp.Header.Revision, EtcdLeaseID: int64(id)}
	nl.setAttrs(attrs)
	return nl, nil
}

// reclaim makes an existing key with our PublicIP ours again. A reservation (no TTL) stays a
// reservation: only its value is brought up to date so peers learn our BackendData. A leased
// key moves to a fresh etcd lease with our TTL, guarded by its ModRevision so a concurrent
// change wins over us.
func (m *Manager) reclaim(ctx context.Context, dir string, l storedLease, attrs LeaseAttrs) (Lease, error) {
	value, err := EncodeLeaseValue(attrs)
	if err != nil {
		return Lease{}, err
	}
	key := l.key(m.prefix, dir)
	nl := Lease{Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet}
	nl.setAttrs(attrs)
	guard := clientv3.Compare(clientv3.ModRevision(key), "=", l.modRev)
	if l.leaseID() == 0 {
		nl.CreateRevision = l.CreateRevision
		if sameAttrs(l.Lease, nl) {
			return nl, nil
		}
		rctx, cancel := m.reqCtx(ctx)
		defer cancel()
		resp, err := m.client.Txn(rctx).If(guard).Then(clientv3.OpPut(key, string(value))).Commit()
		if err != nil {
			return Lease{}, m.etcdErr(err, "update reservation %s", key)
		}
		if !resp.Succeeded {
			return Lease{}, fmt.Errorf("update reservation %s: %w", key, errConflict)
		}
		return nl, nil
	}
	id, exp, err := m.grant(ctx)
	if err != nil {
		return Lease{}, err
	}
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Txn(rctx).If(guard).Then(clientv3.OpPut(key, string(value), clientv3.WithLease(id))).Commit()
	if err != nil {
		m.revoke(id)
		return Lease{}, m.etcdErr(err, "reclaim %s", key)
	}
	if !resp.Succeeded {
		m.revoke(id)
		return Lease{}, fmt.Errorf("reclaim %s: %w", key, errConflict)
	}
	// The old etcd lease holds nothing now; drop it rather than leave it for a day.
	m.revoke(l.leaseID())
	nl.Expiration, nl.CreateRevision, nl.EtcdLeaseID = exp, l.CreateRevision, int64(id)
	return nl, nil
}

// takenSet answers "is this candidate range free?" for one pool.
type takenSet struct {
	r      ranges
	exact  map[netip.Addr]bool // keys of length r.Len
	others []netip.Prefix      // keys of another length (an older config): free only if disjoint
	avoid  avoidSet            // addresses a free range must not cover
	// avoided counts candidates free of keys that free skipped for covering an avoided address.
	avoided int
}

func newTakenSet(p Pool, keys []netip.Prefix, avoid avoidSet) *takenSet {
	return newTakenRanges(ranges{Len: p.Len, Min: p.Min, Max: p.Max}, keys, avoid)
}

func newTakenRanges(r ranges, keys []netip.Prefix, avoid avoidSet) *takenSet {
	t := &takenSet{r: r, exact: map[netip.Addr]bool{}, avoid: avoid}
	for _, k := range keys {
		if k.Bits() == r.Len {
			t.exact[k.Addr()] = true
		} else {
			t.others = append(t.others, k)
		}
	}
	return t
}

// has says whether subnet is held by a key or covers an avoided address.
func (t *takenSet) has(subnet netip.Prefix) bool {
	if _, bad := t.avoid.covered(subnet); bad {
		return true
	}
	return t.held(subnet)
}

// held says whether a key holds subnet or overlaps it.
func (t *takenSet) held(subnet netip.Prefix) bool {
	if t.exact[subnet.Addr()] {
		return true
	}
	for _, o := range t.others {
		if o.Overlaps(subnet) {
			return true
		}
	}
	return false
}

// free returns up to limit free ranges from Min upwards. Held ranges are skipped one by one,
// so a nearly full IPv6 pool of millions of /64s costs a walk past its keys, not its size.
func (t *takenSet) free(limit int) []netip.Prefix {
	var out []netip.Prefix
	for a, ok := t.r.Min, true; ok && !t.r.Max.Less(a) && len(out) < limit; a, ok = NextSubnet(a, t.r.Len) {
		sn := netip.PrefixFrom(a, t.r.Len)
		if t.held(sn) {
			continue
		}
		if _, bad := t.avoid.covered(sn); bad {
			t.avoided++
			continue
		}
		out = append(out, sn)
	}
	return out
}
