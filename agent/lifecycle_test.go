package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/procfs"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/state"
)

// fill writes n keys key:0..key:n-1 with values of size bytes (plus a
// hash and a list, so the RDB holds more than strings).
func fill(t testing.TB, c *goredis.Client, n, size int) {
	t.Helper()
	ctx := context.Background()
	pad := strings.Repeat("x", size)
	for i := 0; i < n; i += 1000 {
		p := c.Pipeline()
		for j := i; j < min(i+1000, n); j++ {
			p.Set(ctx, "key:"+strconv.Itoa(j), strconv.Itoa(j)+pad, 0)
		}
		if _, err := p.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.HSet(ctx, "hash", "a", "1", "b", "2").Err(); err != nil {
		t.Fatal(err)
	}
	if err := c.RPush(ctx, "list", "x", "y", "z").Err(); err != nil {
		t.Fatal(err)
	}
}

// checkFilled fails unless c holds exactly what fill(n, size) wrote.
func checkFilled(t testing.TB, c *goredis.Client, n, size int) {
	t.Helper()
	ctx := context.Background()
	if got := c.DBSize(ctx).Val(); got != int64(n+2) {
		t.Fatalf("DBSIZE = %d, want %d", got, n+2)
	}
	pad := strings.Repeat("x", size)
	for i := 0; i < n; i += 1000 {
		keys := make([]string, 0, 1000)
		for j := i; j < min(i+1000, n); j++ {
			keys = append(keys, "key:"+strconv.Itoa(j))
		}
		vals, err := c.MGet(ctx, keys...).Result()
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range vals {
			if want := strconv.Itoa(i+k) + pad; v != want {
				t.Fatalf("%s = %.20v..., want %.20s...", keys[k], v, want)
			}
		}
	}
	if h := c.HGetAll(ctx, "hash").Val(); h["a"] != "1" || h["b"] != "2" {
		t.Fatalf("hash = %v", h)
	}
	if l := c.LRange(ctx, "list", 0, -1).Val(); strings.Join(l, "") != "xyz" {
		t.Fatalf("list = %v", l)
	}
}

// bound provisions id and returns a client of a binding of it.
func bound(t testing.TB, s *Service, id string, spec Spec) (*goredis.Client, Instance) {
	t.Helper()
	c, inst, _ := boundCreds(t, s, id, spec)
	return c, inst
}

func boundCreds(t testing.TB, s *Service, id string, spec Spec) (*goredis.Client, Instance, Credentials) {
	t.Helper()
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, id, spec)
	if err != nil {
		t.Fatal(err)
	}
	cr, _, err := s.Bind(ctx, id, "app", "")
	if err != nil {
		t.Fatal(err)
	}
	return client(t, inst.Port, cr.Username, cr.Password), inst, cr
}

// pingOnce dials a fresh connection (a go-redis client remembers dial
// errors for a while, which would blur an outage) and PINGs as cr.
func pingAs(ctx context.Context, cr Credentials) error {
	c := goredis.NewClient(&goredis.Options{
		Addr: "127.0.0.1:" + strconv.Itoa(cr.Port), Username: cr.Username, Password: cr.Password,
		MaxRetries: -1, DialerRetries: 1, DisableIdentity: true, Protocol: 2, PoolSize: 1,
	})
	defer c.Close()
	return c.Ping(ctx).Err()
}

