package fwrules

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
)

// dockerSave6 is what dockerd with --ipv6 --fixed-cidr-v6=fd00:10:244:1::/64 and ip6tables
// enabled (the default since Docker 27) leaves in ip6tables: the chains and rules of
// dockerSave, for its IPv6 subnet.
func dockerSave6() string {
	return strings.NewReplacer("! -d 127.0.0.0/8", "! -d ::1/128", "-s 10.244.1.0/24", "-s fd00:10:244:1::/64").Replace(dockerSave)
}

// newDockerHost6 is newDockerHost with IPv6 too, as an IPv6-only or dual-stack overlay host
// with Docker's --ipv6 has it, and Docker's ip6tables state in variant6:
//
//	container fd00:10:244:1::2 --- docker0 fd00:10:244:1::1 [host] xnet.1 fd00:10:244:2::1 --- overlay peer fd00:10:244:2::2
//	                                                          \-- eth0 fd00:198:18::b --- outside fd00:198:18::1
func newDockerHost6(t *testing.T, variant6, other6 string) *dockerHost {
	t.Helper()
	for _, bin := range []string{variant6, variant6 + "-save", variant6 + "-restore", other6 + "-save"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian package iptables; .ci/run installs it)", bin)
		}
	}
	d := newDockerHost(t, "iptables-nft", "iptables-legacy")
	h, c, p, o := d.host.Name, d.ctr.Name, d.peer.Name, d.out.Name
	addr := func(ns, a, dev string) { run(t, "ip", "-n", ns, "addr", "add", a, "dev", dev, "nodad") }
	addr(h, "fd00:10:244:1::1/64", "docker0")
	addr(c, "fd00:10:244:1::2/64", "eth0")
	run(t, "ip", "-n", c, "-6", "route", "add", "default", "via", "fd00:10:244:1::1")
	addr(h, "fd00:10:244:2::1/64", "xnet.1")
	addr(p, "fd00:10:244:2::2/64", "eth0")
	run(t, "ip", "-n", p, "-6", "route", "add", "default", "via", "fd00:10:244:2::1")
	addr(h, "fd00:198:18::b/64", "eth0")
	addr(o, "fd00:198:18::1/64", "eth0")
	run(t, "ip", "-n", o, "-6", "route", "add", "fd00:10:244::/48", "via", "fd00:198:18::b")
	if err := d.host.Sysctl("net.ipv6.conf.all.forwarding", "1"); err != nil {
		t.Fatal(err)
	}
	d.variant, d.other = variant6, other6
	d.iptablesRestore(t, false, dockerSave6())
	return d
}

// Docker with ip6tables drops forwarded IPv6 in FORWARD and masquerades its IPv6 subnet as for
// IPv4: Ensure opens both for the IPv6Network in the ip6tables variant holding Docker's
// chains, in an IPv6-only overlay (no IPv4 Network: iptables is not touched), and Remove
// takes it back out.
func TestDockerHostIPv6(t *testing.T) {
	for _, c := range []struct{ variant, other string }{
		{"ip6tables-nft", "ip6tables-legacy"},
		{"ip6tables-legacy", "ip6tables-nft"},
	} {
		t.Run(c.variant, func(t *testing.T) { testDockerHostIPv6(t, c.variant, c.other) })
	}
}

