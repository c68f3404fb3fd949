package testenv

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
)

var launcher struct {
	once sync.Once
	path string
	err  error
	out  []byte
}

// Launcher returns redis-agent-launch built from this checkout, once per
// test process: the agents of the tests confine their redis-servers as a
// deployed one does. The binary lives in a directory of the temp dir named
// by the checkout's path (each process builds it afresh, from Go's build
// cache, and renames it into place, so a process never runs another
// checkout's).
func Launcher(t testing.TB) string {
	t.Helper()
	launcher.once.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		sum := sha256.Sum256([]byte(root))
		dir := filepath.Join(os.TempDir(), "redis-agent-testenv-launcher-"+hex.EncodeToString(sum[:6]))
		if launcher.err = os.MkdirAll(dir, 0o755); launcher.err != nil {
			return
		}
		tmp := filepath.Join(dir, "redis-agent-launch."+strconv.Itoa(os.Getpid()))
		cmd := exec.Command("go", "build", "-o", tmp, "./cmd/redis-agent-launch")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if launcher.out, launcher.err = cmd.CombinedOutput(); launcher.err != nil {
			return
		}
		launcher.path = filepath.Join(dir, "redis-agent-launch")
		launcher.err = os.Rename(tmp, launcher.path)
	})
	if launcher.err != nil {
		t.Fatalf("build redis-agent-launch: %v\n%s", launcher.err, launcher.out)
	}
	return launcher.path
}
