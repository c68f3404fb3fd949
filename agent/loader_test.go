package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
)

// loaderFunc is a snapshotLoader made of a function.
type loaderFunc func(ctx context.Context, job loadJob) error

func (f loaderFunc) Load(ctx context.Context, job loadJob) error { return f(ctx, job) }

// Restore hands the loader the instance's own binary, size, mode and
// limits, with the snapshot staged; when the loader fails for reasons of
// its own (not the file's) the restore fails as the agent's fault, and the
// instance keeps its process, its data and no staging directory.
func TestRestoreLoaderContract(t *testing.T) {
	s := startService(t, testConfig(t, 2))
	ctx := context.Background()
	c, before := bound(t, s, "dst", Spec{MemoryMB: 24, Persistence: apitype.PersistenceRDB})
	if err := c.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	snap := snapshotBytes(t, s, "dst")
	broke := errors.New("the loader broke")
	var got loadJob
	s.loader = loaderFunc(func(ctx context.Context, job loadJob) error {
		got = job
		staged, err := os.ReadFile(filepath.Join(s.layout.StagedDataDir(job.ID), rdbName))
		if err != nil || !bytes.Equal(staged, snap) {
			t.Errorf("staged snapshot: %d bytes, %v; want the %d sent", len(staged), err, len(snap))
		}
		return broke
	})
	_, err := s.Restore(ctx, "dst", bytes.NewReader(snap), int64(len(snap)), "")
	if !errors.Is(err, broke) || errors.Is(err, ErrInvalid) {
		t.Fatalf("Restore = %v; want the loader's own error, not ErrInvalid", err)
	}
	rec, err := s.store.Get("dst")
	if err != nil {
		t.Fatal(err)
	}
	// As the instance's own user, when it has one.
	want := loadJob{ID: "dst", Binary: s.cfg.RedisServer, MemoryMB: 24, Persistence: apitype.PersistenceRDB, Limits: s.limitsFor(24, apitype.PersistenceRDB, nil),
		Owner: s.ownerOf(rec)}
	if s.uidsOn() && (rec.UID == 0 || want.Owner.UID != rec.UID) {
		t.Fatalf("record %+v has no uid of its own", rec)
	}
	if c := s.credOf(rec); (got.Cred == nil) != (c == nil) || c != nil && (got.Cred.Uid != c.Uid || got.Cred.Gid != c.Gid) {
		t.Fatalf("loader credential = %+v, want %+v", got.Cred, c)
	}
	got.Cred = nil
	if got != want {
		t.Fatalf("loader job = %+v, want %+v", got, want)
	}
	after := mustGet(t, s, "dst")
	if after.PID != before.PID || after.State != "running" || c.Get(ctx, "old").Val() != "data" {
		t.Fatalf("instance disturbed: pid %d -> %d, %s", before.PID, after.PID, after.State)
	}
	if s.layout.Staging("dst") {
		t.Fatal("staging directory left behind")
	}
}
