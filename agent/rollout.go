package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
	"github.com/redis-agent/redis-agent/volumes"
)

// rollout is the Service's rollout state.
type rollout struct {
	mu     sync.Mutex
	status Rollout
	// versions caches `--version` by binary identity.
	versions map[string]redis.Version
}

// binaryTarget is a redis-server executable and what identifies its file.
type binaryTarget struct {
	path, id string
	version  redis.Version
}

// binaryID identifies the file at path (following symlinks): device,
// inode, size and modification time. A package upgrade that replaces the
// file in place changes it.
func binaryID(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Sprintf("%d:%d", fi.Size(), fi.ModTime().UnixNano()), nil
	}
	return fmt.Sprintf("%d:%d:%d:%d", st.Dev, st.Ino, fi.Size(), fi.ModTime().UnixNano()), nil
}

// target returns the configured binary with its identity and version.
func (s *Service) target(ctx context.Context) (binaryTarget, error) {
	path := s.cfg.RedisServer
	id, err := binaryID(path)
	if err != nil {
		return binaryTarget{}, fmt.Errorf("redis-server %s: %w", path, err)
	}
	s.roll.mu.Lock()
	v, ok := s.roll.versions[id]
	s.roll.mu.Unlock()
	if !ok {
		if v, err = redis.BinaryVersion(ctx, path); err != nil {
			return binaryTarget{}, err
		}
		s.roll.mu.Lock()
		if s.roll.versions == nil {
			s.roll.versions = map[string]redis.Version{}
		}
		s.roll.versions[id] = v
		s.roll.mu.Unlock()
	}
	return binaryTarget{path: path, id: id, version: v}, nil
}

// onTarget reports whether rec's process was started from t.
func (t binaryTarget) onTarget(rec state.Instance) bool {
	return rec.Binary == t.path && rec.BinaryID == t.id
}

// RolloutStatus returns the state of the last rollout, with Pending
// counted now.
func (s *Service) RolloutStatus(ctx context.Context) (Rollout, error) {
	t, err := s.target(ctx)
	if err != nil {
		return Rollout{}, err
	}
	// The state before the records: a rollout that says it is done had
	// written every move before the records are read, so Pending is not
	// counted from a record caught in the middle of one.
	s.roll.mu.Lock()
	st := s.roll.status
	s.roll.mu.Unlock()
	recs, err := s.store.List()
	if err != nil {
		return Rollout{}, err
	}
	if st.State == RolloutIdle || st.State == "" {
		st.State, st.Binary, st.Version = RolloutIdle, t.path, t.version.String()
	}
	st.Pending = len(pending(t, recs, false))
	return st, nil
}

// pending lists the active instances not on t, and those a crash left in
// the middle of a move, in id order. auto leaves out those that already
// failed on t.
func pending(t binaryTarget, recs []state.Instance, auto bool) []string {
	var ids []string
	for _, rec := range recs {
		if rec.Phase != state.PhaseActive || (t.onTarget(rec) && rec.RolloutFrom == "") {
			continue
		}
		if auto && rec.RolloutFailed == t.id {
			continue
		}
		ids = append(ids, rec.ID)
	}
	slices.Sort(ids)
	return ids
}

// StartRollout starts moving every instance not on the configured
// redis-server binary to it, one at a time, in the background, and
// returns the rollout's status. A rollout already running is left alone
// and its status returned.
func (s *Service) StartRollout(ctx context.Context) (Rollout, error) {
	return s.startRollout(ctx, false)
}

// autoRollout is the rollout at agent start. It does not run when an
// instance has already failed on the configured binary: retrying would
// take that instance down at every agent start; POST /v1/rollout does.
func (s *Service) autoRollout(ctx context.Context) {
	st, err := s.startRollout(ctx, true)
	switch {
	case err != nil:
		s.log.Error("rollout", "err", err)
	case st.State == RolloutRunning:
		s.log.Info("rollout started: instances move to the configured redis-server", "binary", st.Binary, "version", st.Version, "instances", st.Total)
	case st.State == RolloutFailed:
		s.log.Warn("rollout not started: an instance failed on this binary before; POST /v1/rollout retries", "binary", st.Binary, "instance", st.FailedInstance)
	}
}

