package forward

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// echo serves lines back, upper-cased, until the client closes.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					io.WriteString(c, strings.ToUpper(line))
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestForwarder(t *testing.T) {
	f, err := Listen("127.0.0.1:0", echo(t))
	if err != nil {
		t.Fatal(err)
	}
	go f.Serve()
	var clients []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", f.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		io.WriteString(c, "ping\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "PING\n" {
			t.Fatalf("client %d through the forwarder: %q, %v", i, line, err)
		}
	}
	if f.Active() != 3 || f.Total() != 3 {
		t.Fatalf("active %d total %d; want 3 and 3", f.Active(), f.Total())
	}
	clients[0].Close()
	testenv.Eventually(t, "a closed client to leave", 5*time.Second, func() bool { return f.Active() == 2 })
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// Close ends every forwarded connection.
	clients[1].SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := clients[1].Read(make([]byte, 1)); err == nil {
		t.Fatal("a forwarded connection outlived Close")
	}
	if _, err := net.DialTimeout("tcp", f.Addr().String(), time.Second); err == nil {
		t.Fatal("the forwarder still accepts after Close")
	}
}

// A target that is down: the client's connection is closed at once.
func TestForwarderTargetDown(t *testing.T) {
	f, err := Listen("127.0.0.1:0", "127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	go f.Serve()
	defer f.Close()
	c, err := net.Dial("tcp", f.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read through a forwarder whose target is down succeeded")
	}
}
