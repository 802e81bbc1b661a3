package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/fwrules"
	"github.com/xnet-dev/xnet/ipmasq"
	"github.com/xnet-dev/xnet/macvlan"
	"github.com/xnet-dev/xnet/metrics"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// fatalError ends the daemon with exit code 1 after it started changing the host; systemd's
// Restart=always brings it back.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }
func (e *fatalError) Unwrap() error { return e.err }

// daemonRun is one run of the daemon: everything the event loop owns.
type daemonRun struct {
	o      options
	log    *slog.Logger
	mgr    *subnetmgr.Manager
	m      *metrics.Metrics
	cfg    subnetmgr.Config
	iface  backend.ExternalInterface
	chosen chosenBackend
	// hostRoutingWhy is why --host-routing resolved as it did at start (auto's reading).
	hostRoutingWhy string
	lease          subnetmgr.Lease
	peers          *peers
	// mv holds this host's macvlan range; nil when the config has no Macvlan section.
	mv      *macvlan.Manager
	ready   bool
	started time.Time
	// metricsAddr is where the endpoint really listens (--metrics-addr may say port 0).
	metricsAddr string
	// stateWrites and stateTimer rate-limit the state file's rewrites on peer changes; the
	// timer fires when a pending write is due.
	stateWrites stateThrottle
	stateTimer  *time.Timer
	// removalTimer fires when the next peer removal is due (see removalGrace).
	removalTimer *time.Timer
	// health probes the peers (health.go); nil before serve.
	health *healthProbes
	// dnet serves the xnet Docker networks (--docker-networks); nil without them.
	dnet *dockernet.Manager
	// fds is systemd: its notify socket and fd store (fdstore.go).
	fds *fdstore.Store
}

