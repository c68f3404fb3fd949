package volumes

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
)

// newInstance returns a layout with instance id created.
func newInstance(t *testing.T, id string) Layout {
	t.Helper()
	l := newLayout(t)
	if err := l.Create(id, Unowned); err != nil {
		t.Fatal(err)
	}
	return l
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// tree returns the files under dir as "path=content" (directories as
// "path/"), sorted.
func tree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case rel == ".":
		case d.IsDir():
			out = append(out, rel+"/")
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out = append(out, rel+"="+string(b))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func TestCreateStaging(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "live")
	if l.Staging(id) {
		t.Fatal("Staging before CreateStaging")
	}
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	if !l.Staging(id) {
		t.Fatal("no Staging after CreateStaging")
	}
	if got := tree(t, l.StagedDataDir(id)); strings.Join(got, ",") != RestoreMarker+"=" {
		t.Fatalf("staged data dir = %v, want only an empty marker", got)
	}
	if l.StagedDataDir(id) != filepath.Join(l.StagingDir(id), "data") || filepath.Dir(l.StagingDir(id)) != l.Dir(id) {
		t.Fatalf("staging %s and staged %s are not under %s", l.StagingDir(id), l.StagedDataDir(id), l.Dir(id))
	}
	for p, want := range map[string]os.FileMode{
		l.StagingDir(id):    0o700,
		l.StagedDataDir(id): 0o700,
		filepath.Join(l.StagedDataDir(id), RestoreMarker): 0o600,
	} {
		if got := mode(t, p); got != want {
			t.Errorf("mode of %s = %o, want %o", p, got, want)
		}
	}
	if got := tree(t, l.DataDir(id)); strings.Join(got, ",") != "dump.rdb=live" {
		t.Errorf("CreateStaging touched the live data dir: %v", got)
	}

	// What an interrupted restore left is removed; the marker is back.
	writeFile(t, filepath.Join(l.StagingDir(id), "loader.conf"), "old loader")
	writeFile(t, filepath.Join(l.StagedDataDir(id), "dump.rdb"), "half a snapshot")
	writeFile(t, filepath.Join(l.StagedDataDir(id), "appendonlydir", "appendonly.aof.1.base.rdb"), "x")
	os.Remove(filepath.Join(l.StagedDataDir(id), RestoreMarker))
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatalf("CreateStaging over leftovers: %v", err)
	}
	if got := tree(t, l.StagingDir(id)); strings.Join(got, ",") != "data/,data/"+RestoreMarker+"=" {
		t.Fatalf("staging dir after a second CreateStaging = %v, want only data/ and its marker", got)
	}
}

func TestCreateStagingOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	const id = "inst-1"
	l := newInstance(t, id)
	if err := l.CreateStaging(id, Owner{UID: 4321, GID: 4322}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{l.StagingDir(id), l.StagedDataDir(id), filepath.Join(l.StagedDataDir(id), RestoreMarker)} {
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if s := st.Sys().(*syscall.Stat_t); s.Uid != 4321 || s.Gid != 4322 {
			t.Errorf("%s is owned by %d:%d, want 4321:4322 (the Redis user)", p, s.Uid, s.Gid)
		}
	}
}

func TestCreateStagingNeedsInstance(t *testing.T) {
	l := newLayout(t)
	if err := l.CreateStaging("nope", Unowned); err == nil {
		t.Fatal("CreateStaging for an instance without a directory succeeded")
	}
	if exists(l.Dir("nope")) {
		t.Fatal("CreateStaging created the instance directory")
	}
}

func TestRemoveStaging(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "live")
	if err := l.RemoveStaging(id); err != nil {
		t.Fatalf("RemoveStaging without a staging dir = %v, want nil", err)
	}
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(l.StagedDataDir(id), "appendonlydir", "f"), "x")
	for i := range 2 {
		if err := l.RemoveStaging(id); err != nil {
			t.Fatalf("RemoveStaging #%d: %v", i+1, err)
		}
		if l.Staging(id) || exists(l.StagingDir(id)) {
			t.Fatalf("staging dir still there after RemoveStaging #%d", i+1)
		}
	}
	if got := tree(t, l.Dir(id)); strings.Join(got, ",") != "data/,data/dump.rdb=live,tls/" {
		t.Errorf("instance dir after RemoveStaging = %v, want the live data only", got)
	}
}

