package tunoffload

import (
	"encoding/binary"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Receive-side coalescing without copies.
//
// wireguard-go's TUN Write coalesces runs of one TCP flow into one large segment too, but it
// needs each packet in its own 64 KB buffer and appends the payloads to the first one (a copy)
// before the kernel copies the result again. Measured on the 2-core test VM for the udp
// backend, those copies and the per-packet bookkeeping were a fifth of the datapath's CPU.
//
// Coalescer does the same coalescing by reference: the packets stay where they are, a group of
// segments of one flow is written with one writev - a virtio-net header, one rewritten
// IPv4/TCP header, then every segment's payload where it lies - and the kernel's single copy
// is the only one. It follows the rules of Linux's own TCP GRO (tcp_gro_receive): same
// addresses, ports, ack, window and options, consecutive sequence numbers, equal segment sizes
// with only the last one shorter, no flags but ACK and a PSH on the last. Once merged, the
// kernel trusts the group's checksum (CHECKSUM_PARTIAL), so with Verify every segment's
// checksum is checked before it joins a group and a corrupted one stays out (written alone,
// the receiver drops it as it would without us). One group is open at a time: a GRO'd
// datagram carries consecutive segments of one sender's flow, which is where coalescing pays.

// Coalescer is one writer to a TUN queue. Packets handed to Add must stay valid until Flush.
// Not safe for concurrent use.
type Coalescer struct {
	rc      syscall.RawConn
	vnetHdr bool // the TUN takes a virtio-net header (else: one plain write per packet)
	verify  bool // check each segment's checksum before it joins a group

	// The open group.
	n       int      // segments in it
	first   []byte   // the first packet (its headers are the group's)
	pays    [][]byte // payloads of segments 2..n
	segSize int      // payload size of the first segment
	nextSeq uint32
	total   int  // bytes of the coalesced packet
	closed  bool // a shorter segment or a PSH ended it: nothing more may join
	psh     bool

	hdr  [HdrLen + 60 + 60]byte // virtio-net header + rewritten IPv4 and TCP headers
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

const maxCoalesce = 64 // segments per group: what a 64 KB write holds at MTU 1420 and more

var zeroVirtioHdr [HdrLen]byte

// NewCoalescer writes to the TUN queue rc, which takes a virtio-net header if vnetHdr (else
// every packet is written as it is). verify checks each TCP segment's checksum before it
// joins a group: a datapath must, unless something stronger than the checksum already
// guarantees the segment is what its sender checksummed.
func NewCoalescer(rc syscall.RawConn, vnetHdr, verify bool) *Coalescer {
	c := &Coalescer{rc: rc, vnetHdr: vnetHdr, verify: verify, pays: make([][]byte, 0, maxCoalesce),
		iov: make([][]byte, 0, maxCoalesce+2), iovecs: make([]unix.Iovec, 0, maxCoalesce+2)}
	c.writeFn = c.doWrite
	return c
}

// Add queues one IPv4 packet (or writes it at once, when it cannot be coalesced).
func (c *Coalescer) Add(pkt []byte) {
	if !c.vnetHdr {
		c.writeOne(pkt)
		return
	}
	seq, payLen, psh, ok := c.tcpSegment(pkt)
	if !ok {
		c.Flush()
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
	c.Flush()
	c.n, c.first, c.segSize = 1, pkt, payLen
	c.nextSeq, c.total, c.closed, c.psh = seq+uint32(payLen), len(pkt), psh, psh
}

// tcpSegment reports whether pkt is a TCP segment that may take part in coalescing: IPv4
// without options, not a fragment, a data segment (with a good checksum, if verifying) and no
// flag but ACK and PSH.
func (c *Coalescer) tcpSegment(pkt []byte) (seq uint32, payLen int, psh, ok bool) {
	if len(pkt) < 40 || pkt[0] != 0x45 || pkt[9] != unix.IPPROTO_TCP || binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 ||
		int(binary.BigEndian.Uint16(pkt[2:4])) != len(pkt) {
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
	if c.verify && Fold(PseudoHeaderSum(pkt, len(pkt)-20)+Sum(pkt[20:])) != 0xffff {
		return 0, 0, false, false // corrupt: stays alone, the kernel drops it
	}
	return binary.BigEndian.Uint32(pkt[24:28]), len(pkt) - 20 - thl, pkt[33]&0x08 != 0, true
}

// joins reports whether a segment can extend the open group.
func (c *Coalescer) joins(pkt []byte, seq uint32, payLen int) bool {
	f := c.first
	thl := int(f[32]>>4) * 4
	switch {
	case c.closed, c.n >= maxCoalesce, seq != c.nextSeq, payLen > c.segSize, c.total+payLen > MaxPacket:
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

// Flush writes the open group: one segment as it is, several as one TSO packet.
func (c *Coalescer) Flush() {
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
	h := c.hdr[HdrLen : HdrLen+hl]
	copy(h, f[:hl])
	// IPv4: new total length and header checksum.
	binary.BigEndian.PutUint16(h[2:4], uint16(c.total))
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:12], ^Fold(Sum(h[:20])))
	if c.psh {
		h[33] |= 0x08
	}
	// TCP: the checksum is left to whoever needs it (CHECKSUM_PARTIAL): the field holds the
	// pseudo-header sum for the whole length, as the kernel's own TSO packets do.
	binary.BigEndian.PutUint16(h[36:38], Fold(PseudoHeaderSum(h, c.total-20)))
	v := c.hdr[:HdrLen]
	v[0] = FlagNeedsCsum
	v[1] = GSOTCPv4
	binary.NativeEndian.PutUint16(v[2:], uint16(hl))
	binary.NativeEndian.PutUint16(v[4:], uint16(c.segSize))
	binary.NativeEndian.PutUint16(v[6:], 20)
	binary.NativeEndian.PutUint16(v[8:], TCPChecksumOffset)
	c.iov = append(c.iov[:0], c.hdr[:HdrLen+hl], f[hl:])
	c.iov = append(c.iov, c.pays...)
	c.writev()
	c.n = 0
	c.pays = c.pays[:0]
}

func (c *Coalescer) writeOne(pkt []byte) {
	if c.vnetHdr {
		c.iov = append(c.iov[:0], zeroVirtioHdr[:], pkt)
	} else {
		c.iov = append(c.iov[:0], pkt)
	}
	c.writev()
}

func (c *Coalescer) writev() {
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

func (c *Coalescer) doWrite(fd uintptr) bool {
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

// TakeErrors returns the number of writes the kernel refused since the last call, and the
// last error.
func (c *Coalescer) TakeErrors() (int, error) {
	n, err := c.errs, c.last
	c.errs, c.last = 0, nil
	return n, err
}
