package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The host's faults get clear errors and leave no half-state.

// blamesCaller reports whether err maps to a 4xx.
func blamesCaller(err error) bool {
	return errors.Is(err, ErrInvalid) || errors.Is(err, ErrConflict) || errors.Is(err, ErrCapacity) || errors.Is(err, ErrNotFound)
}

// assertOnly checks that exactly ids have records and directories.
func assertOnly(t *testing.T, s *Service, ids ...string) {
	t.Helper()
	list, err := s.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, in := range list {
		got = append(got, in.ID)
	}
	dirs, _ := s.layout.List()
	if strings.Join(got, ",") != strings.Join(ids, ",") || strings.Join(dirs, ",") != strings.Join(ids, ",") {
		t.Fatalf("records %v, directories %v; want exactly %v", got, dirs, ids)
	}
}

func TestRedisServerBinaryDisappears(t *testing.T) {
	cfg := testConfig(t, 3)
	bin := filepath.Join(testenv.TraversableDir(t), "redis-server")
	copyFile(t, testenv.RedisServer(t), bin)
	cfg.RedisServer = bin
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "before", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	_, _, err := s.Provision(ctx, "after", Spec{Persistence: "none"})
	if err == nil || blamesCaller(err) || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("Provision without the binary = %v; want a 5xx naming the missing file", err)
	}
	assertOnly(t, s, "before")
	if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), bin) {
		t.Fatalf("Ready = %v; want not ready, naming %s", err, bin)
	}
	if st := mustGet(t, s, "before").State; st != "running" {
		t.Fatalf("the running instance is %s", st)
	}
	copyFile(t, testenv.RedisServer(t), bin)
	if _, _, err := s.Provision(ctx, "after", Spec{Persistence: "none"}); err != nil {
		t.Fatalf("Provision once the binary is back: %v", err)
	}
	if err := s.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestForeignListenerPortIsSkipped(t *testing.T) {
	cfg := testConfig(t, 2)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(cfg.PortMin))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s := startService(t, cfg)
	in, _, err := s.Provision(context.Background(), "skip", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if in.Port != cfg.PortMin+1 {
		t.Fatalf("port %d; want %d, skipping the foreign listener on %d", in.Port, cfg.PortMin+1, cfg.PortMin)
	}
	// With the only other port taken too, there is no capacity.
	if _, _, err := s.Provision(context.Background(), "none-left", Spec{}); !errors.Is(err, ErrCapacity) {
		t.Fatalf("Provision with every port busy = %v, want ErrCapacity", err)
	}
	assertOnly(t, s, "skip")
}

func TestDiskFullGivesClearErrorAndNoHalfState(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.DataDir = testenv.Tmpfs(t, "2m")
	// The disk fills behind the budget's back (it would refuse an
	// instance of this size on 2 MiB at once).
	cfg.DiskBudget = "off"
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "first", Spec{Persistence: "aof"}); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(cfg.DataDir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	f.Close()

	_, _, err = s.Provision(ctx, "second", Spec{Persistence: "aof"})
	if err == nil || blamesCaller(err) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("Provision on a full disk = %v; want a 5xx saying the disk is full", err)
	}
	assertOnly(t, s, "first")
	if st := mustGet(t, s, "first").State; st != "running" {
		t.Fatalf("the existing instance is %s", st)
	}
	os.Remove(filler)
	if _, _, err := s.Provision(ctx, "second", Spec{Persistence: "aof"}); err != nil {
		t.Fatalf("Provision after space was freed: %v", err)
	}
	assertOnly(t, s, "first", "second")
}

func TestReadOnlyDiskGivesClearErrorAndNoHalfState(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.DataDir = testenv.Tmpfs(t, "4m")
	cfg.DiskBudget = "off"
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "first", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	// The instances directory turns read-only; the state file stays
	// writable (its own directory), as when a data volume fails.
	inst := s.layout.DataRoot
	if out, err := exec.Command("mount", "--bind", "-o", "ro", inst, inst).CombinedOutput(); err != nil {
		t.Fatalf("read-only bind mount: %v %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "remount,bind,ro", inst).CombinedOutput(); err != nil {
		exec.Command("umount", inst).Run()
		t.Fatalf("remount read-only: %v %s", err, out)
	}
	_, _, err := s.Provision(ctx, "second", Spec{Persistence: "none"})
	exec.Command("umount", inst).Run()
	if err == nil || blamesCaller(err) || !strings.Contains(err.Error(), "read-only file system") {
		t.Fatalf("Provision on a read-only disk = %v; want a 5xx saying so", err)
	}
	assertOnly(t, s, "first")
	if _, _, err := s.Provision(ctx, "second", Spec{Persistence: "none"}); err != nil {
		t.Fatalf("Provision once writable again: %v", err)
	}
}

// A tenant that blows past its memory (here: output buffers of a pipeline
// of GETs it never reads) is killed by its own cgroup, restarted with
// reason oom, while its neighbour keeps serving with its data.
func TestMemoryContainment(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root (CI runs as root)")
	}
	cfg := testConfig(t, 2)
	s := startService(t, cfg)
	requireCgroups(t, s)
	ctx := context.Background()
	noisy, _, err := s.Provision(ctx, "noisy", Spec{MemoryMB: 8, Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Provision(ctx, "quiet", Spec{MemoryMB: 8, Persistence: "aof-always"}); err != nil {
		t.Fatal(err)
	}
	qc, _, _ := s.Bind(ctx, "quiet", "app", "")
	quiet := client(t, qc.Port, qc.Username, qc.Password)
	if err := quiet.Set(ctx, "keep", "me", 0).Err(); err != nil {
		t.Fatal(err)
	}
	nc, _, _ := s.Bind(ctx, "noisy", "app", "")
	if err := client(t, nc.Port, nc.Username, nc.Password).Set(ctx, "big", strings.Repeat("x", 1<<20), 0).Err(); err != nil {
		t.Fatal(err)
	}
	// 400 GETs of 1 MiB, never read: 400 MiB of output buffer against a
	// cgroup limit of 2*8+64 = 80 MiB.
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(nc.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "AUTH %s %s\r\n", nc.Username, nc.Password)
	for range 400 {
		conn.Write([]byte("GET big\r\n"))
	}
	testenv.Eventually(t, "the noisy instance to be OOM-killed and restarted", 20*time.Second, func() bool {
		in := mustGet(t, s, "noisy")
		return in.PID != noisy.PID && in.State == "running" && in.LastExit != nil
	})
	got := mustGet(t, s, "noisy")
	if got.LastExit.Reason != apitype.ReasonOOM || got.LastExit.Signal != "killed" {
		t.Fatalf("noisy's last exit %+v; want oom, killed", got.LastExit)
	}
	if v, err := quiet.Get(ctx, "keep").Result(); err != nil || v != "me" {
		t.Fatalf("the neighbour lost its data or connection: %q, %v", v, err)
	}
	if q := mustGet(t, s, "quiet"); q.Restarts != 0 {
		t.Fatalf("the neighbour restarted %d times", q.Restarts)
	}
}

// requireCgroups skips the test where s has no cgroups, and fails it in
// CI, where they must be there.
func requireCgroups(t *testing.T, s *Service) {
	t.Helper()
	if !cgroupsOn(s) {
		if os.Getenv("CI") != "" {
			t.Fatal("cgroups unavailable in CI")
		}
		t.Skip("cgroups unavailable on this host")
	}
}
