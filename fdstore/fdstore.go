// Package fdstore is xnetd's side of systemd's service manager protocol: notifications on
// NOTIFY_SOCKET (sd_notify(3): READY=1, STATUS=, STOPPING=1), the file descriptor store built
// on them (FDSTORE=1 and FDSTOREREMOVE=1 with FDNAME=, the fds travelling as SCM_RIGHTS on the
// datagram, as sd_pid_notify_with_fds(3) sends them), and the stored fds systemd passes back
// when it starts the service again (sd_listen_fds_with_names(3): LISTEN_PID, LISTEN_FDS,
// LISTEN_FDNAMES, fds from 3 on).
//
// It owns the wire format of those messages and the bookkeeping of which passed fd was taken.
// It does not decide what is stored, nor check that a passed fd is still what its name says:
// the backends do (with CheckTUN and CheckUDP), because only they know what they expect.
//
// Design history: the user-space datapaths (backend/udp, the embedded wireguard-go of
// backend/wireguard) are the xnetd process itself. Their TUN devices persist across a restart,
// but a TUN with no queue attached drops what the kernel routes into it, and a closed UDP port
// drops what peers send, so a kill -9 lost the packets of the restart. systemd can hold fds
// for a service across its restarts (FileDescriptorStoreMax=): while the store holds the TUN
// queues and sockets they stay attached and bound, the kernel queues packets on them, and the
// next process reads those. coreos/go-systemd sends notifications without fds and reads
// LISTEN_FDS without reporting malformed values, so this package sends and parses both itself,
// and xnetd uses it for every notification: one sender, one socket format.
package fdstore

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ListenFDsStart is the first fd the service manager passes (SD_LISTEN_FDS_START).
const ListenFDsStart = 3

// MaxNameLen is the longest FDNAME systemd accepts.
const MaxNameLen = 255

// Passed is one fd the service manager passed at start, with the name it was stored under.
type Passed struct {
	Name string
	FD   int
}

// Store is this process's view of the service manager: where to send notifications and the
// fds it passed at start that nobody has taken yet. A nil *Store is a process without a
// service manager: notifications and stores are dropped, nothing is passed. Its methods are
// safe for concurrent use.
type Store struct {
	socket string // NOTIFY_SOCKET; "" when no service manager listens

	mu     sync.Mutex
	passed []passedFD // in LISTEN_FDS order
}

type passedFD struct {
	Passed
	taken bool // handed to a caller or closed: no longer ours to give
}

// New is a store that notifies socket (a NOTIFY_SOCKET value; "" for none) and holds the
// passed fds, which it owns until they are taken.
func New(socket string, passed []Passed) (*Store, error) {
	if err := checkSocket(socket); err != nil {
		return nil, err
	}
	s := &Store{socket: socket}
	for _, p := range passed {
		s.passed = append(s.passed, passedFD{Passed: p})
	}
	return s, nil
}

// FromProcess is the store of this process as systemd started it: NOTIFY_SOCKET, and the fds
// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES describe. Like sd_listen_fds(1) it removes the
// LISTEN_* variables (children must not take the fds for theirs) and marks the passed fds
// close-on-exec. Fds meant for another process (LISTEN_PID is not ours, or unset: systemd sets
// it in the child after fork) are not taken; ignored says why, for the log. A malformed value
// is an error naming the variable: the fds cannot be trusted then.
func FromProcess() (s *Store, ignored string, err error) {
	env := ListenEnv{PID: os.Getenv("LISTEN_PID"), FDs: os.Getenv("LISTEN_FDS"), FDNames: os.Getenv("LISTEN_FDNAMES")}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		_ = os.Unsetenv(k)
	}
	passed, ignored, err := env.Parse(os.Getpid())
	if err != nil {
		return nil, "", err
	}
	for _, p := range passed {
		if _, err := unix.FcntlInt(uintptr(p.FD), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			return nil, "", fmt.Errorf("LISTEN_FDS=%s: fd %d (%s) is not open: %w", env.FDs, p.FD, p.Name, err)
		}
	}
	s, err = New(os.Getenv("NOTIFY_SOCKET"), passed)
	return s, ignored, err
}

// ListenEnv is what the service manager sets for a process it passes fds to.
type ListenEnv struct {
	PID, FDs, FDNames string
}

