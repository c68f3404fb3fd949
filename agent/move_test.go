package agent

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/state"
)

// move runs a replication move's steps as a broker does, from src to dst.
func moveSteps(t *testing.T, src, dst *Service, id string) {
	t.Helper()
	ctx := context.Background()
	p, err := src.StartMove(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	in := mustGet(t, src, id)
	spec := Spec{MemoryMB: in.MemoryMB, Persistence: in.Persistence, ReplicaOf: &p,
		MaxmemoryPolicy: in.MaxmemoryPolicy, MaxmemoryClients: in.MaxmemoryClients, TLS: in.TLS}
	if _, _, err := dst.Provision(ctx, id, spec); err != nil {
		t.Fatalf("provision the replica: %v", err)
	}
	for _, bid := range in.Bindings {
		c, _ := src.Binding(ctx, id, bid)
		if _, _, err := dst.Bind(ctx, id, bid, c.Password); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Eventually(t, "the initial sync, on disk", 10*time.Second, func() bool {
		r, err := dst.Replication(ctx, id)
		return err == nil && r.Role == "replica" && r.LinkUp && !r.SyncInProgress && r.Persisted
	})
	off, err := src.Cutover(ctx, id, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.Promote(ctx, id, off, 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	moved := mustGet(t, dst, id)
	if err := src.Forward(ctx, id, moved.Host, moved.Port, time.Hour); err != nil {
		t.Fatal(err)
	}
}

// A move under writers: every acknowledged INCR is on the target, the old
// credentials work through the source's forwarder and directly on the
// target, and the source shows the forwarder.
func TestReplicationMoveKeepsAcknowledgedWrites(t *testing.T) {
	src := startService(t, testConfig(t, 2))
	dst := startService(t, testConfig(t, 2))
	ctx := context.Background()
	if _, _, err := src.Provision(ctx, "mv", Spec{Persistence: apitype.PersistenceAOF}); err != nil {
		t.Fatal(err)
	}
	creds, _, err := src.Bind(ctx, "mv", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	// Writers: INCR on 20 keys, counting what was acknowledged; errors
	// (the cutover closes their connections) are counted and retried.
	var acked [20]atomic.Int64
	var failures atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:" + strconv.Itoa(creds.Port), Username: "app", Password: creds.Password,
				MaxRetries: -1, DisableIdentity: true, Protocol: 2, PoolSize: 1, ReadTimeout: 5 * time.Second})
			defer c.Close()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := (w*5 + i) % 20
				if err := c.Incr(ctx, "k"+strconv.Itoa(k)).Err(); err != nil {
					failures.Add(1)
					time.Sleep(time.Millisecond)
					continue
				}
				acked[k].Add(1)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	moveSteps(t, src, dst, "mv")
	time.Sleep(200 * time.Millisecond) // writes through the forwarder
	close(stop)
	wg.Wait()

	var total int64
	direct := client(t, mustGet(t, dst, "mv").Port, "app", creds.Password)
	for k := range 20 {
		n, err := direct.Get(ctx, "k"+strconv.Itoa(k)).Int64()
		if err != nil {
			t.Fatal(err)
		}
		if n < acked[k].Load() {
			t.Errorf("k%d = %d on the target; %d increments were acknowledged", k, n, acked[k].Load())
		}
		total += acked[k].Load()
	}
	t.Logf("%d acknowledged increments, %d errors during the move", total, failures.Load())
	if total == 0 {
		t.Fatal("no write was acknowledged")
	}
	// The old address forwards to the new place.
	old := client(t, creds.Port, "app", creds.Password)
	if err := old.Set(ctx, "via-forwarder", "1", 0).Err(); err != nil {
		t.Fatalf("a write through the forwarder: %v", err)
	}
	if v, _ := direct.Get(ctx, "via-forwarder").Result(); v != "1" {
		t.Fatal("the forwarder does not lead to the target")
	}
	if got := mustGet(t, src, "mv"); got.State != apitype.StateForwarding || got.Move == nil || got.Move.Forwarded < 1 {
		t.Fatalf("the source after the move: %+v", got)
	}
	if got := mustGet(t, dst, "mv"); got.ReplicaOf != "" || got.State != apitype.StateRunning {
		t.Fatalf("the target after the move: %+v", got)
	}
	// Deleting the source removes the forwarder and frees the port.
	if err := src.Deprovision(ctx, "mv"); err != nil {
		t.Fatal(err)
	}
	if err := old.Ping(ctx).Err(); err == nil {
		t.Fatal("the forwarder outlived the deletion")
	}
}

// A move of an instance that requires TLS, between agents with CAs of
// their own: the replica links to the source's TLS port (its only one),
// verifying it against the source's CA; the target has the instance's
// settings and hands out credentials of its own CA.
func TestReplicationMoveOverTLS(t *testing.T) {
	src := startService(t, testConfig(t, 2))
	dst := startService(t, testConfig(t, 2))
	ctx := context.Background()
	if _, _, err := src.Provision(ctx, "mt", Spec{Persistence: apitype.PersistenceAOF, TLS: "required", MaxmemoryPolicy: "allkeys-lfu", MaxmemoryClients: "5%"}); err != nil {
		t.Fatal(err)
	}
	creds, _, err := src.Bind(ctx, "mt", "app", "")
	if err != nil {
		t.Fatal(err)
	}
	c := tlsClient(t, creds)
	for i := range 100 {
		c.Set(ctx, "k"+strconv.Itoa(i), i, 0)
	}
	p, _ := src.StartMove(ctx, "mt")
	if !p.TLS || p.Port != creds.TLSPort || p.CACert == "" {
		t.Fatalf("StartMove of a TLS instance = %+v; want its TLS port and CA", p)
	}
	srcCA, _ := src.CA(ctx)
	dstCA, _ := dst.CA(ctx)
	if string(srcCA) == string(dstCA) {
		t.Fatal("the two agents share a CA; the test wants two")
	}
	moveSteps(t, src, dst, "mt")
	got := mustGet(t, dst, "mt")
	if got.TLS != "required" || got.MaxmemoryPolicy != "allkeys-lfu" || got.MaxmemoryClients != "5%" || got.ReplicaOf != "" {
		t.Fatalf("the target: %+v", got)
	}
	moved, err := dst.Binding(ctx, "mt", "app")
	if err != nil {
		t.Fatal(err)
	}
	if moved.CACert != string(dstCA) || moved.Password != creds.Password {
		t.Fatal("the target's credentials are not of its own CA, with the binding's password")
	}
	mc := tlsClient(t, moved)
	if n, err := mc.DBSize(ctx).Result(); err != nil || n != 100 {
		t.Fatalf("the target has %d keys, %v; want 100", n, err)
	}
	if err := mc.Set(ctx, "after", "1", 0).Err(); err != nil {
		t.Fatalf("a write on the promoted target: %v", err)
	}
}

// Aborted after the cutover, the source serves as before: its tenants log
// in again and write.
func TestReplicationMoveAbort(t *testing.T) {
	src := startService(t, testConfig(t, 2))
	dst := startService(t, testConfig(t, 2))
	ctx := context.Background()
	src.Provision(ctx, "ab", Spec{Persistence: apitype.PersistenceNone})
	creds, _, _ := src.Bind(ctx, "ab", "app", "")
	p, err := src.StartMove(ctx, "ab")
	if err != nil {
		t.Fatal(err)
	}
	if again, err := src.StartMove(ctx, "ab"); err != nil || again != p {
		t.Fatalf("StartMove again = %+v, %v; want the same", again, err)
	}
	if _, _, err := dst.Provision(ctx, "ab", Spec{Persistence: apitype.PersistenceNone, ReplicaOf: &p}); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Cutover(ctx, "ab", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := client(t, creds.Port, "app", creds.Password).Ping(ctx).Err(); err == nil {
		t.Fatal("a fenced tenant logs in during the cutover")
	}
	if err := src.Forward(ctx, "ab", "127.0.0.1", 1, 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Forward without a ttl = %v, want ErrInvalid", err)
	}
	if err := src.AbortMove(ctx, "ab"); err != nil {
		t.Fatal(err)
	}
	if err := dst.Deprovision(ctx, "ab"); err != nil {
		t.Fatal(err)
	}
	c := client(t, creds.Port, "app", creds.Password)
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("a write after the abort: %v", err)
	}
	if got := mustGet(t, src, "ab"); got.Move != nil || got.State != apitype.StateRunning {
		t.Fatalf("the source after the abort: %+v", got)
	}
	if err := src.AbortMove(ctx, "ab"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a second abort = %v, want ErrNotFound", err)
	}
}

// A source that restarts while it forwards starts its forwarder again, and
// no redis-server on the port.
func TestForwardingSurvivesAgentRestart(t *testing.T) {
	srcCfg := testConfig(t, 2)
	src := startService(t, srcCfg)
	dst := startService(t, testConfig(t, 2))
	ctx := context.Background()
	src.Provision(ctx, "fw", Spec{Persistence: apitype.PersistenceNone})
	creds, _, _ := src.Bind(ctx, "fw", "app", "")
	moveSteps(t, src, dst, "fw")
	shutdown(t, src, false)
	src2 := startService(t, srcCfg)
	if got := mustGet(t, src2, "fw"); got.State != apitype.StateForwarding || got.PID != 0 {
		t.Fatalf("after a restart the source is %+v", got)
	}
	if err := client(t, creds.Port, "app", creds.Password).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("through the forwarder after the source's restart: %v", err)
	}
}

// A source whose agent died between its cutover's record and the fence
// (the crash point move.cutover), and is started again, adopts a
// redis-server whose tenants are still connected: it fences them again,
// the connections they had open included, until the move is aborted.
func TestMoveCutoverFenceAfterAgentRestart(t *testing.T) {
	srcCfg := testConfig(t, 2)
	src := startService(t, srcCfg)
	dst := startService(t, testConfig(t, 2))
	ctx := context.Background()
	if _, _, err := src.Provision(ctx, "cf", Spec{Persistence: apitype.PersistenceNone}); err != nil {
		t.Fatal(err)
	}
	creds, _, _ := src.Bind(ctx, "cf", "app", "")
	open := client(t, creds.Port, "app", creds.Password) // one connection, kept
	if err := open.Set(ctx, "before", "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	p, err := src.StartMove(ctx, "cf")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := dst.Provision(ctx, "cf", Spec{Persistence: apitype.PersistenceNone, ReplicaOf: &p}); err != nil {
		t.Fatal(err)
	}
	// What the crash at move.cutover leaves: the cutover recorded, the
	// server neither paused nor fenced.
	if _, err := src.store.Update("cf", func(r *state.Instance) error {
		r.Move.State, r.Move.CutoverAt = state.MoveCutover, time.Now().UTC()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	shutdown(t, src, false)
	if err := open.Set(ctx, "between", "1", 0).Err(); err != nil {
		t.Fatalf("a write on the open connection with no agent (nothing fenced it yet): %v", err)
	}
	src2 := startService(t, srcCfg)
	if got := mustGet(t, src2, "cf"); got.Move == nil || got.Move.State != state.MoveCutover {
		t.Fatalf("the source after its agent's restart: %+v; want cut over", got)
	}
	testenv.Eventually(t, "the connection open before the restart to be fenced", 10*time.Second, func() bool {
		time.Sleep(10 * time.Millisecond)
		return open.Set(ctx, "after", "1", 0).Err() != nil
	})
	if err := client(t, creds.Port, "app", creds.Password).Ping(ctx).Err(); err == nil {
		t.Fatal("a fenced tenant logs in after the source's restart")
	}
	// The fence stays: no write on the open connection gets through.
	for range 5 {
		if err := open.Set(ctx, "after", "1", 0).Err(); err == nil {
			t.Fatal("a write on the tenant's connection after the fence")
		}
	}
	if err := src2.AbortMove(ctx, "cf"); err != nil {
		t.Fatal(err)
	}
	if err := dst.Deprovision(ctx, "cf"); err != nil {
		t.Fatal(err)
	}
	if err := open.Set(ctx, "aborted", "1", 0).Err(); err != nil {
		t.Fatalf("a write after the abort: %v", err)
	}
}
