package health

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Options configure a Prober.
type Options struct {
	// Port is where every host answers probes (DefaultPort). The prober listens there too,
	// unless Ephemeral.
	Port int
	// Ephemeral binds the probing sockets to ports the kernel picks and answers no requests:
	// a one-shot prober (`xnetd check`) beside the daemon's.
	Ephemeral bool
	// Overlay is our overlay address, invalid when there is none (the overlay is then not
	// probed). OverlayOptional: it may not be on an interface yet (host-gw's docker0); until
	// it is, the overlay is not probed rather than unreachable.
	Overlay         netip.Addr
	OverlayOptional bool
	// Underlay is our underlay address (the interface's own: what peers' probes to our
	// PublicIP arrive at).
	Underlay netip.Addr
	// Network is the overlay Network: the sources whose overlay probes we answer.
	Network netip.Prefix
	// Overlay6 is our IPv6 overlay address in a dual-stack overlay (our IPv6 subnet's first
	// address, the /128 the device holds), invalid when the IPv6 overlay is not probed;
	// Network6 the IPv6Network, whose sources' overlay6 probes we answer.
	Overlay6 netip.Addr
	Network6 netip.Prefix

	Interval  time.Duration // DefaultInterval
	MaxRate   float64       // DefaultMaxRate
	Timeout   time.Duration // DefaultTimeout
	DownAfter int           // DefaultDownAfter
	Logger    *slog.Logger
	// OnChange is called, from the prober's goroutines and without its lock, when a path of a
	// peer changes state (or starts or stops answering through ICMP). It must not block.
	OnChange func()
}

// retryDelay is how soon a path is probed again after a lost probe, to confirm a break
// quickly instead of an interval later.
const retryDelay = 100 * time.Millisecond

// addrCheckInterval is how often the prober looks whether our overlay address is on an
// interface (for the flag in replies, and host-gw's docker0 that comes and goes).
const addrCheckInterval = 2 * time.Second

// replyRate caps the replies a second per socket, so the responder cannot be made to flood.
const replyRate = 2000

// Prober probes peers and answers their probes. Its methods are safe for concurrent use.
type Prober struct {
	o      Options
	log    *slog.Logger
	conns  [numPaths]*net.UDPConn // by pathIndex; nil when the path cannot be probed from here
	why    [numPaths]string       // why conns[i] is nil
	nl     *netlink.Handle
	kick   chan struct{}
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu            sync.Mutex
	targets       map[netip.Prefix]*target
	queue         queue
	inflight      map[uint64]inflight
	order         []uint64 // sequence numbers in flight, oldest first (timeouts come in order)
	seq           uint64
	sends         bucket
	replies       [numPaths]bucket
	interval      time.Duration
	overlayUp     bool
	overlay6Up    bool
	nextAddrCheck time.Time
	publicIPs     map[netip.Addr]int // peers' PublicIPs (count of peers with each): whose underlay probes we answer
}

type target struct {
	peer    Peer
	paths   []*pathState // by pathIndex: overlay and underlay, and overlay6 when the peer has one
	removed bool
	// peerOverlayUp is what the peer's last underlay reply said of its overlay address: -1
	// not heard yet, 0 not up, 1 up.
	peerOverlayUp int8
}

type pathState struct {
	t         *target
	idx       int // pathIndex
	heapIndex int
	next      time.Time
	h         PathHealth
	lostInRow int
	win       window
}

type inflight struct {
	ps   *pathState
	sent time.Time
}

// numPaths counts every path a peer may have; allPaths names them by pathIndex.
const numPaths = 3

var allPaths = [numPaths]Path{Overlay, Underlay, Overlay6}

func pathIndex(p Path) int {
	switch p {
	case Overlay:
		return 0
	case Overlay6:
		return 2
	}
	return 1
}

