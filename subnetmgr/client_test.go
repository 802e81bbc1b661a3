package subnetmgr

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/xnet-dev/xnet/subnetmgr/etcdtest"
)

const testConfigJSON = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`

// TestClientOptions: several endpoints (the first one dead), username/password, and TLS with
// client certificates all reach etcd; wrong credentials are refused.
func TestClientOptions(t *testing.T) {
	t.Run("several endpoints, one dead", func(t *testing.T) {
		srv := etcdtest.Start(t)
		ctx := ctxFor(t, 20*time.Second)
		prefix := testPrefix(t)
		if _, err := srv.Client().Put(ctx, ConfigKey(prefix), testConfigJSON); err != nil {
			t.Fatal(err)
		}
		m, err := New(Options{Endpoints: []string{"http://127.0.0.1:1", srv.Endpoint()}, Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if _, err := m.WaitConfig(ctx); err != nil {
			t.Errorf("WaitConfig through the live endpoint: %v", err)
		}
	})

	t.Run("username and password", func(t *testing.T) {
		srv := etcdtest.Start(t)
		ctx := ctxFor(t, 20*time.Second)
		prefix := testPrefix(t)
		c := srv.Client()
		if _, err := c.Put(ctx, ConfigKey(prefix), testConfigJSON); err != nil {
			t.Fatal(err)
		}
		if _, err := c.UserAdd(ctx, "root", "rootpw"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.UserGrantRole(ctx, "root", "root"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.AuthEnable(ctx); err != nil {
			t.Fatal(err)
		}
		good, err := New(Options{Endpoints: []string{srv.Endpoint()}, Prefix: prefix, Username: "root", Password: "rootpw"})
		if err != nil {
			t.Fatal(err)
		}
		defer good.Close()
		if _, err := good.GetConfig(ctx); err != nil {
			t.Errorf("GetConfig with the right password: %v", err)
		}
		bad, err := New(Options{Endpoints: []string{srv.Endpoint()}, Prefix: prefix, Username: "root", Password: "wrong"})
		if err == nil {
			defer bad.Close()
			if _, err := bad.GetConfig(ctx); err == nil {
				t.Error("GetConfig with a wrong password succeeded")
			}
		}
	})

	t.Run("TLS with a client certificate", func(t *testing.T) {
		dir := t.TempDir()
		ca, caKey := writeCA(t, dir)
		serverCert, serverKey := writeCert(t, dir, "server", ca, caKey)
		clientCert, clientKey := writeCert(t, dir, "client", ca, caKey)
		caFile := filepath.Join(dir, "ca.pem")
		srv := etcdtest.StartWith(t, etcdtest.Options{TLS: transport.TLSInfo{
			CertFile: serverCert, KeyFile: serverKey, TrustedCAFile: caFile, ClientCertAuth: true}})
		ctx := ctxFor(t, 20*time.Second)
		prefix := testPrefix(t)
		if !strings.HasPrefix(srv.Endpoint(), "https://") {
			t.Fatalf("endpoint %s is not https", srv.Endpoint())
		}
		m, err := New(Options{Endpoints: []string{srv.Endpoint()}, Prefix: prefix,
			CertFile: clientCert, KeyFile: clientKey, CAFile: caFile})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if _, err := m.GetConfig(ctx); err == nil || !strings.Contains(err.Error(), ErrNoConfig.Error()) {
			t.Errorf("GetConfig over TLS: %v, want the config not found (the request went through)", err)
		}
		if _, err := New(Options{Endpoints: []string{srv.Endpoint()}, CertFile: clientCert}); err == nil ||
			!strings.Contains(err.Error(), "must be given together") {
			t.Errorf("a certificate without its key: %v", err)
		}
		if _, err := New(Options{Endpoints: []string{srv.Endpoint()}, CAFile: filepath.Join(dir, "absent.pem")}); err == nil {
			t.Error("a missing CA file was accepted")
		}
	})
}

func writeCA(t *testing.T, dir string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "xnet test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", der)
	ca, _ := x509.ParseCertificate(der)
	return ca, key
}

func writeCert(t *testing.T, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
