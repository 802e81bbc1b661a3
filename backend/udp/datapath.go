package udp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/xnet-dev/xnet/backend/tunoffload"
	"github.com/xnet-dev/xnet/wire"
)

// The packet path. Each queue runs two goroutines:
//
//	tx: xnet0 queue --read (one TSO segment, cut into packets)--> encap --sendmsg/UDP GSO--> peer
//	rx: socket --recvmmsg/UDP GRO--> classify + decap --GRO + write--> xnet0 queue
//
// Buffers are allocated once per queue and reused; nothing on the path allocates per packet.

const (
	// txHeadroom is the room left in front of each packet read from the TUN: exactly the
	// VXLAN + inner Ethernet header, so the datagram payload is contiguous in the buffer.
	// wireguard-go needs at least its 10-byte virtio-net header there, which 22 is.
	txHeadroom = wire.HeaderLen
	// rxHeadroom is the room in front of each packet written to the TUN: the virtio-net header
	// (struct virtio_net_hdr) that wireguard-go fills in.
	rxHeadroom = virtioNetHdrLen
	// maxPacket is the largest IPv4 packet, and the largest datagram a socket reads.
	maxPacket = 65535
	// maxGSOBytes is the most UDP payload one GSO send may carry (one IPv4 datagram's worth:
	// 65535 - 20 IPv4 - 8 UDP), maxGSOSegments the most segments we give the kernel at once
	// (its limit, UDP_MAX_SEGMENTS, is 128 on current kernels and was 64 on older ones).
	maxGSOBytes    = maxPacket - wire.OuterLen
	maxGSOSegments = 64
	// rxMessages is how many datagrams (each up to 64 KB with GRO) one recvmmsg reads;
	// rxOut is how many inner packets are handed to the TUN's GRO at once.
	rxMessages = 8
	rxOut      = 64
)

// dpConfig is the part of the backend's identity the packet path needs.
type dpConfig struct {
	expect wire.Expect
	local  localSubnets // inner destinations we deliver (IPv6 too when local.v6 is set)
	mac    wire.MAC
	port   int // outer destination port
	// copyingGRO uses wireguard-go's TUN Write (copies into per-packet buffers) instead of
	// the coalescer (package tunoffload); kept to measure one against the other.
	copyingGRO bool
	// copyingSplit reads the TUN with wireguard-go's Read (which copies each segment out)
	// instead of the segmenter (see segment.go).
	copyingSplit bool
}

type datapath struct {
	res        *resources
	copyingGRO bool
	tables     *tableHolder
	stats      *counters
	log        *slog.Logger
	expect     wire.Expect
	mac        wire.MAC
	port       int
	// local is our subnets, swapped whole when Setup sees a new lease.
	local atomic.Pointer[localSubnets]
	// gso turns false for good when the kernel refuses a GSO send at run time (a NIC without
	// checksum offload on the way to a peer): we then send one datagram per packet.
	gso     atomic.Bool
	closing atomic.Bool
	wg      sync.WaitGroup
	// open is closed once the queues may be read: at start, or, for queues taken over from a
	// previous process (which hold the packets queued while xnetd was down), once the peers
	// are programmed (release), so none of those packets finds an empty peer table.
	open     chan struct{}
	openOnce sync.Once
	stopped  chan struct{}
	// holdTimer releases held queues if release is never called.
	holdTimer *time.Timer
	// lastLog rate-limits error logs from the packet path (unix nanoseconds).
	lastLog atomic.Int64
}

// startDatapath runs the queues. With hold, they are not read before release (or hold has
// passed: a daemon that never programs its peers must not leave the queues unread for good).
func startDatapath(res *resources, cfg dpConfig, tables *tableHolder, stats *counters, log *slog.Logger, hold time.Duration) *datapath {
	d := &datapath{res: res, tables: tables, stats: stats, log: log, expect: cfg.expect, mac: cfg.mac, port: cfg.port, copyingGRO: cfg.copyingGRO,
		open: make(chan struct{}), stopped: make(chan struct{})}
	d.setLocal(cfg.local)
	if hold > 0 {
		d.holdTimer = time.AfterFunc(hold, func() {
			if d.release() {
				log.Warn("reading the taken-over queues although the peers are not programmed yet: packets for unknown peers are dropped", "after", hold)
			}
		})
	} else {
		d.release()
	}
	d.gso.Store(res.gso)
	for q := range res.queues {
		d.wg.Add(2)
		if cfg.copyingSplit {
			go d.txLoop(q)
		} else {
			go d.txLoopByReference(q)
		}
		go d.rxLoop(q)
	}
	return d
}

