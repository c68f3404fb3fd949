package test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/test/benchsuite"
)

// TestBenchSmoke runs the benchmark suite at a tiny size so `make bench`
// never rots. It checks that every scenario produced its figures and that
// the agent restart restarted no redis-server; it asserts no timing.
func TestBenchSmoke(t *testing.T) {
	cfg := benchsuite.Config{
		Agent: agentBin, RedisServer: testenv.RedisServer(t), Dir: testenv.TraversableDir(t),
		Samples: 3, Concurrency: 2, Kills: 3, Density: 5,
		Idle: 200 * time.Millisecond, APIDuration: 200 * time.Millisecond, APIClients: 2,
		SnapshotMB: 2, RolloutInstances: 2,
	}
	// The suite's ports from PortMin: the agent's Density, one left out,
	// then one per bare redis-server worker (Concurrency of them).
	cfg.PortMin = testenv.Ports(t, cfg.Density+1+cfg.Concurrency)
	res, err := benchsuite.Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", res.Table())
	want := []string{"bare redis-server start", "provision (PUT", "delete (DELETE", "concurrent callers", "crash recovery",
		"snapshot out (GET)", "snapshot out throughput", "restore in (PUT", "restore in throughput",
		"rolling upgrade of 3 instances", "  unavailability per 1 MiB AOF instance, p50", "  unavailability per 1 MiB AOF instance, max",
		"  unavailability of the 2 MiB instance", "  longest, as the agent measured it",
		"instances provisioned", "agent RSS", "agent idle CPU", "GET /v1/instances", "/metrics scrape", "agent restart", "redis-servers restarted"}
	for _, w := range want {
		found := false
		for _, r := range res.Rows {
			if strings.HasPrefix(r.Figure, w) || (w == "concurrent callers" && strings.Contains(r.Figure, w)) {
				found = true
				if r.Value < 0 || (r.Value == 0 && !strings.Contains(w, "restarted") && !strings.Contains(w, "CPU")) {
					t.Errorf("%s = %v", r.Figure, r.Value)
				}
				if strings.Contains(w, "restarted") && r.Value != 0 {
					t.Errorf("the agent restart restarted %v redis-servers", r.Value)
				}
			}
		}
		if !found {
			t.Errorf("no figure for %q", w)
		}
	}
	if md := res.Markdown("test"); !strings.Contains(md, "| figure |") || !strings.Contains(md, "cores") {
		t.Errorf("Markdown page lacks the table or the machine: %s", md)
	}
}
