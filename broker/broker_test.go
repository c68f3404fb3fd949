package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/api"
	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The broker against real agents: each test agent is the agent's Service
// and API handler, in process, over real redis-servers.

type testAgent struct {
	name string
	cfg  agent.Config
	svc  *agent.Service
	srv  *httptest.Server
	api  atomic.Pointer[http.Handler]
	// cut makes the agent hang up on every request, as one that is cut
	// off the network.
	cut atomic.Bool
	// refuse, when set, makes it hang up on the requests it matches.
	refuse atomic.Pointer[func(*http.Request) bool]
}

func (a *testAgent) serve() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if f := a.refuse.Load(); a.cut.Load() || f != nil && (*f)(r) {
			c, _, _ := w.(http.Hijacker).Hijack()
			c.Close()
			return
		}
		(*a.api.Load()).ServeHTTP(w, r)
	})
}

// start (re)starts the agent's Service on cfg behind its address; a
// running one is closed first (its redis-servers are adopted).
func (a *testAgent) start(t *testing.T, cfg agent.Config) {
	t.Helper()
	if a.svc != nil {
		a.svc.Close()
	}
	svc, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	a.cfg, a.svc = cfg, svc
	h := api.New(api.Options{Service: svc, Ready: svc.Ready})
	a.api.Store(&h)
}

// startAgents starts one agent per memory budget (MiB).
func startAgents(t *testing.T, budgets ...int) []*testAgent {
	t.Helper()
	redisServer := testenv.RedisServer(t)
	var out []*testAgent
	for i, mb := range budgets {
		cfg := agent.DefaultConfig()
		cfg.PortMin = testenv.Ports(t, 10)
		cfg.PortMax = cfg.PortMin + 9
		cfg.DataDir = testenv.TraversableDir(t)
		cfg.RedisServer = redisServer
		cfg.Launcher = testenv.Launcher(t)
		cfg.MemoryBudgetMB = mb
		cfg.Logger = slog.New(slog.DiscardHandler)
		a := &testAgent{name: "agent-" + strconv.Itoa(i)}
		a.start(t, cfg)
		srv := httptest.NewServer(a.serve())
		a.srv = srv
		t.Cleanup(func() {
			srv.Close()
			list, _ := a.svc.List(context.Background())
			for _, in := range list {
				a.svc.Deprovision(context.Background(), in.ID)
			}
			a.svc.Close()
		})
		out = append(out, a)
	}
	return out
}

func agentConfigs(as []*testAgent, zones ...string) []AgentConfig {
	out := make([]AgentConfig, len(as))
	for i, a := range as {
		out[i] = AgentConfig{Name: a.name, URL: a.srv.URL}
		if i < len(zones) {
			out[i].Zone = zones[i]
		}
	}
	return out
}

// testCatalog has a service with plans of 32, 64 and 256 MiB.
const testCatalog = `
services:
  - id: svc
    name: redis
    description: test
    plan_updateable: true
    plans:
      - {id: p32, name: tiny, description: t, memory_mb: 32, persistence: aof, persistence_choice: [none]}
      - {id: p64, name: small, description: s, memory_mb: 64, persistence: aof}
      - {id: p256, name: medium, description: m, memory_mb: 256, persistence: aof}
`

type testBroker struct {
	t   *testing.T
	b   *Broker
	srv *httptest.Server
	hc  *http.Client
}

func startBroker(t *testing.T, agents []AgentConfig, mod func(*Config)) *testBroker {
	t.Helper()
	cat, err := ParseCatalog([]byte(testCatalog))
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Username: "platform", Password: "secret-platform", AdminUsername: "ops", AdminPassword: "secret-ops",
		Agents: agents, Catalog: cat, AgentTimeout: 2 * time.Second, Logger: slog.New(slog.DiscardHandler)}
	if mod != nil {
		mod(&cfg)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	b.Start(context.Background())
	srv := httptest.NewServer(b.Handler())
	t.Cleanup(func() { srv.Close(); b.Close() })
	return &testBroker{t, b, srv, http.DefaultClient}
}

type answer struct {
	code int
	body map[string]any
	hdr  http.Header
	raw  []byte
}

// osb sends an OSB request with the version header and credentials.
func (tb *testBroker) osb(method, path, body string) answer {
	tb.t.Helper()
	return tb.send(method, path, body, map[string]string{"X-Broker-API-Version": "2.17"}, "platform", "secret-platform")
}

