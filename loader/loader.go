// Package loader puts the datapath (package bpf) into the kernel and keeps it there: it loads
// the programs, creates or re-adopts the maps pinned under the bpffs directory (--bpffs,
// default /sys/fs/bpf/xnet), attaches programs to interfaces and pins the attachments, so the
// datapath outlives xnetd.
//
// It owns the pin directory and the attachments. It does not know what the maps mean (package
// maps) or which interfaces need which program (package backend/ebpf).
//
// Design history:
//
// A restart must never detach the datapath (docs/design.md, Restart and upgrade: kill -9 and restart under traffic loses
// no packet). So every attachment is a bpf_link pinned in the directory: the kernel keeps it
// when the process dies, and the next xnetd opens the pin and swaps its freshly loaded program
// in with one atomic link update (measured: 5 swaps under a 10 ms ping, 0 lost). Maps are
// re-adopted from their pins, so routes, counters and learned containers survive too.
//
// A new build may change a map's layout. Keeping a pinned map whose layout no longer matches
// the programs would corrupt every lookup, and cilium/ebpf's own check only compares sizes and
// flags. So each pinned map's BTF key and value types are compared with the new object's
// (layoutOf); a map that differs is created anew, pinned in place of the old one with an
// atomic rename, and the new programs use it, while the old programs keep their old map until
// their link is swapped. When the new layout only adds to the old one (a member where padding
// was, or at the end), the old entries are carried over (migrate.go): the routes of every peer
// are there from the first packet the new programs see. Otherwise that map's contents restart
// empty until the backend rewrites routes and config; counters always restart.
//
// TCX links (kernel 6.6+) are the attachment of choice: pinnable, atomic to update, and they
// coexist with other TC programs. On older kernels the programs go into a clsact qdisc as
// cls_bpf direct-action filters with a fixed handle; the kernel keeps those without pins and a
// replace is atomic as well. XDP uses an XDP link, driver mode first, generic mode as a logged
// fallback.
package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/xnet-dev/xnet/bpf"
	"github.com/xnet-dev/xnet/maps"
)

// DefaultDir is where xnetd pins by default.
const DefaultDir = "/sys/fs/bpf/xnet"

// Options configure Load.
type Options struct {
	// Dir is the pin directory; it is created, and bpffs mounted where needed.
	Dir    string
	Logger *slog.Logger
	// NoTCX attaches TC programs through clsact even where TCX exists (tests, and hosts whose
	// other tools cannot cope with TCX).
	NoTCX bool
}

// Loader is the loaded datapath: programs, maps and the pin directory.
type Loader struct {
	dir      string
	log      *slog.Logger
	noTCX    bool
	progs    bpf.XnetPrograms // DecapXdp nil when xdpErr is set
	maps     bpf.XnetMaps
	replaced []string
	// xdpErr is why the kernel refused the XDP decap program. The TC programs are the
	// datapath; XDP is an optional earlier hook, so a kernel without it (or without
	// bpf_xdp_adjust_meta for XDP, as some builds are) still runs everything else.
	xdpErr error
}

// tcPrograms are the programs the datapath cannot run without. They load first, as one
// collection; decap_xdp loads on its own (loadXDP).
type tcPrograms struct {
	EncapContainer *ebpf.Program `ebpf:"encap_container"`
	EncapHost      *ebpf.Program `ebpf:"encap_host"`
	DecapTc        *ebpf.Program `ebpf:"decap_tc"`
	DeliverBridge  *ebpf.Program `ebpf:"deliver_bridge"`
	DecapTunnel    *ebpf.Program `ebpf:"decap_tunnel"`
}

// loadXDP loads decap_xdp against the maps already loaded.
func loadXDP(spec *ebpf.CollectionSpec, m *bpf.XnetMaps) (*ebpf.Program, error) {
	var objs struct {
		DecapXdp *ebpf.Program `ebpf:"decap_xdp"`
	}
	replace := maps.FromObjects(m).ByName()
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: replace}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("the verifier refuses decap_xdp: %s", ve.Log[len(ve.Log)-min(len(ve.Log), 2)])
		}
		return nil, fmt.Errorf("load decap_xdp: %w", err)
	}
	return objs.DecapXdp, nil
}

