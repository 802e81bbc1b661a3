package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// TCPExchange checks that a TCP connection from namespace from to dst (an address of namespace
// to) carries size bytes each way: a listener in to reads what from sends and sends back as
// many other bytes, and both sides compare what they got. A few MB cross the path as full-size
// segments in both directions (the offloads' and the MTU's business, which a ping never
// touches). It gives up when ctx ends.
func TCPExchange(ctx context.Context, from, to *Namespace, dst netip.Addr, size int) error {
	var ln *net.TCPListener
	if err := to.Do(func() (err error) {
		ln, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IP(dst.AsSlice())})
		return err
	}); err != nil {
		return fmt.Errorf("harness: listen on %v in %s: %w", dst, to.Name, err)
	}
	defer ln.Close()
	up, down := make([]byte, size), make([]byte, size)
	_, _ = rand.Read(up)
	_, _ = rand.Read(down)
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	served := make(chan error, 1)
	go func() {
		_ = ln.SetDeadline(deadline)
		c, err := ln.Accept()
		if err != nil {
			served <- fmt.Errorf("accept: %w", err)
			return
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		got := make([]byte, size)
		if _, err := io.ReadFull(c, got); err != nil {
			served <- fmt.Errorf("%s read what %s sent: %w", to.Name, from.Name, err)
			return
		}
		if !bytes.Equal(got, up) {
			served <- fmt.Errorf("%s received other bytes than %s sent", to.Name, from.Name)
			return
		}
		if _, err := c.Write(down); err != nil {
			served <- fmt.Errorf("%s send back: %w", to.Name, err)
			return
		}
		served <- nil
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		d := net.Dialer{Deadline: deadline}
		c, err = d.DialContext(ctx, "tcp", ln.Addr().String())
		return err
	}); err != nil {
		_ = ln.Close()
		return errors.Join(fmt.Errorf("harness: connect from %s to %v: %w", from.Name, ln.Addr(), err), <-served)
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	if _, err := c.Write(up); err != nil {
		return errors.Join(fmt.Errorf("harness: send %d bytes from %s to %v: %w", size, from.Name, dst, err), <-served)
	}
	got := make([]byte, size)
	_, rerr := io.ReadFull(c, got)
	if err := <-served; err != nil {
		return fmt.Errorf("harness: %s -> %v: %w", from.Name, dst, err)
	}
	if rerr != nil {
		return fmt.Errorf("harness: %s reading the answer from %v: %w", from.Name, dst, rerr)
	}
	if !bytes.Equal(got, down) {
		return fmt.Errorf("harness: %s received other bytes than %v sent back", from.Name, dst)
	}
	return nil
}
