package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

func testConfig(t testing.TB, ports int) Config {
	t.Helper()
	cfg := DefaultConfig()
	// A range no other test holds, in this process or another (other
	// packages, a second checkout's run), and free of listeners.
	cfg.PortMin = testenv.Ports(t, ports)
	cfg.PortMax = cfg.PortMin + ports - 1
	cfg.DataDir = testenv.TraversableDir(t)
	cfg.RedisServer = testenv.RedisServer(t)
	cfg.Launcher = testenv.Launcher(t)
	cfg.MemoryBudgetMB = 4096
	cfg.ReadyTimeout = 5 * time.Second
	cfg.StopTimeout = 5 * time.Second
	cfg.Logger = testLogger(t)
	return cfg
}

// startService opens and reconciles a Service; cleanup deletes every
// instance it has then (so no redis-server outlives the test) and closes it.
func startService(t testing.TB, cfg Config) *Service {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shutdown(t, s, true) })
	return s
}

// cgroupsOn reports whether s gives its instances cgroups (the host
// allows them), rather than limits.None.
func cgroupsOn(s *Service) bool {
	_, on := s.cg.(*limits.Manager)
	return on
}

var closed sync.Map // *Service -> true once shut down

// shutdown closes s; with deleteAll it deletes every instance first.
func shutdown(t testing.TB, s *Service, deleteAll bool) {
	if _, done := closed.LoadOrStore(s, true); done {
		return
	}
	if deleteAll {
		list, _ := s.List(context.Background())
		for _, in := range list {
			if err := s.Deprovision(context.Background(), in.ID); err != nil {
				t.Errorf("cleanup: deprovision %s: %v", in.ID, err)
			}
		}
	}
	s.Close()
}

func client(t testing.TB, port int, user, pass string) *goredis.Client {
	t.Helper()
	c := goredis.NewClient(&goredis.Options{
		Addr: "127.0.0.1:" + strconv.Itoa(port), Username: user, Password: pass,
		MaxRetries: -1, DialerRetries: 1, DisableIdentity: true, Protocol: 2, PoolSize: 1,
	})
	t.Cleanup(func() { c.Close() })
	return c
}

