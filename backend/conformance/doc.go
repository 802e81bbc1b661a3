// Package conformance is the behaviour every backend owes a user, tested the same way against
// each of them: containers on simulated hosts (test/harness) reach each other once the hosts
// have added each other's leases, stop reaching a removed peer, survive a refused lease, a
// restart of the daemon and a prune of peers whose leases went away, and a teardown leaves
// nothing behind. The cases see a backend only through backend.Backend, backend.PeerPruner and
// metrics.CounterSource, never its devices, maps or routes, so that a new backend joins the
// suite with one row of the table in conformance_test.go and what the suite demands of it is
// what xnetd and its users rely on.
//
// It owns no code that runs in xnetd: the tests, and the fixtures the backends' own tests share
// with them (hosts.go: a harness host's underlay interface and a netlink handle in its
// namespace). What a backend programs, and how, is tested in the backend's own package (vxlan's
// flannel-compatible entries, udp's packet classification, ebpf's pinned maps, headroom and
// decap length checks).
package conformance
