// Package test holds the end-to-end tests: they build the real redis-agent
// binary, run it on loopback with temporary directories, and drive it over
// HTTP against real redis-server processes.
package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

var agentBin, brokerBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "redis-agent-e2e")
	if err != nil {
		panic(err)
	}
	// Instance users run the launcher from here.
	if err := os.Chmod(dir, 0o755); err != nil {
		panic(err)
	}
	agentBin = filepath.Join(dir, "redis-agent")
	brokerBin = filepath.Join(dir, "redis-broker")
	build := exec.Command("go", "build", "-race", "-o", dir+"/", "../cmd/redis-agent", "../cmd/redis-broker")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build redis-agent and redis-broker:", err)
		os.Exit(1)
	}
	// The launcher beside them, as make build puts it: without cgo, as
	// the Makefile builds it (it only execs; the race detector has
	// nothing to watch in it).
	build = exec.Command("go", "build", "-o", dir+"/", "../cmd/redis-agent-launch")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build redis-agent-launch:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agentProc is one running redis-agent.
type agentProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	base    string
	dataDir string
	args    []string
	log     *lockedBuffer
	exited  chan struct{}
	// token, when set, is sent as the bearer token of every request.
	token string
}

// lockedBuffer collects the agent's output; the test may read it while
// the agent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// agentOpts say how to run an agent; zero values take defaults.
type agentOpts struct {
	bin     string   // default: the normal build
	env     []string // added to the environment
	dataDir string
	// portMin starts the instance port range, ports ports long (default
	// 20); 0 takes a range of its own from testenv.Ports. A test that
	// restarts an agent on the same range takes it once and sets it.
	portMin int
	ports   int
	extra   []string
	// cred, when set, is the user the agent runs as.
	cred *syscall.Credential
}

// startAgent runs the binary with its own data dir and port range. Extra
// args are appended to the flags.
func startAgent(t *testing.T, dataDir string, portMin int, extra ...string) *agentProc {
	t.Helper()
	return runAgent(t, agentOpts{dataDir: dataDir, portMin: portMin, extra: extra})
}

// launchAgent starts an agent and returns without waiting for it.
func launchAgent(t *testing.T, o agentOpts) *agentProc {
	t.Helper()
	if o.bin == "" {
		o.bin = agentBin
	}
	if o.ports == 0 {
		o.ports = 20
	}
	if o.portMin == 0 {
		o.portMin = testenv.Ports(t, o.ports)
	}
	listen := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	args := append([]string{
		"--listen", listen, "--data-dir", o.dataDir,
		"--port-min", strconv.Itoa(o.portMin), "--port-max", strconv.Itoa(o.portMin + o.ports - 1),
		"--memory-budget-mb", "4096", "--log-level", "debug",
	}, o.extra...)
	a := &agentProc{t: t, base: "http://" + listen, dataDir: o.dataDir, args: args, log: &lockedBuffer{}, exited: make(chan struct{})}
	a.cmd = exec.Command(o.bin, args...)
	a.cmd.Env = append(os.Environ(), o.env...)
	if o.cred != nil {
		a.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: o.cred}
	}
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		a.stop(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("agent log:\n%s", a.log.String())
		}
	})
	return a
}

// runAgent starts an agent and waits until /readyz says 200.
func runAgent(t *testing.T, o agentOpts) *agentProc {
	t.Helper()
	a := launchAgent(t, o)
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-a.exited:
			t.Fatalf("agent exited at start: %v\n%s", a.cmd.ProcessState, a.log.String())
		default:
		}
		if resp, err := http.Get(a.base + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return a
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready after 20s:\n%s", a.log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (a *agentProc) stop(sig syscall.Signal) {
	select {
	case <-a.exited:
		return
	default:
	}
	a.cmd.Process.Signal(sig)
	select {
	case <-a.exited:
	case <-time.After(15 * time.Second):
		a.cmd.Process.Kill()
		<-a.exited
	}
}

// do sends a request and decodes a JSON answer into out (when not nil).
func (a *agentProc) do(method, path, body string, out any) int {
	a.t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, a.base+path, r)
	if err != nil {
		a.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			a.t.Fatalf("%s %s: %d %q: %v", method, path, resp.StatusCode, b, err)
		}
	}
	if resp.StatusCode >= 400 {
		var e struct{ Error, Description string }
		if err := json.Unmarshal(b, &e); err != nil || e.Error == "" || e.Description == "" {
			a.t.Errorf("%s %s: %d with body %q, want a JSON error with error and description", method, path, resp.StatusCode, b)
		}
	}
	return resp.StatusCode
}

// The API's wire types, as a client sees them.
type (
	instance    = apitype.Instance
	credentials = apitype.Credentials
)

func redisClient(t *testing.T, c credentials) *goredis.Client {
	t.Helper()
	opt, err := goredis.ParseURL(c.URI)
	if err != nil {
		t.Fatalf("credentials URI %q: %v", c.URI, err)
	}
	opt.MaxRetries, opt.DialerRetries, opt.DisableIdentity, opt.PoolSize = -1, 1, true, 1
	cl := goredis.NewClient(opt)
	t.Cleanup(func() { cl.Close() })
	return cl
}

