package health

import "encoding/binary"

// A probe is one UDP datagram of msgLen bytes, request and reply alike:
//
//	0  "XNHP"  magic
//	4  1       version
//	5  kind    1 request, 2 reply
//	6  flags   reply: flagOverlayUp when the responder's overlay address is on one of its interfaces
//	7  0
//	8  seq     the prober's sequence number, echoed (big endian)
//
// Longer datagrams are accepted and the bytes after msgLen ignored, so a later version can add
// fields that this one skips.
const msgLen = 16

const (
	msgVersion  = 1
	kindRequest = 1
	kindReply   = 2
	// flagOverlayUp: the responder holds its overlay address (always, with the VXLAN backends;
	// on host-gw once Docker has set up docker0). Probes over the overlay wait for it.
	flagOverlayUp = 1 << 0
)

var msgMagic = [4]byte{'X', 'N', 'H', 'P'}

type message struct {
	kind  byte
	flags byte
	seq   uint64
}

// appendTo appends the encoded message to b.
func (m message) appendTo(b []byte) []byte {
	b = append(b, msgMagic[:]...)
	b = append(b, msgVersion, m.kind, m.flags, 0)
	return binary.BigEndian.AppendUint64(b, m.seq)
}

// parseMessage decodes a datagram; ok is false for anything that is not a probe of this
// version.
func parseMessage(b []byte) (m message, ok bool) {
	if len(b) < msgLen || [4]byte(b[:4]) != msgMagic || b[4] != msgVersion {
		return m, false
	}
	m = message{kind: b[5], flags: b[6], seq: binary.BigEndian.Uint64(b[8:16])}
	return m, m.kind == kindRequest || m.kind == kindReply
}
