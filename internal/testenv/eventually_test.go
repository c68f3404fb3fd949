package testenv

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// fatalTB records Fatalf instead of ending the test, so a failing
// Eventually can be looked at.
type fatalTB struct {
	testing.TB
	fatal string
}

func (f *fatalTB) Helper() {}
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.fatal = fmt.Sprintf(format, args...)
}

func TestEventually(t *testing.T) {
	t.Run("true at once: one call, no wait", func(t *testing.T) {
		calls := 0
		t0 := time.Now()
		Eventually(t, "nothing", time.Second, func() bool { calls++; return true })
		if calls != 1 || time.Since(t0) > 100*time.Millisecond {
			t.Fatalf("%d calls in %v; want 1 and no wait", calls, time.Since(t0))
		}
	})
	t.Run("comes true later", func(t *testing.T) {
		start := time.Now()
		calls := 0
		Eventually(t, "50ms to pass", 5*time.Second, func() bool { calls++; return time.Since(start) >= 50*time.Millisecond })
		if took := time.Since(start); took < 50*time.Millisecond || took > time.Second {
			t.Fatalf("returned after %v; want soon after 50ms", took)
		}
		// Polled often at first, backed off to every 10 ms: at most
		// about 50/10 + a few fast polls, and more than one.
		if calls < 2 || calls > 20 {
			t.Fatalf("%d calls in 50ms", calls)
		}
	})
	t.Run("never true: fails naming what and the timeout", func(t *testing.T) {
		f := &fatalTB{}
		t0 := time.Now()
		Eventually(f, "the moon to turn blue", 30*time.Millisecond, func() bool { return false })
		if took := time.Since(t0); took < 30*time.Millisecond {
			t.Errorf("gave up after %v, before the 30ms timeout", took)
		}
		if !strings.Contains(f.fatal, "the moon to turn blue") || !strings.Contains(f.fatal, "30ms") {
			t.Fatalf("failure %q does not name what it waited for and the timeout", f.fatal)
		}
	})
}