// Load loads the programs and creates or re-adopts the maps under opts.Dir. It attaches
// nothing: Attach* does. Close releases the process's handles without detaching anything.
func Load(opts Options) (*Loader, error) {
	dir := opts.Dir
	if dir == "" {
		dir = DefaultDir
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := ensureBPFFS(dir, log); err != nil {
		return nil, err
	}
	spec, err := bpf.LoadXnet()
	if err != nil {
		return nil, fmt.Errorf("read the embedded datapath object: %w", err)
	}
	// The .bss map only anchors enum verdict in the BTF; nothing uses it.
	for name := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			delete(spec.Maps, name)
		}
	}
	for name := range spec.Variables {
		delete(spec.Variables, name)
	}

	l := &Loader{dir: dir, log: log, noTCX: opts.NoTCX}
	adopted := map[string]*ebpf.Map{}
	outdated := map[string]*ebpf.Map{} // pinned maps being replaced, until their entries are carried over
	defer func() {
		for _, m := range adopted {
			m.Close()
		}
		for _, m := range outdated {
			m.Close()
		}
	}()
	for name, ms := range spec.Maps {
		ms.Pinning = ebpf.PinNone // pins are ours to manage (see pinMap)
		path := filepath.Join(dir, name)
		old, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		if why := mismatch(ms, old); why != "" {
			log.Warn("pinned map does not fit the new programs: replacing it", "map", path, "reason", why)
			outdated[name] = old
			l.replaced = append(l.replaced, name)
			continue
		}
		adopted[name] = old
	}

	var objs struct {
		tcPrograms
		bpf.XnetMaps
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: adopted}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load datapath programs (verifier): %+v: %w", ve, ebpf.ErrNotSupported)
		}
		return nil, fmt.Errorf("load datapath programs: %w", err)
	}
	l.maps = objs.XnetMaps
	l.progs = bpf.XnetPrograms{EncapContainer: objs.EncapContainer, EncapHost: objs.EncapHost, DecapTc: objs.DecapTc,
		DeliverBridge: objs.DeliverBridge, DecapTunnel: objs.DecapTunnel}
	l.progs.DecapXdp, l.xdpErr = loadXDP(spec, &l.maps)
	if l.xdpErr != nil {
		log.Info("XDP decapsulation unavailable on this kernel; TC decapsulates", "err", l.xdpErr)
	}

	for name, m := range maps.FromObjects(&l.maps).ByName() {
		if _, ok := adopted[name]; ok {
			continue
		}
		if old, ok := outdated[name]; ok {
			n, why := carryOver(spec.Maps[name], old, m)
			log.Info("entries of the replaced map", "map", name, "carried_over", n, "not_carried_because", why)
		}
		if err := pinAtomically(m, filepath.Join(dir, name)); err != nil {
			l.Close()
			return nil, err
		}
	}
	// Programs are pinned too (prog_<name>), so `bpftool prog show pinned <dir>/prog_decap_tc`
	// finds this datapath's programs among others of the same name (bpftool 7.1 shows TCX
	// links only as "type 11"). A restart re-pins the new build's programs in place.
	for p, prog := range map[Program]*ebpf.Program{
		EncapContainer: l.progs.EncapContainer, EncapHost: l.progs.EncapHost, DecapTC: l.progs.DecapTc, DecapXDP: l.progs.DecapXdp,
		DeliverBridge: l.progs.DeliverBridge, DecapTunnel: l.progs.DecapTunnel,
	} {
		if prog == nil {
			_ = os.Remove(ProgramPin(dir, p)) // an older build's program, which this one does not run
			continue
		}
		if err := pinAtomically(prog, ProgramPin(dir, p)); err != nil {
			l.Close()
			return nil, err
		}
	}
	log.Info("datapath loaded", "bpffs", dir, "adopted_maps", len(adopted), "replaced_maps", l.replaced)
	return l, nil
}

// XDPUnavailable says why this kernel refused the XDP decap program (nil when it loaded).
func (l *Loader) XDPUnavailable() error { return l.xdpErr }

// Dir is the pin directory.
func (l *Loader) Dir() string { return l.dir }

// Maps is typed access to the loaded maps (owned by the Loader: do not close).
func (l *Loader) Maps() *maps.Maps { return maps.FromObjects(&l.maps) }

// Replaced names the pinned maps Load found with another layout and replaced.
func (l *Loader) Replaced() []string { return append([]string(nil), l.replaced...) }

// Close releases the process's handles. Pinned maps and attachments stay in the kernel.
func (l *Loader) Close() error {
	return errors.Join(l.progs.Close(), l.maps.Close())
}

// Teardown detaches everything this datapath attached (every pinned link in the directory),
// removes the pins and the directory, and closes the Loader. clsact filters are removed by the
// caller (DetachTC) since they have no pins.
func (l *Loader) Teardown() error {
	_, err := RemovePins(l.dir)
	return errors.Join(err, l.Close())
}