// runDaemon is `xnetd run`. Until the backend's Setup, every failure is a usageError (exit 2)
// and the host is untouched: flags, the interface, the metrics address, the config and the
// backend are all checked first.
func runDaemon(ctx context.Context, o options, reg *backend.Registry, log *slog.Logger) error {
	d := &daemonRun{o: o, log: log, started: time.Now(), stateWrites: stateThrottle{interval: stateWriteInterval}}
	d.stateTimer = time.NewTimer(time.Hour)
	d.stateTimer.Stop()
	d.removalTimer = time.NewTimer(time.Hour)
	d.removalTimer.Stop()

	var err error
	if d.fds, err = openFDStore(log); err != nil {
		return err
	}
	d.mgr, err = subnetmgr.New(subnetmgr.Options{
		Endpoints: o.etcdEndpoints,
		Prefix:    o.etcdPrefix,
		CertFile:  o.etcdCertFile,
		KeyFile:   o.etcdKeyFile,
		CAFile:    o.etcdCAFile,
		Username:  o.etcdUsername,
		Password:  o.etcdPassword,
		Logger:    log,
	})
	if err != nil {
		return usagef("etcd client (--etcd-*): %v", err)
	}
	defer d.mgr.Close()

	d.m = metrics.New(d.mgr.Stats)
	if o.metricsAddr != "" {
		ln, err := net.Listen("tcp", o.metricsAddr)
		if err != nil {
			return usagef("--metrics-addr %s: cannot listen (%v): pick a free address or set it empty to disable metrics", o.metricsAddr, err)
		}
		srv := &http.Server{Handler: d.m.Handler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		d.metricsAddr = ln.Addr().String()
		log.Info("metrics endpoint", "addr", d.metricsAddr)
	}

	d.cfg, err = d.mgr.WaitConfig(ctx)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("stopped while waiting for the network config")
			return nil
		}
		return usagef("etcd %s/config: %v: fix it with `etcdctl put %s/config '{\"Network\":\"10.244.0.0/16\"}'`", o.etcdPrefix, err, o.etcdPrefix)
	}
	log.Info("network config", "network", d.cfg.Network, "subnet_len", d.cfg.SubnetLen, "backend_type", d.cfg.Backend.Type,
		"ipv6_network", d.cfg.IPv6Network, "ipv6_only", d.cfg.IPv6Only())
	if d.cfg.IPv6Only() && o.dockerNetworks {
		return usagef("--docker-networks: xnet's Docker networks are IPv4, and the config sets EnableIPv4 false (an IPv6-only overlay): drop --docker-networks or set EnableIPv4 true")
	}
	// After the config: an IPv6-only overlay finds the interface without IPv4 (underlay).
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("open netlink socket: %w", err)
	}
	d.iface, err = underlay(nl, o.iface, o.publicIP, d.cfg.IPv6Only(), o.publicIPv6)
	nl.Close()
	if err != nil {
		return err
	}
	if d.iface.PublicIPv6, err = publicIPv6(d.cfg, d.iface.Name, o.publicIPv6); err != nil {
		return err
	}
	log.Info("underlay interface", "iface", d.iface.Name, "iface_ip", d.iface.IfaceIP, "public_ip", d.iface.PublicIP,
		"public_ipv6", d.iface.PublicIPv6, "mtu", d.iface.MTU)
	if err := d.prepareMacvlan(); err != nil {
		return err
	}

	hostRouting, hostRoutingWhy := resolveHostRouting(ctx, o.hostRouting, log)
	d.hostRoutingWhy = hostRoutingWhy
	d.chosen, err = pickBackend(reg, o.backend, backend.Options{
		Iface: d.iface, Config: d.cfg, Decap: o.decap, BPFFS: o.bpffs, StateDir: filepath.Dir(o.stateFile), Logger: log,
		HostRouting: hostRouting, HostRoutingWhy: hostRoutingWhy, Bridge: o.bridge, FlowSteering: o.flowSteering, FDStore: d.fds,
	}, log)
	if err != nil {
		return err
	}
	b := d.chosen.b
	_, gomaxprocsSet := os.LookupEnv("GOMAXPROCS")
	if p := embeddedWireGuardProcs(d.chosen.name, d.chosen.mode, runtime.GOMAXPROCS(0), gomaxprocsSet); p > 0 {
		was := runtime.GOMAXPROCS(p)
		log.Info("embedded WireGuard on two CPUs: Go runs on one, where wireguard-go's goroutine hand-offs cost less (the GOMAXPROCS variable overrides)",
			"gomaxprocs", p, "was", was)
	}
	d.m.SetBackend(d.chosen.name, d.chosen.mode, counterSource(b))
	btype, bdata, err := b.LeaseAttrs()
	if err != nil {
		b.Close(false)
		return fmt.Errorf("backend %s: lease attributes: %w", d.chosen.name, err)
	}
	attrs := subnetmgr.LeaseAttrs{PublicIP: d.iface.PublicIP, BackendType: btype, BackendData: bdata}
	if d.cfg.IPv6Only() {
		// flannel's IPv6-only lease: PublicIP is its zero IP4 and there is no BackendData; the
		// host is named by its PublicIPv6 (dualStackAttrs).
		attrs.PublicIP, attrs.BackendData = netip.IPv4Unspecified(), nil
	}
	if err := dualStackAttrs(d.cfg, d.chosen.name, b, d.iface, &attrs); err != nil {
		b.Close(false)
		return err
	}

	d.lease, err = d.acquire(ctx, attrs)
	if err != nil {
		b.Close(false)
		if ctx.Err() != nil {
			return nil
		}
		return &fatalError{err}
	}
	log.Info("lease acquired", "subnet", d.lease.Subnet, "ipv6_subnet", d.lease.IPv6Subnet, "public_ip", d.lease.PublicIP,
		"public_ipv6", d.lease.PublicIPv6, "expires", d.lease.Expiration.Format(time.RFC3339))
	d.m.SetLease(d.lease)
	if d.mv != nil {
		// Before the host changes: a full macvlan pool stops us with nothing half set up.
		// Acquire retries etcd trouble itself and logs the range it took.
		if _, err := d.mv.Acquire(ctx); err != nil {
			b.Close(false)
			if ctx.Err() != nil {
				return nil
			}
			return &fatalError{err}
		}
	}

	// From here on the host changes.
	d.dropOtherBackendsFDs()
	if err := b.Setup(ctx, d.lease, d.cfg); err != nil {
		b.Close(false)
		return &fatalError{fmt.Errorf("backend %s setup for %v: %w", d.chosen.name, d.lease.ID(), err)}
	}
	d.dropUntakenFDs()
	// Some backends decide their mode in Setup (ebpf: XDP or TC decap, by what the NIC allows).
	if mode, why := b.Mode(); mode != d.chosen.mode || why != d.chosen.modeReason {
		d.chosen.mode, d.chosen.modeReason = mode, why
		d.m.SetBackend(d.chosen.name, mode, counterSource(b))
		log.Info("backend mode", "backend", d.chosen.name, "mode", mode, "why", why)
	}
	runErr := d.serve(ctx, attrs)
	if d.peers != nil {
		// A peer whose lease is gone leaves now rather than never: the datapath outlives us.
		d.peers.removeDue(time.Now().Add(removalGrace))
	}

	_ = d.fds.Notify("STOPPING=1")
	d.m.SetReady(false)
	if err := b.Close(o.teardownOnExit); err != nil {
		log.Error("backend close", "backend", d.chosen.name, "teardown", o.teardownOnExit, "err", err)
	}
	if o.teardownOnExit {
		d.teardownHostState()
		log.Info("stopped; datapath removed (--teardown-on-exit), lease left to expire", "subnet", d.lease.ID())
	} else {
		d.writeState()
		log.Info("stopped; datapath and lease left in place for the next start", "subnet", d.lease.ID())
	}
	return runErr
}