// localSubnets are our lease's subnets: the inner destinations we deliver.
type localSubnets struct {
	v4 netip.Prefix
	v6 netip.Prefix // invalid unless dual stack
}

func (d *datapath) setLocal(l localSubnets) { d.local.Store(&l) }

// release lets the queues be read; it says whether this call did (the first one).
func (d *datapath) release() bool {
	did := false
	d.openOnce.Do(func() {
		close(d.open)
		did = true
	})
	return did
}

// waitOpen waits until the queues may be read; false when the datapath stopped first.
func (d *datapath) waitOpen() bool {
	select {
	case <-d.open:
		return true
	case <-d.stopped:
		return false
	}
}

// stop closes every fd, which makes each blocked read return, and waits for the goroutines.
func (d *datapath) stop() {
	if d.holdTimer != nil {
		d.holdTimer.Stop()
	}
	close(d.stopped)
	d.closing.Store(true)
	d.res.close()
	d.wg.Wait()
}

// logError logs a packet-path error at most once a second: the counters have the totals.
func (d *datapath) logError(msg string, err error) {
	now := time.Now().UnixNano()
	last := d.lastLog.Load()
	if now-last < int64(time.Second) || !d.lastLog.CompareAndSwap(last, now) {
		return
	}
	d.log.Warn(msg, "err", err)
}

// ---- tx: TUN -> peers ----

// txGroup is a run of consecutive datagrams for one peer through one socket that leave in one
// GSO send: all of the same size except possibly the last, which may be shorter.
type txGroup struct {
	peer         *peerDP
	sock         int
	first, end   int // iov indexes
	stride       int // iov entries per datagram
	segs         int // datagrams
	segSize      int
	payloadBytes int // UDP payload bytes, for the GSO limit
	innerBytes   int // inner IPv4 bytes, for the counters
	closed       bool
}

// txQueue is one tx goroutine's reusable state.
type txQueue struct {
	bufs   [][]byte
	sizes  []int
	iov    [][]byte
	groups []txGroup
	mm     *mmsgBatch
	oob    []byte
	tally  tally
}

func (d *datapath) txLoop(q int) {
	defer d.wg.Done()
	if !d.waitOpen() {
		return
	}
	dev := d.res.queues[q].tun
	batch := max(dev.BatchSize(), 1)
	t := &txQueue{
		bufs:   make([][]byte, batch),
		sizes:  make([]int, batch),
		iov:    make([][]byte, 0, batch),
		groups: make([]txGroup, 0, batch),
		mm:     newMmsgBatch(batch, batch),
		oob:    make([]byte, batch*unix.CmsgSpace(2)),
	}
	// The first buffer takes a whole packet when the kernel sends one unsegmented; the others
	// take one cut segment each, never larger than xnet0's MTU (which we set).
	t.bufs[0] = make([]byte, txHeadroom+maxPacket)
	segCap := txHeadroom + max(d.expect.MaxInner, 1500) + 64
	slab := make([]byte, segCap*(batch-1))
	for i := 1; i < batch; i++ {
		t.bufs[i] = slab[(i-1)*segCap : i*segCap : i*segCap]
	}
	for {
		n, err := d.readTUN(dev, t)
		if err != nil {
			if d.closing.Load() || errors.Is(err, os.ErrClosed) {
				return
			}
			if !errors.Is(err, tun.ErrTooManySegments) {
				// A packet the kernel gave us that we cannot cut (an offload we did not
				// ask for, a segment larger than our buffers): count and go on.
				t.tally.add(verdictDropMalformed, 0)
				d.stats.flush(&t.tally)
				d.logError("read from "+DeviceName, err)
				continue
			}
		}
		if n > 0 {
			d.encapAndSend(t, n)
		}
		d.stats.flush(&t.tally)
	}
}

