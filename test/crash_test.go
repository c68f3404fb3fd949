package test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

var (
	faultBinOnce sync.Once
	faultBin     string
	faultBinErr  error
)

// faultAgent builds (once) the agent with -tags faultinject.
func faultAgent(t *testing.T) string {
	t.Helper()
	faultBinOnce.Do(func() {
		faultBin = filepath.Join(filepath.Dir(agentBin), "redis-agent-faultinject")
		out, err := exec.Command("go", "build", "-race", "-tags", "faultinject", "-o", faultBin, "../cmd/redis-agent").CombinedOutput()
		if err != nil {
			faultBinErr = err
			t.Logf("%s", out)
		}
	})
	if faultBinErr != nil {
		t.Fatal(faultBinErr)
	}
	return faultBin
}

// TestCrashAtEveryPoint kills the agent with SIGKILL at each fault point
// of provision, delete, bind and unbind; a new agent must then converge to
// exactly what the state says, and the broker's retry of the operation
// must succeed.
func TestCrashAtEveryPoint(t *testing.T) {
	testenv.RedisServer(t)
	bin := faultAgent(t)
	for _, point := range agent.FaultPoints {
		t.Run(point, func(t *testing.T) {
			dataDir := testenv.TraversableDir(t)
			portMin := testenv.Ports(t, 20)
			creds := map[string]credentials{}
			killRedisUnder(t, dataDir)
			// Setup that does not pass the point under test, on an agent
			// without the fault; the crashing agent adopts it.
			a := runAgent(t, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin})
			bystander := mustProvision(t, a, "bystander")
			var method, path, body string
			switch point {
			case agent.FaultDeleteMarked, agent.FaultDeleteStopped, agent.FaultDeleteRemoved:
				mustProvision(t, a, "victim")
				creds["victim/app"] = mustBind(t, a, "victim", "app")
				method, path = "DELETE", "/v1/instances/victim"
			case agent.FaultBindRecorded:
				mustProvision(t, a, "victim")
				method, path = "PUT", "/v1/instances/victim/bindings/app"
			case agent.FaultUnbindRecorded:
				mustProvision(t, a, "victim")
				creds["victim/app"] = mustBind(t, a, "victim", "app")
				method, path = "DELETE", "/v1/instances/victim/bindings/app"
			case agent.FaultRestoreLoaded, agent.FaultRestoreStaged, agent.FaultRestoreSwapped:
				// The victim's data "old" is replaced by a snapshot of the
				// bystander's, "new".
				mustProvision(t, a, "victim")
				creds["victim/app"] = mustBind(t, a, "victim", "app")
				creds["bystander/app"] = mustBind(t, a, "bystander", "app")
				redisClient(t, creds["victim/app"]).Set(t.Context(), "k", "old", 0)
				redisClient(t, creds["bystander/app"]).Set(t.Context(), "k", "new", 0)
				method, path, body = "PUT", "/v1/instances/victim/snapshot", string(a.snapshot("bystander"))
			default:
				method, path = "PUT", "/v1/instances/victim"
			}
			a.stop(syscall.SIGTERM)
			a = runAgent(t, agentOpts{bin: bin, dataDir: dataDir, portMin: portMin, env: []string{"REDIS_AGENT_CRASH_AT=" + point}})

			code, answer, err := a.try(method, path, body)
			select {
			case <-a.exited:
			case <-time.After(15 * time.Second):
				t.Fatalf("%s %s = %d %s %v; the agent did not crash at %s", method, path, code, answer, err, point)
			}
			if ws, ok := a.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("agent ended with %v, want SIGKILL at %s", a.cmd.ProcessState, point)
			}

			a = runAgent(t, agentOpts{dataDir: dataDir, portMin: portMin})
			unbound := creds["victim/app"]
			if point == agent.FaultUnbindRecorded {
				delete(creds, "victim/app") // unbound in the record: must not work
			}
			insts := checkInvariants(t, a, creds)
			for _, in := range insts {
				if in.ID == "bystander" && (in.PID != bystander.PID || in.Restarts != 0) {
					t.Errorf("bystander was disturbed: pid %d -> %d, restarts %d", bystander.PID, in.PID, in.Restarts)
				}
			}

			if method == "PUT" && strings.HasSuffix(path, "/snapshot") {
				// Reconcile kept the data of the side the crash was on,
				// and cleared the restore's leftovers.
				want := map[string]string{agent.FaultRestoreLoaded: "old", agent.FaultRestoreStaged: "old", agent.FaultRestoreSwapped: "new"}[point]
				if got := redisClient(t, creds["victim/app"]).Get(t.Context(), "k").Val(); got != want {
					t.Fatalf("after a crash at %s the victim holds %q, want %q", point, got, want)
				}
				if _, err := os.Stat(filepath.Join(dataDir, "instances", "victim", "restore")); !os.IsNotExist(err) {
					t.Fatalf("the restore's staging directory is still there: %v", err)
				}
				if left, _ := os.ReadDir(filepath.Join(dataDir, "instances", "_uploads")); len(left) != 0 {
					t.Fatalf("the restore's upload or loader directory is still there: %v", left)
				}
			}

			// The broker retries; the answer is the one a first try would
			// have had, or the idempotent repeat of it.
			code, answer, err = a.try(method, path, body)
			if err != nil {
				t.Fatal(err)
			}
			switch method + " " + point {
			case "PUT " + agent.FaultBindRecorded:
				if code != 200 && code != 201 {
					t.Fatalf("retried bind = %d %s", code, answer)
				}
				var c credentials
				json.Unmarshal(answer, &c)
				creds["victim/app"] = c
			case "DELETE " + agent.FaultUnbindRecorded:
				if code != 410 {
					t.Fatalf("retried unbind = %d %s; want 410, it was done", code, answer)
				}
				if err := redisClient(t, unbound).Ping(t.Context()).Err(); err == nil {
					t.Fatal("the unbound user can still log in after reconcile")
				}
				creds["victim/app2"] = mustBind(t, a, "victim", "app2")
			case "DELETE " + agent.FaultDeleteMarked, "DELETE " + agent.FaultDeleteStopped, "DELETE " + agent.FaultDeleteRemoved:
				if code != 410 {
					t.Fatalf("retried delete = %d %s; want 410, reconcile finished it", code, answer)
				}
				if _, err := os.Stat(filepath.Join(dataDir, "instances", "victim")); !os.IsNotExist(err) {
					t.Fatalf("victim directory still there: %v", err)
				}
			case "PUT " + agent.FaultRestoreLoaded, "PUT " + agent.FaultRestoreStaged, "PUT " + agent.FaultRestoreSwapped:
				if code != 200 {
					t.Fatalf("retried restore = %d %s", code, answer)
				}
				if got := redisClient(t, creds["victim/app"]).Get(t.Context(), "k").Val(); got != "new" {
					t.Fatalf("after the retried restore the victim holds %q, want new", got)
				}
			default: // provision
				if code != 200 {
					t.Fatalf("retried provision = %d %s; want 200, reconcile finished it", code, answer)
				}
				creds["victim/app"] = mustBind(t, a, "victim", "app")
			}
			checkInvariants(t, a, creds)
			for _, id := range []string{"victim", "bystander"} {
				a.try("DELETE", "/v1/instances/"+id, "")
			}
		})
	}
}

