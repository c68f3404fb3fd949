package benchsuite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/broker"
)

// The broker scenarios: the real redis-broker binary (Config.Broker) in
// front of three agents of its own, run after the agent scenarios on the
// same ports. Each figure is next to the same work done on the agents
// directly in the same run:
//
//   - provision and deprovision of the built-in catalog's cache plan
//     through the broker (OSB, one agent behind it) against a PUT and a
//     DELETE of the same spec on that agent;
//   - a broker's start, until /readyz is 200 and GET /admin/agents lists
//     every instance, with Density instances on the three agents, against
//     one GET /v1/instances on each agent at once (what the broker's
//     first look at the fleet costs at least);
//   - a drain of an agent holding DrainInstances AOF instances of DrainMB
//     of data each onto the other two, and each instance's unavailability
//     as the drain status gives it and as a client writing to it at its
//     old address sees it (move.go), with the acknowledged writes lost,
//     against a snapshot out of one such instance and its restore into
//     another agent, directly;
//   - the same for one instance of SnapshotMB, alone on its agent, with
//     the bytes its replication sent.

// The broker's credentials in the bench (env REDIS_BROKER_PASSWORD and
// REDIS_BROKER_ADMIN_PASSWORD of its process).
const (
	brokerUser, brokerPassword = "broker", "bench-broker-secret"
	adminUser, adminPassword   = "admin", "bench-admin-secret"
)

// brokerAgents is the number of agents the broker scenarios run.
const brokerAgents = 3

// proc is a redis-agent or redis-broker process of the broker scenarios,
// its output in a file.
type proc struct {
	name    string
	cmd     *exec.Cmd
	base    string
	exited  chan struct{}
	logPath string
}