// readTUN reads one batch; a panic inside the segmentation (a segment larger than the buffer
// after someone raised xnet0's MTU) is turned into an error instead of killing the daemon.
func (d *datapath) readTUN(dev tun.Device, t *txQueue) (n int, err error) {
	defer func() {
		if r := recover(); r != nil {
			n, err = 0, fmt.Errorf("cutting a segment from %s: %v (was its MTU raised above %d?)", DeviceName, r, d.expect.MaxInner)
		}
	}()
	return dev.Read(t.bufs, t.sizes, txHeadroom)
}

// encapAndSend writes the VXLAN header in front of each of the n packets read, groups them
// into GSO sends and sends them.
func (d *datapath) encapAndSend(t *txQueue, n int) {
	table := d.tables.load()
	gso := d.gso.Load()
	nsend := len(d.res.send)
	t.iov = t.iov[:0]
	t.groups = t.groups[:0]
	var (
		lastDst  [4]byte
		lastPeer *peerDP
	)
	for i := 0; i < n; i++ {
		size := t.sizes[i]
		if size > len(t.bufs[i])-txHeadroom {
			t.tally.add(verdictDropMalformed, size)
			continue
		}
		pkt := t.bufs[i][txHeadroom : txHeadroom+size]
		var p *peerDP
		etherType := uint16(wire.EtherTypeIPv4)
		switch {
		case len(pkt) >= wire.IPv4HeaderLen && pkt[0]>>4 == 4:
			dst := [4]byte(pkt[16:20])
			p = lastPeer
			if p == nil || dst != lastDst {
				p = table.lookup(dst)
				lastDst, lastPeer = dst, p
			}
		case len(pkt) >= wire.IPv6HeaderLen && pkt[0]>>4 == 6:
			if kernelChatterIPv6(pkt) {
				continue
			}
			p, etherType = table.lookup6([16]byte(pkt[24:40])), wire.EtherTypeIPv6
		default:
			// Garbage routed into xnet0.
			t.tally.add(verdictDropInnerNotIPv4, size)
			continue
		}
		if p == nil {
			t.tally.add(verdictDropNoRoute, size)
			continue
		}
		wire.Encode(t.bufs[i][:wire.HeaderLen], wire.Header{VNI: d.expect.VNI, Dst: p.mac, Src: d.mac, EtherType: etherType})
		dgram := t.bufs[i][:txHeadroom+size]
		sock := 0
		if nsend > 1 {
			sock = int(flowHash(pkt) % uint32(nsend))
		}
		t.iov = append(t.iov, dgram)
		if k := len(t.groups) - 1; k >= 0 && gso && t.groups[k].accepts(p, sock, len(dgram)) {
			g := &t.groups[k]
			g.end++
			g.segs++
			g.payloadBytes += len(dgram)
			g.innerBytes += size
			g.closed = len(dgram) < g.segSize
			continue
		}
		t.groups = append(t.groups, txGroup{
			peer: p, sock: sock, first: len(t.iov) - 1, end: len(t.iov), stride: 1, segs: 1,
			segSize: len(dgram), payloadBytes: len(dgram), innerBytes: size,
		})
	}
	// Consecutive groups through the same socket leave in one sendmmsg.
	for start := 0; start < len(t.groups); {
		end := start + 1
		for end < len(t.groups) && t.groups[end].sock == t.groups[start].sock {
			end++
		}
		d.sendGroups(t, t.groups[start:end])
		start = end
	}
}

// accepts reports whether a datagram of size n for peer p through socket sock can join g.
func (g *txGroup) accepts(p *peerDP, sock, n int) bool {
	return g.peer == p && g.sock == sock && !g.closed && n <= g.segSize &&
		g.segs < maxGSOSegments && g.payloadBytes+n <= maxGSOBytes
}

