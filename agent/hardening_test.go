package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// gauge returns the value of the series name{instance=id} in reg, and
// whether it exists.
func gauge(t *testing.T, reg prometheus.Gatherer, name, id string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelOf(m, "instance") == id {
				if m.GetGauge() != nil {
					return m.GetGauge().GetValue(), true
				}
				return m.GetCounter().GetValue(), true
			}
		}
	}
	return 0, false
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// redis_up is 1 as soon as a provision answers, and the figures after a
// restart are the new process's, not the dead one's.
func TestRedisUpFollowsTheProcess(t *testing.T) {
	cfg := testConfig(t, 2)
	reg := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg
	// No periodic check within the test: only what a start does counts.
	cfg.Health = supervisor.Health{Interval: time.Hour, Timeout: time.Second, Failures: 2}
	s := startService(t, cfg)
	in, _, err := s.Provision(context.Background(), "u", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if up, _ := gauge(t, reg, "redis_up", "u"); up != 1 {
		t.Fatalf("redis_up right after a provision that answered running = %v, want 1", up)
	}
	time.Sleep(1100 * time.Millisecond) // the first process's uptime reaches 1 s
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "restart", 5*time.Second, func() bool {
		cur := mustGet(t, s, "u")
		return cur.State == "running" && cur.PID != in.PID
	})
	up, _ := gauge(t, reg, "redis_up", "u")
	uptime, ok := gauge(t, reg, "redis_uptime_in_seconds", "u")
	if up != 1 || !ok || uptime >= 1 {
		t.Fatalf("after a restart: redis_up %v, uptime %v (present %v); want 1 and the new process's uptime, under 1 s", up, uptime, ok)
	}
}

// A resize that an agent crash cut short between maxmemory and the cgroup
// leaves the record, config and maxmemory at the new size and the cgroup
// at the old one: the next agent's adoption (once the process is ready),
// and the drift check of a running agent, put the cgroup's limit right.
func TestInterruptedResizeFixesCgroupLimit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root (CI runs as root)")
	}
	cfg := testConfig(t, 2)
	cfg.Health = supervisor.Health{Interval: 20 * time.Millisecond, Timeout: time.Second, Failures: 3}
	s := startService(t, cfg)
	requireCgroups(t, s)
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "r", Spec{MemoryMB: 64, Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	// The shrink to 48 as a crash leaves it: record, config and live
	// maxmemory changed, the cgroup not.
	shrink := func(s *Service) {
		rec, err := s.store.Update("r", func(r *state.Instance) error { r.MemoryMB = 48; return nil })
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.writeFiles(rec); err != nil {
			t.Fatal(err)
		}
		in := s.runtime("r")
		if err := in.admin.SetMaxmemory(ctx, 48); err != nil {
			t.Fatal(err)
		}
		in.memoryMB.Store(48)
		if err := s.cg.Apply("r", inst.PID, s.limitsFor(64, "none", nil)); err != nil {
			t.Fatal(err)
		}
	}
	want := limits.MemoryFor(48)

	shutdown(t, s, false)
	s = startService(t, cfg)
	shrink(s) // its Apply of the old limit succeeded: the limit was wrong
	testenv.Eventually(t, "the drift check to fix the cgroup limit", 5*time.Second, func() bool { return cgroupMemoryLimit(t, cfg, "r") == want })

	// Again, with the agent stopped before it noticed: adoption fixes it.
	cfg.Health.Interval = time.Hour
	shutdown(t, s, false)
	s = startService(t, cfg)
	if _, err := s.store.Update("r", func(r *state.Instance) error { r.MemoryMB = 64; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.cg.Apply("r", inst.PID, s.limitsFor(48, "none", nil)); err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)
	s = startService(t, cfg)
	// Once it is ready, in the background (syncLive): not the drift
	// check, whose interval is an hour here.
	testenv.Eventually(t, "the adoption's check to fix the cgroup limit", 5*time.Second, func() bool { return cgroupMemoryLimit(t, cfg, "r") == limits.MemoryFor(64) })
	if got := mustGet(t, s, "r"); got.PID != inst.PID {
		t.Fatal("fixing the limit restarted the process")
	}
}

// A data directory the Redis user cannot reach is refused at start and
// makes /readyz fail, naming the directory and the user, instead of
// failing every provision with "permission denied" on the binary.
func TestDataDirTheRedisUserCannotReach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the agent drops privileges for redis-server only as root")
	}
	for _, uids := range []string{"auto", "off"} {
		cfg := testConfig(t, 2)
		cfg.InstanceUIDs = uids
		who := "instance uid "
		if uids == "off" {
			if cfg.RedisUser == "" {
				t.Skip("no redis user")
			}
			who = "redis user " + cfg.RedisUser
		}
		parent := filepath.Dir(cfg.DataDir)
		os.Chmod(parent, 0o700)
		_, err := New(cfg)
		os.Chmod(parent, 0o755)
		if err == nil || !strings.Contains(err.Error(), parent) || !strings.Contains(err.Error(), who) {
			t.Fatalf("New with a data dir under a 0700 parent = %v; want an error naming %s and %s", err, parent, who)
		}
	}
	cfg := testConfig(t, 2)
	parent := filepath.Dir(cfg.DataDir)
	s := startService(t, cfg)
	if err := s.Ready(context.Background()); err != nil {
		t.Fatalf("Ready = %v", err)
	}
	os.Chmod(parent, 0o700)
	err := s.Ready(context.Background())
	os.Chmod(parent, 0o755)
	if err == nil || !strings.Contains(err.Error(), parent) {
		t.Fatalf("Ready with the parent closed = %v; want an error naming %s", err, parent)
	}
}

