package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/api"
	"github.com/redis-agent/redis-agent/apitype"
)

// Run is the agent's main loop: it opens the Service, serves the API,
// reconciles, starts the rollout at agent start, and on ctx's end shuts
// the API down and returns, leaving every redis-server running.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := cfg.Agent.Logger
	if log == nil {
		log = slog.Default()
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), collectors.NewBuildInfoCollector())
	cfg.Agent.Registerer = reg
	svc, err := agent.New(cfg.Agent)
	if err != nil {
		return err
	}
	defer svc.Close()

	beat := &heartbeat{}
	beat.beat(10 * time.Second)
	handler := api.New(api.Options{
		Service:     svc,
		Logger:      log,
		Token:       cfg.Token,
		ClientCert:  cfg.TLSClientCA != "",
		MetricsAuth: cfg.MetricsAuth,
		MaxUploads:  cfg.MaxUploads,
		Ready:       svc.Ready,
		Details:     svc.ReadyDetails,
		Live:        beat.live,
		Registerer:  reg,
		Gatherer:    reg,
	})
	// Listen before reconcile so a port conflict fails fast; serve
	// /healthz during reconcile, /readyz says 503 until it is done.
	srv, serveErr, err := serve(cfg, log, handler)
	if err != nil {
		return err
	}
	if err := svc.Reconcile(ctx); err != nil {
		srv.Close()
		return fmt.Errorf("reconcile: %w", err)
	}
	notify(log, daemon.SdNotifyReady+"\n"+statusLine(svc.InstanceStates()))
	// Instances still on another redis-server binary than the configured
	// one move to it now, one at a time, in the background. Even the
	// rollout's start (redis-server --version, a read of every record) is
	// off the main loop's path: systemd's watchdog counts from READY=1,
	// and on a host busy starting every instance after a power-off it
	// took longer than WatchdogSec, so systemd killed a healthy agent.
	rolled := make(chan struct{})
	go func() {
		defer close(rolled)
		svc.AutoRollout(ctx)
	}()
	defer func() { <-rolled }() // before svc.Close

	if err := mainLoop(ctx, svc, beat, serveErr, log); err != nil {
		return err
	}
	notify(log, daemon.SdNotifyStopping)
	log.Info("shutting down; redis-servers keep running")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("API shutdown", "err", err)
	}
	return nil
}

// serve listens on cfg.Listen and serves h there, over TLS when
// configured, until the server is shut down; what Serve returns arrives
// on the channel.
func serve(cfg Config, log *slog.Logger, h http.Handler) (*http.Server, <-chan error, error) {
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       5 * time.Minute, // snapshots are uploaded through it
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if cfg.TLSCert != "" {
		tc, err := tlsConfig(cfg)
		if err != nil {
			ln.Close()
			return nil, nil, err
		}
		srv.TLSConfig = tc
	}
	serveErr := make(chan error, 1)
	go func() {
		if srv.TLSConfig != nil {
			serveErr <- srv.ServeTLS(ln, "", "")
			return
		}
		serveErr <- srv.Serve(ln)
	}()
	log.Info("API listening", "addr", ln.Addr().String())
	return srv, serveErr, nil
}

// service is what the main loop needs of the agent.
type service interface {
	Ready(ctx context.Context) error
	InstanceStates() map[string]int
}

var _ service = (*agent.Service)(nil)

// mainLoop beats until ctx ends (nil) or the API stops serving (nil when
// it was shut down, else the error). systemd's watchdog is fed only while
// the agent can serve (state writable, redis-server executable), and
// STATUS= tells systemctl what runs.
func mainLoop(ctx context.Context, svc service, beat *heartbeat, serveErr <-chan error, log *slog.Logger) error {
	watchdog, _ := daemon.SdWatchdogEnabled(false)
	tick := 10 * time.Second
	if watchdog > 0 {
		tick = min(tick, watchdog/2)
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	beat.beat(tick)
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-serveErr:
			if !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve: %w", err)
			}
			return nil
		case <-ticker.C:
			beat.beat(tick)
			msg := statusLine(svc.InstanceStates())
			if watchdog > 0 {
				if err := svc.Ready(ctx); err != nil {
					log.Error("not feeding the systemd watchdog", "err", err)
				} else {
					msg = daemon.SdNotifyWatchdog + "\n" + msg
				}
			}
			notify(log, msg)
		}
	}
}

// heartbeat is when the main loop last went round and how often it does.
type heartbeat struct {
	last  atomic.Int64 // unix nanoseconds
	every atomic.Int64 // nanoseconds
}

// beat records that the main loop is alive and how often it beats.
func (h *heartbeat) beat(every time.Duration) {
	h.every.Store(int64(every))
	h.last.Store(time.Now().UnixNano())
}

// live reports whether the main loop still goes round (/healthz): it
// fails when the loop missed three beats.
func (h *heartbeat) live(ctx context.Context) error {
	last := time.Unix(0, h.last.Load())
	if age := time.Since(last); age > 3*time.Duration(h.every.Load()) {
		return fmt.Errorf("main loop last ran %v ago", age.Round(time.Second))
	}
	return nil
}

// statusLine summarises instances counted by state for systemd's STATUS=.
func statusLine(counts map[string]int) string {
	n := 0
	for _, c := range counts {
		n += c
	}
	var b strings.Builder
	fmt.Fprintf(&b, "STATUS=%d instances", n)
	for _, st := range []string{apitype.StateRunning, apitype.StateStarting, apitype.StateBackoff, apitype.StateCrashloop, apitype.StateStopping} {
		if counts[st] > 0 {
			fmt.Fprintf(&b, ", %d %s", counts[st], st)
		}
	}
	return b.String()
}

func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notify", "state", state, "err", err)
	}
}
