// Package volumes owns the per-instance files on disk: the instance
// directory under the data root with its config, ACL file and data
// directory, and the log file under the log root. It validates ids before
// they become paths, writes files atomically and removes everything an
// instance had.
//
//	<data-root>/                  0711: no one else lists the instances
//	<data-root>/<id>/             0750, group the instance's Redis user
//	<data-root>/<id>/redis.conf   0640, written by the agent
//	<data-root>/<id>/users.acl    0640, ACL users, passwords as sha256 only
//	<data-root>/<id>/data/        0700, owned by the instance's Redis user
//	<data-root>/<id>/tls/         0750, its TLS certificate, key and CA (0640)
//	<log-root>/<id>.log           0640, redis-server log, owned by it
//
// The Redis user is the instance's own (a uid per instance) or, without
// them, one shared user; every method that creates a file is told whose
// it is.
package volumes

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// ErrInvalidID is returned for an id that may not become a path.
var ErrInvalidID = errors.New("invalid id")

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateID checks that id is safe to use as a file name and a Redis user
// name: 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("%w %q: want 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit", ErrInvalidID, id)
	}
	return nil
}

// Owner is the uid and gid that owns what redis-server must write. A
// negative uid means "leave ownership as it is" (the agent is not root).
type Owner struct {
	UID, GID int
}

// Unowned leaves ownership as it is: the files are the agent's user's.
var Unowned = Owner{UID: -1, GID: -1}

// Layout knows where the files of each instance live.
type Layout struct {
	DataRoot string
	LogRoot  string
}

// Dir is the instance directory.
func (l Layout) Dir(id string) string { return filepath.Join(l.DataRoot, id) }

// ConfPath is the instance's redis.conf.
func (l Layout) ConfPath(id string) string { return filepath.Join(l.DataRoot, id, "redis.conf") }

// ACLPath is the instance's ACL file.
func (l Layout) ACLPath(id string) string { return filepath.Join(l.DataRoot, id, "users.acl") }

// DataDir is the directory redis-server writes its RDB and AOF into.
func (l Layout) DataDir(id string) string { return filepath.Join(l.DataRoot, id, "data") }

// TLSDir is where the instance's TLS certificate, key and CA are: a
// directory of their own, which the instance's Landlock policy may read
// whatever files a certificate renewal puts in it later.
func (l Layout) TLSDir(id string) string { return filepath.Join(l.DataRoot, id, "tls") }

// LogPath is the instance's redis-server log file.
func (l Layout) LogPath(id string) string { return filepath.Join(l.LogRoot, id+".log") }

// LogFiles are the instance's log and its rotated logs (<id>.log.1, the
// newest, to <id>.log.N) that exist.
func (l Layout) LogFiles(id string) []string {
	var out []string
	if _, err := os.Lstat(l.LogPath(id)); err == nil {
		out = append(out, l.LogPath(id))
	}
	for n := 1; ; n++ {
		p := l.RotatedLogPath(id, n)
		if _, err := os.Lstat(p); err != nil {
			return out
		}
		out = append(out, p)
	}
}

// RotatedLogPath is the n-th rotated log of the instance (1 the newest).
func (l Layout) RotatedLogPath(id string, n int) string {
	return l.LogPath(id) + "." + strconv.Itoa(n)
}

// RotateLog moves the log of id aside once it is larger than maxBytes and
// reports whether it did: <id>.log.1 gets its content (the rotated ones
// before it become .2, .3, ..., and those beyond keep go) and the log is
// truncated in place. In place, not renamed: redis-server opens its log
// by path for every line, but a confined one may write that file (that
// inode) only, not create another in the log directory, so a log renamed
// away would leave it with none. A line written between the copy and
// the truncation, microseconds, is lost. The rotated logs are o's, mode
// 0640, like the log.
func (l Layout) RotateLog(id string, maxBytes int64, keep int, o Owner) (bool, error) {
	if err := ValidateID(id); err != nil {
		return false, err
	}
	live := l.LogPath(id)
	st, err := os.Stat(live)
	if err != nil || st.Size() <= maxBytes {
		return false, nil
	}
	// The oldest go: those beyond keep, then the one shifted past it.
	for n := keep + 1; ; n++ {
		if err := os.Remove(l.RotatedLogPath(id, n)); err != nil {
			break
		}
	}
	for n := keep - 1; n >= 1; n-- {
		if err := os.Rename(l.RotatedLogPath(id, n), l.RotatedLogPath(id, n+1)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("rotate %s: %w", live, err)
		}
	}
	if keep > 0 {
		if err := copyLog(live, l.RotatedLogPath(id, 1), o); err != nil {
			return false, err
		}
	}
	if err := os.Truncate(live, 0); err != nil {
		return false, fmt.Errorf("rotate %s: %w", live, err)
	}
	return true, nil
}

