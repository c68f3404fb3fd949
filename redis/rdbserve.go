package redis

import (
	"bufio"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// eofMarkLen is the length of the mark that ends an RDB of unknown length
// in a full synchronisation ("$EOF:<mark>" before it, the mark after).
const eofMarkLen = 40

// Feed is the primary's side of one full synchronisation: a replica
// (REPLICAOF the feed's address, masterauth its password) that connects
// and asks to sync is sent an RDB of unknown length, written to the
// connection as it arrives. A replica with repl-diskless-load loads it from
// the socket as it comes: a restore's loader parses the upload while it
// is still being received.
type Feed struct {
	ln       net.Listener
	password string
	mark     []byte
}

// ListenFeed listens on host's loopback address at a port the kernel picks,
// with a random password (NewPassword) a replica must send (masterauth)
// before it may sync.
func ListenFeed(host string) (*Feed, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return nil, err
	}
	return &Feed{ln: ln, password: NewPassword(), mark: []byte(NewPassword()[:eofMarkLen])}, nil
}

// Host and Port are the feed's address.
func (f *Feed) Host() string { return f.ln.Addr().(*net.TCPAddr).IP.String() }

// Port is the feed's port.
func (f *Feed) Port() int { return f.ln.Addr().(*net.TCPAddr).Port }

// Password is what the replica must log in with.
func (f *Feed) Password() string { return f.password }

// Close stops listening (a connection accepted stays open).
func (f *Feed) Close() error { return f.ln.Close() }

// FeedConn is the connection of the replica being fed.
type FeedConn struct {
	c    net.Conn
	r    *bufio.Reader
	mark []byte
}

// Accept waits for a replica to log in and ask to sync (PING, AUTH with
// the password, REPLCONF, PSYNC), answers with a full resynchronisation
// of unknown length, and returns the connection, ready for the RDB. A
// connection that does anything else before it is logged in is closed and
// the next one awaited; the listener is closed once one has succeeded.
func (f *Feed) Accept(ctx context.Context) (*FeedConn, error) {
	stop := context.AfterFunc(ctx, func() { f.ln.Close() })
	defer stop()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		fc := &FeedConn{c: c, r: bufio.NewReader(c), mark: f.mark}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := fc.handshake(f.password); err != nil {
			c.Close()
			continue
		}
		c.SetDeadline(time.Time{})
		f.ln.Close()
		return fc, nil
	}
}

// handshake answers the replica's commands until its PSYNC, which it
// answers with FULLRESYNC and the start of an RDB of unknown length.
func (fc *FeedConn) handshake(password string) error {
	authed := false
	for {
		args, err := readCommand(fc.r)
		if err != nil {
			return err
		}
		var reply string
		switch strings.ToUpper(args[0]) {
		case "PING":
			reply = "+PONG\r\n"
		case "AUTH":
			given := args[len(args)-1]
			if len(args) < 2 || len(args) > 3 || subtle.ConstantTimeCompare([]byte(given), []byte(password)) != 1 {
				fc.c.Write([]byte("-WRONGPASS invalid password\r\n"))
				return errors.New("wrong password")
			}
			authed, reply = true, "+OK\r\n"
		case "REPLCONF":
			if !authed {
				return errors.New("REPLCONF before AUTH")
			}
			reply = "+OK\r\n"
		case "PSYNC", "SYNC":
			if !authed {
				return errors.New("PSYNC before AUTH")
			}
			replid := NewPassword()[:40]
			_, err := fmt.Fprintf(fc.c, "+FULLRESYNC %s 0\r\n$EOF:%s\r\n", replid, fc.mark)
			return err
		default:
			return fmt.Errorf("unexpected %q", args[0])
		}
		if _, err := io.WriteString(fc.c, reply); err != nil {
			return err
		}
	}
}

// Write sends RDB bytes to the replica.
func (fc *FeedConn) Write(p []byte) (int, error) { return fc.c.Write(p) }

// ReadFrom sends the replica what r holds: from a file, by sendfile.
func (fc *FeedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := fc.c.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(fc.c, r)
}

// End sends the end mark and waits until the replica has loaded what it
// was sent: nil at its first REPLCONF ACK (a replica acknowledges the RDB
// once it has loaded it), an error when it closes the connection first (it
// could not load it, or it exited).
func (fc *FeedConn) End(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { fc.c.SetDeadline(time.Now()) })
	defer stop()
	if _, err := fc.c.Write(fc.mark); err != nil {
		return err
	}
	// Nothing more comes: a replica still reading (an RDB cut short, whose
	// last value says it is longer than what came) reads the end of the
	// stream, and gives up, rather than wait for bytes that never come.
	// Its ACK still comes back the other way.
	if tc, ok := fc.c.(*net.TCPConn); ok {
		if err := tc.CloseWrite(); err != nil {
			return err
		}
	}
	for {
		args, err := readCommand(fc.r)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("the replica dropped the sync: %w", err)
		}
		if len(args) >= 2 && strings.EqualFold(args[0], "REPLCONF") && strings.EqualFold(args[1], "ACK") {
			return nil
		}
	}
}

// Close closes the connection.
func (fc *FeedConn) Close() error { return fc.c.Close() }

// readCommand reads one command a client sends: a RESP array of bulk
// strings, or an inline command (a line of words; a lone newline, which
// a replica sends to keep a link alive, is skipped).
func readCommand(r *bufio.Reader) ([]string, error) {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) && line == "" {
				return nil, io.EOF
			}
			return nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			continue
		}
		if line[0] != '*' {
			return strings.Fields(line), nil
		}
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 1 || n > 64 {
			return nil, fmt.Errorf("bad command header %q", line)
		}
		args := make([]string, 0, n)
		for range n {
			h, err := r.ReadString('\n')
			if err != nil {
				return nil, err
			}
			h = strings.TrimRight(h, "\r\n")
			size, err := strconv.Atoi(strings.TrimPrefix(h, "$"))
			if err != nil || h == "" || h[0] != '$' || size < 0 || size > 1<<16 {
				return nil, fmt.Errorf("bad argument header %q", h)
			}
			b := make([]byte, size+2)
			if _, err := io.ReadFull(r, b); err != nil {
				return nil, err
			}
			args = append(args, string(b[:size]))
		}
		return args, nil
	}
}
