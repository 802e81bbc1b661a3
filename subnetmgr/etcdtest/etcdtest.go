// Package etcdtest starts a real, single-member embedded etcd for tests: on 127.0.0.1 with
// free ports and a data dir under t.TempDir(), stopped in t.Cleanup. It can be stopped and
// started again on the same data dir and ports, to test surviving an etcd outage.
//
// It owns nothing but the test server; the etcd schema lives in package subnetmgr.
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Options change how the member is started.
type Options struct {
	// TLS, when CertFile is set, serves clients over https with this certificate;
	// with ClientCertAuth and TrustedCAFile, clients must present a certificate from that CA.
	TLS transport.TLSInfo
}

// Server is one embedded etcd member.
type Server struct {
	t         testing.TB
	opts      Options
	dir       string
	clientURL url.URL
	peerURL   url.URL

	mu      sync.Mutex
	etcd    *embed.Etcd
	client  *clientv3.Client
	closing sync.WaitGroup // background Close calls of stopped members
}

// Start starts an etcd member and registers its shutdown with t.Cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, opts Options) *Server {
	t.Helper()
	s := &Server{t: t, opts: opts, dir: t.TempDir()}
	scheme := "http"
	if opts.TLS.CertFile != "" {
		scheme = "https"
	}
	// A port picked free may be taken by someone else before etcd binds it: try a few.
	var err error
	for range 5 {
		s.clientURL = url.URL{Scheme: scheme, Host: freeAddr(t)}
		s.peerURL = url.URL{Scheme: "http", Host: freeAddr(t)}
		if err = s.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	t.Cleanup(func() {
		s.mu.Lock()
		if s.client != nil {
			s.client.Close()
		}
		s.mu.Unlock()
		s.Stop()
		s.closing.Wait()
	})
	return s
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (s *Server) start() error {
	cfg := embed.NewConfig()
	cfg.Name = "etcdtest"
	cfg.Dir = s.dir
	cfg.ListenClientUrls = []url.URL{s.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{s.clientURL}
	cfg.ListenPeerUrls = []url.URL{s.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{s.peerURL}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, s.peerURL.String())
	cfg.ClientTLSInfo = s.opts.TLS
	cfg.UnsafeNoFsync = true // a test's data need not survive a power cut
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(20 * time.Second):
		e.Close()
		return fmt.Errorf("etcd in %s not ready after 20s", s.dir)
	}
	s.mu.Lock()
	s.etcd = e
	s.mu.Unlock()
	return nil
}

// Endpoint is the client URL, e.g. "http://127.0.0.1:41234".
func (s *Server) Endpoint() string { return s.clientURL.String() }

// Client is a client for the test itself, closed in t.Cleanup. Not for a TLS server.
func (s *Server) Client() *clientv3.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == nil {
		c, err := clientv3.New(clientv3.Config{Endpoints: []string{s.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			s.t.Fatalf("etcd client: %v", err)
		}
		s.client = c
	}
	return s.client
}

// Stop stops the member at once, as a crash or a power cut would, keeping its data dir.
// Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	e := s.etcd
	s.etcd = nil
	s.mu.Unlock()
	if e != nil {
		// A plain Close drains client streams for 7s while the server still expires
		// leases but refuses to renew them: stop the server itself first, and let the
		// drain finish in the background (t.Cleanup waits for it).
		e.Server.HardStop()
		s.closing.Go(e.Close)
	}
}

// Restart starts the member again on the same data dir and ports.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	var err error
	for range 100 { // the stopped member may take a moment to release its ports and files
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("restart embedded etcd: %v", err)
}

// Compact compacts the store up to the current revision, as an operator's etcdctl would.
func (s *Server) Compact(ctx context.Context) int64 {
	s.t.Helper()
	c := s.Client()
	resp, err := c.Get(ctx, "compact-probe")
	if err != nil {
		s.t.Fatalf("read revision: %v", err)
	}
	rev := resp.Header.Revision
	if _, err := c.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		s.t.Fatalf("compact to %d: %v", rev, err)
	}
	return rev
}
