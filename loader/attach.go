package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xnet-dev/xnet/bpf"
)

// Program names one of the datapath's programs.
type Program string

// The datapath's programs (see bpf/xnet.c).
const (
	EncapContainer Program = bpf.XnetProgEncapContainer // TC ingress of container veths
	EncapHost      Program = bpf.XnetProgEncapHost      // TC egress of xnet0
	DecapTC        Program = bpf.XnetProgDecapTc        // TC ingress of the underlay NIC
	DecapXDP       Program = bpf.XnetProgDecapXdp       // XDP of the underlay NIC
	DeliverBridge  Program = bpf.XnetProgDeliverBridge  // TC egress of container bridges
	DecapTunnel    Program = bpf.XnetProgDecapTunnel    // TC ingress of the IPv6-underlay vxlan device
)

// Hook is where on an interface a program runs.
type Hook string

// Hooks.
const (
	Ingress Hook = "ingress"
	Egress  Hook = "egress"
	XDP     Hook = "xdp"
)

// Attachment modes, as `xnetd status` shows them.
const (
	ModeTCX        = "tcx"
	ModeClsact     = "clsact"
	ModeXDPDriver  = "xdp-driver"
	ModeXDPGeneric = "xdp-generic"
)

// XDPMode asks for an XDP attach mode.
type XDPMode int

// XDP modes: driver with a logged generic fallback, or one of them only.
const (
	XDPDriverOrGeneric XDPMode = iota
	XDPDriverOnly
	XDPGenericOnly
)

// Attachment is one program on one interface hook.
type Attachment struct {
	Ifindex int
	Hook    Hook
	Program Program
	Mode    string // ModeTCX, ModeClsact, ModeXDPDriver or ModeXDPGeneric
	Adopted bool   // an attachment that was already there got the new program (atomically)
	Why     string // why this mode (a fallback says what failed)
}

func (l *Loader) program(p Program) (*ebpf.Program, error) {
	switch p {
	case EncapContainer:
		return l.progs.EncapContainer, nil
	case EncapHost:
		return l.progs.EncapHost, nil
	case DecapTC:
		return l.progs.DecapTc, nil
	case DeliverBridge:
		return l.progs.DeliverBridge, nil
	case DecapTunnel:
		return l.progs.DecapTunnel, nil
	case DecapXDP:
		if l.xdpErr != nil {
			return nil, fmt.Errorf("XDP decapsulation is unavailable on this kernel: %w", l.xdpErr)
		}
		return l.progs.DecapXdp, nil
	}
	return nil, fmt.Errorf("unknown program %q", p)
}

// linkPin is the pin of the attachment at (ifindex, hook): one per hook, so attaching again
// replaces rather than stacks.
func (l *Loader) linkPin(ifindex int, hook Hook) string {
	return filepath.Join(l.dir, fmt.Sprintf("link_%s_%d", hook, ifindex))
}

// AttachTC runs p at hook (Ingress or Egress) of the interface ifindex, in the network
// namespace of the calling thread. An attachment xnet made before (a pinned TCX link, or our
// clsact filter) gets the new program in one atomic update, so traffic never sees a gap.
func (l *Loader) AttachTC(ifindex int, hook Hook, p Program) (Attachment, error) {
	prog, err := l.program(p)
	if err != nil {
		return Attachment{}, err
	}
	if hook != Ingress && hook != Egress {
		return Attachment{}, fmt.Errorf("AttachTC: hook %q is not ingress or egress", hook)
	}
	a := Attachment{Ifindex: ifindex, Hook: hook, Program: p}
	pin := l.linkPin(ifindex, hook)

	if adopted, err := l.updatePinned(pin, prog); err != nil {
		return a, err
	} else if adopted {
		a.Mode, a.Adopted, a.Why = ModeTCX, true, "kept the pinned TCX link"
		return a, nil
	}
	if !l.noTCX {
		attach := ebpf.AttachTCXIngress
		if hook == Egress {
			attach = ebpf.AttachTCXEgress
		}
		lk, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: attach})
		switch {
		case err == nil:
			defer lk.Close()
			if err := lk.Pin(pin); err != nil {
				return a, fmt.Errorf("pin TCX link of %s on ifindex %d at %s: %w", p, ifindex, pin, err)
			}
			a.Mode, a.Why = ModeTCX, "kernel has TCX (6.6+)"
			return a, nil
		case errors.Is(err, ebpf.ErrNotSupported):
			a.Why = "kernel lacks TCX (needs 6.6): clsact + cls_bpf"
			l.log.Info("TCX not supported, attaching through clsact", "ifindex", ifindex, "hook", hook)
		default:
			return a, fmt.Errorf("attach %s to %s of ifindex %d with TCX: %w", p, hook, ifindex, err)
		}
	} else {
		a.Why = "TCX disabled by option: clsact + cls_bpf"
	}
	if err := attachClsact(ifindex, hook, p, prog); err != nil {
		return a, err
	}
	a.Mode = ModeClsact
	return a, nil
}

// updatePinned swaps prog into the link pinned at pin. It reports false when there is no pin
// or the pinned link is dead (its interface went away; the pin is removed then).
func (l *Loader) updatePinned(pin string, prog *ebpf.Program) (bool, error) {
	lk, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	defer lk.Close()
	if !alive(lk) {
		l.log.Info("removing the pin of a link whose interface is gone", "pin", pin)
		_ = lk.Unpin()
		return false, nil
	}
	if err := lk.Update(prog); err != nil {
		return false, fmt.Errorf("swap the new program into pinned link %s: %w", pin, err)
	}
	return true, nil
}

