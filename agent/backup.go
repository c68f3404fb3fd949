package agent

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/backup"
	"github.com/redis-agent/redis-agent/state"
)

// BackupConfig is the agent's backup target and the defaults of its
// instances' backup settings.
type BackupConfig struct {
	// Target is the bucket; one that is not Enabled means no backups.
	Target backup.Config
	// AgentName is put in every backup's metadata; a broker finds a lost
	// agent's instances in the bucket by it. "" means the host name.
	AgentName string
	// Schedule is the default schedule (apitype.BackupPolicy.Schedule):
	// "" means daily.
	Schedule string
	// Keep and KeepDays are the default retention (0: no limit of that
	// kind). Keep 0 and KeepDays 0 together keep everything.
	Keep, KeepDays int
	// Parallel bounds the backups in progress at once (so many forks of
	// BGSAVE at a time); 0 means 2.
	Parallel int
	// Timeout bounds one backup (BGSAVE and upload); 0 means 1h.
	Timeout time.Duration
}

// DefaultBackupSchedule is the schedule of an agent that sets none.
const DefaultBackupSchedule = "24h"

func (c BackupConfig) withDefaults() BackupConfig {
	if c.Schedule == "" {
		c.Schedule = DefaultBackupSchedule
	}
	if c.Parallel == 0 {
		c.Parallel = 2
	}
	if c.Timeout == 0 {
		c.Timeout = time.Hour
	}
	if c.AgentName == "" {
		c.AgentName, _ = os.Hostname()
	}
	return c
}

func (c BackupConfig) validate() error {
	if !c.Target.Enabled() {
		return nil
	}
	var errs []error
	if err := c.Target.Validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := parseSchedule(c.Schedule); c.Schedule != "" && err != nil {
		errs = append(errs, fmt.Errorf("backup schedule: %w", err))
	}
	if c.Keep < 0 || c.KeepDays < 0 || c.Parallel < 0 || c.Timeout < 0 {
		errs = append(errs, errors.New("backup keep, keep days, parallel and timeout must not be negative"))
	}
	if c.AgentName != "" && !agentName.MatchString(c.AgentName) {
		errs = append(errs, fmt.Errorf("backup agent name %q: want 1-64 characters of [A-Za-z0-9._-]", c.AgentName))
	}
	return errors.Join(errs...)
}

var agentName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// schedule is a parsed BackupPolicy.Schedule: every Every, at an offset
// in [From, From+Span) of each period that the instance's id picks. An
// interval has From 0 and Span Every; a daily window has Every 24h.
type schedule struct {
	Off        bool
	Every      time.Duration
	From, Span time.Duration
}

var windowRE = regexp.MustCompile(`^daily ([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])$`)

// parseSchedule parses "off", a duration ("6h") or "daily HH:MM-HH:MM"
// (UTC; a window may cross midnight).
func parseSchedule(s string) (schedule, error) {
	s = strings.TrimSpace(s)
	if s == "off" {
		return schedule{Off: true}, nil
	}
	if m := windowRE.FindStringSubmatch(s); m != nil {
		at := func(h, mm string) time.Duration {
			hi, _ := strconv.Atoi(h)
			mi, _ := strconv.Atoi(mm)
			return time.Duration(hi)*time.Hour + time.Duration(mi)*time.Minute
		}
		from, to := at(m[1], m[2]), at(m[3], m[4])
		if to > 24*time.Hour {
			return schedule{}, fmt.Errorf("%q: a window ends at 24:00 at the latest", s)
		}
		span := to - from
		if span <= 0 {
			span += 24 * time.Hour
		}
		return schedule{Every: 24 * time.Hour, From: from, Span: span}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return schedule{}, fmt.Errorf("%q: want off, an interval like 6h, or a daily window like \"daily 02:00-04:00\" (UTC)", s)
	}
	if d < time.Second {
		return schedule{}, fmt.Errorf("%q: an interval of at least 1s", s)
	}
	return schedule{Every: d, Span: d}, nil
}

// offset is where in each period id's backups fall.
func (sc schedule) offset(id string) time.Duration {
	h := fnv.New64a()
	h.Write([]byte(id))
	return sc.From + time.Duration(h.Sum64()%uint64(sc.Span))
}

