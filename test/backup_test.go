package test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// backupOpts are the flags and environment of an agent that backs up to
// s3, under the name it puts in its backups.
func backupOpts(s3 *testenv.S3, name string, extra ...string) ([]string, []string) {
	flags := append([]string{
		"--backup-endpoint", s3.Endpoint(), "--backup-bucket", s3.Bucket, "--backup-region", "us-east-1",
		"--backup-path-style", "--backup-prefix", "fleet", "--backup-agent-name", name, "--backup-schedule", "off",
	}, extra...)
	env := []string{"AWS_ACCESS_KEY_ID=" + s3.Access, "AWS_SECRET_ACCESS_KEY=" + s3.Secret}
	return flags, env
}

func (a *agentProc) backupNow(id string) apitype.Backup {
	a.t.Helper()
	var b apitype.Backup
	if code := a.do("POST", "/v1/instances/"+id+"/backups", "", &b); code != 201 {
		a.t.Fatalf("backup %s = %d", id, code)
	}
	return b
}

func (a *agentProc) backups(id string) []apitype.Backup {
	a.t.Helper()
	var l apitype.BackupList
	if code := a.do("GET", "/v1/instances/"+id+"/backups?details=true", "", &l); code != 200 {
		a.t.Fatalf("list backups of %s = %d", id, code)
	}
	return l.Backups
}

func waitLog(t *testing.T, a *agentProc, what string, timeout time.Duration) {
	t.Helper()
	testenv.Eventually(t, "the agent's log to say "+what, timeout, func() bool { return strings.Contains(a.log.String(), what) })
}

// A backup under a writer holds a consistent prefix of its writes; a
// restore in place from it brings that state back; the sha256 of a
// tampered object is refused with 422; an agent killed in the middle of
// an upload leaves no backup counted, and the next agent's backup
// succeeds.
func TestBackupUnderWriterRestoreAndKill(t *testing.T) {
	testenv.RedisServer(t)
	s3 := testenv.StartS3(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	portMin := testenv.Ports(t, 20)
	flags, env := backupOpts(s3, "vm1", "--backup-keep", "10")
	a := runAgent(t, agentOpts{dataDir: dataDir, portMin: portMin, extra: flags, env: env})
	if code := a.do("PUT", "/v1/instances/w1", `{"memory_mb":128,"persistence":"aof"}`, nil); code != 201 {
		t.Fatalf("provision = %d", code)
	}
	c := redisClient(t, mustBind(t, a, "w1", "app"))
	ctx := context.Background()
	// A writer INCRs a counter and RPUSHes to a list, as fast as it can.
	stop := make(chan struct{})
	done := make(chan int64)
	go func() {
		var n int64
		defer func() { done <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			// One transaction: a snapshot sees both or neither.
			var incr *goredis.IntCmd
			if _, err := c.TxPipelined(ctx, func(p goredis.Pipeliner) error {
				incr = p.Incr(ctx, "counter")
				p.RPush(ctx, "log", "x")
				return nil
			}); err != nil {
				return
			}
			n = incr.Val()
		}
	}()
	fillKeys(t, redisClient(t, mustBind(t, a, "w1", "filler")), 20000, 1000) // ~20 MB beside the writer
	b1 := a.backupNow("w1")
	close(stop)
	acked := <-done
	if acked == 0 {
		t.Fatal("the writer wrote nothing")
	}
	// Restore in place: the data as of the backup, the writer's log a
	// consistent prefix (counter == its length).
	if code := a.do("PUT", "/v1/instances/w1/snapshot", `{"from_backup":"`+b1.Key+`"}`, nil); code != 200 {
		t.Fatalf("restore from %s = %d", b1.Key, code)
	}
	c = redisClient(t, mustBindAgain(t, a, "w1", "app"))
	counter, _ := c.Get(ctx, "counter").Int64()
	length, _ := c.LLen(ctx, "log").Result()
	if counter == 0 || counter != length || counter > acked {
		t.Fatalf("after the restore: counter %d, log length %d, %d acknowledged", counter, length, acked)
	}
	if n, _ := c.DBSize(ctx).Result(); n < 20000 {
		t.Fatalf("after the restore: %d keys", n)
	}

	// Tampered: the object's bytes no longer have its sha256.
	path := filepath.Join(s3.Dir, s3.Bucket, b1.Key)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)/3] ^= 0x55
	os.WriteFile(path, raw, 0o644)
	if code := a.do("PUT", "/v1/instances/w1/snapshot?from_backup="+b1.Key, "", nil); code != 422 {
		t.Fatalf("restore from a tampered backup = %d, want 422", code)
	}

	// SIGKILL while the upload runs: the snapshot is taken, the upload
	// has started. The S3 server is slowed by nothing; a larger data set
	// makes the upload last.
	fillKeys(t, c, 60000, 1000)
	go func() {
		waitLogAfter(a, len(a.log.String()), "snapshot taken", 20*time.Second)
		a.cmd.Process.Kill()
	}()
	if resp, err := httpPost(a.base + "/v1/instances/w1/backups"); err == nil {
		resp.Body.Close()
		t.Logf("the backup answered %d before the kill", resp.StatusCode)
	}
	<-a.exited
	a = runAgent(t, agentOpts{dataDir: dataDir, portMin: portMin, extra: flags, env: env})
	var in instance
	testenv.Eventually(t, "the instance serving after the agent's kill", settle, func() bool {
		a.do("GET", "/v1/instances/w1", "", &in)
		return in.State == "running"
	})
	// Every backup listed is whole: its size is its metadata's.
	for _, b := range a.backups("w1") {
		if b.SHA256 == "" || b.Size == 0 {
			t.Fatalf("a backup listed without its metadata: %+v", b)
		}
	}
	b2 := a.backupNow("w1")
	if b2.Key == b1.Key || b2.Size <= b1.Size {
		t.Fatalf("the next backup: %+v (the first %+v)", b2, b1)
	}
}

