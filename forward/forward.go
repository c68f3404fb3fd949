// Package forward is the TCP forwarder a moved instance leaves on its old
// port: every connection to it is proxied, byte for byte, to the
// instance's new address, so applications that still hold the old host
// and port keep working (a Redis client reconnects after the move and
// lands on the new server through it) until their bindings are fetched
// again. One goroutine pair per connection; on Linux io.Copy between two
// TCP connections splices in the kernel.
package forward

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Forwarder proxies the connections of one listener to one target.
type Forwarder struct {
	ln     net.Listener
	target string

	active atomic.Int64
	total  atomic.Uint64

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Listen listens on addr and forwards what it accepts to target; call
// Serve.
func Listen(addr, target string) (*Forwarder, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Forwarder{ln: ln, target: target, conns: map[net.Conn]struct{}{}}, nil
}

// Addr is the address the forwarder listens on.
func (f *Forwarder) Addr() net.Addr { return f.ln.Addr() }

// Target is where it forwards to.
func (f *Forwarder) Target() string { return f.target }

// Active is the number of connections it forwards now; Total how many it
// has accepted.
func (f *Forwarder) Active() int64 { return f.active.Load() }
func (f *Forwarder) Total() uint64 { return f.total.Load() }

// Serve accepts until Close.
func (f *Forwarder) Serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // EMFILE and the like: do not spin
			continue
		}
		if !f.track(c) {
			c.Close()
			return
		}
		f.total.Add(1)
		f.active.Add(1)
		f.wg.Add(1)
		go f.forward(c)
	}
}

func (f *Forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *Forwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		delete(f.conns, c)
	}
}

// forward proxies one client connection to a new connection to the
// target, both ways, until either side closes.
func (f *Forwarder) forward(client net.Conn) {
	defer f.wg.Done()
	defer f.active.Add(-1)
	defer client.Close()
	server, err := net.DialTimeout("tcp", f.target, 5*time.Second)
	if err != nil {
		f.untrack(client)
		return
	}
	if !f.track(server) {
		server.Close()
		f.untrack(client)
		return
	}
	defer f.untrack(client, server)
	defer server.Close()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src)
		// The other way may still have data to deliver: half-close.
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(server, client)
	go pipe(client, server)
	<-done
	<-done
}

// Close stops accepting, closes every forwarded connection and waits for
// their goroutines.
func (f *Forwarder) Close() error {
	err := f.ln.Close()
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
	return err
}
