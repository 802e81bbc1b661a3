package harness

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/fdstore"
)

// ServiceManager plays systemd for a daemon a test starts and restarts, as a unit with
// Type=notify and FileDescriptorStoreMax= runs it: it listens on a NOTIFY_SOCKET and records
// every notification; it keeps the fds a message stores (FDSTORE=1, under its FDNAME), closes
// those FDSTOREREMOVE=1 names, answers BARRIER=1 by closing the fd that came with it; and it
// passes the store to each process it starts, as systemd passes it to a restarted service:
// the fds from 3 on, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID.
//
// LISTEN_PID must be the pid of the process that reads it, which systemd writes into the
// environment in the child after fork. os/exec cannot, so the command runs under a shell that
// sets it to its own pid ($$) and execs the command: exec keeps the pid through nsenter to the
// daemon, so the daemon checks LISTEN_PID against its own pid exactly as under systemd.
//
// It does not flush the store when a process exits: systemd keeps it across restarts (what the
// tests kill -9 and start again) and empties it when the service is stopped for good, which
// Flush plays.
type ServiceManager struct {
	dir  string
	conn *net.UnixConn
	done chan struct{}

	mu       sync.Mutex
	notified []string
	store    []StoredFD
}

// StoredFD is one fd in the store, under the name it was stored with.
type StoredFD struct {
	Name string
	File *os.File
}

// NewServiceManager listens on a fresh notify socket. Close it when done.
func NewServiceManager() (*ServiceManager, error) {
	dir, err := os.MkdirTemp("", "xsm") // short: a socket path has at most 107 bytes
	if err != nil {
		return nil, fmt.Errorf("harness: service manager: %w", err)
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify"), Net: "unixgram"})
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("harness: service manager: %w", err)
	}
	m := &ServiceManager{dir: dir, conn: conn, done: make(chan struct{})}
	go m.serve()
	return m, nil
}

// Socket is the NOTIFY_SOCKET the started processes get.
func (m *ServiceManager) Socket() string { return filepath.Join(m.dir, "notify") }

// Notifications is every message received so far, in order.
func (m *ServiceManager) Notifications() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.notified...)
}

// Stored lists the names in the store, one per fd, in the order they were stored.
func (m *ServiceManager) Stored() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, len(m.store))
	for i, s := range m.store {
		names[i] = s.Name
	}
	return names
}

// Passed is the store as systemd passes it to the next process: a duplicate of each stored fd
// (close-on-exec, the caller's to close) with its name. For tests that restart a backend inside
// the test process rather than xnetd (fdstore.New with these stands for fdstore.FromProcess).
func (m *ServiceManager) Passed() ([]fdstore.Passed, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []fdstore.Passed
	for _, s := range m.store {
		rc, err := s.File.SyscallConn()
		if err != nil {
			return nil, err
		}
		dup := -1
		if cerr := rc.Control(func(fd uintptr) { dup, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3) }); cerr != nil {
			err = cerr
		}
		if err != nil {
			for _, p := range out {
				unix.Close(p.FD)
			}
			return nil, fmt.Errorf("harness: service manager: dup %s: %w", s.Name, err)
		}
		out = append(out, fdstore.Passed{Name: s.Name, FD: dup})
	}
	return out, nil
}

// Flush closes every stored fd, as systemd does when the service stops for good (systemctl
// stop), not when it restarts.
func (m *ServiceManager) Flush() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.store {
		s.File.Close()
	}
	m.store = nil
}

// Close stops listening and closes the store.
func (m *ServiceManager) Close() error {
	err := m.conn.Close()
	<-m.done
	m.Flush()
	os.RemoveAll(m.dir)
	return err
}

// Prepare makes cmd start as systemd starts the service (see ServiceManager): the environment
// gets NOTIFY_SOCKET and, with a non-empty store, the stored fds and LISTEN_* variables
// (replacing any the caller's environment had).
func (m *ServiceManager) Prepare(cmd *exec.Cmd) error {
	env := cmd.Env
	if env == nil {
		env = os.Environ()
	}
	env = withoutVars(env, "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
	env = append(env, "NOTIFY_SOCKET="+m.Socket())
	m.mu.Lock()
	store := append([]StoredFD(nil), m.store...)
	m.mu.Unlock()
	if len(store) > 0 {
		sh, err := exec.LookPath("sh")
		if err != nil {
			return fmt.Errorf("harness: service manager: %w", err)
		}
		names := make([]string, len(store))
		for i, s := range store {
			names[i] = s.Name
			cmd.ExtraFiles = append(cmd.ExtraFiles, s.File)
		}
		env = append(env, "LISTEN_FDS="+strconv.Itoa(len(store)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
		cmd.Args = append([]string{"sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$@"`, "listen-pid", cmd.Path}, cmd.Args[1:]...)
		cmd.Path = sh
	}
	cmd.Env = env
	return nil
}

func withoutVars(env []string, names ...string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		keep := true
		for _, n := range names {
			keep = keep && k != n
		}
		if keep {
			out = append(out, kv)
		}
	}
	return out
}

// serve reads notifications until Close.
func (m *ServiceManager) serve() {
	defer close(m.done)
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(253*4)) // SCM_MAX_FD fds
	for {
		n, oobn, _, _, err := m.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		fds := receivedFDs(oob[:oobn])
		m.handle(string(buf[:n]), fds)
	}
}

// receivedFDs are the fds of a message's SCM_RIGHTS, close-on-exec: only Prepare passes them on.
func receivedFDs(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range got {
			unix.CloseOnExec(fd)
		}
		fds = append(fds, got...)
	}
	return fds
}

// handle acts on one message as systemd does (sd_notify(3)); fds of a message that does not
// store them are closed.
func (m *ServiceManager) handle(msg string, fds []int) {
	fields := map[string]string{}
	for _, l := range strings.Split(msg, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			fields[k] = v
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notified = append(m.notified, msg)
	name := fields["FDNAME"]
	switch {
	case fields["FDSTORE"] == "1":
		if name == "" {
			name = "stored" // systemd's default name
		}
		for _, fd := range fds {
			m.store = append(m.store, StoredFD{Name: name, File: os.NewFile(uintptr(fd), name)})
		}
		return
	case fields["FDSTOREREMOVE"] == "1" && name != "":
		kept := m.store[:0]
		for _, s := range m.store {
			if s.Name == name {
				s.File.Close()
			} else {
				kept = append(kept, s)
			}
		}
		m.store = kept
	}
	// BARRIER=1 among them: closing its fd is the answer.
	for _, fd := range fds {
		unix.Close(fd)
	}
}
