// Package supervisor runs and watches one redis-server process per
// instance: it spawns it, waits until it answers PING, notices its exit at
// once (a pidfd through the netpoller), restarts it with backoff, adopts a
// process left running by a previous agent, and stops it gracefully. It
// knows nothing about HTTP or the state store: it reports what happens
// through Config.OnEvent and answers Status. Its exit reasons and the
// names of its states are the API's (package apitype), so the agent shows
// them as they are.
//
// States, and every move between them:
//
//	                spawn, adopt            ready
//	  (new) ------> starting -------------> running
//	                 ^   |                    |
//	         timer,  |   | exit, or a         | exit: crash, hung
//	        Replace  |   | failed spawn       |
//	                 |   v                    v
//	                 +-- backoff / crashloop <+
//	                       |      ^
//	                       +------+ a spawn fails again
//
//	Replace:  starting, running -> stopping -> starting, or backoff /
//	          crashloop when the spawn fails; stopping stays when the old
//	          process survives SIGKILL (nothing runs then; Stop or Replace
//	          again). From backoff or crashloop, no process to stop:
//	          straight to starting (or, the spawn failing, backoff /
//	          crashloop again).
//	Stop:     any state, stopping included -> stopping -> stopped.
//	Agent shutdown (ctx cancelled) leaves the process running and ends
//	the watch, in whatever state.
//
// (new) is starting already (New reports it), so the first spawn or
// adoption is starting -> starting. After a first exit the policy gives
// no delay: backoff lasts no time and the loop spawns at once.
//
// The same edges as a table, which is what the loop's transition allows
// (any other move is logged as a bug and refused):
//
//	from       to
//	starting   starting running backoff crashloop stopping
//	running    backoff crashloop stopping
//	backoff    starting backoff crashloop stopping
//	crashloop  starting backoff crashloop stopping
//	stopping   starting backoff crashloop stopping stopped
//	stopped
//
// Files: supervisor.go is the package's face (types, Config, New, Status
// and the requests to the loop), state.go the states and their edges,
// loop.go Run and its handlers, spawn.go the process itself (spawning,
// adoption, probing, signals), proc.go and watch.go what /proc and pidfds
// say about it, policy.go the restart policy, clock.go the clock that
// times the policy and the health checks.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os/exec"
	"sync"
	"time"
)

// Exit describes how a process ended.
type Exit struct {
	Time time.Time
	// Code is the exit status, or -1 when killed by a signal or unknown (an
	// adopted process is not our child, so its status cannot be read).
	Code int
	// Signal is the signal that killed it ("killed", "terminated", ...).
	Signal string
	// Reason is one of apitype's Reason* values: crash, unready, manual
	// (Restart, Replace), stopped (Stop), hung, spawn_failed, or what
	// Config.Classify makes of it.
	Reason string
	// Message says more where the reason alone does not: the error of a
	// spawn that failed.
	Message string
}

// String is the reason, with the message when there is one.
func (e *Exit) String() string {
	if e.Message != "" {
		return e.Reason + ": " + e.Message
	}
	return e.Reason
}

// Admin is the part of the Redis admin client the supervisor needs.
type Admin interface {
	// Ping returns nil when the server is ready.
	Ping(ctx context.Context) error
	// Shutdown asks the server to exit, without saving when nosave.
	Shutdown(ctx context.Context, nosave bool) error
}

// EventKind says what happened.
type EventKind int

// Event kinds.
const (
	// Started: a process was spawned (Process is set). The agent persists
	// it before anything else, so a new agent can adopt it.
	Started EventKind = iota
	// Ready: the process answers PING.
	Ready
	// Exited: the process ended (Exit is set).
	Exited
)

// Event is reported through Config.OnEvent, from the supervisor's goroutine.
type Event struct {
	Kind    EventKind
	Process Process
	Exit    *Exit
	// State after the event.
	State State
	// Restarts is the restart count after the event.
	Restarts int
	// Binary is the executable a Started process runs.
	Binary string
}

