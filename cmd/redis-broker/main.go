// Command redis-broker is the Open Service Broker in front of a fleet of
// redis-agents: flags and environment become a broker.Config; `status`
// prints the fleet.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/redis-agent/redis-agent/broker"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "redis-broker:", err)
		os.Exit(1)
	}
}

// settings are the parsed command line.
type settings struct {
	cfg             broker.Config
	listen          string
	tlsCert, tlsKey string
	logLevel        string
}

func env(name, def string) string {
	if v, ok := os.LookupEnv("REDIS_BROKER_" + name); ok {
		return v
	}
	return def
}

// agentFlags collects repeated --agent values.
type agentFlags []broker.AgentConfig

func (a *agentFlags) String() string { return fmt.Sprint(len(*a)) }

// Set parses name=url[,zone=z][,token-file=path].
func (a *agentFlags) Set(v string) error {
	ac, err := parseAgent(v)
	if err != nil {
		return err
	}
	*a = append(*a, ac)
	return nil
}

func parseAgent(v string) (broker.AgentConfig, error) {
	parts := strings.Split(strings.TrimSpace(v), ",")
	name, url, ok := strings.Cut(parts[0], "=")
	if !ok || name == "" || url == "" {
		return broker.AgentConfig{}, fmt.Errorf("agent %q: want name=url[,zone=z][,token-file=path]", v)
	}
	ac := broker.AgentConfig{Name: name, URL: url}
	for _, p := range parts[1:] {
		k, val, _ := strings.Cut(p, "=")
		switch k {
		case "zone":
			ac.Zone = val
		case "token-file":
			b, err := os.ReadFile(val)
			if err != nil {
				return ac, fmt.Errorf("agent %s: token file: %w", name, err)
			}
			ac.Token = strings.TrimSpace(string(b))
		default:
			return ac, fmt.Errorf("agent %q: unknown setting %q", v, k)
		}
	}
	return ac, nil
}