// /readyz is open to anyone: it must not write (a commit costs fsyncs),
// and it still tells a state directory that turned read-only.
func TestReadyDoesNotWrite(t *testing.T) {
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	path := s.store.Path()
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	for range 200 {
		if err := s.Ready(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	after, _ := os.Stat(path)
	if !after.ModTime().Equal(before.ModTime()) || after.Size() != before.Size() {
		t.Fatalf("200 readiness checks wrote the state file (mtime %v -> %v)", before.ModTime(), after.ModTime())
	}
	if os.Geteuid() != 0 {
		return
	}
	dir := filepath.Dir(path)
	if out, err := exec.Command("mount", "--bind", "-o", "ro", dir, dir).CombinedOutput(); err != nil {
		t.Fatalf("read-only bind mount: %v %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "remount,bind,ro", dir).CombinedOutput(); err != nil {
		exec.Command("umount", dir).Run()
		t.Fatalf("remount read-only: %v %s", err, out)
	}
	err = s.Ready(context.Background())
	exec.Command("umount", dir).Run()
	if err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("Ready with a read-only state dir = %v; want it to say so", err)
	}
	if err := s.Ready(context.Background()); err != nil {
		t.Fatalf("Ready once writable again = %v", err)
	}
}

// Close waits for the Service's background work, and none starts after.
func TestCloseWaitsForBackgroundWork(t *testing.T) {
	s := startService(t, testConfig(t, 1))
	release := make(chan struct{})
	running := make(chan struct{})
	s.background(func(context.Context) { close(running); <-release })
	<-running
	closed := make(chan struct{})
	go func() { shutdown(t, s, false); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while background work ran")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	<-closed
	ran := false
	s.background(func(context.Context) { ran = true })
	if ran {
		t.Fatal("background work ran after Close")
	}
}

// On tmpfs an instance's files are memory charged to its cgroup: an AOF
// that grows to its rewrite threshold must not get the instance OOM-killed
// over and over.
func TestTmpfsDataDirFilesFitTheCgroup(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.DataDir = testenv.Tmpfs(t, "400m")
	cfg.DiskHeadroomMB = 0 // the instance's 217 MiB reservation fits in 400
	s := startService(t, cfg)
	requireCgroups(t, s)
	if !s.dataOnTmpfs {
		t.Fatal("tmpfs not detected")
	}
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "t", Spec{MemoryMB: 48, Persistence: "aof"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := cgroupMemoryLimit(t, cfg, "t"), limits.MemoryFor(48)+3*48<<20+64<<20; got != want {
		t.Fatalf("cgroup limit on tmpfs = %d, want %d", got, want)
	}
	creds, _, _ := s.Bind(ctx, "t", "app", "")
	c := client(t, creds.Port, creds.Username, creds.Password)
	// A 30 MiB data set (38 MiB in memory), overwritten until its AOF has been rewritten:
	// data, AOF and the rewrite's new base together pass the 160 MiB a
	// 48 MiB instance's cgroup gets without room for its files.
	v := strings.Repeat("x", 1<<20)
	for i := range 200 {
		if err := c.Set(ctx, "k"+strconv.Itoa(i%30), v, 0).Err(); err != nil {
			t.Fatalf("SET %d: %v", i, err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if got := mustGet(t, s, "t"); got.PID != inst.PID || got.Restarts != 0 {
		t.Fatalf("after its AOF grew on tmpfs: %+v; want the same process, never restarted", got)
	}
}

// A crash-looping instance hands out no new credentials: they would not
// work. Nothing is recorded.
func TestBindCrashloopingIsConflict(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Restart = supervisor.Policy{Base: time.Minute, Max: time.Minute, StableAfter: time.Minute, CrashloopAfter: 2}
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "c", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		in := mustGet(t, s, "c")
		if in.PID != 0 {
			syscall.Kill(in.PID, syscall.SIGKILL)
		}
		testenv.Eventually(t, "the exit", 5*time.Second, func() bool { return mustGet(t, s, "c").PID != in.PID })
		testenv.Eventually(t, "a restart or the crashloop", 5*time.Second, func() bool {
			st := mustGet(t, s, "c").State
			return st == "running" || st == "crashloop"
		})
	}
	if st := mustGet(t, s, "c").State; st != "crashloop" {
		t.Fatalf("state %s, want crashloop", st)
	}
	if _, _, err := s.Bind(ctx, "c", "app", ""); !errors.Is(err, ErrConflict) {
		t.Fatalf("Bind on a crash-looping instance = %v, want ErrConflict", err)
	}
	if rec, _ := s.store.Get("c"); len(rec.Bindings) != 0 {
		t.Fatalf("the refused bind was recorded: %v", rec.Bindings)
	}
}

// With --cgroups off (limits.None) every operation that touches cgroups
// works as before and creates none: a crash restart, a live resize up and
// down, a restore (its loader), an adoption, a delete.
func TestWithoutCgroups(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.Cgroups = "off"
	s := startService(t, cfg)
	if cgroupsOn(s) {
		t.Fatal("--cgroups off gave cgroups")
	}
	ctx := context.Background()
	c, inst := bound(t, s, "plain", Spec{MemoryMB: 16, Persistence: apitype.PersistenceAOF})
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	syscallKill(t, inst.PID)
	testenv.Eventually(t, "a crash restart", 10*time.Second, func() bool {
		got := mustGet(t, s, "plain")
		return got.State == "running" && got.PID != inst.PID
	})
	if got := mustGet(t, s, "plain"); got.LastExit == nil || got.LastExit.Reason != apitype.ReasonCrash {
		t.Fatalf("last exit %+v, want a crash (no cgroup to call it oom)", got.LastExit)
	}
	for _, mb := range []int{32, 16} {
		if _, err := s.Resize(ctx, "plain", mb); err != nil {
			t.Fatalf("resize to %d: %v", mb, err)
		}
	}
	snap := snapshotBytes(t, s, "plain")
	if _, err := s.Restore(ctx, "plain", bytes.NewReader(snap), int64(len(snap)), ""); err != nil {
		t.Fatalf("restore: %v", err)
	}
	pid := mustGet(t, s, "plain").PID
	shutdown(t, s, false)
	s = startService(t, cfg)
	if got := mustGet(t, s, "plain"); got.PID != pid {
		t.Fatalf("pid %d after the agent's restart, want %d adopted", got.PID, pid)
	}
	if v, err := client(t, inst.Port, c.Options().Username, c.Options().Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("after the restore and the adoption: %q, %v", v, err)
	}
	for _, dir := range []string{filepath.Join("/sys/fs/cgroup", cfg.CgroupParent()), filepath.Join("/sys/fs/cgroup/memory", cfg.CgroupParent())} {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v; want no cgroup with --cgroups off", dir, err)
		}
	}
	if err := s.Deprovision(ctx, "plain"); err != nil {
		t.Fatal(err)
	}
}

// The files the agent renders from a record (redis.conf, users.acl) are
// written without fsync: a power loss may leave them empty. Reconcile
// writes them again from the record before anything starts, so the
// instance comes back with its data and its binding, and a user unbound
// before the loss stays locked out.
func TestPowerLossThatEmptiedTheRenderedFiles(t *testing.T) {
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	ctx := t.Context()
	inst, _, err := s.Provision(ctx, "p", Spec{MemoryMB: 16, Persistence: apitype.PersistenceAOFAlways})
	if err != nil {
		t.Fatal(err)
	}
	kept, _, err := s.Bind(ctx, "p", "kept", "")
	if err != nil {
		t.Fatal(err)
	}
	unbound, _, err := s.Bind(ctx, "p", "unbound", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := client(t, kept.Port, kept.Username, kept.Password).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.Unbind(ctx, "p", "unbound"); err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)
	if err := syscall.Kill(inst.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ws syscall.WaitStatus
	syscall.Wait4(inst.PID, &ws, 0, nil) // this test's child, since the agent ran in it
	for _, f := range []string{s.layout.ConfPath("p"), s.layout.ACLPath("p")} {
		if err := os.Truncate(f, 0); err != nil {
			t.Fatal(err)
		}
	}
	s = startService(t, cfg)
	testenv.Eventually(t, "p running again", 10*time.Second, func() bool { return mustGet(t, s, "p").State == apitype.StateRunning })
	if v, err := client(t, kept.Port, kept.Username, kept.Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("the kept binding after the loss: %q, %v", v, err)
	}
	if err := client(t, unbound.Port, unbound.Username, unbound.Password).Ping(ctx).Err(); err == nil {
		t.Fatal("a user unbound before the loss logs in after it")
	}
	if b, _ := os.ReadFile(s.layout.ConfPath("p")); len(b) == 0 {
		t.Fatal("redis.conf is still empty")
	}
}