func httpPost(url string) (*http.Response, error) {
	return (&http.Client{Timeout: 2 * time.Minute}).Post(url, "", nil)
}

func httpPut(url, body string) (*http.Response, error) {
	req, err := http.NewRequest("PUT", url, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	return (&http.Client{Timeout: 2 * time.Minute}).Do(req)
}

// mustBindAgain returns a binding's credentials, whether it exists or
// not.
func mustBindAgain(t *testing.T, a *agentProc, id, bid string) credentials {
	t.Helper()
	var c credentials
	if code := a.do("PUT", "/v1/instances/"+id+"/bindings/"+bid, "", &c); code != 200 && code != 201 {
		t.Fatalf("bind %s/%s = %d", id, bid, code)
	}
	return c
}

func waitLogAfter(a *agentProc, from int, what string, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if s := a.log.String(); len(s) > from && strings.Contains(s[from:], what) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// An agent killed (SIGKILL) during a restore from a backup, before and
// after the swap, comes back with the old data or the new, whole; and
// one killed once the RDB is in the bucket but before its manifest and
// record leaves a backup that restores in place.
func TestBackupCrashPoints(t *testing.T) {
	testenv.RedisServer(t)
	bin := faultAgent(t)
	s3 := testenv.StartS3(t)
	for _, point := range []string{agent.FaultRestoreStaged, agent.FaultRestoreSwapped, agent.FaultBackupUploaded} {
		t.Run(point, func(t *testing.T) {
			dataDir := testenv.TraversableDir(t)
			killRedisUnder(t, dataDir)
			portMin := testenv.Ports(t, 20)
			flags, env := backupOpts(s3, "vm-"+point)
			a := runAgent(t, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, extra: flags, env: env})
			id := "k" + strings.ReplaceAll(point, ".", "-")
			mustProvision(t, a, id)
			c := redisClient(t, mustBind(t, a, id, "app"))
			ctx := context.Background()
			c.Set(ctx, "v", "old", 0)
			if point == agent.FaultBackupUploaded {
				crashing := runAgentAfter(t, a, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, extra: flags,
					env: append(env, "REDIS_AGENT_CRASH_AT="+point)})
				resp, err := httpPost(crashing.base + "/v1/instances/" + id + "/backups")
				if err == nil {
					resp.Body.Close()
					t.Fatalf("the backup answered %d; the agent was to die", resp.StatusCode)
				}
				<-crashing.exited
				a = runAgent(t, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, extra: flags, env: env})
				list := a.backups(id)
				if len(list) != 1 || list[0].SHA256 == "" {
					t.Fatalf("after a crash with the RDB uploaded: %+v", list)
				}
				c.Set(ctx, "v", "new", 0)
				if code := a.do("PUT", "/v1/instances/"+id+"/snapshot?from_backup="+list[0].Key, "", nil); code != 200 {
					t.Fatalf("restore from the backup without a manifest = %d", code)
				}
				c = redisClient(t, mustBindAgain(t, a, id, "app"))
				if v, _ := c.Get(ctx, "v").Result(); v != "old" {
					t.Fatalf("after the restore: %q", v)
				}
				return
			}
			bk := a.backupNow(id)
			c.Set(ctx, "v", "new-but-not-backed-up", 0)
			crashing := runAgentAfter(t, a, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, extra: flags,
				env: append(env, "REDIS_AGENT_CRASH_AT="+point)})
			resp, err := httpPut(crashing.base+"/v1/instances/"+id+"/snapshot?from_backup="+bk.Key, "")
			if err == nil {
				resp.Body.Close()
				t.Fatalf("the restore answered %d; the agent was to die", resp.StatusCode)
			}
			<-crashing.exited
			a = runAgent(t, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, extra: flags, env: env})
			var in instance
			testenv.Eventually(t, "the instance running", settle, func() bool {
				a.do("GET", "/v1/instances/"+id, "", &in)
				return in.State == "running"
			})
			c = redisClient(t, mustBindAgain(t, a, id, "app"))
			v, _ := c.Get(ctx, "v").Result()
			want := map[string]string{agent.FaultRestoreStaged: "new-but-not-backed-up", agent.FaultRestoreSwapped: "old"}[point]
			if v != want {
				t.Fatalf("after a crash at %s: %q, want %q", point, v, want)
			}
		})
	}
}