func (tb *testBroker) send(method, path, body string, hdr map[string]string, user, pass string) answer {
	tb.t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, tb.srv.URL+path, r)
	if err != nil {
		tb.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := tb.hc.Do(req)
	if err != nil {
		tb.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	a := answer{code: resp.StatusCode, hdr: resp.Header, raw: b}
	json.Unmarshal(b, &a.body)
	return a
}

const provisionBody = `{"service_id":"svc","plan_id":"p64","organization_guid":"org","space_guid":"space","context":{"platform":"cloudfoundry"}}`

// waitSucceeded waits for operation op on instance id to succeed, and
// fails at once if it fails.
func (tb *testBroker) waitSucceeded(id, op string) {
	tb.t.Helper()
	testenv.Eventually(tb.t, "operation "+op+" on "+id+" to succeed", 30*time.Second, func() bool {
		lo := tb.lastOperation(id, op)
		if lo.body["state"] == opFailed {
			tb.t.Fatalf("operation %s on %s failed: %v", op, id, lo.body)
		}
		return lo.code == 200 && lo.body["state"] == opSucceeded
	})
}

func bodyWith(plan string) string { return strings.Replace(provisionBody, `"p64"`, `"`+plan+`"`, 1) }

func credsOf(t *testing.T, a answer) apitype.Credentials {
	t.Helper()
	b, _ := json.Marshal(a.body["credentials"])
	var c apitype.Credentials
	if err := json.Unmarshal(b, &c); err != nil || c.Password == "" {
		t.Fatalf("no credentials in %v", a.body)
	}
	return c
}

func redisClient(t *testing.T, c apitype.Credentials) *goredis.Client {
	t.Helper()
	r := goredis.NewClient(&goredis.Options{Addr: fmt.Sprintf("%s:%d", c.Host, c.Port), Username: c.Username, Password: c.Password,
		MaxRetries: -1, DisableIdentity: true, Protocol: 2, PoolSize: 1})
	t.Cleanup(func() { r.Close() })
	return r
}

// holders are the test agents that hold instance id (a moved instance's
// forwarder on its old agent does not count).
func holders(t *testing.T, as []*testAgent, id string) []string {
	t.Helper()
	var out []string
	for _, a := range as {
		if in, err := a.svc.Get(context.Background(), id); err == nil && in.State != apitype.StateForwarding {
			out = append(out, a.name)
		}
	}
	return out
}

// The OSB status tables, row by row, against real agents.
func TestOSBStatusTable(t *testing.T) {
	agents := startAgents(t, 200, 2000)
	tb := startBroker(t, agentConfigs(agents), func(c *Config) { c.Strategy = Pack; c.OperationTTL = 300 * time.Millisecond })
	v := map[string]string{"X-Broker-API-Version": "2.17"}
	for _, tt := range []struct {
		name         string
		method, path string
		body         string
		hdr          map[string]string
		user         string
		want         int
		wantError    string
	}{
		{"no version header", "GET", "/v2/catalog", "", nil, "platform", 412, ""},
		{"version too old", "GET", "/v2/catalog", "", map[string]string{"X-Broker-API-Version": "2.12"}, "platform", 412, ""},
		{"version of another major", "GET", "/v2/catalog", "", map[string]string{"X-Broker-API-Version": "3.0"}, "platform", 412, ""},
		{"no credentials", "GET", "/v2/catalog", "", v, "", 401, ""},
		{"wrong credentials", "GET", "/v2/catalog", "", v, "intruder", 401, ""},
		{"catalog", "GET", "/v2/catalog", "", v, "platform", 200, ""},
		{"provision without service_id", "PUT", "/v2/service_instances/i1", `{"plan_id":"p64","organization_guid":"o","space_guid":"s"}`, v, "platform", 400, ""},
		{"provision of an unknown plan", "PUT", "/v2/service_instances/i1", bodyWith("nope"), v, "platform", 400, ""},
		{"provision without organization_guid", "PUT", "/v2/service_instances/i1", `{"service_id":"svc","plan_id":"p64","space_guid":"s"}`, v, "platform", 400, ""},
		{"provision with a parameter the plan does not take", "PUT", "/v2/service_instances/i1", strings.Replace(provisionBody, `}}`, `},"parameters":{"maxmemory":"1gb"}}`, 1), v, "platform", 400, ""},
		{"provision with a persistence the plan does not allow", "PUT", "/v2/service_instances/i1", strings.Replace(bodyWith("p32"), `}}`, `},"parameters":{"persistence":"rdb"}}`, 1), v, "platform", 400, ""},
		{"provision with malformed JSON", "PUT", "/v2/service_instances/i1", `{"service_id":`, v, "platform", 400, ""},
		{"provision", "PUT", "/v2/service_instances/i1", strings.Replace(provisionBody, `}}`, `},"unknown_field":1}`, 1), v, "platform", 201, ""},
		{"provision again, identical", "PUT", "/v2/service_instances/i1", provisionBody, v, "platform", 200, ""},
		{"provision again, another plan", "PUT", "/v2/service_instances/i1", bodyWith("p32"), v, "platform", 409, ""},
		{"fetch instance", "GET", "/v2/service_instances/i1", "", v, "platform", 200, ""},
		{"fetch an unknown instance", "GET", "/v2/service_instances/nope", "", v, "platform", 404, ""},
		{"bind without plan_id", "PUT", "/v2/service_instances/i1/service_bindings/b1", `{"service_id":"svc"}`, v, "platform", 400, ""},
		{"bind to an unknown instance", "PUT", "/v2/service_instances/nope/service_bindings/b1", `{"service_id":"svc","plan_id":"p64"}`, v, "platform", 400, ""},
		{"bind with parameters", "PUT", "/v2/service_instances/i1/service_bindings/b1", `{"service_id":"svc","plan_id":"p64","parameters":{"x":1}}`, v, "platform", 400, ""},
		{"bind", "PUT", "/v2/service_instances/i1/service_bindings/b1", `{"service_id":"svc","plan_id":"p64"}`, v, "platform", 201, ""},
		{"bind again", "PUT", "/v2/service_instances/i1/service_bindings/b1", `{"service_id":"svc","plan_id":"p64"}`, v, "platform", 200, ""},
		{"bind with an unknown predecessor", "PUT", "/v2/service_instances/i1/service_bindings/b2", `{"service_id":"svc","plan_id":"p64","predecessor_binding_id":"nope"}`, v, "platform", 400, ""},
		{"fetch binding", "GET", "/v2/service_instances/i1/service_bindings/b1", "", v, "platform", 200, ""},
		{"fetch an unknown binding", "GET", "/v2/service_instances/i1/service_bindings/nope", "", v, "platform", 404, ""},
		{"binding last_operation", "GET", "/v2/service_instances/i1/service_bindings/b1/last_operation", "", v, "platform", 200, ""},
		{"unbind without service_id", "DELETE", "/v2/service_instances/i1/service_bindings/b1?plan_id=p64", "", v, "platform", 400, ""},
		{"unbind", "DELETE", "/v2/service_instances/i1/service_bindings/b1?service_id=svc&plan_id=p64", "", v, "platform", 200, ""},
		{"unbind again", "DELETE", "/v2/service_instances/i1/service_bindings/b1?service_id=svc&plan_id=p64", "", v, "platform", 410, ""},
		{"binding last_operation of a gone binding", "GET", "/v2/service_instances/i1/service_bindings/b1/last_operation", "", v, "platform", 410, ""},
		{"update without service_id", "PATCH", "/v2/service_instances/i1", `{"plan_id":"p32"}`, v, "platform", 400, ""},
		{"update of an unknown instance", "PATCH", "/v2/service_instances/nope", `{"service_id":"svc"}`, v, "platform", 400, ""},
		{"update to an unknown plan", "PATCH", "/v2/service_instances/i1", `{"service_id":"svc","plan_id":"nope"}`, v, "platform", 400, ""},
		{"update keeping the plan", "PATCH", "/v2/service_instances/i1", `{"service_id":"svc"}`, v, "platform", 200, ""},
		{"update that needs a move, synchronously", "PATCH", "/v2/service_instances/i1", `{"service_id":"svc","plan_id":"p256"}`, v, "platform", 422, codeAsyncRequired},
		{"update to a persistence the plan does not take", "PATCH", "/v2/service_instances/i1", `{"service_id":"svc","parameters":{"persistence":"none"}}`, v, "platform", 400, ""},
		{"last_operation of an operation never started", "GET", "/v2/service_instances/i1/last_operation?operation=bogus", "", v, "platform", 400, ""},
		{"deprovision without plan_id", "DELETE", "/v2/service_instances/i1?service_id=svc", "", v, "platform", 400, ""},
		{"deprovision", "DELETE", "/v2/service_instances/i1?service_id=svc&plan_id=p64", "", v, "platform", 200, ""},
		{"deprovision again", "DELETE", "/v2/service_instances/i1?service_id=svc&plan_id=p64", "", v, "platform", 410, ""},
		{"admin without its credentials", "GET", "/admin/agents", "", nil, "platform", 401, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pass := map[string]string{"platform": "secret-platform", "intruder": "x"}[tt.user]
			a := tb.send(tt.method, tt.path, tt.body, tt.hdr, tt.user, pass)
			if a.code != tt.want {
				t.Fatalf("%s %s = %d %v; want %d", tt.method, tt.path, a.code, a.body, tt.want)
			}
			if tt.wantError != "" && a.body["error"] != tt.wantError {
				t.Fatalf("error %v; want %s", a.body["error"], tt.wantError)
			}
		})
	}
	if a := tb.send("GET", "/v2/catalog", "", map[string]string{"X-Broker-API-Version": "2.17", "X-Broker-API-Request-Identity": "req-42"}, "platform", "secret-platform"); a.hdr.Get("X-Broker-API-Request-Identity") != "req-42" {
		t.Error("X-Broker-API-Request-Identity is not echoed")
	}
}

