package redis

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

func TestRenderPersistence(t *testing.T) {
	base := Conf{Bind: "127.0.0.1", Port: 16000, Dir: "/d/x/data", LogFile: "/l/x.log", ACLFile: "/d/x/users.acl", MemoryMB: 64}
	tests := []struct {
		mode string
		want []string
		not  []string
	}{
		{apitype.PersistenceAOF, []string{"appendonly yes", "appendfsync everysec", `save ""`}, []string{"appendfsync always"}},
		{apitype.PersistenceAOFAlways, []string{"appendonly yes", "appendfsync always"}, []string{"everysec"}},
		{apitype.PersistenceRDB, []string{"appendonly no", "save 3600 1 300 100 60 10000"}, []string{"appendfsync"}},
		{apitype.PersistenceNone, []string{"appendonly no", `save ""`}, []string{"appendfsync"}},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			c := base
			c.Persistence = tt.mode
			out := string(Render(c))
			for _, w := range append(tt.want, "port 16000", "maxmemory 64mb", "protected-mode yes",
				"enable-protected-configs no", "enable-debug-command no", "enable-module-command no",
				`aclfile "/d/x/users.acl"`, "{config-file}") {
				if !strings.Contains(out, w) {
					t.Errorf("config lacks %q:\n%s", w, out)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(out, n) {
					t.Errorf("config has %q:\n%s", n, out)
				}
			}
			if string(Render(c)) != out {
				t.Error("Render is not deterministic")
			}
		})
	}
	for _, m := range []string{"aof", "aof-always", "rdb", "none"} {
		if !ValidPersistence(m) {
			t.Errorf("ValidPersistence(%q) = false", m)
		}
	}
	if ValidPersistence("AOF") || ValidPersistence("") {
		t.Error("ValidPersistence accepts an unknown mode")
	}
}

func TestRenderACL(t *testing.T) {
	out := string(RenderACL([]User{
		{Name: "zed", PasswordHash: HashPassword("p1")},
		{Name: AdminUser, PasswordHash: HashPassword("admin"), Admin: true},
	}))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	want := []string{
		"user default off resetpass resetkeys resetchannels -@all",
		"user agent on #" + HashPassword("admin") + " ~* &* +@all",
		"user zed on #" + HashPassword("p1") + " " + TenantRules,
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("RenderACL =\n%s\nwant\n%s", out, strings.Join(want, "\n"))
	}
	if strings.Contains(out, "p1") && !strings.Contains(HashPassword("p1"), "p1") {
		t.Error("plaintext password in ACL file")
	}
	if p := NewPassword(); len(p) < 32 || p == NewPassword() {
		t.Errorf("NewPassword = %q: want >= 32 random characters", p)
	}
}

// startRedis runs redis-server with a rendered config and users.
func startRedis(t *testing.T, users []User) (port int) {
	t.Helper()
	testenv.RedisServer(t) // skip or fail before writing anything
	dir := t.TempDir()
	port = testenv.FreePort(t)
	c := Conf{Bind: "127.0.0.1", Port: port, Dir: dir, LogFile: filepath.Join(dir, "log"), ACLFile: filepath.Join(dir, "users.acl"), MemoryMB: 16, Persistence: apitype.PersistenceNone}
	if err := os.WriteFile(c.ACLFile, RenderACL(users), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(conf, Render(c), 0o600); err != nil {
		t.Fatal(err)
	}
	runRedis(t, conf)
	return port
}

func TestAdminAgainstRedis(t *testing.T) {
	adminPass := NewPassword()
	port := startRedis(t, []User{{Name: AdminUser, PasswordHash: HashPassword(adminPass), Admin: true}})
	a := NewAdmin("127.0.0.1", port, adminPass)
	defer a.Close()
	ctx := context.Background()
	waitUp(t, a)
	if err := NewAdmin("127.0.0.1", port, "wrong").Ping(ctx); err == nil {
		t.Fatal("Ping with a wrong password succeeded")
	}
	anon := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port), DisableIdentity: true, MaxRetries: -1})
	defer anon.Close()
	if err := anon.Ping(ctx).Err(); err == nil {
		t.Fatal("the default user can run PING")
	}

	tenant := func(name, pass string) *goredis.Client {
		c := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port), Username: name, Password: pass, DisableIdentity: true, MaxRetries: -1, PoolSize: 1})
		t.Cleanup(func() { c.Close() })
		return c
	}
	if err := a.SyncUsers(ctx, []User{{Name: "t1", PasswordHash: HashPassword("pw1")}, {Name: "t2", PasswordHash: HashPassword("pw2")}}); err != nil {
		t.Fatal(err)
	}
	t1 := tenant("t1", "pw1")
	if err := t1.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("tenant SET: %v", err)
	}
	for _, cmd := range [][]any{{"CONFIG", "SET", "maxmemory", "0"}, {"ACL", "LIST"}, {"SHUTDOWN"}, {"MIGRATE", "127.0.0.1", "1", "k", "0", "1"}} {
		if err := t1.Do(ctx, cmd...).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Errorf("tenant %v = %v, want NOPERM", cmd, err)
		}
	}
	// Removing t2 keeps t1's connection; t2 can no longer log in.
	if err := a.SyncUsers(ctx, []User{{Name: "t1", PasswordHash: HashPassword("pw1")}}); err != nil {
		t.Fatal(err)
	}
	if err := t1.Ping(ctx).Err(); err != nil {
		t.Fatalf("t1's connection broke on a sync that kept t1: %v", err)
	}
	if err := tenant("t2", "pw2").Ping(ctx).Err(); err == nil {
		t.Fatal("t2 can log in after it was removed")
	}
	if err := a.Shutdown(ctx, true); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := a.Ping(ctx); err == nil {
		t.Fatal("server still answers after SHUTDOWN")
	}
}

