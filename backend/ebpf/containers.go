package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/loader"
)

// findBridges returns the bridges that hold our containers, by ifindex, and why. With
// --bridge it is the one named. Otherwise it is every bridge that has an IPv4 address inside
// our lease: Docker's docker0 started with the --bip xnetd wrote, a daemon.json "bridge" of
// another name, podman's or a CNI bridge configured from subnet.env. The gateway address says
// which bridge serves our subnet; its name says nothing. In an IPv6-only overlay it is an IPv6
// address inside our IPv6 lease (Docker's --fixed-cidr-v6 gateway): docker0 keeps Docker's
// default IPv4 address there, which says nothing about our lease.
func (b *Backend) findBridges(links []netlink.Link) (map[int]string, string) {
	found := map[int]string{}
	if b.bridgeName != "" {
		for _, l := range links {
			if l.Attrs().Name == b.bridgeName && l.Type() == "bridge" {
				found[l.Attrs().Index] = l.Attrs().Name
			}
		}
		return found, "--bridge=" + b.bridgeName
	}
	subnet, family := b.Local().Subnet, unix.AF_INET
	if b.ipv6Only {
		subnet, family = b.Local().IPv6Subnet, unix.AF_INET6
	}
	for _, l := range links {
		if l.Type() != "bridge" {
			continue
		}
		addrs, err := netlink.AddrList(l, family)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && subnet.Contains(ip.Unmap()) {
				found[l.Attrs().Index] = l.Attrs().Name
				break
			}
		}
	}
	return found, "bridges with an address in " + subnet.String()
}

// primaryBridge is the bridge that gets the headroom port: the one with the lowest ifindex
// (a vxlan device can be the port of one bridge only). "" when there is none.
func (b *Backend) primaryBridge() string {
	best, name := 0, ""
	for idx, n := range b.bridges {
		if best == 0 || idx < best {
			best, name = idx, n
		}
	}
	return name
}

// attachContainers makes the container veths and bridges match what exists now. It finds the
// container bridges again (findBridges), so a bridge that appeared, got our gateway address,
// was renamed or went away is followed. Every container bridge gets deliver_bridge at its TC
// egress, and every veth enslaved to one gets the encap program, in both host-routing modes:
// with kernel host routing the config map tells the programs to only learn containers and
// leave every packet to the host's stack (bpf/xnet.c), so a mode switch is one map write. An
// endpoint learned for an interface that is no longer a container veth is forgotten, and so is
// the veth: both are what a restart or a lost link event leaves behind, and the programs must
// never hand a packet to an interface that is gone.
func (b *Backend) attachContainers() error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("ebpf: list links: %w", err)
	}
	bridges, why := b.findBridges(links)
	if !maps.Equal(bridges, b.bridges) {
		b.Log.Info("container bridges", "bridges", slices.Sorted(maps.Values(bridges)), "why", why)
	}
	var errs []error
	for idx := range b.bridges {
		if _, ok := bridges[idx]; !ok {
			errs = append(errs, b.ld.Detach(idx, loader.Egress))
		}
	}
	for idx := range bridges {
		if _, err := b.ld.AttachTC(idx, loader.Egress, loader.DeliverBridge); err != nil {
			errs = append(errs, fmt.Errorf("ebpf: container bridge %s: %w", bridges[idx], err))
		}
	}
	b.bridges = bridges
	b.status.Bridges, b.status.BridgeWhy = slices.Sorted(maps.Values(bridges)), why
	live := map[int]bool{}
	for _, l := range links {
		if _, ok := bridges[l.Attrs().MasterIndex]; ok && l.Type() == "veth" {
			live[l.Attrs().Index] = true
		}
	}
	// No bridge yet (Docker has not started): the watch catches it later.
	for idx := range b.veths {
		if !live[idx] {
			errs = append(errs, b.forgetContainer(idx))
		}
	}
	for idx := range live {
		errs = append(errs, b.attachContainer(idx))
	}
	eps, err := b.m.ListEndpoints()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("ebpf: %w", err))...)
	}
	gone := 0
	for _, ep := range eps {
		if live[ep.Ifindex] {
			continue
		}
		n, err := b.m.ForgetEndpoints(ep.Ifindex)
		errs = append(errs, err)
		gone += n
	}
	if gone > 0 {
		b.Log.Info("forgot containers whose interface is gone", "endpoints", gone)
	}
	b.headroomPort()
	return errors.Join(errs...)
}