func mustGet(t testing.TB, s *Service, id string) Instance {
	t.Helper()
	in, err := s.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func TestProvisionBindUnbind(t *testing.T) {
	cfg := testConfig(t, 10)
	s := startService(t, cfg)
	ctx := context.Background()

	inst, created, err := s.Provision(ctx, "inst-a", Spec{MemoryMB: 64, Persistence: "aof"})
	if err != nil || !created {
		t.Fatalf("Provision = %+v, %v, %v", inst, created, err)
	}
	if inst.State != "running" || inst.Port != cfg.PortMin || inst.PID == 0 {
		t.Fatalf("provisioned instance = %+v; want running on port %d with a pid", inst, cfg.PortMin)
	}
	// Its process is in the record from the provision's last commit (its
	// Started event wrote none), for a restarted agent to adopt.
	if rec, _ := s.store.Get("inst-a"); rec.PID != inst.PID || rec.StartTime == 0 || rec.Binary != cfg.RedisServer || rec.BinaryID == "" {
		t.Fatalf("record pid %d start %d binary %q (%q); want pid %d, its start time and %s", rec.PID, rec.StartTime, rec.Binary, rec.BinaryID, inst.PID, cfg.RedisServer)
	}
	// Modes of the per-instance files.
	for path, want := range map[string]fs.FileMode{
		s.layout.ConfPath("inst-a"): 0o640,
		s.layout.ACLPath("inst-a"):  0o640,
		s.layout.DataDir("inst-a"):  0o700,
	} {
		st, err := os.Stat(path)
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, %v; want %o", path, st.Mode().Perm(), err, want)
		}
	}
	// The default user is off: no unauthenticated access.
	if err := client(t, inst.Port, "", "").Ping(ctx).Err(); err == nil {
		t.Error("unauthenticated PING succeeded; the default user must be off")
	}

	// Identical repeat: 200, same port. Different spec: conflict.
	again, created, err := s.Provision(ctx, "inst-a", Spec{MemoryMB: 64, Persistence: "aof"})
	if err != nil || created || again.Port != inst.Port {
		t.Fatalf("identical Provision = %+v, %v, %v; want existing, not created", again, created, err)
	}
	if _, _, err := s.Provision(ctx, "inst-a", Spec{MemoryMB: 128}); !errors.Is(err, ErrConflict) {
		t.Fatalf("different Provision = %v, want ErrConflict", err)
	}

	creds, created, err := s.Bind(ctx, "inst-a", "app1", "")
	if err != nil || !created {
		t.Fatalf("Bind = %+v, %v, %v", creds, created, err)
	}
	if creds.Port != inst.Port || creds.Username != "app1" || len(creds.Password) < 32 || creds.Host != "127.0.0.1" {
		t.Fatalf("credentials = %+v", creds)
	}
	if want := fmt.Sprintf("redis://app1:%s@127.0.0.1:%d", creds.Password, creds.Port); creds.URI != want {
		t.Errorf("URI = %q, want %q", creds.URI, want)
	}
	again2, created, err := s.Bind(ctx, "inst-a", "app1", "")
	if err != nil || created || again2 != creds {
		t.Fatalf("repeated Bind = %+v, %v, %v; want the same credentials", again2, created, err)
	}
	acl, _ := os.ReadFile(s.layout.ACLPath("inst-a"))
	if strings.Contains(string(acl), creds.Password) {
		t.Error("the ACL file holds a plaintext password")
	}

	app := client(t, creds.Port, creds.Username, creds.Password)
	if err := app.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET as binding user: %v", err)
	}
	if v, err := app.Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET = %q, %v", v, err)
	}
	if err := app.Do(ctx, "CONFIG", "SET", "maxmemory", "0").Err(); err == nil {
		t.Error("a binding user could run CONFIG SET")
	}

	// A second binding leaves the first one's connection open.
	if _, _, err := s.Bind(ctx, "inst-a", "app2", ""); err != nil {
		t.Fatal(err)
	}
	if err := app.Ping(ctx).Err(); err != nil {
		t.Fatalf("app1's connection broke when app2 was bound: %v", err)
	}

	// Unbind drops app1's open connection and its password stops working.
	if err := s.Unbind(ctx, "inst-a", "app1"); err != nil {
		t.Fatal(err)
	}
	if err := app.Ping(ctx).Err(); err == nil {
		t.Error("unbound user's open connection still works")
	}
	if err := client(t, creds.Port, creds.Username, creds.Password).Ping(ctx).Err(); err == nil {
		t.Error("unbound user can still log in")
	}
	if err := s.Unbind(ctx, "inst-a", "app1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Unbind = %v, want ErrNotFound", err)
	}
	if got := mustGet(t, s, "inst-a").Bindings; len(got) != 1 || got[0] != "app2" {
		t.Errorf("bindings = %v, want [app2]", got)
	}
}