// sendGroups sends groups (all for one socket, at most t.mm.limit) with one sendmmsg, each
// group one message.
func (d *datapath) sendGroups(t *txQueue, groups []txGroup) {
	s := d.res.send[groups[0].sock]
	cs := unix.CmsgSpace(2)
	t.mm.reset()
	for i := range groups {
		g := &groups[i]
		var oob []byte
		if g.segs > 1 {
			oob = putUDPSegment(t.oob[i*cs:(i+1)*cs], g.segSize)
		}
		t.mm.add(t.iov[g.first:g.end], g.peer.publicIP.As4(), g.peer.port, oob)
	}
	sent := 0
	for sent < len(groups) {
		n, err := t.mm.send(s.rc, sent)
		for _, g := range groups[sent : sent+max(n, 0)] {
			t.tally[verdictEncap].packets += uint64(g.segs)
			t.tally[verdictEncap].bytes += uint64(g.innerBytes)
			g.peer.stats.txPackets.Add(uint64(g.segs))
			g.peer.stats.txBytes.Add(uint64(g.innerBytes))
		}
		sent += max(n, 0)
		if err == nil {
			if n <= 0 {
				return // cannot happen (sendmmsg sends at least one or fails); never spin
			}
			continue
		}
		if d.closing.Load() {
			return
		}
		g := groups[sent]
		if g.segs > 1 && (errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL)) && d.gso.CompareAndSwap(true, false) {
			// The kernel cannot segment for this route (no checksum offload, ...): from now
			// on every datagram goes alone. This batch is resent that way.
			d.log.Warn("UDP GSO send refused: sending one datagram per packet from now on", "peer", g.peer.publicIP, "err", err)
			d.sendSingly(t, groups[sent:])
			return
		}
		// One message failed (no route to the peer, ...): count it and go on with the rest.
		t.tally.add(verdictDropSendError, g.innerBytes)
		t.tally[verdictDropSendError].packets += uint64(g.segs) - 1
		d.logError(fmt.Sprintf("send to %v", g.peer.publicIP), err)
		sent++
	}
}

// sendSingly sends every datagram of groups as its own message (the no-GSO fallback).
func (d *datapath) sendSingly(t *txQueue, groups []txGroup) {
	var split []txGroup
	for _, g := range groups {
		for i := g.first; i < g.end; i += g.stride {
			n := 0
			for _, b := range t.iov[i : i+g.stride] {
				n += len(b)
			}
			split = append(split, txGroup{peer: g.peer, sock: g.sock, first: i, end: i + g.stride, stride: g.stride, segs: 1,
				segSize: n, payloadBytes: n, innerBytes: n - wire.HeaderLen})
		}
	}
	for len(split) > 0 {
		k := min(len(split), t.mm.limit)
		d.sendGroups(t, split[:k])
		split = split[k:]
	}
}

// putUDPSegment writes a UDP_SEGMENT control message (the GSO segment size) into b.
func putUDPSegment(b []byte, size int) []byte {
	h := (*unix.Cmsghdr)(unsafePointer(b))
	h.Level = unix.IPPROTO_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], uint16(size))
	return b[:unix.CmsgSpace(2)]
}

