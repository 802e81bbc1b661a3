package subnetmgr

// Why a TLS probe: the etcd client waits for a ready gRPC connection until the request's
// deadline and then reports only "context deadline exceeded"; the handshake error that kept
// the connection from becoming ready (an unknown CA, a missing client certificate) is dropped
// on the way (clientv3 turns a DeadlineExceeded status into the bare context error), and
// grpc.WithReturnConnectionError, which would keep it, is deprecated, implies a blocking dial
// at New (a down etcd would then fail start-up) and reports only the first dial. A
// misconfigured certificate then looks like an etcd outage. So when a
// request fails that way, or once at New, the manager dials each TLS endpoint itself with the
// same tls.Config and names what the handshake says, with the flag to fix. A TLS failure is
// still retried like an outage (a certificate or CA being rotated heals without a restart),
// but logged at Error level.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TLSError is a failed TLS handshake with one etcd endpoint: a configuration problem, not an
// outage. It is found by probing the endpoint after a request timed out, and is wrapped into
// that request's error (errors.As finds it).
type TLSError struct {
	Endpoint string // as given in Options.Endpoints
	Err      error  // what crypto/tls said
	Fix      string // what to check, naming xnetd's flags
}

func (e *TLSError) Error() string {
	return fmt.Sprintf("etcd %s: TLS handshake failed: %v: %s", e.Endpoint, e.Err, e.Fix)
}

func (e *TLSError) Unwrap() error { return e.Err }

// diagnosedError is a failed request together with the TLS failures that explain it. Both
// stay reachable: errors.Is(err, context.DeadlineExceeded) and errors.As(err, **TLSError).
type diagnosedError struct {
	tls   []error // *TLSError, one per failing endpoint
	cause error
}

func (e *diagnosedError) Error() string {
	parts := make([]string, len(e.tls))
	for i, t := range e.tls {
		parts[i] = t.Error()
	}
	return fmt.Sprintf("%s (request failed: %v)", strings.Join(parts, "; "), e.cause)
}

func (e *diagnosedError) Unwrap() []error { return append(append([]error{}, e.tls...), e.cause) }

// tlsProber finds TLS handshake failures with the endpoints a client speaks TLS to.
type tlsProber struct {
	endpoints  []string // the ones spoken to over TLS
	cfg        *tls.Config
	clientCert bool // a client certificate is configured
	caFile     bool // a CA file is configured (else the system's roots)
	timeout    time.Duration

	// One probe at a time; callers that fail together share its result.
	mu   sync.Mutex
	at   time.Time
	last []error
}

// probeReuse is how long one probe's result answers later failures: requests that fail
// together (the watch's list, a renewal, the config read) cost one round of dials.
const probeReuse = time.Second

// newTLSProber returns nil when no endpoint is spoken to over TLS. As the etcd client does,
// an https:// endpoint is TLS (with the system's roots when no CA is configured), an
// http:// one is not, and one without a scheme is TLS when a tls.Config is given.
func newTLSProber(endpoints []string, cfg *tls.Config, clientCert, caFile bool, timeout time.Duration) *tlsProber {
	p := &tlsProber{cfg: cfg, clientCert: clientCert, caFile: caFile, timeout: timeout}
	for _, ep := range endpoints {
		scheme, _, ok := strings.Cut(ep, "://")
		switch {
		case !ok && cfg != nil, ok && scheme == "https":
			p.endpoints = append(p.endpoints, ep)
		}
	}
	if len(p.endpoints) == 0 {
		return nil
	}
	if p.cfg == nil {
		p.cfg = &tls.Config{}
	}
	return p
}

// mayBeTLS says whether a failed request looks like one a handshake failure would cause:
// the client waited for a ready connection until the deadline, or found none.
func mayBeTLS(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

// probe dials every TLS endpoint at once and returns the handshake failures (nil when every
// handshake succeeds or fails for a reason that is not TLS, such as a refused connection).
func (p *tlsProber) probe(ctx context.Context) []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.at) < probeReuse {
		return p.last
	}
	errs := make([]error, len(p.endpoints))
	var wg sync.WaitGroup
	for i, ep := range p.endpoints {
		wg.Go(func() { errs[i] = p.probeOne(ctx, ep) })
	}
	wg.Wait()
	var failed []error
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	p.at, p.last = time.Now(), failed
	return failed
}

// probeOne handshakes with one endpoint as gRPC would (server name from the endpoint, ALPN
// h2). In TLS 1.3 the server checks our certificate after our side of the handshake is done,
// so a refused or missing client certificate shows only as an alert on the first read: wait
// briefly for one. A server that accepted us says nothing until we speak.
func (p *tlsProber) probeOne(ctx context.Context, endpoint string) error {
	hostport := endpoint
	if u, err := url.Parse(endpoint); err == nil && u.Host != "" {
		hostport = u.Host
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil // the client will report a malformed endpoint itself
	}
	cfg := p.cfg.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	cfg.NextProtos = []string{"h2"}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", hostport)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		// Hung up on our ClientHello without a word: etcd's plain-http listener does that.
		return &TLSError{Endpoint: endpoint, Err: err,
			Fix: "the endpoint closed the connection during the handshake: if etcd serves plain http there, write it as http:// in --etcd-endpoints"}
	}
	if err == nil {
		deadline := time.Now().Add(min(p.timeout, 500*time.Millisecond))
		if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
			deadline = dl
		}
		_ = conn.SetReadDeadline(deadline)
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if fix := p.fixFor(err); fix != "" {
		return &TLSError{Endpoint: endpoint, Err: err, Fix: fix}
	}
	return nil
}

// fixFor names what to check for a handshake error, or "" when err is not about TLS.
func (p *tlsProber) fixFor(err error) string {
	if err == nil {
		return ""
	}
	var (
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		record    tls.RecordHeaderError
		verify    *tls.CertificateVerificationError
		op        *net.OpError
	)
	switch {
	case errors.As(err, &unknownCA):
		if !p.caFile {
			return "set --etcd-cafile to the CA that signed etcd's server certificate (without it the system's CAs are used)"
		}
		return "check --etcd-cafile: it must hold the CA that signed etcd's server certificate"
	case errors.As(err, &hostname):
		return "etcd's server certificate does not name this endpoint: list etcd in --etcd-endpoints by a name or address in its certificate, or reissue the certificate"
	case errors.As(err, &invalid):
		return "etcd's server certificate is not valid (expired, not yet valid or not for servers): reissue it"
	case errors.As(err, &verify):
		return "etcd's server certificate does not verify: check --etcd-cafile"
	case errors.As(err, &record):
		return "the endpoint does not speak TLS: if etcd serves plain http there, write it as http:// in --etcd-endpoints"
	case errors.As(err, &op) && op.Op == "remote error":
		// The server sent an alert: it refused our client certificate, or we sent none.
		if !p.clientCert {
			return "the server asked for a client certificate: set --etcd-certfile and --etcd-keyfile"
		}
		return "etcd refused our client certificate: check --etcd-certfile and --etcd-keyfile (a certificate for client auth, signed by a CA in etcd's --trusted-ca-file, not expired)"
	}
	return ""
}
