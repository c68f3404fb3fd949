package supervisor

import "time"

// Policy decides how long to wait before starting an exited process again.
// It is a pure function of its inputs: Decide is table-tested and the jitter
// comes in as an argument.
type Policy struct {
	// Base is the delay after the second fast failure in a row; each further
	// one doubles it.
	Base time.Duration
	// Max caps the delay.
	Max time.Duration
	// StableAfter is how long a process must have run for its exit not to
	// count as a fast failure. A stable run resets the failure count.
	StableAfter time.Duration
	// CrashloopAfter is the number of fast failures in a row from which the
	// instance is reported as crashlooping (the agent keeps trying).
	CrashloopAfter int
	// Jitter spreads each delay by up to ±Jitter of itself (0.2 = ±20 %), so
	// that instances that fail together do not restart in lockstep.
	Jitter float64
}

// DefaultPolicy is the policy the agent uses unless configured otherwise.
func DefaultPolicy() Policy {
	return Policy{
		Base:           100 * time.Millisecond,
		Max:            time.Minute,
		StableAfter:    30 * time.Second,
		CrashloopAfter: 5,
		Jitter:         0.2,
	}
}

// Decision is what Decide says to do after an exit.
type Decision struct {
	// Delay before the next start; 0 means start at once.
	Delay time.Duration
	// Failures is the new count of fast failures in a row, the history to
	// pass to the next Decide.
	Failures int
	// Crashloop is set when Failures reached CrashloopAfter.
	Crashloop bool
}

// Decide returns what to do after a process that ran for ran exited, given
// failures, the count of fast failures in a row before it, and u, a uniform
// random number in [0, 1) for the jitter. The first failure after a stable
// run restarts at once; the n-th fast failure in a row waits
// Base*2^(n-2), capped at Max, with jitter.
func (p Policy) Decide(failures int, ran time.Duration, u float64) Decision {
	if ran >= p.StableAfter {
		failures = 0
	}
	failures++
	d := Decision{Failures: failures, Crashloop: p.CrashloopAfter > 0 && failures >= p.CrashloopAfter}
	if failures == 1 {
		return d
	}
	delay := p.Base
	for i := 2; i < failures && delay < p.Max; i++ {
		delay *= 2
	}
	if p.Jitter > 0 {
		delay = time.Duration(float64(delay) * (1 - p.Jitter + 2*p.Jitter*u))
	}
	d.Delay = min(delay, p.Max)
	return d
}
