package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// snapshot downloads a snapshot of id and checks it against its
// X-Snapshot-Sha256 and Content-Length.
func (a *agentProc) snapshot(id string) []byte {
	a.t.Helper()
	resp, err := http.Get(a.base + "/v1/instances/" + id + "/snapshot")
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		a.t.Fatalf("GET snapshot of %s = %d %.200q %v", id, resp.StatusCode, b, err)
	}
	sum := sha256.Sum256(b)
	if got, want := hex.EncodeToString(sum[:]), resp.Header.Get("X-Snapshot-Sha256"); got != want {
		a.t.Fatalf("snapshot sha256 %s, header says %s", got, want)
	}
	if resp.Header.Get("Content-Type") != "application/octet-stream" || resp.ContentLength != int64(len(b)) {
		a.t.Fatalf("snapshot headers %v for %d bytes", resp.Header, len(b))
	}
	return b
}

// snapshotStreamed GETs id's snapshot as it is made (TE: trailers): the
// answer is chunked, with no length, and the sha256 in a trailer.
func (a *agentProc) snapshotStreamed(id string) []byte {
	a.t.Helper()
	req, err := http.NewRequest("GET", a.base+"/v1/instances/"+id+"/snapshot", nil)
	if err != nil {
		a.t.Fatal(err)
	}
	req.Header.Set("TE", "trailers")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		a.t.Fatalf("GET snapshot of %s = %d %.200q %v", id, resp.StatusCode, b, err)
	}
	sum := sha256.Sum256(b)
	if got, want := hex.EncodeToString(sum[:]), resp.Trailer.Get("X-Snapshot-Sha256"); got != want {
		a.t.Fatalf("streamed snapshot sha256 %s, trailer says %q", got, want)
	}
	if resp.ContentLength != -1 || resp.Header.Get("X-Snapshot-Sha256") != "" || !bytes.HasPrefix(b, []byte("REDIS")) {
		a.t.Fatalf("streamed snapshot headers %v for %d bytes starting %q", resp.Header, len(b), b[:min(len(b), 9)])
	}
	return b
}

