package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// EtcdClusterPort is where the first member of an EtcdCluster answers at the underlay
// gateway; member i answers at EtcdClusterPort+2*i (2379, 2381, 2383), so a topology with an
// etcd cluster has no single etcd (Options.WithEtcd) as well.
const EtcdClusterPort = EtcdPort

// EtcdCluster is a multi-member embedded etcd cluster: every member on loopback, relayed into
// the underlay namespace at 198.18.0.1:2379, :2381, :2383, ... for the hosts (and on another
// loopback port for the test process). A member can be stopped the way a crashed etcd
// process is (its ports refuse, its connections drop) and started again on its data.
type EtcdCluster struct {
	topo    *Topology
	dir     string
	members []*clusterMember
	client  *clientv3.Client
}

type clusterMember struct {
	name      string
	clientURL url.URL // loopback
	peerURL   url.URL
	relayAddr netip.AddrPort
	relay     *tcpRelay
	// The test process talks to the member through a relay on loopback too, so that a stopped
	// member refuses it and cuts its connections as it does the hosts'. (etcd's own port
	// stays open while a stopped member closes in the background, answering "raft: stopped".)
	localAddr string
	local     *tcpRelay
	cfg       func() *embed.Config // a fresh config each start: embed keeps state in it

	mu       sync.Mutex
	etcd     *embed.Etcd
	closing  chan struct{} // closed when the last stopped instance has released its ports
	powerOff string        // nftables table dropping the member's underlay traffic, while powered off
}

// StartEtcdCluster starts members (3 for a cluster that survives losing one) and waits until
// they have a leader. The topology must not have Options.WithEtcd (the ports collide). Close
// stops it; close it before the topology.
func StartEtcdCluster(ctx context.Context, topo *Topology, members int) (*EtcdCluster, error) {
	if topo.etcd != nil {
		return nil, fmt.Errorf("harness: etcd cluster: the topology already runs an etcd at %s (Options.WithEtcd): use one or the other", topo.EtcdEndpoint())
	}
	if members < 1 || members > 9 {
		return nil, fmt.Errorf("harness: etcd cluster of %d members: want 1 to 9", members)
	}
	dir, err := os.MkdirTemp(topo.baseDir, "etcdcluster")
	if err != nil {
		return nil, fmt.Errorf("harness: etcd cluster dir: %w", err)
	}
	var lastErr error
	// Free ports are picked by binding port 0 and closing; another process may take one in
	// between, so a failed start is retried on new ports.
	for attempt := range 3 {
		c, err := startClusterOnce(ctx, topo, filepath.Join(dir, fmt.Sprintf("try%d", attempt)), members)
		if err == nil {
			c.dir = dir
			return c, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	os.RemoveAll(dir)
	return nil, lastErr
}

// StartEtcdClusterForTest is StartEtcdCluster that fails tb on error and closes the cluster in
// tb.Cleanup (before the topology of NewForTest, which was registered earlier).
func StartEtcdClusterForTest(tb testing.TB, topo *Topology, members int) *EtcdCluster {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := StartEtcdCluster(ctx, topo, members)
	if err != nil {
		tb.Fatalf("harness: %v", err)
	}
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("harness: etcd cluster close: %v", err)
		}
	})
	return c
}