func testDockerHostIPv6(t *testing.T, variant, other string) {
	d := newDockerHost6(t, variant, other)
	dockerOnly, otherBefore := d.save(t, variant), d.save(t, other)
	ipv4Before := d.save(t, "iptables-nft") + d.save(t, "iptables-legacy")
	r, err := New(netip.Prefix{}, netip.MustParsePrefix("fd00:10:244::/48"), nil)
	if err != nil {
		t.Fatal(err)
	}
	peerToCtr := flow{name: "overlay peer to our container", from: d.peer, to: d.ctr, dst: "fd00:10:244:1::2"}
	ctrToPeer := flow{name: "our container to the overlay peer", from: d.ctr, to: d.peer, dst: "fd00:10:244:2::2"}
	ctrToOut := flow{name: "our container to outside the IPv6Network", from: d.ctr, to: d.out, dst: "fd00:198:18::1", seen: "fd00:198:18::b"}

	t.Run("before Ensure Docker drops the overlay and masquerades what it lets out", func(t *testing.T) {
		ctrToPeer.seen = "fd00:10:244:2::1" // Docker's MASQUERADE: the host's address on xnet.1
		d.check(t, peerToCtr, ctrToPeer, ctrToOut)
	})

	rep := d.ensure(t, r)
	t.Logf("Ensure: %+v", rep)
	if rep.Variant6 != variant || rep.Variant != "" || len(rep.Changes) == 0 || !strings.HasPrefix(rep.Changes[0], "ip6tables: ") {
		t.Fatalf("Ensure used %q (IPv4 %q) and changed %q; want the rules added to %s, which holds Docker's IPv6 chains, and nothing of IPv4", rep.Variant6, rep.Variant, rep.Changes, variant)
	}
	afterEnsure := d.save(t, variant)

	t.Run("after Ensure the overlay passes with its own addresses", func(t *testing.T) {
		peerToCtr.seen, ctrToPeer.seen = "fd00:10:244:2::2", "fd00:10:244:1::2"
		d.check(t, peerToCtr, ctrToPeer, ctrToOut)
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
		if !strings.Contains(afterEnsure, "-A "+ForwardChain+" -s fd00:10:244::/48 -j ACCEPT") {
			t.Errorf("%s does not accept the IPv6Network:\n%s", ForwardChain, afterEnsure)
		}
	})

	t.Run("a second Ensure changes nothing; iptables and the other variant are untouched", func(t *testing.T) {
		if rep := d.ensure(t, r); len(rep.Changes) != 0 {
			t.Errorf("second Ensure changed %q", rep.Changes)
		}
		if got := d.save(t, other); got != otherBefore {
			t.Errorf("%s-save now:\n%s\nwas:\n%s", other, got, otherBefore)
		}
		if got := d.save(t, "iptables-nft") + d.save(t, "iptables-legacy"); got != ipv4Before {
			t.Errorf("iptables (IPv4) changed in an IPv6-only overlay:\n%s\nwas:\n%s", got, ipv4Before)
		}
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
		d.check(t, flow{name: "overlay peer to our container, after Remove", from: d.peer, to: d.ctr, dst: "fd00:10:244:1::2"})
	})
}

// In a dual-stack overlay one Ensure keeps both families: iptables' chains for the Network and
// ip6tables' for the IPv6Network, each in the variant holding Docker's chains of its family.
func TestDockerHostDualStack(t *testing.T) {
	d := newDockerHost6(t, "ip6tables-nft", "ip6tables-legacy")
	r, err := New(netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48"), nil)
	if err != nil {
		t.Fatal(err)
	}
	rep := d.ensure(t, r)
	if rep.Variant != "iptables-nft" || rep.Variant6 != "ip6tables-nft" || len(rep.Changes) != 8 {
		t.Errorf("Ensure: %+v; want both families' two chains and their jumps added in their nft variants", rep)
	}
	d.check(t,
		flow{name: "overlay peer to our container over IPv4", from: d.peer, to: d.ctr, dst: "10.244.1.2", seen: "10.244.2.2"},
		flow{name: "overlay peer to our container over IPv6", from: d.peer, to: d.ctr, dst: "fd00:10:244:1::2", seen: "fd00:10:244:2::2"},
		flow{name: "our container to the overlay peer over IPv6", from: d.ctr, to: d.peer, dst: "fd00:10:244:2::2", seen: "fd00:10:244:1::2"})
	if rep := d.ensure(t, r); len(rep.Changes) != 0 {
		t.Errorf("second Ensure changed %q", rep.Changes)
	}
	for _, bad := range [][2]netip.Prefix{
		{netip.Prefix{}, netip.Prefix{}},
		{netip.MustParsePrefix("fd00:10:244::/48"), netip.Prefix{}},
		{netip.Prefix{}, netip.MustParsePrefix("10.244.0.0/16")},
	} {
		if _, err := New(bad[0], bad[1], nil); err == nil {
			t.Errorf("New(%v, %v) took it", bad[0], bad[1])
		}
	}
}
