package fdstore

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// manager is the service manager's end of a notify socket, read by the test itself: what
// arrives is what systemd would get.
type manager struct {
	conn *net.UnixConn
	addr string
}

func listen(t *testing.T, addr string) *manager {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &manager{conn: conn, addr: addr}
}

// next is the next message and the fds that came with it.
func (m *manager) next(t *testing.T) (string, []int) {
	t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	_ = m.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, oobn, flags, _, err := m.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("the manager received nothing: %v", err)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		t.Fatal("control data truncated")
	}
	var fds []int
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, got...)
	}
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	return string(buf[:n]), fds
}

func pipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// The messages on the wire are sd_notify's, and a stored fd really reaches the manager: what
// is written to its copy comes out of the pipe the test holds. Paths and abstract sockets both.
func TestNotificationsAndStoredFDsReachTheManager(t *testing.T) {
	for _, addr := range []string{filepath.Join(t.TempDir(), "notify"), fmt.Sprintf("@xnet-fdstore-test-%d", os.Getpid())} {
		t.Run(addr, func(t *testing.T) {
			m := listen(t, addr)
			s, err := New(addr, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !s.Enabled() {
				t.Fatal("a store with a NOTIFY_SOCKET says it is not enabled")
			}

			if err := s.Notify("READY=1\nSTATUS=ready: 10.244.5.0/24 via udp, 2 peers"); err != nil {
				t.Fatal(err)
			}
			if msg, fds := m.next(t); msg != "READY=1\nSTATUS=ready: 10.244.5.0/24 via udp, 2 peers" || len(fds) != 0 {
				t.Errorf("notification %q with %d fds", msg, len(fds))
			}

			r, w := pipe(t)
			if err := s.Put("xnet-udp-tun-0", int(w.Fd())); err != nil {
				t.Fatal(err)
			}
			msg, fds := m.next(t)
			if msg != "FDSTORE=1\nFDNAME=xnet-udp-tun-0" || len(fds) != 1 {
				t.Fatalf("store message %q with %d fds, want FDSTORE=1 FDNAME=xnet-udp-tun-0 with 1", msg, len(fds))
			}
			w.Close() // the manager's copy keeps the pipe open
			if _, err := unix.Write(fds[0], []byte("through the manager's copy")); err != nil {
				t.Fatal(err)
			}
			unix.Close(fds[0])
			got := make([]byte, 64)
			n, _ := r.Read(got)
			if string(got[:n]) != "through the manager's copy" {
				t.Errorf("read %q from the stored pipe", got[:n])
			}

			if err := s.Remove("xnet-udp-tun-0"); err != nil {
				t.Fatal(err)
			}
			if msg, _ := m.next(t); msg != "FDSTOREREMOVE=1\nFDNAME=xnet-udp-tun-0" {
				t.Errorf("remove message %q", msg)
			}

			// A barrier returns once the manager closes the fd that came with it, not before.
			done := make(chan error, 1)
			go func() { done <- s.Barrier(5 * time.Second) }()
			msg, fds = m.next(t)
			if msg != "BARRIER=1" || len(fds) != 1 {
				t.Fatalf("barrier message %q with %d fds", msg, len(fds))
			}
			select {
			case err := <-done:
				t.Fatalf("Barrier returned (%v) while the manager still held its fd", err)
			case <-time.After(100 * time.Millisecond):
			}
			unix.Close(fds[0])
			if err := <-done; err != nil {
				t.Errorf("Barrier after the manager closed its fd: %v", err)
			}
			go func() { done <- s.Barrier(100 * time.Millisecond) }()
			m.next(t) // held, never closed (the test's cleanup closes it)
			if err := <-done; err == nil || !strings.Contains(err.Error(), "did not answer") {
				t.Errorf("Barrier with a manager that never answers: %v, want a timeout", err)
			}
		})
	}
}

// Without NOTIFY_SOCKET (and with a nil store) nothing is sent and nothing fails.
func TestWithoutAServiceManagerNothingIsSent(t *testing.T) {
	for _, s := range []*Store{nil, mustNew(t, "", nil)} {
		if s.Enabled() {
			t.Error("enabled without a socket")
		}
		if err := s.Notify("READY=1"); err != nil {
			t.Error(err)
		}
		if err := s.Put("xnet-udp-rx-0", 1); err != nil {
			t.Error(err)
		}
		if err := s.Remove("xnet-udp-rx-0"); err != nil {
			t.Error(err)
		}
		if _, ok := s.Take("xnet-udp-rx-0"); ok {
			t.Error("took an fd nobody passed")
		}
	}
	if _, err := New("run/notify", nil); err == nil || !strings.Contains(err.Error(), "NOTIFY_SOCKET") {
		t.Errorf("a relative NOTIFY_SOCKET: %v, want an error naming it", err)
	}
	s := mustNew(t, "", nil)
	for _, bad := range []string{"", "a:b", "with space", strings.Repeat("x", 256)} {
		if err := s.Put(bad, 1); err == nil {
			t.Errorf("Put(%q) accepted a name systemd refuses", bad)
		}
	}
}

func mustNew(t *testing.T, socket string, passed []Passed) *Store {
	t.Helper()
	s, err := New(socket, passed)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestListenEnvParsesAsSdListenFDsWithNames(t *testing.T) {
	const pid = 4242
	tests := []struct {
		name    string
		env     ListenEnv
		want    []Passed
		ignored string // in the reason the fds are not ours
		err     string // in the error
	}{
		{name: "nothing passed", env: ListenEnv{}},
		{name: "names and fds from 3", env: ListenEnv{PID: "4242", FDs: "3", FDNames: "xnet-udp-tun-0:xnet-udp-rx-0:xnet-udp-tun-1"},
			want: []Passed{{"xnet-udp-tun-0", 3}, {"xnet-udp-rx-0", 4}, {"xnet-udp-tun-1", 5}}},
		{name: "no names: unknown, as systemd names them", env: ListenEnv{PID: "4242", FDs: "2"},
			want: []Passed{{"unknown", 3}, {"unknown", 4}}},
		{name: "another process's fds", env: ListenEnv{PID: "1", FDs: "1", FDNames: "a"}, ignored: "LISTEN_PID=1 is not us (pid 4242)"},
		{name: "fds without LISTEN_PID", env: ListenEnv{FDs: "1"}, ignored: "without LISTEN_PID"},
		{name: "LISTEN_PID not a number", env: ListenEnv{PID: "self", FDs: "1"}, err: `LISTEN_PID="self" is not a process id`},
		{name: "LISTEN_FDS not a number", env: ListenEnv{PID: "4242", FDs: "three"}, err: `LISTEN_FDS="three" is not a count`},
		{name: "LISTEN_FDS zero", env: ListenEnv{PID: "4242", FDs: "0"}, err: `LISTEN_FDS="0"`},
		{name: "LISTEN_FDS negative", env: ListenEnv{PID: "4242", FDs: "-1"}, err: `LISTEN_FDS="-1"`},
		{name: "more names than fds", env: ListenEnv{PID: "4242", FDs: "1", FDNames: "a:b"}, err: "names 2 fds, LISTEN_FDS=1 passes 1"},
		{name: "a name systemd never gives", env: ListenEnv{PID: "4242", FDs: "2", FDNames: "a:b c"}, err: "fd 4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ignored, err := tt.env.Parse(pid)
			switch {
			case tt.err != "":
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one containing %q", err, tt.err)
				}
				return
			case err != nil:
				t.Fatal(err)
			}
			if tt.ignored != "" && !strings.Contains(ignored, tt.ignored) || tt.ignored == "" && ignored != "" {
				t.Errorf("ignored %q, want %q", ignored, tt.ignored)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("passed %v, want %v", got, tt.want)
			}
		})
	}
}

