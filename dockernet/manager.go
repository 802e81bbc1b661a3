package dockernet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// DriverName is the name of both drivers: docker network create -d xnet --ipam-driver xnet.
const DriverName = "xnet"

// Defaults of xnetd's flags.
const (
	DefaultPluginSocket = "/run/docker/plugins/" + DriverName + ".sock"
	DefaultDockerSocket = "/var/run/docker.sock"
)

// OptBlockLen is the one driver option: the prefix length of each host's block
// (docker network create -o xnet.block-len=26).
const OptBlockLen = "xnet.block-len"

// Address spaces our IPAM driver declares; a network whose IPAM data is from another space
// was created without --ipam-driver xnet.
const (
	localAddressSpace  = "xnet-local"
	globalAddressSpace = "xnet-global"
	poolIDPrefix       = "xnet:"
	gatewayRequest     = "com.docker.network.gateway"
)

// defaultSubnets is where a network created without --subnet gets one: the first free /16.
// It is clear of flannel's and Kubernetes' usual ranges (10.244/16, 10.96/12) and of Docker's
// own default pools (172.17-31, 192.168).
var defaultSubnets = netip.MustParsePrefix("10.192.0.0/11")

const defaultSubnetLen = 16

const (
	// resyncInterval: the reconciliation also runs this often without any event, so a missed
	// Docker event or a failed step is retried.
	resyncInterval = 5 * time.Second
	// readyWait is how long an address request waits for its network's block on this host
	// (a network created a moment ago on this or another host).
	readyWait = 15 * time.Second
	// pendingTTL forgets a network Docker asked us to create but never committed.
	pendingTTL = time.Minute
	// adoptedGrace is how long a network written to etcd here counts as existing without the
	// watch having delivered it.
	adoptedGrace = 10 * time.Second
	// tombstoneTTL bounds how long a network removed here is kept from being re-created
	// while etcd catches up.
	tombstoneTTL = time.Minute
)

// Options configure a Manager.
type Options struct {
	Etcd *subnetmgr.Manager
	// Overlay is the overlay's config: no network may overlap its Network; networks' VXLAN
	// port is its Backend.Port + 2 (Backend.Port + 1, 8473 by default, is the health probes').
	Overlay subnetmgr.Config
	Iface   backend.ExternalInterface
	// PluginSocket is where dockerd finds the plugin (<plugins dir>/xnet.sock).
	PluginSocket string
	// DockerSocket is the host dockerd's API.
	DockerSocket string
	// DNS is the address the resolver listens on (docker0's gateway, dockerd's --dns); the
	// zero Addr runs none.
	DNS netip.Addr
	// ResolvConf lists the upstream resolvers (default /etc/resolv.conf).
	ResolvConf  string
	RenewMargin time.Duration
	// OnChange, when set, is called (without blocking for long) when what Status reports changed.
	OnChange func()
	Logger   *slog.Logger
}

// Manager serves Docker's network and IPAM plugin protocols for the xnet driver and keeps this
// host's Docker networks, blocks, devices and published endpoints in line with etcd.
type Manager struct {
	o      Options
	log    *slog.Logger
	docker *dockerAPI
	nl     *netlink.Handle
	port   int
	// configKey is <prefix>/config, for messages.
	configKey string
	kick      chan struct{}
	runCtx    context.Context

	mu sync.Mutex
	// changed is closed and replaced whenever a network becomes ready (waitReady).
	changed   chan struct{}
	state     subnetmgr.NetworkState
	haveState bool
	nets      map[string]*localNet
	byID      map[string]string     // local Docker network ID -> name
	pending   map[string]pendingNet // Docker network ID -> a user's create awaiting its name
	// expectCreate and expectDelete are the Docker calls xnetd itself is making, so the
	// plugin calls they cause are not taken for a user's.
	expectCreate map[netip.Prefix]string
	expectDelete map[string]bool
	tombstones   map[string]time.Time // removed here; not re-created until etcd says so
	// adopted are networks this host wrote to etcd a moment ago: the watch may still deliver
	// a state from before, which must not make them look deleted.
	adopted   map[string]adoptedNet
	endpoints map[string]*endpoint // by Docker endpoint ID
	sandboxes map[string]map[string]bool
	dockerErr error
	dnsErr    error
	isoErr    error
	// isoApplied and isoAt are what the isolation table last got and when: it is rewritten
	// when the networks change, and once a minute in case someone flushed it.
	isoApplied []isolated
	isoAt      time.Time
	keepers    sync.WaitGroup
}

type localNet struct {
	rec      subnetmgr.Network
	block    subnetmgr.Lease // zero until leased
	moved    bool            // the block changed under us: devices need setting up again
	dp       *netDatapath    // nil until set up
	peers    map[netip.Prefix]subnetmgr.Lease
	alloc    *allocator
	stopKeep context.CancelFunc
	keepDone chan struct{}
	dockerID string
	problem  string
}

type adoptedNet struct {
	rec subnetmgr.Network
	at  time.Time
}

type pendingNet struct {
	subnet   netip.Prefix
	blockLen int
	options  map[string]string
	at       time.Time
}

