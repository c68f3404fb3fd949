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
	waitFor(t, "restart", 5*time.Second, func() bool {
		cur := mustGet(t, s, "m1")
		return cur.State == "running" && cur.PID != in.PID
	})
	want := `
# HELP redis_agent_instance_restarts_total Restarts of instances' redis-server processes, by instance and reason (crash, hung, unready, manual).
# TYPE redis_agent_instance_restarts_total counter
redis_agent_instance_restarts_total{instance="m1",reason="crash"} 1
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
	creds, _, err := s.Bind(ctx, "m1", "app")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	for i := range 3 {
		c.Set(ctx, fmt.Sprint("k", i), "v", 0)
	}
	c.Do(ctx, "SELECT", "2")
	waitFor(t, "INFO to show 3 keys", 5*time.Second, func() bool {
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
