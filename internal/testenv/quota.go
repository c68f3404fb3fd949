package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// ProjectQuotaFS makes an ext4 file system of sizeMB with project quotas
// (mkfs.ext4 -O quota,project), loop-mounts it with -o prjquota on a
// TraversableDir and returns the mount point; t.Cleanup unmounts it and
// removes the image. The test is skipped, saying why, where the machine
// cannot: not root, no mkfs.ext4 (Debian's e2fsprogs), no loop device, or
// a kernel without quota support (CONFIG_QFMT_V2), whose ext4 refuses to
// mount a file system with the quota feature at all.
func ProjectQuotaFS(t testing.TB, sizeMB int) string {
	t.Helper()
	needRoot(t, "loop-mounting an ext4 image with project quotas")
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
	}
	img := filepath.Join(t.TempDir(), "prjquota.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, int64(sizeMB)<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(mkfs, "-q", "-F", "-O", "quota,project", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4 -O quota,project: %v: %s", err, out)
	}
	dir, out, err := mount(t, "-o", "loop,prjquota", img)
	if err != nil {
		why := strings.TrimSpace(string(out))
		if b, derr := exec.Command("dmesg").Output(); derr == nil {
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			for i := len(lines) - 1; i >= max(len(lines)-400, 0); i-- {
				if strings.Contains(lines[i], "EXT4-fs") {
					why += "; kernel: " + strings.TrimSpace(lines[i])
					break
				}
			}
		}
		t.Skipf("cannot loop-mount an ext4 image with project quotas here (mount -o loop,prjquota: %v): %s", err, why)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