// Parse reads the env as sd_listen_fds_with_names(3) does, for the process pid. No LISTEN_PID,
// or another process's, means no fds for us (ignored says which, "" when there was nothing to
// pass); values that do not parse are an error. Without LISTEN_FDNAMES every fd is named
// "unknown", as systemd names it.
func (e ListenEnv) Parse(pid int) (passed []Passed, ignored string, err error) {
	switch {
	case e.PID == "" && e.FDs == "":
		return nil, "", nil
	case e.PID == "":
		return nil, fmt.Sprintf("LISTEN_FDS=%s without LISTEN_PID: not for us (systemd sets LISTEN_PID to the pid it passes fds to)", e.FDs), nil
	}
	owner, err := strconv.Atoi(e.PID)
	if err != nil || owner <= 0 {
		return nil, "", fmt.Errorf("LISTEN_PID=%q is not a process id: unset LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, or let systemd set them", e.PID)
	}
	if owner != pid {
		return nil, fmt.Sprintf("LISTEN_PID=%d is not us (pid %d): the fds are another process's", owner, pid), nil
	}
	if e.FDs == "" {
		return nil, "", nil
	}
	n, err := strconv.Atoi(e.FDs)
	if err != nil || n <= 0 || n > 1<<16 {
		return nil, "", fmt.Errorf("LISTEN_FDS=%q is not a count of fds from %d on: unset LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, or let systemd set them", e.FDs, ListenFDsStart)
	}
	names := make([]string, n)
	for i := range names {
		names[i] = "unknown"
	}
	if e.FDNames != "" {
		got := strings.Split(e.FDNames, ":")
		if len(got) != n {
			return nil, "", fmt.Errorf("LISTEN_FDNAMES=%q names %d fds, LISTEN_FDS=%d passes %d: they must agree", e.FDNames, len(got), n, n)
		}
		for i, name := range got {
			if err := CheckName(name); err != nil {
				return nil, "", fmt.Errorf("LISTEN_FDNAMES=%q: fd %d: %w", e.FDNames, ListenFDsStart+i, err)
			}
		}
		names = got
	}
	for i, name := range names {
		passed = append(passed, Passed{Name: name, FD: ListenFDsStart + i})
	}
	return passed, "", nil
}

// CheckName says whether systemd accepts name as an FDNAME: 1 to 255 printable ASCII
// characters, no colon (it separates the names in LISTEN_FDNAMES).
func CheckName(name string) error {
	if name == "" || len(name) > MaxNameLen {
		return fmt.Errorf("fd name %q: want 1 to %d characters", name, MaxNameLen)
	}
	for _, c := range []byte(name) {
		if c <= ' ' || c >= 0x7f || c == ':' {
			return fmt.Errorf("fd name %q: only printable ASCII without spaces and colons", name)
		}
	}
	return nil
}

// checkSocket accepts what systemd puts in NOTIFY_SOCKET for a service on this host: an
// absolute path or an abstract socket (@name). (systemd 254 also knows vsock:, for VMs.)
func checkSocket(socket string) error {
	if socket == "" || strings.HasPrefix(socket, "/") || strings.HasPrefix(socket, "@") {
		return nil
	}
	return fmt.Errorf("NOTIFY_SOCKET=%q is neither an absolute path nor an abstract socket (@name): unset it, or let systemd set it", socket)
}

// Enabled says whether a service manager listens: only then do stored fds outlive us.
func (s *Store) Enabled() bool { return s != nil && s.socket != "" }

// Notify sends one notification (sd_notify(3)): "READY=1", "STATUS=...", lines joined by \n.
// Without a service manager it does nothing.
func (s *Store) Notify(state string) error {
	if !s.Enabled() {
		return nil
	}
	return s.send(state, nil)
}

// Put stores fd under name with the service manager (FDSTORE=1). The manager keeps a
// duplicate, so fd stays ours to use and close. One fd per message, so each keeps its own
// name: systemd names every fd of a message alike and passes them back in no promised order.
func (s *Store) Put(name string, fd int) error {
	if err := CheckName(name); err != nil {
		return err
	}
	if !s.Enabled() {
		return nil
	}
	if err := s.send("FDSTORE=1\nFDNAME="+name, []int{fd}); err != nil {
		return fmt.Errorf("store fd %s: %w", name, err)
	}
	return nil
}