// Config is what a Supervisor needs to run one instance.
type Config struct {
	// Binary is the redis-server executable.
	Binary string
	// ConfPath is the instance's redis.conf, the only argument.
	ConfPath string
	// Dir is the working directory of the process.
	Dir string
	// LogPath receives the process's stdout and stderr (Redis logs there
	// until it has read its config, then to its own logfile).
	LogPath string
	// Command, when set, makes the command that runs Binary with ConfPath
	// before each start: the launcher that confines it, and the user it
	// runs as in SysProcAttr.Credential (the supervisor adds the rest of
	// SysProcAttr; an Env it sets comes before Env, for the launcher's
	// own). Its error fails the start like an exec that fails.
	// Nil runs Binary ConfPath as the agent's own user.
	Command func(binary, conf string) (*exec.Cmd, error)
	// Env is the process's whole environment (the agent passes
	// redis.Env). Nil is an empty one: nothing of the agent's own
	// environment, its API token included, ever reaches the process.
	Env []string
	// OOMScoreAdj is written to the process's oom_score_adj after spawn
	// when non-zero, so the kernel prefers it to the agent under pressure.
	OOMScoreAdj int
	Admin       Admin
	// Notify, when set, tells the readiness probe of a spawned process's
	// READY=1 (sd_notify), so that it need not poll the process with
	// connections while it starts; Env must point the process at it.
	Notify Notifier
	// Check is the periodic health check of a running process, given its
	// pid; nil means Admin.Ping. Its error is judged like Ping's.
	Check  func(ctx context.Context, pid int) error
	Policy Policy
	// ReadyTimeout bounds the wait for the first PONG after a spawn (time
	// spent loading the data set, answered with LOADING, does not count).
	ReadyTimeout time.Duration
	// StopTimeout bounds a graceful stop before SIGKILL.
	StopTimeout time.Duration
	// Health checks a running process: a PING every Interval, failing
	// after Timeout; Failures failures in a row mean it hangs, and it is
	// killed and restarted. LOADING and BUSY (a long script) answers are
	// alive. Zero values mean DefaultHealth.
	Health Health
	// Adopt, when set, is a live process from a previous agent to watch
	// instead of spawning one. It must have been checked with Verify.
	Adopt *Process
	// StartGate, when set, holds the first spawn until it is closed (the
	// agent's order of starts at boot): Run waits for it, as starting with
	// no process, and a Stop or Replace meanwhile is served (a Replace
	// spawns at once).
	StartGate <-chan struct{}
	// Restarts is the restart count so far (persisted by the agent).
	Restarts int
	// OnEvent is called for each event, from the supervisor goroutine. It
	// must not call back into the Supervisor.
	OnEvent func(Event)
	// Classify, when set, may refine an exit's Reason (apitype.ReasonOOM
	// from the cgroup's OOM-kill count) before it is recorded.
	Classify func(*Exit)
	Logger   *slog.Logger
	// Rand returns uniform numbers in [0, 1) for jitter; nil = math/rand.
	Rand func() float64
	// Clock times the restart policy and the health checks; nil is the
	// real clock.
	Clock Clock

	// noticePoll, set by tests only, replaces the package's noticePoll:
	// the wait between two pings of a start a notice is expected of.
	noticePoll func(elapsed time.Duration) time.Duration
}

// Notifier is where a spawned process's readiness notification comes
// from (package sdnotify).
type Notifier interface {
	// Expect waits for the READY=1 of process pid, which binary started
	// at since: ready is closed when it comes, trusted tells that binary
	// has sent one before, and release ends the wait.
	Expect(pid int, binary string, since time.Time) (ready <-chan struct{}, trusted bool, release func())
}

// Health configures hang detection.
type Health struct {
	Interval time.Duration
	Timeout  time.Duration
	Failures int
}

// DefaultHealth kills a process only after 14 to 24 s without an answer
// (two failed checks 10 s apart, each waiting 4 s): long enough for a
// legitimately slow command, and a Lua script past busy-reply-threshold
// answers BUSY, which counts as alive. At 1000 instances the checks are
// most of an idle agent's CPU: the 10 s interval, and the ticks every
// supervisor's ticker shares (Clock.NewTicker), so that they come in one
// burst a round, keep it near 1 % of a core.
func DefaultHealth() Health {
	return Health{Interval: 10 * time.Second, Timeout: 4 * time.Second, Failures: 2}
}

// Status is a snapshot of a supervised instance.
type Status struct {
	State     State
	Process   Process
	StartedAt time.Time
	Restarts  int
	LastExit  *Exit
	// NextStart is when a backed-off instance starts again.
	NextStart time.Time
	// Binary is the redis-server executable the next start runs (and the
	// current process ran, unless Replace changed it since).
	Binary string
}

// Supervisor watches one instance. Create it with New and call Run once.
type Supervisor struct {
	cfg Config
	log *slog.Logger

	stopCh    chan stopRequest
	restartCh chan restartRequest
	done      chan struct{}

	mu      sync.Mutex
	status  Status
	changed chan struct{} // closed and replaced on every status change

	// illegal is called when the loop refused an illegal transition,
	// after logging it: illegalTransition, unless a test sets its own.
	illegal func(from, to State)
}

// illegalTransition does nothing in the agent: a refused transition has
// been logged, and the loop goes on watching its process. Tests make it
// panic.
var illegalTransition = func(from, to State) {}

type stopRequest struct {
	nosave bool
	done   chan error
}

