package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/backup"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

func TestParseSchedule(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want schedule
	}{
		{"off", schedule{Off: true}},
		{"6h", schedule{Every: 6 * time.Hour, Span: 6 * time.Hour}},
		{"2s", schedule{Every: 2 * time.Second, Span: 2 * time.Second}},
		{"daily 02:00-04:30", schedule{Every: 24 * time.Hour, From: 2 * time.Hour, Span: 150 * time.Minute}},
		{"daily 23:00-01:00", schedule{Every: 24 * time.Hour, From: 23 * time.Hour, Span: 2 * time.Hour}},
		{"daily 00:00-24:00", schedule{Every: 24 * time.Hour, Span: 24 * time.Hour}},
	} {
		got, err := parseSchedule(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("parseSchedule(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "often", "500ms", "-1h", "daily 25:00-26:00", "daily 2:00-4:00", "weekly"} {
		if _, err := parseSchedule(bad); err == nil {
			t.Errorf("parseSchedule(%q) accepted", bad)
		}
	}
}

// An instance's backups fall at one point of each period, the same every
// time; instances are spread over the period; a daily window holds them.
func TestScheduleSpreads(t *testing.T) {
	sc, _ := parseSchedule("1h")
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var offs []time.Duration
	buckets := make([]int, 4)
	for i := range 1000 {
		id := fmt.Sprintf("inst-%d", i)
		a := sc.after(id, t0)
		b := sc.after(id, a)
		if b.Sub(a) != time.Hour || !a.After(t0) || a.Sub(t0) > time.Hour {
			t.Fatalf("%s: %v then %v", id, a, b)
		}
		if sc.after(id, a.Add(-time.Nanosecond)) != a {
			t.Fatalf("%s: not due at its own slot", id)
		}
		offs = append(offs, a.Sub(t0))
		buckets[int(a.Sub(t0)/(15*time.Minute))%4]++
	}
	for i, n := range buckets {
		if n < 200 || n > 300 {
			t.Errorf("quarter %d of the hour holds %d of 1000 instances' backups: not spread", i, n)
		}
	}
	w, _ := parseSchedule("daily 23:00-01:00")
	for i := range 200 {
		at := w.after(fmt.Sprintf("w-%d", i), t0.Add(12*time.Hour)).UTC()
		if h := at.Hour(); h != 23 && h != 0 {
			t.Fatalf("a backup of the window 23:00-01:00 at %v", at)
		}
	}
}

// backupConfig is testConfig with a bucket of a Versity gateway.
func backupConfig(t *testing.T, s3 *testenv.S3, ports int) Config {
	cfg := testConfig(t, ports)
	cfg.Backup = BackupConfig{
		Target: backup.Config{Endpoint: s3.Endpoint(), Bucket: s3.Bucket, Region: "us-east-1", Prefix: "fleet",
			AccessKey: s3.Access, SecretKey: s3.Secret, PathStyle: true, PartSize: 5 << 20},
		AgentName: "vm1",
		Schedule:  "off",
		Keep:      3,
	}
	return cfg
}

// fillKeys writes n keys of size bytes each.
func fillKeys(t *testing.T, s *Service, id string, n, size int) {
	t.Helper()
	rec, _ := s.store.Get(id)
	c := client(t, rec.Port, "agent", rec.AdminPassword)
	val := strings.Repeat("v", size)
	pipe := c.Pipeline()
	for i := range n {
		pipe.Set(context.Background(), fmt.Sprintf("k%06d", i), val, 0)
		if i%1000 == 999 {
			if _, err := pipe.Exec(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := pipe.Exec(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func dbsize(t *testing.T, s *Service, id string) int64 {
	t.Helper()
	rec, _ := s.store.Get(id)
	n, err := client(t, rec.Port, "agent", rec.AdminPassword).DBSize(context.Background()).Result()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A backup taken now lands in the bucket with its metadata and manifest;
// a restore from it brings the data back in place, bindings untouched.
func TestBackupNowAndRestoreInPlace(t *testing.T) {
	s3 := testenv.StartS3(t)
	cfg := backupConfig(t, s3, 4)
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	s := startService(t, cfg)
	ctx := t.Context()
	if _, _, err := s.Provision(ctx, "b1", Spec{MemoryMB: 64, Persistence: apitype.PersistenceAOF, Metadata: []byte(`{"plan":"small"}`)}); err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "b1", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	fillKeys(t, s, "b1", 2000, 100)
	bk, err := s.Backup(ctx, "b1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(bk.Key, "fleet/b1/") || bk.Size == 0 || !validSHA256(bk.SHA256) || bk.Agent != "vm1" || bk.RedisVersion == "" {
		t.Fatalf("backup = %+v", bk)
	}
	list, err := s.Backups(ctx, "b1", true)
	if err != nil || len(list) != 1 || list[0].Key != bk.Key || list[0].SHA256 != bk.SHA256 {
		t.Fatalf("Backups = %+v, %v", list, err)
	}
	latest, err := s.LatestBackups(ctx, "vm1")
	if err != nil || len(latest) != 1 || latest[0].MemoryMB != 64 || latest[0].Persistence != "aof" ||
		string(latest[0].Metadata) != `{"plan":"small"}` || len(latest[0].Bindings) != 1 || latest[0].Bindings[0].Password != creds.Password {
		t.Fatalf("LatestBackups = %+v, %v", latest, err)
	}
	if other, _ := s.LatestBackups(ctx, "vm2"); len(other) != 0 {
		t.Fatalf("another agent's filter found %+v", other)
	}
	inst := mustGet(t, s, "b1")
	if inst.Backup == nil || inst.Backup.Last == nil || inst.Backup.Last.Key != bk.Key || inst.Backup.Schedule != "off" {
		t.Fatalf("view's backup = %+v", inst.Backup)
	}
	if v := testutil.ToFloat64(s.metrics.backupFailures.WithLabelValues("b1", backup.ReasonUnreachable)); v != 0 {
		t.Fatalf("failures = %v", v)
	}
	if n, _ := testutil.GatherAndCount(reg, "redis_agent_backup_last_success_timestamp_seconds", "redis_agent_backup_last_success_bytes"); n != 2 {
		t.Fatalf("%d backup series, want 2", n)
	}

	// The tenant deletes its keys by mistake; the backup brings them back.
	tenant := client(t, creds.Port, creds.Username, creds.Password)
	if err := tenant.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RestoreBackup(ctx, "b1", bk.Key); err != nil {
		t.Fatal(err)
	}
	if n := dbsize(t, s, "b1"); n != 2000 {
		t.Fatalf("%d keys after the restore, want 2000", n)
	}
	tenant = client(t, creds.Port, creds.Username, creds.Password)
	if err := tenant.Ping(ctx).Err(); err != nil {
		t.Fatalf("the binding after the restore: %v", err)
	}

	// Keys that are no backup's are refused before anything is read.
	for _, key := range []string{"fleet/../b1/x.rdb", "other/b1/20260101T000000.000Z.rdb", "fleet/b1/20260101T000000.000Z.json"} {
		if _, err := s.RestoreBackup(ctx, "b1", key); !errors.Is(err, ErrInvalid) {
			t.Errorf("restore from %q: %v, want ErrInvalid", key, err)
		}
	}
	if _, err := s.RestoreBackup(ctx, "b1", "fleet/b1/20200101T000000.000Z.rdb"); !errors.Is(err, ErrNotFound) {
		t.Errorf("restore from a backup that is not there: %v", err)
	}
}

// An object changed in the bucket (its content no longer has the sha256
// its metadata says) is refused, and the instance keeps its data.
func TestTamperedBackupRefused(t *testing.T) {
	s3 := testenv.StartS3(t)
	s := startService(t, backupConfig(t, s3, 2))
	ctx := t.Context()
	if _, _, err := s.Provision(ctx, "t1", Spec{MemoryMB: 32, Persistence: apitype.PersistenceRDB}); err != nil {
		t.Fatal(err)
	}
	fillKeys(t, s, "t1", 100, 10)
	bk, err := s.Backup(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	// The posix backend keeps the object as a file: flip a byte of it.
	path := filepath.Join(s3.Dir, s3.Bucket, bk.Key)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	fillKeys(t, s, "t1", 150, 10)
	_, err = s.RestoreBackup(ctx, "t1", bk.Key)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("restore of a tampered backup: %v, want ErrInvalid naming the sha256", err)
	}
	if n := dbsize(t, s, "t1"); n != 150 {
		t.Fatalf("%d keys after the refused restore, want the 150 it had", n)
	}
}

// Scheduled backups run at their interval, live settings apply, and the
// retention keeps the newest ones; with the bucket gone backups fail by
// reason and the instance serves on; once it is back the next succeeds.
func TestScheduledBackupsRetentionAndFailures(t *testing.T) {
	s3 := testenv.StartS3(t)
	cfg := backupConfig(t, s3, 4)
	cfg.Registerer = prometheus.NewRegistry()
	cfg.Backup.Schedule = "1s"
	cfg.Backup.Keep = 2
	s := startService(t, cfg)
	ctx := t.Context()
	for _, id := range []string{"s1", "s2"} {
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF}); err != nil {
			t.Fatal(err)
		}
	}
	// s2 keeps 3 and backs up every 2s: a live change.
	three := 3
	if _, err := s.SetBackupPolicy(ctx, "s2", apitype.BackupPolicy{Schedule: "2s", Keep: &three}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetBackupPolicy(ctx, "s2", apitype.BackupPolicy{Schedule: "often"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a bad schedule: %v", err)
	}
	count := func(id string) int {
		l, err := s.Backups(ctx, id, false)
		if err != nil {
			t.Fatal(err)
		}
		return len(l)
	}
	lastTime := func(id string) time.Time {
		rec, _ := s.store.Get(id)
		if rec.LastBackup == nil {
			return time.Time{}
		}
		return rec.LastBackup.Time
	}
	// Over several intervals: s1 holds at most 2, s2 at most 3, each
	// taken at its interval.
	var seen1, seen2 []time.Time
	deadline := time.Now().Add(9 * time.Second)
	for time.Now().Before(deadline) {
		if lt := lastTime("s1"); !lt.IsZero() && (len(seen1) == 0 || !seen1[len(seen1)-1].Equal(lt)) {
			seen1 = append(seen1, lt)
		}
		if lt := lastTime("s2"); !lt.IsZero() && (len(seen2) == 0 || !seen2[len(seen2)-1].Equal(lt)) {
			seen2 = append(seen2, lt)
		}
		if n := count("s1"); n > 2+1 { // the newest can land before the prune of the one before
			t.Fatalf("s1 holds %d backups, keeps 2", n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(seen1) < 5 || len(seen2) < 3 {
		t.Fatalf("%d backups of s1 (1s) and %d of s2 (2s) in 9s", len(seen1), len(seen2))
	}
	for i := 1; i < len(seen2); i++ {
		if d := seen2[i].Sub(seen2[i-1]); d < 1500*time.Millisecond || d > 3*time.Second {
			t.Errorf("s2's backups %v apart, its interval is 2s", d)
		}
	}
	testenv.Eventually(t, "pruning", 5*time.Second, func() bool { return count("s1") == 2 && count("s2") == 3 })

	// The bucket goes away: backups fail, counted by reason; the
	// instances serve on.
	s3.Stop()
	fails := func() float64 {
		return testutil.ToFloat64(s.metrics.backupFailures.WithLabelValues("s1", backup.ReasonUnreachable))
	}
	testenv.Eventually(t, "a failed backup", 60*time.Second, func() bool { return fails() > 0 })
	if n := dbsize(t, s, "s1"); n != 0 {
		t.Fatalf("dbsize %d", n)
	}
	inst := mustGet(t, s, "s1")
	if inst.State != apitype.StateRunning || inst.Backup.LastError == "" || !strings.HasPrefix(inst.Backup.LastError, "unreachable") {
		t.Fatalf("after a failure: state %s, backup %+v", inst.State, inst.Backup)
	}
	before := lastTime("s1")
	s3.Start()
	// The retry comes within its backoff (30s at first).
	testenv.Eventually(t, "a backup after the bucket is back", 45*time.Second, func() bool { return lastTime("s1").After(before) })
	if inst := mustGet(t, s, "s1"); inst.Backup.LastError != "" {
		t.Fatalf("the error stays after a success: %+v", inst.Backup)
	}
	if n := count("s1"); n > 3 {
		t.Fatalf("s1 holds %d backups after the outage", n)
	}
}

// Backups of many instances run at most Parallel at a time, and each
// fork counts against the memory budget while it runs.
func TestBackupsLimitedInParallel(t *testing.T) {
	s3 := testenv.StartS3(t)
	cfg := backupConfig(t, s3, 8)
	cfg.Backup.Parallel = 2
	s := startService(t, cfg)
	ctx := t.Context()
	var ids []string
	for i := range 6 {
		id := fmt.Sprintf("p%d", i)
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 32}); err != nil {
			t.Fatal(err)
		}
		fillKeys(t, s, id, 3000, 200)
		ids = append(ids, id)
	}
	var peak atomic.Int32
	var peakMB atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if mb := s.transientMB.Load(); mb > peakMB.Load() {
				peakMB.Store(mb)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Backup(ctx, id); err != nil {
				t.Error(err)
			}
		}()
	}
	// The semaphore: never more than 2 holders.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range 2000 {
			if n := int32(len(s.bk.sem)); n > peak.Load() {
				peak.Store(n)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if p := peak.Load(); p > 2 {
		t.Fatalf("%d backups at once, the limit is 2", p)
	}
	if mb := peakMB.Load(); mb > 64 {
		t.Fatalf("%d MiB of forks counted at once: more than 2 of 32 MiB", mb)
	}
	if mb := s.transientMB.Load(); mb != 0 {
		t.Fatalf("%d MiB still counted after the backups", mb)
	}
	for _, id := range ids {
		if l, _ := s.Backups(ctx, id, false); len(l) != 1 {
			t.Fatalf("%s: %d backups", id, len(l))
		}
	}
}

// A fork in progress counts against the budget: a provision that fits
// only without it waits for no fork but is refused while it runs.
func TestTransientMemoryCounts(t *testing.T) {
	cfg := testConfig(t, 3)
	cfg.MemoryBudgetMB = 100
	s := startService(t, cfg)
	ctx := t.Context()
	if _, _, err := s.Provision(ctx, "m1", Spec{MemoryMB: 40}); err != nil {
		t.Fatal(err)
	}
	release := s.reserveTransient(40)
	if _, _, err := s.Provision(ctx, "m2", Spec{MemoryMB: 40}); !errors.Is(err, ErrCapacity) {
		t.Fatalf("a provision beside a fork: %v, want ErrCapacity", err)
	}
	if c, _ := s.Capacity(ctx); c.MemoryFreeMB != 20 {
		t.Fatalf("free %d MiB during the fork, want 20", c.MemoryFreeMB)
	}
	release()
	release()
	if _, _, err := s.Provision(ctx, "m2", Spec{MemoryMB: 40}); err != nil {
		t.Fatal(err)
	}
}

// A backup is of no use to retention until it succeeds: a failed one
// prunes nothing.
func TestFailedBackupPrunesNothing(t *testing.T) {
	s3 := testenv.StartS3(t)
	cfg := backupConfig(t, s3, 2)
	cfg.Backup.Keep = 1
	s := startService(t, cfg)
	ctx := t.Context()
	if _, _, err := s.Provision(ctx, "f1", Spec{MemoryMB: 32}); err != nil {
		t.Fatal(err)
	}
	first, err := s.Backup(ctx, "f1")
	if err != nil {
		t.Fatal(err)
	}
	s3.Stop()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := s.Backup(cctx, "f1"); !errors.Is(err, ErrStorage) {
		t.Fatalf("a backup to a stopped bucket: %v, want ErrStorage", err)
	}
	s3.Start()
	list, _ := s.Backups(ctx, "f1", false)
	if len(list) != 1 || list[0].Key != first.Key {
		t.Fatalf("after a failed backup: %+v", list)
	}
	rec, _ := s.store.Get("f1")
	if rec.LastBackup == nil || rec.LastBackup.Key != first.Key {
		t.Fatalf("record's last backup %+v", rec.LastBackup)
	}
}
