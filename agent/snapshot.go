package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	gohash "hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
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

// Snapshot makes a fresh, consistent RDB of instance id and returns it
// open, with its size and sha256. Snapshots of one instance are taken one
// at a time. It works in every persistence mode. The RDB is a BGSAVE's
// (SCHEDULE, through the admin user), read while its fork writes it
// (saveReader): it is hashed as it is written, so the snapshot is ready as
// soon as the save is. Where the RDB is not the instance's own persistence
// (aof, aof-always, none) the file is unlinked, so none is left to be
// loaded at a later start.
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
	r := s.startSave(ctx, rec, in)
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err == nil {
		_, err = r.f.Seek(0, io.SeekStart)
	}
	if err != nil {
		r.close()
		return nil, fmt.Errorf("snapshot %q: %w", id, err)
	}
	s.metrics.observe("snapshot", start)
	s.log.Info("snapshot taken", "instance", id, "bytes", n, "took", time.Since(start).Round(time.Millisecond))
	return &Snapshot{File: r.f, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// SnapshotStream is a fresh RDB of an instance, read while its fork writes
// it (the RDB of Snapshot, without the wait for its end).
type SnapshotStream struct {
	r      *saveReader
	h      gohash.Hash
	cancel context.CancelFunc
	unlock func()
	once   sync.Once
	sum    string
	start  time.Time
	n      int64
	log    *slog.Logger
}

// Read reads the RDB; it returns io.EOF once the whole RDB has been read,
// the save's error when it fails.
func (st *SnapshotStream) Read(p []byte) (int, error) {
	n, err := st.r.Read(p)
	st.h.Write(p[:n])
	st.n += int64(n)
	if err == io.EOF {
		st.sum = hex.EncodeToString(st.h.Sum(nil))
	}
	return n, err
}

// SHA256 is the hex sha256 of the RDB, once Read has returned io.EOF.
func (st *SnapshotStream) SHA256() string { return st.sum }

// Close ends the stream: the save is waited for (a BGSAVE is not
// stopped: it is the instance's as much as ours), the file closed and
// the instance's lock released.
func (st *SnapshotStream) Close() error {
	st.once.Do(func() {
		st.cancel()
		st.r.close()
		st.unlock()
		if st.sum != "" {
			st.log.Info("snapshot streamed", "bytes", st.n, "took", time.Since(st.start).Round(time.Millisecond))
		}
	})
	return nil
}

// SnapshotStream is Snapshot, read while the RDB is written. The
// instance's lock is held until Close. Errors before the save (an absent
// or stopped instance) are returned at once.
func (s *Service) SnapshotStream(ctx context.Context, id string) (*SnapshotStream, error) {
	if err := validateID("instance", id); err != nil {
		return nil, err
	}
	unlock := s.locks.lock(id)
	rec, in, err := s.runningInstance(ctx, id)
	if err != nil {
		unlock()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	return &SnapshotStream{r: s.startSave(ctx, rec, in), h: sha256.New(), cancel: cancel, unlock: unlock, start: time.Now(),
		log: s.log.With("instance", id)}, nil
}

// startSave starts a BGSAVE of in and returns a reader of its RDB.
func (s *Service) startSave(ctx context.Context, rec state.Instance, in *instance) *saveReader {
	r := &saveReader{ctx: ctx, dir: s.layout.DataDir(rec.ID), done: make(chan struct{}),
		unlink: rec.Persistence != apitype.PersistenceRDB, log: s.log.With("instance", rec.ID)}
	r.before = r.temps()
	go func() {
		defer close(r.done)
		r.err = in.admin.Save(ctx)
	}()
	return r
}

// saveReader reads the RDB a BGSAVE writes while its fork writes it: the
// fork's temp-<pid>.rdb in the data directory, found once it appears (one
// that was there before the save began, a stale one or that of a save the
// new one waits for, is not taken), read up to what is written so far
// and, once the save is over (renamed to dump.rdb), to its end; or
// dump.rdb itself when the save ended before its temp file was seen. The
// file is the instance's, shared with its persistence in rdb mode (a later
// save renames another over it, not into it), else unlinked once the save
// is over.
type saveReader struct {
	ctx    context.Context
	dir    string
	before map[string]uint64 // temp files there at the start, by inode
	log    *slog.Logger
	unlink bool
	done   chan struct{}
	err    error // the save's, once done is closed
	f      *os.File
	off    int64
	// whole is set once the fork has renamed f to dump.rdb.
	whole bool
}

// savePoll is how often a saveReader looks for more of the RDB.
const savePoll = time.Millisecond

func (r *saveReader) Read(p []byte) (int, error) {
	for {
		if r.f == nil {
			r.f = r.find()
		}
		if r.f != nil {
			whole := r.whole
			n, err := r.f.ReadAt(p, r.off)
			r.off += int64(n)
			if n > 0 {
				return n, nil
			}
			if err != io.EOF {
				return 0, err
			}
			if whole {
				return 0, io.EOF
			}
			if r.renamed() {
				// Whole: read to its end once more, then EOF. The
				// server's note of the save's end comes up to a
				// serverCron later (100 ms at hz 10).
				r.whole = true
				r.removeDump()
				continue
			}
		}
		select {
		case <-r.done:
			if r.err != nil {
				return 0, r.err
			}
			if r.f == nil {
				// Over before its temp file was seen: the whole RDB is
				// dump.rdb now.
				f, err := os.Open(filepath.Join(r.dir, rdbName))
				if err != nil {
					return 0, err
				}
				r.f = f
				r.removeDump()
				continue
			}
			r.removeDump()
			n, err := r.f.ReadAt(p, r.off)
			r.off += int64(n)
			if n > 0 {
				return n, nil
			}
			return 0, err // io.EOF: all of it
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		case <-time.After(savePoll):
		}
	}
}

// renamed reports whether the fork has renamed the temp file being read
// to dump.rdb, which it does last, once the file is whole and fsynced.
func (r *saveReader) renamed() bool {
	var open, dump syscall.Stat_t
	if syscall.Fstat(int(r.f.Fd()), &open) != nil || syscall.Stat(filepath.Join(r.dir, rdbName), &dump) != nil {
		return false
	}
	return open.Ino == dump.Ino && open.Dev == dump.Dev
}

// temps are the BGSAVE temp files (temp-<pid>.rdb; a replica's sync
// writes temp-<time>.<pid>.rdb) in the data directory, with their inodes.
func (r *saveReader) temps() map[string]uint64 {
	out := map[string]uint64{}
	entries, _ := os.ReadDir(r.dir)
	for _, e := range entries {
		name, ok := strings.CutPrefix(e.Name(), "temp-")
		if name, ok = strings.CutSuffix(name, ".rdb"); !ok || name == "" || strings.Trim(name, "0123456789") != "" {
			continue
		}
		if info, err := e.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				out[e.Name()] = st.Ino
			}
		}
	}
	return out
}