func startClusterOnce(ctx context.Context, topo *Topology, dir string, members int) (_ *EtcdCluster, err error) {
	c := &EtcdCluster{topo: topo}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	var initial []string
	for i := range members {
		cp, err := freePort()
		if err != nil {
			return nil, fmt.Errorf("pick etcd client port: %w", err)
		}
		pp, err := freePort()
		if err != nil {
			return nil, fmt.Errorf("pick etcd peer port: %w", err)
		}
		m := &clusterMember{
			name:      fmt.Sprintf("m%d", i),
			clientURL: url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", cp)},
			peerURL:   url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", pp)},
			relayAddr: netip.AddrPortFrom(UnderlayGateway, uint16(EtcdClusterPort+2*i)),
		}
		m.relay = newRelay(m.clientURL.Host, topo.log)
		m.local = newRelay(m.clientURL.Host, topo.log)
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	// Every member must be starting before any can be ready: they need a quorum to elect.
	for _, m := range c.members {
		dataDir, initialCluster, token := filepath.Join(dir, m.name), strings.Join(initial, ","), "xnet-"+topo.ID()
		m.cfg = func() *embed.Config { return m.config(dataDir, initialCluster, token) }
		e, err := embed.StartEtcd(m.cfg())
		if err != nil {
			return nil, fmt.Errorf("start etcd member %s on %s: %w", m.name, m.clientURL.Host, err)
		}
		m.etcd = e
	}
	for _, m := range c.members {
		if err := m.waitReady(ctx); err != nil {
			return nil, err
		}
		if err := m.listen(topo); err != nil {
			return nil, err
		}
	}
	c.client, err = clientv3.New(clientv3.Config{Endpoints: c.loopbackEndpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("etcd cluster client: %w", err)
	}
	return c, nil
}

// config is the member's embed config. A restart passes the same values: the data dir then
// holds the cluster, and etcd ignores the initial cluster settings.
func (m *clusterMember) config(dir, initialCluster, token string) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = dir
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{m.clientURL}, []url.URL{m.clientURL}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{m.peerURL}, []url.URL{m.peerURL}
	cfg.InitialCluster = initialCluster
	cfg.InitialClusterToken = token
	cfg.UnsafeNoFsync = true // a test's data need not survive a power cut
	return cfg
}

func (m *clusterMember) waitReady(ctx context.Context) error {
	m.mu.Lock()
	e := m.etcd
	m.mu.Unlock()
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcd member %s on %s failed: %w", m.name, m.clientURL.Host, err)
	case <-time.After(30 * time.Second):
		return fmt.Errorf("etcd member %s on %s not ready after 30s", m.name, m.clientURL.Host)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// listen opens the member's relays: in the underlay namespace, and on loopback (on a free
// port the first time, on the same one after a restart).
func (m *clusterMember) listen(topo *Topology) error {
	addr := m.localAddr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ll, err := net.Listen("tcp4", addr)
	if err != nil {
		return fmt.Errorf("harness: etcd member %s loopback relay listener %s: %w", m.name, addr, err)
	}
	m.localAddr = ll.Addr().String()
	var l net.Listener
	if err := topo.underlay.Do(func() (err error) {
		l, err = net.Listen("tcp4", m.relayAddr.String())
		return err
	}); err != nil {
		ll.Close()
		return fmt.Errorf("harness: etcd member %s relay listener %v in %s: %w", m.name, m.relayAddr, topo.underlay.Name, err)
	}
	m.relay.serve(l)
	m.local.serve(ll)
	return nil
}

// Members is the number of members.
func (c *EtcdCluster) Members() int { return len(c.members) }

// Endpoints are the members' URLs for processes inside the topology, in member order:
// http://198.18.0.1:2379, http://198.18.0.1:2381, ...
func (c *EtcdCluster) Endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, "http://"+m.relayAddr.String())
	}
	return out
}

// EndpointsFlag is Endpoints as one --etcd-endpoints value.
func (c *EtcdCluster) EndpointsFlag() string { return strings.Join(c.Endpoints(), ",") }

func (c *EtcdCluster) loopbackEndpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, "http://"+m.localAddr)
	}
	return out
}

// Client is a client of every member (through its loopback relay), for the test process;
// Close closes it.
func (c *EtcdCluster) Client() *clientv3.Client { return c.client }

// Running says whether member i is running.
func (c *EtcdCluster) Running(i int) bool {
	m := c.members[i]
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.etcd != nil
}

// Leader is the index of the member the running members follow, or -1 when they do not
// agree on a running one (an election is under way).
func (c *EtcdCluster) Leader() int {
	lead, ids := -1, map[uint64]int{}
	var seen []uint64
	for i, m := range c.members {
		m.mu.Lock()
		if m.etcd != nil {
			ids[uint64(m.etcd.Server.MemberID())] = i
			seen = append(seen, uint64(m.etcd.Server.Leader()))
		}
		m.mu.Unlock()
	}
	for k, l := range seen {
		j, ok := ids[l]
		if !ok || (k > 0 && j != lead) {
			return -1
		}
		lead = j
	}
	return lead
}

// Connections is the number of connections hosts have open to member i through its relay:
// which members the hosts' clients are talking to.
func (c *EtcdCluster) Connections(i int) int { return c.members[i].relay.open() }

// Stop stops member i as a crash would: etcd stops at once (no leadership transfer), its
// underlay port refuses connections and the hosts' open connections to it are cut. Its data
// stays for Restart. Stopping a stopped member does nothing.
func (c *EtcdCluster) Stop(i int) {
	m := c.members[i]
	m.relay.close()
	m.local.close()
	stopMember(m)
}

