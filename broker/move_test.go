package broker

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// Replication moves that stop midway, against real agents: the copies
// they leave and what last_operation says until a settle of left moves
// (bounds shortened) ends them.

// settleFast packs instances (so a plan change moves one off the small
// agent) and settles left moves after a second or two.
func settleFast(c *Config) {
	c.Strategy = Pack
	c.Refresh, c.StaleMove, c.StaleCutover = 200*time.Millisecond, 2*time.Second, time.Second
}

// placeToMove provisions id (p64) and a neighbour on agent-0 of
// startAgents(t, 300, 2000), binds "app" and writes keys k0..k99; a plan
// change of id to p256 then has to move it to agent-1.
func placeToMove(t *testing.T, tb *testBroker, agents []*testAgent, id string) apitype.Credentials {
	t.Helper()
	for _, iid := range []string{id, id + "-neighbour"} {
		if a := tb.osb("PUT", "/v2/service_instances/"+iid, provisionBody); a.code != 201 {
			t.Fatalf("provision %s = %d %v", iid, a.code, a.body)
		}
	}
	if h := holders(t, agents, id); len(h) != 1 || h[0] != "agent-0" {
		t.Fatalf("%s on %v; want agent-0", id, h)
	}
	creds := credsOf(t, tb.osb("PUT", "/v2/service_instances/"+id+"/service_bindings/app", `{"service_id":"svc","plan_id":"p64"}`))
	rc := redisClient(t, creds)
	for i := range 100 {
		if err := rc.Set(context.Background(), "k"+strconv.Itoa(i), "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	return creds
}

// refuse makes a hang up on the requests match matches, until the test
// clears it (a.refuse.Store(nil)).
func refuse(a *testAgent, match func(*http.Request) bool) {
	a.refuse.Store(&match)
}

// startMoveTo asks for a plan change of id to plan that moves it, and
// returns its operation.
func startMoveTo(t *testing.T, tb *testBroker, id, plan string) string {
	t.Helper()
	a := tb.osb("PATCH", "/v2/service_instances/"+id+"?accepts_incomplete=true", `{"service_id":"svc","plan_id":"`+plan+`"}`)
	op, _ := a.body["operation"].(string)
	if a.code != 202 || op == "" {
		t.Fatalf("update that moves = %d %v; want 202 with an operation", a.code, a.body)
	}
	return op
}

// waitMoveEnded waits until the broker's own run of operation op is over
// (whatever last_operation makes of it).
func waitMoveEnded(t *testing.T, tb *testBroker, id, op string) {
	t.Helper()
	testenv.Eventually(t, "the broker's move to end", 30*time.Second, func() bool {
		o, ok := tb.b.ops.get(id, op)
		if !ok {
			t.Fatalf("the broker does not know its operation %s", op)
		}
		o.mu.Lock()
		defer o.mu.Unlock()
		return !o.finished.IsZero()
	})
}

func (tb *testBroker) lastOperation(id, op string) answer {
	tb.t.Helper()
	return tb.osb("GET", "/v2/service_instances/"+id+"/last_operation?operation="+op, "")
}

// A move whose target was promoted but whose source did not take the
// forward (its agent hung up) is the instance's new place: its
// last_operation is in progress, never failed, until the settle of left
// moves has the source forward, then succeeded.
func TestMovePromotedButNotForwardedSucceedsOnceSettled(t *testing.T) {
	agents := startAgents(t, 300, 2000)
	tb := startBroker(t, agentConfigs(agents), settleFast)
	creds := placeToMove(t, tb, agents, "m1")
	refuse(agents[0], func(r *http.Request) bool {
		return r.Method == http.MethodPost && r.URL.Path == "/v1/instances/m1/move/forward"
	})
	op := startMoveTo(t, tb, "m1", "p256")
	waitMoveEnded(t, tb, "m1", op)
	if lo := tb.lastOperation("m1", op); lo.code != 200 || lo.body["state"] != opInProgress {
		t.Errorf("last_operation once the forward failed (the target promoted, the source cut over) = %d %v; want in progress", lo.code, lo.body)
	}
	agents[0].refuse.Store(nil)
	testenv.Eventually(t, "the settle to finish the move", 20*time.Second, func() bool {
		lo := tb.lastOperation("m1", op)
		if lo.body["state"] == opFailed {
			t.Fatalf("last_operation = %v; the move is finishing, not failed", lo.body)
		}
		time.Sleep(50 * time.Millisecond)
		return lo.code == 200 && lo.body["state"] == opSucceeded
	})
	if h := holders(t, agents, "m1"); len(h) != 1 || h[0] != "agent-1" {
		t.Fatalf("m1 is on %v once settled; want agent-1", h)
	}
	if in, err := agents[0].svc.Get(context.Background(), "m1"); err != nil || in.State != apitype.StateForwarding {
		t.Fatalf("m1 on agent-0 once settled = %+v, %v; want its forwarder", in, err)
	}
	moved := credsOf(t, tb.osb("GET", "/v2/service_instances/m1/service_bindings/app", ""))
	if moved.Password != creds.Password {
		t.Fatalf("the binding's password changed in the move")
	}
	if n, err := redisClient(t, moved).DBSize(context.Background()).Result(); err != nil || n != 100 {
		t.Fatalf("DBSIZE on the target = %d, %v; want 100", n, err)
	}
	if lo := startBroker(t, agentConfigs(agents), nil).lastOperation("m1", op); lo.body["state"] != opSucceeded {
		t.Fatalf("last_operation from a fresh broker = %v", lo.body)
	}
}

// A move undone before its cutover whose replica could not be removed
// (the target's agent hung up on the deletion) leaves that replica; the
// source, no longer in a move, serves. The settle of left moves removes
// the replica once its agent answers, and leaves the source alone.
func TestSettleRemovesAStrayReplica(t *testing.T) {
	agents := startAgents(t, 300, 2000)
	tb := startBroker(t, agentConfigs(agents), settleFast)
	creds := placeToMove(t, tb, agents, "m2")
	// The binding's copy fails (the move is undone before its cutover),
	// and so does the undo's deletion of the replica.
	refuse(agents[1], func(r *http.Request) bool {
		return r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v1/instances/m2/bindings/") ||
			r.Method == http.MethodDelete && r.URL.Path == "/v1/instances/m2"
	})
	op := startMoveTo(t, tb, "m2", "p256")
	waitMoveEnded(t, tb, "m2", op)
	if lo := tb.lastOperation("m2", op); lo.body["state"] != opFailed {
		t.Fatalf("last_operation of the undone move = %v; want failed", lo.body)
	}
	ctx := context.Background()
	if in, err := agents[1].svc.Get(ctx, "m2"); err != nil || in.ReplicaOf == "" {
		t.Fatalf("m2 on agent-1 after the undo = %+v, %v; want the replica the undo could not remove", in, err)
	}
	if in, err := agents[0].svc.Get(ctx, "m2"); err != nil || in.Move != nil || in.State != apitype.StateRunning {
		t.Fatalf("m2 on agent-0 after the undo = %+v, %v; want it serving, out of the move", in, err)
	}
	agents[1].refuse.Store(nil)
	testenv.Eventually(t, "the settle to remove the stray replica", 20*time.Second, func() bool {
		time.Sleep(50 * time.Millisecond)
		_, err := agents[1].svc.Get(ctx, "m2")
		return err != nil
	})
	if h := holders(t, agents, "m2"); len(h) != 1 || h[0] != "agent-0" {
		t.Fatalf("m2 on %v once settled; want agent-0 only", h)
	}
	if in, err := agents[0].svc.Get(ctx, "m2"); err != nil || in.Move != nil || in.State != apitype.StateRunning {
		t.Fatalf("m2 on agent-0 once settled = %+v, %v; want it serving", in, err)
	}
	rc := redisClient(t, creds)
	if n, err := rc.DBSize(ctx).Result(); err != nil || n != 100 {
		t.Fatalf("DBSIZE on the source = %d, %v; want 100", n, err)
	}
	if err := rc.Set(ctx, "after", "1", 0).Err(); err != nil {
		t.Fatalf("a write on the source once settled: %v", err)
	}
}
