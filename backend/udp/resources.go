package udp

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// resources are the fds the datapath works on. They are all opened by openResources on a
// thread in the backend's namespace and keep that namespace for their whole life.
type resources struct {
	queues  []queueRes
	send    []sendSocket
	offload bool // IFF_VNET_HDR with TSO/USO: the TUN hands over and takes large segments
	gso     bool // UDP_SEGMENT works on the sending sockets
	gro     bool // UDP_GRO is on for the receiving sockets
	// adopted says the queues and receiving sockets were a previous process's, taken back from
	// the service manager's store with what the kernel queued on them meanwhile.
	adopted bool
}

// queueRes is one queue: a TUN queue fd and a receiving socket.
type queueRes struct {
	tun tun.Device
	rc  syscall.RawConn // the receiving socket, for recvmmsg
	raw *net.UDPConn
}

// sendSocket is one socket of the sending pool; its port is one of the outer source ports.
type sendSocket struct {
	rc   syscall.RawConn // for sendmmsg
	raw  *net.UDPConn
	port int
}

// Socket buffer sizes: large enough that a burst of 64 KB GSO batches from several queues does
// not overflow them (the kernel doubles the value; SO_*BUFFORCE ignores the sysctl limits,
// which we may do as root; without root the plain option is capped by net.core.*mem_max).
const socketBuffer = 4 << 20

// openResources opens xnet0's queues and the sockets: those a previous process stored with
// the service manager (fds; see takeQueues) when they are all there and valid, else new ones,
// which it stores for the next process. It must run on a thread in the target namespace ns.
// On error, everything opened so far is closed again.
func openResources(publicIP netip.Addr, port int, tune Tuning, fds *fdstore.Store, ns netns.NsHandle, log *slog.Logger) (_ *resources, err error) {
	res := &resources{}
	defer func() {
		if err != nil {
			res.close()
		}
	}()
	listen := netip.AddrPortFrom(publicIP, uint16(port))
	tunFDs, rxFDs := takeQueues(fds, tune, listen, ns, log)
	res.adopted = tunFDs != nil
	closeFrom := func(fds []int, i int) {
		for _, fd := range fds[min(i, len(fds)):] {
			unix.Close(fd)
		}
	}
	if !res.adopted {
		if tunFDs, err = openTUNQueues(DeviceName, tune.Queues, !tune.NoOffload); err != nil {
			return nil, err
		}
	}
	for i, fd := range tunFDs {
		dev, _, err := tun.CreateUnmonitoredTUNFromFD(fd)
		if err != nil {
			closeFrom(tunFDs, i)
			closeFrom(rxFDs, 0)
			return nil, fmt.Errorf("udp: set up %s queue %d: %w", DeviceName, i, err)
		}
		res.queues = append(res.queues, queueRes{tun: dev})
		if i == 0 {
			// wireguard-go turns on the offloads it can; BatchSize > 1 says it did.
			res.offload = dev.BatchSize() > 1
		}
		if res.offload && !tune.CopyingSplit {
			// The segmenter cuts TCP only; UDP segmentation offload (USO), which
			// wireguard-go also asks for, stays with the kernel.
			if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6); err != nil {
				closeFrom(tunFDs, i+1)
				closeFrom(rxFDs, 0)
				return nil, fmt.Errorf("udp: set offloads of %s queue %d: %w", DeviceName, i, err)
			}
		}
	}
	res.gro = !tune.NoUDPGRO
	for i := range res.queues {
		var conn *net.UDPConn
		var gro bool
		if res.adopted {
			conn, gro, err = adoptRecvSocket(rxFDs[i], listen, res.gro)
		} else {
			conn, gro, err = openRecvSocket(publicIP, port, len(res.queues) > 1, res.gro)
		}
		if err != nil {
			closeFrom(rxFDs, i+1)
			return nil, err
		}
		rc, err := conn.SyscallConn()
		if err != nil {
			conn.Close()
			closeFrom(rxFDs, i+1)
			return nil, fmt.Errorf("udp: receiving socket of queue %d: %w", i, err)
		}
		res.queues[i].raw, res.queues[i].rc = conn, rc
		if !gro && res.gro {
			log.Info("UDP_GRO not available on this kernel: receiving one datagram at a time")
			res.gro = false
		}
	}
	res.gso = !tune.NoUDPGSO
	for range tune.SendSockets {
		s, gso, err := openSendSocket(publicIP)
		if err != nil {
			return nil, err
		}
		res.send = append(res.send, s)
		if !gso && res.gso {
			log.Info("UDP_SEGMENT not available on this kernel: sending one datagram per packet")
			res.gso = false
		}
	}
	if !res.adopted {
		storeQueues(fds, res, log)
	}
	return res, nil
}

