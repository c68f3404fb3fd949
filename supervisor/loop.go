package supervisor

import (
	"context"
	"os/exec"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
)

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

// healthResult is the outcome of one health check of pid.
type healthResult struct {
	pid int
	err error
}

// loop is what Run keeps between the events it handles. Only Run's
// goroutine touches it; the state itself is in Supervisor.status, changed
// only through transition.
type loop struct {
	s *Supervisor
	// cur is the process watched; nil while none runs (backoff, a failed
	// spawn, a Replace whose old process survived SIGKILL).
	cur *running
	// failures is the count of fast failures in a row, for Policy.Decide.
	failures int
	// backoff starts a backed-off instance when it fires.
	backoff Timer
	// Health checks: one in flight at a time (checking), its result on
	// healthRes; healthFails counts failed ones in a row.
	healthRes   chan healthResult
	checking    bool
	healthFails int
	// hungKill sends SIGKILL to a hung process that SIGTERM, sent first
	// because a graceful exit persists its data, has not ended.
	hungKill Timer
}

// Run supervises until Stop is called or ctx is cancelled. Cancelling ctx
// is agent shutdown: the process is left running for the next agent.
func (s *Supervisor) Run(ctx context.Context) {
	defer close(s.done)
	l := &loop{s: s, healthRes: make(chan healthResult, 1)}
	defer l.stopTimers()
	health := s.cfg.Clock.NewTicker(s.cfg.Health.Interval)
	defer health.Stop()

	if a := s.cfg.Adopt; a != nil {
		l.watchAdopted(*a)
	} else if gate := s.cfg.StartGate; gate != nil {
		select {
		case <-gate:
			l.start()
		case <-ctx.Done():
			return
		case req := <-s.stopCh:
			l.onStop(req)
			return
		case req := <-s.restartCh:
			l.onReplace(req)
		}
	} else {
		l.start()
	}
	for {
		var exitC <-chan struct{}
		var readyC <-chan error
		if l.cur != nil {
			exitC, readyC = l.cur.watch.C, l.cur.ready
		}
		select {
		case <-ctx.Done():
			l.onShutdown()
			return
		case req := <-s.stopCh:
			l.onStop(req)
			return
		case req := <-s.restartCh:
			l.onReplace(req)
		case err := <-readyC:
			l.onReady(err)
		case <-exitC:
			l.onExit()
		case <-timerC(l.backoff):
			l.onTimer()
		case <-health.C():
			l.onHealthTick()
		case res := <-l.healthRes:
			l.onHealthResult(res)
		case <-timerC(l.hungKill):
			l.onHungKill()
		}
	}
}

// timerC is t's channel, or nil (never ready) when there is no timer.
func timerC(t Timer) <-chan time.Time {
	if t == nil {
		return nil
	}
	return t.C()
}

// transition moves the state to `to` and applies fn (the fields that
// change with it) in one status update, and returns the new status. An
// edge the package doc's diagram does not have is a bug: it is logged and
// refused (the state stays what it was) while fn still applies, since
// the state is only what the loop reports: what it watches, spawns and
// kills is decided apart from it, so a refused edge leaves no process
// unsupervised.
func (l *loop) transition(to State, fn func(*Status)) Status {
	s := l.s
	from := s.Status().State // the loop is the only writer
	if err := checkTransition(from, to); err != nil {
		s.log.Error("BUG: refusing an illegal state transition; the process stays supervised",
			"from", from.String(), "to", to.String(), "err", err)
		s.illegal(from, to)
		to = from
	}
	return s.update(func(st *Status) {
		if fn != nil {
			fn(st)
		}
		st.State = to
	})
}