func mustProvision(t *testing.T, a *agentProc, id string) instance {
	t.Helper()
	var in instance
	if code := a.do("PUT", "/v1/instances/"+id, `{"memory_mb":32,"persistence":"aof-always"}`, &in); code != 201 {
		t.Fatalf("provision %s = %d", id, code)
	}
	return in
}

func mustBind(t *testing.T, a *agentProc, id, bid string) credentials {
	t.Helper()
	var c credentials
	if code := a.do("PUT", "/v1/instances/"+id+"/bindings/"+bid, "", &c); code != 201 {
		t.Fatalf("bind %s/%s = %d", id, bid, code)
	}
	return c
}

// killRedisUnder makes sure no redis-server started from dir outlives the
// test, whatever state the agents under test left.
func killRedisUnder(t *testing.T, dir string) {
	t.Cleanup(func() {
		for pid := range redisProcs(filepath.Join(dir, "instances") + "/") {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		// And the (now empty) cgroups of instances the test left behind.
		time.Sleep(20 * time.Millisecond)
		// The root's own subdirectories, not the instances directory's:
		// a test that removes the data directory (a VM lost) leaves the
		// cgroups of what it held.
		root := agent.Config{DataDir: dir}.CgroupParent()
		for _, c := range []string{"memory", "cpu", "pids", "blkio", ""} {
			groups, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup", c, root))
			for _, g := range groups {
				if g.IsDir() {
					os.Remove(filepath.Join("/sys/fs/cgroup", c, root, g.Name()))
				}
			}
			os.Remove(filepath.Join("/sys/fs/cgroup", c, root))
		}
	})
}
