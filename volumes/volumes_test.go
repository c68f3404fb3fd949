package volumes

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestValidateID(t *testing.T) {
	valid := []string{"a", "A9", "0d4f6b6e-1c2a-4c3b-9f0e-2b7f8a1c9d10", "x.y_z-1", strings.Repeat("a", 64)}
	invalid := []string{"", ".", "..", "../etc", "a/b", "-a", ".hidden", "_a", "a b", "a\x00", strings.Repeat("a", 65), "é", "a\n"}
	for _, id := range valid {
		if err := ValidateID(id); err != nil {
			t.Errorf("ValidateID(%q) = %v, want nil", id, err)
		}
	}
	for _, id := range invalid {
		if err := ValidateID(id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("ValidateID(%q) = %v, want ErrInvalidID", id, err)
		}
	}
}

func FuzzValidateID(f *testing.F) {
	for _, s := range []string{"a", "..", "a/b", "0d4f6b6e-1c2a", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ValidateID(id) != nil {
			return
		}
		// Whatever passes must stay a single path element under the root.
		root := "/data"
		p := filepath.Join(root, id)
		if filepath.Dir(p) != root || filepath.Base(p) != id {
			t.Fatalf("valid id %q escapes the root: %q", id, p)
		}
	})
}

func newLayout(t *testing.T) Layout {
	t.Helper()
	root := t.TempDir()
	l := Layout{DataRoot: filepath.Join(root, "data"), LogRoot: filepath.Join(root, "log")}
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	return l
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestCreateRemove(t *testing.T) {
	l := newLayout(t)
	if err := l.Create("inst-1", Unowned); err != nil {
		t.Fatal(err)
	}
	// Idempotent: reconcile may call it again on a half-made instance.
	if err := l.Create("inst-1", Unowned); err != nil {
		t.Fatal(err)
	}
	if got := mode(t, l.DataDir("inst-1")); got != 0o700 {
		t.Errorf("data dir mode = %o, want 700", got)
	}
	if got := mode(t, l.Dir("inst-1")); got != 0o750 {
		t.Errorf("instance dir mode = %o, want 750", got)
	}
	if got := mode(t, l.LogPath("inst-1")); got != 0o640 {
		t.Errorf("log mode = %o, want 640", got)
	}
	if err := l.WriteConfig(l.ConfPath("inst-1"), []byte("port 1\n"), Unowned); err != nil {
		t.Fatal(err)
	}
	if got := mode(t, l.ConfPath("inst-1")); got != 0o640 {
		t.Errorf("config mode = %o, want 640", got)
	}
	ids, err := l.List()
	if err != nil || len(ids) != 1 || ids[0] != "inst-1" {
		t.Fatalf("List = %v, %v", ids, err)
	}
	if err := l.Remove("inst-1"); err != nil {
		t.Fatal(err)
	}
	if l.Exists("inst-1") {
		t.Error("instance dir still exists after Remove")
	}
	if _, err := os.Stat(l.LogPath("inst-1")); !os.IsNotExist(err) {
		t.Errorf("log still exists after Remove: %v", err)
	}
	if err := l.Remove("inst-1"); err != nil {
		t.Errorf("second Remove = %v, want nil", err)
	}
}

func TestCreateRejectsBadID(t *testing.T) {
	l := newLayout(t)
	for _, id := range []string{"..", "../x", "a/b"} {
		if err := l.Create(id, Unowned); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Create(%q) = %v, want ErrInvalidID", id, err)
		}
		if err := l.Remove(id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Remove(%q) = %v, want ErrInvalidID", id, err)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(l.DataRoot))
	if len(entries) != 2 {
		t.Errorf("bad ids created files: %v", entries)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, content := range []string{"one", "two, longer"} {
		if err := WriteFileAtomic(p, []byte(content), 0o600, Owner{-1, -1}); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != content {
			t.Fatalf("read back %q, %v; want %q", got, err, content)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}
	// A failed write leaves the old content and no temporary file.
	if err := WriteFileAtomic(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600, Owner{-1, -1}); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

func TestTail(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "log")
	if lines, err := Tail(p, 5); err != nil || lines != nil {
		t.Fatalf("Tail of a missing file = %v, %v", lines, err)
	}
	var b strings.Builder
	for i := range 5000 {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	os.WriteFile(p, []byte(b.String()), 0o600)
	lines, err := Tail(p, 3)
	if err != nil || strings.Join(lines, "|") != "line 4997|line 4998|line 4999" {
		t.Fatalf("Tail = %q, %v", lines, err)
	}
	os.WriteFile(p, []byte("only\n"), 0o600)
	if lines, _ := Tail(p, 10); len(lines) != 1 || lines[0] != "only" {
		t.Fatalf("Tail of a short file = %q", lines)
	}
	os.WriteFile(p, nil, 0o600)
	if lines, _ := Tail(p, 10); lines != nil {
		t.Fatalf("Tail of an empty file = %q", lines)
	}
}

// An instance that ran as a shared Redis user moves to its own: what it
// writes becomes its user's, what it reads its group's, and a second
// Reown finds nothing to do.
func TestReown(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	root := t.TempDir()
	l := Layout{DataRoot: filepath.Join(root, "data"), LogRoot: filepath.Join(root, "log")}
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	const id = "inst-1"
	shared := Owner{UID: 4000, GID: 4000}
	if err := l.Create(id, shared); err != nil {
		t.Fatal(err)
	}
	if err := l.WriteConfig(l.ConfPath(id), []byte("port 1\n"), shared); err != nil {
		t.Fatal(err)
	}
	aof := filepath.Join(l.DataDir(id), "appendonlydir", "appendonly.aof.1.incr.aof")
	if err := os.MkdirAll(filepath.Dir(aof), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(aof, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	own := Owner{UID: 5001, GID: 5001}
	for range 2 {
		if err := l.Reown(id, own); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		path     string
		uid, gid uint32
	}{
		{l.DataDir(id), 5001, 5001}, {filepath.Dir(aof), 5001, 5001}, {aof, 5001, 5001}, {l.LogPath(id), 5001, 5001},
		{l.Dir(id), 0, 5001}, {l.ConfPath(id), 0, 5001},
	} {
		st, err := os.Lstat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if s := st.Sys().(*syscall.Stat_t); s.Uid != c.uid || s.Gid != c.gid {
			t.Errorf("%s is %d:%d after Reown, want %d:%d", c.path, s.Uid, s.Gid, c.uid, c.gid)
		}
	}
	for _, d := range []string{l.DataRoot, l.LogRoot} {
		if st, _ := os.Stat(d); st.Mode().Perm() != 0o711 {
			t.Errorf("%s has mode %04o, want 0711", d, st.Mode().Perm())
		}
	}
}

// A log past its bound is copied to .1 and truncated in place (the same
// inode: a confined redis-server may write only that one); the rotated
// ones shift, and no more than keep are kept.
func TestRotateLog(t *testing.T) {
	l := Layout{DataRoot: t.TempDir(), LogRoot: t.TempDir()}
	live := l.LogPath("r")
	write := func(s string) {
		f, err := os.OpenFile(live, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(s)
		f.Close()
	}
	var ino uint64
	write("small\n")
	if st, err := os.Stat(live); err == nil {
		ino = st.Sys().(*syscall.Stat_t).Ino
	}
	if r, err := l.RotateLog("r", 100, 2, Unowned); r || err != nil {
		t.Fatalf("a log under its bound rotated: %v, %v", r, err)
	}
	for i, gen := range []string{"one", "two", "three", "four"} {
		write(strings.Repeat(gen+"\n", 40))
		if r, err := l.RotateLog("r", 100, 2, Unowned); !r || err != nil {
			t.Fatalf("rotation %d: %v, %v", i, r, err)
		}
	}
	st, err := os.Stat(live)
	if err != nil || st.Size() != 0 || st.Sys().(*syscall.Stat_t).Ino != ino {
		t.Fatalf("the live log after rotations: %v, %v; want the same file, empty", st, err)
	}
	b1, _ := os.ReadFile(l.RotatedLogPath("r", 1))
	b2, _ := os.ReadFile(l.RotatedLogPath("r", 2))
	if !strings.HasPrefix(string(b1), "four\n") || !strings.HasPrefix(string(b2), "three\n") {
		t.Fatalf(".1 = %.10q, .2 = %.10q", b1, b2)
	}
	if _, err := os.Stat(l.RotatedLogPath("r", 3)); err == nil {
		t.Fatal("a third rotated log is kept with keep 2")
	}
	if st, _ := os.Stat(l.RotatedLogPath("r", 1)); st.Mode().Perm() != 0o640 {
		t.Fatalf("rotated log mode %v", st.Mode())
	}
	if got := l.LogFiles("r"); len(got) != 3 {
		t.Fatalf("LogFiles = %q", got)
	}
	// keep 0: the content goes.
	write(strings.Repeat("x", 200))
	if r, err := l.RotateLog("r", 100, 0, Unowned); !r || err != nil {
		t.Fatalf("keep 0: %v, %v", r, err)
	}
	if got := l.LogFiles("r"); len(got) != 1 {
		t.Fatalf("LogFiles with keep 0 = %q", got)
	}
	// Remove takes the rotated logs too.
	write(strings.Repeat("y", 200))
	l.RotateLog("r", 100, 2, Unowned)
	if err := l.Remove("r"); err != nil {
		t.Fatal(err)
	}
	if got := l.LogFiles("r"); len(got) != 0 {
		t.Fatalf("after Remove: %q", got)
	}
}