func parse(args []string, out io.Writer) (settings, error) {
	var s settings
	fs := flag.NewFlagSet("redis-broker", flag.ContinueOnError)
	fs.SetOutput(out)
	var agents agentFlags
	fs.StringVar(&s.listen, "listen", env("LISTEN", "127.0.0.1:7080"), "address of the OSB and admin API (env REDIS_BROKER_LISTEN)")
	fs.Var(&agents, "agent", "an agent: name=url[,zone=z][,token-file=path]; repeat for each (env REDIS_BROKER_AGENTS, separated by spaces)")
	agentsFile := fs.String("agents-file", env("AGENTS_FILE", ""), "YAML list of agents {name, url, zone, token} (env REDIS_BROKER_AGENTS_FILE)")
	catalog := fs.String("catalog", env("CATALOG", ""), "catalog YAML; default: the built-in one (env REDIS_BROKER_CATALOG)")
	fs.StringVar(&s.cfg.Username, "username", env("USERNAME", "broker"), "the platform's basic auth user (env REDIS_BROKER_USERNAME)")
	passwordFile := fs.String("password-file", env("PASSWORD_FILE", ""), "file holding the platform's basic auth password (env REDIS_BROKER_PASSWORD_FILE, or the password in REDIS_BROKER_PASSWORD)")
	fs.StringVar(&s.cfg.AdminUsername, "admin-username", env("ADMIN_USERNAME", "admin"), "the operators' basic auth user for /admin (env REDIS_BROKER_ADMIN_USERNAME)")
	adminPasswordFile := fs.String("admin-password-file", env("ADMIN_PASSWORD_FILE", ""), "file holding the operators' password; /admin is off without one (env REDIS_BROKER_ADMIN_PASSWORD_FILE, or REDIS_BROKER_ADMIN_PASSWORD)")
	strategy := fs.String("strategy", env("STRATEGY", string(broker.Spread)), "placement: spread (most free memory, across zones) or pack (bin-packing) (env REDIS_BROKER_STRATEGY)")
	fs.DurationVar(&s.cfg.Refresh, "refresh", 30*time.Second, "how often the fleet is looked at again")
	fs.DurationVar(&s.cfg.AgentTimeout, "agent-timeout", 10*time.Second, "bound of one request to an agent (not a snapshot's transfer)")
	staleMove := fs.String("stale-move", env("STALE_MOVE", "0"), "age at which a move a stopped broker left is settled; 0: 35m (env REDIS_BROKER_STALE_MOVE; shorter only in tests)")
	staleCutover := fs.String("stale-cutover", env("STALE_CUTOVER", "0"), "the same for a move left cut over; 0: 1m (env REDIS_BROKER_STALE_CUTOVER; shorter only in tests)")
	fs.StringVar(&s.tlsCert, "tls-cert", env("TLS_CERT", ""), "serve HTTPS with this certificate (env REDIS_BROKER_TLS_CERT)")
	fs.StringVar(&s.tlsKey, "tls-key", env("TLS_KEY", ""), "and this key (env REDIS_BROKER_TLS_KEY)")
	fs.StringVar(&s.logLevel, "log-level", env("LOG_LEVEL", "info"), "debug, info, warn or error (env REDIS_BROKER_LOG_LEVEL)")
	if err := fs.Parse(args); err != nil {
		return s, err
	}
	for _, d := range []struct {
		name, v string
		to      *time.Duration
	}{{"stale-move", *staleMove, &s.cfg.StaleMove}, {"stale-cutover", *staleCutover, &s.cfg.StaleCutover}} {
		v, err := time.ParseDuration(d.v)
		if err != nil || v < 0 {
			return s, fmt.Errorf("--%s %q: want a duration, 0 for the default", d.name, d.v)
		}
		*d.to = v
	}
	secret := func(file, envName string) (string, error) {
		if file != "" {
			b, err := os.ReadFile(file)
			return strings.TrimSpace(string(b)), err
		}
		return strings.TrimSpace(os.Getenv("REDIS_BROKER_" + envName)), nil
	}
	var err error
	if s.cfg.Password, err = secret(*passwordFile, "PASSWORD"); err != nil {
		return s, fmt.Errorf("password file: %w", err)
	}
	if s.cfg.AdminPassword, err = secret(*adminPasswordFile, "ADMIN_PASSWORD"); err != nil {
		return s, fmt.Errorf("admin password file: %w", err)
	}
	if s.cfg.AdminPassword == "" {
		s.cfg.AdminUsername = ""
	}
	if len(agents) == 0 {
		for _, v := range strings.Fields(env("AGENTS", "")) {
			if err := agents.Set(v); err != nil {
				return s, err
			}
		}
	}
	if *agentsFile != "" {
		b, err := os.ReadFile(*agentsFile)
		if err != nil {
			return s, err
		}
		var more []broker.AgentConfig
		if err := yaml.Unmarshal(b, &more); err != nil {
			return s, fmt.Errorf("agents file %s: %w", *agentsFile, err)
		}
		agents = append(agents, more...)
	}
	s.cfg.Agents = agents
	if *catalog != "" {
		if s.cfg.Catalog, err = broker.LoadCatalog(*catalog); err != nil {
			return s, err
		}
	}
	s.cfg.Strategy = broker.Strategy(*strategy)
	if s.cfg.Password == "" {
		return s, errors.New("no password for the platform: set REDIS_BROKER_PASSWORD or --password-file")
	}
	return s, s.cfg.Validate()
}

func run(args []string, out io.Writer) error {
	if len(args) > 0 && args[0] == "status" {
		return status(args[1:], out)
	}
	s, err := parse(args, out)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(s.logLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", s.logLevel, err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	s.cfg.Logger = log
	b, err := broker.New(s.cfg)
	if err != nil {
		return err
	}
	defer b.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", s.listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.listen, err)
	}
	b.Start(ctx)
	srv := &http.Server{Handler: b.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	errc := make(chan error, 1)
	go func() {
		if s.tlsCert != "" {
			errc <- srv.ServeTLS(ln, s.tlsCert, s.tlsKey)
			return
		}
		errc <- srv.Serve(ln)
	}()
	log.Info("broker listening", "addr", ln.Addr().String(), "agents", len(s.cfg.Agents), "admin", s.cfg.AdminUsername != "")
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}
