package subnetmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// DefaultPrefix is flannel's default etcd prefix.
const DefaultPrefix = "/coreos.com/network"

// DefaultLeaseTTL is the TTL of the etcd lease behind every subnet key.
const DefaultLeaseTTL = 24 * time.Hour

// DefaultEndpoint is used when Options.Endpoints is empty (flannel's default).
const DefaultEndpoint = "http://127.0.0.1:2379"

// Retry backoff defaults: exponential from retryMin up to retryMax, jittered.
const (
	defaultRetryMin     = 200 * time.Millisecond
	defaultRetryMax     = 10 * time.Second
	defaultDialTimeout  = 5 * time.Second
	defaultRequestLimit = 10 * time.Second // one etcd request, so a hung member cannot stall us
)

// Silent-member detection (see the design history in watch.go).
const (
	// defaultWatchIdle is how long the lease watch may be quiet before we ask etcd for a
	// progress response on it: one small request per this much quiet, per host.
	defaultWatchIdle = 2 * time.Second
	// defaultWatchReply is how long an answer to that request may take before the watch is
	// declared dead. A healthy member answers in milliseconds. It is shorter than
	// keepAliveTimeout so that, for a powered-off member, we notice (and say so) before the
	// kernel ends the connection and clientv3 quietly resumes the watch elsewhere.
	defaultWatchReply = 1500 * time.Millisecond
	// quickListTimeout bounds the first list after a silent watch (see resync): a list of
	// 5,000 leases took 0.07 s on the 2-core test VM.
	quickListTimeout = time.Second
	// keepAliveTimeout is gRPC's ping timeout and, through TCP_USER_TIMEOUT, how long bytes
	// to etcd may stay unacknowledged before the kernel ends the connection. 5 s let a
	// renewal that went to a powered-off member hang that long; every watch progress
	// request and every request arms it, so a dead connection is gone this soon after
	// the first one. A link that loses every retransmission for 2 s is down anyway.
	keepAliveTimeout = 2 * time.Second
)

// ErrRangeFull is returned (wrapped) when every subnet in [SubnetMin, SubnetMax] is taken.
var ErrRangeFull = errors.New("no free subnet left in the range")

// ErrNoConfig is returned (wrapped) by GetConfig when <prefix>/config does not exist.
var ErrNoConfig = errors.New("network config not found")

// Options configure the etcd connection.
type Options struct {
	Endpoints                 []string
	Prefix                    string // default DefaultPrefix
	CertFile, KeyFile, CAFile string
	Username, Password        string
	DialTimeout               time.Duration // default 5s
	LeaseTTL                  time.Duration // default DefaultLeaseTTL; tests shorten it
	Logger                    *slog.Logger
	// RetryMin and RetryMax bound the jittered exponential backoff between retries of a
	// failed etcd request (defaults 200ms and 10s); tests shorten them.
	RetryMin, RetryMax time.Duration
}

// Stats are counters for metrics.
type Stats struct {
	EtcdErrors   uint64 // failed etcd requests
	WatchResyncs uint64 // full re-lists after a compacted, broken or silent watch
	WatchProbes  uint64 // progress requests sent on a quiet watch (one per 2 s of quiet)
}

// Manager talks to etcd for one host. It is safe for concurrent use.
type Manager struct {
	client   *clientv3.Client
	prefix   string
	ttl      time.Duration
	log      *slog.Logger
	retryMin time.Duration
	retryMax time.Duration
	// requestTimeout bounds each etcd request; tests shorten it.
	requestTimeout time.Duration
	// watchIdle and watchReply time the silent-watch check (defaultWatchIdle/Reply).
	watchIdle, watchReply time.Duration

	etcdErrors   atomic.Uint64
	watchResyncs atomic.Uint64
	watchProbes  atomic.Uint64

	// beforeWatch, when set by a test, runs between the list and the watch that starts at
	// its revision: the moment a compaction hurts most.
	beforeWatch func(rev int64)

	// prober names TLS handshake failures behind timed-out requests; nil without TLS.
	prober *tlsProber
	// stop ends the start-up TLS probe; bg waits for it in Close.
	stop    context.CancelFunc
	stopped context.Context
	bg      sync.WaitGroup
}