type restartRequest struct {
	binary  string
	between func() error
	// next, when set, is the process to watch after between instead of
	// one to spawn (Handover).
	next *exec.Cmd
	done chan error
}

// New returns a Supervisor for cfg; nothing runs until Run.
func New(cfg Config) *Supervisor {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.Clock == nil {
		cfg.Clock = realClock{}
	}
	if cfg.noticePoll == nil {
		cfg.noticePoll = noticePoll
	}
	if cfg.Env == nil {
		// Not nil: exec gives a nil Env the agent's environment.
		cfg.Env = []string{}
	}
	if cfg.OnEvent == nil {
		cfg.OnEvent = func(Event) {}
	}
	if cfg.Check == nil {
		cfg.Check = func(ctx context.Context, _ int) error { return cfg.Admin.Ping(ctx) }
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	if d := DefaultHealth(); cfg.Health.Interval <= 0 || cfg.Health.Timeout <= 0 || cfg.Health.Failures <= 0 {
		cfg.Health = d
	}
	st := Status{State: Starting, Restarts: cfg.Restarts, Binary: cfg.Binary}
	if cfg.Adopt != nil {
		// Known from the start, so Status never shows an adopted instance
		// without its process.
		st.Process, st.StartedAt = *cfg.Adopt, cfg.Adopt.StartedAt()
	}
	return &Supervisor{
		cfg:       cfg,
		log:       cfg.Logger,
		stopCh:    make(chan stopRequest),
		restartCh: make(chan restartRequest),
		done:      make(chan struct{}),
		status:    st,
		changed:   make(chan struct{}),
		illegal:   illegalTransition,
	}
}

// Status returns the current status.
func (s *Supervisor) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Done is closed when Run has returned.
func (s *Supervisor) Done() <-chan struct{} { return s.done }

func (s *Supervisor) update(fn func(*Status)) Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(&s.status)
	close(s.changed)
	s.changed = make(chan struct{})
	return s.status
}

// WaitReady waits until the process answers PING. It fails as soon as the
// first start fails (the process exits or does not become ready), or when
// ctx ends.
func (s *Supervisor) WaitReady(ctx context.Context) error {
	for {
		s.mu.Lock()
		st, ch := s.status, s.changed
		s.mu.Unlock()
		switch st.State {
		case Running:
			return nil
		case Backoff, Crashloop:
			if st.LastExit != nil {
				return fmt.Errorf("redis-server did not become ready: %s (exit code %d %s)", st.LastExit, st.LastExit.Code, st.LastExit.Signal)
			}
			return errors.New("redis-server did not become ready")
		case Stopping, Stopped:
			return errors.New("instance is stopping")
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Stop stops the process gracefully (SHUTDOWN, then SIGTERM, then SIGKILL
// after StopTimeout) and ends Run. With nosave nothing is persisted first.
func (s *Supervisor) Stop(ctx context.Context, nosave bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	req := stopRequest{nosave: nosave, done: make(chan error, 1)}
	select {
	case s.stopCh <- req:
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Restart stops the process gracefully (persisting its data) and starts it
// again at once, clearing any backoff. It returns once the new process is
// spawned; use WaitReady to wait for it to answer.
func (s *Supervisor) Restart(ctx context.Context) error {
	return s.Replace(ctx, "", nil)
}

// Replace is Restart with two changes in the gap between the processes:
// between, when set, runs while none runs (the data directory may be
// swapped then), and binary, when set, is what the new process and every
// later restart run. An error from between is returned after the start, so
// the instance is never left down: the caller undoes its change and
// replaces again.
func (s *Supervisor) Replace(ctx context.Context, binary string, between func() error) error {
	return s.request(ctx, restartRequest{binary: binary, between: between, done: make(chan error, 1)})
}

// Handover is Replace with a process the caller started instead of a
// spawn: a redis-server on the instance's config that has loaded its data
// already (a restore's, in a staged data directory), so the instance is
// down only from the old process's stop to the end of between, which
// moves next onto the instance's ports and data directory. next must not
// have been waited for; from a nil between error on it is the
// supervisor's, which reaps it. On an error from between next stays the
// caller's, who must have stopped it, and the supervisor spawns a process
// as Replace does.
func (s *Supervisor) Handover(ctx context.Context, next *exec.Cmd, between func() error) error {
	return s.request(ctx, restartRequest{between: between, next: next, done: make(chan error, 1)})
}

// request hands the loop req and waits for its answer.
func (s *Supervisor) request(ctx context.Context, req restartRequest) error {
	// A select picks at random among ready cases: an ended ctx must not
	// lose to a ready loop and restart the process anyway.
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case s.restartCh <- req:
	case <-s.done:
		return errors.New("supervisor is not running")
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Binary returns the redis-server executable the supervisor starts.
func (s *Supervisor) Binary() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status.Binary
}