// alive: the link is still attached to an interface (a TCX or XDP link of a deleted interface
// stays pinned but reports ifindex 0).
func alive(lk link.Link) bool {
	info, err := lk.Info()
	if err != nil {
		return false
	}
	if t := info.TCX(); t != nil {
		return t.Ifindex != 0
	}
	if x := info.XDP(); x != nil {
		return x.Ifindex != 0
	}
	return true
}

// clsact filter identity: one fixed handle and priority per hook, so a replace swaps our
// program and never touches other filters.
const (
	clsactHandle   = 0x786e // "xn"
	clsactPriority = 0x786e
)

func clsactParent(hook Hook) uint32 {
	if hook == Egress {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

func attachClsact(ifindex int, hook Hook, p Program, prog *ebpf.Program) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc to ifindex %d: %w", ifindex, err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: clsactParent(hook), Handle: clsactHandle,
			Protocol: unix.ETH_P_ALL, Priority: clsactPriority},
		Fd: prog.FD(), Name: "xnet_" + string(p), DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("attach %s to %s of ifindex %d as a cls_bpf filter: %w", p, hook, ifindex, err)
	}
	return nil
}

// AttachXDP runs the decap program in XDP on ifindex. Driver mode is tried first; with
// XDPDriverOrGeneric a refusal falls back to generic mode, logged and reported in Why.
func (l *Loader) AttachXDP(ifindex int, mode XDPMode) (Attachment, error) {
	a := Attachment{Ifindex: ifindex, Hook: XDP, Program: DecapXDP}
	prog, err := l.program(DecapXDP)
	if err != nil {
		return a, err
	}
	pin := l.linkPin(ifindex, XDP)
	if adopted, err := l.updatePinned(pin, prog); err != nil {
		return a, err
	} else if adopted {
		a.Adopted, a.Mode, a.Why = true, xdpModeOf(ifindex), "kept the pinned XDP link"
		return a, nil
	}
	try := func(flags link.XDPAttachFlags) (link.Link, error) {
		return link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: flags})
	}
	var lk link.Link
	switch mode {
	case XDPGenericOnly:
		lk, err = try(link.XDPGenericMode)
		a.Mode, a.Why = ModeXDPGeneric, "generic mode requested"
	default:
		lk, err = try(link.XDPDriverMode)
		a.Mode, a.Why = ModeXDPDriver, "driver supports native XDP"
		if err != nil && mode == XDPDriverOrGeneric {
			l.log.Warn("native XDP refused, falling back to generic XDP", "ifindex", ifindex, "err", err)
			a.Why = fmt.Sprintf("driver refused native XDP (%v): generic mode", err)
			a.Mode = ModeXDPGeneric
			lk, err = try(link.XDPGenericMode)
		}
	}
	if err != nil {
		return a, fmt.Errorf("attach XDP decap to ifindex %d: %w", ifindex, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		return a, fmt.Errorf("pin XDP link on ifindex %d at %s: %w", ifindex, pin, err)
	}
	return a, nil
}

// xdpModeOf reads the XDP mode of an interface from the kernel (for adopted links, whose mode
// was chosen by an earlier process).
func xdpModeOf(ifindex int) string {
	const xdpAttachedSKB = 2 // XDP_ATTACHED_SKB in if_link.h
	lk, err := netlink.LinkByIndex(ifindex)
	if err == nil && lk.Attrs().Xdp != nil && lk.Attrs().Xdp.AttachMode == xdpAttachedSKB {
		return ModeXDPGeneric
	}
	return ModeXDPDriver
}

// Detach removes what is attached at (ifindex, hook): the pinned link, or our clsact filter.
// Nothing attached is not an error.
func (l *Loader) Detach(ifindex int, hook Hook) error {
	pin := l.linkPin(ifindex, hook)
	if lk, err := link.LoadPinnedLink(pin, nil); err == nil {
		// Unpinning drops the last reference once our handle closes: the link detaches.
		errU := lk.Unpin()
		lk.Close()
		if errU != nil {
			return fmt.Errorf("unpin %s: %w", pin, errU)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	if hook == XDP {
		return nil
	}
	filter := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: clsactParent(hook),
		Handle: clsactHandle, Protocol: unix.ETH_P_ALL, Priority: clsactPriority}}
	if err := netlink.FilterDel(filter); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove cls_bpf filter from %s of ifindex %d: %w", hook, ifindex, err)
	}
	return nil
}

// PinnedLinks lists the attachments pinned in the directory (ifindex and hook), dead or alive.
func (l *Loader) PinnedLinks() ([]Attachment, error) {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, fmt.Errorf("read pin directory %s: %w", l.dir, err)
	}
	var out []Attachment
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "link_")
		if !ok {
			continue
		}
		hook, idx, ok := strings.Cut(rest, "_")
		ifindex, err := strconv.Atoi(idx)
		if !ok || err != nil {
			continue
		}
		out = append(out, Attachment{Ifindex: ifindex, Hook: Hook(hook)})
	}
	return out, nil
}

// PruneDead removes the pins of links whose interface is gone (containers that stopped while
// xnetd was down) and returns how many it removed.
func (l *Loader) PruneDead() (int, error) {
	pinned, err := l.PinnedLinks()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, a := range pinned {
		pin := l.linkPin(a.Ifindex, a.Hook)
		lk, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			continue
		}
		if !alive(lk) {
			if err := lk.Unpin(); err == nil {
				n++
			}
		}
		lk.Close()
	}
	return n, nil
}
