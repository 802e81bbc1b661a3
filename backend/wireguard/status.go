package wireguard

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// What `xnetd status` shows of a wireguard host (our public key, and per peer the last
// handshake and the bytes each way) is the device's own state, which lives in the kernel's
// device or, for the embedded one, in the xnetd process. The status command is another
// process, so the daemon serves the embedded device's state on a unix socket in its state
// directory (UAPISocket), in WireGuard's cross-platform protocol (the answer to "get=1", what
// `wg` reads from a user-space WireGuard's socket); the kernel's device is read with wgctrl.
// The socket answers get only: xnetd alone configures the device (a `wg set` there would be
// undone by the next lease event, or silently kept until it is). It is 0600, as the key file
// beside it: the answer holds the private key, as wireguard-go's own socket does.

// UAPISocket is the socket's file name in the state directory; xnet-wg-v6's is UAPISocketV6.
const (
	UAPISocket   = DeviceName + ".sock"
	UAPISocketV6 = DeviceNameV6 + ".sock"
)

// uapiSocketOf is the status socket of the device name.
func uapiSocketOf(name string) string {
	if name == DeviceNameV6 {
		return UAPISocketV6
	}
	return UAPISocket
}

// uapiServer answers "get=1" for one device on a unix socket.
type uapiServer struct {
	ln   *net.UnixListener
	path string
	wg   sync.WaitGroup
}

// serveUAPI listens on path (replacing what a killed process left there) and answers get
// requests from dev's state until close.
func serveUAPI(path string, dev *device.Device, log *slog.Logger) (*uapiServer, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("wireguard: remove stale %s: %w", path, err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("wireguard: status socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("wireguard: status socket: %w", err)
	}
	s := &uapiServer{ln: ln, path: path}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					log.Warn("status socket stopped", "socket", path, "err", err)
				}
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				answerUAPI(c, dev)
			}()
		}
	}()
	return s, nil
}

// answerUAPI answers the requests on c: get with the device's state, anything else errno 1
// (EPERM).
func answerUAPI(c net.Conn, dev *device.Device) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for {
		op, err := r.ReadString('\n')
		if err != nil {
			return
		}
		// The request ends with an empty line; get has no body, set's is not read.
		for l := op; l != "\n"; {
			if l, err = r.ReadString('\n'); err != nil {
				return
			}
		}
		if strings.TrimSpace(op) != "get=1" {
			fmt.Fprint(c, "errno=1\n\n")
			return
		}
		text, err := dev.IpcGet()
		if err != nil {
			fmt.Fprint(c, "errno=5\n\n") // EIO
			return
		}
		if _, err := io.WriteString(c, text+"errno=0\n\n"); err != nil {
			return
		}
	}
}

// close stops listening, waits for the answers under way and removes the socket.
func (s *uapiServer) close() {
	s.ln.Close() // removes the file: net unlinks a listener's socket on Close
	s.wg.Wait()
}

// ReadStatus reads what `xnetd status` shows of a wireguard host from outside the daemon: the
// kernel's devices with wgctrl (whether xnetd runs or not), the embedded ones' from the sockets
// the running xnetd serves in stateDir. xnet-wg-v6 is read when it exists (separate mode with
// an IPv6 underlay), and read alone when it is the only device (an IPv6-only overlay in
// separate mode). Why and PSK are not the device's to say and stay empty.
func ReadStatus(datapath Datapath, stateDir string) (Status, error) {
	_, err4 := netlink.LinkByName(DeviceName)
	if _, err6 := netlink.LinkByName(DeviceNameV6); err4 != nil && err6 == nil {
		return readStatus(datapath, stateDir, DeviceNameV6)
	}
	st, err := readStatus(datapath, stateDir, DeviceName)
	if err != nil {
		return st, err
	}
	if _, lerr := netlink.LinkByName(DeviceNameV6); lerr == nil {
		st6, err := readStatus(datapath, stateDir, DeviceNameV6)
		st.V6 = &st6
		if err != nil {
			return st, err
		}
	}
	return st, nil
}

func readStatus(datapath Datapath, stateDir, name string) (Status, error) {
	st := Status{Datapath: datapath, Device: name}
	if link, err := netlink.LinkByName(name); err == nil {
		st.MTU = link.Attrs().MTU
	}
	var dev *wgtypes.Device
	var err error
	if datapath == DatapathKernel {
		dev, err = readKernelDevice(name)
	} else {
		dev, err = readUAPI(filepath.Join(stateDir, uapiSocketOf(name)), name)
	}
	if err != nil {
		return st, err
	}
	st.fill(dev)
	return st, nil
}

func readKernelDevice(name string) (*wgtypes.Device, error) {
	c, err := wgctrl.New()
	if err != nil {
		return nil, fmt.Errorf("wireguard: open wgctrl: %w", err)
	}
	defer c.Close()
	d, err := c.Device(name)
	if err != nil {
		return nil, fmt.Errorf("wireguard: read kernel WireGuard device %s: %w", name, err)
	}
	return d, nil
}

// readUAPI asks the socket at path for the state of the device name.
func readUAPI(path, name string) (*wgtypes.Device, error) {
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return nil, fmt.Errorf("wireguard-go runs inside xnetd, which serves its state on %s: %w", path, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "get=1\n\n"); err != nil {
		return nil, fmt.Errorf("wireguard: ask %s: %w", path, err)
	}
	var text strings.Builder
	r := bufio.NewReader(c)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return nil, fmt.Errorf("wireguard: read %s: %w", path, err)
		}
		if l == "\n" {
			break
		}
		text.WriteString(l)
	}
	d, err := uapiGet(text.String())
	if err != nil {
		return nil, err
	}
	d.Name = name
	return d, nil
}

// fill sets the device's key, port and peers from what it reports.
func (st *Status) fill(dev *wgtypes.Device) {
	st.PublicKey = dev.PublicKey.String()
	st.ListenPort = dev.ListenPort
	st.Peers = nil
	for _, p := range dev.Peers {
		ps := PeerStatus{PublicKey: p.PublicKey.String(), LastHandshake: p.LastHandshakeTime, RxBytes: p.ReceiveBytes, TxBytes: p.TransmitBytes}
		if p.Endpoint != nil {
			ps.Endpoint = p.Endpoint.String()
		}
		for _, a := range p.AllowedIPs {
			if pfx, ok := netipPrefix(a); ok {
				ps.Subnets = append(ps.Subnets, pfx)
			}
		}
		if p.PresharedKey != (wgtypes.Key{}) {
			st.PSK = true
		}
		st.Peers = append(st.Peers, ps)
	}
	slices.SortFunc(st.Peers, func(x, y PeerStatus) int {
		if len(x.Subnets) == 0 || len(y.Subnets) == 0 {
			return len(x.Subnets) - len(y.Subnets)
		}
		return x.Subnets[0].Addr().Compare(y.Subnets[0].Addr())
	})
}
