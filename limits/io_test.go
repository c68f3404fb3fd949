package limits

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
)

// sysTree builds a /sys/dev/block and /sys/devices layout in a temporary
// directory: a disk sda (8:0, scheduler bfq) with a partition sda1
// (8:1), a device-mapper dm-0 (253:0, no scheduler) and a disk vda
// (254:0, mq-deadline).
func sysTree(t *testing.T) string {
	t.Helper()
	sys := t.TempDir()
	mk := func(rel, content string) {
		p := filepath.Join(sys, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(id, target string) {
		if err := os.MkdirAll(filepath.Join(sys, "dev", "block"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../../"+target, filepath.Join(sys, "dev", "block", id)); err != nil {
			t.Fatal(err)
		}
	}
	mk("devices/pci0/block/sda/dev", "8:0\n")
	mk("devices/pci0/block/sda/queue/scheduler", "mq-deadline kyber [bfq] none\n")
	mk("devices/pci0/block/sda/sda1/dev", "8:1\n")
	mk("devices/pci0/block/sda/sda1/partition", "1\n")
	mk("devices/virtual/block/dm-0/dev", "253:0\n")
	mk("devices/virtual/block/dm-0/dm/name", "vg-data\n")
	mk("devices/virtio1/block/vda/dev", "254:0\n")
	mk("devices/virtio1/block/vda/queue/scheduler", "none [mq-deadline] kyber bfq\n")
	link("8:0", "devices/pci0/block/sda")
	link("8:1", "devices/pci0/block/sda/sda1")
	link("253:0", "devices/virtual/block/dm-0")
	link("254:0", "devices/virtio1/block/vda")
	return sys
}

// The device the limits go on: the whole disk of a partition, a
// device-mapper device as it is, with its scheduler; an unknown device
// gets a note and no id.
func TestBlockDevice(t *testing.T) {
	r := resolver{sys: sysTree(t)}
	for _, c := range []struct {
		maj, min      uint32
		id, name, sch string
		weighted      bool
		noteHas       string
	}{
		{8, 1, "8:0", "sda", "bfq", true, "partition sda1 (8:1): the limits are on its whole disk sda (8:0)"},
		{8, 0, "8:0", "sda", "bfq", true, ""},
		{253, 0, "253:0", "dm-0", "", false, "device-mapper dm-0 (vg-data)"},
		{254, 0, "254:0", "vda", "mq-deadline", false, ""},
		{7, 3, "", "", "", false, "block device 7:3 is not in"},
	} {
		d, err := r.block(c.maj, c.min)
		if err != nil {
			t.Fatalf("%d:%d: %v", c.maj, c.min, err)
		}
		if d.ID != c.id || d.Name != c.name || d.Scheduler != c.sch || d.Weighted() != c.weighted {
			t.Errorf("%d:%d: got %+v", c.maj, c.min, d)
		}
		if (c.noteHas == "") != (d.Note == "") || !strings.Contains(d.Note, c.noteHas) {
			t.Errorf("%d:%d: note %q, want one with %q", c.maj, c.min, d.Note, c.noteHas)
		}
	}
}

func TestActiveScheduler(t *testing.T) {
	for in, want := range map[string]string{
		"none [mq-deadline] kyber bfq\n": "mq-deadline",
		"[none] mq-deadline\n":           "none",
		"none\n":                         "none",
		"mq-deadline kyber\n":            "",
		"":                               "",
	} {
		if got := activeScheduler(in); got != want {
			t.Errorf("activeScheduler(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseMountinfo(t *testing.T) {
	for line, want := range map[string]mountEntry{
		`36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:                                                                 {dev: "98:0", mountpoint: "/mnt2", fstype: "ext3", source: "/dev/root", options: "rw,errors=continue"},
		`22 1 0:40 / /var/lib/docker/overlay2/x/merged rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/var/lib/docker/overlay2/x/diff,workdir=/w`: {dev: "0:40", mountpoint: "/var/lib/docker/overlay2/x/merged", fstype: "overlay", source: "overlay", options: "rw,lowerdir=/l,upperdir=/var/lib/docker/overlay2/x/diff,workdir=/w"},
		`30 1 0:52 / /srv/my\040data rw - btrfs /dev/sdb rw,space_cache=v2`:                                                                              {dev: "0:52", mountpoint: "/srv/my data", fstype: "btrfs", source: "/dev/sdb", options: "rw,space_cache=v2"},
		`40 1 0:60 / /nfs rw shared:5 - nfs4 srv:/export rw,vers=4.2`:                                                                                    {dev: "0:60", mountpoint: "/nfs", fstype: "nfs4", source: "srv:/export", options: "rw,vers=4.2"},
	} {
		m, ok := parseMountinfo(line)
		if !ok || m != want {
			t.Errorf("parseMountinfo(%q) = %+v, %v; want %+v", line, m, ok, want)
		}
	}
	m, _ := parseMountinfo(`22 1 0:40 / /m rw - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w`)
	if m.option("upperdir") != "/u" || m.option("nosuch") != "" || !m.hasOption("rw") || m.hasOption("ro") {
		t.Errorf("options of %+v", m)
	}
	if _, ok := parseMountinfo("garbage"); ok {
		t.Error("a line without ' - ' parsed")
	}
}

// On this host: the temporary directory's device is a block device (or
// a note says why not), and every IO controller's file names it.
func TestDeviceOfThisHost(t *testing.T) {
	d, err := DeviceOf(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("device of %s: %+v", os.TempDir(), d)
	if d.ID == "" && d.Note == "" {
		t.Fatal("no device and no note saying why")
	}
	if d.ID != "" && !exists("/sys/dev/block/"+d.ID) {
		t.Fatalf("device %s is not in /sys/dev/block", d.ID)
	}
	if d, _ := DeviceOf("/dev/shm"); d.ID != "" || !strings.Contains(d.Note, "tmpfs") {
		t.Errorf("/dev/shm (tmpfs): %+v", d)
	}
}

// fakeCgroup makes the IO controller's files of id in a file layout, as
// the kernel would (empty throttle files), and a Manager over it.
func fakeCgroup(t *testing.T, mode cgroups.CGMode, id string) (*Manager, string) {
	t.Helper()
	m := &Manager{Root: "/ra", mode: mode, fs: t.TempDir(), ioOK: true}
	dir := m.ioDir(id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	files := []string{"io.max", "io.bfq.weight"}
	if mode != cgroups.Unified {
		files = []string{"blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device", "blkio.throttle.read_iops_device",
			"blkio.throttle.write_iops_device", "blkio.bfq.weight", "cgroup.procs"}
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return m, dir
}

func read(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// v2: one io.max line for the device, "max" for what is not limited; a
// weight as "default N".
func TestIOMaxV2Layout(t *testing.T) {
	m, dir := fakeCgroup(t, cgroups.Unified, "x")
	io := IO{Device: "8:0", WriteBPS: 4 << 20, ReadIOPS: 200, Weight: 300}
	if err := m.applyIO("x", 0, io); err != nil {
		t.Fatal(err)
	}
	if got, want := read(t, filepath.Join(dir, "io.max")), "8:0 rbps=max wbps=4194304 riops=200 wiops=max"; got != want {
		t.Errorf("io.max = %q, want %q", got, want)
	}
	if got := read(t, filepath.Join(dir, "io.bfq.weight")); got != "default 300" {
		t.Errorf("io.bfq.weight = %q", got)
	}
	files, expect := m.ioFiles("x", io)
	for i, f := range files {
		if got := read(t, f); got != expect[i] {
			t.Errorf("%s holds %q, ioFiles expects %q", f, got, expect[i])
		}
	}
	// No limit at all: every value max (the kernel then drops the line).
	if err := m.applyIO("x", 0, IO{Device: "8:0"}); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(dir, "io.max")); got != "8:0 rbps=max wbps=max riops=max wiops=max" {
		t.Errorf("io.max without limits = %q", got)
	}
	if got := read(t, filepath.Join(dir, "io.bfq.weight")); got != "default 100" {
		t.Errorf("io.bfq.weight back to the default = %q", got)
	}
	if _, e := m.ioFiles("x", IO{Device: "8:0"}); e[0] != "" {
		t.Errorf("without limits the kernel shows no line, ioFiles expects %q", e[0])
	}
}

// v1: one line per throttle file for the device, none for a limit of 0
// (writing "dev 0" removes it); the process joins the blkio cgroup.
func TestThrottleV1Layout(t *testing.T) {
	m, dir := fakeCgroup(t, cgroups.Legacy, "x")
	io := IO{Device: "254:0", ReadBPS: 8 << 20, WriteIOPS: 50}
	if err := m.applyIO("x", 4242, io); err != nil {
		t.Fatal(err)
	}
	for f, want := range map[string]string{
		"blkio.throttle.read_bps_device":   "254:0 8388608",
		"blkio.throttle.write_bps_device":  "254:0 0",
		"blkio.throttle.read_iops_device":  "254:0 0",
		"blkio.throttle.write_iops_device": "254:0 50",
		"cgroup.procs":                     "4242",
		"blkio.bfq.weight":                 "100",
	} {
		if got := read(t, filepath.Join(dir, f)); got != want {
			t.Errorf("%s = %q, want %q", f, got, want)
		}
	}
	files, expect := m.ioFiles("x", io)
	if len(files) != 4 || expect[0] != "254:0 8388608" || expect[1] != "" || expect[3] != "254:0 50" {
		t.Errorf("ioFiles = %q, %q", files, expect)
	}
	// A rule of another device (the data moved) is cleared first.
	os.WriteFile(filepath.Join(dir, "blkio.throttle.read_bps_device"), []byte("8:0 1000\n"), 0o644)
	if got := ruleDevices(filepath.Join(dir, "blkio.throttle.read_bps_device")); len(got) != 1 || got[0] != "8:0" {
		t.Fatalf("ruleDevices = %q", got)
	}
}

// On this host as root, with a writable IO controller: the limits land
// in the cgroup's files for the data directory's device, Differs sees
// them, and a write that an fsync pushes out is throttled.
func TestIOOnThisHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating cgroups needs root (CI runs as root)")
	}
	m, err := New("redis-agent-test-io-" + strconv.Itoa(os.Getpid()))
	if err != nil {
		t.Skip(err)
	}
	if ok, why := m.IOSupported(); !ok {
		t.Skipf("no IO controller: %s", why)
	}
	dir := t.TempDir()
	dev, err := DeviceOf(dir)
	if err != nil {
		t.Fatal(err)
	}
	if dev.ID == "" {
		t.Skipf("no block device under %s: %s", dir, dev.Note)
	}
	t.Logf("cgroup mode %s, device %+v", m.Mode(), dev)
	// The writer waits for its cgroup, then writes 6 MiB and fsyncs.
	file := filepath.Join(dir, "f")
	cmd := exec.Command("sh", "-c", `read x; dd if=/dev/zero of="$0" bs=1M count=6 conv=fsync 2>/dev/null`, file)
	stdin, _ := cmd.StdinPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		m.Remove("x")
		m.RemoveRootIfEmpty()
	})
	l := Limits{MemoryBytes: 64 << 20, IO: IO{Device: dev.ID, WriteBPS: 2 << 20, ReadIOPS: 500}}
	if err := m.Apply("x", cmd.Process.Pid, l); err != nil {
		t.Fatal(err)
	}
	if !m.Contains("x", cmd.Process.Pid) {
		t.Fatal("the process is not in its cgroups")
	}
	files, expect := m.ioFiles("x", l.IO)
	for i, f := range files {
		if got := read(t, f); got != expect[i] {
			t.Errorf("%s = %q, want %q", f, got, expect[i])
		}
	}
	if d, err := m.Differs("x", l); err != nil || d {
		t.Fatalf("Differs right after Apply = %v, %v", d, err)
	}
	other := l
	other.IO.WriteBPS = 3 << 20
	if d, _ := m.Differs("x", other); !d {
		t.Error("Differs with another write limit = false")
	}
	start := time.Now()
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("6 MiB written and fsynced at 2 MiB/s in %v", took)
	if took < 1500*time.Millisecond {
		t.Errorf("6 MiB at a 2 MiB/s limit took %v: not throttled", took)
	}
	// Limits off: the lines go.
	sleep := exec.Command("sleep", "30")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()
	if err := m.Apply("x", sleep.Process.Pid, Limits{MemoryBytes: 64 << 20, IO: IO{Device: dev.ID}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if got := read(t, f); got != "" {
			t.Errorf("%s after the limits are off = %q", f, got)
		}
	}
}
