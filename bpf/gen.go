// Package bpf holds the xnet datapath's BPF programs (C, in this directory) and the Go bindings
// bpf2go generates from them: the compiled object embedded in the binary, and a Go type for every
// struct and enum in xnet.h (consts.h and structs.h), so Go and C share one layout by construction.
//
// It owns the packet path (encapsulation, decapsulation, the acceptance rules, the counters) and
// nothing else: loading, attaching and pinning are package loader, typed map access is package maps.
//
// Regenerate with `make generate` (clang, llvm-strip and libbpf-dev needed); CI fails when the
// committed files differ from what that produces.
package bpf

//go:generate go tool bpf2go -go-package bpf -target bpfel -cflags "-O2 -g -Wall -I/usr/include/x86_64-linux-gnu" -type verdict -type route_key -type route -type peer_stats -type counter -type endpoint -type nexthop -type host_config -type route6_key -type route6 -type host_config6 -type icmp_bucket -type icmp_ratelimit Xnet xnet.c
