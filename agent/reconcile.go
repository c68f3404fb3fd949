package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/internal/procfs"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// Reconcile brings the machine in line with the state, once, at start:
// every record being deleted is deleted; every other record gets its files
// and a process, adopting the one a previous agent left running when it is
// verifiably the same (pid, start time, config in its title) and starting
// one otherwise. Directories and redis-servers that no record owns are
// reported as orphans, never removed.
func (s *Service) Reconcile(ctx context.Context) error {
	t0 := time.Now()
	recs, err := s.store.List()
	if err != nil {
		return err
	}
	// Restores' bodies a crash cut off: no upload survives the agent. A
	// loader's directory left there names an instance whose loader's
	// cgroup may be left too.
	loaders := s.layout.LoaderDirIDs()
	if err := s.layout.ClearUploads(); err != nil {
		s.log.Error("remove interrupted uploads", "err", err)
	}
	// One /proc scan finds every redis-server running from our data root,
	// including one spawned just before a crash kept its pid from the
	// record.
	root := s.layout.DataRoot + string(filepath.Separator)
	procs, err := supervisor.Scan(func(conf string) bool { return strings.HasPrefix(conf, root) })
	if err != nil {
		return err
	}
	listeners, err := supervisor.ReadListeners()
	if err != nil {
		return fmt.Errorf("read listening sockets: %w", err)
	}
	m := &machine{procs: procs, listeners: listeners, loaders: loaders}
	owned := map[string]bool{}
	for _, rec := range recs {
		owned[rec.ID] = true
	}
	s.killLoaders(procs)
	// Records are independent: reconcile them a few at a time, so an agent
	// restart at a thousand instances is not a thousand sequential rounds
	// of /proc reads and file checks.
	var (
		mu       sync.Mutex
		done     = map[outcome]int{}
		firstErr error
		wg       sync.WaitGroup
		sem      = make(chan struct{}, reconcileWorkers)
	)
	boot := newBootOrder()
	s.boot.Store(boot)
	s.booting.Store(true)
	for _, rec := range recs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			o, err := s.reconcileOne(rec, m, boot)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			done[o]++
		}()
	}
	wg.Wait()
	// The records whose process changed, in one commit: a thousand
	// commits (a thousand fsyncs) were most of an agent start after a
	// power loss. No process has been started yet: a crash before it
	// leaves the records as they were, for the next reconcile.
	if err := s.store.UpdateEach(boot.updates); err != nil && firstErr == nil {
		firstErr = err
	}
	s.boot.Store(nil)
	s.mu.Lock()
	for _, in := range s.instances {
		go in.sup.Run(s.ctx) // also on error: Close waits for every Run
	}
	s.mu.Unlock()
	// The instances to start wait at their gates, let through in their
	// order (bootOrder).
	s.background(func(ctx context.Context) {
		boot.run(ctx, s.cfg.bootTurns, s.runtime)
		s.booting.Store(false)
	})
	s.resumeMoves(recs)
	if firstErr != nil {
		return firstErr
	}
	s.background(s.renewCerts)
	for _, rec := range recs {
		if rec.Phase == state.PhaseProvisioning {
			s.background(func(ctx context.Context) { s.finishInterrupted(ctx, rec.ID) })
		}
	}
	s.findOrphans(owned, procs)
	s.metrics.reconcileSecs.Set(time.Since(t0).Seconds())
	for _, o := range outcomes {
		s.metrics.reconcileCounts.WithLabelValues(string(o)).Set(float64(done[o]))
	}
	s.reconciled.Store(true)
	if s.bk != nil {
		s.background(s.scheduleBackups)
	}
	// Every instance's files, measured now and every DiskInterval.
	s.background(s.diskLoop)
	s.log.Info("reconciled", "instances", len(recs), "adopted", done[outcomeAdopted], "started", done[outcomeStarted],
		"deletions_finished", done[outcomeDeleted], "orphans", len(*s.orphans.Load()), "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// reconcileWorkers bounds how many records reconcile handles at once.
const reconcileWorkers = 8

// outcome is what reconcile did with one record: the outcome label of
// redis_agent_reconcile_instances.
type outcome string

// Outcomes of reconcileOne.
const (
	outcomeLeft    outcome = ""        // it had to leave the record as it was (logged)
	outcomeDeleted outcome = "deleted" // it finished an interrupted deletion
	outcomeAdopted outcome = "adopted" // it adopted the process a previous agent left
	outcomeStarted outcome = "started" // it prepared a new process
	// outcomeForwarding: a moved instance's forwarder holds its port.
	outcomeForwarding outcome = "forwarding"
)

// outcomes are the outcomes the metric shows.
var outcomes = []outcome{outcomeAdopted, outcomeStarted, outcomeDeleted, outcomeForwarding}

// reconcileOne brings one record's instance in line and says what it did.
// An error is the state store's, which stops reconcile. The change of its
// record, and its start when it needs one, go into boot.
func (s *Service) reconcileOne(rec state.Instance, m *machine, boot *bootOrder) (outcome, error) {
	log := s.log.With("instance", rec.ID)
	if rec.Phase == state.PhaseDeleting {
		if err := s.destroy(rec.ID); err != nil {
			log.Error("finish deletion", "err", err)
			return outcomeLeft, nil
		}
		log.Info("finished an interrupted deletion")
		return outcomeDeleted, nil
	}
	if rec.Move != nil && rec.Move.State == state.MoveForwarding {
		// Moved away: its port forwards to the new place, whatever a
		// crash left running on it.
		if err := s.startForwarding(context.Background(), rec); err != nil {
			log.Error("forward a moved instance", "err", err)
			return outcomeLeft, nil
		}
		return outcomeForwarding, nil
	}
	s.finishRestore(rec, m)
	// A loader killed with a crashed agent during an upload leaves its
	// cgroup (and no staging directory, which finishRestore goes by).
	if m.loaders[rec.ID] {
		if err := s.cg.Remove(loaderGroup(rec.ID)); err != nil {
			log.Error("remove the restore loader's cgroup", "err", err)
		}
	}
	adopt := s.findProcess(rec, m)
	if r, err := s.ensureCert(rec); err != nil {
		log.Error("cannot issue the instance's TLS certificate; it runs without TLS until it can", "err", err)
	} else {
		rec = r
	}
	confHash, err := s.writeFiles(rec)
	if err != nil {
		// Keep the record; report. The operator fixes the disk, the next
		// start tries again.
		log.Error("cannot write instance files", "err", err)
		return outcomeLeft, nil
	}
	if adopt != nil && rec.ConfigHash != "" && rec.ConfigHash != confHash {
		log.Info("running process has an older config; it applies at its next restart")
	}
	var pid int
	var start uint64
	if adopt != nil {
		pid, start = adopt.PID, adopt.StartTime
	}
	// Only records whose process changed are written, all in one commit
	// after the loop (Reconcile).
	if rec.PID != pid || rec.StartTime != start || rec.Binary == "" {
		fix := func(r *state.Instance) error {
			r.PID, r.StartTime = pid, start
			if r.Binary == "" {
				// A record from before rollouts: its process was started
				// from the configured binary, as far as anyone knows.
				r.Binary = s.cfg.RedisServer
				r.BinaryID, _ = binaryID(r.Binary)
			}
			return nil
		}
		fix(&rec)
		boot.update(rec.ID, fix)
	}
	if adopt == nil {
		boot.enroll(rec.ID, s.layout.DataSize(rec.ID))
	}
	// Run starts after the loop: the supervisors' first probes would
	// otherwise compete with reconcile for the CPU.
	s.prepare(rec, adopt)
	if adopt != nil {
		return outcomeAdopted, nil
	}
	return outcomeStarted, nil
}

// killLoaders kills the restore processes a crashed agent left running and
// takes them out of procs: candidates (their title names candidate.conf
// in an instance's staging directory), which load staged data and must
// not outlive the restore that started them, and the loaders of older
// agents (in a directory of the uploads, which ClearUploads has removed
// already: the title still names it, or in a staging directory). It
// returns once they are gone: a candidate's data directory may be the
// live one, which reconcile starts the instance on next.
func (s *Service) killLoaders(procs map[string]supervisor.Process) {
	var killed []supervisor.Process
	for conf, p := range procs {
		dir, base := filepath.Dir(conf), filepath.Base(conf)
		inStaging := filepath.Base(dir) == "restore"
		if !(base == candidateConf && inStaging) && !(base == "loader.conf" && (inStaging || s.layout.IsLoaderDir(dir))) {
			continue
		}
		delete(procs, conf)
		if supervisor.Verify(p, conf) != nil {
			continue
		}
		s.log.Warn("killing the redis-server of an interrupted restore", "pid", p.PID, "config", conf)
		// Its process group: an AOF rewrite it forked too.
		if err := syscall.Kill(-p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			s.log.Error("kill the restore's redis-server", "pid", p.PID, "err", err)
			continue
		}
		killed = append(killed, p)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, p := range killed {
		for alive(p) {
			if time.Now().After(deadline) {
				s.log.Error("the redis-server of an interrupted restore survives SIGKILL", "pid", p.PID)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// alive reports whether p still runs (not a zombie, not reused).
func alive(p supervisor.Process) bool {
	st, err := procfs.ReadStat(p.PID)
	return err == nil && !st.Gone() && st.StartTime == p.StartTime
}

// loaderGroup is the cgroup an older agent gave id's restore loader.
func loaderGroup(id string) string { return "_restore-" + id }

// finishRestore settles a restore a crash interrupted. The staging
// directory's marker tells which data directory is live: if the swap
// happened, the restored data is (it was checked and loaded before the
// swap) and the previous data is removed; if not, the staged data is. No
// process runs on the staged directory, so either is safe.
func (s *Service) finishRestore(rec state.Instance, m *machine) {
	id := rec.ID
	if !s.layout.Staging(id) {
		return
	}
	log := s.log.With("instance", id)
	// killLoaders has killed the loader; its cgroup goes too.
	if err := s.cg.Remove(loaderGroup(id)); err != nil {
		log.Error("remove the restore loader's cgroup", "err", err)
	}
	if s.layout.RestoreFailed(id) {
		// The restored data did not start and the crash came before the
		// previous data was back: put it back, after stopping whatever
		// runs on the failed data.
		log.Warn("an interrupted restore's data had failed to start: putting the previous data back")
		if p := s.findProcess(rec, m); p != nil {
			if err := killVerified(*p, s.layout.ConfPath(id)); err != nil {
				log.Error("stop the process on the failed restored data; keeping it", "pid", p.PID, "err", err)
				return
			}
		}
		if err := s.layout.Exchange(id); err != nil {
			log.Error("put the previous data back", "err", err)
			return
		}
		if err := s.layout.RemoveStaging(id); err != nil {
			log.Error("remove the failed restored data", "err", err)
		}
		return
	}
	if s.layout.Restored(id) {
		log.Warn("an interrupted restore had swapped the data in: keeping the restored data")
		if err := s.layout.FinishRestore(id); err != nil {
			log.Error("remove the previous data", "err", err)
		}
		return
	}
	log.Warn("an interrupted restore had not swapped its data in (or was removing the previous data): keeping the live data")
	if err := s.layout.RemoveStaging(id); err != nil {
		log.Error("remove the staged data", "err", err)
	}
}

// machine is what reconcile reads of the machine once, for every record:
// the processes whose title names a config under the data root, and the
// listening sockets.
type machine struct {
	procs     map[string]supervisor.Process
	listeners supervisor.Listeners
	// loaders are the instances whose restore loader left its directory.
	loaders map[string]bool
}

// findProcess returns the live process of rec: the recorded one if it
// verifies, else one found in the /proc scan running rec's config. A
// process is rec's only when its title names rec's config, it runs a
// redis-server binary rec may run (the recorded one or the configured
// one) and it listens on rec's port: a `tail -f` of the config, or a
// redis-server started by hand to look like it, is not adopted.
func (s *Service) findProcess(rec state.Instance, m *machine) *supervisor.Process {
	conf := s.layout.ConfPath(rec.ID)
	verify := func(p supervisor.Process) error {
		binaries := []string{rec.Exe, rec.Binary, s.cfg.RedisServer}
		err := supervisor.VerifyServer(p, conf, binaries, rec.Port, m.listeners)
		if err != nil && rec.TLSPort != 0 {
			// TLS required closes the plain port.
			if supervisor.VerifyServer(p, conf, binaries, rec.TLSPort, m.listeners) == nil {
				return nil
			}
		}
		return err
	}
	if rec.PID != 0 {
		p := supervisor.Process{PID: rec.PID, StartTime: rec.StartTime}
		err := verify(p)
		if err == nil {
			return &p
		}
		s.log.Info("recorded process is gone or not the instance's", "instance", rec.ID, "pid", rec.PID, "reason", err)
	}
	if p, ok := m.procs[conf]; ok && (p.PID != rec.PID || p.StartTime != rec.StartTime) {
		err := verify(p)
		if err == nil {
			s.log.Info("found unrecorded process running the instance's config", "instance", rec.ID, "pid", p.PID)
			return &p
		}
		s.log.Warn("a process names the instance's config but is not its redis-server; not adopted, left alone", "instance", rec.ID, "pid", p.PID, "reason", err)
	}
	return nil
}

// finishInterrupted marks a provision that a crash interrupted as active
// once its process is ready. The broker, which got no answer, retries and
// is told the instance exists.
func (s *Service) finishInterrupted(ctx context.Context, id string) {
	in := s.runtime(id)
	if in == nil {
		return
	}
	if err := in.sup.WaitReady(ctx); err != nil {
		s.log.Warn("interrupted provision not ready yet", "instance", id, "err", err)
		return
	}
	unlock := s.locks.lock(id)
	defer unlock()
	_, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Phase == state.PhaseProvisioning {
			activate(r, in)
		}
		return nil
	})
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		s.log.Error("finish interrupted provision", "instance", id, "err", err)
	}
}

// findOrphans records instance directories and redis-server processes
// under our data root that no record owns.
func (s *Service) findOrphans(owned map[string]bool, procs map[string]supervisor.Process) {
	var orphans []Orphan
	dirs, err := s.layout.List()
	if err != nil {
		s.log.Error("list instance directories", "err", err)
	}
	for _, id := range dirs {
		if !owned[id] {
			orphans = append(orphans, Orphan{Kind: "directory", ID: id, Path: s.layout.Dir(id)})
		}
	}
	for conf, p := range procs {
		id := filepath.Base(filepath.Dir(conf))
		if !owned[id] {
			orphans = append(orphans, Orphan{Kind: "process", ID: id, Path: conf, PID: p.PID})
		}
	}
	for _, o := range orphans {
		s.log.Warn("orphan: no record owns it; left alone", "kind", o.Kind, "id", o.ID, "path", o.Path, "pid", o.PID)
	}
	s.orphans.Store(&orphans)
}

// killStray kills a redis-server still running id's config that no
// supervisor watches: one spawned by an agent that crashed before it could
// record or stop it. Only a process verified to run id's config is
// signalled.
func (s *Service) killStray(id string) error {
	conf := s.layout.ConfPath(id)
	procs, err := supervisor.Scan(func(c string) bool { return c == conf })
	if err != nil {
		return err
	}
	p, ok := procs[conf]
	if !ok {
		return nil
	}
	binaries := []string{s.cfg.RedisServer}
	if rec, err := s.store.Get(id); err == nil {
		binaries = append(binaries, rec.Exe, rec.Binary)
	}
	if err := supervisor.VerifyServer(p, conf, binaries, 0, nil); err != nil {
		s.log.Warn("a process names the deleted instance's config but is not its redis-server; left alone", "instance", id, "pid", p.PID, "reason", err)
		return nil
	}
	s.log.Warn("killing unsupervised redis-server of a deleted instance", "instance", id, "pid", p.PID)
	return killVerified(p, conf)
}

// killVerified SIGKILLs p, a process verified to run conf, and waits until
// it is gone (reaped by its parent, or a zombie: it need not be the agent's
// child), so its port and files are free afterwards.
func killVerified(p supervisor.Process, conf string) error {
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill pid %d: %w", p.PID, err)
	}
	for range 500 {
		if supervisor.Verify(p, conf) != nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("pid %d survived SIGKILL", p.PID)
}
