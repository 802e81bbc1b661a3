package wireguard

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xnet-dev/xnet/subnetmgr"
)

// What another process (`xnetd status`) reads from the embedded device's status socket is
// what the device says: our public key and, per peer, its subnets, the last handshake and the
// bytes each way, which grow with traffic. The socket is 0600 and answers get only.
func TestStatusSocketServesTheEmbeddedDevice(t *testing.T) {
	cfg := testConfig(t, `{"Type":"wireguard"}`)
	nodes := startNodes(t, 2, cfg, DatapathEmbedded)
	a, b := nodes[0], nodes[1]
	if !reaches(t, a, b) {
		t.Fatalf("%s's container does not reach %s's", a.Name, b.Name)
	}
	sock := filepath.Join(a.StateDir, UAPISocket)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("status socket %s: %v %v, want a socket, mode 0600", sock, fi, err)
	}

	before, err := ReadStatus(DatapathEmbedded, a.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	_, aData, _ := a.b.LeaseAttrs()
	_, bData, _ := b.b.LeaseAttrs()
	aKey, _ := subnetmgr.ParseWireGuardData(aData)
	bKey, _ := subnetmgr.ParseWireGuardData(bData)
	if before.PublicKey != aKey.PublicKey || before.ListenPort != 51820 || before.Device != DeviceName || before.PSK {
		t.Errorf("status %+v: want our key %s, port 51820, no PSK", before, aKey.PublicKey)
	}
	if len(before.Peers) != 1 {
		t.Fatalf("status lists %d peers, want 1: %+v", len(before.Peers), before.Peers)
	}
	p := before.Peers[0]
	if p.PublicKey != bKey.PublicKey || len(p.Subnets) != 1 || p.Subnets[0] != b.lease.Subnet || p.Endpoint != fmt.Sprintf("%s:51820", b.UnderlayIP) {
		t.Errorf("peer %+v: want %s at %s:51820 with %v", p, bKey.PublicKey, b.UnderlayIP, b.lease.Subnet)
	}
	if p.LastHandshake.IsZero() || time.Since(p.LastHandshake) > time.Minute || p.RxBytes == 0 || p.TxBytes == 0 {
		t.Errorf("peer %+v: want a handshake within the last minute and bytes both ways", p)
	}

	if !reaches(t, a, b) {
		t.Fatalf("%s's container does not reach %s's", a.Name, b.Name)
	}
	after, err := ReadStatus(DatapathEmbedded, a.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if q := after.Peers[0]; q.RxBytes <= p.RxBytes || q.TxBytes <= p.TxBytes {
		t.Errorf("bytes after 5 more pings: rx %d -> %d, tx %d -> %d; want both to grow", p.RxBytes, q.RxBytes, p.TxBytes, q.TxBytes)
	}

	t.Run("a set through the socket is refused and changes nothing", func(t *testing.T) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(c, "set=1\nlisten_port=4242\n\n")
		answer, _ := bufio.NewReader(c).ReadString('\n')
		if strings.TrimSpace(answer) != "errno=1" {
			t.Errorf("answer to a set: %q, want errno=1", answer)
		}
		if st, err := ReadStatus(DatapathEmbedded, a.StateDir); err != nil || st.ListenPort != 51820 {
			t.Errorf("after a refused set: port %d (%v), want 51820", st.ListenPort, err)
		}
	})

	t.Run("closed, the backend removes the socket and status says why it cannot read", func(t *testing.T) {
		if err := a.b.Close(false); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("status socket after Close: %v, want gone", err)
		}
		if _, err := ReadStatus(DatapathEmbedded, a.StateDir); err == nil || !strings.Contains(err.Error(), "runs inside xnetd") {
			t.Errorf("ReadStatus without the daemon: %v, want an error saying the device runs inside xnetd", err)
		}
	})
}
