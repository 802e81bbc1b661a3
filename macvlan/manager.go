package macvlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// FromConfig takes the "Macvlan" section of the network config the overlay already read
// (net.Raw, <prefix>/config as stored), so etcd is asked once. With required (xnetd's
// --macvlan) a missing section is an error naming the fix; without, present says whether the
// host should lease a range at all.
func FromConfig(net subnetmgr.Config, prefix string, required bool) (cfg Config, present bool, err error) {
	cfg, present, err = ParseConfig([]byte(net.Raw))
	if err != nil {
		return Config{}, present, fmt.Errorf("%s: %w", subnetmgr.ConfigKey(prefix), err)
	}
	if required && !present {
		return Config{}, false, fmt.Errorf("%s has no Macvlan section, which --macvlan needs: add one such as "+
			`"Macvlan":{"Subnet":"10.0.0.0/24","Gateway":"10.0.0.254","RangeLen":28}: %w`,
			subnetmgr.ConfigKey(prefix), ErrNoSection)
	}
	return cfg, present, nil
}

// ErrNoSection is returned (wrapped) by FromConfig when a required Macvlan section is missing.
var ErrNoSection = errors.New("no Macvlan section in the network config")

// Options configure a Manager.
type Options struct {
	Config Config
	// PublicIP is published in the lease; a restart finds its range again by it.
	PublicIP netip.Addr
	// HostAddrs are the host's own addresses on the LAN (PublicIP, the interface's
	// address): no range this host takes covers one.
	HostAddrs []netip.Addr
	// Parent is the interface used when Config.Parent is "" (xnetd: its underlay --iface).
	Parent string
	// File is the options file (default DefaultFile).
	File string
	// RenewMargin is how long before expiry the lease is renewed (xnetd's
	// --subnet-lease-renew-margin).
	RenewMargin time.Duration
	Logger      *slog.Logger
}

// Manager holds one host's macvlan range: it leases it, writes the options file, and keeps
// the lease renewed. It is safe for concurrent use.
type Manager struct {
	sm     *subnetmgr.Manager
	o      Options
	parent string
	pool   subnetmgr.Pool
	attrs  subnetmgr.LeaseAttrs
	log    *slog.Logger

	mu    sync.Mutex
	lease subnetmgr.Lease
}

// leaseData is the BackendData of a macvlan lease: where the range is used, for operators
// reading etcd.
type leaseData struct {
	Parent string `json:"Parent"`
	Name   string `json:"Name"`
}

