package limits

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The kernel's structures and command numbers, as linux/quota.h and
// linux/fs.h have them.
func TestQuotaABI(t *testing.T) {
	if n := unsafe.Sizeof(ifDqblk{}); n != 72 {
		t.Errorf("struct if_dqblk is %d bytes, want 72", n)
	}
	if n := unsafe.Sizeof(ifDqinfo{}); n != 24 {
		t.Errorf("struct if_dqinfo is %d bytes, want 24", n)
	}
	if n := unsafe.Sizeof(fsxattr{}); n != 28 {
		t.Errorf("struct fsxattr is %d bytes, want 28", n)
	}
	if c := qcmd(qGetQuota, prjQuota); c != 0x80000702 {
		t.Errorf("QCMD(Q_GETQUOTA, PRJQUOTA) = %#x", c)
	}
	// _IOR('X', 31, struct fsxattr) and _IOW('X', 32, ...)
	ior := uintptr(2<<30 | unsafe.Sizeof(fsxattr{})<<16 | 'X'<<8 | 31)
	iow := uintptr(1<<30 | unsafe.Sizeof(fsxattr{})<<16 | 'X'<<8 | 32)
	if fsIOCGetXattr != ior || fsIOCSetXattr != iow {
		t.Errorf("FS_IOC_FSGETXATTR %#x (want %#x), FS_IOC_FSSETXATTR %#x (want %#x)", fsIOCGetXattr, ior, fsIOCSetXattr, iow)
	}
}

// Where the file system cannot enforce project quotas the probe says why,
// once, in words an operator can act on.
func TestProbeQuotasSaysWhy(t *testing.T) {
	if os.Geteuid() != 0 {
		if q, why := ProbeQuotas(t.TempDir()); q != nil || !strings.Contains(why, "not root") {
			t.Fatalf("ProbeQuotas as a user = %v, %q", q, why)
		}
		return
	}
	dir := t.TempDir()
	q, why := ProbeQuotas(dir)
	t.Logf("%s: %v %q", dir, q, why)
	if q == nil && why == "" {
		t.Fatal("no quotas and no reason")
	}
	if q, why := ProbeQuotas("/dev/shm"); q != nil || !strings.Contains(why, "tmpfs") {
		t.Errorf("/dev/shm: %v, %q", q, why)
	}
	// The mount table says prjquota where the kernel has no quota on:
	// quotactl itself says so.
	var sfs unix.Statfs_t
	unix.Statfs(dir, &sfs)
	if sfs.Type != unix.EXT4_SUPER_MAGIC {
		t.Skipf("%s is not on ext4", dir)
	}
	var st unix.Stat_t
	unix.Stat(dir, &st)
	mi := filepath.Join(t.TempDir(), "mountinfo")
	os.WriteFile(mi, []byte("1 0 "+itoa(unix.Major(st.Dev))+":"+itoa(unix.Minor(st.Dev))+" / / rw - ext4 /dev/nosuch rw,prjquota\n"), 0o644)
	if q == nil {
		q2, why := probeQuotas(resolver{sys: "/sys", mountinfo: mi}, dir)
		if q2 != nil || !strings.Contains(why, "project quotas are not on") {
			t.Errorf("prjquota in the mount table, none in the kernel: %v, %q", q2, why)
		}
	}
	// The project of a directory is read with FS_IOC_FSGETXATTR.
	if p, _, err := projectOf(dir); err != nil || p != 0 {
		t.Errorf("projectOf(%s) = %d, %v", dir, p, err)
	}
}

func itoa(n uint32) string { return strconv.FormatUint(uint64(n), 10) }

// On a loop-mounted ext4 with project quotas: a directory over its
// project's limit gets EDQUOT, its neighbour in another project keeps
// writing, the usage is read without a walk, and a file moves into a
// project's directory once it is in that project (EXDEV before).
func TestProjectQuotaOnLoopExt4(t *testing.T) {
	mnt := testenv.ProjectQuotaFS(t, 64)
	q, why := ProbeQuotas(mnt)
	if q == nil {
		t.Fatalf("ProbeQuotas on an ext4 mounted with prjquota: %s", why)
	}
	a, b := filepath.Join(mnt, "a"), filepath.Join(mnt, "b")
	for _, d := range []string{a, b} {
		if err := os.MkdirAll(filepath.Join(d, "data"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := Assign(a, 4001); err != nil {
		t.Fatal(err)
	}
	if err := Assign(b, 4002); err != nil {
		t.Fatal(err)
	}
	if p, inherit, err := projectOf(filepath.Join(a, "data")); err != nil || p != 4001 || !inherit {
		t.Fatalf("project of a/data = %d, %v, %v", p, inherit, err)
	}
	if err := q.SetLimit(4001, 2<<20); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.SetLimit(4001, 0) })
	write := func(path string, n int) error {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		defer f.Close()
		buf := make([]byte, 64<<10)
		for i := 0; i < n; i += len(buf) {
			if _, err := f.Write(buf); err != nil {
				return err
			}
		}
		return f.Sync()
	}
	err := write(filepath.Join(a, "data", "big"), 4<<20)
	if !errors.Is(err, syscall.EDQUOT) && !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("4 MiB into a 2 MiB project: %v, want EDQUOT", err)
	}
	if err := write(filepath.Join(b, "data", "big"), 4<<20); err != nil {
		t.Fatalf("the neighbour's 4 MiB: %v", err)
	}
	used, limit, err := q.Usage(4001)
	if err != nil || limit != 2<<20 || used < 1<<20 || used > 2<<20 {
		t.Fatalf("Usage = %d of %d, %v", used, limit, err)
	}
	// A file from outside (a restore's upload) moves in only once in the
	// project.
	up := filepath.Join(mnt, "upload")
	if err := write(up, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(up, filepath.Join(b, "data", "up")); !errors.Is(err, syscall.EXDEV) {
		t.Fatalf("rename into another project = %v, want EXDEV", err)
	}
	if err := SetProject(up, 4002); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(up, filepath.Join(b, "data", "up")); err != nil {
		t.Fatalf("rename once in the project: %v", err)
	}
}
