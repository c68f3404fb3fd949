// Package ports allocates TCP ports for redis-server instances from a
// configured range. It owns no state: the caller says which ports its records
// already hold (inside the same state transaction that will record the
// choice), and the allocator picks the lowest port that is neither held nor
// in use by a process outside the agent.
package ports

import (
	"errors"
	"fmt"
	"net"
	"strconv"
)

// ErrExhausted is returned when every port of the range is held or busy.
var ErrExhausted = errors.New("no free port in range")

// Range is an inclusive range of TCP ports.
type Range struct {
	Min, Max int
}

// Validate checks that the range is a usable, non-empty range of ports.
func (r Range) Validate() error {
	if r.Min < 1 || r.Max > 65535 || r.Min > r.Max {
		return fmt.Errorf("port range %d-%d: want 1 <= min <= max <= 65535", r.Min, r.Max)
	}
	return nil
}

// Size is the number of ports in the range.
func (r Range) Size() int { return r.Max - r.Min + 1 }

// Contains reports whether p is inside the range.
func (r Range) Contains(p int) bool { return p >= r.Min && p <= r.Max }

// Allocator picks ports from Range.
type Allocator struct {
	Range Range
	// Busy reports whether something outside the agent already uses the
	// port. Nil means ListenProbe on 127.0.0.1.
	Busy func(port int) bool
}

// Next returns the lowest port of the range that held does not report as
// held and that is not busy. held must be cheap: it is called for every port
// up to the one returned.
func (a *Allocator) Next(held func(port int) bool) (int, error) {
	busy := a.Busy
	if busy == nil {
		busy = ListenProbe("127.0.0.1")
	}
	for p := a.Range.Min; p <= a.Range.Max; p++ {
		if held(p) || busy(p) {
			continue
		}
		return p, nil
	}
	return 0, fmt.Errorf("ports %d-%d: %w", a.Range.Min, a.Range.Max, ErrExhausted)
}

// ListenProbe returns a Busy function that tries to listen on host:port and
// reports the port busy when that fails. This is the test redis-server itself
// will face when it binds, so it catches listeners on the wildcard address
// as well as on host.
func ListenProbe(host string) func(port int) bool {
	return func(port int) bool {
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return true
		}
		l.Close()
		return false
	}
}