// find opens the fork's temp file, when it is there.
func (r *saveReader) find() *os.File {
	for name, ino := range r.temps() {
		if old, ok := r.before[name]; ok && old == ino {
			continue
		}
		f, err := os.Open(filepath.Join(r.dir, name))
		if err != nil {
			continue // renamed meanwhile: dump.rdb is read at the end
		}
		return f
	}
	return nil
}

// removeDump unlinks the RDB where it is not the instance's persistence
// (its data is read from the open file).
func (r *saveReader) removeDump() {
	if !r.unlink {
		return
	}
	r.unlink = false
	if err := os.Remove(filepath.Join(r.dir, rdbName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		r.log.Warn("snapshot file left in the data directory", "err", err)
	}
}

// close waits for the save to end, unlinks its file where it is not the
// instance's persistence, and closes it.
func (r *saveReader) close() {
	<-r.done
	if r.err == nil {
		r.removeDump()
	}
	if r.f != nil {
		r.f.Close()
	}
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
// Nothing changes until the file is known good, and the old data serves
// until then. The body is received into a file of its own (hashed when
// want is given, its size bounded by the instance's memory limit) before
// the instance's lock is taken: a slow upload holds up no deletion, bind
// or rollout of the instance. The file then becomes the staged data as it
// is, read once and written once: for the aof modes the base of a new
// multi-part AOF (beside an empty incremental file), else dump.rdb. A
// candidate, the instance's own redis-server on the instance's own config
// and the staged data directory (candidate.go), loads it, in the
// instance's cgroup with room for it and counted in the memory budget
// meanwhile, while the file goes to disk (unless the mode keeps nothing):
// the RDB must load, structure and checksum, and its data set fit in the
// instance's maxmemory, else ErrInvalid, with the old data untouched and
// the instance never down. Then the supervisor stops the old process
// gracefully, the staged data directory is swapped in with one atomic
// rename, and the candidate is moved onto the instance's ports: the
// instance is down for that alone. Bindings are unaffected: the ACL file
// is not in the data directory.
func (s *Service) Restore(ctx context.Context, id string, body io.Reader, size int64, want string) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	start := time.Now()
	rec, _, err := s.restorableInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	// The staged data set lies beside the instance's own until the
	// hand-over: room for it on the disk, beyond what the instances may
	// grow into (its declared size, else the most an upload may be; a
	// declared size beyond that is receive's 422).
	need := limits.MemoryFor(rec.MemoryMB)
	if size > 0 {
		need = min(size, need)
	}
	if err := s.admitDisk(need, fmt.Sprintf("a restore's snapshot of %s (staged beside the instance's data until the hand-over)", mib(need))); err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	release, err := s.reserveCandidate(rec)
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	// Released once the restore is over: the old process is gone then,
	// or the candidate.
	defer release()
	upload, size, err := s.receive(ctx, rec, body, size, want)
	if upload != "" {
		defer os.Remove(upload) // gone already once staged
	}
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	received := time.Now()

	unlock := s.locks.lock(id)
	defer unlock()
	// Again under the lock: it may have been deleted or resized meanwhile.
	rec, in, err := s.restorableInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	if limit := limits.MemoryFor(rec.MemoryMB); size > limit {
		return Instance{}, fmt.Errorf("restore %q: %w", id, tooLarge(limit, rec.MemoryMB))
	}
	log := s.log.With("instance", id)
	owner := s.ownerOf(rec)
	if err := s.layout.CreateStaging(id, owner); err != nil {
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
	staged, err := s.stage(rec, upload)
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: stage the snapshot: %w", id, err)
	}
	crashAt(FaultRestoreStaged)

	// The file goes to disk while the candidate loads it.
	synced := make(chan error, 1)
	go func() {
		if rec.Persistence == apitype.PersistenceNone {
			synced <- nil
			return
		}
		synced <- s.layout.SyncStaged(id, staged)
	}()
	c, err := s.startCandidate(rec, in)
	if err != nil {
		<-synced
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	defer c.stop()
	used, err := c.waitLoaded(ctx)
	if err == nil && used > int64(rec.MemoryMB)<<20 {
		err = tooMuchData(used, rec.MemoryMB)
	}
	if serr := <-synced; err == nil && serr != nil {
		err = fmt.Errorf("store the snapshot: %w", serr)
	}
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	loaded := time.Now()
	crashAt(FaultRestoreLoaded)

	// From here the instance goes down: the caller hanging up must not
	// leave it half-way.
	ctx = context.WithoutCancel(ctx)
	down := time.Now()
	err = in.sup.Handover(ctx, c.cmd, func() error {
		// The old process is gone: one process's room in the cgroup, for
		// the candidate, which the supervisor confines again as it
		// starts watching it.
		in.side.Store(false)
		err := s.layout.Exchange(id)
		// Which side is live is what the marker says, error or not.
		if swapped = s.layout.Restored(id); !swapped {
			c.stop()
			if err == nil {
				err = errors.New("the exchange left the restored data out of place")
			}
			return err
		}
		crashAt(FaultRestoreSwapped)
		if err == nil {
			err = c.becomeInstance(ctx, rec)
		}
		if err != nil {
			// Not the instance: the old data goes back, and the
			// supervisor starts it.
			c.stop()
			if rerr := s.putBack(id); rerr != nil {
				return fmt.Errorf("%w; and the old data could not be put back: %v", err, rerr)
			}
			swapped = false
			return fmt.Errorf("%w; the old data is back", err)
		}
		c.taken = true
		return nil
	})
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: the restored data's redis-server did not take over: %w", id, err)
	}
	if err := in.waitReady(ctx); err != nil {
		return Instance{}, fmt.Errorf("restore %q: the restored data's redis-server took over, and then: %w", id, err)
	}
	unavailable := time.Since(down)
	if prev, err := s.layout.FinishRestoreLater(id); err != nil {
		log.Warn("previous data left behind; reconcile removes it", "err", err)
	} else if prev != "" {
		// After the answer: the files of the previous data set.
		s.background(func(context.Context) {
			if err := os.RemoveAll(prev); err != nil {
				log.Warn("previous data left behind; the next start removes it", "dir", prev, "err", err)
			}
		})
	}
	s.dropRDB(rec)
	s.metrics.observe("restore", start)
	log.Info("restored", "bytes", size, "took", time.Since(start).Round(time.Millisecond),
		"received", received.Sub(start).Round(time.Millisecond), "loaded", loaded.Sub(received).Round(time.Millisecond),
		"unavailable", unavailable.Round(time.Millisecond))
	return s.view(rec), nil
}

// restorableInstance is runningInstance for a restore, which an instance
// in a move refuses: a target replicating from its primary (its data
// comes from there), and a source (its replica would have to sync again,
// and a cutover would meet a process that is not the one it fenced).
func (s *Service) restorableInstance(ctx context.Context, id string) (state.Instance, *instance, error) {
	rec, in, err := s.runningInstance(ctx, id)
	switch {
	case err != nil:
		return rec, nil, err
	case rec.ReplicaOf != nil:
		return rec, nil, fmt.Errorf("instance %q replicates from %s:%d (a move under way); its data comes from there: %w",
			id, rec.ReplicaOf.Host, rec.ReplicaOf.Port, ErrConflict)
	case rec.Move != nil:
		return rec, nil, fmt.Errorf("instance %q is being moved (%s); restore it once the move is over: %w", id, rec.Move.State, ErrConflict)
	}
	return rec, in, nil
}

// putBack exchanges the previous data directory of id back in after
// restored data did not take over. The restored data is marked failed
// first, so a crash on the way back makes reconcile finish it rather than
// keep the restored data.
func (s *Service) putBack(id string) error {
	if err := s.layout.MarkRestoreFailed(id); err != nil {
		return err
	}
	return s.layout.Exchange(id)
}

// stage moves the received RDB at upload into rec's staging directory as
// the data its instance starts on: for the aof modes the base of a new
// multi-part AOF, with an empty incremental file and the manifest that
// names the two (Redis 7 with appendonly ignores an RDB beside no AOF),
// else dump.rdb. It returns the staged file's path in the staged
// directory, which SyncStaged puts on disk.
func (s *Service) stage(rec state.Instance, upload string) (string, error) {
	owner := s.ownerOf(rec)
	if !apitype.IsAOF(rec.Persistence) {
		return rdbName, s.layout.StageFile(rec.ID, upload, rdbName, owner)
	}
	base := filepath.Join(redis.AOFDir, redis.AOFBase)
	if err := s.layout.StageFile(rec.ID, upload, base, owner); err != nil {
		return "", err
	}
	if err := s.layout.StageNewFile(rec.ID, filepath.Join(redis.AOFDir, redis.AOFIncr), nil, owner); err != nil {
		return "", err
	}
	return base, s.layout.StageNewFile(rec.ID, filepath.Join(redis.AOFDir, redis.AOFManifest), redis.AOFManifestOfBase(), owner)
}

// reserveCandidate counts a restore's candidate of rec's instance in the
// memory budget (its data set may take the instance's memory_mb) until
// release is called: a provision or a resize meanwhile sees that much
// less free. With no room for it, ErrCapacity.
func (s *Service) reserveCandidate(rec state.Instance) (release func(), err error) {
	mb := int64(rec.MemoryMB)
	// In a write transaction that changes nothing (no commit): admissions
	// are serialised by the store, so two cannot both take the last room.
	_, err = s.store.Admit(rec.ID, func(_ *state.Instance, u state.Usage) error {
		if free := int64(s.cfg.MemoryBudgetMB-u.MemoryMB) - s.transientMB.Load(); mb > free {
			return fmt.Errorf("a restore loads the snapshot beside the running instance: %d MiB more than the instance's, and %d of %d MiB of the memory budget are free: %w",
				mb, max(free, 0), s.cfg.MemoryBudgetMB, ErrCapacity)
		}
		s.transientMB.Add(mb)
		return nil
	})
	if err != nil {
		return nil, notFound(rec.ID, err)
	}
	var once sync.Once
	return func() { once.Do(func() { s.transientMB.Add(-mb) }) }, nil
}

// receiveBuffer is the size of the copies from the body to the file.
const receiveBuffer = 1 << 20

// receive writes body to a new file in the uploads directory and checks
// it: size (an RDB larger than the instance's whole memory limit cannot
// be its data set), that it is an RDB (its magic), and sha256 (when want
// is given). A declared size (negative: unknown) over the limit is
// refused before anything is written. It returns the file's path (also on
// an error, when it was created) and size. Unless rec keeps no data, the
// kernel is writing the file back as it arrives (writeBack), so that
// SyncStaged finds little left.
func (s *Service) receive(ctx context.Context, rec state.Instance, body io.Reader, declared int64, want string) (_ string, _ int64, err error) {
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
	file := &failWriter{w: &writeBack{f: f, on: rec.Persistence != apitype.PersistenceNone}}
	magic := &rdbMagic{}
	writers := []io.Writer{file, magic}
	var h gohash.Hash
	if want != "" {
		h = sha256.New()
		writers = append(writers, h)
	}
	n, err := io.CopyBuffer(io.MultiWriter(writers...), io.LimitReader(body, limit+1), make([]byte, receiveBuffer))
	switch {
	case file.err != nil:
		return path, n, fmt.Errorf("store the snapshot: %w", file.err) // our disk, not the caller
	case err != nil:
		return path, n, fmt.Errorf("the snapshot could not be read whole (%d bytes read): %v: %w", n, err, ErrInvalid)
	case n > limit:
		return path, n, tooLarge(limit, rec.MemoryMB)
	case n == 0:
		return path, 0, fmt.Errorf("the snapshot is empty: %w: send an RDB file as the body", ErrInvalid)
	}
	if err := magic.check(); err != nil {
		return path, n, err
	}
	if got := ""; h != nil {
		if got = hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, want) {
			return path, n, fmt.Errorf("the snapshot's sha256 is %s, not %s: %w (damaged in transit?)", got, want, ErrInvalid)
		}
	}
	return path, n, nil
}