func TestStagingRejectsInvalidIDs(t *testing.T) {
	l := newLayout(t)
	// "../victim" would be <root>/victim, beside the data root.
	victim := filepath.Join(filepath.Dir(l.DataRoot), "victim")
	writeFile(t, filepath.Join(victim, "restore", "data", "f"), "keep")
	for _, id := range []string{"", "..", "../victim", "a/b", ".hidden"} {
		if err := l.CreateStaging(id, Unowned); !errors.Is(err, ErrInvalidID) {
			t.Errorf("CreateStaging(%q) = %v, want ErrInvalidID", id, err)
		}
		if err := l.RemoveStaging(id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("RemoveStaging(%q) = %v, want ErrInvalidID", id, err)
		}
	}
	if got := tree(t, victim); strings.Join(got, ",") != "restore/,restore/data/,restore/data/f=keep" {
		t.Fatalf("invalid ids touched files outside the data root: %v", got)
	}
	if entries, _ := os.ReadDir(l.DataRoot); len(entries) != 0 {
		t.Fatalf("invalid ids created %v under the data root", entries)
	}
}

// Exchange and FinishRestore validate the id before they turn it into
// paths: "../victim" must neither swap directories outside the data root
// nor remove <root>/victim/data/.restored.
func TestExchangeFinishRestoreRejectInvalidIDs(t *testing.T) {
	const id = "../victim"
	for name, op := range map[string]func(Layout) error{
		"Exchange":      func(l Layout) error { return l.Exchange(id) },
		"FinishRestore": func(l Layout) error { return l.FinishRestore(id) },
	} {
		t.Run(name, func(t *testing.T) {
			l := newLayout(t)
			victim := filepath.Join(filepath.Dir(l.DataRoot), "victim")
			writeFile(t, filepath.Join(victim, "data", RestoreMarker), "")
			writeFile(t, filepath.Join(victim, "data", "dump.rdb"), "victim's live data")
			writeFile(t, filepath.Join(victim, "restore", "data", "dump.rdb"), "other")
			want := strings.Join(tree(t, victim), ",")
			if err := op(l); !errors.Is(err, ErrInvalidID) {
				t.Errorf("%s(%q) = %v, want ErrInvalidID", name, id, err)
			}
			if got := strings.Join(tree(t, victim), ","); got != want {
				t.Errorf("%s(%q) changed files outside the data root:\n got %s\nwant %s", name, id, got, want)
			}
		})
	}
}

func TestExchange(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "old")
	writeFile(t, filepath.Join(l.DataDir(id), "appendonlydir", "appendonly.aof.manifest"), "old manifest")
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(l.StagedDataDir(id), "dump.rdb"), "new")
	liveBefore, err := os.Stat(l.DataDir(id))
	if err != nil {
		t.Fatal(err)
	}
	stagedBefore, err := os.Stat(l.StagedDataDir(id))
	if err != nil {
		t.Fatal(err)
	}
	oldTree := strings.Join(tree(t, l.DataDir(id)), ",")
	newTree := strings.Join(tree(t, l.StagedDataDir(id)), ",")

	if l.Restored(id) {
		t.Fatal("Restored before the exchange")
	}
	if err := l.Exchange(id); err != nil {
		t.Fatalf("Exchange: %v", err)
	}
	if got := strings.Join(tree(t, l.DataDir(id)), ","); got != newTree || got != RestoreMarker+"=,dump.rdb=new" {
		t.Fatalf("live data dir after Exchange = %s, want the staged %s", got, newTree)
	}
	if got := strings.Join(tree(t, l.StagedDataDir(id)), ","); got != oldTree {
		t.Fatalf("staged data dir after Exchange = %s, want the old live %s", got, oldTree)
	}
	// The directories themselves moved: a process holding either open
	// follows it.
	liveAfter, _ := os.Stat(l.DataDir(id))
	stagedAfter, _ := os.Stat(l.StagedDataDir(id))
	if !os.SameFile(liveAfter, stagedBefore) || !os.SameFile(stagedAfter, liveBefore) {
		t.Error("Exchange copied instead of swapping the directories")
	}
	if got := mode(t, l.DataDir(id)); got != 0o700 {
		t.Errorf("live data dir mode after Exchange = %o, want 700", got)
	}
	if !l.Restored(id) || !l.Staging(id) {
		t.Fatalf("after Exchange: Restored %v, Staging %v; want both", l.Restored(id), l.Staging(id))
	}

	// Exchanging again swaps back (the rollback of a failed restore).
	if err := l.Exchange(id); err != nil {
		t.Fatalf("second Exchange: %v", err)
	}
	if got := strings.Join(tree(t, l.DataDir(id)), ","); got != oldTree {
		t.Fatalf("live data dir after swapping back = %s, want %s", got, oldTree)
	}
	if got := strings.Join(tree(t, l.StagedDataDir(id)), ","); got != newTree {
		t.Fatalf("staged data dir after swapping back = %s, want %s", got, newTree)
	}
	if l.Restored(id) {
		t.Fatal("Restored after swapping back")
	}
}

