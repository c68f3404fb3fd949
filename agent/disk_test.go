package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/redis-agent/redis-agent/limits"
	"golang.org/x/sys/unix"
)

// An instance's reservation: its files' worst case for its maxmemory and
// persistence, its directory, its logs' bound.
func TestReservation(t *testing.T) {
	s := &Service{cfg: Config{LogMaxBytes: 2 << 20, LogKeep: 3}, logOnDataFS: true}
	for _, c := range []struct {
		mb          int
		persistence string
		want        int64
	}{
		{64, "aof", 3*64<<20 + 64<<20 + 1<<20 + 8<<20},
		{64, "aof-always", 3*64<<20 + 64<<20 + 1<<20 + 8<<20},
		{64, "rdb", 2*64<<20 + 1<<20 + 8<<20},
		{64, "none", 1<<20 + 8<<20},
	} {
		if got := s.reservation(c.mb, c.persistence); got != c.want {
			t.Errorf("reservation(%d, %s) = %d, want %d", c.mb, c.persistence, got, c.want)
		}
	}
	s.logOnDataFS = false // the logs are on another file system
	if got := s.reservation(64, "none"); got != 1<<20 {
		t.Errorf("reservation without the logs = %d", got)
	}
}

// duBytes is what du(1) says path takes.
func duBytes(t *testing.T, path string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-s", "-B1", path).Output()
	if err != nil {
		t.Fatalf("du %s: %v", path, err)
	}
	n, err := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// What an instance's files take, in its view and its metrics, is what du
// says, within the reservation's rounding (its directory's megabyte).
func TestDiskUsageMatchesDu(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "du1", Spec{MemoryMB: 32, Persistence: "aof"}); err != nil {
		t.Fatal(err)
	}
	cr, _, err := s.Bind(ctx, "du1", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, cr.Port, cr.Username, cr.Password)
	val := make([]byte, 32<<10)
	for i := range 96 { // 3 MiB
		rand.Read(val)
		if err := c.Set(ctx, "k"+strconv.Itoa(i), val, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	s.diskRound()
	inst := mustGet(t, s, "du1")
	d := inst.Disk
	if d == nil || d.MeasuredAt.IsZero() {
		t.Fatalf("no disk figures in the view: %+v", d)
	}
	wantData, wantLog := duBytes(t, s.layout.Dir("du1")), duBytes(t, s.layout.LogPath("du1"))
	t.Logf("data %d (du %d), log %d (du %d), reserved %d", d.DataBytes, wantData, d.LogBytes, wantLog, d.ReservedBytes)
	if d.DataBytes < 3<<20 {
		t.Errorf("data %d bytes: the 3 MiB written are not counted", d.DataBytes)
	}
	if diff := d.DataBytes - wantData; diff > dirOverhead || -diff > dirOverhead {
		t.Errorf("data %d bytes, du says %d", d.DataBytes, wantData)
	}
	if d.LogBytes != wantLog {
		t.Errorf("log %d bytes, du says %d", d.LogBytes, wantLog)
	}
	if d.ReservedBytes != s.reservation(32, "aof") {
		t.Errorf("reserved %d", d.ReservedBytes)
	}
	// The metrics say the same, from the same measure.
	u, _ := s.disk.get("du1")
	if u.data != d.DataBytes || u.log != d.LogBytes || u.reserved != d.ReservedBytes {
		t.Errorf("cached measure %+v, view %+v", u, d)
	}
	// A deleted instance's measure goes with it.
	if err := s.Deprovision(ctx, "du1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.disk.get("du1"); ok {
		t.Error("the measure of a deleted instance is kept")
	}
}

// fakeFS makes s see a data file system of total bytes with free of them
// free.
func fakeFS(s *Service, total, free *int64) {
	s.statfs = func(path string, st *unix.Statfs_t) error {
		*st = unix.Statfs_t{Bsize: 4096, Blocks: uint64(*total / 4096), Bavail: uint64(*free / 4096), Bfree: uint64(*free / 4096)}
		return nil
	}
}

// A provision or a resize that its reservation does not fit in the disk
// budget is refused (ErrCapacity: 507) and changes nothing; an identical
// provision of an existing instance is not; a delete frees its
// reservation.
func TestDiskBudget(t *testing.T) {
	cfg := testConfig(t, 4)
	cfg.DiskHeadroomMB = 100
	cfg.LogMaxBytes, cfg.LogKeep = 1<<20, 1
	s := startService(t, cfg)
	total, free := int64(10<<30), int64(1000<<20)
	fakeFS(s, &total, &free)
	ctx := context.Background()
	aof64 := s.reservation(64, "aof") // 3*64+64+1+2 = 259 MiB
	if aof64 != 259<<20 {
		t.Fatalf("reservation of a 64 MiB aof instance = %d", aof64)
	}
	// 1000 MiB free, 100 of headroom: room for three such instances.
	for i := range 3 {
		if _, _, err := s.Provision(ctx, "b"+strconv.Itoa(i), Spec{MemoryMB: 64, Persistence: "aof"}); err != nil {
			t.Fatalf("provision %d: %v", i, err)
		}
	}
	c, err := s.Capacity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c.DiskTotalBytes != total || c.DiskFreeBytes != free || c.DiskReservedBytes != 3*aof64 || c.DiskUsedBytes <= 0 {
		t.Fatalf("capacity %+v", c)
	}
	// A broker computes a provision's reservation from the capacity alone.
	if n := c.DiskNeed(64, "aof"); n != aof64 || c.DiskBudgetOff {
		t.Fatalf("capacity's need of a 64 MiB aof instance %d (budget off %v), want the reservation %d", n, c.DiskBudgetOff, aof64)
	}
	// What the three may still grow into is theirs, not a new instance's.
	if want := free - (3*aof64 - c.DiskUsedBytes) - 100<<20; c.DiskAvailableBytes != want {
		t.Fatalf("available %d, want %d", c.DiskAvailableBytes, want)
	}
	_, _, err = s.Provision(ctx, "b3", Spec{MemoryMB: 64, Persistence: "aof"})
	if !errors.Is(err, ErrCapacity) || !strings.Contains(err.Error(), "of disk") {
		t.Fatalf("a fourth 64 MiB aof instance: %v, want ErrCapacity for the disk", err)
	}
	if _, err := s.store.Get("b3"); err == nil {
		t.Fatal("the refused provision left a record")
	}
	// The capacity tells a broker so before it asks, and that one
	// without persistence fits.
	if c.DiskFits(c.DiskNeed(64, "aof")) || !c.DiskFits(c.DiskNeed(64, "none")) {
		t.Fatalf("capacity fits aof %v, none %v; want false, true (%d available)", c.DiskFits(c.DiskNeed(64, "aof")), c.DiskFits(c.DiskNeed(64, "none")), c.DiskAvailableBytes)
	}
	// One without persistence needs only its directory and logs.
	if _, _, err := s.Provision(ctx, "small", Spec{MemoryMB: 64, Persistence: "none"}); err != nil {
		t.Fatalf("an instance without persistence: %v", err)
	}
	// The same provision again is a 200, however full the disk.
	free = 0
	if _, created, err := s.Provision(ctx, "b0", Spec{MemoryMB: 64, Persistence: "aof"}); err != nil || created {
		t.Fatalf("identical provision on a full disk = %v, %v", created, err)
	}
	c, _ = s.Capacity(ctx)
	if c.DiskAvailableBytes != 0 {
		t.Fatalf("available on a full disk = %d", c.DiskAvailableBytes)
	}
	// A resize that grows the reservation must fit too.
	if _, err := s.Resize(ctx, "b0", 128); !errors.Is(err, ErrCapacity) {
		t.Fatalf("growing on a full disk: %v, want ErrCapacity", err)
	}
	if rec, _ := s.store.Get("b0"); rec.MemoryMB != 64 {
		t.Fatalf("the refused resize changed the record: %d MiB", rec.MemoryMB)
	}
	if _, err := s.Resize(ctx, "b0", 32); err != nil {
		t.Fatalf("shrinking on a full disk: %v", err)
	}
	// A restore's staged copy must fit beside the data: by its declared
	// size, else by the most an upload may be. Refused, it changes nothing.
	snap := snapshotBytes(t, s, "small")
	if _, err := s.Restore(ctx, "small", bytes.NewReader(snap), int64(len(snap)), ""); !errors.Is(err, ErrCapacity) || !strings.Contains(err.Error(), "of disk") {
		t.Fatalf("a restore on a full disk: %v, want ErrCapacity for the disk", err)
	}
	if s.layout.Staging("small") || s.transientMB.Load() != 0 {
		t.Fatal("the refused restore left a staging directory or held memory")
	}
	// Room for the snapshot and a little: the headroom and what the
	// instances may grow into (free less available) on top.
	free = 1000 << 20
	c, _ = s.Capacity(ctx)
	free = free - c.DiskAvailableBytes + int64(len(snap)) + 1<<20
	if _, err := s.Restore(ctx, "small", bytes.NewReader(snap), -1, ""); !errors.Is(err, ErrCapacity) {
		t.Fatalf("a restore of unknown size with room for its size only: %v, want ErrCapacity (it may be up to %d MiB)", err, limits.MemoryFor(64)>>20)
	}
	if _, err := s.Restore(ctx, "small", bytes.NewReader(snap), int64(len(snap)), ""); err != nil {
		t.Fatalf("a restore of declared size with room for it: %v", err)
	}
	// A delete gives its reservation back.
	free = 1000 << 20
	if err := s.Deprovision(ctx, "b1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Provision(ctx, "b3", Spec{MemoryMB: 64, Persistence: "aof"}); err != nil {
		t.Fatalf("after a delete: %v", err)
	}
}

// An instance's log past --log-max-size is rotated by the disk round, and
// the confined redis-server keeps logging to it afterwards: the log is
// truncated in place, not renamed away from the one file Landlock lets
// it write.
func TestLogRotation(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.LogMaxBytes, cfg.LogKeep = 4096, 2
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "lg", Spec{MemoryMB: 16, Persistence: "rdb"}); err != nil {
		t.Fatal(err)
	}
	// Each BGSAVE logs a few lines, all before it is complete (a snapshot
	// out, sent as to a replica, logs some after it returns).
	grow := func(past int64) {
		t.Helper()
		for s.statLogSize("lg") <= past {
			if err := s.runtime("lg").admin.Save(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	for round := 1; round <= 3; round++ {
		grow(cfg.LogMaxBytes)
		s.diskRound()
		if n := s.statLogSize("lg"); n != 0 {
			t.Fatalf("round %d: the log has %d bytes after its rotation", round, n)
		}
	}
	files := s.layout.LogFiles("lg")
	if len(files) != 3 {
		t.Fatalf("log files %q, want the log and 2 rotated", files)
	}
	old, _ := s.Log(ctx, "lg", 1)
	if len(old) != 0 {
		t.Fatalf("the live log after rotation holds %q", old)
	}
	// Redis writes to the same file after it.
	grow(0)
	lines, err := s.Log(ctx, "lg", 20)
	if err != nil || !strings.Contains(strings.Join(lines, "\n"), "Background saving") {
		t.Fatalf("the log after rotation: %q, %v", lines, err)
	}
	s.diskRound()
	if inst := mustGet(t, s, "lg"); inst.Disk.LogBytes < 8192 {
		t.Fatalf("log bytes %d: the rotated logs are not counted", inst.Disk.LogBytes)
	}
	if err := s.Deprovision(ctx, "lg"); err != nil {
		t.Fatal(err)
	}
	if files := s.layout.LogFiles("lg"); len(files) != 0 {
		t.Fatalf("log files left after the delete: %q", files)
	}
}

func (s *Service) statLogSize(id string) int64 {
	st, err := os.Stat(s.layout.LogPath(id))
	if err != nil {
		return -1
	}
	return st.Size()
}
