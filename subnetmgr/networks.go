package subnetmgr

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Docker networks (package dockernet) live in three key directories beside flannel's:
//
//	<prefix>/networks/<name>                          the network: subnet, VNI, port, block length, options
//	<prefix>/network-blocks/<name>/<a.b.c.d>-<len>    one block of it per host, leased like a subnet
//	<prefix>/network-endpoints/<name>/<a.b.c.d>       one container address in it, for names
//
// Design history. The records sit alone under networks/ so that one etcd compare on that
// range ("nothing under it changed since my list") makes creating a network serializable:
// two hosts creating overlapping networks at once cannot both succeed, and no extra lock key
// is needed. Blocks are a Pool each and get the overlay's lease rules (create-only
// transaction, TTL, renewal, reclaim by PublicIP). An endpoint key is attached to the etcd
// lease of the block holding its address, so the names of a host that dies go with its block,
// without a TTL of their own to renew. A network record has no TTL: it lives until `docker
// network rm` and the last container on it are gone.
const (
	NetworksDir         = "networks"
	NetworkBlocksDir    = "network-blocks"
	NetworkEndpointsDir = "network-endpoints"
)

// Network is a Docker network of the cluster as stored under <prefix>/networks/<name>.
type Network struct {
	Name     string
	Subnet   netip.Prefix
	VNI      int
	Port     int // VXLAN UDP port of the network's devices
	BlockLen int // prefix length of each host's block
	// Options are the driver options (docker network create -o) as given, so every host
	// creates the network with the same ones.
	Options map[string]string
	// Removing is set by `docker network rm` while containers on other hosts still use the
	// network: no new container may join, and the record goes with the last one.
	Removing bool
}

type networkJSON struct {
	Subnet   string
	VNI      int
	Port     int
	BlockLen int
	Options  map[string]string `json:",omitempty"`
	Removing bool              `json:",omitempty"`
}

// dockerName is Docker's rule for network names; it also keeps names usable as one key
// segment (no "/").
var dockerName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)

// CheckNetworkName says whether name can be a network's key segment (Docker's naming rule).
func CheckNetworkName(name string) error {
	if !dockerName.MatchString(name) || len(name) > 255 {
		return fmt.Errorf("network name %q: want [a-zA-Z0-9][a-zA-Z0-9_.-]*", name)
	}
	return nil
}

// NetworkKey is <prefix>/networks/<name>.
func NetworkKey(prefix, name string) string { return PoolPrefix(prefix, NetworksDir) + name }

// NetworkBlocksDirOf is the pool directory of a network's blocks: network-blocks/<name>.
func NetworkBlocksDirOf(name string) string { return NetworkBlocksDir + "/" + name }

// NetworkEndpointKey is <prefix>/network-endpoints/<name>/<ip>.
func NetworkEndpointKey(prefix, name string, ip netip.Addr) string {
	return PoolPrefix(prefix, NetworkEndpointsDir+"/"+name) + ip.String()
}

// Check refuses a record no host could serve: it says which field is wrong.
func (n Network) Check() error {
	if err := CheckNetworkName(n.Name); err != nil {
		return err
	}
	switch {
	case !n.Subnet.IsValid() || !n.Subnet.Addr().Is4() || n.Subnet.Masked() != n.Subnet:
		return fmt.Errorf("network %s: Subnet %v is not an IPv4 CIDR without host bits", n.Name, n.Subnet)
	case n.VNI < 1 || n.VNI > 1<<24-1:
		return fmt.Errorf("network %s: VNI %d is not in 1..16777215", n.Name, n.VNI)
	case n.Port < 1 || n.Port > 65535:
		return fmt.Errorf("network %s: Port %d is not in 1..65535", n.Name, n.Port)
	case n.BlockLen < n.Subnet.Bits()+1 || n.BlockLen > 30:
		return fmt.Errorf("network %s: BlockLen %d must be between the subnet's length + 1 (%d) and 30", n.Name, n.BlockLen, n.Subnet.Bits()+1)
	}
	return nil
}

