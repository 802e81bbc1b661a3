// Package xnetdtest runs the real xnetd binary on the harness's simulated hosts and reads what
// it reports, for the end-to-end test packages (test/e2e, test/e2e/ipv6, test/e2e/docker): a
// cluster of hosts with etcd and one xnetd each (Node, Cluster), its state file, `xnetd
// status`, `xnetd check` and metrics, its teardown, the leases in etcd, pings between the
// containers of every host (Mesh), and peer health faults (RunHealthFault).
//
// It owns no simulated host, etcd or container itself: test/harness builds those and removes
// them when the test ends. Each test package is a test binary of its own, so each builds xnetd
// once (harness.BuildXnetd); go test runs the packages side by side.
package xnetdtest
