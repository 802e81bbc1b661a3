package subnetmgr

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

var testSubnetFile = SubnetFile{
	Network: netip.MustParsePrefix("10.244.0.0/16"),
	Subnet:  netip.MustParsePrefix("10.244.5.0/24"),
	MTU:     1450,
	IPMasq:  true,
}

func TestWriteSubnetFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "xnet", "subnet.env") // the dir is created
	if err := WriteSubnetFile(path, testSubnetFile); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := `XNET_NETWORK=10.244.0.0/16
XNET_SUBNET=10.244.5.1/24
XNET_MTU=1450
XNET_IPMASQ=true
FLANNEL_NETWORK=10.244.0.0/16
FLANNEL_SUBNET=10.244.5.1/24
FLANNEL_MTU=1450
FLANNEL_IPMASQ=true
`
	if string(got) != want {
		t.Errorf("subnet file:\n%s\nwant:\n%s", got, want)
	}
	back, err := ReadSubnetFile(path)
	if err != nil || back != testSubnetFile {
		t.Errorf("ReadSubnetFile = %+v, %v; want %+v", back, err, testSubnetFile)
	}
}

var dualSubnetFile = SubnetFile{
	Network:     testSubnetFile.Network,
	Subnet:      testSubnetFile.Subnet,
	IPv6Network: netip.MustParsePrefix("fd00::/56"),
	IPv6Subnet:  netip.MustParsePrefix("fd00:0:0:5::/64"),
	MTU:         1450,
	IPMasq:      true,
}

// A dual-stack host's files: flannel's IPv6 lines, and Docker told to give containers IPv6
// addresses from our IPv6 subnet.
func TestWriteSubnetFileDualStack(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "subnet.env")
	if err := WriteSubnetFile(path, dualSubnetFile); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := `XNET_NETWORK=10.244.0.0/16
XNET_SUBNET=10.244.5.1/24
XNET_IPV6_NETWORK=fd00::/56
XNET_IPV6_SUBNET=fd00:0:0:5::1/64
XNET_MTU=1450
XNET_IPMASQ=true
FLANNEL_NETWORK=10.244.0.0/16
FLANNEL_SUBNET=10.244.5.1/24
FLANNEL_IPV6_NETWORK=fd00::/56
FLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64
FLANNEL_MTU=1450
FLANNEL_IPMASQ=true
`
	if string(got) != want {
		t.Errorf("subnet file:\n%s\nwant:\n%s", got, want)
	}
	if back, err := ReadSubnetFile(path); err != nil || back != dualSubnetFile {
		t.Errorf("ReadSubnetFile = %+v, %v; want %+v", back, err, dualSubnetFile)
	}
	opts := filepath.Join(dir, "docker")
	if err := WriteDockerOpts(opts, dualSubnetFile); err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(opts)
	if want := "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=false --mtu=1450 --ipv6 --fixed-cidr-v6=fd00:0:0:5::/64\"\n"; string(got) != want {
		t.Errorf("docker options %q, want %q", got, want)
	}
}

func TestReadSubnetFile(t *testing.T) {
	for _, tc := range []struct {
		desc, content string
		want          SubnetFile
		err           string
	}{
		{"one written by flannel", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
			testSubnetFile, ""},
		{"a newer flannel's, with IPv6 lines and quotes", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPV6_NETWORK=fd00::/56\n" +
			"FLANNEL_SUBNET=\"10.244.5.1/24\"\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
			dualSubnetFile, ""},
		{"an IPv6 subnet without its network", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
			SubnetFile{}, "come together"},
		{"an IPv4 value as the IPv6 subnet", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_IPV6_SUBNET=10.1.0.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
			SubnetFile{}, "FLANNEL_IPV6_SUBNET"},
		{"XNET_ wins over FLANNEL_", "XNET_NETWORK=10.244.0.0/16\nXNET_SUBNET=10.244.5.1/24\nXNET_MTU=1450\nXNET_IPMASQ=true\n" +
			"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.2.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
			testSubnetFile, ""},
		{"comments and blank lines", "# written by hand\n\nXNET_NETWORK=10.244.0.0/16\nXNET_SUBNET=10.244.5.1/24\nXNET_MTU=1450\nXNET_IPMASQ=true\n",
			testSubnetFile, ""},
		{"missing subnet", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", SubnetFile{},
			"neither XNET_SUBNET nor FLANNEL_SUBNET"},
		{"bad MTU", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=big\nFLANNEL_IPMASQ=true\n", SubnetFile{},
			`FLANNEL_MTU="big"`},
		{"bad subnet", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", SubnetFile{},
			`FLANNEL_SUBNET="10.244.5.1"`},
		{"bad ipmasq", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes please\n", SubnetFile{},
			"FLANNEL_IPMASQ"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "subnet.env")
			if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ReadSubnetFile(path)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("ReadSubnetFile = %+v, %v; want an error saying %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("ReadSubnetFile = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
	if _, err := ReadSubnetFile(filepath.Join(t.TempDir(), "absent")); !os.IsNotExist(unwrapAll(err)) {
		t.Errorf("a missing file: %v, want a not-exist error", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok || u.Unwrap() == nil {
			return err
		}
		err = u.Unwrap()
	}
}

func TestWriteDockerOpts(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		ipMasq bool
		dns    string
		want   string
	}{
		// mk-docker-opts.sh: when flanneld masquerades, Docker must not do it a second time.
		{"xnetd masquerades, so Docker does not", true, "", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=false --mtu=1450"` + "\n"},
		{"xnetd does not masquerade, so Docker does", false, "", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450"` + "\n"},
		{"xnetd resolves Docker networks' names", false, "10.244.5.1", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450 --dns=10.244.5.1"` + "\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "docker")
			f := testSubnetFile
			f.IPMasq = tc.ipMasq
			if tc.dns != "" {
				f.DNS = netip.MustParseAddr(tc.dns)
			}
			if err := WriteDockerOpts(path, f); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(path)
			if string(got) != tc.want {
				t.Errorf("docker opts:\n%s\nwant:\n%s", got, tc.want)
			}
		})
	}
	if err := WriteDockerOpts(filepath.Join(t.TempDir(), "docker"), SubnetFile{}); err == nil {
		t.Error("an empty SubnetFile was written")
	}
}

// TestWriteIsAtomic: a reader racing the writer only ever sees a whole old or a whole new
// file, an already open file keeps its old content (a rename, not a rewrite in place), and no
// temporary file is left behind.
func TestWriteIsAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "subnet.env")
	files := []SubnetFile{testSubnetFile, {Network: netip.MustParsePrefix("10.0.0.0/8"),
		Subnet: netip.MustParsePrefix("10.123.45.0/24"), MTU: 8950, IPMasq: false}}
	if err := WriteSubnetFile(path, files[0]); err != nil {
		t.Fatal(err)
	}
	old, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	var stop atomic.Bool
	var torn atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for !stop.Load() {
			got, err := ReadSubnetFile(path)
			if err != nil || (got != files[0] && got != files[1]) {
				torn.Add(1)
			}
		}
	})
	for i := range 300 {
		if err := WriteSubnetFile(path, files[i%2]); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if n := torn.Load(); n > 0 {
		t.Errorf("a reader saw %d partial or missing files", n)
	}

	content := make([]byte, 4096)
	n, _ := old.ReadAt(content, 0)
	if !strings.Contains(string(content[:n]), "XNET_SUBNET=10.244.5.1/24") {
		t.Errorf("the file opened before the writes changed under the reader: %q", content[:n])
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if fmt.Sprint(names) != "[subnet.env]" {
		t.Errorf("files left in the directory: %v", names)
	}
}
