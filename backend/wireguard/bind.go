package wireguard

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/xnet-dev/xnet/backend"
)

// udpBind is the embedded wireguard-go's UDP side (its conn.Bind) in place of conn.StdNetBind,
// with StdNetBind's sockets and options: IPv4 and IPv6 on the listen port, 7 MB buffers, the
// local address each datagram came to kept with the endpoint learnt from it (IP_PKTINFO) and
// used as the source of what we send back, UDP GSO on send and GRO on receive. They are opened
// in the backend's namespace, from whichever goroutine wireguard-go brings the device up on.
//
// What differs is how batches move, measured with perf on the 2-core VM (one TCP stream
// between the containers of two hosts; CPU relative to ChaCha20-Poly1305's, which is fixed per
// byte): StdNetBind copies every datagram of a GSO send into the first one's 64 KB buffer (the
// sender's largest copy, and it touches a cold 64 KB per batch), reads GRO'd datagrams into
// wireguard-go's own buffers, and goes through x/net's ReadBatch and WriteBatch, which allocate
// per call. Here a GSO send is one message whose iovecs are the datagrams where they lie
// (sender -7% CPU); GRO'd datagrams are read into two buffers of our own that stay in cache and
// copied once into wireguard-go's (receiver -6%); sendmmsg and recvmmsg use arrays kept per
// receiving goroutine and per send.
type udpBind struct {
	ns  netns.NsHandle
	log *slog.Logger

	mu    sync.Mutex
	socks []*bindSocket // IPv4 first, then IPv6 where the kernel has it; nil while closed
	mark  uint32

	sends sync.Pool // *sendBatch: Send runs on many goroutines at once
}

func newUDPBind(ns netns.NsHandle, log *slog.Logger) *udpBind {
	return &udpBind{ns: ns, log: log, sends: sync.Pool{New: func() any { return newSendBatch() }}}
}

// bindSocket is one of the bind's sockets.
type bindSocket struct {
	conn *net.UDPConn
	rc   syscall.RawConn
	v6   bool
	gro  bool        // the kernel coalesces what we receive (UDP_GRO)
	gso  atomic.Bool // we send coalesced datagrams (UDP_SEGMENT); off for good after an EIO
}

const (
	bindSocketBuffer = 7 << 20 // StdNetBind's: the most a default macOS allows, and plenty
	// udpMaxSegments is the most datagrams one GSO send may carry, and the most GRO merges into
	// one read (UDP_MAX_SEGMENTS was 64 before Linux 6.6, UDP_GRO_CNT_MAX is 64).
	udpMaxSegments = 64
	maxUDPPayload4 = 65535 - 20 - 8 // one IPv4 datagram's worth
	maxUDPPayload6 = 65535 - 8      // IPv6's payload length excludes its header
	// oobSpace is the room for the control messages of one message: a PKTINFO, and the
	// UDP_SEGMENT or UDP_GRO size.
	oobSpace = (unix.SizeofCmsghdr+unix.SizeofInet6Pktinfo+7)&^7 + (unix.SizeofCmsghdr+4+7)&^7
)

