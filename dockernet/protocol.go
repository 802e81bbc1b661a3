package dockernet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Docker's plugin protocol (docs.docker.com: "Docker Plugin API", "Docker network driver
// plugins", "Docker IPAM plugins"; libnetwork's drivers/remote/api and ipams/remote/api are the
// reference): dockerd POSTs one JSON object to /<Interface>.<Method> on the plugin's unix socket
// and reads one JSON object back. A failure is {"Err": "<message>"} (network driver) or
// {"Error": "<message>"} (IPAM); Docker shows the message to
// the user prefixed with "remote: ", which makes it the error channel for bad input. Only the
// fields xnet reads or writes are declared.

// pluginContentType is what Docker's plugin client sends and expects.
const pluginContentType = "application/vnd.docker.plugins.v1+json"

// errResponse is a refusal: the network driver protocol reads Err, the IPAM protocol Error.
type errResponse struct {
	Err   string
	Error string
}

type activateResponse struct {
	Implements []string
}

// Network driver.

type capabilitiesResponse struct {
	Scope             string
	ConnectivityScope string
}

type ipamData struct {
	AddressSpace string
	Pool         string
	Gateway      string
	AuxAddresses map[string]string `json:",omitempty"`
}

type createNetworkRequest struct {
	NetworkID string
	Options   map[string]any
	IPv4Data  []ipamData
	IPv6Data  []ipamData
}

type networkRequest struct {
	NetworkID string
}

type endpointInterface struct {
	Address     string
	AddressIPv6 string
	MacAddress  string
}

type createEndpointRequest struct {
	NetworkID  string
	EndpointID string
	Interface  *endpointInterface
	Options    map[string]any
}

type createEndpointResponse struct {
	Interface *endpointInterface `json:",omitempty"`
}

type endpointRequest struct {
	NetworkID  string
	EndpointID string
}

type operInfoResponse struct {
	Value map[string]any
}

type joinRequest struct {
	NetworkID  string
	EndpointID string
	SandboxKey string
	Options    map[string]any
}

type interfaceName struct {
	SrcName   string
	DstPrefix string
}

// Route types of a join response (libnetwork's types.NEXTHOP and types.CONNECTED).
const (
	routeNextHop   = 0
	routeConnected = 1
)

type staticRoute struct {
	Destination string
	RouteType   int
	NextHop     string `json:",omitempty"`
}

type joinResponse struct {
	InterfaceName         interfaceName
	Gateway               string        `json:",omitempty"`
	StaticRoutes          []staticRoute `json:",omitempty"`
	DisableGatewayService bool
}

// IPAM driver.

type ipamCapabilitiesResponse struct {
	RequiresMACAddress    bool
	RequiresRequestReplay bool
}

type addressSpacesResponse struct {
	LocalDefaultAddressSpace  string
	GlobalDefaultAddressSpace string
}

type requestPoolRequest struct {
	AddressSpace string
	Pool         string
	SubPool      string
	Options      map[string]string
	V6           bool
}

type requestPoolResponse struct {
	PoolID string
	Pool   string
	Data   map[string]string `json:",omitempty"`
}

type poolRequest struct {
	PoolID string
}

type requestAddressRequest struct {
	PoolID  string
	Address string
	Options map[string]string
}

type requestAddressResponse struct {
	Address string
	Data    map[string]string `json:",omitempty"`
}

type releaseAddressRequest struct {
	PoolID  string
	Address string
}

// handle decodes one request into a Req, calls fn and writes its response, or {"Err": ...}.
func handle[Req, Resp any](log *slog.Logger, fn func(context.Context, Req) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err == nil && len(body) > 0 {
			err = json.Unmarshal(body, &req)
		}
		var resp any
		if err != nil {
			err = fmt.Errorf("xnet: cannot read %s request: %w", r.URL.Path, err)
		} else {
			resp, err = fn(r.Context(), req)
		}
		if err != nil {
			log.Info("refused a Docker plugin call", "call", r.URL.Path, "err", err)
			resp = errResponse{Err: err.Error(), Error: err.Error()}
		} else {
			log.Debug("Docker plugin call", "call", r.URL.Path, "request", string(body))
		}
		w.Header().Set("Content-Type", pluginContentType)
		_ = json.NewEncoder(w).Encode(resp)
	}
}

// empty is the response of calls that only acknowledge.
type empty struct{}

// listenUnix removes a stale socket left by a previous run (never another kind of file) and
// listens on path, creating its directory.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("plugin socket directory: %w", err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("plugin socket %s exists and is not a socket: remove it or pick another path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("plugin socket %s: another process serves it (a second xnetd?)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale plugin socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on plugin socket %s: %w", path, err)
	}
	// dockerd runs as root; nobody else may speak for it.
	if err := os.Chmod(path, 0o660); err != nil && !errors.Is(err, syscall.ENOENT) {
		ln.Close()
		return nil, fmt.Errorf("plugin socket %s: %w", path, err)
	}
	return ln, nil
}
