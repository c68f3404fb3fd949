package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
)

// validConfig passes Validate on any machine the tests run on.
func validConfig() Config {
	c := DefaultConfig()
	c.DataDir = "/tmp/x"
	c.RedisServer = "/bin/sh"
	c.RedisUser = "nobody"
	c.Launcher = "/bin/sh"
	return c
}

// Validate refuses what would start an agent that could not run an
// instance, and says why; want is a part of the error, "" for none. The
// API's address and authentication are server.Config's (server's tests).
func TestConfigValidateSays(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"default memory over the budget", func(c *Config) { c.MemoryBudgetMB, c.DefaultMemoryMB = 100, 101 }, "more than the whole memory budget"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig()
			tt.mod(&c)
			err := c.Validate()
			if tt.want == "" && err != nil {
				t.Fatalf("Validate = %v, want nil", err)
			}
			if tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("Validate = %v, want an error saying %q", err, tt.want)
			}
		})
	}
}

// A memory_mb larger than the whole budget could never run on this agent:
// invalid input (422), not a momentary lack of room (507) that sends a
// broker to the next VM.
func TestCheckMemory(t *testing.T) {
	c := Config{MemoryBudgetMB: 1000}
	for _, mb := range []int{1, 64, 1000} {
		if err := c.checkMemory(mb); err != nil {
			t.Errorf("checkMemory(%d) = %v, want nil", mb, err)
		}
	}
	for _, mb := range []int{0, -1, 1001, 1 << 30} {
		if err := c.checkMemory(mb); !errors.Is(err, ErrInvalid) {
			t.Errorf("checkMemory(%d) = %v, want ErrInvalid", mb, err)
		}
	}
	if err := c.checkMemory(1001); err == nil || !strings.Contains(err.Error(), "whole memory budget is 1000 MiB") {
		t.Errorf("checkMemory(1001) = %v, want a sentence saying the budget", err)
	}
}

// Resize: beyond the whole budget is invalid; within it but beyond its
// free part is a lack of capacity.
func TestResizeBeyondTheWholeBudget(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.MemoryBudgetMB = 100
	s := startService(t, cfg)
	ctx := context.Background()
	for _, id := range []string{"a", "b"} {
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 40, Persistence: apitype.PersistenceNone}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Resize(ctx, "a", 101); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "100 MiB") {
		t.Fatalf("resize beyond the whole budget = %v, want ErrInvalid saying the budget", err)
	}
	if _, err := s.Resize(ctx, "a", 61); !errors.Is(err, ErrCapacity) {
		t.Fatalf("resize beyond the budget's free part = %v, want ErrCapacity", err)
	}
	if got := mustGet(t, s, "a"); got.MemoryMB != 40 {
		t.Fatalf("a refused resize changed memory_mb to %d", got.MemoryMB)
	}
}

// InPortRange: the instance ports, inclusive; none of an invalid range.
func TestInPortRange(t *testing.T) {
	c := validConfig()
	for port, want := range map[int]bool{15999: false, 16000: true, 16500: true, 16999: true, 17000: false} {
		if got := c.InPortRange(port); got != want {
			t.Errorf("InPortRange(%d) = %v, want %v", port, got, want)
		}
	}
	c.PortMin, c.PortMax = 17000, 16000
	if c.InPortRange(16500) {
		t.Error("InPortRange of an inverted range = true")
	}
}