// prepareMacvlan takes the Macvlan section (required with --macvlan) from the config WaitConfig
// read and prepares the range's manager; nothing is leased yet. A bad or (with --macvlan)
// missing section is a usage error: exit 2 before the host changes.
func (d *daemonRun) prepareMacvlan() error {
	cfg, present, err := macvlan.FromConfig(d.cfg, d.o.etcdPrefix, d.o.macvlan)
	if err != nil {
		return usagef("%v", err)
	}
	if !present {
		return nil
	}
	if !d.iface.IfaceIP.Is4() || !d.iface.PublicIP.Is4() {
		// The ranges are IPv4 addresses on the parent's IPv4 segment, and a lease is claimed
		// by the host's IPv4 PublicIP.
		return usagef("the Macvlan section leases IPv4 ranges on %s, which has no IPv4 address: give it one, or remove the Macvlan section (and --macvlan)", d.iface.Name)
	}
	hostAddrs := []netip.Addr{d.iface.IfaceIP}
	if d.iface.PublicIP != d.iface.IfaceIP {
		hostAddrs = append(hostAddrs, d.iface.PublicIP)
	}
	d.mv, err = macvlan.New(d.mgr, macvlan.Options{
		Config: cfg, PublicIP: d.iface.PublicIP, HostAddrs: hostAddrs, Parent: d.iface.Name,
		File: d.o.macvlanFile, RenewMargin: d.o.renewMargin, Logger: d.log,
	})
	if err != nil {
		return usagef("%v", err)
	}
	d.log.Info("macvlan config", "subnet", cfg.Subnet, "gateway", cfg.Gateway, "range_len", cfg.RangeLen, "name", cfg.Name, "file", d.o.macvlanFile)
	return nil
}

// acquire takes our lease at start: the subnet our subnet file records (a restart), our
// PublicIP's lease, or a free one.
func (d *daemonRun) acquire(ctx context.Context, attrs subnetmgr.LeaseAttrs) (subnetmgr.Lease, error) {
	var prev, prev6 netip.Prefix
	f, err := subnetmgr.ReadSubnetFile(d.o.subnetFile)
	if err == nil && d.cfg.IPv6Only() && d.cfg.IPv6Network.Contains(f.IPv6Subnet.Addr()) {
		// The pool of an IPv6-only overlay hands out IPv6 subnets: prev is one.
		return d.acquireSubnet(ctx, attrs, f.IPv6Subnet.Masked(), netip.Prefix{})
	}
	if err == nil && d.cfg.Network.Contains(f.Subnet.Addr()) {
		prev = f.Subnet.Masked()
		if d.cfg.EnableIPv6 && d.cfg.IPv6Network.Contains(f.IPv6Subnet.Addr()) {
			prev6 = f.IPv6Subnet.Masked()
		}
	}
	return d.acquireSubnet(ctx, attrs, prev, prev6)
}

