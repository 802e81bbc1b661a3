package dockernet

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// dockerAPI is the few Docker Engine API calls xnetd makes on its host's dockerd, over its unix
// socket. API 1.41 is Docker 20.10's; later Dockers still serve it.
type dockerAPI struct {
	socket string
	http   *http.Client
	// events has no timeout: it streams for as long as dockerd runs.
	events *http.Client
}

const dockerAPIVersion = "/v1.41"

func newDockerAPI(socket string) *dockerAPI {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns: 4,
	}
	return &dockerAPI{socket: socket, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}, events: &http.Client{Transport: tr}}
}

// dockerError is a non-2xx answer: the status and Docker's message.
type dockerError struct {
	Status  int
	Message string
}

func (e *dockerError) Error() string { return fmt.Sprintf("docker: %d %s", e.Status, e.Message) }

func (d *dockerAPI) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("docker %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://docker"+dockerAPIVersion+path, body)
	if err != nil {
		return fmt.Errorf("docker %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return fmt.Errorf("docker API on %s: %s %s: %w", d.socket, method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("docker %s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var m struct{ Message string }
		_ = json.Unmarshal(data, &m)
		if m.Message == "" {
			m.Message = strings.TrimSpace(string(data))
		}
		return &dockerError{Status: resp.StatusCode, Message: m.Message}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("docker %s %s: %w", method, path, err)
		}
	}
	return nil
}

// dockerNetwork is a network of the local dockerd with our driver.
type dockerNetwork struct {
	ID      string
	Name    string
	Driver  string
	Subnet  netip.Prefix
	Options map[string]string
	// Containers are the containers attached, by container ID.
	Containers map[string]dockerAttachment
}

// dockerAttachment is one container on a network.
type dockerAttachment struct {
	Name       string
	EndpointID string
	IP         netip.Addr
}

type networkJSON struct {
	ID     string `json:"Id"`
	Name   string
	Driver string
	IPAM   struct {
		Config []struct{ Subnet string }
	}
	Options    map[string]string
	Containers map[string]struct {
		Name        string
		EndpointID  string
		IPv4Address string
	}
}

func (n networkJSON) parse() dockerNetwork {
	out := dockerNetwork{ID: n.ID, Name: n.Name, Driver: n.Driver, Options: n.Options, Containers: map[string]dockerAttachment{}}
	if len(n.IPAM.Config) > 0 {
		out.Subnet, _ = netip.ParsePrefix(n.IPAM.Config[0].Subnet)
	}
	for id, c := range n.Containers {
		p, _ := netip.ParsePrefix(c.IPv4Address)
		out.Containers[id] = dockerAttachment{Name: c.Name, EndpointID: c.EndpointID, IP: p.Addr()}
	}
	return out
}

// networks lists the networks of driver with their containers (one inspect per network: the
// list does not carry containers).
func (d *dockerAPI) networks(ctx context.Context, driver string) ([]dockerNetwork, error) {
	filters, _ := json.Marshal(map[string]map[string]bool{"driver": {driver: true}})
	var list []networkJSON
	if err := d.do(ctx, http.MethodGet, "/networks?filters="+url.QueryEscape(string(filters)), nil, &list); err != nil {
		return nil, err
	}
	out := make([]dockerNetwork, 0, len(list))
	for _, n := range list {
		var full networkJSON
		if err := d.do(ctx, http.MethodGet, "/networks/"+n.ID, nil, &full); err != nil {
			if de, ok := err.(*dockerError); ok && de.Status == http.StatusNotFound {
				continue // removed between the list and the inspect
			}
			return nil, err
		}
		out = append(out, full.parse())
	}
	return out, nil
}

// sandboxKey is the network namespace path Docker gave a container (what a join names).
func (d *dockerAPI) sandboxKey(ctx context.Context, containerID string) (string, error) {
	var c struct{ NetworkSettings struct{ SandboxKey string } }
	if err := d.do(ctx, http.MethodGet, "/containers/"+url.PathEscape(containerID)+"/json", nil, &c); err != nil {
		return "", err
	}
	return c.NetworkSettings.SandboxKey, nil
}

// createNetwork is `docker network create -d <driver> --ipam-driver <driver> --subnet ... -o ...`.
func (d *dockerAPI) createNetwork(ctx context.Context, name, driver string, subnet netip.Prefix, options map[string]string) (string, error) {
	in := map[string]any{
		"Name":           name,
		"CheckDuplicate": true,
		"Driver":         driver,
		"IPAM":           map[string]any{"Driver": driver, "Config": []map[string]string{{"Subnet": subnet.String()}}},
		"Options":        options,
	}
	var out struct {
		ID string `json:"Id"`
	}
	if err := d.do(ctx, http.MethodPost, "/networks/create", in, &out); err != nil {
		return "", err
	}
	return out.ID, nil
}

// removeNetwork is `docker network rm`; a network already gone is not an error.
func (d *dockerAPI) removeNetwork(ctx context.Context, id string) error {
	err := d.do(ctx, http.MethodDelete, "/networks/"+id, nil, nil)
	if de, ok := err.(*dockerError); ok && de.Status == http.StatusNotFound {
		return nil
	}
	return err
}

// dockerEvent is the part of a Docker event xnetd reacts to.
type dockerEvent struct {
	Type   string
	Action string
	Actor  struct {
		ID         string
		Attributes map[string]string
	}
}

// watchEvents streams Docker's network events to fn until ctx ends or the stream breaks.
// onConnect runs once the stream is open (dockerd is up).
func (d *dockerAPI) watchEvents(ctx context.Context, onConnect func(), fn func(dockerEvent)) error {
	filters, _ := json.Marshal(map[string]map[string]bool{"type": {"network": true}})
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+dockerAPIVersion+"/events?filters="+url.QueryEscape(string(filters)), nil)
	if err != nil {
		return err
	}
	resp, err := d.events.Do(req)
	if err != nil {
		return fmt.Errorf("docker events on %s: %w", d.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return &dockerError{Status: resp.StatusCode, Message: "events"}
	}
	onConnect()
	dec := json.NewDecoder(bufio.NewReader(resp.Body))
	for {
		var ev dockerEvent
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("docker events: %w", err)
		}
		fn(ev)
	}
}
