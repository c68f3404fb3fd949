package agent

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// procUID is the real uid /proc/<pid>/status gives for pid.
func procUID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			uid, _ := strconv.Atoi(strings.Fields(v)[0])
			return uid
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return -1
}

func ownerUID(t *testing.T, path string) int {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(st.Sys().(*syscall.Stat_t).Uid)
}

// An instance an older agent ran as the shared redis user is adopted as it
// is and keeps working (a bind included); at its next start it gets a uid
// of its own, its files are handed over, and its data is all there.
func TestAdoptedSharedUserInstanceMovesToItsOwnAtRestart(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: instance users are made as root")
	}
	cfg := testConfig(t, 4)
	if cfg.RedisUser == "" {
		t.Skip("no redis user")
	}
	shared := cfg
	shared.InstanceUIDs = "off" // what an older agent did
	old := startService(t, shared)
	c, inst, _ := boundCreds(t, old, "legacy", Spec{MemoryMB: 32, Persistence: apitype.PersistenceAOF})
	fill(t, c, 200, 10)
	redisUID := procUID(t, inst.PID)
	if inst.UID != 0 || redisUID == 0 {
		t.Fatalf("on the shared user: record uid %d, process uid %d", inst.UID, redisUID)
	}
	shutdown(t, old, false)

	s := startService(t, cfg)
	got := mustGet(t, s, "legacy")
	if got.PID != inst.PID || got.UID != 0 || procUID(t, got.PID) != redisUID {
		t.Fatalf("adopted: %+v (process uid %d); want pid %d still on uid %d", got, procUID(t, got.PID), inst.PID, redisUID)
	}
	ctx := context.Background()
	if _, _, err := s.Bind(ctx, "legacy", "app2", ""); err != nil {
		t.Fatalf("bind on the adopted instance: %v", err)
	}
	checkFilled(t, c, 200, 10)

	if err := s.Restart(ctx, "legacy"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the instance running again", 10*time.Second, func() bool {
		in := mustGet(t, s, "legacy")
		return in.State == "running" && in.PID != inst.PID
	})
	now := mustGet(t, s, "legacy")
	if now.UID < s.uidMin || now.UID > s.uidMax || procUID(t, now.PID) != now.UID {
		t.Fatalf("after the restart: record uid %d, process uid %d; want its own from %d-%d", now.UID, procUID(t, now.PID), s.uidMin, s.uidMax)
	}
	for _, p := range []string{s.layout.DataDir("legacy"), s.layout.LogPath("legacy")} {
		if u := ownerUID(t, p); u != now.UID {
			t.Errorf("%s is owned by %d, want %d", p, u, now.UID)
		}
	}
	checkFilled(t, c, 200, 10)
	// Kept across the agent's own restart: adopted on its own uid.
	pid := now.PID
	shutdown(t, s, false)
	s2 := startService(t, cfg)
	if again := mustGet(t, s2, "legacy"); again.PID != pid || again.UID != now.UID {
		t.Fatalf("after an agent restart: %+v; want pid %d, uid %d", again, pid, now.UID)
	}
}

// Two instances never share a uid, a deleted one's is handed out again,
// and a uid some process already runs as is skipped.
func TestInstanceUIDs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: instance users are made as root")
	}
	cfg := testConfig(t, 4)
	probe := startService(t, cfg)
	lo, _ := probe.uidMin, probe.uidMax
	shutdown(t, probe, true)
	// A process of someone else's already runs as the range's first uid.
	sleep := exec.Command("sleep", "60")
	sleep.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(lo), Gid: uint32(lo)}}
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleep.Process.Kill(); sleep.Wait() })
	s := startService(t, cfg)
	ctx := context.Background()
	a, _, err := s.Provision(ctx, "a", Spec{MemoryMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := s.Provision(ctx, "b", Spec{MemoryMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	if a.UID == lo || b.UID == lo || a.UID == b.UID || a.UID == 0 || b.UID == 0 {
		t.Fatalf("uids a=%d b=%d; want two of their own, not %d (in use)", a.UID, b.UID, lo)
	}
	if err := s.Deprovision(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	c, _, err := s.Provision(ctx, "c", Spec{MemoryMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	if c.UID != a.UID {
		t.Fatalf("c got uid %d; want the deleted a's %d back", c.UID, a.UID)
	}
	// A process of b's that outlives it (here one outside its cgroup,
	// started after the last scan of /proc): b's uid is not handed out
	// while it runs, though the scan before b's delete, a moment ago,
	// did not see it.
	stray := exec.Command("sleep", "60")
	stray.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(b.UID), Gid: uint32(b.UID)}}
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stray.Process.Kill(); stray.Wait() })
	if err := s.Deprovision(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	d, _, err := s.Provision(ctx, "d", Spec{MemoryMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	if d.UID == b.UID || d.UID == c.UID || d.UID == lo {
		t.Fatalf("d got uid %d; want none of %d (b's, a process of it still runs), %d (c's), %d (in use)", d.UID, b.UID, c.UID, lo)
	}
}

// A confined redis-server of its own user tells the agent it is ready
// (READY=1 to the agent's notify socket, from the pid the kernel
// vouches for), so later starts are not polled with connections.
func TestStartsTellTheirReadiness(t *testing.T) {
	cfg := testConfig(t, 4)
	s := startService(t, cfg)
	if s.notify == nil {
		t.Fatal("no notify socket")
	}
	if s.notify.Trusts(cfg.RedisServer) {
		t.Fatal("trusted before any start")
	}
	inst, _, err := s.Provision(t.Context(), "a", Spec{MemoryMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 && procUID(t, inst.PID) == 0 {
		t.Fatal("the instance runs as root; the test is of an instance user's notice")
	}
	testenv.Eventually(t, "the READY=1 of a's redis-server", 5*time.Second, func() bool { return s.notify.Trusts(cfg.RedisServer) })
	// The next start waits for its notice: still ready, still answering.
	if _, _, err := s.Provision(t.Context(), "b", Spec{MemoryMB: 16}); err != nil {
		t.Fatal(err)
	}
	if n := dbsize(t, s, "b"); n != 0 {
		t.Fatalf("dbsize of b %d", n)
	}
}
