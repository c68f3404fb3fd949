// Package agent is the Service the API calls: it provisions, binds,
// restarts and deletes instances by combining the state store, the port
// allocator, the per-instance volumes, the Redis config renderer and one
// supervisor per instance, and at start it reconciles what the state says
// with what runs on the machine. Restores load their file in a candidate
// that becomes the instance (candidate.go) and rollouts are a type of their own (rollout.go); serving
// the API and talking to systemd are package server's.
//
// Every operation writes its intent to the state store before it has a
// side effect, so a crash at any point leaves a record that reconcile can
// finish (provisioning) or carry out (deleting).
package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/backup"
	"github.com/redis-agent/redis-agent/confine"
	"github.com/redis-agent/redis-agent/forward"
	"github.com/redis-agent/redis-agent/internal/sdnotify"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/ports"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
	"github.com/redis-agent/redis-agent/volumes"
	"golang.org/x/sys/unix"
)

// Service implements the agent's operations. Create it with New, call
// Reconcile once, then use it from any goroutine; Close leaves every
// redis-server running.
type Service struct {
	cfg    Config
	log    *slog.Logger
	store  *state.Store
	layout volumes.Layout
	alloc  ports.Allocator
	// cred is the shared Redis user (RedisUser), nil when there is none.
	cred *syscall.Credential
	// uidMin-uidMax are the instance users' uids, 0-0 when instances have
	// none (uidReason says why); uidMu orders their allocation.
	uidMin, uidMax int
	uidReason      string
	uidMu          sync.Mutex
	// procUIDs is the last scan of the running processes' uids, made at
	// procUIDsAt when deletes was procUIDsDeletes (freeUID, under uidMu);
	// deletes counts the records deleted.
	procUIDs        map[int]bool
	procUIDsAt      time.Time
	procUIDsDeletes uint64
	deletes         atomic.Uint64
	// launcher confines every redis-server ("" runs them unconfined) with
	// what the kernel supports; notes say what is missing.
	launcher string
	support  confine.Support
	notes    []string
	// notify receives the instances' READY=1 (nil: their starts are
	// polled).
	notify *sdnotify.Listener

	// ctx is the supervisors' lifetime: cancelling it is agent shutdown.
	ctx    context.Context
	cancel context.CancelFunc

	locks keyedMutex

	mu        sync.Mutex
	instances map[string]*instance // live supervision, by id
	// forwarders hold the old ports of instances moved away, by id.
	forwarders map[string]*forward.Forwarder

	reconciled atomic.Bool
	orphans    atomic.Pointer[[]Orphan]
	metrics    *metrics
	// cg manages the instances' cgroups; limits.None when off or
	// unavailable.
	cg cgroups
	// boot is the order of starts of the reconcile under way (only
	// Reconcile sets it, before the API serves), nil after.
	boot atomic.Pointer[bootOrder]
	// booting is set from the start of Reconcile until its order of
	// starts is through: the process records share commits meanwhile.
	booting atomic.Bool
	// dataOnTmpfs is set when the data root is on tmpfs, where instances'
	// files are memory charged to their cgroups.
	dataOnTmpfs bool
	// dev is the data root's block device, which IO limits are set on;
	// ioNote says why they are not enforced ("" when they are).
	dev    limits.Device
	ioNote string
	// disk holds the last measure of every instance's files; admitMu
	// orders the admissions against the disk budget; logOnDataFS is set
	// when the logs are on the data file system (and count against it).
	disk        diskState
	admitMu     sync.Mutex
	logOnDataFS bool
	// quota sets the instances' project quotas where the data file
	// system enforces them (nil elsewhere, and quotaNote says why).
	quota     *limits.Quotas
	quotaNote string
	// statfs is unix.Statfs (nil), or a test's file system.
	statfs func(path string, st *unix.Statfs_t) error

	roll *rollouts
	// ca signs the instances' TLS certificates; certExpiry holds when each
	// instance's expires (Unix seconds, by id), for the metric.
	ca         *certAuthority
	certExpiry sync.Map
	// bk is the backup target and its schedule; nil without a target.
	bk *backups
	// transientMB is memory counted against the budget for as long as
	// something runs beside the instances: BGSAVE forks, restores'
	// candidates.
	transientMB atomic.Int64
	// wg counts the Service's goroutines other than the supervisors' (a
	// rollout, a live sync, an interrupted provision's finish): Close waits
	// for them. bgMu orders their start against Close (see background).
	wg   sync.WaitGroup
	bgMu sync.Mutex
}

