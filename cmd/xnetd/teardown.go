package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/ipmasq"
	"github.com/xnet-dev/xnet/loader"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// cmdTeardown removes what xnetd created on this host: every backend's datapath, the
// masquerade table, the bpffs pins and the files (the macvlan options file too). It does not
// touch etcd: the leases stay and expire by their TTL, as flannel's do, so a host that comes
// back within the TTL gets the same subnet and macvlan range (delete <prefix>/subnets/<subnet>
// with etcdctl to free it at once).
//
// The backend recorded in the state file is set up again on the recorded lease before Close
// (true), so it adopts what it left (a device, routes, pins) and removes all of it; every other
// built-in backend gets Close(true) alone, which removes what can be found without a lease
// (the vxlan device, say). Nothing is done while the daemon still runs.
func cmdTeardown(args []string, stdout, stderr io.Writer, lookup func(string) (string, bool)) error {
	o, err := parseRunFlags("xnetd teardown", args, stdout, lookup)
	if err != nil {
		return err
	}
	log := newLogger(stderr, o.logLevel)
	st, stErr := readState(o.stateFile)
	if stErr == nil {
		if alive, why := daemonAlive(st.PID); alive {
			return fmt.Errorf("xnetd is running (%s): stop it first (systemctl stop xnetd), then run teardown", why)
		}
	}
	sf := readSubnetFileOrZero(o.subnetFile)

	cfg := st.Config
	if !cfg.Network.IsValid() {
		cfg.Network = sf.Network
	}
	lease := subnetmgr.Lease{Subnet: st.Lease.Subnet, PublicIP: st.Lease.PublicIP}
	if cfg.IPv6Only() {
		// The state file's subnet is the lease's ID, its IPv6 subnet.
		lease = subnetmgr.Lease{IPv6Subnet: st.Lease.IPv6Subnet, PublicIP: st.Lease.PublicIP, PublicIPv6: st.Lease.PublicIPv6}
		if !lease.IPv6Subnet.IsValid() {
			lease.IPv6Subnet = sf.IPv6Subnet
		}
	} else if !lease.Subnet.IsValid() {
		lease.Subnet = sf.Subnet
	}
	ifaceName := o.iface
	if ifaceName == "" {
		ifaceName = st.Iface
	}

	var errs []error
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("open netlink socket: %w", err)
	}
	iface, err := underlay(nl, ifaceName, o.publicIP, cfg.IPv6Only(), o.publicIPv6)
	nl.Close()
	if err != nil {
		errs = append(errs, fmt.Errorf("backends not torn down: %w", err))
	} else {
		if !lease.PublicIP.IsValid() {
			lease.PublicIP = iface.PublicIP
		}
		// As at start: vxlan in an IPv6-only overlay is built only with our IPv6 underlay address.
		if iface.PublicIPv6, err = publicIPv6(cfg, iface.Name, o.publicIPv6); err != nil {
			errs = append(errs, fmt.Errorf("IPv6 underlay address: %w", err))
		}
		errs = append(errs, teardownBackends(o, iface, cfg, lease, st.Backend, stdout, log)...)
	}

	if err := teardownForwardRules(stdout); err != nil {
		errs = append(errs, err)
	}
	if err := teardownDockerNetworks(o, stdout); err != nil {
		errs = append(errs, err)
	}
	if conn, err := nftables.New(); err == nil {
		if err := ipmasq.Teardown(conn, ipmasq.DefaultTable); err != nil {
			errs = append(errs, err)
		} else {
			fmt.Fprintf(stdout, "removed nftables table ip %s (if it existed)\n", ipmasq.DefaultTable)
		}
		if err := ipmasq.TeardownIPv6(conn, ipmasq.DefaultTable); err != nil {
			errs = append(errs, err)
		} else {
			fmt.Fprintf(stdout, "removed nftables table ip6 %s (if it existed)\n", ipmasq.DefaultTable)
		}
	}
	if n, err := loader.RemovePins(o.bpffs); err != nil {
		errs = append(errs, err)
	} else if n > 0 {
		fmt.Fprintf(stdout, "removed %d pins under %s\n", n, o.bpffs)
	}
	files := []string{o.subnetFile, o.dockerOptsFile, o.stateFile}
	// The macvlan options file: the one the daemon recorded writing, and --macvlan-file when
	// --macvlan says there is one. Not the default path otherwise: a host without macvlan
	// has no such file, and another program's file of that name is not ours to remove.
	if st.Macvlan != nil && st.Macvlan.File != "" {
		files = append(files, st.Macvlan.File)
	}
	if o.macvlan && !contains(files, o.macvlanFile) {
		files = append(files, o.macvlanFile)
	}
	for _, f := range files {
		switch err := os.Remove(f); {
		case err == nil:
			fmt.Fprintf(stdout, "removed %s\n", f)
		case !errors.Is(err, os.ErrNotExist):
			errs = append(errs, err)
		}
	}
	if lease.ID().IsValid() {
		fmt.Fprintf(stdout, "lease %v left in etcd: it expires by its TTL (delete %s to free it now)\n",
			lease.ID(), lease.Key(o.etcdPrefix))
	}
	return errors.Join(errs...)
}

func teardownBackends(o options, iface backend.ExternalInterface, cfg subnetmgr.Config, lease subnetmgr.Lease, recorded string, stdout io.Writer, log *slog.Logger) []error {
	reg := newRegistry()
	var errs []error
	for _, name := range reg.Names() {
		ctor, _ := reg.Lookup(name)
		b, err := ctor(backend.Options{Iface: iface, Config: cfg, Decap: o.decap, FlowSteering: o.flowSteering, BPFFS: o.bpffs, StateDir: filepath.Dir(o.stateFile), Logger: log})
		if err != nil {
			log.Info("backend not torn down: cannot run here, so it left nothing", "backend", name, "reason", err)
			continue
		}
		if name == recorded && lease.ID().IsValid() && (cfg.Network.IsValid() || cfg.IPv6Only()) {
			if err := b.Setup(context.Background(), lease, cfg); err != nil {
				errs = append(errs, fmt.Errorf("backend %s: adopt its datapath for teardown: %w", name, err))
			}
		}
		if err := b.Close(true); err != nil {
			errs = append(errs, fmt.Errorf("backend %s teardown: %w", name, err))
			continue
		}
		fmt.Fprintf(stdout, "backend %s: nothing of it left\n", name)
	}
	return errs
}
