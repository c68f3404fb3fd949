// Package benchsuite measures the agent against bare redis-server on this
// machine: provisioning, deletion, crash recovery, snapshot and restore,
// rolling upgrade, density, agent restart and API throughput; then, given
// the broker binary, the broker's provision overhead, start at density and
// drain (broker.go). Each figure is next to a reference measured in the
// same run. It drives the real binaries over HTTP on loopback; test/bench
// is its command and `make bench` runs it.
package benchsuite

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
)

// Config says what to run.
type Config struct {
	// Agent is the redis-agent binary; RedisServer the redis-server one.
	Agent, RedisServer string
	// Broker is the redis-broker binary; "" leaves out the broker
	// scenarios. They run three agents of their own after the others,
	// each on a third of the ports of the agent's range and the bare
	// references'.
	Broker string
	// BrokerSamples is the number of provisions and deletes measured
	// through the broker and, as many, directly on its agent.
	BrokerSamples int
	// DrainInstances AOF instances of DrainMB MiB of data each are on the
	// agent the broker drains.
	DrainInstances, DrainMB int
	// Dir is a scratch directory (data dirs of the agent and the bare
	// reference).
	Dir string
	// PortMin starts the port range; the agent gets Density ports.
	PortMin int
	// Samples is the number of provisions and deletes measured.
	Samples int
	// Concurrency of the concurrent provision scenario.
	Concurrency int
	// Kills is the number of crash recoveries measured.
	Kills int
	// Density is the number of instances of the density scenario.
	Density int
	// Idle is how long the density scenario measures the idle agent.
	Idle time.Duration
	// APIDuration and APIClients drive the GET throughput scenario.
	APIDuration time.Duration
	APIClients  int
	// SnapshotMB is the dataset of the snapshot and restore scenario;
	// RolloutInstances the number of small instances the rolling upgrade
	// moves besides it.
	SnapshotMB       int
	RolloutInstances int
	// BenchRequests is redis-benchmark's -n in the TLS scenario (0 is
	// 200000); its handshake figure runs for APIDuration.
	BenchRequests int
	// VersityGW is the Versity S3 gateway binary the backup figures run
	// against; "" leaves them out.
	VersityGW string
	// IOMB is the noisy tenant's data set of the IO scenario, IODuration
	// how long the quiet neighbour is measured on each side; 0 leaves the
	// scenario out.
	IOMB       int
	IODuration time.Duration
	// IOLimitMBs is the noisy tenant's write limit in MiB/s; 0 is 20.
	IOLimitMBs int
	// Only, when not empty, names the scenarios to run (Scenarios lists
	// them); the bare start references always run. A scenario that needs
	// another's instances runs that one too (api and restart need
	// density, rollout needs snapshot).
	Only []string
	// Log receives progress lines.
	Log io.Writer
	// AgentArgs are flags added to every start of the agent (say,
	// --pprof-listen to profile it).
	AgentArgs []string
	// AgentLog, when set, receives the agent's own log at level info (it
	// says how long each step of a restore or snapshot took); otherwise
	// the agent logs warnings only, kept for an error.
	AgentLog io.Writer
}

// Scenarios are the names Config.Only takes, in the order they run.
var Scenarios = []string{"provision", "tls", "concurrent", "crash", "launcher", "snapshot", "backup", "io", "rollout", "density", "api", "restart", "coldboot", "broker"}

// needs are the scenarios a scenario cannot run without.
var needs = map[string][]string{"rollout": {"snapshot"}, "backup": {"snapshot"}, "api": {"density"}, "restart": {"density"}, "coldboot": {"density"}}

// runs reports whether scenario name is to run.
func (c Config) runs(name string) bool {
	if len(c.Only) == 0 {
		return true
	}
	for _, o := range c.Only {
		if o == name || slices.Contains(needs[o], name) {
			return true
		}
	}
	return false
}

// Row is one figure of the table.
type Row struct {
	Figure    string
	Value     float64
	Unit      string
	Reference float64 // 0 when there is none
	Aim       string
}

// Ratio is Value/Reference, or 0.
func (r Row) Ratio() float64 {
	if r.Reference == 0 {
		return 0
	}
	return r.Value / r.Reference
}

// Result is a whole run.
type Result struct {
	Rows    []Row
	Machine string
	Started time.Time
	Took    time.Duration
}

type agentProc struct {
	cmd    *exec.Cmd
	base   string
	exited chan struct{}
	log    *bytes.Buffer
}

