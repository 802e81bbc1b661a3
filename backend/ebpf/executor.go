package ebpf

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// executor runs functions on one OS thread inside the backend's network namespace: attaching
// takes ifindexes, and netlink and BPF resolve them in the namespace of the calling thread.
type executor struct {
	work chan func()
	ns   netns.NsHandle
}

func newExecutor(ns netns.NsHandle) (*executor, error) {
	dup, err := unix.Dup(int(ns))
	if err != nil {
		return nil, fmt.Errorf("ebpf: keep the network namespace: %w", err)
	}
	e := &executor{work: make(chan func()), ns: netns.NsHandle(dup)}
	errc := make(chan error)
	go func() {
		// Locked for good: the thread is discarded with the goroutine, never reused in
		// another namespace.
		runtime.LockOSThread()
		if err := netns.Set(e.ns); err != nil {
			errc <- fmt.Errorf("ebpf: enter network namespace: %w", err)
			return
		}
		errc <- nil
		for fn := range e.work {
			fn()
		}
	}()
	if err := <-errc; err != nil {
		e.ns.Close()
		return nil, err
	}
	return e, nil
}

func (e *executor) do(fn func() error) error {
	errc := make(chan error, 1)
	e.work <- func() { errc <- fn() }
	return <-errc
}

func (e *executor) netns() (netns.NsHandle, error) {
	dup, err := unix.Dup(int(e.ns))
	if err != nil {
		return netns.None(), fmt.Errorf("ebpf: duplicate netns handle: %w", err)
	}
	return netns.NsHandle(dup), nil
}

func (e *executor) close() {
	close(e.work)
	e.ns.Close()
}
