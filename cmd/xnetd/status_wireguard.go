package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/xnet-dev/xnet/backend/wireguard"
	"github.com/xnet-dev/xnet/subnetmgr"
)

// wireguardReport is what status shows of a wireguard host's devices: our public key and, per
// peer, its endpoint, allowed IPs (IPv6 subnets included), the last handshake and the bytes
// each way, as the device counts them; xnet-wg-v6's under V6 in separate mode.
type wireguardReport struct {
	wireguard.Status
	// Unavailable says why the device could not be read ("" when it was).
	Unavailable string `json:"unavailable,omitempty"`
}

// attachWireGuard reads the device of a wireguard host: the kernel's (wgctrl), or the embedded
// one through the socket the running daemon serves beside its state file.
func attachWireGuard(rep *statusReport, st state, stateFile string) {
	if st.Backend != subnetmgr.BackendWireGuard {
		return
	}
	datapath := wireguard.Datapath(st.Mode)
	if datapath != wireguard.DatapathKernel && !rep.Running {
		device := wireguard.DeviceName
		if st.Config.IPv6Only() {
			device, _ = wireguard.IPv6OnlyDevice(st.Config.Backend.WireGuard)
		}
		rep.WireGuard = &wireguardReport{Status: wireguard.Status{Datapath: datapath, Device: device},
			Unavailable: "the daemon is not running, and the embedded WireGuard runs inside it"}
		return
	}
	s, err := wireguard.ReadStatus(datapath, filepath.Dir(stateFile))
	r := &wireguardReport{Status: s}
	if err != nil {
		r.Unavailable = err.Error()
	}
	rep.WireGuard = r
}

// printWireGuard is the wireguard section of the text status: xnet-wg, and in separate mode
// with an IPv6 underlay xnet-wg-v6, whose peers are reached over IPv6 with their IPv6 subnets.
// (In the other modes, and for peers without an IPv6 underlay, IPv6 subnets are among
// xnet-wg's allowed IPs.)
func printWireGuard(w io.Writer, r *wireguardReport, now time.Time) {
	if r == nil {
		return
	}
	if r.Unavailable != "" && r.PublicKey == "" {
		fmt.Fprintf(w, "\nwireguard: %s (%s): unavailable: %s\n", r.Device, r.Datapath, r.Unavailable)
		return
	}
	printWireGuardDevice(w, r.Status, now)
	if r.V6 != nil && r.V6.PublicKey != "" {
		printWireGuardDevice(w, *r.V6, now)
	}
	if r.Unavailable != "" {
		fmt.Fprintf(w, "wireguard: unavailable: %s\n", r.Unavailable)
	}
}

// printWireGuardDevice prints one device and its peers.
func printWireGuardDevice(w io.Writer, st wireguard.Status, now time.Time) {
	psk := ""
	if st.PSK {
		psk = ", pre-shared key"
	}
	fmt.Fprintf(w, "\nwireguard: %s (%s), public key %s, listen port %d%s\n", st.Device, st.Datapath, st.PublicKey, st.ListenPort, psk)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  PEER PUBLIC KEY\tENDPOINT\tALLOWED IPS\tLAST HANDSHAKE\tRX BYTES\tTX BYTES")
	for _, p := range st.Peers {
		subnets := make([]string, len(p.Subnets))
		for i, s := range p.Subnets {
			subnets[i] = s.String()
		}
		handshake := "never"
		if !p.LastHandshake.IsZero() {
			handshake = fmt.Sprintf("%s (%s ago)", p.LastHandshake.UTC().Format(time.RFC3339), now.Sub(p.LastHandshake).Round(time.Second))
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%d\n", p.PublicKey, orDash(p.Endpoint), orDash(strings.Join(subnets, ",")), handshake, p.RxBytes, p.TxBytes)
	}
	tw.Flush()
}
