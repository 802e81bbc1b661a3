package harness

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TransferIntact sends size random bytes over TCP from one container to another, at the
// receiver's address dst (IPv4 or IPv6), in 1 MB writes, and fails tb unless the receiver
// got exactly them (same length and SHA-256). Large writes make the kernel send 64 KB TSO
// segments, so a datapath's segmentation and coalescing are in the path.
func TransferIntact(tb testing.TB, from, to *Container, dst netip.Addr, size int) {
	tb.Helper()
	// What the messages name: the addresses of the family dst is of.
	src := from.IP
	if dst.Is6() {
		src = from.IPv6
	}
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(dst.String(), "0"))
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(60 * time.Second))
		h := sha256.New()
		n, err := io.Copy(h, c)
		var r result
		copy(r.sum[:], h.Sum(nil))
		r.n, r.err = n, err
		got <- r
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		tb.Fatalf("connect %v -> %v: %v", src, dst, err)
	}
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	chunk := make([]byte, 1<<20)
	h := sha256.New()
	start := time.Now()
	for sent := 0; sent < size; sent += len(chunk) {
		if _, err := rand.Read(chunk); err != nil {
			tb.Fatal(err)
		}
		h.Write(chunk)
		if _, err := c.Write(chunk); err != nil {
			c.Close()
			tb.Fatalf("send %v -> %v after %d bytes: %v", src, dst, sent, err)
		}
	}
	c.Close()
	r := <-got
	if r.err != nil {
		tb.Fatalf("receive %v -> %v: %v", src, dst, r.err)
	}
	if want := h.Sum(nil); r.n != int64(size) || !bytes.Equal(r.sum[:], want) {
		tb.Fatalf("%v -> %v: received %d bytes with sha256 %x, sent %d with %x", src, dst, r.n, r.sum, size, want)
	}
	tb.Logf("%v -> %v: %d MB intact in %v", src, dst, size>>20, time.Since(start).Round(time.Millisecond))
}
