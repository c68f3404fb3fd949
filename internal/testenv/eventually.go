package testenv

import (
	"testing"
	"time"
)

// Eventually polls cond until it returns true, and fails the test (Fatalf,
// naming what and the timeout) when timeout passes first. It polls every
// millisecond at first, backing off to every 10 ms, so a condition that
// comes true at once costs no wait and a long wait does not spin. cond
// runs on the test's goroutine; what it observes it may leave in the
// caller's variables.
func Eventually(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	wait := time.Millisecond
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
			return
		}
		time.Sleep(wait)
		wait = min(2*wait, 10*time.Millisecond)
	}
}
