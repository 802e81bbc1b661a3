package harness

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Process is a background command running in a namespace.
type Process struct {
	Pid  int
	cmd  *exec.Cmd
	out  lockedBuffer
	done chan struct{}
	err  error // set before done is closed
}

// stopGrace is how long Stop waits after SIGTERM before it sends SIGKILL.
const stopGrace = 5 * time.Second

// Stop sends SIGTERM to the process group, waits, and sends SIGKILL after 5 s. It returns the
// process's exit error, except that an exit caused by our own signal is not an error.
func (p *Process) Stop() error {
	return p.stop(syscall.SIGTERM, stopGrace)
}

// Kill sends SIGKILL to the process group and waits for the exit.
func (p *Process) Kill() error {
	return p.stop(syscall.SIGKILL, stopGrace)
}

func (p *Process) stop(sig syscall.Signal, grace time.Duration) error {
	select {
	case <-p.done:
		return p.exitErr()
	default:
	}
	_ = syscall.Kill(-p.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-p.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("pid %d (%s) ignored %v for %v and was killed", p.Pid, p.cmd.Path, sig, grace)
	}
	var exit *exec.ExitError
	if errors.As(p.err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() &&
			(ws.Signal() == syscall.SIGTERM || ws.Signal() == syscall.SIGKILL) {
			return nil
		}
	}
	return p.exitErr()
}

func (p *Process) exitErr() error {
	if p.err != nil {
		return fmt.Errorf("pid %d %v: %w", p.Pid, p.cmd.Args, p.err)
	}
	return nil
}

// Wait waits for the process to exit and returns its exit error.
func (p *Process) Wait() error {
	<-p.done
	return p.exitErr()
}

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Output returns everything the process wrote to stdout and stderr so far.
func (p *Process) Output() string { return p.out.String() }

// lockedBuffer is a bytes.Buffer that the process's stdout and stderr copiers and readers can
// use at once.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
