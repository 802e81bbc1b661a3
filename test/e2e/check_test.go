package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/xnet-dev/xnet/test/e2e/xnetdtest"
)

// TestCheckFollowsTheContainerBridge: `xnetd check` inspects the ebpf programs on the container
// bridge the daemon found, whatever it is called, and on the veths of its containers: a
// container veth that lost its program is reported by name.
func TestCheckFollowsTheContainerBridge(t *testing.T) {
	nodes, _ := xnetdtest.Cluster(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ebpf"}}`)
	for _, n := range nodes {
		n.UseBridgeName("cbr0")
	}
	cs := xnetdtest.Containers(t, nodes)
	if failed := xnetdtest.Mesh(cs); len(failed) > 0 {
		t.Fatalf("containers do not reach each other:\n%s", strings.Join(failed, "\n"))
	}
	a := nodes[0]
	// The daemon attaches to a bridge it finds through the link watch: wait until check sees
	// the veth's program there too (4: decap on eth0, encap on xnet0, deliver on cbr0, encap on the veth; 2 when check
	// looked at docker0 only).
	var out string
	var code int
	for deadline := time.Now().Add(10 * time.Second); ; {
		out, code = a.Check(t)
		if code == 0 && strings.Contains(out, "4 programs attached") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("xnetd check on %s with containers on cbr0: exit %d, want 0 and the programs on cbr0 and its veth counted:\n%s", a.Name, code, out)
		}
		time.Sleep(200 * time.Millisecond)
	}

	veth := cs[0].Veth
	pin := filepath.Join(a.BPFFS, fmt.Sprintf("link_ingress_%d", a.Ifindex(t, veth)))
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatalf("the container veth %s on cbr0 has no pinned encap link: %v", veth, err)
	}
	if err := lk.Unpin(); err != nil {
		t.Fatal(err)
	}
	lk.Close()
	out, code = a.Check(t)
	if code == 0 || !strings.Contains(out, "encap_container is not attached to "+veth+"'s TC ingress") {
		t.Errorf("xnetd check after the encap program left %s: exit %d, want a failure naming it:\n%s", veth, code, out)
	}
}