func (s *Service) startRollout(ctx context.Context, auto bool) (Rollout, error) {
	t, err := s.target(ctx)
	if err != nil {
		return Rollout{}, err
	}
	s.roll.mu.Lock()
	defer s.roll.mu.Unlock()
	if s.roll.status.State == RolloutRunning {
		return s.roll.status, nil
	}
	recs, err := s.store.List()
	if err != nil {
		return Rollout{}, err
	}
	ids := pending(t, recs, auto)
	now := time.Now().UTC()
	st := Rollout{State: RolloutRunning, Binary: t.path, Version: t.version.String(), Total: len(ids), Pending: len(ids), StartedAt: &now}
	if auto {
		for _, rec := range recs {
			if rec.Phase == state.PhaseActive && rec.RolloutFailed == t.id {
				st.State, st.FailedInstance, st.Error = RolloutFailed, rec.ID, "failed on this binary in an earlier rollout"
				st.FinishedAt = &now
				s.roll.status = st
				return st, nil
			}
		}
	}
	if len(ids) == 0 {
		st.State, st.FinishedAt = RolloutDone, &now
		s.roll.status = st
		s.pruneKept()
		return st, nil
	}
	s.roll.status = st
	s.background(func() { s.runRollout(t, ids) })
	return st, nil
}

// runRollout moves ids to t one at a time and stops at the first failure.
func (s *Service) runRollout(t binaryTarget, ids []string) {
	set := func(fn func(*Rollout)) {
		s.roll.mu.Lock()
		fn(&s.roll.status)
		s.roll.mu.Unlock()
	}
	finish := func(state, id, msg string) {
		now := time.Now().UTC()
		set(func(r *Rollout) {
			r.State, r.Current, r.FailedInstance, r.Error, r.FinishedAt = state, "", id, msg, &now
		})
	}
	for _, id := range ids {
		if s.ctx.Err() != nil {
			finish(RolloutIdle, "", "the agent stopped; the rollout resumes at its next start")
			return
		}
		set(func(r *Rollout) { r.Current = id })
		down, err := s.moveInstance(s.ctx, id, t)
		if err != nil {
			if s.ctx.Err() != nil {
				finish(RolloutIdle, "", "the agent stopped; the rollout resumes at its next start")
				return
			}
			s.log.Error("rollout stopped: an instance failed on the new redis-server", "instance", id, "binary", t.path, "err", err)
			finish(RolloutFailed, id, err.Error())
			return
		}
		set(func(r *Rollout) {
			r.Moved++
			r.Pending--
			r.MaxUnavailableSeconds = max(r.MaxUnavailableSeconds, down.Seconds())
		})
	}
	s.log.Info("rollout done", "binary", t.path, "version", t.version.String(), "instances", len(ids))
	finish(RolloutDone, "", "")
	s.pruneKept()
}

