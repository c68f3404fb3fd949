package agent

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/supervisor"
)

func TestMetrics(t *testing.T) {
	cfg := testConfig(t, 3)
	reg := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg
	cfg.Health = supervisor.Health{Interval: 20 * time.Millisecond, Timeout: time.Second, Failures: 3}
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "m1", Spec{MemoryMB: 32, Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "restart", 5*time.Second, func() bool {
		cur := mustGet(t, s, "m1")
		return cur.State == "running" && cur.PID != in.PID
	})
	want := `
# HELP redis_agent_instance_restarts_total Restarts of instances' redis-server processes, by instance and reason (crash, hung, unready, manual, oom, spawn_failed).
# TYPE redis_agent_instance_restarts_total counter
redis_agent_instance_restarts_total{instance="m1",reason="crash"} 1
redis_agent_instance_restarts_total{instance="m1",reason="hung"} 0
redis_agent_instance_restarts_total{instance="m1",reason="manual"} 0
redis_agent_instance_restarts_total{instance="m1",reason="oom"} 0
redis_agent_instance_restarts_total{instance="m1",reason="spawn_failed"} 0
redis_agent_instance_restarts_total{instance="m1",reason="unready"} 0
# HELP redis_agent_instances Instances by state.
# TYPE redis_agent_instances gauge
redis_agent_instances{state="backoff"} 0
redis_agent_instances{state="crashloop"} 0
redis_agent_instances{state="running"} 1
redis_agent_instances{state="starting"} 0
redis_agent_instances{state="stopped"} 0
redis_agent_instances{state="stopping"} 0
# HELP redis_agent_memory_reserved_bytes Memory budget reserved by instances.
# TYPE redis_agent_memory_reserved_bytes gauge
redis_agent_memory_reserved_bytes 3.3554432e+07
# HELP redis_agent_orphans Directories and redis-server processes under the data root that no record owns, found by the last reconcile.
# TYPE redis_agent_orphans gauge
redis_agent_orphans 0
# HELP redis_agent_ports_allocated Ports held by instance records.
# TYPE redis_agent_ports_allocated gauge
redis_agent_ports_allocated 1
# HELP redis_agent_ports_in_range Ports in the configured range.
# TYPE redis_agent_ports_in_range gauge
redis_agent_ports_in_range 3
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"redis_agent_instance_restarts_total", "redis_agent_instances", "redis_agent_memory_reserved_bytes",
		"redis_agent_orphans", "redis_agent_ports_allocated", "redis_agent_ports_in_range"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(s.metrics.opDuration, "redis_agent_operation_duration_seconds"); n != 1 {
		t.Fatalf("operation histogram series = %d, want 1 (provision)", n)
	}
	// Per-instance figures from the cached INFO of the health check.
	creds, _, err := s.Bind(ctx, "m1", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	for i := range 3 {
		c.Set(ctx, fmt.Sprint("k", i), "v", 0)
	}
	c.Do(ctx, "SELECT", "2")
	testenv.Eventually(t, "INFO to show 3 keys", 5*time.Second, func() bool {
		st := s.runtime("m1").stats.Load()
		return st != nil && st.ok && st.info.DBKeys["db0"] == 3
	})
	wantInst := `
# HELP redis_db_keys Keys per database.
# TYPE redis_db_keys gauge
redis_db_keys{db="db0",instance="m1"} 3
# HELP redis_memory_max_bytes maxmemory of the instance.
# TYPE redis_memory_max_bytes gauge
redis_memory_max_bytes{instance="m1"} 3.3554432e+07
# HELP redis_up 1 when the instance runs and its last health check succeeded.
# TYPE redis_up gauge
redis_up{instance="m1"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(wantInst), "redis_db_keys", "redis_memory_max_bytes", "redis_up"); err != nil {
		t.Fatal(err)
	}
	mfs, _ := reg.Gather()
	found := map[string]bool{}
	for _, mf := range mfs {
		found[mf.GetName()] = true
	}
	for _, name := range []string{"redis_uptime_in_seconds", "redis_memory_used_bytes", "redis_connected_clients", "redis_blocked_clients",
		"redis_commands_processed_total", "redis_keyspace_hits_total", "redis_keyspace_misses_total", "redis_evicted_keys_total",
		"redis_expired_keys_total", "redis_rdb_last_bgsave_status", "redis_aof_last_write_status",
		"redis_agent_instance_resident_memory_bytes", "redis_agent_instance_cpu_seconds_total", "redis_agent_instance_state"} {
		if !found[name] {
			t.Errorf("metric %s not exported", name)
		}
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil || len(problems) != 0 {
		t.Fatalf("promlint: %v %+v", err, problems)
	}
	// A deleted instance's series go away.
	if err := s.Deprovision(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(s.metrics.restarts); n != 0 {
		t.Fatalf("restart series of a deleted instance: %d", n)
	}
}

// restartSeriesAtZero is the exposition of id's restart series before any
// restart: one per reason, at 0.
func restartSeriesAtZero(id string) string {
	var b strings.Builder
	b.WriteString("# HELP redis_agent_instance_restarts_total Restarts of instances' redis-server processes, by instance and reason (crash, hung, unready, manual, oom, spawn_failed).\n")
	b.WriteString("# TYPE redis_agent_instance_restarts_total counter\n")
	for _, r := range []string{"crash", "hung", "manual", "oom", "spawn_failed", "unready"} {
		fmt.Fprintf(&b, "redis_agent_instance_restarts_total{instance=%q,reason=%q} 0\n", id, r)
	}
	return b.String()
}

// The per-instance counters exist at 0 from provision and from adoption, so
// that increase() over them sees the first restart (a series that first
// appears at 1 has no increase), and go away on delete.
func TestMetricsSeriesAtZero(t *testing.T) {
	cfg := testConfig(t, 2)
	reg := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg
	s1 := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s1.Provision(ctx, "z1", Spec{MemoryMB: 32, Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(restartSeriesAtZero("z1")), "redis_agent_instance_restarts_total"); err != nil {
		t.Fatalf("right after provision: %v", err)
	}

	// A new agent adopts the running process: its series start at 0 too.
	shutdown(t, s1, false)
	reg2 := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg2
	s2 := startService(t, cfg)
	if got := mustGet(t, s2, "z1"); got.PID != in.PID {
		t.Fatalf("z1 after agent restart: pid %d, want adopted pid %d", got.PID, in.PID)
	}
	if err := testutil.GatherAndCompare(reg2, strings.NewReader(restartSeriesAtZero("z1")), "redis_agent_instance_restarts_total"); err != nil {
		t.Fatalf("right after adoption: %v", err)
	}

	if err := s2.Deprovision(ctx, "z1"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(s2.metrics.restarts); n != 0 {
		t.Fatalf("restart series of a deleted instance: %d, want 0", n)
	}
}

// The health checks are PINGs, with an INFO (the metrics' figures) every
// third one and after a PING that failed.
func TestHealthChecksInfoEveryThird(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.Health = supervisor.Health{Interval: 20 * time.Millisecond, Timeout: time.Second, Failures: 3}
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "hc", Spec{MemoryMB: 16, Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	in := s.runtime("hc")
	calls := func() (ping, info int) {
		f, err := in.admin.Fields(ctx, "commandstats")
		if err != nil {
			t.Fatal(err)
		}
		fmt.Sscanf(f["cmdstat_ping"], "calls=%d", &ping)
		fmt.Sscanf(f["cmdstat_info"], "calls=%d", &info)
		return ping, info
	}
	p0, i0 := calls()
	testenv.Eventually(t, "30 checks", 10*time.Second, func() bool { return in.checks.Load() >= 30 })
	p1, i1 := calls()
	// Each calls() is an INFO of its own.
	pings, infos := p1-p0, i1-i0-1
	if infos < 5 || pings < 2*infos-4 || pings > 2*infos+4 {
		t.Fatalf("%d PINGs and %d INFOs in the checks; want two PINGs an INFO", pings, infos)
	}
	if st := in.stats.Load(); st == nil || !st.ok || st.info.MaxMemory != 16<<20 {
		t.Fatalf("cached stats %+v; want those of an INFO", st)
	}
}