// start spawns a process, or backs off when the spawn fails.
func (l *loop) start() {
	s := l.s
	l.stopBackoff()
	r, err := s.spawn()
	if err != nil {
		s.log.Error("spawn redis-server", "err", err)
		ex := &Exit{Time: s.cfg.Clock.Now(), Code: -1, Reason: apitype.ReasonSpawnFailed, Message: err.Error()}
		d := s.cfg.Policy.Decide(l.failures, 0, s.cfg.Rand())
		l.failures = d.Failures
		l.backoff = s.cfg.Clock.NewTimer(max(d.Delay, s.cfg.Policy.Base))
		st := l.transition(backoffState(d), func(st *Status) {
			st.LastExit, st.Process = ex, Process{}
			st.NextStart = s.cfg.Clock.Now().Add(d.Delay)
		})
		s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
		return
	}
	l.watchStarted(r)
}

// takeOver watches cmd, a redis-server the caller started (Handover), as
// if the loop had spawned it.
func (l *loop) takeOver(cmd *exec.Cmd) {
	s := l.s
	l.stopBackoff()
	pid := cmd.Process.Pid
	p, err := identify(pid)
	if err != nil {
		p = Process{PID: pid} // gone already: the watch reaps it
	}
	r := &running{p: p, cmd: cmd, started: s.cfg.Clock.Now()}
	r.watch = watchExit(p)
	s.probe(r, time.Now(), notice{})
	s.log.Info("took over a loaded redis-server", "pid", pid)
	l.watchStarted(r)
}

// watchStarted makes r, just started, the process the loop watches.
func (l *loop) watchStarted(r *running) {
	s := l.s
	l.cur = r
	st := l.transition(Starting, func(st *Status) {
		st.Process, st.StartedAt, st.NextStart = r.p, r.started, time.Time{}
	})
	s.cfg.OnEvent(Event{Kind: Started, Process: r.p, State: st.State, Restarts: st.Restarts, Binary: st.Binary})
}

// watchAdopted watches p, left running by a previous agent, instead of
// spawning one.
func (l *loop) watchAdopted(p Process) {
	l.cur = l.s.adopt(p)
	l.transition(Starting, func(st *Status) { st.Process, st.StartedAt = l.cur.p, l.cur.started })
	l.s.log.Info("adopted redis-server", "pid", l.cur.p.PID)
}

// onShutdown ends the watch and leaves the process running.
func (l *loop) onShutdown() {
	if l.cur != nil {
		l.cur.cancel()
		l.cur.watch.Stop()
	}
}

// onStop stops the process and ends supervision.
func (l *loop) onStop(req stopRequest) {
	l.stopBackoff()
	l.transition(Stopping, nil)
	var err error
	if l.cur != nil {
		l.cur.kind = apitype.ReasonStopped
		err = l.s.terminate(l.cur, req.nosave)
	}
	l.transition(Stopped, func(st *Status) { st.Process = Process{} })
	req.done <- err
}

// onReplace stops the process gracefully, runs req.between, switches to
// req.binary and starts again at once, clearing the backoff.
func (l *loop) onReplace(req restartRequest) {
	s := l.s
	var err error
	if l.cur != nil {
		// Down from here until the new process is spawned (and
		// req.between has run): nobody may read it as running.
		l.transition(Stopping, nil)
		l.cur.kind = apitype.ReasonManual
		err = s.terminate(l.cur, false)
		ex := s.exitOf(l.cur)
		l.cur.cancel()
		l.cur = nil
		st := s.update(func(st *Status) { st.Restarts++; st.LastExit = ex; st.Process = Process{} })
		s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
	}
	l.failures = 0
	if err == nil {
		var berr error
		if req.between != nil {
			berr = req.between()
		}
		if req.binary != "" {
			s.update(func(st *Status) { st.Binary = req.binary })
		}
		if req.next != nil && berr == nil {
			l.takeOver(req.next)
		} else {
			l.start()
		}
		err = berr
	}
	req.done <- err
}

// onReady takes the readiness probe's result: running, or killed as
// unready (its exit then comes through onExit).
func (l *loop) onReady(err error) {
	s, cur := l.s, l.cur
	cur.ready = nil
	if err == nil {
		st := l.transition(Running, nil)
		s.log.Info("redis-server ready", "pid", cur.p.PID, "after", s.cfg.Clock.Now().Sub(cur.started).Round(time.Millisecond))
		s.cfg.OnEvent(Event{Kind: Ready, Process: cur.p, State: st.State, Restarts: st.Restarts})
		return
	}
	s.log.Warn("redis-server not ready, killing it", "pid", cur.p.PID, "err", err)
	cur.kind = apitype.ReasonUnready
	s.kill(cur)
}

