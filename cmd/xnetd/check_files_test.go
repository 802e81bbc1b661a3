package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xnet-dev/xnet/subnetmgr"
	"github.com/xnet-dev/xnet/test/harness"
)

var (
	filesNetwork  = netip.MustParsePrefix("10.244.0.0/16")
	filesSubnet   = netip.MustParsePrefix("10.244.5.0/24")
	filesNetwork6 = netip.MustParsePrefix("fd00:10:244::/56")
	filesSubnet6  = netip.MustParsePrefix("fd00:10:244:5::/64")
)

func writeOpts(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "docker")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// The parser reads the options as Docker gets them through the drop-in: the value of
// DOCKER_NETWORK_OPTIONS, unquoted as systemd's EnvironmentFile= does, split at whitespace.
func TestReadDockerOptsAsDockerGetsThem(t *testing.T) {
	bip, mtu := netip.MustParsePrefix("10.244.5.1/24"), 1450
	for _, tt := range []struct {
		desc, file string
		want       dockerOpts
	}{
		{"what xnetd writes in an IPv4 overlay", "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450\"\n",
			dockerOpts{bip: bip, mtu: mtu}},
		{"what xnetd writes in a dual-stack overlay", "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=false --mtu=1450 --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64\"\n",
			dockerOpts{bip: bip, mtu: mtu, ipv6: true, fixedCIDRv6: filesSubnet6}},
		{"what xnetd writes in an IPv6-only overlay", "DOCKER_NETWORK_OPTIONS=\" --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430\"\n",
			dockerOpts{mtu: 1430, ipv6: true, fixedCIDRv6: filesSubnet6}},
		{"single quotes", "DOCKER_NETWORK_OPTIONS='--bip=10.244.5.1/24  --mtu=1450'", dockerOpts{bip: bip, mtu: mtu}},
		{"no quotes, spaces around =", "DOCKER_NETWORK_OPTIONS = --bip=10.244.5.1/24 --mtu=1450", dockerOpts{bip: bip, mtu: mtu}},
		{"a quoted value inside the options", `DOCKER_NETWORK_OPTIONS=--bip="10.244.5.1/24" --mtu='1450'`, dockerOpts{bip: bip, mtu: mtu}},
		{"values as separate arguments", `DOCKER_NETWORK_OPTIONS="--bip 10.244.5.1/24 --mtu 1450 --ipv6=false"`, dockerOpts{bip: bip, mtu: mtu}},
		{"flannel's file: other variables and comments do not reach Docker",
			"# written by flannel\nDOCKER_OPT_BIP=\"--bip=10.244.9.1/24\"\n; DOCKER_NETWORK_OPTIONS=\"--mtu=1\"\nDOCKER_OPT_MTU=\"--mtu=1400\"\nDOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450\"\n",
			dockerOpts{bip: bip, mtu: mtu}},
		{"the last assignment wins, as in systemd", "DOCKER_NETWORK_OPTIONS=\"--mtu=1400\"\nDOCKER_NETWORK_OPTIONS=\"--bip=10.244.5.1/24 --mtu=1450\"\n",
			dockerOpts{bip: bip, mtu: mtu}},
		{"options outside DOCKER_NETWORK_OPTIONS do not count", "--bip=10.244.5.1/24 --mtu=1450\n", dockerOpts{}},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			got, err := readDockerOpts(writeOpts(t, tt.file))
			got.text = ""
			if err != nil || got != tt.want {
				t.Errorf("readDockerOpts(%q) = %+v, %v; want %+v", tt.file, got, err, tt.want)
			}
		})
	}
}

