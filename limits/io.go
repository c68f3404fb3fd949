package limits

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
)

// IO is an instance's IO limits on one block device: reads and writes a
// second, in bytes and in operations, throttled by the kernel
// (blkio.throttle.*_device on v1, io.max on v2), and optionally its
// weight under contention (BFQ's blkio.bfq.weight, io.bfq.weight).
//
// On v1 only IO the instance's own processes submit is throttled: reads,
// direct writes and the writes an fsync pushes out (an AOF's fsync, a
// BGSAVE's incremental fsync), not the kernel's background writeback of
// dirty pages. v2 also charges writeback to the cgroup that dirtied the
// pages.
type IO struct {
	// Device is "major:minor" (Device.ID); "" sets no limit.
	Device string
	// ReadBPS, WriteBPS (bytes a second), ReadIOPS and WriteIOPS
	// (operations a second); 0 is no limit.
	ReadBPS, WriteBPS, ReadIOPS, WriteIOPS uint64
	// Weight is the share of the device under contention, 1-1000 (100 is
	// everyone's default); 0 leaves it at the default. Only BFQ uses it.
	Weight uint64
}

// throttled reports whether io sets any throttle.
func (io IO) throttled() bool {
	return io.Device != "" && io.ReadBPS|io.WriteBPS|io.ReadIOPS|io.WriteIOPS != 0
}

// MaxIOWeight is the highest Weight.
const MaxIOWeight = 1000

// IOSupported reports whether the host lets the agent limit its
// instances' IO (a writable blkio hierarchy on v1, the io controller on
// v2), and if not, why.
func (m *Manager) IOSupported() (bool, string) { return m.ioOK, m.ioNote }

// fsRoot is the cgroup file system's mount point.
func (m *Manager) fsRoot() string {
	if m.fs != "" {
		return m.fs
	}
	return "/sys/fs/cgroup"
}

// ioDir is id's cgroup directory of the IO controller.
func (m *Manager) ioDir(id string) string {
	if m.mode == cgroups.Unified {
		return path.Join(m.fsRoot(), m.group(id))
	}
	return path.Join(m.fsRoot(), "blkio", m.group(id))
}

// probeIO finds out whether the IO controller can be used under Root,
// creating Root's directory of it on v1 and enabling it for the children
// on v2.
func (m *Manager) probeIO() {
	m.ioOK, m.ioNote = false, ""
	if m.mode == cgroups.Unified {
		root := path.Join(m.fsRoot(), m.Root)
		b, err := os.ReadFile(path.Join(root, "cgroup.controllers"))
		if err != nil || !strings.Contains(" "+strings.TrimSpace(string(b))+" ", " io ") {
			m.ioNote = "the io controller is not available to " + root + " (not in its cgroup.controllers)"
			return
		}
		if err := os.WriteFile(path.Join(root, "cgroup.subtree_control"), []byte("+io"), 0); err != nil {
			m.ioNote = fmt.Sprintf("cannot enable the io controller under %s: %v", root, err)
			return
		}
		m.ioOK = true
		return
	}
	base := path.Join(m.fsRoot(), "blkio")
	if !exists(path.Join(base, "blkio.throttle.write_bps_device")) {
		m.ioNote = "no blkio cgroup hierarchy with throttling at " + base
		return
	}
	if err := os.MkdirAll(path.Join(base, m.Root), 0o755); err != nil {
		m.ioNote = fmt.Sprintf("cannot create %s: %v", path.Join(base, m.Root), err)
		return
	}
	m.ioOK = true
}

// ioFiles returns the files of id's cgroup that hold io's limits and the
// text each holds once they are applied (io.Device's line only: applyIO
// clears any other device's). A Weight of 0 is not checked.
func (m *Manager) ioFiles(id string, io IO) (files, expect []string) {
	dir := m.ioDir(id)
	if m.mode == cgroups.Unified {
		files = []string{path.Join(dir, "io.max")}
		expect = []string{""}
		if io.throttled() {
			expect[0] = io.Device + " " + ioMax(io)
		}
		if io.Weight > 0 {
			files = append(files, path.Join(dir, "io.bfq.weight"))
			expect = append(expect, "default "+strconv.FormatUint(io.Weight, 10))
		}
		return files, expect
	}
	for _, f := range []struct {
		name string
		v    uint64
	}{{"read_bps", io.ReadBPS}, {"write_bps", io.WriteBPS}, {"read_iops", io.ReadIOPS}, {"write_iops", io.WriteIOPS}} {
		files = append(files, path.Join(dir, "blkio.throttle."+f.name+"_device"))
		want := ""
		if io.Device != "" && f.v > 0 {
			want = io.Device + " " + strconv.FormatUint(f.v, 10)
		}
		expect = append(expect, want)
	}
	if io.Weight > 0 {
		files = append(files, path.Join(dir, "blkio.bfq.weight"))
		expect = append(expect, strconv.FormatUint(io.Weight, 10))
	}
	return files, expect
}

