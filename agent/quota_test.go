package agent

import (
	"context"
	"crypto/rand"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// Where the data file system enforces no project quotas, /readyz's
// details say so (and the log, once), with the alert that watches
// instead.
func TestNoQuotaIsSaid(t *testing.T) {
	s := startService(t, testConfig(t, 1))
	if s.quota != nil {
		t.Skip("this data directory enforces project quotas")
	}
	found := false
	for _, n := range s.ReadyDetails() {
		if strings.Contains(n, "no per-instance disk quotas") && strings.Contains(n, "RedisInstanceDiskOverReservation") {
			found = true
		}
	}
	if !found {
		t.Fatalf("readyz details %q do not say there are no quotas", s.ReadyDetails())
	}
	if _, _, err := s.Provision(context.Background(), "nq", Spec{MemoryMB: 16, Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	if d := mustGet(t, s, "nq").Disk; d.QuotaBytes != 0 {
		t.Fatalf("a quota where there is none: %+v", d)
	}
}

// On a loop-mounted ext4 with project quotas, each instance's directory
// is a project with a hard limit: a tenant over its quota gets MISCONF on
// its writes while its neighbour on the same file system keeps writing;
// once its quota has room again (a resize grows it) its writes resume,
// and every write it had acknowledged is there, after a restart too.
// Skipped where the machine cannot loop-mount one (a kernel without
// CONFIG_QFMT_V2 cannot mount ext4 with the quota feature at all).
func TestProjectQuotaPerInstance(t *testing.T) {
	cfg := testConfig(t, 2)
	cfg.DataDir = testenv.ProjectQuotaFS(t, 512)
	cfg.DiskHeadroomMB = 0
	s := startService(t, cfg)
	if s.quota == nil {
		t.Fatalf("no quotas on ext4 mounted with prjquota: %s", s.quotaNote)
	}
	ctx := context.Background()
	for _, id := range []string{"tenant", "neighbour"} {
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 32, Persistence: "aof"}); err != nil {
			t.Fatal(err)
		}
	}
	rec, _ := s.store.Get("tenant")
	p := project(rec)
	if p == 0 {
		t.Fatal("the tenant has no project (no uid of its own)")
	}
	s.diskRound()
	if d := mustGet(t, s, "tenant").Disk; d.QuotaBytes != s.quotaBytes(32, "aof") {
		t.Fatalf("quota %d, want %d", d.QuotaBytes, s.quotaBytes(32, "aof"))
	}
	// The tenant outgrows a quota made tight for the test: 1 MiB more
	// than it uses now.
	used, _, err := s.quota.Usage(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.quota.SetLimit(p, used+1<<20); err != nil {
		t.Fatal(err)
	}
	bind := func(id string) func(i int) error {
		cr, _, err := s.Bind(ctx, id, "app", "")
		if err != nil {
			t.Fatal(err)
		}
		c := client(t, cr.Port, cr.Username, cr.Password)
		val := make([]byte, 64<<10)
		return func(i int) error {
			rand.Read(val)
			return c.Set(ctx, "k"+strconv.Itoa(i), val, 0).Err()
		}
	}
	tenant, neighbour := bind("tenant"), bind("neighbour")
	acked := 0
	var refused error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if err := tenant(acked); err != nil {
			refused = err
			break
		}
		acked++
		time.Sleep(5 * time.Millisecond) // an event loop turn: the AOF write
	}
	if refused == nil || !strings.Contains(refused.Error(), "MISCONF") {
		t.Fatalf("the tenant wrote %d x 64 KiB past a 1 MiB quota; last error %v, want MISCONF", acked, refused)
	}
	t.Logf("the tenant: %d writes acknowledged, then %v", acked, refused)
	for i := range 64 { // 4 MiB: past the tenant's room, within the neighbour's
		if err := neighbour(i); err != nil {
			t.Fatalf("the neighbour's write %d while the tenant is over its quota: %v", i, err)
		}
	}
	// Room again: the tenant's quota as the agent sets it.
	s.applyQuota(rec)
	testenv.Eventually(t, "the tenant's writes accepted again", 10*time.Second, func() bool { return tenant(acked) == nil })
	acked++
	if err := s.Restart(ctx, "tenant"); err != nil {
		t.Fatal(err)
	}
	cr, _, _ := s.Bind(ctx, "tenant", "app", "")
	c := client(t, cr.Port, cr.Username, cr.Password)
	if n, err := c.DBSize(ctx).Result(); err != nil || n != int64(acked) {
		t.Fatalf("after a restart the tenant has %d keys (%v); it had acknowledged %d", n, err, acked)
	}
}