// Remove makes the service manager close every fd it stores under name (FDSTOREREMOVE=1).
// It acts on the manager's next turn: Barrier waits for it.
func (s *Store) Remove(name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	if !s.Enabled() {
		return nil
	}
	if err := s.send("FDSTOREREMOVE=1\nFDNAME="+name, nil); err != nil {
		return fmt.Errorf("remove stored fd %s: %w", name, err)
	}
	return nil
}

// Barrier waits until the service manager has handled every message sent before it
// (sd_notify_barrier(3): BARRIER=1 with the write end of a pipe, which the manager closes).
// After a Remove, that means its copies are closed: a TUN queue is detached, a port free.
func (s *Store) Barrier(timeout time.Duration) error {
	if !s.Enabled() {
		return nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("notify barrier: pipe: %w", err)
	}
	defer unix.Close(p[0])
	err := s.send("BARRIER=1", []int{p[1]})
	unix.Close(p[1])
	if err != nil {
		return fmt.Errorf("notify barrier: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		fds := []unix.PollFd{{Fd: int32(p[0])}} // POLLHUP is reported whatever the events
		ms := int(time.Until(deadline).Milliseconds())
		if ms <= 0 {
			return fmt.Errorf("notify barrier: the service manager did not answer within %v", timeout)
		}
		n, err := unix.Poll(fds, ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("notify barrier: poll: %w", err)
		}
		if n > 0 && fds[0].Revents&unix.POLLHUP != 0 {
			return nil
		}
	}
}

// Take hands over the passed fd stored under name, which the caller then owns; ok is false
// when none was passed (or it was taken already). The fd stays in the service manager's store.
func (s *Store) Take(name string) (fd int, ok bool) {
	if s == nil {
		return -1, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.passed {
		p := &s.passed[i]
		if !p.taken && p.Name == name {
			p.taken = true
			return p.FD, true
		}
	}
	return -1, false
}

// Untaken lists the names of the passed fds nobody took yet.
func (s *Store) Untaken() []string {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for _, p := range s.passed {
		if !p.taken {
			names = append(names, p.Name)
		}
	}
	return names
}

// DropUnless closes every passed fd nobody took whose name keep refuses, removes it from the
// service manager's store too (a backend no longer in use must not keep a port or a TUN queue
// through the manager's copy), and waits for the manager to have done so. It returns the
// names dropped; an error says the manager could not be told or did not answer. Removal goes
// by name and drops every fd the manager holds under it, so each stored fd needs a name of its
// own (as Put's callers give them): a duplicate left in the store could keep a stale TUN queue
// attached beside the new ones.
func (s *Store) DropUnless(keep func(name string) bool) ([]string, error) {
	if s == nil {
		return nil, nil
	}
	s.mu.Lock()
	var drop []Passed
	for i := range s.passed {
		p := &s.passed[i]
		if !p.taken && !keep(p.Name) {
			p.taken = true
			drop = append(drop, p.Passed)
		}
	}
	s.mu.Unlock()
	var names []string
	var errs []error
	removed := map[string]bool{}
	for _, p := range drop {
		unix.Close(p.FD)
		names = append(names, p.Name)
		if removed[p.Name] {
			continue // FDSTOREREMOVE drops every fd of a name at once
		}
		removed[p.Name] = true
		errs = append(errs, s.Remove(p.Name))
	}
	if len(removed) > 0 {
		errs = append(errs, s.Barrier(time.Second))
	}
	return names, errors.Join(errs...)
}

// send writes one datagram to the notify socket, with fds as SCM_RIGHTS, as sd_notify does:
// from a fresh socket, blocking (the manager reads its socket as it goes).
func (s *Store) send(msg string, fds []int) error {
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for NOTIFY_SOCKET: %w", err)
	}
	defer unix.Close(sock)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// SockaddrUnix turns a leading @ into the abstract namespace's NUL.
	if err := unix.Sendmsg(sock, []byte(msg), oob, &unix.SockaddrUnix{Name: s.socket}, unix.MSG_NOSIGNAL); err != nil {
		return fmt.Errorf("send to NOTIFY_SOCKET %s: %w", s.socket, err)
	}
	return nil
}
