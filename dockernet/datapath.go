package dockernet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/vxlan"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// BridgeName is the bridge of the network with vni: its containers' veths are its ports and its
// address is the first of this host's block.
func BridgeName(vni int) string { return "xnbr." + strconv.Itoa(vni) }

// bridgePrefix starts every network bridge's name (for teardown).
const bridgePrefix = "xnbr."

// veth names: the host end stays on the bridge, the container end is what Docker moves into
// the container and renames eth<N>. Endpoint IDs are 64 hex digits; 10 keep names unique and
// within the 15 bytes of an interface name.
func hostVeth(endpointID string) string      { return "xnh" + shortID(endpointID) }
func containerVeth(endpointID string) string { return "xnc" + shortID(endpointID) }

func shortID(id string) string {
	if len(id) > 10 {
		return id[:10]
	}
	return id
}

// netDatapath is one network's devices on this host: the bridge and the network's kernel
// VXLAN device, the latter programmed exactly as the overlay's vxlan backend programs xnet.1
// (it is that backend, configured with the network's subnet, VNI, port and block length).
type netDatapath struct {
	rec    subnetmgr.Network
	nl     *netlink.Handle
	vx     *vxlan.Backend
	cfg    subnetmgr.Config
	block  subnetmgr.Lease
	bridge string
	mtu    int
	log    *slog.Logger
}

// blockGateway is the address of the network's bridge on this host and the next hop of its
// containers towards the rest of the network: the first host address of the block.
func blockGateway(block netip.Prefix) netip.Prefix { return subnetmgr.GatewayOf(block) }

// setupDatapath creates or adopts the network's devices for our block.
func setupDatapath(ctx context.Context, nl *netlink.Handle, iface backend.ExternalInterface, rec subnetmgr.Network, block subnetmgr.Lease, log *slog.Logger) (*netDatapath, error) {
	cfg := subnetmgr.Config{Network: rec.Subnet, SubnetLen: rec.BlockLen,
		Backend: subnetmgr.BackendConfig{Type: subnetmgr.BackendVXLAN, VNI: rec.VNI, Port: rec.Port}}
	vx, err := vxlan.NewWithHandle(backend.Options{Iface: iface, Config: cfg, Logger: log.With("network", rec.Name)}, nl)
	if err != nil {
		return nil, fmt.Errorf("network %s: %w", rec.Name, err)
	}
	d := &netDatapath{rec: rec, nl: nl, vx: vx, cfg: cfg, block: block, bridge: BridgeName(rec.VNI), mtu: vx.MTU(), log: log.With("network", rec.Name)}
	if err := vx.Setup(ctx, block, cfg); err != nil {
		return nil, fmt.Errorf("network %s: %w", rec.Name, err)
	}
	if err := d.ensureBridge(); err != nil {
		return nil, err
	}
	return d, nil
}

// ensureBridge creates or adopts the bridge and leaves exactly the block's gateway on it.
func (d *netDatapath) ensureBridge() error {
	link, err := d.nl.LinkByName(d.bridge)
	switch {
	case err == nil:
		if _, ok := link.(*netlink.Bridge); !ok {
			return fmt.Errorf("network %s: %s exists and is a %s, not a bridge: remove it", d.rec.Name, d.bridge, link.Type())
		}
	case errors.As(err, &netlink.LinkNotFoundError{}):
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: d.bridge, MTU: d.mtu}}
		if err := d.nl.LinkAdd(br); err != nil {
			return fmt.Errorf("network %s: create bridge %s: %w", d.rec.Name, d.bridge, err)
		}
		if link, err = d.nl.LinkByName(d.bridge); err != nil {
			return fmt.Errorf("network %s: look up created %s: %w", d.rec.Name, d.bridge, err)
		}
		d.log.Info("created network bridge", "bridge", d.bridge)
	default:
		return fmt.Errorf("network %s: look up %s: %w", d.rec.Name, d.bridge, err)
	}
	if link.Attrs().MTU != d.mtu {
		if err := d.nl.LinkSetMTU(link, d.mtu); err != nil {
			return fmt.Errorf("network %s: set %s mtu %d: %w", d.rec.Name, d.bridge, d.mtu, err)
		}
	}
	want := blockGateway(d.block.Subnet)
	addrs, err := d.nl.AddrList(link, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("network %s: addresses of %s: %w", d.rec.Name, d.bridge, err)
	}
	have := false
	for _, a := range addrs {
		p := ipNetPrefix(a.IPNet)
		if p == want {
			have = true
			continue
		}
		if err := d.nl.AddrDel(link, &a); err != nil {
			return fmt.Errorf("network %s: remove stale address %v from %s: %w", d.rec.Name, p, d.bridge, err)
		}
	}
	if !have {
		if err := d.nl.AddrAdd(link, &netlink.Addr{IPNet: prefixIPNet(want)}); err != nil {
			return fmt.Errorf("network %s: add %v to %s: %w", d.rec.Name, want, d.bridge, err)
		}
	}
	if err := d.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("network %s: set %s up: %w", d.rec.Name, d.bridge, err)
	}
	return nil
}