// acquireSubnet retries AcquireLease through etcd trouble; a full range is final.
func (d *daemonRun) acquireSubnet(ctx context.Context, attrs subnetmgr.LeaseAttrs, prev, prev6 netip.Prefix) (subnetmgr.Lease, error) {
	wait := time.Second
	for {
		l, err := d.mgr.AcquireDualLease(ctx, d.cfg, attrs, prev, prev6)
		if err == nil {
			return l, nil
		}
		if errors.Is(err, subnetmgr.ErrRangeFull) && d.cfg.IPv6Only() {
			return l, fmt.Errorf("acquire a lease in %v: %w: widen IPv6Network or IPv6SubnetMin/IPv6SubnetMax in the config, or remove stale leases", d.cfg.IPv6Network, err)
		}
		if errors.Is(err, subnetmgr.ErrRangeFull) {
			return l, fmt.Errorf("acquire a lease in %v: %w: widen Network or SubnetMin/SubnetMax in the config, or remove stale leases", d.cfg.Network, err)
		}
		if ctx.Err() != nil {
			return l, ctx.Err()
		}
		d.log.Warn("acquire lease failed, retrying", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return l, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 30*time.Second)
	}
}

// serve writes the host files, programs the initial peers, reports ready, then follows lease
// events and renewals until ctx ends or something fatal happens.
func (d *daemonRun) serve(ctx context.Context, attrs subnetmgr.LeaseAttrs) error {
	b := d.chosen.b
	sf := subnetmgr.SubnetFile{Network: d.cfg.Network, Subnet: d.lease.Subnet, MTU: b.MTU(), IPMasq: d.o.ipMasq, DNS: d.dockerNetworksDNS()}
	if d.lease.IPv6Subnet.IsValid() {
		sf.IPv6Network, sf.IPv6Subnet = d.cfg.IPv6Network, d.lease.IPv6Subnet
	}
	if err := subnetmgr.WriteSubnetFile(d.o.subnetFile, sf); err != nil {
		return &fatalError{fmt.Errorf("--subnet-file: %w", err)}
	}
	if err := subnetmgr.WriteDockerOpts(d.o.dockerOptsFile, sf); err != nil {
		return &fatalError{fmt.Errorf("--docker-opts-file: %w", err)}
	}
	d.log.Info("wrote subnet and docker files", "subnet_file", d.o.subnetFile, "docker_opts_file", d.o.dockerOptsFile, "mtu", sf.MTU)
	if err := d.setupMasq(); err != nil {
		return &fatalError{err}
	}
	rules := fwrules.NewMonitor(d.log)
	if err := d.startForwardRules(ctx, rules); err != nil {
		return &fatalError{err}
	}

	d.peers = newPeers(b, d.lease, d.cfg, d.log, d.m)
	d.health = d.startHealth(ctx)
	defer d.health.close()
	d.writeState()

	loopCtx, stop := context.WithCancel(ctx)
	defer stop()
	events := make(chan []subnetmgr.Event, 16)
	watchDone := make(chan error, 1)
	go func() { watchDone <- d.mgr.WatchLeases(loopCtx, events) }()

	leases := make(chan subnetmgr.Lease, 4)
	keep := d.startKeeper(loopCtx, attrs, leases)
	defer func() { keep.stop() }()
	mvLeases, mvDone := d.keepMacvlan(loopCtx)
	hostRouting := d.watchHostRouting(rules, b)
	stopRules := followRules(ctx, rules)
	defer stopRules()
	stopDockerNetworks, dockerNetworksChanged, err := d.startDockerNetworks(loopCtx)
	if err != nil {
		return &fatalError{err}
	}
	defer func() { stopDockerNetworks(d.o.teardownOnExit) }()

	for {
		select {
		case <-ctx.Done():
			d.log.Info("stopping", "cause", context.Cause(ctx))
			return nil
		case batch := <-events:
			start := time.Now()
			ownRemoved := d.peers.apply(batch)
			d.m.ObserveReconcile(time.Since(start))
			d.health.setPeers(d.peers.list())
			d.armRemovals(d.peers.nextRemoval())
			if ownRemoved {
				// Someone deleted our key (an operator, a restored backup). flannel exits and
				// lets the restart take a lease again; taking it back here is the same without
				// the restart. The keeper stops first so two acquisitions never race.
				keep.stop()
				d.log.Warn("our lease was deleted from etcd; taking it back", "subnet", d.lease.ID())
				prev, prev6 := d.lease.Subnet, d.lease.IPv6Subnet
				if d.cfg.IPv6Only() {
					prev, prev6 = d.lease.IPv6Subnet, netip.Prefix{}
				}
				l, err := d.acquireSubnet(ctx, attrs, prev, prev6)
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return &fatalError{err}
				}
				if l.Subnet.Masked() != d.lease.Subnet.Masked() || l.IPv6Subnet != d.lease.IPv6Subnet {
					return &fatalError{fmt.Errorf("our lease %v was deleted and taken by another host meanwhile (we got %v): the datapath and Docker's --bip are for the old subnet; exiting so the restart reconfigures everything", d.lease.ID(), l.ID())}
				}
				d.lease, d.peers.own = l, l
				d.m.SetLease(l)
				d.log.Info("lease taken back", "subnet", l.ID(), "expires", l.Expiration.Format(time.RFC3339))
				keep = d.startKeeper(loopCtx, attrs, leases)
				d.writeState()
			}
			if !d.ready {
				// The first batch is etcd's whole list (WatchLeases): now a backend whose
				// datapath outlived us can drop peers whose leases went while we were down.
				d.prunePeers()
			}
			d.m.SetPeers(d.peers.counts())
			d.m.SetConflicts(d.peers.conflictCounts())
			conflictsChanged := d.peers.takeConflictsChanged()
			if !d.ready {
				d.ready = true
				d.m.SetReady(true)
				_, applied, refused := d.peers.counts()
				d.log.Info("datapath programmed with the initial peers; ready", "peers", applied, "refused", refused, "took", time.Since(d.started).Round(time.Millisecond))
				_ = d.fds.Notify(fmt.Sprintf("READY=1\nSTATUS=ready: %v via %s, %d peers", d.lease.ID(), d.chosen.name, applied))
				d.writeState()
			} else if conflictsChanged {
				d.writeState()
			} else {
				d.stateChanged()
			}
		case l := <-leases:
			if l.Subnet.Masked() != d.lease.Subnet.Masked() || l.IPv6Subnet != d.lease.IPv6Subnet {
				return &fatalError{fmt.Errorf("our lease moved from %v %v to %v %v: the datapath and Docker's --bip/--fixed-cidr-v6 are for the old subnets; exiting so the restart reconfigures everything",
					d.lease.Subnet, d.lease.IPv6Subnet, l.Subnet, l.IPv6Subnet)}
			}
			d.lease = l
			d.peers.own = l
			d.m.SetLease(l)
			d.log.Info("lease renewed", "subnet", l.ID(), "expires", l.Expiration.Format(time.RFC3339))
			d.writeState()
		case c := <-hostRouting:
			d.applyHostRouting(b, c)
		case <-d.stateTimer.C:
			d.writeState()
		case <-dockerNetworksChanged:
			d.stateChanged()
		case <-d.removalTimer.C:
			removed := d.peers.removeDue(time.Now())
			d.armRemovals(d.peers.nextRemoval())
			if removed > 0 {
				d.m.SetPeers(d.peers.counts())
				d.health.setPeers(d.peers.list())
				d.stateChanged()
			}
		case l := <-mvLeases:
			// Manager.Keep already rewrote the options file and logged a moved range.
			d.log.Info("macvlan range renewed", "range", l.Subnet, "expires", l.Expiration.Format(time.RFC3339))
			d.writeState()
		case err := <-mvDone:
			if ctx.Err() != nil {
				return nil
			}
			return &fatalError{fmt.Errorf("keeping our macvlan range %v stopped: %w", d.mv.Lease().Subnet, err)}
		case err := <-watchDone:
			if ctx.Err() != nil {
				return nil
			}
			return &fatalError{fmt.Errorf("watching leases stopped: %w", err)}
		case err := <-keep.done:
			if ctx.Err() != nil {
				return nil
			}
			return &fatalError{fmt.Errorf("keeping our lease %v stopped: %w", d.lease.Subnet, err)}
		}
	}
}