// stopMember hard-stops the member's etcd and closes it in the background.
func stopMember(m *clusterMember) {
	m.mu.Lock()
	e := m.etcd
	m.etcd = nil
	if e != nil {
		m.closing = make(chan struct{})
	}
	closing := m.closing
	m.mu.Unlock()
	if e == nil {
		return
	}
	// HardStop first: a plain Close would first drain client streams for seconds while
	// still answering. Close then releases ports and files, in the background.
	e.Server.HardStop()
	go func() {
		e.Close()
		close(closing)
	}()
}

// PowerOff stops member i as a machine that loses power or network would: etcd stops, and
// everything to and from its underlay port is dropped, so hosts see no FIN or RST, only
// silence (their open connections stall until a keepalive or timeout gives up; new ones get
// no answer). Restart ends it.
func (c *EtcdCluster) PowerOff(ctx context.Context, i int) error {
	m := c.members[i]
	table := fmt.Sprintf("xnetec%s%d", c.topo.ID(), i)
	port := m.relayAddr.Port()
	script := fmt.Sprintf("add table inet %[1]s\n"+
		"add chain inet %[1]s in { type filter hook input priority -10; }\n"+
		"add chain inet %[1]s out { type filter hook output priority -10; }\n"+
		"add rule inet %[1]s in ip daddr %[2]s tcp dport %[3]d drop\n"+
		"add rule inet %[1]s out ip saddr %[2]s tcp sport %[3]d drop\n", table, m.relayAddr.Addr(), port)
	if _, err := c.topo.underlay.Run(ctx, "sh", "-c", "printf '"+script+"' | nft -f -"); err != nil {
		return fmt.Errorf("harness: power off etcd member %s: %w", m.name, err)
	}
	m.mu.Lock()
	m.powerOff = table
	m.mu.Unlock()
	// The test process's relay on loopback simply closes: it has no network to lose.
	m.local.close()
	stopMember(m) // the underlay relay stays: the connections it holds must go silent, not close
	return nil
}

// Restart starts stopped member i again on its data and ports, waits until it is ready (it
// has caught up with the leader) and opens its underlay port again.
func (c *EtcdCluster) Restart(ctx context.Context, i int) error {
	m := c.members[i]
	m.mu.Lock()
	running, closing, table := m.etcd != nil, m.closing, m.powerOff
	m.mu.Unlock()
	if running {
		return fmt.Errorf("harness: etcd member %s is running", m.name)
	}
	if table != "" {
		// Back on the network: the connections held through the outage are closed now, as
		// a rebooted machine's would be (RST on the hosts' next segment).
		m.relay.close()
		if _, err := c.topo.underlay.Run(ctx, "nft", "delete", "table", "inet", table); err != nil {
			return fmt.Errorf("harness: power etcd member %s back on: %w", m.name, err)
		}
		m.mu.Lock()
		m.powerOff = ""
		m.mu.Unlock()
	}
	if closing != nil {
		select {
		case <-closing:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var e *embed.Etcd
	var err error
	for range 50 { // the kernel may hold the ports for a moment after Close
		e, err = embed.StartEtcd(m.cfg())
		if err == nil {
			break
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return fmt.Errorf("harness: restart etcd member %s: %w", m.name, err)
	}
	m.mu.Lock()
	m.etcd = e
	m.mu.Unlock()
	if err := m.waitReady(ctx); err != nil {
		return err
	}
	return m.listen(c.topo)
}

// Close stops every member, waits until each released its ports, and removes the data.
func (c *EtcdCluster) Close() error {
	if c.client != nil {
		c.client.Close()
	}
	var errs []error
	for i, m := range c.members {
		c.Stop(i)
		m.mu.Lock()
		closing, table := m.closing, m.powerOff
		m.powerOff = ""
		m.mu.Unlock()
		if table != "" {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if _, err := c.topo.underlay.Run(ctx, "nft", "delete", "table", "inet", table); err != nil {
				errs = append(errs, fmt.Errorf("etcd member %s: %w", m.name, err))
			}
			cancel()
		}
		if closing != nil {
			select {
			case <-closing:
			case <-time.After(30 * time.Second):
				errs = append(errs, fmt.Errorf("etcd member %s still closing after 30s", m.name))
			}
		}
	}
	if c.dir != "" {
		if err := os.RemoveAll(c.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
