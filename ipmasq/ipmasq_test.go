package ipmasq

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/test/harness"
)

var (
	network = netip.MustParsePrefix("10.244.0.0/16")
	subnet  = netip.MustParsePrefix("10.244.1.0/24")
)

// testNS is a network namespace made for one test.
type testNS string

func newNS(t *testing.T, name string) testNS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return testNS(name)
}

func (n testNS) sh(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, append([]string{"nsenter", "--net=/run/netns/" + string(n), "--"}, args...)...)
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// conn is an nftables connection into the namespace.
func (n testNS) conn(t *testing.T) *nftables.Conn {
	t.Helper()
	h, err := netns.GetFromName(string(n))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func runID(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// chainRules is the chain as nft prints it, one rule a line.
func chainRules(t *testing.T, n testNS, table string) []string {
	t.Helper()
	out := n.sh(t, "nft", "list", "chain", "ip", table, ChainName)
	var rules []string
	for l := range strings.SplitSeq(out, "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "ip ") {
			rules = append(rules, l)
		}
	}
	return rules
}

func TestRulesAreFlannelsAndSetupIsIdempotent(t *testing.T) {
	id := runID(t)
	ns := newNS(t, "xmq"+id)
	table := "xnettest" + id
	conn := ns.conn(t)
	want := []string{
		"ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return",
		"ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
		"ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return",
		"ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
	}
	for i := range 2 {
		if err := Setup(conn, table, network, subnet); err != nil {
			t.Fatal(err)
		}
		if got := chainRules(t, ns, table); strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("after Setup #%d the chain is\n%s\nwant\n%s", i+1, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	if out := ns.sh(t, "nft", "list", "chain", "ip", table, ChainName); !strings.Contains(out, "type nat hook postrouting priority srcnat") {
		t.Errorf("chain is not a srcnat postrouting chain:\n%s", out)
	}

	// A new lease replaces the rules in place.
	if err := Setup(conn, table, network, netip.MustParsePrefix("10.244.9.0/24")); err != nil {
		t.Fatal(err)
	}
	if got := chainRules(t, ns, table); len(got) != 4 || got[2] != "ip saddr != 10.244.0.0/16 ip daddr 10.244.9.0/24 return" {
		t.Errorf("after a subnet change: %q", got)
	}
	// The library reads back what the kernel holds, too.
	tbl := &nftables.Table{Name: table, Family: nftables.TableFamilyIPv4}
	if rules, err := conn.GetRules(tbl, &nftables.Chain{Name: ChainName, Table: tbl}); err != nil || len(rules) != 4 {
		t.Errorf("GetRules: %d rules, err %v; want 4", len(rules), err)
	}

	for range 2 {
		if err := Teardown(conn, table); err != nil {
			t.Fatal(err)
		}
	}
	if out := ns.sh(t, "nft", "list", "tables"); strings.Contains(out, table) {
		t.Errorf("table still there after Teardown:\n%s", out)
	}
}

func TestSetupRejectsBadPrefixes(t *testing.T) {
	cases := []struct {
		name            string
		network, subnet string
		named           string // the error must name the offending value
	}{
		{"subnet outside network", "10.244.0.0/16", "10.1.0.0/24", "10.1.0.0/24"},
		{"subnet wider than network", "10.244.0.0/16", "10.0.0.0/8", "10.0.0.0/8"},
		{"IPv6 network", "fd00::/48", "fd00::/64", "fd00::/48"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// No netlink traffic happens for invalid input, so a zero Conn is enough.
			err := Setup(&nftables.Conn{}, "unused", netip.MustParsePrefix(c.network), netip.MustParsePrefix(c.subnet))
			if err == nil || !strings.Contains(err.Error(), c.named) {
				t.Errorf("Setup(%s, %s) = %v, want an error naming %s", c.network, c.subnet, err, c.named)
			}
		})
	}
}

// TestMasqueradeOnlyWhatLeavesTheOverlay sends real traffic through a host namespace:
//
//	container (10.244.1.2) --veth-- host --eth0 198.18.0.11-- outside (198.18.0.1)
//	                                  \--veth 10.244.2.1-- overlay peer (10.244.2.2)
//
// and asks each receiver which source address it saw.
func TestMasqueradeOnlyWhatLeavesTheOverlay(t *testing.T) {
	id := runID(t)
	host, ctr, out, peer := newNS(t, "xmq"+id+"h"), newNS(t, "xmq"+id+"c"), newNS(t, "xmq"+id+"o"), newNS(t, "xmq"+id+"p")
	hostNS := "/run/netns/" + string(host)
	link := func(a testNS, aName, aAddr string, b testNS, bName, bAddr string) {
		run(t, "ip", "-n", string(a), "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", string(b))
		run(t, "ip", "-n", string(a), "addr", "add", aAddr, "dev", aName)
		run(t, "ip", "-n", string(b), "addr", "add", bAddr, "dev", bName)
		run(t, "ip", "-n", string(a), "link", "set", aName, "up")
		run(t, "ip", "-n", string(b), "link", "set", bName, "up")
	}
	link(host, "vc", "10.244.1.1/24", ctr, "eth0", "10.244.1.2/24")
	link(host, "eth0", "198.18.0.11/24", out, "eth0", "198.18.0.1/24")
	link(host, "vp", "10.244.2.1/24", peer, "eth0", "10.244.2.2/24")
	run(t, "ip", "-n", string(ctr), "route", "add", "default", "via", "10.244.1.1")
	run(t, "ip", "-n", string(peer), "route", "add", "default", "via", "10.244.2.1")
	run(t, "ip", "-n", string(out), "route", "add", "10.244.0.0/16", "via", "198.18.0.11")
	run(t, "nsenter", "--net="+hostNS, "--", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

	table := "xnettest" + id
	conn := host.conn(t)
	if err := Setup(conn, table, network, subnet); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Teardown(conn, table) })

	cases := []struct {
		name     string
		from, to testNS
		dst      string
		seen     string // source address the receiver sees
	}{
		{"container to outside is masqueraded to the host's address", ctr, out, "198.18.0.1", "198.18.0.11"},
		{"container to a remote container keeps its address", ctr, peer, "10.244.2.2", "10.244.1.2"},
		{"outside to our container is not masqueraded", out, ctr, "10.244.1.2", "198.18.0.1"},
		{"outside to a remote container is masqueraded into the overlay", out, peer, "10.244.2.2", "10.244.2.1"},
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
	if err := Teardown(conn, table); err != nil {
		t.Fatal(err)
	}
	if got, err := sourceSeen(ctr, out, netip.MustParseAddr("198.18.0.1")); err != nil || got.String() != "10.244.1.2" {
		t.Errorf("after Teardown the outside saw %v (err %v), want the unmasqueraded 10.244.1.2", got, err)
	}
}

// sourceSeen is harness.SourceSeen between two of this test's namespaces.
func sourceSeen(from, to testNS, dst netip.Addr) (netip.Addr, error) {
	return harness.SourceSeen(&harness.Namespace{Name: string(from)}, &harness.Namespace{Name: string(to)}, dst, 3)
}
