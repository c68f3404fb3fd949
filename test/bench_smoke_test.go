package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/test/benchsuite"
)

// TestBenchSmoke runs the benchmark suite at a tiny size so `make bench`
// never rots, the broker scenarios included. It checks that every
// scenario produced its figures and that the agent restart restarted no
// redis-server; it asserts no timing.
func TestBenchSmoke(t *testing.T) {
	redisServer := testenv.RedisServer(t)
	smokeBroker := filepath.Join(t.TempDir(), "redis-broker")
	build := exec.Command("go", "build", "-race", "-o", smokeBroker, "../cmd/redis-broker")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		t.Fatalf("build redis-broker: %v", err)
	}
	cfg := benchsuite.Config{
		Agent: agentBin, Broker: smokeBroker, RedisServer: redisServer, Dir: testenv.TraversableDir(t),
		Samples: 3, Concurrency: 2, Kills: 3, Density: 5,
		Idle: 200 * time.Millisecond, APIDuration: 200 * time.Millisecond, APIClients: 2,
		SnapshotMB: 2, RolloutInstances: 2, IOMB: 2, IODuration: 300 * time.Millisecond,
		BrokerSamples: 3, DrainInstances: 2, DrainMB: 1, BenchRequests: 2000,
		VersityGW: testenv.VersityGW(t),
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
		"redis-benchmark SET, pipeline 16, 50 clients, tenant instance, plain", "redis-benchmark SET, pipeline 16, 50 clients, tenant instance, TLS",
		"redis-benchmark GET, pipeline 16, 50 clients, tenant instance, plain", "redis-benchmark GET, pipeline 16, 50 clients, tenant instance, TLS",
		"  SET over TLS next to plain", "  GET over TLS next to plain", "full TLS handshakes per second",
		"instances provisioned", "agent RSS", "agent idle CPU", "GET /v1/instances", "/metrics scrape", "agent restart", "redis-servers restarted",
		"provision through the broker (OSB PUT -> 201), p50", "provision through the broker (OSB PUT -> 201), p99",
		"deprovision through the broker", "broker start, 5 instances on 3 agents", "  of which exec -> /readyz 200",
		"drain of an agent with 2 AOF instances of 1 MiB, total", "  unavailability per instance (drain status), median",
		"  ref: snapshot out (GET) of one 1 MiB instance", "  ref: its restore in",
		"backup to a local S3 server", "backup throughput", "  tenant GET latency p99 during its backup", "restore from that backup"}
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
	if md := res.Markdown("test"); !strings.Contains(md, "| figure |") || !strings.Contains(md, "cores") || !strings.Contains(md, "Broker:") {
		t.Errorf("Markdown page lacks the table or the machine: %s", md)
	}
}