// onExit records how the process ended and starts it again, at once or
// after the backoff the policy decides.
func (l *loop) onExit() {
	s := l.s
	l.stopHungKill()
	ex := s.exitOf(l.cur)
	ran := ex.Time.Sub(l.cur.started)
	l.cur.cancel()
	l.cur = nil
	d := s.cfg.Policy.Decide(l.failures, ran, s.cfg.Rand())
	l.failures = d.Failures
	st := l.transition(backoffState(d), func(st *Status) {
		st.Restarts++
		st.LastExit, st.Process = ex, Process{}
		st.NextStart = s.cfg.Clock.Now().Add(d.Delay)
	})
	s.log.Warn("redis-server exited", "code", ex.Code, "signal", ex.Signal, "reason", ex.Reason,
		"ran", ran.Round(time.Millisecond), "restart_in", d.Delay.Round(time.Millisecond), "failures", d.Failures)
	s.cfg.OnEvent(Event{Kind: Exited, Exit: ex, State: st.State, Restarts: st.Restarts})
	if d.Delay == 0 {
		l.start()
	} else {
		l.backoff = s.cfg.Clock.NewTimer(d.Delay)
	}
}

// onTimer starts a backed-off instance.
func (l *loop) onTimer() {
	l.backoff = nil
	l.start()
}

// onHealthTick starts a health check of a running process, unless one is
// in flight.
func (l *loop) onHealthTick() {
	if l.cur == nil || l.cur.ready != nil || l.checking {
		return
	}
	l.checking = true
	check, timeout, res := l.s.cfg.Check, l.s.cfg.Health.Timeout, l.healthRes
	go func(pid int) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		res <- healthResult{pid, check(ctx, pid)}
	}(l.cur.p.PID)
}

// onHealthResult judges a health check: alive, or one more failure; at
// Health.Failures in a row the process hangs and is ended (replaceHung).
func (l *loop) onHealthResult(res healthResult) {
	s, cur := l.s, l.cur
	l.checking = false
	if cur == nil || res.pid != cur.p.PID || cur.kind != "" {
		l.healthFails = 0
		return
	}
	if isAlive(res.err) {
		// It answered, if only with an error or by closing a
		// connection it has no slot for: alive, not hung.
		l.healthFails = 0
		if res.err != nil && !isLoading(res.err) && !isBusy(res.err) {
			s.log.Warn("redis-server answers its health check with an error; alive, left running", "pid", cur.p.PID, "err", res.err)
		}
		return
	}
	l.healthFails++
	s.log.Warn("health check failed", "pid", cur.p.PID, "failures", l.healthFails, "of", s.cfg.Health.Failures, "err", res.err)
	if l.healthFails >= s.cfg.Health.Failures {
		l.healthFails = 0
		cur.kind = apitype.ReasonHung
		s.replaceHung(cur)
		l.hungKill = s.cfg.Clock.NewTimer(s.cfg.StopTimeout)
	}
}

// onHungKill kills a hung process that SIGTERM did not end in StopTimeout.
func (l *loop) onHungKill() {
	l.hungKill = nil
	if cur := l.cur; cur != nil && cur.kind == apitype.ReasonHung {
		l.s.log.Error("hung redis-server did not act on SIGTERM, killing it", "pid", cur.p.PID, "after", l.s.cfg.StopTimeout)
		l.s.kill(cur)
	}
}

func (l *loop) stopBackoff() {
	if l.backoff != nil {
		l.backoff.Stop()
		l.backoff = nil
	}
}

func (l *loop) stopHungKill() {
	if l.hungKill != nil {
		l.hungKill.Stop()
		l.hungKill = nil
	}
}

func (l *loop) stopTimers() {
	l.stopBackoff()
	l.stopHungKill()
}

func backoffState(d Decision) State {
	if d.Crashloop {
		return Crashloop
	}
	return Backoff
}
