package backend

import (
	"strings"
	"time"
)

// A backend whose datapath is the xnetd process (udp, the embedded wireguard-go) hands its TUN
// queues and sockets to the service manager's fd store, so that packets the kernel queues on
// them while xnetd restarts are read by the next process instead of dropped (package fdstore).
// It stores them under FDName(its registry name, what), so xnetd can tell, before a backend's
// Setup, which stored fds another backend left (the config or --backend changed): those are
// dropped first, as one of them may hold the port or device the new backend needs.

// FDName is the name backend stores the fd what under: "xnet-udp-tun-0".
func FDName(backend, what string) string { return "xnet-" + backend + "-" + what }

// OwnsFD says whether the stored fd name is one of backend's (see FDName).
func OwnsFD(backend, name string) bool { return strings.HasPrefix(name, "xnet-"+backend+"-") }

// HandoverHold is the longest a backend leaves the queues it took over unread while it waits
// for xnetd to program the first lease list (PrunePeers follows it): read earlier, what waited
// on them for a peer not programmed yet would be dropped. xnetd lists the leases right after
// Setup; the bound only keeps a daemon stuck on etcd from leaving the queues unread for good.
const HandoverHold = 10 * time.Second