func (b *udpBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.socks != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	var socks []*bindSocket
	err := backend.InNamespace(b.ns, func() error {
		var err error
		socks, port, err = b.listen(port)
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	var fns []conn.ReceiveFunc
	for _, s := range socks {
		if b.mark != 0 {
			if err := s.setMark(b.mark); err != nil {
				closeAll(socks)
				return nil, 0, err
			}
		}
		r := newReceiver(s)
		if s.v6 {
			fns = append(fns, r.receiveIPv6)
		} else {
			fns = append(fns, r.receiveIPv4)
		}
	}
	b.socks = socks
	return fns, port, nil
}

// listen opens the IPv4 and the IPv6 socket on port, as StdNetBind does: either may be missing
// (EAFNOSUPPORT) but not both, and port 0 picks one both can have.
func (b *udpBind) listen(port uint16) ([]*bindSocket, uint16, error) {
	for tries := 0; ; tries++ {
		var socks []*bindSocket
		s4, p, err := listenUDP("udp4", port)
		if err != nil && !errors.Is(err, syscall.EAFNOSUPPORT) {
			return nil, 0, err
		}
		if s4 != nil {
			socks = append(socks, s4)
		} else {
			p = port
		}
		s6, p6, err := listenUDP("udp6", p)
		if port == 0 && errors.Is(err, syscall.EADDRINUSE) && tries < 100 {
			closeAll(socks)
			continue
		}
		if err != nil && !errors.Is(err, syscall.EAFNOSUPPORT) {
			closeAll(socks)
			return nil, 0, err
		}
		if s6 != nil {
			socks = append(socks, s6)
			p = p6
		}
		if len(socks) == 0 {
			return nil, 0, fmt.Errorf("wireguard: listen on port %d: %w", port, syscall.EAFNOSUPPORT)
		}
		return socks, p, nil
	}
}

func closeAll(socks []*bindSocket) {
	for _, s := range socks {
		s.conn.Close()
	}
}

// listenUDP opens network ("udp4" or "udp6") on port with StdNetBind's socket options.
func listenUDP(network string, port uint16) (*bindSocket, uint16, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		cerr := rc.Control(func(fd uintptr) {
			for _, opt := range []int{unix.SO_RCVBUF, unix.SO_SNDBUF, unix.SO_RCVBUFFORCE, unix.SO_SNDBUFFORCE} {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, bindSocketBuffer) // as large as allowed
			}
			if network == "udp4" {
				err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
			} else {
				err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
				if err == nil {
					err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
				}
			}
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) // read back below
		})
		return errors.Join(cerr, err)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, ":"+strconv.Itoa(int(port)))
	if err != nil {
		return nil, 0, err
	}
	c := pc.(*net.UDPConn)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, 0, err
	}
	s := &bindSocket{conn: c, rc: rc, v6: network == "udp6"}
	_ = rc.Control(func(fd uintptr) {
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		s.gso.Store(err == nil)
		gro, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO)
		s.gro = err == nil && gro == 1
	})
	return s, uint16(c.LocalAddr().(*net.UDPAddr).Port), nil
}

func (s *bindSocket) setMark(mark uint32) error {
	var err error
	if cerr := s.rc.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
	}); cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("wireguard: set the firewall mark %#x on the UDP socket: %w", mark, err)
	}
	return nil
}

func (b *udpBind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	for _, s := range b.socks {
		errs = append(errs, s.conn.Close())
	}
	b.socks = nil
	return errors.Join(errs...)
}

func (b *udpBind) SetMark(mark uint32) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.mark = mark
	for _, s := range b.socks {
		if err := s.setMark(mark); err != nil {
			return err
		}
	}
	return nil
}

func (b *udpBind) BatchSize() int { return conn.IdealBatchSize }

func (b *udpBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &endpoint{dst: ap}, nil
}

// socket is the open socket for addresses like a, or nil.
func (b *udpBind) socket(a netip.Addr) *bindSocket {
	b.mu.Lock()
	defer b.mu.Unlock()
	v6 := a.Is6() && !a.Is4In6()
	for _, s := range b.socks {
		if s.v6 == v6 {
			return s
		}
	}
	return nil
}

