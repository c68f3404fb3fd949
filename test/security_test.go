package test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// TestTenantCannotEscape logs in as a tenant and tries what a hostile
// tenant would: every administrative command that reaches beyond its own
// server is refused, every data command and what a managed Redis allows
// (CLIENT, SLOWLOG, LATENCY, MONITOR, ROLE, ...) works, another tenant's
// instance is out of reach, and nothing secret shows in the agent's log.
// TestTenantCannotBreakTheAgent (tenant_test.go) aims those it may run at
// the agent.
func TestTenantCannotEscape(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir})
	mustProvision(t, a, "tenant-a")
	mustProvision(t, a, "tenant-b")
	ca := mustBind(t, a, "tenant-a", "app-a")
	cb := mustBind(t, a, "tenant-b", "app-b")
	ctx := context.Background()
	c := redisClient(t, ca)

	// Each is refused by the tenant's ACL (NOPERM), or earlier by the
	// hardened config (MODULE, DEBUG) or the script sandbox.
	refused := []struct {
		cmd []any
		why string
	}{
		{[]any{"CONFIG", "SET", "dir", "/tmp"}, "NOPERM"},
		{[]any{"CONFIG", "GET", "*"}, "NOPERM"},
		{[]any{"CONFIG", "SET", "maxmemory", "0"}, "NOPERM"},
		{[]any{"CONFIG", "SET", "requirepass", "x"}, "NOPERM"},
		{[]any{"MODULE", "LOAD", "/tmp/evil.so"}, "MODULE command not allowed"},
		{[]any{"DEBUG", "SLEEP", "0"}, "DEBUG command not allowed"},
		{[]any{"SHUTDOWN"}, "NOPERM"},
		{[]any{"SHUTDOWN", "NOSAVE"}, "NOPERM"},
		{[]any{"REPLICAOF", "127.0.0.1", "1"}, "NOPERM"},
		{[]any{"SLAVEOF", "127.0.0.1", "1"}, "NOPERM"},
		{[]any{"MIGRATE", "127.0.0.1", "1", "k", "0", "1000"}, "NOPERM"},
		{[]any{"ACL", "SETUSER", "evil", "on", ">x", "+@all"}, "NOPERM"},
		{[]any{"ACL", "LIST"}, "NOPERM"},
		{[]any{"ACL", "USERS"}, "NOPERM"},
		{[]any{"ACL", "LOAD"}, "NOPERM"},
		{[]any{"ACL", "SAVE"}, "NOPERM"},
		{[]any{"ACL", "LOG"}, "NOPERM"},
		{[]any{"ACL", "GETUSER", "agent"}, "NOPERM"},
		{[]any{"ACL", "DELUSER", "agent"}, "NOPERM"},
		{[]any{"ACL", "CAT"}, "NOPERM"},
		{[]any{"ACL", "GENPASS"}, "NOPERM"},
		{[]any{"ACL", "DRYRUN", "agent", "PING"}, "NOPERM"},
		{[]any{"CONFIG", "REWRITE"}, "NOPERM"},
		{[]any{"CONFIG", "RESETSTAT"}, "NOPERM"},
		{[]any{"SAVE"}, "NOPERM"},
		{[]any{"BGSAVE"}, "NOPERM"},
		{[]any{"BGREWRITEAOF"}, "NOPERM"},
		{[]any{"FAILOVER"}, "NOPERM"},
		{[]any{"SYNC"}, "NOPERM"},
		{[]any{"PSYNC", "?", "-1"}, "NOPERM"},
		{[]any{"REPLCONF", "listening-port", "1"}, "NOPERM"},
		{[]any{"PFDEBUG", "GETREG", "k"}, "NOPERM"},
		{[]any{"EVAL", "return redis.call('CLIENT','KILL','USER','agent')", 0}, "not allowed from script"},
		{[]any{"EVAL", "return redis.call('CONFIG','GET','dir')", 0}, "not allowed from script"},
		{[]any{"EVAL", "return redis.call('ACL','LIST')", 0}, "not allowed from script"},
	}
	for _, r := range refused {
		err := c.Do(ctx, r.cmd...).Err()
		if err == nil || !strings.Contains(err.Error(), r.why) {
			t.Errorf("tenant ran %v: %v; want refused with %q", r.cmd, err, r.why)
		}
	}
	allowed := [][]any{
		{"SET", "k", "v"},
		{"GET", "k"},
		{"KEYS", "*"},
		{"EVAL", "return redis.call('GET', KEYS[1])", 1, "k"},
		{"FLUSHALL"},
		{"FLUSHDB"},
		{"PUBLISH", "ch", "hello"},
		{"SELECT", "1"},
		{"INFO", "keyspace"},
		{"CLIENT", "SETNAME", "mine"},
		{"DBSIZE"},
		// What a managed Redis gives its tenants besides data commands
		// (redis.TenantRules; README, "What a tenant may run").
		{"INFO"}, {"INFO", "everything"}, {"INFO", "commandstats"},
		{"CLIENT", "LIST"}, {"CLIENT", "INFO"}, {"CLIENT", "ID"}, {"CLIENT", "GETNAME"},
		{"CLIENT", "NO-EVICT", "on"}, {"CLIENT", "NO-EVICT", "off"},
		{"CLIENT", "PAUSE", "1", "WRITE"}, {"CLIENT", "UNPAUSE"},
		{"CLIENT", "KILL", "TYPE", "pubsub"},
		{"CLIENT", "TRACKINGINFO"},
		{"SLOWLOG", "GET"}, {"SLOWLOG", "LEN"}, {"SLOWLOG", "RESET"},
		{"LATENCY", "LATEST"}, {"LATENCY", "DOCTOR"}, {"LATENCY", "HISTORY", "command"}, {"LATENCY", "RESET"},
		{"ROLE"}, {"LASTSAVE"},
		{"MEMORY", "USAGE", "k"}, {"MEMORY", "STATS"}, {"MEMORY", "DOCTOR"}, {"MEMORY", "MALLOC-STATS"}, {"MEMORY", "PURGE"},
		{"ACL", "WHOAMI"},
		{"COMMAND", "COUNT"}, {"OBJECT", "ENCODING", "k"}, {"TIME"}, {"ECHO", "x"},
	}
	for _, cmd := range allowed {
		if err := c.Do(ctx, cmd...).Err(); err != nil && err.Error() != "redis: nil" {
			t.Errorf("tenant could not run %v: %v", cmd, err)
		}
	}
	// MULTI/EXEC and pub/sub.
	pipe := c.TxPipeline()
	pipe.Set(ctx, "t1", "1", 0)
	pipe.Incr(ctx, "t1")
	if _, err := pipe.Exec(ctx); err != nil {
		t.Errorf("MULTI/EXEC: %v", err)
	}
	sub := c.Subscribe(ctx, "news")
	if _, err := sub.Receive(ctx); err != nil {
		t.Errorf("SUBSCRIBE: %v", err)
	}
	sub.Close()
	// MONITOR is allowed (the battery in tenant_test.go reads it).
	mon := redisClient(t, ca)
	if err := mon.Do(ctx, "MONITOR").Err(); err != nil {
		t.Errorf("MONITOR: %v", err)
	}
	mon.Close()

	// Tenant A's credentials do not open tenant B's instance.
	cross := ca
	cross.Port = cb.Port
	if !authPing(ca) || authPing(cross) {
		t.Error("tenant A's credentials work on tenant B's port")
	}
	// Nobody gets in without credentials, or as default.
	anon := cb
	anon.Username, anon.Password = "default", ""
	if authPing(anon) {
		t.Error("the default user can log in")
	}

	// Secrets are not in the agent's log nor in any process's arguments.
	for _, secret := range []string{ca.Password, cb.Password} {
		if strings.Contains(a.log.String(), secret) {
			t.Error("a binding password is in the agent's log")
		}
	}
	for pid := range redisProcs(filepath.Join(dataDir, "instances") + "/") {
		args, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		env, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "environ"))
		for _, secret := range []string{ca.Password, cb.Password} {
			if strings.Contains(string(args), secret) || strings.Contains(string(env), secret) {
				t.Errorf("pid %d carries a password in its arguments or environment", pid)
			}
		}
		if strings.Contains(string(env), "REDIS_AGENT") {
			t.Errorf("pid %d inherited the agent's environment: %q", pid, env)
		}
	}

	// Files: as root, redis-server runs as the redis user, which can read
	// but not write its config and ACL file, and owns its 0700 data dir.
	if os.Geteuid() == 0 {
		for pid := range redisProcs(filepath.Join(dataDir, "instances") + "/") {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join("/proc", strconv.Itoa(pid)), &st); err != nil {
				t.Fatal(err)
			}
			if st.Uid == 0 {
				t.Errorf("redis-server pid %d runs as root", pid)
			}
		}
		for _, f := range []string{"redis.conf", "users.acl"} {
			var st syscall.Stat_t
			syscall.Stat(filepath.Join(dataDir, "instances", "tenant-a", f), &st)
			if st.Uid != 0 || st.Mode&0o777 != 0o640 {
				t.Errorf("%s: owner %d mode %o; want root-owned 0640 (the redis user cannot write it)", f, st.Uid, st.Mode&0o777)
			}
		}
		var st syscall.Stat_t
		syscall.Stat(filepath.Join(dataDir, "instances", "tenant-a", "data"), &st)
		if st.Uid == 0 || st.Mode&0o777 != 0o700 {
			t.Errorf("data dir: owner %d mode %o; want the redis user, 0700", st.Uid, st.Mode&0o777)
		}
	}
}
