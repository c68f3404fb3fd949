package redis

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// The control connection. The agent talks to each redis-server over one
// connection, logged in as the admin user, that it opens as soon as the
// server answers (while it loads, or at its first PONG) and keeps for the
// life of the process: the health check, ACL changes, resizes, saves and
// SHUTDOWN all go over it. A tenant, or anyone who can reach the port, can
// fill every client slot (maxclients) with plain TCP connections; a
// connection the agent already holds keeps working then, where a new one
// is refused.

// Reply is one RESP2 reply other than an error.
type Reply struct {
	// Str is a simple or bulk string's value.
	Str string
	// Int is an integer reply's value.
	Int int64
	// Array holds the elements of an array reply.
	Array []Reply
	// Nil is set for a null bulk string or array.
	Nil bool
}

// Strings returns the elements of an array reply as strings.
func (r Reply) Strings() []string {
	out := make([]string, len(r.Array))
	for i, e := range r.Array {
		out[i] = e.Str
	}
	return out
}

// ServerError is an error reply: the server is alive and answered. Its
// methods say which answers mean "alive but not ready" to a caller that
// does not import this package.
type ServerError struct{ Msg string }

func (e ServerError) Error() string { return e.Msg }

// Alive is true: a server that answers is not hung.
func (ServerError) Alive() bool { return true }

// Loading reports a server that is loading its data set.
func (e ServerError) Loading() bool { return strings.HasPrefix(e.Msg, "LOADING") }

// Busy reports a server running a script past busy-reply-threshold: only
// SCRIPT KILL or the script's end frees it.
func (e ServerError) Busy() bool { return strings.HasPrefix(e.Msg, "BUSY") }

// Saturated reports a server whose client slots are all taken: it refused
// this connection, not the ones it holds.
func (e ServerError) Saturated() bool {
	return strings.Contains(e.Msg, "max number of clients reached")
}

// Is makes errors.Is(err, ErrLoading) and errors.Is(err, ErrSaturated)
// hold for the matching replies.
func (e ServerError) Is(target error) bool {
	return (target == ErrLoading && e.Loading()) || (target == ErrSaturated && e.Saturated())
}

// ErrLoading matches (errors.Is) the error of a server that is loading its
// data set: the process is alive but not ready.
var ErrLoading = errors.New("redis is loading its data set")

// ErrSaturated matches (errors.Is) the error of a server that refused a new
// connection because every client slot is taken.
var ErrSaturated = errors.New("redis refuses new connections: max number of clients reached")

// closedError is a connection the server accepted and then closed before
// answering: something is there and acting, so not hung.
type closedError struct{ err error }

func (e closedError) Error() string { return "connection closed by redis-server: " + e.err.Error() }
func (e closedError) Unwrap() error { return e.err }
func (closedError) Alive() bool     { return true }

// Closed reports a connection the server closed without an answer (a
// server with no free client slot does, when its refusal is lost to the
// reset).
func (closedError) Closed() bool { return true }

// ctrlConn is the kept connection.
type ctrlConn struct {
	c net.Conn
	r *bufio.Reader
}

// maxBulk bounds one bulk string of a reply (INFO is a few KiB).
const maxBulk = 4 << 20

// maxArray bounds one array reply (ACL USERS of an instance's bindings).
const maxArray = 1 << 20

// Do runs one command on the control connection and returns its reply;
// an error reply is a ServerError. A kept connection that turns out dead
// (its process restarted) is replaced once.
func (a *Admin) Do(ctx context.Context, args ...string) (Reply, error) {
	rs, err := a.pipeline(ctx, [][]string{args})
	if err != nil {
		return Reply{}, err
	}
	return rs[0], nil
}

// pipeline sends cmds in one write and reads their replies, in order. It
// returns the replies read before an error. A ServerError for one of them
// stops the reading there, the connection kept (its state is known).
func (a *Admin) pipeline(ctx context.Context, cmds [][]string) ([]Reply, error) {
	return a.exchange(ctx, cmds, true)
}

// exchange is pipeline, with the retry on a fresh connection only when
// retry is set.
func (a *Admin) exchange(ctx context.Context, cmds [][]string, retry bool) ([]Reply, error) {
	// A select picks at random among ready cases: an ended ctx must not
	// lose to a free connection.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case a.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-a.sem }()
	reused := a.ctrl != nil
	rs, err := a.roundTrip(ctx, cmds)
	if err != nil && retry && reused && len(rs) == 0 && !isServerError(err) && ctx.Err() == nil {
		// The kept connection may have died with an earlier process (a
		// restart); that is not this process's failure.
		rs, err = a.roundTrip(ctx, cmds)
	}
	return rs, err
}