// Same says whether two records describe the same network (Removing aside).
func (n Network) Same(o Network) bool {
	return n.Name == o.Name && n.Subnet == o.Subnet && n.VNI == o.VNI && n.Port == o.Port &&
		n.BlockLen == o.BlockLen && maps.Equal(n.Options, o.Options)
}

// BlockPool is the pool of the network's per-host blocks: every block of BlockLen in Subnet
// but the first, which is never handed out (flannel's rule for SubnetMin), so the network's
// first addresses stay free for what Docker calls the network's gateway.
func (n Network) BlockPool() Pool {
	step := uint32(1) << (32 - n.BlockLen)
	first := addrToU32(n.Subnet.Addr())
	return Pool{
		Dir:     NetworkBlocksDirOf(n.Name),
		Network: n.Subnet,
		Len:     n.BlockLen,
		Min:     u32ToAddr(first + step),
		Max:     netip.PrefixFrom(LastAddr(n.Subnet), n.BlockLen).Masked().Addr(),
		FullHint: "every block of the network is held by a host: create the network with a larger --subnet " +
			"or a longer -o xnet.block-len, or delete the blocks of hosts that are gone",
	}
}

// EncodeNetwork is the JSON under <prefix>/networks/<name>.
func EncodeNetwork(n Network) ([]byte, error) {
	if err := n.Check(); err != nil {
		return nil, err
	}
	return json.Marshal(networkJSON{Subnet: n.Subnet.String(), VNI: n.VNI, Port: n.Port, BlockLen: n.BlockLen,
		Options: n.Options, Removing: n.Removing})
}

// DecodeNetwork parses the record of network name.
func DecodeNetwork(name string, data []byte) (Network, error) {
	var v networkJSON
	if err := json.Unmarshal(data, &v); err != nil {
		return Network{}, fmt.Errorf("network %s: %.80q is not a network record: %w", name, data, err)
	}
	subnet, err := netip.ParsePrefix(v.Subnet)
	if err != nil {
		return Network{}, fmt.Errorf("network %s: Subnet %q: %w", name, v.Subnet, err)
	}
	n := Network{Name: name, Subnet: subnet, VNI: v.VNI, Port: v.Port, BlockLen: v.BlockLen, Options: v.Options, Removing: v.Removing}
	if n.Options == nil {
		n.Options = map[string]string{}
	}
	return n, n.Check()
}

// NetworkEndpoint is one container address on a network, published by the host running it.
type NetworkEndpoint struct {
	Network   string
	IP        netip.Addr
	Name      string // the container's name, what other containers resolve
	PublicIP  netip.Addr
	Container string // the container's ID on its host
}

type endpointJSON struct {
	Name      string
	PublicIP  string
	Container string `json:",omitempty"`
}

// NetworkState is one consistent view of every Docker network of the cluster.
type NetworkState struct {
	Rev       int64
	Networks  map[string]Network
	Blocks    map[string][]Lease           // by network, sorted by subnet; Expiration left zero
	Endpoints map[string][]NetworkEndpoint // by network, sorted by address
}

// Overlapping returns the network whose subnet overlaps p, if any.
func (s NetworkState) Overlapping(p netip.Prefix) (Network, bool) {
	for _, name := range slices.Sorted(maps.Keys(s.Networks)) {
		if n := s.Networks[name]; n.Subnet.Overlaps(p) {
			return n, true
		}
	}
	return Network{}, false
}

