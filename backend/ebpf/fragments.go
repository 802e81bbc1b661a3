package ebpf

// Fragmented VXLAN datagrams.
//
// The decap programs see packets before IP reassembly, and a fragment is not a VXLAN datagram:
// they pass fragments to the stack. The stack reassembles them and delivers the datagram to UDP
// port <Port>, where on an ebpf host nothing listens (there is no kernel vxlan device), so it
// would be answered with port unreachable and lost. Fragments are rare (an underlay path with a
// smaller MTU than ours, the outer DF bit being clear as the wire format asks) but they must not
// be a silent loss. fragReceiver is that listener: a UDP socket on our address and port that the
// stack hands reassembled datagrams, checked by the same rules as the programs apply (wire.Decode
// for the header, then the anti-spoofing rule: the outer source must be the PublicIP of the peer
// whose lease holds the inner source, and the inner destination must be in our subnet) and
// written, inner Ethernet frame and all, into xnet0's peer, so xnet0 receives it as the host's
// own overlay traffic and the host forwards it. Slow, and only for what the programs could not
// take: whole datagrams never reach the socket unless the programs passed them as not ours, and
// then wire.Decode refuses them the same way.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/wire"
)

// fragReceiver reads reassembled VXLAN datagrams and injects what passes the rules.
type fragReceiver struct {
	b         *Backend
	conn      *net.UDPConn
	inject    int // AF_PACKET socket bound to xnet0p
	delivered atomic.Uint64
	refused   atomic.Uint64
	done      sync.WaitGroup
}

// startFragReceiver opens the socket on localIP:port and the packet socket on xnet0's peer, in
// the calling thread's namespace (the executor's), and starts reading.
func (b *Backend) startFragReceiver(localIP netip.Addr) (*fragReceiver, error) {
	peer, err := net.InterfaceByName(hostDevicePeer)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", hostDevicePeer, err)
	}
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: localIP.AsSlice(), Port: b.Port})
	if err != nil {
		return nil, fmt.Errorf("listen on %v:%d for fragmented datagrams: %w", localIP, b.Port, err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("packet socket for %s: %w", hostDevicePeer, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: peer.Index}); err != nil {
		conn.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("bind packet socket to %s: %w", hostDevicePeer, err)
	}
	r := &fragReceiver{b: b, conn: conn, inject: fd}
	r.done.Add(1)
	go r.run(peer.Index)
	return r, nil
}

func (r *fragReceiver) run(ifindex int) {
	defer r.done.Done()
	buf := make([]byte, 65536)
	to := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(unix.ETH_P_IP)}
	to6 := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(unix.ETH_P_IPV6)}
	for {
		n, src, err := r.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				r.b.Log.Warn("reading reassembled VXLAN datagrams stopped", "err", err)
			}
			return
		}
		frame, v6, ok := r.check(buf[:n], src.Addr().Unmap())
		if !ok {
			r.refused.Add(1)
			continue
		}
		dst := to
		if v6 {
			dst = to6
		}
		if err := unix.Sendto(r.inject, frame, 0, dst); err != nil {
			r.refused.Add(1)
			continue
		}
		r.delivered.Add(1)
	}
}

// check applies the decap rules to one datagram from outer source src and returns the inner
// Ethernet frame to deliver, and whether it carries IPv6 (in a dual-stack overlay, where a
// peer's IPv6 subnet is checked as its IPv4 one is).
func (r *fragReceiver) check(payload []byte, src netip.Addr) (frame []byte, v6 bool, ok bool) {
	b := r.b
	mac, _ := wire.MACFrom(b.VtepMAC)
	b.mu.Lock()
	defer b.mu.Unlock()
	f, problem := wire.Decode(payload, wire.Expect{VNI: uint32(b.VNI), MAC: mac, MaxInner: b.MTU(), IPv6: b.v6.local.IsValid()})
	if problem != wire.OK {
		return nil, false, false
	}
	// The inner Ethernet header (after the 8-byte VXLAN header) and the inner packet, without
	// padding.
	frame = payload[wire.VXLANHeaderLen : wire.HeaderLen+len(f.Inner)]
	if f.IsIPv6() {
		inner, dst := netip.AddrFrom16(f.InnerSrc6), netip.AddrFrom16(f.InnerDst6)
		if !b.v6.local.Contains(dst) {
			return nil, true, false
		}
		for key, subnet6 := range b.v6.peers {
			if subnet6.Contains(inner) {
				// Spoofed unless the peer whose lease holds the inner source sent it.
				return frame, true, b.peers[key] == src
			}
		}
		return nil, true, false
	}
	inner, dst := netip.AddrFrom4(f.InnerSrc), netip.AddrFrom4(f.InnerDst)
	if !b.Local().Subnet.Contains(dst) {
		return nil, false, false
	}
	for subnet, publicIP := range b.peers {
		if subnet.Contains(inner) {
			return frame, false, publicIP == src
		}
	}
	return nil, false, false
}

func (r *fragReceiver) close() {
	r.conn.Close()
	r.done.Wait()
	unix.Close(r.inject)
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