func TestExchangeWithoutStaging(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "live")
	err := l.Exchange(id)
	if err == nil {
		t.Fatal("Exchange without a staged data dir succeeded")
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Exchange without a staged data dir = %v, want ENOENT", err)
	}
	if got := strings.Join(tree(t, l.Dir(id)), ","); got != "data/,data/dump.rdb=live,tls/" {
		t.Fatalf("a failed Exchange changed the instance dir: %s", got)
	}
	if l.Restored(id) || l.Staging(id) {
		t.Fatal("a failed Exchange left a restore behind")
	}
}

func TestFinishRestore(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	// Never restored: nothing to do.
	if err := l.FinishRestore(id); err != nil {
		t.Fatalf("FinishRestore without a restore = %v", err)
	}
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "old")
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(l.StagedDataDir(id), "dump.rdb"), "new")
	writeFile(t, filepath.Join(l.StagedDataDir(id), "appendonlydir", "appendonly.aof.manifest"), "m")
	if err := l.Exchange(id); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := l.FinishRestore(id); err != nil {
			t.Fatalf("FinishRestore #%d: %v", i+1, err)
		}
		if l.Restored(id) || exists(filepath.Join(l.DataDir(id), RestoreMarker)) {
			t.Fatalf("marker still in the live data dir after FinishRestore #%d", i+1)
		}
		if l.Staging(id) || exists(l.StagingDir(id)) {
			t.Fatalf("staging dir (the previous data) still there after FinishRestore #%d", i+1)
		}
		if got := strings.Join(tree(t, l.Dir(id)), ","); got != "data/,data/appendonlydir/,data/appendonlydir/appendonly.aof.manifest=m,data/dump.rdb=new,tls/" {
			t.Fatalf("instance dir after FinishRestore #%d = %s, want the restored data only", i+1, got)
		}
	}
}

// FinishRestoreLater leaves the instance as FinishRestore does at once,
// and the previous data whole in the uploads, which ClearUploads removes.
func TestFinishRestoreLater(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	writeFile(t, filepath.Join(l.DataDir(id), "dump.rdb"), "old")
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(l.StagedDataDir(id), "dump.rdb"), "new")
	if err := l.Exchange(id); err != nil {
		t.Fatal(err)
	}
	prev, err := l.FinishRestoreLater(id)
	if err != nil {
		t.Fatal(err)
	}
	if l.Restored(id) || l.Staging(id) {
		t.Fatal("marker or staging directory left in the instance")
	}
	if got := strings.Join(tree(t, l.Dir(id)), ","); got != "data/,data/dump.rdb=new,tls/" {
		t.Fatalf("instance dir = %s, want the restored data only", got)
	}
	if filepath.Dir(prev) != l.UploadDir() || len(l.LoaderDirIDs()) != 0 {
		t.Fatalf("previous data moved to %s, want a directory of the uploads not taken for a loader's", prev)
	}
	if b, err := os.ReadFile(filepath.Join(prev, "restore", "data", "dump.rdb")); err != nil || string(b) != "old" {
		t.Fatalf("the previous data in %s: %q %v", prev, b, err)
	}
	if err := l.ClearUploads(); err != nil || exists(prev) {
		t.Fatalf("ClearUploads left %s (%v)", prev, err)
	}
	// Never restored: nothing to do.
	if prev, err := l.FinishRestoreLater(id); err != nil || prev != "" && exists(filepath.Join(prev, "restore")) {
		t.Fatalf("FinishRestoreLater without a restore = %q, %v", prev, err)
	}
}