// networkKV sorts one key under the three directories into the state; other keys (and
// malformed ones, which it reports) are left out.
func (m *Manager) networkKV(s *NetworkState, key string, value []byte, logBad func(key string, err error)) {
	rest, ok := strings.CutPrefix(key, m.prefix+"/")
	if !ok {
		return
	}
	dir, rest, _ := strings.Cut(rest, "/")
	switch dir {
	case NetworksDir:
		n, err := DecodeNetwork(rest, value)
		if err != nil {
			logBad(key, err)
			return
		}
		s.Networks[n.Name] = n
	case NetworkBlocksDir:
		name, _, _ := strings.Cut(rest, "/")
		l, _, err := m.parseKVIn(NetworkBlocksDirOf(name), &mvccpb.KeyValue{Key: []byte(key), Value: value})
		if err != nil {
			logBad(key, err)
			return
		}
		s.Blocks[name] = append(s.Blocks[name], l.Lease)
	case NetworkEndpointsDir:
		name, addr, _ := strings.Cut(rest, "/")
		ip, err := netip.ParseAddr(addr)
		var v endpointJSON
		if err == nil {
			err = json.Unmarshal(value, &v)
		}
		pub, perr := netip.ParseAddr(v.PublicIP)
		if err == nil && (perr != nil || !ip.Is4()) {
			err = fmt.Errorf("want an IPv4 address in the key and a PublicIP in the value")
		}
		if err != nil {
			logBad(key, err)
			return
		}
		s.Endpoints[name] = append(s.Endpoints[name], NetworkEndpoint{Network: name, IP: ip, Name: v.Name, PublicIP: pub, Container: v.Container})
	}
}

func newNetworkState(rev int64) NetworkState {
	return NetworkState{Rev: rev, Networks: map[string]Network{}, Blocks: map[string][]Lease{}, Endpoints: map[string][]NetworkEndpoint{}}
}

func (s *NetworkState) sort() {
	for _, ls := range s.Blocks {
		slices.SortFunc(ls, func(a, b Lease) int { return comparePrefix(a.Subnet, b.Subnet) })
	}
	for _, es := range s.Endpoints {
		slices.SortFunc(es, func(a, b NetworkEndpoint) int { return a.IP.Compare(b.IP) })
	}
}

// networkRange is the key range holding all three directories: every key starting with
// <prefix>/network (networks/, network-blocks/, network-endpoints/).
func (m *Manager) networkRange() string { return m.prefix + "/network" }

// ListNetworks reads every network, block and endpoint in one request.
func (m *Manager) ListNetworks(ctx context.Context) (NetworkState, error) {
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, m.networkRange(), clientv3.WithPrefix())
	if err != nil {
		return NetworkState{}, m.etcdErr(err, "list Docker networks under %s", m.networkRange())
	}
	s := newNetworkState(resp.Header.Revision)
	for _, kv := range resp.Kvs {
		m.networkKV(&s, string(kv.Key), kv.Value, func(key string, err error) {
			m.log.Warn("skipping malformed Docker network entry", "key", key, "err", err)
		})
	}
	s.sort()
	return s, nil
}

// NetworkConflictError is CreateNetwork's refusal: the name is taken by another network, or
// the subnet overlaps one.
type NetworkConflictError struct {
	Existing Network
	Reason   string
}

func (e *NetworkConflictError) Error() string { return e.Reason }