func TestInvalidInputChangesNothing(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.MemoryBudgetMB = 100
	s := startService(t, cfg)
	ctx := context.Background()
	tests := []struct {
		name string
		id   string
		spec Spec
		want error
	}{
		{"path traversal id", "../etc", Spec{}, ErrInvalid},
		{"empty id", "", Spec{}, ErrInvalid},
		{"negative memory", "x", Spec{MemoryMB: -1}, ErrInvalid},
		{"unknown persistence", "x", Spec{Persistence: "sometimes"}, ErrInvalid},
		{"over the whole budget", "x", Spec{MemoryMB: 101}, ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := s.Provision(ctx, tt.id, tt.spec); !errors.Is(err, tt.want) {
				t.Fatalf("Provision = %v, want %v", err, tt.want)
			}
		})
	}
	if list, _ := s.List(ctx); len(list) != 0 {
		t.Fatalf("rejected provisions left records: %+v", list)
	}
	if dirs, _ := s.layout.List(); len(dirs) != 0 {
		t.Fatalf("rejected provisions left directories: %v", dirs)
	}
	// Two ports: the third instance gets ErrCapacity and leaves nothing.
	for _, id := range []string{"p1", "p2"} {
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 10, Persistence: "none"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := s.Provision(ctx, "p3", Spec{MemoryMB: 10}); !errors.Is(err, ErrCapacity) {
		t.Fatalf("third Provision on two ports = %v, want ErrCapacity", err)
	}
	c, err := s.Capacity(ctx)
	if err != nil || c.Instances != 2 || c.PortsFree != 0 || c.PortsTotal != 2 || c.MemoryReservedMB != 20 || c.MemoryFreeMB != 80 {
		t.Fatalf("Capacity = %+v, %v", c, err)
	}
	for _, tc := range []struct{ id, bid string }{{"p1", "default"}, {"p1", "agent"}, {"p1", "../x"}} {
		if _, _, err := s.Bind(ctx, tc.id, tc.bid, ""); !errors.Is(err, ErrInvalid) {
			t.Errorf("Bind(%q, %q) = %v, want ErrInvalid", tc.id, tc.bid, err)
		}
	}
	if _, _, err := s.Bind(ctx, "nope", "b", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("Bind on a missing instance = %v, want ErrNotFound", err)
	}
}