// copyLog copies the log src to dst, through a temporary file renamed
// into place.
func copyLog(src, dst string, o Owner) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", src, err)
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", src, err)
	}
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = io.Copy(out, in); err != nil {
		return fmt.Errorf("rotate %s: %w", src, err)
	}
	if err = out.Chmod(0o640); err != nil {
		return err
	}
	if err = chown(tmp, o); err != nil {
		return err
	}
	if err = out.Close(); err != nil {
		return fmt.Errorf("rotate %s: %w", src, err)
	}
	return os.Rename(tmp, dst)
}

// Init creates the roots, mode 0711: an instance's user passes through to
// its own files and lists no one else's.
func (l Layout) Init() error {
	for _, d := range []string{l.DataRoot, l.LogRoot} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
		if err := os.Chmod(d, 0o711); err != nil {
			return fmt.Errorf("chmod %s: %w", d, err)
		}
	}
	return nil
}

// Create makes the instance directory, its data directory and its log file
// with the modes of the package doc for the Redis user o, and removes the
// temporary files an atomic write a crash cut short left in the instance
// directory. It is idempotent, so that reconcile can finish a half-done
// create.
func (l Layout) Create(id string, o Owner) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := mkdir(l.Dir(id), 0o750, Owner{-1, o.GID}); err != nil {
		return err
	}
	if err := removeStaleTemps(l.Dir(id)); err != nil {
		return err
	}
	if err := mkdir(l.DataDir(id), 0o700, o); err != nil {
		return err
	}
	if err := mkdir(l.TLSDir(id), 0o750, Owner{-1, o.GID}); err != nil {
		return err
	}
	if err := removeStaleTemps(l.TLSDir(id)); err != nil {
		return err
	}
	f, err := os.OpenFile(l.LogPath(id), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("create log file: %w", err)
	}
	f.Close()
	return chown(l.LogPath(id), o)
}

