// Package limits puts each instance's redis-server in a cgroup of its own
// with memory, CPU and pids limits, on cgroup v2 (unified) and v1 (legacy)
// hosts alike, through github.com/containerd/cgroups/v3, and reads the
// cgroup's OOM-kill count so a restart can be told apart as "oom". IO
// limits on the data directory's block device (io.go, device.go) are
// written to the IO controller's files directly, where the host has one.
//
// Cgroups live under <mountpoint>/<Root>/<id> (v2) or
// <mountpoint>/<controller>/<Root>/<id> (v1). None has Manager's methods
// and does nothing, for an agent whose instances run without cgroups.
package limits

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// ErrUnsupported means the host offers no writable cgroup hierarchy.
var ErrUnsupported = errors.New("cgroups are not available")

// Limits of one instance.
type Limits struct {
	// MemoryBytes is the hard memory limit; 0 means none.
	MemoryBytes int64
	// CPUShares is the relative CPU weight (v1 shares, 1024 = default);
	// on v2 it is converted to cpu.weight.
	CPUShares uint64
	// CPUQuota is a hard CPU limit in cores (0.5 = half a core); 0 means
	// none.
	CPUQuota float64
	// Pids caps the processes and threads (redis-server's threads and its
	// BGSAVE child); 0 means none.
	Pids int64
	// IO throttles its reads and writes on the data directory's device;
	// applied only where IOSupported.
	IO IO
}

// MemoryFor returns the memory limit the agent gives an instance of
// maxmemory mb MiB: twice maxmemory, for a fork that copies every page it
// writes during BGSAVE or an AOF rewrite, plus 64 MiB for client buffers,
// the allocator's fragmentation and the process itself.
func MemoryFor(maxmemoryMB int) int64 {
	return 2*int64(maxmemoryMB)<<20 + 64<<20
}

const cpuPeriod = 100000 // µs

func (l Limits) spec() *specs.LinuxResources {
	r := &specs.LinuxResources{}
	if l.MemoryBytes > 0 {
		m := l.MemoryBytes
		r.Memory = &specs.LinuxMemory{Limit: &m}
	}
	if l.CPUShares > 0 || l.CPUQuota > 0 {
		r.CPU = &specs.LinuxCPU{}
		if l.CPUShares > 0 {
			s := l.CPUShares
			r.CPU.Shares = &s
		}
		if l.CPUQuota > 0 {
			q, p := int64(l.CPUQuota*cpuPeriod), uint64(cpuPeriod)
			r.CPU.Quota, r.CPU.Period = &q, &p
		}
	}
	if l.Pids > 0 {
		n := l.Pids
		r.Pids = &specs.LinuxPids{Limit: &n}
	}
	return r
}

// Manager creates and removes the instances' cgroups.
type Manager struct {
	// Root is the parent cgroup of every instance's, e.g. "redis-agent".
	Root string
	mode cgroups.CGMode
	// fs is the cgroup file system's mount point; "" is /sys/fs/cgroup
	// (tests set another for file layouts).
	fs string
	// ioOK is set when the IO controller can be used; ioNote says why
	// not otherwise.
	ioOK   bool
	ioNote string
}

// New detects the host's cgroup mode and checks that the agent may create
// cgroups under root. It returns ErrUnsupported (wrapped, with the reason)
// when it cannot.
func New(root string) (*Manager, error) {
	m := &Manager{Root: path.Clean("/" + root), mode: cgroups.Mode()}
	switch m.mode {
	case cgroups.Unified:
		mg, err := cgroup2.NewManager("/sys/fs/cgroup", m.Root, &cgroup2.Resources{})
		if err != nil {
			return nil, fmt.Errorf("%w: create %s: %v", ErrUnsupported, m.Root, err)
		}
		// Enable the controllers for the children (v2 needs it in
		// cgroup.subtree_control of the parent).
		if err := mg.ToggleControllers([]string{"memory", "cpu", "pids"}, cgroup2.Enable); err != nil {
			return nil, fmt.Errorf("%w: enable controllers under %s: %v", ErrUnsupported, m.Root, err)
		}
	case cgroups.Legacy, cgroups.Hybrid:
		if _, err := cgroup1.New(cgroup1.StaticPath(m.Root), &specs.LinuxResources{}, cgroup1.WithHierarchy(v1Hierarchy)); err != nil {
			return nil, fmt.Errorf("%w: create %s: %v", ErrUnsupported, m.Root, err)
		}
	default:
		return nil, fmt.Errorf("%w: no cgroup file system mounted", ErrUnsupported)
	}
	m.probeIO()
	return m, nil
}

