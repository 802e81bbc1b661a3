# xnet: make build | test | demo | bench | bench-scale | generate | install
GO      ?= go
BIN     := bin/xnetd
PREFIX  ?= /usr/local
# Tests create network namespaces and load BPF programs: they need root. They run one package
# at a time per CPU and each names what it creates uniquely, so packages may run in parallel.
# The end-to-end tests are three packages (test/e2e/...) for that reason: one of 9 minutes was
# most of the run, with the other CPU idle.
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all build test vet lint unit demo bench bench-scale generate check-generated install clean deps

all: build

build:
	$(GO) build -o $(BIN) ./cmd/xnetd

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

lint: vet
	$(GO) tool staticcheck ./...

unit:
	$(GO) test $(TESTFLAGS) ./...

# The README's test command: formatting, vet, staticcheck, then every test (as root).
test: lint unit

# A 3-host cluster in network namespaces with an embedded etcd; cleans up on exit and Ctrl-C.
DEMO_FLAGS ?=
demo: build
	$(GO) run ./test/cmd/demo -xnetd $(BIN) $(DEMO_FLAGS)

# The benchmark protocol (docs/design.md, Benchmark protocol); installs iperf3 from Debian if it is missing.
# Besides each backend: ebpf with --flow-steering=rps (+rps), with a container bridge not named docker0 (+bridge=cbr0), from the
# host itself (+host), through the host's stack (+kernel), with DirectRouting, and over IPv6 in a
# dual-stack overlay (+v6, which adds the baselines' IPv6 twins: inside the IPv4 VXLAN; +v6ul:
# VXLAN over an IPv6 underlay, as flannel's IPv6 baseline).
BENCH_BACKENDS ?= ebpf,ebpf+rps,ebpf+bridge=cbr0,ebpf+host,ebpf+kernel,ebpf-direct,ebpf+v6,ebpf+v6ul,vxlan,udp,host-gw,wireguard
BENCH_ROUNDS   ?= 3
bench: build
	@command -v iperf3 >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3)
	$(GO) run ./test/cmd/bench -xnetd $(BIN) -out bench -backends $(BENCH_BACKENDS) -rounds $(BENCH_ROUNDS)

# Control-plane scale (docs/design.md, Targets): 5,000 leases into a new xnetd, commit-to-map latency
# for 50 watchers, etcd requests per node at steady state. See bench/scale.md.
SCALE_FLAGS ?=
bench-scale:
	$(GO) run ./test/cmd/scale $(SCALE_FLAGS)

# Rebuild the BPF objects and their Go bindings (needs clang, llvm, libbpf-dev).
generate:
	$(GO) generate ./bpf/...

# CI: the committed generated files must be what `make generate` produces.
check-generated: generate
	@git diff --exit-code --stat -- bpf/ || (echo "generated BPF files are stale: run 'make generate' and commit"; exit 1)

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/xnetd
	install -D -m 0644 packaging/xnetd.service $(DESTDIR)/etc/systemd/system/xnetd.service
	install -D -m 0644 packaging/docker-xnet.conf $(DESTDIR)/etc/systemd/system/docker.service.d/xnet.conf
	install -D -m 0644 packaging/config.json $(DESTDIR)/etc/xnet/config.json.example

clean:
	rm -rf bin
