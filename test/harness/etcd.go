package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// EtcdPort is the port etcd answers on at the underlay gateway address.
const EtcdPort = 2379

// etcdServer is an embedded etcd on loopback plus a relay listening inside the underlay
// namespace, so host namespaces reach it at 198.18.0.1:2379 and the test process at 127.0.0.1.
type etcdServer struct {
	etcd     *embed.Etcd
	client   *clientv3.Client
	loopback string // host:port of the client URL on 127.0.0.1
	relay    *tcpRelay
	relay6   *tcpRelay // on the IPv6 underlay gateway (Options.IPv6Underlay), else nil
	log      *slog.Logger
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startEtcd starts etcd with its data in dir. Free ports are picked by binding port 0 and
// closing; another process may take the port in between, so a failed start is retried.
func startEtcd(ctx context.Context, dir string, log *slog.Logger) (*etcdServer, error) {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		s, err := startEtcdOnce(ctx, fmt.Sprintf("%s/try%d", dir, attempt), log)
		if err == nil {
			return s, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

func startEtcdOnce(ctx context.Context, dir string, log *slog.Logger) (*etcdServer, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("pick etcd client port: %w", err)
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("pick etcd peer port: %w", err)
	}
	cu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", clientPort))
	pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	cfg := embed.NewConfig()
	cfg.Name = "harness"
	cfg.Dir = dir
	// etcd logs at error level while it shuts down normally ("server closed"); the harness
	// reports etcd failures through StartEtcd's and the client's errors instead.
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd on %s: %w", cu.Host, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd on %s failed: %w", cu.Host, err)
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd on %s not ready after 30s", cu.Host)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	client, err := clientv3.New(clientv3.Config{Endpoints: []string{cu.String()}, DialTimeout: 5 * time.Second})
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("etcd client for %s: %w", cu.Host, err)
	}
	return &etcdServer{etcd: e, client: client, loopback: cu.Host, log: log}, nil
}

// serveRelay relays connections accepted on l (a listener created inside the underlay
// namespace) to the loopback etcd.
func (s *etcdServer) serveRelay(l net.Listener) {
	s.relay = newRelay(s.loopback, s.log)
	s.relay.serve(l)
}

// serveRelayV6 is serveRelay for a second listener, on the IPv6 underlay gateway address.
func (s *etcdServer) serveRelayV6(l net.Listener) {
	s.relay6 = newRelay(s.loopback, s.log)
	s.relay6.serve(l)
}

func (s *etcdServer) close() {
	for _, r := range []*tcpRelay{s.relay, s.relay6} {
		if r != nil {
			r.close()
		}
	}
	if s.client != nil {
		s.client.Close()
	}
	if s.etcd != nil {
		s.etcd.Close()
	}
}

// tcpRelay accepts TCP connections on a listener inside a namespace and relays each to a
// target dialled on ordinary goroutines, in the root namespace: how hosts reach an etcd that
// listens on loopback.
type tcpRelay struct {
	target string
	log    *slog.Logger
	wg     sync.WaitGroup

	mu     sync.Mutex
	l      net.Listener
	conns  map[net.Conn]struct{}
	closed bool // by close: a connection accepted just before is dropped, not relayed
}

func newRelay(target string, log *slog.Logger) *tcpRelay {
	return &tcpRelay{target: target, log: log, conns: map[net.Conn]struct{}{}}
}

// serve accepts on l until l is closed (by close or cut).
func (r *tcpRelay) serve(l net.Listener) {
	r.mu.Lock()
	r.l, r.closed = l, false
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					r.log.Warn("etcd relay accept", "err", err)
				}
				return
			}
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				r.relayConn(c)
			}()
		}
	}()
}

func (r *tcpRelay) relayConn(c net.Conn) {
	up, err := net.DialTimeout("tcp", r.target, 5*time.Second)
	if err != nil {
		r.log.Warn("etcd relay dial", "err", err)
		c.Close()
		return
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	r.conns[c], r.conns[up] = struct{}{}, struct{}{}
	r.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		// Half-close so the other direction can drain, then let the second copier finish.
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	<-done
	<-done
	c.Close()
	up.Close()
	r.mu.Lock()
	delete(r.conns, c)
	delete(r.conns, up)
	r.mu.Unlock()
}

// open is the number of client connections being relayed now.
func (r *tcpRelay) open() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns) / 2
}

// close closes the listener and every relayed connection, and waits for the relay's
// goroutines: the relay can serve again on a new listener afterwards.
func (r *tcpRelay) close() {
	r.mu.Lock()
	r.closed = true
	if r.l != nil {
		r.l.Close()
		r.l = nil
	}
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}
