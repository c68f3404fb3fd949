package redis

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Admin talks to one redis-server as the agent's admin user over the
// control connection (conn.go): one connection, opened at the first
// command and kept between calls, so the agent's commands never need a
// free client slot once it holds it. It is safe for concurrent use;
// commands take turns on the connection.
type Admin struct {
	addr, user, secret string
	host               string
	// tls, when set, is where and how the control connection is dialled
	// instead of addr: the instance requires TLS, its plain port is
	// closed.
	tls atomic.Pointer[tlsTarget]

	sem  chan struct{} // held while a command uses ctrl
	ctrl *ctrlConn     // the kept connection; nil until dialled
}

// tlsTarget is a TLS port to dial and the client config to dial it with.
type tlsTarget struct {
	addr string
	conf *tls.Config
}

// NewAdmin returns an Admin for the server at host:port. It does not connect
// until the first command.
func NewAdmin(host string, port int, password string) *Admin {
	return &Admin{
		addr:   net.JoinHostPort(host, strconv.Itoa(port)),
		host:   host,
		user:   AdminUser,
		secret: password,
		sem:    make(chan struct{}, 1),
	}
}

// UseTLS makes the next connections go to the TLS port tlsPort with conf
// (which verifies the server's certificate); a nil conf goes back to the
// plain port. The kept connection, whichever port it came through, is
// kept: a port closing leaves the connections it accepted open.
func (a *Admin) UseTLS(tlsPort int, conf *tls.Config) {
	if conf == nil {
		a.tls.Store(nil)
		return
	}
	a.tls.Store(&tlsTarget{addr: net.JoinHostPort(a.host, strconv.Itoa(tlsPort)), conf: conf})
}

// dial opens a new connection to the server: over TLS when the server
// requires it, on the unix socket of a restore's candidate, else plain TCP.
func (a *Admin) dial(ctx context.Context) (net.Conn, error) {
	if t := a.tls.Load(); t != nil {
		d := tls.Dialer{Config: t.conf}
		return d.DialContext(ctx, "tcp", t.addr)
	}
	network := "tcp"
	if strings.HasPrefix(a.addr, "/") {
		network = "unix"
	}
	var d net.Dialer
	return d.DialContext(ctx, network, a.addr)
}

// Responsive reports whether the server's event loop runs, on a
// connection of its own, whatever its clients have done to it: it sends
// a command no server knows, which Redis answers with an error before it
// looks at authentication or a pause. A server that a client's CLIENT
// PAUSE holds (every command of every client waits, AUTH and the
// agent's included, for as long as the client asked) answers it at
// once; a hung one does not. nil means it answered.
func (a *Admin) Responsive(ctx context.Context) error {
	c, err := a.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := c.Write(command(probeCommand)); err != nil {
		return err
	}
	_, err = readReply(bufio.NewReader(c))
	if isServerError(err) {
		return nil
	}
	if err == nil {
		return errors.New("probe: a reply that is not an error")
	}
	return err
}

// heldError is a command that got no answer in time from a server whose
// event loop does answer (Responsive): a client's CLIENT PAUSE holds
// every command until the pause ends. Alive, not hung.
type heldError struct{ err error }

func (e heldError) Error() string {
	return "no answer in time, yet the server answers a new connection at once (a client's CLIENT PAUSE holds its commands): " + e.err.Error()
}
func (e heldError) Unwrap() error { return e.err }
func (heldError) Alive() bool     { return true }

// Held reports a server that a pause holds.
func (heldError) Held() bool { return true }

