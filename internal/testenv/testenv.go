// Package testenv holds what the tests of several packages need from the
// machine: the redis-server binary (a test fails in CI when it is missing,
// and is skipped elsewhere), free loopback ports, ranges of them that no
// other test holds (Ports), directories that an unprivileged redis user
// can traverse, and the one poll for a condition (Eventually).
package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// RedisServer returns the path of redis-server. Without it the test is
// skipped on a developer's machine and fails under CI (CI=true), where the
// Redis-backed tests must run.
func RedisServer(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server not installed; CI must run the Redis-backed tests")
		}
		t.Skip("redis-server not installed")
	}
	return p
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TraversableDir is a t.TempDir whose path an unprivileged redis user can
// walk, for tests that run as root with redis-server dropping privileges.
func TraversableDir(t testing.TB) string {
	t.Helper()
	d := t.TempDir()
	for p := d; p != os.TempDir() && p != "/"; p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	return d
}
