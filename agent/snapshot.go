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
}

// savePoll is how often a saveReader looks for more of the RDB.
const savePoll = time.Millisecond

func (r *saveReader) Read(p []byte) (int, error) {
	for {
		if r.f == nil {
			r.f = r.find()
		}
		if r.f != nil {
			n, err := r.f.ReadAt(p, r.off)
			r.off += int64(n)
			if n > 0 {
				return n, nil
			}
			if err != io.EOF {
				return 0, err
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
// Nothing changes until the file is known good. While it is received
// (written to a file of its own, hashed when want is given) it is fed to a
// loader, the instance's redis-server binary as a replica on a unix
// socket, in a cgroup of its own limited like the instance, whose memory
// counts in the memory budget while it runs: the RDB must load (with
// redis-check-rdb's checks and its checksum), and its data set fit in the
// instance's maxmemory. Any of these failing is ErrInvalid, with the old
// data untouched. The received file then becomes the staged data as it
// is, read once and written once: for the aof modes the base of a new
// multi-part AOF (beside an empty incremental file), else dump.rdb; fsynced
// unless the mode keeps nothing. Then the instance is stopped gracefully,
// the staged data directory swapped in with one atomic rename, and
// started; if it does not become ready the old directory is swapped back.
// Bindings are unaffected: the ACL file is not in the data directory.
//
// The body is received and loaded before the instance's lock is taken:
// a slow upload holds up no deletion, bind or rollout of the instance.
func (s *Service) Restore(ctx context.Context, id string, body io.Reader, size int64, want string) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	start := time.Now()
	rec, in, err := s.runningInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	release, err := s.reserveLoader(rec)
	if err != nil {
		return Instance{}, fmt.Errorf("restore %q: %w", id, err)
	}
	upload, size, used, err := s.receive(ctx, rec, in, body, size, want, release)
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
	rec, in, err = s.runningInstance(ctx, id)
	if err != nil {
		return Instance{}, err
	}
	if limit := limits.MemoryFor(rec.MemoryMB); size > limit {
		return Instance{}, fmt.Errorf("restore %q: %w", id, tooLarge(limit, rec.MemoryMB))
	}
	if used > int64(rec.MemoryMB)<<20 { // resized meanwhile
		return Instance{}, fmt.Errorf("restore %q: %w", id, tooMuchData(used, rec.MemoryMB))
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
	if err := s.stage(rec, upload); err != nil {
		return Instance{}, fmt.Errorf("restore %q: stage the snapshot: %w", id, err)
	}
	staged := time.Now()
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
		"received_and_loaded", received.Sub(start).Round(time.Millisecond), "staged", staged.Sub(received).Round(time.Millisecond),
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

// stage moves the received RDB at upload into rec's staging directory as
// the data its instance starts on: for the aof modes the base of a new
// multi-part AOF, with an empty incremental file and the manifest that
// names the two (Redis 7 with appendonly ignores an RDB beside no AOF),
// else dump.rdb. Except without persistence, the data is on disk when it
// returns: it is the instance's from the exchange on, and a crash after
// the exchange must find it whole.
func (s *Service) stage(rec state.Instance, upload string) error {
	owner := s.ownerOf(rec)
	durable := rec.Persistence != apitype.PersistenceNone
	if !apitype.IsAOF(rec.Persistence) {
		return s.layout.StageFile(rec.ID, upload, rdbName, durable, owner)
	}
	if err := s.layout.StageFile(rec.ID, upload, filepath.Join(redis.AOFDir, redis.AOFBase), durable, owner); err != nil {
		return err
	}
	if err := s.layout.StageNewFile(rec.ID, filepath.Join(redis.AOFDir, redis.AOFIncr), nil, owner); err != nil {
		return err
	}
	return s.layout.StageNewFile(rec.ID, filepath.Join(redis.AOFDir, redis.AOFManifest), redis.AOFManifestOfBase(), owner)
}

// reserveLoader counts a restore loader of rec's instance in the memory
// budget (its data set may take the instance's memory_mb) until release
// is called: a provision or a resize meanwhile sees that much less free.
// With no room for it, ErrCapacity.
func (s *Service) reserveLoader(rec state.Instance) (release func(), err error) {
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

// receiveBuffer is the size of the copies from the body to the file and
// the loader.
const receiveBuffer = 1 << 20

// receive writes body to a new file in the uploads directory, feeding it
// to a loader as it goes, and checks it: size (an RDB larger than the
// instance's whole memory limit cannot be its data set), sha256 (when
// want is given), and the loader's verdict. A declared size (negative:
// unknown) over the limit is refused before anything is written. It
// returns the file's path (also on an error, when it was created), size
// and the used_memory of the loaded data set. The file is on disk when it
// returns, unless rec keeps no data. gone is called once the loader is
// gone: before it returns an error, after it returns otherwise.
func (s *Service) receive(ctx context.Context, rec state.Instance, in *instance, body io.Reader, declared int64, want string, gone func()) (_ string, _ int64, _ int64, err error) {
	defer func() {
		if gone != nil {
			gone()
		}
	}()
	if want != "" && !validSHA256(want) {
		return "", 0, 0, fmt.Errorf("sha256 %q: %w: want 64 hex digits", want, ErrInvalid)
	}
	limit := limits.MemoryFor(rec.MemoryMB)
	if declared > limit {
		return "", 0, 0, tooLarge(limit, rec.MemoryMB)
	}
	f, err := s.layout.CreateUpload(rec.ID)
	if err != nil {
		return "", 0, 0, err
	}
	defer f.Close()
	path := f.Name()
	// The loader starts while the body arrives into the file; a feeder
	// passes the file on to it as it grows: the body comes at the speed
	// of the network and the disk, the loader parses at its own.
	durable := rec.Persistence != apitype.PersistenceNone
	file := &failWriter{w: &writeBack{f: f, on: durable}}
	grow := newFollow(file)
	job := loadJob{ID: rec.ID, Binary: in.sup.Binary(), MemoryMB: rec.MemoryMB,
		Limits: s.limitsFor(rec.MemoryMB, rec.Persistence, rec.IO), Owner: s.ownerOf(rec), Cred: s.credOf(rec)}
	var ld loading
	started := make(chan error, 1)
	fed := make(chan error, 1)
	go func() {
		l, err := s.loader.Start(ctx, job)
		if err != nil {
			grow.abort(err)
			started <- err
			return
		}
		ld = l
		started <- nil
		r, err := grow.reader(path)
		if err == nil {
			feed := &failWriter{w: l}
			_, err = r.WriteTo(feed)
			if feed.err != nil {
				err = errLoaderStopped
			}
			r.Close()
		}
		if err != nil {
			grow.abort(err)
		}
		fed <- err
	}()
	writers := []io.Writer{grow}
	var h gohash.Hash
	if want != "" {
		h = sha256.New()
		writers = append(writers, h)
	}
	n, err := io.CopyBuffer(io.MultiWriter(writers...), io.LimitReader(body, limit+1), make([]byte, receiveBuffer))
	grow.finish(err)
	if serr := <-started; serr != nil {
		return path, n, 0, fmt.Errorf("restore loader: %w", serr)
	}
	// The loader is closed (killed, waited for, its memory freed) while
	// the restore goes on when all went well, else before the answer.
	defer func() {
		if err != nil {
			ld.Close()
			return
		}
		done := gone
		gone = nil
		s.bgMu.Lock()
		defer s.bgMu.Unlock()
		if s.ctx.Err() != nil { // shutting down: Close waits for no more
			ld.Close()
			done()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			ld.Close()
			done()
		}()
	}()
	ferr := <-fed
	switch {
	case file.err != nil:
		return path, n, 0, fmt.Errorf("store the snapshot: %w", file.err) // our disk, not the caller
	case errors.Is(ferr, errLoaderStopped):
		if _, lerr := ld.Loaded(ctx); lerr != nil {
			return path, n, 0, lerr
		}
		return path, n, 0, fmt.Errorf("restore loader: %w", ferr)
	case err != nil && !errors.Is(err, errFeedStopped):
		return path, n, 0, fmt.Errorf("the snapshot could not be read whole (%d bytes read): %v: %w", n, err, ErrInvalid)
	case ferr != nil:
		return path, n, 0, fmt.Errorf("feed the restore loader: %w", ferr)
	case n > limit:
		return path, n, 0, tooLarge(limit, rec.MemoryMB)
	case n == 0:
		return path, 0, 0, fmt.Errorf("the snapshot is empty: %w: send an RDB file as the body", ErrInvalid)
	}
	if got := ""; h != nil {
		if got = hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, want) {
			return path, n, 0, fmt.Errorf("the snapshot's sha256 is %s, not %s: %w (damaged in transit?)", got, want, ErrInvalid)
		}
	}
	// The flush to disk (begun while the body came, see writeBack) ends
	// while the loader finishes.
	synced := make(chan error, 1)
	go func() {
		if durable {
			synced <- f.Sync()
		} else {
			synced <- nil
		}
	}()
	used, err := ld.Loaded(ctx)
	if err == nil && used > int64(rec.MemoryMB)<<20 {
		err = tooMuchData(used, rec.MemoryMB)
	}
	if err == nil {
		crashAt(FaultRestoreLoaded)
	}
	if serr := <-synced; err == nil && serr != nil {
		err = fmt.Errorf("store the snapshot: %w", serr)
	}
	return path, n, used, err
}

// errLoaderStopped is a feeder's error when the loader stopped taking the
// RDB (it refused it, or died); errFeedStopped the body's copy's when the
// feeder stopped.
var (
	errLoaderStopped = errors.New("the restore loader stopped taking the snapshot")
	errFeedStopped   = errors.New("the feed of the restore loader stopped")
)

// follow is a file written by one goroutine and read, as it grows, by
// another: the body of a restore and its feeder.
type follow struct {
	w    io.Writer
	mu   sync.Mutex
	cond *sync.Cond
	n    int64 // bytes written
	done bool  // no more writes
	werr error // why the writes ended early
	rerr error // why the reader gave up: the writes stop
}

func newFollow(w io.Writer) *follow {
	f := &follow{w: w}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// Write writes to the file, unless the reader gave up.
func (f *follow) Write(p []byte) (int, error) {
	f.mu.Lock()
	stopped := f.rerr != nil
	f.mu.Unlock()
	if stopped {
		return 0, errFeedStopped
	}
	n, err := f.w.Write(p)
	f.mu.Lock()
	f.n += int64(n)
	f.cond.Broadcast()
	f.mu.Unlock()
	return n, err
}

// finish says the writes are over; err, when set, that they ended early.
func (f *follow) finish(err error) {
	f.mu.Lock()
	f.done, f.werr = true, err
	f.cond.Broadcast()
	f.mu.Unlock()
}

// abort stops the writes (the reader has no use for more).
func (f *follow) abort(err error) {
	f.mu.Lock()
	f.rerr = err
	f.mu.Unlock()
}

// reader opens path (the file being written) for reading as it grows.
func (f *follow) reader(path string) (*followReader, error) {
	r, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	return &followReader{follow: f, r: r}, nil
}

type followReader struct {
	*follow
	r   *os.File
	off int64
}

func (r *followReader) Read(p []byte) (int, error) {
	r.mu.Lock()
	for r.off >= r.n && !r.done {
		r.cond.Wait()
	}
	avail, done, werr := r.n-r.off, r.done, r.werr
	r.mu.Unlock()
	if avail == 0 && done {
		if werr != nil {
			return 0, werr
		}
		return 0, io.EOF
	}
	n, err := r.r.ReadAt(p[:min(int64(len(p)), avail)], r.off)
	r.off += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// WriteTo copies the file to w as it grows, through w's ReadFrom when it
// has one (a socket's: sendfile, the bytes not copied through this
// process), to the end of the writes.
func (r *followReader) WriteTo(w io.Writer) (int64, error) {
	if _, err := r.r.Seek(r.off, io.SeekStart); err != nil {
		return 0, err
	}
	var total int64
	for {
		r.mu.Lock()
		for r.off >= r.n && !r.done {
			r.cond.Wait()
		}
		avail, done, werr := r.n-r.off, r.done, r.werr
		r.mu.Unlock()
		if avail == 0 && done {
			return total, werr
		}
		n, err := io.Copy(w, &io.LimitedReader{R: r.r, N: avail})
		r.off += n
		total += n
		if err != nil {
			return total, err
		}
	}
}

func (r *followReader) Close() error { return r.r.Close() }

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

// ReadFrom is its writer's ReadFrom, when it has one.
func (w *failWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := w.w.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{w.w}, r)
	}
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
