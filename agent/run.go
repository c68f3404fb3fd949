package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Run is the agent's main loop: it opens the state, reconciles, serves the
// handler that newHandler builds on the Service, and on ctx's end shuts the
// API down and returns, leaving every redis-server running.
func Run(ctx context.Context, cfg Config, newHandler func(*Service) http.Handler) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	svc, err := New(cfg)
	if err != nil {
		return err
	}
	defer svc.Close()

	// Listen before reconcile so a port conflict fails fast; serve
	// /healthz during reconcile, /readyz says 503 until it is done.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{
		Handler:           newHandler(svc),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       5 * time.Minute, // snapshots are uploaded through it
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("API listening", "addr", ln.Addr().String())

	if err := svc.Reconcile(ctx); err != nil {
		srv.Close()
		return fmt.Errorf("reconcile: %w", err)
	}
	notify(log, daemon.SdNotifyReady)

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
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

func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notify", "state", state, "err", err)
	}
}