// New prepares a Manager; nothing is leased or written until Acquire.
func New(sm *subnetmgr.Manager, o Options) (*Manager, error) {
	if !o.PublicIP.Is4() {
		return nil, fmt.Errorf("macvlan: PublicIP %v must be an IPv4 address", o.PublicIP)
	}
	if !o.Config.Subnet.IsValid() {
		return nil, fmt.Errorf("macvlan: no config (use ParseConfig or Load)")
	}
	parent := o.Config.Parent
	if parent == "" {
		parent = o.Parent
	}
	if !ifaceName.MatchString(parent) {
		return nil, fmt.Errorf("macvlan: parent interface %q is not an interface name: set Macvlan.Parent in the config or pass the underlay interface", parent)
	}
	if o.File == "" {
		o.File = DefaultFile
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	data, err := json.Marshal(leaseData{Parent: parent, Name: o.Config.Name})
	if err != nil {
		return nil, fmt.Errorf("macvlan: lease data: %w", err)
	}
	addrs := append([]netip.Addr{o.PublicIP}, o.HostAddrs...)
	return &Manager{
		sm: sm, o: o, parent: parent, log: o.Logger,
		pool:  o.Config.Pool(addrs...),
		attrs: subnetmgr.LeaseAttrs{PublicIP: o.PublicIP, BackendType: BackendType, BackendData: data},
	}, nil
}

// Acquire leases this host's range (its previous one when it still holds it or the options
// file records it and it is free) and writes the options file. A full pool is an error
// wrapping subnetmgr.ErrRangeFull and naming the fix; etcd errors are retried until ctx ends.
func (m *Manager) Acquire(ctx context.Context) (subnetmgr.Lease, error) {
	var prev netip.Prefix
	if f, err := ReadOptionsFile(m.o.File); err == nil && f.Subnet == m.o.Config.Subnet {
		prev = f.Range
	}
	l, err := m.sm.AcquirePoolLease(ctx, m.pool, m.attrs, prev)
	if err != nil {
		return subnetmgr.Lease{}, fmt.Errorf("lease a macvlan range of %s: %w", m.o.Config.Subnet, err)
	}
	m.warnIfInsideAPeersRange(ctx, l)
	if err := WriteOptionsFile(m.o.File, m.optionsFile(l)); err != nil {
		return l, err
	}
	m.setLease(l)
	m.log.Info("macvlan range leased", "range", l.Subnet, "subnet", m.o.Config.Subnet, "gateway", m.o.Config.Gateway,
		"parent", m.parent, "file", m.o.File, "expires", l.Expiration.Format(time.RFC3339))
	return l, nil
}

// warnIfInsideAPeersRange reports our own address inside a range another host holds: that
// host's containers may take our address. It cannot be fixed from here (the range is
// theirs), so it is an error in the log with the fix, not a failure.
func (m *Manager) warnIfInsideAPeersRange(ctx context.Context, ours subnetmgr.Lease) {
	leases, _, err := m.sm.ListPoolLeases(ctx, Dir)
	if err != nil {
		m.log.Debug("cannot list macvlan ranges to check our address against them", "err", err)
		return
	}
	for _, l := range leases {
		if l.Subnet == ours.Subnet {
			continue
		}
		for _, a := range append([]netip.Addr{m.o.PublicIP}, m.o.HostAddrs...) {
			if l.Subnet.Contains(a) {
				m.log.Error("this host's address is inside the macvlan range of another host: its containers may take our address; "+
					"move Macvlan.RangeMin/RangeMax off the hosts' addresses and delete that range's key so its host leases another",
					"address", a, "range", l.Subnet, "holder", l.PublicIP, "key", subnetmgr.PoolKey(m.sm.Prefix(), Dir, l.Subnet))
			}
		}
	}
}

// Keep renews the lease until ctx ends (then it returns ctx.Err()), calling onChange (may be
// nil) with each new version. If the range is lost to another host, it takes a new one,
// rewrites the options file and logs an error: the Docker network must then be recreated.
func (m *Manager) Keep(ctx context.Context, onChange func(subnetmgr.Lease)) error {
	start := m.Lease()
	if !start.Subnet.IsValid() {
		return fmt.Errorf("macvlan: Keep before Acquire")
	}
	return m.sm.KeepPoolLease(ctx, m.pool, m.attrs, start, m.o.RenewMargin, func(l subnetmgr.Lease) {
		old := m.Lease()
		m.setLease(l)
		if l.Subnet != old.Subnet {
			m.log.Error("our macvlan range moved; recreate the Docker network from the options file (containers on the old range may collide)",
				"old", old.Subnet, "new", l.Subnet, "file", m.o.File)
			if err := WriteOptionsFile(m.o.File, m.optionsFile(l)); err != nil {
				m.log.Error("cannot rewrite the macvlan options file", "err", err)
			}
		}
		if onChange != nil {
			onChange(l)
		}
	})
}

func (m *Manager) optionsFile(l subnetmgr.Lease) OptionsFile {
	return OptionsFile{Name: m.o.Config.Name, Subnet: m.o.Config.Subnet, Gateway: m.o.Config.Gateway, Range: l.Subnet, Parent: m.parent}
}

func (m *Manager) setLease(l subnetmgr.Lease) {
	m.mu.Lock()
	m.lease = l
	m.mu.Unlock()
}

// Lease is the current lease (zero before Acquire).
func (m *Manager) Lease() subnetmgr.Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lease
}

// Status is what `xnetd status` shows about the macvlan range (JSON in the state file).
type Status struct {
	Name       string       `json:"name"`
	Subnet     netip.Prefix `json:"subnet"`
	Gateway    netip.Addr   `json:"gateway"`
	Range      netip.Prefix `json:"range"`
	Parent     string       `json:"parent"`
	Addresses  int          `json:"addresses"` // how many Docker can hand out from Range
	File       string       `json:"file"`
	Expiration time.Time    `json:"expiration,omitzero"`
}

// Status reports the current range (Range is invalid before Acquire).
func (m *Manager) Status() Status {
	l := m.Lease()
	s := Status{Name: m.o.Config.Name, Subnet: m.o.Config.Subnet, Gateway: m.o.Config.Gateway, Range: l.Subnet,
		Parent: m.parent, File: m.o.File, Expiration: l.Expiration}
	if l.Subnet.IsValid() {
		s.Addresses = len(m.o.Config.Addresses(l.Subnet, 0))
	}
	return s
}

// String is the one-line form for `xnetd status`:
// "10.0.0.32/28 of 10.0.0.0/24, gateway 10.0.0.254, parent eth0, network xnet-macvlan, 16 addresses".
func (s Status) String() string {
	if !s.Range.IsValid() {
		return fmt.Sprintf("no range leased yet in %s (network %s)", s.Subnet, s.Name)
	}
	return fmt.Sprintf("%s of %s, gateway %s, parent %s, network %s, %d addresses", s.Range, s.Subnet, s.Gateway, s.Parent, s.Name, s.Addresses)
}