// settle is how long a test waits for the agent to get where it should:
// generous, for race-enabled builds on a busy machine.
const settle = 15 * time.Second

func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}

func TestEndToEnd(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	portMin := testenv.Ports(t, 20)
	a := startAgent(t, dataDir, portMin)
	ctx := context.Background()
	var pids []int
	t.Cleanup(func() {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})

	if code := a.do("GET", "/healthz", "", nil); code != 200 {
		t.Fatalf("healthz = %d", code)
	}

	// Provision: 201, then 200 for the same spec, 409 for another.
	var inst instance
	if code := a.do("PUT", "/v1/instances/e2e-1", `{"memory_mb":64,"persistence":"aof"}`, &inst); code != 201 {
		t.Fatalf("PUT instance = %d", code)
	}
	pids = append(pids, inst.PID)
	if inst.State != "running" || inst.Port != portMin || !alive(inst.PID) {
		t.Fatalf("provisioned %+v: want running on %d with a live pid", inst, portMin)
	}
	if code := a.do("PUT", "/v1/instances/e2e-1", `{"memory_mb":64,"persistence":"aof"}`, nil); code != 200 {
		t.Errorf("identical PUT = %d, want 200", code)
	}
	if code := a.do("PUT", "/v1/instances/e2e-1", `{"memory_mb":128,"persistence":"aof"}`, nil); code != 409 {
		t.Errorf("different PUT = %d, want 409", code)
	}
	// Bad input: clear 4xx, nothing created.
	for _, tc := range []struct {
		path, body string
		want       int
	}{
		{"/v1/instances/bad", `{"memory_mb":`, 400},
		{"/v1/instances/bad", `{"memory_mb":64,"colour":"red"}`, 400},
		{"/v1/instances/bad", `{"persistence":"sometimes"}`, 422},
		{"/v1/instances/bad", `{"memory_mb":-5}`, 422},
		{"/v1/instances/bad", `{"memory_mb":4096}`, 507}, // the whole budget; e2e-1 holds some
		{"/v1/instances/-dash-first", `{}`, 422},
	} {
		if code := a.do("PUT", tc.path, tc.body, nil); code != tc.want {
			t.Errorf("PUT %s %s = %d, want %d", tc.path, tc.body, code, tc.want)
		}
	}
	if code := a.do("GET", "/v1/instances/bad", "", nil); code != 404 {
		t.Errorf("GET of a rejected instance = %d, want 404", code)
	}

	// Bind and use the credentials.
	var creds credentials
	if code := a.do("PUT", "/v1/instances/e2e-1/bindings/app", "", &creds); code != 201 {
		t.Fatalf("PUT binding = %d", code)
	}
	rc := redisClient(t, creds)
	if err := rc.Set(ctx, "greeting", "hello", 0).Err(); err != nil {
		t.Fatalf("SET with binding credentials: %v", err)
	}
	var again credentials
	if code := a.do("PUT", "/v1/instances/e2e-1/bindings/app", "", &again); code != 200 || again != creds {
		t.Errorf("repeated bind = %d %+v, want 200 and the same credentials", code, again)
	}

	// List and get.
	var list struct{ Instances []instance }
	if code := a.do("GET", "/v1/instances", "", &list); code != 200 || len(list.Instances) != 1 || list.Instances[0].ID != "e2e-1" {
		t.Fatalf("GET list = %d %+v", code, list)
	}

	// kill -9: restarted on the same port with its data (AOF).
	time.Sleep(1100 * time.Millisecond) // appendfsync everysec: let the write reach the disk
	syscall.Kill(inst.PID, syscall.SIGKILL)
	var after instance
	testenv.Eventually(t, "restart after kill -9", settle, func() bool {
		a.do("GET", "/v1/instances/e2e-1", "", &after)
		return after.State == "running" && after.PID != inst.PID && after.PID != 0
	})
	pids = append(pids, after.PID)
	if after.Port != inst.Port || after.Restarts != 1 || after.LastExit == nil || after.LastExit.Signal != "killed" {
		t.Fatalf("after kill: %+v", after)
	}
	if v, err := redisClient(t, creds).Get(ctx, "greeting").Result(); err != nil || v != "hello" {
		t.Fatalf("GET after crash = %q, %v", v, err)
	}

	// Agent stop leaves Redis running; a new agent adopts the same pid.
	a.stop(syscall.SIGTERM)
	if a.cmd.ProcessState.ExitCode() != 0 {
		t.Errorf("agent exit code on SIGTERM = %d, want 0", a.cmd.ProcessState.ExitCode())
	}
	if !alive(after.PID) {
		t.Fatal("redis-server died with the agent")
	}
	if err := rc.Ping(ctx).Err(); err != nil {
		t.Fatalf("tenant connection broke when the agent stopped: %v", err)
	}
	a = startAgent(t, dataDir, portMin)
	var adopted instance
	testenv.Eventually(t, "adopted instance running", settle, func() bool {
		a.do("GET", "/v1/instances/e2e-1", "", &adopted)
		return adopted.State == "running"
	})
	if adopted.PID != after.PID || adopted.Restarts != 1 {
		t.Fatalf("after agent restart: %+v; want pid %d adopted, restarts still 1", adopted, after.PID)
	}

	// A second agent on the same data dir exits 1 with a clear error.
	second := exec.Command(agentBin, "--listen", "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)), "--data-dir", dataDir,
		"--port-min", strconv.Itoa(portMin), "--port-max", strconv.Itoa(portMin+19))
	out, err := second.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "another redis-agent") {
		t.Errorf("second agent on the same data dir: %v, %q; want exit 1 naming another agent", err, out)
	}

	// Unbind, then delete: 200, then 410.
	if code := a.do("DELETE", "/v1/instances/e2e-1/bindings/app", "", nil); code != 200 {
		t.Errorf("DELETE binding = %d", code)
	}
	if code := a.do("DELETE", "/v1/instances/e2e-1/bindings/app", "", nil); code != 410 {
		t.Errorf("second DELETE binding = %d, want 410", code)
	}
	if err := rc.Ping(ctx).Err(); err == nil {
		t.Error("unbound connection still open")
	}
	if code := a.do("DELETE", "/v1/instances/e2e-1", "", nil); code != 200 {
		t.Fatalf("DELETE instance = %d", code)
	}
	if code := a.do("DELETE", "/v1/instances/e2e-1", "", nil); code != 410 {
		t.Errorf("second DELETE = %d, want 410", code)
	}
	if code := a.do("GET", "/v1/instances/e2e-1", "", nil); code != 404 {
		t.Errorf("GET deleted = %d, want 404", code)
	}
	if alive(after.PID) {
		t.Error("redis-server alive after DELETE")
	}
	if _, err := os.Stat(filepath.Join(dataDir, "instances", "e2e-1")); !os.IsNotExist(err) {
		t.Errorf("instance directory left after DELETE: %v", err)
	}
	var capy struct {
		PortsFree int `json:"ports_free"`
		Instances int `json:"instances"`
	}
	if code := a.do("GET", "/v1/capacity", "", &capy); code != 200 || capy.PortsFree != 20 || capy.Instances != 0 {
		t.Errorf("capacity after delete = %d %+v; want all 20 ports free", code, capy)
	}
}