// after is the first time after t that id's backup is due.
func (sc schedule) after(id string, t time.Time) time.Time {
	off := sc.offset(id)
	base := t.UnixNano() - int64(off)
	k := base / int64(sc.Every)
	if base < 0 {
		k--
	}
	return time.Unix(0, (k+1)*int64(sc.Every)+int64(off))
}

// policy is an instance's settings in force.
type policy struct {
	text           string
	sched          schedule
	keep, keepDays int
}

func (s *Service) policyOf(rec state.Instance) policy {
	d := s.cfg.Backup
	p := policy{text: d.Schedule, keep: d.Keep, keepDays: d.KeepDays}
	if b := rec.Backup; b != nil {
		if b.Schedule != "" {
			p.text = b.Schedule
		}
		if b.Keep != nil {
			p.keep = *b.Keep
		}
		if b.KeepDays != nil {
			p.keepDays = *b.KeepDays
		}
	}
	sc, err := parseSchedule(p.text)
	if err != nil { // checked when it was set: a default changed since
		sc = schedule{Off: true}
	}
	p.sched = sc
	return p
}

// checkPolicy checks an instance's settings.
func checkPolicy(b apitype.BackupPolicy) error {
	if b.Schedule != "" {
		if _, err := parseSchedule(b.Schedule); err != nil {
			return fmt.Errorf("backup schedule %w: %w", ErrInvalid, err)
		}
	}
	if (b.Keep != nil && *b.Keep < 0) || (b.KeepDays != nil && *b.KeepDays < 0) {
		return fmt.Errorf("backup keep and keep_days: %w: want 0 (no limit) or more", ErrInvalid)
	}
	return nil
}

// backups is the Service's side of its backup target: the schedule's
// state in memory (the last success is in each record).
type backups struct {
	target *backup.Target
	sem    chan struct{}

	mu      sync.Mutex
	running map[string]bool
	// failed is each instance's last failure since its last success, and
	// how many in a row.
	failed map[string]backupFailure
	// ended is set when a backup ends, for the schedule to look again.
	ended atomic.Bool
}

type backupFailure struct {
	at     time.Time
	err    string
	reason string
	count  int
}

// retryAfter is when a backup that failed n times in a row is tried
// again: 30s doubling to 30 min, and never later than the next slot.
func retryAfter(n int) time.Duration {
	d := 30 * time.Second
	for i := 1; i < n && d < 30*time.Minute; i++ {
		d *= 2
	}
	return min(d, 30*time.Minute)
}

// errNoTarget is the answer of backup operations on an agent without one.
var errNoTarget = fmt.Errorf("this agent has no backup target (--backup-endpoint, --backup-bucket): %w", ErrConflict)

// nextDue is when id's next scheduled backup is due, or zero for none.
func (s *Service) nextDue(rec state.Instance, p policy) time.Time {
	if p.sched.Off {
		return time.Time{}
	}
	since := rec.CreatedAt
	if lb := rec.LastBackup; lb != nil && lb.Time.After(since) {
		since = lb.Time
	}
	due := p.sched.after(rec.ID, since)
	s.bk.mu.Lock()
	f, ok := s.bk.failed[rec.ID]
	s.bk.mu.Unlock()
	if ok {
		if retry := f.at.Add(retryAfter(f.count)); retry.Before(p.sched.after(rec.ID, f.at)) {
			due = retry
		} else {
			due = p.sched.after(rec.ID, f.at)
		}
	}
	return due
}

// relistAfterChange is the shortest time between two reads of the
// records for the backup schedule when only the store has changed; a new
// policy's slot is seen this late at most.
const relistAfterChange = 2 * time.Second

