// Package dockernet gives Docker multi-host networks without Swarm: xnetd serves Docker's
// remote network-driver and IPAM plugin protocols as the driver "xnet", so that
//
//	docker network create -d xnet --ipam-driver xnet [--subnet 10.250.0.0/16] [-o xnet.block-len=24] NAME
//
// on any host creates NAME on every host of the cluster, and containers on it reach each other
// across hosts, by address and by name.
//
// It owns: the plugin socket and protocol (plugin.go, protocol.go); the reconciliation between
// etcd, this host's Docker and this host's devices (manager.go); the per-network datapath, one
// Linux bridge and one kernel VXLAN device per network, and the nftables table that isolates
// networks from each other (datapath.go); container addresses inside this host's block
// (ipam.go); the resolver for names (dns.go); the status section (status.go). It does not own
// the etcd keys (subnetmgr/networks.go), the lease engine (subnetmgr), the VXLAN device's
// per-peer programming (backend/vxlan, reused as is), or Docker's FORWARD chain (fwrules
// accepts the bridges there when xnetd runs with --docker-networks).
//
// Design history.
//
// Docker's own multi-host networks (the overlay driver with --cluster-store, as in the seed
// tutorial's Consul setup) needed a key-value store in dockerd, which Docker removed in 23.0,
// or Swarm. xnet already has etcd on every host, so the cluster state lives there: a network
// record under <prefix>/networks/<name> (subnet, VNI, port, block length, options), one block
// of the network per host leased exactly like an overlay subnet (create-only transaction, TTL,
// renewal), and each container's address and name. Every xnetd watches the records and creates
// each network in its own dockerd through the Docker API, so the plugin declares scope
// "local": every dockerd keeps its own copy, which is what Docker does for networks it did not
// get from Swarm.
//
// The driver never learns a network's name: Docker sends only an ID, the subnet and the -o
// options (measured on 20.10; labels are not sent either), and cannot be asked before the
// create returns. So a user's create is checked at once where it can be (the subnet against the
// overlay and every network of the cluster, the options, IPv6, the IPAM driver: errors go back
// through Docker's error channel and name the flag), and written to etcd a moment later, when
// Docker's create event names it. A create that loses a race in that moment (another host
// created the name with other settings, or an overlapping subnet) is removed from this host's
// Docker again and the cluster's network takes its place; the log says so.
//
// Datapath: routed, as flannel routes between hosts. Each host's block gets a bridge
// (xnbr.<VNI>) holding the block's first address, with the containers' veths as ports; each
// container gets an address of the block and a route to the whole network through that address.
// Other hosts' blocks are reached through the network's kernel VXLAN device (xnet.<VNI>), set up
// by the overlay's vxlan backend with the network's subnet, VNI and port: one route, one
// permanent neighbour and one fdb entry per block, nothing learned, so a restart loses nothing
// and the first packet to a new container needs nothing but its host's block. Containers get no
// default gateway from us, so Docker attaches them to docker_gwbridge for the rest of the world,
// as it does for its own overlay. A network's VNI is the top 24 bits of its subnet (networks are
// /24 or larger and never overlap, so VNIs never collide), and its UDP port is the overlay's
// port + 2 (8474; 8473 is the health probes'), so its packets never meet the overlay's datapath,
// whichever backend that is.
//
// Isolation: because blocks are routed by the host, a container could reach another network
// through any forwarding path of the host (docker_gwbridge forwards anywhere). An nftables
// table of our own accepts, per network, only bridge to bridge, bridge to its VXLAN device and
// back, and drops and counts anything else entering or leaving either device. A drop in any
// nftables table is final, so Docker's rules cannot undo it. VNIs keep the networks apart on
// the wire; the table keeps them apart in the host.
//
// Names: see dns.go.
package dockernet