// addPeer and removePeer program one other host's block (the vxlan backend's route, neighbour
// and fdb entry); prune drops what no block in keep accounts for, after a restart.
func (d *netDatapath) addPeer(l subnetmgr.Lease) error    { return d.vx.AddPeer(l) }
func (d *netDatapath) removePeer(l subnetmgr.Lease) error { return d.vx.RemovePeer(l) }
func (d *netDatapath) prune(keep []subnetmgr.Lease) error { return d.vx.PrunePeers(keep) }

// close releases the network's devices; with teardown they are deleted (containers on the
// network are gone by then).
func (d *netDatapath) close(teardown bool) error {
	err := d.vx.Close(teardown)
	if teardown {
		if link, lerr := d.nl.LinkByName(d.bridge); lerr == nil {
			if derr := d.nl.LinkDel(link); derr != nil {
				err = errors.Join(err, fmt.Errorf("delete %s: %w", d.bridge, derr))
			}
		}
		d.log.Info("network devices removed", "bridge", d.bridge, "vxlan", vxlan.DeviceName(d.rec.VNI))
	}
	return err
}

// addVeth creates the container's veth pair: the host end on the bridge and up, the container
// end with mac and the network's MTU, left for Docker to move into the container.
func (d *netDatapath) addVeth(endpointID string, mac net.HardwareAddr) (string, error) {
	br, err := d.nl.LinkByName(d.bridge)
	if err != nil {
		return "", fmt.Errorf("network %s: bridge %s: %w", d.rec.Name, d.bridge, err)
	}
	host, cont := hostVeth(endpointID), containerVeth(endpointID)
	// A veth of the same endpoint left by a failed join is replaced.
	if old, err := d.nl.LinkByName(host); err == nil {
		_ = d.nl.LinkDel(old)
	}
	v := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: host, MTU: d.mtu, MasterIndex: br.Attrs().Index},
		PeerName:         cont,
		PeerHardwareAddr: mac,
	}
	if err := d.nl.LinkAdd(v); err != nil {
		return "", fmt.Errorf("network %s: create veth %s/%s: %w", d.rec.Name, host, cont, err)
	}
	peer, err := d.nl.LinkByName(cont)
	if err == nil {
		err = d.nl.LinkSetMTU(peer, d.mtu)
	}
	if err == nil {
		err = d.nl.LinkSetUp(v)
	}
	if err != nil {
		_ = d.nl.LinkDel(v)
		return "", fmt.Errorf("network %s: set up veth %s: %w", d.rec.Name, host, err)
	}
	return cont, nil
}

// deleteVeth removes an endpoint's veth pair if it is still on this host (Docker moves the
// container end back here when a running container leaves the network).
func deleteVeth(nl *netlink.Handle, endpointID string) error {
	for _, name := range []string{hostVeth(endpointID), containerVeth(endpointID)} {
		if link, err := nl.LinkByName(name); err == nil {
			if err := nl.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
				return fmt.Errorf("delete veth %s: %w", name, err)
			}
		}
	}
	return nil
}

// Isolation. The bridges route through this host, so without rules a container could reach
// another network through any path the host forwards (Docker's docker_gwbridge, which every
// container on an xnet network has for its default route, forwards anywhere). One nftables
// table of our own holds, per network, three accepts (bridge to bridge, bridge to its VXLAN
// device, back) and four counted drops of anything else entering or leaving either device:
// a drop in any table drops, so Docker's rules cannot undo them, and our accepts change
// nothing in Docker's FORWARD chain (fwrules opens that for the bridges).

// IsolationTable is the nftables table holding the isolation rules ("nft list table ip xnet-networks").
const IsolationTable = "xnet-networks"

const isolationChain = "forward"

// refusedCounter names the counter of packets refused on the network with vni.
func refusedCounter(vni int) string { return "refused-" + strconv.Itoa(vni) }

// isolated is what the isolation rules need of one network.
type isolated struct {
	VNI int
}

