// Package ipmasq masquerades container traffic that leaves the overlay (--ip-masq), with
// nftables through netlink (google/nftables; no nft or iptables binaries).
//
// It owns one nftables table (family ip, DefaultTable unless told otherwise) holding one NAT
// postrouting chain with flannel's four rules, in flannel's order:
//
//	ip saddr <Network> ip daddr <Network> return                           overlay to overlay: untouched
//	ip saddr <Network> ip daddr != 224.0.0.0/4 masquerade fully-random      containers to the world
//	ip saddr != <Network> ip daddr <Subnet> return                          the world to our containers: untouched
//	ip saddr != <Network> ip daddr <Network> masquerade fully-random        this host to remote containers
//
// (flannel's iptables rules: -s N -d N RETURN; -s N ! -d 224.0.0.0/4 MASQUERADE --random-fully;
// ! -s N -d S RETURN; ! -s N -d N MASQUERADE --random-fully.) The last rule gives traffic from
// the host, or routed through it, an overlay source that remote hosts can answer.
//
// In a dual-stack overlay SetupIPv6 installs the same four rules for IPv6 in a twin table of
// family ip6 ("nft list table ip6 xnet"), with the IPv6Network, our IPv6 subnet and ff00::/8
// as the multicast range, as flannel's IPv6 rules (ip6tables -s N ! -d ff00::/8 MASQUERADE ...):
//
//	ip6 saddr <IPv6Network> ip6 daddr <IPv6Network> return
//	ip6 saddr <IPv6Network> ip6 daddr != ff00::/8 masquerade fully-random
//	ip6 saddr != <IPv6Network> ip6 daddr <IPv6 subnet> return
//	ip6 saddr != <IPv6Network> ip6 daddr <IPv6Network> masquerade fully-random
//
// TeardownIPv6 deletes that table.
//
// Why a table of our own: Setup replaces the whole chain in one netlink batch (add table, add
// chain, flush chain, add rules), which the kernel applies atomically, so there is never a
// moment without rules and running it again is a no-op; Teardown deletes the table and
// nothing else. It does not touch Docker's or anyone else's iptables/nftables rules, nor the
// filter (FORWARD) policy.
package ipmasq

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// DefaultTable is the nftables table xnetd uses ("nft list table ip xnet"; with SetupIPv6 also
// "nft list table ip6 xnet").
const DefaultTable = "xnet"

// ChainName is the NAT postrouting chain inside the table.
const ChainName = "postrouting"

// Multicast ranges: never masqueraded (flannel's rules).
var (
	multicast  = netip.MustParsePrefix("224.0.0.0/4")
	multicast6 = netip.MustParsePrefix("ff00::/8")
)

// family is what differs between the IPv4 table and its IPv6 twin.
type family struct {
	table              nftables.TableFamily
	name               string // as nft names it: "ip", "ip6"
	what               string // for errors: "IPv4", "IPv6"
	srcOffset, addrLen uint32 // the source address in the network header; the destination follows it
	multicast          netip.Prefix
}

var (
	ipv4 = family{table: nftables.TableFamilyIPv4, name: "ip", what: "IPv4", srcOffset: 12, addrLen: 4, multicast: multicast}
	ipv6 = family{table: nftables.TableFamilyIPv6, name: "ip6", what: "IPv6", srcOffset: 8, addrLen: 16, multicast: multicast6}
)

// Setup installs (or replaces) the masquerade rules for an overlay Network and our Subnet in
// table, atomically. conn decides the network namespace (nftables.WithNetNSFd).
func Setup(conn *nftables.Conn, table string, network, subnet netip.Prefix) error {
	return setup(conn, ipv4, table, network, subnet)
}

// SetupIPv6 is Setup for the IPv6 half of a dual-stack overlay: flannel's rules for the
// IPv6Network and our IPv6 subnet, in the table of family ip6 called table (the ip table of the
// same name is another table, which Setup keeps).
func SetupIPv6(conn *nftables.Conn, table string, network6, subnet6 netip.Prefix) error {
	return setup(conn, ipv6, table, network6, subnet6)
}

func setup(conn *nftables.Conn, f family, table string, network, subnet netip.Prefix) error {
	if table == "" {
		return errors.New("ipmasq: empty table name")
	}
	if !f.holds(network) {
		return fmt.Errorf("ipmasq: Network %v is not an %s prefix", network, f.what)
	}
	if !f.holds(subnet) || !network.Contains(subnet.Addr()) || subnet.Bits() < network.Bits() {
		return fmt.Errorf("ipmasq: Subnet %v is not an %s prefix inside Network %v", subnet, f.what, network)
	}
	network, subnet = network.Masked(), subnet.Masked()

	t := conn.AddTable(&nftables.Table{Name: table, Family: f.table})
	c := conn.AddChain(&nftables.Chain{
		Name:     ChainName,
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	conn.FlushChain(c)
	for _, r := range f.rules(network, subnet) {
		conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: r})
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("ipmasq: install masquerade rules in table %s %s (Network %v, Subnet %v): %w", f.name, table, network, subnet, err)
	}
	return nil
}

// holds says whether p is a prefix of the family (an IPv4-mapped IPv6 one is neither).
func (f family) holds(p netip.Prefix) bool {
	return p.IsValid() && p.Addr().BitLen() == int(f.addrLen)*8 && !p.Addr().Is4In6()
}

// Teardown deletes table. A missing table is not an error.
func Teardown(conn *nftables.Conn, table string) error { return teardown(conn, ipv4, table) }

// TeardownIPv6 deletes the ip6 table SetupIPv6 made. A missing table is not an error.
func TeardownIPv6(conn *nftables.Conn, table string) error { return teardown(conn, ipv6, table) }

func teardown(conn *nftables.Conn, f family, table string) error {
	conn.DelTable(&nftables.Table{Name: table, Family: f.table})
	if err := conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("ipmasq: delete table %s %s: %w", f.name, table, err)
	}
	return nil
}

// rules are flannel's four, in order.
func (f family) rules(network, subnet netip.Prefix) [][]expr.Any {
	src, dst := f.srcOffset, f.srcOffset+f.addrLen
	return [][]expr.Any{
		join(f.match(src, network, true), f.match(dst, network, true), ret()),
		join(f.match(src, network, true), f.match(dst, f.multicast, false), masquerade()),
		join(f.match(src, network, false), f.match(dst, subnet, true), ret()),
		join(f.match(src, network, false), f.match(dst, network, true), masquerade()),
	}
}

// match is "ip saddr|daddr [!=] prefix" (ip6 in the IPv6 family): load the address, mask it,
// compare with the network.
func (f family) match(offset uint32, p netip.Prefix, equal bool) []expr.Any {
	op := expr.CmpOpEq
	if !equal {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: f.addrLen},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: f.addrLen, Mask: prefixMask(p.Bits(), int(f.addrLen)), Xor: make([]byte, f.addrLen)},
		&expr.Cmp{Op: op, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// prefixMask is the network mask of bits ones, n bytes long.
func prefixMask(bits, n int) []byte {
	m := make([]byte, n)
	for i := range bits {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

func ret() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}} }

// masquerade is "masquerade fully-random", as flannel's --random-fully: source ports are
// picked at random so two containers' flows cannot collide on one host port.
func masquerade() []expr.Any { return []expr.Any{&expr.Masq{FullyRandom: true}} }

func join(parts ...[]expr.Any) []expr.Any {
	var all []expr.Any
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}
