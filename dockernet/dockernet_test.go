package dockernet

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/subnetmgr"
)

var testIface = backend.ExternalInterface{Name: "eth0", Index: 2, MTU: 1500,
	IfaceIP: netip.MustParseAddr("198.18.0.11"), PublicIP: netip.MustParseAddr("198.18.0.11")}

func TestSubnetsVNIsAndBlocks(t *testing.T) {
	for _, tc := range []struct {
		subnet  string
		vni     int
		block   int
		problem string
	}{
		{"10.250.0.0/16", 0x0afa00, 24, ""},
		{"10.192.0.0/16", 0x0ac000, 24, ""},
		{"10.250.0.0/22", 0x0afa00, 24, ""},
		{"10.250.4.0/24", 0x0afa04, 26, ""},
		{"10.250.0.1/16", 0, 0, "host bits set; did you mean 10.250.0.0/16"},
		{"10.250.0.0/25", 0, 0, "/24 or larger"},
		{"fd00::/64", 0, 0, "IPv4 only"},
		{"nonsense", 0, 0, "not an IPv4 CIDR"},
		{"255.255.255.0/24", 0, 0, "inside 240.0.0.0/4"},
		{"255.255.254.0/23", 0, 0, "inside 240.0.0.0/4"},
		{"250.1.0.0/16", 0, 0, "pick a private range"},
	} {
		p, err := parseSubnet(tc.subnet)
		if tc.problem != "" {
			if err == nil || !strings.Contains(err.Error(), tc.problem) || !strings.Contains(err.Error(), "--subnet") {
				t.Errorf("parseSubnet(%s) = %v, %v; want an error naming --subnet and saying %q", tc.subnet, p, err, tc.problem)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseSubnet(%s): %v", tc.subnet, err)
			continue
		}
		if got := vniOf(p); got != tc.vni {
			t.Errorf("vniOf(%s) = %d, want %d", p, got, tc.vni)
		}
		if got := defaultBlockLen(p); got != tc.block {
			t.Errorf("defaultBlockLen(%s) = %d, want %d", p, got, tc.block)
		}
	}
	// Networks that do not overlap never share a VNI: /24 or larger, so the top 24 bits differ.
	a, b := netip.MustParsePrefix("10.250.0.0/24"), netip.MustParsePrefix("10.250.1.0/24")
	if vniOf(a) == vniOf(b) {
		t.Errorf("adjacent /24s share VNI %d", vniOf(a))
	}
}

func TestBlockLenOptionIsCheckedAndNamed(t *testing.T) {
	sixteen := netip.MustParsePrefix("10.250.0.0/16")
	for _, tc := range []struct {
		opts map[string]string
		want int
		err  string
	}{
		{map[string]string{}, 24, ""},
		{map[string]string{OptBlockLen: "26"}, 26, ""},
		{map[string]string{OptBlockLen: "/20"}, 20, ""},
		{map[string]string{OptBlockLen: "17"}, 0, "-o xnet.block-len=17"},
		{map[string]string{OptBlockLen: "29"}, 0, "-o xnet.block-len=29"},
		{map[string]string{"mtu": "1400"}, 0, "-o mtu: unknown option"},
	} {
		got, err := blockLenOf(sixteen, tc.opts)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("blockLenOf(%v) = %d, %v; want an error saying %q", tc.opts, got, err, tc.err)
			}
		} else if err != nil || got != tc.want {
			t.Errorf("blockLenOf(%v) = %d, %v; want %d", tc.opts, got, err, tc.want)
		}
	}
}