func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchIf(key expr.MetaKey, reg uint32, name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: ifname(name)},
	}
}

// applyIsolation replaces the rules with those for nets in one batch (the kernel applies it
// atomically), keeping the counters of networks that stay.
func applyIsolation(conn *nftables.Conn, nets []isolated) error {
	t := conn.AddTable(&nftables.Table{Name: IsolationTable, Family: nftables.TableFamilyIPv4})
	policy := nftables.ChainPolicyAccept
	c := conn.AddChain(&nftables.Chain{Name: isolationChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy})
	conn.FlushChain(c)
	have := map[string]bool{}
	if objs, err := conn.GetObjects(t); err == nil {
		for _, o := range objs {
			if co, ok := o.(*nftables.CounterObj); ok {
				have[co.Name] = true
			}
		}
	}
	want := map[string]bool{}
	for _, n := range nets {
		br, vx := BridgeName(n.VNI), vxlan.DeviceName(n.VNI)
		name := refusedCounter(n.VNI)
		want[name] = true
		if !have[name] {
			conn.AddObj(&nftables.CounterObj{Table: t, Name: name})
		}
		accept := &expr.Verdict{Kind: expr.VerdictAccept}
		for _, pair := range [][2]string{{br, br}, {br, vx}, {vx, br}} {
			exprs := append(matchIf(expr.MetaKeyIIFNAME, 1, pair[0]), matchIf(expr.MetaKeyOIFNAME, 2, pair[1])...)
			conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: append(exprs, accept)})
		}
		for _, dev := range []string{br, vx} {
			for _, key := range []expr.MetaKey{expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME} {
				exprs := append(matchIf(key, 1, dev),
					&expr.Objref{Type: 1 /* NFT_OBJECT_COUNTER */, Name: name},
					&expr.Verdict{Kind: expr.VerdictDrop})
				conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: exprs})
			}
		}
	}
	for name := range have {
		if !want[name] {
			conn.DeleteObject(&nftables.CounterObj{Table: t, Name: name})
		}
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("nftables table ip %s: %w", IsolationTable, err)
	}
	return nil
}

// refusedCounts reads the refusal counters by VNI.
func refusedCounts(conn *nftables.Conn) (map[int]uint64, error) {
	objs, err := conn.GetObjects(&nftables.Table{Name: IsolationTable, Family: nftables.TableFamilyIPv4})
	if err != nil {
		return nil, fmt.Errorf("nftables table ip %s: %w", IsolationTable, err)
	}
	out := map[int]uint64{}
	for _, o := range objs {
		co, ok := o.(*nftables.CounterObj)
		if !ok {
			continue
		}
		if v, err := strconv.Atoi(strings.TrimPrefix(co.Name, "refused-")); err == nil {
			out[v] = co.Packets
		}
	}
	return out, nil
}

// Teardown removes every network bridge and VXLAN device and the isolation table from this
// host, for `xnetd teardown` (with the daemon stopped). It says what it removed.
func Teardown() ([]string, error) {
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var done []string
	var errs []error
	for _, l := range links {
		name := l.Attrs().Name
		vni, err := strconv.Atoi(strings.TrimPrefix(name, bridgePrefix))
		if !strings.HasPrefix(name, bridgePrefix) || err != nil {
			continue
		}
		if vx, err := nl.LinkByName(vxlan.DeviceName(vni)); err == nil {
			if _, ok := vx.(*netlink.Vxlan); ok {
				if err := nl.LinkDel(vx); err != nil {
					errs = append(errs, fmt.Errorf("delete %s: %w", vxlan.DeviceName(vni), err))
				} else {
					done = append(done, vxlan.DeviceName(vni))
				}
			}
		}
		if err := nl.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
		} else {
			done = append(done, name)
		}
	}
	if conn, err := nftables.New(); err == nil {
		conn.DelTable(&nftables.Table{Name: IsolationTable, Family: nftables.TableFamilyIPv4})
		if err := conn.Flush(); err == nil {
			done = append(done, "nftables table ip "+IsolationTable)
		} else if !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete nftables table ip %s: %w", IsolationTable, err))
		}
	}
	return done, errors.Join(errs...)
}

func ipNetPrefix(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), 32)}
}

// containerMAC derives a container's MAC from its address as Docker's bridge driver does
// (02:42:<address>), so a container keeps its MAC across restarts and peers' ARP caches
// stay right.
func containerMAC(ip netip.Addr) net.HardwareAddr {
	a := ip.As4()
	return net.HardwareAddr{0x02, 0x42, a[0], a[1], a[2], a[3]}
}