func TestProbeLoading(t *testing.T) {
	// A fake server that answers like Redis loading its data set.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			buf := make([]byte, 512)
			c.Read(buf)
			// AUTH and CLIENT NO-EVICT are answered while loading.
			c.Write([]byte("+OK\r\n+OK\r\n-LOADING Redis is loading the dataset in memory\r\n"))
			c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	err = NewAdmin("127.0.0.1", port, "x").Ping(context.Background())
	if !errors.Is(err, ErrLoading) {
		t.Fatalf("Ping = %v, want ErrLoading", err)
	}
	var lo interface{ Loading() bool }
	if !errors.As(err, &lo) || !lo.Loading() {
		t.Fatal("the loading error has no Loading() method")
	}
}

func BenchmarkRender(b *testing.B) {
	c := Conf{Bind: "127.0.0.1", Port: 16000, Dir: "/var/lib/redis-agent/instances/x/data", LogFile: "/l", ACLFile: "/a", MemoryMB: 64, Persistence: apitype.PersistenceAOF}
	for b.Loop() {
		Render(c)
	}
}

// plainRedis writes a minimal config (plus extra lines) with an admin user
// whose password is "pw", and returns the config's path and the port.
func plainRedis(t *testing.T, extra string) (conf string, port int) {
	t.Helper()
	dir := t.TempDir()
	port = testenv.FreePort(t)
	conf = filepath.Join(dir, "redis.conf")
	acl := filepath.Join(dir, "users.acl")
	os.WriteFile(acl, RenderACL([]User{{Name: AdminUser, PasswordHash: HashPassword("pw"), Admin: true}}), 0o600)
	os.WriteFile(conf, []byte(fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\naclfile %s\nsave \"\"\n%s", port, dir, acl, extra)), 0o600)
	return conf, port
}

