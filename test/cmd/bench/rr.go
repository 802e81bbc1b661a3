package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/test/harness"
)

// TCP request/response as netperf's TCP_RR measures it: one TCP connection, a 1-byte request
// answered by a 1-byte response, as fast as possible; the result is transactions per second.
// Client and server are plain blocking sockets created inside the containers' namespaces and
// driven by this process from locked OS threads, so the loop is two syscalls per side per
// transaction, like netperf's, with no Go scheduler wake-ups in the path.

// rrServer accepts connections in a namespace and echoes every byte it reads.
type rrServer struct {
	fd   int
	done chan struct{}
}

func startRRServer(ns *harness.Namespace, addr netip.AddrPort) (*rrServer, error) {
	var fd int
	err := ns.Do(func() error {
		var err error
		family, sa := sockaddr(addr)
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, sa); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Listen(fd, 16); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("TCP_RR server on %s in %s: %w", addr, ns.Name, err)
	}
	s := &rrServer{fd: fd, done: make(chan struct{})}
	go s.serve()
	return s, nil
}

func (s *rrServer) serve() {
	defer close(s.done)
	for {
		c, _, err := unix.Accept4(s.fd, unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return // shut down
		}
		go echo(c)
	}
}

func echo(fd int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer unix.Close(fd)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	// A peer that vanishes must not park this thread forever.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 5})
	b := make([]byte, 1)
	for {
		n, err := unix.Read(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			return
		}
		if _, err := unix.Write(fd, b); err != nil {
			return
		}
	}
}

func (s *rrServer) close() {
	// shutdown wakes a thread blocked in accept; close alone would not.
	_ = unix.Shutdown(s.fd, unix.SHUT_RDWR)
	<-s.done
	unix.Close(s.fd)
}

// runRR connects from ns to addr and counts request/response transactions for d.
func runRR(ctx context.Context, ns *harness.Namespace, addr netip.AddrPort, d time.Duration) (float64, error) {
	var fd int
	err := ns.Do(func() error {
		var err error
		family, sa := sockaddr(addr)
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		// Bounds connect and every read: a broken datapath fails the sample instead of hanging.
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 3})
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 3})
		if err := unix.Connect(fd, sa); err != nil {
			unix.Close(fd)
			return err
		}
		return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	})
	if err != nil {
		return 0, fmt.Errorf("TCP_RR connect from %s to %s: %w", ns.Name, addr, err)
	}
	defer unix.Close(fd)
	type result struct {
		n       int
		elapsed time.Duration
		err     error
	}
	resc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		b := []byte{'x'}
		start := time.Now()
		deadline := start.Add(d)
		n := 0
		for {
			if _, err := unix.Write(fd, b); err != nil {
				resc <- result{err: fmt.Errorf("TCP_RR write: %w", err)}
				return
			}
			for {
				m, err := unix.Read(fd, b)
				if errors.Is(err, unix.EINTR) {
					continue
				}
				if err != nil || m == 0 {
					resc <- result{err: fmt.Errorf("TCP_RR read after %d transactions: n=%d %v", n, m, err)}
					return
				}
				break
			}
			n++
			if n%64 == 0 && (time.Now().After(deadline) || ctx.Err() != nil) {
				resc <- result{n: n, elapsed: time.Since(start)}
				return
			}
		}
	}()
	r := <-resc
	if r.err != nil {
		return 0, r.err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return float64(r.n) / r.elapsed.Seconds(), nil
}

// sockaddr is addr as a socket family and address, either IP version.
func sockaddr(addr netip.AddrPort) (int, unix.Sockaddr) {
	if a := addr.Addr(); a.Is6() && !a.Is4In6() {
		return unix.AF_INET6, &unix.SockaddrInet6{Port: int(addr.Port()), Addr: a.As16()}
	}
	return unix.AF_INET, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().Unmap().As4()}
}
