package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// env is a fake environment for parseFlags: tests never read or change the real one.
func env(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// builtIn is what the tests pretend the binary has, independent of which backend packages
// exist yet.
var builtIn = []string{"host-gw", "vxlan"}

func parse(args []string, lookup func(string) (string, bool)) (options, error) {
	fs, raw := runFlagSet("xnetd")
	if err := parseFlags(fs, args, lookup); err != nil {
		return options{}, err
	}
	return raw.validate(builtIn)
}

func TestEnvNameIsXNETDAndTheFlagInUpperCase(t *testing.T) {
	for flag, want := range map[string]string{
		"etcd-endpoints":            "XNETD_ETCD_ENDPOINTS",
		"iface":                     "XNETD_IFACE",
		"subnet-lease-renew-margin": "XNETD_SUBNET_LEASE_RENEW_MARGIN",
		"ip-masq":                   "XNETD_IP_MASQ",
	} {
		if got := envName(flag); got != want {
			t.Errorf("envName(%q) = %q, want %q", flag, got, want)
		}
	}
}

func TestValidFlagsAndEnvironment(t *testing.T) {
	dir := t.TempDir()
	cert := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(cert, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		args  []string
		env   []string
		check func(t *testing.T, o options)
	}{
		{"defaults are flannel's and docs/design.md's", nil, nil, func(t *testing.T, o options) {
			want := options{
				etcdEndpoints: []string{"http://127.0.0.1:2379"}, etcdPrefix: "/coreos.com/network",
				subnetFile: "/run/xnet/subnet.env", dockerOptsFile: "/run/xnet/docker", stateFile: "/run/xnet/state.json",
				renewMargin: time.Hour, decap: "auto", metricsAddr: "127.0.0.1:9469", bpffs: "/sys/fs/bpf/xnet",
			}
			if o.etcdPrefix != want.etcdPrefix || strings.Join(o.etcdEndpoints, ",") != strings.Join(want.etcdEndpoints, ",") ||
				o.subnetFile != want.subnetFile || o.dockerOptsFile != want.dockerOptsFile || o.stateFile != want.stateFile ||
				o.renewMargin != want.renewMargin || o.decap != want.decap || o.metricsAddr != want.metricsAddr ||
				o.bpffs != want.bpffs || o.backend != "" || o.ipMasq || o.teardownOnExit || o.flowSteering != "off" {
				t.Errorf("got %+v, want %+v", o, want)
			}
		}},
		{"macvlan is leased only when the config has the section, its file under /run/xnet", nil, nil, func(t *testing.T, o options) {
			if o.macvlan || o.macvlanFile != "/run/xnet/macvlan" {
				t.Errorf("macvlan %v file %q, want false and /run/xnet/macvlan", o.macvlan, o.macvlanFile)
			}
		}},
		{"--macvlan requires the section; --macvlan-file moves the options file", []string{"--macvlan", "--macvlan-file", "/tmp/h1/macvlan"}, nil, func(t *testing.T, o options) {
			if !o.macvlan || o.macvlanFile != "/tmp/h1/macvlan" {
				t.Errorf("macvlan %v file %q, want true and /tmp/h1/macvlan", o.macvlan, o.macvlanFile)
			}
		}},
		{"macvlan flags from XNETD_MACVLAN and XNETD_MACVLAN_FILE", nil, []string{"XNETD_MACVLAN", "true", "XNETD_MACVLAN_FILE", "/etc/xnet/macvlan.env"}, func(t *testing.T, o options) {
			if !o.macvlan || o.macvlanFile != "/etc/xnet/macvlan.env" {
				t.Errorf("macvlan %v file %q, want true and /etc/xnet/macvlan.env from the environment", o.macvlan, o.macvlanFile)
			}
		}},
		{"--macvlan=false on the command line wins over XNETD_MACVLAN", []string{"--macvlan=false"}, []string{"XNETD_MACVLAN", "1"}, func(t *testing.T, o options) {
			if o.macvlan {
				t.Errorf("macvlan %v, want false", o.macvlan)
			}
		}},
		{"endpoints are comma-separated", []string{"--etcd-endpoints", "http://10.0.0.1:2379, https://10.0.0.2:2379"}, nil, func(t *testing.T, o options) {
			if got := strings.Join(o.etcdEndpoints, " "); got != "http://10.0.0.1:2379 https://10.0.0.2:2379" {
				t.Errorf("endpoints %q", got)
			}
		}},
		{"every flag comes from XNETD_<NAME>", nil, []string{
			"XNETD_ETCD_ENDPOINTS", "http://e1:2379,http://e2:2379", "XNETD_ETCD_PREFIX", "/atomic.io/network",
			"XNETD_IP_MASQ", "true", "XNETD_BACKEND", "vxlan", "XNETD_SUBNET_LEASE_RENEW_MARGIN", "30",
			"XNETD_PUBLIC_IP", "198.18.0.11", "XNETD_METRICS_ADDR", "", "XNETD_TEARDOWN_ON_EXIT", "1",
		}, func(t *testing.T, o options) {
			if len(o.etcdEndpoints) != 2 || o.etcdPrefix != "/atomic.io/network" || !o.ipMasq || o.backend != "vxlan" ||
				o.renewMargin != 30*time.Minute || o.publicIP.String() != "198.18.0.11" || o.metricsAddr != "" || !o.teardownOnExit {
				t.Errorf("environment not applied: %+v", o)
			}
		}},
		{"the command line wins over the environment", []string{"--backend=host-gw"}, []string{"XNETD_BACKEND", "vxlan"}, func(t *testing.T, o options) {
			if o.backend != "host-gw" {
				t.Errorf("backend %q, want host-gw", o.backend)
			}
		}},
		{"renew margin as flannel's minutes", []string{"--subnet-lease-renew-margin=90"}, nil, func(t *testing.T, o options) {
			if o.renewMargin != 90*time.Minute {
				t.Errorf("renew margin %v", o.renewMargin)
			}
		}},
		{"renew margin as a Go duration", []string{"--subnet-lease-renew-margin=1h30m"}, nil, func(t *testing.T, o options) {
			if o.renewMargin != 90*time.Minute {
				t.Errorf("renew margin %v", o.renewMargin)
			}
		}},
		{"state file follows the subnet file", []string{"--subnet-file", "/tmp/h1/subnet.env"}, nil, func(t *testing.T, o options) {
			if o.stateFile != "/tmp/h1/state.json" {
				t.Errorf("state file %q", o.stateFile)
			}
		}},
		{"auto is always a valid backend", []string{"--backend=auto"}, nil, func(t *testing.T, o options) {
			if o.backend != "auto" {
				t.Errorf("backend %q", o.backend)
			}
		}},
		{"metrics disabled by an empty address", []string{"--metrics-addr="}, nil, func(t *testing.T, o options) {
			if o.metricsAddr != "" {
				t.Errorf("metrics addr %q", o.metricsAddr)
			}
		}},
		{"TLS files that exist", []string{"--etcd-certfile", cert, "--etcd-keyfile", cert, "--etcd-cafile", cert}, nil, func(t *testing.T, o options) {
			if o.etcdCertFile != cert || o.etcdKeyFile != cert || o.etcdCAFile != cert {
				t.Errorf("tls files %+v", o)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parse(tt.args, env(tt.env...))
			if err != nil {
				t.Fatalf("parse(%q, env %q): %v", tt.args, tt.env, err)
			}
			tt.check(t, o)
		})
	}
}

// Every bad value is refused with one message that names the flag (or variable) and the fix.
func TestBadFlagsNameTheFlagAndTheFix(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  []string
		want []string // substrings of the error
	}{
		{"unknown backend", []string{"--backend=vxlan2"}, nil, []string{"--backend", `"vxlan2"`, "use auto, ebpf, vxlan, udp, host-gw or wireguard"}},
		{"backend not built in", []string{"--backend=udp"}, nil, []string{"--backend udp", "not built into this xnetd", "host-gw, vxlan"}},
		{"bad decap", []string{"--decap=fast"}, nil, []string{"--decap", "use auto, xdp or tc"}},
		{"bad flow steering", []string{"--flow-steering=rfs"}, nil, []string{"--flow-steering", `"rfs"`, "use off or rps"}},
		{"public ip not an address", []string{"--public-ip=host1"}, nil, []string{"--public-ip", "not an IPv4 address"}},
		{"public ip is IPv6", []string{"--public-ip=2001:db8::1"}, nil, []string{"--public-ip", "not an IPv4 address"}},
		{"renew margin garbage", []string{"--subnet-lease-renew-margin=soon"}, nil, []string{"subnet-lease-renew-margin", "neither minutes"}},
		{"renew margin zero", []string{"--subnet-lease-renew-margin=0"}, nil, []string{"--subnet-lease-renew-margin", "more than 0"}},
		{"renew margin beyond the TTL", []string{"--subnet-lease-renew-margin=25h"}, nil, []string{"--subnet-lease-renew-margin", "less than the lease TTL"}},
		{"endpoint without scheme", []string{"--etcd-endpoints=127.0.0.1:2379"}, nil, []string{"--etcd-endpoints", "http://"}},
		{"no endpoint", []string{"--etcd-endpoints=,"}, nil, []string{"--etcd-endpoints is empty"}},
		{"prefix not absolute", []string{"--etcd-prefix=coreos.com/network"}, nil, []string{"--etcd-prefix", "start with /"}},
		{"missing cert file", []string{"--etcd-certfile=/nonexistent/c.pem", "--etcd-keyfile=/nonexistent/k.pem"}, nil, []string{"--etcd-certfile /nonexistent/c.pem", "no such file"}},
		{"cert without key", []string{"--etcd-certfile=/dev/null"}, nil, []string{"--etcd-certfile and --etcd-keyfile go together"}},
		{"password without user", []string{"--etcd-password=x"}, nil, []string{"--etcd-password without --etcd-username"}},
		{"metrics address without port", []string{"--metrics-addr=localhost"}, nil, []string{"--metrics-addr", "host:port"}},
		{"metrics address with a name", []string{"--metrics-addr=metrics.example:9469"}, nil, []string{"--metrics-addr", "not an IP address"}},
		{"relative subnet file", []string{"--subnet-file=subnet.env"}, nil, []string{"--subnet-file", "absolute path"}},
		{"relative macvlan file", []string{"--macvlan-file=macvlan"}, nil, []string{"--macvlan-file", `"macvlan"`, "absolute path"}},
		{"empty macvlan file", []string{"--macvlan-file="}, nil, []string{"--macvlan-file", "absolute path"}},
		{"unparsable XNETD_MACVLAN names the variable", nil, []string{"XNETD_MACVLAN", "sometimes"}, []string{"XNETD_MACVLAN", "--macvlan"}},
		{"bad log level", []string{"--log-level=loud"}, nil, []string{"--log-level", "debug, info, warn or error"}},
		{"unknown flag", []string{"--etcd-endpoint=http://x:2379"}, nil, []string{"unknown flag: --etcd-endpoint", "--help"}},
		{"stray argument", []string{"vxlan"}, nil, []string{`unexpected argument "vxlan"`}},
		{"bad value from the environment names the variable", nil, []string{"XNETD_DECAP", "fast"}, []string{"--decap", "use auto, xdp or tc"}},
		{"unparsable value from the environment names the variable", nil, []string{"XNETD_IP_MASQ", "maybe"}, []string{"XNETD_IP_MASQ", "--ip-masq"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(tt.args, env(tt.env...))
			if err == nil {
				t.Fatalf("parse(%q, env %q) accepted, want an error mentioning %q", tt.args, tt.env, tt.want)
			}
			if _, ok := err.(*usageError); !ok {
				t.Errorf("error %v is a %T, want *usageError (exit code 2)", err, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is more than one line", err)
			}
		})
	}
}

// The exit code and the output an operator sees for each kind of failure.
func TestExitCodes(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
		wantStdout string
	}{
		{"bad flag: code 2, one line", []string{"--backend=nope"}, 2, "xnetd: --backend \"nope\" is not a backend", ""},
		{"bad flag of teardown: code 2", []string{"teardown", "--decap=x"}, 2, "xnetd: --decap", ""},
		{"unknown command: code 2", []string{"start"}, 2, `xnetd: unknown command "start"`, ""},
		{"bad status output: code 2", []string{"status", "--output=yaml"}, 2, "xnetd: --output", ""},
		{"help: code 0 on stdout", []string{"--help"}, 0, "", "XNETD_<NAME>"},
		{"version: code 0", []string{"version"}, 0, "", "xnetd "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tt.args, &stdout, &stderr, env())
			if code != tt.wantCode {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.wantCode, stderr.String())
			}
			if tt.wantStderr != "" {
				if !strings.HasPrefix(stderr.String(), tt.wantStderr) || strings.Count(stderr.String(), "\n") != 1 {
					t.Errorf("stderr %q, want one line starting %q", stderr.String(), tt.wantStderr)
				}
			} else if stderr.Len() != 0 {
				t.Errorf("stderr %q, want nothing", stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.wantStdout) {
				t.Errorf("stdout %q does not contain %q", stdout.String(), tt.wantStdout)
			}
		})
	}
}
