package subnetmgr

// PLACEHOLDER: the signatures below are the contract the daemon codes against; the subnetmgr
// work replaces these bodies (and this comment) with the real implementation.

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"time"
)

// DefaultPrefix is flannel's default etcd prefix.
const DefaultPrefix = "/coreos.com/network"

// DefaultLeaseTTL is the TTL of the etcd lease behind every subnet key.
const DefaultLeaseTTL = 24 * time.Hour

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
}

// Stats are counters for metrics.
type Stats struct {
	EtcdErrors   uint64 // failed etcd requests
	WatchResyncs uint64 // full re-lists after a compacted or broken watch
}

// Manager talks to etcd for one host.
type Manager struct{}

// New connects to etcd (lazily: it does not fail when etcd is down).
func New(opts Options) (*Manager, error) { return nil, errors.New("not implemented") }

// Close releases the etcd client. It does not revoke our lease.
func (m *Manager) Close() error { return nil }

// Stats returns the counters so far.
func (m *Manager) Stats() Stats { return Stats{} }

// ParseConfig parses and validates <prefix>/config, filling in flannel's defaults.
func ParseConfig(data []byte) (Config, error) { return Config{}, errors.New("not implemented") }

// GetConfig reads the config once: ErrNoConfig when missing, a field-naming error when invalid.
func (m *Manager) GetConfig(ctx context.Context) (Config, error) {
	return Config{}, errors.New("not implemented")
}

// WaitConfig retries GetConfig while the config is missing or etcd is unreachable, logging
// each wait, until ctx ends. An invalid config is returned as an error at once.
func (m *Manager) WaitConfig(ctx context.Context) (Config, error) {
	return Config{}, errors.New("not implemented")
}

// AcquireLease reclaims our previous lease (same PublicIP, or prev, the subnet recorded in our
// subnet file; prev may be the zero Prefix) or takes a free subnet by a create-only transaction.
func (m *Manager) AcquireLease(ctx context.Context, cfg Config, attrs LeaseAttrs, prev netip.Prefix) (Lease, error) {
	return Lease{}, errors.New("not implemented")
}

// KeepLease renews lease renewMargin before it expires, retrying with backoff through etcd
// outages, re-acquiring the same subnet if the key was lost and is still free. It calls
// onChange with each new version of the lease and returns when ctx ends.
func (m *Manager) KeepLease(ctx context.Context, cfg Config, attrs LeaseAttrs, lease Lease, renewMargin time.Duration, onChange func(Lease)) error {
	return errors.New("not implemented")
}

// ListLeases returns every well-formed lease and the revision of the list.
func (m *Manager) ListLeases(ctx context.Context) ([]Lease, int64, error) {
	return nil, 0, errors.New("not implemented")
}

// WatchLeases sends every current lease as one batch of EventAdded, then every change, until
// ctx ends. It survives compaction and broken watches by re-listing and sending only the
// differences. Malformed entries are logged and skipped.
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []Event) error {
	return errors.New("not implemented")
}

// ReadSubnetFile reads a subnet.env written by WriteSubnetFile (or by flannel).
func ReadSubnetFile(path string) (SubnetFile, error) {
	return SubnetFile{}, errors.New("not implemented")
}

// WriteSubnetFile writes subnet.env atomically (XNET_* and FLANNEL_* variables).
func WriteSubnetFile(path string, f SubnetFile) error { return errors.New("not implemented") }

// WriteDockerOpts writes the Docker options file atomically.
func WriteDockerOpts(path string, f SubnetFile) error { return errors.New("not implemented") }
