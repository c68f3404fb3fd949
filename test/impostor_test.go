package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// startedAt returns field 22 of /proc/<pid>/stat, or "" when pid is gone.
func startedAt(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	return f[19]
}

// A process whose title names an instance's config but that is not its
// redis-server is never adopted (and so never signalled) by the next
// agent: an operator's `tail -f redis.conf`, and a real redis-server
// started by hand with a title made to look like the instance's that does
// not listen on the instance's port.
func TestLookAlikeIsNotAdopted(t *testing.T) {
	redisServer := testenv.RedisServer(t)
	for _, tt := range []struct {
		name string
		cmd  func(conf string) *exec.Cmd
	}{
		{"tail -f of the config", func(conf string) *exec.Cmd { return exec.Command("tail", "-f", conf) }},
		{"a redis-server made to look like it", func(conf string) *exec.Cmd {
			// It listens, on another port than the instance's.
			return exec.Command(redisServer, "--port", strconv.Itoa(testenv.FreePort(t)), "--save", "", "--dir", os.TempDir(),
				"--proc-title-template", "{title} 127.0.0.1:1 "+conf)
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dataDir := testenv.TraversableDir(t)
			killRedisUnder(t, dataDir)
			portMin := testenv.Ports(t, 20)
			extra := []string{"--health-interval", "50ms", "--health-timeout", "50ms"}
			a := startAgent(t, dataDir, portMin, extra...)
			in := mustProvision(t, a, "x")
			a.stop(syscall.SIGTERM)
			// The instance's server dies while no agent runs, and the
			// look-alike starts.
			syscall.Kill(in.PID, syscall.SIGKILL)
			waitGone(t, in.PID)
			conf := filepath.Join(dataDir, "instances", "x", "redis.conf")
			look := tt.cmd(conf)
			if err := look.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { look.Process.Kill(); look.Wait() })
			lookPID := look.Process.Pid
			testenv.Eventually(t, "the look-alike's title to name the config", settle, func() bool {
				b, _ := os.ReadFile("/proc/" + strconv.Itoa(lookPID) + "/cmdline")
				return strings.HasSuffix(strings.TrimRight(strings.ReplaceAll(string(b), "\x00", " "), " "), " "+conf)
			})
			lookStart := startedAt(lookPID)
			if lookStart == "" {
				t.Fatal("the look-alike is not running")
			}

			a2 := startAgent(t, dataDir, portMin, extra...)
			var got instance
			testenv.Eventually(t, "the instance running on a redis-server of its own", settle, func() bool {
				a2.do("GET", "/v1/instances/x", "", &got)
				return got.State == "running" && got.PID != 0 && got.PID != lookPID
			})
			time.Sleep(500 * time.Millisecond) // ten health intervals
			if startedAt(lookPID) != lookStart {
				t.Fatalf("the look-alike (pid %d) was killed", lookPID)
			}
			a2.do("GET", "/v1/instances/x", "", &got)
			if got.State != "running" || got.PID == lookPID {
				t.Fatalf("instance after ten health intervals: %+v", got)
			}
			if !strings.Contains(a2.log.String(), "not its redis-server") {
				t.Errorf("the agent's log does not say why it left pid %d alone", lookPID)
			}
		})
	}
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	testenv.Eventually(t, "pid "+strconv.Itoa(pid)+" to be gone", settle, func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		return err != nil || strings.Contains(string(b), ") Z ")
	})
}

// Two agents on one host, with different data directories, both holding an
// instance "same": each instance has a cgroup of its own with its own
// limit, and deleting one leaves the other's.
func TestTwoAgentsDoNotShareCgroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root (CI runs as root)")
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
			t.Skip("no cgroup file system")
		}
	}
	type side struct {
		a    *agentProc
		in   instance
		root string
		mb   int
	}
	var sides []side
	for i, mb := range []int{32, 48} {
		dir := testenv.TraversableDir(t)
		killRedisUnder(t, dir)
		a := runAgent(t, agentOpts{dataDir: dir})
		var in instance
		if code := a.do("PUT", "/v1/instances/same", `{"memory_mb":`+strconv.Itoa(mb)+`,"persistence":"none"}`, &in); code != 201 {
			t.Fatalf("provision on agent %d = %d", i, code)
		}
		sides = append(sides, side{a, in, agent.Config{DataDir: dir}.CgroupParent(), mb})
	}
	if sides[0].root == sides[1].root {
		t.Fatalf("both agents use cgroup root %s", sides[0].root)
	}
	limit := func(s side) int64 {
		for _, p := range []string{
			filepath.Join("/sys/fs/cgroup/memory", s.root, "same", "memory.limit_in_bytes"),
			filepath.Join("/sys/fs/cgroup", s.root, "same", "memory.max"),
		} {
			if b, err := os.ReadFile(p); err == nil {
				n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
				return n
			}
		}
		return -1
	}
	for _, s := range sides {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(s.in.PID) + "/cgroup")
		if !strings.Contains(string(b), s.root+"/same") {
			t.Fatalf("pid %d is not in %s/same:\n%s", s.in.PID, s.root, b)
		}
		if got, want := limit(s), int64(2*s.mb+64)<<20; got != want {
			t.Fatalf("memory limit of %s/same = %d, want %d", s.root, got, want)
		}
	}
	if code := sides[0].a.do("DELETE", "/v1/instances/same", "", nil); code != 200 {
		t.Fatalf("delete on the first agent = %d", code)
	}
	if got, want := limit(sides[1]), int64(2*sides[1].mb+64)<<20; got != want {
		t.Fatalf("the other agent's cgroup after a delete on the first: limit %d, want %d", got, want)
	}
	var other instance
	sides[1].a.do("GET", "/v1/instances/same", "", &other)
	if other.State != "running" || other.PID != sides[1].in.PID {
		t.Fatalf("the other agent's instance after a delete on the first: %+v", other)
	}
}
