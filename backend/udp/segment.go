package udp

import (
	"encoding/binary"
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend/tunoffload"
	"github.com/xnet-dev/xnet/wire"
)

// Send-side segmentation without copies.
//
// The first version read xnet0 with wireguard-go's TUN Read, which cuts a TSO segment into
// MTU-sized packets by copying each one (headers and payload) into its own buffer and then
// checksumming it. Here the payload stays where read(2) put it: for each segment we build only
// its headers (VXLAN + inner Ethernet + IPv4 + TCP, ~90 bytes) in a small slab, checksum the
// payload in place, and hand the kernel two iovecs per datagram - header, payload - in one
// UDP GSO sendmsg. The kernel's copy into the socket buffer is the only copy.

// virtio-net header fields we read (include/uapi/linux/virtio_net.h).
const (
	virtioNetHdrGSONone = 0
	// segHdrCap is the room for one segment's headers: VXLAN + inner Ethernet, and IPv4 (or
	// IPv6) and TCP headers with options.
	segHdrCap = wire.HeaderLen + 60 + 60
)

// segmenter is one tx queue's reader of its TUN queue.
type segmenter struct {
	rc      syscall.RawConn
	vnetHdr bool
	buf     []byte // virtio-net header + one packet of up to 64 KB
	hdrs    []byte // segHdrCap bytes per segment

	// readFn is doRead as a method value made once (a closure would be allocated per
	// read); n and err are its results.
	readFn func(fd uintptr) bool
	n      int
	err    error
}

func newSegmenter(f *os.File, vnetHdr bool) (*segmenter, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &segmenter{rc: rc, vnetHdr: vnetHdr, buf: make([]byte, virtioNetHdrLen+maxPacket), hdrs: make([]byte, 64*segHdrCap)}
	s.readFn = s.doRead
	return s, nil
}

// read reads one packet (with its virtio-net header when the TUN has one).
func (s *segmenter) read() ([]byte, error) {
	if err := s.rc.Read(s.readFn); err != nil {
		return nil, err
	}
	if s.err != nil {
		return nil, s.err
	}
	return s.buf[:s.n], nil
}

func (s *segmenter) doRead(fd uintptr) bool {
	s.n, s.err = unix.Read(int(fd), s.buf)
	return s.err != unix.EAGAIN
}

// errBadGSO marks a packet whose virtio-net header we cannot act on.
var errBadGSO = errors.New("unusable virtio-net header")

// txLoopByReference is txLoop with the segmenter: one read(2), one sendmmsg(2) per TSO segment.
func (d *datapath) txLoopByReference(q int) {
	defer d.wg.Done()
	if !d.waitOpen() {
		return
	}
	s, err := newSegmenter(d.res.queues[q].tun.File(), d.res.offload)
	if err != nil {
		d.log.Error("cannot read "+DeviceName+": send queue stopped", "err", err)
		return
	}
	t := &txQueue{
		iov:    make([][]byte, 0, 2*64+2),
		groups: make([]txGroup, 0, 8),
		mm:     newMmsgBatch(8, 2*64+2),
		oob:    make([]byte, 8*unix.CmsgSpace(2)),
	}
	for {
		frame, err := s.read()
		if err != nil {
			if d.closing.Load() || errors.Is(err, os.ErrClosed) {
				return
			}
			t.tally.add(verdictDropMalformed, 0)
			d.stats.flush(&t.tally)
			d.logError("read from "+DeviceName, err)
			continue
		}
		if err := d.segmentAndSend(s, t, frame); err != nil {
			t.tally.add(verdictDropMalformed, len(frame))
			d.logError("packet from "+DeviceName, err)
		}
		d.stats.flush(&t.tally)
	}
}

