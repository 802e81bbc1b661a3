package fdstore

import (
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// A passed fd is only a number with a name: the store may hold one from an older build (other
// TUN flags, another port), from before the device was deleted and made again, or from another
// network namespace. A backend adopts it only when it is exactly what it would create itself;
// these checks say what differs, for the log line that explains why it starts afresh.

// tunFlags are the TUNSETIFF flags that decide how a queue reads and writes.
const tunFlags = unix.IFF_TUN | unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE | unix.IFF_VNET_HDR

// CheckTUN says why fd is not a queue of the TUN device name with exactly flags (of IFF_TUN,
// IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR) in the network namespace netns (an fd of
// it), or nil when it is one.
func CheckTUN(fd int, name string, flags uint16, netns int) error {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return err
	}
	// EBADFD: a TUN fd whose device was deleted; ENOTTY/EINVAL: not a TUN fd at all.
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return fmt.Errorf("not a queue of a TUN device (TUNGETIFF: %w)", err)
	}
	if got := ifr.Name(); got != name {
		return fmt.Errorf("a queue of TUN %s, not %s", got, name)
	}
	got := ifr.Uint16()
	if got&tunFlags != flags {
		return fmt.Errorf("TUN %s with flags %#x, not %#x", name, got&tunFlags, flags)
	}
	if got&unix.IFF_DETACH_QUEUE != 0 {
		return fmt.Errorf("a detached queue of TUN %s", name)
	}
	nsfd, err := unix.IoctlRetInt(fd, unix.TUNGETDEVNETNS)
	if err != nil {
		return fmt.Errorf("TUN %s: its network namespace (TUNGETDEVNETNS): %w", name, err)
	}
	defer unix.Close(nsfd)
	return sameNamespace(nsfd, netns, "TUN "+name)
}

// CheckUDP says why fd is not a UDP socket bound to exactly addr in the network namespace
// netns (an fd of it), or nil when it is one.
func CheckUDP(fd int, addr netip.AddrPort, netns int) error {
	domain := unix.AF_INET
	if addr.Addr().Is6() {
		domain = unix.AF_INET6
	}
	for _, o := range []struct {
		opt, want int
		what      string
	}{
		{unix.SO_DOMAIN, domain, "address family"},
		{unix.SO_TYPE, unix.SOCK_DGRAM, "socket type"},
		{unix.SO_PROTOCOL, unix.IPPROTO_UDP, "protocol"},
	} {
		got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, o.opt)
		if err != nil {
			return fmt.Errorf("not a socket (%s: %w)", o.what, err)
		}
		if got != o.want {
			return fmt.Errorf("a socket of %s %d, not %d", o.what, got, o.want)
		}
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("UDP socket: getsockname: %w", err)
	}
	var bound netip.AddrPort
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		bound = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		bound = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	if bound != addr {
		return fmt.Errorf("a UDP socket bound to %v, not %v", bound, addr)
	}
	nsfd, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
	if err != nil {
		return fmt.Errorf("UDP socket %v: its network namespace (SIOCGSKNS): %w", addr, err)
	}
	defer unix.Close(nsfd)
	return sameNamespace(nsfd, netns, "UDP socket "+addr.String())
}

// sameNamespace compares two namespace fds by the inode nsfs gives each namespace.
func sameNamespace(a, b int, what string) error {
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		return fmt.Errorf("%s: stat its namespace: %w", what, err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		return fmt.Errorf("%s: stat our namespace: %w", what, err)
	}
	if sa.Dev != sb.Dev || sa.Ino != sb.Ino {
		return fmt.Errorf("%s is in another network namespace (net:[%d], ours net:[%d])", what, sa.Ino, sb.Ino)
	}
	return nil
}