// The fds a restart hands over: every TUN queue of xnet0 (while one is attached, the kernel
// queues what it routes into xnet0 instead of dropping it) and every receiving socket (bound,
// it queues what peers send). The sending sockets are not: nothing queues on them, and their
// ephemeral source ports may change.
func tunFDName(queue int) string {
	return backend.FDName(subnetmgr.BackendUDP, fmt.Sprintf("tun-%d", queue))
}
func rxFDName(queue int) string {
	return backend.FDName(subnetmgr.BackendUDP, fmt.Sprintf("rx-%d", queue))
}

// takeQueues takes back from the service manager's store the TUN queues and receiving sockets
// a previous process stored, when every one of tune.Queues queues is there and is exactly what
// openResources would open: a queue of xnet0 with our flags, a socket bound to listen, in the
// namespace ns. Anything less is not taken: the queues of one device and the sockets of one
// port share their traffic by a flow hash, so a stale queue or socket kept beside new ones
// would swallow the flows hashed to it. Such a set is closed and removed from the store (and
// the removal awaited, so the new queues and sockets are alone), and the log says why. It
// returns nil, nil when there is nothing to take: a first start, or no service manager.
func takeQueues(fds *fdstore.Store, tune Tuning, listen netip.AddrPort, ns netns.NsHandle, log *slog.Logger) (tunFDs, rxFDs []int) {
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE)
	if !tune.NoOffload {
		flags |= unix.IFF_VNET_HDR
	}
	var why []string
	for i := range tune.Queues {
		if fd, ok := fds.Take(tunFDName(i)); !ok {
			why = append(why, tunFDName(i)+" not passed")
		} else {
			tunFDs = append(tunFDs, fd)
			if err := fdstore.CheckTUN(fd, DeviceName, flags, int(ns)); err != nil {
				why = append(why, tunFDName(i)+": "+err.Error())
			}
		}
		if fd, ok := fds.Take(rxFDName(i)); !ok {
			why = append(why, rxFDName(i)+" not passed")
		} else {
			rxFDs = append(rxFDs, fd)
			if err := fdstore.CheckUDP(fd, listen, int(ns)); err != nil {
				why = append(why, rxFDName(i)+": "+err.Error())
			}
		}
	}
	if len(tunFDs) == 0 && len(rxFDs) == 0 {
		return nil, nil
	}
	if len(why) == 0 {
		log.Info("took xnet0's queues and receiving sockets back from the service manager's store: what the kernel queued while xnetd was down is read once the peers are programmed",
			"queues", tune.Queues, "listen", listen)
		return tunFDs, rxFDs
	}
	for _, fd := range append(tunFDs, rxFDs...) {
		unix.Close(fd)
	}
	var errs []error
	for i := range tune.Queues {
		errs = append(errs, fds.Remove(tunFDName(i)), fds.Remove(rxFDName(i)))
	}
	errs = append(errs, fds.Barrier(time.Second))
	log.Warn("not taking the stored queues and sockets back; opening new ones", "why", strings.Join(why, "; "), "store_err", errors.Join(errs...))
	return nil, nil
}

