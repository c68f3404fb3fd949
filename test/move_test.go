package test

// Live moves between agents, with the real binaries on the fleet of
// fleet_test.go (three agents on hosts of their own, a broker in the root
// namespace, an app host): while writers on the app host INCR many
// counters and XADD to a stream, counting what Redis acknowledged.
//
//   - TestMoveUnderWrites: ~100 MiB moved by a plan change; every
//     acknowledged write is on the target, the old credentials work
//     through the forwarder and, fetched again from the broker, directly
//     at the new host and port.
//   - TestMoveAgentCrash: the source or the target agent, from the
//     fault-injection build, dies at each of agent.MoveFaultPoints and is
//     started again (the normal build); the broker's settle of left moves
//     (bounds shortened: --stale-move, --stale-cutover) finishes the rest.
//   - TestMoveBrokerKilled: the broker SIGKILLed after the 202, during the
//     sync and right after the cutover, and a broker that stopped right
//     after the cutover or the promotion (its steps driven through
//     client/); a new broker's settle finishes.
//   - TestMoveNetworkCut: the target's host cut off during the initial
//     sync and at the cutover, and the source's at the cutover.
//
// Each ends "converged": exactly one copy of the instance is a serving
// primary (running, no move, not a replica, role master) and the others
// are forwarders at most; it holds every acknowledged write; the broker's
// GET and binding point at it, and the binding's unchanged username and
// password work there and at the old address.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The app host's writers.

// moveWriterArgs is the input of the app host's move writers: Writers
// goroutines, one connection each, writer w INCRs c:<w>:0 .. c:<w>:<Keys-1>
// in turn, and every XAddEvery-th command is an XADD to stream s; each
// pauses Every after a command. A failed command is not retried.
type moveWriterArgs struct {
	Addr, User, Pass string
	Writers, Keys    int
	XAddEvery        int
	Every            time.Duration
}

// moveWriterReport is what the writers print when their standard input
// closes.
type moveWriterReport struct {
	// Acked counts the INCRs Redis acknowledged, by key; Failed those that
	// failed (an error or a timeout: applied or not).
	Acked  map[string]int64 `json:"acked"`
	Failed map[string]int64 `json:"failed"`
	// XAdds and XAddsFailed are the same for the XADDs to s.
	XAdds       int64 `json:"xadds"`
	XAddsFailed int64 `json:"xadds_failed"`
	// Errors counts every failed command; Samples holds the first
	// distinct messages.
	Errors  int64    `json:"errors"`
	Samples []string `json:"samples"`
	// MaxGap is, per writer, the longest time between two of its
	// acknowledgements, and MaxGapEnd when it ended (Unix ms).
	MaxGap    []time.Duration `json:"max_gap"`
	MaxGapEnd []int64         `json:"max_gap_end"`
	// FirstErr and LastErr are when the first and the last command failed
	// (Unix ms; 0 for none).
	FirstErr int64 `json:"first_err"`
	LastErr  int64 `json:"last_err"`
}

func (r moveWriterReport) acked() int64 {
	n := r.XAdds
	for _, v := range r.Acked {
		n += v
	}
	return n
}

// moveAppWriters runs the writers of arg (a moveWriterArgs) until standard
// input closes, printing "acks <n>" every 50 ms and, at the end,
// "report <moveWriterReport as JSON>".
func moveAppWriters(arg string) int {
	var wa moveWriterArgs
	if err := json.Unmarshal([]byte(arg), &wa); err != nil || wa.Writers < 1 || wa.Keys < 1 {
		fmt.Fprintln(os.Stderr, "movewriters:", arg, err)
		return 2
	}
	stop := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	var acks atomic.Int64
	rep := moveWriterReport{Acked: map[string]int64{}, Failed: map[string]int64{},
		MaxGap: make([]time.Duration, wa.Writers), MaxGapEnd: make([]int64, wa.Writers)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	ctx := context.Background()
	for w := range wa.Writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := appClient(wa.Addr, wa.User, wa.Pass, 2*time.Second)
			defer c.Close()
			last := time.Now()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var err error
				key := ""
				if wa.XAddEvery > 0 && i%wa.XAddEvery == wa.XAddEvery-1 {
					err = c.XAdd(ctx, &goredis.XAddArgs{Stream: "s", Values: []string{"w", strconv.Itoa(w), "i", strconv.Itoa(i)}}).Err()
				} else {
					key = "c:" + strconv.Itoa(w) + ":" + strconv.Itoa(i%wa.Keys)
					err = c.Incr(ctx, key).Err()
				}
				now := time.Now()
				mu.Lock()
				switch {
				case err != nil:
					rep.Errors++
					if key != "" {
						rep.Failed[key]++
					} else {
						rep.XAddsFailed++
					}
					if rep.FirstErr == 0 {
						rep.FirstErr = now.UnixMilli()
					}
					rep.LastErr = now.UnixMilli()
					msg := err.Error()
					if len(rep.Samples) < 8 && !slices.Contains(rep.Samples, msg) {
						rep.Samples = append(rep.Samples, msg)
					}
				case key != "":
					rep.Acked[key]++
				default:
					rep.XAdds++
				}
				if err == nil {
					if gap := now.Sub(last); gap > rep.MaxGap[w] {
						rep.MaxGap[w], rep.MaxGapEnd[w] = gap, now.UnixMilli()
					}
					last = now
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond) // a refused connection fails at once
				} else {
					acks.Add(1)
				}
				time.Sleep(wa.Every)
			}
		}()
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for running := true; running; {
		select {
		case <-stop:
			running = false
		case <-t.C:
			fmt.Fprintf(os.Stdout, "acks %d\n", acks.Load())
		}
	}
	wg.Wait()
	b, _ := json.Marshal(rep)
	fmt.Fprintf(os.Stdout, "report %s\n", b)
	return 0
}