func (b *udpBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	e, ok := ep.(*endpoint)
	if !ok {
		return conn.ErrWrongEndpointType
	}
	s := b.socket(e.dst.Addr())
	if s == nil {
		return syscall.EAFNOSUPPORT // closed, or no socket of the endpoint's family: as StdNetBind
	}
	sb := b.sends.Get().(*sendBatch)
	defer b.sends.Put(sb)
	gso := s.gso.Load()
	sb.prepare(bufs, e, s.v6, gso)
	err := sb.send(s.rc)
	if gso && errors.Is(err, unix.EIO) {
		// A NIC without checksum offload on the way refuses UDP_SEGMENT with EIO (udp(7)):
		// send one datagram per packet from now on, as StdNetBind does.
		s.gso.Store(false)
		b.log.Warn("UDP GSO refused by the kernel: sending one datagram per packet", "peer", e.dst, "err", err)
		sb.prepare(bufs, e, s.v6, false)
		err = sb.send(s.rc)
	}
	if err != nil {
		return fmt.Errorf("send to %s: %w", e.dst, err)
	}
	return nil
}

// endpoint is a peer's address and, once the peer has sent to us, the local address it sent
// to (the PKTINFO control message it came with), which we send back from.
type endpoint struct {
	dst netip.AddrPort
	// src is the received control message, sent with every datagram to dst; nil when unknown
	// or cleared. wireguard-go clears it from one goroutine while another sends.
	src atomic.Pointer[[]byte]
}

func (e *endpoint) ClearSrc()           { e.src.Store(nil) }
func (e *endpoint) DstIP() netip.Addr   { return e.dst.Addr() }
func (e *endpoint) DstToString() string { return e.dst.String() }
func (e *endpoint) SrcToString() string { return e.SrcIP().String() }

// DstToBytes is what WireGuard's cookies are computed over, as StdNetEndpoint makes it.
func (e *endpoint) DstToBytes() []byte {
	b, _ := e.dst.MarshalBinary()
	return b
}

func (e *endpoint) SrcIP() netip.Addr {
	p := e.src.Load()
	if p == nil {
		return netip.Addr{}
	}
	c := (*unix.Cmsghdr)(unsafe.Pointer(&(*p)[0]))
	data := unsafe.Pointer(&(*p)[unix.CmsgLen(0)])
	if c.Level == unix.IPPROTO_IPV6 {
		return netip.AddrFrom16((*unix.Inet6Pktinfo)(data).Addr)
	}
	return netip.AddrFrom4((*unix.Inet4Pktinfo)(data).Spec_dst)
}

// mmsghdr is struct mmsghdr (sys/socket.h): a msghdr and the byte count the kernel fills in.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// sendBatch is one Send's arrays: at most one message per packet, one iovec per packet.
type sendBatch struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	oob   []byte // oobSpace per message
	name  unix.RawSockaddrInet6
	name4 unix.RawSockaddrInet4

	from   int // first message not sent yet
	err    error
	sendFn func(fd uintptr) bool
}

func newSendBatch() *sendBatch {
	sb := &sendBatch{hdrs: make([]mmsghdr, 0, conn.IdealBatchSize), iovs: make([]unix.Iovec, 0, conn.IdealBatchSize),
		oob: make([]byte, conn.IdealBatchSize*oobSpace)}
	sb.sendFn = sb.doSend
	return sb
}

