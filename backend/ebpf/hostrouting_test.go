package ebpf

import (
	"net/netip"
	"regexp"
	"strconv"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/backend/conformance"
	"github.com/xnet-dev/xnet/test/harness"
)

// TestKernelHostRoutingForwardsLargeTCPSegmentsIntoContainersWhole: with --host-routing=kernel
// a TCP stream between containers on two hosts crosses the receiving host's FORWARD chain, and
// still arrives in the container as GSO packets well above the MTU. Before deliver_bridge the
// decapsulated packets, which keep their tunnel GSO state after crossing a veth underlay, were
// cut into MTU-sized segments by docker0's transmit (a bridge has no features for encapsulated
// packets): the container received 1400-byte packets and the stack path ran at a third of
// kernel VXLAN.
func TestKernelHostRoutingForwardsLargeTCPSegmentsIntoContainersWhole(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	pair := newPeeredPair(t, topo, func(h *harness.Host) *Backend { return newKernelRouted(t, h) })
	forwarded := countForwarded(t, topo.Hosts()[1], pair.containers[1].IP)
	// A first exchange lets the receiving container be learned (it answers the handshake).
	tcpTransfer(t, pair.containers[0], pair.containers[1], 64<<10)
	rxBefore := eth0RxPackets(t, pair.containers[1])
	sent := tcpTransfer(t, pair.containers[0], pair.containers[1], 8<<20)
	rx := eth0RxPackets(t, pair.containers[1]) - rxBefore

	st, err := pair.backends[1].Status()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d bytes in %d packets into the container (%d bytes each on average); FORWARD saw %d packets; verdicts %v",
		sent, rx, sent/max(int(rx), 1), forwarded(), st.Verdicts)
	if st.HostRouting != HostRoutingKernel {
		t.Fatalf("host routing %q, want kernel", st.HostRouting)
	}
	if forwarded() == 0 {
		t.Errorf("the receiving host's FORWARD chain saw no packet: the stack path was skipped")
	}
	if st.Verdicts["bridge_to_veth"] == 0 {
		t.Errorf("bridge_to_veth counted nothing: the forwarded packets crossed the bridge")
	}
	// 8 MB in MTU-sized segments would be about 6,000 packets.
	if rx == 0 || uint64(sent)/rx <= 1500 {
		t.Errorf("the container received %d packets for %d bytes: want GSO packets above the MTU", rx, sent)
	}
}

// newKernelRouted builds the backend in h's namespace with --host-routing=kernel.
func newKernelRouted(t *testing.T, h *harness.Host) *Backend {
	t.Helper()
	iface, err := conformance.Underlay(h)
	if err != nil {
		t.Fatal(err)
	}
	opts := backend.Options{Iface: iface, Config: testConfig, Decap: DecapTC, BPFFS: h.BPFFS, Logger: harness.TestLogger(t),
		HostRouting: HostRoutingKernel}
	var b *Backend
	if err := h.Do(func() (err error) { b, err = NewBackend(opts); return err }); err != nil {
		t.Fatal(err)
	}
	return b
}

func eth0RxPackets(t *testing.T, c *harness.Container) uint64 {
	t.Helper()
	var n uint64
	if err := c.Do(func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		n = l.Attrs().Statistics.RxPackets
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// countForwarded adds a rule to h's FORWARD chain that accepts packets to dst, and returns a
// function that reads how many it matched: packets the host forwarded to dst.
func countForwarded(t *testing.T, h *harness.Host, dst netip.Addr) func() uint64 {
	t.Helper()
	if _, err := h.Run(t.Context(), "iptables", "-I", "FORWARD", "-d", dst.String(), "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	rule := regexp.MustCompile(`(?m)^\s*(\d+)\s+\d+\s+ACCEPT\s.*\s` + regexp.QuoteMeta(dst.String()) + `\s*$`)
	return func() uint64 {
		out, err := h.Run(t.Context(), "iptables", "-L", "FORWARD", "-v", "-n", "-x")
		if err != nil {
			t.Fatal(err)
		}
		m := rule.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no FORWARD rule accepting %v on %s:\n%s", dst, h.Name, out)
		}
		n, _ := strconv.ParseUint(m[1], 10, 64)
		return n
	}
}
