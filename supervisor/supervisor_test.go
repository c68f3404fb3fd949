package supervisor

import (
	"context"
	"errors"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The fake redis-server is this test binary run again with one argument,
// "fake:<mode>", standing where the config path would be.
func TestMain(m *testing.M) {
	if len(os.Args) == 2 && len(os.Args[1]) > 5 && os.Args[1][:5] == "fake:" {
		fakeServer(os.Args[1][5:])
		return
	}
	// A transition the diagram does not have fails the tests loudly (in
	// the agent it is logged and refused).
	illegalTransition = func(from, to State) { panic("illegal state transition " + from.String() + " -> " + to.String()) }
	os.Exit(m.Run())
}

func fakeServer(mode string) {
	switch mode {
	case "sleep": // runs until SIGTERM
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		os.WriteFile("ready", nil, 0o600)
		<-ch
		os.Exit(0)
	case "slow": // as sleep, ready only after 300 ms
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		time.Sleep(300 * time.Millisecond)
		os.WriteFile("ready", nil, 0o600)
		<-ch
		os.Exit(0)
	case "ignore-term": // needs SIGKILL
		signal.Ignore(syscall.SIGTERM)
		os.WriteFile("ready", nil, 0o600)
		time.Sleep(time.Hour)
	case "listen": // listens on a loopback port, written to "port"
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			os.Exit(101)
		}
		os.WriteFile("port", []byte(strconv.Itoa(l.Addr().(*net.TCPAddr).Port)), 0o600)
		os.WriteFile("ready", nil, 0o600)
		time.Sleep(time.Hour)
	case "env": // writes its environment to "env", then runs until SIGTERM
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		os.WriteFile("env", []byte(strings.Join(os.Environ(), "\n")), 0o600)
		os.WriteFile("ready", nil, 0o600)
		<-ch
		os.Exit(0)
	case "exit3":
		os.Exit(3)
	}
	os.Exit(100)
}

// fakeAdmin answers Ping as told, and only once the fake server has
// written "ready" into its working directory (its signal handling is set
// up by then); it cannot shut a server down, so the supervisor falls back
// to signals.
type fakeAdmin struct {
	dir     string
	pingErr error
	// alive answers PONG without the marker (for an adopted process).
	alive bool
	// after, when set, is what Ping answers once the process was ready.
	after atomic.Pointer[error]
}

func (a *fakeAdmin) Ping(context.Context) error {
	if e := a.after.Load(); e != nil {
		return *e
	}
	if a.pingErr != nil || a.alive {
		return a.pingErr
	}
	if _, err := os.Stat(filepath.Join(a.dir, "ready")); err != nil {
		return errors.New("not ready yet")
	}
	// Once read, the marker is removed so a restarted process must write
	// it again.
	return os.Remove(filepath.Join(a.dir, "ready"))
}

func (a *fakeAdmin) Shutdown(context.Context, bool) error { return errors.New("no admin connection") }

type recorder struct {
	mu     sync.Mutex
	events []Event
}

func (r *recorder) on(e Event) { r.mu.Lock(); r.events = append(r.events, e); r.mu.Unlock() }

func (r *recorder) kinds() []EventKind {
	r.mu.Lock()
	defer r.mu.Unlock()
	var k []EventKind
	for _, e := range r.events {
		k = append(k, e.Kind)
	}
	return k
}

func newSup(t *testing.T, mode string, admin Admin, mod func(*Config)) (*Supervisor, *recorder, context.CancelFunc) {
	t.Helper()
	rec := &recorder{}
	dir := t.TempDir()
	if fa, ok := admin.(*fakeAdmin); ok {
		fa.dir = dir
	}
	if ca, ok := admin.(*countingAdmin); ok {
		ca.dir = dir
	}
	cfg := Config{
		Binary:       os.Args[0],
		ConfPath:     "fake:" + mode,
		Dir:          dir,
		LogPath:      filepath.Join(t.TempDir(), "log"),
		Admin:        admin,
		Policy:       Policy{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond, StableAfter: time.Minute, CrashloopAfter: 3},
		ReadyTimeout: 300 * time.Millisecond,
		StopTimeout:  300 * time.Millisecond,
		OnEvent:      rec.on,
		Rand:         func() float64 { return 0.5 },
	}
	if mod != nil {
		mod(&cfg)
	}
	s := New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	t.Cleanup(func() {
		cancel()
		<-s.Done()
		if p := s.Status().Process; p.PID != 0 {
			syscall.Kill(p.PID, syscall.SIGKILL)
		}
	})
	return s, rec, cancel
}

