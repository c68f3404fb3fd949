package supervisor

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock whose time moves only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer // pending: not stopped, and a timer not fired yet
}

var _ Clock = (*fakeClock)(nil)

type fakeTimer struct {
	clk    *fakeClock
	c      chan time.Time
	when   time.Time
	period time.Duration // a ticker's; 0 for a timer
}

// newFakeClock starts at a whole second, as a test's intervals divide
// one: a ticker's first tick is a whole period after the start.
func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer { return c.add(d, 0) }

func (c *fakeClock) NewTicker(d time.Duration) Timer {
	if d <= 0 {
		panic("fakeClock: non-positive ticker period")
	}
	c.mu.Lock()
	first := untilNext(c.now, d)
	c.mu.Unlock()
	return c.add(first, d)
}

func (c *fakeClock) add(d, period time.Duration) *fakeTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{clk: c, c: make(chan time.Time, 1), when: c.now.Add(d), period: period}
	c.timers = append(c.timers, t)
	c.fire(c.now) // a timer of no time fires at once, like time.NewTimer(0)
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() {
	c := t.clk
	c.mu.Lock()
	defer c.mu.Unlock()
	c.timers = slices.DeleteFunc(c.timers, func(o *fakeTimer) bool { return o == t })
}

// Advance moves the clock d forward, firing on the way what falls due, in
// order, and returns how many timers (not tickers) fired. Like the real
// ones, a ticker drops a tick its receiver has not taken yet.
func (c *fakeClock) Advance(d time.Duration) (fired int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fire(c.now.Add(d))
}

func (c *fakeClock) fire(end time.Time) (fired int) {
	for {
		var next *fakeTimer
		for _, t := range c.timers {
			if !t.when.After(end) && (next == nil || t.when.Before(next.when)) {
				next = t
			}
		}
		if next == nil {
			break
		}
		c.now = next.when
		select {
		case next.c <- c.now:
		default:
		}
		if next.period > 0 {
			next.when = next.when.Add(next.period)
		} else {
			c.timers = slices.DeleteFunc(c.timers, func(o *fakeTimer) bool { return o == next })
			fired++
		}
	}
	c.now = end
	return fired
}

func TestFakeClock(t *testing.T) {
	c := newFakeClock()
	t0 := c.Now()
	a, b := c.NewTimer(20*time.Millisecond), c.NewTimer(10*time.Millisecond)
	tick := c.NewTicker(5 * time.Millisecond)
	if n := c.Advance(9 * time.Millisecond); n != 0 {
		t.Fatalf("%d timers fired before their time", n)
	}
	if n := c.Advance(time.Millisecond); n != 1 {
		t.Fatalf("at 10ms %d timers fired, want 1", n)
	}
	if got := <-b.C(); !got.Equal(t0.Add(10 * time.Millisecond)) {
		t.Fatalf("timer fired at %v, want t0+10ms", got.Sub(t0))
	}
	a.Stop()
	if n := c.Advance(time.Second); n != 0 || len(a.C()) != 0 {
		t.Fatalf("a stopped timer fired (%d)", n)
	}
	if got := <-tick.C(); !got.Equal(t0.Add(5 * time.Millisecond)) {
		t.Fatalf("the first tick is at %v, want t0+5ms (the later ones are dropped while it is not taken)", got.Sub(t0))
	}
	if !c.Now().Equal(t0.Add(1010 * time.Millisecond)) {
		t.Fatalf("now = t0+%v, want t0+1.01s", c.Now().Sub(t0))
	}
	if n := c.NewTimer(0); len(n.C()) != 1 {
		t.Fatal("a timer of no time did not fire at once")
	}
}

// The restart policy's delays run on the clock: a fast failure waits
// exactly what Decide says (Base, then doubling), not a moment less,
// and the next start follows the moment the delay is over.
func TestBackoffRunsOnTheClock(t *testing.T) {
	clk := newFakeClock()
	s, _, _ := newSup(t, "exit3", &fakeAdmin{pingErr: errors.New("refused")}, func(c *Config) { c.Clock = clk })
	// The first exit restarts at once; the second waits Base (20ms), the
	// third (crashloop from 3) 40ms, the fourth 80ms.
	for _, step := range []struct {
		restarts int
		state    State
		delay    time.Duration
	}{
		{2, Backoff, 20 * time.Millisecond},
		{3, Crashloop, 40 * time.Millisecond},
		{4, Crashloop, 80 * time.Millisecond},
	} {
		st := waitStatus(t, s, "exit "+step.state.String(), 5*time.Second, func(st Status) bool {
			return st.Restarts == step.restarts && st.State == step.state
		})
		if got := st.NextStart.Sub(clk.Now()); got != step.delay {
			t.Fatalf("after exit %d: next start in %v, want %v", step.restarts, got, step.delay)
		}
		if n := clk.Advance(step.delay - time.Millisecond); n != 0 {
			t.Fatalf("after exit %d: the backoff ended before its %v", step.restarts, step.delay)
		}
		if st := s.Status(); st.Restarts != step.restarts || st.State != step.state {
			t.Fatalf("after exit %d, 1ms before the start: status %+v", step.restarts, st)
		}
		if n := clk.Advance(time.Millisecond); n != 1 {
			t.Fatalf("after exit %d: %d timers fired at the end of the backoff, want 1", step.restarts, n)
		}
	}
}

// The real clock's tickers tick on one grid: two made apart both tick at
// whole multiples of their period, and a stopped one no more.
func TestRealTickersShareAGrid(t *testing.T) {
	const d = 100 * time.Millisecond
	a := realClock{}.NewTicker(d)
	defer a.Stop()
	time.Sleep(d / 3)
	b := realClock{}.NewTicker(d)
	// Made a third of a period apart, both tick at the multiples of d (a
	// tick is the instant it was due at, however late the machine let it
	// fire).
	for range 3 {
		for _, tick := range []time.Time{<-a.C(), <-b.C()} {
			if off := time.Duration(tick.UnixNano() % int64(d)); off != 0 {
				t.Fatalf("a tick %v after a multiple of %v", off, d)
			}
			if late := time.Since(tick); late < 0 {
				t.Fatalf("a tick of %v came %v early", tick, -late)
			}
		}
	}
	b.Stop()
	time.Sleep(2 * d)
	select {
	case <-b.C():
		select {
		case <-b.C():
			t.Fatal("a stopped ticker still ticks")
		case <-time.After(2 * d):
		}
	default:
	}
}