type endpoint struct {
	id, network string
	ip          netip.Addr
	mac         net.HardwareAddr
	sandbox     string
	created     time.Time
}

// staleEndpointAge: an endpoint Docker has not shown on its network for this long after we
// saw it created is forgotten (dockerd died without telling us it was deleted). Younger ones
// may simply not be attached yet.
const staleEndpointAge = time.Minute

// New checks the options; nothing happens until Run.
func New(o Options) (*Manager, error) {
	if o.Etcd == nil || !o.Overlay.Network.IsValid() {
		return nil, errors.New("dockernet: needs the etcd manager and the overlay config")
	}
	if o.PluginSocket == "" {
		o.PluginSocket = DefaultPluginSocket
	}
	if o.DockerSocket == "" {
		o.DockerSocket = DefaultDockerSocket
	}
	if o.ResolvConf == "" {
		o.ResolvConf = "/etc/resolv.conf"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	port := o.Overlay.Backend.Port + 2
	if port > 65535 {
		port = o.Overlay.Backend.Port - 2
	}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("dockernet: netlink: %w", err)
	}
	return &Manager{
		o: o, log: o.Logger.With("part", "docker-networks"), docker: newDockerAPI(o.DockerSocket), nl: nl, port: port,
		configKey: subnetmgr.ConfigKey(o.Etcd.Prefix()),
		kick:      make(chan struct{}, 1), changed: make(chan struct{}),
		nets: map[string]*localNet{}, byID: map[string]string{}, pending: map[string]pendingNet{},
		expectCreate: map[netip.Prefix]string{}, expectDelete: map[string]bool{}, tombstones: map[string]time.Time{},
		adopted: map[string]adoptedNet{}, endpoints: map[string]*endpoint{}, sandboxes: map[string]map[string]bool{},
	}, nil
}

// Run serves the plugin socket, the resolver, the etcd watch and the Docker event stream and
// reconciles until ctx ends. Only a plugin socket it cannot listen on is an error; everything
// else is retried and reported in Status.
func (m *Manager) Run(ctx context.Context) error {
	ln, err := listenUnix(m.o.PluginSocket)
	if err != nil {
		return fmt.Errorf("--docker-plugin-socket: %w", err)
	}
	srv := &http.Server{Handler: m.handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer os.Remove(m.o.PluginSocket)
	defer srv.Close()
	m.log.Info("serving Docker's network and IPAM plugin protocols", "driver", DriverName, "socket", m.o.PluginSocket,
		"docker", m.o.DockerSocket, "vxlan_port", m.port, "dns", m.o.DNS)

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m.runCtx = ctx
	if m.o.DNS.IsValid() {
		r := &resolver{addr: netip.AddrPortFrom(m.o.DNS, 53), upstreams: hostUpstreams(m.o.ResolvConf, m.o.DNS), lookup: m.resolve, log: m.log}
		wg.Go(func() {
			if err := r.serve(ctx); err != nil {
				m.log.Error("cannot serve DNS for container names; containers resolve only names on their own host", "err", err)
				m.mu.Lock()
				m.dnsErr = err
				m.mu.Unlock()
			}
		})
	}
	states := make(chan subnetmgr.NetworkState, 1)
	wg.Go(func() { _ = m.o.Etcd.WatchNetworks(ctx, states) })
	wg.Go(func() { m.followDocker(ctx) })
	tick := time.NewTicker(resyncInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			m.keepers.Wait()
			return nil
		case s := <-states:
			m.mu.Lock()
			m.state, m.haveState = s, true
			m.mu.Unlock()
		case <-m.kick:
		case <-tick.C:
		}
		m.reconcile(ctx)
		if m.o.OnChange != nil {
			m.o.OnChange()
		}
	}
}

// Close releases the netlink socket; with teardown it deletes every network's devices and the
// isolation table (containers on them lose their network). Call it after Run returned.
func (m *Manager) Close(teardown bool) error {
	var errs []error
	m.mu.Lock()
	nets := slices.Collect(maps.Values(m.nets))
	m.mu.Unlock()
	for _, ln := range nets {
		if ln.dp != nil {
			errs = append(errs, ln.dp.close(teardown))
		}
	}
	if teardown {
		if conn, err := nftables.New(); err == nil {
			conn.DelTable(&nftables.Table{Name: IsolationTable, Family: nftables.TableFamilyIPv4})
			if err := conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, err)
			}
		}
	}
	m.nl.Close()
	return errors.Join(errs...)
}