// freeAddr is a loopback address that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startProc runs bin with args and env (added to this process's, less any
// REDIS_AGENT_ and REDIS_BROKER_ setting), its output to logPath.
func startProc(name, bin, listen string, args, env []string, logPath string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := &proc{name: name, base: "http://" + listen, exited: make(chan struct{}), logPath: logPath}
	p.cmd = exec.Command(bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "REDIS_AGENT_") && !strings.HasPrefix(kv, "REDIS_BROKER_") {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

// logTail is the end of p's output, for an error.
func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// stop signals p and waits for it, with SIGKILL after 30 s.
func (p *proc) stop(sig syscall.Signal) {
	p.cmd.Process.Signal(sig)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitProcReady polls p's /readyz every millisecond until it answers 200.
func (s *suite) waitProcReady(p *proc) (time.Duration, error) {
	t0 := time.Now()
	for {
		select {
		case <-p.exited:
			return 0, fmt.Errorf("%s exited: %v\n%s", p.name, p.cmd.ProcessState, p.logTail())
		default:
		}
		if code, _, err := s.call("GET", p.base+"/readyz", "", nil); err == nil && code == 200 {
			return time.Since(t0), nil
		}
		if time.Since(t0) > 2*time.Minute {
			return 0, fmt.Errorf("%s not ready after 2m:\n%s", p.name, p.logTail())
		}
		time.Sleep(time.Millisecond)
	}
}

// call sends one request to url; set, when not nil, adds headers.
func (s *suite) call(method, url, body string, set func(*http.Request)) (int, []byte, error) {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return 0, nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if set != nil {
		set(req)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// osb makes a request one of the platform: OSB version and basic auth.
func osb(r *http.Request) {
	r.Header.Set("X-Broker-API-Version", "2.17")
	r.SetBasicAuth(brokerUser, brokerPassword)
}

// admin makes a request one of an operator's.
func admin(r *http.Request) { r.SetBasicAuth(adminUser, adminPassword) }

// expect turns an answer other than want into an error.
func expect(what string, want int) func(int, []byte, error) error {
	return func(code int, body []byte, err error) error {
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if code != want {
			return fmt.Errorf("%s = %d, want %d: %s", what, code, want, body)
		}
		return nil
	}
}

// brokerFleet is the broker scenarios' agents: agent i is named a<i>,
// with its own data dir and its third of the suite's ports.
type brokerFleet struct {
	agents []*proc
	dir    string
}

// brokerPorts is how many instance ports each agent of the broker
// scenarios gets: a third of the suite's range (PortMin up to the bare
// reference's last port), free once the agent scenarios are done.
func (s *suite) brokerPorts() int { return (s.agentPorts() + 1 + s.cfg.Concurrency) / brokerAgents }

// brokerScenarios runs the broker's figures. Every process it starts is
// stopped when it returns, and on an error every redis-server of its
// agents is killed.
func (s *suite) brokerScenarios(ctx context.Context) (err error) {
	per := s.brokerPorts()
	need := max((s.cfg.Density+brokerAgents-1)/brokerAgents, s.cfg.DrainInstances, 1)
	if per < need || 2*per < s.cfg.DrainInstances+1 {
		return fmt.Errorf("%d ports per agent (a third of the agent's range, the bare references' and one) is too few for %d instances and a drain of %d", per, s.cfg.Density, s.cfg.DrainInstances)
	}
	f := &brokerFleet{dir: filepath.Join(s.cfg.Dir, "broker")}
	var procs []*proc
	defer func() {
		sig := syscall.SIGTERM
		if err != nil {
			sig = syscall.SIGKILL
		}
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].stop(sig)
		}
		if err != nil {
			for pid := range redisUnder(f.dir) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}()
	s.logf("broker: starting %d agents", brokerAgents)
	budget := 16*per + (2*s.cfg.DrainMB+64)*(s.cfg.DrainInstances+2) + (2*s.cfg.SnapshotMB+64)*2 + 1024
	for i := range brokerAgents {
		name := "a" + strconv.Itoa(i)
		data := filepath.Join(f.dir, name)
		if err := os.MkdirAll(data, 0o755); err != nil {
			return err
		}
		listen, err := freeAddr()
		if err != nil {
			return err
		}
		lo := s.cfg.PortMin + i*per
		args := []string{"--listen", listen, "--data-dir", data, "--redis-server", s.cfg.RedisServer,
			"--port-min", strconv.Itoa(lo), "--port-max", strconv.Itoa(lo + per - 1),
			"--memory-budget-mb", strconv.Itoa(budget), "--log-level", "warn", "--log-format", "json"}
		p, err := startProc(name, s.cfg.Agent, listen, args, nil, filepath.Join(f.dir, name+".log"))
		if err != nil {
			return err
		}
		procs = append(procs, p)
		f.agents = append(f.agents, p)
	}
	for _, a := range f.agents {
		if _, err := s.waitProcReady(a); err != nil {
			return err
		}
	}

	one, err := s.startBroker(f, "broker-one", f.agents[:1])
	if err != nil {
		return err
	}
	procs = append(procs, one)
	if err := s.brokerProvision(one, f.agents[0], s.cfg.BrokerSamples); err != nil {
		return err
	}
	one.stop(syscall.SIGTERM)
	procs = procs[:len(procs)-1]

	b, err := s.brokerStart(f, s.cfg.Density)
	if b != nil {
		procs = append(procs, b)
	}
	if err != nil {
		return err
	}
	if err := s.brokerDrain(ctx, f, b, s.cfg.DrainInstances, s.cfg.DrainMB); err != nil {
		return err
	}
	return s.brokerBigMove(ctx, f, b, s.cfg.SnapshotMB)
}

// startBroker runs a broker in front of agents and returns once its
// process runs (not ready yet).
func (s *suite) startBroker(f *brokerFleet, name string, agents []*proc) (*proc, error) {
	listen, err := freeAddr()
	if err != nil {
		return nil, err
	}
	args := []string{"--listen", listen, "--log-level", "warn"}
	for _, a := range agents {
		args = append(args, "--agent", a.name+"="+a.base)
	}
	env := []string{"REDIS_BROKER_PASSWORD=" + brokerPassword, "REDIS_BROKER_ADMIN_PASSWORD=" + adminPassword}
	return startProc(name, s.cfg.Broker, listen, args, env, filepath.Join(f.dir, name+".log"))
}

// cachePlan is the built-in catalog's plan without persistence, and the
// spec it stands for on an agent.
func cachePlan() (serviceID, planID, spec string, err error) {
	for _, svc := range broker.DefaultCatalog().Services {
		for _, p := range svc.Plans {
			if p.Persistence == "none" {
				return svc.ID, p.ID, fmt.Sprintf(`{"memory_mb":%d,"persistence":"none"}`, p.MemoryMB), nil
			}
		}
	}
	return "", "", "", errors.New("the built-in catalog has no plan without persistence")
}

// brokerProvision provisions and deletes n instances of the cache plan
// through broker b (one agent behind it) and, interleaved, n of the same
// spec on agent a directly, each one at a time.
func (s *suite) brokerProvision(b, a *proc, n int) error {
	if _, err := s.waitProcReady(b); err != nil {
		return err
	}
	svc, plan, spec, err := cachePlan()
	if err != nil {
		return err
	}
	s.logf("broker: provision and deprovision x%d, through the broker and directly", n)
	osbBody := fmt.Sprintf(`{"service_id":%q,"plan_id":%q,"organization_guid":"bench-org","space_guid":"bench-space"}`, svc, plan)
	q := "?" + url.Values{"service_id": {svc}, "plan_id": {plan}}.Encode()
	var dProv, dDel, bProv, bDel []time.Duration
	timed := func(out *[]time.Duration, check func(int, []byte, error) error, method, u, body string, set func(*http.Request)) error {
		t0 := time.Now()
		code, resp, err := s.call(method, u, body, set)
		d := time.Since(t0)
		if err := check(code, resp, err); err != nil {
			return err
		}
		*out = append(*out, d)
		return nil
	}
	for i := range n {
		id := fmt.Sprintf("direct-%d", i)
		if err := timed(&dProv, expect("PUT "+id, 201), "PUT", a.base+"/v1/instances/"+id, spec, nil); err != nil {
			return err
		}
		if err := timed(&dDel, expect("DELETE "+id, 200), "DELETE", a.base+"/v1/instances/"+id, "", nil); err != nil {
			return err
		}
		id = fmt.Sprintf("osb-%d", i)
		if err := timed(&bProv, expect("OSB PUT "+id, 201), "PUT", b.base+"/v2/service_instances/"+id, osbBody, osb); err != nil {
			return err
		}
		if err := timed(&bDel, expect("OSB DELETE "+id, 200), "DELETE", b.base+"/v2/service_instances/"+id+q, "", osb); err != nil {
			return err
		}
	}
	// What most of the difference is: before placing, the broker asks the
	// agent for its room, and the agent counts its free ports one by one.
	var capa []time.Duration
	for range n {
		if err := timed(&capa, expect("GET /v1/capacity", 200), "GET", a.base+"/v1/capacity", "", nil); err != nil {
			return err
		}
	}
	for _, p := range []int{50, 99} {
		s.add(Row{Figure: fmt.Sprintf("provision through the broker (OSB PUT -> 201), p%d", p), Value: ms(pct(bProv, p)), Unit: "ms",
			Reference: ms(pct(dProv, p)), Aim: "ref: PUT on its agent; <= ref + 5 ms"})
		s.add(Row{Figure: fmt.Sprintf("  added by the broker (its p%d - the agent's)", p), Value: ms(pct(bProv, p) - pct(dProv, p)), Unit: "ms", Aim: "<= 5 ms"})
		if p == 50 {
			s.add(Row{Figure: fmt.Sprintf("  the agent's GET /v1/capacity (%d ports), which the broker asks before placing, p50", s.brokerPorts()),
				Value: ms(pct(capa, 50)), Unit: "ms"})
		}
	}
	for _, p := range []int{50, 99} {
		s.add(Row{Figure: fmt.Sprintf("deprovision through the broker (OSB DELETE -> 200), p%d", p), Value: ms(pct(bDel, p)), Unit: "ms",
			Reference: ms(pct(dDel, p)), Aim: "ref: DELETE on its agent"})
	}
	return nil
}

// brokerStart provisions n small instances directly on the agents, then
// times a broker's start until /readyz is 200 and GET /admin/agents lists
// all n, and deletes them again. It returns the broker, left running.
func (s *suite) brokerStart(f *brokerFleet, n int) (*proc, error) {
	s.logf("broker: %d instances on %d agents", n, len(f.agents))
	id := func(i int) string { return fmt.Sprintf("fleet-%04d", i) }
	err := parallel(n, 16, func(i int) error {
		a := f.agents[i%len(f.agents)]
		return expect("PUT "+id(i)+" on "+a.name, 201)(s.call("PUT", a.base+"/v1/instances/"+id(i), spec, nil))
	})
	if err != nil {
		return nil, err
	}
	// The reference: what listing the fleet costs, once per agent, at
	// once (as the broker looks), the median of 5.
	var lists []time.Duration
	for range 5 {
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			total int
			errs  []error
		)
		t0 := time.Now()
		for _, a := range f.agents {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, body, err := s.call("GET", a.base+"/v1/instances", "", nil)
				var l struct {
					Instances []json.RawMessage `json:"instances"`
				}
				if err == nil {
					err = expect("GET /v1/instances on "+a.name, 200)(code, body, nil)
				}
				if err == nil {
					err = json.Unmarshal(body, &l)
				}
				mu.Lock()
				defer mu.Unlock()
				total += len(l.Instances)
				if err != nil {
					errs = append(errs, err)
				}
			}()
		}
		wg.Wait()
		lists = append(lists, time.Since(t0))
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
		if total != n {
			return nil, fmt.Errorf("the agents list %d instances, want %d", total, n)
		}
	}

	s.logf("broker: start in front of %d agents holding %d instances", len(f.agents), n)
	t0 := time.Now()
	b, err := s.startBroker(f, "broker-fleet", f.agents)
	if err != nil {
		return nil, err
	}
	if _, err := s.waitProcReady(b); err != nil {
		return b, err
	}
	ready := time.Since(t0) // from the exec, not from the first poll
	var listed time.Duration
	for {
		code, body, err := s.call("GET", b.base+"/admin/agents", "", admin)
		if err := expect("GET /admin/agents", 200)(code, body, err); err != nil {
			return b, err
		}
		var l broker.AgentList
		if err := json.Unmarshal(body, &l); err != nil {
			return b, err
		}
		total := 0
		for _, a := range l.Agents {
			total += len(a.Instances)
		}
		if total == n && len(l.Agents) == len(f.agents) {
			listed = time.Since(t0)
			break
		}
		if time.Since(t0) > 2*time.Minute {
			return b, fmt.Errorf("GET /admin/agents lists %d instances of %d after 2m", total, n)
		}
		time.Sleep(time.Millisecond)
	}
	s.add(Row{Figure: fmt.Sprintf("broker start, %d instances on %d agents: exec -> /readyz 200 and /admin/agents lists them", n, len(f.agents)),
		Value: ms(listed), Unit: "ms", Reference: ms(pct(lists, 50)), Aim: "<= 1000 ms; ref: one GET /v1/instances on each agent, at once"})
	s.add(Row{Figure: "  of which exec -> /readyz 200", Value: ms(ready), Unit: "ms"})

	s.logf("broker: deleting the %d instances", n)
	err = parallel(n, 16, func(i int) error {
		a := f.agents[i%len(f.agents)]
		return expect("DELETE "+id(i)+" on "+a.name, 200)(s.call("DELETE", a.base+"/v1/instances/"+id(i), "", nil))
	})
	return b, err
}

// provisionFilled provisions id on agent a as an AOF instance with room
// for mb MiB, binds app to it and writes mb MiB of random values.
func (s *suite) provisionFilled(ctx context.Context, a *proc, id string, mb int) (creds, error) {
	var c creds
	if err := expect("PUT "+id+" on "+a.name, 201)(s.call("PUT", a.base+"/v1/instances/"+id, lifecycleSpec(mb, "aof"), nil)); err != nil {
		return c, err
	}
	code, body, err := s.call("PUT", a.base+"/v1/instances/"+id+"/bindings/app", "", nil)
	if err := expect("bind "+id, 201)(code, body, err); err != nil {
		return c, err
	}
	if err := json.Unmarshal(body, &c); err != nil {
		return c, err
	}
	cl := c.client()
	defer cl.Close()
	return c, fill(ctx, cl, mb<<20/valueSize)
}

// refSnapshot is the reference of a move without replication: id's
// snapshot out of src (GET), and its restore (PUT) into a new instance
// of mb MiB on dst, directly; the copy on dst is deleted again. It
// returns both times and the snapshot's size.
func (s *suite) refSnapshot(f *brokerFleet, src, dst *proc, id string, mb int) (out, in time.Duration, size int64, err error) {
	rdb := filepath.Join(f.dir, id+".rdb")
	defer os.Remove(rdb)
	t0 := time.Now()
	if size, err = s.download(src.base, id, rdb); err != nil {
		return 0, 0, 0, err
	}
	out = time.Since(t0)
	if err := expect("PUT "+id+" on "+dst.name, 201)(s.call("PUT", dst.base+"/v1/instances/"+id, lifecycleSpec(mb, "aof"), nil)); err != nil {
		return 0, 0, 0, err
	}
	t0 = time.Now()
	if err := s.upload(dst.base, id, rdb); err != nil {
		return 0, 0, 0, err
	}
	in = time.Since(t0)
	return out, in, size, expect("DELETE "+id+" on "+dst.name, 200)(s.call("DELETE", dst.base+"/v1/instances/"+id, "", nil))
}

// checkMoved checks id after its move off src: a primary on another
// agent holding its keys of data and every write w had acknowledged (it
// returns how many it lacks), a forwarder on src.
func (s *suite) checkMoved(ctx context.Context, f *brokerFleet, src *proc, id string, c creds, keys int, w *writer) (at instance, lost int64, err error) {
	if at, err = s.newPrimary(f, src, id); err != nil {
		return at, 0, err
	}
	lost, wkeys, err := w.check(ctx, instanceAddr(at))
	if err != nil {
		return at, 0, fmt.Errorf("after the move of %s: %w", id, err)
	}
	cl := goredis.NewClient(&goredis.Options{Addr: instanceAddr(at), Username: c.Username, Password: c.Password, DisableIdentity: true, MaxRetries: -1})
	got, err := cl.DBSize(ctx).Result()
	cl.Close()
	if want := int64(keys) + wkeys; err != nil || got != want {
		return at, 0, fmt.Errorf("after the move %s has %d keys (%v), want %d", id, got, err, want)
	}
	return at, lost, nil
}

// deleteEverywhere deletes id on every agent that has it (a forwarder
// included).
func (s *suite) deleteEverywhere(f *brokerFleet, id string) error {
	for _, a := range f.agents {
		code, body, err := s.call("DELETE", a.base+"/v1/instances/"+id, "", nil)
		if err != nil {
			return err
		}
		if code != 200 && code != 410 {
			return fmt.Errorf("DELETE %s on %s = %d %s", id, a.name, code, body)
		}
	}
	return nil
}

// endDrain clears agent a's drain mark through broker b.
func (s *suite) endDrain(b, a *proc) error {
	return expect("DELETE drain mark of "+a.name, 200)(s.call("DELETE", b.base+"/admin/agents/"+a.name+"/drain", "", admin))
}

// sumWrites adds up the writers' acknowledged writes and failed commands.
func sumWrites(ws []*writer) (acked, errs int64) {
	for _, w := range ws {
		acked += w.ackedAll()
		errs += w.errs
	}
	return acked, errs
}

// brokerDrain fills n AOF instances with mb MiB each on the first agent
// and drains it through broker b onto the others while a writer per
// instance writes at its binding's address; its reference is a snapshot
// out of one such instance and its restore into the second agent, done
// directly first. The drain mark is cleared afterwards.
func (s *suite) brokerDrain(ctx context.Context, f *brokerFleet, b *proc, n, mb int) error {
	if n < 1 || mb < 1 {
		return nil
	}
	keys := mb << 20 / valueSize
	src, dst := f.agents[0], f.agents[1]
	s.logf("broker: reference move of one %d MiB instance, %s -> %s directly", mb, src.name, dst.name)
	if _, err := s.provisionFilled(ctx, src, "ref-move", mb); err != nil {
		return err
	}
	out, in, _, err := s.refSnapshot(f, src, dst, "ref-move", mb)
	if err != nil {
		return err
	}
	if err := expect("DELETE ref-move on "+src.name, 200)(s.call("DELETE", src.base+"/v1/instances/ref-move", "", nil)); err != nil {
		return err
	}

	s.logf("broker: drain of %s with %d AOF instances of %d MiB, a writer on each", src.name, n, mb)
	id := func(i int) string { return fmt.Sprintf("drain-%02d", i) }
	ids := make([]string, n)
	all := make([]creds, n)
	err = parallel(n, 4, func(i int) error {
		ids[i] = id(i)
		c, err := s.provisionFilled(ctx, src, id(i), mb)
		all[i] = c
		return err
	})
	if err != nil {
		return err
	}
	dr, ws, err := s.watchedDrain(b, src.name, ids, all)
	if err != nil {
		return err
	}
	if dr.State != broker.DrainDone || dr.Moved != n || len(dr.Unavailable) != n || dr.FinishedAt == nil {
		return fmt.Errorf("drain ended %s with %d of %d moved: %s\n%s", dr.State, dr.Moved, n, dr.Error, b.logTail())
	}
	// Every instance serves from one of the others now (a primary, not a
	// replica), with its data, every acknowledged write and its binding's
	// credentials; the source holds at most a forwarder on its old port.
	var lost int64
	var seen []time.Duration
	for i := range n {
		_, l, err := s.checkMoved(ctx, f, src, id(i), all[i], keys, ws[i])
		if err != nil {
			return err
		}
		lost += l
		seen = append(seen, ws[i].gap)
	}
	replicated, err := s.brokerMoves(b, "replication")
	if err != nil {
		return err
	}
	var unavail []time.Duration
	for _, sec := range dr.Unavailable {
		unavail = append(unavail, time.Duration(sec*float64(time.Second)))
	}
	sort.Slice(unavail, func(i, j int) bool { return unavail[i] < unavail[j] })
	ref := out + in
	s.add(Row{Figure: fmt.Sprintf("drain of an agent with %d AOF instances of %d MiB, total", n, mb), Value: dr.FinishedAt.Sub(dr.StartedAt).Seconds(), Unit: "s",
		Reference: (time.Duration(n) * ref).Seconds(), Aim: fmt.Sprintf("ref: %d x (snapshot out + restore in)", n)})
	for _, q := range []struct {
		name string
		d    time.Duration
	}{{"min", unavail[0]}, {"median", pct(unavail, 50)}, {"max", unavail[len(unavail)-1]}} {
		s.add(Row{Figure: "  unavailability per instance (drain status), " + q.name, Value: ms(q.d), Unit: "ms",
			Reference: ms(ref), Aim: "ref: snapshot out + restore in of one, directly"})
	}
	for _, q := range []struct {
		name string
		p    int
	}{{"p50", 50}, {"max", 100}} {
		s.add(Row{Figure: "  unavailability per instance seen by a client writing at its old address, " + q.name, Value: ms(pct(seen, q.p)), Unit: "ms",
			Reference: ms(ref), Aim: fmt.Sprintf("<= 100 ms; drain status %s: %.2f ms; ref: snapshot out + restore in", q.name, ms(pct(unavail, q.p)))})
	}
	acked, errs := sumWrites(ws)
	s.add(Row{Figure: "  acknowledged writes lost (INCR counters and XADD stream, read on the new primaries)", Value: float64(lost), Unit: "",
		Aim: fmt.Sprintf("0; of %d acknowledged", acked)})
	s.add(Row{Figure: "  the writers' failed commands (each followed by a reconnect)", Value: float64(errs), Unit: ""})
	s.add(Row{Figure: "  moved by replication (the others by snapshot)", Value: float64(replicated), Unit: "", Aim: strconv.Itoa(n)})
	s.add(Row{Figure: fmt.Sprintf("  ref: snapshot out (GET) of one %d MiB instance", mb), Value: ms(out), Unit: "ms"})
	s.add(Row{Figure: "  ref: its restore in (PUT -> 200 ready) on another agent", Value: ms(in), Unit: "ms"})

	s.logf("broker: deleting the drained instances (and the forwarders on %s)", src.name)
	if err := parallel(n, 4, func(i int) error { return s.deleteEverywhere(f, id(i)) }); err != nil {
		return err
	}
	return s.endDrain(b, src)
}

// brokerBigMove moves one AOF instance of mb MiB through broker b, by a
// drain of the second agent holding only it, with a writer at its
// binding's address; its reference is a snapshot out of it and a restore
// into the third agent, directly, before the move.
func (s *suite) brokerBigMove(ctx context.Context, f *brokerFleet, b *proc, mb int) error {
	if mb < 1 {
		return nil
	}
	const id = "big-move"
	keys := mb << 20 / valueSize
	src, other := f.agents[1], f.agents[2]
	s.logf("broker: one %d MiB AOF instance on %s, its reference move to %s directly", mb, src.name, other.name)
	c, err := s.provisionFilled(ctx, src, id, mb)
	if err != nil {
		return err
	}
	out, in, size, err := s.refSnapshot(f, src, other, id, mb)
	if err != nil {
		return err
	}
	before, err := s.brokerMoves(b, "replication")
	if err != nil {
		return err
	}
	s.logf("broker: drain of %s holding only it, a writer on it", src.name)
	dr, ws, err := s.watchedDrain(b, src.name, []string{id}, []creds{c})
	if err != nil {
		return err
	}
	if dr.State != broker.DrainDone || dr.Moved != 1 || len(dr.Unavailable) != 1 || dr.FinishedAt == nil {
		return fmt.Errorf("drain of %s ended %s with %d of 1 moved: %s\n%s", src.name, dr.State, dr.Moved, dr.Error, b.logTail())
	}
	at, lost, err := s.checkMoved(ctx, f, src, id, c, keys, ws[0])
	if err != nil {
		return err
	}
	// What the target read from the source over its replication link:
	// the initial sync's RDB and the stream after it.
	sent, err := infoStat(ctx, instanceAddr(at), c, "stats", "total_net_repl_input_bytes")
	if err != nil {
		return fmt.Errorf("INFO stats of %s on its new primary: %w", id, err)
	}
	after, err := s.brokerMoves(b, "replication")
	if err != nil {
		return err
	}
	ref := out + in
	unavail := time.Duration(dr.Unavailable[id] * float64(time.Second))
	s.add(Row{Figure: fmt.Sprintf("move of one %d MiB AOF instance through the broker (a drain of its agent), total", mb), Value: ms(dr.FinishedAt.Sub(dr.StartedAt)), Unit: "ms",
		Reference: ms(ref), Aim: "ref: snapshot out + restore in of it, directly"})
	s.add(Row{Figure: "  its unavailability seen by a client writing at its old address", Value: ms(ws[0].gap), Unit: "ms",
		Reference: ms(ref), Aim: fmt.Sprintf("<= 100 ms; drain status: %.2f ms; ref: snapshot out + restore in", ms(unavail))})
	s.add(Row{Figure: "  its unavailability (drain status)", Value: ms(unavail), Unit: "ms", Reference: ms(ref), Aim: "ref: snapshot out + restore in"})
	s.add(Row{Figure: "  bytes sent to the target (its total_net_repl_input_bytes after the move)", Value: float64(sent) / (1 << 20), Unit: "MiB",
		Reference: float64(size) / (1 << 20), Aim: "ref: its snapshot's RDB"})
	s.add(Row{Figure: "  acknowledged writes lost (read on the new primary)", Value: float64(lost), Unit: "",
		Aim: fmt.Sprintf("0; of %d acknowledged", ws[0].ackedAll())})
	s.add(Row{Figure: "  the writer's failed commands (each followed by a reconnect)", Value: float64(ws[0].errs), Unit: ""})
	s.add(Row{Figure: "  moved by replication", Value: float64(after - before), Unit: "", Aim: "1"})
	s.add(Row{Figure: fmt.Sprintf("  ref: snapshot out (GET) of it, %.0f MiB RDB", float64(size)/(1<<20)), Value: ms(out), Unit: "ms"})
	s.add(Row{Figure: "  ref: its restore in (PUT -> 200 ready) on another agent", Value: ms(in), Unit: "ms"})

	if err := s.deleteEverywhere(f, id); err != nil {
		return err
	}
	return s.endDrain(b, src)
}

// brokerMoves reads the broker's count of moves made by method from its
// /metrics.
func (s *suite) brokerMoves(b *proc, method string) (int, error) {
	code, body, err := s.call("GET", b.base+"/metrics", "", nil)
	if err := expect("GET /metrics of the broker", 200)(code, body, err); err != nil {
		return 0, err
	}
	prefix := `redis_broker_moves_total{method="` + method + `"} `
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	return 0, fmt.Errorf("the broker's /metrics has no %s", strings.TrimSpace(prefix))
}

// brokerNote is the page's paragraph on the broker's figures, when the
// run has them.
func (r Result) brokerNote() string {
	for _, row := range r.Rows {
		if strings.Contains(row.Figure, "through the broker") {
			return "Broker: the real `redis-broker` in front of three agents of its own (run after the figures above, on the same ports), in the same run as its references on those agents. Provision and deprovision: the built-in catalog's `cache` plan over OSB (`X-Broker-API-Version: 2.17`, basic auth, synchronous) with one agent behind the broker, interleaved one at a time with a PUT and a DELETE of the same spec on that agent (50 each way in `make bench`, so p99 is the slowest); the broker looks the id up on its agents, asks their `/v1/capacity` and `/readyz`, places, and looks the id up again, and the capacity call's own time is given below the difference. Broker start: the agents hold the instances of the density figure between them (16 MiB, no persistence); timed from the exec of the broker until `/readyz` is 200 and `GET /admin/agents` (which looks at the fleet again) lists every instance; its reference is one `GET /v1/instances` on each agent at once, the median of 5. Drain: AOF instances filled with 1 KiB random values on one agent, `POST /admin/agents/{name}/drain` moves them one at a time to the other two (spread); the total is the drain status's `finished_at - started_at`, each instance's unavailability its `unavailable_seconds`: how long the instance took no writes, which for a move by replication (the broker's way when the persistence stays; the row below says how many went that way) is the cutover (writes paused, tenants fenced, target promoted), and for a move by snapshot the copy. Afterwards every instance is checked: a primary on its new agent with its old credentials and all its keys, a forwarder on its old port. The reference is a snapshot out (GET) of one such instance and its restore (PUT) into another agent, done directly: the unavailability of a move without replication. While the drain runs, a writer per instance (go-redis, one connection, the binding's credentials at the address the binding gave: the source agent's port, a forwarder to the target after the cutover) INCRs 4 counters in turn and XADDs to a stream after each round, pausing 1 ms after each acknowledged command; after a failed one (refused, reset, fenced) it dials again 1 ms later. The unavailability a client sees is the longest time between two of its acknowledged writes that overlaps its instance's move (from when the drain status, polled every 2 ms, first names the instance as current to when it names the next or ends), so ~1 ms is its floor, and a write held by the cutover's pause counts until it is acknowledged; the drain status's figure is in the aim column. Afterwards every counter and the stream's length are read on the new primary: a write lost is an acknowledged INCR or XADD missing there (a failed command may or may not have been applied; more than was sent would fail the run). Last, one AOF instance of the snapshot figure's size alone on the second agent, moved by a drain of that agent (its mark cleared after each drain) with the same writer on it: the total is that drain's `finished_at - started_at`, the bytes sent are what the target read over its replication link (the initial sync's RDB and the stream after it: the new primary's `total_net_repl_input_bytes` in INFO stats, read by the binding user after the move), next to the size of the RDB its snapshot gives; the reference is a snapshot out of it and its restore into the third agent, directly, before the move.\n\n"
		}
	}
	return ""
}
