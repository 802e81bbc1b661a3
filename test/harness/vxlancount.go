package harness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// VXLANKind is how one VXLAN datagram crossed the underlay: over IPv4 or IPv6, carrying an
// inner IPv4 or IPv6 packet.
type VXLANKind struct {
	Underlay6 bool // the outer header is IPv6
	Inner6    bool // the inner EtherType is IPv6
}

func (k VXLANKind) String() string {
	outer, inner := "IPv4", "IPv4"
	if k.Underlay6 {
		outer = "IPv6"
	}
	if k.Inner6 {
		inner = "IPv6"
	}
	return inner + " in VXLAN over " + outer
}

// VXLANCounter counts the VXLAN datagrams (UDP to one port) an interface sends and receives, by
// VXLANKind: proof of which underlay a path takes that no backend can fake. A GSO packet the
// interface carries whole counts once, and its length shows in LargestSent: a frame longer than
// the interface's MTU is a GSO packet that kept its offload down to the interface.
type VXLANCounter struct {
	fd          int
	port        uint16
	stop        atomic.Bool
	done        sync.WaitGroup
	mu          sync.Mutex
	counts      map[VXLANKind]int
	largestSent map[VXLANKind]int
}

// CountVXLAN starts counting the VXLAN datagrams to port on the interface iface of the
// namespace. Stop ends it.
func (n *Namespace) CountVXLAN(iface string, port int) (*VXLANCounter, error) {
	c := &VXLANCounter{fd: -1, port: uint16(port), counts: map[VXLANKind]int{}, largestSent: map[VXLANKind]int{}}
	err := n.Do(func() error {
		ifc, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		all := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, all)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind the packet socket to %s: %w", iface, err)
		}
		// The socket queues whole frames (MSG_TRUNC only trims what a read copies), and a GSO
		// frame is up to 64 KB: with the default buffer a burst of them under CPU load
		// overflows it and the largest frames are the ones dropped. Room for a few hundred.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); err != nil {
			unix.Close(fd)
			return fmt.Errorf("packet socket buffer: %w", err)
		}
		// Reads time out, so Stop is heard.
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return fmt.Errorf("packet socket timeout: %w", err)
		}
		c.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("harness: count VXLAN on %s of %s: %w", iface, n.Name, err)
	}
	c.done.Add(1)
	go c.read()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *VXLANCounter) read() {
	defer c.done.Done()
	buf := make([]byte, 256) // the headers are all we look at
	for !c.stop.Load() {
		n, from, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		if kind, ok := c.classify(buf[:min(n, len(buf))]); ok {
			c.mu.Lock()
			c.counts[kind]++
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				c.largestSent[kind] = max(c.largestSent[kind], n) // with MSG_TRUNC, the frame's whole length
			}
			c.mu.Unlock()
		}
	}
}

// classify reads an Ethernet frame as VXLAN to c.port over either IP version, without IPv6
// extension headers (no VXLAN sender adds any).
func (c *VXLANCounter) classify(f []byte) (VXLANKind, bool) {
	var k VXLANKind
	if len(f) < 14 {
		return k, false
	}
	var udp int
	switch binary.BigEndian.Uint16(f[12:]) {
	case unix.ETH_P_IP:
		if len(f) < 14+20 || f[14+9] != unix.IPPROTO_UDP {
			return k, false
		}
		udp = 14 + int(f[14]&0xf)*4
	case unix.ETH_P_IPV6:
		if len(f) < 14+40 || f[14+6] != unix.IPPROTO_UDP {
			return k, false
		}
		udp, k.Underlay6 = 14+40, true
	default:
		return k, false
	}
	inner := udp + 8 + 8 // UDP, VXLAN headers; the inner EtherType is 12 bytes further
	if len(f) < inner+14 || binary.BigEndian.Uint16(f[udp+2:]) != c.port {
		return k, false
	}
	k.Inner6 = binary.BigEndian.Uint16(f[inner+12:]) == unix.ETH_P_IPV6
	return k, true
}

// Counts is what was counted so far.
func (c *VXLANCounter) Counts() map[VXLANKind]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[VXLANKind]int, len(c.counts))
	for k, v := range c.counts {
		out[k] = v
	}
	return out
}

// LargestSent is the length of the longest frame of each kind the interface sent so far,
// Ethernet header included.
func (c *VXLANCounter) LargestSent() map[VXLANKind]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[VXLANKind]int, len(c.largestSent))
	for k, v := range c.largestSent {
		out[k] = v
	}
	return out
}

// Stop ends the count and returns it.
func (c *VXLANCounter) Stop() map[VXLANKind]int {
	if c.fd >= 0 {
		// The reader notices within one read timeout; the socket is closed after it is gone,
		// so it never reads a descriptor number reused meanwhile.
		c.stop.Store(true)
		c.done.Wait()
		unix.Close(c.fd)
		c.fd = -1
	}
	return c.Counts()
}