func (m *Manager) requestKick() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// followDocker keeps a Docker event stream open: every network event (a user's create, a
// container joining or leaving) runs the reconciliation at once rather than at the next tick.
func (m *Manager) followDocker(ctx context.Context) {
	wait := 200 * time.Millisecond
	for ctx.Err() == nil {
		err := m.docker.watchEvents(ctx, func() {
			wait = 200 * time.Millisecond
			m.requestKick()
		}, func(dockerEvent) { m.requestKick() })
		if ctx.Err() != nil {
			return
		}
		m.log.Debug("Docker event stream ended; reconnecting", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(wait*2, 5*time.Second)
	}
}

// vniOf is a network's VNI: the top 24 bits of its address. Networks are /24 or larger and
// never overlap, so no two have the same one.
func vniOf(subnet netip.Prefix) int {
	a := subnet.Masked().Addr().As4()
	return int(a[0])<<16 | int(a[1])<<8 | int(a[2])
}

// defaultBlockLen is flannel's rule for SubnetLen: /24, or the network's length + 2 when the
// network is smaller than a /22.
func defaultBlockLen(subnet netip.Prefix) int {
	if subnet.Bits() > 22 {
		return subnet.Bits() + 2
	}
	return 24
}

// parseSubnet checks a --subnet an xnet network can use.
func parseSubnet(s string) (netip.Prefix, error) {
	// 240.0.0.0/4 is RFC 1112's class E, reserved for future use.
	reserved := netip.PrefixFrom(netip.AddrFrom4([4]byte{240, 0, 0, 0}), 4)
	p, err := netip.ParsePrefix(s)
	switch {
	case err != nil || !p.Addr().Is4():
		return netip.Prefix{}, fmt.Errorf("--subnet %s: not an IPv4 CIDR (xnet networks are IPv4 only)", s)
	case p.Masked() != p:
		return netip.Prefix{}, fmt.Errorf("--subnet %s: host bits set; did you mean %s?", s, p.Masked())
	case p.Bits() > 24:
		return netip.Prefix{}, fmt.Errorf("--subnet %s: an xnet network is a /24 or larger (each host gets a block of it)", s)
	case p.Bits() < 8:
		return netip.Prefix{}, fmt.Errorf("--subnet %s: larger than a /8", s)
	case p.Overlaps(reserved):
		// Besides being reserved, its last two /24s would have the VNIs of the ebpf backend's
		// headroom device (backend/ebpf/headroom.go), and two vxlan devices cannot share one.
		return netip.Prefix{}, fmt.Errorf("--subnet %s: inside %s, addresses reserved for future use: pick a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)", s, reserved)
	}
	return p, nil
}

// checkSubnetLocked refuses a subnet for a new network: overlapping the overlay, a network of
// the cluster, or one being created here.
func (m *Manager) checkSubnetLocked(subnet netip.Prefix) error {
	ov := m.o.Overlay
	if ov.Network.Overlaps(subnet) {
		return fmt.Errorf("--subnet %s overlaps the overlay Network %s (etcd %s): pick another --subnet", subnet, ov.Network, m.configKey)
	}
	if n, ok := m.state.Overlapping(subnet); ok {
		if n.Subnet == subnet {
			return fmt.Errorf("--subnet %s is network %s's, which xnet creates on every host by itself: use --network %s", subnet, n.Name, n.Name)
		}
		return fmt.Errorf("--subnet %s overlaps network %s (%s) of the cluster: pick another --subnet", subnet, n.Name, n.Subnet)
	}
	for _, p := range m.pending {
		if p.subnet.Overlaps(subnet) {
			return fmt.Errorf("--subnet %s overlaps %s, a network being created on this host", subnet, p.subnet)
		}
	}
	for _, a := range m.adopted {
		if a.rec.Subnet.Overlaps(subnet) {
			return fmt.Errorf("--subnet %s overlaps network %s (%s), created a moment ago", subnet, a.rec.Name, a.rec.Subnet)
		}
	}
	if v := vniOf(subnet); v == ov.Backend.VNI || v == 0 {
		return fmt.Errorf("--subnet %s: its VNI %d is the overlay's: pick another --subnet", subnet, v)
	}
	return nil
}

// freeSubnetLocked picks the first /16 of defaultSubnets that checkSubnetLocked allows.
func (m *Manager) freeSubnetLocked() (netip.Prefix, error) {
	step := uint32(1) << (32 - defaultSubnetLen)
	a := defaultSubnets.Addr().As4()
	first := uint32(a[0])<<24 | uint32(a[1])<<16
	for i := uint32(0); i < 1<<(defaultSubnetLen-defaultSubnets.Bits()); i++ {
		v := first + i*step
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), 0, 0}), defaultSubnetLen)
		if m.checkSubnetLocked(p) == nil {
			return p, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("every /%d of %s is taken by a network: give --subnet", defaultSubnetLen, defaultSubnets)
}

// notifyReadyLocked wakes address requests waiting for a network.
func (m *Manager) notifyReadyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// waitReady returns the network of subnet once its devices are up on this host.
func (m *Manager) waitReady(ctx context.Context, subnet netip.Prefix) (*localNet, error) {
	deadline := time.NewTimer(readyWait)
	defer deadline.Stop()
	for {
		m.mu.Lock()
		for _, ln := range m.nets {
			if ln.rec.Subnet == subnet && ln.dp != nil && !ln.moved {
				m.mu.Unlock()
				return ln, nil
			}
		}
		ch := m.changed
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline.C:
			return nil, fmt.Errorf("no xnet network with subnet %s is ready on this host after %v (created with -d %s --ipam-driver %s? is etcd reachable? see xnetd status)",
				subnet, readyWait, DriverName, DriverName)
		}
	}
}

