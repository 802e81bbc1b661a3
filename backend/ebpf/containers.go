package ebpf

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/loader"
)

// attachContainers puts the encap program on every veth enslaved to docker0.
func (b *Backend) attachContainers() error {
	bridge, err := netlink.LinkByName(DockerBridge)
	if err != nil {
		return nil // Docker has not started yet: watchLinks catches docker0's veths later
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("ebpf: list links: %w", err)
	}
	for _, l := range links {
		if l.Type() == "veth" && l.Attrs().MasterIndex == bridge.Attrs().Index {
			if err := b.attachContainer(l.Attrs().Index); err != nil {
				return err
			}
		}
	}
	return nil
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

// watchLinks follows link changes: a veth that joins docker0 gets the encap program, a veth
// that goes away has its pin and learned containers removed.
func (b *Backend) watchLinks() (func(), error) {
	updates := make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	ns, err := b.exec.netns()
	if err != nil {
		return nil, err
	}
	var stopping atomic.Bool
	err = netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		Namespace: &ns,
		ErrorCallback: func(err error) {
			if !stopping.Load() { // closing the socket on stop reads as an error too
				b.Log.Warn("link watch error: veths created meanwhile may lack the encap program until the next Setup", "err", err)
			}
		},
	})
	ns.Close()
	if err != nil {
		return nil, fmt.Errorf("ebpf: subscribe to link updates: %w", err)
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for u := range updates {
			b.handleLinkUpdate(u)
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			stopping.Store(true)
			close(done)
			// The subscription closes updates once it notices done.
			<-stopped
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
		delete(b.veths, idx)
		b.status.Containers = len(b.veths)
		err := b.exec.do(func() error { return b.ld.Detach(idx, loader.Ingress) })
		n, errF := b.m.ForgetEndpoints(idx)
		b.Log.Debug("container veth gone", "ifindex", idx, "forgotten_endpoints", n, "err", errors.Join(err, errF))
		return
	}
	if u.Link != nil && u.Attrs().Name == DockerBridge {
		// docker0 appeared, came back or changed its MTU or MAC: keep the headroom port in step.
		_ = b.exec.do(func() error { b.headroomPort(); return nil })
		return
	}
	if u.Link == nil || u.Link.Type() != "veth" || u.Attrs().MasterIndex == 0 {
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
		b.Log.Warn("cannot attach encap to a new container veth; its traffic to other hosts will not flow", "ifindex", idx, "name", u.Attrs().Name, "err", err)
	}
}
