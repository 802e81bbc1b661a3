package conformance

import (
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/xnet-dev/xnet/backend"
	"github.com/xnet-dev/xnet/test/harness"
)

// Underlay is the interface xnetd resolves on a harness host with --iface eth0: eth0, whose
// address is the host's PublicIP.
func Underlay(h *harness.Host) (backend.ExternalInterface, error) {
	var eth0 netlink.Link
	if err := h.Do(func() (err error) { eth0, err = netlink.LinkByName("eth0"); return err }); err != nil {
		return backend.ExternalInterface{}, fmt.Errorf("%s: %w", h.Name, err)
	}
	a := eth0.Attrs()
	return backend.ExternalInterface{Name: a.Name, Index: a.Index, MTU: a.MTU, MAC: a.HardwareAddr, PublicIP: h.UnderlayIP, IfaceIP: h.UnderlayIP}, nil
}

// NetlinkHandle is a netlink handle bound to h's namespace, for the backends' NewWithHandle. It
// is closed at tb's cleanup.
func NetlinkHandle(tb testing.TB, h *harness.Host) *netlink.Handle {
	tb.Helper()
	ns, err := netns.GetFromPath(h.Path())
	if err != nil {
		tb.Fatal(err)
	}
	nl, err := netlink.NewHandleAt(ns)
	ns.Close()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nl.Close)
	return nl
}
