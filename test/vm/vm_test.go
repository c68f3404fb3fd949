// Package vm tests the agent on the kind of host it runs on in
// production: systemd as PID 1 and the unified cgroup v2 hierarchy, in a
// Debian 12 guest under qemu (mkimage.sh builds it from Debian's packages
// and the test keeps it under build/vm). The agent is installed as an
// operator does it: the static binaries in /usr/local/bin,
// deploy/redis-agent.service as it is shipped, a file in
// /etc/default/redis-agent; then systemctl, cgroup files, an OOM, the
// watchdog, a reboot and a hard power-off.
//
// It runs with REDIS_AGENT_VMTEST=1 (make vmtest; CI runs it) and is
// skipped, saying why, without root, qemu or debootstrap. The guest is
// emulated (TCG) where KVM does not work, so a redis-server starts some
// 60 times slower than on the host: the figures it logs are ratios to a
// bare redis-server start in the same guest.
package vm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
)

// agentAPI talks to the agent in the guest through its forwarded port.
type agentAPI struct {
	t     *testing.T
	base  string
	token string
	c     *http.Client
}

// do sends a request and decodes the answer into out (if not nil); it
// returns the status.
func (a *agentAPI) do(method, path string, body, out any) int {
	a.t.Helper()
	code, err := a.try(method, path, body, out)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	return code
}

func (a *agentAPI) try(method, path string, body, out any) (int, error) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, a.base+path, rd)
	req.Header.Set("Authorization", "Bearer "+a.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%v: %s", err, b)
		}
	} else if resp.StatusCode >= 300 {
		return resp.StatusCode, fmt.Errorf("%s: %s", resp.Status, b)
	}
	return resp.StatusCode, nil
}

// raw sends body (of type ctype, if any) and returns the answer's body;
// a status of 300 or more fails the test.
func (a *agentAPI) raw(method, path string, body []byte, ctype string) []byte {
	a.t.Helper()
	req, _ := http.NewRequest(method, a.base+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+a.token)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := a.c.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		a.t.Fatalf("%s %s: %s: %s", method, path, resp.Status, b)
	}
	return b
}

func (a *agentAPI) instances() map[string]apitype.Instance {
	a.t.Helper()
	var l apitype.InstanceList
	a.do("GET", "/v1/instances", nil, &l)
	m := map[string]apitype.Instance{}
	for _, in := range l.Instances {
		m[in.ID] = in
	}
	return m
}

