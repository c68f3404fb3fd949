package supervisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/redis"
)

// redisInstance is a real redis-server with AOF persistence under a
// Supervisor.
type redisInstance struct {
	s      *Supervisor
	rec    *recorder
	dir    string
	conf   string
	binary string // the real redis-server
	admin  *redis.Admin
	client *goredis.Client
}

// newRedisSup supervises a redis-server rendered like the agent's, with
// AOF persistence, and stops it (no save) at the test's end. mod, when
// set, changes the config first.
func newRedisSup(t *testing.T, mod func(*Config)) *redisInstance {
	t.Helper()
	bin := testenv.RedisServer(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	port := testenv.FreePort(t)
	pass := redis.NewPassword()
	c := redis.Conf{Bind: "127.0.0.1", Port: port, Dir: data, LogFile: filepath.Join(dir, "redis.log"),
		ACLFile: filepath.Join(dir, "users.acl"), MemoryMB: 16, Persistence: apitype.PersistenceAOF}
	if err := os.WriteFile(c.ACLFile, redis.RenderACL([]redis.User{{Name: redis.AdminUser, PasswordHash: redis.HashPassword(pass), Admin: true}}), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(conf, redis.Render(c), 0o600); err != nil {
		t.Fatal(err)
	}
	admin := redis.NewAdmin("127.0.0.1", port, pass)
	rec := &recorder{}
	cfg := Config{
		Binary:       bin,
		ConfPath:     conf,
		Dir:          dir,
		LogPath:      filepath.Join(dir, "stdout.log"),
		Env:          redis.Env,
		Admin:        admin,
		Policy:       Policy{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond, StableAfter: time.Minute, CrashloopAfter: 3},
		ReadyTimeout: 5 * time.Second,
		StopTimeout:  5 * time.Second,
		OnEvent:      rec.on,
		Rand:         func() float64 { return 0.5 },
	}
	if mod != nil {
		mod(&cfg)
	}
	s := New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	client := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port), Username: redis.AdminUser, Password: pass,
		DisableIdentity: true, MaxRetries: -1, PoolSize: 1})
	t.Cleanup(func() {
		client.Close()
		admin.Close()
		sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := s.Stop(sctx, true)
		scancel()
		cancel()
		<-s.Done()
		if p := s.Status().Process; p.PID != 0 {
			syscall.Kill(p.PID, syscall.SIGKILL)
		}
		if err != nil {
			t.Errorf("stop at the end of the test: %v", err)
		}
	})
	return &redisInstance{s: s, rec: rec, dir: dir, conf: conf, binary: bin, admin: admin, client: client}
}

func (r *redisInstance) waitReady(t *testing.T) Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.s.WaitReady(ctx); err != nil {
		t.Fatalf("WaitReady: %v (status %+v)", err, r.s.Status())
	}
	return r.s.Status()
}

// script writes an executable shell script into dir that records its pid
// in pids (exec keeps it: the pid is redis-server's) and runs body.
func script(t *testing.T, dir, name, body string) (path, pids string) {
	t.Helper()
	path = filepath.Join(dir, name)
	pids = path + ".pids"
	text := "#!/bin/sh\necho $$ >> '" + pids + "'\n" + body + "\n"
	if err := os.WriteFile(path, []byte(text), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, pids
}

// wrapper is a script that runs the real redis-server.
func (r *redisInstance) wrapper(t *testing.T) (path, pids string) {
	t.Helper()
	return script(t, t.TempDir(), "redis-server-wrapper", `exec '`+r.binary+`' "$@"`)
}

// lastPID returns the last pid a script recorded, 0 when none.
func lastPID(t *testing.T, pids string) int {
	t.Helper()
	b, err := os.ReadFile(pids)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	n, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (r *redisInstance) events() []Event {
	r.rec.mu.Lock()
	defer r.rec.mu.Unlock()
	return append([]Event(nil), r.rec.events...)
}

// waitEvents waits until n events were reported: WaitReady returns on the
// status change, a moment before the Ready event is delivered.
func (r *redisInstance) waitEvents(t *testing.T, n int) []Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ev := r.events()
		if len(ev) >= n || time.Now().After(deadline) {
			return ev
		}
		time.Sleep(time.Millisecond)
	}
}