// Mode names the host's cgroup mode: "v2", "v1" or "hybrid".
func (m *Manager) Mode() string {
	switch m.mode {
	case cgroups.Unified:
		return "v2"
	case cgroups.Hybrid:
		return "hybrid"
	}
	return "v1"
}

// v1Hierarchy is the controllers the agent uses on v1: memory, cpu, pids.
func v1Hierarchy() ([]cgroup1.Subsystem, error) {
	root := "/sys/fs/cgroup"
	return []cgroup1.Subsystem{cgroup1.NewMemory(root), cgroup1.NewCpu(root), cgroup1.NewPids(root)}, nil
}

func (m *Manager) group(id string) string { return path.Join(m.Root, id) }

// Apply puts pid into id's cgroup, creating it with l or updating it to l.
func (m *Manager) Apply(id string, pid int, l Limits) error {
	if m.mode == cgroups.Unified {
		mg, err := cgroup2.NewManager("/sys/fs/cgroup", m.group(id), cgroup2.ToResources(l.spec()))
		if err != nil {
			return fmt.Errorf("cgroup %s: %w", m.group(id), err)
		}
		if err := mg.Update(cgroup2.ToResources(l.spec())); err != nil {
			return fmt.Errorf("cgroup %s: %w", m.group(id), err)
		}
		if err := mg.AddProc(uint64(pid)); err != nil {
			return err
		}
		if m.ioOK {
			if err := m.applyIO(id, pid, l.IO); err != nil {
				return fmt.Errorf("cgroup %s: %w", m.group(id), err)
			}
		}
		return nil
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(m.group(id)), l.spec(), cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", m.group(id), err)
	}
	if err := cg.Update(l.spec()); err != nil {
		return fmt.Errorf("cgroup %s: %w", m.group(id), err)
	}
	if err := cg.Add(cgroup1.Process{Pid: pid}); err != nil {
		return err
	}
	if m.ioOK {
		if err := m.applyIO(id, pid, l.IO); err != nil {
			return fmt.Errorf("cgroup %s: %w", m.group(id), err)
		}
	}
	return nil
}

// OOMKills returns how many processes the kernel's OOM killer has killed
// in id's cgroup: the oom_kill line of memory.events (v2) or
// memory.oom_control (v1). It reads that one file, not the cgroup's whole
// statistics, since it runs at every exit and adoption.
func (m *Manager) OOMKills(id string) (uint64, error) {
	file := path.Join("/sys/fs/cgroup", m.group(id), "memory.events")
	if m.mode != cgroups.Unified {
		file = path.Join("/sys/fs/cgroup/memory", m.group(id), "memory.oom_control")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, nil
}

// Contains reports whether pid is in id's cgroup (its memory controller's
// on v1, and its blkio one where IO is limited), from /proc/<pid>/cgroup.
func (m *Manager) Contains(id string, pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return false
	}
	want := m.group(id)
	lines := strings.Split(string(b), "\n")
	if m.ioOK && m.mode != cgroups.Unified && !m.ioContains(lines, id) {
		return false
	}
	for _, line := range lines {
		// "0::/path" (v2) or "N:memory:/path" (v1)
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || parts[2] != want {
			continue
		}
		if m.mode == cgroups.Unified || strings.Contains(","+parts[1]+",", ",memory,") {
			return true
		}
	}
	return false
}

// Remove deletes id's cgroup. A process that was just killed may still be
// listed for a moment, so it retries for up to two seconds. Removing what
// does not exist is not an error.
func (m *Manager) Remove(id string) error {
	var err error
	for range 200 {
		if err = m.remove(id); err == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return err
}

func (m *Manager) remove(id string) error {
	if m.mode == cgroups.Unified {
		mg, err := cgroup2.Load(m.group(id))
		if err != nil {
			return nil
		}
		if err := mg.Delete(); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove cgroup %s: %w", m.group(id), err)
		}
		return nil
	}
	if m.ioOK {
		if err := os.Remove(m.ioDir(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove cgroup %s: %w", m.ioDir(id), err)
		}
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(m.group(id)), cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return nil
	}
	if err := cg.Delete(); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove cgroup %s: %w", m.group(id), err)
	}
	return nil
}

