package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
)

// tcActRedirect is TC_ACT_REDIRECT, what the encap program returns for a packet it sent on.
const tcActRedirect = 7

// Probe answers "can the datapath run on this kernel" without changing the host: it loads the
// programs with private, unpinned maps, configures them for a made-up host and peer, and
// encapsulates one packet with BPF_PROG_TEST_RUN. The verifier's yes is not enough: a kernel
// can accept every program and still refuse the encapsulation at run time (the UDP-tunnel
// flags of bpf_skb_adjust_room, BPF_F_ADJ_ROOM_ENCAP_L2_ETH among them, need Linux 5.13), and
// then every container packet would be dropped. The error says what failed; callers wrap it
// as backend.ErrUnavailable.
func Probe() error {
	spec, err := bpf.LoadXnet()
	if err != nil {
		return fmt.Errorf("read the embedded datapath: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs struct {
		tcPrograms
		bpf.XnetMaps
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		if errors.Is(err, unix.EPERM) {
			// cilium/ebpf suggests raising MEMLOCK here, but on kernels >= 5.11 (memcg
			// accounting) EPERM means privileges, not memory.
			return fmt.Errorf("the kernel does not let xnetd load BPF (%v): it needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) and no seccomp filter on bpf()", err)
		}
		return fmt.Errorf("the kernel refuses the datapath programs: %w", err)
	}
	defer objs.EncapContainer.Close()
	defer objs.EncapHost.Close()
	defer objs.DecapTc.Close()
	defer objs.DeliverBridge.Close()
	defer objs.DecapTunnel.Close()
	defer objs.XnetMaps.Close()
	return probeEncap(objs.EncapContainer, maps.FromObjects(&objs.XnetMaps))
}

// The made-up host of the probe: documentation addresses, nothing that exists.
var (
	probeLocal  = netip.MustParseAddr("192.0.2.1")
	probePeer   = netip.MustParseAddr("192.0.2.2")
	probeSubnet = netip.MustParsePrefix("10.244.1.0/24")
	probeRemote = netip.MustParsePrefix("10.244.2.0/24")
	probeMAC    = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	probePeerM  = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
)

// probeEncap runs encap_container on one container packet to the made-up peer and checks the
// packet came out redirected, 50 bytes longer, as VXLAN to the peer's port.
func probeEncap(prog *ebpf.Program, m *maps.Maps) error {
	const port = 8472
	cfg := maps.Config{
		LocalIP: probeLocal, Subnet: probeSubnet, VNI: 1, Port: port,
		UnderlayIfindex: 1, UnderlayMTU: 1500, UnderlayMAC: probeMAC, VtepMAC: probeMAC,
	}
	if err := m.SetConfig(cfg); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	if err := m.PutRoute(maps.Route{Subnet: probeRemote, PublicIP: probePeer, VtepMAC: probePeerM}); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	// A cached next hop that never expires, so the run needs no FIB entry for the peer. Keyed
	// as the programs key an IPv4 peer: mapped into IPv6 (bpf/structs.h underlay_addr).
	hop := bpf.XnetNexthop{Ifindex: 1, Expires: 1 << 62}
	copy(hop.Dmac[:], probePeerM)
	copy(hop.Smac[:], probeMAC)
	if err := m.Nexthops.Put(probePeer.As16(), hop); err != nil {
		return fmt.Errorf("probe: cache a next hop: %w", err)
	}
	in := probeFrame(probeSubnet.Addr().Next().Next(), probeRemote.Addr().Next().Next())
	out := make([]byte, len(in)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		return fmt.Errorf("test run of the encap program: %w", err)
	}
	if ret != tcActRedirect {
		return fmt.Errorf("the encap program returned %d, not TC_ACT_REDIRECT, for a packet to a peer: this kernel cannot encapsulate in BPF (bpf_skb_adjust_room with the UDP-tunnel flags needs Linux 5.13 or later)", ret)
	}
	// Outer Ethernet (14) + IPv4 (20): the UDP destination port follows the source port.
	if len(out) < len(in)+50 || binary.BigEndian.Uint16(out[36:38]) != port || out[23] != unix.IPPROTO_UDP {
		return fmt.Errorf("the encap program redirected the probe packet without VXLAN headers (% x): this kernel's bpf_skb_adjust_room does not encapsulate as the datapath expects", out[:min(len(out), 64)])
	}
	return nil
}

// probeFrame is a small UDP packet from a container (src) to a remote container (dst), as it
// arrives at the container veth's TC ingress.
func probeFrame(src, dst netip.Addr) []byte {
	const payload = 32
	f := make([]byte, 14+20+8+payload)
	copy(f[0:6], probeMAC)
	copy(f[6:12], probePeerM)
	binary.BigEndian.PutUint16(f[12:14], unix.ETH_P_IP)
	ip := f[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(20+8+payload))
	ip[8] = 64
	ip[9] = unix.IPPROTO_UDP
	s, d := src.As4(), dst.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i : i+2]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:12], ^uint16(sum))
	udp := f[34:42]
	binary.BigEndian.PutUint16(udp[0:2], 40000)
	binary.BigEndian.PutUint16(udp[2:4], 5201)
	binary.BigEndian.PutUint16(udp[4:6], 8+payload)
	return f
}

// ProbeXDP says whether this kernel runs the XDP decap program (nil) or why not, without
// changing the host. XDP is optional: the TC programs decapsulate where it is missing.
func ProbeXDP() error {
	spec, err := bpf.LoadXnet()
	if err != nil {
		return fmt.Errorf("read the embedded datapath: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs bpf.XnetMaps
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return fmt.Errorf("load the datapath maps: %w", err)
	}
	defer objs.Close()
	prog, err := loadXDP(spec, &objs)
	if err != nil {
		return err
	}
	return prog.Close()
}