// snapshotBytes takes a snapshot of id and checks its length and sha256.
func snapshotBytes(t testing.TB, s *Service, id string) []byte {
	t.Helper()
	snap, err := s.Snapshot(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.File.Close()
	b, err := io.ReadAll(snap.File)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	if int64(len(b)) != snap.Size || hex.EncodeToString(sum[:]) != snap.SHA256 || !bytes.HasPrefix(b, []byte("REDIS")) {
		t.Fatalf("snapshot: %d bytes (said %d), sha256 %x (said %s), starts %q", len(b), snap.Size, sum, snap.SHA256, b[:min(len(b), 9)])
	}
	return b
}

// Snapshot out of one instance and restore into another, in every
// persistence mode: the data arrives whole, the destination's old data is
// gone, its binding keeps working, and (except without persistence) the
// restored data survives a graceful restart and a SIGKILL.
func TestSnapshotRestoreEveryMode(t *testing.T) {
	cfg := testConfig(t, 12)
	s := startService(t, cfg)
	ctx := context.Background()
	for _, mode := range []string{apitype.PersistenceAOF, apitype.PersistenceAOFAlways, apitype.PersistenceRDB, apitype.PersistenceNone} {
		t.Run(mode, func(t *testing.T) {
			src, _ := bound(t, s, "src-"+mode, Spec{MemoryMB: 64, Persistence: mode})
			dst, dinst := bound(t, s, "dst-"+mode, Spec{MemoryMB: 64, Persistence: mode})
			fill(t, src, 5000, 100)
			if err := dst.Set(ctx, "old", "data", 0).Err(); err != nil {
				t.Fatal(err)
			}
			rdb := snapshotBytes(t, s, "src-"+mode)
			_, err := os.Stat(filepath.Join(s.layout.DataDir("src-"+mode), rdbName))
			if kept := err == nil; kept != (mode == apitype.PersistenceRDB) {
				t.Errorf("dump.rdb left in the source's data dir: %v; want it only for rdb", kept)
			}

			sum := sha256.Sum256(rdb)
			if _, err := s.Restore(ctx, "dst-"+mode, bytes.NewReader(rdb), int64(len(rdb)), hex.EncodeToString(sum[:])); err != nil {
				t.Fatal(err)
			}
			checkFilled(t, dst, 5000, 100) // the binding's client reconnects
			if dst.Exists(ctx, "old").Val() != 0 {
				t.Fatal("the old data survived the restore")
			}
			if s.layout.Staging("dst-"+mode) || s.layout.Restored("dst-"+mode) {
				t.Fatal("restore left its staging directory or marker")
			}
			if apitype.IsAOF(mode) {
				if _, err := os.Stat(filepath.Join(s.layout.DataDir("dst-"+mode), "appendonlydir")); err != nil {
					t.Fatalf("no AOF after the restore: %v", err)
				}
			}
			if mode == apitype.PersistenceNone {
				// Nothing survives a restart: that is the mode. An RDB a
				// crash between the swap and the restore's end left behind
				// is loaded once (the restore was to happen), then removed.
				rdbPath := filepath.Join(s.layout.DataDir("dst-"+mode), rdbName)
				if _, err := os.Stat(rdbPath); !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("dump.rdb in the data dir of a none instance after its restore: %v", err)
				}
				if err := os.WriteFile(rdbPath, rdb, 0o600); err != nil {
					t.Fatal(err)
				}
				rec, err := s.store.Get("dst-" + mode)
				if err != nil {
					t.Fatal(err)
				}
				if o := s.ownerOf(rec); o.UID >= 0 {
					if err := os.Chown(rdbPath, o.UID, o.GID); err != nil {
						t.Fatal(err)
					}
				}
				if err := s.Restart(ctx, "dst-"+mode); err != nil {
					t.Fatal(err)
				}
				checkFilled(t, dst, 5000, 100)
				testenv.Eventually(t, "the loaded RDB removed", 5*time.Second, func() bool {
					_, err := os.Stat(rdbPath)
					return errors.Is(err, fs.ErrNotExist)
				})
				if err := s.Restart(ctx, "dst-"+mode); err != nil {
					t.Fatal(err)
				}
				testenv.Eventually(t, "the instance back", 5*time.Second, func() bool { return mustGet(t, s, "dst-"+mode).State == "running" })
				if n, err := dst.DBSize(ctx).Result(); err != nil || n != 0 {
					t.Fatalf("a none instance came back from a restart with %d keys (%v), want none", n, err)
				}
				return
			}
			if err := s.Restart(ctx, "dst-"+mode); err != nil {
				t.Fatal(err)
			}
			checkFilled(t, dst, 5000, 100)
			pid := mustGet(t, s, "dst-"+mode).PID
			if err := dst.Set(ctx, "after", "restore", 0).Err(); err != nil {
				t.Fatal(err)
			}
			if mode != apitype.PersistenceRDB {
				// Written after the restore, in the AOF: survives a crash.
				time.Sleep(1100 * time.Millisecond) // appendfsync everysec
				syscallKill(t, pid)
				testenv.Eventually(t, "restart after SIGKILL", 10*time.Second, func() bool {
					in := mustGet(t, s, "dst-"+mode)
					return in.State == "running" && in.PID != pid
				})
				if v, err := dst.Get(ctx, "after").Result(); v != "restore" {
					t.Fatalf("a write after the restore was lost in a crash: %q %v", v, err)
				}
				dst.Del(ctx, "after")
				checkFilled(t, dst, 5000, 100)
			}
			if dinst.Port != mustGet(t, s, "dst-"+mode).Port {
				t.Fatal("the port changed")
			}
		})
	}
}

func syscallKill(t testing.TB, pid int) {
	t.Helper()
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
}

// A bad file is refused with ErrInvalid before anything changes: the
// instance keeps its process, its data and its directories.
func TestRestoreRefusesBadFiles(t *testing.T) {
	cfg := testConfig(t, 10)
	s := startService(t, cfg)
	ctx := context.Background()
	src, _ := bound(t, s, "src", Spec{MemoryMB: 64})
	fill(t, src, 20000, 1000) // ~20 MiB
	good := snapshotBytes(t, s, "src")
	dst, _ := bound(t, s, "dst", Spec{MemoryMB: 8})
	if err := dst.Set(ctx, "old", "data", 0).Err(); err != nil {
		t.Fatal(err)
	}
	before := mustGet(t, s, "dst")

	sum := sha256.Sum256(good)
	tests := []struct {
		name string
		body []byte
		sha  string
		says string
	}{
		{"garbage", []byte("this is not an RDB file at all\n"), "", "not an RDB file"},
		{"an RDB's header, then garbage", []byte("REDIS0010 and then this is not an RDB file at all\n"), "", "cannot load the snapshot"},
		{"an AOF", []byte("*1\r\n$8\r\nFLUSHALL\r\n"), "", "not an RDB file"},
		{"truncated", good[:len(good)/2], "", "cannot load the snapshot"},
		{"flipped byte", flip(good, len(good)/3), "", "cannot load the snapshot"},
		{"empty", nil, "", "empty"},
		{"wrong sha256", good, strings.Repeat("ab", 32), "sha256"},
		{"malformed sha256", good, "xyz", "sha256"},
		{"larger than maxmemory", good, hex.EncodeToString(sum[:]), "more than the instance's memory_mb 8"},
		{"cut off in transit", good[:1000], "", "could not be read whole"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader = bytes.NewReader(tt.body)
			if tt.name == "cut off in transit" {
				body = io.MultiReader(body, iotest.ErrReader(io.ErrUnexpectedEOF))
			}
			_, err := s.Restore(ctx, "dst", body, -1, tt.sha)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("Restore = %v; want ErrInvalid saying %q", err, tt.says)
			}
			after := mustGet(t, s, "dst")
			if after.PID != before.PID || after.State != "running" {
				t.Fatalf("instance disturbed: pid %d -> %d, %s", before.PID, after.PID, after.State)
			}
			if dst.Get(ctx, "old").Val() != "data" {
				t.Fatal("the old data is gone")
			}
			if s.layout.Staging("dst") {
				t.Fatal("staging directory left behind")
			}
			if left, _ := os.ReadDir(s.layout.UploadDir()); len(left) != 0 {
				t.Fatalf("upload files left behind: %v", left)
			}
		})
	}

	// A slow upload holds no lock: the instance can be bound, resized and
	// snapshotted meanwhile.
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := s.Restore(ctx, "dst", pr, -1, "")
		done <- err
	}()
	if _, err := pw.Write(good[:4096]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Bind(ctx, "dst", "during-upload", ""); err != nil {
		t.Fatalf("bind during an upload: %v", err)
	}
	if _, err := s.Resize(ctx, "dst", 9); err != nil {
		t.Fatalf("resize during an upload: %v", err)
	}
	pw.CloseWithError(io.ErrUnexpectedEOF)
	if err := <-done; !errors.Is(err, ErrInvalid) {
		t.Fatalf("restore cut off = %v, want ErrInvalid", err)
	}

	// A declared size over the instance's limit is refused before a byte
	// is read (this body would block forever).
	blocked, _ := io.Pipe()
	_, err := s.Restore(ctx, "dst", blocked, 1<<40, "")
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("restore of a declared 1 TiB = %v, want ErrInvalid", err)
	}
	if left, _ := os.ReadDir(s.layout.UploadDir()); len(left) != 0 {
		t.Fatalf("upload files after a refused declared size: %v", left)
	}
	if _, err := s.Restore(ctx, "absent", bytes.NewReader(good), -1, ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("restore into an absent instance = %v, want ErrNotFound", err)
	}
	if _, err := s.Snapshot(ctx, "absent"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("snapshot of an absent instance = %v, want ErrNotFound", err)
	}
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0xff
	return c
}