// Differs reports whether id's cgroup has other limits than want (or none
// at all), reading each controller's files: a resize an agent crash cut
// short can leave the memory limit behind the record, and a changed
// --cpu-shares or --pids-limit applies to running instances only through
// this check. It reads four small files, and as many more as IO limits
// are set (four on v1, one on v2) where IO is limited.
func (m *Manager) Differs(id string, want Limits) (bool, error) {
	files, expect := m.limitFiles(id, want)
	if m.ioOK {
		f, e := m.ioFiles(id, want.IO)
		files, expect = append(files, f...), append(expect, e...)
	}
	for i, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return true, nil
			}
			return false, err
		}
		if strings.TrimSpace(string(b)) != expect[i] {
			return true, nil
		}
	}
	return false, nil
}

// limitFiles returns the files that hold want's limits in id's cgroup and
// the text each holds when the limit is applied.
func (m *Manager) limitFiles(id string, want Limits) (files, expect []string) {
	g := m.group(id)
	quota := func(none string, format func(q int64) string) string {
		if want.CPUQuota <= 0 {
			return none
		}
		return format(int64(want.CPUQuota * cpuPeriod))
	}
	num := func(n int64, none string) string {
		if n <= 0 {
			return none
		}
		return strconv.FormatInt(n, 10)
	}
	if m.mode == cgroups.Unified {
		dir := path.Join(m.fsRoot(), g)
		weight := "100" // the kernel's default
		if want.CPUShares > 0 {
			weight = strconv.FormatUint(cgroup2.ConvertCPUSharesToCgroupV2Value(want.CPUShares), 10)
		}
		return []string{path.Join(dir, "memory.max"), path.Join(dir, "cpu.weight"), path.Join(dir, "cpu.max"), path.Join(dir, "pids.max")},
			[]string{num(want.MemoryBytes, "max"), weight,
				quota("max "+strconv.Itoa(cpuPeriod), func(q int64) string { return fmt.Sprintf("%d %d", q, cpuPeriod) }),
				num(want.Pids, "max")}
	}
	shares := "1024"
	if want.CPUShares > 0 {
		shares = strconv.FormatUint(want.CPUShares, 10)
	}
	// v1 has no "no memory limit" text that is stable across kernels; an
	// instance always has one.
	return []string{
			path.Join(m.fsRoot(), "memory", g, "memory.limit_in_bytes"),
			path.Join(m.fsRoot(), "cpu", g, "cpu.shares"),
			path.Join(m.fsRoot(), "cpu", g, "cpu.cfs_quota_us"),
			path.Join(m.fsRoot(), "pids", g, "pids.max"),
		},
		[]string{num(want.MemoryBytes, "9223372036854771712"), shares,
			quota("-1", func(q int64) string { return strconv.FormatInt(q, 10) }),
			num(want.Pids, "max")}
}

// RemoveRootIfEmpty removes the agent's root cgroup when no instance's is
// left in it (the kernel refuses to remove one that has children, which is
// then left as it is).
func (m *Manager) RemoveRootIfEmpty() {
	if m.mode == cgroups.Unified {
		os.Remove(path.Join("/sys/fs/cgroup", m.Root))
		return
	}
	for _, c := range []string{"memory", "cpu", "pids", "blkio"} {
		os.Remove(path.Join("/sys/fs/cgroup", c, m.Root))
	}
}

// None is the limits of an agent without cgroups (turned off, or not
// allowed by the host): it has Manager's methods and does nothing. Its
// instances run unconfined, are in no cgroup to leave, have no limit that
// differs from the record's and are never OOM-killed by a cgroup.
type None struct{}

// Apply confines nothing.
func (None) Apply(id string, pid int, l Limits) error { return nil }

// OOMKills counts none.
func (None) OOMKills(id string) (uint64, error) { return 0, nil }

// Contains is true: there is no cgroup to move pid into.
func (None) Contains(id string, pid int) bool { return true }

// Differs is false: there are no limits to differ.
func (None) Differs(id string, want Limits) (bool, error) { return false, nil }

// Remove has nothing to remove.
func (None) Remove(id string) error { return nil }

// RemoveRootIfEmpty has no root to remove.
func (None) RemoveRootIfEmpty() {}

// IOSupported is false: without cgroups there is no IO controller.
func (None) IOSupported() (bool, string) { return false, "instances run without cgroups" }
