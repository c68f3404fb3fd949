package redis

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// runPlain starts redis-server on a plainRedis config with extra lines and
// returns the config's path, the data directory, the process and an admin.
func runPlain(t *testing.T, extra string) (conf, dir string, cmd *exec.Cmd, a *Admin) {
	t.Helper()
	conf, port := plainRedis(t, extra)
	cmd = runRedis(t, conf)
	a = NewAdmin("127.0.0.1", port, "pw")
	t.Cleanup(func() { a.Close() })
	waitUp(t, a)
	return conf, filepath.Dir(conf), cmd, a
}

// restart kills the server with SIGKILL (nothing is saved on the way out)
// and starts it again on the same config.
func restart(t *testing.T, cmd *exec.Cmd, conf string, a *Admin) *exec.Cmd {
	t.Helper()
	cmd.Process.Kill()
	cmd.Wait()
	cmd = runRedis(t, conf)
	waitUp(t, a)
	return cmd
}

// fill writes n keys "k0".."k<n-1>".
func fill(t *testing.T, a *Admin, n int) {
	t.Helper()
	c := a.client()
	defer c.Close()
	ctx := context.Background()
	p := c.Pipeline()
	for i := range n {
		p.Set(ctx, "k"+strconv.Itoa(i), "v"+strconv.Itoa(i), 0)
	}
	if _, err := p.Exec(ctx); err != nil {
		t.Fatal(err)
	}
}

func do(t *testing.T, a *Admin, args ...any) any {
	t.Helper()
	c := a.client()
	defer c.Close()
	v, err := c.Do(context.Background(), args...).Result()
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return v
}

func configGet(t *testing.T, a *Admin, name string) string {
	t.Helper()
	c := a.client()
	defer c.Close()
	m, err := c.ConfigGet(context.Background(), name).Result()
	if err != nil {
		t.Fatalf("CONFIG GET %s: %v", name, err)
	}
	return m[name]
}

func field(t *testing.T, a *Admin, section, name string) string {
	t.Helper()
	f, err := a.Fields(context.Background(), section)
	if err != nil {
		t.Fatal(err)
	}
	v, ok := f[name]
	if !ok {
		t.Fatalf("INFO %s has no %s", section, name)
	}
	return v
}

var keysRead = regexp.MustCompile(`\[info\] (\d+) keys read`)

