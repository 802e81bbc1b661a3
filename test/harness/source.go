package harness

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// SourceSeen sends a UDP datagram from namespace from to dst (IPv4 or IPv6), where a listener
// in namespace to answers with the source address it saw: what NAT, if any, did on the way. It
// tries tries times (one for a flow expected to be dropped, a few for one that must pass) and
// returns an error when nothing answered.
func SourceSeen(from, to *Namespace, dst netip.Addr, tries int) (netip.Addr, error) {
	network := "udp4"
	if !dst.Is4() {
		network = "udp6"
	}
	var srv *net.UDPConn
	if err := to.Do(func() (err error) {
		srv, err = net.ListenUDP(network, &net.UDPAddr{IP: net.IP(dst.AsSlice())})
		return err
	}); err != nil {
		return netip.Addr{}, fmt.Errorf("listen on %v in %s: %w", dst, to.Name, err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			_, addr, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteToUDPAddrPort([]byte(addr.Addr().String()), addr)
		}
	}()
	var c *net.UDPConn
	if err := from.Do(func() (err error) {
		c, err = net.DialUDP(network, nil, srv.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		return netip.Addr{}, fmt.Errorf("dial %v from %s: %w", dst, from.Name, err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range max(tries, 1) {
		if _, err := c.Write([]byte("who am i")); err != nil {
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
		if n, err := c.Read(buf); err == nil {
			return netip.ParseAddr(string(buf[:n]))
		}
	}
	return netip.Addr{}, errors.New("no answer from " + dst.String() + " in " + to.Name + " to " + from.Name)
}
