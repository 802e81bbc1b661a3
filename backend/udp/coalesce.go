package udp

import (
	"encoding/binary"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Receive-side coalescing without copies.
//
// The first version handed every accepted inner packet to wireguard-go's TUN Write, which
// coalesces runs of one TCP flow into one large segment - but it needs each packet in its own
// 64 KB buffer (one copy out of the receive buffer) and appends payloads to the first one (a
// second copy) before the kernel copies the result a third time. Measured on the 2-core
// test VM, those copies and the per-packet bookkeeping were a fifth of the datapath's CPU.
//
// coalescer does the same coalescing by reference: the packets stay where recvmmsg put them,
// a group of segments of one flow is written with one writev - a virtio-net header, one
// rewritten IPv4/TCP header, then every segment's payload straight from the receive buffer -
// and the kernel's single copy is the only one. It follows the rules of Linux's own TCP GRO
// (tcp_gro_receive): same addresses, ports, ack, window and options, consecutive sequence
// numbers, equal segment sizes with only the last one shorter, no flags but ACK and a PSH on
// the last. Every segment's checksum is verified before it joins a group: once merged, the
// kernel trusts the group's checksum, so a corrupted segment must stay out (written alone, the
// receiver drops it as it would without us). One group is open at a time: a GRO'd message
// carries consecutive segments of one sender's flow, which is where coalescing pays.

// coalescer is one rx queue's writer to its TUN queue. Packets handed to add must stay valid
// until flush.
type coalescer struct {
	rc      syscall.RawConn
	vnetHdr bool // the TUN takes a virtio-net header (else: one plain write per packet)

	// The open group.
	n       int      // segments in it
	first   []byte   // the first packet (its headers are the group's)
	pays    [][]byte // payloads of segments 2..n
	segSize int      // payload size of the first segment
	nextSeq uint32
	total   int  // bytes of the coalesced packet
	closed  bool // a shorter segment or a PSH ended it: nothing more may join
	psh     bool

	hdr  [virtioNetHdrLen + 60 + 60]byte // virtio-net header + rewritten IPv4 and TCP headers
	iov  [][]byte
	errs int // writes the kernel refused since the last take
	last error

	// writeFn is doWrite as a method value made once: a closure passed to RawConn.Write
	// would be allocated on every write. werr is its result. iovecs is iov for the kernel,
	// kept here because unix.Writev allocates one per call.
	writeFn func(fd uintptr) bool
	werr    error
	iovecs  []unix.Iovec
}

const maxCoalesce = 64 // segments per group: what a 64 KB write holds at MTU 1450 and more

var zeroVirtioHdr [virtioNetHdrLen]byte

func newCoalescer(rc syscall.RawConn, vnetHdr bool) *coalescer {
	c := &coalescer{rc: rc, vnetHdr: vnetHdr, pays: make([][]byte, 0, maxCoalesce), iov: make([][]byte, 0, maxCoalesce+2),
		iovecs: make([]unix.Iovec, 0, maxCoalesce+2)}
	c.writeFn = c.doWrite
	return c
}

// add queues one accepted inner IPv4 packet.
func (c *coalescer) add(pkt []byte) {
	if !c.vnetHdr {
		c.writeOne(pkt)
		return
	}
	seq, payLen, psh, ok := c.tcpSegment(pkt)
	if !ok {
		c.flush()
		c.writeOne(pkt)
		return
	}
	if c.n > 0 && c.joins(pkt, seq, payLen) {
		c.pays = append(c.pays, pkt[len(pkt)-payLen:])
		c.n++
		c.total += payLen
		c.nextSeq = seq + uint32(payLen)
		c.closed = payLen < c.segSize || psh
		c.psh = psh
		return
	}
	c.flush()
	c.n, c.first, c.segSize = 1, pkt, payLen
	c.nextSeq, c.total, c.closed, c.psh = seq+uint32(payLen), len(pkt), psh, psh
}

// tcpSegment reports whether pkt is a TCP segment that may take part in coalescing: IPv4
// without options, not a fragment, a data segment with a good checksum and no flag but ACK
// and PSH.
func (c *coalescer) tcpSegment(pkt []byte) (seq uint32, payLen int, psh, ok bool) {
	if len(pkt) < 40 || pkt[0] != 0x45 || pkt[9] != unix.IPPROTO_TCP || binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 {
		return 0, 0, false, false
	}
	thl := int(pkt[32]>>4) * 4
	if thl < 20 || 20+thl >= len(pkt) {
		return 0, 0, false, false // no payload (a pure ACK) or a bad header
	}
	const allowed = 0x10 | 0x08 // ACK | PSH
	if flags := pkt[33]; flags&^allowed != 0 || flags&0x10 == 0 {
		return 0, 0, false, false
	}
	if fold(pseudoHeaderSum(pkt, len(pkt)-20)+onesSum(pkt[20:])) != 0xffff {
		return 0, 0, false, false // corrupt: stays alone, the kernel drops it
	}
	return binary.BigEndian.Uint32(pkt[24:28]), len(pkt) - 20 - thl, pkt[33]&0x08 != 0, true
}

// joins reports whether a segment can extend the open group.
func (c *coalescer) joins(pkt []byte, seq uint32, payLen int) bool {
	f := c.first
	thl := int(f[32]>>4) * 4
	switch {
	case c.closed, c.n >= maxCoalesce, seq != c.nextSeq, payLen > c.segSize, c.total+payLen > maxPacket:
		return false
	case len(pkt)-payLen != 20+thl: // header length
		return false
	case f[1] != pkt[1], f[8] != pkt[8], f[6]&0x40 != pkt[6]&0x40: // TOS, TTL, DF
		return false
	case string(f[12:20]) != string(pkt[12:20]), string(f[20:24]) != string(pkt[20:24]): // addresses, ports
		return false
	case string(f[28:32]) != string(pkt[28:32]), string(f[34:36]) != string(pkt[34:36]): // ack, window
		return false
	case string(f[40:20+thl]) != string(pkt[40:20+thl]): // options (timestamps)
		return false
	}
	return true
}

// flush writes the open group: one segment as it is, several as one TSO packet.
func (c *coalescer) flush() {
	if c.n == 0 {
		return
	}
	if c.n == 1 {
		c.writeOne(c.first)
		c.n = 0
		return
	}
	f := c.first
	thl := int(f[32]>>4) * 4
	hl := 20 + thl
	h := c.hdr[virtioNetHdrLen : virtioNetHdrLen+hl]
	copy(h, f[:hl])
	// IPv4: new total length and header checksum.
	binary.BigEndian.PutUint16(h[2:4], uint16(c.total))
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:12], ^fold(onesSum(h[:20])))
	if c.psh {
		h[33] |= 0x08
	}
	// TCP: the checksum is left to whoever needs it (CHECKSUM_PARTIAL): the field holds the
	// pseudo-header sum for the whole length, as the kernel's own TSO packets do.
	binary.BigEndian.PutUint16(h[36:38], fold(pseudoHeaderSum(h, c.total-20)))
	v := c.hdr[:virtioNetHdrLen]
	v[0] = virtioNetHdrFNeedsCsum
	v[1] = virtioNetHdrGSOTCPv4
	binary.NativeEndian.PutUint16(v[2:], uint16(hl))
	binary.NativeEndian.PutUint16(v[4:], uint16(c.segSize))
	binary.NativeEndian.PutUint16(v[6:], 20)
	binary.NativeEndian.PutUint16(v[8:], tcpChecksumOffset)
	c.iov = append(c.iov[:0], c.hdr[:virtioNetHdrLen+hl], f[hl:])
	c.iov = append(c.iov, c.pays...)
	c.writev()
	c.n = 0
	c.pays = c.pays[:0]
}

func (c *coalescer) writeOne(pkt []byte) {
	if c.vnetHdr {
		c.iov = append(c.iov[:0], zeroVirtioHdr[:], pkt)
	} else {
		c.iov = append(c.iov[:0], pkt)
	}
	c.writev()
}

func (c *coalescer) writev() {
	c.werr = nil
	err := c.rc.Write(c.writeFn)
	if err == nil {
		err = c.werr
	}
	if err != nil {
		c.errs++
		c.last = err
	}
}

func (c *coalescer) doWrite(fd uintptr) bool {
	c.iovecs = c.iovecs[:0]
	for _, b := range c.iov {
		if len(b) > 0 {
			v := unix.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			c.iovecs = append(c.iovecs, v)
		}
	}
	c.werr = nil
	if len(c.iovecs) == 0 {
		return true
	}
	_, _, errno := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&c.iovecs[0])), uintptr(len(c.iovecs)))
	if errno == unix.EAGAIN {
		return false
	}
	if errno != 0 {
		c.werr = errno
	}
	return true
}

// takeErrors returns the number of refused writes since the last call and the last error.
func (c *coalescer) takeErrors() (int, error) {
	n, err := c.errs, c.last
	c.errs, c.last = 0, nil
	return n, err
}
