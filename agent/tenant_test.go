package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/supervisor"
)

// What a tenant may run against its own server must not break the
// agent's hold on it. These are the @admin commands a binding's user has
// (redis.TenantRules), each aimed at the agent.

// A tenant's CLIENT PAUSE ALL holds every command of every client, the
// agent's health checks and AUTH included, for as long as the tenant
// asked. The agent must not take that for a hang and kill the server,
// neither while it supervises it nor when it adopts it at its own start,
// and must still delete it.
func TestTenantPauseIsNotAHang(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Health = supervisor.Health{Interval: 100 * time.Millisecond, Timeout: 300 * time.Millisecond, Failures: 2}
	cfg.ReadyTimeout = time.Second
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "p", Spec{Persistence: "aof"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "p", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	if err := c.Do(ctx, "CLIENT", "PAUSE", "600000", "ALL").Err(); err != nil {
		t.Fatalf("tenant CLIENT PAUSE: %v", err)
	}
	time.Sleep(2 * time.Second) // 20 health checks, each held
	if got := mustGet(t, s, "p"); got.PID != in.PID || got.Restarts != 0 || got.LastExit != nil {
		t.Fatalf("a paused server was replaced: %+v", got)
	}
	// The agent restarts: the paused server is adopted, not killed as
	// unready, although its readiness probe gets no PONG.
	shutdown(t, s, false)
	s = startService(t, cfg)
	time.Sleep(2 * cfg.ReadyTimeout)
	if got := mustGet(t, s, "p"); got.PID != in.PID || got.Restarts != 0 {
		t.Fatalf("an adopted paused server was replaced: %+v", got)
	}
	// Deleted all the same: SHUTDOWN waits behind the pause, SIGTERM
	// does not.
	t0 := time.Now()
	if err := s.Deprovision(ctx, "p"); err != nil {
		t.Fatalf("delete of a paused server: %v", err)
	}
	if d := time.Since(t0); d > cfg.StopTimeout+3*time.Second {
		t.Fatalf("the delete of a paused server took %v", d)
	}
	if listens(in.Port) {
		t.Fatal("the paused server still listens after its delete")
	}
}

// A tenant kills the agent's connection (CLIENT KILL USER agent, by id,
// by type): the agent dials again, and binds, resizes and settings work.
func TestTenantKillsTheAgentsConnection(t *testing.T) {
	cfg := testConfig(t, 1)
	cfg.Health.Interval = 50 * time.Millisecond
	s := startService(t, cfg)
	ctx := context.Background()
	in, _, err := s.Provision(ctx, "k", Spec{Persistence: "none"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "k", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	agentID := func() string {
		t.Helper()
		list, err := c.Do(ctx, "CLIENT", "LIST").Text()
		if err != nil {
			t.Fatalf("tenant CLIENT LIST: %v", err)
		}
		for _, line := range strings.Split(list, "\n") {
			if strings.Contains(line, " user=agent ") {
				id, _, _ := strings.Cut(strings.TrimPrefix(line, "id="), " ")
				return id
			}
		}
		return ""
	}
	kills := [][]any{
		{"CLIENT", "KILL", "USER", "agent"},
		{"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"},
		nil, // by id, from CLIENT LIST
	}
	for i, kill := range kills {
		s.runtime("k").admin.Ping(ctx) // the agent holds its connection
		if kill == nil {
			id := agentID()
			if id == "" {
				t.Fatal("the agent's connection is not in CLIENT LIST")
			}
			kill = []any{"CLIENT", "KILL", "ID", id}
		}
		if n, err := c.Do(ctx, kill...).Int(); err != nil || n < 1 {
			t.Fatalf("tenant %v = %d, %v; want the agent's connection killed", kill, n, err)
		}
		if _, _, err := s.Bind(ctx, "k", "app"+strconv.Itoa(i), ""); err != nil {
			t.Fatalf("bind after %v: %v", kill, err)
		}
		if _, err := s.Configure(ctx, "k", apitype.Settings{MaxmemoryPolicy: ptr(apitype.MaxmemoryPolicies[i+1])}); err != nil {
			t.Fatalf("configure after %v: %v", kill, err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if got := mustGet(t, s, "k"); got.PID != in.PID || got.Restarts != 0 {
		t.Fatalf("killing the agent's connection cost the server: %+v", got)
	}
	if err := s.Deprovision(ctx, "k"); err != nil {
		t.Fatal(err)
	}
}

// With maxmemory_clients set, the clients using the most memory are
// disconnected once all together pass it: a tenant's, never the agent's
// (its connection is CLIENT NO-EVICT). A tenant may exempt its own.
func TestClientEvictionSparesTheAgent(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "e", Spec{MemoryMB: 64, Persistence: "none", MaxmemoryClients: "1mb"}); err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "e", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	a := s.runtime("e").admin
	if err := a.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, creds.Username, creds.Password)
	list, err := c.Do(ctx, "CLIENT", "LIST", "TYPE", "normal").Text()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
		if strings.Contains(line, " user=agent ") && !strings.Contains(line, " flags=e ") {
			t.Fatalf("the agent's connection is not no-evict: %s", line)
		}
	}
	if err := c.Do(ctx, "CLIENT", "NO-EVICT", "on").Err(); err != nil {
		t.Fatalf("tenant CLIENT NO-EVICT: %v", err)
	}
	// A greedy client: 3 MiB of a command it never finishes, in its
	// query buffer.
	g, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(creds.Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	fmt.Fprintf(g, "AUTH %s %s\r\n", creds.Username, creds.Password)
	r := bufio.NewReader(g)
	if line, _ := r.ReadString('\n'); line != "+OK\r\n" {
		t.Fatalf("AUTH: %q", line)
	}
	fmt.Fprintf(g, "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n", 8<<20)
	chunk := make([]byte, 64<<10)
	for range 48 {
		if _, err := g.Write(chunk); err != nil {
			break // evicted
		}
	}
	testenv.Eventually(t, "the greedy client's eviction", 5*time.Second, func() bool {
		g.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := r.ReadByte()
		return err != nil && !isTimeout(err)
	})
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("the no-evict tenant was evicted: %v", err)
	}
	if !a.Connected() {
		t.Fatal("the agent's connection was evicted")
	}
	f, _ := a.Fields(ctx, "stats")
	if n, _ := strconv.Atoi(f["evicted_clients"]); n < 1 {
		t.Fatalf("evicted_clients = %q", f["evicted_clients"])
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// A tenant's MONITOR sees every command the server runs, the agent's
// included: none of them shows a secret (the agent's password, a
// binding's, a move's replication user's, or their hashes).
func TestMonitorShowsNoSecret(t *testing.T) {
	cfg := testConfig(t, 1)
	s := startService(t, cfg)
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "m", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	creds, _, err := s.Bind(ctx, "m", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	mon, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(creds.Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	fmt.Fprintf(mon, "AUTH %s %s\r\nMONITOR\r\n", creds.Username, creds.Password)
	r := bufio.NewReader(mon)
	for range 2 {
		if line, _ := r.ReadString('\n'); line != "+OK\r\n" {
			t.Fatalf("tenant AUTH, MONITOR: %q", line)
		}
	}
	var mu sync.Mutex
	var seen strings.Builder
	go func() {
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			mu.Lock()
			seen.WriteString(line)
			mu.Unlock()
		}
	}()
	a := s.runtime("m").admin
	// What the agent does: log in again, users, settings, a resize, a
	// snapshot, a move's replication user; and another tenant logs in.
	a.Close()
	other, _, err := s.Bind(ctx, "m", "other", "")
	if err != nil {
		t.Fatal(err)
	}
	oc := client(t, other.Port, other.Username, other.Password)
	oc.Set(ctx, "visible", "1", 0)
	if _, err := s.Configure(ctx, "m", apitype.Settings{MaxmemoryPolicy: ptr("allkeys-lru")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resize(ctx, "m", 80); err != nil {
		t.Fatal(err)
	}
	primary, err := s.StartMove(ctx, "m")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AbortMove(ctx, "m"); err != nil {
		t.Fatal(err)
	}
	if err := s.Unbind(ctx, "m", "other"); err != nil {
		t.Fatal(err)
	}
	rec, _ := s.store.Get("m")
	testenv.Eventually(t, "MONITOR to show the other tenant's SET", 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return strings.Contains(seen.String(), `"visible"`)
	})
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	out := seen.String()
	mu.Unlock()
	for name, secret := range map[string]string{
		"the agent's password": rec.AdminPassword, "a binding's password": other.Password, "the replication password": primary.Password,
		"the agent's password hash": redis.HashPassword(rec.AdminPassword), "a binding's password hash": redis.HashPassword(other.Password),
		"the replication password hash": redis.HashPassword(primary.Password),
	} {
		if strings.Contains(out, secret) {
			t.Errorf("MONITOR shows %s", name)
		}
	}
	if testing.Verbose() {
		t.Logf("MONITOR output:\n%s", out)
	}
}
