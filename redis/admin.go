package redis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
)

// Admin talks to one redis-server as the agent's admin user over the
// control connection (conn.go): one connection, opened at the first
// command and kept between calls, so the agent's commands never need a
// free client slot once it holds it. It is safe for concurrent use;
// commands take turns on the connection.
type Admin struct {
	addr, user, secret string

	sem  chan struct{} // held while a command uses ctrl
	ctrl *ctrlConn     // the kept connection; nil until dialled
}

// NewAdmin returns an Admin for the server at host:port. It does not connect
// until the first command.
func NewAdmin(host string, port int, password string) *Admin {
	return &Admin{
		addr:   net.JoinHostPort(host, strconv.Itoa(port)),
		user:   AdminUser,
		secret: password,
		sem:    make(chan struct{}, 1),
	}
}

// NewSocketAdmin returns an Admin for a server listening on the unix socket
// at path with its default user (no AUTH): the agent's short-lived loader
// servers, reachable only through a socket in a 0700 directory.
func NewSocketAdmin(path string) *Admin {
	return &Admin{addr: path, sem: make(chan struct{}, 1)}
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
		return err
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
