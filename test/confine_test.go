package test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// A hostile tenant: the test binary, copied in place of redis-server and
// started by the agent exactly as a redis-server (through the launcher, as
// the instance's user). It speaks enough RESP to be found ready; the
// instance "victim" keeps secrets in its files, and the instance
// "attacker" tries, when told to (ATTACK), everything a tenant that broke
// out of Redis would try against the victim and the agent.
func init() {
	if filepath.Base(os.Args[0]) == "redis-server" {
		os.Exit(hostileServer(os.Args[1:]))
	}
}

// targets is what the test tells the attacker of its neighbour and the
// agent (an attacker would find them: pids and paths are no secret).
type targets struct {
	VictimPID  int      `json:"victim_pid"`
	AgentPID   int      `json:"agent_pid"`
	Reads      []string `json:"reads"`  // the victim's and the agent's files
	Lists      []string `json:"lists"`  // directories to list
	Writes     []string `json:"writes"` // files outside the attacker's own
	OwnFile    string   `json:"own_file"`
	AllowedRun string   `json:"allowed_run"`
}

const secret = "TENANT-SECRET-7f3a"

func hostileServer(args []string) int {
	if len(args) == 1 && args[0] == "--version" {
		fmt.Println("Redis server v=7.0.15 sha=00000000:0 malloc=libc bits=64 build=hostile")
		return 0
	}
	conf := map[string]string{}
	b, err := os.ReadFile(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostile: read config:", err)
		return 1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, " "); ok {
			conf[k] = strings.Trim(v, `"`)
		}
	}
	if strings.Contains(args[0], "/victim/") {
		// What a tenant's Redis would hold: an RDB, an AOF, a log line.
		os.MkdirAll(filepath.Join(conf["dir"], "appendonlydir"), 0o700)
		os.WriteFile(filepath.Join(conf["dir"], "dump.rdb"), []byte(secret), 0o600)
		os.WriteFile(filepath.Join(conf["dir"], "appendonlydir", "appendonly.aof.1.incr.aof"), []byte(secret), 0o600)
		if f, err := os.OpenFile(conf["logfile"], os.O_WRONLY|os.O_APPEND, 0); err == nil {
			f.WriteString(secret + "\n")
			f.Close()
		}
	}
	mem := strings.TrimSuffix(conf["maxmemory"], "mb")
	mb, _ := strconv.Atoi(mem)
	ln, err := net.Listen("tcp", net.JoinHostPort(conf["bind"], conf["port"]))
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostile: listen:", err)
		return 1
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return 1
		}
		go serveRESP(c, int64(mb)<<20)
	}
}

// serveRESP answers the agent's commands (AUTH, PING, INFO, ACL LOAD,
// CONFIG SET, SHUTDOWN) well enough, and ATTACK with the report.
func serveRESP(c net.Conn, maxmemory int64) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		cmd, err := readCommand(r)
		if err != nil {
			return
		}
		switch strings.ToUpper(cmd[0]) {
		case "PING":
			io.WriteString(c, "+PONG\r\n")
		case "INFO":
			info := fmt.Sprintf("# Server\r\nredis_version:7.0.15\r\nprocess_id:%d\r\n# Memory\r\nused_memory:1000000\r\nmaxmemory:%d\r\n# Persistence\r\nloading:0\r\n", os.Getpid(), maxmemory)
			fmt.Fprintf(c, "$%d\r\n%s\r\n", len(info), info)
		case "SHUTDOWN":
			os.Exit(0)
		case "ATTACK":
			var tg targets
			if err := json.Unmarshal([]byte(cmd[1]), &tg); err != nil {
				io.WriteString(c, "-ERR bad targets\r\n")
				continue
			}
			rep, _ := json.Marshal(attack(tg))
			fmt.Fprintf(c, "$%d\r\n%s\r\n", len(rep), rep)
		default:
			io.WriteString(c, "+OK\r\n")
		}
	}
}

func readCommand(r *bufio.Reader) ([]string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "*")))
	if err != nil || n < 1 {
		return nil, fmt.Errorf("bad command %q", line)
	}
	cmd := make([]string, n)
	for i := range cmd {
		if _, err := r.ReadString('\n'); err != nil { // $len
			return nil, err
		}
		arg, err := r.ReadString('\n')
		if err != nil {
			return nil, err
		}
		cmd[i] = strings.TrimSuffix(arg, "\r\n")
	}
	return cmd, nil
}