// runAgentAfter stops a (SIGTERM) and runs another agent on its data.
func runAgentAfter(t *testing.T, a *agentProc, o agentOpts) *agentProc {
	t.Helper()
	a.stop(syscall.SIGTERM)
	return runAgent(t, o)
}

// A lost agent (killed, its data directory gone) has its instances
// brought back on another agent by the broker, from their latest backups:
// the same ids, their data as of the backup, the bindings' usernames and
// passwords working at the new address.
func TestRecoverLostAgent(t *testing.T) {
	testenv.RedisServer(t)
	s3 := testenv.StartS3(t)
	f := &fleet{dir: t.TempDir()}
	f.catalog = filepath.Join(f.dir, "catalog.yaml")
	if err := os.WriteFile(f.catalog, []byte(fleetCatalog), 0o600); err != nil {
		t.Fatal(err)
	}
	var procs []*agentProc
	var agents []*fleetAgent
	for i := range 2 {
		name := fmt.Sprintf("a%d", i)
		dir := testenv.TraversableDir(t)
		killRedisUnder(t, dir)
		token := fmt.Sprintf("recover-token-%s-%d-%x", name, os.Getpid(), time.Now().UnixNano())
		tokenFile := filepath.Join(f.dir, name+".token")
		os.WriteFile(tokenFile, []byte(token+"\n"), 0o600)
		flags, env := backupOpts(s3, "vm-"+name)
		p := runAgent(t, agentOpts{dataDir: dir, extra: flags, env: append(env, "REDIS_AGENT_TOKEN="+token)})
		p.token = token
		procs = append(procs, p)
		agents = append(agents, &fleetAgent{name: name, zone: "z" + name, base: p.base, tokenFile: tokenFile})
	}
	a0, a1 := procs[0], procs[1]
	// Everything lands on a0: a1 is marked draining until the recovery.
	a1.do("PUT", "/v1/drain", "", nil)
	b := f.startBroker(t, "b", "", agents)
	const n = 3
	creds := map[string]apitype.Credentials{}
	ctx := context.Background()
	for i := range n {
		id := fmt.Sprintf("r%d", i)
		b.mustProvision(t, id, "p32", "")
		creds[id] = b.mustBind(t, id, "app-"+id, "p32")
		c := redisClient(t, creds[id])
		for k := range 100 * (i + 1) {
			c.Set(ctx, fmt.Sprintf("k%d", k), id, 0)
		}
		a0.backupNow(id)
		// Written after the backup: lost with the agent.
		c.Set(ctx, "after-backup", "lost", 0)
	}
	a1.do("DELETE", "/v1/drain", "", nil)

	// The VM is gone: the agent and its redis-servers killed, its disk lost.
	a0.stop(syscall.SIGKILL)
	for pid := range redisProcs(filepath.Join(a0.dataDir, "instances") + "/") {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := os.RemoveAll(a0.dataDir); err != nil {
		t.Fatal(err)
	}
	if a := b.admin(t, "POST", "/admin/agents/a1/recover"); a.code != 409 {
		t.Fatalf("recover of an agent that answers = %v, want 409", a)
	}
	if a := b.admin(t, "POST", "/admin/agents/a0/recover"); a.code != 202 {
		t.Fatalf("recover = %v, want 202", a)
	}
	var st osbAnswer
	testenv.Eventually(t, "the recovery", 2*time.Minute, func() bool {
		st = b.admin(t, "GET", "/admin/agents/a0/recover")
		return st.body["state"] != "running"
	})
	if st.body["state"] != "done" || st.body["recovered"] != float64(n) {
		t.Fatalf("recovery: %v", st)
	}
	insts := st.body["instances"].(map[string]any)
	for i := range n {
		id := fmt.Sprintf("r%d", i)
		ri := insts[id].(map[string]any)
		if ri["agent"] != "a1" || ri["backup_age_seconds"].(float64) <= 0 || ri["bindings"] != float64(1) {
			t.Fatalf("%s: %v", id, ri)
		}
		// The binding as the broker gives it now: a new address, the
		// same username and password.
		nc := b.binding(t, id, "app-"+id)
		if nc.Username != creds[id].Username || nc.Password != creds[id].Password || nc.Port == 0 {
			t.Fatalf("%s: binding %+v, was %+v", id, nc, creds[id])
		}
		c := redisClient(t, nc)
		if got, _ := c.DBSize(ctx).Result(); got != int64(100*(i+1)) {
			t.Fatalf("%s: %d keys, want the backup's %d", id, got, 100*(i+1))
		}
		if v, _ := c.Get(ctx, "k0").Result(); v != id {
			t.Fatalf("%s: k0 = %q", id, v)
		}
		var in instance
		if code := a1.do("GET", "/v1/instances/"+id, "", &in); code != 200 || len(in.Metadata) == 0 {
			t.Fatalf("%s on a1: %d %+v", id, code, in)
		}
	}
}