// keepMacvlan renews our macvlan range in the background (nil channels without one): each
// new version on leases, and why it stopped on done (never when ctx ended first).
func (d *daemonRun) keepMacvlan(ctx context.Context) (leases <-chan subnetmgr.Lease, done <-chan error) {
	if d.mv == nil {
		return nil, nil
	}
	l := make(chan subnetmgr.Lease, 4)
	e := make(chan error, 1)
	go func() {
		err := d.mv.Keep(ctx, func(nl subnetmgr.Lease) {
			select {
			case l <- nl:
			case <-ctx.Done():
			}
		})
		if ctx.Err() == nil {
			e <- err
		}
	}()
	return l, e
}

// keeper is one KeepLease goroutine.
type keeper struct {
	done   chan error
	cancel context.CancelFunc
	exited chan struct{}
}

// startKeeper renews d.lease in the background, sending each new version to leases.
func (d *daemonRun) startKeeper(ctx context.Context, attrs subnetmgr.LeaseAttrs, leases chan<- subnetmgr.Lease) *keeper {
	ctx, cancel := context.WithCancel(ctx)
	k := &keeper{done: make(chan error, 1), cancel: cancel, exited: make(chan struct{})}
	lease := d.lease
	go func() {
		defer close(k.exited)
		err := d.mgr.KeepLease(ctx, d.cfg, attrs, lease, d.o.renewMargin, func(l subnetmgr.Lease) {
			select {
			case leases <- l:
			case <-ctx.Done():
			}
		})
		if ctx.Err() == nil {
			k.done <- err
		}
	}()
	return k
}

