// Package supervisor runs and watches one redis-server process per
// instance: it spawns it, waits until it answers PING, notices its exit at
// once (a pidfd through the netpoller), restarts it with backoff, adopts a
// process left running by a previous agent, and stops it gracefully. It
// knows nothing about HTTP or the state store: it reports what happens
// through Config.OnEvent and answers Status.
//
// States:
//
//	            spawn             ready            exit
//	(new) ---> starting -------> running -------> backoff / crashloop
//	              ^                                    |
//	              +---------------(timer)--------------+
//	Stop from any state: stopping -> stopped. Agent shutdown (ctx cancelled)
//	leaves the process running and ends the watch.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/redis"
)

// State is where an instance's process is in its lifecycle.
type State int

// States of the diagram in the package doc.
const (
	Starting State = iota
	Running
	Backoff
	Crashloop
	Stopping
	Stopped
)

var stateNames = [...]string{"starting", "running", "backoff", "crashloop", "stopping", "stopped"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// Exit reasons.
const (
	ReasonCrash   = "crash"   // the process exited or was killed by something else
	ReasonUnready = "unready" // it did not answer PING within the ready timeout
	ReasonManual  = "manual"  // a restart was asked for
	ReasonStopped = "stopped" // Stop was called
	ReasonHung    = "hung"    // it stopped answering PING and was killed
)

// Exit describes how a process ended.
type Exit struct {
	Time time.Time
	// Code is the exit status, or -1 when killed by a signal or unknown (an
	// adopted process is not our child, so its status cannot be read).
	Code int
	// Signal is the signal that killed it ("killed", "terminated", ...).
	Signal string
	Reason string
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
	// Credential, when set, is the user the process runs as.
	Credential *syscall.Credential
	// OOMScoreAdj is written to the process's oom_score_adj after spawn
	// when non-zero, so the kernel prefers it to the agent under pressure.
	OOMScoreAdj int
	Admin       Admin
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
	// Restarts is the restart count so far (persisted by the agent).
	Restarts int
	// OnEvent is called for each event, from the supervisor goroutine. It
	// must not call back into the Supervisor.
	OnEvent func(Event)
	// Classify, when set, may refine an exit's Reason (e.g. "oom" from the
	// cgroup's OOM-kill count) before it is recorded.
	Classify func(*Exit)
	Logger   *slog.Logger
	// Rand returns uniform numbers in [0, 1) for jitter; nil = math/rand.
	Rand func() float64
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
// most of an idle agent's CPU, which the 10 s interval keeps near 5 % of a
// core.
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
}

type stopRequest struct {
	nosave bool
	done   chan error
}

type restartRequest struct {
	binary  string
	between func() error
	done    chan error
}

// New returns a Supervisor for cfg; nothing runs until Run.
func New(cfg Config) *Supervisor {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
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
				return fmt.Errorf("redis-server did not become ready: %s (exit code %d %s)", st.LastExit.Reason, st.LastExit.Code, st.LastExit.Signal)
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
	// A select picks at random among ready cases: an ended ctx must not
	// lose to a ready loop and restart the process anyway.
	if err := ctx.Err(); err != nil {
		return err
	}
	req := restartRequest{binary: binary, between: between, done: make(chan error, 1)}
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

// running is the process the loop currently watches.
type running struct {
	p       Process
	cmd     *exec.Cmd // nil when adopted
	watch   *exitWatch
	started time.Time
	ready   chan error // readiness probe result, buffered
	cancel  func()     // stops the readiness probe
	kind    string     // why it will exit, when the agent caused it
}

// Run supervises until Stop is called or ctx is cancelled. Cancelling ctx
// is agent shutdown: the process is left running for the next agent.
func (s *Supervisor) Run(ctx context.Context) {
	defer close(s.done)
	var (
		cur      *running
		failures int
		timer    *time.Timer
		timerC   <-chan time.Time
	)
	stopTimer := func() {
		if timer != nil {
			timer.Stop()
			timer, timerC = nil, nil
		}
	}
	defer stopTimer()

	// Health checks: one PING in flight at a time, only while running.
	health := time.NewTicker(s.cfg.Health.Interval)
	defer health.Stop()
	type healthResult struct {
		pid int
		err error
	}
	healthRes := make(chan healthResult, 1)
	checking, healthFails := false, 0
	// A hung process gets SIGTERM first (a graceful exit persists its
	// data); this timer sends SIGKILL if it has not gone by then.
	var hungKill *time.Timer
	var hungKillC <-chan time.Time
	defer func() {
		if hungKill != nil {
			hungKill.Stop()
		}
	}()

	start := func() {
		stopTimer()
		r, err := s.spawn()
		if err != nil {
			s.log.Error("spawn redis-server", "err", err)
			ex := &Exit{Time: time.Now(), Code: -1, Reason: "spawn failed: " + err.Error()}
			d := s.cfg.Policy.Decide(failures, 0, s.cfg.Rand())
			failures = d.Failures
			timer = time.NewTimer(max(d.Delay, s.cfg.Policy.Base))
			timerC = timer.C
			st := s.update(func(st *Status) {
				st.State, st.LastExit, st.Process = backoffState(d), ex, Process{}
				st.NextStart = time.Now().Add(d.Delay)
			})
			s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
			return
		}
		cur = r
		st := s.update(func(st *Status) {
			st.State, st.Process, st.StartedAt, st.NextStart = Starting, r.p, r.started, time.Time{}
		})
		s.cfg.OnEvent(Event{Kind: Started, Process: r.p, State: st.State, Restarts: st.Restarts, Binary: st.Binary})
	}

	if a := s.cfg.Adopt; a != nil {
		cur = s.adopt(*a)
		s.update(func(st *Status) { st.State, st.Process, st.StartedAt = Starting, cur.p, cur.started })
		s.log.Info("adopted redis-server", "pid", cur.p.PID)
	} else {
		start()
	}

	for {
		var exitC <-chan struct{}
		var readyC <-chan error
		if cur != nil {
			exitC, readyC = cur.watch.C, cur.ready
		}
		select {
		case <-ctx.Done():
			if cur != nil {
				cur.cancel()
				cur.watch.Stop()
			}
			return

		case req := <-s.stopCh:
			stopTimer()
			s.update(func(st *Status) { st.State = Stopping })
			var err error
			if cur != nil {
				cur.kind = ReasonStopped
				err = s.terminate(cur, req.nosave)
			}
			s.update(func(st *Status) { st.State, st.Process = Stopped, Process{} })
			req.done <- err
			return

		case req := <-s.restartCh:
			var err error
			if cur != nil {
				// Down from here until the new process is spawned (and
				// req.between has run): nobody may read it as running.
				s.update(func(st *Status) { st.State = Stopping })
				cur.kind = ReasonManual
				err = s.terminate(cur, false)
				ex := s.exitOf(cur)
				cur.cancel()
				cur = nil
				st := s.update(func(st *Status) { st.Restarts++; st.LastExit = ex; st.Process = Process{} })
				s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
			}
			failures = 0
			if err == nil {
				var berr error
				if req.between != nil {
					berr = req.between()
				}
				if req.binary != "" {
					s.update(func(st *Status) { st.Binary = req.binary })
				}
				start()
				err = berr
			}
			req.done <- err

		case err := <-readyC:
			cur.ready = nil
			if err == nil {
				st := s.update(func(st *Status) { st.State = Running })
				s.log.Info("redis-server ready", "pid", cur.p.PID, "after", time.Since(cur.started).Round(time.Millisecond))
				s.cfg.OnEvent(Event{Kind: Ready, Process: cur.p, State: st.State, Restarts: st.Restarts})
				continue
			}
			s.log.Warn("redis-server not ready, killing it", "pid", cur.p.PID, "err", err)
			cur.kind = ReasonUnready
			s.kill(cur)

		case <-exitC:
			if hungKill != nil {
				hungKill.Stop()
				hungKill, hungKillC = nil, nil
			}
			ex := s.exitOf(cur)
			ran := ex.Time.Sub(cur.started)
			cur.cancel()
			cur = nil
			d := s.cfg.Policy.Decide(failures, ran, s.cfg.Rand())
			failures = d.Failures
			st := s.update(func(st *Status) {
				st.Restarts++
				st.LastExit, st.Process = ex, Process{}
				st.State = backoffState(d)
				st.NextStart = time.Now().Add(d.Delay)
			})
			s.log.Warn("redis-server exited", "code", ex.Code, "signal", ex.Signal, "reason", ex.Reason,
				"ran", ran.Round(time.Millisecond), "restart_in", d.Delay.Round(time.Millisecond), "failures", d.Failures)
			s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
			if d.Delay == 0 {
				start()
			} else {
				timer = time.NewTimer(d.Delay)
				timerC = timer.C
			}

		case <-timerC:
			timer, timerC = nil, nil
			start()

		case <-health.C:
			if cur == nil || cur.ready != nil || checking {
				continue
			}
			checking = true
			go func(pid int) {
				ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Health.Timeout)
				defer cancel()
				healthRes <- healthResult{pid, s.cfg.Check(ctx, pid)}
			}(cur.p.PID)

		case res := <-healthRes:
			checking = false
			if cur == nil || res.pid != cur.p.PID || cur.kind != "" {
				healthFails = 0
				continue
			}
			if isAlive(res.err) {
				// It answered, if only with an error or by closing a
				// connection it has no slot for: alive, not hung.
				healthFails = 0
				if res.err != nil && !isLoading(res.err) && !isBusy(res.err) {
					s.log.Warn("redis-server answers its health check with an error; alive, left running", "pid", cur.p.PID, "err", res.err)
				}
				continue
			}
			healthFails++
			s.log.Warn("health check failed", "pid", cur.p.PID, "failures", healthFails, "of", s.cfg.Health.Failures, "err", res.err)
			if healthFails >= s.cfg.Health.Failures {
				healthFails = 0
				cur.kind = ReasonHung
				s.replaceHung(cur)
				hungKill = time.NewTimer(s.cfg.StopTimeout)
				hungKillC = hungKill.C
			}

		case <-hungKillC:
			hungKill, hungKillC = nil, nil
			if cur != nil && cur.kind == ReasonHung {
				s.log.Error("hung redis-server did not act on SIGTERM, killing it", "pid", cur.p.PID, "after", s.cfg.StopTimeout)
				s.kill(cur)
			}
		}
	}
}

// replaceHung starts the end of a process that stopped answering: SIGTERM,
// on which Redis saves or fsyncs and exits once its event loop runs again,
// unless the process is stopped (SIGSTOP, a debugger) and cannot act on
// it, when only SIGKILL ends it. The loop sends SIGKILL after StopTimeout
// when SIGTERM was not enough.
func (s *Supervisor) replaceHung(r *running) {
	if state, _, err := procStat(r.p.PID); err == nil && (state == 'T' || state == 't') {
		s.log.Error("redis-server hangs and is stopped, killing it", "pid", r.p.PID)
		s.kill(r)
		return
	}
	s.log.Error("redis-server hangs, asking it to exit (SIGTERM)", "pid", r.p.PID, "kill_after", s.cfg.StopTimeout)
	s.signal(r, syscall.SIGTERM)
}

// isAlive reports whether a health check's result shows a process that
// answered: no error, or an error with an Alive() bool method that returns
// true (an error reply, LOADING, BUSY, no free client slot, a connection
// it closed itself).
func isAlive(err error) bool {
	var a interface{ Alive() bool }
	return err == nil || errors.As(err, &a) && a.Alive() || isLoading(err) || isBusy(err) || isSaturated(err)
}

// isSaturated reports whether a Ping error says the server has no free
// client slot for a new connection (it refused it, or closed it unread):
// it runs, and someone holds them all.
func isSaturated(err error) bool {
	var sat interface{ Saturated() bool }
	var closed interface{ Closed() bool }
	return errors.As(err, &sat) && sat.Saturated() || errors.As(err, &closed) && closed.Closed()
}

func backoffState(d Decision) State {
	if d.Crashloop {
		return Crashloop
	}
	return Backoff
}

// spawn starts redis-server and its readiness probe.
func (s *Supervisor) spawn() (*running, error) {
	logf, err := os.OpenFile(s.cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(s.Status().Binary, s.cfg.ConfPath)
	cmd.Dir = s.cfg.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// A clean environment: nothing of the agent's (tokens included) leaks.
	cmd.Env = redis.Env
	// Its own process group: a Ctrl-C or a signal to the agent's group
	// must not reach Redis. No Pdeathsig: Redis outlives the agent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: s.cfg.Credential}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	started := time.Now()
	pid := cmd.Process.Pid
	p, err := identify(pid)
	if err != nil {
		// It died at once; still a child, so reap it below via the watch.
		p = Process{PID: pid}
	}
	if s.cfg.OOMScoreAdj != 0 {
		if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", []byte(strconv.Itoa(s.cfg.OOMScoreAdj)), 0); err != nil {
			s.log.Debug("set oom_score_adj", "pid", pid, "err", err)
		}
	}
	r := &running{p: p, cmd: cmd, started: started}
	r.watch = watchExit(p)
	s.probe(r, started)
	s.log.Info("spawned redis-server", "pid", pid)
	return r, nil
}

// adopt watches a process a previous agent left running.
func (s *Supervisor) adopt(p Process) *running {
	started := p.StartedAt()
	r := &running{p: p, started: started}
	r.watch = watchExit(p)
	s.probe(r, time.Now())
	return r
}

// probe pings until the server answers, the ready timeout passes (LOADING
// does not count against it), or the probe is cancelled.
func (s *Supervisor) probe(r *running, from time.Time) {
	ctx, cancel := context.WithCancel(context.Background())
	r.ready = make(chan error, 1)
	r.cancel = cancel
	go func() {
		wait := time.Millisecond
		deadline := from.Add(s.cfg.ReadyTimeout)
		saturated := false
		for {
			pctx, pcancel := context.WithTimeout(ctx, time.Second)
			err := s.cfg.Admin.Ping(pctx)
			pcancel()
			if err == nil {
				// A first health check before it counts as running, so
				// what it reports (metrics) is this process's from the
				// start. Its result does not decide readiness.
				hctx, hcancel := context.WithTimeout(ctx, s.cfg.Health.Timeout)
				s.cfg.Check(hctx, r.p.PID)
				hcancel()
				r.ready <- nil
				return
			}
			if isLoading(err) || isSaturated(err) {
				// Alive: loading its data, or every client slot taken
				// (an adopted process under a connection flood). Not
				// ready, not to be killed for it.
				if isSaturated(err) && !saturated {
					saturated = true
					s.log.Warn("redis-server refuses new connections (max number of clients reached); waiting", "pid", r.p.PID)
				}
				deadline = time.Now().Add(s.cfg.ReadyTimeout)
			} else if time.Now().After(deadline) {
				r.ready <- fmt.Errorf("no PONG after %v: %w", s.cfg.ReadyTimeout, err)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-r.watch.C:
				return
			case <-time.After(wait):
			}
			// Poll every millisecond while a start is still plausible
			// (redis-server answers ~8 ms after exec), then back off.
			if time.Since(from) > 100*time.Millisecond {
				wait = min(wait*2, 50*time.Millisecond)
			}
		}
	}()
}

// isBusy reports whether a Ping error says the server is alive but busy
// running a script: the error has a Busy() bool method that returns true.
func isBusy(err error) bool {
	var b interface{ Busy() bool }
	return errors.As(err, &b) && b.Busy()
}

// isLoading reports whether a Ping error says the server is alive but
// loading its data set: the error (or one it wraps) has a Loading() bool
// method that returns true.
func isLoading(err error) bool {
	var l interface{ Loading() bool }
	return errors.As(err, &l) && l.Loading()
}

// exitOf reaps a child that has exited and describes how it ended.
func (s *Supervisor) exitOf(r *running) *Exit {
	ex := &Exit{Time: time.Now(), Code: -1, Reason: ReasonCrash}
	if r.kind != "" {
		ex.Reason = r.kind
	}
	if r.cmd != nil {
		_ = r.cmd.Wait() // the process has exited: this only reaps it
		if ps := r.cmd.ProcessState; ps != nil {
			if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				ex.Signal = ws.Signal().String()
			} else {
				ex.Code = ps.ExitCode()
			}
		}
	}
	if s.cfg.Classify != nil {
		s.cfg.Classify(ex)
	}
	return ex
}

