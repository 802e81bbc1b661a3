package udp

import (
	"encoding/binary"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Batched socket I/O without allocations.
//
// The first version used x/net's ipv4.PacketConn ReadBatch/WriteBatch. Both allocate on every
// call - the mmsghdr array, an iovec array per message, a sockaddr buffer per message and, on
// receive, a *net.UDPAddr per datagram - and the closures handed to RawConn.Read/Write escape
// too: a few hundred bytes of garbage per system call, tens of thousands of calls a second.
// mmsgBatch keeps every array for the life of its goroutine and reads the source address as
// the raw sockaddr.

// mmsghdr is struct mmsghdr (sys/socket.h): a msghdr and the byte count the kernel fills in.
// Go pads it exactly as C does (to 64 bytes on 64-bit platforms).
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// mmsgBatch is one goroutine's reusable sendmmsg/recvmmsg state. Not safe for concurrent use.
type mmsgBatch struct {
	// limit is the number of messages callers put in one batch. The arrays grow past it if
	// need be (a message's pointers into an older array stay valid: the kernel reads them at
	// send, and the old array is kept alive by them), so add never fails.
	limit int
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet4
	count int // messages prepared by add / buffers given by newRecvBatch

	// The result of the last system call, set by the functions RawConn runs (kept as method
	// values so that no closure is allocated per call).
	n      int
	err    error
	sendFn func(fd uintptr) bool
	recvFn func(fd uintptr) bool
}

func newMmsgBatch(messages, iovecs int) *mmsgBatch {
	b := &mmsgBatch{
		limit: messages,
		hdrs:  make([]mmsghdr, 0, messages),
		iovs:  make([]unix.Iovec, 0, iovecs),
		names: make([]unix.RawSockaddrInet4, 0, messages),
	}
	b.sendFn = b.doSend
	b.recvFn = b.doRecv
	return b
}

// reset forgets the prepared messages.
func (b *mmsgBatch) reset() {
	b.count = 0
	b.hdrs, b.iovs, b.names = b.hdrs[:0], b.iovs[:0], b.names[:0]
}

// add prepares one datagram to ip:port made of bufs, with control message oob (may be nil).
// bufs and oob must stay unchanged until send returns.
func (b *mmsgBatch) add(bufs [][]byte, ip [4]byte, port int, oob []byte) {
	first := len(b.iovs)
	for _, buf := range bufs {
		iov := unix.Iovec{}
		if len(buf) > 0 {
			iov.Base = &buf[0]
			iov.SetLen(len(buf))
		}
		b.iovs = append(b.iovs, iov)
	}
	b.names = append(b.names, unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ip})
	name := &b.names[b.count]
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&name.Port))[:], uint16(port))
	b.hdrs = append(b.hdrs, mmsghdr{})
	h := &b.hdrs[b.count]
	h.hdr.Name = (*byte)(unsafe.Pointer(name))
	h.hdr.Namelen = unix.SizeofSockaddrInet4
	if len(bufs) > 0 {
		h.hdr.Iov = &b.iovs[first]
		h.hdr.SetIovlen(len(bufs))
	}
	if len(oob) > 0 {
		h.hdr.Control = &oob[0]
		h.hdr.SetControllen(len(oob))
	}
	b.count++
}

// send sends the prepared messages from index from on with one sendmmsg, waiting while the
// socket buffer is full. It returns how many were sent, as sendmmsg(2) does: an error only
// when the first of them failed.
func (b *mmsgBatch) send(rc syscall.RawConn, from int) (int, error) {
	if from >= b.count {
		return 0, nil
	}
	b.n, b.err = from, nil // doSend reads where to start from n
	if err := rc.Write(b.sendFn); err != nil {
		return 0, err
	}
	return b.n, b.err
}

func (b *mmsgBatch) doSend(fd uintptr) bool {
	from := b.n
	r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[from])), uintptr(b.count-from), 0, 0, 0)
	if errno == unix.EAGAIN {
		return false
	}
	b.n, b.err = int(r), nil
	if errno != 0 {
		b.n, b.err = 0, errno
	}
	return true
}

// recvBatch is the receive side: bufs[i] takes datagram i, oobs[i] its control messages.
type recvBatch struct {
	*mmsgBatch
	bufs [][]byte
	oobs [][]byte
}

func newRecvBatch(messages, size, oobSize int) *recvBatch {
	r := &recvBatch{mmsgBatch: newMmsgBatch(messages, messages)}
	r.hdrs, r.names = r.hdrs[:messages], r.names[:messages]
	for range messages {
		r.bufs = append(r.bufs, make([]byte, size))
		r.oobs = append(r.oobs, make([]byte, oobSize))
	}
	return r
}

// recv reads up to len(bufs) datagrams with one recvmmsg, waiting for the first.
func (r *recvBatch) recv(rc syscall.RawConn) (int, error) {
	r.iovs = r.iovs[:0]
	for i := range r.bufs {
		r.iovs = append(r.iovs, unix.Iovec{Base: &r.bufs[i][0]})
		r.iovs[i].SetLen(len(r.bufs[i]))
		h := &r.hdrs[i]
		*h = mmsghdr{}
		h.hdr.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.hdr.Namelen = unix.SizeofSockaddrInet4
		h.hdr.Iov = &r.iovs[i]
		h.hdr.SetIovlen(1)
		h.hdr.Control = &r.oobs[i][0]
		h.hdr.SetControllen(len(r.oobs[i]))
	}
	r.count = len(r.bufs)
	if err := rc.Read(r.recvFn); err != nil {
		return 0, err
	}
	return r.n, r.err
}

func (b *mmsgBatch) doRecv(fd uintptr) bool {
	r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(b.count), 0, 0, 0)
	if errno == unix.EAGAIN {
		return false
	}
	b.n, b.err = int(r), nil
	if errno != 0 {
		b.n, b.err = 0, errno
	}
	return true
}

// datagram returns what recv read into message i: the payload, the control messages, the
// flags (MSG_TRUNC, ...) and the IPv4 source address (ok false if it is not one).
func (r *recvBatch) datagram(i int) (data, oob []byte, flags int, src [4]byte, ok bool) {
	h := &r.hdrs[i]
	data = r.bufs[i][:h.n]
	oob = r.oobs[i][:h.hdr.Controllen]
	name := &r.names[i]
	ok = h.hdr.Namelen >= unix.SizeofSockaddrInet4 && name.Family == unix.AF_INET
	return data, oob, int(h.hdr.Flags), name.Addr, ok
}