// PATCH memory_mb: maxmemory, config file and cgroup limit change; the
// process and its clients' connections stay; the budget is respected.
func TestResizeLive(t *testing.T) {
	cfg := testConfig(t, 10)
	cfg.MemoryBudgetMB = 200
	s := startService(t, cfg)
	ctx := context.Background()
	c, inst := bound(t, s, "r", Spec{MemoryMB: 32})
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	connID := c.ClientID(ctx).Val()

	got, err := s.Resize(ctx, "r", 100)
	if err != nil || got.MemoryMB != 100 {
		t.Fatalf("Resize = %+v, %v", got, err)
	}
	admin := s.runtime("r").admin
	f, err := admin.Fields(ctx, "memory")
	if err != nil || f["maxmemory"] != strconv.Itoa(100<<20) {
		t.Fatalf("live maxmemory = %s, %v; want %d", f["maxmemory"], err, 100<<20)
	}
	conf, _ := os.ReadFile(s.layout.ConfPath("r"))
	if !bytes.Contains(conf, []byte("maxmemory 100mb\n")) {
		t.Fatalf("redis.conf was not rewritten:\n%s", conf)
	}
	if after := mustGet(t, s, "r"); after.PID != inst.PID || after.Restarts != 0 {
		t.Fatalf("resize restarted the process: pid %d -> %d", inst.PID, after.PID)
	}
	if id := c.ClientID(ctx).Val(); id != connID {
		t.Fatalf("the client's connection changed: %d -> %d", connID, id)
	}
	if cgroupsOn(s) {
		limit := cgroupMemoryLimit(t, cfg, "r")
		if limit != 2*100<<20+64<<20 {
			t.Fatalf("cgroup memory limit = %d, want %d", limit, 2*100<<20+64<<20)
		}
	}

	// The budget: 200 MiB in all; another instance holds 50.
	if _, _, err := s.Provision(ctx, "other", Spec{MemoryMB: 50}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resize(ctx, "r", 151); !errors.Is(err, ErrCapacity) {
		t.Fatalf("resize beyond the budget = %v, want ErrCapacity", err)
	}
	if _, err := s.Resize(ctx, "r", 150); err != nil {
		t.Fatalf("resize to exactly the budget = %v", err)
	}
	if capa, _ := s.Capacity(ctx); capa.MemoryReservedMB != 200 || capa.MemoryFreeMB != 0 {
		t.Fatalf("capacity after resize = %+v", capa)
	}

	// Shrinking below the data set is refused; to an invalid size too.
	if err := c.Set(ctx, "big", strings.Repeat("x", 3<<20), 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resize(ctx, "r", 2); !errors.Is(err, ErrConflict) {
		t.Fatalf("shrink below the data set = %v, want ErrConflict", err)
	}
	if _, err := s.Resize(ctx, "r", 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("resize to 0 = %v, want ErrInvalid", err)
	}
	if _, err := s.Resize(ctx, "absent", 10); !errors.Is(err, ErrNotFound) {
		t.Fatalf("resize of an absent instance = %v, want ErrNotFound", err)
	}
	if rec, _ := s.store.Get("r"); rec.MemoryMB != 150 {
		t.Fatalf("a refused resize changed the record: %d", rec.MemoryMB)
	}
	got, err = s.Resize(ctx, "r", 16)
	if err != nil || got.MemoryMB != 16 {
		t.Fatalf("shrink = %+v, %v", got, err)
	}
	if f, _ := admin.Fields(ctx, "memory"); f["maxmemory"] != strconv.Itoa(16<<20) {
		t.Fatalf("live maxmemory after shrink = %s", f["maxmemory"])
	}

	// A resize a crash left half done (record only) is finished once the
	// process is adopted: its first health check sees the old maxmemory.
	if _, err := s.store.Update("r", func(r *state.Instance) error { r.MemoryMB = 40; return nil }); err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)
	cfg.Health.Interval = 100 * time.Millisecond
	s2 := startService(t, cfg)
	testenv.Eventually(t, "maxmemory synced after adoption", 5*time.Second, func() bool {
		f, err := s2.runtime("r").admin.Fields(ctx, "memory")
		return err == nil && f["maxmemory"] == strconv.Itoa(40<<20)
	})
	if after := mustGet(t, s2, "r"); after.PID != inst.PID {
		t.Fatal("adoption restarted the process")
	}
}

// cgroupMemoryLimit reads the memory limit of an instance's cgroup (v1 or v2).
func cgroupMemoryLimit(t *testing.T, cfg Config, id string) int64 {
	t.Helper()
	for _, p := range []string{
		filepath.Join("/sys/fs/cgroup/memory", cfg.CgroupParent(), id, "memory.limit_in_bytes"),
		filepath.Join("/sys/fs/cgroup", cfg.CgroupParent(), id, "memory.max"),
	} {
		if b, err := os.ReadFile(p); err == nil {
			n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no memory limit file for the instance's cgroup")
	return 0
}

// writeWrapper writes an executable script that says it is version
// version and otherwise runs redis-server (exit code fail instead, when
// not 0): a second "build" of Redis for rollout tests.
func writeWrapper(t *testing.T, real, version string, fail int) string {
	t.Helper()
	path := filepath.Join(testenvDir(t), "redis-server-"+version)
	run := `exec ` + real + ` "$@"`
	if fail != 0 {
		run = "echo broken build >&2; exit " + strconv.Itoa(fail)
	}
	script := fmt.Sprintf(`#!/bin/sh
if [ "$1" = "--version" ]; then
	echo "Redis server v=%s sha=00000000:0 malloc=libc bits=64 build=test%s"
	exit 0
fi
%s
`, version, strings.ReplaceAll(version, ".", ""), run)
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// testenvDir is a directory the Redis user can reach (the scripts in it
// run as that user).
func testenvDir(t *testing.T) string { return testenv.TraversableDir(t) }

func waitRollout(t *testing.T, s *Service, timeout time.Duration) Rollout {
	t.Helper()
	var st Rollout
	testenv.Eventually(t, "rollout to end", timeout, func() bool {
		var err error
		st, err = s.RolloutStatus(context.Background())
		return err == nil && st.State != RolloutRunning
	})
	return st
}

// A new redis-server binary: instances move to it one at a time, keep their
// data, and never more than one is down at once. A binary on which an
// instance does not start stops the rollout and that instance goes back to
// its old binary.
func TestRollingUpgrade(t *testing.T) {
	cfg := testConfig(t, 10)
	real := cfg.RedisServer
	s := startService(t, cfg)
	ctx := context.Background()
	ids := []string{"u1", "u2", "u3"}
	creds := map[string]Credentials{}
	pids := map[string]int{}
	for i, id := range ids {
		mode := []string{apitype.PersistenceAOF, apitype.PersistenceRDB, apitype.PersistenceAOFAlways}[i]
		c, inst, cr := boundCreds(t, s, id, Spec{MemoryMB: 32, Persistence: mode})
		fill(t, c, 2000, 50)
		creds[id], pids[id] = cr, inst.PID
	}
	// A new client each time: go-redis remembers failed dials.
	fresh := func(id string) *goredis.Client {
		return client(t, creds[id].Port, creds[id].Username, creds[id].Password)
	}
	if st, err := s.StartRollout(ctx, nil); err != nil || st.State != RolloutDone || st.Total != 0 {
		t.Fatalf("rollout with nothing to move = %+v, %v; want done at once", st, err)
	}
	shutdown(t, s, false)

	// The agent comes back configured with "7.0.99".
	cfg.RedisServer = writeWrapper(t, real, "7.0.99", 0)
	s = startService(t, cfg)
	if capa, err := s.Capacity(ctx); err != nil || capa.RedisVersion != "7.0.99" {
		t.Fatalf("capacity redis_version = %q, %v", capa.RedisVersion, err)
	}
	if st, _ := s.RolloutStatus(ctx); st.Pending != 3 || st.State != RolloutIdle {
		t.Fatalf("before the rollout: %+v; want 3 pending", st)
	}
	for _, id := range ids {
		if in := mustGet(t, s, id); in.PID != pids[id] {
			t.Fatalf("%s: the agent's restart restarted it", id)
		}
	}

	// Watch availability while it runs: how many are down at once.
	stop := make(chan struct{})
	maxDown := make(chan int, 1)
	go func() {
		worst := 0
		for {
			select {
			case <-stop:
				maxDown <- worst
				return
			default:
			}
			down := 0
			for _, id := range ids {
				pctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
				if pingAs(pctx, creds[id]) != nil {
					down++
				}
				cancel()
			}
			worst = max(worst, down)
			time.Sleep(time.Millisecond)
		}
	}()
	st, err := s.StartRollout(ctx, nil)
	if err != nil || st.State != RolloutRunning || st.Total != 3 {
		t.Fatalf("StartRollout = %+v, %v", st, err)
	}
	st = waitRollout(t, s, 60*time.Second)
	close(stop)
	if worst := <-maxDown; worst > 1 {
		t.Errorf("%d instances were down at once; want at most 1", worst)
	}
	if st.State != RolloutDone || st.Moved != 3 || st.Pending != 0 || st.MaxUnavailableSeconds <= 0 {
		t.Fatalf("rollout = %+v; want done, 3 moved", st)
	}
	t.Logf("longest unavailability of one instance: %.0f ms", st.MaxUnavailableSeconds*1000)
	for _, id := range ids {
		in := mustGet(t, s, id)
		if in.Binary != cfg.RedisServer || in.PID == pids[id] || in.State != "running" {
			t.Fatalf("%s after the rollout: binary %s pid %d (was %d) %s", id, in.Binary, in.PID, pids[id], in.State)
		}
		checkFilled(t, fresh(id), 2000, 50)
		pids[id] = in.PID
	}

	// A broken build: the first instance fails on it, goes back, and the
	// rollout stops there.
	good := cfg.RedisServer
	shutdown(t, s, false)
	cfg.RedisServer = writeWrapper(t, real, "7.0.100", 1)
	s = startService(t, cfg)
	if _, err := s.StartRollout(ctx, nil); err != nil {
		t.Fatal(err)
	}
	st = waitRollout(t, s, 60*time.Second)
	if st.State != RolloutFailed || st.FailedInstance != "u1" || st.Moved != 0 || !strings.Contains(st.Error, "not ready") {
		t.Fatalf("rollout onto a broken build = %+v; want failed at u1", st)
	}
	for _, id := range ids {
		in := mustGet(t, s, id)
		if in.Binary != good || in.State != "running" {
			t.Fatalf("%s after the failed rollout: binary %s, %s; want back on %s, running", id, in.Binary, in.State, good)
		}
		if id != "u1" && in.PID != pids[id] {
			t.Fatalf("%s was touched by a rollout that stopped before it", id)
		}
		checkFilled(t, fresh(id), 2000, 50)
	}
	// The next agent start does not try the broken build again by itself.
	shutdown(t, s, false)
	s = startService(t, cfg)
	s.AutoRollout(ctx)
	if st, _ := s.RolloutStatus(ctx); st.State != RolloutFailed || st.Pending != 3 {
		t.Fatalf("automatic rollout after a failure = %+v; want failed, not run", st)
	}
	if in := mustGet(t, s, "u2"); in.PID != pids["u2"] || in.Binary != good {
		t.Fatal("the automatic rollout touched an instance")
	}
	if rec, _ := s.store.Get("u1"); rec.RolloutFailed == "" {
		t.Fatal("the failure is not recorded")
	}
}

// replaceInPlace puts content at path the way a package upgrade does: a
// new file renamed over the old one, which running processes keep using.
func replaceInPlace(t *testing.T, path string, content []byte) {
	t.Helper()
	tmp := path + ".dpkg-new"
	if err := os.WriteFile(tmp, content, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// An upgrade in place (same path, new file) to a broken build: the first
// instance fails on it and goes back to the executable it ran, which only
// its process still had (the agent keeps a copy); the rest are untouched.
// A good build at the same path then moves everyone and the copy goes.
func TestInPlaceUpgradeGoesBackToTheReplacedFile(t *testing.T) {
	cfg := testConfig(t, 10)
	real, err := os.ReadFile(cfg.RedisServer)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RedisServer = filepath.Join(testenvDir(t), "redis-server")
	replaceInPlace(t, cfg.RedisServer, real)
	s := startService(t, cfg)
	ctx := context.Background()
	ids := []string{"ip1", "ip2"}
	creds := map[string]Credentials{}
	pids := map[string]int{}
	for _, id := range ids {
		c, inst, cr := boundCreds(t, s, id, Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
		fill(t, c, 500, 50)
		creds[id], pids[id] = cr, inst.PID
	}

	// A build that cannot even say its version is refused outright.
	replaceInPlace(t, cfg.RedisServer, []byte("#!/bin/sh\necho broken build >&2\nexit 1\n"))
	if st, err := s.StartRollout(ctx, nil); err == nil || !strings.Contains(err.Error(), "--version") {
		t.Fatalf("StartRollout onto a binary whose --version fails = %+v, %v; want an error", st, err)
	}
	for _, id := range ids {
		if in := mustGet(t, s, id); in.PID != pids[id] {
			t.Fatalf("%s restarted by a refused rollout", id)
		}
	}

	// One that says its version but does not serve.
	broken, err := os.ReadFile(writeWrapper(t, "/nonexistent", "7.0.101", 1))
	if err != nil {
		t.Fatal(err)
	}
	replaceInPlace(t, cfg.RedisServer, broken)
	if st, err := s.StartRollout(ctx, nil); err != nil || st.State != RolloutRunning {
		t.Fatalf("StartRollout after an in-place upgrade = %+v, %v", st, err)
	}
	st := waitRollout(t, s, 60*time.Second)
	if st.State != RolloutFailed || st.FailedInstance != "ip1" || st.Moved != 0 {
		t.Fatalf("rollout onto a broken build in place = %+v; want failed at ip1", st)
	}
	back := mustGet(t, s, "ip1")
	if back.State != "running" || back.PID == pids["ip1"] || !strings.HasPrefix(back.Binary, filepath.Join(cfg.DataDir, "binaries")) {
		t.Fatalf("ip1 after the failed move: %+v; want running again on a kept copy under %s/binaries", back, cfg.DataDir)
	}
	if kept, err := os.ReadFile(back.Binary); err != nil || !bytes.Equal(kept, real) {
		t.Fatalf("the kept copy (%d bytes, %v) is not the replaced executable (%d bytes)", len(kept), err, len(real))
	}
	checkFilled(t, client(t, creds["ip1"].Port, creds["ip1"].Username, creds["ip1"].Password), 500, 50)
	if in := mustGet(t, s, "ip2"); in.PID != pids["ip2"] || in.Binary != cfg.RedisServer {
		t.Fatalf("ip2 was touched by a rollout that stopped before it: %+v", in)
	}

	// A crash restart of the instance keeps it on the copy, not on the
	// broken file.
	syscallKill(t, back.PID)
	testenv.Eventually(t, "ip1 restarted after its crash", 10*time.Second, func() bool {
		in := mustGet(t, s, "ip1")
		return in.State == "running" && in.PID != back.PID
	})
	if in := mustGet(t, s, "ip1"); in.Binary != back.Binary {
		t.Fatalf("after a crash ip1 runs %s, want the kept copy %s", in.Binary, back.Binary)
	}

	// The fixed build, at the same path.
	replaceInPlace(t, cfg.RedisServer, real)
	if _, err := s.StartRollout(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if st := waitRollout(t, s, 60*time.Second); st.State != RolloutDone || st.Moved != 2 {
		t.Fatalf("rollout onto the fixed build = %+v", st)
	}
	for _, id := range ids {
		in := mustGet(t, s, id)
		if in.Binary != cfg.RedisServer || in.State != "running" {
			t.Fatalf("%s after the rollout: %+v", id, in)
		}
		checkFilled(t, client(t, creds[id].Port, creds[id].Username, creds[id].Password), 500, 50)
	}
	if entries, _ := os.ReadDir(filepath.Join(cfg.DataDir, "binaries")); len(entries) != 0 {
		t.Fatalf("kept copies left after every instance moved: %v", entries)
	}
}

// The candidate's socket lives in the staged data directory, whose path
// can be longer than a socket address holds (107 bytes): an instance with
// the longest id, under a deep data dir, restores all the same.
func TestRestoreLongPaths(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.DataDir = filepath.Join(cfg.DataDir, strings.Repeat("d", 40))
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	s := startService(t, cfg)
	id := "long-" + strings.Repeat("i", 59)
	if sock := filepath.Join(s.layout.StagedDataDir(id), candidateSocket); len(sock) <= 107 {
		t.Fatalf("the test's socket path is only %d bytes", len(sock))
	}
	c, _ := bound(t, s, id, Spec{MemoryMB: 16})
	fill(t, c, 100, 10)
	rdb := snapshotBytes(t, s, id)
	c.FlushAll(context.Background())
	if _, err := s.Restore(context.Background(), id, bytes.NewReader(rdb), -1, ""); err != nil {
		t.Fatal(err)
	}
	checkFilled(t, c, 100, 10)
}

// A crash in the middle of a move (the instance already started on the
// new binary, not yet ready) leaves RolloutFrom in the record; the rollout
// at the next agent start finishes the move: here the new binary cannot
// run it, so it goes back to the binary it came from.
func TestRolloutFinishesAnInterruptedMove(t *testing.T) {
	cfg := testConfig(t, 4)
	real := cfg.RedisServer
	s := startService(t, cfg)
	ctx := context.Background()
	c, inst, cr := boundCreds(t, s, "im", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, c, 500, 50)

	// What the crash left: the record says the instance was started on
	// the broken binary and came from the real one; no process runs.
	broken := writeWrapper(t, real, "7.0.102", 1)
	brokenID, err := binaryID(broken)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Update("im", func(r *state.Instance) error {
		r.Binary, r.BinaryID, r.RolloutFrom = broken, brokenID, real
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)
	syscallKill(t, inst.PID)
	testenv.Eventually(t, "the process gone", 5*time.Second, func() bool {
		// Gone, or a zombie: the closed supervisor no longer reaps it.
		st, err := procfs.ReadStat(inst.PID)
		return err != nil || st.Gone()
	})

	cfg.RedisServer = broken
	s = startService(t, cfg)
	s.AutoRollout(ctx)
	st := waitRollout(t, s, 60*time.Second)
	if st.State != RolloutFailed || st.FailedInstance != "im" {
		t.Fatalf("rollout after the interrupted move = %+v; want failed at im", st)
	}
	in := mustGet(t, s, "im")
	if in.State != "running" || in.Binary != real {
		t.Fatalf("im after the finished move: %s on %s; want running on %s", in.State, in.Binary, real)
	}
	checkFilled(t, client(t, cr.Port, cr.Username, cr.Password), 500, 50)
	if rec, _ := s.store.Get("im"); rec.RolloutFrom != "" || rec.RolloutFailed != brokenID {
		t.Fatalf("record after the finished move: rollout_from %q, rollout_failed %q", rec.RolloutFrom, rec.RolloutFailed)
	}
}

// An instance that is down for reasons of its own (here a corrupt AOF)
// does not stop a rollout: it is moved without waiting for it, and the
// others move too.
func TestRolloutDoesNotBlameABrokenInstance(t *testing.T) {
	cfg := testConfig(t, 4)
	real := cfg.RedisServer
	s := startService(t, cfg)
	ctx := context.Background()
	bad, inst, _ := boundCreds(t, s, "rb-bad", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, bad, 10, 10)
	good, _, gcr := boundCreds(t, s, "rb-good", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, good, 500, 50)
	breakAOF(t, s, "rb-bad", inst.PID)
	shutdown(t, s, false)

	cfg.RedisServer = writeWrapper(t, real, "7.0.103", 0)
	s = startService(t, cfg)
	if _, err := s.StartRollout(ctx, nil); err != nil {
		t.Fatal(err)
	}
	st := waitRollout(t, s, 60*time.Second)
	if st.State != RolloutDone || st.Moved != 2 || st.Pending != 0 {
		t.Fatalf("rollout with a broken instance = %+v; want done, both moved", st)
	}
	for _, id := range []string{"rb-bad", "rb-good"} {
		if rec, _ := s.store.Get(id); rec.Binary != cfg.RedisServer || rec.RolloutFailed != "" || rec.RolloutFrom != "" {
			t.Fatalf("%s after the rollout: binary %s, rollout_failed %q, rollout_from %q", id, rec.Binary, rec.RolloutFailed, rec.RolloutFrom)
		}
	}
	if in := mustGet(t, s, "rb-good"); in.State != "running" {
		t.Fatalf("rb-good is %s", in.State)
	}
	checkFilled(t, client(t, gcr.Port, gcr.Username, gcr.Password), 500, 50)
}

// An instance that is down cannot shrink (its data set cannot be
// measured, and a lower cgroup limit would OOM-kill it once loaded); it
// can grow.
func TestResizeWhileDown(t *testing.T) {
	cfg := testConfig(t, 4)
	s := startService(t, cfg)
	ctx := context.Background()
	c, inst := bound(t, s, "rs-down", Spec{MemoryMB: 64, Persistence: apitype.PersistenceAOF})
	fill(t, c, 10, 10)
	breakAOF(t, s, "rs-down", inst.PID)
	if _, err := s.Resize(ctx, "rs-down", 32); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "shrink only while running") {
		t.Fatalf("shrinking a down instance = %v, want ErrConflict", err)
	}
	if rec, _ := s.store.Get("rs-down"); rec.MemoryMB != 64 {
		t.Fatalf("a refused shrink changed the record: %d", rec.MemoryMB)
	}
	if got, err := s.Resize(ctx, "rs-down", 128); err != nil || got.MemoryMB != 128 {
		t.Fatalf("growing a down instance = %+v, %v", got, err)
	}
	if conf, _ := os.ReadFile(s.layout.ConfPath("rs-down")); !bytes.Contains(conf, []byte("maxmemory 128mb\n")) {
		t.Fatal("redis.conf was not rewritten for the grown instance")
	}
}

// breakAOF makes the AOF instance id unloadable, kills its process pid and
// waits until the instance is down for it (backoff or crashloop).
func breakAOF(t *testing.T, s *Service, id string, pid int) {
	t.Helper()
	incr, _ := filepath.Glob(filepath.Join(s.layout.DataDir(id), "appendonlydir", "*.incr.aof"))
	if len(incr) != 1 {
		t.Fatalf("incr AOF files: %v", incr)
	}
	if err := os.WriteFile(incr[0], []byte("this is not an AOF\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	syscallKill(t, pid)
	testenv.Eventually(t, id+" down", 10*time.Second, func() bool {
		st := mustGet(t, s, id).State
		return st == "backoff" || st == "crashloop"
	})
}

// Restored data that did not start is marked failed before the previous
// data is exchanged back. A crash between the two leaves the failed data
// live (and maybe a process on it); the next start stops that process,
// puts the previous data back and removes the failed data.
func TestReconcileFinishesASwapBack(t *testing.T) {
	cfg := testConfig(t, 4)
	s := startService(t, cfg)
	c, inst, cr := boundCreds(t, s, "sb", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, c, 300, 20)
	rec, err := s.store.Get("sb")
	if err != nil {
		t.Fatal(err)
	}
	shutdown(t, s, false)

	// The crash's leftovers, built under the running process: the failed
	// data is live (an empty directory here), the previous data staged.
	l := s.layout
	if err := l.CreateStaging("sb", s.ownerOf(rec)); err != nil {
		t.Fatal(err)
	}
	if err := l.Exchange("sb"); err != nil {
		t.Fatal(err)
	}
	if err := l.MarkRestoreFailed("sb"); err != nil {
		t.Fatal(err)
	}
	if !l.RestoreFailed("sb") || l.Restored("sb") {
		t.Fatal("the markers do not say failed")
	}

	s = startService(t, cfg)
	in := mustGet(t, s, "sb")
	if in.PID == inst.PID {
		t.Fatal("the process on the failed data was adopted, not stopped")
	}
	testenv.Eventually(t, "sb running", 10*time.Second, func() bool { return mustGet(t, s, "sb").State == "running" })
	checkFilled(t, client(t, cr.Port, cr.Username, cr.Password), 300, 20)
	if l.Staging("sb") || l.RestoreFailed("sb") {
		t.Fatal("the failed restored data or its marker is left")
	}
}

// After a power loss (the agent and every redis-server killed) the next
// agent starts the instances in the order of their data on disk, smallest
// first, so many at once; the record of each process is written.
func TestBootStartsSmallestFirst(t *testing.T) {
	cfg := testConfig(t, 4)
	s := startService(t, cfg)
	sizes := map[string]int{"big": 2000, "none": 0, "small": 20}
	for id, keys := range sizes {
		c, _ := bound(t, s, id, Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
		fill(t, c, keys, 100)
	}
	time.Sleep(1100 * time.Millisecond) // appendfsync everysec
	list, _ := s.List(context.Background())
	shutdown(t, s, false)
	for _, in := range list {
		syscallKill(t, in.PID)
	}
	for _, in := range list {
		testenv.Eventually(t, in.ID+" gone", 5*time.Second, func() bool { return syscall.Kill(in.PID, 0) != nil || isZombie(in.PID) })
	}

	cfg.bootTurns = 1
	s = startService(t, cfg)
	started := map[string]time.Time{}
	for id := range sizes {
		testenv.Eventually(t, id+" running", 10*time.Second, func() bool { return mustGet(t, s, id).State == "running" })
		started[id] = s.runtime(id).sup.Status().StartedAt
		if rec, err := s.store.Get(id); err != nil || rec.PID != mustGet(t, s, id).PID {
			t.Fatalf("record of %s: pid %d (%v), running %d", id, rec.PID, err, mustGet(t, s, id).PID)
		}
	}
	if !started["none"].Before(started["small"]) || !started["small"].Before(started["big"]) {
		t.Fatalf("started none %v, small %v, big %v: want the smallest data first", started["none"], started["small"], started["big"])
	}
	if s.booting.Load() {
		t.Fatal("still booting after every start")
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && (b[i+2] == 'Z' || b[i+2] == 'X')
}

// A snapshot read while it is made is the instance's data set whole, its
// sha256 the one said at the end, in every persistence mode; the
// instance's lock is held until it is closed, and a stopped instance is
// refused before anything is made.
func TestSnapshotStream(t *testing.T) {
	s := startService(t, testConfig(t, 6))
	ctx := context.Background()
	for _, mode := range []string{apitype.PersistenceAOF, apitype.PersistenceRDB, apitype.PersistenceNone} {
		t.Run(mode, func(t *testing.T) {
			src, _ := bound(t, s, "ss-"+mode, Spec{MemoryMB: 64, Persistence: mode})
			fill(t, src, 20000, 1000) // ~20 MiB: read while written
			st, err := s.SnapshotStream(ctx, "ss-"+mode)
			if err != nil {
				t.Fatal(err)
			}
			locked := make(chan struct{})
			go func() { unlock := s.locks.lock("ss-" + mode); unlock(); close(locked) }()
			b, err := io.ReadAll(st)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-locked:
				t.Fatal("the instance's lock was free before Close")
			case <-time.After(50 * time.Millisecond):
			}
			sum := sha256.Sum256(b)
			if hex.EncodeToString(sum[:]) != st.SHA256() {
				t.Fatalf("SHA256 %s, the body's %x", st.SHA256(), sum)
			}
			st.Close()
			<-locked
			dst, _ := bound(t, s, "sd-"+mode, Spec{MemoryMB: 64, Persistence: mode})
			if _, err := s.Restore(ctx, "sd-"+mode, bytes.NewReader(b), int64(len(b)), st.SHA256()); err != nil {
				t.Fatal(err)
			}
			checkFilled(t, dst, 20000, 1000)
			_, err = os.Stat(filepath.Join(s.layout.DataDir("ss-"+mode), rdbName))
			if kept := err == nil; kept != (mode == apitype.PersistenceRDB) {
				t.Errorf("dump.rdb left in the source's data dir: %v; want it only for rdb", kept)
			}
			if m, _ := filepath.Glob(filepath.Join(s.layout.DataDir("ss-"+mode), "temp-*")); len(m) != 0 {
				t.Errorf("temp files left: %v", m)
			}
		})
	}
	if _, err := s.SnapshotStream(ctx, "absent"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("stream of an absent instance = %v, want ErrNotFound", err)
	}
}

// A snapshot stream ends when the fork renames its file to dump.rdb (its
// last step, once the file is whole and fsynced), not when the server
// notes the save's end, up to a serverCron later: here at hz 1, the
// server still says the save is in progress when the stream has ended,
// in at least one of three tries (its cron may fall just between).
func TestSnapshotStreamEndsAtTheRename(t *testing.T) {
	s := startService(t, testConfig(t, 2))
	ctx := context.Background()
	src, _ := bound(t, s, "sr", Spec{MemoryMB: 64, Persistence: apitype.PersistenceAOF})
	fill(t, src, 5000, 1000)
	in := s.runtime("sr")
	if _, err := in.admin.Do(ctx, "CONFIG", "SET", "hz", "1"); err != nil {
		t.Fatal(err)
	}
	early := 0
	for range 3 {
		st, err := s.SnapshotStream(ctx, "sr")
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(st)
		if err != nil {
			t.Fatal(err)
		}
		f, err := in.admin.Fields(ctx, "persistence")
		if err != nil {
			t.Fatal(err)
		}
		if f["rdb_bgsave_in_progress"] == "1" {
			early++
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != st.SHA256() {
			t.Fatalf("SHA256 %s, the body's %x", st.SHA256(), sum)
		}
		st.Close()
		// Whole: it restores.
		if n, want := rdbKeys(t, b), int(src.DBSize(ctx).Val()); n != want {
			t.Fatalf("the streamed RDB holds %d keys, the instance %d", n, want)
		}
		// The server notes the end at its next cron; the next save waits.
		testenv.Eventually(t, "the save noted", 3*time.Second, func() bool {
			f, err := in.admin.Fields(ctx, "persistence")
			return err == nil && f["rdb_bgsave_in_progress"] == "0"
		})
	}
	if early == 0 {
		t.Fatal("every stream ended only once the server had noted the save's end")
	}
	if _, err := os.Stat(filepath.Join(s.layout.DataDir("sr"), rdbName)); err == nil {
		t.Error("dump.rdb left in the data dir of an aof instance")
	}
}

// rdbKeys counts the keys of an RDB with redis-check-rdb.
func rdbKeys(t *testing.T, rdb []byte) int {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dump.rdb")
	if err := os.WriteFile(path, rdb, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("redis-check-rdb", path).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-check-rdb: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if before, ok := strings.CutSuffix(strings.TrimSpace(line), " keys read"); ok {
			n, _ := strconv.Atoi(strings.TrimPrefix(before, "[info] "))
			return n
		}
	}
	t.Fatalf("redis-check-rdb said no key count:\n%s", out)
	return 0
}