// blockAttrs is what this host publishes in its block leases: a vxlan lease with the
// network's VNI, as the overlay's vxlan backend publishes.
func (m *Manager) blockAttrs(rec subnetmgr.Network) (subnetmgr.LeaseAttrs, error) {
	data, err := backend.VXLANLeaseData(rec.VNI, m.o.Iface.PublicIP)
	if err != nil {
		return subnetmgr.LeaseAttrs{}, err
	}
	return subnetmgr.LeaseAttrs{PublicIP: m.o.Iface.PublicIP, BackendType: subnetmgr.BackendVXLAN, BackendData: data}, nil
}

// reconcile brings this host in line with etcd and Docker: networks of etcd get a block,
// devices and a Docker network here; networks gone from etcd leave once no container here uses
// them; a user's new network goes into etcd; local containers are published for names.
func (m *Manager) reconcile(ctx context.Context) {
	m.mu.Lock()
	if !m.haveState {
		m.mu.Unlock()
		return
	}
	m.gcLocked(time.Now())
	state := m.state
	if len(m.adopted) > 0 {
		// Written here, not yet back from the watch: act on it as on any other.
		nets := maps.Clone(state.Networks)
		for name, a := range m.adopted {
			if _, seen := nets[name]; !seen {
				nets[name] = a.rec
			}
		}
		state.Networks = nets
	}
	m.mu.Unlock()

	dv, derr := m.docker.networks(ctx, DriverName)
	m.mu.Lock()
	if (derr == nil) != (m.dockerErr == nil) {
		if derr != nil {
			m.log.Warn("cannot reach Docker; networks stay as they are until it answers", "socket", m.o.DockerSocket, "err", derr)
		} else {
			m.log.Info("Docker answers", "socket", m.o.DockerSocket)
		}
	}
	m.dockerErr = derr
	m.mu.Unlock()
	dockerOK := derr == nil

	if dockerOK {
		state = m.adoptPending(ctx, dv, state)
	}
	for _, rec := range state.SortedNetworks() {
		if rec.Removing || m.tombstoned(rec.Name) {
			continue
		}
		m.ensureLocal(ctx, rec, state.Blocks[rec.Name])
	}
	// Before Docker gets a new network: its first container must already be isolated.
	m.isolate()
	if dockerOK {
		m.retire(ctx, state, dv)
		m.syncDocker(ctx, state, dv)
		m.publishEndpoints(ctx, state, dv)
		m.forgetStaleEndpoints(dv, time.Now())
		m.finishRemovals(ctx, state, dv)
	}
	m.isolate()
}

func (m *Manager) tombstoned(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.tombstones[name]
	return ok
}

// gcLocked forgets tombstones etcd has caught up with and creates Docker never committed.
func (m *Manager) gcLocked(now time.Time) {
	for name, at := range m.tombstones {
		rec, ok := m.state.Networks[name]
		if !ok || rec.Removing || now.Sub(at) > tombstoneTTL {
			delete(m.tombstones, name)
		}
	}
	for id, p := range m.pending {
		if now.Sub(p.at) > pendingTTL {
			delete(m.pending, id)
		}
	}
	for name, a := range m.adopted {
		if _, ok := m.state.Networks[name]; ok || now.Sub(a.at) > adoptedGrace {
			delete(m.adopted, name)
		}
	}
}

// adoptPending writes into etcd the networks users created here, now that Docker knows their
// names. One that lost to another host's (the name taken with other settings, or an
// overlapping subnet created meanwhile) is removed from Docker here: Docker's create has long
// returned, so the log is where the user learns it; the cluster's network of that name is
// then created here as on every host.
func (m *Manager) adoptPending(ctx context.Context, dv []dockerNetwork, state subnetmgr.NetworkState) subnetmgr.NetworkState {
	for _, dn := range dv {
		m.mu.Lock()
		p, ok := m.pending[dn.ID]
		m.mu.Unlock()
		if !ok {
			continue
		}
		rec := subnetmgr.Network{Name: dn.Name, Subnet: p.subnet, VNI: vniOf(p.subnet), Port: m.port, BlockLen: p.blockLen, Options: p.options}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		got, err := m.o.Etcd.CreateNetwork(cctx, rec, m.o.Overlay.Network)
		cancel()
		var conflict *subnetmgr.NetworkConflictError
		switch {
		case errors.As(err, &conflict):
			m.log.Error("docker network create lost to another host's network; removing it from this host's Docker",
				"network", dn.Name, "subnet", p.subnet, "why", conflict.Reason)
			m.mu.Lock()
			delete(m.pending, dn.ID)
			m.mu.Unlock()
			if len(dn.Containers) == 0 {
				m.removeDockerNetwork(ctx, dn)
			}
		case err != nil:
			m.log.Warn("cannot write a new network into etcd yet; retrying", "network", dn.Name, "err", err)
		default:
			m.mu.Lock()
			delete(m.pending, dn.ID)
			m.byID[dn.ID] = dn.Name
			m.adopted[got.Name] = adoptedNet{rec: got, at: time.Now()}
			if m.state.Networks[got.Name].Name == "" {
				// Until the watch brings it: the steps below act on it now.
				nets := maps.Clone(state.Networks)
				nets[got.Name] = got
				state.Networks = nets
			}
			m.mu.Unlock()
			m.log.Info("network created by docker network create on this host", "network", got.Name, "subnet", got.Subnet,
				"vni", got.VNI, "block_len", got.BlockLen)
		}
	}
	return state
}

