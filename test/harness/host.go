package harness

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// Host is one simulated machine: a namespace with eth0 on the underlay bridge.
type Host struct {
	*Namespace
	Index      int        // 0-based
	Name       string     // "h1", "h2", ...
	UnderlayIP netip.Addr // 198.18.0.11, .12, ...
	StateDir   string     // per-host dir for subnet.env and docker opts (instead of /run/xnet)
	BPFFS      string     // per-host bpffs mount point (a private bpffs instance in StateDir)

	// UnderlayIPv6 is the host's IPv6 underlay address once AddIPv6Underlay (or
	// Options.IPv6Underlay) gave it one (fd00:198:18::b, ::c, ...: 11+i); invalid otherwise.
	UnderlayIPv6 netip.Addr

	topo *Topology

	mu         sync.Mutex
	segment    int          // Near or Far (two-segment topologies; Near otherwise)
	docker0    netip.Prefix // gateway/len, invalid until SetupDocker0
	docker0MTU int
	docker0v6  netip.Prefix // IPv6 gateway/len (SetupDocker0IPv6), invalid without
	bridge     string       // the container bridge's name: "docker0" unless UseBridgeName
	containers []*Container
}

// Segment is the underlay segment the host is on: Near, or Far behind the router of a
// two-segment topology (Options.FarHosts).
func (h *Host) Segment() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.segment
}

// MoveToSegment re-numbers the host onto segment seg of a two-segment topology, as moving a
// machine to another LAN does: its eth0 is plugged into the other bridge and gets the address
// and routes of that segment (host i is 198.18.0.(11+i) on the near one, .(139+i) on the far
// one). It updates UnderlayIP, so it must not run while anything reads that field. xnetd is not
// told: like a real host, it needs a restart to publish its new PublicIP.
func (h *Host) MoveToSegment(ctx context.Context, seg int) error {
	if !h.topo.twoSegments {
		return fmt.Errorf("harness: %s: MoveToSegment needs a two-segment topology (Options.FarHosts)", h.Name)
	}
	if seg != Near && seg != Far {
		return fmt.Errorf("harness: %s: segment %d, want Near or Far", h.Name, seg)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	ip, addrCmds := h.topo.segmentAddr(h.Index, seg)
	if err := h.topo.underlay.IP(ctx, fmt.Sprintf("link set %s master %s", h.Name, segmentBridge(seg))); err != nil {
		return fmt.Errorf("harness: move %s to %s: %w", h.Name, segmentBridge(seg), err)
	}
	// Flushing the address takes its routes with it.
	if err := h.IP(ctx, append([]string{"addr flush dev eth0"}, addrCmds...)...); err != nil {
		return fmt.Errorf("harness: re-number %s: %w", h.Name, err)
	}
	h.segment, h.UnderlayIP = seg, ip
	return nil
}

// Container is a namespace on a veth into its host's docker0, as `docker run` makes.
type Container struct {
	*Namespace
	Host *Host
	IP   netip.Addr
	// IPv6 is the container's IPv6 address when docker0 has one (SetupDocker0IPv6), as
	// `docker run` gives it with --ipv6; invalid otherwise.
	IPv6 netip.Addr
	// Veth is the host-side name of the container's veth (in the host namespace).
	Veth string
}

// SubnetFile is where StartXnetd tells xnetd to write subnet.env for this host.
func (h *Host) SubnetFile() string { return filepath.Join(h.StateDir, "subnet.env") }

// DockerOptsFile is where StartXnetd tells xnetd to write the Docker options for this host.
func (h *Host) DockerOptsFile() string { return filepath.Join(h.StateDir, "docker") }

// Docker0 is docker0's gateway address and prefix length (10.244.5.1/24), or the zero Prefix
// before SetupDocker0.
func (h *Host) Docker0() netip.Prefix {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.docker0
}

// Docker0Subnet is the subnet docker0 serves (10.244.5.0/24), or the zero Prefix.
func (h *Host) Docker0Subnet() netip.Prefix {
	g := h.Docker0()
	if !g.IsValid() {
		return netip.Prefix{}
	}
	return g.Masked()
}

// Docker0IPv6Subnet is the IPv6 subnet docker0 serves (SetupDocker0IPv6), or the zero Prefix.
func (h *Host) Docker0IPv6Subnet() netip.Prefix {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.docker0v6.IsValid() {
		return netip.Prefix{}
	}
	return h.docker0v6.Masked()
}

// UseBridgeName names the container bridge SetupDocker0 makes (before it): Docker with a
// daemon.json "bridge", podman or a CNI plugin call it something else than docker0.
func (h *Host) UseBridgeName(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.bridge = name
}

// BridgeName is the container bridge's name.
func (h *Host) BridgeName() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.bridgeNameLocked()
}

