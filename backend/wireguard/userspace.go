package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/fdstore"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// wgDevice is one WireGuard device, configured in wgctrl's terms whichever datapath runs it.
type wgDevice interface {
	configure(wgtypes.Config) error
	get() (*wgtypes.Device, error)
	// close stops xnetd's side: the embedded device stops forwarding, the kernel's goes on.
	close() error
}

// userDevice is WireGuard inside xnetd: wireguard-go's device between a TUN (xnet-wg, or
// xnet-wg-v6 in separate mode) and UDP sockets on its listen port.
type userDevice struct {
	name string // the TUN's
	dev  *device.Device
	tun  *countingTUN
	// takenOver says the TUN's fd was the previous process's, taken back from the service
	// manager's store with the packets queued on it while xnetd was down.
	takenOver bool
	mu        sync.Mutex
	// restarted is when restartHandshake restarted a peer's handshake, within the last second.
	restarted map[*device.Peer]time.Time
	// holdTimer releases a taken-over TUN if release is never called.
	holdTimer *time.Timer
	// status answers `xnetd status` (status.go); nil until the device is up.
	status *uapiServer
	// offload says the TUN hands over TCP segments of up to 64 KB (IFF_VNET_HDR), which
	// offloadTUN cuts and wireguard-go sends with UDP GSO, and takes coalesced ones: a large
	// share of the throughput.
	offload bool
}