func TestAllocatorStaysInsideItsBlock(t *testing.T) {
	a := newAllocator(netip.MustParsePrefix("10.250.3.0/29"))
	// .0 is the VXLAN device's, .1 the bridge's, .7 the broadcast: .2 to .6 are left.
	var got []string
	for range 5 {
		ip, err := a.request(netip.Addr{})
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ip.String())
	}
	if strings.Join(got, " ") != "10.250.3.2 10.250.3.3 10.250.3.4 10.250.3.5 10.250.3.6" {
		t.Errorf("handed out %v", got)
	}
	if ip, err := a.request(netip.Addr{}); err == nil || !strings.Contains(err.Error(), "full") {
		t.Errorf("a full block handed out %v, %v", ip, err)
	}
	a.release(netip.MustParseAddr("10.250.3.3"))
	if ip, err := a.request(netip.Addr{}); err != nil || ip.String() != "10.250.3.3" {
		t.Errorf("after a release: %v, %v; want the released 10.250.3.3", ip, err)
	}
	for _, want := range []string{"10.250.3.1", "10.250.3.7", "10.250.4.2"} {
		if ip, err := a.request(netip.MustParseAddr(want)); err == nil || !strings.Contains(err.Error(), "--ip "+want) {
			t.Errorf("--ip %s outside the containers' part of the block: %v, %v", want, ip, err)
		}
	}
	b := newAllocator(netip.MustParsePrefix("10.250.3.0/24"))
	b.markUsed(netip.MustParseAddr("10.250.3.2"))
	if ip, _ := b.request(netip.Addr{}); ip.String() != "10.250.3.3" {
		t.Errorf("an address Docker had before a restart was handed out again: %v", ip)
	}
	if _, err := b.request(netip.MustParseAddr("10.250.3.2")); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("--ip of a container that has it: %v", err)
	}
}

// testManager is a Manager with a state and no etcd, Docker or kernel behind it: enough for
// the protocol's checks and the resolver's answers.
func testManager(t *testing.T, state subnetmgr.NetworkState) *Manager {
	t.Helper()
	return &Manager{
		o: Options{Overlay: subnetmgr.Config{Network: netip.MustParsePrefix("10.244.0.0/16"),
			Backend: subnetmgr.BackendConfig{VNI: 1, Port: 8472}}, Iface: testIface},
		log: slog.New(slog.DiscardHandler), kick: make(chan struct{}, 1), changed: make(chan struct{}),
		state: state, haveState: true,
		nets: map[string]*localNet{}, byID: map[string]string{}, pending: map[string]pendingNet{},
		expectCreate: map[netip.Prefix]string{}, expectDelete: map[string]bool{}, tombstones: map[string]time.Time{},
		endpoints: map[string]*endpoint{}, sandboxes: map[string]map[string]bool{},
	}
}

// call posts one plugin call and decodes the answer.
func call(t *testing.T, h http.Handler, path string, req any) map[string]any {
	t.Helper()
	body, _ := json.Marshal(req)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, path, strings.NewReader(string(body))))
	if w.Code != http.StatusOK {
		t.Fatalf("%s: HTTP %d", path, w.Code)
	}
	var out map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
		t.Fatalf("%s: %v: %s", path, err, w.Body)
	}
	return out
}