// orHeld returns err, or a heldError for it when it is a timeout of a
// server that Responsive finds answering.
func (a *Admin) orHeld(err error) error {
	var ne net.Error
	if err == nil || !(errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()) {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if a.Responsive(ctx) == nil {
		return heldError{err}
	}
	return err
}

// probeCommand is the command of Responsive: no Redis has it.
const probeCommand = "REDIS-AGENT-PROBE"

// SetConfig changes settings of the running server (CONFIG SET with
// name-value pairs, applied together or not at all).
func (a *Admin) SetConfig(ctx context.Context, pairs ...string) error {
	if _, err := a.Do(ctx, append([]string{"CONFIG", "SET"}, pairs...)...); err != nil {
		return fmt.Errorf("CONFIG SET %s: %w", configNames(pairs), err)
	}
	return nil
}

// configNames are the names of CONFIG SET pairs, for an error.
func configNames(pairs []string) string {
	var names []string
	for i := 0; i < len(pairs); i += 2 {
		names = append(names, pairs[i])
	}
	return strings.Join(names, " ")
}

// ConfigGet returns the values of settings of the running server, by
// name (CONFIG GET with several names).
func (a *Admin) ConfigGet(ctx context.Context, names ...string) (map[string]string, error) {
	r, err := a.Do(ctx, append([]string{"CONFIG", "GET"}, names...)...)
	if err != nil {
		return nil, fmt.Errorf("CONFIG GET %s: %w", strings.Join(names, " "), err)
	}
	out := make(map[string]string, len(r.Array)/2)
	for i := 0; i+1 < len(r.Array); i += 2 {
		out[r.Array[i].Str] = r.Array[i+1].Str
	}
	return out, nil
}

// NewSocketAdmin returns an Admin for a server listening on the unix socket
// at path, as the agent's admin user with password (a restore's
// candidate, which has the instance's ACL file).
func NewSocketAdmin(path, password string) *Admin {
	return &Admin{addr: path, user: AdminUser, secret: password, sem: make(chan struct{}, 1)}
}

// Close drops the control connection.
func (a *Admin) Close() error {
	a.sem <- struct{}{}
	defer func() { <-a.sem }()
	if a.ctrl != nil {
		a.ctrl.c.Close()
		a.ctrl = nil
	}
	return nil
}

// Connected reports whether the control connection is held.
func (a *Admin) Connected() bool {
	a.sem <- struct{}{}
	defer func() { <-a.sem }()
	return a.ctrl != nil
}

// Ping returns nil when the server answers PONG, an error matching
// ErrLoading while it loads its data (the connection is kept: it is logged
// in), ErrSaturated when it has no client slot for a new connection, and
// another error when it cannot be reached.
func (a *Admin) Ping(ctx context.Context) error {
	r, err := a.Do(ctx, "PING")
	if err != nil {
		return a.orHeld(err)
	}
	if r.Str != "PONG" {
		return fmt.Errorf("PING: unexpected reply %q", r.Str)
	}
	return nil
}

// SyncUsers makes the running server's users exactly users, each with its
// rules (the admin and default users are left alone): users missing or different are
// set with ACL SETUSER, which keeps their open connections, and users the
// server has but users lacks are removed with ACL DELUSER, which closes
// theirs. It never uses ACL LOAD: on Redis 7.0 that disconnects every
// client, tenants included.
func (a *Admin) SyncUsers(ctx context.Context, users []User) error {
	live, err := a.Do(ctx, "ACL", "USERS")
	if err != nil {
		return fmt.Errorf("ACL USERS: %w", err)
	}
	want := make(map[string]bool, len(users))
	var cmds [][]string
	for _, u := range users {
		want[u.Name] = true
		cmds = append(cmds, append([]string{"ACL", "SETUSER", u.Name, "reset", u.onOff(), "#" + u.PasswordHash}, strings.Fields(u.rules())...))
	}
	for _, name := range live.Strings() {
		if !want[name] && name != AdminUser && name != "default" {
			cmds = append(cmds, []string{"ACL", "DELUSER", name})
		}
	}
	if len(cmds) == 0 {
		return nil
	}
	// One round trip for every change.
	rs, err := a.pipeline(ctx, cmds)
	if err != nil {
		return fmt.Errorf("%s %s: %w", cmds[len(rs)][1], cmds[len(rs)][2], err)
	}
	return nil
}

// Shutdown asks the server to exit. With nosave it writes nothing (the data
// is about to be removed); otherwise it persists what its config says (an
// AOF fsync, an RDB when save points are set), as on SIGTERM but without
// waiting for the next cron tick. A PING goes first, in a round trip of
// its own (Redis exits before it writes the replies of the commands it
// read with SHUTDOWN), so the connection is known to reach the live
// server: its drop is then SHUTDOWN's expected answer.
func (a *Admin) Shutdown(ctx context.Context, nosave bool) error {
	if err := a.Ping(ctx); err != nil && !isServerError(err) || errors.Is(err, ErrSaturated) {
		// SHUTDOWN cannot reach the server (it is not listening yet, is
		// gone, or has no slot for us): the caller must signal it.
		return fmt.Errorf("SHUTDOWN: %w", err)
	}
	// NOW: no wait (up to shutdown-timeout, 10 s) for replicas to catch
	// up; the only replica an instance has is a move's, which has either
	// taken over or is to be thrown away.
	args := []string{"SHUTDOWN", "NOW"}
	if nosave {
		// The data is about to be removed: nothing may keep it running
		// (Redis refuses to exit while it writes a replica's first AOF).
		args = append(args, "NOSAVE", "FORCE")
	}
	_, err := a.exchange(ctx, [][]string{args}, false)
	if err == nil || isConnDrop(err) {
		return nil
	}
	return fmt.Errorf("SHUTDOWN: %w", err)
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func isConnDrop(err error) bool {
	var ce closedError
	return errors.As(err, &ce) || errors.Is(err, io.EOF) || isReset(err) || errors.Is(err, net.ErrClosed)
}

// Alive reports whether err, from a command to a server, still shows the
// server acting: it answered (an error reply, LOADING, BUSY, no free client
// slot) or closed the connection itself. Only a server that gives no
// answer at all, or none is listening, is not.
func Alive(err error) bool {
	var a interface{ Alive() bool }
	return err == nil || errors.As(err, &a) && a.Alive()
}

// Unreachable reports whether err says the server could not be talked to
// (no listener, a dropped or timed-out connection), as opposed to an
// answer from it, an error reply or a refusal for want of a client slot
// included.
func Unreachable(err error) bool { return err != nil && !isServerError(err) }