// signal sends sig to r's process if it still is r's process.
func (s *Supervisor) signal(r *running, sig syscall.Signal) {
	if r.cmd != nil {
		// Our unreaped child: its pid cannot have been reused.
		_ = r.cmd.Process.Signal(sig)
		return
	}
	if err := Verify(r.p, s.cfg.ConfPath); err != nil {
		s.log.Warn("not signalling adopted process", "pid", r.p.PID, "err", err)
		return
	}
	_ = syscall.Kill(r.p.PID, sig)
}

func (s *Supervisor) kill(r *running) { s.signal(r, syscall.SIGKILL) }

// terminate stops r gracefully and waits for it to exit: SHUTDOWN over the
// admin connection, SIGTERM if that did not work, SIGKILL after StopTimeout.
func (s *Supervisor) terminate(r *running, nosave bool) error {
	r.cancel()
	deadline := time.NewTimer(s.cfg.StopTimeout)
	defer deadline.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StopTimeout/2)
	err := s.cfg.Admin.Shutdown(ctx, nosave)
	cancel()
	if err != nil {
		s.log.Info("SHUTDOWN failed, sending SIGTERM", "err", err)
		s.signal(r, syscall.SIGTERM)
	}
	select {
	case <-r.watch.C:
	case <-deadline.C:
		s.log.Warn("redis-server did not stop in time, killing it", "pid", r.p.PID, "timeout", s.cfg.StopTimeout)
		s.kill(r)
		select {
		case <-r.watch.C:
		case <-time.After(5 * time.Second):
			return fmt.Errorf("pid %d survived SIGKILL", r.p.PID)
		}
	}
	if r.cmd != nil {
		_ = r.cmd.Wait()
	}
	return nil
}
