package volumes

import (
	"os"
	"path/filepath"
	"testing"
)

// An atomic write a crash cut short leaves its temporary file; the next
// Create of the instance (every start and rewrite of its files) removes
// it, and nothing else.
func TestCreateRemovesStaleTemporaryFiles(t *testing.T) {
	l := Layout{DataRoot: t.TempDir(), LogRoot: t.TempDir()}
	if err := l.Create("i1", Unowned); err != nil {
		t.Fatal(err)
	}
	dir := l.Dir("i1")
	var stale []string
	for _, base := range []string{"redis.conf", "users.acl", "redis.conf"} {
		f, err := os.CreateTemp(dir, "."+base+".tmp*") // as WriteFileAtomic names them
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		stale = append(stale, f.Name())
	}
	keep := []string{"redis.conf", "users.acl", "notes.tmp1", ".redis.conf.tmp", ".redis.conf.tmpx"}
	for _, name := range keep {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, ".sub.tmp1"), 0o700); err != nil {
		t.Fatal(err)
	}
	keep = append(keep, ".sub.tmp1", "data")

	if err := l.Create("i1", Unowned); err != nil {
		t.Fatal(err)
	}
	for _, p := range stale {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("stale %s is still there (%v)", filepath.Base(p), err)
		}
	}
	for _, name := range keep {
		if _, err := os.Lstat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s was removed: %v", name, err)
		}
	}
}