// moveWriters is the app host's writers, seen from the test.
type moveWriters struct {
	app     *appProc
	started time.Time
	acks    atomic.Int64
	stderr  lockedBuffer
	report  []byte // guarded by exited
}

// startMoveWriters runs writers on the app host against c.
func (f *fleet) startMoveWriters(t *testing.T, c apitype.Credentials, writers, keys int, every time.Duration) *moveWriters {
	t.Helper()
	arg, _ := json.Marshal(moveWriterArgs{Addr: net.JoinHostPort(c.Host, strconv.Itoa(c.Port)), User: c.Username, Pass: c.Password,
		Writers: writers, Keys: keys, XAddEvery: 5, Every: every})
	w := &moveWriters{started: time.Now()}
	w.app = f.startApp(t, "movewriters", arg, &w.stderr, func(line string) {
		kind, rest, _ := strings.Cut(line, " ")
		switch kind {
		case "acks":
			n, _ := strconv.ParseInt(rest, 10, 64)
			w.acks.Store(n)
		case "report":
			w.report = []byte(rest)
		}
	})
	t.Cleanup(func() { w.app.stop(10 * time.Second) })
	return w
}

// waitAcks waits until the writers have n more acknowledgements than now.
func (w *moveWriters) waitAcks(t *testing.T, n int64, timeout time.Duration) {
	t.Helper()
	from := w.acks.Load()
	testenv.Eventually(t, fmt.Sprintf("%d more acknowledged writes (%d so far)", n, from), timeout, func() bool {
		time.Sleep(20 * time.Millisecond)
		return w.acks.Load() >= from+n
	})
}

// stop ends the writers and returns their report.
func (w *moveWriters) stop(t *testing.T) moveWriterReport {
	t.Helper()
	w.app.stdin.Close()
	select {
	case <-w.app.exited:
	case <-time.After(20 * time.Second):
		w.app.stop(0)
		t.Fatalf("the writers did not end 20s after their input closed; stderr %s", w.stderr.String())
	}
	var rep moveWriterReport
	if err := json.Unmarshal(w.report, &rep); err != nil {
		t.Fatalf("the writers' report %q: %v (exit %v, stderr %s)", w.report, err, w.app.cmd.ProcessState, w.stderr.String())
	}
	return rep
}

// logWriters says what the writers saw.
func logWriters(t *testing.T, rep moveWriterReport) {
	t.Helper()
	gaps := slices.Clone(rep.MaxGap)
	slices.Sort(gaps)
	worst := time.Duration(0)
	if len(gaps) > 0 {
		worst = gaps[len(gaps)-1]
	}
	t.Logf("writers: %d writes acknowledged (%d INCR, %d XADD), %d failed (connection errors and the like); longest time one writer went without an acknowledgement: %v (median writer %v); first errors: %q",
		rep.acked(), rep.acked()-rep.XAdds, rep.XAdds, rep.Errors, worst.Round(time.Millisecond), gaps[len(gaps)/2].Round(time.Millisecond), rep.Samples)
}

