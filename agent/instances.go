package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/ports"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
	"github.com/redis-agent/redis-agent/volumes"
)

// logTailLines is how much of its log a non-running instance shows.
const logTailLines = 20

func validateID(kind, id string) error {
	if err := volumes.ValidateID(id); err != nil {
		return fmt.Errorf("%s id: %w: %w", kind, ErrInvalid, err)
	}
	return nil
}

// normalize fills in defaults and validates a spec.
func (s *Service) normalize(spec Spec) (Spec, error) {
	if spec.MemoryMB == 0 {
		spec.MemoryMB = s.cfg.DefaultMemoryMB
	}
	if spec.Persistence == "" {
		spec.Persistence = apitype.PersistenceAOF
	}
	if spec.MemoryMB < 0 {
		return spec, fmt.Errorf("memory_mb %d: %w: want a positive number of MiB", spec.MemoryMB, ErrInvalid)
	}
	if err := s.cfg.checkMemory(spec.MemoryMB); err != nil {
		return spec, err
	}
	if !redis.ValidPersistence(spec.Persistence) {
		return spec, fmt.Errorf("persistence %q: %w: want one of aof, aof-always, rdb, none", spec.Persistence, ErrInvalid)
	}
	if p := spec.ReplicaOf; p != nil && (p.Host == "" || p.Port < 1 || p.Port > 65535 || p.User == "" || p.Password == "") {
		return spec, fmt.Errorf("replica_of: %w: want host, port, user and password", ErrInvalid)
	}
	if p := spec.ReplicaOf; p != nil && p.TLS && (p.CACert == "" || spec.TLS == "" || spec.TLS == apitype.TLSOff) {
		return spec, fmt.Errorf("replica_of: %w: a link over TLS wants the primary's ca_cert, and tls on for the replica", ErrInvalid)
	}
	var err error
	if spec.MaxmemoryPolicy, err = normalizePolicy(spec.MaxmemoryPolicy); err != nil {
		return spec, err
	}
	if spec.MaxmemoryClients, err = normalizeClients(spec.MaxmemoryClients); err != nil {
		return spec, err
	}
	if spec.TLS, err = normalizeTLS(spec.TLS); err != nil {
		return spec, err
	}
	io, err := normalizeIO(spec.IO)
	if err != nil {
		return spec, err
	}
	spec.IO = io
	md, err := normalizeMetadata(spec.Metadata)
	spec.Metadata = md
	return spec, err
}

// normalizeMetadata checks an instance's opaque metadata and returns it
// compacted: a JSON object of at most apitype.MaxMetadataBytes; none is
// nil.
func normalizeMetadata(raw json.RawMessage) (json.RawMessage, error) {
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil || b.Bytes()[0] != '{' {
		return nil, fmt.Errorf("metadata: %w: want a JSON object", ErrInvalid)
	}
	if b.Len() > apitype.MaxMetadataBytes {
		return nil, fmt.Errorf("metadata: %w: %d bytes, at most %d", ErrInvalid, b.Len(), apitype.MaxMetadataBytes)
	}
	return b.Bytes(), nil
}

// notFound maps the store's ErrNotFound to the Service's.
func notFound(id string, err error) error {
	if errors.Is(err, state.ErrNotFound) {
		return fmt.Errorf("instance %q: %w", id, ErrNotFound)
	}
	return err
}

// updateActive applies fn to instance id's record, which must be active
// (ErrConflict while it is being provisioned or deleted), and
// commits it unless fn fails; ErrNotFound when there is none. The caller
// holds the instance's lock.
func (s *Service) updateActive(id string, fn func(*state.Instance) error) (state.Instance, error) {
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Phase != state.PhaseActive {
			return fmt.Errorf("instance %q is %s: %w", id, r.Phase, ErrConflict)
		}
		return fn(r)
	})
	return rec, notFound(id, err)
}

