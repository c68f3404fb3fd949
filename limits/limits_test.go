package limits

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestMemoryFor(t *testing.T) {
	if got := MemoryFor(64); got != (2*64+64)<<20 {
		t.Fatalf("MemoryFor(64) = %d", got)
	}
}

func TestSpec(t *testing.T) {
	s := Limits{MemoryBytes: 100, CPUShares: 512, CPUQuota: 0.5, Pids: 64}.spec()
	if *s.Memory.Limit != 100 || *s.CPU.Shares != 512 || *s.CPU.Quota != 50000 || *s.CPU.Period != 100000 || *s.Pids.Limit != 64 {
		t.Fatalf("spec = %+v", s)
	}
	if s := (Limits{}).spec(); s.Memory != nil || s.CPU != nil || s.Pids != nil {
		t.Fatalf("empty limits set something: %+v", s)
	}
}

// On a host that allows it (root, cgroups mounted), a process put in an
// instance's cgroup is limited and counted; Remove cleans up.
func TestApplyOnThisHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating cgroups needs root (CI runs as root)")
	}
	m, err := New("redis-agent-test-" + strconv.Itoa(os.Getpid()))
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("cgroups unavailable in CI: %v", err)
		}
		t.Skip(err)
	}
	t.Logf("cgroup mode %s", m.Mode())
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		m.Remove("x")
		os.Remove("/sys/fs/cgroup/memory" + m.Root)
		os.Remove("/sys/fs/cgroup/cpu" + m.Root)
		os.Remove("/sys/fs/cgroup/pids" + m.Root)
		os.Remove("/sys/fs/cgroup/blkio" + m.Root)
		os.Remove("/sys/fs/cgroup" + m.Root)
	}()
	if err := m.Apply("x", cmd.Process.Pid, Limits{MemoryBytes: 64 << 20, CPUShares: 256, Pids: 32}); err != nil {
		t.Fatal(err)
	}
	cg, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	if !strings.Contains(string(cg), m.Root+"/x") {
		t.Fatalf("process not in the cgroup:\n%s", cg)
	}
	if !m.Contains("x", cmd.Process.Pid) || m.Contains("x", os.Getpid()) {
		t.Fatal("Contains is wrong about who is in the cgroup")
	}
	if n, err := m.OOMKills("x"); err != nil || n != 0 {
		t.Fatalf("OOMKills = %d, %v", n, err)
	}
	// Differs compares every limit with what the files hold.
	applied := Limits{MemoryBytes: 64 << 20, CPUShares: 256, Pids: 32}
	if d, err := m.Differs("x", applied); err != nil || d {
		t.Fatalf("Differs right after Apply = %v, %v; want false", d, err)
	}
	for name, other := range map[string]Limits{
		"memory": {MemoryBytes: 48 << 20, CPUShares: 256, Pids: 32},
		"shares": {MemoryBytes: 64 << 20, CPUShares: 512, Pids: 32},
		"quota":  {MemoryBytes: 64 << 20, CPUShares: 256, CPUQuota: 0.5, Pids: 32},
		"pids":   {MemoryBytes: 64 << 20, CPUShares: 256, Pids: 64},
	} {
		if d, err := m.Differs("x", other); err != nil || !d {
			t.Errorf("Differs with another %s limit = %v, %v; want true", name, d, err)
		}
	}
	if d, _ := m.Differs("nosuch", applied); !d {
		t.Error("Differs for a cgroup that does not exist = false")
	}
	quota := Limits{MemoryBytes: 48 << 20, CPUShares: 256, CPUQuota: 0.5, Pids: 32}
	if err := m.Apply("x", cmd.Process.Pid, quota); err != nil {
		t.Fatal(err)
	}
	if d, err := m.Differs("x", quota); err != nil || d {
		t.Fatalf("Differs after applying a quota = %v, %v; want false", d, err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	time.Sleep(50 * time.Millisecond)
	if err := m.Remove("x"); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove("x"); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
}

// None has nothing to do and nothing to report: a process is where it
// belongs, its limits are the record's, and no OOM kill is counted.
func TestNone(t *testing.T) {
	var n None
	l := Limits{MemoryBytes: 1 << 20, Pids: 1}
	if err := n.Apply("a", os.Getpid(), l); err != nil {
		t.Errorf("Apply = %v", err)
	}
	if k, err := n.OOMKills("a"); k != 0 || err != nil {
		t.Errorf("OOMKills = %d, %v", k, err)
	}
	if !n.Contains("a", os.Getpid()) {
		t.Error("Contains = false: an adopted process would be confined again at every adoption")
	}
	if d, err := n.Differs("a", l); d || err != nil {
		t.Errorf("Differs = %v, %v", d, err)
	}
	if err := n.Remove("a"); err != nil {
		t.Errorf("Remove = %v", err)
	}
	n.RemoveRootIfEmpty()
}