// scheduleBackups runs until ctx ends: every tick it starts the backups
// that are due, at most Parallel at a time (the rest wait for the next
// tick, oldest due first).
func (s *Service) scheduleBackups(ctx context.Context) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	// The records are read again only when a backup has ended (its
	// failure is kept in memory), the earliest slot seen has come, or the
	// store has changed, that at most every relistAfterChange: decoding a
	// thousand records four times a second was most of an idle agent's
	// CPU, and at agent start, with a commit for every instance's start,
	// a tenth of its CPU.
	var (
		gen      uint64
		listed   bool
		listedAt time.Time
		next     time.Time // the earliest slot not yet due at the last read; zero: none
	)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		g, gerr := s.store.Generation()
		ended := s.bk.ended.Swap(false)
		now := time.Now()
		changed := gerr != nil || g != gen
		if listed && !ended && (next.IsZero() || now.Before(next)) && (!changed || now.Sub(listedAt) < relistAfterChange) {
			continue
		}
		recs, err := s.store.List()
		if err != nil {
			continue
		}
		gen, listed, listedAt, next = g, gerr == nil, now, time.Time{}
		type due struct {
			id string
			at time.Time
		}
		var dues []due
		for _, rec := range recs {
			if rec.Phase != state.PhaseActive || rec.Move != nil || rec.ReplicaOf != nil {
				continue
			}
			at := s.nextDue(rec, s.policyOf(rec))
			switch {
			case at.IsZero():
			case !at.After(now):
				dues = append(dues, due{rec.ID, at})
			case next.IsZero() || at.Before(next):
				next = at
			}
		}
		slices.SortFunc(dues, func(a, b due) int { return a.at.Compare(b.at) })
		for _, d := range dues {
			select {
			case s.bk.sem <- struct{}{}:
			default:
				// No slot: still due, looked at again at the next tick.
				next = now
				continue
			}
			if !s.bk.start(d.id) {
				// Running already (POST .../backups): its end makes the
				// schedule look again.
				<-s.bk.sem
				continue
			}
			id := d.id
			s.background(func(ctx context.Context) {
				defer func() { <-s.bk.sem }()
				defer s.bk.finish(id)
				s.backup(ctx, id)
			})
		}
	}
}

// start marks id's backup running; false when one is.
func (b *backups) start(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.running[id] {
		return false
	}
	b.running[id] = true
	return true
}

func (b *backups) finish(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.running, id)
	b.ended.Store(true)
}

func (b *backups) isRunning(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.running[id]
}

// Backup takes a backup of instance id now (POST
// /v1/instances/{id}/backups) and returns it once it is in the bucket.
func (s *Service) Backup(ctx context.Context, id string) (apitype.Backup, error) {
	if err := validateID("instance", id); err != nil {
		return apitype.Backup{}, err
	}
	if s.bk == nil {
		return apitype.Backup{}, errNoTarget
	}
	if _, _, err := s.runningInstance(ctx, id); err != nil {
		return apitype.Backup{}, err
	}
	if !s.bk.start(id) {
		return apitype.Backup{}, fmt.Errorf("a backup of %q is in progress: %w", id, ErrConflict)
	}
	defer s.bk.finish(id)
	select {
	case s.bk.sem <- struct{}{}:
		defer func() { <-s.bk.sem }()
	case <-ctx.Done():
		return apitype.Backup{}, ctx.Err()
	}
	// A caller that hangs up does not cut the upload short.
	return s.backup(context.WithoutCancel(ctx), id)
}