// Start opens the sockets in the network namespace of the calling thread and starts probing
// (no peers yet: SetPeers) and answering. A path whose socket cannot be opened is reported
// "not probed" with the reason; an error only when neither can.
func Start(o Options) (*Prober, error) {
	if o.Port == 0 {
		o.Port = DefaultPort
	}
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.MaxRate <= 0 {
		o.MaxRate = DefaultMaxRate
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.DownAfter <= 0 {
		o.DownAfter = DefaultDownAfter
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	now := time.Now()
	p := &Prober{
		o: o, log: o.Logger, kick: make(chan struct{}, 1),
		targets: map[netip.Prefix]*target{}, inflight: map[uint64]inflight{}, publicIPs: map[netip.Addr]int{},
		seq:      rand.Uint64() >> 1, // a restarted prober never takes its predecessor's late replies for its own
		sends:    newBucket(o.MaxRate, max(1, o.MaxRate/10), now),
		replies:  [numPaths]bucket{newBucket(replyRate, replyRate/10, now), newBucket(replyRate, replyRate/10, now), newBucket(replyRate, replyRate/10, now)},
		interval: o.Interval,
	}
	port := o.Port
	if o.Ephemeral {
		port = 0
	}
	for i, addr := range [numPaths]netip.Addr{o.Overlay, o.Underlay, o.Overlay6} {
		if !addr.IsValid() {
			p.why[i] = "this host has no " + string(allPaths[i]) + " address to probe from"
			continue
		}
		c, err := listen(netip.AddrPortFrom(addr, uint16(port)))
		if err != nil {
			p.why[i] = err.Error()
			p.log.Warn("health: cannot listen; this path is not probed", "path", allPaths[i], "err", err)
			continue
		}
		p.conns[i] = c
	}
	if p.conns[0] == nil && p.conns[1] == nil {
		return nil, fmt.Errorf("health: no socket to probe from: overlay: %s; underlay: %s", p.why[0], p.why[1])
	}
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		p.closeConns()
		return nil, fmt.Errorf("health: netlink: %w", err)
	}
	p.nl = nl
	p.overlayUp, p.overlay6Up = p.addrUp(o.Overlay, p.overlayUp), p.addrUp(o.Overlay6, p.overlay6Up)
	p.nextAddrCheck = now.Add(addrCheckInterval)

	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	for i, c := range p.conns {
		if c != nil {
			p.wg.Add(1)
			go func() { defer p.wg.Done(); p.read(i, c) }()
		}
	}
	p.wg.Add(1)
	go func() { defer p.wg.Done(); p.run(ctx) }()
	return p, nil
}

// listen binds a UDP socket with IP_FREEBIND: our overlay address may not be on an interface
// yet (host-gw's docker0 comes with Docker) and the socket must still be there when it is. And
// with IP_RECVERR, so an ICMP port unreachable for one of our probes reaches us (see
// drainErrors). An IPv6 address (an IPv6-only overlay) takes the IPv6 twins of both options.
func listen(addr netip.AddrPort) (*net.UDPConn, error) {
	network, level, freebind, recverr := "udp4", unix.SOL_IP, unix.IP_FREEBIND, unix.IP_RECVERR
	if addr.Addr().Is6() {
		network, level, freebind, recverr = "udp6", unix.SOL_IPV6, unix.IPV6_FREEBIND, unix.IPV6_RECVERR
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var errFree, errRecv error
		err := c.Control(func(fd uintptr) {
			errFree = unix.SetsockoptInt(int(fd), level, freebind, 1)
			errRecv = unix.SetsockoptInt(int(fd), level, recverr, 1)
		})
		return errors.Join(err, errFree, errRecv)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, addr.String())
	if err != nil {
		return nil, fmt.Errorf("listen on UDP %v: %w", addr, err)
	}
	return pc.(*net.UDPConn), nil
}

// Close stops probing and answering and closes the sockets.
func (p *Prober) Close() {
	p.cancel()
	p.closeConns()
	p.wg.Wait()
	p.nl.Close()
}

func (p *Prober) closeConns() {
	for _, c := range p.conns {
		if c != nil {
			c.Close()
		}
	}
}

// LocalAddr is where the socket of path listens (tests and `xnetd check` report it).
func (p *Prober) LocalAddr(path Path) netip.AddrPort {
	c := p.conns[pathIndex(path)]
	if c == nil {
		return netip.AddrPort{}
	}
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Interval is how often each path of each peer is probed now (Options.Interval, longer with
// many peers).
func (p *Prober) Interval() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.interval
}

// SetPeers replaces the set of peers. A peer whose addresses changed starts over; the others
// keep their statistics. New peers are spread over one interval.
func (p *Prober) SetPeers(peers []Peer) {
	now := time.Now()
	p.mu.Lock()
	seen := make(map[netip.Prefix]bool, len(peers))
	for _, peer := range peers {
		key := peer.Subnet.Masked()
		seen[key] = true
		if t, ok := p.targets[key]; ok {
			if t.peer == peer {
				continue
			}
			p.removeLocked(key, t)
		}
		p.addLocked(key, peer, now)
	}
	for key, t := range p.targets {
		if !seen[key] {
			p.removeLocked(key, t)
		}
	}
	n := 0
	for _, t := range p.targets {
		n += len(t.paths)
	}
	p.interval = probeInterval(p.o.Interval, p.o.MaxRate, n)
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *Prober) addLocked(key netip.Prefix, peer Peer, now time.Time) {
	t := &target{peer: peer, peerOverlayUp: -1}
	interval := probeInterval(p.o.Interval, p.o.MaxRate, 2*(len(p.targets)+1))
	addrs := []netip.Addr{peer.Overlay, peer.PublicIP}
	if peer.Overlay6.IsValid() {
		addrs = append(addrs, peer.Overlay6)
	}
	t.paths = make([]*pathState, len(addrs))
	for i, addr := range addrs {
		ps := &pathState{t: t, idx: i, h: PathHealth{State: StateUnknown, Since: now, Target: addr}}
		ps.next = now.Add(time.Duration(rand.Float64() * float64(interval)))
		t.paths[i] = ps
		heap.Push(&p.queue, ps)
	}
	p.targets[key] = t
	p.publicIPs[peer.PublicIP]++
}

func (p *Prober) removeLocked(key netip.Prefix, t *target) {
	t.removed = true
	for _, ps := range t.paths {
		heap.Remove(&p.queue, ps.heapIndex)
	}
	delete(p.targets, key)
	if p.publicIPs[t.peer.PublicIP]--; p.publicIPs[t.peer.PublicIP] <= 0 {
		delete(p.publicIPs, t.peer.PublicIP)
	}
}

// Snapshot is every peer's health now, by subnet.
func (p *Prober) Snapshot() map[netip.Prefix]PeerHealth {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[netip.Prefix]PeerHealth, len(p.targets))
	for key, t := range p.targets {
		h := PeerHealth{Overlay: t.paths[0].health(), Underlay: t.paths[1].health()}
		if len(t.paths) > 2 {
			o6 := t.paths[2].health()
			h.Overlay6 = &o6
		}
		out[key] = h
	}
	return out
}

func (ps *pathState) health() PathHealth {
	h := ps.h
	h.Loss, h.WindowProbes, h.RTTP50 = ps.win.loss(), ps.win.n, Duration(ps.win.p50())
	return h
}

// settled says whether every path of every peer has a verdict: reachable, unreachable, or
// not probed for a reason that will not change while ProbeOnce waits.
func (p *Prober) settled() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.targets {
		u := t.paths[1].h.State
		for _, ps := range t.paths {
			switch ps.h.State {
			case StateReachable, StateUnreachable:
			case StateNotProbed:
				// An optional overlay waits for the underlay's answer, then for its flag.
				if ps.idx == 0 && t.peer.OverlayOptional && ps.h.Target.IsValid() &&
					(u == StateUnknown || t.peerOverlayUp == 1) {
					return false
				}
			default:
				return false
			}
		}
	}
	return true
}