// openUserDevice attaches to the TUN name (taking the previous process's fd back from the
// service manager's store fds, or creating the device, persistent, when missing) in the
// namespace ns and starts wireguard-go on it, its sockets opened in ns too. The device is down
// until configured and brought up; a TUN taken over is not read before release.
func openUserDevice(name string, ns netns.NsHandle, mtu int, stats *counters, fds *fdstore.Store, crossed func(netip.AddrPort, string), log *slog.Logger) (*userDevice, error) {
	var tdev tun.Device
	takenOver := false
	err := backend.InNamespace(ns, func() error {
		f, took, err := takeOrOpenTUN(fds, name, ns, log)
		if err != nil {
			return err
		}
		takenOver = took
		// CreateTUNFromFile opens its netlink socket (link up/down and MTU events) here, in ns.
		tdev, err = tun.CreateTUNFromFile(f, mtu)
		if err != nil {
			f.Close()
			return fmt.Errorf("wireguard: start on TUN %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	offload := tdev.BatchSize() > 1 // IFF_VNET_HDR, and wireguard-go turned the offloads on
	if offload {
		ot, err := newOffloadTUN(tdev, log)
		if err != nil {
			tdev.Close()
			return nil, err
		}
		tdev = ot
	}
	bind := newUDPBind(ns, log)
	u := &userDevice{name: name, offload: offload, restarted: map[*device.Peer]time.Time{}, takenOver: takenOver,
		tun: &countingTUN{Device: tdev, c: stats, mtu: mtu, open: make(chan struct{}), closed: make(chan struct{})}}
	if !takenOver {
		u.release()
	} else {
		u.holdTimer = time.AfterFunc(backend.HandoverHold, func() {
			if u.release() {
				log.Warn("reading the taken-over TUN although the peers are not programmed yet: packets for unknown peers are dropped", "after", backend.HandoverHold)
			}
		})
	}
	u.dev = device.NewDevice(u.tun, bind, deviceLogger(log, stats, crossed))
	return u, nil
}

// release lets wireguard-go read the TUN (see countingTUN.open); it says whether this call did.
func (u *userDevice) release() bool {
	did := false
	u.tun.openOnce.Do(func() {
		close(u.tun.open)
		did = true
	})
	return did
}

// tunFDName is the name a TUN's fd has in the service manager's store: xnet-wg's "tun" (as
// before there was a second device), xnet-wg-v6's "tun6". Only the TUN is stored, not wireguard-go's UDP sockets: what peers send while xnetd is down is sealed with
// the session keys of the process that died, which WireGuard keeps nowhere else (reusing
// them after a restart would risk reusing a nonce), so the next process could open none of
// it; what waits on the TUN, our containers' packets, it can seal anew after a handshake.
func tunFDName(device string) string {
	if device == DeviceNameV6 {
		return backend.FDName(subnetmgr.BackendWireGuard, "tun6")
	}
	return backend.FDName(subnetmgr.BackendWireGuard, "tun")
}

// tunFlags are the flags openTUN gives our TUNs, which a stored fd must have too.
const tunFlags = unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR

// takeOrOpenTUN takes the TUN name's fd back from the service manager's store when it is there
// and is a queue of name with our flags in ns (took is then true); otherwise it drops a stored
// one (closed, removed from the store and the removal awaited: the TUN takes one queue only,
// and the manager's copy would keep it) and opens name anew, storing the new fd for the next
// process. It runs on a thread in ns.
func takeOrOpenTUN(fds *fdstore.Store, name string, ns netns.NsHandle, log *slog.Logger) (f *os.File, took bool, err error) {
	fdName := tunFDName(name)
	if fd, ok := fds.Take(fdName); ok {
		err := fdstore.CheckTUN(fd, name, tunFlags, int(ns))
		if err == nil {
			err = unix.SetNonblock(fd, true) // before os.NewFile, so the runtime polls it
		}
		if err == nil {
			log.Info("took " + name + "'s TUN back from the service manager's store: what our side sent while xnetd was down is sent once the peers are programmed")
			return os.NewFile(uintptr(fd), "/dev/net/tun"), true, nil
		}
		unix.Close(fd)
		serr := errors.Join(fds.Remove(fdName), fds.Barrier(time.Second))
		log.Warn("not taking the stored TUN back; opening it anew", "tun", name, "why", err, "store_err", serr)
	}
	if f, err = openTUN(name); err != nil {
		return nil, false, err
	}
	if fds.Enabled() {
		rc, err := f.SyscallConn()
		if err == nil {
			cerr := rc.Control(func(fd uintptr) { err = fds.Put(fdName, int(fd)) })
			err = errors.Join(err, cerr)
		}
		if err != nil {
			log.Warn("the service manager does not hold the TUN: a restart loses what our side sends meanwhile", "tun", name, "err", err)
		}
	}
	return f, false, nil
}

// openTUN opens the TUN device name with offloads, creating it if needed, and makes it
// persistent: a stopped xnetd leaves xnet-wg and its routes in place, so packets for the
// overlay are dropped by the idle TUN instead of following the default route out of the
// underlay NIC unencrypted.
func openTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("wireguard: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		// IFF_VNET_HDR: wireguard-go's tun package turns on TSO/USO offloads when it is set.
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err == nil {
		err = unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1)
	}
	if err == nil {
		err = unix.SetNonblock(fd, true) // before os.NewFile, so the runtime polls it
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("wireguard: attach to TUN %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), nil
}

func (u *userDevice) configure(cfg wgtypes.Config) error {
	if err := u.dev.IpcSet(uapiSet(cfg)); err != nil {
		return fmt.Errorf("configure wireguard-go: %w", err)
	}
	return nil
}

func (u *userDevice) get() (*wgtypes.Device, error) {
	text, err := u.dev.IpcGet()
	if err != nil {
		return nil, fmt.Errorf("read wireguard-go's state: %w", err)
	}
	d, err := uapiGet(text)
	if err != nil {
		return nil, err
	}
	d.Name = u.name
	return d, nil
}

func (u *userDevice) up() error {
	if err := u.dev.Up(); err != nil {
		return fmt.Errorf("bring wireguard-go up (open its UDP sockets): %w", err)
	}
	return nil
}

// initiate starts a handshake with the peer key, unless one was started within the last 5 s
// (WireGuard's rate limit).
func (u *userDevice) initiate(key wgtypes.Key) {
	if p := u.dev.LookupPeer(device.NoisePublicKey(key)); p != nil {
		_ = p.SendHandshakeInitiation(false) // a failure is retried by WireGuard's timers
	}
}

// restartHandshake forgets the peer's handshake and session and starts a new handshake after
// delay, past WireGuard's 5 s rate limit. It does so at most once a second per peer (a forged
// handshake answer must not make us flood one), and not for a peer removed meanwhile, nor for
// one added again since (a new peer, with its own handshake). It says whether it did.
func (u *userDevice) restartHandshake(key wgtypes.Key, delay time.Duration) bool {
	p := u.dev.LookupPeer(device.NoisePublicKey(key))
	if p == nil {
		return false
	}
	time.Sleep(delay)
	if u.dev.LookupPeer(device.NoisePublicKey(key)) != p {
		return false
	}
	u.mu.Lock()
	for q, at := range u.restarted {
		if time.Since(at) >= time.Second {
			delete(u.restarted, q)
		}
	}
	_, recent := u.restarted[p]
	if !recent {
		u.restarted[p] = time.Now()
	}
	u.mu.Unlock()
	if recent {
		return false
	}
	p.ExpireCurrentKeypairs() // clears the handshake and its rate limit; queued packets stay
	_ = p.SendHandshakeInitiation(false)
	return true
}

// close stops wireguard-go and closes the TUN fd and the sockets; the persistent TUN stays.
func (u *userDevice) close() error {
	if u.holdTimer != nil {
		u.holdTimer.Stop()
	}
	if u.status != nil {
		u.status.close()
	}
	u.dev.Close()
	return nil
}

// What wireguard-go logs for events the backend acts on. Its log is the only place it
// reports them; a test fails if a new version words them differently.
const (
	// A decrypted packet whose inner source is not in the sender's AllowedIPs (its subnets):
	// the cryptokey routing check, counted as spoofed.
	logDisallowedSource   = "IPv4 packet with disallowed source address from %v"
	logDisallowedSourceV6 = "IPv6 packet with disallowed source address from %v"
	// Two handshakes crossed (see Backend.handshakesCrossed), seen by the host whose own
	// initiation was replaced by the peer's before the answer came ...
	logInvalidResponse = "Received invalid response message from %s"
	// ... or, when two handshake workers raced, after it was accepted.
	logDeriveFailed = "%v - Failed to derive keypair: %v"
)

// deviceLogger sends wireguard-go's log to ours (its verbose lines - handshakes, keepalives -
// at debug level, its errors as warnings), counting spoofed packets and passing crossed
// handshakes to crossed, off the device's goroutine.
func deviceLogger(log *slog.Logger, stats *counters, crossed func(netip.AddrPort, string)) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			switch format {
			case logDisallowedSource, logDisallowedSourceV6:
				stats.spoofed.Add(1)
			case logInvalidResponse:
				if s, ok := args[0].(string); ok {
					if ap, err := netip.ParseAddrPort(s); err == nil {
						go crossed(ap, "")
					}
				}
			}
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug("wireguard-go: " + fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			if format == logDeriveFailed {
				if p, ok := args[0].(fmt.Stringer); ok {
					go crossed(netip.AddrPort{}, p.String())
				}
			}
			log.Warn("wireguard-go: " + fmt.Sprintf(format, args...))
		},
	}
}

// tunAvailable says whether this process may open TUN devices.
func tunAvailable() error {
	if err := unix.Access("/dev/net/tun", unix.R_OK|unix.W_OK); err != nil {
		return fmt.Errorf("/dev/net/tun: %w", err)
	}
	return nil
}