// backup takes one backup of id: a fresh RDB (BGSAVE), streamed to the
// bucket, its manifest beside it; then the record notes it and the
// backups beyond the retention go. A failure is logged and counted by
// reason, and changes nothing on the instance.
func (s *Service) backup(ctx context.Context, id string) (bk apitype.Backup, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Backup.Timeout)
	defer cancel()
	start := time.Now().UTC()
	log := s.log.With("instance", id)
	reason := ""
	defer func() {
		if err == nil {
			return
		}
		if errors.Is(err, ErrNotFound) {
			return // deleted meanwhile: nothing to back up, no failure
		}
		if reason == "" {
			reason = backup.Reason(err)
		}
		s.metrics.backupFailures.WithLabelValues(id, reason).Inc()
		s.bk.mu.Lock()
		f := s.bk.failed[id]
		s.bk.failed[id] = backupFailure{at: time.Now(), err: err.Error(), reason: reason, count: f.count + 1}
		s.bk.mu.Unlock()
		log.Warn("backup failed; the instance serves on", "reason", reason, "err", err, "failures_in_a_row", f.count+1)
	}()
	rec, err := s.store.Get(id)
	if err != nil {
		return apitype.Backup{}, notFound(id, err)
	}
	key, err := s.bk.target.Key(id, start)
	if err != nil {
		return apitype.Backup{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	// The fork of BGSAVE may double the instance's memory while it runs:
	// counted against the budget until it is done.
	release := s.reserveTransient(rec.MemoryMB)
	snap, err := s.Snapshot(ctx, id)
	release()
	if err != nil {
		// Not running (crash-looping, starting) counts too: no backup is
		// taken, and the retry waits its backoff rather than every tick.
		reason = backup.ReasonSnapshot
		return apitype.Backup{}, err
	}
	defer snap.File.Close()
	// Bindings and settings as of the snapshot.
	if rec, err = s.store.Get(id); err != nil {
		return apitype.Backup{}, notFound(id, err)
	}
	version := s.roll.versionOf(rec)
	if in := s.runtime(id); version == "" && in != nil {
		if f, err := in.admin.Fields(ctx, "server"); err == nil {
			version = f["redis_version"]
		}
	}
	agent := s.cfg.Backup.AgentName
	meta := backup.Meta{Instance: id, Time: start, SHA256: snap.SHA256, Size: snap.Size, RedisVersion: version,
		Agent: agent, MemoryMB: rec.MemoryMB, Persistence: rec.Persistence}
	if err := s.bk.target.Put(ctx, key, io.LimitReader(snap.File, snap.Size), snap.Size, meta); err != nil {
		reason = backup.Reason(err)
		return apitype.Backup{}, storageErr(reason, err)
	}
	crashAt(FaultBackupUploaded)
	man := backup.Manifest{Instance: id, Time: start, Agent: agent, SHA256: snap.SHA256, Size: snap.Size, RedisVersion: version,
		MemoryMB: rec.MemoryMB, Persistence: rec.Persistence, Metadata: rec.Metadata,
		MaxmemoryPolicy: policyOf(rec), MaxmemoryClients: clientsOf(rec), TLS: tlsOf(rec)}
	for _, bid := range sortedKeys(rec.Bindings) {
		b := rec.Bindings[bid]
		man.Bindings = append(man.Bindings, backup.Binding{ID: b.ID, Username: b.Username, Password: b.Password})
	}
	if err := s.bk.target.PutManifest(ctx, key, man); err != nil {
		// The RDB is whole and restores in place; only a recreation
		// elsewhere needs the manifest. Still a failure to report.
		reason = backup.Reason(err)
		return apitype.Backup{}, storageErr(reason, err)
	}
	// The last failure goes before the success is recorded: whoever reads
	// the record with this backup in it must not see that failure beside
	// it (they did, for the moment between the two).
	s.bk.mu.Lock()
	delete(s.bk.failed, id)
	s.bk.mu.Unlock()
	last := &state.LastBackup{Key: key, Time: start, Size: snap.Size, SHA256: snap.SHA256}
	if rec, err = s.store.Update(id, func(r *state.Instance) error { r.LastBackup = last; return nil }); err != nil {
		log.Warn("backup taken but not recorded", "key", key, "err", err)
	}
	took := time.Since(start)
	s.metrics.observe("backup", start)
	log.Info("backup taken", "key", key, "bytes", snap.Size, "took", took.Round(time.Millisecond),
		"mib_per_s", fmt.Sprintf("%.1f", float64(snap.Size)/(1<<20)/max(took.Seconds(), 1e-6)))
	// Pruning only after a success; a failed prune is retried at the
	// next success.
	if err := s.prune(ctx, rec, key); err != nil {
		log.Warn("prune old backups", "err", err)
	}
	if err := s.bk.target.RemoveIncomplete(ctx, id); err != nil {
		log.Debug("remove incomplete uploads", "err", err)
	}
	return apitype.Backup{Key: key, Instance: id, Time: start, Size: snap.Size, SHA256: snap.SHA256, RedisVersion: version,
		Agent: agent, AgeSeconds: time.Since(start).Seconds()}, nil
}

// prune removes rec's backups beyond its retention; newest (just taken)
// always stays.
func (s *Service) prune(ctx context.Context, rec state.Instance, newest string) error {
	p := s.policyOf(rec)
	if p.keep == 0 && p.keepDays == 0 {
		return nil
	}
	list, err := s.bk.target.List(ctx, rec.ID)
	if err != nil {
		return err
	}
	cutoff := time.Now().Add(-time.Duration(p.keepDays) * 24 * time.Hour)
	var drop []string
	for i, o := range list {
		fromNewest := len(list) - 1 - i
		if o.Key == newest || o.Key > newest {
			continue
		}
		if (p.keep > 0 && fromNewest >= p.keep) || (p.keepDays > 0 && o.Time.Before(cutoff)) {
			drop = append(drop, o.Key)
		}
	}
	if len(drop) == 0 {
		return nil
	}
	s.log.Info("pruning backups", "instance", rec.ID, "count", len(drop), "keep", p.keep, "keep_days", p.keepDays)
	return s.bk.target.Remove(ctx, drop...)
}

// Backups lists what the bucket holds of instance id, oldest first; with
// details, each one's metadata too. The instance need not exist here
// any more (a deleted tenant's backups are still there).
func (s *Service) Backups(ctx context.Context, id string, details bool) ([]apitype.Backup, error) {
	if err := validateID("instance", id); err != nil {
		return nil, err
	}
	if s.bk == nil {
		return nil, errNoTarget
	}
	list, err := s.bk.target.List(ctx, id)
	if err != nil {
		return nil, storageErr(backup.Reason(err), err)
	}
	out := make([]apitype.Backup, 0, len(list))
	for _, o := range list {
		b := apitype.Backup{Key: o.Key, Instance: id, Time: o.Time, Size: o.Size, AgeSeconds: time.Since(o.Time).Seconds()}
		if details {
			if st, err := s.bk.target.Stat(ctx, o.Key); err == nil {
				b.SHA256, b.RedisVersion, b.Agent = st.Meta.SHA256, st.Meta.RedisVersion, st.Meta.Agent
			}
		}
		out = append(out, b)
	}
	return out, nil
}

// LatestBackups is each instance's latest backup in the bucket, with its
// manifest (GET /v1/backups): what a broker recreates a lost agent's
// instances from. agent, when set, keeps those whose latest backup that
// agent took.
func (s *Service) LatestBackups(ctx context.Context, agent string) ([]apitype.Backup, error) {
	if s.bk == nil {
		return nil, errNoTarget
	}
	ids, err := s.bk.target.Instances(ctx)
	if err != nil {
		return nil, storageErr(backup.Reason(err), err)
	}
	out := []apitype.Backup{}
	for _, id := range ids {
		list, err := s.bk.target.List(ctx, id)
		if err != nil {
			return nil, storageErr(backup.Reason(err), err)
		}
		// The latest with a manifest: an RDB whose manifest never made it
		// cannot be recreated elsewhere.
		for i := len(list) - 1; i >= 0; i-- {
			o := list[i]
			m, err := s.bk.target.ReadManifest(ctx, o.Key)
			if err != nil {
				continue
			}
			if agent != "" && m.Agent != agent {
				break
			}
			b := apitype.Backup{Key: o.Key, Instance: id, Time: o.Time, Size: o.Size, SHA256: m.SHA256, RedisVersion: m.RedisVersion,
				Agent: m.Agent, AgeSeconds: time.Since(o.Time).Seconds(), MemoryMB: m.MemoryMB, Persistence: m.Persistence, Metadata: m.Metadata,
				MaxmemoryPolicy: m.MaxmemoryPolicy, MaxmemoryClients: m.MaxmemoryClients, TLS: m.TLS}
			for _, bd := range m.Bindings {
				b.Bindings = append(b.Bindings, apitype.BackupBinding{ID: bd.ID, Username: bd.Username, Password: bd.Password})
			}
			out = append(out, b)
			break
		}
	}
	return out, nil
}

// RestoreBackup restores instance id from the backup at key, which may
// be of another instance (a copy) or another agent's (a tenant brought
// back): the object is downloaded into the uploads directory and goes
// through Restore, so every check and guarantee of a restore holds, and
// the object's sha256 must match what its metadata says (a tampered or
// damaged object is ErrInvalid).
func (s *Service) RestoreBackup(ctx context.Context, id, key string) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	if s.bk == nil {
		return Instance{}, errNoTarget
	}
	if _, _, err := s.bk.target.ParseKey(key); err != nil {
		return Instance{}, fmt.Errorf("from_backup: %w: %w", ErrInvalid, err)
	}
	r, obj, err := s.bk.target.Open(ctx, key)
	if backup.IsNotFound(err) {
		return Instance{}, fmt.Errorf("backup %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return Instance{}, storageErr(backup.Reason(err), err)
	}
	defer r.Close()
	if !validSHA256(obj.Meta.SHA256) {
		return Instance{}, fmt.Errorf("backup %s carries no sha256 to check it by: %w", key, ErrInvalid)
	}
	s.log.Info("restoring from a backup", "instance", id, "key", key, "bytes", obj.Size, "taken_by", obj.Meta.Agent)
	body := &downloadReader{r: r}
	inst, err := s.Restore(ctx, id, body, obj.Size, obj.Meta.SHA256)
	if err != nil && body.err != nil && !errors.Is(body.err, io.EOF) {
		// The download broke, not the file: the bucket's failure.
		return Instance{}, storageErr(backup.Reason(body.err), fmt.Errorf("download %s: %w", key, body.err))
	}
	return inst, err
}

// downloadReader notes the error its reader failed with.
type downloadReader struct {
	r   io.Reader
	err error
}

func (d *downloadReader) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	if err != nil {
		d.err = err
	}
	return n, err
}

