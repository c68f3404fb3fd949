package redis

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// probe sends AUTH and PING on a fresh connection and reads both replies.
// It does not go through go-redis's pool on purpose: the pool retries a
// refused dial with 100 ms pauses and, after PoolSize failures, answers
// with the last error for up to a second, which would put a second of
// latency on every start and restart the agent waits for. A fresh
// connection per probe costs one loopback connect (~50 µs).
//
// An addr that is a path is a unix socket; an empty user sends no AUTH
// (the default user of a server reachable only through its socket).
func probe(ctx context.Context, addr, user, password string) error {
	network := "tcp"
	if strings.HasPrefix(addr, "/") {
		network = "unix"
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(2 * time.Second)
	}
	conn.SetDeadline(deadline)
	// Both commands in one write: one round trip.
	req, want := command("PING"), []string{"+PONG"}
	if user != "" {
		req, want = append(command("AUTH", user, password), req...), []string{"+OK", "+PONG"}
	}
	if _, err := conn.Write(req); err != nil {
		return err
	}
	r := bufio.NewReaderSize(conn, 256)
	for _, want := range want {
		line, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		line = strings.TrimRight(line, "\r\n")
		if strings.HasPrefix(line, "-LOADING") {
			return loadingError{errors.New(line[1:])}
		}
		if strings.HasPrefix(line, "-BUSY") {
			return busyError{line[1:]}
		}
		if line != want {
			return fmt.Errorf("unexpected reply %q", line)
		}
	}
	return nil
}

// command encodes a RESP array of bulk strings.
func command(args ...string) []byte {
	b := fmt.Appendf(nil, "*%d\r\n", len(args))
	for _, a := range args {
		b = fmt.Appendf(b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b
}

func isBusy(err error) bool {
	var b busyError
	return errors.As(err, &b)
}

// busyError is Ping's error while a script runs past busy-reply-threshold:
// the server is alive, and only SCRIPT KILL or the script's end frees it.
type busyError struct{ msg string }

func (e busyError) Error() string { return e.msg }
func (busyError) Busy() bool      { return true }