// rdbMagic keeps the first bytes written to it, an RDB's "REDIS" and
// four digits of version: an AOF base that is not an RDB would be read
// as commands, which a restore does not take.
type rdbMagic struct {
	head []byte
}

func (m *rdbMagic) Write(p []byte) (int, error) {
	if k := 9 - len(m.head); k > 0 {
		m.head = append(m.head, p[:min(k, len(p))]...)
	}
	return len(p), nil
}

func (m *rdbMagic) check() error {
	h := m.head
	if len(h) < 9 || string(h[:5]) != "REDIS" {
		return fmt.Errorf("the snapshot is not an RDB file (it does not start with REDIS and a version): %w", ErrInvalid)
	}
	for _, c := range h[5:9] {
		if c < '0' || c > '9' {
			return fmt.Errorf("the snapshot is not an RDB file (its version %q is not 4 digits): %w", h[5:9], ErrInvalid)
		}
	}
	return nil
}

// failWriter remembers its writer's error, so that a copy's error can be
// told apart from its reader's.
type failWriter struct {
	w   io.Writer
	err error
}

func (w *failWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// writeBackEvery is how much a writeBack writes between two starts of
// writeback.
const writeBackEvery = 8 << 20

// writeBack writes to a file and, when on, starts the kernel's writeback
// of each writeBackEvery bytes as they are written (sync_file_range, which
// does not wait), so that the fsync at the end finds little left to write:
// the file goes to disk at the disk's speed while it arrives.
type writeBack struct {
	f           *os.File
	on          bool
	off, synced int64
}

func (w *writeBack) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.off += int64(n)
	if w.on && w.off-w.synced >= writeBackEvery {
		// Best effort: the fsync at the end is what counts.
		unix.SyncFileRange(int(w.f.Fd()), w.synced, w.off-w.synced, unix.SYNC_FILE_RANGE_WRITE)
		w.synced = w.off
	}
	return n, err
}

func tooMuchData(used int64, memoryMB int) error {
	return fmt.Errorf("the snapshot's data set uses %.1f MiB, more than the instance's memory_mb %d (resize it first): %w",
		float64(used)/(1<<20), memoryMB, ErrInvalid)
}

func tooLarge(limit int64, memoryMB int) error {
	return fmt.Errorf("the snapshot is larger than %d MiB, the memory limit of an instance of memory_mb %d: %w",
		limit>>20, memoryMB, ErrInvalid)
}

func validSHA256(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == sha256.Size
}
