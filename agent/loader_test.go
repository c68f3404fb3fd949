package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
)

// loaderFunc is a snapshotLoader made of a function.
type loaderFunc func(ctx context.Context, job loadJob) (loading, error)

func (f loaderFunc) Start(ctx context.Context, job loadJob) (loading, error) { return f(ctx, job) }

// fakeLoading takes the RDB into got and answers Loaded with err.
type fakeLoading struct {
	got    bytes.Buffer
	err    error
	closed bool
}

func (l *fakeLoading) Write(p []byte) (int, error)           { return l.got.Write(p) }
func (l *fakeLoading) Loaded(context.Context) (int64, error) { return 1 << 20, l.err }
func (l *fakeLoading) Close()                                { l.closed = true }

// Restore hands the loader the instance's own binary, size and limits, and
// the whole body as it arrives; when the loader fails for reasons of its
// own (not the file's), at its start or at its verdict, the restore fails
// as the agent's fault, and the instance keeps its process, its data, no
// staging directory and no upload; the loader is closed.
func TestRestoreLoaderContract(t *testing.T) {
	s := startService(t, testConfig(t, 2))
	ctx := context.Background()
	c, before := bound(t, s, "dst", Spec{MemoryMB: 24, Persistence: apitype.PersistenceRDB})
	if err := c.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	snap := snapshotBytes(t, s, "dst")
	broke := errors.New("the loader broke")
	rec, err := s.store.Get("dst")
	if err != nil {
		t.Fatal(err)
	}
	// As the instance's own user, when it has one.
	want := loadJob{ID: "dst", Binary: s.cfg.RedisServer, MemoryMB: 24, Limits: s.limitsFor(24, apitype.PersistenceRDB), Owner: s.ownerOf(rec)}
	if s.uidsOn() && (rec.UID == 0 || want.Owner.UID != rec.UID) {
		t.Fatalf("record %+v has no uid of its own", rec)
	}
	for _, at := range []string{"start", "verdict"} {
		t.Run(at, func(t *testing.T) {
			var got loadJob
			fake := &fakeLoading{err: broke}
			s.loader = loaderFunc(func(ctx context.Context, job loadJob) (loading, error) {
				got = job
				if at == "start" {
					return nil, broke
				}
				return fake, nil
			})
			_, err := s.Restore(ctx, "dst", bytes.NewReader(snap), int64(len(snap)), "")
			if !errors.Is(err, broke) || errors.Is(err, ErrInvalid) {
				t.Fatalf("Restore = %v; want the loader's own error, not ErrInvalid", err)
			}
			if c := s.credOf(rec); (got.Cred == nil) != (c == nil) || c != nil && (got.Cred.Uid != c.Uid || got.Cred.Gid != c.Gid) {
				t.Fatalf("loader credential = %+v, want %+v", got.Cred, c)
			}
			got.Cred = nil
			if got != want {
				t.Fatalf("loader job = %+v, want %+v", got, want)
			}
			if at == "verdict" && (!bytes.Equal(fake.got.Bytes(), snap) || !fake.closed) {
				t.Fatalf("the loader was fed %d bytes of the %d sent, closed %v", fake.got.Len(), len(snap), fake.closed)
			}
			after := mustGet(t, s, "dst")
			if after.PID != before.PID || after.State != "running" || c.Get(ctx, "old").Val() != "data" {
				t.Fatalf("instance disturbed: pid %d -> %d, %s", before.PID, after.PID, after.State)
			}
			if s.layout.Staging("dst") {
				t.Fatal("staging directory left behind")
			}
			if left, _ := os.ReadDir(s.layout.UploadDir()); len(left) != 0 {
				t.Fatalf("uploads left behind: %v", left)
			}
			if n := s.loaderMB.Load(); n != 0 {
				t.Fatalf("%d MiB of the budget still held for loaders", n)
			}
		})
	}
}
