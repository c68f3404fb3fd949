// Package server runs redis-agent as a daemon around an agent.Service: it
// serves the REST API (package api) over HTTP or HTTPS with its
// authentication, tells systemd that it is ready, what runs and that it
// is alive (sd_notify, the watchdog), and goes round the main loop whose
// heartbeat /healthz reports. Config is the Service's configuration plus
// how the API is served.
package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/api"
)

// Config is everything the agent's binary can be told. DefaultConfig
// gives values that work as root and as an ordinary user; Validate checks
// a Config.
type Config struct {
	// Agent is the Service's configuration. Run sets its Registerer (to
	// the registry /metrics serves); its Logger is the server's too.
	Agent agent.Config
	// Listen is the API's address. Its port must be outside the instance
	// port range.
	Listen string
	// Token is the bearer token every /v1 request must carry, at least
	// MinTokenBytes long without white space around it; "" disables token
	// authentication.
	Token string
	// TLSCert and TLSKey, when set, make the API serve HTTPS.
	TLSCert, TLSKey string
	// TLSClientCA, when set, lets a client certificate signed by it
	// authenticate /v1 requests (mTLS), instead of or beside the token.
	// Without a token nor a client CA, the API only listens on loopback.
	TLSClientCA string
	// MetricsAuth puts /metrics behind the same authentication as /v1.
	MetricsAuth bool
	// MaxUploads bounds the restores in progress at once; 0 means
	// api.DefaultMaxUploads.
	MaxUploads int
}

// DefaultConfig returns agent.DefaultConfig's Service with the API on
// 127.0.0.1:7070, without authentication (loopback only) or TLS.
func DefaultConfig() Config {
	return Config{Agent: agent.DefaultConfig(), Listen: "127.0.0.1:7070", MaxUploads: api.DefaultMaxUploads}
}

// MinTokenBytes is the shortest API token Validate accepts.
const MinTokenBytes = 16

// Validate checks c, the Service's configuration included, and says what
// to change.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Token != "" && strings.TrimSpace(c.Token) != c.Token {
		bad("the API token has white space around it, which no Authorization header can carry: remove it")
	} else if c.Token != "" && len(c.Token) < MinTokenBytes {
		bad("the API token is %d bytes: want at least %d (e.g. openssl rand -hex 32)", len(c.Token), MinTokenBytes)
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		bad("listen address %q: %v", c.Listen, err)
	} else if strings.TrimSpace(c.Token) == "" && c.TLSClientCA == "" && !isLoopback(c.Listen) {
		bad("listen address %q is not loopback and no authentication is configured: set --token-file (or REDIS_AGENT_TOKEN), or --tls-cert, --tls-key and --tls-client-ca for mTLS, or listen on 127.0.0.1", c.Listen)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("--tls-cert and --tls-key go together")
	}
	if c.TLSClientCA != "" && c.TLSCert == "" {
		bad("--tls-client-ca needs --tls-cert and --tls-key: client certificates are only checked over TLS")
	}
	if _, p, err := net.SplitHostPort(c.Listen); err == nil {
		if port, err := strconv.Atoi(p); err == nil && c.Agent.InPortRange(port) {
			bad("listen address %q: port %d is inside the instance port range %d-%d: listen on a port outside it, or move the range (--port-min, --port-max)", c.Listen, port, c.Agent.PortMin, c.Agent.PortMax)
		}
	}
	if err := c.Agent.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
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