// run sends due probes, expires unanswered ones and sleeps until the next thing is due.
func (p *Prober) run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-p.kick:
		}
		wait, changed := p.tick(time.Now())
		if changed {
			p.changed()
		}
		timer.Reset(wait)
	}
}

func (p *Prober) changed() {
	if p.o.OnChange != nil {
		p.o.OnChange()
	}
}

// tick does what is due at now and says how long until the next thing is.
func (p *Prober) tick(now time.Time) (wait time.Duration, changed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !now.Before(p.nextAddrCheck) {
		p.overlayUp, p.overlay6Up = p.addrUp(p.o.Overlay, p.overlayUp), p.addrUp(p.o.Overlay6, p.overlay6Up)
		p.nextAddrCheck = now.Add(addrCheckInterval)
	}
	changed = p.expireLocked(now)
	wait = p.nextAddrCheck.Sub(now)
	for p.queue.Len() > 0 {
		ps := p.queue[0]
		if d := ps.next.Sub(now); d > 0 {
			wait = min(wait, d)
			break
		}
		if why := p.skipLocked(ps); why != "" {
			changed = p.setStateLocked(ps, StateNotProbed, why, now) || changed
			p.rescheduleLocked(ps, now, p.jitter())
			continue
		}
		if !p.sends.take(now) {
			wait = min(wait, p.sends.wait())
			break
		}
		changed = p.sendLocked(ps, now) || changed
		p.rescheduleLocked(ps, now, p.jitter())
	}
	if p.inflightHeadLocked() {
		in := p.inflight[p.order[0]]
		wait = min(wait, in.sent.Add(p.o.Timeout).Sub(now))
	}
	return max(wait, time.Millisecond), changed
}