// SetBackupPolicy replaces instance id's backup settings; the schedule
// takes them at its next tick.
func (s *Service) SetBackupPolicy(ctx context.Context, id string, p apitype.BackupPolicy) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	if err := checkPolicy(p); err != nil {
		return Instance{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	var set *apitype.BackupPolicy
	if p.Schedule != "" || p.Keep != nil || p.KeepDays != nil {
		set = &p
	}
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Phase == state.PhaseDeleting {
			return fmt.Errorf("instance %q is being deleted: %w", id, ErrConflict)
		}
		r.Backup = set
		return nil
	})
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	return s.view(rec), nil
}

// backupStatus is rec's backups as its view shows them.
func (s *Service) backupStatus(rec state.Instance) *apitype.BackupStatus {
	if s.bk == nil {
		return nil
	}
	p := s.policyOf(rec)
	st := &apitype.BackupStatus{Schedule: p.text, Keep: p.keep, KeepDays: p.keepDays, Running: s.bk.isRunning(rec.ID)}
	if lb := rec.LastBackup; lb != nil {
		st.Last = &apitype.Backup{Key: lb.Key, Instance: rec.ID, Time: lb.Time, Size: lb.Size, SHA256: lb.SHA256, AgeSeconds: time.Since(lb.Time).Seconds()}
	}
	s.bk.mu.Lock()
	if f, ok := s.bk.failed[rec.ID]; ok {
		at := f.at.UTC()
		st.LastError, st.LastErrorAt = f.reason+": "+f.err, &at
	}
	s.bk.mu.Unlock()
	if rec.Phase == state.PhaseActive {
		if due := s.nextDue(rec, p); !due.IsZero() {
			due = due.UTC()
			st.NextAt = &due
		}
	}
	return st
}

// reserveTransient counts mb against the memory budget until release: a
// fork of BGSAVE, a restore's loader. Provisions and resizes see it.
func (s *Service) reserveTransient(mb int) (release func()) {
	s.transientMB.Add(int64(mb))
	var once sync.Once
	return func() { once.Do(func() { s.transientMB.Add(-int64(mb)) }) }
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// storageErr is an error of the backup target, as the Service returns it.
func storageErr(reason string, err error) error {
	return fmt.Errorf("%w (%s): %w", ErrStorage, reason, err)
}
