package etcdtest

import (
	"net"
	"net/url"
	"sync"
	"testing"
)

// Relay forwards TCP connections on a loopback port to an etcd member, and can hang as a
// member whose process stopped answering does (a SIGSTOP, a wedged disk): Freeze keeps every
// connection open and the kernel keeps acknowledging what clients send, but nothing is
// forwarded either way any more, and new connections are accepted and left waiting. A
// client only notices by timing out. (A member that loses power does not even acknowledge;
// that needs packets dropped, which the end-to-end harness does with nftables.)
type Relay struct {
	t      testing.TB
	l      net.Listener
	target string
	scheme string

	mu     sync.Mutex
	frozen bool
	thawed chan struct{} // closed while not frozen
	done   chan struct{} // closed by Close
	conns  map[net.Conn]struct{}
	opened int
	wg     sync.WaitGroup
}

// NewRelay relays a new loopback port to the member s, until t's cleanup.
func (s *Server) NewRelay(t testing.TB) *Relay {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("relay listener: %v", err)
	}
	r := &Relay{t: t, l: l, target: s.clientURL.Host, scheme: s.clientURL.Scheme, thawed: make(chan struct{}), done: make(chan struct{}),
		conns: map[net.Conn]struct{}{}}
	close(r.thawed)
	r.wg.Go(r.accept)
	t.Cleanup(r.Close)
	return r
}

// Endpoint is the relay's client URL, with the member's scheme.
func (r *Relay) Endpoint() string {
	u := url.URL{Scheme: r.scheme, Host: r.l.Addr().String()}
	return u.String()
}

// Freeze stops forwarding without closing anything.
func (r *Relay) Freeze() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.frozen {
		r.frozen = true
		r.thawed = make(chan struct{})
	}
}

// Cut closes every connection open now, as a member that crashes would (its kernel answers
// with FIN or RST); the relay keeps accepting new ones.
func (r *Relay) Cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
		delete(r.conns, c)
	}
}

// Opened is the number of client connections accepted so far.
func (r *Relay) Opened() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opened
}

// Close closes the listener and every connection, and waits for the relay's goroutines.
func (r *Relay) Close() {
	r.mu.Lock()
	select {
	case <-r.done:
		r.mu.Unlock()
		return
	default:
	}
	close(r.done)
	r.l.Close()
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// gate waits while the relay is frozen; false once it is closed.
func (r *Relay) gate() bool {
	r.mu.Lock()
	thawed := r.thawed
	r.mu.Unlock()
	select {
	case <-thawed:
		return true
	case <-r.done:
		return false
	}
}

// track records c for Close; false (and c closed) when the relay is already closed.
func (r *Relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-r.done:
		c.Close()
		return false
	default:
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *Relay) accept() {
	for {
		c, err := r.l.Accept()
		if err != nil {
			return
		}
		if !r.track(c) {
			return
		}
		r.mu.Lock()
		r.opened++
		r.mu.Unlock()
		r.wg.Go(func() { r.serve(c) })
	}
}

func (r *Relay) serve(c net.Conn) {
	if !r.gate() {
		return
	}
	up, err := net.Dial("tcp", r.target)
	if err != nil {
		c.Close()
		return
	}
	if !r.track(up) {
		c.Close()
		return
	}
	var both sync.WaitGroup
	both.Go(func() { r.pipe(up, c) })
	both.Go(func() { r.pipe(c, up) })
	both.Wait()
}

// pipe copies src to dst chunk by chunk, holding each chunk while frozen.
func (r *Relay) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !r.gate() {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