// stop ends the keeper and waits for it; its done channel then never fires.
func (k *keeper) stop() {
	k.cancel()
	<-k.exited
}

// setupMasq installs the masquerade table with --ip-masq, and removes a table a previous run
// left when --ip-masq is now off.
func (d *daemonRun) setupMasq() error {
	conn, err := nftables.New()
	if err != nil {
		if d.o.ipMasq {
			return fmt.Errorf("--ip-masq: open nftables: %w", err)
		}
		return nil
	}
	if d.o.ipMasq {
		if d.lease.Subnet.IsValid() {
			if err := ipmasq.Setup(conn, ipmasq.DefaultTable, d.cfg.Network, d.lease.Subnet); err != nil {
				return fmt.Errorf("--ip-masq: %w", err)
			}
			d.log.Info("masquerading traffic leaving the overlay", "table", "ip "+ipmasq.DefaultTable, "network", d.cfg.Network)
		} else if err := ipmasq.Teardown(conn, ipmasq.DefaultTable); err != nil {
			// IPv6 only: a table from an IPv4 run before would masquerade under old rules.
			d.log.Debug("no IPv4 masquerade table to remove", "err", err)
		}
		if !d.lease.IPv6Subnet.IsValid() {
			// A table from a dual-stack run before would masquerade under old rules.
			_ = ipmasq.TeardownIPv6(conn, ipmasq.DefaultTable)
			return nil
		}
		if err := ipmasq.SetupIPv6(conn, ipmasq.DefaultTable, d.cfg.IPv6Network, d.lease.IPv6Subnet); err != nil {
			return fmt.Errorf("--ip-masq: IPv6: %w", err)
		}
		d.log.Info("masquerading IPv6 traffic leaving the overlay", "table", "ip6 "+ipmasq.DefaultTable, "network", d.cfg.IPv6Network)
		return nil
	}
	if err := ipmasq.Teardown(conn, ipmasq.DefaultTable); err != nil {
		d.log.Debug("no masquerade table to remove", "err", err)
	}
	if err := ipmasq.TeardownIPv6(conn, ipmasq.DefaultTable); err != nil {
		d.log.Debug("no IPv6 masquerade table to remove", "err", err)
	}
	return nil
}