// storeQueues hands the new queues and receiving sockets to the service manager's store, for
// the next process (takeQueues). A failure costs only a lossless restart: it is logged.
func storeQueues(fds *fdstore.Store, res *resources, log *slog.Logger) {
	if !fds.Enabled() {
		return
	}
	var errs []error
	for i, q := range res.queues {
		for _, c := range []struct {
			name string
			conn interface {
				SyscallConn() (syscall.RawConn, error)
			}
		}{{tunFDName(i), q.tun.File()}, {rxFDName(i), q.raw}} {
			rc, err := c.conn.SyscallConn()
			if err == nil {
				cerr := rc.Control(func(fd uintptr) { err = fds.Put(c.name, int(fd)) })
				err = errors.Join(err, cerr)
			}
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		log.Warn("the service manager does not hold all of xnet0's queues and sockets: a restart loses what arrives meanwhile", "err", err)
	}
}

// removeStoredQueues drops what storeQueues stored (teardown: the device goes).
func removeStoredQueues(fds *fdstore.Store, queues int) error {
	var errs []error
	for i := range queues {
		errs = append(errs, fds.Remove(tunFDName(i)), fds.Remove(rxFDName(i)))
	}
	return errors.Join(errs...)
}

func (r *resources) close() {
	for _, q := range r.queues {
		if q.tun != nil {
			q.tun.Close()
		}
		if q.raw != nil {
			q.raw.Close()
		}
	}
	for _, s := range r.send {
		s.raw.Close()
	}
}

// openTUNQueues attaches n queues to the multi-queue TUN name, creating it if needed and
// making it persistent, so it outlives this process with its routes (see the package comment).
// A leftover xnet0 with other flags (an older build, another queue mode) is deleted and made
// again: TUNSETIFF refuses to attach to it.
func openTUNQueues(name string, n int, vnetHdr bool) ([]int, error) {
	var fds []int
	fail := func(err error) ([]int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, err
	}
	for i := range n {
		fd, err := openTUNQueue(name, vnetHdr)
		if i == 0 && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EBUSY)) {
			if derr := deleteStaleTUN(name); derr != nil {
				return fail(fmt.Errorf("udp: %s exists with other settings and cannot be replaced: %w (delete it: ip link del %s)", name, derr, name))
			}
			fd, err = openTUNQueue(name, vnetHdr)
		}
		if err != nil {
			return fail(fmt.Errorf("udp: attach queue %d of TUN %s: %w", i, name, err))
		}
		fds = append(fds, fd)
		if i == 0 {
			if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
				return fail(fmt.Errorf("udp: make TUN %s persistent: %w", name, err))
			}
		}
	}
	return fds, nil
}

func openTUNQueue(name string, vnetHdr bool) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE)
	if vnetHdr {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// deleteStaleTUN removes a persistent TUN named name that we cannot attach to: attach to it
// with the flags it has (single queue, with or without a vnet header), clear persistence, and
// let it go with the fd. A device of another kind (veth, ...) is left alone: TUNSETIFF fails.
func deleteStaleTUN(name string) error {
	for _, flags := range []uint16{
		unix.IFF_TUN | unix.IFF_NO_PI,
		unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR,
		unix.IFF_TUN,
		unix.IFF_TUN | unix.IFF_VNET_HDR,
	} {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(flags)
		if unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr) == nil {
			err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0)
			unix.Close(fd)
			return err
		}
		unix.Close(fd)
	}
	return fmt.Errorf("%s is not a TUN device this backend can attach to", name)
}

