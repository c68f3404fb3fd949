package testenv

import (
	"net"
	"strings"
	"testing"
	"time"
)

// Flood fills every client slot of the server at addr with plain TCP
// connections, no password needed, as anyone who can reach the port can:
// it connects until the server answers a new connection with "max number
// of clients reached". It returns how many connections it holds and a
// function that closes them (also run at the test's end).
func Flood(t testing.TB, addr string) (held int, end func()) {
	t.Helper()
	var conns []net.Conn
	end = func() {
		for _, c := range conns {
			c.Close()
		}
		conns = nil
	}
	t.Cleanup(end)
	refused := func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 128)
		n, _ := c.Read(buf)
		return strings.Contains(string(buf[:n]), "max number of clients reached")
	}
	// Redis serves at most 10000 clients (fewer under a low open-files
	// limit); check for the refusal every 64 connections.
	for len(conns) < 20000 {
		for range 64 {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				t.Fatalf("flood: connection %d: %v", len(conns), err)
			}
			conns = append(conns, c)
		}
		if refused() {
			return len(conns), end
		}
	}
	t.Fatalf("flood: %s still takes connections after %d", addr, len(conns))
	return 0, end
}