// ready reports whether /readyz answers 200.
func (a *agentAPI) ready() bool {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(a.base + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

// waitReady waits for /readyz and returns when it answered 200.
func (a *agentAPI) waitReady(timeout time.Duration) time.Time {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if a.ready() {
			return time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.t.Fatalf("the agent was not ready within %v", timeout)
	return time.Time{}
}

// figures are the test's measurements, logged at its end.
type figures struct {
	mu   sync.Mutex
	rows [][2]string
}

func (f *figures) add(what, value string) {
	f.mu.Lock()
	f.rows = append(f.rows, [2]string{what, value})
	f.mu.Unlock()
}

func (f *figures) String() string {
	var b strings.Builder
	b.WriteString("| what | figure |\n|---|---|\n")
	for _, r := range f.rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r[0], r[1])
	}
	return b.String()
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func medianF(fs []float64) float64 {
	s := append([]float64(nil), fs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

// writer INCRs a counter on an instance until its connection breaks (a
// reboot, a power-off) or it is stopped, and remembers the last value
// Redis acknowledged.
type writer struct {
	acked atomic.Int64
	errs  atomic.Int64
	stop  chan struct{}
	done  chan struct{}
}

func startWriter(rc *redis.Client, key string) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			n, err := rc.Incr(ctx, key).Result()
			cancel()
			if err != nil {
				w.errs.Add(1)
				select {
				case <-w.stop:
					return
				case <-time.After(50 * time.Millisecond):
				}
				continue
			}
			if n > w.acked.Load() {
				w.acked.Store(n)
			}
		}
	}()
	return w
}

func (w *writer) Stop() int64 {
	close(w.stop)
	<-w.done
	return w.acked.Load()
}

func TestVM(t *testing.T) {
	prerequisites(t)
	var fig figures
	defer func() { t.Logf("figures:\n%s", fig.String()) }()

	// The guest's binaries: static, as the production hosts get
	// them (no libc of the build machine's in the guest).
	bins := t.TempDir()
	buildStatic(t, filepath.Join(bins, "vm-guestd"), "./test/vm/guestd")
	buildStatic(t, filepath.Join(bins, "redis-agent"), "./cmd/redis-agent")
	buildStatic(t, filepath.Join(bins, "redis-agent-launch"), "./cmd/redis-agent-launch", "-ldflags=-s")
	img := image(t)
	v := newVM(t, img, filepath.Join(bins, "vm-guestd"))

	step := func(name string) {
		t.Helper()
		t.Logf("== %s", name)
	}

	step("boot a Debian 12 guest: systemd, cgroup v2")
	boot := v.Boot()
	fig.add("qemu start to the guest's userspace up (vm-guestd answers)", ms(boot))
	out := v.Run("stat -fc %T /sys/fs/cgroup; systemctl --version | head -1; cat /sys/fs/cgroup/cgroup.controllers; uname -r")
	if !strings.HasPrefix(out, "cgroup2fs") {
		t.Fatalf("the guest's /sys/fs/cgroup is not cgroup v2: %s", out)
	}
	t.Logf("guest: %s", strings.ReplaceAll(strings.TrimSpace(out), "\n", "; "))
	fig.add("accelerator", v.accel)

	step("install the agent as an operator does: binaries, deploy/redis-agent.service, /etc/default/redis-agent")
	root := repoRoot(t)
	v.PutFile(filepath.Join(bins, "redis-agent"), "/usr/local/bin/redis-agent", 0o755)
	v.PutFile(filepath.Join(bins, "redis-agent-launch"), "/usr/local/bin/redis-agent-launch", 0o755)
	v.PutFile(filepath.Join(root, "deploy", "redis-agent.service"), "/etc/systemd/system/redis-agent.service", 0o644)
	tok := make([]byte, 16)
	rand.Read(tok)
	token := hex.EncodeToString(tok)
	v.Put("/etc/redis-agent/token", 0o600, []byte(token+"\n"))
	v.Put("/etc/default/redis-agent", 0o644, []byte(strings.Join([]string{
		// The API on the guest's network, where qemu forwards a port of
		// the host's loopback (a listen beyond loopback needs a token).
		"REDIS_AGENT_LISTEN=0.0.0.0:7070",
		"REDIS_AGENT_TOKEN_FILE=/etc/redis-agent/token",
		"REDIS_AGENT_PORT_MIN=16000",
		"REDIS_AGENT_PORT_MAX=16199",
		// The emulated guest starts a redis-server some 60 times slower
		// than a real host, and a busy machine running it slower still:
		// 10 s here is a fraction of a second there.
		"REDIS_AGENT_READY_TIMEOUT=60s",
		// The guest's disk image (a few GiB) cannot hold the worst case
		// the disk budget reserves for 100 instances (3 x maxmemory + 64
		// MiB each for aof): the cold boot measures starts, not disk.
		"REDIS_AGENT_DISK_BUDGET=off",
		"",
	}, "\n")))
	api := &agentAPI{t: t, base: "http://" + v.hostAddr(guestAPI), token: token, c: &http.Client{Timeout: 3 * time.Minute,
		// A connection kept from before a power-off would fail the first
		// request after it.
		Transport: &http.Transport{DisableKeepAlives: true}}}

	step("systemctl enable --now redis-agent: ready to systemd only after reconcile")
	start := time.Now()
	v.Run("systemctl daemon-reload && systemctl enable --now redis-agent.service")
	fig.add("systemctl enable --now redis-agent (no instances) returns", ms(time.Since(start)))
	if !api.ready() {
		t.Fatalf("systemctl start returned but /readyz is not 200: %s", v.Run("systemctl status redis-agent --no-pager -l || true"))
	}
	props := v.Run("systemctl show redis-agent -p Type -p ActiveState -p SubState -p StatusText -p WatchdogUSec -p KillMode -p Delegate -p ControlGroup")
	t.Logf("unit: %s", strings.ReplaceAll(strings.TrimSpace(props), "\n", "; "))
	if !strings.Contains(props, "ActiveState=active") || !strings.Contains(props, "StatusText=0 instances") {
		t.Fatalf("unit after start: %s", props)
	}
	unitCgroup := strings.TrimSpace(v.Run("systemctl show redis-agent -p ControlGroup --value"))

	if os.Getenv("REDIS_AGENT_VMTEST_SCENARIO") != "coldboot" {
		scenario(t, v, api, &fig, unitCgroup)
	}
	coldBoot(t, v, api, &fig)
}

// scenario is the test's steps from a bare redis-server start to a hard
// power-off (REDIS_AGENT_VMTEST_SCENARIO=coldboot skips them).
func scenario(t *testing.T, v *VM, api *agentAPI, fig *figures, unitCgroup string) {
	step := func(name string) {
		t.Helper()
		t.Logf("== %s", name)
	}
	step("a bare redis-server start in the same guest (the reference), 7 times")
	// bareOnce times one bare redis-server start in the guest, from exec
	// to an answer to PING, and stops it.
	port := 17000
	bareOnce := func() time.Duration {
		port++
		d, pid := v.Probe(0, []string{"/usr/bin/redis-server", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "/dev/null"}, port)
		v.Run(fmt.Sprintf("kill %d; while kill -0 %d 2>/dev/null; do sleep 0.05; done", pid, pid))
		return d
	}
	var bare []time.Duration
	for range 7 {
		bare = append(bare, bareOnce())
	}
	bareStart := median(bare)
	fig.add("bare redis-server start to PONG (median of 7)", ms(bareStart))

	step("provision and bind")
	specs := []struct {
		id          string
		persistence string
	}{{"a", "aof-always"}, {"b", "none"}, {"c", "aof"}}
	var prov []time.Duration
	creds := map[string]apitype.Credentials{}
	for _, s := range specs {
		start := time.Now()
		var in apitype.Instance
		if code := api.do("PUT", "/v1/instances/"+s.id, apitype.Spec{MemoryMB: 16, Persistence: s.persistence}, &in); code != 201 {
			t.Fatalf("provision %s: %d", s.id, code)
		}
		prov = append(prov, time.Since(start))
		var cr apitype.Credentials
		if code := api.do("PUT", "/v1/instances/"+s.id+"/bindings/app", nil, &cr); code != 201 {
			t.Fatalf("bind %s: %d", s.id, code)
		}
		creds[s.id] = cr
	}
	// Five more, each next to a bare start, and deleted: the guest's
	// speed changes with the host's load, so each ratio is of a pair.
	var provRatio []float64
	for i := range 5 {
		b := bareOnce()
		id := fmt.Sprintf("p%d", i)
		start := time.Now()
		if code := api.do("PUT", "/v1/instances/"+id, apitype.Spec{MemoryMB: 16, Persistence: "none"}, nil); code != 201 {
			t.Fatalf("provision %s: %d", id, code)
		}
		d := time.Since(start)
		prov = append(prov, d)
		provRatio = append(provRatio, float64(d)/float64(b))
		api.do("DELETE", "/v1/instances/"+id, nil, nil)
	}
	fig.add("provision (PUT from the host, through the forwarded port, to running), median of 8", fmt.Sprintf("%s (%.1f × a bare start next to it, median of 5 pairs)", ms(median(prov)), medianF(provRatio)))
	clients := map[string]*redis.Client{}
	for id, cr := range creds {
		port := cr.Port
		rc := redis.NewClient(&redis.Options{
			Addr: "guest:" + strconv.Itoa(port), Username: cr.Username, Password: cr.Password,
			Dialer:       func(ctx context.Context, _, _ string) (net.Conn, error) { return v.Dial(ctx, port) },
			DialTimeout:  5 * time.Second,
			ReadTimeout:  10 * time.Second,
			WriteTimeout: 10 * time.Second,
			MaxRetries:   -1,
		})
		defer rc.Close()
		clients[id] = rc
		if err := rc.Set(context.Background(), "hello", id, 0).Err(); err != nil {
			t.Fatalf("SET on %s with its binding: %v", id, err)
		}
	}

	step("each instance's cgroup v2 files hold the limits the agent set")
	insts := api.instances()
	checkCgroups := func(what string) {
		t.Helper()
		for _, s := range specs {
			in := insts[s.id]
			cg := strings.TrimSpace(v.Run(fmt.Sprintf("cut -d: -f3 /proc/%d/cgroup", in.PID)))
			if cg != "/redis-agent/"+s.id {
				t.Fatalf("%s: instance %s (pid %d) is in cgroup %q, want /redis-agent/%s", what, s.id, in.PID, cg, s.id)
			}
			dir := "/sys/fs/cgroup" + cg
			got := strings.Fields(v.Run(fmt.Sprintf("cat %s/memory.max %s/cpu.weight %s/pids.max", dir, dir, dir)))
			want := []string{
				strconv.FormatInt(limits.MemoryFor(16), 10),
				strconv.FormatUint(cgroup2.ConvertCPUSharesToCgroupV2Value(1024), 10),
				"128",
			}
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Fatalf("%s: %s memory.max cpu.weight pids.max = %v, want %v", what, dir, got, want)
			}
		}
		// No instance's redis-server is left in the unit's cgroup for a
		// stop to signal or count (a short-lived helper, such as the
		// redis-server --version of the rollout at start, may be there).
		if left := strings.TrimSpace(v.Run("for p in $(cat /sys/fs/cgroup" + unitCgroup + "/cgroup.procs); do tr '\\0' ' ' </proc/$p/cmdline 2>/dev/null | grep /var/lib/redis-agent/ || true; done")); left != "" {
			t.Fatalf("%s: instances' processes in the unit's cgroup %s: %s", what, unitCgroup, left)
		}
	}
	checkCgroups("after provision")
	if limits.MemoryFor(16) != 2*16<<20+64<<20 {
		t.Fatalf("MemoryFor(16) = %d, want 2 × maxmemory + 64 MiB", limits.MemoryFor(16))
	}
	agentCg := strings.TrimSpace(v.Run("cut -d: -f3 /proc/$(systemctl show -p MainPID --value redis-agent)/cgroup"))
	t.Logf("agent in %s (unit %s); instances in /redis-agent/<id>", agentCg, unitCgroup)

	step("crash recovery: SIGKILL of a redis-server, restarted by the agent")
	var crash []time.Duration
	var crashRatio []float64
	for i := range 5 {
		b := bareOnce()
		in := api.instances()["c"]
		d, _ := v.Probe(in.PID, nil, in.Port)
		crash = append(crash, d)
		crashRatio = append(crashRatio, float64(d)/float64(b))
		waitState(t, api, "c", func(in apitype.Instance) bool { return in.State == "running" && in.Restarts == i+1 })
	}
	fig.add("crash recovery (SIGKILL to answering again, measured in the guest), median of 5", fmt.Sprintf("%s (%.1f × a bare start next to it, median of 5 pairs)", ms(median(crash)), medianF(crashRatio)))
	insts = api.instances()
	checkCgroups("after crash restarts")

	step("a restore: its candidate loads in the instance's cgroup and becomes the instance, the cgroup's limits one instance's again")
	if err := clients["c"].Set(context.Background(), "restored", "yes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	rdb := api.raw("GET", "/v1/instances/c/snapshot", nil, "")
	if err := clients["c"].Del(context.Background(), "restored").Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	api.raw("PUT", "/v1/instances/c/snapshot", rdb, "application/octet-stream")
	fig.add("restore of a small snapshot (a candidate in the instance's cgroup, then the hand-over)", ms(time.Since(start)))
	if got, err := clients["c"].Get(context.Background(), "restored").Result(); err != nil || got != "yes" {
		t.Fatalf("after the restore: GET restored = %q %v", got, err)
	}
	if out := v.Run("ls /sys/fs/cgroup/redis-agent/"); strings.Contains(out, "_restore") {
		t.Fatalf("a restore's cgroup is left: %s", out)
	}
	if after := api.instances()["c"]; after.PID == insts["c"].PID || after.Restarts != insts["c"].Restarts+1 {
		t.Fatalf("after the restore: pid %d -> %d, restarts %d -> %d; want the candidate in the old one's place", insts["c"].PID, after.PID, insts["c"].Restarts, after.Restarts)
	}
	insts = api.instances()
	checkCgroups("after the restore")

	step("a tenant that blows its memory is OOM-killed in its own cgroup, restarted with reason oom")
	before := api.instances()
	hog := blowMemory(t, v, creds["b"])
	after := waitState(t, api, "b", func(in apitype.Instance) bool {
		return in.State == "running" && in.Restarts > before["b"].Restarts
	})
	hog.Close()
	if after.LastExit == nil || after.LastExit.Reason != apitype.ReasonOOM {
		t.Fatalf("b's last exit: %+v, want reason oom; memory.events: %s", after.LastExit, v.Run("cat /sys/fs/cgroup/redis-agent/b/memory.events"))
	}
	events := v.Run("cat /sys/fs/cgroup/redis-agent/b/memory.events")
	if !strings.Contains(events, "oom_kill 1") {
		t.Fatalf("b's memory.events: %s", events)
	}
	now := api.instances()
	for _, id := range []string{"a", "c"} {
		if now[id].PID != before[id].PID || now[id].Restarts != before[id].Restarts {
			t.Fatalf("neighbour %s was touched by b's OOM: %+v -> %+v", id, before[id], now[id])
		}
		if n := strings.TrimSpace(v.Run("grep oom_kill /sys/fs/cgroup/redis-agent/" + id + "/memory.events")); n != "oom_kill 0" {
			t.Fatalf("neighbour %s's memory.events: %s", id, n)
		}
	}
	t.Logf("kernel: %s", strings.TrimSpace(v.Run("dmesg | grep -m1 -i 'memory cgroup out of memory' || true")))
	insts = now
	checkCgroups("after the OOM")
	// b has no persistence: its data went with the killed process.
	if err := clients["b"].Set(context.Background(), "hello", "b", 0).Err(); err != nil {
		t.Fatalf("SET on b after its OOM restart: %v", err)
	}

	// unchanged checks that every instance runs as before in the same
	// process and cgroup, and was not restarted.
	// Right after an agent start returned (READY=1: reconcile done) every
	// instance is adopted: its process found, checked and watched, its
	// pid in the API. It shows starting until its first probe (a PING and
	// an INFO) answers, which the start does not wait for (at a thousand
	// instances that would triple an agent restart's time); a little
	// later it is running again, still the same process.
	unchanged := func(what string) time.Duration {
		t.Helper()
		now := api.instances()
		for _, s := range specs {
			b, a := insts[s.id], now[s.id]
			if a.State != "running" && a.State != "starting" || a.PID != b.PID || a.Restarts != b.Restarts {
				t.Fatalf("%s: instance %s was %s pid %d restarts %d, now %s pid %d restarts %d", what, s.id, b.State, b.PID, b.Restarts, a.State, a.PID, a.Restarts)
			}
		}
		checkCgroups(what)
		start := time.Now()
		for _, s := range specs {
			a := waitState(t, api, s.id, func(in apitype.Instance) bool { return in.State != "starting" })
			if b := insts[s.id]; a.State != "running" || a.PID != b.PID || a.Restarts != b.Restarts {
				t.Fatalf("%s: instance %s was %s pid %d restarts %d, now %s pid %d restarts %d", what, s.id, b.State, b.PID, b.Restarts, a.State, a.PID, a.Restarts)
			}
		}
		probed := time.Since(start)
		for id, rc := range clients {
			if got, err := rc.Get(context.Background(), "hello").Result(); err != nil || got != id {
				t.Fatalf("%s: GET on %s: %q %v", what, id, got, err)
			}
		}
		return probed
	}

	step("systemctl restart redis-agent: every redis-server keeps running in its cgroup, adopted (0 Redis restarts)")
	start = time.Now()
	v.Run("systemctl restart redis-agent")
	fig.add("systemctl restart redis-agent (3 instances adopted) returns", ms(time.Since(start)))
	// Ready only after reconcile: when systemctl returns, every instance
	// is adopted already.
	probed := unchanged("right after systemctl restart returned")
	fig.add("then until all 3 show running again (their first probes)", ms(probed))

	step("systemctl stop: the redis-servers keep serving; daemon-reload; systemctl start adopts them")
	v.Run("systemctl stop redis-agent")
	if st := strings.TrimSpace(v.Run("systemctl is-active redis-agent || true")); st != "inactive" {
		t.Fatalf("after stop: %s", st)
	}
	for _, s := range specs {
		if _, code := v.Try(fmt.Sprintf("kill -0 %d", insts[s.id].PID)); code != 0 {
			t.Fatalf("systemctl stop killed %s's redis-server (pid %d)", s.id, insts[s.id].PID)
		}
	}
	for id, rc := range clients {
		if err := rc.Set(context.Background(), "while-stopped", 1, 0).Err(); err != nil {
			t.Fatalf("SET on %s while the agent is stopped: %v", id, err)
		}
	}
	v.Run("systemctl daemon-reload")
	v.Run("systemctl start redis-agent")
	unchanged("after systemctl stop, daemon-reload, start")

	step("a SIGSTOPped agent is restarted by the systemd watchdog; its redis-servers keep serving")
	mainPID := strings.TrimSpace(v.Run("systemctl show -p MainPID --value redis-agent"))
	nrestarts := strings.TrimSpace(v.Run("systemctl show -p NRestarts --value redis-agent"))
	v.Run("kill -STOP " + mainPID)
	stopped := time.Now()
	var newPID string
	for {
		if time.Since(stopped) > 3*time.Minute {
			t.Fatalf("the watchdog did not restart the stopped agent in 3 minutes: %s", v.Run("systemctl status redis-agent --no-pager -l || true"))
		}
		for id, rc := range clients {
			if err := rc.Incr(context.Background(), "during-stop").Err(); err != nil {
				t.Fatalf("INCR on %s while the agent is stopped: %v", id, err)
			}
		}
		p := strings.TrimSpace(v.Run("systemctl show -p MainPID --value redis-agent"))
		if p != mainPID && p != "0" && api.ready() {
			newPID = p
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	fig.add("SIGSTOP of the agent to a new agent ready (WatchdogSec=30s)", ms(time.Since(stopped)))
	if n := strings.TrimSpace(v.Run("systemctl show -p NRestarts --value redis-agent")); n == nrestarts {
		t.Fatalf("NRestarts still %s after the watchdog", n)
	}
	t.Logf("agent %s -> %s; journal: %s", mainPID, newPID, strings.TrimSpace(v.Run("journalctl -u redis-agent --no-pager | grep -i -m2 watchdog || true")))
	unchanged("after the watchdog's restart")

	// survive checks that every instance came back after the guest went
	// down, and that a's counter holds every write that was acknowledged.
	survive := func(what string, acked int64) {
		t.Helper()
		for _, s := range specs {
			waitState(t, api, s.id, func(in apitype.Instance) bool { return in.State == "running" })
		}
		insts = api.instances()
		checkCgroups(what)
		got, err := clients["a"].Get(context.Background(), "counter").Int64()
		if err != nil {
			t.Fatalf("%s: GET counter on a: %v", what, err)
		}
		if got < acked {
			t.Fatalf("%s: a (aof-always) lost acknowledged writes: counter %d, %d were acknowledged", what, got, acked)
		}
		t.Logf("%s: counter %d, %d acknowledged", what, got, acked)
		for id, rc := range clients {
			if id == "b" {
				continue // persistence none
			}
			if got, err := rc.Get(context.Background(), "hello").Result(); err != nil || got != id {
				t.Fatalf("%s: GET on %s: %q %v", what, id, got, err)
			}
		}
	}

	step("systemctl reboot under writes: every instance comes back, aof-always loses no acknowledged write")
	w := startWriter(clients["a"], "counter")
	waitAcked(t, w, 20)
	oldBoot := v.BootID()
	start = time.Now()
	// vm-guestd may be stopped before it answers.
	v.exec(&http.Client{Timeout: 10 * time.Second}, "systemctl reboot --no-block")
	v.waitNewBoot(oldBoot, 4*time.Minute)
	api.waitReady(3 * time.Minute)
	fig.add("systemctl reboot to the agent ready again (3 instances)", ms(time.Since(start)))
	acked := w.Stop()
	survive("after the reboot", acked)
	fig.add("systemctl reboot to every instance running", ms(time.Since(start)))

	step("hard power-off of qemu under writes: every instance comes back, aof-always loses no acknowledged write")
	w = startWriter(clients["a"], "counter")
	waitAcked(t, w, acked+20)
	v.Kill()
	acked = w.Stop()
	bootStart := time.Now()
	v.Boot()
	api.waitReady(3 * time.Minute)
	fig.add("qemu start after a power-off to the agent ready (3 instances)", ms(time.Since(bootStart)))
	fig.add("the same, guest kernel start to the unit active (systemd's clock)", usec(v.Run("systemctl show -p ActiveEnterTimestampMonotonic --value redis-agent")))
	survive("after the power-off", acked)
	fig.add("qemu start after a power-off to every instance running", ms(time.Since(bootStart)))
}

func usec(s string) string {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return s
	}
	return ms(time.Duration(n) * time.Microsecond)
}

func waitAcked(t *testing.T, w *writer, n int64) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for w.acked.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the writer got %d acknowledgements in a minute (errors %d)", w.acked.Load(), w.errs.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitState polls instance id until cond holds (2 minutes at most).
func waitState(t *testing.T, api *agentAPI, id string, cond func(apitype.Instance) bool) apitype.Instance {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var in apitype.Instance
		api.do("GET", "/v1/instances/"+id, nil, &in)
		if cond(in) {
			return in
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance %s: %+v", id, in)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// blowMemory makes instance cr's redis-server exceed its cgroup's memory:
// a 4 MiB value, then a pipeline of GETs of it whose replies are never
// read, so they pile up in the server's output buffer (a normal client
// has no output buffer limit). The connection is the caller's to close
// once the server is gone (closing it frees the buffer).
func blowMemory(t *testing.T, v *VM, cr apitype.Credentials) net.Conn {
	t.Helper()
	c, err := v.Dial(context.Background(), cr.Port)
	if err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", 4<<20)
	fmt.Fprintf(c, "*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(cr.Username), cr.Username, len(cr.Password), cr.Password)
	fmt.Fprintf(c, "*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n", len(big), big)
	get := []byte("*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n")
	c.SetWriteDeadline(time.Now().Add(2 * time.Minute))
	for range 200 {
		if _, err := c.Write(get); err != nil {
			break // the server is gone: killed
		}
	}
	return c
}

// coldBoot provisions instances up to REDIS_AGENT_VMTEST_INSTANCES (100),
// powers the guest off hard and times its boot until all of them run.
func coldBoot(t *testing.T, v *VM, api *agentAPI, fig *figures) {
	n := 100
	if s := os.Getenv("REDIS_AGENT_VMTEST_INSTANCES"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	t.Logf("== cold boot of %d instances after a hard power-off", n)
	have := len(api.instances())
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 4)
	for i := have; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := api.try("PUT", fmt.Sprintf("/v1/instances/n%03d", i), apitype.Spec{MemoryMB: 8}, nil); err != nil {
				errs <- fmt.Errorf("provision n%03d: %w", i, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	fig.add(fmt.Sprintf("provision %d instances, 4 at a time", n-have), ms(time.Since(start)))
	if got := len(api.instances()); got != n {
		t.Fatalf("%d instances, want %d", got, n)
	}
	v.Run("sync")
	v.Kill()
	bootStart := time.Now()
	v.Boot()
	ready := api.waitReady(5 * time.Minute)
	running := 0
	for {
		running = 0
		for _, in := range api.instances() {
			if in.State == "running" {
				running++
			}
		}
		if running == n || time.Since(bootStart) > 10*time.Minute {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	all := time.Since(bootStart)
	if running != n {
		t.Fatalf("%d of %d instances running 10 minutes after the power-off", running, n)
	}
	fig.add(fmt.Sprintf("cold boot after a power-off, %d instances: qemu start to the agent ready", n), ms(ready.Sub(bootStart)))
	fig.add(fmt.Sprintf("cold boot after a power-off, %d instances: qemu start to all running", n), ms(all))
	fig.add(fmt.Sprintf("cold boot, %d instances: guest kernel start to the unit active (systemd's clock)", n), usec(v.Run("systemctl show -p ActiveEnterTimestampMonotonic --value redis-agent")))
	fig.add(fmt.Sprintf("cold boot, %d instances: the unit's start (exec to READY=1, systemd's clock)", n), usec(v.Run(
		"echo $(( $(systemctl show -p ActiveEnterTimestampMonotonic --value redis-agent) - $(systemctl show -p ExecMainStartTimestampMonotonic --value redis-agent) ))")))
	t.Logf("unit: %s", strings.TrimSpace(v.Run("systemctl show redis-agent -p NRestarts -p StatusText -p Result")))
	if out, code := v.Try("journalctl --no-pager -o short-monotonic"); code == 0 {
		os.WriteFile(filepath.Join(v.logs, "journal.log"), []byte(out), 0o644)
	}
	defer func() {
		// systemd's watchdog is not to have killed the agent while it
		// started them all (it did, before the rollout at agent start
		// moved off the main loop's path). Another restart, such as a
		// start timeout of a guest starved by a busy machine, is logged.
		n := strings.TrimSpace(v.Run("systemctl show -p NRestarts --value redis-agent"))
		if n == "0" {
			return
		}
		why := v.Run("journalctl -b --no-pager -u redis-agent | grep 'systemd\\[1\\]' | grep -v -e left-over -e 'remains running' | tail -8")
		if strings.Contains(why, "Watchdog timeout") {
			t.Errorf("systemd's watchdog killed the agent during the cold boot (%s restarts):\n%s", n, why)
		} else {
			t.Logf("systemd restarted the agent %s times during the cold boot, not for its watchdog:\n%s", n, why)
		}
	}()
	t.Logf("boot:\n%s", v.Run("systemd-analyze critical-chain redis-agent.service --no-pager 2>&1; systemd-analyze blame --no-pager 2>&1 | head -8; journalctl -b -o short-monotonic --no-pager -u redis-agent | grep -v '\"level\":\"DEBUG' | head -5; journalctl -b -o short-monotonic --no-pager -u redis-agent | grep -m1 reconciled"))
}
