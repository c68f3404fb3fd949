package redis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// ErrLoading is wrapped by Ping's error while redis-server loads its data
// set: the process is alive but not ready. The error also has a
// Loading() bool method, so callers can tell without importing this package.
var ErrLoading = errors.New("redis is loading its data set")

type loadingError struct{ err error }

func (e loadingError) Error() string   { return ErrLoading.Error() + ": " + e.err.Error() }
func (e loadingError) Unwrap() []error { return []error{ErrLoading, e.err} }
func (loadingError) Loading() bool     { return true }

// Admin talks to one redis-server as the agent's admin user. It holds no
// connection between calls: the agent's admin commands are rare (bind,
// unbind, stop) and its probes use fresh connections, so a thousand idle
// instances cost no sockets or buffers. It is safe for concurrent use.
type Admin struct {
	opts               *goredis.Options
	addr, user, secret string

	mu     sync.Mutex
	health *healthConn // kept between Info calls
}

// The agent reports connection failures itself; go-redis's own logging of
// them would only repeat them without the instance's id.
func init() { goredis.SetLogger(quietLogger{}) }

type quietLogger struct{}

func (quietLogger) Printf(context.Context, string, ...any) {}

// NewAdmin returns an Admin for the server at host:port. It does not connect
// until the first command.
func NewAdmin(host string, port int, password string) *Admin {
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	opts := &goredis.Options{
		Addr:                  addr,
		DialerRetries:         1,
		Username:              AdminUser,
		Password:              password,
		DialTimeout:           time.Second,
		ReadTimeout:           2 * time.Second,
		WriteTimeout:          2 * time.Second,
		MaxRetries:            -1, // the caller decides about retries
		PoolSize:              1,
		ReadBufferSize:        4096,
		WriteBufferSize:       4096,
		DisableIdentity:       true, // no CLIENT SETINFO noise on every connection
		ContextTimeoutEnabled: true,
		Protocol:              2,
	}
	return &Admin{opts: opts, addr: addr, user: AdminUser, secret: password}
}

// client returns a go-redis client for one call; the caller closes it.
func (a *Admin) client() *goredis.Client { return goredis.NewClient(a.opts) }

// Close drops the health connection.
func (a *Admin) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.health != nil {
		a.health.c.Close()
		a.health = nil
	}
	return nil
}

// Ping returns nil when the server answers PONG, ErrLoading while it loads
// its data, and another error when it cannot be reached.
// It uses a fresh connection each time (see probe).
func (a *Admin) Ping(ctx context.Context) error {
	return probe(ctx, a.addr, a.user, a.secret)
}

// SyncUsers makes the running server's tenant users exactly users (the
// admin and default users are left alone): users missing or different are
// set with ACL SETUSER, which keeps their open connections, and users the
// server has but users lacks are removed with ACL DELUSER, which closes
// theirs. It never uses ACL LOAD: on Redis 7.0 that disconnects every
// client, tenants included.
func (a *Admin) SyncUsers(ctx context.Context, users []User) error {
	c := a.client()
	defer c.Close()
	live, err := c.Do(ctx, "ACL", "USERS").StringSlice()
	if err != nil {
		return fmt.Errorf("ACL USERS: %w", err)
	}
	want := make(map[string]bool, len(users))
	for _, u := range users {
		want[u.Name] = true
		args := []any{"ACL", "SETUSER", u.Name, "reset", "on", "#" + u.PasswordHash}
		for _, r := range strings.Fields(TenantRules) {
			args = append(args, r)
		}
		if err := c.Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("ACL SETUSER %s: %w", u.Name, err)
		}
	}
	for _, name := range live {
		if want[name] || name == AdminUser || name == "default" {
			continue
		}
		if err := c.Do(ctx, "ACL", "DELUSER", name).Err(); err != nil {
			return fmt.Errorf("ACL DELUSER %s: %w", name, err)
		}
	}
	return nil
}

// Shutdown asks the server to exit. With nosave it writes nothing (the data
// is about to be removed); otherwise it persists what its config says (an
// AOF fsync, an RDB when save points are set), as on SIGTERM but without
// waiting for the next cron tick. The connection dropping is the expected
// answer.
func (a *Admin) Shutdown(ctx context.Context, nosave bool) error {
	args := []any{"SHUTDOWN"}
	if nosave {
		args = append(args, "NOSAVE")
	}
	c := a.client()
	defer c.Close()
	err := c.Do(ctx, args...).Err()
	if err == nil || (isConnDrop(err) && !isDialError(err)) {
		return nil
	}
	// A refused or failed dial means SHUTDOWN never reached the server
	// (it is not listening yet, or is gone): the caller must signal it.
	return fmt.Errorf("SHUTDOWN: %w", err)
}

// isDialError reports whether err is a failure to connect, as opposed to
// a connection that dropped after a command was sent.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.Is(err, syscall.ECONNREFUSED) || (errors.As(err, &op) && op.Op == "dial")
}

// Unreachable reports whether err says the server could not be talked to
// at all (refused, reset, closed, timed out), as opposed to an error reply.
func Unreachable(err error) bool { return err != nil && isConnDrop(err) }

func isConnDrop(err error) bool {
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	if errors.Is(err, net.ErrClosed) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	s := err.Error()
	return s == "EOF" || strings.Contains(s, "connection reset") || strings.Contains(s, "broken pipe")
}
