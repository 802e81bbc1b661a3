package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// The state file is rewritten for peer changes at most once per interval, at once for an
// isolated change, and never later than one interval after a change.
func TestStateWritesAreRateLimited(t *testing.T) {
	const second = time.Second
	type step struct {
		at     time.Duration // since the daemon's first write
		change bool          // a peer change (false: the due timer fires, or an immediate write)
		// fire is the timer firing; immediate is a write that does not wait (ready, own lease).
		fire, immediate bool
	}
	tests := []struct {
		name  string
		steps []step
		want  string // per step: "w" written now, "aNms" armed for N ms, "-" nothing
	}{
		{
			name:  "an isolated change long after the last write is written at once",
			steps: []step{{at: 5 * second, change: true}},
			want:  "w",
		},
		{
			name:  "a change within the interval waits for the rest of it",
			steps: []step{{at: 300 * time.Millisecond, change: true}, {at: second, fire: true}},
			want:  "a700ms w",
		},
		{
			name: "a burst of changes costs one write a second",
			steps: []step{
				{at: 2 * second, change: true},
				{at: 2*second + 10*time.Millisecond, change: true},
				{at: 2*second + 20*time.Millisecond, change: true},
				{at: 2*second + 900*time.Millisecond, change: true},
				{at: 3 * second, fire: true},
				{at: 3*second + 10*time.Millisecond, change: true},
				{at: 4 * second, fire: true},
			},
			want: "w a990ms - - w a990ms w",
		},
		{
			name: "an immediate write ends the pending one; the next change waits from there",
			steps: []step{
				{at: 100 * time.Millisecond, change: true},
				{at: 500 * time.Millisecond, immediate: true},
				{at: 600 * time.Millisecond, change: true},
			},
			want: "a900ms w a900ms",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			s := stateThrottle{interval: second}
			s.written(start) // serve writes the state once before the loop
			var got []string
			for _, st := range tt.steps {
				now := start.Add(st.at)
				switch {
				case st.fire || st.immediate:
					s.written(now)
					got = append(got, "w")
				default:
					writeNow, arm := s.changed(now)
					switch {
					case writeNow:
						s.written(now)
						got = append(got, "w")
					case arm > 0:
						got = append(got, fmt.Sprintf("a%dms", arm.Milliseconds()))
					default:
						got = append(got, "-")
					}
				}
			}
			if g := strings.Join(got, " "); g != tt.want {
				t.Errorf("got %q, want %q", g, tt.want)
			}
		})
	}
}