// restore uploads rdb into id with X-Snapshot-Sha256: sum (none when "")
// and returns the status and body.
func (a *agentProc) restore(id string, rdb []byte, sum string) (int, string) {
	a.t.Helper()
	req, err := http.NewRequest("PUT", a.base+"/v1/instances/"+id+"/snapshot", bytes.NewReader(rdb))
	if err != nil {
		a.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	if sum != "" {
		req.Header.Set("X-Snapshot-Sha256", sum)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// fillKeys writes n keys of size-byte values through c.
func fillKeys(t *testing.T, c *goredis.Client, n, size int) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < n; i += 1000 {
		p := c.Pipeline()
		for j := i; j < min(i+1000, n); j++ {
			p.Set(ctx, "k"+strconv.Itoa(j), value(j, size), 0)
		}
		if _, err := p.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

func sha(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// value is key i's value: size bytes, random letters from a generator
// seeded with i, so the RDB is as big as the data (LZF finds nothing to
// compress) and every value is known.
func value(i, size int) string {
	v := []byte(strconv.Itoa(i) + ":")
	r := rand.New(rand.NewPCG(uint64(i), 42))
	for len(v) < size {
		v = append(v, byte('a'+r.IntN(26)))
	}
	return string(v)
}

// checkKeys fails unless c holds exactly the n keys fillKeys wrote.
func checkKeys(t *testing.T, c *goredis.Client, n, size int) {
	t.Helper()
	ctx := context.Background()
	if got, err := c.DBSize(ctx).Result(); err != nil || got != int64(n) {
		t.Fatalf("DBSIZE = %d %v, want %d", got, err, n)
	}
	for i := 0; i < n; i += 1000 {
		keys := make([]string, 0, 1000)
		for j := i; j < min(i+1000, n); j++ {
			keys = append(keys, "k"+strconv.Itoa(j))
		}
		vals, err := c.MGet(ctx, keys...).Result()
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range vals {
			if v != value(i+k, size) {
				t.Fatalf("%s on the new VM = %.30v, want %.30s", keys[k], v, value(i+k, size))
			}
		}
	}
}

// TestMigrationBetweenAgents moves an instance from one agent (one "VM")
// to another with GET snapshot -> PUT snapshot and checks every key.
// MIGRATION_MB sets the size of the data set (default 10 MB in 100k keys);
// the throughput is logged.
func TestMigrationBetweenAgents(t *testing.T) {
	testenv.RedisServer(t)
	const keys = 100_000
	size := 100
	if mb, err := strconv.Atoi(os.Getenv("MIGRATION_MB")); err == nil && mb > 0 {
		size = mb << 20 / keys
	}
	memMB := max(64, 3*keys*size>>20)
	spec := fmt.Sprintf(`{"memory_mb":%d,"persistence":"aof"}`, memMB)
	dirA, dirB := testenv.TraversableDir(t), testenv.TraversableDir(t)
	killRedisUnder(t, dirA)
	killRedisUnder(t, dirB)
	a := runAgent(t, agentOpts{dataDir: dirA, ports: 10})
	b := runAgent(t, agentOpts{dataDir: dirB, ports: 10})

	if code := a.do("PUT", "/v1/instances/mig", spec, nil); code != 201 {
		t.Fatalf("provision on A = %d", code)
	}
	var credA, credB credentials
	a.do("PUT", "/v1/instances/mig/bindings/app", "", &credA)
	fillKeys(t, redisClient(t, credA), keys, size)

	t0 := time.Now()
	rdb := a.snapshot("mig")
	out := time.Since(t0)
	// Read as it is made: another save of the same data, the same keys.
	if streamed := a.snapshotStreamed("mig"); len(streamed) < len(rdb)*9/10 || len(streamed) > len(rdb)*11/10 {
		t.Fatalf("streamed snapshot %d bytes, the buffered one %d", len(streamed), len(rdb))
	}

	if code := b.do("PUT", "/v1/instances/mig", spec, nil); code != 201 {
		t.Fatalf("provision on B = %d", code)
	}
	b.do("PUT", "/v1/instances/mig/bindings/app", "", &credB)
	onB := redisClient(t, credB)
	if err := onB.Set(context.Background(), "stale", "x", 0).Err(); err != nil {
		t.Fatal(err)
	}

	// A damaged copy is refused and changes nothing.
	bad := bytes.Clone(rdb)
	bad[len(bad)/2] ^= 0xff
	if code, body := b.restore("mig", bad, ""); code != 422 || !strings.Contains(body, "cannot load the snapshot") {
		t.Fatalf("restore of a damaged file = %d %s; want 422 saying it does not load", code, body)
	}
	if code, body := b.restore("mig", rdb[:len(rdb)-1], sha(rdb)); code != 422 || !strings.Contains(body, "sha256") {
		t.Fatalf("restore of a truncated file with the full file's sum = %d %s; want 422", code, body)
	}
	if onB.Get(context.Background(), "stale").Val() != "x" {
		t.Fatal("a refused restore changed the data")
	}

	t1 := time.Now()
	if code, body := b.restore("mig", rdb, sha(rdb)); code != 200 {
		t.Fatalf("restore on B = %d %s", code, body)
	}
	in := time.Since(t1)
	checkKeys(t, redisClient(t, credB), keys, size)
	mb := float64(len(rdb)) / (1 << 20)
	t.Logf("data set %d keys x %d B; RDB %.1f MiB; snapshot out %v (%.0f MiB/s), restore in %v (%.0f MiB/s)",
		keys, size, mb, out.Round(time.Millisecond), mb/out.Seconds(), in.Round(time.Millisecond), mb/in.Seconds())

	// The restored data survives B's restart of the instance (it is in
	// the AOF now), and A still has its copy.
	if code := b.do("POST", "/v1/instances/mig/restart", "", nil); code != 200 {
		t.Fatalf("restart on B = %d", code)
	}
	checkKeys(t, redisClient(t, credB), keys, size)
	checkKeys(t, redisClient(t, credA), keys, size)
	a.do("DELETE", "/v1/instances/mig", "", nil)
	b.do("DELETE", "/v1/instances/mig", "", nil)
}

type rolloutStatus = apitype.Rollout

// wrapper writes a script that says it is redis-server version and runs
// the real one: a second build of Redis.
func wrapper(t *testing.T, version string) string {
	t.Helper()
	path := filepath.Join(testenv.TraversableDir(t), "redis-server")
	script := fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = \"--version\" ]; then\n\techo \"Redis server v=%s sha=00000000:0 malloc=libc bits=64 build=wrapped\"\n\texit 0\nfi\nexec %s \"$@\"\n",
		version, testenv.RedisServer(t))
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestRollingUpgradeAtAgentStart restarts the agent with another
// redis-server; the instances move to it by themselves, one at a time,
// keeping their data, and the rollout's status is in the API.
func TestRollingUpgradeAtAgentStart(t *testing.T) {
	testenv.RedisServer(t)
	dir := testenv.TraversableDir(t)
	killRedisUnder(t, dir)
	portMin := testenv.Ports(t, 10)
	a := runAgent(t, agentOpts{dataDir: dir, portMin: portMin, ports: 10})
	creds := map[string]credentials{}
	pids := map[string]int{}
	for _, id := range []string{"r1", "r2"} {
		in := mustProvision(t, a, id)
		creds[id] = mustBind(t, a, id, "app")
		pids[id] = in.PID
		fillKeys(t, redisClient(t, creds[id]), 1000, 10)
	}
	var st rolloutStatus
	if code := a.do("GET", "/v1/rollout", "", &st); code != 200 || st.Pending != 0 {
		t.Fatalf("rollout before any change = %d %+v", code, st)
	}
	a.stop(syscall.SIGTERM)

	next := wrapper(t, "7.2.99")
	a = runAgent(t, agentOpts{dataDir: dir, portMin: portMin, ports: 10, extra: []string{"--redis-server", next}})
	testenv.Eventually(t, "the rollout at agent start to finish", settle, func() bool {
		a.do("GET", "/v1/rollout", "", &st)
		return st.State == "done"
	})
	if st.Moved != 2 || st.Pending != 0 || st.Binary != next || st.Version != "7.2.99 (build wrapped)" || st.MaxUnavailableSeconds <= 0 {
		t.Fatalf("rollout = %+v", st)
	}
	t.Logf("longest unavailability of one instance: %.1f ms", st.MaxUnavailableSeconds*1000)
	for id, pid := range pids {
		var in struct {
			instance
			Binary string `json:"binary"`
		}
		a.do("GET", "/v1/instances/"+id, "", &in)
		if in.Binary != next || in.PID == pid || in.State != "running" {
			t.Fatalf("%s after the rollout: %+v", id, in)
		}
		checkKeys(t, redisClient(t, creds[id]), 1000, 10)
	}
	var capa struct {
		RedisVersion string `json:"redis_version"`
	}
	if a.do("GET", "/v1/capacity", "", &capa); capa.RedisVersion != "7.2.99" {
		t.Fatalf("capacity redis_version = %q", capa.RedisVersion)
	}
	// Nothing left to move: POST answers at once with done.
	var again rolloutStatus
	if code := a.do("POST", "/v1/rollout", "", &again); code != 202 || again.State != "done" || again.Total != 0 {
		t.Fatalf("POST /v1/rollout with nothing to move = %d %+v", code, again)
	}
	for id := range pids {
		a.do("DELETE", "/v1/instances/"+id, "", nil)
	}
}
