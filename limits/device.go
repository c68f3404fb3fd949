package limits

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Device is the block device that holds a directory, as the IO controller
// names it: the one the instances' IO limits are set on.
type Device struct {
	// ID is "major:minor" of the device the limits go on: the whole disk
	// for a partition (the kernel throttles whole disks, not partitions),
	// a device-mapper, md or loop device as it is. "" when the directory
	// is on no block device (tmpfs, NFS, FUSE): nothing can be throttled.
	ID string
	// Name is the kernel's name of that device ("vda", "dm-0").
	Name string
	// Scheduler is its IO scheduler ("mq-deadline", "bfq", "none"); ""
	// when it has none (a bio-based device: device-mapper, md, zram).
	Scheduler string
	// Note says what an operator should know of it: why there is no
	// device, or what a limit on this one covers.
	Note string
}

// Weighted reports whether a weight (blkio.bfq.weight, io.bfq.weight)
// has an effect on d: only BFQ shares a device by weight.
func (d Device) Weighted() bool { return d.Scheduler == "bfq" }

// DeviceOf resolves the block device of the file system that holds dir.
func DeviceOf(dir string) (Device, error) {
	return resolver{sys: "/sys", mountinfo: "/proc/self/mountinfo"}.deviceOf(dir, 0)
}

// resolver reads /sys and a mountinfo file, both replaceable for tests.
type resolver struct {
	sys, mountinfo string
}

func (r resolver) deviceOf(dir string, depth int) (Device, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return Device{}, fmt.Errorf("statfs %s: %w", dir, err)
	}
	if fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC {
		return Device{Note: "the data directory is on tmpfs: its files are memory, not a block device, so no IO limit applies"}, nil
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return Device{}, fmt.Errorf("stat %s: %w", dir, err)
	}
	maj, min := unix.Major(st.Dev), unix.Minor(st.Dev)
	if maj != 0 {
		return r.block(maj, min)
	}
	// An anonymous device (overlay, btrfs, NFS, FUSE): what the mount
	// table says is beneath it.
	m, err := r.mount(dir, maj, min)
	if err != nil {
		return Device{}, err
	}
	switch {
	case m.fstype == "overlay":
		upper := m.option("upperdir")
		if upper == "" || depth > 0 {
			return Device{Note: "the data directory is on an overlay without an upper directory on a block device: no IO limit applies"}, nil
		}
		d, err := r.deviceOf(upper, depth+1)
		if err != nil {
			return Device{}, err
		}
		if d.ID != "" {
			d.Note = join("the data directory is on an overlay: the limits are on the device of its upper directory "+upper+", where its writes go", d.Note)
		}
		return d, nil
	case strings.HasPrefix(m.source, "/dev/"):
		var bst unix.Stat_t
		if err := unix.Stat(m.source, &bst); err != nil || bst.Mode&unix.S_IFMT != unix.S_IFBLK {
			return Device{Note: fmt.Sprintf("the data directory is on %s from %s, which is not a block device here: no IO limit applies", m.fstype, m.source)}, nil
		}
		d, err := r.block(unix.Major(bst.Rdev), unix.Minor(bst.Rdev))
		if err == nil && d.ID != "" && m.fstype == "btrfs" {
			d.Note = join("the data directory is on btrfs: the limits are on "+m.source+", the device it was mounted from (a btrfs over several devices is throttled on that one only)", d.Note)
		}
		return d, err
	}
	return Device{Note: fmt.Sprintf("the data directory is on %s (%s), which is not a block device: no IO limit applies", m.fstype, m.source)}, nil
}

