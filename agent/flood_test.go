package agent

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/supervisor"
)

// Attacks on the agent's control by filling every client slot of an
// instance with plain TCP connections (no password needed).

func floodConfig(t *testing.T) Config {
	cfg := testConfig(t, 2)
	cfg.Health = supervisor.Health{Interval: 20 * time.Millisecond, Timeout: 200 * time.Millisecond, Failures: 2}
	cfg.MaxClients = 32 // a flood of a few dozen connections, not 10000
	return cfg
}

// loseControl closes the agent's control connection of id while its
// server is flooded and fills the slot that frees, so that from then on
// every connection the agent opens is refused. A health check may take
// the slot first; then it tries again.
func loseControl(t *testing.T, s *Service, addr, id string) {
	t.Helper()
	in := s.runtime(id)
	for range 20 {
		in.admin.Close()
		testenv.Flood(t, addr)
		// A health check that dialled before the flood took the slot
		// may still be logging in: let it finish (or fail) first.
		time.Sleep(300 * time.Millisecond)
		if !in.admin.Connected() {
			return
		}
	}
	t.Fatal("the agent won the freed slot 20 times in a row")
}

func addrOf(in Instance) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(in.Port)) }

// mustFail asserts that c can no longer run a command: its user was
// deleted (the connection is closed) or it cannot log in.
func mustFail(t *testing.T, c *goredis.Client, what string) {
	t.Helper()
	if err := c.Set(context.Background(), "after-revoke", "x", 0).Err(); err == nil {
		t.Fatalf("%s still works", what)
	}
}

// An unbind while every client slot is taken revokes the user at once, on
// its open connection and for new logins; a bind in the flood hands out
// credentials that work.
func TestUnbindDuringConnectionFlood(t *testing.T) {
	s := startService(t, floodConfig(t))
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "f", Spec{Persistence: "rdb"})
	if err != nil {
		t.Fatal(err)
	}
	victim, _, err := s.Bind(ctx, "f", "victim", "")
	if err != nil {
		t.Fatal(err)
	}
	open := client(t, victim.Port, victim.Username, victim.Password)
	if err := open.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	held, end := testenv.Flood(t, addrOf(inst))
	t.Logf("flood holds %d connections", held)

	if err := s.Unbind(ctx, "f", "victim"); err != nil {
		t.Fatalf("Unbind in a flood: %v", err)
	}
	mustFail(t, open, "the revoked user's open connection")
	fresh, _, err := s.Bind(ctx, "f", "fresh", "")
	if err != nil {
		t.Fatalf("Bind in a flood: %v", err)
	}
	end()
	testenv.Eventually(t, "the flood's connections to close", 5*time.Second, func() bool {
		c := client(t, victim.Port, fresh.Username, fresh.Password)
		return c.Ping(ctx).Err() == nil
	})
	mustFail(t, client(t, victim.Port, victim.Username, victim.Password), "a new login of the revoked user")
	if n, err := client(t, fresh.Port, fresh.Username, fresh.Password).Exists(ctx, "k").Result(); err != nil || n != 1 {
		t.Fatalf("the binding made in the flood: EXISTS k = %d, %v", n, err)
	}
	if got := mustGet(t, s, "f"); got.PID != inst.PID || got.Restarts != 0 {
		t.Fatalf("the flood cost a restart: %+v", got)
	}
}

// A server whose slots are all taken answers (with a refusal): it is not
// hung, so it is not killed, and no acknowledged write is lost.
func TestConnectionFloodIsNotAHang(t *testing.T) {
	s := startService(t, floodConfig(t))
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "f", Spec{Persistence: "rdb"})
	if err != nil {
		t.Fatal(err)
	}
	creds, _, _ := s.Bind(ctx, "f", "app", "")
	c := client(t, creds.Port, creds.Username, creds.Password)
	for i := range 50 {
		if err := c.Set(ctx, "k"+strconv.Itoa(i), "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Flood(t, addrOf(inst))
	// The kept control connection goes on answering; so that the test
	// also covers a server whose refusals are all the agent can get, it
	// is taken away too.
	loseControl(t, s, addrOf(inst), "f")
	time.Sleep(time.Second) // 50 health intervals, far past 2 failures
	if s.runtime("f").admin.Connected() {
		t.Fatal("the agent got a connection in a full server: the test proves nothing")
	}
	got := mustGet(t, s, "f")
	if got.PID != inst.PID || got.Restarts != 0 || got.State != "running" {
		t.Fatalf("after a flood: %+v; want the same process, running, never restarted", got)
	}
	if n, err := c.DBSize(ctx).Result(); err != nil || n != 50 {
		t.Fatalf("DBSIZE = %d, %v; want 50", n, err)
	}
}

// When the server is alive but out of the agent's reach (its control
// connection lost while every slot is taken), a revocation is carried out
// by a graceful restart that loads the updated ACL file; it is never
// reported done while the user still works.
func TestUnbindOutOfReachRestarts(t *testing.T) {
	s := startService(t, floodConfig(t))
	ctx := context.Background()
	inst, _, err := s.Provision(ctx, "f", Spec{Persistence: "rdb"})
	if err != nil {
		t.Fatal(err)
	}
	victim, _, _ := s.Bind(ctx, "f", "victim", "")
	keeper, _, _ := s.Bind(ctx, "f", "keeper", "")
	vc := client(t, victim.Port, victim.Username, victim.Password)
	if err := vc.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	_, end := testenv.Flood(t, addrOf(inst))
	loseControl(t, s, addrOf(inst), "f")
	if err := s.Unbind(ctx, "f", "victim"); err != nil {
		t.Fatalf("Unbind out of reach: %v", err)
	}
	mustFail(t, vc, "the revoked user's open connection")
	end()
	kc := client(t, keeper.Port, keeper.Username, keeper.Password)
	testenv.Eventually(t, "the restarted server", 5*time.Second, func() bool { return kc.Ping(ctx).Err() == nil })
	mustFail(t, client(t, victim.Port, victim.Username, victim.Password), "a new login of the revoked user")
	if v, err := kc.Get(ctx, "k").Result(); err != nil || v != "v" {
		t.Fatalf("data after the graceful restart: %q, %v", v, err)
	}
	got := mustGet(t, s, "f")
	if got.PID == inst.PID || got.LastExit == nil || got.LastExit.Reason != apitype.ReasonManual {
		t.Fatalf("after the revocation: %+v; want a graceful restart", got)
	}
}

// The control connection is held from the first PONG: a flood that starts
// right after a provision cannot take it away.
func TestControlConnectionHeldFromReady(t *testing.T) {
	s := startService(t, floodConfig(t))
	ctx := context.Background()
	if _, _, err := s.Provision(ctx, "f", Spec{Persistence: "none"}); err != nil {
		t.Fatal(err)
	}
	if !s.runtime("f").admin.Connected() {
		t.Fatal("no control connection right after the provision answered")
	}
	inst := mustGet(t, s, "f")
	testenv.Flood(t, addrOf(inst))
	if _, err := s.runtime("f").admin.Info(ctx); err != nil {
		t.Fatalf("INFO on the control connection in a flood: %v", err)
	}
	// A fresh connection is refused, and says so.
	fresh := redis.NewAdmin("127.0.0.1", inst.Port, "x")
	defer fresh.Close()
	err := fresh.Ping(ctx)
	if !redis.Alive(err) || err == nil || !strings.Contains(err.Error(), "max number of clients") && !strings.Contains(err.Error(), "closed") {
		t.Fatalf("a fresh connection in a flood: %v; want a refusal that shows the server alive", err)
	}
}