// runRedis starts redis-server on conf, killed at the test's end.
func runRedis(t *testing.T, conf string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(testenv.RedisServer(t), conf)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// waitUp waits until a answers PING on fresh connections.
func waitUp(t *testing.T, a *Admin) {
	t.Helper()
	testenv.Eventually(t, "redis to answer PING", 5*time.Second, func() bool { return a.Ping(context.Background()) == nil })
}

// A script running past busy-reply-threshold makes PING answer BUSY, which
// Ping reports as an error with Busy() true: alive, not hung.
func TestPingDuringLongScriptIsBusy(t *testing.T) {
	conf, port := plainRedis(t, "busy-reply-threshold 50\n")
	runRedis(t, conf)
	a := NewAdmin("127.0.0.1", port, "pw")
	defer a.Close()
	ctx := context.Background()
	waitUp(t, a)
	c := a.client()
	defer c.Close()
	go c.Eval(ctx, "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); if (n[1]-t[1])*1000000 + (n[2]-t[2]) > 500000 then break end end return 1", nil)
	time.Sleep(150 * time.Millisecond)
	err := a.Ping(ctx)
	var b interface{ Busy() bool }
	if !errors.As(err, &b) || !b.Busy() {
		t.Fatalf("Ping during a long script = %v; want a Busy() error", err)
	}
}

func TestParseInfo(t *testing.T) {
	text := "# Server\r\nredis_version:7.0.15\r\nuptime_in_seconds:42\r\n# Clients\r\nconnected_clients:3\r\nblocked_clients:1\r\n" +
		"# Memory\r\nused_memory:1048576\r\nmaxmemory:67108864\r\n# Persistence\r\nloading:0\r\nrdb_last_bgsave_status:ok\r\naof_last_write_status:err\r\n" +
		"# Stats\r\ntotal_commands_processed:100\r\nkeyspace_hits:7\r\nkeyspace_misses:2\r\nevicted_keys:5\r\nexpired_keys:6\r\n" +
		"# Keyspace\r\ndb0:keys=10,expires=1,avg_ttl=0\r\ndb3:keys=4,expires=0,avg_ttl=0\r\n"
	in, err := ParseInfo(text)
	if err != nil {
		t.Fatal(err)
	}
	want := Info{UptimeSeconds: 42, UsedMemory: 1 << 20, MaxMemory: 64 << 20, ConnectedClients: 3, BlockedClients: 1,
		CommandsProcessed: 100, KeyspaceHits: 7, KeyspaceMisses: 2, EvictedKeys: 5, ExpiredKeys: 6,
		DBKeys: map[string]float64{"db0": 10, "db3": 4}, RDBLastBgsaveOK: true, AOFLastWriteOK: false}
	if fmt.Sprint(in) != fmt.Sprint(want) {
		t.Fatalf("ParseInfo =\n%+v\nwant\n%+v", in, want)
	}
	if _, err := ParseInfo("garbage"); err == nil {
		t.Fatal("ParseInfo accepted text without fields")
	}
}

func FuzzParseInfo(f *testing.F) {
	f.Add("db0:keys=1,expires=0\r\nused_memory:12\r\n")
	f.Add("# x\r\n:\r\ndb:keys=\r\n")
	f.Fuzz(func(t *testing.T, s string) { ParseInfo(s) })
}

func TestInfoAgainstRedis(t *testing.T) {
	adminPass := NewPassword()
	port := startRedis(t, []User{{Name: AdminUser, PasswordHash: HashPassword(adminPass), Admin: true}})
	a := NewAdmin("127.0.0.1", port, adminPass)
	defer a.Close()
	ctx := context.Background()
	waitUp(t, a)
	c := a.client()
	defer c.Close()
	c.Set(ctx, "k1", "v", 0)
	c.Set(ctx, "k2", "v", 0)
	in, err := a.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if in.DBKeys["db0"] != 2 || in.MaxMemory != 16<<20 || in.UsedMemory <= 0 || in.CommandsProcessed < 2 || !in.RDBLastBgsaveOK {
		t.Fatalf("Info = %+v", in)
	}
}

// Info keeps its connection between calls and survives a restart of the
// server without reporting a failure for the dead connection.
func TestInfoReusesConnectionAcrossRestart(t *testing.T) {
	conf, port := plainRedis(t, "")
	start := func() *exec.Cmd { return runRedis(t, conf) }
	a := NewAdmin("127.0.0.1", port, "pw")
	defer a.Close()
	ctx := context.Background()
	waitInfo := func() {
		testenv.Eventually(t, "INFO", 5*time.Second, func() bool { _, err := a.Info(ctx); return err == nil })
	}
	first := start()
	waitInfo()
	c1 := a.ctrl.c
	if _, err := a.Info(ctx); err != nil || a.ctrl.c != c1 {
		t.Fatalf("second Info: %v, reused %v", err, a.ctrl.c == c1)
	}
	first.Process.Kill()
	first.Wait()
	start()
	fresh := NewAdmin("127.0.0.1", port, "pw")
	defer fresh.Close()
	waitUp(t, fresh) // another connection: the new server is up
	// The kept connection is dead; the first Info must still succeed.
	if _, err := a.Info(ctx); err != nil {
		t.Fatalf("first Info after the restart failed: %v", err)
	}
	if a.ctrl == nil || a.ctrl.c == c1 {
		t.Fatal("Info did not replace the dead connection")
	}
}
