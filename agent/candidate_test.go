package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/state"
)

// candidateWrapper writes a redis-server wrapper that runs body (sh, in the
// candidate's data directory) before it execs the real binary, for a
// restore's candidate only; every other start is the real binary's.
func candidateWrapper(t *testing.T, real, name, body string) string {
	t.Helper()
	path := filepath.Join(testenvDir(t), name)
	script := "#!/bin/sh\ncase \"$1\" in *" + candidateConf + ")\n" + body + "\n;; esac\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// The candidate is the instance from its start: it runs as the instance's
// user, confined, in the instance's cgroup, while the old process still
// serves the old data (here it waits for the test before it loads); and
// the very process that loaded the data is the instance afterwards, in
// its cgroup with one instance's limits, with no restart.
func TestRestoreCandidateBecomesTheInstance(t *testing.T) {
	cfg := testConfig(t, 4)
	real := cfg.RedisServer
	cfg.RedisServer = candidateWrapper(t, real, "redis-server-candidate", `
{ echo "pid $$"; echo "uid $(id -u)"; } > candidate.info.tmp
mv candidate.info.tmp candidate.info
i=0
while [ ! -e proceed ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done`)
	s := startService(t, cfg)
	ctx := context.Background()
	src, _ := bound(t, s, "cs", Spec{MemoryMB: 32})
	fill(t, src, 300, 100)
	rdb := snapshotBytes(t, s, "cs")
	dst, before := bound(t, s, "cd", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	if err := dst.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.Restore(ctx, "cd", bytes.NewReader(rdb), int64(len(rdb)), "")
		done <- err
	}()
	info := filepath.Join(s.layout.StagedDataDir("cd"), "candidate.info")
	testenv.Eventually(t, "the candidate started", 10*time.Second, func() bool {
		_, err := os.Stat(info)
		return err == nil
	})
	b, err := os.ReadFile(info)
	if err != nil {
		t.Fatal(err)
	}
	// Meanwhile the old process serves, untouched, and the instance's
	// cgroup has room for two.
	if v, err := dst.Get(ctx, "old").Result(); err != nil || v != "data" {
		t.Fatalf("the old data while the candidate starts: %q %v", v, err)
	}
	if in := mustGet(t, s, "cd"); in.PID != before.PID || in.State != "running" {
		t.Fatalf("instance while its candidate starts: pid %d -> %d, %s", before.PID, in.PID, in.State)
	}
	rec, err := s.store.Get("cd")
	if err != nil {
		t.Fatal(err)
	}
	one := s.limitsFor(rec.MemoryMB, rec.Persistence, rec.IO)
	if live := s.liveLimits("cd", rec.MemoryMB, rec.Persistence, rec.IO); live.MemoryBytes != 2*one.MemoryBytes {
		t.Fatalf("cgroup memory while the candidate runs: %d, want room for two (%d)", live.MemoryBytes, 2*one.MemoryBytes)
	}
	if _, ok := s.cg.(*limits.Manager); ok {
		if d, err := s.cg.Differs("cd", s.liveLimits("cd", rec.MemoryMB, rec.Persistence, rec.IO)); err != nil || d {
			t.Fatalf("the cgroup's limits are not the ones for two processes (differs %v, %v)", d, err)
		}
	}
	if err := os.WriteFile(filepath.Join(s.layout.StagedDataDir("cd"), "proceed"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	after := mustGet(t, s, "cd")
	status, err := os.ReadFile("/proc/" + strconv.Itoa(after.PID) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b)+string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		} else if k, v, ok := strings.Cut(line, " "); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	if strconv.Itoa(after.PID) != fields["pid"] {
		t.Fatalf("the instance runs pid %d, the candidate was pid %s: not handed over (%q)", after.PID, fields["pid"], b)
	}
	if s.uidsOn() && fields["uid"] != strconv.Itoa(rec.UID) {
		t.Fatalf("the candidate ran as uid %s, the instance's is %d", fields["uid"], rec.UID)
	}
	if s.launcher != "" && (fields["NoNewPrivs"] != "1" || s.support.Seccomp && fields["Seccomp"] != "2") {
		t.Fatalf("the candidate ran unconfined: NoNewPrivs %q, Seccomp %q", fields["NoNewPrivs"], fields["Seccomp"])
	}
	if !s.cg.Contains("cd", after.PID) {
		t.Fatal("the instance's process is not in its cgroup")
	}
	if d, err := s.cg.Differs("cd", one); err != nil || d {
		t.Fatalf("the cgroup's limits after the restore are not one instance's (differs %v, %v)", d, err)
	}
	if s.runtime("cd").side.Load() {
		t.Fatal("the cgroup still has room for a candidate")
	}
	checkFilled(t, dst, 300, 100)
	if dst.Exists(ctx, "old").Val() != 0 {
		t.Fatal("the old data survived the restore")
	}
	// Its title is the instance's, by which the next agent adopts it, and
	// it listens on the instance's port.
	if title, _ := os.ReadFile("/proc/" + strconv.Itoa(after.PID) + "/cmdline"); !strings.HasSuffix(strings.TrimRight(string(title), "\x00 "), s.layout.ConfPath("cd")) {
		t.Fatalf("the instance's title is %q", title)
	}
	if after.Port != before.Port {
		t.Fatalf("port %d -> %d", before.Port, after.Port)
	}
	if n := s.transientMB.Load(); n != 0 {
		t.Fatalf("%d MiB of the budget still held for the candidate", n)
	}
	// Adopted by the next agent, as any instance.
	shutdown(t, s, false)
	s = startService(t, cfg)
	testenv.Eventually(t, "cd running", 10*time.Second, func() bool { return mustGet(t, s, "cd").State == "running" })
	if in := mustGet(t, s, "cd"); in.PID != after.PID {
		t.Fatalf("after an agent restart: pid %d -> %d, %s; want the restored process adopted", after.PID, in.PID, in.State)
	}
}

// A candidate that fails at its start (not on the file) fails the restore
// as the agent's fault, not ErrInvalid; the instance keeps its process and
// data, and nothing of the restore is left: no staging directory, no
// upload, no memory held, the cgroup back to one instance's limits.
func TestRestoreCandidateThatFailsToStart(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.RedisServer = candidateWrapper(t, cfg.RedisServer, "redis-server-nocandidate", "echo 'no candidate today' >&2; exit 1")
	s := startService(t, cfg)
	ctx := context.Background()
	c, before := bound(t, s, "nc", Spec{MemoryMB: 24, Persistence: apitype.PersistenceRDB})
	if err := c.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	snap := snapshotBytes(t, s, "nc")
	_, err := s.Restore(ctx, "nc", bytes.NewReader(snap), int64(len(snap)), "")
	if err == nil || errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "exited at its start") || !strings.Contains(err.Error(), "no candidate today") {
		t.Fatalf("Restore = %v; want the candidate's start failure with its log, not ErrInvalid", err)
	}
	after := mustGet(t, s, "nc")
	if after.PID != before.PID || after.State != "running" || c.Get(ctx, "old").Val() != "data" {
		t.Fatalf("instance disturbed: pid %d -> %d, %s", before.PID, after.PID, after.State)
	}
	if s.layout.Staging("nc") {
		t.Fatal("staging directory left behind")
	}
	if left, _ := os.ReadDir(s.layout.UploadDir()); len(left) != 0 {
		t.Fatalf("uploads left behind: %v", left)
	}
	if n := s.transientMB.Load(); n != 0 {
		t.Fatalf("%d MiB of the budget still held for the candidate", n)
	}
	rec, _ := s.store.Get("nc")
	if d, err := s.cg.Differs("nc", s.limitsFor(rec.MemoryMB, rec.Persistence, rec.IO)); err != nil || d || s.runtime("nc").side.Load() {
		t.Fatalf("the cgroup's limits are not one instance's again (differs %v, %v)", d, err)
	}
}

// A candidate that loads the data but cannot be moved onto the instance's
// ports (here its CONFIG is renamed away) is stopped after the exchange:
// the old data is put back and served again, and nothing of the restore
// is left.
func TestRestoreCandidateThatCannotTakeOverPutsTheOldDataBack(t *testing.T) {
	cfg := testConfig(t, 6)
	real := cfg.RedisServer
	cfg.RedisServer = filepath.Join(testenvDir(t), "redis-server-noconfig")
	script := "#!/bin/sh\ncase \"$1\" in *" + candidateConf + ") exec " + real + " \"$@\" --rename-command CONFIG '';; esac\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(cfg.RedisServer, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	s := startService(t, cfg)
	ctx := context.Background()
	src, _ := bound(t, s, "pk-src", Spec{MemoryMB: 32})
	fill(t, src, 100, 10)
	rdb := snapshotBytes(t, s, "pk-src")
	dst, _, cr := boundCreds(t, s, "pk-dst", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, dst, 300, 20)

	_, err := s.Restore(ctx, "pk-dst", bytes.NewReader(rdb), -1, "")
	if err == nil || !strings.Contains(err.Error(), "the old data is back") {
		t.Fatalf("restore whose candidate cannot take over = %v", err)
	}
	testenv.Eventually(t, "pk-dst running", 10*time.Second, func() bool { return mustGet(t, s, "pk-dst").State == "running" })
	checkFilled(t, client(t, cr.Port, cr.Username, cr.Password), 300, 20)
	if l := s.layout; l.Staging("pk-dst") || l.Restored("pk-dst") || l.RestoreFailed("pk-dst") {
		t.Fatal("the restore left its staging directory or a marker")
	}
	if s.runtime("pk-dst").side.Load() || s.transientMB.Load() != 0 {
		t.Fatal("the restore's room in the cgroup or the budget is still held")
	}
}

// An instance in a move refuses a restore, and nothing changes: a move's
// target (it replicates from its primary) and its source.
func TestRestoreRefusedDuringAMove(t *testing.T) {
	s := startService(t, testConfig(t, 2))
	ctx := context.Background()
	c, before := bound(t, s, "mv", Spec{MemoryMB: 16})
	if err := c.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	snap := snapshotBytes(t, s, "mv")
	for name, set := range map[string]func(*state.Instance){
		"source": func(r *state.Instance) {
			r.Move = &state.Move{State: state.MoveReplicating, User: "mover", StartedAt: time.Now()}
		},
		"target": func(r *state.Instance) {
			r.ReplicaOf = &state.Primary{Host: "192.0.2.1", Port: 6379, User: "mover", Password: "x"}
		},
	} {
		t.Run(name, func(t *testing.T) {
			rec, err := s.store.Get("mv")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.store.Update("mv", func(r *state.Instance) error { set(r); return nil }); err != nil {
				t.Fatal(err)
			}
			_, err = s.Restore(ctx, "mv", bytes.NewReader(snap), int64(len(snap)), "")
			if !errors.Is(err, ErrConflict) {
				t.Fatalf("Restore of a move's %s = %v, want ErrConflict", name, err)
			}
			if _, err := s.store.Update("mv", func(r *state.Instance) error { r.Move, r.ReplicaOf = rec.Move, rec.ReplicaOf; return nil }); err != nil {
				t.Fatal(err)
			}
			if in := mustGet(t, s, "mv"); in.PID != before.PID || c.Get(ctx, "old").Val() != "data" || s.layout.Staging("mv") {
				t.Fatalf("the refused restore changed the instance: pid %d -> %d", before.PID, in.PID)
			}
		})
	}
}
