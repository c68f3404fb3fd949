package agent

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/volumes"
)

// fakeHost is a rolloutHost with no instances that keeps the background
// work it is given instead of running it.
type fakeHost struct {
	mu      sync.Mutex
	started []func(context.Context)
}

func (h *fakeHost) runtime(string) *instance { return nil }

func (h *fakeHost) background(fn func(context.Context)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.started = append(h.started, fn)
}

// A rollout needs of the Service only the store, the instance locks and
// its host: one start runs one background rollout, a second start while it
// runs returns its status, the status counts what is pending from the
// records, and the rollout at agent start does not retry a binary an
// instance already failed on.
func TestRolloutsOverAHost(t *testing.T) {
	dir := t.TempDir()
	store, err := state.Open(filepath.Join(dir, "agent.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	bin := testenv.RedisServer(t)
	binID, err := binaryID(bin)
	if err != nil {
		t.Fatal(err)
	}
	port := 30000
	create := func(id, binary, binaryID string) {
		t.Helper()
		port++
		rec := state.Instance{ID: id, MemoryMB: 8, Phase: state.PhaseActive, Binary: binary, BinaryID: binaryID}
		if _, err := store.Create(rec, func(state.Usage) (int, error) { return port, nil }); err != nil {
			t.Fatal(err)
		}
	}
	create("old1", "/usr/bin/old-redis-server", "1:2:3:4")
	create("old2", "/usr/bin/old-redis-server", "1:2:3:4")
	create("current", bin, binID)
	host := &fakeHost{}
	r := &rollouts{binary: bin, keptDir: filepath.Join(dir, "binaries"), store: store, locks: &keyedMutex{},
		layout: volumes.Layout{DataRoot: dir, LogRoot: dir}, log: testLogger(t), host: host}
	ctx := context.Background()

	if st, err := r.status(ctx); err != nil || st.State != RolloutIdle || st.Pending != 2 || st.Binary != bin {
		t.Fatalf("status before any rollout = %+v, %v; want idle, 2 pending, on %s", st, err, bin)
	}
	st, err := r.start(ctx, false)
	if err != nil || st.State != RolloutRunning || st.Total != 2 || st.Pending != 2 {
		t.Fatalf("start = %+v, %v; want running over 2", st, err)
	}
	if again, err := r.start(ctx, false); err != nil || again.State != RolloutRunning || !again.StartedAt.Equal(*st.StartedAt) {
		t.Fatalf("start while running = %+v, %v; want the running one", again, err)
	}
	if len(host.started) != 1 {
		t.Fatalf("%d background rollouts started, want 1", len(host.started))
	}

	// The rollout at the next agent start, after old1 failed on bin.
	if _, err := store.Update("old1", func(r *state.Instance) error { r.RolloutFailed = binID; return nil }); err != nil {
		t.Fatal(err)
	}
	r2 := &rollouts{binary: bin, keptDir: r.keptDir, store: store, locks: &keyedMutex{}, layout: r.layout, log: r.log, host: host}
	r2.auto(ctx)
	if st, _ := r2.status(ctx); st.State != RolloutFailed || st.FailedInstance != "old1" || st.Pending != 2 {
		t.Fatalf("automatic rollout after a failure = %+v; want failed at old1, not run", st)
	}
	if len(host.started) != 1 {
		t.Fatal("the automatic rollout started after a failure on its binary")
	}
}