// ensureLocal gives a network of etcd its block, devices and peers on this host.
func (m *Manager) ensureLocal(ctx context.Context, rec subnetmgr.Network, blocks []subnetmgr.Lease) {
	m.mu.Lock()
	ln := m.nets[rec.Name]
	m.mu.Unlock()
	if ln != nil && !ln.rec.Same(rec) {
		// Deleted and created again with other settings while we looked away.
		m.teardownLocal(ctx, rec.Name)
		ln = nil
	}
	if ln == nil {
		ln = &localNet{rec: rec, peers: map[netip.Prefix]subnetmgr.Lease{}}
		m.mu.Lock()
		m.nets[rec.Name] = ln
		m.mu.Unlock()
	}
	m.mu.Lock()
	block, dp, moved := ln.block, ln.dp, ln.moved
	m.mu.Unlock()
	if !block.Subnet.IsValid() {
		attrs, err := m.blockAttrs(rec)
		if err != nil {
			m.setProblem(ln, err.Error())
			return
		}
		actx, cancel := context.WithTimeout(ctx, 30*time.Second)
		block, err = m.o.Etcd.AcquirePoolLease(actx, rec.BlockPool(), attrs, netip.Prefix{})
		cancel()
		if err != nil {
			m.setProblem(ln, "no block: "+err.Error())
			return
		}
		m.log.Info("network block leased", "network", rec.Name, "block", block.Subnet, "expires", block.Expiration.Format(time.RFC3339))
		m.mu.Lock()
		ln.block, ln.alloc = block, newAllocator(block.Subnet)
		m.mu.Unlock()
		m.startKeeper(ln, rec, attrs, block)
	}
	if dp == nil || moved {
		var err error
		if dp, err = setupDatapath(ctx, m.nl, m.o.Iface, rec, block, m.log); err != nil {
			m.setProblem(ln, err.Error())
			return
		}
		if err := dp.prune(blocks); err != nil {
			m.log.Warn("pruning the network's stale peers failed", "network", rec.Name, "err", err)
		}
		m.mu.Lock()
		ln.dp, ln.moved, ln.problem = dp, false, ""
		ln.peers = map[netip.Prefix]subnetmgr.Lease{}
		m.notifyReadyLocked()
		m.mu.Unlock()
		m.log.Info("network ready on this host", "network", rec.Name, "subnet", rec.Subnet, "vni", rec.VNI, "block", block.Subnet,
			"bridge", dp.bridge, "mtu", dp.mtu)
	}
	want := map[netip.Prefix]subnetmgr.Lease{}
	for _, l := range blocks {
		if l.PublicIP != m.o.Iface.PublicIP && l.Subnet != block.Subnet {
			want[l.Subnet] = l
		}
	}
	m.mu.Lock()
	have := maps.Clone(ln.peers)
	m.mu.Unlock()
	for s, l := range want {
		if old, ok := have[s]; ok && old.PublicIP == l.PublicIP && string(old.BackendData) == string(l.BackendData) {
			continue
		}
		if err := dp.addPeer(l); err != nil {
			m.log.Warn("cannot program a peer's block", "network", rec.Name, "block", s, "public_ip", l.PublicIP, "err", err)
			continue
		}
		m.mu.Lock()
		ln.peers[s] = l
		m.mu.Unlock()
		m.log.Info("network peer added", "network", rec.Name, "block", s, "public_ip", l.PublicIP)
	}
	for s, l := range have {
		if _, ok := want[s]; ok {
			continue
		}
		if err := dp.removePeer(l); err != nil {
			m.log.Warn("cannot remove a peer's block", "network", rec.Name, "block", s, "err", err)
		}
		m.mu.Lock()
		delete(ln.peers, s)
		m.mu.Unlock()
		m.log.Info("network peer removed", "network", rec.Name, "block", s, "public_ip", l.PublicIP)
	}
}

func (m *Manager) setProblem(ln *localNet, p string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ln.problem != p {
		m.log.Warn("network not ready on this host", "network", ln.rec.Name, "problem", p)
	}
	ln.problem = p
}

