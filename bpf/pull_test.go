package bpf

import (
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// nsThread runs functions on one locked OS thread inside a new, unnamed network namespace.
// The namespace has no name under /run/netns and disappears with the thread when the test
// ends, whatever happens in between.
type nsThread struct {
	ns   netns.NsHandle
	work chan func()
	done chan struct{}
}

func newNSThread(t *testing.T) *nsThread {
	t.Helper()
	th := &nsThread{work: make(chan func()), done: make(chan struct{})}
	errc := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		ns, err := netns.New()
		if err != nil {
			errc <- err
			return
		}
		th.ns = ns
		errc <- nil
		for fn := range th.work {
			fn()
			th.done <- struct{}{}
		}
		ns.Close()
	}()
	must(t, <-errc)
	t.Cleanup(func() { close(th.work) })
	return th
}

func (th *nsThread) do(fn func()) {
	th.work <- fn
	<-th.done
}

// linearObserver is a TC program that records, in slot of m, the largest linear length
// (data_end - data) of the packets of over 1000 bytes it sees, and in slot+1 how many it saw. It
// passes every packet on (TCX_NEXT).
func linearObserver(t *testing.T, m *ebpf.Map, slot int32) *ebpf.Program {
	t.Helper()
	lookup := func(key int32) asm.Instructions {
		load := asm.LoadMapPtr(asm.R1, 0)
		must(t, load.AssociateMap(m))
		return asm.Instructions{
			asm.StoreImm(asm.RFP, -4, int64(key), asm.Word),
			load,
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "exit"),
		}
	}
	ins := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R6, skbLen, asm.Word),
		asm.JLT.Imm(asm.R7, 1000, "exit"),
		asm.LoadMem(asm.R8, asm.R6, skbData, asm.Word),
		asm.LoadMem(asm.R9, asm.R6, skbDataEnd, asm.Word),
		asm.Sub.Reg(asm.R9, asm.R8),
	}
	ins = append(ins, lookup(slot+1)...)
	ins = append(ins,
		asm.Mov.Imm(asm.R1, 1),
		asm.AddAtomic.Mem(asm.R0, asm.R1, asm.Word, 0),
	)
	ins = append(ins, lookup(slot)...)
	ins = append(ins,
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JGE.Reg(asm.R1, asm.R9, "exit"),
		asm.StoreMem(asm.R0, 0, asm.R9, asm.Word),
		asm.Mov.Imm32(asm.R0, -1).WithSymbol("exit"), // TCX_NEXT
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: ins})
	must(t, err)
	t.Cleanup(func() { prog.Close() })
	return prog
}

// decap_tc sits on the host's main NIC: traffic that is not VXLAN for us must reach the stack as
// it came, not linearised. A TCP stream over a veth arrives as paged skbs whose linear part
// holds only the headers; an observer before decap_tc and one after it compare that part.
func TestDecapDoesNotLineariseForeignTraffic(t *testing.T) {
	requireRoot(t)
	host, peer := newNSThread(t), newNSThread(t)
	var (
		ifindex int
		err     error
	)
	host.do(func() {
		err = func() error {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "u0", MTU: 1500}, PeerName: "u1", PeerNamespace: netlink.NsFd(peer.ns)}
			if err := netlink.LinkAdd(veth); err != nil {
				return fmt.Errorf("add veth: %w", err)
			}
			u0, err := netlink.LinkByName("u0")
			if err != nil {
				return err
			}
			ifindex = u0.Attrs().Index
			if err := netlink.AddrAdd(u0, &netlink.Addr{IPNet: &net.IPNet{IP: localIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
				return err
			}
			return netlink.LinkSetUp(u0)
		}()
	})
	must(t, err)
	peer.do(func() {
		err = func() error {
			u1, err := netlink.LinkByName("u1")
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(u1, &netlink.Addr{IPNet: &net.IPNet{IP: peerIP.AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
				return err
			}
			return netlink.LinkSetUp(u1)
		}()
	})
	must(t, err)

	objs := load(t, uint32(ifindex))
	seen, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 4})
	must(t, err)
	t.Cleanup(func() { seen.Close() })
	const before, after = 0, 2
	var ln net.Listener
	host.do(func() {
		err = func() error {
			for _, p := range []struct {
				prog   *ebpf.Program
				anchor link.Anchor
			}{
				{objs.DecapTc, link.Head()},
				{linearObserver(t, seen, before), link.Head()},
				{linearObserver(t, seen, after), link.Tail()},
			} {
				l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: p.prog, Attach: ebpf.AttachTCXIngress, Anchor: p.anchor})
				if err != nil {
					return fmt.Errorf("attach tcx: %w", err)
				}
				t.Cleanup(func() { l.Close() })
			}
			ln, err = net.Listen("tcp4", net.JoinHostPort(localIP.String(), "0"))
			return err
		}()
	})
	must(t, err)
	t.Cleanup(func() { ln.Close() })
	received := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		received <- n
	}()
	var conn net.Conn
	peer.do(func() { conn, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second) })
	must(t, err)
	const total = 4 << 20
	_, err = conn.Write(make([]byte, total))
	must(t, err)
	must(t, conn.Close())
	select {
	case n := <-received:
		if n != total {
			t.Fatalf("received %d bytes of %d", n, total)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the stream did not arrive in 20 s")
	}

	var linBefore, nBefore, linAfter, nAfter uint32
	must(t, seen.Lookup(uint32(before), &linBefore))
	must(t, seen.Lookup(uint32(before+1), &nBefore))
	must(t, seen.Lookup(uint32(after), &linAfter))
	must(t, seen.Lookup(uint32(after+1), &nAfter))
	t.Logf("%d large packets; largest linear part %d bytes before decap_tc, %d after", nBefore, linBefore, linAfter)
	const classifyBytes = 14 + 60 + 8 + 8 + 14 + 40 // XNET_CLASSIFY_BYTES
	if nBefore == 0 || nAfter != nBefore || linBefore >= classifyBytes {
		t.Fatalf("the test saw %d/%d large packets with a largest linear part of %d bytes: it needs paged skbs with less than %d linear bytes to see a pull",
			nBefore, nAfter, linBefore, classifyBytes)
	}
	if linAfter != linBefore {
		t.Errorf("decap_tc pulled TCP that is not VXLAN into the linear part: %d bytes, it came with %d", linAfter, linBefore)
	}
}