// jitter is the interval with +-20%: peers started together do not stay in step.
func (p *Prober) jitter() time.Duration {
	return time.Duration(float64(p.interval) * (0.8 + 0.4*rand.Float64()))
}

func (p *Prober) rescheduleLocked(ps *pathState, now time.Time, after time.Duration) {
	ps.next = now.Add(after)
	heap.Fix(&p.queue, ps.heapIndex)
}

// skipLocked says why ps is not probed now ("" when it is).
func (p *Prober) skipLocked(ps *pathState) string {
	if p.conns[ps.idx] == nil {
		return p.why[ps.idx]
	}
	if !ps.h.Target.IsValid() {
		if ps.t.peer.OverlayWhy != "" {
			return ps.t.peer.OverlayWhy
		}
		return "the peer has no " + string(allPaths[ps.idx]) + " address"
	}
	if ps.idx != 0 { // only the IPv4 overlay may be optional (host-gw's docker0)
		return ""
	}
	if p.o.OverlayOptional && !p.overlayUp {
		return fmt.Sprintf("this host has no %v yet (docker0's address, once Docker runs)", p.o.Overlay)
	}
	if ps.t.peer.OverlayOptional && ps.t.peerOverlayUp != 1 {
		return fmt.Sprintf("the peer has not said it holds %v yet (docker0's address, once Docker runs there)", ps.h.Target)
	}
	return ""
}

// sendLocked sends one request on ps (or counts it lost at once when it cannot leave).
func (p *Prober) sendLocked(ps *pathState, now time.Time) (changed bool) {
	if ps.h.State == StateNotProbed {
		p.setStateLocked(ps, StateUnknown, "", now)
	}
	ps.h.Sent++
	if ps.idx == 0 && !p.overlayUp {
		// Sending from an address no interface holds would put it on the underlay unencapsulated.
		return p.lostLocked(ps, now, fmt.Sprintf("our overlay address %v is on no interface here (its device is gone?)", p.o.Overlay))
	}
	if ps.idx == 2 && !p.overlay6Up {
		return p.lostLocked(ps, now, fmt.Sprintf("our IPv6 overlay address %v is on no interface here (its device is gone?)", p.o.Overlay6))
	}
	p.seq++
	msg := message{kind: kindRequest, seq: p.seq}.appendTo(make([]byte, 0, msgLen))
	if _, err := p.conns[ps.idx].WriteToUDPAddrPort(msg, netip.AddrPortFrom(ps.h.Target, uint16(p.o.Port))); err != nil {
		return p.lostLocked(ps, now, "send: "+unwrapOp(err).Error())
	}
	p.inflight[p.seq] = inflight{ps: ps, sent: now}
	p.order = append(p.order, p.seq)
	return false
}

func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Err
	}
	return err
}

// inflightHeadLocked drops answered entries from the front of order and says whether one is
// still waiting there.
func (p *Prober) inflightHeadLocked() bool {
	for len(p.order) > 0 {
		if _, ok := p.inflight[p.order[0]]; ok {
			return true
		}
		p.order = p.order[1:]
	}
	p.order = nil // let the backing array go
	return false
}