// startKeeper renews the block until the network leaves this host. A block lost to another
// host (after an etcd outage longer than its TTL) is replaced, and the devices follow; the
// containers on the old block are cut off, which is logged.
func (m *Manager) startKeeper(ln *localNet, rec subnetmgr.Network, attrs subnetmgr.LeaseAttrs, block subnetmgr.Lease) {
	kctx, cancel := context.WithCancel(m.runCtx)
	done := make(chan struct{})
	m.mu.Lock()
	ln.stopKeep, ln.keepDone = cancel, done
	m.mu.Unlock()
	m.keepers.Go(func() {
		defer close(done)
		_ = m.o.Etcd.KeepPoolLease(kctx, rec.BlockPool(), attrs, block, m.o.RenewMargin, func(l subnetmgr.Lease) {
			m.mu.Lock()
			if l.Subnet != ln.block.Subnet {
				m.log.Error("our block of the network moved; containers on the old block lose the network",
					"network", rec.Name, "old", ln.block.Subnet, "new", l.Subnet)
				ln.moved, ln.alloc = true, newAllocator(l.Subnet)
			}
			ln.block = l
			m.mu.Unlock()
			// A renewal that had to move the key to a new etcd lease took our endpoints
			// with the old one: the reconciliation publishes them again.
			m.requestKick()
		})
	})
}

// teardownLocal takes a network off this host: renewals stop, the block goes back, the devices go.
func (m *Manager) teardownLocal(ctx context.Context, name string) {
	m.mu.Lock()
	ln := m.nets[name]
	delete(m.nets, name)
	if ln != nil && ln.dockerID != "" {
		delete(m.byID, ln.dockerID)
	}
	m.mu.Unlock()
	if ln == nil {
		return
	}
	if ln.stopKeep != nil {
		// Wait for it: a renewal still in flight would create the key again after the release.
		ln.stopKeep()
		<-ln.keepDone
	}
	if ln.block.Subnet.IsValid() {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := m.o.Etcd.ReleasePoolLease(rctx, ln.rec.BlockPool(), ln.block); err != nil {
			m.log.Warn("cannot give the network's block back; it expires with its TTL", "network", name, "block", ln.block.Subnet, "err", err)
		}
		cancel()
	}
	if ln.dp != nil {
		if err := ln.dp.close(true); err != nil {
			m.log.Warn("removing the network's devices", "network", name, "err", err)
		}
	}
	m.log.Info("network removed from this host", "network", name)
}

// removeDockerNetwork is xnetd's own `docker network rm`.
func (m *Manager) removeDockerNetwork(ctx context.Context, dn dockerNetwork) {
	m.mu.Lock()
	m.expectDelete[dn.ID] = true
	m.mu.Unlock()
	err := m.docker.removeNetwork(ctx, dn.ID)
	m.mu.Lock()
	delete(m.expectDelete, dn.ID)
	delete(m.byID, dn.ID)
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("cannot remove a network from Docker", "network", dn.Name, "id", dn.ID, "err", err)
		return
	}
	m.log.Info("network removed from this host's Docker", "network", dn.Name)
}

// retire takes off this host the networks etcd no longer has (or marks removing), once no
// local container uses them.
func (m *Manager) retire(ctx context.Context, state subnetmgr.NetworkState, dv []dockerNetwork) {
	m.mu.Lock()
	names := slices.Sorted(maps.Keys(m.nets))
	m.mu.Unlock()
	for _, name := range names {
		m.mu.Lock()
		ln := m.nets[name]
		_, tomb := m.tombstones[name]
		m.mu.Unlock()
		rec, ok := state.Networks[name]
		if ok && !rec.Removing && !tomb && rec.Same(ln.rec) {
			continue
		}
		var dn *dockerNetwork
		for i := range dv {
			if dv[i].Name == name {
				dn = &dv[i]
			}
		}
		if dn != nil && len(dn.Containers) > 0 {
			m.setProblem(ln, fmt.Sprintf("removing: %d containers here still use it", len(dn.Containers)))
			continue
		}
		if dn != nil {
			m.removeDockerNetwork(ctx, *dn)
		}
		m.teardownLocal(ctx, name)
	}
}

// syncDocker creates in this host's Docker every network of etcd that is ready here, and
// removes xnet networks that etcd does not have.
func (m *Manager) syncDocker(ctx context.Context, state subnetmgr.NetworkState, dv []dockerNetwork) {
	byName := map[string]dockerNetwork{}
	for _, dn := range dv {
		byName[dn.Name] = dn
	}
	for _, rec := range state.SortedNetworks() {
		m.mu.Lock()
		ln := m.nets[rec.Name]
		ready := ln != nil && ln.dp != nil
		_, tomb := m.tombstones[rec.Name]
		m.mu.Unlock()
		if rec.Removing || tomb || !ready {
			continue
		}
		if dn, ok := byName[rec.Name]; ok {
			if dn.Subnet == rec.Subnet {
				m.mu.Lock()
				m.byID[dn.ID], ln.dockerID = rec.Name, dn.ID
				m.mu.Unlock()
				continue
			}
			m.setProblem(ln, fmt.Sprintf("this host's Docker has a network %s with subnet %s, the cluster's has %s", rec.Name, dn.Subnet, rec.Subnet))
			if len(dn.Containers) == 0 {
				m.removeDockerNetwork(ctx, dn)
			}
			continue
		}
		m.mu.Lock()
		m.expectCreate[rec.Subnet] = rec.Name
		m.mu.Unlock()
		id, err := m.docker.createNetwork(ctx, rec.Name, DriverName, rec.Subnet, rec.Options)
		m.mu.Lock()
		delete(m.expectCreate, rec.Subnet)
		if err == nil {
			m.byID[id], ln.dockerID = rec.Name, id
		}
		m.mu.Unlock()
		if err != nil {
			// Most likely a network of another driver with this name.
			m.setProblem(ln, "cannot create it in this host's Docker: "+err.Error())
			continue
		}
		m.log.Info("network created in this host's Docker", "network", rec.Name, "subnet", rec.Subnet, "id", id)
	}
	for _, dn := range dv {
		m.mu.Lock()
		_, pending := m.pending[dn.ID]
		_, local := m.nets[dn.Name]
		m.mu.Unlock()
		if _, ok := state.Networks[dn.Name]; ok || pending || local || len(dn.Containers) > 0 {
			continue
		}
		m.log.Info("removing a network etcd no longer has from this host's Docker", "network", dn.Name)
		m.removeDockerNetwork(ctx, dn)
	}
}