func TestReadDockerOptsRejectsValuesDockerWouldReject(t *testing.T) {
	for _, tt := range []struct {
		desc, file, says string
	}{
		{"a --bip prefix longer than 32 bits", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/33 --mtu=1450"`, "--bip=10.244.5.1/33"},
		{"a --bip without a length", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1 --mtu=1450"`, "--bip=10.244.5.1"},
		{"a --fixed-cidr-v6 that is not a prefix", `DOCKER_NETWORK_OPTIONS=" --ipv6 --fixed-cidr-v6=fd00:10:244:5::/129 --mtu=1430"`, "--fixed-cidr-v6=fd00:10:244:5::/129"},
		{"an --mtu that is not a number", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --mtu=big"`, "--mtu=big"},
		{"an --ipv6 that is not a boolean", `DOCKER_NETWORK_OPTIONS=" --ipv6=maybe --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430"`, "--ipv6=maybe"},
		{"an unterminated quote", `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --mtu=1450`, "unterminated"},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			if o, err := readDockerOpts(writeOpts(t, tt.file)); err == nil || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("readDockerOpts(%q) = %+v, %v; want an error naming %q", tt.file, o, err, tt.says)
			}
		})
	}
	if _, err := readDockerOpts(filepath.Join(t.TempDir(), "missing")); !os.IsNotExist(err) {
		t.Errorf("a missing file: %v, want not-exist", err)
	}
}

// Each kind of overlay needs its own options: IPv4 --bip and --mtu, dual stack those and
// --ipv6 --fixed-cidr-v6, IPv6 only --ipv6 --fixed-cidr-v6 and --mtu without --bip.
func TestDockerOptsEachFamilyNeeds(t *testing.T) {
	ipv4 := filesWant{network: filesNetwork, subnet: filesSubnet}
	dual := filesWant{network: filesNetwork, subnet: filesSubnet, network6: filesNetwork6, subnet6: filesSubnet6}
	ipv6Only := filesWant{network6: filesNetwork6, subnet6: filesSubnet6}
	const (
		v4File   = `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450"`
		dualFile = `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=true --mtu=1450 --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64"`
		v6File   = `DOCKER_NETWORK_OPTIONS=" --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430"`
	)
	for _, tt := range []struct {
		desc string
		want filesWant
		file string
		says string // "" for none missing
	}{
		{"IPv4: what xnetd writes", ipv4, v4File, ""},
		{"IPv4: a dual-stack file has what it needs", ipv4, dualFile, ""},
		{"IPv4: no --mtu", ipv4, `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ip-masq=true"`, `no --bip and --mtu in "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24 --ip-masq=true\""`},
		{"IPv4: no --bip", ipv4, `DOCKER_NETWORK_OPTIONS=" --ip-masq=true --mtu=1450"`, "no --bip and --mtu in"},
		{"dual stack: what xnetd writes", dual, dualFile, ""},
		{"dual stack: an IPv4 file", dual, v4File, "no --fixed-cidr-v6 in"},
		{"dual stack: --fixed-cidr-v6 without --ipv6", dual, strings.Replace(dualFile, "--ipv6 ", "", 1), "--fixed-cidr-v6 without --ipv6"},
		{"dual stack: no --mtu", dual, strings.Replace(dualFile, "--mtu=1450 ", "", 1), "no --bip and --mtu in"},
		{"IPv6 only: what xnetd writes", ipv6Only, v6File, ""},
		{"IPv6 only: --bip, a file of an IPv4 run", ipv6Only, dualFile, "--bip=10.244.5.1/24 gives Docker an IPv4 bridge address in an IPv6-only overlay"},
		{"IPv6 only: no --mtu", ipv6Only, `DOCKER_NETWORK_OPTIONS=" --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64"`, "no --fixed-cidr-v6 and --mtu in"},
		{"IPv6 only: --fixed-cidr-v6 without --ipv6", ipv6Only, strings.Replace(v6File, "--ipv6 ", "", 1), "--fixed-cidr-v6 without --ipv6"},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			o, err := readDockerOpts(writeOpts(t, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			err = tt.want.dockerOptsMissing(o)
			switch {
			case tt.says == "" && err != nil:
				t.Errorf("%q: %v, want nothing missing", tt.file, err)
			case tt.says != "" && (err == nil || !strings.Contains(err.Error(), tt.says)):
				t.Errorf("%q: %v, want %q", tt.file, err, tt.says)
			}
		})
	}
}

