package hostgw

// Test scaffolding: two "hosts" as network namespaces joined by a veth pair (eth0 on both
// sides, 198.18.0.11/24 and 198.18.0.12/24). The end-to-end tests in test/e2e use the shared
// harness; these unit tests stay self-contained and fast.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
)

type testHost struct {
	ns    string // /run/netns/<ns>
	nl    *netlink.Handle
	iface backend.ExternalInterface
}

func runID(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// sh runs a command inside host's namespace (nsenter, not `ip netns exec`, see common rules).
func (h *testHost) sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := h.try(args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (h *testHost) try(args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + h.ns, "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
}

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// newHosts makes n host namespaces on one underlay: host i has eth0 with 198.18.0.(11+i)/24.
// Two hosts are joined by a veth pair; more hosts hang off a bridge in an extra namespace.
func newHosts(t *testing.T, n int) []*testHost {
	t.Helper()
	requireRoot(t)
	id := runID(t)
	var hosts []*testHost
	var names []string
	for i := range n {
		names = append(names, "xhg"+id+string(rune('a'+i)))
	}
	names = append(names, "xhg"+id+"u")
	for _, name := range names {
		ipCmd(t, "netns", "add", name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
		ipCmd(t, "-n", name, "link", "set", "lo", "up")
	}
	under := names[n]
	ipCmd(t, "-n", under, "link", "add", "br0", "type", "bridge")
	ipCmd(t, "-n", under, "link", "set", "br0", "up")
	for i := range n {
		port := "p" + string(rune('a'+i))
		ipCmd(t, "-n", names[i], "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", under)
		ipCmd(t, "-n", under, "link", "set", port, "master", "br0", "up")
		ip := netip.AddrFrom4([4]byte{198, 18, 0, byte(11 + i)})
		ipCmd(t, "-n", names[i], "addr", "add", ip.String()+"/24", "dev", "eth0")
		ipCmd(t, "-n", names[i], "link", "set", "eth0", "up")

		nsh, err := netns.GetFromName(names[i])
		if err != nil {
			t.Fatal(err)
		}
		h, err := netlink.NewHandleAt(nsh)
		nsh.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close)
		link, err := h.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, &testHost{ns: names[i], nl: h, iface: backend.ExternalInterface{
			Name: "eth0", Index: link.Attrs().Index, MTU: link.Attrs().MTU,
			MAC: link.Attrs().HardwareAddr, PublicIP: ip, IfaceIP: ip,
		}})
	}
	return hosts
}

// inNS runs fn on an OS thread switched into namespace ns. Sockets opened in fn stay in ns.
func inNS(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			// Only a thread back in its own namespace may serve other goroutines; otherwise
			// it stays locked and exits with this goroutine.
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// udpReach sends a datagram from namespace `from` to dst (a UDP echo listener in namespace
// `to`) and waits for the echo: one round trip proves both directions. Because the test
// machine has no ping binary, this is our ping.
func udpReach(from *testHost, src netip.Addr, to *testHost, dst netip.Addr) error {
	var srv *net.UDPConn
	if err := inNS(to.ns, func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IP(dst.AsSlice())})
		return err
	}); err != nil {
		return fmt.Errorf("listen on %v in %s: %w", dst, to.ns, err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			n, addr, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteToUDP(buf[:n], addr)
		}
	}()
	var c *net.UDPConn
	if err := inNS(from.ns, func() (err error) {
		c, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.IP(src.AsSlice())}, srv.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		return fmt.Errorf("dial %v from %s: %w", srv.LocalAddr(), from.ns, err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range 3 {
		if _, err := c.Write([]byte("xnet")); err != nil {
			continue // e.g. "network unreachable" without a route
		}
		_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "xnet" {
			return nil
		}
	}
	return errors.New("no echo from " + srv.LocalAddr().String())
}
