package redis

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// startConf runs redis-server on a rendered c (Port, Dir and files are
// filled in) with users.
func startConf(t *testing.T, c Conf, users []User) int {
	t.Helper()
	port, _ := startConfDir(t, c, users)
	return port
}

// startConfDir is startConf, and says the server's data directory.
func startConfDir(t *testing.T, c Conf, users []User) (int, string) {
	t.Helper()
	testenv.RedisServer(t)
	dir := t.TempDir()
	c.Bind, c.Port, c.Dir = "127.0.0.1", testenv.FreePort(t), dir
	c.LogFile, c.ACLFile = filepath.Join(dir, "log"), filepath.Join(dir, "users.acl")
	if c.MemoryMB == 0 {
		c.MemoryMB = 16
	}
	if err := os.WriteFile(c.ACLFile, RenderACL(users), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(conf, Render(c), 0o600); err != nil {
		t.Fatal(err)
	}
	runRedis(t, conf)
	return c.Port, dir
}

// A replica logs in to its primary as a replication user that may run
// nothing but the replication commands, catches up, and once the primary
// pauses writes reaches its final offset; promoted, it takes writes with
// every one the primary acknowledged.
func TestReplicationMovePrimitives(t *testing.T) {
	ctx := context.Background()
	admin, repl, tenant := NewPassword(), NewPassword(), NewPassword()
	users := []User{
		{Name: AdminUser, PasswordHash: HashPassword(admin), Admin: true},
		{Name: "_move", PasswordHash: HashPassword(repl), Rules: ReplicationRules},
		{Name: "app", PasswordHash: HashPassword(tenant)},
	}
	srcPort := startConf(t, Conf{Persistence: apitype.PersistenceNone}, users)
	src := NewAdmin("127.0.0.1", srcPort, admin)
	defer src.Close()
	waitUp(t, src)
	// The replication user can do nothing else.
	if _, err := (&Admin{addr: src.addr, user: "_move", secret: repl, sem: make(chan struct{}, 1)}).Do(ctx, "GET", "k"); err == nil {
		t.Fatal("the replication user may run GET")
	}
	app := (&Admin{addr: src.addr, user: "app", secret: tenant, sem: make(chan struct{}, 1)})
	for i := range 1000 {
		if _, err := app.Do(ctx, "INCR", "c"+strconv.Itoa(i%10)); err != nil {
			t.Fatal(err)
		}
	}
	dstPort := startConf(t, Conf{Persistence: apitype.PersistenceNone,
		ReplicaOf: &Primary{Host: "127.0.0.1", Port: srcPort, User: "_move", Password: repl}}, users)
	dst := NewAdmin("127.0.0.1", dstPort, admin)
	defer dst.Close()
	waitUp(t, dst)
	testenv.Eventually(t, "the replica's initial sync", 10*time.Second, func() bool {
		r, err := dst.Replication(ctx)
		return err == nil && r.Role == "slave" && r.MasterLinkUp && !r.SyncInProgress
	})
	for i := range 500 {
		app.Do(ctx, "INCR", "c"+strconv.Itoa(i%10))
	}
	off, err := src.PauseWrites(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// A write during the pause blocks (its answer waits for the end).
	blocked := make(chan error, 1)
	go func() { _, err := app.Do(context.Background(), "INCR", "late"); blocked <- err }()
	select {
	case err := <-blocked:
		t.Fatalf("a write was answered during the pause: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	testenv.Eventually(t, "the replica at the paused offset", 5*time.Second, func() bool {
		r, err := dst.Replication(ctx)
		return err == nil && r.SlaveReplOffset >= off
	})
	if err := dst.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	moved := &Admin{addr: dst.addr, user: "app", secret: tenant, sem: make(chan struct{}, 1)}
	var sum int64
	for i := range 10 {
		r, err := moved.Do(ctx, "GET", "c"+strconv.Itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.ParseInt(r.Str, 10, 64)
		sum += n
	}
	if sum != 1500 {
		t.Fatalf("the promoted replica has %d increments; want all 1500 the primary acknowledged", sum)
	}
	if _, err := moved.Do(ctx, "SET", "after", "1"); err != nil {
		t.Fatalf("the promoted replica refuses writes: %v", err)
	}
	if r, _ := dst.Replication(ctx); r.Role != "master" {
		t.Fatalf("role after Promote = %s", r.Role)
	}
	if err := src.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	<-blocked
	if err := src.KillUser(ctx, "app"); err != nil {
		t.Fatal(err)
	}
}
