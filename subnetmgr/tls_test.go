package subnetmgr

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

// tlsFixture is an etcd that requires client certificates from CA "good", and certificates
// from that CA and from another one ("other") for the clients.
type tlsFixture struct {
	srv                           *etcdtest.Server
	goodCA, otherCA               string // CA files
	clientCert, clientKey         string // from goodCA
	otherCert, otherKey           string // from otherCA
	serverCertFile, serverKeyFile string
	dir                           string
}

func newTLSFixture(t *testing.T) *tlsFixture {
	t.Helper()
	f := &tlsFixture{dir: t.TempDir()}
	goodDir, otherDir := filepath.Join(f.dir, "good"), filepath.Join(f.dir, "other")
	for _, d := range []string{goodDir, otherDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ca, caKey := writeCA(t, goodDir)
	other, otherKey := writeCA(t, otherDir)
	f.goodCA, f.otherCA = filepath.Join(goodDir, "ca.pem"), filepath.Join(otherDir, "ca.pem")
	f.serverCertFile, f.serverKeyFile = writeCert(t, goodDir, "server", ca, caKey)
	f.clientCert, f.clientKey = writeCert(t, goodDir, "client", ca, caKey)
	f.otherCert, f.otherKey = writeCert(t, otherDir, "client", other, otherKey)
	f.srv = etcdtest.StartWith(t, etcdtest.Options{TLS: transport.TLSInfo{
		CertFile: f.serverCertFile, KeyFile: f.serverKeyFile, TrustedCAFile: f.goodCA, ClientCertAuth: true}})
	return f
}

// newTLSManager connects to endpoint with short timeouts and a captured log.
func newTLSManager(t *testing.T, opts Options) (*Manager, *logBuf) {
	t.Helper()
	buf := &logBuf{}
	opts.Prefix = testPrefix(t)
	opts.Logger = newTestLogger(buf)
	opts.RetryMin, opts.RetryMax = 20*time.Millisecond, 300*time.Millisecond
	m, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	m.requestTimeout = 1500 * time.Millisecond
	t.Cleanup(func() { m.Close() })
	return m, buf
}

// waitLog waits up to d for a log line at level holding every one of want.
func waitLog(buf *logBuf, d time.Duration, level string, want ...string) (line string, ok bool) {
	deadline := time.Now().Add(d)
	for {
		for l := range strings.SplitSeq(buf.String(), "\n") {
			if !strings.Contains(l, "level="+level) {
				continue
			}
			all := true
			for _, w := range want {
				all = all && strings.Contains(l, w)
			}
			if all {
				return l, true
			}
		}
		if time.Now().After(deadline) {
			return "", false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A TLS setup that cannot work is named, with the flag to fix, at once when the manager is
// made (an Error line, before any request has had time to time out) and in the error of every
// request that fails because of it; the request error still is a deadline error underneath.
func TestTLSFailuresAreNamedWithTheFix(t *testing.T) {
	f := newTLSFixture(t)
	plain := etcdtest.Start(t)
	tlsEP := f.srv.Endpoint()
	for _, tt := range []struct {
		name     string
		opts     Options
		want     []string // in the log line and the request error; none: the request works
		isTLSErr bool
	}{
		{"the right CA and a client certificate: no TLS error", Options{Endpoints: []string{tlsEP},
			CAFile: f.goodCA, CertFile: f.clientCert, KeyFile: f.clientKey}, nil, false},
		{"etcd down: an outage, not a TLS error", Options{Endpoints: []string{"https://127.0.0.1:1"},
			CAFile: f.goodCA, CertFile: f.clientCert, KeyFile: f.clientKey}, nil, false},
		{"a CA that did not sign etcd's certificate", Options{Endpoints: []string{tlsEP},
			CAFile: f.otherCA, CertFile: f.clientCert, KeyFile: f.clientKey},
			[]string{"etcd " + tlsEP + ": TLS handshake failed", "certificate signed by unknown authority", "check --etcd-cafile"}, true},
		{"no CA file: the system's CAs do not know etcd's", Options{Endpoints: []string{tlsEP},
			CertFile: f.clientCert, KeyFile: f.clientKey},
			[]string{"certificate signed by unknown authority", "set --etcd-cafile"}, true},
		{"no client certificate", Options{Endpoints: []string{tlsEP}, CAFile: f.goodCA},
			[]string{"certificate required", "the server asked for a client certificate: set --etcd-certfile and --etcd-keyfile"}, true},
		{"a client certificate from another CA", Options{Endpoints: []string{tlsEP},
			CAFile: f.goodCA, CertFile: f.otherCert, KeyFile: f.otherKey},
			[]string{"etcd refused our client certificate: check --etcd-certfile and --etcd-keyfile"}, true},
		{"a name that etcd's certificate does not hold", Options{Endpoints: []string{strings.Replace(tlsEP, "127.0.0.1", "localhost", 1)},
			CAFile: f.goodCA, CertFile: f.clientCert, KeyFile: f.clientKey},
			[]string{"not valid for", "does not name this endpoint"}, true},
		{"https to an etcd that speaks plain http", Options{Endpoints: []string{strings.Replace(plain.Endpoint(), "http://", "https://", 1)},
			CAFile: f.goodCA},
			[]string{"if etcd serves plain http there, write it as http:// in --etcd-endpoints"}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m, buf := newTLSManager(t, tt.opts)
			if tt.want != nil {
				if line, ok := waitLog(buf, time.Second, "ERROR", tt.want...); !ok {
					t.Errorf("no Error line with %q within 1 s of New; log:\n%s", tt.want, buf.String())
				} else {
					t.Logf("logged: %s", line)
				}
			}
			_, err := m.GetConfig(ctxFor(t, 10*time.Second))
			if tt.want == nil {
				var tlsErr *TLSError
				if errors.As(err, &tlsErr) {
					t.Errorf("GetConfig: %v, a TLS error with a working TLS setup", err)
				} else if !errors.Is(err, ErrNoConfig) && !strings.Contains(tt.name, "down") {
					t.Errorf("GetConfig: %v, want the config not found (the request went through)", err)
				}
				if strings.Contains(buf.String(), "level=ERROR") {
					t.Errorf("Error lines with a working TLS setup:\n%s", buf.String())
				}
				return
			}
			if err == nil {
				t.Fatal("GetConfig succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("GetConfig error %q does not say %q", err, w)
				}
			}
			var tlsErr *TLSError
			if errors.As(err, &tlsErr) != tt.isTLSErr {
				t.Errorf("errors.As(%v, *TLSError) = %v, want %v", err, !tt.isTLSErr, tt.isTLSErr)
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("GetConfig error %v is no longer a deadline error underneath", err)
			}
		})
	}
}

// A TLS failure is retried like an outage, logged at Error level on every retry, and heals
// without a restart once the certificate is fixed: here etcd first serves a certificate from
// a CA the client does not trust, then (its files replaced, as a rotation would) one it does.
func TestTLSFailureIsRetriedAtErrorLevelAndHealsWhenFixed(t *testing.T) {
	f := newTLSFixture(t)
	prefix := testPrefix(t)
	// Put the config through a working client before breaking the server's certificate.
	good, _ := newTLSManager(t, Options{Endpoints: []string{f.srv.Endpoint()},
		CAFile: f.goodCA, CertFile: f.clientCert, KeyFile: f.clientKey})
	if _, err := good.client.Put(ctxFor(t, 10*time.Second), ConfigKey(prefix), testConfigJSON); err != nil {
		t.Fatal(err)
	}
	swap := func(certFile, keyFile string) {
		t.Helper()
		for _, p := range [][2]string{{certFile, f.serverCertFile}, {keyFile, f.serverKeyFile}} {
			b, err := os.ReadFile(p[0])
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p[1], b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	goodCert, _ := os.ReadFile(f.serverCertFile)
	goodKey, _ := os.ReadFile(f.serverKeyFile)
	savedCert, savedKey := filepath.Join(f.dir, "good-server.pem"), filepath.Join(f.dir, "good-server-key.pem")
	if err := os.WriteFile(savedCert, goodCert, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(savedKey, goodKey, 0o600); err != nil {
		t.Fatal(err)
	}
	// The "other" client certificate also serves as a server certificate (127.0.0.1).
	swap(f.otherCert, f.otherKey)

	buf := &logBuf{}
	m, err := New(Options{Endpoints: []string{f.srv.Endpoint()}, Prefix: prefix, Logger: newTestLogger(buf),
		CAFile: f.goodCA, CertFile: f.clientCert, KeyFile: f.clientKey,
		RetryMin: 20 * time.Millisecond, RetryMax: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.requestTimeout = 500 * time.Millisecond
	done := make(chan error, 1)
	go func() { _, err := m.WaitConfig(ctxFor(t, 30*time.Second)); done <- err }()

	retryLine := []string{"cannot read network config from etcd, retrying", "certificate signed by unknown authority", "check --etcd-cafile"}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && strings.Count(buf.String(), retryLine[0]) < 2 {
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("WaitConfig returned while etcd's certificate cannot be verified: %v", err)
	default:
	}
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.Contains(l, retryLine[0]) {
			for _, w := range append([]string{"level=ERROR"}, retryLine[1:]...) {
				if !strings.Contains(l, w) {
					t.Errorf("retry line does not say %q: %s", w, l)
				}
			}
		}
	}
	if n := strings.Count(buf.String(), retryLine[0]); n < 2 {
		t.Fatalf("%d retry lines in 10 s, want at least 2; log:\n%s", n, buf.String())
	}

	fixed := time.Now()
	swap(savedCert, savedKey)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("WaitConfig after the certificate was fixed: %v", err)
		}
		t.Logf("config read %v after etcd's certificate was fixed", time.Since(fixed).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatalf("WaitConfig still waiting 15 s after etcd's certificate was fixed; log:\n%s", buf.String())
	}
}