// prepare turns bufs into messages to e: with gso, runs of equal-sized datagrams (the last of
// a run may be shorter, which ends it) of at most udpMaxSegments and one IP datagram's worth
// become one message with UDP_SEGMENT, the datagrams its iovecs in place.
func (sb *sendBatch) prepare(bufs [][]byte, e *endpoint, v6, gso bool) {
	if len(bufs) > cap(sb.iovs) {
		// Never for wireguard-go (at most BatchSize); grown up front, since the messages point
		// into these arrays as they are filled.
		sb.hdrs, sb.iovs, sb.oob = make([]mmsghdr, 0, len(bufs)), make([]unix.Iovec, 0, len(bufs)), make([]byte, len(bufs)*oobSpace)
	}
	sb.hdrs, sb.iovs, sb.from, sb.err = sb.hdrs[:0], sb.iovs[:0], 0, nil
	var namePtr *byte
	var nameLen uint32
	if v6 {
		sb.name = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: e.dst.Addr().As16()}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sb.name.Port))[:], e.dst.Port())
		namePtr, nameLen = (*byte)(unsafe.Pointer(&sb.name)), unix.SizeofSockaddrInet6
	} else {
		sb.name4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: e.dst.Addr().Unmap().As4()}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sb.name4.Port))[:], e.dst.Port())
		namePtr, nameLen = (*byte)(unsafe.Pointer(&sb.name4)), unix.SizeofSockaddrInet4
	}
	maxPayload := maxUDPPayload4
	if v6 {
		maxPayload = maxUDPPayload6
	}
	var src []byte
	if p := e.src.Load(); p != nil {
		src = *p
	}
	var (
		segSize, segs, bytes int
		ended                bool
	)
	closeMessage := func() {
		if len(sb.hdrs) == 0 {
			return
		}
		h := &sb.hdrs[len(sb.hdrs)-1]
		oob := sb.oob[(len(sb.hdrs)-1)*oobSpace:][:oobSpace]
		n := copy(oob, src)
		if segs > 1 {
			c := (*unix.Cmsghdr)(unsafe.Pointer(&oob[n]))
			c.Level, c.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
			c.SetLen(unix.CmsgLen(2))
			binary.NativeEndian.PutUint16(oob[n+unix.CmsgLen(0):], uint16(segSize))
			n += unix.CmsgSpace(2)
		}
		if n > 0 {
			h.hdr.Control = &oob[0]
			h.hdr.SetControllen(n)
		}
		h.hdr.SetIovlen(segs)
	}
	for _, b := range bufs {
		if gso && segs > 0 && !ended && len(b) <= segSize && bytes+len(b) <= maxPayload && segs < udpMaxSegments {
			sb.iovs = append(sb.iovs, iovec(b))
			segs++
			bytes += len(b)
			ended = len(b) < segSize
			continue
		}
		closeMessage()
		sb.iovs = append(sb.iovs, iovec(b))
		sb.hdrs = append(sb.hdrs, mmsghdr{})
		h := &sb.hdrs[len(sb.hdrs)-1]
		h.hdr.Name, h.hdr.Namelen = namePtr, nameLen
		h.hdr.Iov = &sb.iovs[len(sb.iovs)-1]
		segSize, segs, bytes, ended = len(b), 1, len(b), false
	}
	closeMessage()
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{}
	if len(b) > 0 {
		v.Base = &b[0]
		v.SetLen(len(b))
	}
	return v
}

// send sends the prepared messages, waiting while the socket buffer is full.
func (sb *sendBatch) send(rc syscall.RawConn) error {
	for sb.from < len(sb.hdrs) {
		if err := rc.Write(sb.sendFn); err != nil {
			return err
		}
		if sb.err != nil {
			return sb.err
		}
	}
	return nil
}

func (sb *sendBatch) doSend(fd uintptr) bool {
	r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&sb.hdrs[sb.from])), uintptr(len(sb.hdrs)-sb.from), 0, 0, 0)
	switch {
	case errno == unix.EAGAIN:
		return false
	case errno != 0:
		sb.err = os.NewSyscallError("sendmmsg", errno)
	default:
		sb.from += int(r)
	}
	return true
}

// receiver is one socket's receiving side, used by the one goroutine wireguard-go runs for it.
type receiver struct {
	s *bindSocket
	// With GRO, datagrams are read into bufs (each up to 64 KB of one sender's coalesced
	// datagrams) and copied out; without, straight into wireguard-go's buffers.
	bufs  [][]byte
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for either family
	oob   []byte                  // oobSpace per message

	count  int // messages asked for
	n      int // messages read
	err    error
	recvFn func(fd uintptr) bool
}

