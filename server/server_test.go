package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// validConfig passes Validate on any machine the tests run on.
func validConfig() Config {
	c := DefaultConfig()
	c.Agent.DataDir = "/tmp/x"
	c.Agent.RedisServer = "/bin/sh"
	c.Agent.RedisUser = "nobody"
	c.Agent.Launcher = "/bin/sh"
	return c
}

// Validate refuses what would start an agent nobody can use safely, and
// says why; want is a part of the error, "" for none.
func TestConfigValidateSays(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"defaults", func(*Config) {}, ""},
		{"non-loopback without token", func(c *Config) { c.Listen = "0.0.0.0:7070" }, "no authentication is configured"},
		{"non-loopback with token", func(c *Config) { c.Listen = "0.0.0.0:7070"; c.Token = "0123456789abcdef" }, ""},
		{"token of 16 bytes", func(c *Config) { c.Listen = "0.0.0.0:7070"; c.Token = "0123456789abcdef" }, ""},
		{"short token", func(c *Config) { c.Token = "s3cret" }, "at least 16"},
		{"blank token is no authentication", func(c *Config) { c.Listen = "0.0.0.0:7070"; c.Token = strings.Repeat(" ", 20) }, "no authentication is configured"},
		{"token with white space around it", func(c *Config) { c.Token = "0123456789abcdef\n" }, "white space"},
		{"listen port inside the instance ports", func(c *Config) { c.Listen = "127.0.0.1:16500" }, "inside the instance port range 16000-16999"},
		{"listen port at the range's low end", func(c *Config) { c.Listen = "127.0.0.1:16000" }, "inside the instance port range"},
		{"listen port at the range's high end", func(c *Config) { c.Listen = "127.0.0.1:16999" }, "inside the instance port range"},
		{"listen port just above the range", func(c *Config) { c.Listen = "127.0.0.1:17000" }, ""},
		{"malformed listen address", func(c *Config) { c.Listen = "7070" }, "listen address"},
		{"client CA without TLS", func(c *Config) { c.TLSClientCA = "/ca.pem" }, "--tls-client-ca needs --tls-cert"},
		{"certificate without key", func(c *Config) { c.TLSCert = "/cert.pem" }, "go together"},
		{"the Service's own configuration", func(c *Config) { c.Agent.PortMin, c.Agent.PortMax = 2, 1 }, "port range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig()
			tt.mod(&c)
			err := c.Validate()
			if tt.want == "" && err != nil {
				t.Fatalf("Validate = %v, want nil", err)
			}
			if tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("Validate = %v, want an error saying %q", err, tt.want)
			}
		})
	}
}

// /healthz fails once the main loop has missed three beats.
func TestHeartbeat(t *testing.T) {
	var h heartbeat
	ctx := context.Background()
	h.beat(10 * time.Second)
	if err := h.live(ctx); err != nil {
		t.Fatalf("live = %v", err)
	}
	h.beat(time.Millisecond)
	time.Sleep(10 * time.Millisecond)
	if err := h.live(ctx); err == nil {
		t.Fatal("live = nil after the main loop missed its beats")
	}
}

func TestStatusLine(t *testing.T) {
	for _, tt := range []struct {
		counts map[string]int
		want   string
	}{
		{nil, "STATUS=0 instances"},
		{map[string]int{"running": 2, "backoff": 1, "stopped": 1}, "STATUS=4 instances, 2 running, 1 backoff"},
		{map[string]int{"crashloop": 1, "starting": 3, "stopping": 1}, "STATUS=5 instances, 3 starting, 1 crashloop, 1 stopping"},
	} {
		if got := statusLine(tt.counts); got != tt.want {
			t.Errorf("statusLine(%v) = %q, want %q", tt.counts, got, tt.want)
		}
	}
}

// A certificate that cannot be loaded is refused, saying which.
func TestTLSConfigSaysWhatIsMissing(t *testing.T) {
	if _, err := tlsConfig(Config{TLSCert: "/nonexistent/cert.pem", TLSKey: "/nonexistent/key.pem"}); err == nil || !strings.Contains(err.Error(), "TLS certificate") {
		t.Fatalf("missing certificate: %v", err)
	}
}

