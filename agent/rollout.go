package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
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

// rollouts moves instances to the configured redis-server binary, one at
// a time, and keeps the status of the last rollout. Its lock is its own;
// of the Service it uses the store, the per-instance locks (a move holds
// its instance's, like any operation on it) and what rolloutHost offers.
type rollouts struct {
	// binary is the configured redis-server.
	binary string
	// keptDir holds copies of redis-server executables that were replaced
	// in place while instances ran them: <keptDir>/<identity>/redis-server.
	keptDir string
	store   *state.Store
	locks   *keyedMutex
	layout  volumes.Layout
	log     *slog.Logger
	host    rolloutHost

	mu sync.Mutex
	// last is the status of the last rollout.
	last Rollout
	// versions caches `--version` by binary identity.
	versions map[string]redis.Version
}

// RolloutStatus returns the state of the last rollout, with Pending
// counted now.
func (s *Service) RolloutStatus(ctx context.Context) (Rollout, error) {
	return s.roll.status(ctx)
}

// StartRollout starts moving every instance not on the configured
// redis-server binary to it, one at a time, in the background, and
// returns the rollout's status; with instances, only those (a broker's
// upgrade of one tenant). A rollout already running is left alone and its
// status returned.
func (s *Service) StartRollout(ctx context.Context, instances []string) (Rollout, error) {
	for _, id := range instances {
		if err := validateID("instance", id); err != nil {
			return Rollout{}, err
		}
		if _, err := s.store.Get(id); err != nil {
			return Rollout{}, notFound(id, err)
		}
	}
	return s.roll.start(ctx, false, instances...)
}

// AutoRollout is the rollout at agent start, once Reconcile is done: it
// moves the instances still on another binary than the configured one,
// unless one of them already failed on it (POST /v1/rollout retries
// that). It logs what it does and returns at once.
func (s *Service) AutoRollout(ctx context.Context) {
	s.roll.auto(ctx)
}

// rolloutHost is what a rollout needs of the Service.
type rolloutHost interface {
	// runtime returns the supervised instance id, nil when there is none.
	runtime(id string) *instance
	// background runs fn in a goroutine that the Service's Close waits
	// for, with the Service's lifetime; none once Close has begun.
	background(fn func(ctx context.Context))
}

var _ rolloutHost = (*Service)(nil)

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
func (r *rollouts) target(ctx context.Context) (binaryTarget, error) {
	path := r.binary
	id, err := binaryID(path)
	if err != nil {
		return binaryTarget{}, fmt.Errorf("redis-server %s: %w", path, err)
	}
	r.mu.Lock()
	v, ok := r.versions[id]
	r.mu.Unlock()
	if !ok {
		if v, err = redis.BinaryVersion(ctx, path); err != nil {
			return binaryTarget{}, err
		}
		r.mu.Lock()
		if r.versions == nil {
			r.versions = map[string]redis.Version{}
		}
		r.versions[id] = v
		r.mu.Unlock()
	}
	return binaryTarget{path: path, id: id, version: v}, nil
}

// onTarget reports whether rec's process was started from t.
func (t binaryTarget) onTarget(rec state.Instance) bool {
	return rec.Binary == t.path && rec.BinaryID == t.id
}