// checkRDB runs redis-check-rdb on path and returns the number of keys it
// read.
func checkRDB(t *testing.T, path string) int {
	t.Helper()
	bin := filepath.Join(filepath.Dir(testenv.RedisServer(t)), "redis-check-rdb")
	out, err := exec.Command(bin, path).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-check-rdb %s: %v\n%s", path, err, out)
	}
	m := keysRead.FindSubmatch(out)
	if m == nil {
		t.Fatalf("redis-check-rdb %s says no key count:\n%s", path, out)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

func TestSaveWritesFreshRDB(t *testing.T) {
	_, dir, _, a := runPlain(t, "")
	ctx := context.Background()
	rdb := filepath.Join(dir, "dump.rdb")
	if _, err := os.Stat(rdb); err == nil {
		t.Fatal("dump.rdb exists before any save")
	}
	fill(t, a, 10)
	if err := a.Save(ctx); err != nil {
		t.Fatalf("Save: %v", err)
	}
	st1, err := os.Stat(rdb)
	if err != nil {
		t.Fatalf("no RDB after Save: %v", err)
	}
	if n := checkRDB(t, rdb); n != 10 {
		t.Fatalf("RDB after Save holds %d keys, want 10", n)
	}
	if s := field(t, a, "persistence", "rdb_last_bgsave_status"); s != "ok" {
		t.Fatalf("rdb_last_bgsave_status = %q", s)
	}

	// A second Save writes a new file with what was written since.
	do(t, a, "SET", "big", strings.Repeat("x", 64<<10))
	fill(t, a, 20)
	if err := a.Save(ctx); err != nil {
		t.Fatalf("second Save: %v", err)
	}
	st2, err := os.Stat(rdb)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(st1, st2) {
		t.Error("the second Save did not replace dump.rdb (same inode)")
	}
	if st2.Size() <= st1.Size() || st2.ModTime().Before(st1.ModTime()) {
		t.Errorf("dump.rdb after the second Save: size %d, mtime %v; before: size %d, mtime %v",
			st2.Size(), st2.ModTime(), st1.Size(), st1.ModTime())
	}
	if n := checkRDB(t, rdb); n != 21 {
		t.Fatalf("RDB after the second Save holds %d keys, want 21", n)
	}
}

// A BGSAVE that was already running when Save was called began before
// the call: Save waits for it, starts its own and returns only once that
// one, which holds writes made after the call began, is complete.
func TestSaveAfterRunningBGSAVEIsFresh(t *testing.T) {
	_, dir, _, a := runPlain(t, "")
	ctx := context.Background()
	fill(t, a, 30)
	do(t, a, "CONFIG", "SET", "rdb-key-save-delay", "10000") // 10 ms a key: 300 ms a save
	before, _ := strconv.Atoi(field(t, a, "persistence", "rdb_saves"))
	do(t, a, "BGSAVE")
	if field(t, a, "persistence", "rdb_bgsave_in_progress") != "1" {
		t.Fatal("the slow BGSAVE is not running")
	}
	do(t, a, "SET", "late", "1") // after the running BGSAVE forked
	if err := a.Save(ctx); err != nil {
		t.Fatalf("Save: %v", err)
	}
	if after, _ := strconv.Atoi(field(t, a, "persistence", "rdb_saves")); after != before+2 {
		t.Errorf("rdb_saves went from %d to %d; want the running save and a fresh one", before, after)
	}
	if field(t, a, "persistence", "rdb_bgsave_in_progress") != "0" {
		t.Error("Save returned while a BGSAVE is still running")
	}
	if n := checkRDB(t, filepath.Join(dir, "dump.rdb")); n != 31 {
		t.Fatalf("RDB holds %d keys, want 31 (the key written after the running BGSAVE began included)", n)
	}
}

func TestSaveHonoursContext(t *testing.T) {
	_, dir, _, a := runPlain(t, "")
	// SHUTDOWN kills a running save's child; it runs before the kill of
	// runRedis's cleanup, so no child outlives the test.
	t.Cleanup(func() { a.Shutdown(context.Background(), true) })
	fill(t, a, 200)

	t.Run("cancelled before", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := a.Save(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("Save with a cancelled context = %v, want context.Canceled", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "dump.rdb")); err == nil {
			t.Fatal("Save with a cancelled context wrote an RDB")
		}
	})
	t.Run("cancelled while waiting", func(t *testing.T) {
		do(t, a, "CONFIG", "SET", "rdb-key-save-delay", "10000") // 2 s a save
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(100*time.Millisecond, cancel)
		t0 := time.Now()
		err := a.Save(ctx)
		took := time.Since(t0)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Save cancelled while the BGSAVE runs = %v, want context.Canceled", err)
		}
		if took > time.Second {
			t.Fatalf("Save took %v to notice the cancel", took)
		}
		if field(t, a, "persistence", "rdb_bgsave_in_progress") != "1" {
			t.Fatal("no BGSAVE running: Save did not start one before the cancel")
		}
	})
}

// manifestBase returns the base file named by the AOF manifest in dir.
func manifestBase(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "appendonlydir", "appendonly.aof.manifest"))
	if err != nil {
		t.Fatalf("AOF manifest: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[0] == "file" && f[4] == "type" && f[5] == "b" {
			if _, err := os.Stat(filepath.Join(dir, "appendonlydir", f[1])); err != nil {
				t.Fatalf("the manifest's base file: %v", err)
			}
			return f[1]
		}
	}
	t.Fatalf("no base file in the manifest:\n%s", b)
	return ""
}

func TestRewriteAOF(t *testing.T) {
	conf, dir, cmd, a := runPlain(t, "appendonly yes\nappenddirname appendonlydir\n")
	ctx := context.Background()
	base := manifestBase(t, dir)
	rewrites, _ := strconv.Atoi(field(t, a, "persistence", "aof_rewrites"))
	fill(t, a, 50)
	if err := a.RewriteAOF(ctx); err != nil {
		t.Fatalf("RewriteAOF: %v", err)
	}
	if n, _ := strconv.Atoi(field(t, a, "persistence", "aof_rewrites")); n != rewrites+1 {
		t.Errorf("aof_rewrites went from %d to %d, want one more", rewrites, n)
	}
	if s := field(t, a, "persistence", "aof_last_bgrewrite_status"); s != "ok" {
		t.Errorf("aof_last_bgrewrite_status = %q", s)
	}
	if got := manifestBase(t, dir); got == base {
		t.Errorf("the manifest still names base %s after the rewrite", got)
	}
	if v := configGet(t, a, "appendonly"); v != "yes" {
		t.Errorf("appendonly = %q after RewriteAOF", v)
	}
	// The rewritten AOF holds the data set: a SIGKILL loses nothing.
	restart(t, cmd, conf, a)
	if n := do(t, a, "DBSIZE"); n != int64(50) {
		t.Fatalf("DBSIZE after a kill and restart = %v, want 50", n)
	}
}

