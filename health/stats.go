package health

import (
	"slices"
	"time"
)

// window holds the outcome of the last Window probes of one path: a round trip, or a loss.
type window struct {
	samples [Window]sample
	n, next int
}

type sample struct {
	rtt  time.Duration
	lost bool
}

func (w *window) add(s sample) {
	w.samples[w.next] = s
	w.next = (w.next + 1) % Window
	w.n = min(w.n+1, Window)
}

// loss is the share of lost probes in the window (0 when it is empty).
func (w *window) loss() float64 {
	if w.n == 0 {
		return 0
	}
	lost := 0
	for _, s := range w.samples[:w.n] {
		if s.lost {
			lost++
		}
	}
	return float64(lost) / float64(w.n)
}

// p50 is the median round trip of the answered probes in the window (the lower of the two
// middle ones for an even count; 0 when none was answered).
func (w *window) p50() time.Duration {
	rtts := make([]time.Duration, 0, w.n)
	for _, s := range w.samples[:w.n] {
		if !s.lost {
			rtts = append(rtts, s.rtt)
		}
	}
	if len(rtts) == 0 {
		return 0
	}
	slices.Sort(rtts)
	return rtts[(len(rtts)-1)/2]
}

// bucket is a token bucket: rate tokens a second, at most burst saved up.
type bucket struct {
	rate, burst, tokens float64
	last                time.Time
}

func newBucket(rate, burst float64, now time.Time) bucket {
	return bucket{rate: rate, burst: burst, tokens: burst, last: now}
}

func (b *bucket) refill(now time.Time) {
	if now.After(b.last) {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
		b.last = now
	}
}

// take spends one token if there is one.
func (b *bucket) take(now time.Time) bool {
	b.refill(now)
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// wait is how long until the next token (0 when one is there).
func (b *bucket) wait() time.Duration {
	if b.tokens >= 1 {
		return 0
	}
	return time.Duration((1 - b.tokens) / b.rate * float64(time.Second))
}

// probeInterval is how often each path of each peer is probed: interval, stretched so that
// paths probes in all stay within maxRate a second.
func probeInterval(interval time.Duration, maxRate float64, paths int) time.Duration {
	spread := time.Duration(float64(paths) / maxRate * float64(time.Second))
	return max(interval, spread)
}
