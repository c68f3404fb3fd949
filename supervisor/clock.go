package supervisor

import "time"

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
	// NewTicker fires every d, dropping ticks a slow receiver misses.
	NewTicker(d time.Duration) Timer
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

func (realClock) NewTicker(d time.Duration) Timer { return realTicker{time.NewTicker(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop()               { t.t.Stop() }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.t.C }
func (t realTicker) Stop()               { t.t.Stop() }