// attack tries each thing and says what happened: "denied: ..." for a
// permission error, anything else (success, or another error that means
// the permission check passed) is a breach.
func attack(tg targets) map[string]string {
	out := map[string]string{}
	say := func(what string, err error) {
		switch {
		case err == nil:
			out[what] = "ALLOWED"
		case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
			out[what] = "denied: " + err.Error()
		default:
			out[what] = "not denied: " + err.Error()
		}
	}
	out["uid"] = strconv.Itoa(os.Getuid())
	for _, f := range tg.Reads {
		_, err := os.ReadFile(f)
		say("read "+f, err)
	}
	for _, d := range tg.Lists {
		_, err := os.ReadDir(d)
		say("list "+d, err)
	}
	for _, f := range tg.Writes {
		say("write "+f, os.WriteFile(f, []byte("pwned"), 0o644))
	}
	// Its own file works: the attempts above fail for the confinement,
	// not because nothing works.
	say("own write "+tg.OwnFile, os.WriteFile(tg.OwnFile, []byte("mine"), 0o600))
	victim := strconv.Itoa(tg.VictimPID)
	for _, f := range []string{"/proc/" + victim + "/mem", "/proc/" + victim + "/environ", "/proc/" + victim + "/maps",
		"/proc/" + strconv.Itoa(tg.AgentPID) + "/environ", "/proc/" + strconv.Itoa(tg.AgentPID) + "/mem"} {
		_, err := os.ReadFile(f)
		say("read "+f, err)
	}
	err := unix.PtraceAttach(tg.VictimPID)
	if err == nil {
		unix.PtraceDetach(tg.VictimPID)
	}
	say("ptrace attach victim", err)
	err = unix.PtraceAttach(tg.AgentPID)
	if err == nil {
		unix.PtraceDetach(tg.AgentPID)
	}
	say("ptrace attach agent", err)
	buf := make([]byte, 64)
	local := []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}
	// An address of the victim's: its stack's, roughly; a permission
	// check passed would give EFAULT or bytes, both a breach.
	remote := []unix.RemoteIovec{{Base: uintptr(unsafe.Pointer(&buf[0])), Len: len(buf)}}
	_, err = unix.ProcessVMReadv(tg.VictimPID, local, remote, 0)
	say("process_vm_readv victim", err)
	_, err = unix.ProcessVMWritev(tg.VictimPID, local, remote, 0)
	say("process_vm_writev victim", err)
	say("signal 0 agent", syscall.Kill(tg.AgentPID, 0))
	say("signal CONT agent", syscall.Kill(tg.AgentPID, syscall.SIGCONT))
	say("signal 0 victim", syscall.Kill(tg.VictimPID, 0))
	_, _, e := unix.Syscall(unix.SYS_UNSHARE, unix.CLONE_NEWUSER, 0, 0)
	if e == 0 {
		say("unshare user namespace", nil)
	} else {
		say("unshare user namespace", e)
	}
	return out
}

// The hostile tenant reaches nothing of its neighbour nor of the agent.
func TestHostileTenantIsConfined(t *testing.T) {
	report, tg, attacker := hostileAttack(t)
	if report["uid"] != strconv.Itoa(attacker.UID) {
		t.Errorf("the attacker runs as uid %s, want its own %d", report["uid"], attacker.UID)
	}
	attempts := 0
	for what, got := range report {
		if what == "uid" || strings.HasPrefix(what, "own ") {
			continue
		}
		attempts++
		if !strings.HasPrefix(got, "denied") {
			t.Errorf("BREACH: %s: %s", what, got)
		}
	}
	if want := len(tg.Reads) + len(tg.Lists) + len(tg.Writes) + 5 + 4 + 4; attempts != want {
		t.Errorf("%d attempts reported, want %d: %v", attempts, want, report)
	}
	t.Logf("%d attempts, all denied", attempts)
}

// The same tenant on an agent that confines nothing (--confine off,
// --instance-uids off: one shared Redis user) reads its neighbour's data
// and traces it: what the confinement above stops, and the proof that the
// attack is real.
func TestHostileTenantUnconfined(t *testing.T) {
	report, tg, _ := hostileAttack(t, "--confine", "off", "--instance-uids", "off")
	for _, what := range []string{"read " + tg.Reads[0], "read " + tg.Reads[1], "ptrace attach victim", "process_vm_readv victim", "signal 0 victim", "write " + tg.Writes[6]} {
		if got := report[what]; strings.HasPrefix(got, "denied") {
			t.Errorf("unconfined, %s: %s; want it to get through", what, got)
		}
	}
}

