package fwrules

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/test/harness"
)

// dockerHost is one host namespace set up as dockerd 20.10 sets up a host (dockerSave, with
// iptables of one variant), and the namespaces around it:
//
//	container 10.244.1.2 --veth-- docker0 10.244.1.1 [host] xnet.1 10.244.2.1 --veth-- overlay peer 10.244.2.2
//	                                                   \-- eth0 198.18.0.11 --veth-- outside 198.18.0.1
//
// xnet.1 stands for whatever the overlay arrives on (the vxlan device, xnet0, or eth0 with
// host-gw): for the FORWARD chain they are all "not docker0".
type dockerHost struct {
	host, ctr, peer, out *harness.Namespace
	variant              string // iptables-nft or iptables-legacy
	other                string // the variant Docker does not use
}

func newDockerHost(t *testing.T, variant, other string) *dockerHost {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables)")
	}
	for _, bin := range []string{variant, variant + "-save", variant + "-restore", other + "-save"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian package iptables; .ci/run installs it)", bin)
		}
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	id := hex.EncodeToString(b)
	ns := func(role string) *harness.Namespace {
		name := "xfw" + id + role
		run(t, "ip", "netns", "add", name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
		run(t, "ip", "-n", name, "link", "set", "lo", "up")
		return &harness.Namespace{Name: name}
	}
	d := &dockerHost{host: ns("h"), ctr: ns("c"), peer: ns("p"), out: ns("o"), variant: variant, other: other}
	h, c, p, o := d.host.Name, d.ctr.Name, d.peer.Name, d.out.Name
	run(t, "ip", "-n", h, "link", "add", "docker0", "type", "bridge")
	run(t, "ip", "-n", h, "addr", "add", "10.244.1.1/24", "dev", "docker0")
	run(t, "ip", "-n", h, "link", "set", "docker0", "up")
	run(t, "ip", "-n", h, "link", "add", "vethc", "type", "veth", "peer", "name", "eth0", "netns", c)
	run(t, "ip", "-n", h, "link", "set", "vethc", "master", "docker0", "up")
	run(t, "ip", "-n", c, "addr", "add", "10.244.1.2/24", "dev", "eth0")
	run(t, "ip", "-n", c, "link", "set", "eth0", "up")
	run(t, "ip", "-n", c, "route", "add", "default", "via", "10.244.1.1")
	veth := func(hName, hAddr, peerNS, peerAddr string) {
		run(t, "ip", "-n", h, "link", "add", hName, "type", "veth", "peer", "name", "eth0", "netns", peerNS)
		run(t, "ip", "-n", h, "addr", "add", hAddr, "dev", hName)
		run(t, "ip", "-n", h, "link", "set", hName, "up")
		run(t, "ip", "-n", peerNS, "addr", "add", peerAddr, "dev", "eth0")
		run(t, "ip", "-n", peerNS, "link", "set", "eth0", "up")
	}
	veth("xnet.1", "10.244.2.1/24", p, "10.244.2.2/24")
	run(t, "ip", "-n", p, "route", "add", "default", "via", "10.244.2.1")
	veth("eth0", "198.18.0.11/24", o, "198.18.0.1/24")
	run(t, "ip", "-n", o, "route", "add", "10.244.0.0/16", "via", "198.18.0.11")
	if err := d.host.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	// dockerd's own iptables state, in the variant under test (a full restore, as Docker's
	// start leaves it).
	d.iptablesRestore(t, false, dockerSave)
	return d
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// iptablesRestore feeds input to the variant's iptables-restore in the host namespace;
// without noflush it replaces the tables it names, as a firewall reload does.
func (d *dockerHost) iptablesRestore(t *testing.T, noflush bool, input string) {
	t.Helper()
	args := []string{"--net=" + d.host.Path(), "--", d.variant + "-restore"}
	if noflush {
		args = append(args, "--noflush")
	}
	cmd := exec.Command("nsenter", args...)
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s-restore: %v\n%s\ninput:\n%s", d.variant, err, out, input)
	}
}

// save is iptables-save of one variant in the host namespace, without comments and counters.
func (d *dockerHost) save(t *testing.T, variant string) string {
	t.Helper()
	return d.saveWith(t, variant+"-save")
}