func isServerError(err error) bool {
	var se ServerError
	return errors.As(err, &se)
}

// roundTrip runs cmds on the kept connection, dialling (and logging in)
// first when there is none. Any error but a ServerError drops the
// connection: a reply may still be on its way and would be read as the
// next command's. After a ServerError the other replies are still read,
// so the connection stays in step; the first such error is returned with
// the replies before it.
func (a *Admin) roundTrip(ctx context.Context, cmds [][]string) (rs []Reply, err error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(2 * time.Second)
	}
	cc := a.ctrl
	var req []byte
	login := cc == nil && a.user != ""
	if cc == nil {
		c, err := a.dial(ctx)
		if err != nil {
			return nil, err
		}
		cc = &ctrlConn{c: c, r: bufio.NewReaderSize(c, 1024)}
		if login {
			// The agent's connection is never the one disconnected
			// when the clients' memory passes maxmemory-clients.
			req = append(command("AUTH", a.user, a.secret), command("CLIENT", "NO-EVICT", "on")...)
		}
	}
	a.ctrl = nil
	inStep := false // every reply sent so far has been read
	defer func() {
		if inStep {
			a.ctrl = cc
		} else {
			cc.c.Close()
		}
	}()
	for _, args := range cmds {
		req = append(req, command(args...)...)
	}
	cc.c.SetDeadline(deadline)
	// A cancel without a deadline ends the wait too. (With one, the
	// connection's deadline is enough: the health checks, every few
	// seconds on every instance, skip the registration.)
	if _, hasDeadline := ctx.Deadline(); !hasDeadline && ctx.Done() != nil {
		defer context.AfterFunc(ctx, func() { cc.c.SetDeadline(time.Now()) })()
	}
	if _, err := cc.c.Write(req); err != nil {
		if isReset(err) {
			// The server closed it before reading: a full server
			// answers so, and its refusal may be lost with the reset.
			return nil, closedError{err}
		}
		return nil, err
	}
	if login {
		// A refused login (a full server) answers here, then closes.
		if _, err := readReply(cc.r); err != nil {
			return nil, fmt.Errorf("AUTH: %w", err)
		}
		// A server without CLIENT NO-EVICT (before 7.0) refuses it: the
		// connection is still logged in.
		if _, err := readReply(cc.r); err != nil && !isServerError(err) {
			return nil, fmt.Errorf("CLIENT NO-EVICT: %w", err)
		}
	}
	var first error
	for range cmds {
		r, err := readReply(cc.r)
		if err != nil && !isServerError(err) {
			return rs, err
		}
		if err != nil && first == nil {
			first = err
		}
		if first == nil {
			rs = append(rs, r)
		}
	}
	inStep = true
	return rs, first
}

// readReply reads one RESP2 reply. An error reply is returned as a
// ServerError; a connection closed before any byte of it as a closedError.
func readReply(r *bufio.Reader) (Reply, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		if line == "" && (errors.Is(err, io.EOF) || isReset(err)) {
			return Reply{}, closedError{err}
		}
		return Reply{}, fmt.Errorf("read reply: %w", err)
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return Reply{}, errors.New("read reply: empty line")
	}
	body := line[1:]
	switch line[0] {
	case '+':
		return Reply{Str: body}, nil
	case '-':
		return Reply{}, ServerError{body}
	case ':':
		n, err := strconv.ParseInt(body, 10, 64)
		if err != nil {
			return Reply{}, fmt.Errorf("read reply: bad integer %q", body)
		}
		return Reply{Int: n}, nil
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil || n < -1 || n > maxBulk {
			return Reply{}, fmt.Errorf("read reply: bad bulk length %q", body)
		}
		if n == -1 {
			return Reply{Nil: true}, nil
		}
		b := make([]byte, n+2)
		if _, err := io.ReadFull(r, b); err != nil {
			return Reply{}, fmt.Errorf("read reply: %w", err)
		}
		return Reply{Str: string(b[:n])}, nil
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil || n < -1 || n > maxArray {
			return Reply{}, fmt.Errorf("read reply: bad array length %q", body)
		}
		if n == -1 {
			return Reply{Nil: true}, nil
		}
		out := Reply{Array: make([]Reply, 0, min(n, 1024))}
		for range n {
			e, err := readReply(r)
			if err != nil {
				return Reply{}, err
			}
			out.Array = append(out.Array, e)
		}
		return out, nil
	}
	return Reply{}, fmt.Errorf("read reply: unexpected %q", line)
}

// command encodes a RESP array of bulk strings.
func command(args ...string) []byte {
	b := fmt.Appendf(nil, "*%d\r\n", len(args))
	for _, a := range args {
		b = fmt.Appendf(b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b
}
