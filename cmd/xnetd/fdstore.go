package main

import (
	"log/slog"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/fdstore"
)

// openFDStore is systemd as xnetd sees it (package fdstore): where READY=1 goes, and the fds a
// previous xnetd stored that systemd passed to this one. Malformed LISTEN_* variables are a
// usage error (exit 2): which fds they describe cannot be known.
func openFDStore(log *slog.Logger) (*fdstore.Store, error) {
	s, ignored, err := fdstore.FromProcess()
	if err != nil {
		return nil, usagef("%v", err)
	}
	if ignored != "" {
		log.Warn("fds passed in the environment are not for us; not taken", "why", ignored)
	}
	if names := s.Untaken(); len(names) > 0 {
		log.Info("the service manager passed the fds a previous xnetd stored", "names", names)
	}
	return s, nil
}

// dropOtherBackendsFDs closes, before Setup, what another backend stored (its sockets may hold
// the port ours binds; backend.OwnsFD), and removes it from systemd's store for good.
func (d *daemonRun) dropOtherBackendsFDs() {
	d.dropStoredFDs(func(name string) bool { return backend.OwnsFD(d.chosen.name, name) }, "stored by another backend")
}

// dropUntakenFDs closes, after Setup, what our backend did not take back (it starts with fewer
// queues, or found a stored fd no longer valid), so no stale queue or socket stays attached
// through systemd's copy.
func (d *daemonRun) dropUntakenFDs() {
	d.dropStoredFDs(func(string) bool { return false }, "not taken back by the backend")
}

func (d *daemonRun) dropStoredFDs(keep func(string) bool, why string) {
	names, err := d.fds.DropUnless(keep)
	if len(names) > 0 {
		d.log.Info("dropped fds from the service manager's store", "names", names, "why", why)
	}
	if err != nil {
		d.log.Warn("the service manager may still hold the dropped fds", "names", names, "err", err)
	}
}