func TestCrashRecoveryKeepsData(t *testing.T) {
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "crashy", Spec{Persistence: "aof-always"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "crashy", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	for i := range 100 {
		if err := c.Set(ctx, "key"+strconv.Itoa(i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	oldPID := inst.PID
	killed := time.Now()
	if err := syscall.Kill(oldPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the binding user to PING again", 10*time.Second, func() bool {
		return client(t, creds.Port, creds.Username, creds.Password).Ping(ctx).Err() == nil
	})
	t.Logf("recovered %v after SIGKILL", time.Since(killed))
	after := mustGet(t, s, "crashy")
	if after.PID == oldPID || after.Port != inst.Port || after.Restarts != 1 {
		t.Fatalf("after crash: %+v; want a new pid, port %d, 1 restart", after, inst.Port)
	}
	if after.LastExit == nil || after.LastExit.Signal != "killed" || after.LastExit.Reason != "crash" {
		t.Fatalf("last exit = %+v; want killed, crash", after.LastExit)
	}
	n, err := client(t, creds.Port, creds.Username, creds.Password).DBSize(ctx).Result()
	if err != nil || n != 100 {
		t.Fatalf("DBSIZE after crash = %d, %v; want 100 (aof-always)", n, err)
	}
}

func TestRepeatedCrashesBackOff(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Restart = supervisor.Policy{Base: 200 * time.Millisecond, Max: 2 * time.Second, StableAfter: time.Minute, CrashloopAfter: 3}
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "loop", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	var gaps []time.Duration
	for i := range 3 {
		in := mustGet(t, s, "loop")
		killed := time.Now()
		syscall.Kill(in.PID, syscall.SIGKILL)
		testenv.Eventually(t, "restart", 10*time.Second, func() bool {
			cur := mustGet(t, s, "loop")
			return cur.State == "running" && cur.PID != in.PID && cur.Restarts == i+1
		})
		gaps = append(gaps, time.Since(killed))
	}
	// Decide's schedule: immediate, then Base, then 2*Base (no jitter set).
	if gaps[0] >= 200*time.Millisecond || gaps[1] < 200*time.Millisecond || gaps[2] < 400*time.Millisecond {
		t.Fatalf("restart gaps %v; want <200ms, >=200ms, >=400ms", gaps)
	}
	in := mustGet(t, s, "loop")
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "crashloop state", 5*time.Second, func() bool { return mustGet(t, s, "loop").State == "crashloop" })
	// Restart clears the backoff at once.
	if err := s.Restart(ctx, "loop"); err != nil {
		t.Fatal(err)
	}
	if st := mustGet(t, s, "loop").State; st != "running" {
		t.Fatalf("after Restart state = %s", st)
	}
}

func TestAdoptAfterAgentRestart(t *testing.T) {
	cfg := testConfig(t, 3)
	s1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var before []Instance
	for _, id := range []string{"a1", "a2", "a3"} {
		in, _, err := s1.Provision(ctx, id, Spec{Persistence: "aof"})
		if err != nil {
			t.Fatal(err)
		}
		before = append(before, in)
	}
	creds, _, err := s1.Bind(ctx, "a1", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	app := client(t, creds.Port, creds.Username, creds.Password)
	if err := app.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	shutdown(t, s1, false) // the agent stops; Redis keeps running

	// a3 dies while no agent watches it.
	syscall.Kill(before[2].PID, syscall.SIGKILL)
	testenv.Eventually(t, "a3 to be gone", 5*time.Second, func() bool {
		return supervisor.Verify(supervisor.Process{PID: before[2].PID}, "") != nil
	})
	if err := app.Ping(ctx).Err(); err != nil {
		t.Fatalf("tenant connection broke when the agent stopped: %v", err)
	}

	s2 := startService(t, cfg)
	for _, b := range before[:2] {
		in := mustGet(t, s2, b.ID)
		if in.PID != b.PID || in.Restarts != 0 {
			t.Errorf("%s after agent restart: pid %d restarts %d; want adopted pid %d, 0 restarts", b.ID, in.PID, in.Restarts, b.PID)
		}
	}
	testenv.Eventually(t, "a3 started again", 10*time.Second, func() bool {
		in := mustGet(t, s2, "a3")
		return in.State == "running" && in.PID != before[2].PID
	})
	testenv.Eventually(t, "a1 adopted and ready", 5*time.Second, func() bool { return mustGet(t, s2, "a1").State == "running" })
	// The tenant connection survived the whole agent restart.
	if v, err := app.Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET over the original connection = %q, %v", v, err)
	}
	// An adopted process's death is noticed (pidfd) and it is restarted.
	killed := time.Now()
	syscall.Kill(before[0].PID, syscall.SIGKILL)
	testenv.Eventually(t, "adopted a1 restarted", 10*time.Second, func() bool {
		in := mustGet(t, s2, "a1")
		return in.State == "running" && in.PID != before[0].PID
	})
	t.Logf("adopted process restarted %v after SIGKILL", time.Since(killed))
	if v, err := client(t, creds.Port, creds.Username, creds.Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET after restart of adopted process = %q, %v", v, err)
	}
}

func TestReusedPIDIsNotAdopted(t *testing.T) {
	cfg := testConfig(t, 1)
	s1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	in, _, err := s1.Provision(context.Background(), "r1", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	shutdown(t, s1, false)
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "r1 gone", 5*time.Second, func() bool {
		return supervisor.Verify(supervisor.Process{PID: in.PID}, "") != nil
	})
	// A foreign process now holds the recorded pid: simulate by pointing
	// the record at this test process, which has a different start time
	// and title.
	st, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.store.Update("r1", func(r *state.Instance) error { r.PID = os.Getpid(); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := st.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shutdown(t, st, true) })
	testenv.Eventually(t, "r1 started fresh", 10*time.Second, func() bool {
		got := mustGet(t, st, "r1")
		return got.State == "running" && got.PID != os.Getpid()
	})
}

func TestDeprovisionFreesPortAndDirectory(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "gone", Spec{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Deprovision(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	if err := s.Deprovision(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Deprovision = %v, want ErrNotFound", err)
	}
	if s.layout.Exists("gone") {
		t.Error("directory left after Deprovision")
	}
	if _, err := os.Stat(s.layout.LogPath("gone")); !os.IsNotExist(err) {
		t.Error("log left after Deprovision")
	}
	if supervisor.Verify(supervisor.Process{PID: in.PID}, s.layout.ConfPath("gone")) == nil {
		t.Error("process still running after Deprovision")
	}
	if l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(in.Port)); err != nil {
		t.Errorf("port %d still in use after Deprovision: %v", in.Port, err)
	} else {
		l.Close()
	}
	// The only port of the range is handed out again.
	again, _, err := s.Provision(ctx, "next", Spec{})
	if err != nil || again.Port != in.Port {
		t.Fatalf("Provision after delete = %+v, %v; want port %d", again, err, in.Port)
	}
}

func TestConcurrentProvisionsGetDistinctPorts(t *testing.T) {
	const n = 50
	cfg := testConfig(t, n)
	s := startService(t, cfg)
	var wg sync.WaitGroup
	insts := make([]Instance, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			insts[i], _, errs[i] = s.Provision(context.Background(), fmt.Sprintf("c%02d", i), Spec{MemoryMB: 16, Persistence: "none"})
		}()
	}
	wg.Wait()
	seen := map[int]string{}
	for i, in := range insts {
		if errs[i] != nil {
			t.Fatalf("provision %d: %v", i, errs[i])
		}
		if other, dup := seen[in.Port]; dup {
			t.Fatalf("port %d given to %s and %s", in.Port, other, in.ID)
		}
		seen[in.Port] = in.ID
		if in.State != "running" {
			t.Errorf("%s is %s, want running", in.ID, in.State)
		}
	}
}

func TestProvisionRollsBackWhenRedisCannotStart(t *testing.T) {
	cfg := testConfig(t, 1)
	fake := filepath.Join(testenv.TraversableDir(t), "redis-server")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg.RedisServer = fake
	s := startService(t, cfg)
	_, _, err := s.Provision(context.Background(), "broken", Spec{})
	if err == nil {
		t.Fatal("Provision succeeded with a redis-server that exits at once")
	}
	if errors.Is(err, ErrInvalid) || errors.Is(err, ErrConflict) || errors.Is(err, ErrCapacity) {
		t.Fatalf("error %v blames the caller; the agent's fault must be a 5xx", err)
	}
	if list, _ := s.List(context.Background()); len(list) != 0 {
		t.Fatalf("failed provision left a record: %+v", list)
	}
	if s.layout.Exists("broken") {
		t.Fatal("failed provision left its directory")
	}
}

func TestConfigValidate(t *testing.T) {
	good := DefaultConfig()
	good.DataDir = "/tmp/x"
	good.RedisServer = "/bin/sh"
	good.RedisUser = "nobody"
	good.Launcher = "/bin/sh" // beside a deployed agent; not beside a test binary
	tests := []struct {
		name string
		mod  func(*Config)
		ok   bool
	}{
		{"defaults", func(*Config) {}, true},
		{"relative data dir", func(c *Config) { c.DataDir = "data" }, false},
		{"inverted port range", func(c *Config) { c.PortMin, c.PortMax = 2, 1 }, false},
		{"missing redis-server", func(c *Config) { c.RedisServer = "/nonexistent/redis-server" }, false},
		{"not executable", func(c *Config) { c.RedisServer = notExecutable(t) }, false},
		{"no redis-server found", func(c *Config) { c.RedisServer = "" }, false},
		{"bad bind host", func(c *Config) { c.BindHost = "example" }, false},
		{"zero budget", func(c *Config) { c.MemoryBudgetMB = 0 }, false},
		{"no launcher", func(c *Config) { c.Launcher = "" }, false},
		{"no launcher, unconfined", func(c *Config) { c.Launcher, c.Confine = "", "off" }, true},
		{"launcher not executable", func(c *Config) { c.Launcher = notExecutable(t) }, false},
		{"bad confine", func(c *Config) { c.Confine = "yes" }, false},
		{"uid range", func(c *Config) { c.InstanceUIDs = "200000-200999" }, true},
		{"uid range inverted", func(c *Config) { c.InstanceUIDs = "200999-200000" }, false},
		{"uid range of system users", func(c *Config) { c.InstanceUIDs = "100-200" }, false},
		{"uids off", func(c *Config) { c.InstanceUIDs = "off" }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mod(&c)
			if err := c.Validate(); (err == nil) != tt.ok {
				t.Fatalf("Validate = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func notExecutable(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "redis-server")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// An agent that crashed after spawning a redis-server but before recording
// its pid leaves a record without one; reconcile finds the process by the
// config in its title and adopts it instead of starting a second one.
func TestReconcileAdoptsUnrecordedProcessAndReportsOrphans(t *testing.T) {
	cfg := testConfig(t, 2)
	s1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	in, _, err := s1.Provision(context.Background(), "u1", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	shutdown(t, s1, false)

	s2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.store.Update("u1", func(r *state.Instance) error { r.PID, r.StartTime = 0, 0; return nil }); err != nil {
		t.Fatal(err)
	}
	// An orphan directory and an orphan process (a redis-server running a
	// config under our data root that no record owns).
	orphanDir := filepath.Join(s2.layout.DataRoot, "ghost")
	if err := os.MkdirAll(orphanDir, 0o755); err != nil {
		t.Fatal(err)
	}
	ghostConf := filepath.Join(orphanDir, "redis.conf")
	port := cfg.PortMax
	os.WriteFile(ghostConf, fmt.Appendf(nil, "port %d\nbind 127.0.0.1\ndir %s\nsave \"\"\nproc-title-template \"{title} {listen-addr} {config-file}\"\n", port, orphanDir), 0o644)
	ghost := exec.Command(cfg.RedisServer, ghostConf)
	if err := ghost.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ghost.Process.Kill(); ghost.Wait() })
	testenv.Eventually(t, "ghost redis up", 5*time.Second, func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	if err := s2.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shutdown(t, s2, true) })
	if got := mustGet(t, s2, "u1"); got.PID != in.PID || got.Restarts != 0 {
		t.Fatalf("after reconcile: pid %d restarts %d; want the unrecorded pid %d adopted", got.PID, got.Restarts, in.PID)
	}
	if rec, _ := s2.store.Get("u1"); rec.PID != in.PID {
		t.Fatalf("adopted pid not persisted: record pid %d", rec.PID)
	}
	var kinds []string
	orphans, _ := s2.Orphans(context.Background())
	for _, o := range orphans {
		if o.ID != "ghost" {
			t.Errorf("unexpected orphan %+v", o)
		}
		kinds = append(kinds, o.Kind)
	}
	if len(kinds) != 2 {
		t.Fatalf("orphans = %+v; want the ghost directory and process", orphans)
	}
	// Reported, never deleted.
	if _, err := os.Stat(orphanDir); err != nil {
		t.Fatal("orphan directory was removed")
	}
	if err := ghost.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatal("orphan process was killed")
	}
}

func TestHungInstanceIsReplaced(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.Health = supervisor.Health{Interval: 50 * time.Millisecond, Timeout: 50 * time.Millisecond, Failures: 3}
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "hang", Spec{Persistence: "aof-always"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "hang", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := client(t, creds.Port, creds.Username, creds.Password).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	if err := syscall.Kill(in.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the stopped redis-server to be replaced", 10*time.Second, func() bool {
		cur := mustGet(t, s, "hang")
		return cur.State == "running" && cur.PID != in.PID
	})
	t.Logf("SIGSTOPped process replaced after %v", time.Since(stopped))
	cur := mustGet(t, s, "hang")
	if cur.LastExit == nil || cur.LastExit.Reason != "hung" || cur.LastExit.Signal != "killed" || cur.Restarts != 1 {
		t.Fatalf("after hang: %+v last exit %+v; want reason hung, killed, 1 restart", cur, cur.LastExit)
	}
	if v, err := client(t, creds.Port, creds.Username, creds.Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET after hang recovery = %q, %v", v, err)
	}
}

// A corrupt AOF keeps redis-server from starting: the instance reports it
// (backoff or crashloop, with the log's last lines) and nothing is deleted.
func TestCorruptAOFIsReportedNotDeleted(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Restart = supervisor.Policy{Base: 20 * time.Millisecond, Max: 100 * time.Millisecond, StableAfter: time.Minute, CrashloopAfter: 3}
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "aofbad", Spec{Persistence: "aof-always"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "aofbad", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := client(t, creds.Port, creds.Username, creds.Password).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	incr, _ := filepath.Glob(filepath.Join(s.layout.DataDir("aofbad"), "appendonlydir", "*.incr.aof"))
	if len(incr) != 1 {
		t.Fatalf("incr AOF files: %v", incr)
	}
	good, _ := os.ReadFile(incr[0])
	corrupt := append([]byte("this is not an AOF\r\n"), good...)
	if err := os.WriteFile(incr[0], corrupt, 0o600); err != nil {
		t.Fatal(err)
	}
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "crashloop", 10*time.Second, func() bool { return mustGet(t, s, "aofbad").State == "crashloop" })
	got := mustGet(t, s, "aofbad")
	if !strings.Contains(strings.Join(got.LogTail, "\n"), "Bad file format reading the append only file") {
		t.Fatalf("log tail does not say why:\n%s", strings.Join(got.LogTail, "\n"))
	}
	if got.LastExit == nil || got.LastExit.Code != 1 {
		t.Fatalf("last exit %+v; want code 1", got.LastExit)
	}
	if after, err := os.ReadFile(incr[0]); err != nil || string(after) != string(corrupt) {
		t.Fatalf("the AOF was changed or removed: %v", err)
	}
	// The operator repairs the file; the agent, still trying, recovers.
	if err := os.WriteFile(incr[0], good, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Restart(ctx, "aofbad"); err != nil {
		t.Fatal(err)
	}
	if v, err := client(t, creds.Port, creds.Username, creds.Password).Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("GET after repair = %q, %v", v, err)
	}
	if tail := mustGet(t, s, "aofbad").LogTail; tail != nil {
		t.Errorf("a running instance shows a log tail: %q", tail)
	}
}

// A process of the instance runs with an oom_score_adj above the agent's,
// so the kernel's OOM killer picks a tenant before the agent.
func TestOOMScoreAdjAboveAgent(t *testing.T) {
	s := startService(t, testConfig(t, 1))
	in, _, err := s.Provision(context.Background(), "oom", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	read := func(pid string) int {
		b, err := os.ReadFile("/proc/" + pid + "/oom_score_adj")
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	if child, agent := read(strconv.Itoa(in.PID)), read("self"); child <= agent {
		t.Fatalf("redis-server oom_score_adj %d, agent %d; want the tenant above", child, agent)
	}
}

func TestLog(t *testing.T) {
	s := startService(t, testConfig(t, 1))
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "logged", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	lines, err := s.Log(ctx, "logged", 5)
	if err != nil || len(lines) == 0 || len(lines) > 5 || !strings.Contains(strings.Join(lines, "\n"), "Ready to accept connections") {
		t.Fatalf("Log = %q, %v; want at most 5 lines ending with Redis's ready line", lines, err)
	}
	for _, n := range []int{0, -1, MaxLogLines + 1} {
		if _, err := s.Log(ctx, "logged", n); !errors.Is(err, ErrInvalid) {
			t.Errorf("Log(lines=%d) = %v, want ErrInvalid", n, err)
		}
	}
	if _, err := s.Log(ctx, "nope", 5); !errors.Is(err, ErrNotFound) {
		t.Errorf("Log of a missing instance = %v, want ErrNotFound", err)
	}
}

// Whatever spec comes in, normalize either rejects it as invalid or
// returns one the agent can run.
func FuzzNormalize(f *testing.F) {
	f.Add(0, "")
	f.Add(64, "aof")
	f.Add(-1, "rdb")
	f.Add(1<<30, "AOF")
	f.Add(1, "none\x00")
	s := &Service{cfg: DefaultConfig()}
	f.Fuzz(func(t *testing.T, mem int, persistence string) {
		spec, err := s.normalize(Spec{MemoryMB: mem, Persistence: persistence})
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("normalize error %v is not ErrInvalid", err)
			}
			return
		}
		if spec.MemoryMB < 1 || (spec.Persistence != "aof" && spec.Persistence != "aof-always" && spec.Persistence != "rdb" && spec.Persistence != "none") {
			t.Fatalf("normalize accepted %+v", spec)
		}
	})
}

// An instance's metadata is stored, returned, part of its identity and
// replaceable; a binding may keep a password it is given.
func TestMetadataAndGivenPasswords(t *testing.T) {
	s := startService(t, testConfig(t, 2))
	ctx := context.Background()
	md := json.RawMessage(`{ "plan": "small", "org": "o1" }`)
	in, created, err := s.Provision(ctx, "m", Spec{Persistence: "none", Metadata: md})
	if err != nil || !created || string(in.Metadata) != `{"plan":"small","org":"o1"}` {
		t.Fatalf("Provision with metadata = %s, %v, %v", in.Metadata, created, err)
	}
	if _, created, err := s.Provision(ctx, "m", Spec{Persistence: "none", Metadata: json.RawMessage(`{"plan":"small","org":"o1"}`)}); err != nil || created {
		t.Fatalf("the same provision again = %v, %v; want 200", created, err)
	}
	if _, _, err := s.Provision(ctx, "m", Spec{Persistence: "none", Metadata: json.RawMessage(`{"plan":"big"}`)}); !errors.Is(err, ErrConflict) {
		t.Fatalf("other metadata = %v, want ErrConflict", err)
	}
	for _, bad := range []string{`[1]`, `"x"`, `{`, `{"k":"` + strings.Repeat("x", 9000) + `"}`} {
		if _, _, err := s.Provision(ctx, "bad", Spec{Metadata: json.RawMessage(bad)}); !errors.Is(err, ErrInvalid) {
			t.Errorf("metadata %.20s = %v, want ErrInvalid", bad, err)
		}
	}
	if got, err := s.SetMetadata(ctx, "m", json.RawMessage(`{"plan":"big"}`)); err != nil || string(got.Metadata) != `{"plan":"big"}` {
		t.Fatalf("SetMetadata = %s, %v", got.Metadata, err)
	}
	if got := mustGet(t, s, "m"); string(got.Metadata) != `{"plan":"big"}` {
		t.Fatalf("metadata after SetMetadata = %s", got.Metadata)
	}

	pw := "a-password-of-our-own-0123"
	creds, _, err := s.Bind(ctx, "m", "app", pw)
	if err != nil || creds.Password != pw {
		t.Fatalf("Bind with a password = %+v, %v", creds, err)
	}
	if err := client(t, creds.Port, "app", pw).Ping(ctx).Err(); err != nil {
		t.Fatalf("the given password does not log in: %v", err)
	}
	if _, _, err := s.Bind(ctx, "m", "app", pw+"x"); !errors.Is(err, ErrConflict) {
		t.Fatalf("the binding with another password = %v, want ErrConflict", err)
	}
	if _, _, err := s.Bind(ctx, "m", "app2", "short"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a short password = %v, want ErrInvalid", err)
	}
	if got, err := s.Binding(ctx, "m", "app"); err != nil || got != creds {
		t.Fatalf("Binding = %+v, %v; want %+v", got, err, creds)
	}
	if _, err := s.Binding(ctx, "m", "none"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Binding of none = %v, want ErrNotFound", err)
	}
}
