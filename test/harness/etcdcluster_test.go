package harness

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdVersionFrom asks endpoint (http://ip:port) for /version from inside ns, over a socket
// opened in ns.
func etcdVersionFrom(ns *Namespace, endpoint string) (string, error) {
	var conn net.Conn
	if err := ns.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp4", strings.TrimPrefix(endpoint, "http://"), 2*time.Second)
		return err
	}); err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET /version HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var b strings.Builder
	_, err = bufio.NewReader(resp.Body).WriteTo(&b)
	return b.String(), err
}

// A 3-member cluster answers on three underlay ports from a host's namespace; the leader
// stopped, its port refuses, the other two elect a leader and take writes; restarted, it
// answers again and holds what was written while it was down.
func TestEtcdClusterLosesAndRegainsAMember(t *testing.T) {
	topo := NewForTest(t, Options{Hosts: 1})
	c := StartEtcdClusterForTest(t, topo, 3)
	h := topo.Hosts()[0]
	eps := c.Endpoints()
	if want := "http://198.18.0.1:2379,http://198.18.0.1:2381,http://198.18.0.1:2383"; c.EndpointsFlag() != want {
		t.Errorf("endpoints %s, want %s", c.EndpointsFlag(), want)
	}
	for _, ep := range eps {
		if v, err := etcdVersionFrom(h.Namespace, ep); err != nil || !strings.Contains(v, "etcdserver") {
			t.Errorf("%s from %s: %q, %v", ep, h.Name, v, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lead := c.Leader()
	if lead < 0 {
		t.Fatal("no leader after start")
	}
	c.Stop(lead)
	if c.Running(lead) {
		t.Error("the stopped member says it runs")
	}
	if _, err := etcdVersionFrom(h.Namespace, eps[lead]); err == nil {
		t.Errorf("stopped member %d still answers at %s", lead, eps[lead])
	}
	// A write proposed before the followers notice would be forwarded to the dead leader and
	// time out (etcd's 7 s): wait for the election first.
	start := time.Now()
	for l := c.Leader(); l < 0 || l == lead; l = c.Leader() {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("no new leader 10 s after stopping leader %d", lead)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("member %d leads %v after leader %d stopped", c.Leader(), time.Since(start).Round(time.Millisecond), lead)
	if _, err := c.Client().Put(ctx, "written-while-down", "yes"); err != nil {
		t.Fatalf("put with member %d (the old leader) down: %v", lead, err)
	}
	if err := c.Restart(ctx, lead); err != nil {
		t.Fatal(err)
	}
	if v, err := etcdVersionFrom(h.Namespace, eps[lead]); err != nil || !strings.Contains(v, "etcdserver") {
		t.Errorf("restarted member at %s: %q, %v", eps[lead], v, err)
	}
	// A serializable read answers from the member's own copy: it caught up.
	one, err := clientv3.New(clientv3.Config{Endpoints: []string{c.members[lead].clientURL.String()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	if r, err := one.Get(ctx, "written-while-down", clientv3.WithSerializable()); err != nil || len(r.Kvs) != 1 {
		t.Errorf("the restarted member's own store: %v, %v", r, err)
	}
}