func TestReplaceRunsNewBinaryAndKeepsData(t *testing.T) {
	r := newRedisSup(t, nil)
	ctx := context.Background()
	old := r.waitReady(t)
	if old.Binary != r.binary || r.s.Binary() != r.binary {
		t.Fatalf("binary before Replace = %q / %q, want %q", old.Binary, r.s.Binary(), r.binary)
	}
	if err := r.client.Set(ctx, "k", "before the replace", 0).Err(); err != nil {
		t.Fatal(err)
	}
	wrapper, pids := r.wrapper(t)

	var (
		betweenCalls  int
		betweenChecks []string
	)
	err := r.s.Replace(ctx, wrapper, func() error {
		betweenCalls++
		if err := Verify(old.Process, r.conf); !IsGone(err) {
			betweenChecks = append(betweenChecks, "the old process is alive: "+errString(err))
		}
		if p := r.s.Status().Process; p.PID != 0 {
			betweenChecks = append(betweenChecks, "Status has process "+strconv.Itoa(p.PID))
		}
		if err := r.admin.Ping(ctx); err == nil {
			betweenChecks = append(betweenChecks, "a server answers PING")
		}
		if _, err := os.Stat(pids); err == nil {
			betweenChecks = append(betweenChecks, "the new binary already ran")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Replace: %v", err)
	}
	if betweenCalls != 1 || len(betweenChecks) != 0 {
		t.Fatalf("between ran %d times; while it ran: %v", betweenCalls, betweenChecks)
	}
	// Replace returns once the new process is spawned.
	if st := r.s.Status(); st.Process.PID == 0 || st.Process.PID == old.Process.PID {
		t.Fatalf("after Replace: process %+v, old %+v", st.Process, old.Process)
	}
	cur := r.waitReady(t)
	if cur.Process.PID == old.Process.PID {
		t.Fatal("Replace kept the old process")
	}
	if Verify(old.Process, r.conf) == nil {
		t.Fatal("the old process is still alive")
	}
	if err := Verify(cur.Process, r.conf); err != nil {
		t.Fatalf("the new process: %v", err)
	}
	if got := lastPID(t, pids); got != cur.Process.PID {
		t.Fatalf("the wrapper ran as pid %d, the running process is %d", got, cur.Process.PID)
	}
	if cur.Binary != wrapper || r.s.Binary() != wrapper {
		t.Fatalf("binary after Replace = %q / %q, want %q", cur.Binary, r.s.Binary(), wrapper)
	}
	if cur.Restarts != 1 || cur.LastExit == nil || cur.LastExit.Reason != apitype.ReasonManual || cur.LastExit.Code != 0 {
		t.Fatalf("after Replace: restarts %d, last exit %+v; want 1, a manual exit with code 0", cur.Restarts, cur.LastExit)
	}
	// The events: the old one exited (manual), the new one started from
	// the new binary and became ready.
	ev := r.waitEvents(t, 5)
	if len(ev) != 5 {
		t.Fatalf("events = %+v, want Started, Ready, Exited, Started, Ready", ev)
	}
	if e := ev[2]; e.Kind != Exited || e.Exit == nil || e.Exit.Reason != apitype.ReasonManual || e.Restarts != 1 {
		t.Errorf("third event = %+v, want a manual Exited", e)
	}
	if e := ev[3]; e.Kind != Started || e.Binary != wrapper || e.Process != cur.Process {
		t.Errorf("fourth event = %+v, want Started of pid %d from %s", e, cur.Process.PID, wrapper)
	}
	if e := ev[4]; e.Kind != Ready || e.Process != cur.Process {
		t.Errorf("fifth event = %+v, want Ready", e)
	}
	// The graceful stop persisted the data set to the AOF.
	if v, err := r.client.Get(ctx, "k").Result(); err != nil || v != "before the replace" {
		t.Fatalf("GET k after Replace = %q, %v", v, err)
	}

	// Every later start runs the new binary: a Restart...
	if err := r.s.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	cur2 := r.waitReady(t)
	if cur2.Binary != wrapper || lastPID(t, pids) != cur2.Process.PID || cur2.Process == cur.Process {
		t.Fatalf("after Restart: binary %q, pid %d, wrapper's pid %d", cur2.Binary, cur2.Process.PID, lastPID(t, pids))
	}
	// ...and a restart after a crash.
	syscall.Kill(cur2.Process.PID, syscall.SIGKILL)
	st := waitStatus(t, r.s, "a restart after a crash", 10*time.Second, func(st Status) bool {
		return st.State == Running && st.Process.PID != cur2.Process.PID
	})
	if lastPID(t, pids) != st.Process.PID || st.Binary != wrapper {
		t.Fatalf("after a crash: pid %d from %q, the wrapper's pid %d", st.Process.PID, st.Binary, lastPID(t, pids))
	}
	if v, err := r.client.Get(ctx, "k").Result(); err != nil || v != "before the replace" {
		t.Fatalf("GET k after a crash = %q, %v", v, err)
	}
}

func errString(err error) string {
	if err == nil {
		return "verified"
	}
	return err.Error()
}

// between runs while no process runs, so it may change the data directory:
// the new process starts on what it left.
func TestReplaceBetweenChangesData(t *testing.T) {
	r := newRedisSup(t, nil)
	ctx := context.Background()
	r.waitReady(t)
	if err := r.client.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(r.dir, "data")
	if err := r.s.Replace(ctx, "", func() error {
		// The old process wrote its AOF on the way out; drop it.
		if _, err := os.Stat(filepath.Join(data, "appendonlydir")); err != nil {
			return err
		}
		return os.RemoveAll(filepath.Join(data, "appendonlydir"))
	}); err != nil {
		t.Fatalf("Replace: %v", err)
	}
	st := r.waitReady(t)
	if st.Binary != r.binary {
		t.Fatalf("Replace without a binary changed it to %q", st.Binary)
	}
	if n, err := r.client.DBSize(ctx).Result(); err != nil || n != 0 {
		t.Fatalf("DBSIZE after between removed the AOF = %d, %v; want an empty data set", n, err)
	}
}

// An error from between is returned after the new process is started:
// the instance is never left down, and the new binary is in use.
func TestReplaceBetweenError(t *testing.T) {
	r := newRedisSup(t, nil)
	ctx := context.Background()
	old := r.waitReady(t)
	wrapper, pids := r.wrapper(t)
	errSwap := errors.New("swap failed")
	err := r.s.Replace(ctx, wrapper, func() error { return errSwap })
	if !errors.Is(err, errSwap) {
		t.Fatalf("Replace = %v, want the error of between", err)
	}
	cur := r.waitReady(t)
	if cur.Process.PID == old.Process.PID || lastPID(t, pids) != cur.Process.PID {
		t.Fatalf("after a failed between: pid %d (old %d), the wrapper's pid %d; want the new binary running",
			cur.Process.PID, old.Process.PID, lastPID(t, pids))
	}
	if cur.Binary != wrapper {
		t.Fatalf("binary after a failed between = %q, want %q", cur.Binary, wrapper)
	}
	// The caller undoes its change and replaces again.
	if err := r.s.Replace(ctx, r.binary, nil); err != nil {
		t.Fatal(err)
	}
	back := r.waitReady(t)
	if back.Binary != r.binary || lastPID(t, pids) == back.Process.PID || back.Restarts != 2 {
		t.Fatalf("after replacing back: %+v, the wrapper's last pid %d", back, lastPID(t, pids))
	}
}

// A binary that exits at once: Replace returns once it is spawned, and
// then the supervisor treats its exits like crashes (backoff, crashloop)
// and WaitReady fails. Replacing again with a good binary, as the rollout
// does, brings the instance back from backoff, data included. The backoff
// runs on a clock the test moves.
func TestReplaceWithBinaryThatExits(t *testing.T) {
	clk := newFakeClock()
	r := newRedisSup(t, func(c *Config) { c.Clock = clk })
	ctx := context.Background()
	old := r.waitReady(t)
	if err := r.client.Set(ctx, "k", "kept", 0).Err(); err != nil {
		t.Fatal(err)
	}
	bad, badPIDs := script(t, t.TempDir(), "bad-redis-server", "exit 1")
	if err := r.s.Replace(ctx, bad, nil); err != nil {
		t.Fatalf("Replace with a binary that exits: %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := r.s.WaitReady(wctx)
	cancel()
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady on a binary that exits = %v, want a failed start", err)
	}
	// Through the backoffs to crashloop: each poll that does not see it
	// yet ends any backoff (200 ms is the policy's maximum).
	st := waitStatus(t, r.s, "state crashloop", 10*time.Second, func(st Status) bool {
		if st.State == Crashloop {
			return true
		}
		clk.Advance(200 * time.Millisecond)
		return false
	})
	if st.Binary != bad || st.LastExit == nil || st.LastExit.Code != 1 || st.LastExit.Reason != apitype.ReasonCrash {
		t.Fatalf("crashloop status %+v, last exit %+v; want exits with code 1 of %s", st, st.LastExit, bad)
	}
	if lastPID(t, badPIDs) == 0 {
		t.Fatal("the bad binary never ran")
	}
	if Verify(old.Process, r.conf) == nil {
		t.Fatal("the old process is still alive")
	}

	wrapper, pids := r.wrapper(t)
	called := false
	if err := r.s.Replace(ctx, wrapper, func() error { called = true; return nil }); err != nil {
		t.Fatalf("Replace from crashloop: %v", err)
	}
	if !called {
		t.Fatal("between not called when no process ran")
	}
	cur := r.waitReady(t)
	if cur.Binary != wrapper || lastPID(t, pids) != cur.Process.PID {
		t.Fatalf("after replacing the bad binary: %+v, the wrapper's pid %d", cur, lastPID(t, pids))
	}
	if v, err := r.client.Get(ctx, "k").Result(); err != nil || v != "kept" {
		t.Fatalf("GET k after the round trip through a bad binary = %q, %v", v, err)
	}
	// Running again, it stays running: no backoff timer left from the
	// crashloop restarts it. (Replace stopped the one crashloop had set
	// before it returned.)
	n := cur.Restarts
	if fired := clk.Advance(300 * time.Millisecond); fired != 0 { // past the 200 ms maximum backoff
		t.Fatalf("%d timers fired after recovering; want none left from the crashloop", fired)
	}
	if st := r.s.Status(); st.State != Running || st.Process != cur.Process || st.Restarts != n {
		t.Fatalf("after recovering: %+v, want pid %d running and %d restarts", st, cur.Process.PID, n)
	}
}

// A binary that cannot be executed fails the spawn: the supervisor backs
// off with the spawn error as the last exit, and a later Replace recovers.
func TestReplaceWithMissingBinary(t *testing.T) {
	r := newRedisSup(t, nil)
	ctx := context.Background()
	r.waitReady(t)
	missing := filepath.Join(t.TempDir(), "no-such-redis-server")
	err := r.s.Replace(ctx, missing, nil)
	t.Logf("Replace with a missing binary = %v", err)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	werr := r.s.WaitReady(wctx)
	cancel()
	if werr == nil {
		t.Fatal("WaitReady succeeded with a missing binary")
	}
	st := r.s.Status()
	if st.Binary != missing || st.Process.PID != 0 || (st.State != Backoff && st.State != Crashloop && st.State != Starting) {
		t.Fatalf("status with a missing binary: %+v", st)
	}
	if st.LastExit == nil || st.LastExit.Reason != apitype.ReasonSpawnFailed || st.LastExit.Message == "" {
		t.Fatalf("last exit %+v, want a spawn failure", st.LastExit)
	}
	if err := r.s.Replace(ctx, r.binary, nil); err != nil {
		t.Fatal(err)
	}
	if cur := r.waitReady(t); cur.Binary != r.binary {
		t.Fatalf("binary after recovering = %q", cur.Binary)
	}
}

func TestReplaceAfterStop(t *testing.T) {
	s, _, _ := newSup(t, "sleep", &fakeAdmin{}, nil)
	waitState(t, s, Running, 5*time.Second)
	if err := s.Stop(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	<-s.Done()
	called := false
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Replace(ctx, "/bin/false", func() error { called = true; return nil }); err == nil || ctx.Err() != nil {
		t.Fatalf("Replace on a stopped supervisor = %v, want an immediate error", err)
	}
	if called || s.Status().State != Stopped || s.Binary() != os.Args[0] {
		t.Fatalf("Replace on a stopped supervisor changed something: between called %v, status %+v", called, s.Status())
	}
}

// The loop does not receive the request while busy (here: terminating a
// process that ignores SIGTERM), so a caller whose context ends meanwhile
// gets the context's error.
func TestReplaceContextEndsWhileBusy(t *testing.T) {
	s, _, _ := newSup(t, "ignore-term", &fakeAdmin{}, nil)
	waitState(t, s, Running, 5*time.Second)
	go s.Restart(context.Background()) // keeps the loop in terminate for the 300 ms stop timeout
	waitState(t, s, Stopping, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	if err := s.Replace(ctx, "", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Replace while the loop is busy = %v, want the context's deadline", err)
	}
	if took := time.Since(t0); took > 250*time.Millisecond {
		t.Fatalf("Replace took %v past its 50ms deadline", took)
	}
}

// A call whose context has already ended changes nothing (a select that
// had both its request and ctx.Done() ready would pick one at random).
func TestReplaceWithCancelledContextDoesNothing(t *testing.T) {
	s, _, _ := newSup(t, "sleep", &fakeAdmin{}, nil)
	first := waitState(t, s, Running, 5*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 20 {
		if err := s.Replace(ctx, "", nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("Replace with a cancelled context = %v", err)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if st := s.Status(); st.Restarts != 0 || st.Process != first.Process {
		t.Fatalf("20 Replace calls with a cancelled context restarted the process %d times (pid %d, was %d)",
			st.Restarts, st.Process.PID, first.Process.PID)
	}
}

// While between runs no process runs: Status must not say Running, and
// WaitReady must not return nil for a server that is down. (The gap also
// spans the graceful shutdown, up to StopTimeout.)
func TestReplaceStatusDuringGap(t *testing.T) {
	r := newRedisSup(t, nil)
	r.waitReady(t)
	var (
		state State
		werr  error
	)
	if err := r.s.Replace(context.Background(), "", func() error {
		state = r.s.Status().State
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		werr = r.s.WaitReady(ctx)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	r.waitReady(t)
	if state == Running || werr == nil {
		t.Fatalf("with no process: state %v, WaitReady = %v; want not running and WaitReady failing", state, werr)
	}
}

// A process replaced (or stopped) right after its spawn, before it
// listens, is stopped at once: SHUTDOWN cannot reach it, so it gets
// SIGTERM (which kills it outright if Redis has not installed its handler
// yet: it has no data to persist then) rather than waiting StopTimeout for
// an exit that never comes and a SIGKILL.
func TestReplaceRightAfterSpawnIsGraceful(t *testing.T) {
	r := newRedisSup(t, nil)
	ctx := context.Background()
	r.waitReady(t)
	if err := r.s.Replace(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	// The new process was spawned a moment ago and does not listen yet.
	t0 := time.Now()
	if err := r.s.Replace(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	ex := r.s.Status().LastExit
	r.waitReady(t)
	graceful := ex != nil && ((ex.Signal == "" && ex.Code == 0) || ex.Signal == "terminated")
	if took > 2*time.Second || !graceful {
		t.Fatalf("replacing a starting process took %v (stop timeout 5s), its exit %+v; want a prompt exit on SHUTDOWN or SIGTERM", took, ex)
	}
}