type suite struct {
	cfg    Config
	client *http.Client
	agent  *agentProc
	data   string
	rows   []Row
	// extra are flags added to the agent's (launcherCost's --confine off).
	extra []string
	// s3 is the backup target, when Config.VersityGW is set.
	s3 *s3Server
	// snapOut is the snapshot GET of this run, the backup's reference.
	snapOut time.Duration
	snapMiB float64
}

func (s *suite) logf(format string, args ...any) {
	if s.cfg.Log != nil {
		fmt.Fprintf(s.cfg.Log, format+"\n", args...)
	}
}

func (s *suite) add(r Row) {
	s.rows = append(s.rows, r)
	if r.Reference != 0 {
		s.logf("  %-44s %10.2f %-5s (ref %.2f, %.2fx)", r.Figure, r.Value, r.Unit, r.Reference, r.Ratio())
		return
	}
	s.logf("  %-44s %10.2f %-5s", r.Figure, r.Value, r.Unit)
}

// Run runs every scenario and returns the table. It leaves no process
// behind: the instances are deleted and the agent stopped, and on an
// error every redis-server under its data dir is killed.
func Run(ctx context.Context, cfg Config) (res Result, err error) {
	res.Started = time.Now()
	s := &suite{cfg: cfg, client: &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 256}}}
	s.data = filepath.Join(cfg.Dir, "agent")
	if err := os.MkdirAll(s.data, 0o755); err != nil {
		return res, err
	}
	for p := cfg.Dir; p != "/" && p != "."; p = filepath.Dir(p) {
		os.Chmod(p, 0o755) // the unprivileged redis user walks to its files
	}
	defer func() {
		if s.agent != nil {
			s.stopAgent(syscall.SIGKILL)
		}
		for pid := range redisUnder(s.data) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		res.Took = time.Since(res.Started)
	}()
	res.Machine = machine(cfg.RedisServer)
	if cfg.VersityGW != "" {
		if s.s3, err = startS3(cfg.VersityGW, filepath.Join(cfg.Dir, "s3")); err != nil {
			return res, fmt.Errorf("S3 server: %w", err)
		}
		defer s.s3.stop()
	}

	bare, err := s.bareStart(cfg.Samples, 1)
	if err != nil {
		return res, fmt.Errorf("bare redis-server: %w", err)
	}
	bareConc, err := s.bareStart(cfg.Samples, cfg.Concurrency)
	if err != nil {
		return res, fmt.Errorf("bare redis-server: %w", err)
	}
	bareP50 := pct(bare, 50)
	s.add(Row{Figure: "bare redis-server start, p50", Value: ms(bareP50), Unit: "ms"})
	s.add(Row{Figure: "bare redis-server start, p99", Value: ms(pct(bare, 99)), Unit: "ms"})

	if err := s.linkBinary(cfg.RedisServer); err != nil {
		return res, err
	}
	if err := s.startAgent(); err != nil {
		return res, err
	}
	if cfg.runs("provision") {
		prov, del, err := s.provisionDelete(cfg.Samples)
		if err != nil {
			return res, err
		}
		s.add(Row{Figure: "provision (PUT -> 201 ready), sequential, p50", Value: ms(pct(prov, 50)), Unit: "ms", Reference: ms(bareP50), Aim: "<= 2x bare"})
		s.add(Row{Figure: "provision, sequential, p99", Value: ms(pct(prov, 99)), Unit: "ms", Reference: ms(pct(bare, 99))})
		s.add(Row{Figure: "delete (DELETE -> 200), p50", Value: ms(pct(del, 50)), Unit: "ms"})
		s.add(Row{Figure: "delete, p99", Value: ms(pct(del, 99)), Unit: "ms"})
	}
	if cfg.runs("tls") {
		requests := cfg.BenchRequests
		if requests <= 0 {
			requests = 200000
		}
		if err := s.tlsThroughput(requests, cfg.APIDuration); err != nil {
			return res, fmt.Errorf("TLS: %w", err)
		}
	}

	if cfg.runs("concurrent") {
		conc, err := s.provisionConcurrent(cfg.Samples, cfg.Concurrency)
		if err != nil {
			return res, err
		}
		// Its reference is as many bare redis-servers started at once: on a
		// small machine the starts themselves compete for the cores.
		s.add(Row{Figure: fmt.Sprintf("provision, %d concurrent callers, p50", cfg.Concurrency), Value: ms(pct(conc, 50)), Unit: "ms", Reference: ms(pct(bareConc, 50))})
		s.add(Row{Figure: fmt.Sprintf("provision, %d concurrent callers, p99", cfg.Concurrency), Value: ms(pct(conc, 99)), Unit: "ms", Reference: ms(pct(bareConc, 99))})
	}

	if cfg.runs("crash") {
		rec, err := s.crashRecovery(cfg.Kills)
		if err != nil {
			return res, err
		}
		s.add(Row{Figure: "crash recovery (SIGKILL -> binding PING), p50", Value: ms(pct(rec, 50)), Unit: "ms", Reference: ms(bareP50), Aim: "<= 3x bare"})
		s.add(Row{Figure: "crash recovery, p99", Value: ms(pct(rec, 99)), Unit: "ms"})
	}
	if cfg.runs("launcher") {
		if err := s.launcherCost(cfg.Samples, cfg.Kills); err != nil {
			return res, fmt.Errorf("launcher cost: %w", err)
		}
	}

	if cfg.runs("snapshot") {
		if err := s.snapshotRestore(ctx, cfg.SnapshotMB); err != nil {
			return res, err
		}
		if s.s3 != nil && cfg.runs("backup") {
			if err := s.backupScenario(ctx, "snap-src", s.snapMiB, s.snapOut); err != nil {
				return res, fmt.Errorf("backup: %w", err)
			}
		}
	}
	if cfg.runs("io") {
		if err := s.ioNeighbours(ctx, cfg.IOMB, cfg.IOLimitMBs, cfg.IODuration); err != nil {
			return res, fmt.Errorf("IO neighbours: %w", err)
		}
	}
	if cfg.runs("rollout") {
		if err := s.rollingUpgrade(ctx, cfg.RolloutInstances); err != nil {
			return res, err
		}
	} else if cfg.runs("snapshot") {
		if _, err := s.remove("snap-src"); err != nil {
			return res, err
		}
	}

	if cfg.runs("density") {
		if err := s.density(cfg.Density, cfg.Idle); err != nil {
			return res, err
		}
		if cfg.runs("api") {
			if err := s.api(cfg.APIDuration, cfg.APIClients); err != nil {
				return res, err
			}
		}
		if cfg.runs("restart") {
			if err := s.agentRestart(); err != nil {
				return res, err
			}
		}
		if cfg.runs("coldboot") {
			if err := s.coldBoot(ctx, cfg.Density); err != nil {
				return res, fmt.Errorf("cold boot: %w", err)
			}
		}
		if err := s.deleteAll(); err != nil {
			return res, err
		}
	}
	s.stopAgent(syscall.SIGTERM)
	s.agent = nil
	if cfg.Broker != "" && cfg.runs("broker") {
		if err := s.brokerScenarios(ctx); err != nil {
			return res, fmt.Errorf("broker: %w", err)
		}
	}
	res.Rows = s.rows
	return res, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	return s[min(max(i-1, 0), len(s)-1)]
}

