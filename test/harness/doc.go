// Package harness builds simulated xnet hosts in Linux network namespaces, for the end-to-end
// tests, `make demo` and `make bench`.
//
// A Topology is one underlay namespace holding a bridge (br0, 198.18.0.1/24), N host namespaces
// each with an eth0 veth on that bridge (198.18.0.11, .12, ...; default route via .1), and, once a
// test plays Docker, a docker0 bridge per host with container namespaces on veths. An embedded
// etcd serves the whole topology at 198.18.0.1:2379. The harness runs commands and long-lived
// processes inside the namespaces and removes everything it made on Close.
//
// What it owns: namespaces, links, addresses and routes inside them, the processes it starts,
// per-host state directories and bpffs pin directories, the embedded etcd. What it does not own:
// anything in the root network namespace (it adds no link, address or route there, so topologies
// of parallel test packages never collide), and the datapath under test (xnetd configures that;
// the two reference datapaths of the benchmark, host-gw routes and flannel's kernel VXLAN setup,
// are configured by ConfigureHostGW and ConfigureFlannelVXLAN).
//
// Design history.
//
// Names: every namespace is "xn-<id>-<role>" where id is a random 6-character run id, so
// several topologies (from different test packages running at once) coexist, and a crashed
// run's leftovers can be found and removed by its id alone (CleanupStale) without touching any
// other run's. Links are created directly inside their namespaces (`ip -n U link add ... peer
// name eth0 netns H`), so no link ever appears in the root namespace, not even for a moment.
//
// etcd: the test process runs etcd on loopback in the root namespace (so it needs no route into
// the topology), and opens a listener on 198.18.0.1:2379 inside the underlay namespace that
// relays each connection to it. A socket keeps the namespace it was created in, so the listener
// is created on a locked OS thread switched into the underlay namespace, and accepted from any
// goroutine afterwards.
//
// Processes run through `nsenter --net=/run/netns/<name>`, not `ip netns exec`, which remounts
// /sys and would hide the bpffs pins xnetd makes. Each process gets its own process group (Stop
// reaches its children) and the parent-death signal SIGKILL (a test binary killed by a timeout
// does not leave daemons running). Close also kills any process still living in one of the run's
// namespaces, found through /proc/<pid>/ns/net.
//
// systemd: xnetd started with StartXnetdUnder runs under a ServiceManager, which plays systemd's
// side of the notify socket and the fd store, and passes the stored fds to the next xnetd it
// starts as systemd passes them to a restarted service (LISTEN_PID set in the child by a shell
// that execs the command, so the pid is the daemon's).
//
// Ping is done in Go over a raw ICMP socket opened inside the source namespace, so the harness
// needs nothing beyond Go and iproute2 (the ping binary is often missing).
package harness
