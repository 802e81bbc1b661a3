package harness

import (
	"log/slog"
	"strings"
	"testing"
)

// TestLogger sends a component's logs (a backend's, a prober's) to the test log at debug level,
// so they show with the test that failed and nowhere else.
func TestLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ tb testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