// prunePeers hands the backend, once the initial lease list is applied, every peer lease we
// know, so it removes what it still holds for leases that went away while xnetd was down
// (backend.PeerPruner; a backend without per-peer state that outlives us does not implement
// it). A failure is logged, not fatal: the peers we know are all programmed.
func (d *daemonRun) prunePeers() {
	pr, ok := d.chosen.b.(backend.PeerPruner)
	if !ok {
		d.log.Debug("backend keeps no peers across restarts; nothing to prune", "backend", d.chosen.name)
		return
	}
	keep := d.peers.leases()
	start := time.Now()
	if err := pr.PrunePeers(keep); err != nil {
		d.log.Warn("pruning peers whose leases went away while xnetd was down failed; they stay in the datapath until a restart", "backend", d.chosen.name, "keep", len(keep), "err", err)
		return
	}
	d.log.Debug("pruned peers whose leases went away while xnetd was down", "backend", d.chosen.name, "keep", len(keep), "took", time.Since(start).Round(time.Microsecond))
}

// armRemovals sets the removal timer for next (stops it when next is zero).
func (d *daemonRun) armRemovals(next time.Time) {
	d.removalTimer.Stop()
	if !next.IsZero() {
		d.removalTimer.Reset(max(time.Until(next), 0))
	}
}

// stateChanged is a peer change for the state file: written now or within
// stateWriteInterval (see stateThrottle).
func (d *daemonRun) stateChanged() {
	writeNow, arm := d.stateWrites.changed(time.Now())
	switch {
	case writeNow:
		d.writeState()
	case arm > 0:
		d.stateTimer.Reset(arm)
	}
}

// writeState records the daemon's view for `xnetd status` now, and so ends any pending
// rate-limited write. A failure is logged, not fatal: the datapath matters more than the
// report.
func (d *daemonRun) writeState() {
	now := time.Now()
	d.stateWrites.written(now)
	d.stateTimer.Stop()
	s := state{
		PID:             os.Getpid(),
		Version:         version(),
		StartedAt:       d.started,
		UpdatedAt:       now,
		Ready:           d.ready,
		Backend:         d.chosen.name,
		Mode:            d.chosen.mode,
		ModeReason:      d.chosen.modeReason,
		SkippedBackends: d.chosen.skipped,
		Iface:           d.iface.Name,
		PublicIP:        d.iface.PublicIP,
		Config:          d.cfg,
		Lease:           leaseStateOf(d.lease),
		IPMasq:          d.o.ipMasq,
		MetricsAddr:     d.metricsAddr,
		SubnetFile:      d.o.subnetFile,
		DockerOptsFile:  d.o.dockerOptsFile,
		BPFFS:           d.o.bpffs,
	}
	if d.mv != nil {
		mv := d.mv.Status()
		s.Macvlan = &mv
	}
	if d.peers != nil {
		s.Peers = d.peers.list()
		s.Conflicts = d.peers.conflictList()
	}
	s.DockerNetworks = d.dockerNetworksStatus()
	if err := writeState(d.o.stateFile, s); err != nil {
		d.log.Warn("state file not updated", "state_file", d.o.stateFile, "err", err)
	}
}

// teardownHostState removes what serve created besides the backend's datapath.
func (d *daemonRun) teardownHostState() {
	d.removeForwardRules()
	if d.o.ipMasq {
		if conn, err := nftables.New(); err == nil {
			if err := ipmasq.Teardown(conn, ipmasq.DefaultTable); err != nil {
				d.log.Warn("remove masquerade table", "err", err)
			}
			if err := ipmasq.TeardownIPv6(conn, ipmasq.DefaultTable); err != nil {
				d.log.Warn("remove IPv6 masquerade table", "err", err)
			}
		}
	}
	files := []string{d.o.subnetFile, d.o.dockerOptsFile, d.o.stateFile}
	if d.mv != nil {
		files = append(files, d.o.macvlanFile)
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("remove file", "file", f, "err", err)
		}
	}
}