// hostileAttack runs an agent (with extra flags) whose redis-server is the
// hostile tenant, provisions the victim and the attacker, and returns
// what the attacker's attempts gave.
func hostileAttack(t *testing.T, extra ...string) (map[string]string, targets, instance) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: instance users are made as root")
	}
	bin := testenv.TraversableDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	fake := filepath.Join(bin, "redis-server")
	if err := os.WriteFile(fake, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	dataDir := testenv.TraversableDir(t)
	// The agent leaves its redis-servers (here the hostile tenant and its
	// victim) running when it stops: they go with the test.
	killRedisUnder(t, dataDir)
	// A directory anyone may write (as /tmp usually is): only the
	// confinement keeps the tenant out.
	shared := testenv.TraversableDir(t)
	if err := os.Chmod(shared, 0o1777); err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(testenv.TraversableDir(t), "token")
	if err := os.WriteFile(tokenFile, []byte("agent-token-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, dataDir, 0, append([]string{"--redis-server", fake, "--token-file", tokenFile}, extra...)...)
	a.token = "agent-token-secret"
	victim := mustProvision(t, a, "victim")
	attacker := mustProvision(t, a, "attacker")
	if len(extra) == 0 && (victim.UID == 0 || attacker.UID == 0 || victim.UID == attacker.UID) {
		t.Fatalf("uids: victim %d, attacker %d; want two of their own", victim.UID, attacker.UID)
	}
	mustBind(t, a, "victim", "app") // an ACL file with a user in it
	inst := filepath.Join(dataDir, "instances")
	vdir := filepath.Join(inst, "victim")
	testenv.Eventually(t, "the victim's secrets written", 5*time.Second, func() bool {
		b, _ := os.ReadFile(filepath.Join(vdir, "data", "dump.rdb"))
		return string(b) == secret
	})
	own := filepath.Join(inst, "attacker", "data", "mine")
	tg := targets{
		VictimPID: victim.PID, AgentPID: a.cmd.Process.Pid, OwnFile: own,
		Reads: []string{
			filepath.Join(vdir, "data", "dump.rdb"), filepath.Join(vdir, "data", "appendonlydir", "appendonly.aof.1.incr.aof"),
			filepath.Join(vdir, "redis.conf"), filepath.Join(vdir, "users.acl"), filepath.Join(dataDir, "logs", "victim.log"),
			filepath.Join(dataDir, "state", "agent.db"), tokenFile,
			// The attacker's own config and ACL file are readable to it,
			// not writable (below).
		},
		Lists: []string{vdir, filepath.Join(vdir, "data"), inst, filepath.Join(dataDir, "logs"), filepath.Join(dataDir, "state")},
		Writes: []string{
			filepath.Join(vdir, "data", "dump.rdb"), filepath.Join(vdir, "data", "planted"),
			filepath.Join(inst, "attacker", "redis.conf"), filepath.Join(inst, "attacker", "users.acl"),
			filepath.Join(dataDir, "state", "agent.db"), filepath.Join(inst, "planted"), filepath.Join(shared, "planted"),
			fake,
		},
	}
	raw, _ := json.Marshal(tg)
	c, err := net.DialTimeout("tcp", net.JoinHostPort(attacker.Host, strconv.Itoa(attacker.Port)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "*2\r\n$6\r\nATTACK\r\n$%d\r\n%s\r\n", len(raw), raw)
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	head, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(head, "$") {
		t.Fatalf("ATTACK: %q, %v", head, err)
	}
	n, _ := strconv.Atoi(strings.TrimSpace(head[1:]))
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		t.Fatal(err)
	}
	var report map[string]string
	if err := json.Unmarshal(body, &report); err != nil {
		t.Fatalf("report %q: %v", body, err)
	}
	if got := report["own write "+own]; got != "ALLOWED" {
		t.Errorf("the attacker cannot write its own data directory (%s): the denials prove nothing", got)
	}
	// The agent is unharmed and the victim still runs.
	var got instance
	if code := a.do("GET", "/v1/instances/victim", "", &got); code != 200 || got.State != "running" || got.PID != victim.PID {
		t.Fatalf("victim after the attack: %d %+v", code, got)
	}
	return report, tg, attacker
}

// statusField is a field of /proc/<pid>/status, "" when missing.
func statusField(pid int, name string) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// An agent run as an ordinary user has no users per instance to give
// (the documented fallback): its redis-servers run as it, still through
// the launcher (no_new_privs and seccomp are in their status), and
// /readyz says what is missing.
func TestUnprivilegedAgentStillConfines(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the agent as another user")
	}
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	if err := os.Chown(dataDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	killRedisUnder(t, dataDir)
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}
	a := launchAgent(t, agentOpts{dataDir: dataDir, cred: nobody, extra: []string{"--cgroups", "off"}, env: []string{"HOME=" + dataDir}})
	var ready apitype.Status
	testenv.Eventually(t, "the unprivileged agent ready", 20*time.Second, func() bool {
		resp, err := http.Get(a.base + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&ready) == nil
	})
	if !strings.Contains(strings.Join(ready.Details, "; "), "no user per instance (the agent is not root)") {
		t.Errorf("/readyz details = %q; want it to say there is no user per instance", ready.Details)
	}
	in := mustProvision(t, a, "plain")
	if uid := statusField(in.PID, "Uid"); !strings.HasPrefix(uid, "65534\t") {
		t.Errorf("redis-server runs as uid %q, want the agent's (65534)", uid)
	}
	if nnp, sc := statusField(in.PID, "NoNewPrivs"), statusField(in.PID, "Seccomp"); nnp != "1" || sc != "2" {
		t.Errorf("redis-server: NoNewPrivs %q, Seccomp %q; want 1 and 2 (filter): it did not start through the launcher", nnp, sc)
	}
	c := mustBind(t, a, "plain", "app")
	r := redisClient(t, c)
	if err := r.Set(context.Background(), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET on the unprivileged agent's instance: %v", err)
	}
	if code := a.do("DELETE", "/v1/instances/plain", "", nil); code != 200 {
		t.Fatalf("DELETE = %d", code)
	}
}