func TestAgentRefusesBadConfig(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"non-loopback without token", []string{"--listen", "0.0.0.0:0"}, "token"},
		{"missing redis-server", []string{"--redis-server", "/nonexistent/redis-server"}, "/nonexistent/redis-server"},
		{"inverted port range", []string{"--port-min", "100", "--port-max", "10"}, "port range"},
		{"stray argument", []string{"extra"}, "unexpected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--data-dir", t.TempDir()}, tt.args...)
			out, err := exec.Command(agentBin, args...).CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
				t.Fatalf("exit = %v, want 1; output %q", err, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Fatalf("output %q does not mention %q", out, tt.want)
			}
		})
	}
	t.Run("unparsable environment", func(t *testing.T) {
		cmd := exec.Command(agentBin, "--data-dir", t.TempDir())
		cmd.Env = append(os.Environ(), "REDIS_AGENT_PORT_MIN=abc")
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "REDIS_AGENT_PORT_MIN") {
			t.Fatalf("exit = %v, output %q; want 1 naming the variable", err, out)
		}
	})
}

func TestStatusCommand(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir, extra: []string{"--health-interval", "20ms"}})
	in := mustProvision(t, a, "shown")
	testenv.Eventually(t, "memory figures from a health check", settle, func() bool {
		var got struct {
			MemoryUsedBytes int64 `json:"memory_used_bytes"`
		}
		a.do("GET", "/v1/instances/shown", "", &got)
		return got.MemoryUsedBytes > 0
	})
	out, err := exec.Command(agentBin, "status", "--addr", strings.TrimPrefix(a.base, "http://")).CombinedOutput()
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	t.Logf("redis-agent status:\n%s", out)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "ID") {
		t.Fatalf("status output:\n%s", out)
	}
	f := strings.Fields(lines[1])
	if f[0] != "shown" || f[1] != "running" || f[2] != strconv.Itoa(in.Port) || f[3] != strconv.Itoa(in.PID) || !strings.Contains(lines[1], "MiB/32MiB") {
		t.Fatalf("status line %q does not describe the instance %+v", lines[1], in)
	}
	// The agent down: a clear error, exit 1.
	a.stop(syscall.SIGTERM)
	out, err = exec.Command(agentBin, "status", "--addr", strings.TrimPrefix(a.base, "http://")).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "ask the agent") {
		t.Fatalf("status with no agent: %v %q", err, out)
	}
}