// saveWith is save with the iptables-save binary at path.
func (d *dockerHost) saveWith(t *testing.T, path string) string {
	t.Helper()
	out := run(t, "nsenter", "--net="+d.host.Path(), "--", path)
	var keep []string
	for l := range strings.SplitSeq(out, "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i]
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

// ensure runs Ensure inside the host namespace.
func (d *dockerHost) ensure(t *testing.T, r *Rules) Report {
	t.Helper()
	var rep Report
	err := d.host.Do(func() (err error) {
		rep, err = r.Ensure(context.Background())
		return err
	})
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	return rep
}

// flow is one datagram exchange; seen is the source the receiver saw, "" for dropped.
type flow struct {
	name     string
	from, to *harness.Namespace
	dst      string
	seen     string
}

func (d *dockerHost) check(t *testing.T, flows ...flow) {
	t.Helper()
	for _, f := range flows {
		got, err := sourceSeen(f.from, f.to, netip.MustParseAddr(f.dst), f.seen != "")
		switch {
		case f.seen == "" && err == nil:
			t.Errorf("%s: went through (receiver saw %v), want it dropped", f.name, got)
		case f.seen != "" && err != nil:
			t.Errorf("%s: %v, want it through with source %s", f.name, err, f.seen)
		case f.seen != "" && got.String() != f.seen:
			t.Errorf("%s: receiver saw source %v, want %s", f.name, got, f.seen)
		}
	}
}

func TestDockerHost(t *testing.T) {
	for _, c := range []struct{ variant, other string }{
		{"iptables-nft", "iptables-legacy"},
		{"iptables-legacy", "iptables-nft"},
	} {
		t.Run(c.variant, func(t *testing.T) { testDockerHost(t, c.variant, c.other) })
	}
}

func testDockerHost(t *testing.T, variant, other string) {
	d := newDockerHost(t, variant, other)
	dockerOnly := d.save(t, variant)
	otherBefore := d.save(t, other)
	r, err := New(netip.MustParsePrefix("10.244.0.0/16"), netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	peerToCtr := flow{name: "overlay peer to our container", from: d.peer, to: d.ctr, dst: "10.244.1.2"}
	ctrToPeer := flow{name: "our container to the overlay peer", from: d.ctr, to: d.peer, dst: "10.244.2.2"}
	ctrToOut := flow{name: "our container to outside the Network", from: d.ctr, to: d.out, dst: "198.18.0.1", seen: "198.18.0.11"}
	outToCtr := flow{name: "outside to our container", from: d.out, to: d.ctr, dst: "10.244.1.2"}

	t.Run("before Ensure Docker drops the overlay and masquerades what it lets out", func(t *testing.T) {
		ctrToPeer.seen = "10.244.2.1" // Docker's MASQUERADE: the host's address on xnet.1
		d.check(t, peerToCtr, ctrToPeer, ctrToOut, outToCtr)
	})

	rep := d.ensure(t, r)
	t.Logf("Ensure: %+v", rep)
	if rep.Variant != variant || len(rep.Changes) == 0 {
		t.Fatalf("Ensure used %q and changed %q; want the rules added to %s, which holds Docker's chains", rep.Variant, rep.Changes, variant)
	}
	afterEnsure := d.save(t, variant)

	t.Run("after Ensure the overlay passes with its own addresses", func(t *testing.T) {
		peerToCtr.seen, ctrToPeer.seen, outToCtr.seen = "10.244.2.2", "10.244.1.2", "198.18.0.1"
		d.check(t, peerToCtr, ctrToPeer, ctrToOut, outToCtr)
	})

	t.Run("a second Ensure changes nothing", func(t *testing.T) {
		if rep := d.ensure(t, r); len(rep.Changes) != 0 {
			t.Errorf("second Ensure changed %q", rep.Changes)
		}
		if got := d.save(t, variant); got != afterEnsure {
			t.Errorf("ruleset moved:\n%s\nwant:\n%s", got, afterEnsure)
		}
	})

	t.Run("the variant Docker does not use is left untouched", func(t *testing.T) {
		if got := d.save(t, other); got != otherBefore {
			t.Errorf("%s-save now:\n%s\nwas:\n%s", other, got, otherBefore)
		}
	})

	t.Run("our FORWARD jump comes after DOCKER-USER and Docker's isolation, POSTROUTING's before MASQUERADE", func(t *testing.T) {
		var fwd, post []string
		for l := range strings.SplitSeq(afterEnsure, "\n") {
			if strings.HasPrefix(l, "-A FORWARD ") {
				fwd = append(fwd, target(l))
			}
			if strings.HasPrefix(l, "-A POSTROUTING ") {
				post = append(post, target(l))
			}
		}
		if len(fwd) < 3 || fwd[0] != "DOCKER-USER" || fwd[1] != "DOCKER-ISOLATION-STAGE-1" || fwd[len(fwd)-1] != ForwardChain {
			t.Errorf("FORWARD targets %q", fwd)
		}
		if len(post) != 2 || post[0] != PostroutingChain || post[1] != "MASQUERADE" {
			t.Errorf("POSTROUTING targets %q", post)
		}
	})

	t.Run("a DOCKER-USER drop rule still wins", func(t *testing.T) {
		drop := "-A DOCKER-USER -s 10.244.2.2/32 -j DROP"
		d.iptablesRestore(t, true, "*filter\n"+strings.Replace(drop, "-A DOCKER-USER", "-I DOCKER-USER 1", 1)+"\nCOMMIT\n")
		d.check(t, flow{name: "overlay peer to our container, dropped by the user", from: d.peer, to: d.ctr, dst: "10.244.1.2"})
		var user []string
		if err := d.host.Do(func() (err error) { user, err = DockerUserRules(context.Background()); return err }); err != nil {
			t.Fatal(err)
		}
		if len(user) != 1 || user[0] != "-s 10.244.2.2/32 -j DROP" {
			t.Errorf("DockerUserRules = %q, want the user's one rule (what --host-routing=auto looks at)", user)
		}
		if rep := d.ensure(t, r); len(rep.Changes) != 0 {
			t.Errorf("Ensure changed %q with a user's DOCKER-USER rule in place", rep.Changes)
		}
		d.iptablesRestore(t, true, "*filter\n"+strings.Replace(drop, "-A", "-D", 1)+"\nCOMMIT\n")
		d.check(t, peerToCtr)
		if err := d.host.Do(func() (err error) { user, err = DockerUserRules(context.Background()); return err }); err != nil || len(user) != 0 {
			t.Errorf("DockerUserRules after the rule went = %q, %v; want none (Docker's RETURN is not a user's rule)", user, err)
		}
	})

	t.Run("Docker restarting puts its MASQUERADE first; Ensure moves ours back in front", func(t *testing.T) {
		masq := strings.TrimSpace(dockerMasq)
		d.iptablesRestore(t, true, "*nat\n"+strings.Replace(masq, "-A", "-D", 1)+"\n"+strings.Replace(masq, "-A POSTROUTING", "-I POSTROUTING 1", 1)+"\nCOMMIT\n")
		d.check(t, flow{name: "our container to the peer, behind Docker's MASQUERADE", from: d.ctr, to: d.peer, dst: "10.244.2.2", seen: "10.244.2.1"})
		rep := d.ensure(t, r)
		if len(rep.Changes) != 1 || !strings.Contains(rep.Changes[0], "moved the jump POSTROUTING") {
			t.Errorf("Ensure changed %q, want the POSTROUTING jump moved", rep.Changes)
		}
		d.check(t, ctrToPeer, ctrToOut)
	})

	t.Run("a firewall reload flushes everything; Keep puts it back", func(t *testing.T) {
		d.iptablesRestore(t, false, dockerSave)
		d.check(t, flow{name: "overlay peer to our container, after the flush", from: d.peer, to: d.ctr, dst: "10.244.1.2"})
		ctx, cancel := context.WithCancel(context.Background())
		kept := make(chan error, 1)
		go func() { kept <- d.host.Do(func() error { r.Keep(ctx, 100*time.Millisecond); return nil }) }()
		defer func() {
			cancel()
			if err := <-kept; err != nil {
				t.Error(err)
			}
		}()
		deadline := time.Now().Add(5 * time.Second)
		for d.save(t, variant) != afterEnsure {
			if time.Now().After(deadline) {
				t.Fatalf("Keep did not restore the rules within 5 s:\n%s\nwant:\n%s", d.save(t, variant), afterEnsure)
			}
			time.Sleep(50 * time.Millisecond)
		}
		d.check(t, peerToCtr, ctrToPeer, ctrToOut)
	})

	t.Run("Remove leaves Docker's rules as Docker made them", func(t *testing.T) {
		var changes []string
		if err := d.host.Do(func() (err error) {
			changes, err = Remove(context.Background())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if len(changes) != 2 {
			t.Errorf("Remove changed %q, want our two chains removed", changes)
		}
		if got := d.save(t, variant); got != dockerOnly {
			t.Errorf("after Remove:\n%s\nwant Docker's own:\n%s", got, dockerOnly)
		}
		if got := d.save(t, other); got != otherBefore {
			t.Errorf("Remove touched %s:\n%s", other, got)
		}
		if err := d.host.Do(func() (err error) {
			changes, err = Remove(context.Background())
			return err
		}); err != nil || len(changes) != 0 {
			t.Errorf("a second Remove: %q, %v", changes, err)
		}
		d.check(t, flow{name: "overlay peer to our container, after Remove", from: d.peer, to: d.ctr, dst: "10.244.1.2"})
	})
}

// TestNoMasqueradeNeedsAccept shows why XNET-POSTRTG accepts: flannel's RETURN in a chain of
// our own resumes POSTROUTING at Docker's MASQUERADE.
func TestNoMasqueradeNeedsAccept(t *testing.T) {
	d := newDockerHost(t, "iptables-nft", "iptables-legacy")
	d.iptablesRestore(t, true, "*filter\n:XNET-FWD - [0:0]\n-A XNET-FWD -s 10.244.0.0/16 -j ACCEPT\n-I FORWARD 3 -j XNET-FWD\nCOMMIT\n"+
		"*nat\n:XNET-POSTRTG - [0:0]\n-A XNET-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN\n-I POSTROUTING 1 -j XNET-POSTRTG\nCOMMIT\n")
	d.check(t, flow{name: "container to the overlay peer with RETURN", from: d.ctr, to: d.peer, dst: "10.244.2.2", seen: "10.244.2.1"})
}

// sourceSeen is harness.SourceSeen with one try for a flow expected to be dropped.
func sourceSeen(from, to *harness.Namespace, dst netip.Addr, expectAnswer bool) (netip.Addr, error) {
	tries := 1
	if expectAnswer {
		tries = 3
	}
	return harness.SourceSeen(from, to, dst, tries)
}

// TestKeepSeesDockerStart: with iptables-nft, Docker putting its MASQUERADE first (as dockerd
// does at every start) is undone within moments, not at Keep's next tick an hour away.
func TestKeepSeesDockerStart(t *testing.T) {
	d := newDockerHost(t, "iptables-nft", "iptables-legacy")
	r, err := New(netip.MustParsePrefix("10.244.0.0/16"), netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.ensure(t, r)
	want := d.save(t, "iptables-nft")
	ctx, cancel := context.WithCancel(context.Background())
	kept := make(chan error, 1)
	go func() { kept <- d.host.Do(func() error { r.Keep(ctx, time.Hour); return nil }) }()
	defer func() {
		cancel()
		if err := <-kept; err != nil {
			t.Error(err)
		}
	}()
	time.Sleep(200 * time.Millisecond) // Keep subscribes as it starts
	for round := range 3 {
		masq := strings.TrimSpace(dockerMasq)
		d.iptablesRestore(t, true, "*nat\n"+strings.Replace(masq, "-A", "-D", 1)+"\n"+strings.Replace(masq, "-A POSTROUTING", "-I POSTROUTING 1", 1)+"\nCOMMIT\n")
		start := time.Now()
		for d.save(t, "iptables-nft") != want {
			if time.Since(start) > 3*time.Second {
				t.Fatalf("round %d: Keep did not move our jump back in front within 3 s:\n%s", round, d.save(t, "iptables-nft"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("round %d: repaired in %v", round, time.Since(start).Round(time.Millisecond))
		d.check(t, flow{name: "our container to the overlay peer", from: d.ctr, to: d.peer, dst: "10.244.2.2", seen: "10.244.1.2"})
	}
}

// TestOneReadingServesEveryConsumer: a Monitor following the rules for the keeper and for a
// second consumer (what --host-routing=auto is: DOCKER-USER) runs one iptables-save per variant
// per change, whatever the number of consumers. One change that concerns both (Docker puts its
// MASQUERADE first, and a user adds a DOCKER-USER rule) is seen by both: the keeper moves our
// jump back and the other reads the rule; iptables-save, counted by wrappers on PATH, ran once
// per variant for each reading, not once per consumer.
func TestOneReadingServesEveryConsumer(t *testing.T) {
	d := newDockerHost(t, "iptables-nft", "iptables-legacy")
	r, err := New(netip.MustParsePrefix("10.244.0.0/16"), netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.ensure(t, r)
	want := d.save(t, "iptables-nft")

	// Wrappers in front of the real iptables-save binaries log each run.
	bin := t.TempDir()
	runs := filepath.Join(bin, "runs")
	saveBins := map[string]string{}
	for _, name := range []string{"iptables-nft-save", "iptables-legacy-save"} {
		path, err := exec.LookPath(name)
		if err != nil {
			t.Skipf("%s not installed", name)
		}
		saveBins[name] = path
		script := fmt.Sprintf("#!/bin/sh\necho %s >>%s\nexec %s \"$@\"\n", name, runs, path)
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	saves := func(name string) int {
		data, err := os.ReadFile(runs)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		return strings.Count(string(data), name+"\n")
	}

	var mu sync.Mutex
	var keeperReads, userReads int
	var user []string
	keeper := r.Keeper(time.Hour)
	keep := keeper.Read
	keeper.Read = func(ctx context.Context, s *Snapshot) {
		mu.Lock()
		keeperReads++
		mu.Unlock()
		keep(ctx, s)
	}
	m := NewMonitor(nil)
	m.Add(keeper)
	m.Add(Consumer{Every: time.Hour, Read: func(ctx context.Context, s *Snapshot) {
		rules, err := s.DockerUserRules(ctx)
		if err != nil {
			t.Errorf("DockerUserRules: %v", err)
		}
		mu.Lock()
		userReads, user = userReads+1, rules
		mu.Unlock()
	}})
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- d.host.Do(func() error { m.Run(ctx); return nil }) }()
	defer func() {
		cancel()
		if err := <-ran; err != nil {
			t.Error(err)
		}
	}()
	counts := func() (keeper, user, nft, legacy int) {
		mu.Lock()
		defer mu.Unlock()
		return keeperReads, userReads, saves("iptables-nft-save"), saves("iptables-legacy-save")
	}
	// waitQuiet waits until a reading has been handed to both and nothing has moved for a while:
	// a reading after a change, and the one after the keeper's own repair.
	waitQuiet := func(what string) (keeper, user, nft, legacy int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		k, u, n, l := counts()
		for still := time.Now(); time.Since(still) < time.Second; {
			if time.Now().After(deadline) {
				t.Fatalf("%s: readings still going after 10 s: keeper %d, other %d", what, k, u)
			}
			time.Sleep(100 * time.Millisecond)
			if k2, u2, n2, l2 := counts(); k2 != k || u2 != u || n2 != n || l2 != l || k == 0 || u != k {
				k, u, n, l, still = k2, u2, n2, l2, time.Now()
			}
		}
		return k, u, n, l
	}
	k0, u0, n0, l0 := waitQuiet("the first reading, as Run starts")
	t.Logf("first reading: keeper %d, other %d, iptables-nft-save %d, iptables-legacy-save %d", k0, u0, n0, l0)

	masq := strings.TrimSpace(dockerMasq)
	d.iptablesRestore(t, true, "*filter\n-I DOCKER-USER 1 -s 10.244.2.2/32 -j DROP\nCOMMIT\n"+
		"*nat\n"+strings.Replace(masq, "-A", "-D", 1)+"\n"+strings.Replace(masq, "-A POSTROUTING", "-I POSTROUTING 1", 1)+"\nCOMMIT\n")
	k, u, n, l := waitQuiet("after Docker's MASQUERADE and a DOCKER-USER rule")
	reads := k - k0
	t.Logf("after the change: %d readings, iptables-nft-save %d, iptables-legacy-save %d", reads, n-n0, l-l0)

	mu.Lock()
	seen := user
	mu.Unlock()
	if len(seen) != 1 || seen[0] != "-s 10.244.2.2/32 -j DROP" {
		t.Errorf("the second consumer read DOCKER-USER as %q, want the user's rule", seen)
	}
	// Our jump back in front, without the wrapper: the user's rule stays, so compare with it.
	wantNow := strings.Replace(want, "-A DOCKER-USER -j RETURN", "-A DOCKER-USER -s 10.244.2.2/32 -j DROP\n-A DOCKER-USER -j RETURN", 1)
	if got := d.saveWith(t, saveBins["iptables-nft-save"]); got != wantNow {
		t.Errorf("the keeper did not put our jump back in front:\n%s\nwant:\n%s", got, wantNow)
	}
	if reads < 1 || u-u0 != reads {
		t.Errorf("%d readings for the keeper, %d for the other consumer: want the same ones, at least one", reads, u-u0)
	}
	if n-n0 != reads || l-l0 != reads {
		t.Errorf("%d readings ran iptables-nft-save %d times and iptables-legacy-save %d times: want once each per reading, for both consumers",
			reads, n-n0, l-l0)
	}
}