func newReceiver(s *bindSocket) *receiver {
	n := conn.IdealBatchSize
	r := &receiver{s: s}
	if s.gro {
		n = conn.IdealBatchSize / udpMaxSegments // each fills up to udpMaxSegments of ours
		for range n {
			r.bufs = append(r.bufs, make([]byte, 65536))
		}
	}
	r.hdrs, r.iovs, r.names, r.oob = make([]mmsghdr, n), make([]unix.Iovec, n), make([]unix.RawSockaddrInet6, n), make([]byte, n*oobSpace)
	r.recvFn = r.doRecv
	return r
}

// receiveIPv4 and receiveIPv6 are receive under the names wireguard-go logs them by.
func (r *receiver) receiveIPv4(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	return r.receive(packets, sizes, eps)
}

func (r *receiver) receiveIPv6(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	return r.receive(packets, sizes, eps)
}

func (r *receiver) receive(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	into := r.bufs
	if !r.s.gro {
		into = packets
	}
	r.count = min(len(into), len(r.hdrs))
	if r.s.gro {
		r.count = min(r.count, max(1, len(packets)/udpMaxSegments))
	}
	for i := range r.count {
		r.iovs[i] = iovec(into[i])
		r.hdrs[i] = mmsghdr{}
		h := &r.hdrs[i].hdr
		h.Name, h.Namelen = (*byte)(unsafe.Pointer(&r.names[i])), unix.SizeofSockaddrInet6
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
		h.Control = &r.oob[i*oobSpace]
		h.SetControllen(oobSpace)
	}
	if err := r.s.rc.Read(r.recvFn); err != nil {
		return 0, err // net.ErrClosed once the bind is closed
	}
	if r.err != nil {
		return 0, r.err
	}
	k := 0
	for i := range r.n {
		h := &r.hdrs[i]
		if h.hdr.Flags&unix.MSG_TRUNC != 0 {
			continue // larger than any WireGuard message
		}
		data := into[i][:h.n]
		ep, segSize := r.endpoint(i)
		if !r.s.gro {
			sizes[k], eps[k] = len(data), ep
			k++
			continue
		}
		if segSize <= 0 || segSize > len(data) {
			segSize = len(data)
		}
		for len(data) > 0 && k < len(packets) {
			seg := data[:min(segSize, len(data))]
			sizes[k] = copy(packets[k], seg)
			eps[k] = ep
			k++
			data = data[len(seg):]
		}
	}
	return k, nil
}

func (r *receiver) doRecv(fd uintptr) bool {
	n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(r.count), 0, 0, 0)
	switch {
	case errno == unix.EAGAIN:
		return false
	case errno != 0:
		r.n, r.err = 0, os.NewSyscallError("recvmmsg", errno)
	default:
		r.n, r.err = int(n), nil
	}
	return true
}

// endpoint makes the endpoint message i came from (a new one per message, as StdNetBind
// does: wireguard-go keeps it as the peer's and may clear its source) and reads its GRO
// segment size (0 if it is one datagram).
func (r *receiver) endpoint(i int) (*endpoint, int) {
	name := &r.names[i]
	e := &endpoint{}
	if name.Family == unix.AF_INET6 {
		e.dst = netip.AddrPortFrom(netip.AddrFrom16(name.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&name.Port))[:]))
	} else {
		n4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(name))
		e.dst = netip.AddrPortFrom(netip.AddrFrom4(n4.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&n4.Port))[:]))
	}
	segSize := 0
	oob := r.oob[i*oobSpace:][:r.hdrs[i].hdr.Controllen]
	for len(oob) > unix.SizeofCmsghdr {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			break
		}
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO, h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO:
			// Kept whole (header included) to be sent back as it is.
			src := make([]byte, unix.CmsgSpace(len(data)))
			copy(src, oob[:unix.CmsgLen(len(data))])
			e.src.Store(&src)
		case h.Level == unix.IPPROTO_UDP && h.Type == unix.UDP_GRO && len(data) >= 4:
			segSize = int(binary.NativeEndian.Uint32(data)) // an int, as udp_cmsg_recv puts it
		}
		oob = rest
	}
	return e, segSize
}
