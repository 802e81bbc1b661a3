package wireguard

import (
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The embedded device is configured with WireGuard's cross-platform configuration protocol
// (https://www.wireguard.com/xplatform/), the text `wg` sends to a user-space WireGuard's
// socket, so both datapaths take one vocabulary, wgctrl's Config, and the kernel one's
// behaviour is the reference for the embedded one.

// uapiSet is cfg as a "set" operation's body.
func uapiSet(cfg wgtypes.Config) string {
	var b strings.Builder
	line := func(k, v string) { b.WriteString(k + "=" + v + "\n") }
	key := func(k wgtypes.Key) string { return hex.EncodeToString(k[:]) }
	if cfg.PrivateKey != nil {
		line("private_key", key(*cfg.PrivateKey))
	}
	if cfg.ListenPort != nil {
		line("listen_port", strconv.Itoa(*cfg.ListenPort))
	}
	if cfg.ReplacePeers {
		line("replace_peers", "true")
	}
	for _, p := range cfg.Peers {
		line("public_key", key(p.PublicKey))
		if p.Remove {
			line("remove", "true")
			continue
		}
		if p.UpdateOnly {
			line("update_only", "true")
		}
		if p.PresharedKey != nil {
			line("preshared_key", key(*p.PresharedKey))
		}
		if p.Endpoint != nil {
			line("endpoint", p.Endpoint.String())
		}
		if p.PersistentKeepaliveInterval != nil {
			line("persistent_keepalive_interval", strconv.Itoa(int(p.PersistentKeepaliveInterval.Seconds())))
		}
		if p.ReplaceAllowedIPs {
			line("replace_allowed_ips", "true")
		}
		for _, a := range p.AllowedIPs {
			line("allowed_ip", a.String())
		}
	}
	return b.String()
}

// uapiGet parses a "get" operation's answer into what wgctrl's Device says of a kernel device.
func uapiGet(text string) (*wgtypes.Device, error) {
	d := &wgtypes.Device{Type: wgtypes.Userspace}
	var p *wgtypes.Peer
	var hsSec, hsNsec int64
	endPeer := func() {
		if p != nil {
			if hsSec != 0 || hsNsec != 0 {
				p.LastHandshakeTime = time.Unix(hsSec, hsNsec)
			}
			d.Peers = append(d.Peers, *p)
		}
		hsSec, hsNsec = 0, 0
	}
	for l := range strings.Lines(text) {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return nil, fmt.Errorf("wireguard-go answered %q, not key=value", l)
		}
		var err error
		switch k {
		case "private_key":
			d.PrivateKey, err = hexKey(v)
			d.PublicKey = d.PrivateKey.PublicKey()
		case "listen_port":
			d.ListenPort, err = strconv.Atoi(v)
		case "fwmark":
			d.FirewallMark, err = strconv.Atoi(v)
		case "public_key":
			endPeer()
			p = &wgtypes.Peer{}
			p.PublicKey, err = hexKey(v)
		case "errno":
			if v != "0" {
				return nil, fmt.Errorf("wireguard-go: get failed with errno %s", v)
			}
		default:
			if p == nil {
				continue // a device field this code does not read
			}
			err = peerField(p, k, v, &hsSec, &hsNsec)
		}
		if err != nil {
			return nil, fmt.Errorf("wireguard-go answered %q: %w", l, err)
		}
	}
	endPeer()
	return d, nil
}

func peerField(p *wgtypes.Peer, k, v string, hsSec, hsNsec *int64) error {
	var err error
	switch k {
	case "preshared_key":
		p.PresharedKey, err = hexKey(v)
	case "endpoint":
		var ap netip.AddrPort
		if ap, err = netip.ParseAddrPort(v); err == nil {
			p.Endpoint = net.UDPAddrFromAddrPort(ap)
		}
	case "last_handshake_time_sec":
		*hsSec, err = strconv.ParseInt(v, 10, 64)
	case "last_handshake_time_nsec":
		*hsNsec, err = strconv.ParseInt(v, 10, 64)
	case "tx_bytes":
		p.TransmitBytes, err = strconv.ParseInt(v, 10, 64)
	case "rx_bytes":
		p.ReceiveBytes, err = strconv.ParseInt(v, 10, 64)
	case "persistent_keepalive_interval":
		var s int
		s, err = strconv.Atoi(v)
		p.PersistentKeepaliveInterval = time.Duration(s) * time.Second
	case "allowed_ip":
		var pfx netip.Prefix
		if pfx, err = netip.ParsePrefix(v); err == nil {
			p.AllowedIPs = append(p.AllowedIPs, ipNet(pfx))
		}
	case "protocol_version":
		p.ProtocolVersion, err = strconv.Atoi(v)
	}
	return err
}

func hexKey(s string) (wgtypes.Key, error) {
	b, err := hex.DecodeString(s)
	if err != nil {
		return wgtypes.Key{}, err
	}
	return wgtypes.NewKey(b)
}

func ipNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func netipPrefix(n net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if a.Is4() && bits == 128 && ones >= 96 { // an IPv4 prefix in IPv6 form
		ones, bits = ones-96, 32
	}
	if bits != a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}