// New connects to etcd (lazily: it does not fail when etcd is down).
func New(opts Options) (*Manager, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if !strings.HasPrefix(opts.Prefix, "/") {
		return nil, fmt.Errorf("etcd prefix %q: must start with /, e.g. %s", opts.Prefix, DefaultPrefix)
	}
	if len(opts.Endpoints) == 0 {
		opts.Endpoints = []string{DefaultEndpoint}
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = defaultDialTimeout
	}
	if opts.LeaseTTL <= 0 {
		opts.LeaseTTL = DefaultLeaseTTL
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = defaultRetryMin
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = defaultRetryMax
	}
	if opts.RetryMax < opts.RetryMin {
		opts.RetryMax = opts.RetryMin
	}
	cc := clientv3.Config{
		Endpoints:   opts.Endpoints,
		DialTimeout: opts.DialTimeout,
		Username:    opts.Username,
		Password:    opts.Password,
		// The client's own zap logs would bypass slog; we log every failure we act on.
		Logger: zap.NewNop(),
		// Without keepalives a silently dead TCP connection would stall the watch for
		// the kernel's retransmission timeout (minutes). 10 s is the shortest ping
		// interval gRPC allows; the watch's progress requests notice sooner (watch.go).
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: keepAliveTimeout,
		// gRPC's own reconnect backoff grows to 2 minutes: after an etcd outage the client
		// would stay away long after etcd is back, and a short-TTL lease would run out.
		// Cap it at our retry backoff.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{BaseDelay: opts.RetryMin, Multiplier: 1.6, Jitter: 0.2,
				MaxDelay: opts.RetryMax},
			MinConnectTimeout: opts.DialTimeout,
		})},
	}
	if opts.CertFile != "" || opts.KeyFile != "" || opts.CAFile != "" {
		if (opts.CertFile == "") != (opts.KeyFile == "") {
			return nil, fmt.Errorf("etcd TLS: certfile %q and keyfile %q must be given together", opts.CertFile, opts.KeyFile)
		}
		tlsInfo := transport.TLSInfo{CertFile: opts.CertFile, KeyFile: opts.KeyFile, TrustedCAFile: opts.CAFile}
		tlsCfg, err := tlsInfo.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd TLS (cert %q, key %q, CA %q): %w", opts.CertFile, opts.KeyFile, opts.CAFile, err)
		}
		cc.TLS = tlsCfg
	}
	client, err := clientv3.New(cc)
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(opts.Endpoints, ","), err)
	}
	m := &Manager{
		client:         client,
		prefix:         strings.TrimSuffix(opts.Prefix, "/"),
		ttl:            opts.LeaseTTL,
		log:            opts.Logger,
		retryMin:       opts.RetryMin,
		retryMax:       opts.RetryMax,
		requestTimeout: defaultRequestLimit,
		watchIdle:      defaultWatchIdle,
		watchReply:     defaultWatchReply,
		prober: newTLSProber(opts.Endpoints, cc.TLS, opts.CertFile != "", opts.CAFile != "",
			min(opts.DialTimeout, maxProbeTime)),
	}
	m.stopped, m.stop = context.WithCancel(context.Background())
	if m.prober != nil {
		// Say at once when the certificates do not work, rather than after the first
		// request's timeout; requests that fail later say it again.
		m.bg.Go(func() {
			for _, err := range m.prober.probe(m.stopped) {
				m.log.Error("etcd TLS handshake failed; no etcd request can succeed until this is fixed", "err", err)
			}
		})
	}
	return m, nil
}

// maxProbeTime bounds one TLS probe of an endpoint: a blackholed endpoint must not add a
// whole dial timeout to every failing request.
const maxProbeTime = 2 * time.Second

// Close releases the etcd client. It does not revoke our lease.
func (m *Manager) Close() error {
	m.stop()
	m.bg.Wait()
	return m.client.Close()
}

// Stats returns the counters so far.
func (m *Manager) Stats() Stats {
	return Stats{EtcdErrors: m.etcdErrors.Load(), WatchResyncs: m.watchResyncs.Load(), WatchProbes: m.watchProbes.Load()}
}

// Prefix is the etcd prefix this manager works under.
func (m *Manager) Prefix() string { return m.prefix }

