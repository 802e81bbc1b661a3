package health

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

func TestMessagesRoundTripAndStrangersAreIgnored(t *testing.T) {
	req := message{kind: kindRequest, seq: 0x0102030405060708}.appendTo(nil)
	if len(req) != msgLen {
		t.Fatalf("a request is %d bytes, want %d", len(req), msgLen)
	}
	longer := append(message{kind: kindReply, flags: flagOverlayUp, seq: 7}.appendTo(nil), "a later version's field"...)
	wrongMagic := bytes.Clone(req)
	wrongMagic[0] = 'Y'
	wrongVersion := bytes.Clone(req)
	wrongVersion[4] = 2
	wrongKind := bytes.Clone(req)
	wrongKind[5] = 3
	tests := []struct {
		name string
		in   []byte
		want message
		ok   bool
	}{
		{"a request", req, message{kind: kindRequest, seq: 0x0102030405060708}, true},
		{"a reply with more bytes than this version knows", longer, message{kind: kindReply, flags: flagOverlayUp, seq: 7}, true},
		{"cut short", req[:msgLen-1], message{}, false},
		{"another magic", wrongMagic, message{}, false},
		{"another version", wrongVersion, message{}, false},
		{"an unknown kind", wrongKind, message{}, false},
		{"empty", nil, message{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseMessage(tt.in)
			if ok != tt.ok || (ok && got != tt.want) {
				t.Errorf("parseMessage = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestWindowLossAndMedian(t *testing.T) {
	ms := func(n int) sample { return sample{rtt: time.Duration(n) * time.Millisecond} }
	lost := sample{lost: true}
	many := make([]sample, 0, Window+5)
	for i := range Window + 5 {
		many = append(many, ms(i+1)) // the first 5 fall out of the window
	}
	tests := []struct {
		name     string
		samples  []sample
		wantLoss float64
		wantP50  time.Duration
		wantN    int
	}{
		{"empty", nil, 0, 0, 0},
		{"one answer", []sample{ms(3)}, 0, 3 * time.Millisecond, 1},
		{"odd count: the middle one", []sample{ms(5), ms(1), ms(3)}, 0, 3 * time.Millisecond, 3},
		{"even count: the lower middle", []sample{ms(4), ms(1), ms(3), ms(2)}, 0, 2 * time.Millisecond, 4},
		{"losses count in the ratio, not in the median", []sample{ms(2), lost, ms(4), lost}, 0.5, 2 * time.Millisecond, 4},
		{"all lost", []sample{lost, lost}, 1, 0, 2},
		{"only the last Window probes count", many, 0, time.Duration(5+Window/2) * time.Millisecond, Window},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w window
			for _, s := range tt.samples {
				w.add(s)
			}
			if w.loss() != tt.wantLoss || w.p50() != tt.wantP50 || w.n != tt.wantN {
				t.Errorf("loss %v p50 %v n %d, want %v %v %d", w.loss(), w.p50(), w.n, tt.wantLoss, tt.wantP50, tt.wantN)
			}
		})
	}
}

// The schedule the README promises: 1 s per peer up to 100 peers, then as many peers as
// 200 probes a second allow.
func TestProbeIntervalGrowsWithPeersToKeepTheRateCapped(t *testing.T) {
	for _, tt := range []struct {
		peers int
		want  time.Duration
	}{
		{0, time.Second}, {2, time.Second}, {100, time.Second}, {150, 1500 * time.Millisecond},
		{1000, 10 * time.Second}, {5000, 50 * time.Second},
	} {
		got := probeInterval(DefaultInterval, DefaultMaxRate, 2*tt.peers)
		if got != tt.want {
			t.Errorf("%d peers: every %v, want %v", tt.peers, got, tt.want)
		}
		if rate := float64(2*tt.peers) / got.Seconds(); rate > DefaultMaxRate+1e-9 {
			t.Errorf("%d peers: %.1f probes/s, above the cap %d", tt.peers, rate, DefaultMaxRate)
		}
	}
}

func TestBucketCapsTheRate(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBucket(10, 2, now)
	got := 0
	for range 100 {
		if b.take(now) {
			got++
		}
	}
	if got != 2 {
		t.Fatalf("a full bucket of burst 2 gave %d tokens at once", got)
	}
	if w := b.wait(); w != 100*time.Millisecond {
		t.Errorf("wait %v for the next token at 10/s, want 100ms", w)
	}
	now = now.Add(time.Second)
	got = 0
	for range 100 {
		if b.take(now) {
			got++
		}
	}
	if got != 2 {
		t.Errorf("after 1 s at 10/s the bucket gave %d tokens, want its burst 2", got)
	}
}

func TestPathHealthJSONCarriesRTTsInMilliseconds(t *testing.T) {
	h := PathHealth{State: StateReachable, RTTLast: Duration(1500 * time.Microsecond), RTTP50: Duration(250 * time.Microsecond)}
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"rtt_last_ms":1.5`, `"rtt_p50_ms":0.25`, `"state":"reachable"`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
	var back PathHealth
	if err := json.Unmarshal(b, &back); err != nil || back.RTTLast != h.RTTLast || back.RTTP50 != h.RTTP50 {
		t.Errorf("round trip: %+v, %v; want the same RTTs as %+v", back, err, h)
	}
}

func TestProblemSaysWhichPathBroke(t *testing.T) {
	up := PathHealth{State: StateReachable}
	down := PathHealth{State: StateUnreachable, Why: "2 probes in a row unanswered"}
	for _, tt := range []struct {
		name string
		h    PeerHealth
		want string
	}{
		{"both up", PeerHealth{Overlay: up, Underlay: up}, ""},
		{"not known yet", PeerHealth{Overlay: PathHealth{State: StateUnknown}, Underlay: PathHealth{State: StateUnknown}}, ""},
		{"overlay down, underlay up", PeerHealth{Overlay: down, Underlay: up}, "overlay unreachable while the underlay answers"},
		{"both down", PeerHealth{Overlay: down, Underlay: down}, "unreachable over the overlay and the underlay"},
		{"underlay down, overlay up", PeerHealth{Overlay: up, Underlay: down}, "underlay probes unanswered"},
		{"overlay down, underlay not known", PeerHealth{Overlay: down, Underlay: PathHealth{State: StateUnknown}}, "overlay unreachable: 2 probes"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.h.Problem()
			if (tt.want == "") != (got == "") || !bytes.Contains([]byte(got), []byte(tt.want)) {
				t.Errorf("Problem() = %q, want %q", got, tt.want)
			}
		})
	}
}