// A provision is identical when its attributes are; the instance holds the
// broker's metadata, so a fresh broker answers as the first did.
func TestBrokerIsStateless(t *testing.T) {
	agents := startAgents(t, 1000, 1000)
	cfgs := agentConfigs(agents)
	first := startBroker(t, cfgs, nil)
	body := strings.Replace(provisionBody, `}}`, `},"parameters":{"persistence":"none"}}`, 1)
	body = strings.Replace(body, `"p64"`, `"p32"`, 1)
	if a := first.osb("PUT", "/v2/service_instances/s1", body); a.code != 201 {
		t.Fatalf("provision = %d %v", a.code, a.body)
	}
	creds := credsOf(t, first.osb("PUT", "/v2/service_instances/s1/service_bindings/b1", `{"service_id":"svc","plan_id":"p32"}`))
	first.srv.Close()
	first.b.Close()

	second := startBroker(t, cfgs, nil)
	a := second.osb("GET", "/v2/service_instances/s1", "")
	if a.code != 200 || a.body["plan_id"] != "p32" || a.body["service_id"] != "svc" {
		t.Fatalf("GET from a fresh broker = %d %v", a.code, a.body)
	}
	if p, _ := a.body["parameters"].(map[string]any); p["persistence"] != "none" {
		t.Fatalf("parameters from a fresh broker = %v", a.body["parameters"])
	}
	if a := second.osb("PUT", "/v2/service_instances/s1", body); a.code != 200 {
		t.Fatalf("the same provision through a fresh broker = %d; want 200", a.code)
	}
	if a := second.osb("PUT", "/v2/service_instances/s1", bodyWith("p32")); a.code != 409 {
		t.Fatalf("another provision of the id through a fresh broker = %d; want 409", a.code)
	}
	b := second.osb("GET", "/v2/service_instances/s1/service_bindings/b1", "")
	if b.code != 200 || credsOf(t, b) != creds {
		t.Fatalf("binding from a fresh broker = %d %v; want the same credentials", b.code, b.body)
	}
}

// The same provision sent to two brokers at once ends as one instance.
func TestTwoBrokersOneProvision(t *testing.T) {
	agents := startAgents(t, 1000, 1000, 1000)
	cfgs := agentConfigs(agents)
	brokers := []*testBroker{startBroker(t, cfgs, nil), startBroker(t, cfgs, nil)}
	for round := range 5 {
		id := "dup-" + strconv.Itoa(round)
		var wg sync.WaitGroup
		codes := make([]int, 2)
		for i, tb := range brokers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				codes[i] = tb.osb("PUT", "/v2/service_instances/"+id, provisionBody).code
			}()
		}
		wg.Wait()
		for _, c := range codes {
			if c != 200 && c != 201 {
				t.Fatalf("round %d: answers %v; want each 200 or 201", round, codes)
			}
		}
		testenv.Eventually(t, "one copy of "+id, 5*time.Second, func() bool { return len(holders(t, agents, id)) == 1 })
		for _, tb := range brokers {
			if a := tb.osb("GET", "/v2/service_instances/"+id, ""); a.code != 200 {
				t.Fatalf("round %d: GET = %d", round, a.code)
			}
		}
	}
}