// etcdErr counts a failed etcd request and wraps it with what we were doing, and with the
// TLS handshake failures that explain it, if any.
func (m *Manager) etcdErr(err error, format string, args ...any) error {
	m.etcdErrors.Add(1)
	return fmt.Errorf(format+": %w", append(args, m.diagnose(err))...)
}

// diagnose adds to a request that timed out waiting for a connection the TLS handshake
// failures of the endpoints (see tlsprobe.go).
func (m *Manager) diagnose(err error) error {
	if m.prober == nil || !mayBeTLS(err) {
		return err
	}
	if failed := m.prober.probe(m.stopped); len(failed) > 0 {
		return &diagnosedError{tls: failed, cause: err}
	}
	return err
}

// retryLevel is the level of a "failed, retrying" log line: Error for a TLS handshake
// failure (a configuration problem someone must fix), Warn for anything an etcd that comes
// back would heal.
func retryLevel(err error) slog.Level {
	if tlsErr := (*TLSError)(nil); errors.As(err, &tlsErr) {
		return slog.LevelError
	}
	return slog.LevelWarn
}

// reqCtx bounds one etcd request, so that a request to an unreachable etcd fails (and is
// logged, counted and retried) instead of hanging.
func (m *Manager) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, m.requestTimeout)
}

// backoff is a jittered exponential delay between retries.
type backoff struct {
	min, max, cur time.Duration
}

func (m *Manager) newBackoff() *backoff { return &backoff{min: m.retryMin, max: m.retryMax} }

// next returns the delay before the next try: doubling from min up to max, each one drawn
// in [d/2, d] so that many hosts retrying after one etcd outage do not retry in lockstep.
func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	half := b.cur / 2
	return half + rand.N(half+1)
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// GetConfig reads the config once: ErrNoConfig when missing, a *ConfigError naming the
// field when invalid, another error when etcd cannot be reached.
func (m *Manager) GetConfig(ctx context.Context) (Config, error) {
	data, err := m.GetConfigJSON(ctx)
	if err != nil {
		return Config{}, err
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", ConfigKey(m.prefix), err)
	}
	cfg.Raw = string(data)
	return cfg, nil
}

// GetConfigJSON reads <prefix>/config as stored, for the sections other packages own (the
// "Macvlan" section is package macvlan's): ErrNoConfig when missing, another error when etcd
// cannot be reached.
func (m *Manager) GetConfigJSON(ctx context.Context) ([]byte, error) {
	key := ConfigKey(m.prefix)
	rctx, cancel := m.reqCtx(ctx)
	defer cancel()
	resp, err := m.client.Get(rctx, key)
	if err != nil {
		return nil, m.etcdErr(err, "read %s", key)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("%s: %w", key, ErrNoConfig)
	}
	return resp.Kvs[0].Value, nil
}

// WaitConfig retries GetConfig while the config is missing or etcd is unreachable, logging
// each wait, until ctx ends. An invalid config is returned as an error at once.
func (m *Manager) WaitConfig(ctx context.Context) (Config, error) {
	bo := m.newBackoff()
	for {
		cfg, err := m.GetConfig(ctx)
		var cfgErr *ConfigError
		switch {
		case err == nil:
			return cfg, nil
		case errors.As(err, &cfgErr):
			return Config{}, err
		case ctx.Err() != nil:
			return Config{}, fmt.Errorf("waiting for network config %s: %w", ConfigKey(m.prefix), ctx.Err())
		}
		d := bo.next()
		if errors.Is(err, ErrNoConfig) {
			m.log.Warn("network config not found in etcd, waiting for it; write it with "+
				`etcdctl put `+ConfigKey(m.prefix)+` '{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}'`,
				"key", ConfigKey(m.prefix), "retry_in", d.Round(time.Millisecond))
		} else {
			m.log.Log(ctx, retryLevel(err), "cannot read network config from etcd, retrying", "key", ConfigKey(m.prefix),
				"err", err, "retry_in", d.Round(time.Millisecond))
		}
		if err := sleep(ctx, d); err != nil {
			return Config{}, fmt.Errorf("waiting for network config %s: %w", ConfigKey(m.prefix), err)
		}
	}
}