func (h *Host) bridgeNameLocked() string {
	if h.bridge == "" {
		return "docker0"
	}
	return h.bridge
}

// SetupDocker0 plays Docker: a bridge (docker0 unless UseBridgeName) with the gateway address
// (e.g. 10.244.5.1/24) and the MTU that containers added later get.
func (h *Host) SetupDocker0(gateway netip.Prefix, mtu int) error {
	if !gateway.Addr().Is4() || gateway.Bits() > 30 || gateway.Addr() == gateway.Masked().Addr() {
		return fmt.Errorf("harness: docker0 gateway %s: want an IPv4 host address with its prefix length (<= /30), e.g. 10.244.5.1/24", gateway)
	}
	if mtu < 576 || mtu > 65535 {
		return fmt.Errorf("harness: docker0 mtu %d: want 576..65535", mtu)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.docker0.IsValid() {
		return fmt.Errorf("harness: %s already has docker0 %s", h.Name, h.docker0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	br := h.bridgeNameLocked()
	// A MAC of its own, as Docker gives docker0: a bridge without one takes its lowest port's,
	// so a port going away (the ebpf backend's headroom port at teardown) would change it under
	// the containers' neighbour entries for their gateway.
	mac := make([]byte, 6)
	if _, err := rand.Read(mac); err != nil {
		return fmt.Errorf("harness: docker0 MAC: %w", err)
	}
	mac[0] = mac[0]&0xfe | 0x02 // unicast, locally administered
	err := h.IP(ctx,
		fmt.Sprintf("link add %s address %s type bridge", br, net.HardwareAddr(mac)),
		fmt.Sprintf("link set %s mtu %d", br, mtu),
		fmt.Sprintf("addr add %s dev %s", gateway, br),
		"link set "+br+" up")
	if err != nil {
		return fmt.Errorf("harness: docker0 on %s: %w", h.Name, err)
	}
	h.docker0, h.docker0MTU = gateway, mtu
	return nil
}

// SetupDocker0FromSubnetFile waits until xnetd has written this host's subnet file, then sets
// up docker0 from it as Docker would with the --bip, --mtu (and --fixed-cidr-v6) xnetd wrote.
func (h *Host) SetupDocker0FromSubnetFile(ctx context.Context) (subnetmgr.SubnetFile, error) {
	for {
		f, err := subnetmgr.ReadSubnetFile(h.SubnetFile())
		if err == nil {
			gw := netip.PrefixFrom(f.Subnet.Addr().Next(), f.Subnet.Bits())
			if !f.Subnet.IsValid() {
				// An IPv6-only overlay: Docker keeps its default IPv4 bridge, outside it.
				gw = DockerDefaultBridge
			}
			if err := h.SetupDocker0(gw, f.MTU); err != nil || !f.IPv6Subnet.IsValid() {
				return f, err
			}
			return f, h.SetupDocker0IPv6(subnetmgr.GatewayOf(f.IPv6Subnet))
		}
		if !errors.Is(err, os.ErrNotExist) {
			return f, fmt.Errorf("harness: read %s: %w", h.SubnetFile(), err)
		}
		select {
		case <-ctx.Done():
			return f, fmt.Errorf("harness: %s has no subnet file %s yet: %w", h.Name, h.SubnetFile(), ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// DockerDefaultBridge is docker0's address when Docker gets no --bip: in an IPv6-only overlay.
var DockerDefaultBridge = netip.MustParsePrefix("172.17.0.1/16")

// AddContainer plays `docker run`: a namespace xn-<id>-<host>c<n> whose eth0 is a veth into
// docker0, with the next free address of docker0's subnet, docker0's MTU and a default route
// via the gateway.
func (h *Host) AddContainer() (*Container, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.docker0.IsValid() {
		return nil, fmt.Errorf("harness: %s has no docker0: call SetupDocker0 (or SetupDocker0FromSubnetFile) first", h.Name)
	}
	n := len(h.containers) + 1
	ip := h.docker0.Addr()
	for i := 0; i < n; i++ {
		ip = ip.Next()
	}
	if !h.docker0.Contains(ip) || ip == lastAddr(h.docker0.Masked()) {
		return nil, fmt.Errorf("harness: docker0 %s on %s is full", h.docker0, h.Name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, err := h.topo.addNamespace(ctx, h.Name+"c"+strconv.Itoa(n))
	if err != nil {
		return nil, err
	}
	veth := "veth" + h.topo.id + "c" + strconv.Itoa(n)
	err = h.IP(ctx,
		fmt.Sprintf("link add %s mtu %d type veth peer name eth0 mtu %d netns %s", veth, h.docker0MTU, h.docker0MTU, ns.Name),
		fmt.Sprintf("link set %s master %s up", veth, h.bridgeNameLocked()))
	if err != nil {
		return nil, fmt.Errorf("harness: container %d on %s: %w", n, h.Name, err)
	}
	err = ns.IP(ctx,
		fmt.Sprintf("addr add %s/%d dev eth0", ip, h.docker0.Bits()),
		"link set eth0 up",
		fmt.Sprintf("route add default via %s dev eth0", h.docker0.Addr()))
	if err != nil {
		return nil, fmt.Errorf("harness: container %d on %s: %w", n, h.Name, err)
	}
	// The kernel switches a link that came up from its dropping noop qdisc to its real one in
	// the link watch, asynchronously and at times hundreds of milliseconds later; until then
	// the container's first ARP or echo is dropped. The link watch sets operstate in the same
	// step, so "UP" on both ends says the pair carries packets.
	if err := waitOperUp(ctx, h.Namespace, veth); err != nil {
		return nil, fmt.Errorf("harness: container %d on %s: %w", n, h.Name, err)
	}
	if err := waitOperUp(ctx, ns, "eth0"); err != nil {
		return nil, fmt.Errorf("harness: container %d on %s: %w", n, h.Name, err)
	}
	c := &Container{Namespace: ns, Host: h, IP: ip, Veth: veth}
	if h.docker0v6.IsValid() {
		if c.IPv6, err = h.addContainerIPv6(ctx, ns, n); err != nil {
			return nil, err
		}
	}
	h.containers = append(h.containers, c)
	return c, nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= (1 << (32 - p.Bits())) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Containers are the host's containers in the order they were added.
func (h *Host) Containers() []*Container {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*Container(nil), h.containers...)
}

// XnetdArgs are the per-host flags StartXnetd passes before the caller's extra ones.
func (h *Host) XnetdArgs() []string {
	args := []string{
		"--iface", "eth0",
		"--subnet-file", h.SubnetFile(),
		"--docker-opts-file", h.DockerOptsFile(),
		"--bpffs", h.BPFFS,
		"--metrics-addr", "127.0.0.1:0",
	}
	if h.topo.etcd != nil {
		args = append(args, "--etcd-endpoints", h.topo.EtcdEndpoint())
	}
	return args
}

// StartXnetd runs the xnetd binary in the host's namespace with XnetdArgs plus extra. XNETD_*
// variables of the calling environment are not passed on, so a developer's shell cannot change
// what a test runs.
func (h *Host) StartXnetd(binary string, extra ...string) (*Process, error) {
	return h.StartXnetdUnder(nil, binary, extra...)
}

// StartXnetdUnder is StartXnetd with m playing systemd (see ServiceManager): NOTIFY_SOCKET is
// m's, and the fds m stores are passed as systemd passes them to a restarted service. A nil m
// is StartXnetd.
func (h *Host) StartXnetdUnder(m *ServiceManager, binary string, extra ...string) (*Process, error) {
	cmd := h.command(binary, append(h.XnetdArgs(), extra...)...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "XNETD_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if m != nil {
		if err := m.Prepare(cmd); err != nil {
			return nil, err
		}
	}
	return h.startCmd(cmd)
}

// waitOperUp waits until link name in ns has operstate UP.
func waitOperUp(ctx context.Context, ns *Namespace, name string) error {
	for {
		var state netlink.LinkOperState
		err := ns.Do(func() error {
			l, err := netlink.LinkByName(name)
			if err == nil {
				state = l.Attrs().OperState
			}
			return err
		})
		if err == nil && state == netlink.OperUp {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never reached operstate up (last %s, %v): %w", name, state, err, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