// cgroups is what the Service does with its instances' cgroups: a
// *limits.Manager, or limits.None where instances run without.
type cgroups interface {
	Apply(id string, pid int, l limits.Limits) error
	OOMKills(id string) (uint64, error)
	Contains(id string, pid int) bool
	Differs(id string, want limits.Limits) (bool, error)
	Remove(id string) error
	RemoveRootIfEmpty()
	IOSupported() (bool, string)
}

var (
	_ cgroups = (*limits.Manager)(nil)
	_ cgroups = limits.None{}
)

// instance is the runtime side of one record.
type instance struct {
	sup   *supervisor.Supervisor
	admin *redis.Admin
	// stats is what the last health check saw; metrics read it.
	stats atomic.Pointer[instanceStats]
	// oomKills is the cgroup's OOM-kill count last seen.
	oomKills atomic.Uint64
	// memoryMB is the record's maxmemory; a health check that sees the
	// server at another calls drift (a resize a crash cut short, on a
	// process adopted since).
	memoryMB atomic.Int64
	// io is the record's IO setting, for the cgroup limits' drift check.
	io    atomic.Pointer[apitype.IOSetting]
	drift func()
	// side is set while a restore's candidate shares the cgroup with
	// the running process: the cgroup has room for both (liveLimits).
	side atomic.Bool
	// wantLimits are the cgroup limits the record gives now (liveLimits).
	wantLimits func() limits.Limits
	// limitsDrift reports whether the cgroup's limits differ from them.
	limitsDrift func() bool
	// confined is the process last put into the cgroup and the limits
	// given it then, until the syncLive after (its Ready) takes it
	// (justConfined): that sync need not read the limits back.
	confined atomic.Pointer[confinedTo]
	// checks counts the health checks.
	checks atomic.Uint64
	// aclPending is set while an ACL change could not be applied to the
	// running server; the next health check tries again.
	aclPending atomic.Bool
	// policy is the record's maxmemory-policy (a string); a health check
	// that sees another calls drift.
	policy atomic.Value
	// started is the last Started event: a provision's activating commit
	// records its process (recordStart), its Started event does not.
	started atomic.Pointer[supervisor.Event]
}

// instanceStats is one health check's harvest: INFO and /proc figures of
// the process pid. Figures of another pid than the current process's are
// stale (it restarted since) and shown as none.
type instanceStats struct {
	pid     int
	ok      bool
	info    redis.Info
	rss     float64 // bytes
	cpu     float64 // seconds, user + system
	checked time.Time
}

// confinedTo is a process the agent has just put into its cgroup, with
// the limits it gave the cgroup.
type confinedTo struct {
	pid    int
	limits limits.Limits
}

// justConfined takes confined: whether it is pid, with the limits the
// record gives now.
func (in *instance) justConfined(pid int) bool {
	c := in.confined.Swap(nil)
	return c != nil && c.pid == pid && c.limits == in.wantLimits()
}