// bareConf writes the minimal config of a bare reference redis-server in
// dir (no persistence) and returns its path.
func bareConf(dir string, port int) (string, error) {
	conf := filepath.Join(dir, "redis.conf")
	return conf, os.WriteFile(conf, fmt.Appendf(nil, "port %d\nbind 127.0.0.1\ndir %s\nsave \"\"\nappendonly no\n", port, dir), 0o644)
}

// bareStart execs redis-server with a minimal config and polls it every
// millisecond with PING on a fresh connection until it answers: the floor
// of provision and recovery. workers start servers at the same time, each
// on its own port, n starts in all.
func (s *suite) bareStart(n, workers int) ([]time.Duration, error) {
	s.logf("bare redis-server start x%d, %d at a time", n, workers)
	var (
		mu   sync.Mutex
		out  []time.Duration
		next atomic.Int64
		wg   sync.WaitGroup
		errs = make(chan error, workers)
	)
	for w := range workers {
		dir := filepath.Join(s.cfg.Dir, "bare", strconv.Itoa(w))
		os.MkdirAll(dir, 0o755)
		port := s.barePort(w)
		conf, err := bareConf(dir, port)
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				cmd := exec.Command(s.cfg.RedisServer, conf)
				t0 := time.Now()
				if err := cmd.Start(); err != nil {
					errs <- err
					return
				}
				deadline := t0.Add(10 * time.Second)
				for !resp(addr, "", "", "PING") {
					if time.Now().After(deadline) {
						cmd.Process.Kill()
						cmd.Wait()
						errs <- errors.New("no PONG in 10s")
						return
					}
					time.Sleep(time.Millisecond)
				}
				d := time.Since(t0)
				cmd.Process.Kill()
				cmd.Wait()
				mu.Lock()
				out = append(out, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	return out, nil
}

// resp sends AUTH (when user is set) and one command on a fresh
// connection and reports whether every reply was a simple string (+OK,
// +PONG).
func resp(addr, user, pass string, cmd ...string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	var req []byte
	n := 1
	if user != "" {
		req = fmt.Appendf(req, "*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(user), user, len(pass), pass)
		n++
	}
	req = fmt.Appendf(req, "*%d\r\n", len(cmd))
	for _, a := range cmd {
		req = fmt.Appendf(req, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write(req); err != nil {
		return false
	}
	r := bufio.NewReader(c)
	for range n {
		line, err := r.ReadString('\n')
		if err != nil || line[0] != '+' {
			return false
		}
	}
	return true
}

func (s *suite) startAgent() error {
	if err := s.launchAgent(); err != nil {
		return err
	}
	_, err := s.waitReady()
	return err
}

// launchAgent starts the agent and returns without waiting for it.
// spareAgentPorts are the agent's ports beyond the density's instances:
// the instances other scenarios leave by then (the snapshot source) and
// a TLS instance's second port.
const spareAgentPorts = 16

// agentPorts is the size of the agent's port range, from PortMin.
func (s *suite) agentPorts() int { return s.cfg.Density + spareAgentPorts }

// barePort is the i-th port of the bare references (i < Concurrency),
// above the agent's range.
func (s *suite) barePort(i int) int { return s.cfg.PortMin + s.agentPorts() + 1 + i }

func (s *suite) launchAgent() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	listen := ln.Addr().String()
	ln.Close()
	a := &agentProc{base: "http://" + listen, exited: make(chan struct{}), log: &bytes.Buffer{}}
	level, out := "warn", io.Writer(a.log)
	if s.cfg.AgentLog != nil {
		level, out = "info", io.MultiWriter(a.log, s.cfg.AgentLog)
	}
	args := []string{"--listen", listen, "--data-dir", s.data, "--redis-server", s.bin(),
		"--port-min", strconv.Itoa(s.cfg.PortMin), "--port-max", strconv.Itoa(s.cfg.PortMin + s.agentPorts() - 1),
		"--memory-budget-mb", strconv.Itoa(16*s.cfg.Density + 4*s.cfg.SnapshotMB + 2*s.cfg.IOMB + 1024), "--log-level", level, "--log-format", "json",
		"--restart-stable-after", "200ms",
		// The density's 1000 AOF instances reserve 121 MiB of disk each
		// (3 x maxmemory + 64 MiB, and the logs' bound): more than a
		// bench machine holds, for instances that write nearly nothing.
		// The figures are of the processes, not of the disk budget.
		"--disk-budget", "off"}
	args = append(args, s.cfg.AgentArgs...)
	args = append(args, s.extra...)
	a.cmd = exec.Command(s.cfg.Agent, args...)
	if s.s3 != nil {
		a.cmd.Args = append(a.cmd.Args, s.s3.agentFlags()...)
		a.cmd.Env = append(os.Environ(), s.s3.agentEnv()...)
	}
	a.cmd.Stdout, a.cmd.Stderr = out, out
	if err := a.cmd.Start(); err != nil {
		return err
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	s.agent = a
	return nil
}

func (s *suite) waitReady() (time.Duration, error) {
	t0 := time.Now()
	deadline := t0.Add(2 * time.Minute)
	for {
		select {
		case <-s.agent.exited:
			return 0, fmt.Errorf("agent exited: %v\n%s", s.agent.cmd.ProcessState, s.agent.log.String())
		default:
		}
		if code, _, err := s.do("GET", "/readyz", ""); err == nil && code == 200 {
			return time.Since(t0), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("agent not ready after 2m:\n%s", s.agent.log.String())
		}
		time.Sleep(time.Millisecond)
	}
}

func (s *suite) stopAgent(sig syscall.Signal) {
	s.agent.cmd.Process.Signal(sig)
	select {
	case <-s.agent.exited:
	case <-time.After(30 * time.Second):
		s.agent.cmd.Process.Kill()
		<-s.agent.exited
	}
}

func (s *suite) do(method, path, body string) (int, []byte, error) {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.agent.base+path, r)
	if err != nil {
		return 0, nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// spec is the instance of the provision and crash figures: no
// persistence, as the bare reference has none.
const spec = `{"memory_mb":16,"persistence":"none"}`

// denseSpec is an instance of the density and cold boot figures: the
// default persistence (aof).
const denseSpec = `{"memory_mb":16,"persistence":"aof"}`

func (s *suite) provision(id string) (time.Duration, error) { return s.provisionSpec(id, spec) }

func (s *suite) provisionSpec(id, spec string) (time.Duration, error) {
	t0 := time.Now()
	code, body, err := s.do("PUT", "/v1/instances/"+id, spec)
	d := time.Since(t0)
	if err != nil {
		return 0, err
	}
	if code != 201 {
		return 0, fmt.Errorf("PUT %s = %d %s", id, code, body)
	}
	return d, nil
}

func (s *suite) remove(id string) (time.Duration, error) {
	t0 := time.Now()
	code, body, err := s.do("DELETE", "/v1/instances/"+id, "")
	d := time.Since(t0)
	if err != nil {
		return 0, err
	}
	if code != 200 {
		return 0, fmt.Errorf("DELETE %s = %d %s", id, code, body)
	}
	return d, nil
}

func (s *suite) provisionDelete(n int) (prov, del []time.Duration, err error) {
	s.logf("provision and delete x%d, sequential", n)
	for i := range n {
		id := fmt.Sprintf("seq-%d", i)
		d, err := s.provision(id)
		if err != nil {
			return nil, nil, err
		}
		prov = append(prov, d)
		if d, err = s.remove(id); err != nil {
			return nil, nil, err
		}
		del = append(del, d)
	}
	return prov, del, nil
}

func (s *suite) provisionConcurrent(n, workers int) ([]time.Duration, error) {
	s.logf("provision x%d with %d concurrent callers", n, workers)
	var (
		mu  sync.Mutex
		out []time.Duration
	)
	err := parallel(n, workers, func(i int) error {
		d, err := s.provision(fmt.Sprintf("conc-%d", i))
		if err != nil {
			return err
		}
		mu.Lock()
		out = append(out, d)
		mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i := range n {
		if _, err := s.remove(fmt.Sprintf("conc-%d", i)); err != nil {
			return nil, err
		}
	}
	return out, nil
}

type instance = apitype.Instance

// creds are a binding's credentials, with the helpers the suite adds.
type creds struct{ apitype.Credentials }

func (s *suite) get(id string) (instance, error) {
	var in instance
	code, body, err := s.do("GET", "/v1/instances/"+id, "")
	if err != nil {
		return in, err
	}
	if code != 200 {
		return in, fmt.Errorf("GET %s = %d", id, code)
	}
	return in, json.Unmarshal(body, &in)
}

// crashRecovery SIGKILLs one stable instance n times and times how long
// until its binding user's authenticated PING works again. The agent runs
// with --restart-stable-after 200ms and each kill waits 300ms of stable
// running, so every crash is a first crash (immediate restart).
func (s *suite) crashRecovery(n int) ([]time.Duration, error) {
	s.logf("crash recovery x%d", n)
	if _, err := s.provision("crashy"); err != nil {
		return nil, err
	}
	code, body, err := s.do("PUT", "/v1/instances/crashy/bindings/app", "")
	if err != nil || code != 201 {
		return nil, fmt.Errorf("bind: %d %s %v", code, body, err)
	}
	var c creds
	json.Unmarshal(body, &c)
	addr := net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
	var out []time.Duration
	for range n {
		time.Sleep(300 * time.Millisecond)
		in, err := s.get("crashy")
		if err != nil {
			return nil, err
		}
		if in.State != "running" || in.PID == 0 {
			return nil, fmt.Errorf("crashy is %s", in.State)
		}
		t0 := time.Now()
		syscall.Kill(in.PID, syscall.SIGKILL)
		// Wait for the old process to be gone so the PING below cannot
		// reach it.
		for resp(addr, c.Username, c.Password, "PING") && time.Since(t0) < time.Second {
			time.Sleep(100 * time.Microsecond)
		}
		for !resp(addr, c.Username, c.Password, "PING") {
			if time.Since(t0) > 30*time.Second {
				return nil, errors.New("no recovery in 30s")
			}
			time.Sleep(100 * time.Microsecond)
		}
		out = append(out, time.Since(t0))
	}
	_, err = s.remove("crashy")
	return out, err
}

// parallel runs fn(0..n-1) on workers goroutines and returns the first
// error; a worker stops at its first error.
func parallel(n, workers int, fn func(i int) error) error {
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		errs = make(chan error, workers)
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				if err := fn(int(i)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// density fills the port range, then watches the idle agent, and says
// what the instances take: their processes' PSS (shared pages counted
// once in all), and the machine's used memory (MemTotal - MemAvailable)
// after provisioning them less before, which is what a VM sized for them
// needs besides (the kernel's part, sockets and cgroups, included; other
// work on the machine in the meantime too).
func (s *suite) density(n int, idle time.Duration) error {
	s.logf("density: %d instances", n)
	usedBefore, err := memUsed()
	if err != nil {
		return err
	}
	t0 := time.Now()
	err = parallel(n, 16, func(i int) error {
		_, err := s.provisionSpec(fmt.Sprintf("dense-%04d", i), denseSpec)
		return err
	})
	if err != nil {
		return err
	}
	s.add(Row{Figure: "instances provisioned", Value: float64(n), Unit: "", Aim: "1000"})
	s.add(Row{Figure: "time to provision them (16 callers)", Value: time.Since(t0).Seconds(), Unit: "s"})
	// Two windows: the first starts right after the last provision (the
	// new instances' first checks and syncs still run), the second is the
	// steady state.
	pid := s.agent.cmd.Process.Pid
	var rss, cpuFirst, cpuNext float64
	for i, out := range []*float64{&cpuFirst, &cpuNext} {
		s.logf("idle window %d: %v", i+1, idle)
		_, cpu0 := procUsage(pid)
		w0 := time.Now()
		time.Sleep(idle)
		var cpu1 float64
		rss, cpu1 = procUsage(pid)
		*out = 100 * (cpu1 - cpu0) / time.Since(w0).Seconds()
	}
	usedAfter, err := memUsed()
	if err != nil {
		return err
	}
	var redisPSS, redisRSS float64
	servers := redisUnder(s.data)
	for p := range servers {
		pss, rss, err := smapsRollup(p)
		if err != nil {
			return err
		}
		redisPSS += pss
		redisRSS += rss
	}
	mib := float64(1 << 20)
	s.add(Row{Figure: fmt.Sprintf("agent RSS at %d instances", n), Value: rss / mib, Unit: "MiB", Aim: "<= 100 MiB"})
	s.add(Row{Figure: fmt.Sprintf("agent idle CPU at %d, first %v after provisioning", n, idle), Value: cpuFirst, Unit: "%", Aim: "<= 2 % of a core"})
	s.add(Row{Figure: fmt.Sprintf("agent idle CPU at %d, the %v after", n, idle), Value: cpuNext, Unit: "%", Aim: "<= 2 % of a core"})
	s.add(Row{Figure: fmt.Sprintf("memory of the %d idle instances: machine's used memory after - before provisioning", n), Value: (usedAfter - usedBefore) / mib, Unit: "MiB", Aim: "MemTotal - MemAvailable"})
	s.add(Row{Figure: "  per instance", Value: (usedAfter - usedBefore) / mib / float64(n), Unit: "MiB"})
	s.add(Row{Figure: fmt.Sprintf("  their redis-servers' PSS, all %d", len(servers)), Value: redisPSS / mib, Unit: "MiB", Aim: "shared pages counted once"})
	s.add(Row{Figure: "  per instance (PSS)", Value: redisPSS / mib / float64(max(len(servers), 1)), Unit: "MiB"})
	s.add(Row{Figure: "  per instance RSS (its shared pages counted in each: not its cost)", Value: redisRSS / mib / float64(max(len(servers), 1)), Unit: "MiB"})
	return nil
}

// kbFields reads the "Name: <n> kB" lines of a /proc file (meminfo,
// smaps_rollup) as bytes by name, the colon kept.
func kbFields(b []byte) map[string]float64 {
	out := map[string]float64{}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 {
			kb, _ := strconv.ParseFloat(f[1], 64)
			out[f[0]] = kb * 1024
		}
	}
	return out
}

// memUsed is the machine's used memory, MemTotal - MemAvailable, in bytes.
func memUsed() (float64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	kb := kbFields(b)
	total, avail := kb["MemTotal:"], kb["MemAvailable:"]
	if total == 0 || avail == 0 {
		return 0, errors.New("no MemTotal or MemAvailable in /proc/meminfo")
	}
	return total - avail, nil
}

// api measures GET /v1/instances/{id} throughput and /metrics scrapes.
func (s *suite) api(d time.Duration, clients int) error {
	s.logf("API: GET /v1/instances/{id} with %d clients for %v", clients, d)
	var count atomic.Int64
	var failed atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			path := fmt.Sprintf("/v1/instances/dense-%04d", i%max(s.cfg.Density, 1))
			for ctx.Err() == nil {
				if code, _, err := s.do("GET", path, ""); err != nil || code != 200 {
					failed.Add(1)
					continue
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d GETs failed", f)
	}
	s.add(Row{Figure: fmt.Sprintf("GET /v1/instances/{id}, %d clients", clients), Value: float64(count.Load()) / d.Seconds(), Unit: "req/s", Aim: ">= 10000"})
	var scrapes []time.Duration
	for range 10 {
		t0 := time.Now()
		code, body, err := s.do("GET", "/metrics", "")
		if err != nil || code != 200 || len(body) == 0 {
			return fmt.Errorf("/metrics: %d %v", code, err)
		}
		scrapes = append(scrapes, time.Since(t0))
	}
	s.add(Row{Figure: fmt.Sprintf("/metrics scrape at %d instances, p50", s.cfg.Density), Value: ms(pct(scrapes, 50)), Unit: "ms", Aim: "<= 250 ms"})
	return nil
}

// agentRestart stops the agent with SIGTERM at full density, starts it
// again, and counts the redis-servers that did not survive.
func (s *suite) agentRestart() error {
	s.logf("agent restart at density")
	before := redisUnder(s.data)
	s.stopAgent(syscall.SIGTERM)
	t0 := time.Now()
	if err := s.startAgent(); err != nil { // returns once /readyz says 200
		return err
	}
	ready := time.Since(t0)
	after := redisUnder(s.data)
	restarted := 0
	for pid := range before {
		if _, ok := after[pid]; !ok {
			restarted++
		}
	}
	s.add(Row{Figure: fmt.Sprintf("agent restart at %d: start -> /readyz 200", len(before)), Value: ms(ready), Unit: "ms", Aim: "<= 1000 ms"})
	s.add(Row{Figure: "redis-servers restarted by the agent restart", Value: float64(restarted), Unit: "", Aim: "0"})
	return nil
}

func (s *suite) deleteAll() error {
	s.logf("deleting %d instances", s.cfg.Density)
	return parallel(s.cfg.Density, 16, func(i int) error {
		_, err := s.remove(fmt.Sprintf("dense-%04d", i))
		return err
	})
}

// redisUnder returns the live redis-servers whose config lies under dir.
func redisUnder(dir string) map[int]bool {
	out := map[int]bool{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if !bytes.Contains(b, []byte(dir+"/")) {
			continue
		}
		st, _ := os.ReadFile("/proc/" + e.Name() + "/stat")
		if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && st[i+2] != 'Z' {
			out[pid] = true
		}
	}
	return out
}

// procUsage returns RSS in bytes and CPU seconds of pid.
func procUsage(pid int) (rss, cpu float64) {
	p := "/proc/" + strconv.Itoa(pid)
	if b, err := os.ReadFile(p + "/statm"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			pages, _ := strconv.ParseFloat(f[1], 64)
			rss = pages * float64(os.Getpagesize())
		}
	}
	if b, err := os.ReadFile(p + "/stat"); err == nil {
		if i := bytes.LastIndexByte(b, ')'); i > 0 {
			f := strings.Fields(string(b[i+2:]))
			if len(f) > 12 {
				ut, _ := strconv.ParseFloat(f[11], 64)
				st, _ := strconv.ParseFloat(f[12], 64)
				cpu = (ut + st) / 100
			}
		}
	}
	return rss, cpu
}

func machine(redisServer string) string {
	var memTotal string
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
				memTotal = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	ver, _ := exec.Command(redisServer, "--version").Output()
	return fmt.Sprintf("%d cores, %s memory, Linux %s, %s, %s", runtime.NumCPU(), memTotal,
		strings.TrimSpace(string(kernel)), strings.TrimSpace(string(ver)), runtime.Version())
}

// Markdown renders the result as the docs/benchmarks.md page.
func (r Result) Markdown(command string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmarks\n\nMeasured %s with `%s` (took %v).\n\nMachine: %s.\n\n",
		r.Started.UTC().Format("2006-01-02 15:04 MST"), command, r.Took.Round(time.Second), r.Machine)
	b.WriteString("Reference: a bare `redis-server` (minimal config, no persistence) exec'd and polled every millisecond until it answers PING, measured in the same run. Provisions use `{\"memory_mb\":16,\"persistence\":\"none\"}`.\n\n")
	b.WriteString("Snapshot and restore: an AOF instance filled with 1 KiB random values (its AOF rewrite over), its snapshot downloaded (GET with `TE: trailers`, so it comes while the BGSAVE writes it; sha256 checked against the trailer) and restored into a second instance (PUT, until 200 with the instance ready on the data); their references are a bare redis-server SAVE of the same data and a bare redis-server start that loads the same RDB; three rounds of the four, alternating, each figure the median of its three. Density: 1000 AOF instances of 16 MiB (the default persistence), idle (the agent runs with `--disk-budget off`: their worst-case disk reservations would exceed the machine's disk); their memory is the machine's used memory (MemTotal - MemAvailable) after provisioning them less before (what a VM needs for them, the kernel's part and the agent's growth included, and whatever else ran on the machine meanwhile) and their redis-servers' PSS (`/proc/<pid>/smaps_rollup`: a page shared by n processes, of the binary or the libraries, counts 1/n in each); RSS counts such pages in full in every process, so its sum is no cost. Cold boot: each density instance gets a binding and a key, then the agent and every redis-server are SIGKILLed at once (a power loss) and the agent started, timed until every binding answers AUTH and PING on a fresh connection (16 pollers, each waiting a twentieth of the time since the start between its rounds, 10 to 100 ms); the reference is as many bare redis-servers started at once on copies of the same AOF directories and ACL files (taken while all was down), on the same ports, polled the same way; a second reference starts the same bare redis-servers each through `redis-agent-launch` (Landlock to its directory, the seccomp filter) and puts each in a cgroup of its own with a 16 MiB instance's limits (memory, cpu shares, pids) as the agent does: the isolation's cost without the agent's. Rolling upgrade: the agent's redis-server is a symlink, pointed at a copy of the binary before `POST /v1/rollout`; each instance is PINGed by its binding user on a fresh connection every 2 ms, and its unavailability is the longest gap between two answers (so ~3 ms is the floor).\n\n")
	b.WriteString("TLS: `redis-benchmark -t set,get -P 16 -c 50 -d 64` on an instance with `\"tls\":\"optional\"` as its binding user, on its plain port and on its TLS port (`--tls --cacert` with the binding's `ca_cert`), each next to a bare redis-server with the same two listeners (an ECDSA P-256 certificate of a CA of its own, `tls-auth-clients no`) in the same run; handshakes are full TLS handshakes (no session resumption), each on a new connection verified against the CA, from 4 dialers a core.\n\n")
	b.WriteString("IO neighbours: a quiet `aof-always` instance (each SET fsynced before its answer) SETs small keys on one connection, alone and then next to a noisy AOF tenant whose data set (1 KiB random values) the agent snapshots in a loop (`GET .../snapshot`: a BGSAVE, the IO of an AOF rewrite) while a writer overwrites its keys (its AOF grows, and is rewritten when it doubles), in two rounds that alternate the noisy tenant without an IO limit and with `PATCH {\"io\":{\"write_bps\":...}}`; the noisy tenant's snapshots a second show what the limit costs it. Left out where the agent limits no IO (not root, no IO controller).\n\n")
	b.WriteString(r.brokerNote())
	b.WriteString(r.Table())
	return b.String()
}

// Table renders the rows as a Markdown table.
func (r Result) Table() string {
	var b strings.Builder
	b.WriteString("| figure | value | reference | ratio | aim |\n|---|---:|---:|---:|---|\n")
	for _, row := range r.Rows {
		ref, ratio := "", ""
		if row.Reference != 0 {
			ref = fmt.Sprintf("%.2f %s", row.Reference, row.Unit)
			ratio = fmt.Sprintf("%.2fx", row.Ratio())
		}
		fmt.Fprintf(&b, "| %s | %.2f %s | %s | %s | %s |\n", row.Figure, row.Value, row.Unit, ref, ratio, row.Aim)
	}
	return b.String()
}