// HostRouting is the current host-routing mode (backend.HostRouter).
func (b *Backend) HostRouting() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.hostRouting
}

// SetHostRouting switches host routing while running (backend.HostRouter) by rewriting the
// config map: to kernel, the next packet each way takes the host's stack (the programs stay
// attached and only learn containers); to bpf, the fast path serves the containers learned
// meanwhile at once.
func (b *Backend) SetHostRouting(mode, why string) error {
	if mode != HostRoutingBPF && mode != HostRoutingKernel {
		return fmt.Errorf("ebpf: host routing %q: use bpf or kernel", mode)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if mode == b.hostRouting {
		b.status.HostRoutingWhy = why
		return nil
	}
	b.hostRouting = mode
	b.status.HostRouting, b.status.HostRoutingWhy = mode, why
	b.Log.Info("host routing changed", "host_routing", mode, "why", why)
	if b.ld == nil {
		return nil // Setup applies it
	}
	b.config.HostRoutingKernel = mode == HostRoutingKernel
	if err := b.m.SetConfig(b.config); err != nil {
		return fmt.Errorf("ebpf: switch host routing to %s: %w", mode, err)
	}
	return b.exec.do(b.attachContainers)
}

func (b *Backend) attachContainer(ifindex int) error {
	if _, ok := b.veths[ifindex]; ok {
		return nil
	}
	if _, err := b.ld.AttachTC(ifindex, loader.Ingress, loader.EncapContainer); err != nil {
		return fmt.Errorf("ebpf: container veth %d: %w", ifindex, err)
	}
	b.veths[ifindex] = struct{}{}
	b.status.Containers = len(b.veths)
	b.Log.Debug("encap attached to container veth", "ifindex", ifindex)
	b.steerFlows(ifindex, true)
	return nil
}

// steerFlows turns on RPS for a container veth that has none (on, rps.go), or gives a veth
// that stays (it left the container bridge, or xnet is torn down) its mask back if it is
// still the one xnet wrote (off). A failure costs ordering, not connectivity: it is logged.
func (b *Backend) steerFlows(ifindex int, on bool) {
	if b.rpsMask == "" {
		return
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return // gone with its container
	}
	from, to := "0", b.rpsMask
	if !on {
		from, to = to, from
	}
	if err := setRPS(b.exec.ns, []string{l.Attrs().Name}, from, to); err != nil {
		b.Log.Warn("cannot change flow steering on a container veth; its TCP flows may be reordered or keep xnet's RPS mask", "veth", l.Attrs().Name, "steer", on, "err", err)
	}
}

// forgetContainer detaches the encap program from a container veth (if the veth still exists)
// and forgets the containers learned behind it.
func (b *Backend) forgetContainer(ifindex int) error {
	delete(b.veths, ifindex)
	b.status.Containers = len(b.veths)
	err := b.ld.Detach(ifindex, loader.Ingress)
	b.steerFlows(ifindex, false)
	n, errF := b.m.ForgetEndpoints(ifindex)
	b.Log.Debug("container veth forgotten", "ifindex", ifindex, "forgotten_endpoints", n, "err", errors.Join(err, errF))
	return errors.Join(err, errF)
}

// linkWatchBuffer is the receive buffer of the link and address subscriptions. Container
// churn (a docker-compose up of many services) produces bursts of link events; a larger buffer
// makes an overflow rarer, and watchLinks recovers from one anyway.
const linkWatchBuffer = 1 << 20

// watchLinks follows link and address changes: a veth that joins a container bridge gets the
// encap program, a veth that goes away has its pin and learned containers removed, and a
// bridge that appears, changes or gets or loses an address in our subnet makes the backend
// find the container bridges again. A subscription ends for good on its first receive error
// (an overflowing buffer during container churn is one), so events are lost: the watch then
// subscribes again and resyncs everything from the current links (attachContainers), until
// stopped.
func (b *Backend) watchLinks() (func(), error) {
	sub, err := b.subscribe()
	if err != nil {
		return nil, err
	}
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			b.follow(sub)
			sub.cancel()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if sub, err = b.subscribe(); err == nil {
					break
				}
				b.Log.Warn("cannot subscribe to link updates again; retrying", "err", err)
				select {
				case <-stop:
					return
				case <-time.After(time.Second):
				}
			}
			b.linkResyncs.Add(1)
			b.resync()
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			sub.cancel()
			// The subscriptions close their channels once they notice done.
			<-stopped
		})
	}, nil
}

