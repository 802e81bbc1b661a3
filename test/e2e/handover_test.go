package e2e

// The user-space datapaths across a kill -9 of xnetd: each host's xnetd runs under a stand-in
// for systemd (harness.ServiceManager) with an fd store, as packaging/xnetd.service runs it.
// The killed xnetd's TUN queues and sockets stay in the store, the kernel queues on them, and
// the restarted xnetd takes them back. Helpers here are prefixed ho.

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
)

// hoPings pings from every (from, to) pair at once, every 50 ms, count times each.
type hoPings struct {
	started time.Time
	done    chan hoResult
}

type hoResult struct {
	what      string
	sent, got int
}

const hoInterval = 50 * time.Millisecond

func hoStartPings(ctx context.Context, count int, pairs map[string][2]*harness.Container) *hoPings {
	p := &hoPings{started: time.Now(), done: make(chan hoResult, len(pairs))}
	for what, pair := range pairs {
		go func() {
			sent, got, _ := harness.Ping(ctx, pair[0].Namespace, pair[1].IP, count, hoInterval)
			p.done <- hoResult{what, sent, got}
		}()
	}
	return p
}

// sleepToMidInterval sleeps at least d, then until the pings are half-way between two sends:
// a kill then finds no reply on its way, which WireGuard, whose session keys die with the
// process, could not deliver any more (see the wireguard case).
func (p *hoPings) sleepToMidInterval(d time.Duration) {
	at := time.Since(p.started) + d
	at = at.Truncate(hoInterval) + hoInterval/2
	time.Sleep(time.Until(p.started.Add(at)))
}

func (p *hoPings) wait(n int) map[string]hoResult {
	out := map[string]hoResult{}
	for range n {
		r := <-p.done
		out[r.what] = r
	}
	return out
}

// hoRestartDelay is how long systemd waits before it starts xnetd again after a crash
// (RestartSec= in packaging/xnetd.service): the packets of those seconds are the ones at stake.
const hoRestartDelay = 2 * time.Second

// hoKillAndRestart kill -9s xnetd on n and starts it again under the same service manager
// hoRestartDelay later, returning how long from the kill until the new xnetd was ready.
func hoKillAndRestart(t *testing.T, n *xnetdtest.Node) time.Duration {
	t.Helper()
	start := time.Now()
	if err := n.Proc.Kill(); err != nil {
		t.Fatalf("kill -9 xnetd on %s: %v", n.Name, err)
	}
	time.Sleep(hoRestartDelay)
	n.StartDaemon(t)
	n.WaitReady(t)
	return time.Since(start)
}