// Reown gives what the Redis user of id writes (the data directory and
// all in it, a staging directory, the log) to o, and the group of what it
// reads (the instance directory, its config and ACL file) to o's group: an
// instance moves from a shared Redis user to its own. It does nothing when
// the data directory is o's already.
func (l Layout) Reown(id string, o Owner) error {
	if o.UID < 0 {
		return nil
	}
	if st, err := os.Lstat(l.DataDir(id)); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) == o.UID && int(sys.Gid) == o.GID {
			return nil
		}
	}
	for _, dir := range []string{l.DataDir(id), l.StagingDir(id)} {
		err := filepath.WalkDir(dir, func(path string, _ fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			return chown(path, o)
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := chown(l.LogPath(id), o); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	reads := []string{l.Dir(id), l.ConfPath(id), l.ACLPath(id), l.TLSDir(id)}
	if ents, err := os.ReadDir(l.TLSDir(id)); err == nil {
		for _, e := range ents {
			reads = append(reads, filepath.Join(l.TLSDir(id), e.Name()))
		}
	}
	for _, f := range reads {
		if err := chown(f, Owner{-1, o.GID}); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

func mkdir(dir string, mode fs.FileMode, o Owner) error {
	if err := os.Mkdir(dir, mode); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	// Mkdir is subject to the umask and leaves an existing directory alone.
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return chown(dir, o)
}

func chown(path string, o Owner) error {
	if o.UID < 0 && o.GID < 0 {
		return nil
	}
	if err := os.Lchown(path, o.UID, o.GID); err != nil {
		return fmt.Errorf("chown %s: %w", path, err)
	}
	return nil
}

// WriteConfig atomically writes a file of the instance directory that
// redis-server reads but must not write (redis.conf, users.acl): mode 0640,
// group owner the group of o, its Redis user. A file that already has this
// content, mode and group is left alone (no write, no fsync): reconcile
// rewrites every instance's files at start.
func (l Layout) WriteConfig(path string, data []byte, o Owner) error {
	return writeConfig(path, data, o, true)
}

// WriteRendered is WriteConfig for a file the agent renders from the
// instance's record (redis.conf, users.acl), without the fsyncs: still
// atomic, but after a power loss it may hold the old content or none.
// Reconcile writes every such file again from the record before any
// redis-server starts, so the four fsyncs (half of a provision's time
// before its start) bought nothing.
func (l Layout) WriteRendered(path string, data []byte, o Owner) error {
	return writeConfig(path, data, o, false)
}

func writeConfig(path string, data []byte, o Owner, sync bool) error {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		if st, err := os.Stat(path); err == nil && st.Mode().Perm() == 0o640 {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok && (o.GID < 0 || int(sys.Gid) == o.GID) {
				return nil
			}
		}
	}
	return writeFileAtomic(path, data, 0o640, Owner{-1, o.GID}, sync)
}

// Remove deletes everything the instance had on disk. Removing what is
// already gone is not an error.
func (l Layout) Remove(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	// What does not exist is removed already, even on a file system that
	// refuses every change (EROFS comes before ENOENT there).
	if _, err := os.Lstat(l.Dir(id)); err == nil {
		if err := os.RemoveAll(l.Dir(id)); err != nil {
			return fmt.Errorf("remove %s: %w", l.Dir(id), err)
		}
	}
	for _, f := range l.LogFiles(id) {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", f, err)
		}
	}
	return nil
}

// DataSize is the size of the files in id's data directory and the
// directories in it (the AOF's), in bytes: what its redis-server loads at
// a start. What cannot be read counts as nothing.
func (l Layout) DataSize(id string) int64 {
	var n int64
	var walk func(dir string, depth int)
	walk = func(dir string, depth int) {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			switch {
			case e.Type().IsRegular():
				if fi, err := e.Info(); err == nil {
					n += fi.Size()
				}
			case e.IsDir() && depth == 0:
				walk(filepath.Join(dir, e.Name()), 1)
			}
		}
	}
	walk(l.DataDir(id), 0)
	return n
}

// Exists reports whether the instance directory exists.
func (l Layout) Exists(id string) bool {
	_, err := os.Stat(l.Dir(id))
	return err == nil
}

// List returns the names of the directories under the data root that are
// valid instance ids (the ids that may have files here).
func (l Layout) List() ([]string, error) {
	entries, err := os.ReadDir(l.DataRoot)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", l.DataRoot, err)
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && ValidateID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// WriteFileAtomic writes data to path so that a reader sees either the old
// or the new content, never a part: it writes a temporary file in the same
// directory, fsyncs it, renames it over path and fsyncs the directory.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode, o Owner) error {
	return writeFileAtomic(path, data, perm, o, true)
}

// writeFileAtomic is WriteFileAtomic, with the fsyncs only when sync.
func writeFileAtomic(path string, data []byte, perm fs.FileMode, o Owner, sync bool) (err error) {
	dir, base := filepath.Split(path)
	f, err := os.CreateTemp(dir, "."+base+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = chown(tmp, o); err != nil {
		return err
	}
	if sync {
		if err = f.Sync(); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if !sync {
		return nil
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	if dir == "" {
		dir = "."
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Tail returns up to n last lines of the file at path, reading at most its
// last max(16 KiB, 512 bytes a line) and never more than 4 MiB. A missing
// file has no lines.
func Tail(path string, n int) ([]string, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	window := min(max(int64(16<<10), int64(n)*512), 4<<20)
	off := max(st.Size()-window, 0)
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	lines := strings.Split(strings.TrimRight(string(buf), "\n"), "\n")
	if off > 0 && len(lines) > 0 {
		lines = lines[1:] // the first line is cut
	}
	if len(lines) == 1 && lines[0] == "" {
		return nil, nil
	}
	return lines[max(len(lines)-n, 0):], nil
}

// Traversable checks that a process of uid and gid (no supplementary
// groups) may pass through every directory from / down to dir, dir
// included, by their mode bits; it names the first that stops it. Root
// passes everywhere.
func Traversable(dir string, uid, gid int) error {
	if uid == 0 {
		return nil
	}
	dir = filepath.Clean(dir)
	for p := dir; ; p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("stat %s: no owner", p)
		}
		bit := fs.FileMode(0o001)
		switch {
		case int(sys.Uid) == uid:
			bit = 0o100
		case int(sys.Gid) == gid:
			bit = 0o010
		}
		if !st.IsDir() || st.Mode().Perm()&bit == 0 {
			return fmt.Errorf("%s (mode %04o, owner %d:%d) does not let uid %d gid %d through", p, st.Mode().Perm(), sys.Uid, sys.Gid, uid, gid)
		}
		if p == "/" || p == "." {
			return nil
		}
	}
}
