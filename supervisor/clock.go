package supervisor

import (
	"sync"
	"time"
)

// Clock is where the loop's time comes from: the time stamps of starts
// and exits (their difference is the run the restart policy judges),
// NextStart, the backoff and hung-kill timers and the health-check ticker.
// Config.Clock nil is the real clock; tests pass one they advance by hand.
// The readiness probe and stops keep real time: they wait on a process,
// not on the policy.
type Clock interface {
	Now() time.Time
	// NewTimer fires once, after d.
	NewTimer(d time.Duration) Timer
	// NewTicker fires every d, dropping ticks a slow receiver misses, at
	// the instants that are whole multiples of d in Unix time (the first
	// within d from now): every ticker of one period ticks together.
	NewTicker(d time.Duration) Timer
}

// untilNext is the time from now to the next whole multiple of d in Unix
// time (d itself when now is one).
func untilNext(now time.Time, d time.Duration) time.Duration {
	return d - time.Duration(now.UnixNano()%int64(d))
}

// Timer is a timer or a ticker of a Clock.
type Timer interface {
	C() <-chan time.Time
	Stop()
}

// realClock is the time package's.
type realClock struct{}

var _ Clock = realClock{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

// NewTicker's ticks on a common grid are what keeps an idle agent idle:
// a thousand supervisors' health checks come in one burst per interval,
// which the runtime and the kernel serve with a few wakeups, where ticks
// spread over the interval wake the process a hundred times a second.
func (realClock) NewTicker(d time.Duration) Timer {
	if d <= 0 {
		panic("supervisor: non-positive ticker period")
	}
	t := &realTicker{c: make(chan time.Time, 1), d: d}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	wait := untilNext(now, d)
	t.at = now.Add(wait)
	t.t = time.AfterFunc(wait, t.fire)
	return t
}

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop()               { t.t.Stop() }

// realTicker sends a tick, the instant of the grid it was due at, if the
// last one was taken, and sets its timer to the next instant of the grid:
// late ticks do not shift the grid.
type realTicker struct {
	c       chan time.Time
	d       time.Duration
	mu      sync.Mutex
	t       *time.Timer
	at      time.Time // the instant the timer is set for
	stopped bool
}

func (t *realTicker) fire() {
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case t.c <- t.at:
	default:
	}
	if !t.stopped {
		now := time.Now()
		wait := untilNext(now, t.d)
		t.at = now.Add(wait)
		t.t.Reset(wait)
	}
}

func (t *realTicker) C() <-chan time.Time { return t.c }

func (t *realTicker) Stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stopped = true
	t.t.Stop()
}