// ioMax is the io.max text of io's limits ("rbps=1048576 wbps=max ...").
func ioMax(io IO) string {
	v := func(n uint64) string {
		if n == 0 {
			return "max"
		}
		return strconv.FormatUint(n, 10)
	}
	return fmt.Sprintf("rbps=%s wbps=%s riops=%s wiops=%s", v(io.ReadBPS), v(io.WriteBPS), v(io.ReadIOPS), v(io.WriteIOPS))
}

// applyIO puts pid into id's cgroup of the IO controller (creating it on
// v1, where it is a hierarchy of its own) and sets io's limits there:
// io.Device's lines get io's values, every other device's line is
// cleared (the data directory's device changed), a limit of 0 clears its
// line.
func (m *Manager) applyIO(id string, pid int, io IO) error {
	dir := m.ioDir(id)
	if m.mode != cgroups.Unified {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if m.mode == cgroups.Unified {
		f := path.Join(dir, "io.max")
		for _, dev := range ruleDevices(f) {
			if dev != io.Device {
				if err := writeRule(f, dev+" rbps=max wbps=max riops=max wiops=max"); err != nil {
					return err
				}
			}
		}
		if io.Device != "" {
			if err := writeRule(f, io.Device+" "+ioMax(io)); err != nil {
				return err
			}
		}
		if err := setWeight(path.Join(dir, "io.bfq.weight"), "default ", io.Weight); err != nil {
			return err
		}
	} else {
		files, _ := m.ioFiles(id, IO{})
		vals := []uint64{io.ReadBPS, io.WriteBPS, io.ReadIOPS, io.WriteIOPS}
		for i, f := range files[:4] {
			for _, dev := range ruleDevices(f) {
				if dev != io.Device {
					if err := writeRule(f, dev+" 0"); err != nil {
						return err
					}
				}
			}
			if io.Device != "" {
				if err := writeRule(f, io.Device+" "+strconv.FormatUint(vals[i], 10)); err != nil {
					return err
				}
			}
		}
		if err := setWeight(path.Join(dir, "blkio.bfq.weight"), "", io.Weight); err != nil {
			return err
		}
		if pid > 0 {
			if err := writeRule(path.Join(dir, "cgroup.procs"), strconv.Itoa(pid)); err != nil {
				return err
			}
		}
	}
	return nil
}

// setWeight writes weight (0: BFQ's default, 100) to a weight file
// whose text is prefix and the weight, when it holds another; a kernel
// without BFQ has no such file, and nothing to set.
func setWeight(file, prefix string, weight uint64) error {
	if weight == 0 {
		weight = defaultIOWeight
	}
	want := prefix + strconv.FormatUint(weight, 10)
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil && strings.TrimSpace(string(b)) == want {
		return nil
	}
	return writeRule(file, want)
}

// defaultIOWeight is BFQ's weight of a cgroup that sets none.
const defaultIOWeight = 100

// ruleDevices returns the devices that have a line in a throttle file.
func ruleDevices(file string) []string {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil
	}
	var devs []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.Contains(f[0], ":") {
			devs = append(devs, f[0])
		}
	}
	return devs
}

// writeRule writes one rule to a cgroup file, which takes one a write.
func writeRule(file, rule string) error {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(rule)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", rule, file, err)
	}
	return nil
}

// ioContains reports whether pid is in id's cgroup of the v1 blkio
// hierarchy, from the lines of /proc/<pid>/cgroup.
func (m *Manager) ioContains(lines []string, id string) bool {
	want := m.group(id)
	for _, line := range lines {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 && parts[2] == want && strings.Contains(","+parts[1]+",", ",blkio,") {
			return true
		}
	}
	return false
}
