// Command xnetd is xnet's per-host daemon: it leases this host's subnet from etcd, programs a
// datapath (ebpf, vxlan, udp or host-gw) to every other host's subnet, writes the files Docker
// starts from, and keeps all of that current as leases come and go.
//
//	xnetd [run] [flags]    the daemon (the default subcommand)
//	xnetd status [--output json]
//	xnetd check [flags]    verify this host's datapath end to end (exit 1 naming what is wrong)
//	xnetd teardown [flags] remove what xnetd created on this host (not the lease in etcd)
//	xnetd version
//
// Every flag can also come from XNETD_<NAME> (--etcd-endpoints: XNETD_ETCD_ENDPOINTS), so the
// systemd unit passes flags through EnvironmentFile=/etc/default/xnetd; the command line wins.
//
// Exit codes: 0 stopped by SIGTERM/SIGINT; 2 a bad flag, environment variable, interface or
// network config, reported in one line before anything on the host was changed; 1 a failure
// after the host was changed (systemd restarts us; the datapath stays up meanwhile).
//
// It owns the run order (flags, interface, config, backend, lease, macvlan range, setup, files,
// peers, ready), the state file, the metrics endpoint and the subcommands. It does not own the
// etcd schema (package subnetmgr), the datapaths (package backend and its sub-packages),
// masquerading (package ipmasq), the iptables rules beside Docker's (package fwrules), the macvlan section, range lease and options file (package
// macvlan) or the metric definitions (package metrics).
//
// Design history. A restart must not cost a packet (docs/design.md, Targets): so xnetd never tears
// anything down on a normal stop, reclaims its previous subnet (from the subnet file and its
// PublicIP), lets the backend adopt what it left (for the user-space datapaths, their TUN queues
// and sockets, kept meanwhile in systemd's fd store: fdstore.go), and reports READY to systemd only after the
// initial peer list is programmed, so Docker (ordered after us) never starts on a half-built
// network. A lease that moves to another subnet while running cannot be followed in place
// (Docker's --bip is fixed at its start), so that is the one runtime event that ends the daemon.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/spf13/pflag"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, os.LookupEnv))
}

// run dispatches a subcommand and turns its error into an exit code and one line on stderr.
func run(args []string, stdout, stderr io.Writer, lookup func(string) (string, bool)) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "run":
		err = cmdRun(args, stdout, stderr, lookup)
	case "status":
		err = cmdStatus(args, stdout, lookup)
	case "teardown":
		err = cmdTeardown(args, stdout, stderr, lookup)
	case "check":
		err = cmdCheck(args, stdout, stderr, lookup)
	case "version":
		fmt.Fprintln(stdout, "xnetd", version())
	case "help":
		fs, _ := runFlagSet("xnetd")
		printHelp(stdout, fs)
		return 0
	default:
		err = usagef("unknown command %q: use run, status, check, teardown or version (see xnetd --help)", cmd)
	}
	return exitCode(err, stderr)
}

func exitCode(err error, stderr io.Writer) int {
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, pflag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "xnetd: "+ue.msg)
		return 2
	default:
		fmt.Fprintln(stderr, "xnetd: "+err.Error())
		return 1
	}
}

func printHelp(w io.Writer, fs *pflag.FlagSet) {
	fmt.Fprintf(w, "Usage: xnetd [run|status|check|teardown|version] [flags]\n\n")
	fmt.Fprintf(w, "Every flag can also be set as XNETD_<NAME> (--etcd-endpoints: XNETD_ETCD_ENDPOINTS).\n\nFlags of run, check and teardown (check also takes --output json):\n")
	fs.SetOutput(w)
	fs.PrintDefaults()
	fmt.Fprintf(w, "\nFlags of status:\n")
	sfs, _ := statusFlagSet()
	sfs.SetOutput(w)
	sfs.PrintDefaults()
}

// parseRunFlags is shared by run and teardown: the same flags and the same environment.
func parseRunFlags(name string, args []string, stdout io.Writer, lookup func(string) (string, bool)) (options, error) {
	fs, raw := runFlagSet(name)
	if err := parseFlags(fs, args, lookup); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			printHelp(stdout, fs)
		}
		return options{}, err
	}
	return raw.validate(newRegistry().Names())
}

func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

func cmdRun(args []string, stdout, stderr io.Writer, lookup func(string) (string, bool)) error {
	o, err := parseRunFlags("xnetd", args, stdout, lookup)
	if err != nil {
		return err
	}
	log := newLogger(stderr, o.logLevel)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("xnetd starting", "version", version(), "pid", os.Getpid())
	return runDaemon(ctx, o, newRegistry(), log)
}

// version is the module version and VCS revision the binary was built from.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" {
		v += " " + rev + dirty
	}
	return v + " " + bi.GoVersion
}