// A kill -9 and restart of xnetd on one of two udp hosts, under a ping every 50 ms both ways
// between containers on the two hosts: with the datapath's fds in the service manager's store,
// nothing is lost either way.
func TestUDPKill9OfXnetdLosesNoPacket(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}`)
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("no connectivity before the kill:\n%s", strings.Join(failed, "\n"))
	}
	n := nodes[1]
	queues := min(runtime.NumCPU(), 4)
	var want []string
	for i := range queues {
		want = append(want, fmt.Sprintf("xnet-udp-tun-%d", i), fmt.Sprintf("xnet-udp-rx-%d", i))
	}
	if got := hoStored(n, want); !hoSameNames(got, want) {
		t.Fatalf("the service manager holds %v from %s's xnetd, want %v", got, n.Name, want)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	const count = 120 // 6 s
	pings := hoStartPings(ctx, count, map[string][2]*harness.Container{
		"into the restarted host":   {cs[0], cs[1]},
		"out of the restarted host": {cs[1], cs[0]},
	})
	pings.sleepToMidInterval(500 * time.Millisecond)
	took := hoKillAndRestart(t, n)
	for what, r := range pings.wait(2) {
		t.Logf("%s: %d of %d replies, %d lost (kill -9 to ready: %v)", what, r.got, r.sent, r.sent-r.got, took.Round(time.Millisecond))
		if r.sent < count-10 || r.got != r.sent {
			t.Errorf("ping %s every 50 ms through kill -9 and restart of xnetd: %d of %d replies, want all", what, r.got, r.sent)
		}
	}
	if out := n.Proc.Output(); !strings.Contains(out, "took xnet0's queues and receiving sockets back") || !strings.Contains(out, "taken_over=true") {
		t.Errorf("the restarted xnetd did not say it took the stored queues back:\n%s", out)
	}
	if got := hoStored(n, want); !hoSameNames(got, want) {
		t.Errorf("after the restart the service manager holds %v, want still %v", got, want)
	}

	t.Run("a host restarted with another backend drops the udp fds from the store first", func(t *testing.T) {
		// The stored receiving sockets hold port 8472, which the kernel VXLAN device binds.
		if err := n.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		n.Extra = append(n.Extra, "--backend=vxlan")
		n.StartDaemon(t)
		n.WaitReady(t)
		if got := n.Systemd.Stored(); len(got) != 0 {
			t.Errorf("the service manager still holds %v for a vxlan host", got)
		}
		if out := n.Proc.Output(); !strings.Contains(out, "dropped fds from the service manager's store") {
			t.Errorf("xnetd did not log the fds it dropped:\n%s", out)
		}
		if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
			t.Errorf("after the switch to vxlan:\n%s", strings.Join(failed, "\n"))
		}
	})
}

// hoStored is what n's service manager stores once it holds want, or after 2 s: it reads its
// socket in its own time, as systemd does.
func hoStored(n *xnetdtest.Node, want []string) []string {
	deadline := time.Now().Add(2 * time.Second)
	for !hoSameNames(n.Systemd.Stored(), want) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return n.Systemd.Stored()
}

func hoSameNames(got, want []string) bool {
	got, want = slices.Clone(got), slices.Clone(want)
	slices.Sort(got)
	slices.Sort(want)
	return slices.Equal(got, want)
}

// The same on wireguard (the embedded wireguard-go: this VM's kernel has no WireGuard). What
// the restarted host's containers send waits on xnet-wg, taken over, and leaves sealed with a
// new session once the peers are programmed and greeted: nothing is lost that way. What the
// other host sends meanwhile is sealed with the session keys of the killed process, which
// WireGuard keeps nowhere else: the new process cannot open it, so that direction loses the
// packets of the restart until the other host has the new session.
func TestWireGuardKill9OfXnetdLosesNothingTheRestartedHostSends(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 2, wgConfig)
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("no connectivity before the kill:\n%s", strings.Join(failed, "\n"))
	}
	n := nodes[1]
	if want, got := []string{"xnet-wireguard-tun"}, hoStored(n, []string{"xnet-wireguard-tun"}); !hoSameNames(got, want) {
		t.Fatalf("the service manager holds %v from %s's xnetd, want %v", got, n.Name, want)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	const count = 120 // 6 s
	pings := hoStartPings(ctx, count, map[string][2]*harness.Container{
		"into the restarted host":   {cs[0], cs[1]},
		"out of the restarted host": {cs[1], cs[0]},
	})
	pings.sleepToMidInterval(500 * time.Millisecond)
	took := hoKillAndRestart(t, n)
	res := pings.wait(2)
	for what, r := range res {
		t.Logf("%s: %d of %d replies, %d lost (kill -9 to ready: %v)", what, r.got, r.sent, r.sent-r.got, took.Round(time.Millisecond))
	}
	if r := res["out of the restarted host"]; r.sent < count-10 || r.got != r.sent {
		t.Errorf("ping out of the restarted host every 50 ms through kill -9 and restart of xnetd: %d of %d replies, want all", r.got, r.sent)
	}
	// Towards it, only the pings of the restart itself: the restarted host greets the other
	// at once, so its session does not wait for WireGuard's 15 s retry.
	if r, most := res["into the restarted host"], int(took/hoInterval)+3; r.sent < count-10 || r.sent-r.got > most {
		t.Errorf("ping into the restarted host every 50 ms through kill -9 and restart of xnetd: %d of %d replies, want at most %d lost (the %v of the restart)", r.got, r.sent, most, took.Round(time.Millisecond))
	}
	if out := n.Proc.Output(); !strings.Contains(out, "took xnet-wg's TUN back") {
		t.Errorf("the restarted xnetd did not say it took the stored TUN back:\n%s", out)
	}
}
