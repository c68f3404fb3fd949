package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
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
	if cfg.TLSCert != "" {
		tc, err := tlsConfig(cfg)
		if err != nil {
			ln.Close()
			return err
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

	if err := svc.Reconcile(ctx); err != nil {
		srv.Close()
		return fmt.Errorf("reconcile: %w", err)
	}
	notify(log, daemon.SdNotifyReady+"\n"+svc.statusLine())
	// Instances still on another redis-server binary than the configured
	// one move to it now, one at a time, in the background.
	svc.AutoRollout(ctx)

	// The main loop: systemd's watchdog is fed only while the agent can
	// serve (state writable, redis-server executable), and STATUS= tells
	// systemctl what runs.
	watchdog, _ := daemon.SdWatchdogEnabled(false)
	tick := 10 * time.Second
	if watchdog > 0 {
		tick = min(tick, watchdog/2)
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	svc.beat(tick)
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-serveErr:
			if !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve: %w", err)
			}
			break loop
		case <-ticker.C:
			svc.beat(tick)
			msg := svc.statusLine()
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
	notify(log, daemon.SdNotifyStopping)
	log.Info("shutting down; redis-servers keep running")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("API shutdown", "err", err)
	}
	return nil
}

// statusLine summarises the instances for systemd's STATUS=.
func (s *Service) statusLine() string {
	counts := map[string]int{}
	n := 0
	s.mu.Lock()
	for _, in := range s.instances {
		counts[in.sup.Status().State.String()]++
		n++
	}
	s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "STATUS=%d instances", n)
	for _, st := range []string{"running", "starting", "backoff", "crashloop", "stopping"} {
		if counts[st] > 0 {
			fmt.Fprintf(&b, ", %d %s", counts[st], st)
		}
	}
	return b.String()
}

// tlsConfig loads the server certificate and, when set, the client CA.
// Client certificates are verified when given but not required at the TLS
// layer, so /healthz and /readyz stay open; the API requires one (or a
// token) on /v1.
func tlsConfig(cfg Config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if cfg.TLSClientCA != "" {
		pem, err := os.ReadFile(cfg.TLSClientCA)
		if err != nil {
			return nil, fmt.Errorf("TLS client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS client CA %s: no PEM certificate in it", cfg.TLSClientCA)
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return tc, nil
}

func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notify", "state", state, "err", err)
	}
}