func TestEnableAOF(t *testing.T) {
	conf, dir, cmd, a := runPlain(t, "")
	ctx := context.Background()
	if v := configGet(t, a, "appendonly"); v != "no" {
		t.Fatalf("appendonly = %q before EnableAOF", v)
	}
	if _, err := os.Stat(filepath.Join(dir, "appendonlydir")); err == nil {
		t.Fatal("appendonlydir exists before EnableAOF")
	}
	fill(t, a, 40)
	if err := a.EnableAOF(ctx); err != nil {
		t.Fatalf("EnableAOF: %v", err)
	}
	if v := configGet(t, a, "appendonly"); v != "yes" {
		t.Fatalf("appendonly = %q after EnableAOF", v)
	}
	f, err := a.Fields(ctx, "persistence")
	if err != nil {
		t.Fatal(err)
	}
	if f["aof_enabled"] != "1" || f["aof_rewrite_in_progress"] != "0" || f["aof_last_bgrewrite_status"] != "ok" {
		t.Fatalf("after EnableAOF: aof_enabled=%s aof_rewrite_in_progress=%s aof_last_bgrewrite_status=%s",
			f["aof_enabled"], f["aof_rewrite_in_progress"], f["aof_last_bgrewrite_status"])
	}
	manifestBase(t, dir)
	// The data set survives a SIGKILL and a start with appendonly yes,
	// from the AOF alone (no RDB was written).
	text, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, append(text, "appendonly yes\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	restart(t, cmd, conf, a)
	if _, err := os.Stat(filepath.Join(dir, "dump.rdb")); err == nil {
		t.Fatal("a dump.rdb exists: the restart did not prove the AOF")
	}
	if n := do(t, a, "DBSIZE"); n != int64(40) {
		t.Fatalf("DBSIZE after a kill and restart on the AOF = %v, want 40", n)
	}
}

// On a server that already has appendonly yes, CONFIG SET appendonly yes
// starts no rewrite, so EnableAOF (whose contract is a server without AOF)
// has nothing to wait for: it must end with ctx, not report success.
func TestEnableAOFAlreadyOnEndsWithContext(t *testing.T) {
	_, _, _, a := runPlain(t, "appendonly yes\n")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	// The deadline ends either the wait between two INFOs (the context's
	// error) or an INFO in flight (go-redis's i/o timeout).
	err := a.EnableAOF(ctx)
	if err == nil {
		t.Fatal("EnableAOF on a server with AOF reported a fresh AOF")
	}
	if took := time.Since(t0); took > 2*time.Second {
		t.Fatalf("EnableAOF took %v past a 300ms deadline", took)
	}
	if v := configGet(t, a, "appendonly"); v != "yes" {
		t.Errorf("appendonly = %q", v)
	}
}

func TestSetMaxmemory(t *testing.T) {
	_, _, _, a := runPlain(t, "maxmemory 16mb\n")
	ctx := context.Background()
	for _, tt := range []struct {
		mb   int
		want string
	}{
		{32, strconv.Itoa(32 << 20)},
		{1, strconv.Itoa(1 << 20)},
		{0, "0"}, // no limit
		{64, strconv.Itoa(64 << 20)},
	} {
		if err := a.SetMaxmemory(ctx, tt.mb); err != nil {
			t.Fatalf("SetMaxmemory(%d): %v", tt.mb, err)
		}
		if got := configGet(t, a, "maxmemory"); got != tt.want {
			t.Errorf("SetMaxmemory(%d): CONFIG GET maxmemory = %s, want %s", tt.mb, got, tt.want)
		}
		if got := field(t, a, "memory", "maxmemory"); got != tt.want {
			t.Errorf("SetMaxmemory(%d): INFO maxmemory = %s, want %s", tt.mb, got, tt.want)
		}
	}
	// Redis refuses a negative size; the error says which command failed
	// and the limit stays as it was.
	err := a.SetMaxmemory(ctx, -1)
	if err == nil || !strings.Contains(err.Error(), "CONFIG SET maxmemory") {
		t.Fatalf("SetMaxmemory(-1) = %v, want a CONFIG SET maxmemory error", err)
	}
	if Unreachable(err) {
		t.Errorf("a refused value is reported as unreachable: %v", err)
	}
	if got := configGet(t, a, "maxmemory"); got != strconv.Itoa(64<<20) {
		t.Errorf("maxmemory after a refused SetMaxmemory = %s, want unchanged %d", got, 64<<20)
	}
}

func TestSetMaxmemoryUnreachable(t *testing.T) {
	a := NewAdmin("127.0.0.1", testenv.FreePort(t), "pw")
	defer a.Close()
	err := a.SetMaxmemory(context.Background(), 16)
	if err == nil || !Unreachable(err) {
		t.Fatalf("SetMaxmemory without a server = %v, want an unreachable error", err)
	}
}

func TestFields(t *testing.T) {
	_, _, _, a := runPlain(t, "")
	ctx := context.Background()
	f, err := a.Fields(ctx, "server")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(f["redis_version"], "7.") {
		t.Errorf("redis_version = %q, want 7.x", f["redis_version"])
	}
	if f["tcp_port"] == "" || f["process_id"] == "" {
		t.Errorf("INFO server lacks tcp_port or process_id: %v", f)
	}
	for k, v := range f {
		if strings.HasPrefix(k, "#") || strings.ContainsAny(k+v, "\r\n") {
			t.Errorf("field %q = %q: a header or line end got through", k, v)
		}
	}
	p, err := a.Fields(ctx, "persistence")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p["redis_version"]; ok {
		t.Error("INFO persistence has fields of another section")
	}
	for _, k := range append(bgsave.inProgress, bgsave.count, bgsave.status, bgrewrite.count, bgrewrite.status) {
		if _, ok := p[k]; !ok {
			t.Errorf("INFO persistence lacks %s, which Save and RewriteAOF wait on", k)
		}
	}
	if u, err := a.Fields(ctx, "nosuchsection"); err != nil || len(u) != 0 {
		t.Errorf("Fields(nosuchsection) = %v, %v; want no fields, no error", u, err)
	}

	down := NewAdmin("127.0.0.1", testenv.FreePort(t), "pw")
	defer down.Close()
	if _, err := down.Fields(ctx, "server"); !Unreachable(err) {
		t.Errorf("Fields without a server = %v, want an unreachable error", err)
	}
	wrong := NewAdmin("127.0.0.1", portOf(t, f), "wrong")
	defer wrong.Close()
	if _, err := wrong.Fields(ctx, "server"); err == nil {
		t.Error("Fields with a wrong password succeeded")
	}
}

func portOf(t *testing.T, server map[string]string) int {
	t.Helper()
	p, err := strconv.Atoi(server["tcp_port"])
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// runCandidate starts a server on RenderCandidate's config over an
// instance's (Render, with an admin user whose password is "pw") and
// returns the candidate's data directory, socket, the instance's config
// and port.
func runCandidate(t *testing.T) (dir, sock, conf string, port int) {
	t.Helper()
	testenv.RedisServer(t)
	root := t.TempDir()
	dir = filepath.Join(root, "staged")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	port = testenv.FreePort(t)
	c := Conf{Bind: "127.0.0.1", Port: port, Dir: filepath.Join(root, "data"), LogFile: filepath.Join(root, "log"), ACLFile: filepath.Join(root, "users.acl"), MemoryMB: 16, Persistence: apitype.PersistenceRDB}
	if err := os.Mkdir(c.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.ACLFile, RenderACL([]User{{Name: AdminUser, PasswordHash: HashPassword("pw"), Admin: true}}), 0o600); err != nil {
		t.Fatal(err)
	}
	conf = filepath.Join(root, "redis.conf")
	if err := os.WriteFile(conf, Render(c), 0o600); err != nil {
		t.Fatal(err)
	}
	cand := filepath.Join(root, "candidate.conf")
	if err := os.WriteFile(cand, RenderCandidate(conf, dir, "restore.sock"), 0o600); err != nil {
		t.Fatal(err)
	}
	runRedis(t, cand)
	return dir, filepath.Join(dir, "restore.sock"), conf, port
}

// waitFields waits until a answers INFO.
func waitFields(t *testing.T, a *Admin) {
	t.Helper()
	var err error
	defer func() {
		if err != nil { // Eventually failed the test; it ends through here
			t.Logf("last error: %v", err)
		}
	}()
	testenv.Eventually(t, "INFO over the socket", 5*time.Second, func() bool {
		_, err = a.Fields(context.Background(), "server")
		return err == nil
	})
}

// A candidate listens on its socket only, in its own data directory, as
// the instance's users: the admin user works there, the default user does
// not; CONFIG SET moves it onto the instance's port and gives it the
// instance's title.
func TestCandidateOverTheSocket(t *testing.T) {
	dir, sock, conf, port := runCandidate(t)
	a := NewSocketAdmin(sock, "pw")
	defer a.Close()
	ctx := context.Background()
	waitFields(t, a)
	f, err := a.Fields(ctx, "server")
	if err != nil {
		t.Fatal(err)
	}
	if f["tcp_port"] != "0" {
		t.Fatalf("tcp_port = %q: the candidate must listen on the socket only", f["tcp_port"])
	}
	if d := configGet(t, a, "dir"); d != dir {
		t.Fatalf("dir = %q, want the staged %q", d, dir)
	}
	// The instance's ACL: no default user.
	anon := goredis.NewClient(&goredis.Options{Network: "unix", Addr: sock, DisableIdentity: true, MaxRetries: -1})
	defer anon.Close()
	if err := anon.Set(ctx, "k", "v", 0).Err(); err == nil {
		t.Fatal("the default user wrote to the candidate")
	}
	if err := a.SetMaxmemory(ctx, 8); err != nil {
		t.Fatalf("SetMaxmemory over the socket: %v", err)
	}
	if got := configGet(t, a, "maxmemory"); got != strconv.Itoa(8<<20) {
		t.Errorf("maxmemory = %s over the socket, want %d", got, 8<<20)
	}
	if err := a.Save(ctx); err != nil {
		t.Fatalf("Save over the socket: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "dump.rdb")); err != nil {
		t.Fatalf("the candidate saved elsewhere than its data directory: %v", err)
	}
	if err := a.SetConfig(ctx, "port", strconv.Itoa(port)); err != nil {
		t.Fatal(err)
	}
	if err := a.SetConfig(ctx, "proc-title-template", InstanceTitle(conf)); err != nil {
		t.Fatal(err)
	}
	tcp := NewAdmin("127.0.0.1", port, "pw")
	defer tcp.Close()
	if err := tcp.Ping(ctx); err != nil {
		t.Fatalf("PING on the instance's port after CONFIG SET port: %v", err)
	}
	pid, _ := strconv.Atoi(f["process_id"])
	title, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if want := fmt.Sprintf(" 127.0.0.1:%d %s", port, conf); !strings.HasSuffix(strings.TrimRight(string(title), "\x00 "), want) {
		t.Fatalf("title %q, want it to end with %q", title, want)
	}
	if err := a.Shutdown(ctx, true); err != nil {
		t.Fatalf("Shutdown over the socket: %v", err)
	}
	if _, err := a.Fields(ctx, "server"); err == nil {
		t.Fatal("the candidate still answers after SHUTDOWN")
	}
}

// Ping over the socket logs in as the admin user.
func TestSocketAdminPing(t *testing.T) {
	_, sock, _, _ := runCandidate(t)
	a := NewSocketAdmin(sock, "pw")
	defer a.Close()
	waitFields(t, a)
	if err := a.Ping(context.Background()); err != nil {
		t.Fatalf("Ping of a socket admin whose server answers INFO: %v", err)
	}
	if err := NewSocketAdmin(sock, "wrong").Ping(context.Background()); err == nil {
		t.Fatal("Ping with a wrong password succeeded")
	}
}

func TestParseVersion(t *testing.T) {
	tests := []struct {
		name, in string
		want     Version
		wantErr  bool
	}{
		{"redis 7.0.15", "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0\n",
			Version{"7.0.15", "ae4d7c971a948f0"}, false},
		{"no build", "Redis server v=6.2.14 sha=00000000:0 malloc=libc bits=64", Version{"6.2.14", ""}, false},
		{"only v", "v=7.2.4", Version{"7.2.4", ""}, false},
		{"tabs and CRLF", "Redis\tserver\tv=7.0.0\r\nbuild=abc\r\n", Version{"7.0.0", "abc"}, false},
		{"build before v", "build=b1 v=7.0.1", Version{"7.0.1", "b1"}, false},
		{"last v wins", "v=1 v=2 build=x build=y", Version{"2", "y"}, false},
		{"empty", "", Version{}, true},
		{"blank", " \n\t", Version{}, true},
		{"no v=", "Redis server sha=00000000:0 build=abc", Version{}, true},
		{"empty v=", "Redis server v= build=abc", Version{}, true},
		{"v without =", "Redis server v7.0.15", Version{}, true},
		{"v= inside a field", "xv=7.0.15", Version{}, true},
		{"upper case", "V=7.0.15", Version{}, true},
		{"other program", "bash: redis-server: command not found", Version{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseVersion(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseVersion(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			}
			if err == nil && got != tt.want {
				t.Fatalf("ParseVersion(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if err != nil && !strings.Contains(err.Error(), strconv.Quote(strings.TrimSpace(tt.in))) {
				t.Errorf("error %q does not quote the output", err)
			}
		})
	}
}

func TestVersionString(t *testing.T) {
	for _, tt := range []struct {
		v    Version
		want string
	}{
		{Version{"7.0.15", "ae4d7c971a948f0"}, "7.0.15 (build ae4d7c971a948f0)"},
		{Version{"7.0.15", ""}, "7.0.15"},
		{Version{}, ""},
	} {
		if got := tt.v.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.v, got, tt.want)
		}
	}
}

// String is for people, not a format ParseVersion reads back; what does
// round-trip is the "v=... build=..." form ParseVersion reads.
func FuzzParseVersion(f *testing.F) {
	f.Add("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0\n")
	f.Add("v= build=")
	f.Add("v=v=1 build=build=2")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseVersion(s)
		if err != nil {
			if v.Version != "" {
				t.Fatalf("ParseVersion(%q) failed with a version %q", s, v.Version)
			}
			return
		}
		if v.Version == "" || strings.ContainsFunc(v.Version+v.Build, unicode.IsSpace) {
			t.Fatalf("ParseVersion(%q) = %+v: empty version or white space", s, v)
		}
		if !strings.HasPrefix(v.String(), v.Version) {
			t.Fatalf("%+v.String() = %q", v, v.String())
		}
		again, err := ParseVersion("Redis server v=" + v.Version + " build=" + v.Build)
		if err != nil || again != v {
			t.Fatalf("ParseVersion(%q) = %+v; rendered again it reads %+v, %v", s, v, again, err)
		}
	})
}

func TestBinaryVersion(t *testing.T) {
	bin := testenv.RedisServer(t)
	ctx := context.Background()
	v, err := BinaryVersion(ctx, bin)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v.Version, "7.") || v.Build == "" {
		t.Fatalf("BinaryVersion(%s) = %+v, want 7.x with a build id", bin, v)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "v="+v.Version+" ") || !strings.Contains(string(out), "build="+v.Build) {
		t.Fatalf("BinaryVersion = %+v, but %s --version says %q", v, bin, out)
	}

	missing := filepath.Join(t.TempDir(), "redis-server")
	if _, err := BinaryVersion(ctx, missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("BinaryVersion of a missing binary = %v, want an error naming it", err)
	}
	// A binary that runs but is not redis-server.
	if tr, err := exec.LookPath("true"); err == nil {
		if v, err := BinaryVersion(ctx, tr); err == nil {
			t.Errorf("BinaryVersion(%s) = %+v, want an error", tr, v)
		}
	}
	// One that fails.
	script := filepath.Join(t.TempDir(), "fails")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho 'Redis server v=7.0.15'\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if v, err := BinaryVersion(ctx, script); err == nil {
		t.Errorf("BinaryVersion of a binary exiting 1 = %+v, want an error", v)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if v, err := BinaryVersion(cctx, bin); err == nil {
		t.Errorf("BinaryVersion with a cancelled context = %+v, want an error", v)
	}
}