// publishEndpoints makes the endpoints etcd holds for this host exactly the containers
// Docker has on each network, and records their addresses as used (after a restart of xnetd
// the allocator starts empty).
func (m *Manager) publishEndpoints(ctx context.Context, state subnetmgr.NetworkState, dv []dockerNetwork) {
	for _, dn := range dv {
		rec, ok := state.Networks[dn.Name]
		m.mu.Lock()
		ln := m.nets[dn.Name]
		var block subnetmgr.Lease
		unknown := map[string]dockerAttachment{} // by container ID
		if ln != nil && ln.alloc != nil {
			block = ln.block
			for cid, a := range dn.Containers {
				ln.alloc.markUsed(a.IP)
				if _, known := m.endpoints[a.EndpointID]; !known && a.EndpointID != "" {
					unknown[cid] = a
				}
			}
		}
		m.mu.Unlock()
		// Endpoints joined before xnetd (re)started: learn them, with their sandbox, so the
		// resolver knows who asks and a later join to the same container adds no second
		// route to the resolver (Docker fails a join whose route exists).
		for cid, a := range unknown {
			sandbox, err := m.docker.sandboxKey(ctx, cid)
			if err != nil {
				continue
			}
			m.mu.Lock()
			m.endpoints[a.EndpointID] = &endpoint{id: a.EndpointID, network: dn.Name, ip: a.IP, mac: containerMAC(a.IP), sandbox: sandbox, created: time.Now()}
			if m.sandboxes[sandbox] == nil {
				m.sandboxes[sandbox] = map[string]bool{}
			}
			m.sandboxes[sandbox][a.EndpointID] = true
			m.mu.Unlock()
		}
		if !ok || dn.Subnet != rec.Subnet || !block.Subnet.IsValid() {
			continue
		}
		have := map[netip.Addr]subnetmgr.NetworkEndpoint{}
		for _, ep := range state.Endpoints[dn.Name] {
			have[ep.IP] = ep
		}
		local := map[netip.Addr]bool{}
		for cid, a := range dn.Containers {
			if !block.Subnet.Contains(a.IP) {
				continue
			}
			local[a.IP] = true
			want := subnetmgr.NetworkEndpoint{Network: dn.Name, IP: a.IP, Name: a.Name, PublicIP: m.o.Iface.PublicIP, Container: shortContainerID(cid)}
			if have[a.IP] == want {
				continue
			}
			if err := m.o.Etcd.PutNetworkEndpoint(ctx, want, block); err != nil {
				m.log.Warn("cannot publish a container's address for names", "network", dn.Name, "container", a.Name, "ip", a.IP, "err", err)
				continue
			}
			m.log.Debug("container published", "network", dn.Name, "container", a.Name, "ip", a.IP)
		}
		for ip, ep := range have {
			if ep.PublicIP != m.o.Iface.PublicIP || local[ip] {
				continue
			}
			if err := m.o.Etcd.DeleteNetworkEndpoint(ctx, dn.Name, ip); err != nil {
				m.log.Warn("cannot unpublish a container that left", "network", dn.Name, "ip", ip, "err", err)
			}
		}
	}
}