// block resolves the block device maj:min to the one the IO controller
// takes.
func (r resolver) block(maj, min uint32) (Device, error) {
	id := fmt.Sprintf("%d:%d", maj, min)
	link := filepath.Join(r.sys, "dev", "block", id)
	dir, err := filepath.EvalSymlinks(link)
	if err != nil {
		return Device{Note: "block device " + id + " is not in " + filepath.Join(r.sys, "dev", "block") + ": no IO limit applies"}, nil
	}
	d := Device{ID: id, Name: filepath.Base(dir)}
	if exists(filepath.Join(dir, "partition")) {
		disk := filepath.Dir(dir)
		b, err := os.ReadFile(filepath.Join(disk, "dev"))
		if err != nil {
			return Device{}, fmt.Errorf("whole disk of partition %s: %w", d.Name, err)
		}
		part := d.Name
		d.ID, d.Name = strings.TrimSpace(string(b)), filepath.Base(disk)
		dir = disk
		d.Note = fmt.Sprintf("the data directory is on partition %s (%s): the limits are on its whole disk %s (%s), which the kernel throttles, and count every partition's IO of the instance", part, id, d.Name, d.ID)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "dm", "name")); err == nil {
		d.Note = join(fmt.Sprintf("the data directory is on device-mapper %s (%s): the limits are on the mapped device, whatever disks are beneath it", d.Name, strings.TrimSpace(string(b))), d.Note)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "queue", "scheduler")); err == nil {
		d.Scheduler = activeScheduler(string(b))
	}
	return d, nil
}

// activeScheduler picks the bracketed name of a queue/scheduler file
// ("none [mq-deadline] kyber bfq"); a single name without brackets is
// the only one.
func activeScheduler(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '['); i >= 0 {
		if j := strings.IndexByte(s[i:], ']'); j > 0 {
			return s[i+1 : i+j]
		}
	}
	if !strings.ContainsRune(s, ' ') {
		return s
	}
	return ""
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func join(a, b string) string {
	if b == "" {
		return a
	}
	return a + "; " + b
}

// mountEntry is one line of a mountinfo file.
type mountEntry struct {
	dev        string // "major:minor"
	mountpoint string
	fstype     string
	source     string
	options    string // super options
}

func (m mountEntry) option(name string) string {
	for _, o := range strings.Split(m.options, ",") {
		if v, ok := strings.CutPrefix(o, name+"="); ok {
			return v
		}
	}
	return ""
}

// HasOption reports whether the mount's super options hold name.
func (m mountEntry) hasOption(name string) bool {
	for _, o := range strings.Split(m.options, ",") {
		if o == name {
			return true
		}
	}
	return false
}

// mount returns the mountinfo entry of the file system maj:min that
// holds dir: of its mounts (bind mounts show one file system at several
// places), the one whose mount point is the longest prefix of dir, else
// the last.
func (r resolver) mount(dir string, maj, min uint32) (mountEntry, error) {
	if p, err := filepath.EvalSymlinks(dir); err == nil {
		dir = p
	}
	f, err := os.Open(r.mountinfo)
	if err != nil {
		return mountEntry{}, err
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", maj, min)
	var found, under *mountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m, ok := parseMountinfo(sc.Text())
		if !ok || m.dev != want {
			continue
		}
		found = &m
		if within(dir, m.mountpoint) && (under == nil || len(m.mountpoint) >= len(under.mountpoint)) {
			under = &m
		}
	}
	if under != nil {
		found = under
	}
	if err := sc.Err(); err != nil {
		return mountEntry{}, err
	}
	if found == nil {
		return mountEntry{}, fmt.Errorf("file system %s is not in %s", want, r.mountinfo)
	}
	return *found, nil
}

// within reports whether path is dir or under it.
func within(path, dir string) bool {
	return dir == "/" || path == dir || strings.HasPrefix(path, dir+"/")
}

// parseMountinfo reads one line of /proc/<pid>/mountinfo:
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
func parseMountinfo(line string) (mountEntry, bool) {
	pre, post, ok := strings.Cut(line, " - ")
	if !ok {
		return mountEntry{}, false
	}
	a, b := strings.Fields(pre), strings.Fields(post)
	if len(a) < 5 || len(b) < 2 {
		return mountEntry{}, false
	}
	m := mountEntry{dev: a[2], mountpoint: unescapeMount(a[4]), fstype: b[0], source: unescapeMount(b[1])}
	if len(b) > 2 {
		m.options = b[2]
	}
	return m, true
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