// A process started as systemd starts it (fds from 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID
// set to its own pid in the child) takes the fds by name; the variables are gone afterwards.
// With LISTEN_PID left at the parent's pid (what an exec.Cmd's environment can say) it takes
// nothing, as sd_listen_fds(3) does.
func TestFromProcessTakesTheFDsSystemdPasses(t *testing.T) {
	if os.Getenv("FDSTORE_TEST_CHILD") == "1" {
		childTakesFDs()
		return
	}
	for _, tt := range []struct {
		name     string
		ownPID   bool
		want     string
		wantRead bool
	}{
		{"LISTEN_PID is the child's", true, "took a, b; LISTEN_* unset", true},
		{"LISTEN_PID is the parent's", false, "ignored: LISTEN_PID=" + fmt.Sprint(os.Getpid()) + " is not us", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ra, wa := pipe(t)
			rb, wb := pipe(t)
			args := []string{os.Args[0], "-test.run=^TestFromProcessTakesTheFDsSystemdPasses$"}
			env := append(os.Environ(), "FDSTORE_TEST_CHILD=1", "LISTEN_FDS=2", "LISTEN_FDNAMES=a:b")
			if tt.ownPID {
				// systemd sets LISTEN_PID after fork; a shell does the same with its $$, and
				// exec keeps the pid.
				args = append([]string{"sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$@"`, "sh"}, args...)
			} else {
				env = append(env, fmt.Sprintf("LISTEN_PID=%d", os.Getpid()))
			}
			cmd := exec.Command(args[0], args[1:]...)
			cmd.Env = env
			cmd.ExtraFiles = []*os.File{wa, wb}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Errorf("child said %q, want %q", out, tt.want)
			}
			wa.Close()
			wb.Close()
			for name, r := range map[string]*os.File{"a": ra, "b": rb} {
				got := make([]byte, 16)
				n, _ := r.Read(got)
				if tt.wantRead && string(got[:n]) != "via "+name {
					t.Errorf("pipe %s: read %q, want %q", name, got[:n], "via "+name)
				}
				if !tt.wantRead && n != 0 {
					t.Errorf("pipe %s: the child wrote %q into fds that were not its", name, got[:n])
				}
			}
		})
	}
}

func childTakesFDs() {
	s, ignored, err := FromProcess()
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	if ignored != "" {
		fmt.Println("ignored:", ignored)
		return
	}
	var took []string
	for _, name := range []string{"a", "b"} {
		fd, ok := s.Take(name)
		if !ok {
			fmt.Println("not passed:", name)
			return
		}
		unix.Write(fd, []byte("via "+name))
		unix.Close(fd)
		took = append(took, name)
	}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		if v, ok := os.LookupEnv(k); ok {
			fmt.Printf("%s=%s still set\n", k, v)
			return
		}
	}
	fmt.Printf("took %s; LISTEN_* unset\n", strings.Join(took, ", "))
}

// DropUnless closes what nobody took and keep refuses, tells the manager to drop those names,
// and waits for it; what was taken or kept stays.
func TestDropUnlessClosesAndRemovesWhatNobodyTook(t *testing.T) {
	m := listen(t, filepath.Join(t.TempDir(), "notify"))
	r1, w1 := pipe(t)
	_, w2 := pipe(t)
	r3, w3 := pipe(t)
	fd := func(f *os.File) int { d, err := unix.Dup(int(f.Fd())); must(t, err); return d }
	s := mustNew(t, m.addr, []Passed{{"xnet-udp-tun-0", fd(w1)}, {"xnet-wireguard-tun", fd(w2)}, {"xnet-udp-rx-0", fd(w3)}})
	if _, ok := s.Take("xnet-wireguard-tun"); !ok {
		t.Fatal("not passed")
	}
	type result struct {
		names []string
		err   error
	}
	done := make(chan result, 1)
	go func() {
		names, err := s.DropUnless(func(name string) bool { return name == "xnet-udp-rx-0" })
		done <- result{names, err}
	}()
	if msg, _ := m.next(t); msg != "FDSTOREREMOVE=1\nFDNAME=xnet-udp-tun-0" {
		t.Errorf("message %q, want the removal of xnet-udp-tun-0", msg)
	}
	if msg, fds := m.next(t); msg != "BARRIER=1" || len(fds) != 1 {
		t.Errorf("message %q, want a barrier", msg)
	} else {
		unix.Close(fds[0])
	}
	res := <-done
	if res.err != nil || fmt.Sprint(res.names) != "[xnet-udp-tun-0]" {
		t.Errorf("dropped %v (%v), want [xnet-udp-tun-0]", res.names, res.err)
	}
	if got := s.Untaken(); fmt.Sprint(got) != "[xnet-udp-rx-0]" {
		t.Errorf("untaken %v, want [xnet-udp-rx-0]", got)
	}
	// The dropped copy is closed: with the test's own write end closed the pipe ends; the
	// kept one stays open.
	w1.Close()
	w3.Close()
	must(t, r1.SetReadDeadline(time.Now().Add(time.Second)))
	if n, err := r1.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("the dropped fd is still open (read %d, %v)", n, err)
	}
	must(t, r3.SetReadDeadline(time.Now().Add(100*time.Millisecond)))
	if _, err := r3.Read(make([]byte, 1)); !os.IsTimeout(err) {
		t.Errorf("the kept fd was closed (%v)", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// CheckUDP and CheckTUN accept exactly what a backend would create, and say what differs.
func TestChecksTellWhatAStoredFDIs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (a network namespace, a TUN device)")
	}
	own, err := unix.Open("/proc/self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	must(t, err)
	defer unix.Close(own)
	errs := make(chan error, 1)
	results := map[string]error{}
	// In a namespace of its own, made on a locked thread that dies with it: nothing appears
	// in the host's namespace and nothing is left behind.
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is thrown away
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errs <- err
			return
		}
		here, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errs <- err
			return
		}
		defer unix.Close(here)
		lo := netip.MustParseAddr("127.0.0.1")
		udp, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Bind(udp, &unix.SockaddrInet4{Addr: lo.As4(), Port: 0})
		}
		if err != nil {
			errs <- err
			return
		}
		defer unix.Close(udp)
		sa, _ := unix.Getsockname(udp)
		port := uint16(sa.(*unix.SockaddrInet4).Port)
		tcp, _ := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		defer unix.Close(tcp)
		tunfd, err := openTestTUN("xnt0", unix.IFF_TUN|unix.IFF_NO_PI|unix.IFF_MULTI_QUEUE)
		if err != nil {
			errs <- err
			return
		}
		defer unix.Close(tunfd)
		unattached, _ := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		defer unix.Close(unattached)
		const mq = unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE
		results["udp as bound"] = CheckUDP(udp, netip.AddrPortFrom(lo, port), here)
		results["udp, another port"] = CheckUDP(udp, netip.AddrPortFrom(lo, port+1), here)
		results["udp, another namespace"] = CheckUDP(udp, netip.AddrPortFrom(lo, port), own)
		results["tcp"] = CheckUDP(tcp, netip.AddrPortFrom(lo, port), here)
		results["tun as made"] = CheckTUN(tunfd, "xnt0", mq, here)
		results["tun, another name"] = CheckTUN(tunfd, "xnet0", mq, here)
		results["tun, other flags"] = CheckTUN(tunfd, "xnt0", mq|unix.IFF_VNET_HDR, here)
		results["tun, another namespace"] = CheckTUN(tunfd, "xnt0", mq, own)
		results["tun fd attached to nothing"] = CheckTUN(unattached, "xnt0", mq, here)
		results["a socket as a tun"] = CheckTUN(udp, "xnt0", mq, here)
		errs <- nil
	}()
	must(t, <-errs)
	for _, tt := range []struct{ name, want string }{
		{"udp as bound", ""},
		{"udp, another port", "bound to 127.0.0.1:"},
		{"udp, another namespace", "in another network namespace"},
		{"tcp", "socket type 1, not 2"},
		{"tun as made", ""},
		{"tun, another name", "a queue of TUN xnt0, not xnet0"},
		{"tun, other flags", "flags 0x1101, not 0x5101"},
		{"tun, another namespace", "in another network namespace"},
		{"tun fd attached to nothing", "not a queue of a TUN device"},
		{"a socket as a tun", "not a queue of a TUN device"},
	} {
		err := results[tt.name]
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: %v, want accepted", tt.name, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%s: %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}

func openTestTUN(name string, flags uint16) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(flags)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
