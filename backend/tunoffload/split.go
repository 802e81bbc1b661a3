package tunoffload

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// Split cuts frame, one read from a TUN with a virtio-net header, into packets at
// bufs[i][offset:], setting sizes[i], as the kernel would have sent them: a segment of a TCP
// or UDP GSO packet gets its own IP header (IPv4: total length, an ID counting up, header
// checksum; IPv6: payload length), its own TCP sequence number (FIN and PSH only on the last)
// or UDP length, and its transport checksum; a single packet whose checksum was left partial
// gets it completed. It returns the number of packets, ErrTooManySegments if frame holds more
// than bufs (nothing is written then), and ErrMalformed for a frame its header does not
// describe. It is wireguard-go's tun.Device Read for such a TUN, less the read.
func Split(frame []byte, bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(frame) < HdrLen {
		return 0, fmt.Errorf("%w: %d bytes", ErrMalformed, len(frame))
	}
	flags, gsoType := frame[0], frame[1]
	gsoSize := int(binary.NativeEndian.Uint16(frame[4:]))
	csumStart := int(binary.NativeEndian.Uint16(frame[6:]))
	csumOffset := int(binary.NativeEndian.Uint16(frame[8:]))
	pkt := frame[HdrLen:]
	if len(bufs) == 0 {
		return 0, ErrTooManySegments
	}

	if gsoType == GSONone {
		if len(pkt) > len(bufs[0])-offset {
			return 0, fmt.Errorf("%w: a %d-byte packet", ErrMalformed, len(pkt))
		}
		out := bufs[0][offset : offset+len(pkt)]
		copy(out, pkt)
		if flags&FlagNeedsCsum != 0 {
			// CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the rest is ours.
			at := csumStart + csumOffset
			if csumStart >= len(out) || at+2 > len(out) {
				return 0, fmt.Errorf("%w: checksum at %d+%d in %d bytes", ErrMalformed, csumStart, csumOffset, len(out))
			}
			field := uint64(binary.BigEndian.Uint16(out[at:]))
			out[at], out[at+1] = 0, 0
			binary.BigEndian.PutUint16(out[at:], ^Fold(field+Sum(out[csumStart:])))
		}
		sizes[0] = len(out)
		return 1, nil
	}

	// A GSO packet: check that its headers are where the virtio-net header says, without
	// trusting its hdr_len (the kernel sets it to the whole first segment when forwarding).
	if len(pkt) == 0 || gsoSize == 0 {
		return 0, fmt.Errorf("%w: GSO type %d, size %d", ErrMalformed, gsoType, gsoSize)
	}
	v6 := pkt[0]>>4 == 6
	var proto uint8
	switch typ := gsoType &^ GSOECNBit; {
	case typ == GSOTCPv4 && pkt[0]>>4 == 4, typ == GSOTCPv6 && v6:
		proto = unix.IPPROTO_TCP
	case gsoType == GSOUDPL4 && (v6 || pkt[0]>>4 == 4):
		proto = unix.IPPROTO_UDP
	default:
		return 0, fmt.Errorf("%w: GSO type %d for IP version %d", ErrMalformed, gsoType, pkt[0]>>4)
	}
	iphl := csumStart
	if v6 && (iphl != 40 || len(pkt) < 40 || pkt[6] != proto) || !v6 && (len(pkt) < 20 || iphl != int(pkt[0]&0x0f)*4 || pkt[9] != proto) {
		return 0, fmt.Errorf("%w: transport header at %d", ErrMalformed, csumStart)
	}
	var hl int // IP + transport header
	switch proto {
	case unix.IPPROTO_TCP:
		if len(pkt) < iphl+20 || csumOffset != TCPChecksumOffset {
			return 0, fmt.Errorf("%w: TCP header", ErrMalformed)
		}
		hl = iphl + int(pkt[iphl+12]>>4)*4
		if hl < iphl+20 {
			return 0, fmt.Errorf("%w: TCP header length %d", ErrMalformed, hl-iphl)
		}
	default:
		if csumOffset != UDPChecksumOffset {
			return 0, fmt.Errorf("%w: UDP header", ErrMalformed)
		}
		hl = iphl + 8
	}
	if hl >= len(pkt) {
		return 0, fmt.Errorf("%w: %d bytes of headers in %d", ErrMalformed, hl, len(pkt))
	}
	segs := (len(pkt) - hl + gsoSize - 1) / gsoSize
	if segs > len(bufs) {
		return 0, ErrTooManySegments
	}
	for _, b := range bufs[:segs] {
		if len(b)-offset < hl+min(gsoSize, len(pkt)-hl) { // the first segment is the largest
			return 0, fmt.Errorf("%w: %d-byte segments do not fit %d-byte buffers", ErrMalformed, hl+gsoSize, len(b)-offset)
		}
	}

	seq := binary.BigEndian.Uint32(pkt[iphl+4:])
	id := binary.BigEndian.Uint16(pkt[4:])
	for i := range segs {
		start := hl + i*gsoSize
		end := min(start+gsoSize, len(pkt))
		total := hl + end - start
		out := bufs[i][offset : offset+total]
		copy(out, pkt[:hl])
		copy(out[hl:], pkt[start:end])
		if v6 {
			binary.BigEndian.PutUint16(out[4:], uint16(total-40))
		} else {
			binary.BigEndian.PutUint16(out[2:], uint16(total))
			binary.BigEndian.PutUint16(out[4:], id+uint16(i))
			out[10], out[11] = 0, 0
			binary.BigEndian.PutUint16(out[10:], ^Fold(Sum(out[:iphl])))
		}
		l4 := out[iphl:]
		at := TCPChecksumOffset
		if proto == unix.IPPROTO_TCP {
			binary.BigEndian.PutUint32(l4[4:], seq+uint32(i*gsoSize))
			if end != len(pkt) {
				l4[13] &^= tcpFlagFIN | tcpFlagPSH
			}
			if i > 0 {
				l4[13] &^= tcpFlagCWR // ECN's congestion window reduced goes with the first
			}
		} else {
			at = UDPChecksumOffset
			binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		}
		l4[at], l4[at+1] = 0, 0
		var pseudo uint64
		if v6 {
			pseudo = pseudoHeaderSum6(out, proto, len(l4))
		} else {
			pseudo = PseudoHeaderSum(out, len(l4))
		}
		c := ^Fold(pseudo + Sum(l4))
		if proto == unix.IPPROTO_UDP && c == 0 {
			c = 0xffff // UDP sends a computed 0 as 0xffff (0 means "no checksum")
		}
		binary.BigEndian.PutUint16(l4[at:], c)
		sizes[i] = total
	}
	return segs, nil
}

// ErrTooManySegments is wireguard-go's tun.ErrTooManySegments, which its device expects from
// a TUN Read: a frame holds more packets than the caller has buffers for.
var ErrTooManySegments = tun.ErrTooManySegments

const (
	tcpFlagFIN = 0x01
	tcpFlagPSH = 0x08
	tcpFlagCWR = 0x80
)
