package ebpf

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/loader"
)

// attachContainers makes the container veths of docker0 match the host-routing mode and
// what exists now. With bpf host routing every veth enslaved to docker0 gets the encap
// program; with kernel host routing none has it (an earlier run's attachments are removed),
// so container traffic takes the host's stack and its netfilter rules both ways. In both modes
// an endpoint learned for an interface that is no longer a container veth of docker0 is
// forgotten, and so is the veth: both are what a restart or a lost link event leaves behind,
// and decap must never hand a packet to an interface that is gone.
func (b *Backend) attachContainers() error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("ebpf: list links: %w", err)
	}
	live := map[int]bool{}
	if bridge, err := netlink.LinkByName(DockerBridge); err == nil {
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().MasterIndex == bridge.Attrs().Index {
				live[l.Attrs().Index] = true
			}
		}
	}
	// Docker may not have started yet: watchLinks catches docker0's veths later.
	var errs []error
	for idx := range b.veths {
		if !live[idx] || b.hostRouting == HostRoutingKernel {
			errs = append(errs, b.forgetContainer(idx))
		}
	}
	if b.hostRouting == HostRoutingKernel {
		for idx := range live {
			errs = append(errs, b.ld.Detach(idx, loader.Ingress))
		}
	} else {
		for idx := range live {
			errs = append(errs, b.attachContainer(idx))
		}
	}
	eps, err := b.m.ListEndpoints()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("ebpf: %w", err))...)
	}
	gone := 0
	for _, ep := range eps {
		if live[ep.Ifindex] && b.hostRouting != HostRoutingKernel {
			continue
		}
		n, err := b.m.ForgetEndpoints(ep.Ifindex)
		errs = append(errs, err)
		gone += n
	}
	if gone > 0 {
		b.Log.Info("forgot containers whose interface is gone (or that host routing no longer serves)", "endpoints", gone)
	}
	return errors.Join(errs...)
}

// HostRouting is the current host-routing mode (backend.HostRouter).
func (b *Backend) HostRouting() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.hostRouting
}

// SetHostRouting switches host routing while running (backend.HostRouter): to kernel, the
// encap program leaves every container veth and learned endpoints are forgotten, so the next
// packet each way takes the host's stack; to bpf, the veths get it back and containers are
// learned again from what they send.
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
	return nil
}

// forgetContainer detaches the encap program from a container veth (if the veth still exists)
// and forgets the containers learned behind it.
func (b *Backend) forgetContainer(ifindex int) error {
	delete(b.veths, ifindex)
	b.status.Containers = len(b.veths)
	err := b.ld.Detach(ifindex, loader.Ingress)
	n, errF := b.m.ForgetEndpoints(ifindex)
	b.Log.Debug("container veth forgotten", "ifindex", ifindex, "forgotten_endpoints", n, "err", errors.Join(err, errF))
	return errors.Join(err, errF)
}

// linkWatchBuffer is the receive buffer of the link subscription. Container churn (a
// docker-compose up of many services) produces bursts of link events; a larger buffer makes
// an overflow rarer, and watchLinks recovers from one anyway.
const linkWatchBuffer = 1 << 20

// watchLinks follows link changes: a veth that joins docker0 gets the encap program, a veth
// that goes away has its pin and learned containers removed. A subscription ends for good on
// its first receive error (an overflowing buffer during container churn is one), so events
// are lost: the watch then subscribes again and resyncs everything from the current links
// (attachContainers), until stopped.
func (b *Backend) watchLinks() (func(), error) {
	updates, cancel, err := b.subscribeLinks()
	if err != nil {
		return nil, err
	}
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			for u := range updates {
				b.handleLinkUpdate(u)
			}
			cancel()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if updates, cancel, err = b.subscribeLinks(); err == nil {
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
			b.mu.Lock()
			if b.ld != nil {
				if err := b.exec.do(b.attachContainers); err != nil {
					b.Log.Warn("resync of container veths after the link watch broke", "err", err)
				}
			}
			b.mu.Unlock()
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			cancel()
			// The subscription closes updates once it notices done.
			<-stopped
		})
	}, nil
}

// subscribeLinks opens one link subscription in the backend's namespace. cancel ends it.
func (b *Backend) subscribeLinks() (<-chan netlink.LinkUpdate, func(), error) {
	updates := make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	ns, err := b.exec.netns()
	if err != nil {
		return nil, nil, err
	}
	defer ns.Close()
	var stopping atomic.Bool
	err = netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		Namespace:         &ns,
		ReceiveBufferSize: b.linkBuffer,
		ErrorCallback: func(err error) {
			if !stopping.Load() { // closing the socket on stop reads as an error too
				b.Log.Warn("link watch broke: subscribing again and resyncing container veths", "err", err)
			}
		},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("ebpf: subscribe to link updates: %w", err)
	}
	var once sync.Once
	return updates, func() {
		once.Do(func() {
			stopping.Store(true)
			close(done)
		})
	}, nil
}

func (b *Backend) handleLinkUpdate(u netlink.LinkUpdate) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ld == nil {
		return
	}
	idx := int(u.Index)
	if u.Header.Type == unix.RTM_DELLINK {
		if _, ok := b.veths[idx]; !ok {
			return
		}
		_ = b.exec.do(func() error { return b.forgetContainer(idx) })
		return
	}
	if u.Link != nil && u.Attrs().Name == DockerBridge {
		// docker0 appeared, came back or changed its MTU or MAC: keep the headroom port in step.
		_ = b.exec.do(func() error { b.headroomPort(); return nil })
		return
	}
	if b.hostRouting == HostRoutingKernel || u.Link == nil || u.Link.Type() != "veth" || u.Attrs().MasterIndex == 0 {
		return
	}
	err := b.exec.do(func() error {
		bridge, err := netlink.LinkByName(DockerBridge)
		if err != nil || u.Attrs().MasterIndex != bridge.Attrs().Index {
			return nil
		}
		return b.attachContainer(idx)
	})
	if err != nil {
		b.Log.Warn("cannot attach encap to a new container veth; its traffic to other hosts takes the host's stack", "ifindex", idx, "name", u.Attrs().Name, "err", err)
	}
}
