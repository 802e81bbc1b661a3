package dockernet

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"
)

// The resolver answers the names of containers on xnet networks, cluster-wide, and forwards
// every other question to the host's own resolvers.
//
// Design history. Docker's embedded DNS (127.0.0.11 in every container on a user-defined
// network) knows only the containers of its own dockerd: a network's remote containers are
// invisible to it, and the remote-driver protocol has no way to feed it names, nor any DNS
// field in its join response. What it does do is forward every name it does not know to the
// daemon's external DNS servers, and dockerd takes those from --dns. So xnetd serves DNS on
// the docker0 gateway address (the one address every container of the host can reach, written
// next to --bip as --dns in DOCKER_NETWORK_OPTIONS) and answers there from the endpoints
// published in etcd. Containers on the default bridge, which have no embedded DNS, ask it
// directly and get the same answers. Its address is bound with IP_FREEBIND because xnetd starts
// before dockerd creates docker0.
//
// A bare name is answered with the container's addresses on the networks the asking container
// shares with it: the asker is known by the source address of the question, which is its
// address on its first xnet network because the join gives every container a host route to
// the resolver through that network. A question from anywhere else (a docker0 container) gets
// every address of the name. "<container>.<network>" asks for one network.

// dnsTTL is the TTL of our answers: containers come and go, and the cache of a client must not
// outlive them by much.
const dnsTTL = 5

// dnsForwardTimeout bounds one forwarded question.
const dnsForwardTimeout = 2 * time.Second

// resolverBackend answers names: addrs and known (the name is a container's; NXDOMAIN when
// addrs is empty, which happens when the asker shares no network with it).
type resolverBackend func(name string, from netip.Addr) (addrs []netip.Addr, known bool)

type resolver struct {
	addr      netip.AddrPort
	upstreams []string
	lookup    resolverBackend
	log       *slog.Logger
}

// hostUpstreams are the nameservers of the host's resolv.conf, ours excluded.
func hostUpstreams(path string, self netip.Addr) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil || a == self {
			continue
		}
		out = append(out, netip.AddrPortFrom(a, 53).String())
	}
	return out
}

// freebind lets us bind the docker0 gateway before docker0 exists.
func freebind(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
	})
	return errors.Join(err, serr)
}

// serve answers on UDP and TCP until ctx ends.
func (r *resolver) serve(ctx context.Context) error {
	lc := net.ListenConfig{Control: freebind}
	pc, err := lc.ListenPacket(ctx, "udp4", r.addr.String())
	if err != nil {
		return fmt.Errorf("DNS on %s: %w", r.addr, err)
	}
	ln, err := lc.Listen(ctx, "tcp4", r.addr.String())
	if err != nil {
		pc.Close()
		return fmt.Errorf("DNS on %s/tcp: %w", r.addr, err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		pc.Close()
		ln.Close()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { r.serveTCP(c) })
		}
	})
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			break
		}
		q := append([]byte(nil), buf[:n]...)
		src := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
		wg.Go(func() {
			if resp := r.answer(q, src, "udp"); resp != nil {
				_, _ = pc.WriteTo(resp, from)
			}
		})
	}
	wg.Wait()
	return nil
}

func (r *resolver) serveTCP(c net.Conn) {
	defer c.Close()
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	for {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		var l uint16
		if err := binary.Read(c, binary.BigEndian, &l); err != nil {
			return
		}
		q := make([]byte, l)
		if _, err := io.ReadFull(c, q); err != nil {
			return
		}
		resp := r.answer(q, src, "tcp")
		if resp == nil {
			return
		}
		out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
		if _, err := c.Write(append(out, resp...)); err != nil {
			return
		}
	}
}

// answer is the response to one question: ours for a container's name, else the upstream's.
func (r *resolver) answer(q []byte, from netip.Addr, network string) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	question, err := p.Question()
	if err != nil {
		return nil
	}
	name := strings.ToLower(strings.TrimSuffix(question.Name.String(), "."))
	if question.Class == dnsmessage.ClassINET {
		if addrs, known := r.lookup(name, from); known {
			return r.reply(h, question, addrs)
		}
	}
	if resp := r.forward(q, network); resp != nil {
		return resp
	}
	return r.fail(h, question, dnsmessage.RCodeServerFailure)
}

func (r *resolver) reply(h dnsmessage.Header, q dnsmessage.Question, addrs []netip.Addr) []byte {
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	if len(addrs) == 0 {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	_ = b.StartQuestions()
	_ = b.Question(q)
	_ = b.StartAnswers()
	if q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL {
		for _, a := range addrs {
			_ = b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: dnsTTL}, dnsmessage.AResource{A: a.As4()})
		}
	}
	// Other types of a known name (AAAA above all) get an empty answer, so a client does not
	// wait for an upstream that cannot know the name.
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

func (r *resolver) fail(h dnsmessage.Header, q dnsmessage.Question, code dnsmessage.RCode) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RCode: code, RecursionDesired: h.RecursionDesired, RecursionAvailable: true})
	_ = b.StartQuestions()
	_ = b.Question(q)
	out, _ := b.Finish()
	return out
}

// forward asks the upstreams in turn; nil when none answered.
func (r *resolver) forward(q []byte, network string) []byte {
	for _, up := range r.upstreams {
		c, err := net.DialTimeout(network, up, dnsForwardTimeout)
		if err != nil {
			continue
		}
		_ = c.SetDeadline(time.Now().Add(dnsForwardTimeout))
		var resp []byte
		if network == "tcp" {
			out := binary.BigEndian.AppendUint16(nil, uint16(len(q)))
			if _, err = c.Write(append(out, q...)); err == nil {
				var l uint16
				if err = binary.Read(c, binary.BigEndian, &l); err == nil {
					resp = make([]byte, l)
					_, err = io.ReadFull(c, resp)
				}
			}
		} else if _, err = c.Write(q); err == nil {
			buf := make([]byte, 65535)
			var n int
			n, err = c.Read(buf)
			resp = buf[:n]
		}
		c.Close()
		if err == nil {
			return resp
		}
		r.log.Debug("upstream DNS server did not answer", "server", up, "err", err)
	}
	return nil
}