// New opens the state and prepares the directories. It starts nothing:
// call Reconcile.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Backup = cfg.Backup.withDefaults()
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Service{
		cfg:        cfg,
		log:        log,
		alloc:      ports.Allocator{Range: ports.Range{Min: cfg.PortMin, Max: cfg.PortMax}, Busy: ports.ListenProbe(cfg.BindHost)},
		instances:  map[string]*instance{},
		forwarders: map[string]*forward.Forwarder{},
	}
	s.layout = volumes.Layout{
		DataRoot: filepath.Join(cfg.DataDir, "instances"),
		LogRoot:  cfg.logDir(),
	}
	if cfg.RedisUser != "" && syscall.Geteuid() == 0 {
		u, err := user.Lookup(cfg.RedisUser)
		if err != nil {
			return nil, fmt.Errorf("redis user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	}
	switch {
	case syscall.Geteuid() != 0:
		s.uidReason = "the agent is not root"
	case cfg.InstanceUIDs == "off":
		s.uidReason = "--instance-uids off"
	case cfg.InstanceUIDs == "auto" || cfg.InstanceUIDs == "":
		s.uidMin, s.uidMax = UIDRangeFor(cfg.DataDir)
	default:
		lo, hi, err := ParseUIDRange(cfg.InstanceUIDs)
		if err != nil {
			return nil, err
		}
		s.uidMin, s.uidMax = lo, hi
	}
	if cfg.Confine != "off" {
		s.launcher, s.support = cfg.Launcher, confine.Probe()
	}
	s.notes = s.confinementNotes()
	for _, n := range s.notes {
		log.Warn("isolation: " + n)
	}
	if s.uidsOn() {
		log.Info("a user per instance", "uids", fmt.Sprintf("%d-%d", s.uidMin, s.uidMax), "confined", s.launcher != "", "landlock_abi", s.support.Landlock, "seccomp", s.support.Seccomp)
	}
	if err := s.layout.Init(); err != nil {
		return nil, err
	}
	if err := s.redisCanReach(); err != nil {
		return nil, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(s.layout.DataRoot, &fs); err == nil && fs.Type == unix.TMPFS_MAGIC {
		s.dataOnTmpfs = true
		log.Warn("the data directory is on tmpfs: instances' files live in memory, count against their memory cgroups (whose limits leave room for them) and are lost at reboot", "dir", s.layout.DataRoot)
	}
	store, err := state.Open(filepath.Join(cfg.DataDir, "state", "agent.db"), time.Second)
	if err != nil {
		return nil, err
	}
	if cfg.InstanceCACert != "" {
		s.ca, err = loadCA(cfg.InstanceCACert, cfg.InstanceCAKey)
	} else {
		var made bool
		s.ca, made, err = ownCA(filepath.Join(cfg.DataDir, "tls"))
		if made {
			log.Info("made the agent's own CA for the instances' TLS certificates; give every agent the same one (--instance-ca-cert, --instance-ca-key) for TLS clients to follow a move between agents", "cert", filepath.Join(cfg.DataDir, "tls", "ca.crt"))
		}
	}
	if err != nil {
		store.Close()
		return nil, err
	}
	s.store = store
	s.metrics = newMetrics(cfg.Registerer, s)
	s.cg = limits.None{}
	if cfg.Cgroups == "auto" {
		if m, err := limits.New(cfg.CgroupParent()); err != nil {
			log.Warn("instances run without resource limits", "reason", err)
		} else {
			s.cg = m
			log.Info("a cgroup per instance", "mode", m.Mode(), "root", m.Root, "cpu_shares", cfg.CPUShares, "cpu_quota", cfg.CPUQuota, "pids", cfg.Pids)
		}
	}
	s.logOnDataFS = sameFS(s.layout.DataRoot, s.layout.LogRoot)
	s.initIO()
	if s.ioNote != "" {
		s.notes = append(s.notes, s.ioNote)
	}
	s.initQuotas()
	if s.quotaNote != "" {
		s.notes = append(s.notes, s.quotaNote)
	}
	s.roll = &rollouts{binary: cfg.RedisServer, keptDir: filepath.Join(cfg.DataDir, "binaries"),
		store: store, locks: &s.locks, layout: s.layout, log: log, host: s}
	if cfg.Backup.Target.Enabled() {
		t, err := backup.New(cfg.Backup.Target)
		if err != nil {
			store.Close()
			return nil, err
		}
		s.metrics.backups = true
		s.bk = &backups{target: t, sem: make(chan struct{}, cfg.Backup.Parallel), running: map[string]bool{}, failed: map[string]backupFailure{}}
		log.Info("backups", "target", t.Where(), "schedule", cfg.Backup.Schedule, "keep", cfg.Backup.Keep, "keep_days", cfg.Backup.KeepDays,
			"parallel", cfg.Backup.Parallel, "agent_name", cfg.Backup.AgentName)
	}
	// After the state's lock: one agent binds the socket of a data
	// directory.
	if l, err := sdnotify.Listen(filepath.Join(cfg.DataDir, "notify.sock")); err != nil {
		log.Warn("instances' starts are polled with connections, not told of", "err", err)
	} else {
		s.notify = l
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Close ends supervision and closes the state. Every redis-server keeps
// running; the next agent adopts them.
func (s *Service) Close() error {
	s.bgMu.Lock()
	s.cancel() // no background work starts after this
	s.bgMu.Unlock()
	s.mu.Lock()
	insts := make([]*instance, 0, len(s.instances))
	for _, in := range s.instances {
		insts = append(insts, in)
	}
	s.mu.Unlock()
	s.wg.Wait()
	for _, in := range insts {
		<-in.sup.Done()
		in.admin.Close()
	}
	// A forwarder lives in the agent: the next one starts it again.
	s.mu.Lock()
	for id, f := range s.forwarders {
		f.Close()
		delete(s.forwarders, id)
	}
	s.mu.Unlock()
	// Gone only when no instance's cgroup is left in it.
	s.cg.RemoveRootIfEmpty()
	if s.notify != nil {
		s.notify.Close()
	}
	return s.store.Close()
}

// background runs fn in a goroutine that Close waits for, with the
// Service's lifetime as its ctx. Once Close has begun it runs nothing: fn
// would use a store about to close.
func (s *Service) background(fn func(ctx context.Context)) {
	s.bgMu.Lock()
	defer s.bgMu.Unlock()
	if s.ctx.Err() != nil {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn(s.ctx)
	}()
}

// Ready reports whether the agent can serve: reconcile is done, the state
// is writable and redis-server is still executable.
func (s *Service) Ready(ctx context.Context) error {
	if !s.reconciled.Load() {
		return fmt.Errorf("reconcile has not finished")
	}
	if err := s.store.Writable(); err != nil {
		return fmt.Errorf("state store is not writable: %w", err)
	}
	if err := syscall.Access(s.cfg.RedisServer, 1 /* X_OK */); err != nil {
		return fmt.Errorf("redis-server %s is not executable: %w", s.cfg.RedisServer, err)
	}
	return s.redisCanReach()
}

// redisCanReach checks that the user redis-server runs as can reach the
// data and log directories: every directory on their paths must let it
// through. A data directory under a 0700 parent (as mktemp -d makes) would
// otherwise fail every start with "permission denied" on the binary.
func (s *Service) redisCanReach() error {
	uid, gid, who := -1, -1, "redis user "+s.cfg.RedisUser
	switch {
	case s.uidsOn():
		// Any uid of the range: one that owns nothing on the way.
		uid, gid, who = s.uidMin, s.uidMin, fmt.Sprintf("instance uid %d", s.uidMin)
	case s.cred != nil:
		uid, gid = int(s.cred.Uid), int(s.cred.Gid)
	default:
		return nil // it runs as the agent's own user, who made them
	}
	for _, dir := range []string{s.layout.DataRoot, s.layout.LogRoot} {
		if err := volumes.Traversable(dir, uid, gid); err != nil {
			return fmt.Errorf("%s cannot reach %s: %w: let it through (chmod o+x on that directory) or choose another --data-dir/--log-dir", who, dir, err)
		}
	}
	// It runs the launcher and redis-server as itself.
	for _, exe := range []string{s.launcher, s.cfg.RedisServer} {
		if exe == "" {
			continue
		}
		if err := volumes.Traversable(filepath.Dir(exe), uid, gid); err != nil {
			return fmt.Errorf("%s cannot reach %s: %w: install it where every user may run it", who, exe, err)
		}
		// An instance user owns nothing: the others' bits decide.
		if st, err := os.Stat(exe); err == nil && s.uidsOn() && st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%s cannot run %s (mode %04o): chmod o+x it", who, exe, st.Mode().Perm())
		}
	}
	return nil
}

// InstanceStates counts the supervised instances by the state of their
// process (supervisor.State's names), from memory.
func (s *Service) InstanceStates() map[string]int {
	counts := map[string]int{}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, in := range s.instances {
		counts[in.sup.Status().State.String()]++
	}
	return counts
}

// Orphans returns what the last reconcile found that no record owns.
func (s *Service) Orphans(ctx context.Context) ([]Orphan, error) {
	if p := s.orphans.Load(); p != nil {
		return *p, nil
	}
	return nil, nil
}

// conf renders the redis.conf of a record.
func (s *Service) conf(rec state.Instance) []byte {
	return redis.Render(redis.Conf{
		Bind:        s.cfg.BindHost,
		Port:        rec.Port,
		Dir:         s.layout.DataDir(rec.ID),
		LogFile:     s.layout.LogPath(rec.ID),
		ACLFile:     s.layout.ACLPath(rec.ID),
		MemoryMB:    rec.MemoryMB,
		Persistence: rec.Persistence,
		MaxClients:  s.cfg.MaxClients,
		ReplicaOf:   replicaOf(rec),

		MaxmemoryPolicy:  policyOf(rec),
		MaxmemoryClients: clientsOf(rec),
		TLS:              s.tlsConf(rec),
	})
}

// replicaOf is the primary rec's server replicates from, if any.
func replicaOf(rec state.Instance) *redis.Primary {
	if p := rec.ReplicaOf; p != nil {
		return &redis.Primary{Host: p.Host, Port: p.Port, User: p.User, Password: p.Password, TLS: p.TLS}
	}
	return nil
}

func hash(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// acl renders the ACL file of a record: the agent's admin user and one
// user per binding.
func acl(rec state.Instance) []byte {
	users := append(tenantUsers(rec), redis.User{Name: redis.AdminUser, PasswordHash: redis.HashPassword(rec.AdminPassword), Admin: true})
	return redis.RenderACL(users)
}

// tenantUsers are the ACL users of rec's bindings.
//
// While rec is a move's source its replication user is one of them; from
// the cutover on the bindings' users are off (the tenants are fenced).
func tenantUsers(rec state.Instance) []redis.User {
	users := make([]redis.User, 0, len(rec.Bindings)+1)
	fenced := rec.Move != nil && rec.Move.State != state.MoveReplicating
	for _, b := range rec.Bindings {
		users = append(users, redis.User{Name: b.Username, PasswordHash: redis.HashPassword(b.Password), Off: fenced})
	}
	if rec.Move != nil {
		users = append(users, redis.User{Name: rec.Move.User, PasswordHash: redis.HashPassword(rec.Move.Password), Rules: redis.ReplicationRules})
	}
	return users
}

// writeFiles writes the config and ACL file of rec, creating its
// directories first. It is idempotent.
func (s *Service) writeFiles(rec state.Instance) (confHash string, err error) {
	o := s.ownerOf(rec)
	if err := s.layout.Create(rec.ID, o); err != nil {
		return "", err
	}
	conf := s.conf(rec)
	if err := s.layout.WriteRendered(s.layout.ACLPath(rec.ID), acl(rec), o); err != nil {
		return "", err
	}
	if t := s.tlsConf(rec); t != nil {
		if err := s.layout.WriteConfig(t.CAFile, s.caBundle(rec), o); err != nil {
			return "", err
		}
	}
	if err := s.layout.WriteRendered(s.layout.ConfPath(rec.ID), conf, o); err != nil {
		return "", err
	}
	return hash(conf), nil
}

// keyedMutex serialises operations on one id without blocking other ids.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

// lock locks id and returns its unlock function.
func (k *keyedMutex) lock(id string) func() {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[id]
	if e == nil {
		e = &keyedEntry{}
		k.m[id] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, id)
		}
		k.mu.Unlock()
	}
}