// expireLocked counts every probe older than Timeout as lost.
func (p *Prober) expireLocked(now time.Time) (changed bool) {
	for p.inflightHeadLocked() {
		seq := p.order[0]
		in := p.inflight[seq]
		if now.Sub(in.sent) < p.o.Timeout {
			break
		}
		delete(p.inflight, seq)
		p.order = p.order[1:]
		changed = p.lostLocked(in.ps, now, fmt.Sprintf("no answer within %v", p.o.Timeout)) || changed
	}
	return changed
}

// lostLocked records a lost probe of ps.
func (p *Prober) lostLocked(ps *pathState, now time.Time, why string) (changed bool) {
	if ps.t.removed {
		return false
	}
	ps.h.Lost++
	ps.lostInRow++
	ps.win.add(sample{lost: true})
	if ps.lostInRow >= p.o.DownAfter {
		why = fmt.Sprintf("%d probes in a row unanswered (last: %s)", ps.lostInRow, why)
		if ps.h.State == StateUnreachable {
			ps.h.Why = why
			return false
		}
		return p.setStateLocked(ps, StateUnreachable, why, now)
	}
	// Confirm soon rather than an interval later.
	if ps.next.Sub(now) > retryDelay {
		p.rescheduleLocked(ps, now, retryDelay)
	}
	return false
}

func (p *Prober) setStateLocked(ps *pathState, state, why string, now time.Time) (changed bool) {
	ps.h.Why = why
	if ps.h.State == state {
		return false
	}
	if state == StateUnreachable || ps.h.State == StateUnreachable {
		p.log.Info("health: peer "+string(allPaths[ps.idx])+" "+state, "subnet", ps.t.peer.Subnet,
			"target", ps.h.Target, "was", ps.h.State, "why", why)
	}
	ps.h.State, ps.h.Since = state, now
	return true
}

// read serves one socket: answers requests, matches replies to probes in flight.
func (p *Prober) read(idx int, c *net.UDPConn) {
	buf := make([]byte, 512)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// An ICMP error for one of our datagrams (IP_RECVERR): read the queue.
			p.drainErrors(idx, c)
			continue
		}
		m, ok := parseMessage(buf[:n])
		if !ok {
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		switch m.kind {
		case kindRequest:
			p.answer(idx, c, from, m)
		case kindReply:
			if p.reply(idx, from, m, time.Now(), false) {
				p.changed()
			}
		}
	}
}

// drainErrors reads the socket's error queue. An ICMP port unreachable for one of our probes
// is an answer too: the request crossed the path, the host sent the error back across it, and
// it runs no health responder (a flannel host in a mixed cluster, or an xnetd without probes
// or stopped, whose datapath stays up). Without this, such hosts would show as unreachable.
// Other errors (no ARP reply, no route) are left to the probe's timeout.
func (p *Prober) drainErrors(idx int, c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	buf, oob := make([]byte, 512), make([]byte, 512)
	for {
		var n, oobn int
		var from unix.Sockaddr
		var rerr error
		if err := rc.Read(func(fd uintptr) bool {
			n, oobn, _, from, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			return true
		}); err != nil || rerr != nil {
			return
		}
		var to netip.AddrPort
		switch sa := from.(type) {
		case *unix.SockaddrInet4:
			to = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
		case *unix.SockaddrInet6:
			to = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
		default:
			continue
		}
		if !portUnreachable(oob[:oobn]) {
			continue
		}
		// The queue holds what we sent: our request, with its sequence number.
		m, ok := parseMessage(buf[:n])
		if !ok || m.kind != kindRequest {
			continue
		}
		if p.reply(idx, to, message{kind: kindReply, seq: m.seq}, time.Now(), true) {
			p.changed()
		}
	}
}

