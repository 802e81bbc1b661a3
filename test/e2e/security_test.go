package e2e

// Security: etcd over TLS with client certificates, and what the underlay can throw at a
// host's VXLAN port (garbage, VXLAN from a host that holds no lease, a member claiming another
// member's containers). Helpers are prefixed sc.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
	"github.com/xnet-dev/xnet/test/harness"
	"github.com/xnet-dev/xnet/wire"
)

// scCA is a certificate authority made for one test.
type scCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM string // path of the CA certificate
}

func scNewCA(t *testing.T, dir, name string) *scCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &scCA{cert: cert, key: key, certPEM: filepath.Join(dir, name+".crt")}
	scWritePEM(t, ca.certPEM, "CERTIFICATE", der)
	return ca
}

// issue makes a certificate for name (server: with ips as SANs) and returns the paths of the
// certificate and its key.
func (ca *scCA) issue(t *testing.T, dir, name string, server bool, ips ...netip.Addr) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		for _, ip := range ips {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	scWritePEM(t, certFile, "CERTIFICATE", der)
	scWritePEM(t, keyFile, "EC PRIVATE KEY", keyDER)
	return certFile, keyFile
}

func scWritePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// scRelay accepts TCP connections inside ns at listen and relays each to target, dialled
// from the root namespace: how hosts reach an etcd the test started on loopback. TLS passes
// through untouched.
func scRelay(t *testing.T, ns *harness.Namespace, listen netip.AddrPort, target string) {
	t.Helper()
	var l net.Listener
	if err := ns.Do(func() (err error) { l, err = net.Listen("tcp4", listen.String()); return err }); err != nil {
		t.Fatalf("relay listener %v in %s: %v", listen, ns.Name, err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			conns[c] = true
		} else {
			delete(conns, c)
		}
	}
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				up, err := net.DialTimeout("tcp", target, 5*time.Second)
				if err != nil {
					return
				}
				defer up.Close()
				track(c, true)
				track(up, true)
				defer track(c, false)
				defer track(up, false)
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
				go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
				<-done
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// xnetd talks to an etcd that requires TLS client certificates: with the right CA and a
// client certificate two hosts take leases and their containers reach each other; with a
// CA that did not sign etcd's certificate, or no client certificate, xnetd says what is wrong
// in its log, takes no lease and touches nothing.
func TestSecurityEtcdOverTLSWithClientCertificates(t *testing.T) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 2})
	dir := t.TempDir()
	ca := scNewCA(t, dir, "xnet-test-ca")
	other := scNewCA(t, dir, "someone-elses-ca")
	serverCert, serverKey := ca.issue(t, dir, "etcd", true, harness.UnderlayGateway, netip.MustParseAddr("127.0.0.1"))
	clientCert, clientKey := ca.issue(t, dir, "xnetd", false)

	etcd := etcdtest.StartWith(t, etcdtest.Options{TLS: transport.TLSInfo{
		CertFile: serverCert, KeyFile: serverKey, TrustedCAFile: ca.certPEM, ClientCertAuth: true}})
	loopback := strings.TrimPrefix(etcd.Endpoint(), "https://")
	relay := netip.AddrPortFrom(harness.UnderlayGateway, 2390)
	scRelay(t, topo.Underlay(), relay, loopback)
	endpoint := "https://" + relay.String()

	tlsCfg, err := transport.TLSInfo{CertFile: clientCert, KeyFile: clientKey, TrustedCAFile: ca.certPEM}.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint()}, TLS: tlsCfg, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := cli.Put(ctx, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`); err != nil {
		t.Fatalf("put config over TLS: %v", err)
	}
	leases := func() int {
		r, err := cli.Get(ctx, subnetmgr.SubnetsPrefix(xnetdtest.EtcdPrefix), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return int(r.Count)
	}

	bin := harness.BuildXnetd(t)
	t.Run("the right CA and a client certificate: leases and connected containers", func(t *testing.T) {
		var nodes []*xnetdtest.Node
		for _, h := range topo.Hosts() {
			n := &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--etcd-endpoints", endpoint,
				"--etcd-cafile", ca.certPEM, "--etcd-certfile", clientCert, "--etcd-keyfile", clientKey}}
			n.StartDaemon(t)
			n.WaitReady(t)
			nodes = append(nodes, n)
		}
		for _, n := range nodes {
			n.WaitPeers(t, 1)
		}
		if got := leases(); got != 2 {
			t.Errorf("%d leases in etcd, want 2", got)
		}
		if failed := xnetdtest.Mesh(xnetdtest.Containers(t, nodes)); len(failed) > 0 {
			t.Errorf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
		}
	})

	for _, tt := range []struct {
		name string
		args []string
		want []string // in one Error line of xnetd's log, all of them
	}{
		{"a CA that did not sign etcd's certificate", []string{"--etcd-cafile", other.certPEM,
			"--etcd-certfile", clientCert, "--etcd-keyfile", clientKey},
			[]string{"etcd " + endpoint + ": TLS handshake failed", "certificate signed by unknown authority", "check --etcd-cafile"}},
		{"no client certificate", []string{"--etcd-cafile", ca.certPEM},
			[]string{"etcd " + endpoint + ": TLS handshake failed",
				"the server asked for a client certificate: set --etcd-certfile and --etcd-keyfile"}},
	} {
		t.Run(tt.name+" fails with a clear error", func(t *testing.T) {
			before := leases()
			h := topo.Hosts()[0]
			d := t.TempDir()
			// Own files and pins: the daemon of the subtest above still runs on this host.
			args := append([]string{"--etcd-endpoints", endpoint, "--subnet-file", filepath.Join(d, "subnet.env"),
				"--docker-opts-file", filepath.Join(d, "docker"), "--bpffs", filepath.Join(d, "bpffs")}, tt.args...)
			p, err := h.StartXnetd(bin, args...)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Kill()
			// Said at once at start (a probe of the endpoint), then at every retry of the
			// config read (each after a 10 s request timeout): wait for the first retry line.
			errorLines := func(msg string) (lines []string) {
				for _, line := range strings.Split(p.Output(), "\n") {
					all := strings.Contains(line, "level=ERROR") && strings.Contains(line, msg)
					for _, w := range tt.want {
						all = all && strings.Contains(line, w)
					}
					if all {
						lines = append(lines, line)
					}
				}
				return lines
			}
			const atStart, atRetry = "etcd TLS handshake failed", "cannot read network config from etcd, retrying"
			deadline := time.Now().Add(20 * time.Second)
			for len(errorLines(atRetry)) == 0 && time.Now().Before(deadline) && !p.Exited() {
				time.Sleep(100 * time.Millisecond)
			}
			for _, msg := range []string{atStart, atRetry} {
				if lines := errorLines(msg); len(lines) == 0 {
					t.Errorf("xnetd logged no Error line %q saying %q within 20 s (exited %v):\n%s", msg, tt.want, p.Exited(), p.Output())
				} else {
					t.Logf("xnetd says: %s", lines[0])
				}
			}
			// A configuration error, but retried: a certificate being fixed heals without a restart.
			if p.Exited() {
				t.Errorf("xnetd exited instead of retrying:\n%s", p.Output())
			}
			if got := leases(); got != before {
				t.Errorf("%d leases in etcd, want still %d", got, before)
			}
			for _, f := range []string{"subnet.env", "docker"} {
				if _, err := os.Stat(filepath.Join(d, f)); err == nil {
					t.Errorf("%s written without a working etcd connection", f)
				}
			}
		})
	}
}

// scInjection is one kind of packet the underlay sends to a host's VXLAN port.
type scInjection struct {
	name string
	from *harness.Host
	// payloads are the UDP payloads sent to the victim's port 8472.
	payloads [][]byte
	// counted is the verdict each payload is counted under, by backend; "" for a backend whose
	// counters do not apply.
	counted map[string]string
	// kernelDelivers: the kernel's VXLAN device does not check the outer source against the
	// leases (flannel neither), so it hands these to the container. A known difference.
	kernelDelivers bool
	// knownBug, by backend, skips the counting check of a case a reported bug breaks.
	knownBug map[string]string
}

// Spoofed and malformed VXLAN from the underlay is dropped and counted by every backend that
// decapsulates in xnet (ebpf, udp), and the victim's container sees none of it. The kernel's
// VXLAN device (backend vxlan, and flannel) does not check who sent a packet: there the
// container does receive VXLAN from a host that holds no lease, or a member speaking for
// another member's containers. That difference is documented here, not asserted away.
func TestSecuritySpoofedAndMalformedVXLANIsDroppedAndCounted(t *testing.T) {
	for _, b := range []string{subnetmgr.BackendEBPF, subnetmgr.BackendUDP, subnetmgr.BackendVXLAN} {
		t.Run(b, func(t *testing.T) { scSpoofing(t, b) })
	}
}

func scSpoofing(t *testing.T, backendName string) {
	topo := harness.NewForTest(t, harness.Options{Hosts: 3, WithEtcd: true})
	xnetdtest.Put(t, topo, subnetmgr.ConfigKey(xnetdtest.EtcdPrefix), `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	bin := harness.BuildXnetd(t)
	hosts := topo.Hosts()
	attacker := hosts[2] // on the underlay, holds no lease
	var nodes []*xnetdtest.Node
	for _, h := range hosts[:2] {
		n := &xnetdtest.Node{Host: h, Bin: bin, Extra: []string{"--backend=" + backendName}}
		n.StartDaemon(t)
		n.WaitReady(t)
		nodes = append(nodes, n)
	}
	// A third member that exists only in etcd: h2 will speak for its containers.
	other := rlFreeSubnets(t, topo, 2)
	rlPutPeer(t, topo.EtcdClient(), other[0], rlSimIP(40), time.Hour)
	for _, n := range nodes {
		n.WaitPeers(t, 2)
	}
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("no connectivity to start from:\n%s", strings.Join(failed, "\n"))
	}
	victim, legit := nodes[0], nodes[1]
	target := cs[0]

	var sink *net.UDPConn
	if err := target.Do(func() (err error) {
		sink, err = net.ListenUDP("udp4", &net.UDPAddr{IP: target.IP.AsSlice(), Port: 7777})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var mu sync.Mutex
	var delivered []string
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := sink.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			mu.Lock()
			delivered = append(delivered, from.Addr().String()+": "+string(buf[:min(n, 40)]))
			mu.Unlock()
		}
	}()

	// The victim's VTEP MAC as its lease publishes it.
	var data subnetmgr.VXLANData
	attrs := xnetdtest.Leases(t, topo, xnetdtest.EtcdPrefix)[victim.State(t).Lease.Subnet]
	if err := json.Unmarshal(attrs.BackendData, &data); err != nil {
		t.Fatal(err)
	}
	hw, err := net.ParseMAC(data.VtepMAC)
	if err != nil {
		t.Fatal(err)
	}
	vtep, _ := wire.MACFrom(hw)
	// The inner source MAC is the sender's VTEP MAC (the kernel's VXLAN device drops frames
	// that carry its own MAC as source).
	frame := func(from *harness.Host, vni uint32, src netip.Addr, tag string) []byte {
		inner := udpInnerPacket(src, target.IP, 7777, 64)
		copy(inner[28:], tag)
		srcMAC, _ := wire.MACFrom(backend.VtepMAC(from.UnderlayIP))
		b := make([]byte, wire.HeaderLen, wire.HeaderLen+len(inner))
		wire.Encode(b, wire.Header{VNI: vni, Dst: vtep, Src: srcMAC})
		return append(b, inner...)
	}
	var garbage [][]byte
	for i := range 20 {
		g := make([]byte, 1+i*70)
		rand.Read(g)
		g[0] = 0x55 // not the VXLAN flags byte: garbage, not a VXLAN frame that happens to be bad
		garbage = append(garbage, g)
	}
	memberSrc := legit.State(t).Lease.Subnet.Addr().Next().Next() // h2's first container
	otherMemberSrc := other[0].Addr().Next().Next()
	noLeaseSrc := other[1].Addr().Next().Next()
	cases := []scInjection{
		{name: "random bytes from a host with no lease", from: attacker, payloads: garbage,
			counted: map[string]string{"ebpf": "pass", "udp": "not_vxlan"}},
		{name: "VXLAN with another VNI", from: attacker, payloads: [][]byte{frame(attacker, 42, memberSrc, "vni42")},
			counted: map[string]string{"ebpf": "pass", "udp": "wrong_vni"}},
		{name: "VXLAN whose inner IPv4 header is cut short", from: legit.Host,
			payloads: [][]byte{frame(legit.Host, 1, memberSrc, "cut")[:wire.HeaderLen+12]},
			counted:  map[string]string{"ebpf": "malformed", "udp": "malformed"}},
		{name: "VXLAN whose inner IPv4 packet is shorter than its header says", from: legit.Host,
			payloads: [][]byte{frame(legit.Host, 1, memberSrc, "trunc")[:wire.HeaderLen+30]},
			counted:  map[string]string{"ebpf": "malformed", "udp": "malformed"}},
		{name: "valid VXLAN from a host with no lease, inner source a member's container", from: attacker,
			payloads: [][]byte{frame(attacker, 1, memberSrc, "nonmember-spoof")},
			counted:  map[string]string{"ebpf": "spoofed", "udp": "spoofed"}, kernelDelivers: true},
		{name: "valid VXLAN from a host with no lease, inner source in no lease", from: attacker,
			payloads: [][]byte{frame(attacker, 1, noLeaseSrc, "nonmember-nolease")},
			counted:  map[string]string{"ebpf": "unknown_source", "udp": "unknown_source"}, kernelDelivers: true},
		{name: "a member claiming another member's inner source", from: legit.Host,
			payloads: [][]byte{frame(legit.Host, 1, otherMemberSrc, "member-spoof")},
			counted:  map[string]string{"ebpf": "spoofed", "udp": "spoofed"}, kernelDelivers: true},
	}

	count := func(c xnetdtest.Counters, name string) uint64 { return c.Verdicts[name] + c.Drops[name] }
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mu.Lock()
			delivered = nil
			mu.Unlock()
			var before xnetdtest.Counters
			verdict := c.counted[backendName]
			if verdict != "" {
				before = victim.StatusCounters(t)
			}
			for _, p := range c.payloads {
				udpSendRaw(t, c.from, victim.UnderlayIP, p)
			}
			time.Sleep(300 * time.Millisecond)
			mu.Lock()
			got := append([]string(nil), delivered...)
			mu.Unlock()
			switch {
			case backendName == subnetmgr.BackendVXLAN && c.kernelDelivers:
				t.Logf("kernel VXLAN does not check the outer source: the container received %d of %d (known difference)", len(got), len(c.payloads))
			case len(got) > 0:
				t.Errorf("the container received %v", got)
			}
			if verdict == "" {
				return
			}
			if bug := c.knownBug[backendName]; bug != "" {
				rlKnownBug(t, bug)
			}
			// The udp backend counts once per receive batch: give it a moment.
			deadline := time.Now().Add(3 * time.Second)
			for {
				after := victim.StatusCounters(t)
				n := count(after, verdict) - count(before, verdict)
				if n >= uint64(len(c.payloads)) {
					t.Logf("%d sent, counted %d under %q, none delivered", len(c.payloads), n, verdict)
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("%d sent, %d counted under %q (verdicts %v, drops %v)", len(c.payloads), n, verdict, after.Verdicts, after.Drops)
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
	// The same frame from the member that owns the inner source is delivered: the drops above
	// were for the reasons named, not because injection does not reach the container.
	udpSendRaw(t, legit.Host, victim.UnderlayIP, frame(legit.Host, 1, memberSrc, "genuine"))
	deadline := time.Now().Add(2 * time.Second)
	for {
		mu.Lock()
		ok := len(delivered) > 0
		mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("a well-formed frame from the member owning its inner source was not delivered")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
}