// status returns the state of the last rollout, with Pending counted now.
func (r *rollouts) status(ctx context.Context) (Rollout, error) {
	t, err := r.target(ctx)
	if err != nil {
		return Rollout{}, err
	}
	// The state before the records: a rollout that says it is done had
	// written every move before the records are read, so Pending is not
	// counted from a record caught in the middle of one.
	r.mu.Lock()
	st := r.last
	r.mu.Unlock()
	recs, err := r.store.List()
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

// auto is the rollout at agent start. It does not run when an instance
// has already failed on the configured binary: retrying would take that
// instance down at every agent start; POST /v1/rollout does.
func (r *rollouts) auto(ctx context.Context) {
	st, err := r.start(ctx, true)
	switch {
	case err != nil:
		r.log.Error("rollout", "err", err)
	case st.State == RolloutRunning:
		r.log.Info("rollout started: instances move to the configured redis-server", "binary", st.Binary, "version", st.Version, "instances", st.Total)
	case st.State == RolloutFailed:
		r.log.Warn("rollout not started: an instance failed on this binary before; POST /v1/rollout retries", "binary", st.Binary, "instance", st.FailedInstance)
	}
}

// start starts moving every pending instance to the configured binary in
// the background and returns the rollout's status; a rollout already
// running is left alone and its status returned. auto (the rollout at
// agent start) runs none when an instance already failed on the binary.
func (r *rollouts) start(ctx context.Context, auto bool, only ...string) (Rollout, error) {
	t, err := r.target(ctx)
	if err != nil {
		return Rollout{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last.State == RolloutRunning {
		return r.last, nil
	}
	recs, err := r.store.List()
	if err != nil {
		return Rollout{}, err
	}
	ids := pending(t, recs, auto)
	if len(only) > 0 {
		ids = slices.DeleteFunc(ids, func(id string) bool { return !slices.Contains(only, id) })
	}
	now := time.Now().UTC()
	st := Rollout{State: RolloutRunning, Binary: t.path, Version: t.version.String(), Total: len(ids), Pending: len(ids), StartedAt: &now}
	if auto {
		for _, rec := range recs {
			if rec.Phase == state.PhaseActive && rec.RolloutFailed == t.id {
				st.State, st.FailedInstance, st.Error = RolloutFailed, rec.ID, "failed on this binary in an earlier rollout"
				st.FinishedAt = &now
				r.last = st
				return st, nil
			}
		}
	}
	if len(ids) == 0 {
		st.State, st.FinishedAt = RolloutDone, &now
		r.last = st
		r.prune()
		return st, nil
	}
	r.last = st
	r.host.background(func(ctx context.Context) { r.run(ctx, t, ids) })
	return st, nil
}

// run moves ids to t one at a time and stops at the first failure, or
// when ctx (the agent) ends.
func (r *rollouts) run(ctx context.Context, t binaryTarget, ids []string) {
	set := func(fn func(*Rollout)) {
		r.mu.Lock()
		fn(&r.last)
		r.mu.Unlock()
	}
	finish := func(state, id, msg string) {
		now := time.Now().UTC()
		set(func(st *Rollout) {
			st.State, st.Current, st.FailedInstance, st.Error, st.FinishedAt = state, "", id, msg, &now
		})
	}
	for _, id := range ids {
		if ctx.Err() != nil {
			finish(RolloutIdle, "", "the agent stopped; the rollout resumes at its next start")
			return
		}
		set(func(st *Rollout) { st.Current = id })
		down, err := r.move(ctx, id, t)
		if err != nil {
			if ctx.Err() != nil {
				finish(RolloutIdle, "", "the agent stopped; the rollout resumes at its next start")
				return
			}
			r.log.Error("rollout stopped: an instance failed on the new redis-server", "instance", id, "binary", t.path, "err", err)
			finish(RolloutFailed, id, err.Error())
			return
		}
		set(func(st *Rollout) {
			st.Moved++
			st.Pending--
			st.MaxUnavailableSeconds = max(st.MaxUnavailableSeconds, down.Seconds())
		})
	}
	r.log.Info("rollout done", "binary", t.path, "version", t.version.String(), "instances", len(ids))
	finish(RolloutDone, "", "")
	r.prune()
}

// move moves one instance to t: its data persisted (for the aof modes an
// AOF rewrite, so the new process loads a compact file), a graceful
// shutdown, a start on t, a wait for ready. If it does not become ready it
// is started on its old binary again, the failure is recorded, and an
// error returned. It returns how long the instance was down.
//
// The binary to go back to is recorded (RolloutFrom) before the move, so
// a move a crash interrupted is finished by the next rollout: the wait
// for ready, and the way back if need be.
func (r *rollouts) move(ctx context.Context, id string, t binaryTarget) (time.Duration, error) {
	unlock := r.locks.lock(id)
	defer unlock()
	rec, err := r.store.Get(id)
	if errors.Is(err, state.ErrNotFound) {
		return 0, nil // deleted meanwhile
	}
	if err != nil {
		return 0, err
	}
	in := r.host.runtime(id)
	resuming := rec.RolloutFrom != "" && t.onTarget(rec)
	if rec.Phase != state.PhaseActive || in == nil || (t.onTarget(rec) && !resuming) {
		return 0, nil
	}
	log := r.log.With("instance", id)
	fallback, down := rec.RolloutFrom, time.Now()
	if !resuming {
		status := in.settled(ctx)
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
		if fallback, down, err = r.switchOver(ctx, in, rec, status.Process.PID, t); err != nil {
			return 0, err
		}
	}
	err = in.waitReady(ctx)
	if err != nil {
		return 0, r.goBack(ctx, in, id, t, fallback, err)
	}
	took := time.Since(down)
	if _, err := r.store.Update(id, func(ri *state.Instance) error { ri.RolloutFailed, ri.RolloutFrom = "", ""; return nil }); err != nil {
		log.Warn("clear rollout state", "err", err)
	}
	log.Info("moved to the new redis-server", "binary", t.path, "version", t.version.String(), "unavailable", took.Round(time.Millisecond))
	if resuming {
		return 0, nil // how long it was down before the crash is unknown
	}
	return took, nil
}

// switchOver persists the running instance in's data, records the binary
// to go back to and replaces its process (pid) with one on t. It returns
// that binary and when the instance went down.
func (r *rollouts) switchOver(ctx context.Context, in *instance, rec state.Instance, pid int, t binaryTarget) (string, time.Time, error) {
	if apitype.IsAOF(rec.Persistence) {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		err := in.admin.RewriteAOF(pctx)
		cancel()
		if err != nil {
			return "", time.Time{}, fmt.Errorf("persist before the move: %w", err)
		}
	}
	// Going back to the old binary must not mean going to the new file:
	// when the path was upgraded in place, the old executable lives on
	// only as the running process's, so a copy is kept first.
	fallback := in.sup.Binary()
	if fallback == t.path {
		kept, err := r.keep(pid, rec.BinaryID)
		if err != nil {
			return "", time.Time{}, fmt.Errorf("keep a copy of the running redis-server (the file at %s was replaced), to go back to it on a failure: %w", fallback, err)
		}
		fallback = kept
	}
	if _, err := r.store.Update(rec.ID, func(ri *state.Instance) error { ri.RolloutFrom = fallback; return nil }); err != nil {
		return "", time.Time{}, err
	}
	down := time.Now()
	if err := in.sup.Replace(ctx, t.path, nil); err != nil {
		return "", time.Time{}, fmt.Errorf("stop on %s: %w", fallback, err)
	}
	return fallback, down, nil
}

// goBack records that instance id did not become ready on t (notReady
// says why), starts it on fallback again and returns the cause.
func (r *rollouts) goBack(ctx context.Context, in *instance, id string, t binaryTarget, fallback string, notReady error) error {
	log := r.log.With("instance", id)
	tail, _ := volumes.Tail(r.layout.LogPath(id), 3)
	cause := fmt.Errorf("not ready on %s: %w (log: %s)", t.path, notReady, strings.Join(tail, "; "))
	log.Error("instance failed on the new redis-server; back to the old one", "err", cause, "binary", fallback)
	if _, err := r.store.Update(id, func(ri *state.Instance) error { ri.RolloutFailed = t.id; return nil }); err != nil {
		log.Warn("record rollout failure", "err", err)
	}
	if err := in.sup.Replace(ctx, fallback, nil); err != nil {
		return fmt.Errorf("%w; and restarting on %s: %w", cause, fallback, err)
	}
	if err := in.waitReady(ctx); err != nil {
		return fmt.Errorf("%w; and not ready on %s either: %w", cause, fallback, err)
	}
	if _, err := r.store.Update(id, func(ri *state.Instance) error { ri.RolloutFrom = ""; return nil }); err != nil {
		log.Warn("clear rollout state", "err", err)
	}
	return cause
}

// keep copies the executable of the running process pid, kept under the
// identity id its file had, and returns the copy's path. /proc/<pid>/exe
// opens the file the process was started from even after its path was
// replaced by a package upgrade. An earlier copy of the same identity is
// reused.
func (r *rollouts) keep(pid int, id string) (string, error) {
	if pid <= 0 {
		return "", errors.New("no process")
	}
	if id == "" {
		id = fmt.Sprintf("pid-%d", pid)
	}
	dir := filepath.Join(r.keptDir, strings.ReplaceAll(id, ":", "-"))
	path := filepath.Join(dir, "redis-server")
	if syscall.Access(path, 1 /* X_OK */) == nil {
		return path, nil
	}
	exe, err := os.ReadFile(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return "", err
	}
	for _, d := range []string{r.keptDir, dir} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return "", err
		}
	}
	if err := volumes.WriteFileAtomic(path, exe, 0o755, volumes.Owner{UID: -1, GID: -1}); err != nil {
		return "", err
	}
	r.log.Info("kept a copy of a redis-server replaced in place, to go back to", "pid", pid, "copy", path)
	return path, nil
}

// prune removes kept executables no instance runs any more.
func (r *rollouts) prune() {
	entries, err := os.ReadDir(r.keptDir)
	if err != nil {
		return
	}
	recs, err := r.store.List()
	if err != nil {
		return
	}
	used := map[string]bool{}
	for _, rec := range recs {
		used[filepath.Dir(rec.Binary)] = true
		used[filepath.Dir(rec.RolloutFrom)] = true
	}
	for _, e := range entries {
		dir := filepath.Join(r.keptDir, e.Name())
		if used[dir] {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			r.log.Warn("remove a kept redis-server", "path", dir, "err", err)
		}
	}
}

// versionOf is the Redis version rec's process runs, when the agent has
// asked its binary (the configured one's is asked for every capacity and
// rollout); "" when unknown.
func (r *rollouts) versionOf(rec state.Instance) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if v, ok := r.versions[rec.BinaryID]; ok && rec.BinaryID != "" {
		return v.Version
	}
	return ""
}