// After a crash, Restored tells which directory is live: the marker
// travels with the staged directory.
func TestRestoredAfterInterruptedRestore(t *testing.T) {
	const id = "inst-1"
	l := newInstance(t, id)
	if l.Restored(id) {
		t.Fatal("Restored on a new instance")
	}
	if err := l.CreateStaging(id, Unowned); err != nil {
		t.Fatal(err)
	}
	// Staged but not swapped: the live data is the old one.
	if l.Restored(id) {
		t.Fatal("Restored before the exchange")
	}
	if err := l.Exchange(id); err != nil {
		t.Fatal(err)
	}
	// A new Layout value (the agent restarted) sees the same.
	l2 := Layout{DataRoot: l.DataRoot, LogRoot: l.LogRoot}
	if !l2.Restored(id) || !l2.Staging(id) {
		t.Fatal("a restarted agent does not see the swapped restore")
	}
	if l2.Restored("other") || l2.Staging("other") {
		t.Fatal("Restored or Staging for an instance that does not exist")
	}
}

// Uploads are files of their own in a directory no instance id can name;
// ClearUploads removes them all.
func TestUploads(t *testing.T) {
	l := newInstance(t, "up")
	f, err := l.CreateUpload("up")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	g, err := l.CreateUpload("up")
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if f.Name() == g.Name() || filepath.Dir(f.Name()) != l.UploadDir() {
		t.Fatalf("uploads %s and %s; want two files in %s", f.Name(), g.Name(), l.UploadDir())
	}
	if fi, err := os.Stat(f.Name()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("upload file mode: %v, %v", fi, err)
	}
	if _, err := l.CreateUpload("../x"); !errors.Is(err, ErrInvalidID) {
		t.Fatalf("CreateUpload with an invalid id = %v", err)
	}
	if ids, err := l.List(); err != nil || strings.Join(ids, ",") != "up" {
		t.Fatalf("List = %v, %v; the uploads directory is no instance", ids, err)
	}
	if err := l.ClearUploads(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(l.UploadDir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("uploads directory after ClearUploads: %v", err)
	}
	if err := l.ClearUploads(); err != nil {
		t.Fatalf("ClearUploads with nothing there: %v", err)
	}
}

// An older agent's loader's directory is in the uploads, named after its
// instance (an id with dots too), and goes with them.
func TestLoaderDirs(t *testing.T) {
	l := newInstance(t, "a.b")
	if err := os.MkdirAll(l.UploadDir(), 0o711); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a.b", "c"} {
		dir, err := os.MkdirTemp(l.UploadDir(), id+".*.loader")
		if err != nil {
			t.Fatal(err)
		}
		if !l.IsLoaderDir(dir) {
			t.Fatalf("loader dir %s not known for one", dir)
		}
	}
	if f, err := l.CreateUpload("c"); err != nil {
		t.Fatal(err)
	} else {
		f.Close()
	}
	if got := l.LoaderDirIDs(); len(got) != 2 || !got["a.b"] || !got["c"] {
		t.Fatalf("LoaderDirIDs = %v", got)
	}
	if l.IsLoaderDir(l.StagingDir("c")) {
		t.Fatal("a staging directory taken for a loader's")
	}
	if err := l.ClearUploads(); err != nil {
		t.Fatal(err)
	}
	if got := l.LoaderDirIDs(); len(got) != 0 {
		t.Fatalf("LoaderDirIDs after ClearUploads = %v", got)
	}
}
