package wireguard

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"github.com/xnet-dev/xnet/backend"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// kernelDevice is the kernel's WireGuard: a link of type wireguard, configured over generic
// netlink with wgctrl. It forwards without us, so a stopped xnetd interrupts nothing.
type kernelDevice struct {
	name   string
	client *wgctrl.Client
}

// openKernelDevice makes sure name (xnet-wg or xnet-wg-v6) is a kernel WireGuard link
// (replacing one of another kind, the embedded datapath's TUN from an earlier start) and opens
// wgctrl in ns. An existing device keeps its peers: they forward until the lease list settles
// them.
func openKernelDevice(nl *netlink.Handle, ns netns.NsHandle, name string, mtu int) (*kernelDevice, error) {
	link, err := nl.LinkByName(name)
	if err == nil && link.Type() != "wireguard" {
		if err := nl.LinkDel(link); err != nil {
			return nil, fmt.Errorf("wireguard: replace %s (a %s link) with a kernel WireGuard device: %w", name, link.Type(), err)
		}
		err = netlink.LinkNotFoundError{}
	}
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		// Creating the link loads the module when it is not loaded yet.
		if err := nl.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}); err != nil {
			return nil, fmt.Errorf("wireguard: create kernel WireGuard device %s: %w", name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("wireguard: look up %s: %w", name, err)
	}
	var c *wgctrl.Client
	err = backend.InNamespace(ns, func() (err error) { c, err = wgctrl.New(); return err })
	if err != nil {
		return nil, fmt.Errorf("wireguard: open wgctrl: %w", err)
	}
	return &kernelDevice{name: name, client: c}, nil
}

func (k *kernelDevice) configure(cfg wgtypes.Config) error {
	if err := k.client.ConfigureDevice(k.name, cfg); err != nil {
		return fmt.Errorf("configure kernel WireGuard device %s: %w", k.name, err)
	}
	return nil
}

func (k *kernelDevice) get() (*wgtypes.Device, error) {
	d, err := k.client.Device(k.name)
	if err != nil {
		return nil, fmt.Errorf("read kernel WireGuard device %s: %w", k.name, err)
	}
	return d, nil
}

func (k *kernelDevice) close() error { return k.client.Close() }

// kernelWireGuard says whether this kernel has WireGuard, and how we know: its generic
// netlink family is registered (module loaded or built in), or a module is installed that
// creating the link will load. Without either the kernel has none (CONFIG_WIREGUARD off).
func kernelWireGuard(nl *netlink.Handle) (ok bool, why string) {
	if _, err := nl.GenlFamilyGet("wireguard"); err == nil {
		return true, "the kernel has WireGuard (generic netlink family \"wireguard\" registered)"
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return false, fmt.Sprintf("no generic netlink family \"wireguard\", and uname failed: %v", err)
	}
	release := unix.ByteSliceToString(uts.Release[:])
	dir := filepath.Join("/lib/modules", release)
	for _, list := range []string{"modules.builtin", "modules.dep"} {
		if data, err := os.ReadFile(filepath.Join(dir, list)); err == nil && bytes.Contains(data, []byte("/wireguard.ko")) {
			return true, fmt.Sprintf("the kernel's wireguard module is installed (%s lists it)", filepath.Join(dir, list))
		}
	}
	return false, fmt.Sprintf("kernel %s has no WireGuard: no generic netlink family \"wireguard\", no wireguard module in %s", release, dir)
}
