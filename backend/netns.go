package backend

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// InNamespace runs fn on a thread in the network namespace ns (for a backend: the one New ran
// in). Sockets, TUN fds and netlink handles stay in the namespace they were opened in, so a
// user-space datapath opens everything through here (udp's queues and sockets, wireguard's
// device and wireguard-go's UDP sockets, which its own goroutines open whenever the device
// comes up). When the thread cannot be switched back it stays locked, so the runtime retires it
// instead of reusing it elsewhere.
func InNamespace(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		cur, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer cur.Close()
		if cur.Equal(ns) {
			err := fn()
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter the backend's network namespace: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(cur); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return from the backend's network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
