package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/xnet-dev/xnet/dockernet"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// dockerNetworkBridges is the iptables pattern of the network bridges, accepted in XNET-FWD.
const dockerNetworkBridges = "xnbr.+"

// dockerNetworksDNS is the resolver address for Docker networks' names: the docker0 gateway of
// our lease (Docker's --bip), which every container of the host can reach. The zero Addr
// without --docker-networks.
func (d *daemonRun) dockerNetworksDNS() netip.Addr {
	if !d.o.dockerNetworks {
		return netip.Addr{}
	}
	return subnetmgr.GatewayOf(d.lease.Subnet).Addr()
}

// startDockerNetworks serves the xnet Docker network and IPAM driver (--docker-networks) until
// ctx ends; stop waits for it and releases it (removing its devices with --teardown-on-exit).
// Its changes reach the state file through changed. A plugin socket it cannot serve is fatal:
// the operator asked for it.
func (d *daemonRun) startDockerNetworks(ctx context.Context) (stop func(teardown bool), changed <-chan struct{}, err error) {
	if !d.o.dockerNetworks {
		return func(bool) {}, nil, nil
	}
	ch := make(chan struct{}, 1)
	m, err := dockernet.New(dockernet.Options{
		Etcd: d.mgr, Overlay: d.cfg, Iface: d.iface,
		PluginSocket: d.o.dockerPluginSocket, DockerSocket: d.o.dockerSocket,
		DNS: d.dockerNetworksDNS(), RenewMargin: d.o.renewMargin, Logger: d.log,
		OnChange: func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("--docker-networks: %w", err)
	}
	d.dnet = m
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	stop = func(teardown bool) {
		cancel()
		if err := <-done; err != nil {
			d.log.Error("Docker networks stopped", "err", err)
		}
		if err := m.Close(teardown); err != nil {
			d.log.Warn("releasing Docker networks", "teardown", teardown, "err", err)
		}
	}
	return stop, ch, nil
}

// dockerNetworksStatus is the state file's section on Docker networks (nil without them).
func (d *daemonRun) dockerNetworksStatus() *dockernet.Status {
	if d.dnet == nil {
		return nil
	}
	s := d.dnet.Status()
	return &s
}

// teardownDockerNetworks is `xnetd teardown`'s part: every network bridge and VXLAN device,
// the isolation table and the plugin socket.
func teardownDockerNetworks(o options, stdout io.Writer) error {
	removed, err := dockernet.Teardown()
	if len(removed) > 0 {
		fmt.Fprintf(stdout, "removed Docker networks' devices: %s\n", strings.Join(removed, ", "))
	}
	if st, serr := os.Lstat(o.dockerPluginSocket); serr == nil && st.Mode()&os.ModeSocket != 0 {
		if rerr := os.Remove(o.dockerPluginSocket); rerr != nil {
			err = errors.Join(err, rerr)
		} else {
			fmt.Fprintf(stdout, "removed %s\n", o.dockerPluginSocket)
		}
	}
	return err
}

// printDockerNetworks is the status section (nothing without Docker networks).
func printDockerNetworks(w io.Writer, s *dockernet.Status) {
	if s == nil {
		return
	}
	fmt.Fprintln(w)
	s.Print(w)
}