// Placement spreads new instances over the agents with the most room; a
// plan change the agent has room for resizes in place, one it has no room
// for moves the instance to another agent with its data and its
// bindings' credentials (apart from host and port).
func TestPlacementResizeAndMove(t *testing.T) {
	agents := startAgents(t, 300, 2000)
	tb := startBroker(t, agentConfigs(agents), func(c *Config) { c.Strategy = Pack })
	if a := tb.osb("PUT", "/v2/service_instances/m1", provisionBody); a.code != 201 {
		t.Fatalf("provision = %d %v", a.code, a.body)
	}
	if h := holders(t, agents, "m1"); len(h) != 1 || h[0] != "agent-0" {
		t.Fatalf("pack placed m1 on %v; want agent-0 (the fullest with room)", h)
	}
	creds := credsOf(t, tb.osb("PUT", "/v2/service_instances/m1/service_bindings/app", `{"service_id":"svc","plan_id":"p64"}`))
	rc := redisClient(t, creds)
	for i := range 100 {
		if err := rc.Set(context.Background(), "k"+strconv.Itoa(i), "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// In place: tiny fits.
	if a := tb.osb("PATCH", "/v2/service_instances/m1", `{"service_id":"svc","plan_id":"p32"}`); a.code != 200 {
		t.Fatalf("resize in place = %d %v", a.code, a.body)
	}
	if in, _ := agents[0].svc.Get(context.Background(), "m1"); in.MemoryMB != 32 {
		t.Fatalf("after the in-place update memory_mb = %d", in.MemoryMB)
	}
	// A move: medium does not fit agent-0's 300 MiB with another tenant.
	if a := tb.osb("PUT", "/v2/service_instances/other", provisionBody); a.code != 201 {
		t.Fatalf("provision other = %d", a.code)
	}
	a := tb.osb("PATCH", "/v2/service_instances/m1?accepts_incomplete=true", `{"service_id":"svc","plan_id":"p256"}`)
	if a.code != 202 || a.body["operation"] == nil {
		t.Fatalf("update that moves = %d %v; want 202 with an operation", a.code, a.body)
	}
	op := a.body["operation"].(string)
	if c := tb.osb("PUT", "/v2/service_instances/m1/service_bindings/late", `{"service_id":"svc","plan_id":"p256"}`); c.code != 422 || c.body["error"] != codeConcurrency {
		t.Errorf("bind during the move = %d %v; want 422 ConcurrencyError", c.code, c.body)
	}
	tb.waitSucceeded("m1", op)
	if h := holders(t, agents, "m1"); len(h) != 1 || h[0] != "agent-1" {
		t.Fatalf("after the move m1 is on %v; want agent-1", h)
	}
	moved := credsOf(t, tb.osb("GET", "/v2/service_instances/m1/service_bindings/app", ""))
	if moved.Username != creds.Username || moved.Password != creds.Password || moved.Port == 0 {
		t.Fatalf("credentials after the move %+v; want the same user and password as %+v", moved, creds)
	}
	if n, err := redisClient(t, moved).DBSize(context.Background()).Result(); err != nil || n != 100 {
		t.Fatalf("DBSIZE after the move = %d, %v; want 100", n, err)
	}
	if a := tb.osb("GET", "/v2/service_instances/m1", ""); a.body["plan_id"] != "p256" {
		t.Fatalf("plan after the move = %v", a.body["plan_id"])
	}
	// A fresh broker tells how the operation ended, from the agents.
	fresh := startBroker(t, agentConfigs(agents), nil)
	if lo := fresh.osb("GET", "/v2/service_instances/m1/last_operation?operation="+op, ""); lo.body["state"] != opSucceeded {
		t.Fatalf("last_operation from a fresh broker = %v", lo.body)
	}
}

// The disk decides a placement as the memory does: an agent whose disk
// has no room for an instance's reservation is not asked to provision it
// (no 507 round trip), and a plan change that outgrows its agent's disk
// is a move, not an in-place resize the agent would refuse.
func TestPlacementHeedsTheDisk(t *testing.T) {
	agents := startAgents(t, 2000, 2000)
	// agent-0's data on a 400 MiB file system of its own: room for one
	// 64 MiB aof instance (192+64 MiB of files, 1 of directory, 8 of
	// logs), not two, and not for that one at 256 MiB.
	cfg := agents[0].cfg
	cfg.DataDir, cfg.DiskHeadroomMB = testenv.Tmpfs(t, "400m"), 0
	agents[0].start(t, cfg)
	tb := startBroker(t, agentConfigs(agents), func(c *Config) { c.Strategy = Pack })
	var asked atomic.Int32
	refuse(agents[0], func(r *http.Request) bool {
		if r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v1/instances/d2") {
			asked.Add(1)
		}
		return false // counted, not refused
	})

	if a := tb.osb("PUT", "/v2/service_instances/d1", provisionBody); a.code != 201 {
		t.Fatalf("provision d1 = %d %v", a.code, a.body)
	}
	if h := holders(t, agents, "d1"); len(h) != 1 || h[0] != "agent-0" {
		t.Fatalf("pack placed d1 on %v; want agent-0 (the fullest with room)", h)
	}
	// agent-0 has the memory for a second and is the fuller: pack would
	// pick it, but its disk has no room.
	if a := tb.osb("PUT", "/v2/service_instances/d2", provisionBody); a.code != 201 {
		t.Fatalf("provision d2 = %d %v", a.code, a.body)
	}
	if h := holders(t, agents, "d2"); len(h) != 1 || h[0] != "agent-1" {
		t.Fatalf("d2 on %v; want agent-1 (agent-0's disk is full)", h)
	}
	if n := asked.Load(); n != 0 {
		t.Fatalf("agent-0 was asked %d times to provision d2 it has no disk for", n)
	}
	capa, err := agents[0].svc.Capacity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The memory fits in place; the disk does not: the change is a move.
	if a := tb.osb("PATCH", "/v2/service_instances/d1", `{"service_id":"svc","plan_id":"p256"}`); a.code != 422 || a.body["error"] != codeAsyncRequired {
		t.Fatalf("a synchronous update beyond agent-0's disk (%d bytes available) = %d %v; want 422 AsyncRequired (it moves)", capa.DiskAvailableBytes, a.code, a.body)
	}
	tb.waitSucceeded("d1", startMoveTo(t, tb, "d1", "p256"))
	if h := holders(t, agents, "d1"); len(h) != 1 || h[0] != "agent-1" {
		t.Fatalf("after the move d1 is on %v; want agent-1", h)
	}
}

// A binding with a predecessor is a new user; the old one works until it
// is unbound (rotation without downtime).
func TestBindingRotation(t *testing.T) {
	agents := startAgents(t, 1000)
	tb := startBroker(t, agentConfigs(agents), nil)
	tb.osb("PUT", "/v2/service_instances/r1", provisionBody)
	old := credsOf(t, tb.osb("PUT", "/v2/service_instances/r1/service_bindings/old", `{"service_id":"svc","plan_id":"p64"}`))
	a := tb.osb("PUT", "/v2/service_instances/r1/service_bindings/new", `{"service_id":"svc","plan_id":"p64","predecessor_binding_id":"old"}`)
	if a.code != 201 {
		t.Fatalf("rotation bind = %d %v", a.code, a.body)
	}
	rotated := credsOf(t, a)
	ctx := context.Background()
	if rotated.Username == old.Username || rotated.Password == old.Password {
		t.Fatalf("rotation gave the old credentials again")
	}
	oc, nc := redisClient(t, old), redisClient(t, rotated)
	if oc.Ping(ctx).Err() != nil || nc.Ping(ctx).Err() != nil {
		t.Fatal("both credentials must work during the rotation")
	}
	tb.osb("DELETE", "/v2/service_instances/r1/service_bindings/old?service_id=svc&plan_id=p64", "")
	if oc.Ping(ctx).Err() == nil {
		t.Fatal("the predecessor still works after its unbind")
	}
	if err := nc.Ping(ctx).Err(); err != nil {
		t.Fatalf("the new credentials stopped working: %v", err)
	}
}

// An asynchronous delete: 202, last_operation succeeded while it is
// remembered, then 410.
func TestAsyncDeprovision(t *testing.T) {
	agents := startAgents(t, 1000)
	tb := startBroker(t, agentConfigs(agents), func(c *Config) { c.OperationTTL = 200 * time.Millisecond })
	tb.osb("PUT", "/v2/service_instances/d1", provisionBody)
	a := tb.osb("DELETE", "/v2/service_instances/d1?service_id=svc&plan_id=p64&accepts_incomplete=true", "")
	if a.code != 202 {
		t.Fatalf("async deprovision = %d", a.code)
	}
	op := a.body["operation"].(string)
	testenv.Eventually(t, "succeeded", 10*time.Second, func() bool {
		return tb.osb("GET", "/v2/service_instances/d1/last_operation?operation="+op, "").body["state"] == opSucceeded
	})
	testenv.Eventually(t, "410 once forgotten", 5*time.Second, func() bool {
		return tb.osb("GET", "/v2/service_instances/d1/last_operation?operation="+op, "").code == 410
	})
}

// An agent that does not answer: provisions go elsewhere, operations on
// its instances answer a 5xx naming it (never a 404), and it all works
// again once it is back.
func TestAgentUnreachable(t *testing.T) {
	agents := startAgents(t, 2000, 1000)
	tb := startBroker(t, agentConfigs(agents), nil)
	if a := tb.osb("PUT", "/v2/service_instances/u1", provisionBody); a.code != 201 {
		t.Fatal(a.code)
	}
	if h := holders(t, agents, "u1"); len(h) != 1 || h[0] != "agent-0" {
		t.Fatalf("u1 on %v; want agent-0", h)
	}
	// Cut agent-0 off: its listener stays, every request it gets hangs up.
	agents[0].cut.Store(true)
	for _, op := range []struct{ method, path, body string }{
		{"GET", "/v2/service_instances/u1", ""},
		{"PUT", "/v2/service_instances/u1/service_bindings/b", `{"service_id":"svc","plan_id":"p64"}`},
		{"DELETE", "/v2/service_instances/u1?service_id=svc&plan_id=p64", ""},
	} {
		a := tb.osb(op.method, op.path, op.body)
		if a.code < 500 || !strings.Contains(fmt.Sprint(a.body["description"]), "agent-0") {
			t.Errorf("%s %s with its agent cut off = %d %v; want a 5xx naming agent-0", op.method, op.path, a.code, a.body)
		}
	}
	if a := tb.osb("PUT", "/v2/service_instances/u2", provisionBody); a.code != 201 {
		t.Fatalf("provision with an agent cut off = %d %v", a.code, a.body)
	}
	if h := holders(t, agents, "u2"); len(h) != 1 || h[0] != "agent-1" {
		t.Fatalf("u2 on %v; want agent-1", h)
	}
	if h := holders(t, agents, "u1"); len(h) != 1 {
		t.Fatalf("u1 after the failed operations is on %v; want still one copy", h)
	}
	agents[0].cut.Store(false)
	if a := tb.osb("DELETE", "/v2/service_instances/u1?service_id=svc&plan_id=p64", ""); a.code != 200 {
		t.Fatalf("deprovision once the agent is back = %d %v", a.code, a.body)
	}
}

// A drain moves every instance of an agent elsewhere, bindings' passwords
// kept, and nothing new is placed there.
func TestDrain(t *testing.T) {
	agents := startAgents(t, 2000, 1000, 1000)
	tb := startBroker(t, agentConfigs(agents, "z1", "z2", "z2"), nil)
	var ids []string
	creds := map[string]apitype.Credentials{}
	for i := range 4 {
		id := "dr" + strconv.Itoa(i)
		ids = append(ids, id)
		if a := tb.osb("PUT", "/v2/service_instances/"+id, provisionBody); a.code != 201 {
			t.Fatal(a.code)
		}
		creds[id] = credsOf(t, tb.osb("PUT", "/v2/service_instances/"+id+"/service_bindings/app", `{"service_id":"svc","plan_id":"p64"}`))
		redisClient(t, creds[id]).Set(context.Background(), "k", id, 0)
	}
	onFirst := 0
	for _, id := range ids {
		if h := holders(t, agents, id); len(h) == 1 && h[0] == "agent-0" {
			onFirst++
		}
	}
	if onFirst == 0 {
		t.Fatal("spread placed nothing on agent-0 (alone in its zone, most memory)")
	}
	admin := func(method, path string) answer {
		return tb.send(method, path, "", nil, "ops", "secret-ops")
	}
	if a := admin("POST", "/admin/agents/agent-0/drain"); a.code != 202 {
		t.Fatalf("drain = %d %v", a.code, a.body)
	}
	testenv.Eventually(t, "the drain", 60*time.Second, func() bool {
		a := admin("GET", "/admin/agents/agent-0/drain")
		if a.body["state"] == DrainFailed {
			t.Fatalf("drain failed: %v", a.body)
		}
		return a.body["state"] == DrainDone
	})
	for _, id := range ids {
		h := holders(t, agents, id)
		if len(h) != 1 || h[0] == "agent-0" {
			t.Fatalf("%s after the drain is on %v", id, h)
		}
		c := credsOf(t, tb.osb("GET", "/v2/service_instances/"+id+"/service_bindings/app", ""))
		if c.Password != creds[id].Password {
			t.Fatalf("%s: the password changed in the drain", id)
		}
		if v, err := redisClient(t, c).Get(context.Background(), "k").Result(); err != nil || v != id {
			t.Fatalf("%s: data after the drain = %q, %v", id, v, err)
		}
	}
	if a := tb.osb("PUT", "/v2/service_instances/after", provisionBody); a.code != 201 {
		t.Fatal(a.code)
	}
	if h := holders(t, agents, "after"); len(h) != 1 || h[0] == "agent-0" {
		t.Fatalf("a provision after the drain went to %v", h)
	}
	list := admin("GET", "/admin/agents")
	if list.code != 200 || len(list.body["agents"].([]any)) != 3 {
		t.Fatalf("GET /admin/agents = %d %v", list.code, list.body)
	}
	// The mark is on the agent: another broker sees it too.
	other := startBroker(t, agentConfigs(agents, "z1", "z2", "z2"), nil)
	for i := range 3 {
		id := "other-" + strconv.Itoa(i)
		if a := other.osb("PUT", "/v2/service_instances/"+id, provisionBody); a.code != 201 {
			t.Fatal(a.code)
		}
		if h := holders(t, agents, id); len(h) != 1 || h[0] == "agent-0" {
			t.Fatalf("another broker placed %s on %v, the drained agent", id, h)
		}
	}
	if a := admin("DELETE", "/admin/agents/agent-0/drain"); a.code != 200 {
		t.Fatalf("clear the drain = %d", a.code)
	}
	if capa, _ := agents[0].svc.Capacity(context.Background()); capa.Draining {
		t.Fatal("the agent is still marked draining")
	}
}

// The broker talks to agents only over HTTP: no store, cgroups or Redis
// client in its build.
func TestBrokerDoesNotImportTheAgent(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, bad := range []string{"go.etcd.io/bbolt", "github.com/containerd/cgroups", "github.com/redis/go-redis", "github.com/redis-agent/redis-agent/agent"} {
		if bytes.Contains(out, []byte(bad)) {
			t.Errorf("broker depends on %s", bad)
		}
	}
}

// TestOpenAPIContract drives every route of the broker through a
// transport that validates each request and response against
// broker/openapi.yaml, so the document cannot drift from the code.
func TestOpenAPIContract(t *testing.T) {
	agents := startAgents(t, 200, 2000)
	tb := startBroker(t, agentConfigs(agents), func(c *Config) { c.Strategy = Pack })
	contract := testenv.NewContract(t, "openapi.yaml", tb.srv.URL)
	tb.hc = &http.Client{Transport: contract}
	admin := func(method, path string) answer { return tb.send(method, path, "", nil, "ops", "secret-ops") }
	bind := `{"service_id":"svc","plan_id":"p64"}`
	tb.send("GET", "/v2/catalog", "", nil, "platform", "secret-platform") // 412
	tb.send("GET", "/v2/catalog", "", map[string]string{"X-Broker-API-Version": "2.17"}, "", "")
	for _, c := range []struct {
		method, path, body string
		want               int
	}{
		{"GET", "/v2/catalog", "", 200},
		{"PUT", "/v2/service_instances/c1", provisionBody, 201},
		{"PUT", "/v2/service_instances/c1", provisionBody, 200},
		{"PUT", "/v2/service_instances/c1", bodyWith("p32"), 409},
		{"PUT", "/v2/service_instances/c2", `{"service_id":"svc"}`, 400},
		{"GET", "/v2/service_instances/c1", "", 200},
		{"GET", "/v2/service_instances/none", "", 404},
		{"PUT", "/v2/service_instances/c1/service_bindings/b1", bind, 201},
		{"PUT", "/v2/service_instances/c1/service_bindings/b1", bind, 200},
		{"PUT", "/v2/service_instances/c1/service_bindings/b2", `{}`, 400},
		{"GET", "/v2/service_instances/c1/service_bindings/b1", "", 200},
		{"GET", "/v2/service_instances/c1/service_bindings/none", "", 404},
		{"GET", "/v2/service_instances/c1/service_bindings/b1/last_operation", "", 200},
		{"PATCH", "/v2/service_instances/c1", `{"service_id":"svc","plan_id":"p32"}`, 200},
		{"PATCH", "/v2/service_instances/c1", `{"service_id":"svc","plan_id":"p256"}`, 422},
		{"PATCH", "/v2/service_instances/c1", `{"plan_id":"p32"}`, 400},
		{"GET", "/v2/service_instances/c1/last_operation?operation=bogus", "", 400},
		{"DELETE", "/v2/service_instances/c1/service_bindings/b1?service_id=svc&plan_id=p64", "", 200},
		{"DELETE", "/v2/service_instances/c1/service_bindings/b1?service_id=svc&plan_id=p64", "", 410},
		{"GET", "/v2/service_instances/c1/service_bindings/b1/last_operation", "", 410},
		{"DELETE", "/v2/service_instances/c1?service_id=svc", "", 400},
	} {
		if a := tb.osb(c.method, c.path, c.body); a.code != c.want {
			t.Errorf("%s %s = %d %v, want %d", c.method, c.path, a.code, a.body, c.want)
		}
	}
	a := tb.osb("PATCH", "/v2/service_instances/c1?accepts_incomplete=true", `{"service_id":"svc","plan_id":"p256"}`)
	if a.code != 202 {
		t.Fatalf("update with a move = %d %v", a.code, a.body)
	}
	op := a.body["operation"].(string)
	testenv.Eventually(t, "the move", 30*time.Second, func() bool {
		return tb.osb("GET", "/v2/service_instances/c1/last_operation?operation="+op, "").body["state"] != opInProgress
	})
	if a := tb.osb("DELETE", "/v2/service_instances/c1?service_id=svc&plan_id=p256&accepts_incomplete=true", ""); a.code != 202 {
		t.Fatalf("async delete = %d", a.code)
	}
	if a := tb.osb("DELETE", "/v2/service_instances/c1?service_id=svc&plan_id=p256", ""); a.code != 410 && a.code != 200 {
		t.Fatalf("delete after an async delete = %d", a.code)
	}
	tb.osb("DELETE", "/v2/service_instances/c1?service_id=svc&plan_id=p256", "")
	tb.osb("PUT", "/v2/service_instances/c3", provisionBody)
	admin("GET", "/admin/agents")
	admin("GET", "/admin/agents/agent-0/drain") // 404: none yet
	admin("POST", "/admin/agents/agent-0/drain")
	testenv.Eventually(t, "the drain", 30*time.Second, func() bool { return admin("GET", "/admin/agents/agent-0/drain").body["state"] != DrainRunning })
	admin("DELETE", "/admin/agents/agent-0/drain")
	admin("GET", "/admin/agents/none/drain")
	admin("GET", "/admin/agents/agent-0/recover") // 404: none yet
	if a := admin("POST", "/admin/agents/agent-0/recover"); a.code != 409 {
		t.Errorf("recover of an agent that answers = %d, want 409", a.code)
	}
	tb.send("GET", "/healthz", "", nil, "", "")
	tb.send("GET", "/readyz", "", nil, "", "")
	tb.send("GET", "/metrics", "", nil, "", "")
	contract.CheckCovered(t)
}

// Every broker metric the alert rules name is one the broker exports.
func TestAlertRulesNameExportedMetrics(t *testing.T) {
	agents := startAgents(t, 500)
	tb := startBroker(t, agentConfigs(agents), nil)
	tb.osb("GET", "/v2/catalog", "")
	tb.osb("PUT", "/v2/service_instances/x", bodyWith("p256"))
	tb.osb("PUT", "/v2/service_instances/y", bodyWith("p256")) // no room: a placement failure
	metrics := string(tb.send("GET", "/metrics", "", nil, "", "").raw)
	rules, err := os.ReadFile("../deploy/prometheus-rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	refs := regexp.MustCompile(`\bredis_broker_[a-z0-9_]+`).FindAllString(string(rules), -1)
	if len(refs) < 4 {
		t.Fatalf("the rules name %d broker metrics; want the broker's alerts there", len(refs))
	}
	for _, name := range refs {
		if !regexp.MustCompile(`(?m)^` + name + `[{ ]`).MatchString(metrics) {
			t.Errorf("prometheus-rules.yml names %s, which the broker does not export", name)
		}
	}
}

// A new Redis on an agent shows in the catalog's maintenance_info; an
// update with it (cf update-service --upgrade) moves that one instance to
// the new binary on its agent, and only that one.
func TestMaintenanceUpgrade(t *testing.T) {
	agents := startAgents(t, 1000)
	tb := startBroker(t, agentConfigs(agents), nil)
	for _, id := range []string{"up1", "up2"} {
		if a := tb.osb("PUT", "/v2/service_instances/"+id, provisionBody); a.code != 201 {
			t.Fatalf("provision %s = %d", id, a.code)
		}
	}
	version := func(id string) any {
		mi, _ := tb.osb("GET", "/v2/service_instances/"+id, "").body["maintenance_info"].(map[string]any)
		return mi["version"]
	}
	if v := version("up1"); v != "7.0.15" {
		t.Fatalf("maintenance_info of a new instance = %v; want the agent's Redis, 7.0.15", v)
	}
	// A new build of Redis on the agent (a wrapper that says 7.0.100).
	script := filepath.Join(testenv.TraversableDir(t), "redis-server-7.0.100")
	os.WriteFile(script, []byte("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Redis server v=7.0.100 sha=0 malloc=libc bits=64 build=test'; exit 0; fi\nexec "+agents[0].cfg.RedisServer+" \"$@\"\n"), 0o755)
	cfg := agents[0].cfg
	cfg.RedisServer = script
	agents[0].start(t, cfg)
	tb.b.fleet.Refresh(context.Background())
	cat := tb.osb("GET", "/v2/catalog", "")
	plan := cat.body["services"].([]any)[0].(map[string]any)["plans"].([]any)[0].(map[string]any)
	if mi := plan["maintenance_info"].(map[string]any); mi["version"] != "7.0.100" {
		t.Fatalf("catalog maintenance_info = %v; want 7.0.100", mi)
	}
	if v := version("up1"); v == "7.0.100" {
		t.Fatal("the instance shows the new version before its upgrade")
	}
	body := `{"service_id":"svc","maintenance_info":{"version":"7.0.100"}}`
	if a := tb.osb("PATCH", "/v2/service_instances/up1", body); a.code != 422 || a.body["error"] != codeAsyncRequired {
		t.Fatalf("upgrade without accepts_incomplete = %d %v", a.code, a.body)
	}
	if a := tb.osb("PATCH", "/v2/service_instances/up1?accepts_incomplete=true", `{"service_id":"svc","maintenance_info":{"version":"9.9.9"}}`); a.code != 422 || a.body["error"] != codeMaintenanceInfoConflict {
		t.Fatalf("upgrade to a version nobody offers = %d %v", a.code, a.body)
	}
	a := tb.osb("PATCH", "/v2/service_instances/up1?accepts_incomplete=true", body)
	if a.code != 202 {
		t.Fatalf("upgrade = %d %v", a.code, a.body)
	}
	op := a.body["operation"].(string)
	testenv.Eventually(t, "the upgrade", 30*time.Second, func() bool {
		st := tb.osb("GET", "/v2/service_instances/up1/last_operation?operation="+op, "").body["state"]
		if st == opFailed {
			t.Fatal("upgrade failed")
		}
		return st == opSucceeded
	})
	if v := version("up1"); v != "7.0.100" {
		t.Fatalf("maintenance_info after the upgrade = %v", v)
	}
	if v := version("up2"); v == "7.0.100" {
		t.Fatal("the other instance was upgraded too")
	}
	if in, _ := agents[0].svc.Get(context.Background(), "up1"); in.Binary != script || in.State != "running" {
		t.Fatalf("up1 after the upgrade: %+v", in)
	}
}

// A tenant chooses its eviction policy, clients' memory bound and TLS by
// parameters, at provision and by an update, which the agent applies in
// place; the catalog publishes them, and the credentials carry TLS.
func TestTenantSettingsParameters(t *testing.T) {
	agents := startAgents(t, 1000)
	tb := startBroker(t, agentConfigs(agents), nil)
	cat := tb.osb("GET", "/v2/catalog", "")
	if !strings.Contains(fmt.Sprint(cat.body), "maxmemory_policy") || !strings.Contains(fmt.Sprint(cat.body), "tls") {
		t.Fatalf("the catalog's parameter schemas lack the settings: %v", cat.body)
	}
	body := strings.Replace(provisionBody, `}}`, `},"parameters":{"maxmemory_policy":"allkeys-lru","tls":"optional"}}`, 1)
	if a := tb.osb("PUT", "/v2/service_instances/s1", body); a.code != 201 {
		t.Fatalf("provision = %d %v", a.code, a.body)
	}
	ctx := context.Background()
	in, _ := agents[0].svc.Get(ctx, "s1")
	if in.MaxmemoryPolicy != "allkeys-lru" || in.TLS != "optional" || in.MaxmemoryClients != "0" {
		t.Fatalf("instance %+v", in)
	}
	if a := tb.osb("PUT", "/v2/service_instances/s1", body); a.code != 200 {
		t.Fatalf("the same provision again = %d", a.code)
	}
	creds := credsOf(t, tb.osb("PUT", "/v2/service_instances/s1/service_bindings/b1", `{"service_id":"svc","plan_id":"p64"}`))
	if creds.TLSPort == 0 || !strings.HasPrefix(creds.TLSURI, "rediss://") || creds.CACert == "" {
		t.Fatalf("credentials %+v", creds)
	}
	upd := `{"service_id":"svc","parameters":{"maxmemory_policy":"volatile-lru","maxmemory_clients":"10%","tls":"required"}}`
	if a := tb.osb("PATCH", "/v2/service_instances/s1", upd); a.code != 200 {
		t.Fatalf("update = %d %v", a.code, a.body)
	}
	got, _ := agents[0].svc.Get(ctx, "s1")
	if got.MaxmemoryPolicy != "volatile-lru" || got.MaxmemoryClients != "10%" || got.TLS != "required" || got.PID != in.PID {
		t.Fatalf("after the update %+v; want the new settings, same process", got)
	}
	if c := credsOf(t, tb.osb("GET", "/v2/service_instances/s1/service_bindings/b1", "")); c.URI != c.TLSURI {
		t.Fatalf("credentials with tls required: %+v", c)
	}
	for _, bad := range []string{`{"tls":"on"}`, `{"maxmemory_policy":"lru"}`, `{"maxmemory_clients":"200%"}`, `{"maxmemory_clients":"lots"}`, `{"tls":1}`} {
		if a := tb.osb("PATCH", "/v2/service_instances/s1", `{"service_id":"svc","parameters":`+bad+`}`); a.code != 400 {
			t.Errorf("update with %s = %d, want 400", bad, a.code)
		}
	}
}