// portUnreachable says whether the control messages of an error-queue read carry an ICMP
// destination unreachable, port unreachable (or ICMPv6's).
func portUnreachable(oob []byte) bool {
	const icmpDestUnreach, icmpPortUnreach = 3, 3
	const icmp6DestUnreach, icmp6PortUnreach = 1, 4
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		v4 := m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_RECVERR
		v6 := m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_RECVERR
		if !v4 && !v6 || len(m.Data) < int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			continue
		}
		ee := (*unix.SockExtendedErr)(unsafe.Pointer(&m.Data[0]))
		if v4 && ee.Origin == unix.SO_EE_ORIGIN_ICMP && ee.Type == icmpDestUnreach && ee.Code == icmpPortUnreach {
			return true
		}
		if v6 && ee.Origin == unix.SO_EE_ORIGIN_ICMP6 && ee.Type == icmp6DestUnreach && ee.Code == icmp6PortUnreach {
			return true
		}
	}
	return false
}

// answer replies to a request from a source allowed to probe us, within the reply rate.
func (p *Prober) answer(idx int, c *net.UDPConn, from netip.AddrPort, m message) {
	if p.o.Ephemeral {
		return
	}
	p.mu.Lock()
	allowed := (idx == 0 && p.o.Network.Contains(from.Addr())) || (idx == 1 && p.publicIPs[from.Addr()] > 0) ||
		(idx == 2 && p.o.Network6.Contains(from.Addr()))
	allowed = allowed && p.replies[idx].take(time.Now())
	var flags byte
	if p.overlayUp {
		flags |= flagOverlayUp
	}
	p.mu.Unlock()
	if !allowed {
		return
	}
	msg := message{kind: kindReply, flags: flags, seq: m.seq}.appendTo(make([]byte, 0, msgLen))
	if _, err := c.WriteToUDPAddrPort(msg, from); err != nil {
		p.log.Debug("health: reply", "path", allPaths[idx], "to", from, "err", err)
	}
}

// reply records the answer to one of our probes; noResponder: the answer was an ICMP port
// unreachable.
func (p *Prober) reply(idx int, from netip.AddrPort, m message, now time.Time, noResponder bool) (changed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	in, ok := p.inflight[m.seq]
	if !ok || in.ps.idx != idx || from != netip.AddrPortFrom(in.ps.h.Target, uint16(p.o.Port)) {
		return false // late (already counted lost), or not from where we sent it
	}
	delete(p.inflight, m.seq)
	ps := in.ps
	if ps.t.removed {
		return false
	}
	rtt := now.Sub(in.sent)
	ps.h.Answered++
	ps.h.RTTSum += rtt
	ps.h.RTTLast = Duration(rtt)
	ps.h.LastAnswer = now
	responderChanged := ps.h.NoResponder != noResponder
	ps.h.NoResponder = noResponder
	ps.lostInRow = 0
	ps.win.add(sample{rtt: rtt})
	if idx == 1 && !noResponder {
		up := int8(0)
		if m.flags&flagOverlayUp != 0 {
			up = 1
		}
		if ps.t.peerOverlayUp != up && ps.t.peer.OverlayOptional {
			// The overlay may be probed now (or no longer): look at once.
			p.rescheduleLocked(ps.t.paths[0], now, 0)
		}
		ps.t.peerOverlayUp = up
	}
	return p.setStateLocked(ps, StateReachable, "", now) || responderChanged
}

// addrUp says whether addr (our overlay address, or our IPv6 one) is on an interface of this
// host; was when the addresses cannot be listed.
func (p *Prober) addrUp(addr netip.Addr, was bool) bool {
	if !addr.IsValid() {
		return false
	}
	family := unix.AF_INET
	if addr.Is6() {
		family = unix.AF_INET6
	}
	addrs, err := p.nl.AddrList(nil, family)
	if err != nil {
		p.log.Debug("health: list addresses", "err", err)
		return was
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			return true
		}
	}
	return false
}

// queue orders path states by when they are due.
type queue []*pathState

func (q queue) Len() int           { return len(q) }
func (q queue) Less(i, j int) bool { return q[i].next.Before(q[j].next) }
func (q queue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].heapIndex, q[j].heapIndex = i, j
}
func (q *queue) Push(x any) {
	ps := x.(*pathState)
	ps.heapIndex = len(*q)
	*q = append(*q, ps)
}
func (q *queue) Pop() any {
	old := *q
	ps := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	ps.heapIndex = -1
	return ps
}