// subscription is one link and one address subscription in the backend's namespace.
type subscription struct {
	links  <-chan netlink.LinkUpdate
	addrs  <-chan netlink.AddrUpdate
	cancel func()
}

// follow hands updates to the backend until either subscription ends.
func (b *Backend) follow(sub subscription) {
	for {
		select {
		case u, ok := <-sub.links:
			if !ok {
				return
			}
			b.handleLinkUpdate(u)
		case u, ok := <-sub.addrs:
			if !ok {
				return
			}
			// Only the lease's family: IPv6 link-local addresses come and go with every
			// bridge and veth.
			if (u.LinkAddress.IP.To4() != nil) != b.ipv6Only && b.isBridgeAddrChange(u) {
				b.resync()
			}
		}
	}
}

// isBridgeAddrChange says whether an address update can change which bridges are container
// bridges: an address in our subnet, or any address of a bridge we use.
func (b *Backend) isBridgeAddrChange(u netlink.AddrUpdate) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.bridges[u.LinkIndex]; ok {
		return true
	}
	ip, ok := netip.AddrFromSlice(u.LinkAddress.IP)
	return ok && b.Local().ID().Contains(ip.Unmap())
}

// resync finds the container bridges and their veths again (attachContainers).
func (b *Backend) resync() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ld == nil {
		return
	}
	if err := b.exec.do(b.attachContainers); err != nil {
		b.Log.Warn("resync of container bridges and veths", "err", err)
	}
}

// subscribe opens the link and address subscriptions in the backend's namespace.
func (b *Backend) subscribe() (subscription, error) {
	links := make(chan netlink.LinkUpdate, 256)
	addrs := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	var stopping atomic.Bool
	onErr := func(err error) {
		if !stopping.Load() { // closing the socket on stop reads as an error too
			b.Log.Warn("link watch broke: subscribing again and resyncing container veths", "err", err)
		}
	}
	ns, err := b.exec.netns()
	if err != nil {
		return subscription{}, err
	}
	defer ns.Close()
	var once sync.Once
	cancel := func() {
		once.Do(func() {
			stopping.Store(true)
			close(done)
		})
	}
	err = netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{
		Namespace: &ns, ReceiveBufferSize: b.linkBuffer, ErrorCallback: onErr,
	})
	if err != nil {
		cancel()
		return subscription{}, fmt.Errorf("ebpf: subscribe to link updates: %w", err)
	}
	err = netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{
		Namespace: &ns, ReceiveBufferSize: b.linkBuffer, ErrorCallback: onErr,
	})
	if err != nil {
		cancel()
		return subscription{}, fmt.Errorf("ebpf: subscribe to address updates: %w", err)
	}
	return subscription{links: links, addrs: addrs, cancel: cancel}, nil
}

func (b *Backend) handleLinkUpdate(u netlink.LinkUpdate) {
	idx := int(u.Index)
	if u.Link != nil && u.Link.Type() == "bridge" {
		// A bridge appeared, went, or changed its MTU or MAC: find the container bridges
		// again and keep the headroom port in step.
		b.resync()
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ld == nil {
		return
	}
	if u.Header.Type == unix.RTM_DELLINK {
		if _, ok := b.veths[idx]; !ok {
			return
		}
		_ = b.exec.do(func() error { return b.forgetContainer(idx) })
		return
	}
	if b.hostRouting == HostRoutingKernel || u.Link == nil || u.Link.Type() != "veth" {
		return
	}
	if _, ok := b.bridges[u.Attrs().MasterIndex]; !ok {
		return
	}
	if err := b.exec.do(func() error { return b.attachContainer(idx) }); err != nil {
		b.Log.Warn("cannot attach encap to a new container veth; its traffic to other hosts takes the host's stack", "ifindex", idx, "name", u.Attrs().Name, "err", err)
	}
}
