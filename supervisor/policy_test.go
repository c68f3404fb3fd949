package supervisor

import (
	"testing"
	"time"
)

func TestDecide(t *testing.T) {
	p := Policy{Base: 100 * time.Millisecond, Max: time.Second, StableAfter: 10 * time.Second, CrashloopAfter: 4, Jitter: 0.2}
	noJitter := 0.5 // u = 0.5 multiplies by exactly 1
	tests := []struct {
		name     string
		failures int
		ran      time.Duration
		u        float64
		want     Decision
	}{
		{"first crash ever is immediate", 0, time.Second, noJitter, Decision{Delay: 0, Failures: 1}},
		{"crash after a stable run is immediate", 7, time.Minute, noJitter, Decision{Delay: 0, Failures: 1}},
		{"exactly stable counts as stable", 3, 10 * time.Second, noJitter, Decision{Delay: 0, Failures: 1}},
		{"second fast failure waits base", 1, time.Second, noJitter, Decision{Delay: 100 * time.Millisecond, Failures: 2}},
		{"third doubles", 2, time.Second, noJitter, Decision{Delay: 200 * time.Millisecond, Failures: 3}},
		{"fourth doubles and is a crashloop", 3, time.Second, noJitter, Decision{Delay: 400 * time.Millisecond, Failures: 4, Crashloop: true}},
		{"capped at max", 10, time.Second, noJitter, Decision{Delay: time.Second, Failures: 11, Crashloop: true}},
		{"huge count does not overflow", 1 << 20, 0, noJitter, Decision{Delay: time.Second, Failures: 1<<20 + 1, Crashloop: true}},
		{"jitter low end", 1, 0, 0, Decision{Delay: 80 * time.Millisecond, Failures: 2}},
		{"jitter high end", 1, 0, 0.999999, Decision{Delay: 119999980 * time.Nanosecond, Failures: 2}},
		{"jitter never exceeds max", 20, 0, 0.999999, Decision{Delay: time.Second, Failures: 21, Crashloop: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.Decide(tt.failures, tt.ran, tt.u)
			if got.Failures != tt.want.Failures || got.Crashloop != tt.want.Crashloop {
				t.Fatalf("Decide = %+v, want %+v", got, tt.want)
			}
			if diff := got.Delay - tt.want.Delay; diff < -time.Microsecond || diff > time.Microsecond {
				t.Fatalf("Delay = %v, want %v", got.Delay, tt.want.Delay)
			}
		})
	}
}

func TestDecideNoCrashloopWhenDisabled(t *testing.T) {
	p := Policy{Base: time.Millisecond, Max: time.Second, StableAfter: time.Second}
	if d := p.Decide(100, 0, 0.5); d.Crashloop {
		t.Fatalf("Decide = %+v, crashloop with CrashloopAfter 0", d)
	}
}