// segmentAndSend turns one packet read from the TUN into VXLAN datagrams and sends them.
func (d *datapath) segmentAndSend(s *segmenter, t *txQueue, frame []byte) error {
	var vh struct {
		flags, gsoType                         uint8
		hdrLen, gsoSize, csumStart, csumOffset int
	}
	pkt := frame
	if s.vnetHdr {
		if len(frame) < virtioNetHdrLen {
			return errBadGSO
		}
		vh.flags, vh.gsoType = frame[0], frame[1]
		vh.gsoSize = int(binary.NativeEndian.Uint16(frame[4:]))
		vh.csumStart = int(binary.NativeEndian.Uint16(frame[6:]))
		vh.csumOffset = int(binary.NativeEndian.Uint16(frame[8:]))
		pkt = frame[virtioNetHdrLen:]
	}
	var p *peerDP
	ipv6 := false
	switch {
	case len(pkt) >= wire.IPv4HeaderLen && pkt[0]>>4 == 4:
		p = d.tables.load().lookup([4]byte(pkt[16:20]))
	case len(pkt) >= wire.IPv6HeaderLen && pkt[0]>>4 == 6:
		if kernelChatterIPv6(pkt) {
			return nil
		}
		p, ipv6 = d.tables.load().lookup6([16]byte(pkt[24:40])), true
	default:
		t.tally.add(verdictDropInnerNotIPv4, len(pkt))
		return nil
	}
	if p == nil {
		t.tally.add(verdictDropNoRoute, len(pkt))
		return nil
	}
	sock := 0
	if n := len(d.res.send); n > 1 {
		sock = int(flowHash(pkt) % uint32(n))
	}
	vx := wire.Header{VNI: d.expect.VNI, Dst: p.mac, Src: d.mac, EtherType: wire.EtherTypeIPv4}
	if ipv6 {
		vx.EtherType = wire.EtherTypeIPv6
	}
	t.iov = t.iov[:0]
	t.groups = t.groups[:0]

	if vh.gsoType == virtioNetHdrGSONone {
		if vh.flags&virtioNetHdrFNeedsCsum != 0 {
			// The kernel left the transport checksum to us (CHECKSUM_PARTIAL): the field holds
			// the pseudo-header sum; the checksum covers csumStart to the end.
			at := vh.csumStart + vh.csumOffset
			if vh.csumStart >= len(pkt) || at+2 > len(pkt) {
				return errBadGSO
			}
			binary.BigEndian.PutUint16(pkt[at:], ^tunoffload.Fold(tunoffload.Sum(pkt[vh.csumStart:])))
		}
		h := s.hdrs[:wire.HeaderLen]
		wire.Encode(h, vx)
		t.iov = append(t.iov, h, pkt)
		t.groups = append(t.groups, txGroup{peer: p, sock: sock, first: 0, end: 2, stride: 2, segs: 1,
			segSize: wire.HeaderLen + len(pkt), payloadBytes: wire.HeaderLen + len(pkt), innerBytes: len(pkt)})
		d.sendGroups(t, t.groups)
		return nil
	}

	// A TSO segment: IPv4 (or IPv6 without extension headers) + TCP headers, then up to 64 KB
	// of payload to cut at gsoSize.
	wantGSO, ihl, proto := uint8(virtioNetHdrGSOTCPv4), int(pkt[0]&0x0f)*4, pkt[9]
	if ipv6 {
		wantGSO, ihl, proto = virtioNetHdrGSOTCPv6, wire.IPv6HeaderLen, pkt[6]
	}
	if vh.gsoType&^virtioNetHdrGSOECN != wantGSO || vh.gsoSize == 0 {
		return errBadGSO
	}
	if ihl < 20 || vh.csumStart != ihl || len(pkt) < ihl+20 || proto != unix.IPPROTO_TCP {
		return errBadGSO
	}
	thl := int(pkt[ihl+12]>>4) * 4
	hl := ihl + thl // the kernel's hdr_len is not to be trusted on forwarded packets: use ours
	if thl < 20 || hl > len(pkt) || hl+vh.gsoSize > d.expect.MaxInner {
		return errBadGSO
	}
	payload := pkt[hl:]
	segs := (len(payload) + vh.gsoSize - 1) / vh.gsoSize
	if need := segs * segHdrCap; need > len(s.hdrs) {
		s.hdrs = make([]byte, need)
	}
	var ipID uint16
	if !ipv6 {
		ipID = binary.BigEndian.Uint16(pkt[4:6])
	}
	seq := binary.BigEndian.Uint32(pkt[ihl+4:])
	flags := pkt[ihl+13]
	// The TCP header without its checksum, summed once; each segment adds its own seq, flags,
	// length and payload.
	pkt[ihl+16], pkt[ihl+17] = 0, 0
	var g *txGroup
	for i := range segs {
		pay := payload[i*vh.gsoSize : min((i+1)*vh.gsoSize, len(payload))]
		h := s.hdrs[i*segHdrCap : i*segHdrCap+wire.HeaderLen+hl]
		wire.Encode(h, vx)
		ip := h[wire.HeaderLen:]
		copy(ip, pkt[:hl])
		var pseudo uint64
		if ipv6 {
			// IPv6 has no header checksum or ID; the payload length excludes the header.
			binary.BigEndian.PutUint16(ip[4:6], uint16(thl+len(pay)))
			pseudo = pseudoHeaderSum6(ip, thl+len(pay))
		} else {
			binary.BigEndian.PutUint16(ip[2:4], uint16(hl+len(pay)))
			binary.BigEndian.PutUint16(ip[4:6], ipID+uint16(i))
			ip[10], ip[11] = 0, 0
			binary.BigEndian.PutUint16(ip[10:12], ^tunoffload.Fold(tunoffload.Sum(ip[:ihl])))
			pseudo = tunoffload.PseudoHeaderSum(ip, thl+len(pay))
		}
		tcp := ip[ihl:]
		binary.BigEndian.PutUint32(tcp[4:8], seq+uint32(i*vh.gsoSize))
		f := flags
		if i > 0 {
			f &^= 0x80 // CWR only on the first segment
		}
		if i < segs-1 {
			f &^= 0x01 | 0x08 // FIN and PSH only on the last
		}
		tcp[13] = f
		sum := pseudo + tunoffload.Sum(tcp[:thl]) + tunoffload.Sum(pay)
		binary.BigEndian.PutUint16(tcp[16:18], ^tunoffload.Fold(sum))

		n := len(h) + len(pay)
		t.iov = append(t.iov, h, pay)
		if g != nil && g.accepts(p, sock, n) {
			g.end += 2
			g.segs++
			g.payloadBytes += n
			g.innerBytes += n - wire.HeaderLen
			g.closed = n < g.segSize
			continue
		}
		t.groups = append(t.groups, txGroup{peer: p, sock: sock, first: len(t.iov) - 2, end: len(t.iov), stride: 2, segs: 1,
			segSize: n, payloadBytes: n, innerBytes: n - wire.HeaderLen})
		g = &t.groups[len(t.groups)-1]
		if !d.gso.Load() {
			g.closed = true // without GSO every datagram is a message of its own
		}
	}
	for start := 0; start < len(t.groups); start += t.mm.limit {
		d.sendGroups(t, t.groups[start:min(start+t.mm.limit, len(t.groups))])
	}
	return nil
}