// openRecvSocket binds a UDP socket to ip:port for the receiving side of one queue.
func openRecvSocket(ip netip.Addr, port int, reusePort, wantGRO bool) (*net.UDPConn, bool, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, false, fmt.Errorf("udp: socket: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	if reusePort {
		// Every queue binds the same address; the kernel spreads datagrams over them by a
		// hash of the 4-tuple, so one flow stays on one queue (in order).
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return nil, false, fmt.Errorf("udp: SO_REUSEPORT: %w", err)
		}
	}
	setBuffer(fd, unix.SO_RCVBUFFORCE, unix.SO_RCVBUF)
	gro := false
	if wantGRO {
		gro = unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	}
	sa := &unix.SockaddrInet4{Port: port, Addr: ip.As4()}
	if err := unix.Bind(fd, sa); err != nil {
		return nil, false, fmt.Errorf("udp: bind %v:%d: %w (is a kernel vxlan device or another xnetd using the port?)", ip, port, err)
	}
	ok = true // fileConn owns fd from here, on error too
	conn, err := fileConn(fd, fmt.Sprintf("udp-rx-%v:%d", ip, port))
	if err != nil {
		return nil, false, err
	}
	return conn, gro, nil
}

// adoptRecvSocket takes over a receiving socket a previous process opened and stored (checked
// by takeQueues): bound, with SO_REUSEPORT as it was, with UDP_GRO turned to what we want now.
func adoptRecvSocket(fd int, listen netip.AddrPort, wantGRO bool) (*net.UDPConn, bool, error) {
	setBuffer(fd, unix.SO_RCVBUFFORCE, unix.SO_RCVBUF)
	gro := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_GRO, boolInt(wantGRO)) == nil && wantGRO
	conn, err := fileConn(fd, fmt.Sprintf("udp-rx-%v", listen))
	if err != nil {
		return nil, false, err
	}
	return conn, gro, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// openSendSocket opens one socket of the sending pool, bound to ip and an ephemeral port.
func openSendSocket(ip netip.Addr) (sendSocket, bool, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: socket: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	// docs/design.md, Encapsulation: outer DF clear. Our datagrams fit the underlay MTU by construction (overlay
	// MTU = underlay - 50); DF clear lets a smaller link on the way fragment instead of drop.
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DONT); err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: IP_MTU_DISCOVER: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_TTL, 64); err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: IP_TTL: %w", err)
	}
	setBuffer(fd, unix.SO_SNDBUFFORCE, unix.SO_SNDBUF)
	// This socket only sends; anything addressed to its port is dropped before it queues.
	drop := []unix.SockFilter{{Code: 0x06, K: 0}} // BPF_RET|BPF_K 0: keep 0 bytes
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: 1, Filter: &drop[0]}); err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: attach drop-all filter to a sending socket: %w", err)
	}
	// UDP_SEGMENT set to 0 on the socket changes nothing (sends give the size per message);
	// a kernel without UDP GSO refuses the option.
	gso := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_SEGMENT, 0) == nil
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: ip.As4()}); err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: bind %v:0: %w", ip, err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return sendSocket{}, false, fmt.Errorf("udp: getsockname: %w", err)
	}
	port := sa.(*unix.SockaddrInet4).Port
	ok = true // fileConn owns fd from here, on error too
	conn, err := fileConn(fd, fmt.Sprintf("udp-tx-%v:%d", ip, port))
	if err != nil {
		return sendSocket{}, false, err
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return sendSocket{}, false, fmt.Errorf("udp: sending socket %d: %w", port, err)
	}
	return sendSocket{rc: rc, raw: conn, port: port}, gso, nil
}

// setBuffer asks for socketBuffer bytes, forcing past the sysctl limit where allowed.
func setBuffer(fd, force, plain int) {
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, force, socketBuffer) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, plain, socketBuffer)
	}
}

// fileConn turns a socket fd into a *net.UDPConn on the runtime's poller. It takes fd over
// (net.FilePacketConn dups it; the original is closed here).
func fileConn(fd int, name string) (*net.UDPConn, error) {
	f := os.NewFile(uintptr(fd), name)
	pc, err := net.FilePacketConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("udp: wrap socket %s: %w", name, err)
	}
	return pc.(*net.UDPConn), nil
}