// flowHash hashes the inner flow (addresses, protocol, ports of an unfragmented TCP or UDP
// packet) to pick the sending socket, i.e. the outer source port. pkt is an IPv4 packet of at
// least 20 bytes or an IPv6 one of at least 40.
func flowHash(pkt []byte) uint32 {
	var h uint32
	if pkt[0]>>4 == 6 {
		// Both addresses, then the ports when TCP or UDP follows the fixed header directly
		// (extension headers, fragments included, leave a flow on one socket all the same).
		for i := 8; i < 40; i += 4 {
			h = (h ^ binary.BigEndian.Uint32(pkt[i:i+4])) * 0x9e3779b1
		}
		h ^= uint32(pkt[6])
		if (pkt[6] == unix.IPPROTO_TCP || pkt[6] == unix.IPPROTO_UDP) && len(pkt) >= 44 {
			h ^= binary.BigEndian.Uint32(pkt[40:44]) * 0xc2b2ae3d
		}
	} else {
		h = binary.BigEndian.Uint32(pkt[12:16])*0x9e3779b1 ^ binary.BigEndian.Uint32(pkt[16:20])*0x85ebca77 ^ uint32(pkt[9])
		ihl := int(pkt[0]&0x0f) * 4
		unfragmented := binary.BigEndian.Uint16(pkt[6:8])&0x3fff == 0
		if (pkt[9] == unix.IPPROTO_TCP || pkt[9] == unix.IPPROTO_UDP) && unfragmented && len(pkt) >= ihl+4 {
			h ^= binary.BigEndian.Uint32(pkt[ihl:ihl+4]) * 0xc2b2ae3d
		}
	}
	// murmur3's finaliser: every input bit reaches every output bit.
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// ---- rx: sockets -> TUN ----

// rxQueue is one rx goroutine's reusable state.
type rxQueue struct {
	in    *recvBatch
	co    *tunoffload.Coalescer // zero-copy coalescing writer; nil with Tuning.CopyingGRO
	out   [][]byte              // with Tuning.CopyingGRO: copies for wireguard-go's GRO
	nout  int
	tally tally
}

func (d *datapath) rxLoop(q int) {
	defer d.wg.Done()
	if !d.waitOpen() {
		return
	}
	rc := d.res.queues[q].rc
	dev := d.res.queues[q].tun
	r := &rxQueue{in: newRecvBatch(rxMessages, maxPacket, unix.CmsgSpace(4))}
	if d.copyingGRO {
		// Every output buffer can grow to a whole 64 KB segment: wireguard-go's GRO appends
		// the packets it coalesces to the first one of their flow.
		r.out = make([][]byte, rxOut)
		for i := range r.out {
			r.out[i] = make([]byte, rxHeadroom+maxPacket)
		}
	} else {
		rc, err := dev.File().SyscallConn()
		if err != nil {
			d.log.Error("cannot write to "+DeviceName+": receive queue stopped", "err", err)
			return
		}
		// Verifying: the senders leave the outer UDP checksum 0, and the kernel trusts a
		// coalesced group's checksum.
		r.co = tunoffload.NewCoalescer(rc, d.res.offload, true)
	}
	for {
		n, err := r.in.recv(rc)
		if err != nil {
			if d.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			d.logError("receive on the VXLAN port", err)
			time.Sleep(time.Millisecond) // do not spin on a persistent error
			continue
		}
		table := d.tables.load()
		local := *d.local.Load()
		for i := range n {
			data, oob, flags, src, ok := r.in.datagram(i)
			if !ok {
				r.tally.add(verdictDropMalformed, len(data))
				continue
			}
			d.receive(r, dev, data, oob, flags, src, table, local)
		}
		d.flushTUN(r, dev)
		d.stats.flush(&r.tally)
	}
}

// receive classifies every datagram of one (possibly GRO-coalesced) message and queues the
// accepted inner packets for the TUN.
func (d *datapath) receive(r *rxQueue, dev tun.Device, data, oob []byte, flags int, outerSrc [4]byte, table *peerTable, local localSubnets) {
	if flags&unix.MSG_TRUNC != 0 {
		// Larger than any datagram can be: cannot happen with a 64 KB buffer, but a
		// truncated datagram must never be delivered as if whole.
		r.tally.add(verdictDropMalformed, len(data))
		return
	}
	segSize := groSize(oob)
	if segSize <= 0 || segSize > len(data) {
		segSize = len(data)
	}
	if isSuperFrame(data, d.expect.MaxInner) {
		d.receiveSuperFrame(r, dev, data, outerSrc, table, local)
		return
	}
	for off := 0; off < len(data); off += segSize {
		seg := data[off:min(off+segSize, len(data))]
		v, f, p := classify(seg, outerSrc, d.expect, local, table)
		if v != verdictDecap {
			r.tally.add(v, len(seg))
			continue
		}
		n := len(f.Inner)
		r.tally.add(verdictDecap, n)
		p.stats.rxPackets.Add(1)
		p.stats.rxBytes.Add(uint64(n))
		completePartialChecksum(f.Inner)
		if r.co != nil {
			r.co.Add(f.Inner) // by reference: flushed before the next recvmmsg
			continue
		}
		buf := r.out[r.nout][:cap(r.out[r.nout])]
		copy(buf[rxHeadroom:], f.Inner)
		r.out[r.nout] = buf[:rxHeadroom+n]
		r.nout++
		if r.nout == len(r.out) {
			d.flushTUN(r, dev)
		}
	}
}

// A kernel VXLAN sender on a veth (hosts that are namespaces, containers or VMs on veths)
// does not segment its TSO packets: the veth carries the whole 64 KB "super-frame" to the
// receiving namespace, and a plain UDP socket receives it as one datagram - one VXLAN header,
// one inner IPv4/TCP (or IPv6/TCP) header whose length covers all of it - without a UDP_GRO size
// (that is only reported for UDP segmentation). From a physical NIC, or from a udp host,
// datagrams arrive cut. Dropping super-frames would cut such a host off; cutting them
// ourselves would cost a copy and a checksum per segment. Instead we hand the frame to the TUN
// as what it is, a TSO packet with a virtio-net header, with segments that fit our MTU, and the
// kernel segments it (or does not need to, when it delivers locally).

// isSuperFrame reports whether a datagram is one super-frame: its inner IPv4 total length (or
// IPv6 header and payload length) covers the whole datagram and exceeds the largest packet we
// deliver (maxInner).
func isSuperFrame(data []byte, maxInner int) bool {
	if len(data) < wire.HeaderLen+wire.IPv4HeaderLen {
		return false
	}
	var total int
	switch data[wire.HeaderLen] >> 4 {
	case 4:
		total = int(binary.BigEndian.Uint16(data[wire.HeaderLen+2:]))
	case 6:
		if len(data) < wire.HeaderLen+wire.IPv6HeaderLen {
			return false
		}
		total = wire.IPv6HeaderLen + int(binary.BigEndian.Uint16(data[wire.HeaderLen+4:]))
	default:
		return false
	}
	return wire.HeaderLen+total == len(data) && total > maxInner
}

// virtio-net header values (include/uapi/linux/virtio_net.h).
const (
	virtioNetHdrLen        = 10
	virtioNetHdrFNeedsCsum = 1
	virtioNetHdrGSOTCPv4   = 1
	virtioNetHdrGSOTCPv6   = 4
	virtioNetHdrGSOECN     = 0x80
	tcpFlagCWR             = 0x80
	tcpChecksumOffset      = 16
)

// receiveSuperFrame applies the acceptance rules to a super-frame's headers (which every
// segment shares) and writes it to the TUN as a TSO packet whose segments fill our MTU. Only
// TCP is accepted this way (it is all the kernel sends so); anything else that large is
// dropped as oversized. An IPv6 super-frame must have TCP right after the fixed header.
func (d *datapath) receiveSuperFrame(r *rxQueue, dev tun.Device, data []byte, outerSrc [4]byte, table *peerTable, local localSubnets) {
	expect := d.expect
	expect.MaxInner = 0 // the segments, not the frame, must fit the MTU: checked below
	v, f, p := classify(data, outerSrc, expect, local, table)
	if v != verdictDecap {
		r.tally.add(v, len(data))
		return
	}
	pkt := f.Inner
	ihl, proto, fragment, gsoType := int(pkt[0]&0x0f)*4, pkt[9], binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0, uint8(virtioNetHdrGSOTCPv4)
	if f.IsIPv6() {
		ihl, proto, fragment, gsoType = wire.IPv6HeaderLen, pkt[6], false, virtioNetHdrGSOTCPv6
	}
	if proto != unix.IPPROTO_TCP || fragment || len(pkt) < ihl+20 || !d.res.offload {
		// Only TCP is segmented this way by the kernel; without the vnet header we could not
		// pass the segmentation on.
		r.tally.add(verdictDropOversized, len(pkt))
		return
	}
	thl := int(pkt[ihl+12]>>4) * 4
	if thl < 20 || ihl+thl > len(pkt) {
		r.tally.add(verdictDropMalformed, len(pkt))
		return
	}
	// The sender's MSS is not in the datagram; the largest segment that fits our MTU is at
	// most what it used (both come from the same overlay MTU) and what our receivers accept.
	segSize := d.expect.MaxInner - ihl - thl
	if segSize <= 0 {
		r.tally.add(verdictDropOversized, len(pkt))
		return
	}
	d.flushTUN(r, dev) // what came before it goes first
	// The virtio-net header goes where the Ethernet header was: no copy.
	hdr := data[wire.HeaderLen-virtioNetHdrLen : wire.HeaderLen]
	if pkt[ihl+13]&tcpFlagCWR != 0 {
		gsoType |= virtioNetHdrGSOECN
	}
	hdr[0] = virtioNetHdrFNeedsCsum // the checksum field holds the pseudo-header sum
	hdr[1] = gsoType
	binary.NativeEndian.PutUint16(hdr[2:], uint16(ihl+thl))
	binary.NativeEndian.PutUint16(hdr[4:], uint16(segSize))
	binary.NativeEndian.PutUint16(hdr[6:], uint16(ihl))
	binary.NativeEndian.PutUint16(hdr[8:], tcpChecksumOffset)
	if _, err := dev.File().Write(data[wire.HeaderLen-virtioNetHdrLen : wire.HeaderLen+len(pkt)]); err != nil {
		if !d.closing.Load() {
			r.tally.add(verdictDropTUNError, len(pkt))
			d.logError("write a TSO frame to "+DeviceName, err)
		}
		return
	}
	segments := (len(pkt) - ihl - thl + segSize - 1) / segSize
	r.tally[verdictDecap].packets += uint64(segments)
	r.tally[verdictDecap].bytes += uint64(len(pkt))
	p.stats.rxPackets.Add(uint64(segments))
	p.stats.rxBytes.Add(uint64(len(pkt)))
}

// flushTUN writes the queued inner packets to xnet0, coalescing runs of one flow.
func (d *datapath) flushTUN(r *rxQueue, dev tun.Device) {
	if r.co != nil {
		r.co.Flush()
		if n, err := r.co.TakeErrors(); n > 0 && !d.closing.Load() {
			r.tally[verdictDropTUNError].packets += uint64(n)
			d.logError("write to "+DeviceName, err)
		}
		return
	}
	if r.nout == 0 {
		return
	}
	if _, err := dev.Write(r.out[:r.nout], rxHeadroom); err != nil && !d.closing.Load() {
		r.tally.add(verdictDropTUNError, 0)
		d.logError("write to "+DeviceName, err)
	}
	r.nout = 0
}

// classify applies the acceptance rules (docs/design.md, What decapsulation accepts) to one datagram payload received from
// outerSrc: wire.Decode's (VXLAN header, VNI, VTEP MAC, inner IPv4, or IPv6 when expect says
// so) and then the ones that need the leases, in the order bpf/parse.h applies them: the inner
// destination is in our subnet, the inner source is in a peer's subnet, and that peer's
// PublicIP is the outer source. An inner IPv6 packet is held to the same rules with the IPv6
// subnets: its destination in our IPv6 subnet, its source in the IPv6 subnet of the peer whose
// PublicIP sent it (the outer header is IPv4 either way). It returns verdictDecap with the
// frame and the peer, or the drop reason.
func classify(payload []byte, outerSrc [4]byte, expect wire.Expect, local localSubnets, table *peerTable) (verdict, wire.Frame, *peerDP) {
	expect.IPv6 = local.v6.IsValid() // IPv6 is ours to deliver exactly when we have an IPv6 subnet
	f, prob := wire.Decode(payload, expect)
	if prob != wire.OK {
		return verdictOf(prob), f, nil
	}
	var p *peerDP
	if f.IsIPv6() {
		if !local.v6.IsValid() || !local.v6.Contains(netip.AddrFrom16(f.InnerDst6)) {
			return verdictDropNotLocal, f, nil
		}
		p = table.lookup6(f.InnerSrc6)
	} else {
		if !local.v4.Contains(netip.AddrFrom4(f.InnerDst)) {
			return verdictDropNotLocal, f, nil
		}
		p = table.lookup(f.InnerSrc)
	}
	if p == nil {
		return verdictDropUnknownSource, f, nil
	}
	if p.publicIP.As4() != outerSrc {
		return verdictDropSpoofed, f, nil
	}
	return verdictDecap, f, p
}

// groSize returns the segment size the kernel reported in a UDP_GRO control message, or 0 for
// a plain datagram.
func groSize(oob []byte) int {
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafePointer(oob))
		l := int(h.Len)
		if l < unix.CmsgLen(0) || l > len(oob) {
			return 0
		}
		if h.Level == unix.IPPROTO_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(4) {
			return int(binary.NativeEndian.Uint32(oob[unix.CmsgLen(0):]))
		}
		oob = oob[min(unix.CmsgSpace(l-unix.CmsgLen(0)), len(oob)):]
	}
	return 0
}

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

// kernelChatterIPv6 says whether an IPv6 packet read from xnet0 is the kernel's own multicast or
// link-local traffic on the device (MLD reports for the all-routers groups a forwarding host
// joins): never overlay traffic, so it is neither sent nor counted as a container's loss.
func kernelChatterIPv6(pkt []byte) bool {
	dst := pkt[24:40]
	return dst[0] == 0xff || dst[0] == 0xfe && dst[1]&0xc0 == 0x80
}