// Provision creates instance id with spec and returns once its redis-server
// answers PING. created is false when an identical instance already
// existed; a different one is ErrConflict.
func (s *Service) Provision(ctx context.Context, id string, spec Spec) (Instance, bool, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, false, err
	}
	start := time.Now()
	spec, err := s.normalize(spec)
	if err != nil {
		return Instance{}, false, err
	}
	// A caller that hangs up does not roll back a provision half-way: the
	// side effects run to the end and a retry finds the instance.
	ctx = context.WithoutCancel(ctx)
	unlock := s.locks.lock(id)
	defer unlock()

	rec := state.Instance{
		ID:            id,
		MemoryMB:      spec.MemoryMB,
		Persistence:   spec.Persistence,
		Metadata:      spec.Metadata,
		ReplicaOf:     primaryOf(spec.ReplicaOf),
		IO:            spec.IO,
		AdminPassword: redis.NewPassword(),
		Phase:         state.PhaseProvisioning,
		CreatedAt:     time.Now().UTC(),

		MaxmemoryPolicy:  spec.MaxmemoryPolicy,
		MaxmemoryClients: spec.MaxmemoryClients,
		TLS:              spec.TLS,
	}
	// The disk budget first (an instance that exists already is not
	// admitted again: an identical provision is a 200 however full the
	// disk), under admitMu until the record holds the reservation.
	s.admitMu.Lock()
	newUID := false
	if _, gerr := s.store.Get(id); errors.Is(gerr, state.ErrNotFound) {
		if err := s.admitDisk(s.reservation(spec.MemoryMB, spec.Persistence), fmt.Sprintf("an instance of %d MiB with persistence %s", spec.MemoryMB, spec.Persistence)); err != nil {
			s.admitMu.Unlock()
			return Instance{}, false, err
		}
		// Its own user in the record's first commit, not one of its own
		// after (uidMu until the record holds it).
		if s.uidsOn() {
			s.uidMu.Lock()
			uid, err := s.freeUID()
			if err != nil {
				s.uidMu.Unlock()
				s.admitMu.Unlock()
				return Instance{}, false, err
			}
			rec.UID, newUID = uid, true
		}
	}
	rec, err = s.store.CreatePorts(rec, func(u state.Usage) (int, int, error) {
		if free := s.cfg.MemoryBudgetMB - u.MemoryMB - int(s.transientMB.Load()); spec.MemoryMB > free {
			return 0, 0, fmt.Errorf("memory_mb %d does not fit: %d of %d MiB of the memory budget are free (%d MiB held by backups' forks and restores' candidates now): %w",
				spec.MemoryMB, max(free, 0), s.cfg.MemoryBudgetMB, s.transientMB.Load(), ErrCapacity)
		}
		port, err := s.alloc.Next(u.PortHeld)
		if errors.Is(err, ports.ErrExhausted) {
			return 0, 0, fmt.Errorf("%w: every port of %d-%d is taken", ErrCapacity, s.cfg.PortMin, s.cfg.PortMax)
		}
		if err != nil || spec.TLS == apitype.TLSOff {
			return port, 0, err
		}
		// TLS: a second port from the same range.
		tlsPort, err := s.alloc.Next(func(p int) bool { return p == port || u.PortHeld(p) })
		if errors.Is(err, ports.ErrExhausted) {
			return 0, 0, fmt.Errorf("%w: TLS takes a second port, and every other port of %d-%d is taken", ErrCapacity, s.cfg.PortMin, s.cfg.PortMax)
		}
		return port, tlsPort, err
	})
	if newUID {
		s.uidMu.Unlock()
	}
	s.admitMu.Unlock()
	if err == nil {
		if newUID {
			s.log.Info("instance user", "instance", id, "uid", rec.UID)
		}
		crashAt(FaultProvisionRecorded)
	}
	switch {
	case errors.Is(err, state.ErrExists):
		if rec.MemoryMB != spec.MemoryMB || rec.Persistence != spec.Persistence {
			return Instance{}, false, fmt.Errorf("instance %q exists with memory_mb %d and persistence %s: %w",
				id, rec.MemoryMB, rec.Persistence, ErrConflict)
		}
		if policyOf(rec) != spec.MaxmemoryPolicy || clientsOf(rec) != spec.MaxmemoryClients || tlsOf(rec) != spec.TLS {
			return Instance{}, false, fmt.Errorf("instance %q exists with maxmemory_policy %s, maxmemory_clients %s and tls %s: %w",
				id, policyOf(rec), clientsOf(rec), tlsOf(rec), ErrConflict)
		}
		if !bytes.Equal(rec.Metadata, spec.Metadata) {
			return Instance{}, false, fmt.Errorf("instance %q exists with other metadata: %w", id, ErrConflict)
		}
		if !sameIO(rec.IO, spec.IO) {
			return Instance{}, false, fmt.Errorf("instance %q exists with other io limits: %w", id, ErrConflict)
		}
		if rec.Phase == state.PhaseDeleting {
			return Instance{}, false, fmt.Errorf("instance %q is being deleted: %w", id, ErrConflict)
		}
		if rec.Phase == state.PhaseProvisioning {
			// An earlier provision did not finish (its rollback failed):
			// finish it now.
			inst, err := s.finishProvision(ctx, rec)
			return inst, false, err
		}
		return s.view(rec), false, nil
	case err != nil:
		return Instance{}, false, err
	}
	inst, err := s.finishProvision(ctx, rec)
	if err == nil {
		s.metrics.observe("provision", start)
	}
	return inst, err == nil, err
}

