package limits

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Project quotas: where the data directory's file system enforces them
// (ext4 made with the project and quota features, or XFS, mounted with
// prjquota), each instance's directory gets a project id of its own,
// inherited by everything created in it, and a hard block limit on that
// project, so an instance that outgrows it gets ENOSPC (EDQUOT) on its
// own writes while its neighbours keep writing.

// Quotas sets project quotas on one file system. Create it with
// ProbeQuotas.
type Quotas struct {
	// dir is a directory on the file system: quotactl_fd's handle.
	dir string
	// device is its block device, for kernels without quotactl_fd.
	device string
	// FSType is "ext4" or "xfs".
	FSType string
}

// Linux's quota interface (linux/quota.h, linux/fs.h).
const (
	prjQuota       = 2
	qGetInfo       = 0x800005
	qGetQuota      = 0x800007
	qSetQuota      = 0x800008
	qifBLimits     = 1
	qifSpace       = 4
	fsIOCGetXattr  = 0x801c581f // FS_IOC_FSGETXATTR
	fsIOCSetXattr  = 0x401c5820 // FS_IOC_FSSETXATTR
	fsXflagProjInh = 0x200      // FS_XFLAG_PROJINHERIT
	quotaBlock     = 1024       // QIF_DQBLKSIZE: the unit of dqb_*limit
)

// ifDqblk is struct if_dqblk.
type ifDqblk struct {
	BHardLimit uint64
	BSoftLimit uint64
	CurSpace   uint64
	IHardLimit uint64
	ISoftLimit uint64
	CurInodes  uint64
	BTime      uint64
	ITime      uint64
	Valid      uint32
	_          uint32
}

// ifDqinfo is struct if_dqinfo.
type ifDqinfo struct {
	BGrace, IGrace uint64
	Flags, Valid   uint32
}

// fsxattr is struct fsxattr.
type fsxattr struct {
	Xflags     uint32
	Extsize    uint32
	Nextents   uint32
	Projid     uint32
	Cowextsize uint32
	_          [8]byte
}

func qcmd(cmd, typ uint32) uint32 { return cmd<<8 | typ&0xff }

// ProbeQuotas returns the project quotas of the file system that holds
// dir, or nil and why it has none.
func ProbeQuotas(dir string) (*Quotas, string) {
	return probeQuotas(resolver{sys: "/sys", mountinfo: "/proc/self/mountinfo"}, dir)
}

func probeQuotas(r resolver, dir string) (*Quotas, string) {
	if os.Geteuid() != 0 {
		return nil, "the agent is not root, and setting quotas needs it"
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return nil, fmt.Sprintf("statfs %s: %v", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return nil, fmt.Sprintf("stat %s: %v", dir, err)
	}
	m, err := r.mount(dir, unix.Major(st.Dev), unix.Minor(st.Dev))
	if err != nil {
		return nil, err.Error()
	}
	q := &Quotas{dir: dir, device: m.source, FSType: m.fstype}
	switch {
	case sfs.Type == unix.EXT4_SUPER_MAGIC && m.fstype == "ext4", sfs.Type == unix.XFS_SUPER_MAGIC:
	default:
		return nil, fmt.Sprintf("the data directory is on %s, which has no project quotas (ext4 or XFS mounted with prjquota have them)", m.fstype)
	}
	if !m.hasOption("prjquota") && !m.hasOption("pquota") {
		how := "mount it with -o prjquota"
		if m.fstype == "ext4" {
			how = "make it with mkfs.ext4 -O quota,project (or tune2fs -O quota,project while unmounted) and mount it with -o prjquota"
		}
		return nil, fmt.Sprintf("%s %s on %s is not mounted with prjquota: %s", m.fstype, m.source, m.mountpoint, how)
	}
	var info ifDqinfo
	if err := q.quotactl(qGetInfo, 0, unsafe.Pointer(&info)); err != nil {
		return nil, fmt.Sprintf("%s %s on %s: project quotas are not on: %v", m.fstype, m.source, m.mountpoint, err)
	}
	return q, ""
}

// quotactl runs a project quota command: quotactl_fd(2) on the
// directory, else quotactl(2) on the block device.
func (q *Quotas) quotactl(cmd uint32, id uint32, addr unsafe.Pointer) error {
	f, err := os.Open(q.dir)
	if err != nil {
		return err
	}
	defer f.Close()
	c := qcmd(cmd, prjQuota)
	_, _, errno := unix.Syscall6(unix.SYS_QUOTACTL_FD, f.Fd(), uintptr(c), uintptr(id), uintptr(addr), 0, 0)
	if errno == unix.ENOSYS {
		dev, err := unix.BytePtrFromString(q.device)
		if err != nil {
			return err
		}
		_, _, errno = unix.Syscall6(unix.SYS_QUOTACTL, uintptr(c), uintptr(unsafe.Pointer(dev)), uintptr(id), uintptr(addr), 0, 0)
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// SetLimit sets project id's hard limit to bytes (rounded up to KiB); 0
// removes it.
func (q *Quotas) SetLimit(id uint32, bytes int64) error {
	d := ifDqblk{BHardLimit: uint64((bytes + quotaBlock - 1) / quotaBlock), Valid: qifBLimits}
	if err := q.quotactl(qSetQuota, id, unsafe.Pointer(&d)); err != nil {
		return fmt.Errorf("set the quota of project %d: %w", id, err)
	}
	return nil
}

// Usage returns what project id's files take, and its hard limit, in
// bytes.
func (q *Quotas) Usage(id uint32) (used, limit int64, err error) {
	var d ifDqblk
	if err := q.quotactl(qGetQuota, id, unsafe.Pointer(&d)); err != nil {
		return 0, 0, fmt.Errorf("read the quota of project %d: %w", id, err)
	}
	return int64(d.CurSpace), int64(d.BHardLimit) * quotaBlock, nil
}

// Assign puts dir and everything under it in project id, dir and its
// subdirectories with the inherit flag so that what is created in them
// later is too. It stops early when dir is in the project already (what
// is under it then is as well: an instance's files are created in it).
func Assign(dir string, id uint32) error {
	if p, inherit, err := projectOf(dir); err == nil && p == id && inherit {
		return nil
	}
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil // symlinks, sockets: no project of their own to set
		}
		if err := SetProject(path, id); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	})
}

// SetProject sets the project id of one file or directory (a directory
// also gets the inherit flag): a file moved into an instance's directory
// must be in its project first, or the rename fails with EXDEV.
func SetProject(path string, id uint32) error {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	var x fsxattr
	if err := ioctl(f, fsIOCGetXattr, unsafe.Pointer(&x)); err != nil {
		return fmt.Errorf("project of %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	want := x.Xflags
	if st.IsDir() {
		want |= fsXflagProjInh
	}
	if x.Projid == id && x.Xflags == want {
		return nil
	}
	x.Projid, x.Xflags = id, want
	if err := ioctl(f, fsIOCSetXattr, unsafe.Pointer(&x)); err != nil {
		return fmt.Errorf("set project %d on %s: %w", id, path, err)
	}
	return nil
}

// projectOf returns the project id of path and whether it has the
// inherit flag.
func projectOf(path string) (uint32, bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	var x fsxattr
	if err := ioctl(f, fsIOCGetXattr, unsafe.Pointer(&x)); err != nil {
		return 0, false, err
	}
	return x.Projid, x.Xflags&fsXflagProjInh != 0, nil
}

func ioctl(f *os.File, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
