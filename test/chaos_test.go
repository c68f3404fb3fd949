package test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// envInt reads a test knob from the environment.
func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// writer SETs unique keys on one instance and remembers which writes Redis
// acknowledged.
type writer struct {
	c     *goredis.Client
	mu    sync.Mutex
	acked []string
	fails atomic.Int64
}

func (w *writer) run(ctx context.Context, id string) {
	for i := 0; ctx.Err() == nil; i++ {
		key := id + ":" + strconv.Itoa(i)
		if err := w.c.Set(ctx, key, key, 0).Err(); err != nil {
			w.fails.Add(1)
			time.Sleep(2 * time.Millisecond)
			continue
		}
		w.mu.Lock()
		w.acked = append(w.acked, key)
		w.mu.Unlock()
	}
}

// TestChaos runs N instances with writers (aof-always) and, for a bounded
// time, SIGKILLs and SIGSTOPs random redis-servers and SIGKILLs and
// restarts the agent. Then the machine must match the state, every
// instance must answer its binding on its original port, and no
// acknowledged write may be lost. CHAOS_SECONDS and CHAOS_INSTANCES make
// a longer run.
func TestChaos(t *testing.T) {
	testenv.RedisServer(t)
	seconds := envInt("CHAOS_SECONDS", 8)
	n := envInt("CHAOS_INSTANCES", 4)
	if testing.Short() {
		seconds = 3
	}
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	opts := agentOpts{dataDir: dataDir, portMin: testenv.Ports(t, n+10), ports: n + 10, extra: []string{
		"--health-interval", "100ms", "--health-timeout", "100ms", "--health-failures", "3", "--ready-timeout", "3s",
	}}
	a := runAgent(t, opts)

	ids := make([]string, n)
	ports := map[string]int{}
	creds := map[string]credentials{}
	writers := map[string]*writer{}
	ctx, stopWriters := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range ids {
		id := fmt.Sprintf("chaos-%d", i)
		ids[i] = id
		ports[id] = mustProvision(t, a, id).Port
		c := mustBind(t, a, id, "app")
		creds[id+"/app"] = c
		opt, _ := goredis.ParseURL(c.URI)
		opt.MaxRetries, opt.DialerRetries, opt.DisableIdentity, opt.PoolSize = -1, 1, true, 1
		opt.ReadTimeout, opt.WriteTimeout, opt.DialTimeout = 500*time.Millisecond, 500*time.Millisecond, 500*time.Millisecond
		w := &writer{c: goredis.NewClient(opt)}
		defer w.c.Close()
		writers[id] = w
		wg.Add(1)
		go func() { defer wg.Done(); w.run(ctx, id) }()
	}

	// pingOK waits until the binding of id answers PING and returns how
	// long that took.
	pingOK := func(id string, from time.Time) time.Duration {
		deadline := time.Now().Add(30 * time.Second)
		for !authPing(creds[id+"/app"]) {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not recover within 30s", id)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(from)
	}
	pidOf := func(id string) int {
		var in instance
		testenv.Eventually(t, id+" to run with a pid", settle, func() bool {
			if code, _, err := a.try("GET", "/v1/instances/"+id, ""); err != nil || code != 200 {
				return false
			}
			a.do("GET", "/v1/instances/"+id, "", &in)
			return in.PID != 0 && in.State == "running"
		})
		return in.PID
	}

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	faults := map[string]int{}
	// Recovery times by fault: fault to authenticated PING for Redis
	// faults, SIGKILL to /readyz 200 for the agent. Repeated kills of one
	// instance inside the restart policy's stable period back off
	// (immediate, 100 ms, 200 ms, ...), which these figures include.
	recoveries := map[string][]time.Duration{}
	end := time.Now().Add(time.Duration(seconds) * time.Second)
	for time.Now().Before(end) {
		id := ids[rng.IntN(n)]
		switch k := rng.IntN(10); {
		case k < 5:
			pid := pidOf(id)
			t0 := time.Now()
			syscall.Kill(pid, syscall.SIGKILL)
			faults["SIGKILL redis-server"]++
			recoveries["SIGKILL redis-server"] = append(recoveries["SIGKILL redis-server"], pingOK(id, t0))
		case k < 8:
			pid := pidOf(id)
			t0 := time.Now()
			syscall.Kill(pid, syscall.SIGSTOP)
			faults["SIGSTOP redis-server"]++
			recoveries["SIGSTOP redis-server"] = append(recoveries["SIGSTOP redis-server"], pingOK(id, t0))
		default:
			t0 := time.Now()
			a.stop(syscall.SIGKILL)
			faults["SIGKILL agent"]++
			a = runAgent(t, opts)
			recoveries["SIGKILL agent"] = append(recoveries["SIGKILL agent"], time.Since(t0))
		}
		time.Sleep(time.Duration(50+rng.IntN(150)) * time.Millisecond)
	}
	stopWriters()
	wg.Wait()

	insts := checkInvariants(t, a, creds)
	for _, in := range insts {
		if ports[in.ID] != in.Port {
			t.Errorf("%s moved from port %d to %d", in.ID, ports[in.ID], in.Port)
		}
	}
	var acked, lost int
	for id, w := range writers {
		c := redisClient(t, creds[id+"/app"])
		for start := 0; start < len(w.acked); start += 1000 {
			keys := w.acked[start:min(start+1000, len(w.acked))]
			vals, err := c.MGet(context.Background(), keys...).Result()
			if err != nil {
				t.Fatalf("MGET on %s: %v", id, err)
			}
			for i, v := range vals {
				if v != keys[i] {
					lost++
					if lost <= 5 {
						t.Errorf("%s: acknowledged write %s lost (got %v)", id, keys[i], v)
					}
				}
			}
		}
		acked += len(w.acked)
	}
	var total int
	for _, c := range faults {
		total += c
	}
	t.Logf("chaos: %d s, %d instances, %d faults %v", seconds, n, total, faults)
	for kind, ds := range recoveries {
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		t.Logf("chaos: %-21s %3d recoveries: min %v, p50 %v, worst %v", kind, len(ds),
			ds[0].Round(time.Millisecond), ds[len(ds)/2].Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond))
	}
	t.Logf("chaos: writes acknowledged %d, lost %d", acked, lost)
	if acked == 0 {
		t.Fatal("no write was acknowledged: the writers never ran")
	}
	if lost != 0 {
		t.Fatalf("%d of %d acknowledged writes lost with aof-always", lost, acked)
	}
	for _, id := range ids {
		if code, _, _ := a.try(http.MethodDelete, "/v1/instances/"+id, ""); code != 200 {
			t.Errorf("cleanup delete %s = %d", id, code)
		}
	}
}

// authPing logs in with c on a fresh connection and PINGs. (A go-redis
// client would measure its own dial backoff, up to a second, not the
// server's recovery.)
func authPing(c credentials) bool {
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(c.Host, strconv.Itoa(c.Port)), time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(conn, "*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n", len(c.Username), c.Username, len(c.Password), c.Password)
	r := bufio.NewReader(conn)
	l1, err1 := r.ReadString('\n')
	l2, err2 := r.ReadString('\n')
	return err1 == nil && err2 == nil && l1 == "+OK\r\n" && l2 == "+PONG\r\n"
}