// finishProvision does the side effects of a provisioning record: files,
// process, readiness, then marks it active. On failure it rolls back
// everything, the record included.
func (s *Service) finishProvision(ctx context.Context, rec state.Instance) (Instance, error) {
	log := s.log.With("instance", rec.ID)
	fail := func(err error) (Instance, error) {
		log.Error("provision failed, rolling back", "err", err)
		if rerr := s.destroy(rec.ID); rerr != nil {
			log.Error("rollback failed; the record stays for reconcile", "err", rerr)
		}
		return Instance{}, fmt.Errorf("provision %q: %w", rec.ID, err)
	}
	// After an agent crash, reconcile may already supervise the instance:
	// then only readiness is left to wait for.
	in := s.runtime(rec.ID)
	var confHash string
	if in == nil {
		// Its own user before its first file.
		var err error
		if rec, err = s.ensureUID(rec.ID); err != nil {
			return fail(err)
		}
		if rec, err = s.ensureCert(rec); err != nil {
			return fail(err)
		}
		// Its ConfigHash is written with the phase, below: a commit
		// less before the start (the hash only tells reconcile of an
		// adopted process with an older config).
		if confHash, err = s.writeFiles(rec); err != nil {
			return fail(err)
		}
		crashAt(FaultProvisionFiles)
		in = s.supervise(rec, nil)
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.ReadyTimeout+time.Second)
	defer cancel()
	if err := in.sup.WaitReady(rctx); err != nil {
		return fail(err)
	}
	crashAt(FaultProvisionReady)
	// Its executable in this commit too: the syncLive after its Ready
	// (which waits for this provision's lock) then has nothing to write.
	exe, _ := supervisor.Executable(in.sup.Status().Process.PID)
	rec, err := s.store.Update(rec.ID, func(r *state.Instance) error {
		activate(r, in)
		if confHash != "" {
			r.ConfigHash = confHash
		}
		if exe != "" {
			r.Exe = exe
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	log.Info("provisioned", "port", rec.Port, "memory_mb", rec.MemoryMB, "persistence", rec.Persistence)
	s.measure(rec)
	return s.view(rec), nil
}

// supervise starts the supervisor of rec, adopting adopt when set.
func (s *Service) supervise(rec state.Instance, adopt *supervisor.Process) *instance {
	in := s.prepare(rec, adopt)
	go in.sup.Run(s.ctx)
	return in
}

// prepare creates and registers the supervisor of rec without running it.
func (s *Service) prepare(rec state.Instance, adopt *supervisor.Process) *instance {
	log := s.log.With("instance", rec.ID)
	admin := redis.NewAdmin(s.cfg.BindHost, rec.Port, rec.AdminPassword)
	id := rec.ID
	in := &instance{admin: admin, drift: func() { s.background(func(ctx context.Context) { s.syncLive(ctx, id) }) }}
	in.wantLimits = func() limits.Limits {
		return s.liveLimits(id, int(in.memoryMB.Load()), rec.Persistence, in.io.Load())
	}
	in.limitsDrift = func() bool {
		d, err := s.cg.Differs(id, in.wantLimits())
		return err == nil && d
	}
	in.memoryMB.Store(int64(rec.MemoryMB))
	in.policy.Store(policyOf(rec))
	s.useTLS(in, rec)
	in.io.Store(rec.IO)
	env, notify := redis.Env, supervisor.Notifier(nil)
	if s.notify != nil {
		env, notify = append(slices.Clip(redis.Env), s.notify.Env()), s.notify
	}
	sup := supervisor.New(supervisor.Config{
		Binary:       s.binaryOf(rec),
		ConfPath:     s.layout.ConfPath(id),
		Dir:          s.layout.DataDir(id),
		LogPath:      s.layout.LogPath(id),
		Env:          env,
		Command:      s.startCommand(id),
		OOMScoreAdj:  instanceOOMScoreAdj,
		Admin:        admin,
		Notify:       notify,
		Check:        in.check,
		Policy:       s.cfg.Restart,
		ReadyTimeout: s.cfg.ReadyTimeout,
		StopTimeout:  s.cfg.StopTimeout,
		Health:       s.cfg.Health,
		Adopt:        adopt,
		StartGate:    s.startGate(rec.ID),
		Restarts:     rec.Restarts,
		Logger:       log,
		OnEvent:      func(ev supervisor.Event) { s.persistEvent(id, ev) },
		Classify:     func(ex *supervisor.Exit) { s.classify(id, in, ex) },
	})
	in.sup = sup
	s.metrics.track(id)
	n, _ := s.cg.OOMKills(id)
	in.oomKills.Store(n)
	// Its directory's quota (an adopted instance's is set again: a resize
	// an agent crash cut short).
	s.applyQuota(rec)
	// An adopted process keeps its cgroup, unless it is not in it. Whether
	// the cgroup's limits are the record's (a resize an agent crash cut
	// short, changed --cpu-shares or --pids-limit) syncLive checks once it
	// is ready, in the background: reading every cgroup's files here was
	// half of an agent restart's time at a thousand instances.
	if adopt != nil && !s.cg.Contains(id, adopt.PID) {
		s.confine(id, adopt.PID)
	}
	s.mu.Lock()
	s.instances[id] = in
	s.mu.Unlock()
	return in
}

// startGate is the start gate of id in the order of starts of a
// reconcile under way (bootOrder), nil otherwise.
func (s *Service) startGate(id string) <-chan struct{} {
	if b := s.boot.Load(); b != nil {
		return b.gate(id)
	}
	return nil
}

// binaryOf is the redis-server rec's instance runs: the one it was
// started from, until a rollout moves it, unless that is no longer
// executable.
func (s *Service) binaryOf(rec state.Instance) string {
	if rec.Binary != "" && rec.Binary != s.cfg.RedisServer && syscall.Access(rec.Binary, 1 /* X_OK */) == nil {
		return rec.Binary
	}
	return s.cfg.RedisServer
}

// persistEvent records what adoption and the API need: the process of a
// Started event before anything else, and the exit and restart count of an
// Exited one.
func (s *Service) persistEvent(id string, ev supervisor.Event) {
	in := s.runtime(id)
	if in != nil && ev.Kind != supervisor.Ready {
		// A new or no process: what was checked of the last one is not
		// this one's.
		in.stats.Store(nil)
	}
	switch ev.Kind {
	case supervisor.Started:
		if in != nil {
			in.started.Store(&ev)
		}
		s.confine(id, ev.Process.PID)
		crashAt(FaultSpawnUnrecorded)
	case supervisor.Ready:
		// The process may have read an older ACL file or config than the
		// record says (a bind or resize raced with its start, or it was
		// adopted). syncLive records its executable too: not here, in the
		// supervisor's loop, whose commit a provision's last one would
		// wait for.
		s.background(func(ctx context.Context) { s.syncLive(ctx, id) })
		return
	}
	update := func(fn func(*state.Instance) error) error { _, err := s.store.Update(id, fn); return err }
	if s.booting.Load() {
		// A thousand starts at once: their records share commits.
		update = func(fn func(*state.Instance) error) error { return s.store.UpdateBatched(id, fn) }
	}
	err := update(func(r *state.Instance) error {
		switch ev.Kind {
		case supervisor.Started:
			if r.Phase == state.PhaseProvisioning {
				// The provision's activating commit records it: a commit
				// (an fsync, in the supervisor's loop) less per provision.
				// An agent that dies before finds it as after a crash at
				// FaultSpawnUnrecorded.
				return nil
			}
			recordStart(r, ev)
		case supervisor.Exited:
			if ev.Exit != nil && ev.Exit.Reason != apitype.ReasonStopped {
				s.metrics.restarts.WithLabelValues(id, ev.Exit.Reason).Inc()
			}
			r.PID, r.StartTime = 0, 0
			r.Restarts = ev.Restarts
			if ev.Exit != nil {
				r.LastExit = lastExit(ev.Exit)
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		s.log.Error("persist process event", "instance", id, "err", err)
	}
}

// recordStart records in r the process a Started event tells of.
func recordStart(r *state.Instance, ev supervisor.Event) {
	r.PID, r.StartTime = ev.Process.PID, ev.Process.StartTime
	// The file, not just the path: a package upgrade in place makes a
	// restart run the new binary.
	r.Binary = ev.Binary
	r.BinaryID, _ = binaryID(ev.Binary)
}

// activate makes a provisioning record r active, with the process in
// started (the Started event its record skipped), if one started.
func activate(r *state.Instance, in *instance) {
	r.Phase = state.PhaseActive
	if ev := in.started.Load(); ev != nil {
		recordStart(r, *ev)
	}
}

// lastExit is a supervisor's exit as the record keeps it and the API
// shows it, in UTC: the one conversion between the two.
func lastExit(ex *supervisor.Exit) *apitype.Exit {
	return &apitype.Exit{Time: ex.Time.UTC(), Code: ex.Code, Signal: ex.Signal, Reason: ex.Reason, Message: ex.Message}
}

// recordExe records the executable a ready process runs, for adoption to
// check, when it is not what the record says already.
func (s *Service) recordExe(id string, pid int) {
	exe, err := supervisor.Executable(pid)
	if err != nil {
		return // gone already
	}
	if rec, err := s.store.Get(id); err != nil || rec.Exe == exe {
		return
	}
	if _, err := s.store.Update(id, func(r *state.Instance) error { r.Exe = exe; return nil }); err != nil && !errors.Is(err, state.ErrNotFound) {
		s.log.Error("record the executable", "instance", id, "err", err)
	}
}

// limitsFor are the cgroup limits of an instance of memoryMB maxmemory
// with persistence and IO setting io. With the data directory on tmpfs,
// the instance's files are memory charged to its cgroup, so the limit has
// room for them too.
func (s *Service) limitsFor(memoryMB int, persistence string, io *apitype.IOSetting) limits.Limits {
	mem := limits.MemoryFor(memoryMB)
	if s.dataOnTmpfs {
		mem += apitype.DataFilesBytes(memoryMB, persistence)
	}
	return limits.Limits{MemoryBytes: mem, CPUShares: s.cfg.CPUShares, CPUQuota: s.cfg.CPUQuota, Pids: s.cfg.Pids, IO: s.ioFor(io)}
}

// instanceOOMScoreAdj is every redis-server's oom_score_adj (a restore's
// candidate's too): under memory pressure the kernel kills a tenant before
// the agent.
const instanceOOMScoreAdj = 500

// liveLimits are limitsFor of instance id as its cgroup has them now:
// while a restore's candidate shares it with the running process, with
// the memory and pids of a second one.
func (s *Service) liveLimits(id string, memoryMB int, persistence string, io *apitype.IOSetting) limits.Limits {
	l := s.limitsFor(memoryMB, persistence, io)
	if in := s.runtime(id); in != nil && in.side.Load() {
		l.MemoryBytes *= 2
		l.Pids *= 2
	}
	return l
}

// confine puts the process of id into the instance's cgroup. A failure is
// logged: the instance runs, unconfined, rather than not at all.
func (s *Service) confine(id string, pid int) {
	if pid == 0 {
		return
	}
	rec, err := s.store.Get(id)
	if err != nil {
		return
	}
	l := s.liveLimits(id, rec.MemoryMB, rec.Persistence, rec.IO)
	if err := s.cg.Apply(id, pid, l); err != nil {
		s.log.Error("cannot confine redis-server to its cgroup", "instance", id, "pid", pid, "err", err)
		return
	}
	if in := s.runtime(id); in != nil {
		in.confined.Store(&confinedTo{pid: pid, limits: l})
	}
}

// classify calls an exit oom (apitype.ReasonOOM) when the instance's
// cgroup counted a new OOM kill.
func (s *Service) classify(id string, in *instance, ex *supervisor.Exit) {
	n, err := s.cg.OOMKills(id)
	if err != nil {
		return
	}
	if n > in.oomKills.Swap(n) && ex.Signal == "killed" {
		ex.Reason = apitype.ReasonOOM
	}
}

// syncLive brings the live ACL users and maxmemory of id in line with its
// record, records the executable of its process, and removes an RDB the
// process has loaded that its persistence mode does not keep. It takes
// the id's lock, so it never races a bind, unbind or resize.
func (s *Service) syncLive(ctx context.Context, id string) {
	unlock := s.locks.lock(id)
	defer unlock()
	if in := s.runtime(id); in != nil {
		if pid := in.sup.Status().Process.PID; pid != 0 {
			s.recordExe(id, pid)
		}
	}
	rec, err := s.store.Get(id)
	if err != nil {
		return
	}
	if err := s.applyACL(ctx, rec); err != nil && ctx.Err() == nil {
		s.log.Error("ACL users differ from the record's and cannot be applied; retried at the next health check", "instance", id, "err", err)
	}
	s.dropRDB(rec)
	in := s.runtime(id)
	if in == nil {
		return
	}
	if in.sup.Status().State == supervisor.Running {
		if err := s.syncSettings(ctx, in, rec); err != nil && ctx.Err() == nil {
			s.log.Warn("sync the eviction, client memory and TLS settings; tried again at the next start or change", "instance", id, "err", err)
		}
	}
	// Whether the live maxmemory differs is known from a health check; a
	// Ready before the first one (a start or an adoption) leaves it to
	// that check, which comes back here when it does. Setting it blindly
	// would cost every adopted instance a connection at agent start.
	// The cgroup's limits are read back unless they were given to this
	// very process a moment ago (the Ready after its start).
	if pid := in.sup.Status().Process.PID; pid != 0 && !in.justConfined(pid) && in.limitsDrift() {
		s.log.Warn("cgroup limits differ from the record's; applying them", "instance", id)
		s.confine(id, pid)
	}
	want := float64(int64(rec.MemoryMB) << 20)
	hs := in.current(in.sup.Status())
	if hs == nil || (hs.ok && hs.info.MaxMemory == want) {
		return
	}
	if err := s.applyMemory(ctx, in, id, rec.MemoryMB, want < hs.info.MaxMemory); err != nil && ctx.Err() == nil {
		s.log.Warn("sync maxmemory", "instance", id, "err", err)
	}
}

func (s *Service) runtime(id string) *instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.instances[id]
}

// destroy stops the process of id without saving, removes its files and
// its record. Each step tolerates what an earlier, interrupted destroy
// already did.
func (s *Service) destroy(id string) error {
	rec, recErr := s.store.Get(id)
	s.stopForwarding(id)
	if in := s.runtime(id); in != nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.StopTimeout+10*time.Second)
		err := in.sup.Stop(ctx, true)
		cancel()
		if err != nil {
			return fmt.Errorf("stop: %w", err)
		}
		in.admin.Close()
		s.mu.Lock()
		delete(s.instances, id)
		s.mu.Unlock()
	} else if err := s.killStray(id); err != nil {
		return err
	}
	crashAt(FaultDeleteStopped)
	// A leftover cgroup directory must not keep a tenant's data alive.
	if err := s.cg.Remove(id); err != nil {
		s.log.Warn("cgroup left behind", "instance", id, "err", err)
	}
	if err := s.layout.Remove(id); err != nil {
		return err
	}
	if recErr == nil {
		s.clearQuota(rec)
	}
	crashAt(FaultDeleteRemoved)
	// Its uid is free once the record is gone: a freeUID from then on
	// looks at /proc again, after its processes ended.
	s.deletes.Add(1)
	if err := s.store.Delete(id); err != nil && !errors.Is(err, state.ErrNotFound) {
		return err
	}
	s.metrics.forget(id)
	s.certExpiry.Delete(id)
	s.disk.forget(id)
	return nil
}

// Deprovision stops the instance, removes its data and frees its port.
func (s *Service) Deprovision(ctx context.Context, id string) error {
	if err := validateID("instance", id); err != nil {
		return err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	start := time.Now()
	_, err := s.store.Update(id, func(r *state.Instance) error { r.Phase = state.PhaseDeleting; return nil })
	if err != nil {
		return notFound(id, err)
	}
	crashAt(FaultDeleteMarked)
	if err := s.destroy(id); err != nil {
		return fmt.Errorf("deprovision %q: %w", id, err)
	}
	s.metrics.observe("deprovision", start)
	s.log.Info("deprovisioned", "instance", id)
	return nil
}

// Get returns the instance id.
func (s *Service) Get(ctx context.Context, id string) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	rec, err := s.store.Get(id)
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	return s.view(rec), nil
}

// List returns every instance, sorted by id.
func (s *Service) List(ctx context.Context) ([]Instance, error) {
	recs, err := s.store.List()
	if err != nil {
		return nil, err
	}
	out := make([]Instance, 0, len(recs))
	for _, rec := range recs {
		out = append(out, s.view(rec))
	}
	return out, nil
}

// Restart restarts the instance's process gracefully (its data persisted
// as its config says) and returns once the new process answers PING.
func (s *Service) Restart(ctx context.Context, id string) error {
	if err := validateID("instance", id); err != nil {
		return err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	start := time.Now()
	rec, err := s.store.Get(id)
	if err != nil {
		return notFound(id, err)
	}
	in := s.runtime(id)
	if rec.Phase != state.PhaseActive || in == nil {
		return fmt.Errorf("instance %q is %s: %w", id, rec.Phase, ErrConflict)
	}
	if err := in.sup.Restart(ctx); err != nil {
		return fmt.Errorf("restart %q: %w", id, err)
	}
	if err := in.waitReady(ctx); err != nil {
		return fmt.Errorf("restart %q: %w: %v", id, ErrNotReady, err)
	}
	s.metrics.observe("restart", start)
	return nil
}

// MaxLogLines bounds a log request.
const MaxLogLines = 10000

// Log returns the last n lines of the instance's redis-server log.
func (s *Service) Log(ctx context.Context, id string, n int) ([]string, error) {
	if err := validateID("instance", id); err != nil {
		return nil, err
	}
	if n < 1 || n > MaxLogLines {
		return nil, fmt.Errorf("lines %d: %w: want 1 to %d", n, ErrInvalid, MaxLogLines)
	}
	if _, err := s.store.Get(id); err != nil {
		return nil, notFound(id, err)
	}
	lines, err := volumes.Tail(s.layout.LogPath(id), n)
	if lines == nil {
		lines = []string{}
	}
	return lines, err
}

// Capacity says how much room is left for new instances.
func (s *Service) Capacity(ctx context.Context) (Capacity, error) {
	u, err := s.store.Usage()
	if err != nil {
		return Capacity{}, err
	}
	draining, err := s.store.Draining()
	if err != nil {
		return Capacity{}, err
	}
	b, err := s.diskBudget()
	if err != nil {
		return Capacity{}, err
	}
	c := Capacity{
		Draining:           draining,
		Instances:          u.Instances,
		PortsTotal:         s.cfg.PortMax - s.cfg.PortMin + 1,
		MemoryTotalMB:      s.cfg.MemoryBudgetMB,
		MemoryReservedMB:   u.MemoryMB,
		MemoryFreeMB:       max(s.cfg.MemoryBudgetMB-u.MemoryMB-int(s.transientMB.Load()), 0),
		DiskTotalBytes:     b.total,
		DiskFreeBytes:      b.free,
		DiskReservedBytes:  b.reserved,
		DiskUsedBytes:      b.used,
		DiskAvailableBytes: b.available,
		DiskOverheadBytes:  s.reservation(0, apitype.PersistenceNone),
		DiskBudgetOff:      s.cfg.DiskBudget == "off",
	}
	if s.bk != nil {
		c.BackupAgent = s.cfg.Backup.AgentName
	}
	t, err := s.roll.target(ctx)
	if err != nil {
		return Capacity{}, err
	}
	c.RedisVersion = t.version.Version
	for p := s.cfg.PortMin; p <= s.cfg.PortMax; p++ {
		if !u.PortHeld(p) && !s.alloc.Busy(p) {
			c.PortsFree++
		}
	}
	return c, nil
}

// view combines a record with the live status of its process.
func (s *Service) view(rec state.Instance) Instance {
	inst := Instance{
		ID:          rec.ID,
		State:       apitype.StateStopped,
		MemoryMB:    rec.MemoryMB,
		Persistence: rec.Persistence,
		Host:        s.cfg.advertiseHost(),
		Port:        rec.Port,
		CreatedAt:   rec.CreatedAt,

		MaxmemoryPolicy:  policyOf(rec),
		MaxmemoryClients: clientsOf(rec),
		TLS:              tlsOf(rec),
		TLSPort:          rec.TLSPort,
		Restarts:         rec.Restarts,
		Bindings:         []string{},
		Binary:           rec.Binary,
		Metadata:         rec.Metadata,
		UID:              rec.UID,
	}
	inst.RedisVersion = s.roll.versionOf(rec)
	inst.Backup = s.backupStatus(rec)
	for bid := range rec.Bindings {
		inst.Bindings = append(inst.Bindings, bid)
	}
	slices.Sort(inst.Bindings)
	inst.LastExit = rec.LastExit
	if in := s.runtime(rec.ID); in != nil {
		st := in.sup.Status()
		inst.State = st.State.String()
		inst.PID = st.Process.PID
		inst.Restarts = st.Restarts
		inst.Binary = st.Binary
		if st.Process.PID != 0 && !st.StartedAt.IsZero() {
			inst.UptimeSeconds = time.Since(st.StartedAt).Seconds()
		}
		if hs := in.current(st); hs != nil && hs.ok && st.State == supervisor.Running {
			inst.MemoryUsedBytes, inst.RSSBytes = int64(hs.info.UsedMemory), int64(hs.rss)
		}
		if st.LastExit != nil {
			inst.LastExit = lastExit(st.LastExit)
		}
	}
	if p := rec.ReplicaOf; p != nil {
		inst.ReplicaOf = net.JoinHostPort(p.Host, strconv.Itoa(p.Port))
	}
	inst.IO = s.ioView(rec.IO)
	inst.Disk = s.diskView(rec)
	if m := rec.Move; m != nil {
		inst.Move = &apitype.MoveStatus{State: m.State, StartedAt: m.StartedAt, CutoverAt: m.CutoverAt, ForwardTo: m.ForwardTo}
		if m.State == state.MoveForwarding {
			inst.State = apitype.StateForwarding
			s.mu.Lock()
			if f := s.forwarders[rec.ID]; f != nil {
				inst.Move.Forwarded = f.Active()
			}
			s.mu.Unlock()
		}
	}
	if rec.Phase == state.PhaseDeleting {
		inst.State = apitype.StateStopping
	}
	if inst.State != apitype.StateRunning && inst.State != apitype.StateStopping && inst.State != apitype.StateForwarding {
		// Why it does not run is in its log.
		inst.LogTail, _ = volumes.Tail(s.layout.LogPath(rec.ID), logTailLines)
	}
	return inst
}

// limitsEvery is how many health checks go by between two comparisons of
// an instance's cgroup limits with its record (a minute at the default
// interval).
const limitsEvery = 6

// infoEvery is how many health checks go by between two INFOs of an
// instance (30 s at the default interval): the checks between are a PING.
// An idle agent's CPU is its health checks, and INFO (a few KiB to write
// and parse, and /proc read beside it) costs twice a PING.
const infoEvery = 3

// check is the health check: on the kept admin connection, PING or, every
// infoEvery-th time (the first included, and whenever the last INFO of
// this process is missing or failed), INFO plus the process's RSS and CPU
// from /proc. Either answers while loading, and BUSY during a long
// script, both alive. What INFO sees is cached for metrics, so a scrape
// does no I/O to instances; a failed PING marks the cache not ok (the
// metrics show the instance down) and makes the next check an INFO.
func (in *instance) check(ctx context.Context, pid int) error {
	n := in.checks.Add(1) - 1
	last := in.stats.Load()
	if n%infoEvery != 0 && last != nil && last.pid == pid && last.ok {
		err := in.admin.Ping(ctx)
		if err != nil {
			failed := *last
			failed.ok = false
			in.stats.CompareAndSwap(last, &failed)
		}
		if in.aclPending.Load() && in.drift != nil {
			in.drift()
		}
		return err
	}
	info, err := in.admin.Info(ctx)
	st := &instanceStats{pid: pid, ok: err == nil, info: info, checked: time.Now()}
	st.rss, st.cpu = procUsage(pid)
	in.stats.Store(st)
	// The cgroup's limits (four files) every limitsEvery-th check: at 1000
	// instances every check would be a tenth of the agent's idle CPU. Not
	// at the first, which comes just before Ready: the syncLive that every
	// Ready runs compares them.
	drifted := in.aclPending.Load() || n > 0 && n%limitsEvery == 0 && in.limitsDrift()
	if want := in.memoryMB.Load() << 20; err == nil && want > 0 && info.MaxMemory != float64(want) {
		drifted = true
	}
	if want, _ := in.policy.Load().(string); err == nil && want != "" && info.MaxmemoryPolicy != "" && info.MaxmemoryPolicy != want {
		drifted = true
	}
	if drifted && in.drift != nil {
		in.drift()
	}
	return err
}

// current returns the stats of the instance's current process, or nil
// when the last check was of an earlier one (or none was made).
func (in *instance) current(st supervisor.Status) *instanceStats {
	hs := in.stats.Load()
	if hs == nil || st.Process.PID == 0 || hs.pid != st.Process.PID {
		return nil
	}
	return hs
}

// settled returns the status of in once it is no longer starting: a
// process that is starting, loading its data, or adopted without its
// first check yet is as good as running in a moment.
func (in *instance) settled(ctx context.Context) supervisor.Status {
	if in.sup.Status().State == supervisor.Starting {
		in.waitReady(ctx)
	}
	return in.sup.Status()
}

// waitReady waits until the process of in answers PING after a start.
// Its only deadline is candidateTimeout: the supervisor itself gives up on a
// start that does not answer within ReadyTimeout, except while the server
// is loading its data set, which takes as long as the data set is large.
func (in *instance) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, candidateTimeout)
	defer cancel()
	return in.sup.WaitReady(ctx)
}

// primaryOf is the record's form of a provision's replica_of.
func primaryOf(p *apitype.Primary) *state.Primary {
	if p == nil {
		return nil
	}
	return &state.Primary{Host: p.Host, Port: p.Port, User: p.User, Password: p.Password, TLS: p.TLS, CACert: p.CACert}
}

// SetDraining records the brokers' drain mark: nothing new is to be placed
// on this agent. The agent itself places nothing; it keeps the mark so
// that every broker, and one that restarts, sees it in the capacity.
func (s *Service) SetDraining(ctx context.Context, on bool) error {
	if err := s.store.SetDraining(on); err != nil {
		return err
	}
	s.log.Info("drain mark", "draining", on)
	return nil
}