// CreateNetwork stores n under its name unless the name is taken by a different network or its
// subnet overlaps another network or one of reserved (the overlay Network). A record that
// already holds exactly n is returned as is: the same network created on two hosts at once is
// one network. The create is serializable against every other network create (see the
// design history above); lost races are retried until ctx ends.
func (m *Manager) CreateNetwork(ctx context.Context, n Network, reserved ...netip.Prefix) (Network, error) {
	if n.Options == nil {
		n.Options = map[string]string{}
	}
	value, err := EncodeNetwork(n)
	if err != nil {
		return Network{}, err
	}
	for _, r := range reserved {
		if r.Overlaps(n.Subnet) {
			return Network{}, &NetworkConflictError{Reason: fmt.Sprintf("subnet %s of network %s overlaps %s", n.Subnet, n.Name, r)}
		}
	}
	key := NetworkKey(m.prefix, n.Name)
	records := PoolPrefix(m.prefix, NetworksDir)
	bo := m.newBackoff()
	for {
		rctx, cancel := m.reqCtx(ctx)
		resp, err := m.client.Get(rctx, records, clientv3.WithPrefix())
		cancel()
		if err == nil {
			for _, kv := range resp.Kvs {
				name := strings.TrimPrefix(string(kv.Key), records)
				have, derr := DecodeNetwork(name, kv.Value)
				if derr != nil {
					continue // malformed: holds no subnet we could overlap
				}
				switch {
				case name == n.Name && have.Same(n):
					return have, nil
				case name == n.Name:
					return Network{}, &NetworkConflictError{Existing: have, Reason: fmt.Sprintf("network %s exists with %s", n.Name, describeDifference(have, n))}
				case have.Subnet.Overlaps(n.Subnet):
					return Network{}, &NetworkConflictError{Existing: have, Reason: fmt.Sprintf("subnet %s overlaps network %s (%s)", n.Subnet, have.Name, have.Subnet)}
				case have.VNI == n.VNI:
					return Network{}, &NetworkConflictError{Existing: have, Reason: fmt.Sprintf("VNI %d is network %s's", n.VNI, have.Name)}
				}
			}
			rctx, cancel = m.reqCtx(ctx)
			var tr *clientv3.TxnResponse
			tr, err = m.client.Txn(rctx).If(
				clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
				clientv3.Compare(clientv3.ModRevision(records), "<", resp.Header.Revision+1).WithPrefix(),
			).Then(clientv3.OpPut(key, string(value))).Commit()
			cancel()
			if err == nil && tr.Succeeded {
				m.log.Info("Docker network created in etcd", "network", n.Name, "subnet", n.Subnet, "vni", n.VNI)
				return n, nil
			}
			if err == nil {
				continue // another network was created or changed meanwhile: look again
			}
			err = m.etcdErr(err, "create %s", key)
		} else {
			err = m.etcdErr(err, "list %s", records)
		}
		if ctx.Err() != nil {
			return Network{}, fmt.Errorf("create network %s: %w (last error: %v)", n.Name, ctx.Err(), err)
		}
		d := bo.next()
		m.log.Log(ctx, retryLevel(err), "cannot create a Docker network in etcd, retrying", "network", n.Name, "err", err, "retry_in", d.Round(time.Millisecond))
		if err := sleep(ctx, d); err != nil {
			return Network{}, fmt.Errorf("create network %s: %w", n.Name, err)
		}
	}
}

// describeDifference names what differs between two records of one name, for an operator.
func describeDifference(have, want Network) string {
	var d []string
	if have.Subnet != want.Subnet {
		d = append(d, fmt.Sprintf("subnet %s (not %s)", have.Subnet, want.Subnet))
	}
	if have.BlockLen != want.BlockLen {
		d = append(d, fmt.Sprintf("block length /%d (not /%d)", have.BlockLen, want.BlockLen))
	}
	if have.VNI != want.VNI || have.Port != want.Port {
		d = append(d, fmt.Sprintf("VNI %d port %d (not %d, %d)", have.VNI, have.Port, want.VNI, want.Port))
	}
	for _, k := range slices.Sorted(maps.Keys(have.Options)) {
		if w, ok := want.Options[k]; !ok || w != have.Options[k] {
			d = append(d, fmt.Sprintf("option -o %s=%s", k, have.Options[k]))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(want.Options)) {
		if _, ok := have.Options[k]; !ok {
			d = append(d, fmt.Sprintf("no option -o %s", k))
		}
	}
	if len(d) == 0 {
		return "the same settings"
	}
	return strings.Join(d, ", ")
}

// RemoveNetwork is `docker network rm` for the whole cluster: the record and its blocks go at
// once when no host has a container on the network; otherwise the record is marked Removing
// and goes with the last container (RemoveNetworkIfUnused). A missing record is not an error.
func (m *Manager) RemoveNetwork(ctx context.Context, name string) (removed bool, err error) {
	removed, err = m.RemoveNetworkIfUnused(ctx, name, false)
	if err != nil || removed {
		return removed, err
	}
	key := NetworkKey(m.prefix, name)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, key)
	if err != nil {
		return false, m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		return true, nil
	}
	n, err := DecodeNetwork(name, resp.Kvs[0].Value)
	if err != nil {
		return false, err
	}
	if n.Removing {
		return false, nil
	}
	n.Removing = true
	value, err := EncodeNetwork(n)
	if err != nil {
		return false, err
	}
	tr, err := m.client.Txn(rctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)).
		Then(clientv3.OpPut(key, string(value))).Commit()
	if err != nil {
		return false, m.etcdErr(err, "mark %s removing", key)
	}
	if !tr.Succeeded {
		return false, fmt.Errorf("mark %s removing: %w", key, errConflict)
	}
	m.log.Info("Docker network marked removing; it goes with its last container", "network", name)
	return false, nil
}

