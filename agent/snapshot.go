package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/confine"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
	"github.com/redis-agent/redis-agent/volumes"
)

// Snapshot is a fresh RDB of an instance, open for reading from its start.
type Snapshot struct {
	// File is the RDB; the caller closes it. It may already be unlinked.
	File *os.File
	Size int64
	// SHA256 is the hex sha256 of the file's content.
	SHA256 string
}

// rdbName is the file BGSAVE writes in the data directory (redis.conf's
// dbfilename).
const rdbName = "dump.rdb"

// Snapshot makes a fresh, consistent RDB of instance id (BGSAVE through
// the admin user, waited for) and returns it open. Snapshots of one
// instance are taken one at a time. It works in every persistence mode:
// where the RDB is not the instance's own persistence (aof, aof-always,
// none) the file is unlinked once open, so none is left to be loaded at a
// later start.
func (s *Service) Snapshot(ctx context.Context, id string) (*Snapshot, error) {
	if err := validateID("instance", id); err != nil {
		return nil, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	start := time.Now()
	rec, in, err := s.runningInstance(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := in.admin.Save(ctx); err != nil {
		return nil, fmt.Errorf("snapshot %q: %w", id, err)
	}
	path := filepath.Join(s.layout.DataDir(id), rdbName)
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("snapshot %q: %w", id, err)
	}
	if rec.Persistence != apitype.PersistenceRDB {
		if err := os.Remove(path); err != nil {
			s.log.Warn("snapshot file left in the data directory", "instance", id, "err", err)
		}
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("snapshot %q: read %s: %w", id, path, err)
	}
	s.metrics.observe("snapshot", start)
	s.log.Info("snapshot taken", "instance", id, "bytes", n, "took", time.Since(start).Round(time.Millisecond))
	return &Snapshot{File: f, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// dropRDB removes the RDB of an instance without persistence once its
// process has loaded it (a restore puts one there; a crash in the middle
// of a restore can leave it): such an instance keeps nothing on disk, and
// its next restart must come back empty, not with that file's data.
func (s *Service) dropRDB(rec state.Instance) {
	if rec.Persistence != apitype.PersistenceNone {
		return
	}
	if err := os.Remove(filepath.Join(s.layout.DataDir(rec.ID), rdbName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("remove the RDB of an instance without persistence", "instance", rec.ID, "err", err)
	}
}

// runningInstance returns the record and runtime of an active instance
// whose redis-server runs (waiting for one that is starting), else
// ErrNotFound or ErrConflict.
func (s *Service) runningInstance(ctx context.Context, id string) (state.Instance, *instance, error) {
	rec, err := s.store.Get(id)
	if err != nil {
		return rec, nil, notFound(id, err)
	}
	in := s.runtime(id)
	if rec.Phase != state.PhaseActive || in == nil {
		return rec, nil, fmt.Errorf("instance %q is %s: %w", id, rec.Phase, ErrConflict)
	}
	if st := in.settled(ctx).State; st != supervisor.Running {
		return rec, nil, fmt.Errorf("instance %q is %s, not running: %w", id, st, ErrConflict)
	}
	return rec, in, nil
}

// Restore replaces the data of instance id with the RDB read from body.
// Nothing changes until the file is known good: its sha256 matches want
// (when given), redis-check-rdb accepts it, and a loader (the instance's
// redis-server binary, on a unix socket, in a cgroup of its own) loads it
// within the instance's maxmemory and, for the aof modes, writes the AOF
// from the loaded data. Any of these failing is ErrInvalid, with the old
// data untouched. Then the instance is stopped gracefully, the staged data
// directory swapped in with one atomic rename, and started; if it does not
// become ready the old directory is swapped back. Bindings are unaffected:
// the ACL file is not in the data directory.
//
// The body is received and checked before the instance's lock is taken:
// a slow upload holds up no deletion, bind or rollout of the instance.
func (s *Service) Restore(ctx context.Context, id string, body io.Reader, size int64, want string) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	start := time.Now()
	rec, _, err := s.runningInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	upload, size, err := s.receive(ctx, rec, body, size, want)
	if upload != "" {
		defer os.Remove(upload) // gone already once staged
	}
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	staged := time.Now()

	unlock := s.locks.lock(id)
	defer unlock()
	// Again under the lock: it may have been deleted or resized meanwhile.
	rec, in, err := s.runningInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	if limit := limits.MemoryFor(rec.MemoryMB); size > limit {
		return Instance{}, fmt.Errorf("restore %q: %w", id, tooLarge(limit, rec.MemoryMB))
	}
	log := s.log.With("instance", id)
	if err := s.layout.CreateStaging(id, s.ownerOf(rec)); err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	swapped := false
	defer func() {
		if !swapped {
			if err := s.layout.RemoveStaging(id); err != nil {
				log.Warn("restore staging left behind; reconcile removes it", "err", err)
			}
		}
	}()
	if err := s.quotaFile(rec, upload); err != nil {
		return Instance{}, fmt.Errorf("restore %q: the instance's disk quota has no room for the snapshot: %w", id, err)
	}
	if err := os.Rename(upload, filepath.Join(s.layout.StagedDataDir(id), rdbName)); err != nil {
		return Instance{}, fmt.Errorf("restore %q: stage the snapshot: %w", id, err)
	}
	if rec.Persistence == apitype.PersistenceRDB {
		// The file is the instance's data from the swap on. In the other
		// modes it is only read (by the loader, the first start) and then
		// removed: flushing it to disk would only cost.
		if err := volumes.SyncFile(filepath.Join(s.layout.StagedDataDir(id), rdbName)); err != nil {
			return Instance{}, fmt.Errorf("restore %q: %w", id, err)
		}
	}
	job := loadJob{ID: id, Binary: in.sup.Binary(), MemoryMB: rec.MemoryMB, Persistence: rec.Persistence, Limits: s.limitsFor(rec.MemoryMB, rec.Persistence, rec.IO),
		Owner: s.ownerOf(rec), Cred: s.credOf(rec)}
	// The loader holds a second copy of the data set while it runs.
	release := s.reserveTransient(rec.MemoryMB)
	err = s.loader.Load(ctx, job)
	release()
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	crashAt(FaultRestoreStaged)

	// From here the instance goes down: the caller hanging up must not
	// leave it half-way.
	ctx = context.WithoutCancel(ctx)
	down := time.Now()
	if err := in.sup.Replace(ctx, "", func() error {
		err := s.layout.Exchange(id)
		// Which side is live is what the marker says, error or not.
		swapped = s.layout.Restored(id)
		if err == nil {
			crashAt(FaultRestoreSwapped)
		}
		return err
	}); err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	if err := in.waitReady(ctx); err != nil {
		log.Error("restored data does not start; putting the old data back", "err", err)
		if rerr := s.swapBack(ctx, in, id); rerr != nil {
			return Instance{}, fmt.Errorf("restore %q: the restored data did not start (%w), nor did the old data again: %v", id, err, rerr)
		}
		return Instance{}, fmt.Errorf("restore %q: the restored data did not start: %w; the old data is back", id, err)
	}
	unavailable := time.Since(down)
	if err := s.layout.FinishRestore(id); err != nil {
		log.Warn("previous data left behind; reconcile removes it", "err", err)
	}
	s.dropRDB(rec)
	s.metrics.observe("restore", start)
	log.Info("restored", "bytes", size, "took", time.Since(start).Round(time.Millisecond),
		"received_and_checked", staged.Sub(start).Round(time.Millisecond), "loaded", down.Sub(staged).Round(time.Millisecond),
		"unavailable", unavailable.Round(time.Millisecond))
	return s.view(rec), nil
}

// swapBack puts the previous data directory back after restored data did
// not start, and waits for the instance to be ready on it. The restored
// data is marked failed first, so a crash on the way back makes reconcile
// finish it rather than keep the restored data.
func (s *Service) swapBack(ctx context.Context, in *instance, id string) error {
	if err := s.layout.MarkRestoreFailed(id); err != nil {
		return err
	}
	if err := in.sup.Replace(ctx, "", func() error { return s.layout.Exchange(id) }); err != nil {
		return err
	}
	if err := in.waitReady(ctx); err != nil {
		return err
	}
	return s.layout.RemoveStaging(id)
}

// receive writes body to a new file in the uploads directory and checks
// it: size (an RDB larger than the instance's whole memory limit cannot be
// its data set), sha256 and redis-check-rdb. A declared size (negative:
// unknown) over the limit is refused before anything is written. It
// returns the file's path (also on an error, when it was created) and size.
func (s *Service) receive(ctx context.Context, rec state.Instance, body io.Reader, declared int64, want string) (string, int64, error) {
	if want != "" && !validSHA256(want) {
		return "", 0, fmt.Errorf("sha256 %q: %w: want 64 hex digits", want, ErrInvalid)
	}
	limit := limits.MemoryFor(rec.MemoryMB)
	if declared > limit {
		return "", 0, tooLarge(limit, rec.MemoryMB)
	}
	f, err := s.layout.CreateUpload(rec.ID)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	path := f.Name()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(body, limit+1))
	if err != nil {
		var werr *fs.PathError
		if errors.As(err, &werr) && werr.Path == path {
			return path, n, fmt.Errorf("store the snapshot: %w", err) // our disk, not the caller
		}
		return path, n, fmt.Errorf("the snapshot could not be read whole (%d bytes read): %v: %w", n, err, ErrInvalid)
	}
	if n > limit {
		return path, n, tooLarge(limit, rec.MemoryMB)
	}
	if n == 0 {
		return path, 0, fmt.Errorf("the snapshot is empty: %w: send an RDB file as the body", ErrInvalid)
	}
	if got := hex.EncodeToString(h.Sum(nil)); want != "" && !strings.EqualFold(got, want) {
		return path, n, fmt.Errorf("the snapshot's sha256 is %s, not %s: %w (damaged in transit?)", got, want, ErrInvalid)
	}
	if o := s.ownerOf(rec); o.UID >= 0 {
		if err := f.Chown(o.UID, o.GID); err != nil {
			return path, n, err
		}
	}
	check, err := s.cfg.checkRDB()
	if err != nil {
		return path, n, err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := confine.Command(cctx, s.launcher, s.policy(confine.Policy{Exec: []string{check}, ReadOnly: []string{path}}), check, path)
	cmd.Env = redis.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.credOf(rec)}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) && cctx.Err() == nil {
		return path, n, fmt.Errorf("redis-check-rdb refuses the snapshot: %s: %w", checkVerdict(out), ErrInvalid)
	}
	if err != nil {
		return path, n, fmt.Errorf("run %s: %w", check, err)
	}
	return path, n, nil
}

func tooLarge(limit int64, memoryMB int) error {
	return fmt.Errorf("the snapshot is larger than %d MiB, the memory limit of an instance of memory_mb %d: %w",
		limit>>20, memoryMB, ErrInvalid)
}

func validSHA256(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == sha256.Size
}

// checkVerdict picks the lines of redis-check-rdb's output that say what
// is wrong (it prints a report with [offset] prefixes).
func checkVerdict(out []byte) string {
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if strings.Contains(l, "--- RDB ERROR DETECTED ---") || strings.Contains(l, "Wrong signature") ||
			strings.Contains(l, "Unexpected EOF") || strings.Contains(l, "Internal error") ||
			strings.Contains(l, "Invalid") || strings.Contains(l, "CRC") {
			keep = append(keep, l)
		}
	}
	if len(keep) == 0 {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		keep = lines[max(0, len(lines)-2):]
	}
	if len(keep) > 4 {
		keep = keep[:4]
	}
	return strings.Join(keep, "; ")
}
