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

// DefaultTable is the nftables table xnetd uses ("nft list table ip xnet").
const DefaultTable = "xnet"

// ChainName is the NAT postrouting chain inside the table.
const ChainName = "postrouting"

// multicast is 224.0.0.0/4: never masqueraded (flannel's rule).
var multicast = netip.MustParsePrefix("224.0.0.0/4")

// Setup installs (or replaces) the masquerade rules for an overlay Network and our Subnet in
// table, atomically. conn decides the network namespace (nftables.WithNetNSFd).
func Setup(conn *nftables.Conn, table string, network, subnet netip.Prefix) error {
	if table == "" {
		return errors.New("ipmasq: empty table name")
	}
	if !network.IsValid() || !network.Addr().Is4() {
		return fmt.Errorf("ipmasq: Network %v is not an IPv4 prefix", network)
	}
	if !subnet.IsValid() || !subnet.Addr().Is4() || !network.Contains(subnet.Addr()) || subnet.Bits() < network.Bits() {
		return fmt.Errorf("ipmasq: Subnet %v is not an IPv4 prefix inside Network %v", subnet, network)
	}
	network, subnet = network.Masked(), subnet.Masked()

	t := conn.AddTable(&nftables.Table{Name: table, Family: nftables.TableFamilyIPv4})
	c := conn.AddChain(&nftables.Chain{
		Name:     ChainName,
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	conn.FlushChain(c)
	for _, r := range rules(network, subnet) {
		conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: r})
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("ipmasq: install masquerade rules in table ip %s (Network %v, Subnet %v): %w", table, network, subnet, err)
	}
	return nil
}

// Teardown deletes table. A missing table is not an error.
func Teardown(conn *nftables.Conn, table string) error {
	conn.DelTable(&nftables.Table{Name: table, Family: nftables.TableFamilyIPv4})
	if err := conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("ipmasq: delete table ip %s: %w", table, err)
	}
	return nil
}

// rules are flannel's four, in order.
func rules(network, subnet netip.Prefix) [][]expr.Any {
	return [][]expr.Any{
		join(match(srcOffset, network, true), match(dstOffset, network, true), ret()),
		join(match(srcOffset, network, true), match(dstOffset, multicast, false), masquerade()),
		join(match(srcOffset, network, false), match(dstOffset, subnet, true), ret()),
		join(match(srcOffset, network, false), match(dstOffset, network, true), masquerade()),
	}
}

// Offsets of the IPv4 source and destination address in the network header.
const (
	srcOffset = 12
	dstOffset = 16
)

// match is "ip saddr|daddr [!=] prefix": load the address, mask it, compare with the network.
func match(offset uint32, p netip.Prefix, equal bool) []expr.Any {
	op := expr.CmpOpEq
	if !equal {
		op = expr.CmpOpNeq
	}
	m := prefixMask(p.Bits())
	addr := p.Masked().Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m[:], Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: op, Register: 1, Data: addr[:]},
	}
}

func prefixMask(bits int) [4]byte {
	var m [4]byte
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
