package ipmasq

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
)

var (
	network6 = netip.MustParsePrefix("fd00:10:244::/48")
	subnet6  = netip.MustParsePrefix("fd00:10:244:1::/64")
)

// chainRules6 is the ip6 chain as nft prints it, one rule a line.
func chainRules6(t *testing.T, n testNS, table string) []string {
	t.Helper()
	var rules []string
	for l := range strings.SplitSeq(n.sh(t, "nft", "list", "chain", "ip6", table, ChainName), "\n") {
		if l = strings.TrimSpace(l); strings.HasPrefix(l, "ip6 ") {
			rules = append(rules, l)
		}
	}
	return rules
}

func TestIPv6RulesAreFlannelsAndSetupIsIdempotent(t *testing.T) {
	id := runID(t)
	ns := newNS(t, "xmq6"+id)
	table := "xnettest" + id
	conn := ns.conn(t)
	want := []string{
		"ip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244::/48 return",
		"ip6 saddr fd00:10:244::/48 ip6 daddr != ff00::/8 masquerade fully-random",
		"ip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244:1::/64 return",
		"ip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244::/48 masquerade fully-random",
	}
	// The IPv4 table of the same name is another table: both live side by side.
	if err := Setup(conn, table, network, subnet); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := SetupIPv6(conn, table, network6, subnet6); err != nil {
			t.Fatal(err)
		}
		if got := chainRules6(t, ns, table); strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("after SetupIPv6 #%d the chain is\n%s\nwant\n%s", i+1, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	if out := ns.sh(t, "nft", "list", "chain", "ip6", table, ChainName); !strings.Contains(out, "type nat hook postrouting priority srcnat") {
		t.Errorf("chain is not a srcnat postrouting chain:\n%s", out)
	}
	if got := chainRules(t, ns, table); len(got) != 4 || !strings.Contains(got[0], "10.244.0.0/16") {
		t.Errorf("the IPv4 table changed: %q", got)
	}
	// A new lease replaces the rules in place.
	if err := SetupIPv6(conn, table, network6, netip.MustParsePrefix("fd00:10:244:9::/64")); err != nil {
		t.Fatal(err)
	}
	if got := chainRules6(t, ns, table); len(got) != 4 || got[2] != "ip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244:9::/64 return" {
		t.Errorf("after a subnet change: %q", got)
	}
	for range 2 {
		if err := TeardownIPv6(conn, table); err != nil {
			t.Fatal(err)
		}
	}
	tables := ns.sh(t, "nft", "list", "tables")
	if strings.Contains(tables, "ip6 "+table) || !strings.Contains(tables, "ip "+table) {
		t.Errorf("after TeardownIPv6, want only the ip table:\n%s", tables)
	}
	if err := Teardown(conn, table); err != nil {
		t.Fatal(err)
	}
}

func TestSetupIPv6RejectsBadPrefixes(t *testing.T) {
	cases := []struct {
		name            string
		network, subnet string
		named           string
	}{
		{"an IPv4 network", "10.244.0.0/16", "10.244.1.0/24", "10.244.0.0/16"},
		{"an IPv4-mapped network", "::ffff:10.244.0.0/112", "::ffff:10.244.1.0/120", "::ffff:10.244.0.0/112"},
		{"subnet outside network", "fd00:10:244::/48", "fd00:99::/64", "fd00:99::/64"},
		{"subnet wider than network", "fd00:10:244::/48", "fd00::/16", "fd00::/16"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := SetupIPv6(&nftables.Conn{}, "unused", netip.MustParsePrefix(c.network), netip.MustParsePrefix(c.subnet))
			if err == nil || !strings.Contains(err.Error(), c.named) {
				t.Errorf("SetupIPv6(%s, %s) = %v, want an error naming %s", c.network, c.subnet, err, c.named)
			}
		})
	}
}

// TestIPv6MasqueradeOnlyWhatLeavesTheOverlay is TestMasqueradeOnlyWhatLeavesTheOverlay over
// IPv6:
//
//	container (fd00:10:244:1::2) --veth-- host --eth0 fd00:198:18::11-- outside (fd00:198:18::1)
//	                                        \--veth fd00:10:244:2::1-- overlay peer (fd00:10:244:2::2)
func TestIPv6MasqueradeOnlyWhatLeavesTheOverlay(t *testing.T) {
	id := runID(t)
	host, ctr, out, peer := newNS(t, "xmq6"+id+"h"), newNS(t, "xmq6"+id+"c"), newNS(t, "xmq6"+id+"o"), newNS(t, "xmq6"+id+"p")
	link := func(a testNS, aName, aAddr string, b testNS, bName, bAddr string) {
		run(t, "ip", "-n", string(a), "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", string(b))
		run(t, "ip", "-n", string(a), "addr", "add", aAddr, "dev", aName, "nodad")
		run(t, "ip", "-n", string(b), "addr", "add", bAddr, "dev", bName, "nodad")
		run(t, "ip", "-n", string(a), "link", "set", aName, "up")
		run(t, "ip", "-n", string(b), "link", "set", bName, "up")
	}
	link(host, "vc", "fd00:10:244:1::1/64", ctr, "eth0", "fd00:10:244:1::2/64")
	link(host, "eth0", "fd00:198:18::11/64", out, "eth0", "fd00:198:18::1/64")
	link(host, "vp", "fd00:10:244:2::1/64", peer, "eth0", "fd00:10:244:2::2/64")
	run(t, "ip", "-n", string(ctr), "route", "add", "::/0", "via", "fd00:10:244:1::1")
	run(t, "ip", "-n", string(peer), "route", "add", "::/0", "via", "fd00:10:244:2::1")
	run(t, "ip", "-n", string(out), "route", "add", "fd00:10:244::/48", "via", "fd00:198:18::11")
	run(t, "nsenter", "--net=/run/netns/"+string(host), "--", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")

	table := "xnettest" + id
	conn := host.conn(t)
	if err := SetupIPv6(conn, table, network6, subnet6); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = TeardownIPv6(conn, table) })

	cases := []struct {
		name     string
		from, to testNS
		dst      string
		seen     string
	}{
		{"container to outside is masqueraded to the host's address", ctr, out, "fd00:198:18::1", "fd00:198:18::11"},
		{"container to a remote container keeps its address", ctr, peer, "fd00:10:244:2::2", "fd00:10:244:1::2"},
		{"outside to our container is not masqueraded", out, ctr, "fd00:10:244:1::2", "fd00:198:18::1"},
		{"outside to a remote container is masqueraded into the overlay", out, peer, "fd00:10:244:2::2", "fd00:10:244:2::1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := sourceSeen(c.from, c.to, netip.MustParseAddr(c.dst))
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != c.seen {
				t.Errorf("receiver saw source %v, want %v", got, c.seen)
			}
		})
	}

	// Without the table the container's address leaks out: the rules are what masquerades.
	if err := TeardownIPv6(conn, table); err != nil {
		t.Fatal(err)
	}
	if got, err := sourceSeen(ctr, out, netip.MustParseAddr("fd00:198:18::1")); err != nil || got.String() != "fd00:10:244:1::2" {
		t.Errorf("after TeardownIPv6 the outside saw %v (err %v), want the unmasqueraded fd00:10:244:1::2", got, err)
	}
}
