package wireguard

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/xnet-dev/xnet/backend/tunoffload"
)

// offloadTUN is xnet-wg as the embedded wireguard-go reads and writes it: wireguard-go's own
// TUN device (its netlink events, MTU, name, Close) with the packets moved by package
// tunoffload. Measured with perf on the 2-core VM (one TCP stream between the containers of two
// hosts), the embedded datapath is CPU-bound and wireguard-go's work per batch of packets -
// goroutine hand-offs through its queues, one system call each way - is a large share of it,
// so the aim is fewer, larger batches and less work per packet:
//
//   - Read hands wireguard-go everything the TUN holds, up to its batch size (128 packets),
//     not one read's worth: after the first frame it reads on without waiting until the queue
//     is empty. One 64 KB TSO frame is about 46 packets at MTU 1420; several per batch halve
//     the passes through wireguard-go's pipeline under load, and small packets (which the
//     kernel hands over one per read) come in batches instead of one per pass.
//   - Write coalesces received TCP segments by reference (tunoffload.Coalescer: one writev per
//     run of one flow) instead of wireguard-go's GRO, which copies every payload into the
//     first packet's buffer and checks every segment's checksum first. The check is skipped:
//     a decrypted packet passed WireGuard's Poly1305 tag, so it is the bytes its sender sealed,
//     and that sender filled in its checksums (Split here, the kernel's WireGuard likewise
//     before it encrypts); the kernel's WireGuard marks decrypted packets CHECKSUM_UNNECESSARY
//     for the same reason. Everything but IPv4 TCP still goes through wireguard-go's Write,
//     whose UDP GRO keeps small datagrams batched.
type offloadTUN struct {
	tun.Device
	rc  syscall.RawConn
	log *slog.Logger
	// closed is set by Close: a read or write failing after it is os.ErrClosed, which
	// wireguard-go takes as the end of the device, not as an error to log.
	closed atomic.Bool

	rmu sync.Mutex
	// frame holds one read (virtio-net header + packet of up to 64 KB); pending is its length
	// while it waits for a Read with enough buffers for its segments, else 0.
	frame   []byte
	pending int
	// readFn is doRead as a method value made once (a closure would be allocated per read);
	// wait, n and err are its argument and results.
	readFn  func(fd uintptr) bool
	wait    bool
	n       int
	err     error
	lastLog atomic.Int64 // unix nanoseconds of the last malformed frame logged

	wmu sync.Mutex
	co  *tunoffload.Coalescer
}

// newOffloadTUN wraps dev, a TUN opened with IFF_VNET_HDR (wireguard-go has turned its
// offloads on).
func newOffloadTUN(dev tun.Device, log *slog.Logger) (*offloadTUN, error) {
	rc, err := dev.File().SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("wireguard: %s: %w", DeviceName, err)
	}
	t := &offloadTUN{Device: dev, rc: rc, log: log, frame: make([]byte, tunoffload.HdrLen+tunoffload.MaxPacket),
		co: tunoffload.NewCoalescer(rc, true, false)}
	t.readFn = t.doRead
	return t, nil
}

func (t *offloadTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	t.rmu.Lock()
	defer t.rmu.Unlock()
	n := 0
	for n < len(bufs) {
		if t.pending == 0 {
			got, err := t.read(n == 0)
			if err != nil && n == 0 {
				return 0, err
			}
			if err != nil || !got {
				break // an error comes back at the next read
			}
		}
		k, err := tunoffload.Split(t.frame[:t.pending], bufs[n:], sizes[n:], offset)
		if errors.Is(err, tun.ErrTooManySegments) && n > 0 {
			break // it waits for the next Read, which has all its buffers
		}
		t.pending = 0
		switch {
		case errors.Is(err, tun.ErrTooManySegments):
			return 0, err // wireguard-go counts it as dropped and reads on
		case err != nil:
			t.logMalformed(err)
		}
		n += k
	}
	return n, nil
}

// read reads one frame into t.frame, waiting for one if wait; without wait it reports
// got = false when the TUN has nothing queued.
func (t *offloadTUN) read(wait bool) (got bool, err error) {
	t.wait = wait
	if err := t.rc.Read(t.readFn); err != nil {
		return false, t.closedErr(err)
	}
	if t.err == unix.EAGAIN {
		return false, nil
	}
	if t.err != nil {
		return false, t.closedErr(t.err)
	}
	t.pending = t.n
	return true, nil
}

func (t *offloadTUN) doRead(fd uintptr) bool {
	t.n, t.err = unix.Read(int(fd), t.frame)
	return t.err != unix.EAGAIN || !t.wait
}

// closedErr is os.ErrClosed for an error after Close (or EBADFD, the TUN's own closed state,
// as wireguard-go's Read maps it), else err with the device's name.
func (t *offloadTUN) closedErr(err error) error {
	if t.closed.Load() || errors.Is(err, unix.EBADFD) {
		return os.ErrClosed
	}
	return fmt.Errorf("read %s: %w", DeviceName, err)
}

// logMalformed logs a frame Split refused, at most once a second: the kernel does not make
// such frames, so even one says something is wrong, but a flood must not flood the log.
func (t *offloadTUN) logMalformed(err error) {
	now := time.Now().UnixNano()
	last := t.lastLog.Load()
	if now-last < int64(time.Second) || !t.lastLog.CompareAndSwap(last, now) {
		return
	}
	t.log.Warn("dropped a packet read from "+DeviceName, "err", err)
}

func (t *offloadTUN) Write(bufs [][]byte, offset int) (int, error) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	var errs []error
	run := -1 // the first of a run of packets for wireguard-go's Write, if any
	for i, b := range bufs {
		pkt := b[offset:]
		if len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != unix.IPPROTO_TCP {
			t.co.Flush()
			if run < 0 {
				run = i
			}
			continue
		}
		if run >= 0 {
			if _, err := t.Device.Write(bufs[run:i], offset); err != nil {
				errs = append(errs, err)
			}
			run = -1
		}
		t.co.Add(pkt) // by reference: wireguard-go keeps bufs until we return
	}
	t.co.Flush()
	if run >= 0 {
		if _, err := t.Device.Write(bufs[run:], offset); err != nil {
			errs = append(errs, err)
		}
	}
	if n, err := t.co.TakeErrors(); n > 0 {
		if t.closed.Load() {
			return 0, os.ErrClosed
		}
		errs = append(errs, fmt.Errorf("%d writes to %s failed, the last: %w", n, DeviceName, err))
	}
	if len(errs) > 0 {
		return 0, errors.Join(errs...)
	}
	return len(bufs), nil
}

func (t *offloadTUN) Close() error {
	t.closed.Store(true)
	return t.Device.Close()
}
