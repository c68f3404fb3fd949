package agent

import (
	"io"
	"log/slog"
	"os"
	"testing"
)

// testLogger logs to the test's output when -v is set, else nowhere.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() || os.Getenv("AGENT_TEST_LOGS") == "" {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }
