package dockernet

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// handler routes Docker's plugin calls to the Manager.
func (m *Manager) handler() http.Handler {
	mux := http.NewServeMux()
	route := func(path string, h http.HandlerFunc) { mux.Handle("POST "+path, h) }
	route("/Plugin.Activate", handle(m.log, func(context.Context, empty) (activateResponse, error) {
		return activateResponse{Implements: []string{"NetworkDriver", "IpamDriver"}}, nil
	}))

	// Scope "local": every dockerd keeps its own object of the network, which xnetd creates on
	// each host from etcd; "global" is for Swarm's store, which this replaces. Connectivity is
	// global: containers of the network on every host reach each other.
	route("/NetworkDriver.GetCapabilities", handle(m.log, func(context.Context, empty) (capabilitiesResponse, error) {
		return capabilitiesResponse{Scope: "local", ConnectivityScope: "global"}, nil
	}))
	route("/NetworkDriver.CreateNetwork", handle(m.log, m.createNetwork))
	route("/NetworkDriver.DeleteNetwork", handle(m.log, m.deleteNetwork))
	route("/NetworkDriver.CreateEndpoint", handle(m.log, m.createEndpoint))
	route("/NetworkDriver.EndpointOperInfo", handle(m.log, func(context.Context, endpointRequest) (operInfoResponse, error) {
		return operInfoResponse{Value: map[string]any{}}, nil
	}))
	route("/NetworkDriver.DeleteEndpoint", handle(m.log, m.deleteEndpoint))
	route("/NetworkDriver.Join", handle(m.log, m.join))
	route("/NetworkDriver.Leave", handle(m.log, m.leave))
	for _, ack := range []string{"AllocateNetwork", "FreeNetwork", "DiscoverNew", "DiscoverDelete",
		"ProgramExternalConnectivity", "RevokeExternalConnectivity"} {
		route("/NetworkDriver."+ack, handle(m.log, func(context.Context, map[string]any) (empty, error) { return empty{}, nil }))
	}

	route("/IpamDriver.GetCapabilities", handle(m.log, func(context.Context, empty) (ipamCapabilitiesResponse, error) {
		// No replay: the allocations live in xnetd (rebuilt from Docker after a restart).
		return ipamCapabilitiesResponse{}, nil
	}))
	route("/IpamDriver.GetDefaultAddressSpaces", handle(m.log, func(context.Context, empty) (addressSpacesResponse, error) {
		return addressSpacesResponse{LocalDefaultAddressSpace: localAddressSpace, GlobalDefaultAddressSpace: globalAddressSpace}, nil
	}))
	route("/IpamDriver.RequestPool", handle(m.log, m.requestPool))
	route("/IpamDriver.ReleasePool", handle(m.log, func(context.Context, poolRequest) (empty, error) { return empty{}, nil }))
	route("/IpamDriver.RequestAddress", handle(m.log, m.requestAddress))
	route("/IpamDriver.ReleaseAddress", handle(m.log, m.releaseAddress))
	return mux
}

