// Package sdnotify receives the readiness notifications (sd_notify(3):
// "READY=1") of the redis-servers the agent starts, so that it knows a
// start has finished without polling it with connections. A redis-server
// whose environment names the socket in NOTIFY_SOCKET, with "supervised
// auto" in its config, sends READY=1 once it has loaded its data and
// accepts connections.
//
// One datagram socket serves every instance. The kernel stamps each
// datagram with its sender's pid (SO_PASSCRED), which a sender cannot
// forge, so a message counts only for the process that sent it: a local
// process that sends READY=1 speaks for itself, and the agent waits for
// none but its own children.
package sdnotify

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// earlyKept is how long a READY=1 that came before anyone waited for it
// (a process faster than its spawner's bookkeeping) is kept.
const earlyKept = 30 * time.Second

// Listener is the socket and the waits on it.
type Listener struct {
	path string
	conn *net.UnixConn
	done chan struct{}

	mu      sync.Mutex
	waits   map[int]*wait
	early   map[int]time.Time // pid -> when its READY=1 came, no wait registered
	trusted map[string]bool   // binaries seen to send READY=1
}

type wait struct {
	since  time.Time
	binary string
	ready  chan struct{}
}

// Listen binds the socket at path (an absolute path of at most 107
// bytes; a file left there by an earlier agent is replaced), writable by
// every user, since every instance runs as a user of its own.
func Listen(path string) (*Listener, error) {
	if len(path) > 107 {
		return nil, fmt.Errorf("notify socket %s: path longer than a unix socket address takes (107 bytes)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	if err := setPassCred(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("notify socket: SO_PASSCRED: %w", err)
	}
	// Writable by all: sendto needs write permission on the socket.
	if err := os.Chmod(path, 0o622); err != nil {
		conn.Close()
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	l := &Listener{path: path, conn: conn, done: make(chan struct{}),
		waits: map[int]*wait{}, early: map[int]time.Time{}, trusted: map[string]bool{}}
	go l.read()
	return l, nil
}

func setPassCred(conn *net.UnixConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1)
	}); err != nil {
		return err
	}
	return serr
}

// Env is the environment entry that points a process at the socket.
func (l *Listener) Env() string { return "NOTIFY_SOCKET=" + l.path }

// Close stops receiving and removes the socket. Waits not yet released
// are never notified.
func (l *Listener) Close() error {
	err := l.conn.Close()
	<-l.done
	os.Remove(l.path)
	return err
}

// Expect registers a wait for the READY=1 of process pid, which binary
// started at since, and returns a channel closed when it comes (at once
// when it came already), whether binary has sent READY=1 before (a
// redis-server built without systemd support never does, and its starts
// are best found by polling), and the release of the wait, to be called
// when it is no longer needed.
func (l *Listener) Expect(pid int, binary string, since time.Time) (ready <-chan struct{}, trusted bool, release func()) {
	w := &wait{since: since, binary: binary, ready: make(chan struct{})}
	l.mu.Lock()
	defer l.mu.Unlock()
	if at, ok := l.early[pid]; ok && !at.Before(since) {
		delete(l.early, pid)
		l.trusted[binary] = true
		close(w.ready)
		return w.ready, true, func() {}
	}
	trusted = l.trusted[binary]
	l.waits[pid] = w
	return w.ready, trusted, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.waits[pid] == w {
			delete(l.waits, pid)
		}
	}
}

// Trusts reports whether binary has sent READY=1 here, for a wait.
func (l *Listener) Trusts(binary string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.trusted[binary]
}

// read receives until the socket is closed.
func (l *Listener) read() {
	defer close(l.done)
	buf := make([]byte, 4096)
	oob := make([]byte, syscall.CmsgSpace(syscall.SizeofUcred))
	for {
		n, oobn, _, _, err := l.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // a truncated or odd datagram: the next one
		}
		pid, ok := sender(oob[:oobn])
		if !ok || !ready(buf[:n]) {
			continue
		}
		l.ready(pid, time.Now())
	}
}

// sender is the pid the kernel stamped on a datagram.
func sender(oob []byte) (int, bool) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return 0, false
	}
	for i := range msgs {
		if c, err := syscall.ParseUnixCredentials(&msgs[i]); err == nil && c.Pid > 0 {
			return int(c.Pid), true
		}
	}
	return 0, false
}

// ready reports whether a notification's lines include READY=1.
func ready(msg []byte) bool {
	for line := range bytes.SplitSeq(msg, []byte("\n")) {
		if string(line) == "READY=1" {
			return true
		}
	}
	return false
}

func (l *Listener) ready(pid int, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if w, ok := l.waits[pid]; ok && !at.Before(w.since) {
		delete(l.waits, pid)
		l.trusted[w.binary] = true
		close(w.ready)
		return
	}
	if len(l.early) >= 1024 {
		for p, t := range l.early {
			if at.Sub(t) > earlyKept {
				delete(l.early, p)
			}
		}
		if len(l.early) >= 4096 {
			return // a flood of READY=1 from pids nobody started
		}
	}
	l.early[pid] = at
}