// fakeService is the main loop's view of the agent.
type fakeService struct{ unready atomic.Bool }

func (f *fakeService) Ready(context.Context) error {
	if f.unready.Load() {
		return errors.New("state store is not writable")
	}
	return nil
}

func (f *fakeService) InstanceStates() map[string]int {
	return map[string]int{"running": 2, "backoff": 1}
}

// notifySocket listens where NOTIFY_SOCKET points and returns the
// messages that arrive.
func notifySocket(t *testing.T) <-chan string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return msgs
}

// next returns the next message that contains want.
func next(t *testing.T, msgs <-chan string, want string) string {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case m := <-msgs:
			if strings.Contains(m, want) {
				return m
			}
		case <-timeout:
			t.Fatalf("no notify message with %q", want)
		}
	}
}

// The main loop beats at half the watchdog interval, says what runs in
// STATUS=, feeds the watchdog only while the agent is ready, and returns
// when ctx ends or the API stops serving.
func TestMainLoop(t *testing.T) {
	msgs := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "20000")
	svc := &fakeService{}
	beat := &heartbeat{}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	serveErr := make(chan error, 1)
	done := make(chan error, 1)
	go func() { done <- mainLoop(ctx, svc, beat, serveErr, log) }()

	if m := next(t, msgs, "STATUS="); m != "WATCHDOG=1\nSTATUS=3 instances, 2 running, 1 backoff" {
		t.Fatalf("message while ready = %q", m)
	}
	if every := time.Duration(beat.every.Load()); every != 10*time.Millisecond {
		t.Fatalf("beats every %v, want half the watchdog's 20ms", every)
	}
	svc.unready.Store(true)
	next(t, msgs, "STATUS=") // one may have been on its way
	if m := next(t, msgs, "STATUS="); strings.Contains(m, "WATCHDOG") {
		t.Fatalf("message while not ready = %q, want no WATCHDOG=1", m)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("mainLoop at ctx's end = %v", err)
	}

	go func() { done <- mainLoop(context.Background(), svc, beat, serveErr, log) }()
	serveErr <- http.ErrServerClosed
	if err := <-done; err != nil {
		t.Fatalf("mainLoop after a shutdown = %v", err)
	}
	go func() { done <- mainLoop(context.Background(), svc, beat, serveErr, log) }()
	serveErr <- errors.New("accept: too many open files")
	if err := <-done; err == nil || !strings.Contains(err.Error(), "serve: accept") {
		t.Fatalf("mainLoop after a serve error = %v", err)
	}
}

// Run serves the API before reconcile and /readyz once it is done,
// notifies systemd, and returns nil when ctx ends; a taken address fails
// at once, naming it.
func TestRun(t *testing.T) {
	msgs := notifySocket(t)
	cfg := DefaultConfig()
	cfg.Agent.DataDir = testenv.TraversableDir(t)
	cfg.Agent.RedisServer = testenv.RedisServer(t)
	cfg.Agent.Launcher = testenv.Launcher(t)
	cfg.Agent.PortMin = testenv.Ports(t, 2)
	cfg.Agent.PortMax = cfg.Agent.PortMin + 1
	cfg.Agent.Cgroups = "off"
	cfg.Agent.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.Listen = "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	next(t, msgs, "READY=1")
	for _, path := range []string{"/healthz", "/readyz", "/v1/capacity", "/metrics"} {
		resp, err := http.Get("http://" + cfg.Listen + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("GET %s = %d, want 200", path, resp.StatusCode)
		}
	}

	// A second agent on the same address (another data directory).
	other := cfg
	other.Agent.DataDir = testenv.TraversableDir(t)
	if err := Run(context.Background(), other); err == nil || !strings.Contains(err.Error(), "listen on "+cfg.Listen) {
		t.Fatalf("Run on a taken address = %v, want an error naming it", err)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run at ctx's end = %v", err)
	}
	next(t, msgs, "STOPPING=1")
	if _, err := os.Stat(filepath.Join(cfg.Agent.DataDir, "state", "agent.db")); err != nil {
		t.Fatalf("no state after Run: %v", err)
	}
}