// checkWrites reads every counter and the stream's length through c from
// the app host and compares them with what the writers had acknowledged;
// it returns how many acknowledged writes are missing.
func (f *fleet) checkWrites(t *testing.T, c apitype.Credentials, rep moveWriterReport) (lost int64) {
	t.Helper()
	var keys []string
	for k := range rep.Acked {
		keys = append(keys, k)
	}
	for k := range rep.Failed {
		if _, ok := rep.Acked[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	cmds := [][]string{rcmd("XLEN", "s")}
	for _, k := range keys {
		cmds = append(cmds, rcmd("GET", k))
	}
	rs := f.redisOne(t, c, cmds...)
	num := func(r appReply) int64 {
		switch v := r.Val.(type) {
		case string:
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		case float64:
			return int64(v)
		}
		return 0
	}
	check := func(what string, r appReply, acked, failed int64) {
		if r.Err != "" {
			t.Errorf("%s through %s:%d: %s", what, c.Host, c.Port, r.Err)
			lost += acked
			return
		}
		got := num(r)
		if got < acked {
			t.Errorf("%s = %d; %d were acknowledged: %d lost", what, got, acked, acked-got)
			lost += acked - got
		}
		if got > acked+failed {
			t.Errorf("%s = %d; only %d were sent (%d acknowledged)", what, got, acked+failed, acked)
		}
	}
	check("XLEN s", rs[0], rep.XAdds, rep.XAddsFailed)
	for i, k := range keys {
		check(k, rs[i+1], rep.Acked[k], rep.Failed[k])
	}
	return lost
}

// The fleet, for moves.

// fastSettle makes a broker settle left moves after 3 s (2 s once cut
// over) instead of 35 minutes and one, looking at the fleet every 500 ms.
var fastSettle = []string{"--refresh", "500ms", "--stale-move", "3s", "--stale-cutover", "2s"}

// restartAgent ends agent a (with sig, unless it has exited) and runs bin
// (the normal build when "") as a in its place, with env added to the
// environment: same host, data directory, ports and token. It returns once
// the new agent is ready; the fleet's cleanup ends it.
func (f *fleet) restartAgent(t *testing.T, a *fleetAgent, sig syscall.Signal, bin string, env ...string) {
	t.Helper()
	stopProc(a.cmd, a.exited, sig)
	if bin == "" {
		bin = agentBin
	}
	token, err := os.ReadFile(a.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := a.command(bin, append([]string{"REDIS_AGENT_TOKEN=" + strings.TrimSpace(string(token))}, env...)...)
	fmt.Fprintf(a.log, "--- test: agent %s started again from %s %v\n", a.name, filepath.Base(bin), env)
	cmd.Stdout, cmd.Stderr = a.log, a.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	a.cmd, a.exited = cmd, exited
	a.waitReady(t)
}

// placeOn provisions id with plan on agent a, through a broker that knows
// only a, binds "app" and returns the binding's credentials.
func (f *fleet) placeOn(t *testing.T, a *fleetAgent, id, plan string) apitype.Credentials {
	t.Helper()
	pb := f.startBroker(t, "placer", "", []*fleetAgent{a})
	pb.mustProvision(t, id, plan, "")
	c := pb.mustBind(t, id, "app", plan)
	stopProc(pb.cmd, pb.exited, syscall.SIGTERM)
	return c
}

// fill writes n keys of 1 KiB through c, from the test, pipelined.
func fill(t *testing.T, c apitype.Credentials, n int) time.Duration {
	t.Helper()
	t0 := time.Now()
	if n > 0 {
		fillKeys(t, redisClient(t, c), n, 1024)
	}
	return time.Since(t0)
}

// moveCopy is one agent's copy of an instance and its live replication
// role ("" when not asked or not answered).
type moveCopy struct {
	agent *fleetAgent
	in    apitype.Instance
	role  string
}

func (c moveCopy) String() string {
	s := fmt.Sprintf("%s:%d %s", c.agent.name, c.in.Port, c.in.State)
	if c.in.Move != nil {
		s += " move=" + c.in.Move.State
	}
	if c.in.ReplicaOf != "" {
		s += " replica_of=" + c.in.ReplicaOf
	}
	if c.role != "" {
		s += " role=" + c.role
	}
	return s
}

// serving reports whether c is a serving primary.
func (c moveCopy) serving() bool {
	return c.in.State == apitype.StateRunning && c.in.Move == nil && c.in.ReplicaOf == "" && c.role == "master"
}

// moveCopies asks every agent for its copy of id; missing names the
// agents that did not answer.
func (f *fleet) moveCopies(id string) (cs []moveCopy, missing []string) {
	for _, a := range f.agents {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		in, err := a.c.Get(ctx, id)
		if err == nil && in.State == apitype.StateRunning {
			if r, rerr := a.c.Replication(ctx, id); rerr == nil {
				cs = append(cs, moveCopy{a, in, r.Role})
				cancel()
				continue
			}
		}
		cancel()
		switch {
		case err == nil:
			cs = append(cs, moveCopy{a, in, ""})
		case client.IsStatus(err, http.StatusNotFound):
		default:
			missing = append(missing, a.name)
		}
	}
	return cs, missing
}

// converged returns id's serving primary when it is the only one and
// every other copy is a forwarder.
func converged(cs []moveCopy, missing []string) (moveCopy, bool) {
	var p []moveCopy
	for _, c := range cs {
		switch {
		case c.serving():
			p = append(p, c)
		case c.in.State == apitype.StateForwarding:
		default:
			return moveCopy{}, false
		}
	}
	if len(missing) > 0 || len(p) != 1 {
		return moveCopy{}, false
	}
	return p[0], true
}

// waitOnePrimary waits until id has converged, and stays so for a second
// (the broker's settle has looked again), and returns its primary.
func (f *fleet) waitOnePrimary(t *testing.T, id string, timeout time.Duration) moveCopy {
	t.Helper()
	t0 := time.Now()
	var last string
	var p moveCopy
	var since time.Time
	for {
		cs, missing := f.moveCopies(id)
		last = fmt.Sprintf("%v (no answer from %v)", cs, missing)
		if c, ok := converged(cs, missing); ok && (since.IsZero() || c.agent == p.agent) {
			if since.IsZero() {
				p, since = c, time.Now()
			}
			if time.Since(since) > time.Second {
				return p
			}
		} else {
			since = time.Time{}
		}
		if time.Since(t0) > timeout {
			t.Fatalf("%s has not converged to one serving primary in %v; its copies: %s", id, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkConverged checks, once id has converged on p, the broker's view
// and the binding: GET names p's agent and the plan (newPlan when the
// instance left src, else oldPlan), the binding points at p with old's
// username and password, and they work there and at old's address. It
// returns the binding as the broker gives it now.
func (f *fleet) checkConverged(t *testing.T, b *fleetBroker, id string, p moveCopy, src *fleetAgent, old apitype.Credentials, oldPlan, newPlan string) apitype.Credentials {
	t.Helper()
	plan := oldPlan
	if p.agent != src {
		plan = newPlan
	}
	var g osbAnswer
	testenv.Eventually(t, "the broker's GET of "+id, 10*time.Second, func() bool {
		g = b.osb(t, "GET", "/v2/service_instances/"+id, "")
		if g.code != 200 {
			time.Sleep(100 * time.Millisecond)
		}
		return g.code == 200
	})
	if placedOn(g) != p.agent.name || g.body["plan_id"] != plan {
		t.Errorf("GET %s through the broker = %v; want plan %s on %s", id, g, plan, p.agent.name)
	}
	now := b.binding(t, id, "app")
	if now.Username != old.Username || now.Password != old.Password {
		t.Errorf("the binding is %s with another password; want %s's unchanged", now.Username, old.Username)
	}
	if now.Host != p.agent.host.Addr || now.Port != p.in.Port {
		t.Errorf("the binding points at %s:%d; want %s:%d (%s)", now.Host, now.Port, p.agent.host.Addr, p.in.Port, p.agent.name)
	}
	probe := "probe:" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if rs := f.redisOne(t, old, rcmd("SET", probe, "old address")); rs[0].Err != "" {
		t.Errorf("a write at the old address %s:%d: %s", old.Host, old.Port, rs[0].Err)
	}
	if rs := f.redisOne(t, now, rcmd("GET", probe)); rs[0].Err != "" || rs[0].Val != "old address" {
		t.Errorf("at the binding's %s:%d, the write made at the old address: %+v", now.Host, now.Port, rs[0])
	}
	return now
}

// moveOp starts a move of id to plan through b (a plan change with no
// room on its agent) and returns the operation.
func moveOp(t *testing.T, b *fleetBroker, id, plan string) string {
	t.Helper()
	u := b.osb(t, "PATCH", "/v2/service_instances/"+id+"?accepts_incomplete=true", `{"service_id":"svc","plan_id":"`+plan+`"}`)
	op, _ := u.body["operation"].(string)
	if u.code != 202 || op == "" {
		t.Fatalf("update of %s to %s = %v; want 202 with an operation (a move)", id, plan, u)
	}
	return op
}

// movedByReplication is what a broker logged of its replication moves:
// the sync and the cutover.
func movedByReplication(b *fleetBroker) (sync, cutover time.Duration, ok bool) {
	for _, line := range strings.Split(b.log.String(), "\n") {
		if !strings.Contains(line, `"msg":"moved by replication"`) {
			continue
		}
		var l struct{ Sync, Cutover time.Duration }
		if json.Unmarshal([]byte(line), &l) == nil {
			sync, cutover, ok = l.Sync, l.Cutover, true
		}
	}
	return sync, cutover, ok
}

// waitMoveEnded waits until broker b's own run of a move of id for a
// plan change is over: moved, failed, or stopped midway (left to the
// settle of left moves).
func waitMoveEnded(t *testing.T, b *fleetBroker, id string, timeout time.Duration) {
	t.Helper()
	testenv.Eventually(t, "the broker's move of "+id+" to end", timeout, func() bool {
		for _, line := range strings.Split(b.log.String(), "\n") {
			var l struct{ Msg, Instance string }
			if json.Unmarshal([]byte(line), &l) == nil && l.Instance == id && strings.Contains(l.Msg, "for a plan change") {
				return true
			}
		}
		time.Sleep(20 * time.Millisecond)
		return false
	})
}

// settleLog is what broker b logged of settling left moves.
func settleLog(b *fleetBroker) []string {
	var out []string
	for _, line := range strings.Split(b.log.String(), "\n") {
		var l struct{ Msg, Err string }
		if json.Unmarshal([]byte(line), &l) == nil && strings.Contains(l.Msg, " left") {
			if l.Err != "" {
				l.Msg += ": " + l.Err
			}
			if len(out) == 0 || out[len(out)-1] != l.Msg {
				out = append(out, l.Msg)
			}
		}
	}
	return out
}

// waitState polls id's copy on a until cond holds, at most timeout.
func waitState(a *fleetAgent, id string, timeout time.Duration, cond func(apitype.Instance, *apitype.Replication) bool) (apitype.Instance, bool) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		in, err := a.c.Get(ctx, id)
		var r *apitype.Replication
		if err == nil && in.State == apitype.StateRunning {
			if rr, err := a.c.Replication(ctx, id); err == nil {
				r = &rr
			}
		}
		cancel()
		if err == nil && cond(in, r) {
			return in, true
		}
		time.Sleep(2 * time.Millisecond)
	}
	return apitype.Instance{}, false
}

// The tests.

// moveCatalog is the fleet's catalog and a 512 MiB plan.
const moveCatalog = fleetCatalog + "      - {id: p512, name: large, description: l, memory_mb: 512, persistence: aof}\n"

// 1. About 100 MiB (100k keys of 1 KiB, and the writers') moved by a plan
// change from a full agent while the app host writes: every acknowledged
// write is on the target, the old credentials work through the forwarder
// and the binding fetched again works at the new place.
func TestMoveUnderWrites(t *testing.T) {
	f := newFleet(t)
	catalog := filepath.Join(f.dir, "move-catalog.yaml")
	if err := os.WriteFile(catalog, []byte(moveCatalog), 0o600); err != nil {
		t.Fatal(err)
	}
	const keys = 100 << 10
	// a1 holds big (256 MiB) and fillers of 512 and 256 MiB: its 1024 MiB
	// are all taken, so 512 MiB for big has to move; a0 (160 MiB) is too
	// small, so it goes to a2.
	src, dst := f.agent("a1"), f.agent("a2")
	pb := f.startBroker(t, "placer", "", []*fleetAgent{src}, "--catalog", catalog)
	pb.mustProvision(t, "fill-512", "p512", "")
	pb.mustProvision(t, "fill-256", "p256", "")
	pb.mustProvision(t, "big", "p256", "")
	creds := pb.mustBind(t, "big", "app", "p256")
	stopProc(pb.cmd, pb.exited, syscall.SIGTERM)
	took := fill(t, creds, keys)
	t.Logf("filled big on %s with %d keys of 1 KiB in %v", src.name, keys, took.Round(time.Millisecond))

	b := f.startBroker(t, "b", "", nil, "--catalog", catalog)
	w := f.startMoveWriters(t, creds, 8, 32, 2*time.Millisecond)
	w.waitAcks(t, 500, 30*time.Second)
	usedMB := 0.0
	if info, err := redisClient(t, creds).InfoMap(context.Background(), "memory").Result(); err == nil {
		n, _ := strconv.ParseFloat(info["Memory"]["used_memory"], 64)
		usedMB = n / (1 << 20)
	}
	t0 := time.Now()
	op := moveOp(t, b, "big", "p512")
	if lo := b.waitOperation(t, "big", op, 3*time.Minute); lo.body["state"] != "succeeded" {
		t.Fatalf("the move ended %v", lo)
	}
	moveTook := time.Since(t0)
	// The writers go on through the forwarder for a while.
	w.waitAcks(t, 500, 30*time.Second)
	rep := w.stop(t)

	p := f.waitOnePrimary(t, "big", 10*time.Second)
	if p.agent != dst {
		t.Fatalf("big is on %s after the move; want %s", p.agent.name, dst.name)
	}
	if p.in.MemoryMB != 512 {
		t.Errorf("big on %s has %d MiB; want 512", dst.name, p.in.MemoryMB)
	}
	logWriters(t, rep)
	// The binding fetched again: the new host and port, the same user.
	now := f.checkConverged(t, b, "big", p, src, creds, "p256", "p512")
	lost := f.checkWrites(t, now, rep)
	direct := redisClient(t, now)
	if n, err := direct.DBSize(context.Background()).Result(); err != nil || n < int64(keys) {
		t.Errorf("DBSIZE on %s = %d %v; want at least the %d filled keys", dst.name, n, err, keys)
	}
	for _, i := range []int{0, 1, keys / 3, keys / 2, keys - 1} {
		if v, err := direct.Get(context.Background(), "k"+strconv.Itoa(i)).Result(); err != nil || v != value(i, 1024) {
			t.Errorf("k%d on %s = %.20q %v; want the filled value", i, dst.name, v, err)
		}
	}
	// The old address still forwards (checkConverged wrote through it).
	old := f.redisOne(t, creds, rcmd("GET", "k1"))
	if old[0].Err != "" || old[0].Val != value(1, 1024) {
		t.Errorf("GET k1 at the old address %s:%d: %.40v %s", creds.Host, creds.Port, old[0].Val, old[0].Err)
	}
	syncTook, cutover, _ := movedByReplication(b)
	t.Logf("moved big (%d keys of 1 KiB, used_memory %.1f MiB) %s -> %s in %v (the 202 to last_operation succeeded): sync %v, cutover (no writes taken) %v as the broker measured it; %d acknowledged writes lost",
		keys, usedMB, src.name, dst.name, moveTook.Round(time.Millisecond), syncTook, cutover, lost)
}

// 2. An agent killed at each recorded step of a move, then started again:
// the move is undone or finished, at once or by the broker's settle.
func TestMoveAgentCrash(t *testing.T) {
	f := newFleet(t)
	bin := faultAgent(t)
	src := f.agent("a0")
	for _, point := range agent.MoveFaultPoints {
		t.Run(point, func(t *testing.T) {
			f.reset(t)
			id := "crash-" + strings.ReplaceAll(point, ".", "-")
			creds := f.placeOn(t, src, id, "p32")
			fill(t, creds, 2000)
			dst := f.agent(f.spreadPick(f.capacities(t), 256, src.name))
			victim := src
			if point == agent.FaultPromoteRecorded {
				victim = dst
			}
			f.restartAgent(t, victim, syscall.SIGTERM, bin, "REDIS_AGENT_CRASH_AT="+point)
			b := f.startBroker(t, "b", "", nil, fastSettle...)
			w := f.startMoveWriters(t, creds, 4, 16, 2*time.Millisecond)
			w.waitAcks(t, 200, 30*time.Second)

			t0 := time.Now()
			op := moveOp(t, b, id, "p256")
			select {
			case <-victim.exited:
			case <-time.After(time.Minute):
				t.Fatalf("%s did not crash at %s within a minute of the move's start", victim.name, point)
			}
			if ws, ok := victim.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("%s ended with %v; want SIGKILL at %s", victim.name, victim.cmd.ProcessState, point)
			}
			crashed := time.Since(t0)
			// The broker's own run of the move ends; a move it left to
			// the settle of left moves is still in progress.
			waitMoveEnded(t, b, id, time.Minute)
			lo := b.osb(t, "GET", "/v2/service_instances/"+id+"/last_operation?operation="+op, "")
			cs, _ := f.moveCopies(id)
			t.Logf("%s died at %s %v into the move; the broker's operation: %v; the copies: %v", victim.name, point, crashed.Round(time.Millisecond), lo, cs)
			// Down for longer than the settle's bounds: a settle that
			// guesses while an agent is away has its chance to.
			time.Sleep(4 * time.Second)
			f.restartAgent(t, victim, syscall.SIGKILL, "")
			p := f.waitOnePrimary(t, id, time.Minute)
			converged := time.Since(t0)
			w.waitAcks(t, 200, 30*time.Second)
			rep := w.stop(t)
			logWriters(t, rep)
			outcome := "undone: the source serves"
			if p.agent != src {
				outcome = "finished: the target serves"
			}
			now := f.checkConverged(t, b, id, p, src, creds, "p32", "p256")
			lost := f.checkWrites(t, now, rep)
			// The operation says how the move ended, settled or not.
			end := b.waitOperation(t, id, op, 30*time.Second)
			if want := map[bool]string{true: "succeeded", false: "failed"}[p.agent != src]; end.body["state"] != want {
				t.Errorf("last_operation once converged (%s) = %v; want %s", outcome, end, want)
			}
			t.Logf("%s: converged %v after the move began, %s (%s); %d acknowledged writes lost; last_operation %v; the broker's settle: %q", point, converged.Round(time.Millisecond), outcome, p, lost, end, settleLog(b))
			if point == agent.FaultMoveForwardRecorded && p.agent == src {
				t.Errorf("after a crash at %s (the target promoted) the source serves again", point)
			}
		})
	}
}

// 3. The broker killed in the middle of a move (after the 202, during the
// sync, right after the cutover), and a broker that stopped right after
// the cutover or the promotion (the steps driven through client/, as the
// broker does them): a new broker's settle converges.
func TestMoveBrokerKilled(t *testing.T) {
	f := newFleet(t)
	src := f.agent("a0")
	cases := []struct {
		name string
		keys int
		plan string
		// at waits for the moment of the kill on src and dst.
		at func(t *testing.T, id string, src, dst *fleetAgent) string
		// drive, instead of a broker, runs the steps up to where it stops.
		drive func(t *testing.T, id string, src, dst *fleetAgent) string
	}{
		{name: "AfterAccepted", plan: "p32", at: func(*testing.T, string, *fleetAgent, *fleetAgent) string { return "right after the 202" }},
		{name: "DuringSync", keys: 30 << 10, plan: "p64", at: func(t *testing.T, id string, src, dst *fleetAgent) string {
			_, ok := waitState(dst, id, 30*time.Second, func(in apitype.Instance, r *apitype.Replication) bool {
				return in.ReplicaOf != "" && r != nil && (r.SyncInProgress || !r.LinkUp)
			})
			if !ok {
				return "not seen syncing"
			}
			return "the target syncing"
		}},
		{name: "AfterCutover", plan: "p32", at: func(t *testing.T, id string, src, dst *fleetAgent) string {
			if _, ok := waitState(src, id, 30*time.Second, func(in apitype.Instance, _ *apitype.Replication) bool {
				return in.Move != nil && in.Move.State != "replicating"
			}); !ok {
				return "not seen cut over"
			}
			return "the source cut over"
		}},
		{name: "StoppedAfterCutover", plan: "p32", drive: func(t *testing.T, id string, src, dst *fleetAgent) string {
			driveMove(t, id, src, dst, false)
			return "the cutover answered"
		}},
		{name: "StoppedAfterPromote", plan: "p32", drive: func(t *testing.T, id string, src, dst *fleetAgent) string {
			driveMove(t, id, src, dst, true)
			return "the promotion answered"
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.reset(t)
			id := "bk-" + strings.ToLower(tc.name)
			creds := f.placeOn(t, src, id, tc.plan)
			fill(t, creds, tc.keys)
			dst := f.agent(f.spreadPick(f.capacities(t), 256, src.name))
			w := f.startMoveWriters(t, creds, 4, 16, 2*time.Millisecond)
			w.waitAcks(t, 200, 30*time.Second)
			t0 := time.Now()
			var when, op string
			listen := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
			if tc.drive != nil {
				when = tc.drive(t, id, src, dst)
			} else {
				first := f.startBroker(t, "first", listen, nil)
				op = moveOp(t, first, id, "p256")
				when = tc.at(t, id, src, dst)
				first.cmd.Process.Kill()
				<-first.exited
			}
			killed := time.Since(t0)
			cs, _ := f.moveCopies(id)
			t.Logf("broker gone at %s, %v into the move; the copies: %v", when, killed.Round(time.Millisecond), cs)

			second := f.startBroker(t, "second", listen, nil, fastSettle...)
			p := f.waitOnePrimary(t, id, time.Minute)
			converged := time.Since(t0)
			w.waitAcks(t, 200, 30*time.Second)
			rep := w.stop(t)
			logWriters(t, rep)
			now := f.checkConverged(t, second, id, p, src, creds, tc.plan, "p256")
			lost := f.checkWrites(t, now, rep)
			if op != "" {
				lo := second.osb(t, "GET", "/v2/service_instances/"+id+"/last_operation?operation="+op, "")
				want := map[bool]string{true: "succeeded", false: "failed"}[p.agent != src]
				if lo.code != 200 || lo.body["state"] != want {
					t.Errorf("last_operation of the killed broker's move through the new one = %v; want %s", lo, want)
				}
			}
			outcome := "undone: the source serves"
			if p.agent != src {
				outcome = "finished: the target serves"
			}
			t.Logf("%s: converged %v after the move began, %s (%s); %d acknowledged writes lost; the new broker's settle: %q", tc.name, converged.Round(time.Millisecond), outcome, p, lost, settleLog(second))
			if tc.name == "StoppedAfterPromote" && p.agent == src {
				t.Errorf("a move left after the promotion was undone; want it finished")
			}
		})
	}
}

// driveMove runs a replication move's steps from src to dst as the broker
// does (broker/move.go's replicate), through client/, up to the cutover,
// or the promotion when promote.
func driveMove(t *testing.T, id string, src, dst *fleetAgent, promote bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cur, err := src.c.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	primary, err := src.c.StartMove(ctx, id)
	if err != nil {
		t.Fatalf("start the move: %v", err)
	}
	var md map[string]any
	if err := json.Unmarshal(cur.Metadata, &md); err != nil {
		t.Fatal(err)
	}
	md["plan_id"] = "p256"
	raw, _ := json.Marshal(md)
	if _, _, err := dst.c.Provision(ctx, id, apitype.Spec{MemoryMB: 256, Persistence: cur.Persistence, Metadata: raw, ReplicaOf: &primary}); err != nil {
		t.Fatalf("the replica: %v", err)
	}
	for _, bid := range cur.Bindings {
		c, err := src.c.Binding(ctx, id, bid)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := dst.c.Bind(ctx, id, bid, c.Password); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := waitState(dst, id, 30*time.Second, func(in apitype.Instance, r *apitype.Replication) bool {
		return r != nil && r.LinkUp && !r.SyncInProgress && r.Persisted
	}); !ok {
		t.Fatal("the replica did not sync in 30s")
	}
	off, err := src.c.Cutover(ctx, id, 2*time.Second)
	if err != nil {
		t.Fatalf("cut over: %v", err)
	}
	if promote {
		if err := dst.c.Promote(ctx, id, off, 1500*time.Millisecond); err != nil {
			t.Fatalf("promote: %v", err)
		}
	}
}

// 4. The network between source and target cut: the target's host during
// the initial sync and at the cutover, the source's at the cutover, each
// for 5 s. The source serves during a cut of the target while it syncs,
// nothing acknowledged is lost, and the move finishes or is undone.
func TestMoveNetworkCut(t *testing.T) {
	f := newFleet(t)
	src := f.agent("a0")
	// The broker in its wait for the sync: the replica has the binding,
	// and has not synced or not written its data to disk yet.
	syncing := func(t *testing.T, id string, src, dst *fleetAgent) bool {
		_, ok := waitState(dst, id, 30*time.Second, func(in apitype.Instance, r *apitype.Replication) bool {
			return in.ReplicaOf != "" && slices.Contains(in.Bindings, "app") && r != nil && (r.SyncInProgress || !r.LinkUp || !r.Persisted)
		})
		return ok
	}
	cutOver := func(t *testing.T, id string, src, dst *fleetAgent) bool {
		_, ok := waitState(src, id, 30*time.Second, func(in apitype.Instance, _ *apitype.Replication) bool {
			return in.Move != nil && in.Move.State != "replicating"
		})
		return ok
	}
	cases := []struct {
		name      string
		keys      int
		plan      string
		at        func(t *testing.T, id string, src, dst *fleetAgent) bool
		cutSource bool
	}{
		{"TargetCutDuringSync", 30 << 10, "p64", syncing, false},
		{"TargetCutAtCutover", 0, "p32", cutOver, false},
		{"SourceCutAtCutover", 0, "p32", cutOver, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.reset(t)
			id := "net-" + strings.ToLower(tc.name)
			creds := f.placeOn(t, src, id, tc.plan)
			fill(t, creds, tc.keys)
			dst := f.agent(f.spreadPick(f.capacities(t), 256, src.name))
			b := f.startBroker(t, "b", "", nil, fastSettle...)
			w := f.startMoveWriters(t, creds, 4, 16, 2*time.Millisecond)
			w.waitAcks(t, 200, 30*time.Second)
			t0 := time.Now()
			op := moveOp(t, b, id, "p256")
			seen := tc.at(t, id, src, dst)
			cut := dst
			if tc.cutSource {
				cut = src
			}
			cut.host.Cut(t)
			restored := false
			t.Cleanup(func() {
				if !restored {
					cut.host.Restore(t)
				}
			})
			cutAt := time.Since(t0)
			acksAtCut := w.acks.Load()
			time.Sleep(5 * time.Second)
			acksDuring := w.acks.Load() - acksAtCut
			cut.host.Restore(t)
			restored = true
			t.Logf("%s (%s) cut off %v into the move (the moment seen: %v) for 5s; the writers had %d acknowledgements meanwhile",
				cut.name, cut.host.Addr, cutAt.Round(time.Millisecond), seen, acksDuring)
			lo := b.waitOperation(t, id, op, 2*time.Minute)
			p := f.waitOnePrimary(t, id, time.Minute)
			converged := time.Since(t0)
			w.waitAcks(t, 200, 30*time.Second)
			rep := w.stop(t)
			logWriters(t, rep)
			now := f.checkConverged(t, b, id, p, src, creds, tc.plan, "p256")
			lost := f.checkWrites(t, now, rep)
			outcome := "undone: the source serves"
			if p.agent != src {
				outcome = "finished: the target serves"
			}
			t.Logf("%s: the operation ended %v; converged %v after the move began, %s (%s); %d acknowledged writes lost; the broker's settle: %q",
				tc.name, lo, converged.Round(time.Millisecond), outcome, p, lost, settleLog(b))
			if tc.name == "TargetCutDuringSync" && seen && acksDuring == 0 {
				t.Errorf("the source took no write while the target was cut off during the sync")
			}
		})
	}
}