// forgetStaleEndpoints drops endpoints (and their sandboxes) that Docker no longer shows on
// any of its xnet networks, so the resolver does not take a dead container for an asker.
func (m *Manager) forgetStaleEndpoints(dv []dockerNetwork, now time.Time) {
	seen := map[string]bool{}
	for _, dn := range dv {
		for _, a := range dn.Containers {
			seen[a.EndpointID] = true
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, ep := range m.endpoints {
		if seen[id] || now.Sub(ep.created) < staleEndpointAge {
			continue
		}
		delete(m.endpoints, id)
		if ep.sandbox != "" {
			delete(m.sandboxes[ep.sandbox], id)
			if len(m.sandboxes[ep.sandbox]) == 0 {
				delete(m.sandboxes, ep.sandbox)
			}
		}
	}
}

func shortContainerID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// finishRemovals deletes from etcd the networks marked removing that no container uses any
// more: any host may do it, the transaction makes it happen once.
func (m *Manager) finishRemovals(ctx context.Context, state subnetmgr.NetworkState, dv []dockerNetwork) {
	for _, rec := range state.SortedNetworks() {
		if !rec.Removing || len(state.Endpoints[rec.Name]) > 0 {
			continue
		}
		used := false
		for _, dn := range dv {
			used = used || (dn.Name == rec.Name && len(dn.Containers) > 0)
		}
		if used {
			continue
		}
		if _, err := m.o.Etcd.RemoveNetworkIfUnused(ctx, rec.Name, true); err != nil {
			m.log.Warn("cannot delete a removed network from etcd; retrying", "network", rec.Name, "err", err)
		}
	}
}

// isolate rewrites the isolation table for the networks set up here.
func (m *Manager) isolate() {
	m.mu.Lock()
	var nets []isolated
	for _, ln := range m.nets {
		if ln.dp != nil {
			nets = append(nets, isolated{VNI: ln.rec.VNI})
		}
	}
	m.mu.Unlock()
	slices.SortFunc(nets, func(a, b isolated) int { return a.VNI - b.VNI })
	m.mu.Lock()
	fresh := m.isoErr == nil && slices.Equal(nets, m.isoApplied) && time.Since(m.isoAt) < time.Minute
	m.mu.Unlock()
	if fresh {
		return
	}
	conn, err := nftables.New()
	if err == nil {
		err = applyIsolation(conn, nets)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.isoApplied, m.isoAt = nets, time.Now()
	if (err == nil) != (m.isoErr == nil) && err != nil {
		m.log.Error("cannot install the isolation between networks; containers of different networks may reach each other through this host", "err", err)
	}
	m.isoErr = err
}

// resolve is the resolver's backend (see dns.go): name or name.network, from the asker's view.
func (m *Manager) resolve(name string, from netip.Addr) ([]netip.Addr, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	asker := m.askerNetworksLocked(from)
	var out []netip.Addr
	known := false
	add := func(network, container string) {
		for _, ep := range m.state.Endpoints[network] {
			if !strings.EqualFold(ep.Name, container) || !m.validEndpointLocked(ep) {
				continue
			}
			known = true
			if asker == nil || asker[network] {
				out = append(out, ep.IP)
			}
		}
	}
	for network := range m.state.Networks {
		add(network, name)
		if c, ok := strings.CutSuffix(name, "."+strings.ToLower(network)); ok {
			add(network, c)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out), known
}

// askerNetworksLocked is the set of networks of the local container whose address is from, or
// nil when from is not one (then every network's answers are given).
func (m *Manager) askerNetworksLocked(from netip.Addr) map[string]bool {
	var sandbox string
	var netOf string
	for _, ep := range m.endpoints {
		if ep.ip == from {
			sandbox, netOf = ep.sandbox, ep.network
		}
	}
	if netOf == "" {
		return nil
	}
	out := map[string]bool{netOf: true}
	if sandbox != "" {
		for id := range m.sandboxes[sandbox] {
			if ep := m.endpoints[id]; ep != nil {
				out[ep.network] = true
			}
		}
	}
	return out
}

// validEndpointLocked: an endpoint counts only inside a block its host holds.
func (m *Manager) validEndpointLocked(ep subnetmgr.NetworkEndpoint) bool {
	for _, b := range m.state.Blocks[ep.Network] {
		if b.Subnet.Contains(ep.IP) {
			return b.PublicIP == ep.PublicIP
		}
	}
	return false
}

// subnetOfPool is the subnet behind one of our pool IDs.
func subnetOfPool(id string) (netip.Prefix, error) {
	s, ok := strings.CutPrefix(id, poolIDPrefix)
	p, err := netip.ParsePrefix(s)
	if !ok || err != nil {
		return netip.Prefix{}, fmt.Errorf("unknown address pool %q (not from the %s IPAM driver)", id, DriverName)
	}
	return p, nil
}

// genericOptions are the -o options of a create request.
func genericOptions(opts map[string]any) map[string]string {
	out := map[string]string{}
	g, _ := opts["com.docker.network.generic"].(map[string]any)
	for k, v := range g {
		out[k] = fmt.Sprint(v)
	}
	return out
}

// blockLenOf checks the options of a new network and returns its block length.
func blockLenOf(subnet netip.Prefix, opts map[string]string) (int, error) {
	for k := range opts {
		if k != OptBlockLen {
			return 0, fmt.Errorf("-o %s: unknown option; xnet networks take -o %s=<prefix length of each host's block>", k, OptBlockLen)
		}
	}
	v, ok := opts[OptBlockLen]
	if !ok {
		return defaultBlockLen(subnet), nil
	}
	n, err := strconv.Atoi(strings.TrimPrefix(v, "/"))
	if err != nil || n < subnet.Bits()+2 || n > 28 {
		return 0, fmt.Errorf("-o %s=%s: want a prefix length from %d (the subnet's + 2) to 28", OptBlockLen, v, subnet.Bits()+2)
	}
	return n, nil
}