// RemoveNetworkIfUnused deletes the record of network name, its blocks and its endpoints in one
// transaction, if no endpoint is published on it (and, with onlyRemoving, if it is marked
// Removing). It says whether the network is gone.
func (m *Manager) RemoveNetworkIfUnused(ctx context.Context, name string, onlyRemoving bool) (bool, error) {
	key := NetworkKey(m.prefix, name)
	endpoints := PoolPrefix(m.prefix, NetworkEndpointsDir+"/"+name)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, key)
	if err != nil {
		return false, m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		return true, nil
	}
	if onlyRemoving {
		if n, err := DecodeNetwork(name, resp.Kvs[0].Value); err == nil && !n.Removing {
			return false, nil
		}
	}
	tr, err := m.client.Txn(rctx).If(
		clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision),
		// No key in the range: etcd compares a range without keys as one zero key.
		clientv3.Compare(clientv3.CreateRevision(endpoints), "=", 0).WithPrefix(),
	).Then(
		clientv3.OpDelete(key),
		clientv3.OpDelete(PoolPrefix(m.prefix, NetworkBlocksDirOf(name)), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return false, m.etcdErr(err, "delete %s", key)
	}
	if tr.Succeeded {
		m.log.Info("Docker network deleted from etcd", "network", name)
	}
	return tr.Succeeded, nil
}

// PutNetworkEndpoint publishes ep, attached to the etcd lease of block (our block of its
// network, which holds ep.IP), so it lives exactly as long as the block.
func (m *Manager) PutNetworkEndpoint(ctx context.Context, ep NetworkEndpoint, block Lease) error {
	if !block.Subnet.Contains(ep.IP) {
		return fmt.Errorf("endpoint %v of network %s is outside block %v", ep.IP, ep.Network, block.Subnet)
	}
	value, err := json.Marshal(endpointJSON{Name: ep.Name, PublicIP: ep.PublicIP.String(), Container: ep.Container})
	if err != nil {
		return fmt.Errorf("encode endpoint %v: %w", ep.IP, err)
	}
	blockKey := PoolKey(m.prefix, NetworkBlocksDirOf(ep.Network), block.Subnet)
	key := NetworkEndpointKey(m.prefix, ep.Network, ep.IP)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, blockKey)
	if err != nil {
		return m.etcdErr(err, "read %s", blockKey)
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("publish endpoint %s: block key %s is gone", key, blockKey)
	}
	kv := resp.Kvs[0]
	var opts []clientv3.OpOption
	if kv.Lease != 0 {
		opts = append(opts, clientv3.WithLease(clientv3.LeaseID(kv.Lease)))
	}
	tr, err := m.client.Txn(rctx).If(clientv3.Compare(clientv3.ModRevision(blockKey), "=", kv.ModRevision)).
		Then(clientv3.OpPut(key, string(value), opts...)).Commit()
	if err != nil {
		return m.etcdErr(err, "put %s", key)
	}
	if !tr.Succeeded {
		return fmt.Errorf("put %s: %w", key, errConflict)
	}
	return nil
}