func TestPluginRefusesBadNetworksThroughBothErrorFields(t *testing.T) {
	red := subnetmgr.Network{Name: "red", Subnet: netip.MustParsePrefix("10.250.0.0/16"), VNI: 0x0afa00, Port: 8474, BlockLen: 24}
	m := testManager(t, subnetmgr.NetworkState{Networks: map[string]subnetmgr.Network{"red": red}})
	h := m.handler()
	if got := call(t, h, "/Plugin.Activate", nil); jsonString(got["Implements"]) != `["NetworkDriver","IpamDriver"]` {
		t.Errorf("Plugin.Activate = %v", got)
	}
	if got := call(t, h, "/NetworkDriver.GetCapabilities", nil); got["Scope"] != "local" || got["ConnectivityScope"] != "global" {
		t.Errorf("GetCapabilities = %v, want scope local, connectivity global", got)
	}
	for _, tc := range []struct {
		desc string
		path string
		req  any
		want string
	}{
		{"the overlay's Network", "/IpamDriver.RequestPool", requestPoolRequest{Pool: "10.244.0.0/16"}, "overlay Network"},
		{"inside another network", "/IpamDriver.RequestPool", requestPoolRequest{Pool: "10.250.8.0/21"}, "overlaps network red"},
		{"IPv6", "/IpamDriver.RequestPool", requestPoolRequest{V6: true}, "--ipv6"},
		{"an ip range", "/IpamDriver.RequestPool", requestPoolRequest{Pool: "10.251.0.0/16", SubPool: "10.251.1.0/24"}, "--ip-range"},
		{"IPAM options", "/IpamDriver.RequestPool", requestPoolRequest{Pool: "10.251.0.0/16", Options: map[string]string{"x": "y"}}, "--ipam-opt x"},
		{"a gateway of our own", "/IpamDriver.RequestAddress", requestAddressRequest{PoolID: "xnet:10.251.0.0/16", Address: "10.251.0.9",
			Options: map[string]string{"RequestAddressType": gatewayRequest}}, "--gateway 10.251.0.9"},
		{"Docker's default IPAM", "/NetworkDriver.CreateNetwork", createNetworkRequest{NetworkID: "n1",
			IPv4Data: []ipamData{{AddressSpace: "LocalDefault", Pool: "10.251.0.0/16"}}}, "--ipam-driver"},
		{"an unknown -o", "/NetworkDriver.CreateNetwork", createNetworkRequest{NetworkID: "n1",
			Options:  map[string]any{"com.docker.network.generic": map[string]any{"mtu": "1400"}},
			IPv4Data: []ipamData{{AddressSpace: localAddressSpace, Pool: "10.251.0.0/16"}}}, "-o mtu"},
	} {
		got := call(t, h, tc.path, tc.req)
		for _, field := range []string{"Err", "Error"} {
			if msg, _ := got[field].(string); !strings.Contains(msg, tc.want) {
				t.Errorf("%s: %s says %q in %s, want %q", tc.desc, tc.path, msg, field, tc.want)
			}
		}
	}
	got := call(t, h, "/IpamDriver.RequestPool", requestPoolRequest{})
	if got["Pool"] != "10.192.0.0/16" || got["PoolID"] != "xnet:10.192.0.0/16" || got["Error"] != nil {
		t.Errorf("RequestPool without --subnet = %v, want the first /16 of %s", got, defaultSubnets)
	}
	got = call(t, h, "/IpamDriver.RequestAddress", requestAddressRequest{PoolID: "xnet:10.192.0.0/16", Options: map[string]string{"RequestAddressType": gatewayRequest}})
	if got["Address"] != "10.192.0.1/16" {
		t.Errorf("the gateway of 10.192.0.0/16 = %v, want its first address", got)
	}
	// A user's create waits for its name; xnetd's own create of red is expected.
	if got := call(t, h, "/NetworkDriver.CreateNetwork", createNetworkRequest{NetworkID: "n2",
		IPv4Data: []ipamData{{AddressSpace: localAddressSpace, Pool: "10.192.0.0/16"}}}); got["Err"] != nil {
		t.Fatalf("a user's create: %v", got)
	}
	if p, ok := m.pending["n2"]; !ok || p.blockLen != 24 {
		t.Errorf("pending creates: %+v", m.pending)
	}
	if got := call(t, h, "/IpamDriver.RequestPool", requestPoolRequest{Pool: "10.192.0.0/17"}); !strings.Contains(got["Error"].(string), "being created on this host") {
		t.Errorf("a subnet overlapping a pending create: %v", got)
	}
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestResolverAnswersFromTheAskersNetworks(t *testing.T) {
	pub1, pub2 := netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12")
	blk := func(s string, pub netip.Addr) subnetmgr.Lease {
		return subnetmgr.Lease{Subnet: netip.MustParsePrefix(s), PublicIP: pub}
	}
	ep := func(network, ip, name string, pub netip.Addr) subnetmgr.NetworkEndpoint {
		return subnetmgr.NetworkEndpoint{Network: network, IP: netip.MustParseAddr(ip), Name: name, PublicIP: pub}
	}
	state := subnetmgr.NetworkState{
		Networks: map[string]subnetmgr.Network{"red": {Name: "red"}, "blue": {Name: "blue"}},
		Blocks: map[string][]subnetmgr.Lease{
			"red":  {blk("10.250.1.0/24", pub1), blk("10.250.2.0/24", pub2)},
			"blue": {blk("10.192.1.0/24", pub1), blk("10.192.2.0/24", pub2)},
		},
		Endpoints: map[string][]subnetmgr.NetworkEndpoint{
			"red": {ep("red", "10.250.1.2", "r1", pub1), ep("red", "10.250.2.3", "rb", pub2),
				// A block that moved to another host: its old endpoint is not believed.
				ep("red", "10.250.2.9", "ghost", pub1)},
			"blue": {ep("blue", "10.192.2.2", "b2", pub2), ep("blue", "10.192.2.3", "rb", pub2)},
		},
	}
	m := testManager(t, state)
	// r1 is a local container on red only.
	m.endpoints["e1"] = &endpoint{id: "e1", network: "red", ip: netip.MustParseAddr("10.250.1.2"), sandbox: "s1"}
	m.sandboxes["s1"] = map[string]bool{"e1": true}
	r1 := netip.MustParseAddr("10.250.1.2")
	docker0 := netip.MustParseAddr("10.244.5.3")
	for _, tc := range []struct {
		desc  string
		name  string
		from  netip.Addr
		want  string
		known bool
	}{
		{"a container on the asker's network", "rb", r1, "[10.250.2.3]", true},
		{"name.network", "rb.red", r1, "[10.250.2.3]", true},
		{"case does not matter", "RB", r1, "[10.250.2.3]", true},
		{"a container on another network only", "b2", r1, "[]", true},
		{"an asker Docker knows nothing of sees every network", "rb", docker0, "[10.192.2.3 10.250.2.3]", true},
		{"an endpoint outside its host's block", "ghost", docker0, "[]", false},
		{"a name that is no container's", "example.com", r1, "[]", false},
	} {
		addrs, known := m.resolve(tc.name, tc.from)
		if got := "[" + jsonAddrs(addrs) + "]"; got != tc.want || known != tc.known {
			t.Errorf("%s: resolve(%s from %v) = %s, %v; want %s, %v", tc.desc, tc.name, tc.from, got, known, tc.want, tc.known)
		}
	}

	// The same through the DNS wire format: an A answer, an empty AAAA, NXDOMAIN for a name
	// the asker shares no network with.
	r := &resolver{lookup: m.resolve, log: slog.New(slog.DiscardHandler)}
	for _, tc := range []struct {
		name  string
		qtype dnsmessage.Type
		rcode dnsmessage.RCode
		as    int
	}{
		{"rb.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},
		{"rb.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 0},
		{"b2.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},
	} {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 42, RecursionDesired: true})
		_ = b.StartQuestions()
		_ = b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(tc.name), Type: tc.qtype, Class: dnsmessage.ClassINET})
		q, _ := b.Finish()
		var msg dnsmessage.Message
		if err := msg.Unpack(r.answer(q, r1, "udp")); err != nil {
			t.Fatalf("%s %v: %v", tc.name, tc.qtype, err)
		}
		if msg.ID != 42 || msg.RCode != tc.rcode || len(msg.Answers) != tc.as || !msg.Authoritative {
			t.Errorf("%s %v: id %d rcode %v answers %d authoritative %v; want rcode %v, %d answers", tc.name, tc.qtype, msg.ID, msg.RCode, len(msg.Answers), msg.Authoritative, tc.rcode, tc.as)
		}
	}
}

func jsonAddrs(a []netip.Addr) string {
	var s []string
	for _, x := range a {
		s = append(s, x.String())
	}
	return strings.Join(s, " ")
}
