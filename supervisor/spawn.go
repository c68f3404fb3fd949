package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/procfs"
)

// spawn starts redis-server and its readiness probe.
func (s *Supervisor) spawn() (*running, error) {
	logf, err := os.OpenFile(s.cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(s.Status().Binary, s.cfg.ConfPath)
	if s.cfg.Command != nil {
		if cmd, err = s.cfg.Command(s.Status().Binary, s.cfg.ConfPath); err != nil {
			return nil, fmt.Errorf("prepare the start: %w", err)
		}
	}
	var cred *syscall.Credential
	if cmd.SysProcAttr != nil {
		cred = cmd.SysProcAttr.Credential
	}
	cmd.Dir = s.cfg.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// A clean environment: nothing of the agent's (tokens included)
	// leaks. Never nil, which would be the agent's; what Command set (the
	// launcher's own) stays.
	cmd.Env = append(append([]string{}, cmd.Env...), s.cfg.Env...)
	// Its own session (and so process group): a Ctrl-C or a signal to the
	// agent's group must not reach Redis, and Redis may not send the
	// agent the SIGCONT Linux lets through within a session. No
	// Pdeathsig: Redis outlives the agent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: cred}
	forked := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	// started is on the loop's clock (the restart policy judges the run);
	// the readiness probe waits in real time from now.
	started, now := s.cfg.Clock.Now(), time.Now()
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
	var note notice
	if s.cfg.Notify != nil {
		note.ready, note.trusted, note.release = s.cfg.Notify.Expect(pid, s.Status().Binary, forked)
	}
	s.probe(r, now, note)
	s.log.Info("spawned redis-server", "pid", pid)
	return r, nil
}

// adopt watches a process a previous agent left running.
func (s *Supervisor) adopt(p Process) *running {
	started := p.StartedAt()
	r := &running{p: p, started: started}
	r.watch = watchExit(p)
	s.probe(r, time.Now(), notice{})
	return r
}

// notice is a spawned process's readiness notification, if one may come.
type notice struct {
	ready   <-chan struct{} // nil: none will
	trusted bool            // its binary has sent one before
	release func()
}

// probe pings until the server answers, the ready timeout passes (LOADING
// does not count against it), or the probe is cancelled. With a notice
// from a binary that has sent one before, it waits for the notice and
// pings then, and meanwhile only now and then (a LOADING answer keeps
// the timeout off; a notice lost would cost half the start's time at
// most): a thousand starts at once cost the agent a quarter of its CPU in
// connections refused when each was polled.
func (s *Supervisor) probe(r *running, from time.Time, note notice) {
	ctx, cancel := context.WithCancel(context.Background())
	r.ready = make(chan error, 1)
	r.cancel = cancel
	go func() {
		if note.release != nil {
			defer note.release()
		}
		// The first ping waits for the notice, when it is to be trusted.
		if note.trusted && note.ready != nil && !s.waitProbe(ctx, r, &note, s.cfg.noticePoll(0)) {
			return
		}
		deadline := from.Add(s.cfg.ReadyTimeout)
		saturated, held := false, false
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
			if isLoading(err) || isSaturated(err) || isHeld(err) {
				// Alive: loading its data, every client slot taken (an
				// adopted process under a connection flood), or held by
				// a client's CLIENT PAUSE (an adopted process too). Not
				// ready, not to be killed for it.
				if isSaturated(err) && !saturated {
					saturated = true
					s.log.Warn("redis-server refuses new connections (max number of clients reached); waiting", "pid", r.p.PID)
				}
				if isHeld(err) && !held {
					held = true
					s.log.Warn("redis-server answers new connections but holds every command (a client's CLIENT PAUSE); waiting", "pid", r.p.PID)
				}
				deadline = time.Now().Add(s.cfg.ReadyTimeout)
			} else if time.Now().After(deadline) {
				r.ready <- fmt.Errorf("no PONG after %v: %w", s.cfg.ReadyTimeout, err)
				return
			}
			// Poll every twentieth of the time the start has taken so far
			// (every millisecond while it is still plausible: redis-server
			// answers ~8 ms after exec), so that its answer, or the end
			// of a load, is seen within 5 % of its time, at most every
			// 50 ms: a machine starting a thousand at once spends its CPU
			// on the starts, not on connections refused.
			wait := min(max(time.Since(from)/20, time.Millisecond), 50*time.Millisecond)
			if note.trusted && note.ready != nil {
				wait = s.cfg.noticePoll(time.Since(from))
			}
			if !s.waitProbe(ctx, r, &note, wait) {
				return
			}
		}
	}()
}

// waitProbe waits wait, or less when the notice comes (after which
// there is none to wait for); false when the probe is to end (cancelled,
// or the process exited).
func (s *Supervisor) waitProbe(ctx context.Context, r *running, note *notice, wait time.Duration) bool {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-r.watch.C:
		return false
	case <-note.ready:
		note.ready = nil
	case <-t.C:
	}
	return true
}

// noticePoll is the wait between two pings of a start that a notice is
// expected of, elapsed into it: half of that, from 100 ms to 1 s.
func noticePoll(elapsed time.Duration) time.Duration {
	return min(max(elapsed/2, 100*time.Millisecond), time.Second)
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

// isHeld reports whether a Ping error says the server answers new
// connections but not commands: a client's CLIENT PAUSE holds them until
// it ends.
func isHeld(err error) bool {
	var h interface{ Held() bool }
	return errors.As(err, &h) && h.Held()
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
	ex := &Exit{Time: s.cfg.Clock.Now(), Code: -1, Reason: apitype.ReasonCrash}
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
	// A server that answers but refuses (it is writing its first AOF
	// after a replica's sync, say) is asked again until it can.
	for err != nil && isAlive(err) && !isSaturated(err) && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
		err = s.cfg.Admin.Shutdown(ctx, nosave)
	}
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

// replaceHung starts the end of a process that stopped answering: SIGTERM,
// on which Redis saves or fsyncs and exits once its event loop runs again,
// unless the process is stopped (SIGSTOP, a debugger) and cannot act on
// it, when only SIGKILL ends it. The loop sends SIGKILL after StopTimeout
// when SIGTERM was not enough.
func (s *Supervisor) replaceHung(r *running) {
	if st, err := procfs.ReadStat(r.p.PID); err == nil && (st.State == 'T' || st.State == 't') {
		s.log.Error("redis-server hangs and is stopped, killing it", "pid", r.p.PID)
		s.kill(r)
		return
	}
	s.log.Error("redis-server hangs, asking it to exit (SIGTERM)", "pid", r.p.PID, "kill_after", s.cfg.StopTimeout)
	s.signal(r, syscall.SIGTERM)
}
