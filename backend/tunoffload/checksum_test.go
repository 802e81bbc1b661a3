package tunoffload

import (
	"math/rand/v2"
	"testing"

	"github.com/xnet-dev/xnet/bpf/testpkt"
)

func TestSumMatchesTheRFC1071Loop(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := 0; n < 600; n++ {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if n%7 == 0 {
			for i := range b {
				b[i] = 0xff // all ones: the carries that wrap around
			}
		}
		if got, want := Fold(Sum(b)), ^testpkt.Checksum(b, 0); got != want {
			t.Fatalf("len %d: Fold(Sum) = %#04x, want %#04x", n, got, want)
		}
	}
}

func BenchmarkSum(b *testing.B) {
	buf := make([]byte, 1398)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		_ = Sum(buf)
	}
}