// requestPool is the first call of `docker network create --ipam-driver xnet`: where bad
// input is refused, before anything is created.
func (m *Manager) requestPool(_ context.Context, req requestPoolRequest) (requestPoolResponse, error) {
	if req.V6 {
		return requestPoolResponse{}, fmt.Errorf("--ipv6: xnet networks are IPv4 only")
	}
	if req.SubPool != "" {
		return requestPoolResponse{}, fmt.Errorf("--ip-range %s: not supported, each host gets a block of the network from etcd", req.SubPool)
	}
	for k := range req.Options {
		return requestPoolResponse{}, fmt.Errorf("--ipam-opt %s: the %s IPAM driver takes no options", k, DriverName)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.haveState {
		return requestPoolResponse{}, fmt.Errorf("xnetd has not read the cluster's networks from etcd yet: try again in a moment")
	}
	var subnet netip.Prefix
	var err error
	if req.Pool == "" {
		subnet, err = m.freeSubnetLocked()
	} else if subnet, err = parseSubnet(req.Pool); err == nil {
		if _, mirror := m.expectCreate[subnet]; !mirror {
			err = m.checkSubnetLocked(subnet)
		}
	}
	if err != nil {
		return requestPoolResponse{}, err
	}
	return requestPoolResponse{PoolID: poolIDPrefix + subnet.String(), Pool: subnet.String()}, nil
}

// requestAddress hands out the network's gateway (its first address, which Docker records
// but no container uses: each host routes through its own block's first address) and
// container addresses from this host's block.
func (m *Manager) requestAddress(ctx context.Context, req requestAddressRequest) (requestAddressResponse, error) {
	subnet, err := subnetOfPool(req.PoolID)
	if err != nil {
		return requestAddressResponse{}, err
	}
	var want netip.Addr
	if req.Address != "" {
		if want, err = netip.ParseAddr(req.Address); err != nil {
			return requestAddressResponse{}, fmt.Errorf("address %q: %w", req.Address, err)
		}
	}
	if req.Options["RequestAddressType"] == gatewayRequest {
		gw := subnet.Addr().Next()
		if want.IsValid() && want != gw {
			return requestAddressResponse{}, fmt.Errorf("--gateway %s: an xnet network's gateway is its first address %s (each host routes its containers through its own block)", want, gw)
		}
		return requestAddressResponse{Address: netip.PrefixFrom(gw, subnet.Bits()).String()}, nil
	}
	ln, err := m.waitReady(ctx, subnet)
	if err != nil {
		return requestAddressResponse{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ip, err := ln.alloc.request(want)
	if err != nil {
		return requestAddressResponse{}, fmt.Errorf("network %s: %w", ln.rec.Name, err)
	}
	return requestAddressResponse{Address: netip.PrefixFrom(ip, ln.block.Subnet.Bits()).String()}, nil
}

func (m *Manager) releaseAddress(_ context.Context, req releaseAddressRequest) (empty, error) {
	subnet, err := subnetOfPool(req.PoolID)
	if err != nil {
		return empty{}, err
	}
	ip, err := netip.ParseAddr(req.Address)
	if err != nil {
		return empty{}, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ln := range m.nets {
		if ln.rec.Subnet == subnet && ln.alloc != nil {
			ln.alloc.release(ip)
		}
	}
	return empty{}, nil
}

// createNetwork: a network xnetd creates from etcd is known by its subnet; any other is a
// user's `docker network create`, whose name Docker tells nobody until it has committed it:
// it waits as pending for the reconciliation to find its name in Docker and write it to etcd.
func (m *Manager) createNetwork(_ context.Context, req createNetworkRequest) (empty, error) {
	if len(req.IPv6Data) > 0 {
		return empty{}, fmt.Errorf("--ipv6: xnet networks are IPv4 only")
	}
	if v, _ := req.Options["com.docker.network.enable_ipv6"].(bool); v {
		return empty{}, fmt.Errorf("--ipv6: xnet networks are IPv4 only")
	}
	if len(req.IPv4Data) != 1 {
		return empty{}, fmt.Errorf("--subnet: an xnet network has exactly one subnet, got %d", len(req.IPv4Data))
	}
	d := req.IPv4Data[0]
	if d.AddressSpace != localAddressSpace && d.AddressSpace != globalAddressSpace {
		return empty{}, fmt.Errorf("--ipam-driver: xnet networks need --ipam-driver %s (addresses come from each host's block), got address space %q", DriverName, d.AddressSpace)
	}
	subnet, err := parseSubnet(d.Pool)
	if err != nil {
		return empty{}, err
	}
	opts := genericOptions(req.Options)
	blockLen, err := blockLenOf(subnet, opts)
	if err != nil {
		return empty{}, err
	}
	m.mu.Lock()
	if name, ok := m.expectCreate[subnet]; ok {
		m.byID[req.NetworkID] = name
		m.mu.Unlock()
		return empty{}, nil
	}
	m.pending[req.NetworkID] = pendingNet{subnet: subnet, blockLen: blockLen, options: opts, at: time.Now()}
	m.mu.Unlock()
	// Docker commits the network after we answer; its create event (or the next tick) brings
	// the reconciliation.
	time.AfterFunc(100*time.Millisecond, m.requestKick)
	return empty{}, nil
}

// deleteNetwork: xnetd's own removals pass; a user's `docker network rm` removes the network
// from the cluster (or marks it removing while other hosts' containers use it).
func (m *Manager) deleteNetwork(ctx context.Context, req networkRequest) (empty, error) {
	m.mu.Lock()
	if m.expectDelete[req.NetworkID] {
		m.mu.Unlock()
		return empty{}, nil
	}
	delete(m.pending, req.NetworkID)
	name, ok := m.byID[req.NetworkID]
	delete(m.byID, req.NetworkID)
	if ok {
		m.tombstones[name] = time.Now()
	}
	m.mu.Unlock()
	if !ok {
		return empty{}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	removed, err := m.o.Etcd.RemoveNetwork(ctx, name)
	switch {
	case err != nil:
		// Docker removes it here whatever we answer; the next reconciliation would bring it
		// back from etcd, so the tombstone keeps it away for a while and the error is loud.
		m.log.Error("docker network rm: cannot remove the network from etcd; other hosts keep it", "network", name, "err", err)
	case removed:
		m.log.Info("docker network rm: network removed from the cluster", "network", name)
	default:
		m.log.Info("docker network rm: containers on other hosts still use the network; it goes with the last of them", "network", name)
	}
	m.requestKick()
	return empty{}, nil
}

func (m *Manager) createEndpoint(_ context.Context, req createEndpointRequest) (createEndpointResponse, error) {
	if req.Interface == nil || req.Interface.Address == "" {
		return createEndpointResponse{}, fmt.Errorf("endpoint %s has no IPv4 address (is the network's IPAM driver %s?)", shortID(req.EndpointID), DriverName)
	}
	p, err := netip.ParsePrefix(req.Interface.Address)
	if err != nil {
		return createEndpointResponse{}, fmt.Errorf("endpoint address %q: %w", req.Interface.Address, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ln := m.netOfLocked(req.NetworkID, p.Addr())
	if ln == nil || ln.dp == nil {
		return createEndpointResponse{}, fmt.Errorf("network %s is not ready on this host (see xnetd status)", shortID(req.NetworkID))
	}
	if rec, ok := m.state.Networks[ln.rec.Name]; ok && rec.Removing {
		return createEndpointResponse{}, fmt.Errorf("network %s is being removed (docker network rm on another host): no new container may join", ln.rec.Name)
	}
	ep := &endpoint{id: req.EndpointID, network: ln.rec.Name, ip: p.Addr(), mac: containerMAC(p.Addr()), created: time.Now()}
	var resp createEndpointResponse
	if req.Interface.MacAddress != "" {
		if ep.mac, err = net.ParseMAC(req.Interface.MacAddress); err != nil {
			return createEndpointResponse{}, fmt.Errorf("--mac-address %q: %w", req.Interface.MacAddress, err)
		}
	} else {
		resp.Interface = &endpointInterface{MacAddress: ep.mac.String()}
	}
	m.endpoints[req.EndpointID] = ep
	return resp, nil
}

// netOfLocked finds a network by Docker ID, else by an address inside its block.
func (m *Manager) netOfLocked(dockerID string, ip netip.Addr) *localNet {
	if name, ok := m.byID[dockerID]; ok {
		if ln := m.nets[name]; ln != nil {
			return ln
		}
	}
	for _, ln := range m.nets {
		if ln.block.Subnet.Contains(ip) {
			return ln
		}
	}
	return nil
}

func (m *Manager) deleteEndpoint(ctx context.Context, req endpointRequest) (empty, error) {
	m.mu.Lock()
	ep := m.endpoints[req.EndpointID]
	delete(m.endpoints, req.EndpointID)
	m.mu.Unlock()
	if err := deleteVeth(m.nl, req.EndpointID); err != nil {
		m.log.Warn("cannot delete a container's veth", "endpoint", shortID(req.EndpointID), "err", err)
	}
	if ep != nil {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		// The reconciliation would notice too; doing it now keeps the name from outliving the
		// container by up to a tick.
		if err := m.o.Etcd.DeleteNetworkEndpoint(ctx, ep.network, ep.ip); err != nil {
			m.log.Warn("cannot unpublish a container that left", "network", ep.network, "ip", ep.ip, "err", err)
		}
	}
	m.requestKick()
	return empty{}, nil
}

// join creates the container's veth on the network's bridge and gives the container routes
// to the network (and to the resolver) through this host's block gateway. It returns no
// default gateway, so Docker also attaches the container to docker_gwbridge for the rest of the
// world, as it does for its own overlay networks.
func (m *Manager) join(_ context.Context, req joinRequest) (joinResponse, error) {
	m.mu.Lock()
	ep := m.endpoints[req.EndpointID]
	var ln *localNet
	if ep != nil {
		ln = m.nets[ep.network]
	}
	if ln == nil || ln.dp == nil {
		m.mu.Unlock()
		return joinResponse{}, fmt.Errorf("endpoint %s: unknown to xnetd or its network is not ready here", shortID(req.EndpointID))
	}
	dp, block, subnet := ln.dp, ln.block.Subnet, ln.rec.Subnet
	dnsRoute := m.o.DNS.IsValid() && len(m.sandboxes[req.SandboxKey]) == 0
	if m.sandboxes[req.SandboxKey] == nil {
		m.sandboxes[req.SandboxKey] = map[string]bool{}
	}
	m.sandboxes[req.SandboxKey][req.EndpointID] = true
	ep.sandbox = req.SandboxKey
	mac := ep.mac
	m.mu.Unlock()

	name, err := dp.addVeth(req.EndpointID, mac)
	if err != nil {
		m.forgetSandbox(req.SandboxKey, req.EndpointID)
		return joinResponse{}, err
	}
	gw := blockGateway(block).Addr().String()
	routes := []staticRoute{{Destination: subnet.String(), RouteType: routeNextHop, NextHop: gw}}
	if dnsRoute {
		// The container's DNS questions leave from its address on this network, which tells
		// the resolver who asks (see dns.go).
		routes = append(routes, staticRoute{Destination: netip.PrefixFrom(m.o.DNS, 32).String(), RouteType: routeNextHop, NextHop: gw})
	}
	return joinResponse{InterfaceName: interfaceName{SrcName: name, DstPrefix: "eth"}, StaticRoutes: routes}, nil
}

func (m *Manager) leave(_ context.Context, req endpointRequest) (empty, error) {
	m.mu.Lock()
	ep := m.endpoints[req.EndpointID]
	m.mu.Unlock()
	if ep != nil {
		m.forgetSandbox(ep.sandbox, req.EndpointID)
	}
	return empty{}, nil
}

func (m *Manager) forgetSandbox(key, endpointID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.sandboxes[key], endpointID)
	if len(m.sandboxes[key]) == 0 {
		delete(m.sandboxes, key)
	}
}
