package main

import (
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
)

// Environment variables that say systemd passed fds, but malformed, stop xnetd before anything
// else with exit code 2 and the variable named: which fds they mean cannot be known.
func TestMalformedListenVariablesAreAUsageError(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tt := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"LISTEN_PID not a pid", map[string]string{"LISTEN_PID": "self", "LISTEN_FDS": "1"}, `LISTEN_PID="self" is not a process id`},
		{"NOTIFY_SOCKET relative", map[string]string{"NOTIFY_SOCKET": "run/notify"}, `NOTIFY_SOCKET="run/notify"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			_, err := openFDStore(log)
			var ue *usageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("openFDStore: %v, want a usage error containing %q", err, tt.want)
			}
		})
	}
}