// The files check in each kind of overlay, against the files the daemon writes and docker0 in
// a host namespace: the verdict and the words of each problem.
func TestCheckFilesInEachKindOfOverlay(t *testing.T) {
	h := harness.NewForTest(t, harness.Options{Hosts: 1}).Hosts()[0]
	// docker0 as Docker makes it from a dual-stack file for our leases.
	if err := h.SetupDocker0(subnetmgr.GatewayOf(filesSubnet), 1450); err != nil {
		t.Fatal(err)
	}
	if err := h.SetupDocker0IPv6(subnetmgr.GatewayOf(filesSubnet6)); err != nil {
		t.Fatal(err)
	}
	otherSubnet, otherSubnet6 := netip.MustParsePrefix("10.244.6.0/24"), netip.MustParsePrefix("fd00:10:244:6::/64")
	type overlay struct {
		name string
		cfg  subnetmgr.Config
		// subnet is our lease's ID, subnet6 our IPv6 subnet in a dual-stack overlay.
		subnet, subnet6 netip.Prefix
		file            subnetmgr.SubnetFile // what the daemon writes for that lease
	}
	ipv4 := overlay{"IPv4", subnetmgr.Config{EnableIPv4: true, Network: filesNetwork}, filesSubnet, netip.Prefix{},
		subnetmgr.SubnetFile{Network: filesNetwork, Subnet: filesSubnet, MTU: 1450}}
	dual := overlay{"dual stack", subnetmgr.Config{EnableIPv4: true, Network: filesNetwork, EnableIPv6: true, IPv6Network: filesNetwork6}, filesSubnet, filesSubnet6,
		subnetmgr.SubnetFile{Network: filesNetwork, Subnet: filesSubnet, IPv6Network: filesNetwork6, IPv6Subnet: filesSubnet6, MTU: 1450}}
	ipv6Only := overlay{"IPv6 only", subnetmgr.Config{EnableIPv6: true, IPv6Network: filesNetwork6}, filesSubnet6, netip.Prefix{},
		subnetmgr.SubnetFile{IPv6Network: filesNetwork6, IPv6Subnet: filesSubnet6, MTU: 1430}}
	for _, tt := range []struct {
		desc string
		overlay
		// lease moves our lease before the files are written (docker0 stays).
		lease func(o *overlay)
		// opts replaces the options file the daemon wrote, subnetFile the subnet file ("": keep).
		opts       string
		subnetFile func(f *subnetmgr.SubnetFile)
		status     string
		says       []string
	}{
		{desc: "IPv4: the daemon's files", overlay: ipv4, status: checkOK,
			says: []string{"match the lease: --bip=10.244.5.1/24 --mtu=1450"}},
		{desc: "IPv4: Docker's options for another subnet", overlay: ipv4, opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.6.1/24 --mtu=1450"`, status: checkFail,
			says: []string{"gives Docker --bip=10.244.6.1/24, the lease's gateway is 10.244.5.1/24", "the files Docker starts from do not match the lease", "systemctl restart xnetd (it rewrites both files), then systemctl restart docker"}},
		{desc: "IPv4: another MTU", overlay: ipv4, opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --mtu=1400"`, status: checkFail,
			says: []string{"gives Docker --mtu=1400", "says XNET_MTU=1450"}},
		{desc: "IPv4: no --mtu", overlay: ipv4, opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24"`, status: checkFail,
			says: []string{`no --bip and --mtu in "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.5.1/24\""`}},
		{desc: "IPv4: a subnet file of another lease", overlay: ipv4, subnetFile: func(f *subnetmgr.SubnetFile) { f.Subnet = otherSubnet }, status: checkFail,
			says: []string{"says XNET_SUBNET=10.244.6.0/24, the lease is 10.244.5.0/24"}},
		{desc: "IPv4: docker0 from before the lease moved", overlay: ipv4, lease: func(o *overlay) { o.subnet, o.file.Subnet = otherSubnet, otherSubnet }, status: checkFail,
			says: []string{"docker0 is not on the lease's subnet", "docker0 has 10.244.5.1/24, the lease's gateway is 10.244.6.1/24", "systemctl restart docker"}},

		{desc: "dual stack: the daemon's files", overlay: dual, status: checkOK,
			says: []string{"match the lease: --bip=10.244.5.1/24 --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1450"}},
		{desc: "dual stack: Docker's options for another IPv6 subnet", overlay: dual,
			opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --mtu=1450 --ipv6 --fixed-cidr-v6=fd00:10:244:6::/64"`, status: checkFail,
			says: []string{"gives Docker --fixed-cidr-v6=fd00:10:244:6::/64, the lease is fd00:10:244:5::/64"}},
		{desc: "dual stack: Docker's options of an IPv4 run", overlay: dual, opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --mtu=1450"`, status: checkFail,
			says: []string{"no --fixed-cidr-v6 in"}},
		{desc: "dual stack: a subnet file of another IPv6 lease", overlay: dual, subnetFile: func(f *subnetmgr.SubnetFile) { f.IPv6Subnet = otherSubnet6 }, status: checkFail,
			says: []string{"says XNET_IPV6_SUBNET=fd00:10:244:6::/64, the lease is fd00:10:244:5::/64"}},
		{desc: "dual stack: docker0 from before the IPv6 lease moved", overlay: dual, lease: func(o *overlay) { o.subnet6, o.file.IPv6Subnet = otherSubnet6, otherSubnet6 }, status: checkFail,
			says: []string{"docker0 is not on the lease's IPv6 subnet", "docker0 has fd00:10:244:5::1/64, the lease is fd00:10:244:6::/64"}},

		{desc: "IPv6 only: the daemon's files", overlay: ipv6Only, status: checkOK,
			says: []string{"match the lease: --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430"}},
		{desc: "IPv6 only: Docker's options for another IPv6 subnet", overlay: ipv6Only,
			opts: `DOCKER_NETWORK_OPTIONS=" --ipv6 --fixed-cidr-v6=fd00:10:244:ff::/64 --mtu=1430"`, status: checkFail,
			says: []string{"gives Docker --fixed-cidr-v6=fd00:10:244:ff::/64, the lease is fd00:10:244:5::/64"}},
		{desc: "IPv6 only: Docker's options with --bip", overlay: ipv6Only,
			opts: `DOCKER_NETWORK_OPTIONS=" --bip=10.244.5.1/24 --ipv6 --fixed-cidr-v6=fd00:10:244:5::/64 --mtu=1430"`, status: checkFail,
			says: []string{"--bip=10.244.5.1/24 gives Docker an IPv4 bridge address in an IPv6-only overlay"}},
		{desc: "IPv6 only: a subnet file of an IPv4 run", overlay: ipv6Only,
			subnetFile: func(f *subnetmgr.SubnetFile) { f.Network, f.Subnet = filesNetwork, filesSubnet }, status: checkFail,
			says: []string{"sets XNET_NETWORK=10.244.0.0/16 and XNET_SUBNET=10.244.5.0/24 in an IPv6-only overlay (a file of an earlier IPv4 run)"}},
		{desc: "IPv6 only: docker0 from before the lease moved", overlay: ipv6Only, lease: func(o *overlay) { o.subnet, o.file.IPv6Subnet = otherSubnet6, otherSubnet6 }, status: checkFail,
			says: []string{"docker0 is not on the lease's IPv6 subnet", "docker0 has fd00:10:244:5::1/64, the lease is fd00:10:244:6::/64"}},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			o := tt.overlay
			if tt.lease != nil {
				tt.lease(&o)
			}
			dir := t.TempDir()
			c := &checker{o: options{subnetFile: filepath.Join(dir, "subnet.env"), dockerOptsFile: filepath.Join(dir, "docker")},
				cfg: o.cfg, subnet: o.subnet, haveState: true}
			c.st.Lease.IPv6Subnet = o.subnet6
			if err := subnetmgr.WriteDockerOpts(c.o.dockerOptsFile, o.file); err != nil {
				t.Fatal(err)
			}
			if tt.opts != "" {
				if err := os.WriteFile(c.o.dockerOptsFile, []byte(tt.opts+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tt.subnetFile != nil {
				tt.subnetFile(&o.file)
			}
			if err := subnetmgr.WriteSubnetFile(c.o.subnetFile, o.file); err != nil {
				t.Fatal(err)
			}
			var r checkResult
			if err := h.Do(func() error { r = c.checkFiles(); return nil }); err != nil {
				t.Fatal(err)
			}
			out := strings.Join(append([]string{r.Status, r.Detail, r.Fix}, r.Problems...), "\n")
			if r.Status != tt.status {
				t.Errorf("status %s, want %s:\n%s", r.Status, tt.status, out)
			}
			for _, want := range tt.says {
				if !strings.Contains(out, want) {
					t.Errorf("does not say %q:\n%s", want, out)
				}
			}
		})
	}
}
