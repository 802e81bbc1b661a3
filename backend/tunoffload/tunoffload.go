// Package tunoffload moves packets between a TUN device opened with IFF_VNET_HDR and TSO/USO
// offloads (TUNSETOFFLOAD) and user space: it cuts the large segments the kernel reads out
// into MTU-sized packets (Split) and coalesces runs of received TCP segments back into one
// large segment written with a single writev (Coalescer), and it has the Internet checksum both
// need (Sum). The udp and wireguard backends share it (udp its coalescer and checksum; the
// IPv6 pseudo header and the cutting of segments into VXLAN datagrams stay in udp).
//
// It owns the virtio-net header (include/uapi/linux/virtio_net.h) as a TUN with IFF_VNET_HDR
// reads and writes it, the segmentation and coalescing rules (Linux's own: tcp_gso_segment,
// udp4_ufo_fragment, tcp_gro_receive) and the checksum arithmetic. It does not own the TUN
// device (opening it, its flags and queues: the backends), nor any encapsulation.
package tunoffload

import "errors"

// The virtio-net header in front of every packet read from or written to the TUN.
const (
	// HdrLen is the header's length: struct virtio_net_hdr, without the v1 num_buffers field.
	HdrLen = 10

	// FlagNeedsCsum (VIRTIO_NET_HDR_F_NEEDS_CSUM) is CHECKSUM_PARTIAL: the transport checksum
	// field holds only the pseudo-header sum and the checksum from csum_start to the end is
	// still to be added.
	FlagNeedsCsum = 1

	// GSO types (VIRTIO_NET_HDR_GSO_*): the packet is a segment of gso_size-sized segments.
	GSONone   = 0
	GSOTCPv4  = 1
	GSOUDPL4  = 5
	GSOTCPv6  = 4
	GSOECNBit = 0x80 // the segments carry ECN (CWR on the first one only)
)

// TCPChecksumOffset is where a TCP header keeps its checksum, UDPChecksumOffset a UDP header.
const (
	TCPChecksumOffset = 16
	UDPChecksumOffset = 6
)

// MaxPacket is the largest IPv4 packet, and the largest segment the TUN reads or takes.
const MaxPacket = 65535

// ErrMalformed marks a frame read from the TUN whose virtio-net header or headers do not
// describe it; the kernel does not produce such frames, and they are dropped.
var ErrMalformed = errors.New("virtio-net header does not describe the packet")
