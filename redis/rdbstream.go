package redis

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// RDB transfers by the replication protocol. A replica's full
// synchronisation is the one way Redis hands out a fresh RDB without
// writing it to its disk (diskless sync, the default since 7.0: the fork
// writes it to the socket), and the one way it loads an RDB while the
// bytes still arrive (repl-diskless-load). StreamRDB is the replica's side
// of it, for a snapshot; ServeRDB (rdbserve.go) the primary's, for a
// restore's loader.

// eofMarkLen is the length of the mark that ends an RDB of unknown length
// in a full synchronisation ("$EOF:<mark>" before it, the mark after).
const eofMarkLen = 40

// StreamRDB copies a fresh RDB of the server's data set to w and returns
// its length. It asks for it as a replica does (REPLCONF capa eof, PSYNC
// ? -1), on a connection of its own, logged in as the admin user, closed
// as soon as the RDB is complete: the server forks and, with
// repl-diskless-sync (the default), writes the RDB straight to the
// socket, so nothing is written to its disk or fsynced. The RDB is a
// consistent copy of the data set as it was when the call began (or a
// little after: when another replica's transfer runs, the next fork).
// The server keeps a replication backlog from then on (repl-backlog-size,
// 1 MiB by default) until repl-backlog-ttl.
func (a *Admin) StreamRDB(ctx context.Context, w io.Writer) (int64, error) {
	network := "tcp"
	if strings.HasPrefix(a.addr, "/") {
		network = "unix"
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, a.addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	defer context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })()
	var req []byte
	if a.user != "" {
		req = command("AUTH", a.user, a.secret)
	}
	req = append(req, command("REPLCONF", "capa", "eof", "capa", "psync2")...)
	if _, err := c.Write(req); err != nil {
		return 0, err
	}
	r := bufio.NewReaderSize(c, 64<<10)
	if a.user != "" {
		if _, err := readReply(r); err != nil {
			return 0, fmt.Errorf("AUTH: %w", err)
		}
	}
	if _, err := readReply(r); err != nil {
		return 0, fmt.Errorf("REPLCONF: %w", err)
	}
	// Not pipelined: PSYNC is refused while replies are still pending.
	if _, err := c.Write(command("PSYNC", "?", "-1")); err != nil {
		return 0, err
	}
	// Newlines keep the link alive while the fork waits (for another
	// fork, an AOF rewrite, to end) and until it starts writing.
	next := func() (string, error) {
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return "", err
			}
			if line = strings.TrimRight(line, "\r\n"); line != "" {
				return line, nil
			}
		}
	}
	full, err := next()
	if err != nil {
		return 0, fmt.Errorf("PSYNC: %w", err)
	}
	if !strings.HasPrefix(full, "+FULLRESYNC ") {
		return 0, fmt.Errorf("PSYNC: unexpected reply %q", full)
	}
	head, err := next()
	if err != nil {
		return 0, fmt.Errorf("wait for the RDB: %w", err)
	}
	if mark, ok := strings.CutPrefix(head, "$EOF:"); ok {
		if len(mark) != eofMarkLen {
			return 0, fmt.Errorf("RDB transfer: bad end mark %q", mark)
		}
		return copyUntilMark(w, r, []byte(mark))
	}
	n, err := strconv.ParseInt(strings.TrimPrefix(head, "$"), 10, 64)
	if err != nil || head[0] != '$' || n < 0 {
		return 0, fmt.Errorf("RDB transfer: unexpected %q", head)
	}
	// A disk-based sync (repl-diskless-sync no) sends the RDB's length.
	m, err := io.CopyN(w, r, n)
	if err != nil {
		return m, fmt.Errorf("RDB transfer cut short after %d of %d bytes: %w", m, n, err)
	}
	return m, nil
}

// copyUntilMark copies r to w until the bytes read end with mark, which it
// does not copy. The primary sends nothing after the mark until the
// replica acknowledges the RDB, so the mark is the end of what arrives.
func copyUntilMark(w io.Writer, r io.Reader, mark []byte) (int64, error) {
	buf := make([]byte, 256<<10)
	held := 0 // bytes at the start of buf not written yet: a possible mark
	var n int64
	for {
		m, err := r.Read(buf[held:])
		held += m
		if held >= len(mark) && bytes.Equal(buf[held-len(mark):held], mark) {
			k, werr := w.Write(buf[:held-len(mark)])
			return n + int64(k), werr
		}
		if out := held - len(mark); out > 0 {
			k, werr := w.Write(buf[:out])
			n += int64(k)
			if werr != nil {
				return n, werr
			}
			held = copy(buf, buf[out:held])
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return n, fmt.Errorf("RDB transfer cut short after %d bytes: %w", n, err)
		}
	}
}
