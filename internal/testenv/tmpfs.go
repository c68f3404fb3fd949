package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// Tmpfs mounts a tmpfs of size (mount's syntax: "4m", "400m") on a fresh
// TraversableDir and returns it; t.Cleanup unmounts it. A small file
// system of its own gives a test a disk that fills, or a free space
// nothing else on the machine changes. Skipped where not root.
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	needRoot(t, "mounting a tmpfs")
	dir, out, err := mount(t, "-t", "tmpfs", "-o", "size="+size+",mode=0755", "tmpfs")
	if err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	return dir
}

// needRoot skips t, saying what needs root, where it does not run as root.
func needRoot(t testing.TB, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip(what + " needs root (CI runs as root)")
	}
}

// mount runs mount with args and a fresh TraversableDir as the mount
// point, and returns that; once it is mounted, t.Cleanup unmounts it.
func mount(t testing.TB, args ...string) (dir string, out []byte, err error) {
	t.Helper()
	dir = TraversableDir(t)
	if out, err = exec.Command("mount", append(args, dir)...).CombinedOutput(); err != nil {
		return dir, out, err
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Logf("umount %s: %v %s; detaching lazily", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir, out, nil
}