// waitStatus waits until cond holds for the supervisor's status and
// returns that status; when it never does, the failure shows the last one.
func waitStatus(t *testing.T, s *Supervisor, what string, timeout time.Duration, cond func(Status) bool) Status {
	t.Helper()
	var st Status
	ok := false
	defer func() {
		if !ok { // Eventually failed the test; it ends through here
			t.Logf("last status %+v, last exit %+v", st, st.LastExit)
		}
	}()
	testenv.Eventually(t, what, timeout, func() bool {
		st = s.Status()
		return cond(st)
	})
	ok = true
	return st
}

func waitState(t *testing.T, s *Supervisor, want State, timeout time.Duration) Status {
	t.Helper()
	return waitStatus(t, s, "state "+want.String(), timeout, func(st Status) bool { return st.State == want })
}

func TestSpawnReadyStop(t *testing.T) {
	before := runtime.NumGoroutine()
	s, rec, _ := newSup(t, "sleep", &fakeAdmin{}, nil)
	if err := s.WaitReady(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := s.Status()
	if st.State != Running || st.Process.PID == 0 || st.Process.StartTime == 0 {
		t.Fatalf("status = %+v", st)
	}
	// WaitReady returns on the status change, a moment before the Ready
	// event is delivered.
	testenv.Eventually(t, "two events", 5*time.Second, func() bool { return len(rec.kinds()) >= 2 })
	if k := rec.kinds(); len(k) != 2 || k[0] != Started || k[1] != Ready {
		t.Fatalf("events = %v, want Started, Ready", k)
	}
	if err := s.Stop(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	<-s.Done()
	if Verify(st.Process, "fake:sleep") == nil {
		t.Fatal("process alive after Stop")
	}
	if s.Status().State != Stopped {
		t.Fatalf("state after Stop = %v", s.Status().State)
	}
	// No goroutine outlives the supervisor.
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines: %d before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCrashIsRestartedAtOnce(t *testing.T) {
	s, _, _ := newSup(t, "sleep", &fakeAdmin{}, nil)
	st := waitState(t, s, Running, 5*time.Second)
	killed := time.Now()
	syscall.Kill(st.Process.PID, syscall.SIGKILL)
	cur := waitStatus(t, s, "a restart after SIGKILL", 5*time.Second, func(cur Status) bool {
		return cur.State == Running && cur.Process.PID != st.Process.PID
	})
	t.Logf("restarted %v after SIGKILL", time.Since(killed))
	if cur.Restarts != 1 || cur.LastExit == nil || cur.LastExit.Signal != "killed" || cur.LastExit.Reason != apitype.ReasonCrash {
		t.Fatalf("after crash: %+v, last exit %+v", cur, cur.LastExit)
	}
}

func TestExitCodeAndCrashloop(t *testing.T) {
	s, _, _ := newSup(t, "exit3", &fakeAdmin{pingErr: errors.New("refused")}, nil)
	if err := s.WaitReady(context.Background()); err == nil {
		t.Fatal("WaitReady succeeded for a process that exits at once")
	}
	st := waitState(t, s, Crashloop, 5*time.Second)
	if st.LastExit == nil || st.LastExit.Code != 3 || st.Restarts < 3 {
		t.Fatalf("crashloop status %+v, last exit %+v", st, st.LastExit)
	}
	// It keeps trying: the restart count goes on growing.
	n := st.Restarts
	waitStatus(t, s, "another restart of a crashlooping instance", 5*time.Second, func(st Status) bool { return st.Restarts != n })
}

func TestUnreadyProcessIsKilled(t *testing.T) {
	s, _, _ := newSup(t, "sleep", &fakeAdmin{pingErr: errors.New("refused")}, nil)
	first := waitState(t, s, Starting, time.Second).Process
	st := waitStatus(t, s, "the unready process killed", 5*time.Second, func(st Status) bool { return st.LastExit != nil })
	if st.LastExit.Reason != apitype.ReasonUnready || st.LastExit.Signal != "killed" {
		t.Fatalf("last exit %+v, want unready/killed", st.LastExit)
	}
	if Verify(first, "fake:sleep") == nil {
		t.Fatal("unready process still alive")
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	s, _, _ := newSup(t, "ignore-term", &fakeAdmin{}, nil)
	st := waitState(t, s, Running, 5*time.Second)
	t0 := time.Now()
	if err := s.Stop(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took < 300*time.Millisecond {
		t.Fatalf("stop took %v; SIGTERM should have been ignored until the 300ms timeout", took)
	}
	if Verify(st.Process, "fake:ignore-term") == nil {
		t.Fatal("process survived Stop")
	}
}

func TestShutdownLeavesProcessAndAdoptWatchesIt(t *testing.T) {
	s, _, cancel := newSup(t, "sleep", &fakeAdmin{}, nil)
	st := waitState(t, s, Running, 5*time.Second)
	cancel() // agent shutdown
	<-s.Done()
	if err := Verify(st.Process, "fake:sleep"); err != nil {
		t.Fatalf("agent shutdown killed the process: %v", err)
	}
	// The process is now nobody's child to watch with wait: a new
	// supervisor adopts it and notices its death through the pidfd.
	p := st.Process
	s2, rec, _ := newSup(t, "sleep", &fakeAdmin{alive: true}, func(c *Config) { c.Adopt = &p })
	st2 := waitState(t, s2, Running, 5*time.Second)
	if st2.Process != p || st2.Restarts != 0 {
		t.Fatalf("adopted status %+v, want pid %d and no restart", st2, p.PID)
	}
	// The Ready event is delivered after the state shows Running: wait
	// for it (a loaded machine delays it), then it must be the only one.
	for deadline := time.Now().Add(5 * time.Second); len(rec.kinds()) == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if k := rec.kinds(); len(k) != 1 || k[0] != Ready {
		t.Fatalf("events on adoption = %v, want only Ready (no spawn)", k)
	}
	killed := time.Now()
	syscall.Kill(p.PID, syscall.SIGKILL)
	cur := waitStatus(t, s2, "the adopted process's death noticed and replaced", 5*time.Second, func(cur Status) bool {
		return cur.Restarts == 1 && cur.Process.PID != p.PID && cur.Process.PID != 0
	})
	t.Logf("adopted process's death noticed and replaced after %v", time.Since(killed))
	// Not our child: its exit status is unknown.
	if cur.LastExit.Code != -1 {
		t.Fatalf("last exit %+v: an adopted process's status cannot be known", cur.LastExit)
	}
}

func TestVerifyRejectsMismatches(t *testing.T) {
	self := os.Getpid()
	p, err := identify(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(Process{PID: self, StartTime: p.StartTime + 1}, ""); !IsGone(err) {
		t.Errorf("Verify with a wrong start time = %v, want gone", err)
	}
	if err := Verify(Process{PID: self, StartTime: p.StartTime}, "/not/my/config"); !IsGone(err) {
		t.Errorf("Verify with a wrong config = %v, want gone", err)
	}
	if err := Verify(Process{PID: 0}, ""); !IsGone(err) {
		t.Errorf("Verify pid 0 = %v, want gone", err)
	}
}

func TestStateString(t *testing.T) {
	want := map[State]string{Starting: "starting", Running: "running", Backoff: "backoff", Crashloop: "crashloop", Stopping: "stopping", Stopped: "stopped", State(42): "State(42)"}
	for s, w := range want {
		if s.String() != w {
			t.Errorf("%d.String() = %q, want %q", int(s), s.String(), w)
		}
	}
}

type busyErr struct{}

func (busyErr) Error() string { return "BUSY Redis is busy running a script" }
func (busyErr) Busy() bool    { return true }

func TestHealthChecks(t *testing.T) {
	health := func(c *Config) {
		c.Health = Health{Interval: 10 * time.Millisecond, Timeout: 10 * time.Millisecond, Failures: 3}
	}
	// A process that stops answering is asked to exit (SIGTERM: Redis
	// persists its data on the way out) and killed only when it does not
	// act on it, or cannot (stopped).
	for _, tt := range []struct {
		name, mode string
		stop       bool // SIGSTOP it as well
		wantSignal string
	}{
		{"no answer is a hang, ended gracefully", "sleep", false, ""},
		{"a hang that ignores SIGTERM is killed", "ignore-term", false, "killed"},
		{"a stopped process is killed at once", "sleep", true, "killed"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := &fakeAdmin{}
			s, _, _ := newSup(t, tt.mode, a, func(c *Config) {
				health(c)
				c.StopTimeout = 2 * time.Second
				// Alive until the test says otherwise: the fake's Ping
				// answers a process once (its readiness), and checks
				// failing before the test looks would race it.
				c.Check = func(ctx context.Context, _ int) error {
					if e := a.after.Load(); e != nil {
						return *e
					}
					return nil
				}
			})
			first := waitState(t, s, Running, 5*time.Second).Process
			if tt.stop {
				syscall.Kill(first.PID, syscall.SIGSTOP)
			}
			var noAnswer error = context.DeadlineExceeded
			a.after.Store(&noAnswer)
			t0 := time.Now()
			st := waitStatus(t, s, "the process that stopped answering replaced", 5*time.Second, func(st Status) bool { return st.LastExit != nil })
			took := time.Since(t0)
			if st.LastExit.Reason != apitype.ReasonHung || st.LastExit.Signal != tt.wantSignal || Verify(first, "fake:"+tt.mode) == nil {
				t.Fatalf("last exit %+v; want hung, signal %q, and the process gone", st.LastExit, tt.wantSignal)
			}
			if tt.wantSignal == "killed" && !tt.stop && took < 2*time.Second {
				t.Fatalf("killed %v after the hang began, before the 2 s grace for SIGTERM", took)
			}
			if tt.stop && took > 1500*time.Millisecond {
				t.Fatalf("a stopped process was killed only after %v: it cannot act on SIGTERM", took)
			}
		})
	}
	// Answers that show a live process, checked 20 times (far past 3
	// failures) on a clock the test moves: every check but the last has
	// been judged when the 20th starts, since one starts only once the
	// one before it was.
	alive := func(t *testing.T, e error) {
		t.Helper()
		a := &fakeAdmin{}
		clk := newFakeClock()
		var checks atomic.Int64
		s, _, _ := newSup(t, "sleep", a, func(c *Config) {
			health(c)
			c.Clock = clk
			c.Check = func(ctx context.Context, _ int) error { checks.Add(1); return a.Ping(ctx) }
		})
		waitState(t, s, Running, 5*time.Second)
		a.after.Store(&e)
		from := checks.Load()
		for i := range int64(20) {
			testenv.Eventually(t, "health check "+strconv.FormatInt(i+1, 10), 5*time.Second, func() bool {
				clk.Advance(10 * time.Millisecond) // one interval: a tick, unless a check is in flight
				return checks.Load() > from+i
			})
		}
		if st := s.Status(); st.State != Running || st.Restarts != 0 {
			t.Fatalf("%v answers: status %+v; want running, never restarted", e, st)
		}
	}
	t.Run("an answer that is an error is alive", func(t *testing.T) {
		for _, e := range []error{aliveErr{"ERR max number of clients reached"}, aliveErr{"connection closed by redis-server: EOF"}} {
			alive(t, e)
		}
	})
	t.Run("busy and loading are alive", func(t *testing.T) {
		for _, e := range []error{busyErr{}, loadingErr{}} {
			alive(t, e)
		}
	})
}

type aliveErr struct{ msg string }

func (e aliveErr) Error() string { return e.msg }
func (aliveErr) Alive() bool     { return true }

type loadingErr struct{}

func (loadingErr) Error() string { return "LOADING Redis is loading the dataset in memory" }
func (loadingErr) Loading() bool { return true }

// The process's environment is Config.Env and nothing else: none of the
// agent's own reaches it, and nil is an empty one.
func TestEnvironment(t *testing.T) {
	t.Setenv("REDIS_AGENT_TOKEN", "secret")
	for _, tt := range []struct {
		name string
		env  []string
	}{
		{"Config.Env", []string{"PATH=/usr/bin:/bin", "LANG=C"}},
		{"nil is empty", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, _, _ := newSup(t, "env", &fakeAdmin{}, func(c *Config) { c.Env = tt.env })
			waitState(t, s, Running, 5*time.Second)
			b, err := os.ReadFile(filepath.Join(s.cfg.Dir, "env"))
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			if len(b) > 0 {
				got = strings.Split(string(b), "\n")
			}
			if strings.Join(got, " ") != strings.Join(tt.env, " ") {
				t.Fatalf("the process's environment is %q, want %q", got, tt.env)
			}
		})
	}
}

// fakeNotifier hands the probe a notice the test sends.
type fakeNotifier struct {
	trusted  bool
	ready    chan struct{}
	mu       sync.Mutex
	expected []int
	released int
}

func (n *fakeNotifier) Expect(pid int, binary string, since time.Time) (<-chan struct{}, bool, func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.expected = append(n.expected, pid)
	return n.ready, n.trusted, func() { n.mu.Lock(); n.released++; n.mu.Unlock() }
}

// countingAdmin counts the probe's pings.
type countingAdmin struct {
	*fakeAdmin
	pings atomic.Int32
}

func (a *countingAdmin) Ping(ctx context.Context) error {
	a.pings.Add(1)
	return a.fakeAdmin.Ping(ctx)
}

// A start whose binary has sent READY=1 before is not pinged until its
// notice comes (or a while has passed: a lost notice is not a failed
// start); once it comes, one ping finds it ready. One whose binary never
// has is polled as before, the notice or not.
func TestNoticeOfReadiness(t *testing.T) {
	t.Run("trusted", func(t *testing.T) {
		n := &fakeNotifier{trusted: true, ready: make(chan struct{})}
		admin := &countingAdmin{fakeAdmin: &fakeAdmin{}}
		s, _, _ := newSup(t, "sleep", admin, func(c *Config) {
			c.Notify, c.ReadyTimeout = n, 5*time.Second
			c.Check = func(context.Context, int) error { return nil } // pings of its own
			// No safety ping for as long as the test runs: a ping can
			// only come of the notice, however slow the machine.
			c.noticePoll = func(time.Duration) time.Duration { return time.Hour }
		})
		// The fake server is up within milliseconds, and would answer a
		// ping; none comes before the notice.
		testenv.Eventually(t, "the fake server up", 5*time.Second, func() bool {
			_, err := os.Stat(filepath.Join(s.cfg.Dir, "ready"))
			return err == nil
		})
		time.Sleep(200 * time.Millisecond)
		if p := admin.pings.Load(); p != 0 || s.Status().State != Starting {
			t.Fatalf("%d pings, state %v, before the notice", p, s.Status().State)
		}
		close(n.ready)
		if err := s.WaitReady(t.Context()); err != nil {
			t.Fatal(err)
		}
		if p := admin.pings.Load(); p != 1 {
			t.Fatalf("%d pings to a start that said READY=1, want 1", p)
		}
		testenv.Eventually(t, "the wait released", 5*time.Second, func() bool {
			n.mu.Lock()
			defer n.mu.Unlock()
			return n.released == 1
		})
		n.mu.Lock()
		defer n.mu.Unlock()
		if len(n.expected) != 1 || n.expected[0] != s.Status().Process.PID {
			t.Fatalf("expected %v, pid %d", n.expected, s.Status().Process.PID)
		}
	})
	// A server ready 300 ms after its start: polled all along when its
	// binary is not trusted, pinged a few times only when it is and the
	// notice is lost; ready either way.
	pings := func(t *testing.T, trusted bool) (int32, time.Duration) {
		n := &fakeNotifier{trusted: trusted, ready: make(chan struct{})}
		admin := &countingAdmin{fakeAdmin: &fakeAdmin{}}
		start := time.Now()
		s, _, _ := newSup(t, "slow", admin, func(c *Config) {
			c.Notify, c.ReadyTimeout = n, 5*time.Second
			c.Check = func(context.Context, int) error { return nil }
		})
		if err := s.WaitReady(t.Context()); err != nil {
			t.Fatalf("a start whose notice never came: %v", err)
		}
		return admin.pings.Load(), time.Since(start)
	}
	t.Run("lost", func(t *testing.T) {
		// Pinged at 100, 200, 300, 450, 675 ms... after the spawn, or
		// later (each wait starts after the ping before it): no more
		// pings than that schedule has up to the start's end, however
		// long a busy machine made it.
		p, took := pings(t, true)
		most := int32(0)
		for at := noticePoll(0); at <= took; at += noticePoll(at) {
			most++
		}
		if p > most {
			t.Fatalf("%d pings waiting for a notice in %v, want at most %d", p, took, most)
		}
	})
	t.Run("untrusted", func(t *testing.T) {
		if p, took := pings(t, false); p < 15 {
			t.Fatalf("%d pings of an untrusted start that took %v (ready after 300 ms), want it polled (15 or more)", p, took)
		}
	})
}
