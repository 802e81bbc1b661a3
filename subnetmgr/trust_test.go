package subnetmgr

import (
	"net/netip"
	"testing"
)

func TestCheckPeerSubnet(t *testing.T) {
	cfg := Config{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24}
	own := netip.MustParsePrefix("10.244.1.0/24")
	tests := []struct {
		name   string
		subnet string
		want   string // the reason, "" when the lease may be programmed
	}{
		{"a /24 of the Network, not ours, is a peer", "10.244.2.0/24", ""},
		{"the first /24 of the Network is a peer too (only SubnetMin keeps us from taking it)", "10.244.0.0/24", ""},
		{"the last /24 of the Network", "10.244.255.0/24", ""},
		{"0.0.0.0/1 covers the Network and half the Internet", "0.0.0.0/1", RefusedOutsideNetwork},
		{"the default route", "0.0.0.0/0", RefusedOutsideNetwork},
		{"a supernet of the Network", "10.0.0.0/8", RefusedOutsideNetwork},
		{"the Network itself is not strictly inside it", "10.244.0.0/16", RefusedOutsideNetwork},
		{"a /24 outside the Network", "192.0.2.0/24", RefusedOutsideNetwork},
		{"a /24 next to the Network", "10.245.0.0/24", RefusedOutsideNetwork},
		{"a /25 inside our subnet captures our own traffic", "10.244.1.128/25", RefusedOverlapsOwnSubnet},
		{"a /32 inside our subnet", "10.244.1.7/32", RefusedOverlapsOwnSubnet},
		{"a /23 holding our subnet", "10.244.0.0/23", RefusedOverlapsOwnSubnet},
		{"a /26 elsewhere in the Network", "10.244.9.64/26", RefusedWrongLength},
		{"a /23 elsewhere in the Network", "10.244.8.0/23", RefusedWrongLength},
		{"no subnet at all", "", RefusedOutsideNetwork},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var subnet netip.Prefix
			if tt.subnet != "" {
				subnet = netip.MustParsePrefix(tt.subnet)
			}
			r := CheckPeerSubnet(cfg, own, subnet)
			switch {
			case tt.want == "" && r != nil:
				t.Errorf("CheckPeerSubnet(%s) refused it: %v", tt.subnet, r)
			case tt.want != "" && r == nil:
				t.Errorf("CheckPeerSubnet(%s) accepted it, want refused as %s", tt.subnet, tt.want)
			case r != nil && (r.Reason != tt.want || r.Detail == ""):
				t.Errorf("CheckPeerSubnet(%s) = %v, want reason %s with a detail", tt.subnet, r, tt.want)
			}
		})
	}
}

func TestCheckPeerSubnetFollowsTheConfig(t *testing.T) {
	// A /20 configured with SubnetLen 26.
	small := Config{Network: netip.MustParsePrefix("10.10.0.0/20"), SubnetLen: 26}
	tests := []struct {
		name   string
		subnet string
		want   string
	}{
		{"a /26 of the Network", "10.10.3.64/26", ""},
		{"a /24 is the wrong length here", "10.10.3.0/24", RefusedWrongLength},
		{"a /26 of the default overlay is outside this Network", "10.244.3.64/26", RefusedOutsideNetwork},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if r := CheckPeerSubnet(small, netip.MustParsePrefix("10.10.0.64/26"), netip.MustParsePrefix(tt.subnet)); r != nil {
				got = r.Reason
			}
			if got != tt.want {
				t.Errorf("CheckPeerSubnet(%s) refused as %q, want %q (\"\" is accepted)", tt.subnet, got, tt.want)
			}
		})
	}
}

func TestClaimsFirst(t *testing.T) {
	lease := func(subnet string, rev int64) Lease {
		return Lease{Subnet: netip.MustParsePrefix(subnet), CreateRevision: rev}
	}
	tests := []struct {
		name string
		a, b Lease
		want bool
	}{
		{"the key etcd created first keeps the PublicIP", lease("10.244.9.0/24", 10), lease("10.244.2.0/24", 20), true},
		{"a younger key loses, whatever its subnet", lease("10.244.2.0/24", 20), lease("10.244.9.0/24", 10), false},
		{"between leases built by hand, the lower subnet", lease("10.244.2.0/24", 0), lease("10.244.9.0/24", 0), true},
		{"a lease never comes before itself", lease("10.244.2.0/24", 5), lease("10.244.2.0/24", 5), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ClaimsFirst(tt.a, tt.b); got != tt.want {
				t.Errorf("ClaimsFirst(%v rev %d, %v rev %d) = %v, want %v", tt.a.Subnet, tt.a.CreateRevision, tt.b.Subnet, tt.b.CreateRevision, got, tt.want)
			}
		})
	}
}