// moveInstance moves one instance to t: its data persisted (for the aof
// modes an AOF rewrite, so the new process loads a compact file), a
// graceful shutdown, a start on t, a wait for ready. If it does not become
// ready it is started on its old binary again, the failure is recorded,
// and an error returned. It returns how long the instance was down.
//
// The binary to go back to is recorded (RolloutFrom) before the move, so
// a move a crash interrupted is finished by the next rollout: the wait
// for ready, and the way back if need be.
func (s *Service) moveInstance(ctx context.Context, id string, t binaryTarget) (time.Duration, error) {
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Get(id)
	if errors.Is(err, state.ErrNotFound) {
		return 0, nil // deleted meanwhile
	}
	if err != nil {
		return 0, err
	}
	in := s.runtime(id)
	resuming := rec.RolloutFrom != "" && t.onTarget(rec)
	if rec.Phase != state.PhaseActive || in == nil || (t.onTarget(rec) && !resuming) {
		return 0, nil
	}
	log := s.log.With("instance", id)
	fallback := rec.RolloutFrom
	down := time.Now()
	if !resuming {
		status := s.settled(ctx, in)
		if status.State != supervisor.Running {
			// Down for reasons of its own: the new binary is not to blame,
			// and it must not hold up the others. It restarts on t and its
			// restart policy goes on from there.
			if err := in.sup.Replace(ctx, t.path, nil); err != nil {
				return 0, fmt.Errorf("restart on %s: %w", t.path, err)
			}
			log.Warn("moved to the new redis-server while not running", "state", status.State.String(), "binary", t.path)
			return 0, nil
		}
		if apitype.IsAOF(rec.Persistence) {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
			err := in.admin.RewriteAOF(pctx)
			cancel()
			if err != nil {
				return 0, fmt.Errorf("persist before the move: %w", err)
			}
		}
		// Going back to the old binary must not mean going to the new
		// file: when the path was upgraded in place, the old executable
		// lives on only as the running process's, so a copy is kept first.
		fallback = in.sup.Binary()
		if fallback == t.path {
			kept, err := s.keepBinary(status.Process.PID, rec.BinaryID)
			if err != nil {
				return 0, fmt.Errorf("keep a copy of the running redis-server (the file at %s was replaced), to go back to it on a failure: %w", fallback, err)
			}
			fallback = kept
		}
		if _, err := s.store.Update(id, func(r *state.Instance) error { r.RolloutFrom = fallback; return nil }); err != nil {
			return 0, err
		}
		down = time.Now()
		if err := in.sup.Replace(ctx, t.path, nil); err != nil {
			return 0, fmt.Errorf("stop on %s: %w", fallback, err)
		}
	}
	err = s.waitReady(ctx, in)
	if err == nil {
		took := time.Since(down)
		if _, err := s.store.Update(id, func(r *state.Instance) error { r.RolloutFailed, r.RolloutFrom = "", ""; return nil }); err != nil {
			log.Warn("clear rollout state", "err", err)
		}
		log.Info("moved to the new redis-server", "binary", t.path, "version", t.version.String(), "unavailable", took.Round(time.Millisecond))
		if resuming {
			return 0, nil // how long it was down before the crash is unknown
		}
		return took, nil
	}
	tail, _ := volumes.Tail(s.layout.LogPath(id), 3)
	cause := fmt.Errorf("not ready on %s: %w (log: %s)", t.path, err, strings.Join(tail, "; "))
	log.Error("instance failed on the new redis-server; back to the old one", "err", cause, "binary", fallback)
	if _, err := s.store.Update(id, func(r *state.Instance) error { r.RolloutFailed = t.id; return nil }); err != nil {
		log.Warn("record rollout failure", "err", err)
	}
	if err := in.sup.Replace(ctx, fallback, nil); err != nil {
		return 0, fmt.Errorf("%w; and restarting on %s: %w", cause, fallback, err)
	}
	if err := s.waitReady(ctx, in); err != nil {
		return 0, fmt.Errorf("%w; and not ready on %s either: %w", cause, fallback, err)
	}
	if _, err := s.store.Update(id, func(r *state.Instance) error { r.RolloutFrom = ""; return nil }); err != nil {
		log.Warn("clear rollout state", "err", err)
	}
	return 0, cause
}

// keptDir holds copies of redis-server executables that were replaced in
// place while instances ran them: binaries/<identity>/redis-server.
func (s *Service) keptDir() string { return filepath.Join(s.cfg.DataDir, "binaries") }

// keepBinary copies the executable of the running process pid, kept under
// the identity id its file had, and returns the copy's path. /proc/<pid>/exe
// opens the file the process was started from even after its path was
// replaced by a package upgrade. An earlier copy of the same identity is
// reused.
func (s *Service) keepBinary(pid int, id string) (string, error) {
	if pid <= 0 {
		return "", errors.New("no process")
	}
	if id == "" {
		id = fmt.Sprintf("pid-%d", pid)
	}
	dir := filepath.Join(s.keptDir(), strings.ReplaceAll(id, ":", "-"))
	path := filepath.Join(dir, "redis-server")
	if syscall.Access(path, 1 /* X_OK */) == nil {
		return path, nil
	}
	exe, err := os.ReadFile(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return "", err
	}
	for _, d := range []string{s.keptDir(), dir} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return "", err
		}
	}
	if err := volumes.WriteFileAtomic(path, exe, 0o755, volumes.Owner{UID: -1, GID: -1}); err != nil {
		return "", err
	}
	s.log.Info("kept a copy of a redis-server replaced in place, to go back to", "pid", pid, "copy", path)
	return path, nil
}

// pruneKept removes kept executables no instance runs any more.
func (s *Service) pruneKept() {
	entries, err := os.ReadDir(s.keptDir())
	if err != nil {
		return
	}
	recs, err := s.store.List()
	if err != nil {
		return
	}
	used := map[string]bool{}
	for _, rec := range recs {
		used[filepath.Dir(rec.Binary)] = true
		used[filepath.Dir(rec.RolloutFrom)] = true
	}
	for _, e := range entries {
		dir := filepath.Join(s.keptDir(), e.Name())
		if used[dir] {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			s.log.Warn("remove a kept redis-server", "path", dir, "err", err)
		}
	}
}