// RemovePins unlinks every pin under dir (a pinned link detaches its program once no process
// holds it), then dir itself unless it is a mount point (a bpffs of its own: EBUSY), which
// stays, empty. It returns how many pins it removed; a missing dir is not an error. It serves
// Teardown and `xnetd teardown`, which runs without loading the programs.
func RemovePins(dir string) (int, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("pin directory %s: %w", dir, err)
	}
	n := 0
	var errs []error
	for _, e := range entries {
		// bpffs refuses dots in pin names, so a dotted name is never ours: the root of a bpffs
		// mount holds the kernel's own maps.debug and progs.debug, which cannot be removed.
		if strings.Contains(e.Name(), ".") {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("remove pin %s: %w", filepath.Join(dir, e.Name()), err))
			continue
		}
		n++
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.EBUSY) {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return n, errors.Join(errs...)
}

// ProgramPin is where Load pins program p under dir.
func ProgramPin(dir string, p Program) string { return filepath.Join(dir, "prog_"+string(p)) }

// pinAtomically pins m (a map or a program) at path, replacing whatever is pinned there in one
// rename, so a reader of the path sees the old object or the new one, never nothing.
func pinAtomically(m interface{ Pin(string) error }, path string) error {
	// bpffs refuses names with dots.
	tmp := filepath.Join(filepath.Dir(path), "tmp_"+filepath.Base(path))
	_ = os.Remove(tmp)
	if err := m.Pin(tmp); err != nil {
		return fmt.Errorf("pin at %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("move pin %s into place: %w", path, err)
	}
	return nil
}

// mismatch says why a pinned map cannot serve the new programs, or "" when it can: sizes, type
// and flags (cilium/ebpf's check) and the BTF layout of key and value.
func mismatch(ms *ebpf.MapSpec, m *ebpf.Map) string {
	if err := ms.Compatible(m); err != nil {
		return err.Error()
	}
	pinned, err := pinnedBTF(m)
	if err != nil {
		return err.Error()
	}
	for _, want := range []btf.Type{ms.Key, ms.Value} {
		if want == nil {
			continue
		}
		// Every named type is compared: a struct's members, and typedefs too, since a key
		// that was a __u32 and became an ipv4_addr (bytes in wire order) has the same size
		// but another BTF, and bpftool would go on printing the old one. Anonymous types
		// have nothing to find them by in the pinned BTF; the size check covers them.
		name := want.TypeName()
		if name == "" {
			continue
		}
		// A map's BTF may hold a common name (__u32) more than once; one with our layout is
		// enough.
		got, err := pinned.AnyTypesByName(name)
		if err != nil || len(got) == 0 {
			return fmt.Sprintf("type %s missing from the pinned map's BTF", name)
		}
		b := layoutOf(want)
		if !slices.ContainsFunc(got, func(t btf.Type) bool { return layoutOf(t) == b }) {
			return fmt.Sprintf("layout of %s changed from %s to %s", name, layoutOf(got[0]), b)
		}
	}
	return ""
}

// layoutOf renders a type's memory layout: names, offsets, sizes and encodings of every member,
// recursively, ignoring qualifiers.
func layoutOf(t btf.Type) string {
	var b strings.Builder
	var walk func(t btf.Type, depth int)
	walk = func(t btf.Type, depth int) {
		if depth > 8 {
			b.WriteString("...")
			return
		}
		switch v := btf.UnderlyingType(t).(type) {
		case *btf.Struct:
			fmt.Fprintf(&b, "struct(%d){", v.Size)
			for _, m := range v.Members {
				fmt.Fprintf(&b, "%s@%d:", m.Name, m.Offset)
				walk(m.Type, depth+1)
				b.WriteString(";")
			}
			b.WriteString("}")
		case *btf.Union:
			fmt.Fprintf(&b, "union(%d){", v.Size)
			for _, m := range v.Members {
				fmt.Fprintf(&b, "%s@%d:", m.Name, m.Offset)
				walk(m.Type, depth+1)
				b.WriteString(";")
			}
			b.WriteString("}")
		case *btf.Array:
			fmt.Fprintf(&b, "[%d]", v.Nelems)
			walk(v.Type, depth+1)
		case *btf.Int:
			fmt.Fprintf(&b, "int%d/%v", v.Size*8, v.Encoding)
		case *btf.Enum:
			fmt.Fprintf(&b, "enum%d", v.Size*8)
		default:
			fmt.Fprintf(&b, "%T", v)
		}
	}
	walk(t, 0)
	return b.String()
}