// DeleteNetworkEndpoint removes a published endpoint; a missing one is not an error.
func (m *Manager) DeleteNetworkEndpoint(ctx context.Context, network string, ip netip.Addr) error {
	key := NetworkEndpointKey(m.prefix, network, ip)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	if _, err := m.client.Delete(rctx, key); err != nil {
		return m.etcdErr(err, "delete %s", key)
	}
	return nil
}

// ReleasePoolLease gives a lease of pool p back before its TTL: the key goes if it still
// carries our PublicIP, and its etcd lease with it.
func (m *Manager) ReleasePoolLease(ctx context.Context, p Pool, l Lease) error {
	key := l.key(m.prefix, p.Dir)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, key)
	if err != nil {
		return m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	cur, _, err := m.parseKVIn(p.Dir, resp.Kvs[0])
	if err != nil || cur.PublicIP != l.PublicIP {
		return nil // not ours (any more): leave it
	}
	tr, err := m.client.Txn(rctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", cur.modRev)).
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return m.etcdErr(err, "delete %s", key)
	}
	if tr.Succeeded && cur.leaseID() != 0 {
		m.revoke(cur.leaseID())
	}
	return nil
}

// WatchNetworks sends the whole NetworkState after the first list and after every change,
// until ctx ends (then it returns ctx.Err()). out should have room for one state: a state
// not yet taken is replaced by the newer one, so a slow reader only ever sees the latest. A
// broken or compacted watch is replaced by a fresh list and a new watch.
func (m *Manager) WatchNetworks(ctx context.Context, out chan NetworkState) error {
	bo := m.newBackoff()
	for {
		rctx, cancel := m.reqCtx(ctx)
		resp, err := m.client.Get(rctx, m.networkRange(), clientv3.WithPrefix())
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			err = m.etcdErr(err, "list Docker networks")
			d := bo.next()
			m.log.Log(ctx, retryLevel(err), "cannot list Docker networks, retrying", "err", err, "retry_in", d.Round(time.Millisecond))
			if err := sleep(ctx, d); err != nil {
				return err
			}
			continue
		}
		bo.reset()
		kvs := map[string][]byte{}
		for _, kv := range resp.Kvs {
			kvs[string(kv.Key)] = kv.Value
		}
		bad := map[string]string{}
		send := func(rev int64) error {
			s := newNetworkState(rev)
			for _, k := range slices.Sorted(maps.Keys(kvs)) {
				m.networkKV(&s, k, kvs[k], func(key string, err error) {
					if bad[key] != err.Error() {
						bad[key] = err.Error()
						m.log.Warn("skipping malformed Docker network entry", "key", key, "err", err)
					}
				})
			}
			s.sort()
			select {
			case <-out: // replaced by the newer state
			default:
			}
			select {
			case out <- s:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := send(resp.Header.Revision); err != nil {
			return err
		}
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := m.client.Watch(wctx, m.networkRange(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range wch {
			if wr.Err() != nil {
				m.log.Warn("Docker network watch interrupted; listing again", "err", wr.Err())
				break
			}
			if len(wr.Events) == 0 {
				continue
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					delete(kvs, string(ev.Kv.Key))
				} else {
					kvs[string(ev.Kv.Key)] = ev.Kv.Value
				}
			}
			if err := send(wr.Header.Revision); err != nil {
				wcancel()
				return err
			}
		}
		wcancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		m.watchResyncs.Add(1)
		if err := sleep(ctx, bo.next()); err != nil {
			return err
		}
	}
}

// compareNetworks orders networks by name, for stable output.
func compareNetworks(a, b Network) int { return cmp.Compare(a.Name, b.Name) }

// SortedNetworks lists the state's networks by name.
func (s NetworkState) SortedNetworks() []Network {
	out := slices.Collect(maps.Values(s.Networks))
	slices.SortFunc(out, compareNetworks)
	return out
}
