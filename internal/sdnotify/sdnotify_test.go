package sdnotify

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func listen(t *testing.T) *Listener {
	t.Helper()
	l, err := Listen(filepath.Join(t.TempDir(), "notify.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func redisServer(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("no redis-server")
	}
	return bin
}

// startRedis starts bin on a free port with "supervised auto" and l's
// socket in its environment, and returns it, its port and the time
// before its start.
func startRedis(t *testing.T, l *Listener, bin string) (*exec.Cmd, int, time.Time) {
	t.Helper()
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conf := filepath.Join(dir, "redis.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("port %d\nbind 127.0.0.1\nsupervised auto\ndir %s\nsave \"\"\nappendonly no\n", port, dir)), 0o644)
	since := time.Now()
	cmd := exec.Command(bin, conf)
	cmd.Env = []string{l.Env()}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, port, since
}

// send sends msg to the listener from this process.
func send(t *testing.T, l *Listener, msg string) {
	t.Helper()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: l.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
}

func closedWithin(ch <-chan struct{}, d time.Duration) bool {
	select {
	case <-ch:
		return true
	default:
	}
	select {
	case <-ch:
		return true
	case <-time.After(d):
		return false
	}
}

// A real redis-server with "supervised auto" and NOTIFY_SOCKET says
// READY=1 once it accepts connections: the wait ends, PING answers at
// once, and its binary is trusted from then on.
func TestRedisServerSaysReady(t *testing.T) {
	bin := redisServer(t)
	l := listen(t)
	cmd, port, since := startRedis(t, l, bin)
	ready, trusted, release := l.Expect(cmd.Process.Pid, bin, since)
	defer release()
	if trusted {
		t.Fatal("trusted before it ever said READY=1")
	}
	if !closedWithin(ready, 10*time.Second) {
		t.Fatal("no READY=1 from redis-server in 10 s")
	}
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	if err != nil {
		t.Fatalf("READY=1 but no connection: %v", err)
	}
	defer c.Close()
	c.Write([]byte("PING\r\n"))
	if line, _ := bufio.NewReader(c).ReadString('\n'); !strings.HasPrefix(line, "+PONG") {
		t.Fatalf("PING after READY=1: %q", line)
	}
	if !l.Trusts(bin) {
		t.Fatal("the binary is not trusted after its READY=1")
	}
	if _, trusted, release := l.Expect(cmd.Process.Pid+1, bin, time.Now()); !trusted {
		t.Fatal("the binary is not trusted after its READY=1")
	} else {
		release()
	}
}

// A message counts for the pid the kernel stamped on it, whatever it
// says: this process's READY=1 ends no wait of another pid, and only
// READY=1 (not STATUS=, not READY=0) ends its own.
func TestReadyCountsForItsSender(t *testing.T) {
	l := listen(t)
	self := os.Getpid()
	other, _, release := l.Expect(self+1, "bin", time.Now())
	defer release()
	own, _, releaseOwn := l.Expect(self, "bin", time.Now())
	defer releaseOwn()
	send(t, l, "STATUS=Redis is loading...\nREADY=0\nMAINPID="+fmt.Sprint(self+1))
	if closedWithin(own, 200*time.Millisecond) {
		t.Fatal("a wait ended without READY=1")
	}
	send(t, l, "STATUS=Ready to accept connections\nREADY=1\n")
	if !closedWithin(own, 5*time.Second) {
		t.Fatal("own READY=1 did not end its wait")
	}
	if closedWithin(other, 200*time.Millisecond) {
		t.Fatal("this process's READY=1 ended another pid's wait")
	}
}

// A READY=1 before the wait is registered (the process was quicker than
// its spawner) ends the wait at once; one from before the start does not.
func TestEarlyReady(t *testing.T) {
	l := listen(t)
	before := time.Now()
	send(t, l, "READY=1")
	deadline := time.Now().Add(5 * time.Second)
	for {
		l.mu.Lock()
		_, ok := l.early[os.Getpid()]
		l.mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the early READY=1 was not received")
		}
		time.Sleep(time.Millisecond)
	}
	if ready, _, release := l.Expect(os.Getpid(), "bin", time.Now()); closedWithin(ready, 100*time.Millisecond) {
		t.Fatal("a READY=1 from before the start ended the wait")
	} else {
		release()
	}
	ready, trusted, release := l.Expect(os.Getpid(), "bin", before)
	defer release()
	if !closedWithin(ready, 0) || !trusted {
		t.Fatal("an early READY=1 did not end the wait at once")
	}
}

func TestListenRefusesALongPath(t *testing.T) {
	if _, err := Listen("/" + strings.Repeat("x", 120)); err == nil {
		t.Fatal("a path too long for a socket address was accepted")
	}
}

// A local process that floods the socket (any user may send to it) holds
// no start back: the receive queue is short and a sender blocks while it
// is full, so the reader drains it, and a redis-server's READY=1 still
// comes through; the flood's own READY=1s count for the flooder's pid
// alone.
func TestFloodHoldsNoStartBack(t *testing.T) {
	bin := redisServer(t)
	l := listen(t)
	stop := make(chan struct{})
	var sent atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: l.path, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			msg := []byte("STATUS=flood\nREADY=1\n")
			for {
				select {
				case <-stop:
					return
				default:
				}
				c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				if _, err := c.Write(msg); err == nil {
					sent.Add(1)
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	time.Sleep(50 * time.Millisecond) // the flood under way
	cmd, _, since := startRedis(t, l, bin)
	ready, _, release := l.Expect(cmd.Process.Pid, bin, since)
	defer release()
	if !closedWithin(ready, 10*time.Second) {
		t.Fatalf("no READY=1 from redis-server in 10 s under a flood of %d datagrams", sent.Load())
	}
	t.Logf("READY=1 after %v, %d flood datagrams sent meanwhile", time.Since(since).Round(time.Millisecond), sent.Load())
	if sent.Load() < 100 {
		t.Fatalf("the flood sent only %d datagrams: no flood", sent.Load())
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.early) > 1 {
		t.Fatalf("%d early notices kept from one flooding pid", len(l.early))
	}
}
