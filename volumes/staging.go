package volumes

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// A restore builds the instance's next data directory next to the live
// one and swaps the two in one rename(2):
//
//	<data-root>/<id>/restore/        0700 Redis user
//	<data-root>/<id>/restore/data/   0700 Redis user: the next data dir
//
// Exchange swaps <id>/data and <id>/restore/data atomically
// (RENAME_EXCHANGE), so at every instant <id>/data is either the old or
// the new data directory, whole. The staged directory carries a marker
// file that tells, after a crash, which of the two is live.

// RestoreMarker is the file in a staged data directory that says it was
// staged by a restore.
const RestoreMarker = ".restored"

// FailedMarker replaces RestoreMarker in restored data that did not start:
// the previous data must come back, even after a crash.
const FailedMarker = ".restore-failed"

// StagingDir is where a restore prepares the next data directory of id.
func (l Layout) StagingDir(id string) string { return filepath.Join(l.Dir(id), "restore") }

// StagedDataDir is the data directory a restore prepares.
func (l Layout) StagedDataDir(id string) string { return filepath.Join(l.StagingDir(id), "data") }

// CreateStaging makes an empty staging directory for id, removing what an
// earlier, interrupted restore left there; o is the instance's Redis user.
func (l Layout) CreateStaging(id string, o Owner) error {
	if err := l.RemoveStaging(id); err != nil {
		return err
	}
	if err := mkdir(l.StagingDir(id), 0o700, o); err != nil {
		return err
	}
	if err := mkdir(l.StagedDataDir(id), 0o700, o); err != nil {
		return err
	}
	marker := filepath.Join(l.StagedDataDir(id), RestoreMarker)
	return WriteFileAtomic(marker, nil, 0o600, o)
}

// RemoveStaging removes the staging directory of id, if any.
func (l Layout) RemoveStaging(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if _, err := os.Lstat(l.StagingDir(id)); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.RemoveAll(l.StagingDir(id)); err != nil {
		return fmt.Errorf("remove %s: %w", l.StagingDir(id), err)
	}
	return nil
}

// Staging reports whether id has a staging directory (a restore is under
// way or was interrupted).
func (l Layout) Staging(id string) bool {
	_, err := os.Lstat(l.StagingDir(id))
	return err == nil
}

// Exchange swaps the live and the staged data directories of id in one
// atomic rename and makes the swap durable. When it cannot be made
// durable the swap is undone, so an error means no swap (unless undoing
// failed too, which the error says; Restored tells then).
func (l Layout) Exchange(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := l.exchange(id); err != nil {
		return err
	}
	err := syncDir(l.Dir(id))
	if err == nil {
		err = syncDir(l.StagingDir(id))
	}
	if err != nil {
		if uerr := l.exchange(id); uerr != nil {
			return fmt.Errorf("%w; and undoing the exchange: %w", err, uerr)
		}
		return err
	}
	return nil
}

func (l Layout) exchange(id string) error {
	if err := unix.Renameat2(unix.AT_FDCWD, l.DataDir(id), unix.AT_FDCWD, l.StagedDataDir(id), unix.RENAME_EXCHANGE); err != nil {
		return fmt.Errorf("exchange %s and %s: %w", l.DataDir(id), l.StagedDataDir(id), err)
	}
	return nil
}

// Restored reports whether the live data directory of id is one a restore
// staged (its marker is there): after a crash in the middle of a restore,
// true means the swap happened.
func (l Layout) Restored(id string) bool {
	_, err := os.Lstat(filepath.Join(l.DataDir(id), RestoreMarker))
	return err == nil
}

// MarkRestoreFailed says, durably, that the restored data live for id did
// not start and the previous data (staged) must be exchanged back.
func (l Layout) MarkRestoreFailed(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(l.DataDir(id), RestoreMarker), filepath.Join(l.DataDir(id), FailedMarker)); err != nil {
		return fmt.Errorf("mark the restore failed: %w", err)
	}
	return syncDir(l.DataDir(id))
}

// RestoreFailed reports whether the live data directory of id is restored
// data marked as failed (MarkRestoreFailed): the previous data is staged
// and must come back.
func (l Layout) RestoreFailed(id string) bool {
	_, err := os.Lstat(filepath.Join(l.DataDir(id), FailedMarker))
	return err == nil
}

// FinishRestore removes the marker from the live data directory and the
// staging directory (the previous data) of id.
func (l Layout) FinishRestore(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(l.DataDir(id), RestoreMarker)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove restore marker: %w", err)
	}
	return l.RemoveStaging(id)
}

// FinishRestoreLater is FinishRestore leaving the removal of the previous
// data's files, which takes as long as they are large, for later: the
// staging directory is moved into UploadDir with one rename, and its new
// path returned for the caller to remove after answering (ClearUploads
// removes it at the next start otherwise). Where the move fails (another
// quota project: EXDEV) it is removed in place, and the path is "".
func (l Layout) FinishRestoreLater(id string) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	if err := os.Remove(filepath.Join(l.DataDir(id), RestoreMarker)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("remove restore marker: %w", err)
	}
	if err := mkdir(l.UploadDir(), 0o711, Unowned); err == nil {
		to, err := os.MkdirTemp(l.UploadDir(), id+".*.previous")
		if err == nil {
			if err := os.Rename(l.StagingDir(id), filepath.Join(to, "restore")); err == nil {
				return to, syncDir(l.Dir(id))
			}
			os.Remove(to)
		}
	}
	return "", l.RemoveStaging(id)
}

// A restore's body is received, before the instance's lock is taken, into
// its own file in <data-root>/_uploads/ (0750, group of the Redis user; "_"
// starts no instance id), checked there, and renamed into the staging
// directory. No upload outlives the agent: ClearUploads empties the
// directory at start.

// UploadDir holds restores' bodies while they are received and checked.
func (l Layout) UploadDir() string { return filepath.Join(l.DataRoot, "_uploads") }

// CreateUpload creates a new, empty file in UploadDir for a body bound for
// instance id.
func (l Layout) CreateUpload(id string) (*os.File, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	// The agent's: each file is given to its instance's user for the check.
	if err := mkdir(l.UploadDir(), 0o711, Unowned); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(l.UploadDir(), id+".*.rdb")
	if err != nil {
		return nil, fmt.Errorf("create upload file: %w", err)
	}
	return f, nil
}

// StageFile moves the file at from (an upload) into the staged data
// directory of id at rel (a path relative to it, whose directories it
// creates, 0700, o's), and hands it to o. It is not on disk yet: SyncStaged
// makes it so.
func (l Layout) StageFile(id, from, rel string, o Owner) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	to := filepath.Join(l.StagedDataDir(id), rel)
	dirs := stagedDirs(l.StagedDataDir(id), to)
	for i := len(dirs) - 1; i > 0; i-- {
		if err := mkdir(dirs[i], 0o700, o); err != nil {
			return err
		}
	}
	if err := chown(from, o); err != nil {
		return err
	}
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("stage %s: %w", rel, err)
	}
	return nil
}

// SyncStaged puts the staged file at rel of id, and every name on the way
// to it, on disk: the staged data is the instance's once exchanged, and a
// crash after the exchange must find it whole.
func (l Layout) SyncStaged(id, rel string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	to := filepath.Join(l.StagedDataDir(id), rel)
	if err := SyncFile(to); err != nil {
		return err
	}
	for _, d := range stagedDirs(l.StagedDataDir(id), to) {
		if err := syncDir(d); err != nil {
			return err
		}
	}
	return nil
}

// stagedDirs are root, then the directories from the file at path's up to
// root's child (created in reverse order).
func stagedDirs(root, path string) []string {
	dirs := []string{root}
	for d := filepath.Dir(path); d != root; d = filepath.Dir(d) {
		dirs = append(dirs, d)
	}
	return dirs
}

// StageNewFile writes a new file of data at rel in the staged data
// directory of id (atomically, fsynced, o's; its directory must exist).
func (l Layout) StageNewFile(id, rel string, data []byte, o Owner) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(l.StagedDataDir(id), rel), data, 0o600, o)
}

// LoaderDirIDs are the instances that have a restore loader's directory
// in UploadDir (<id>.<random>.loader): older agents proved a restore's
// file with a loader of its own there, whose cgroup a crash may have left.
func (l Layout) LoaderDirIDs() map[string]bool {
	ids := map[string]bool{}
	entries, _ := os.ReadDir(l.UploadDir())
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".loader")
		if i := strings.LastIndexByte(name, '.'); ok && e.IsDir() && i > 0 {
			ids[name[:i]] = true
		}
	}
	return ids
}

// IsLoaderDir reports whether dir is an older agent's restore loader's
// directory.
func (l Layout) IsLoaderDir(dir string) bool {
	return filepath.Dir(dir) == l.UploadDir() && strings.HasSuffix(dir, ".loader")
}

// ClearUploads removes every file in UploadDir: at agent start no upload
// is under way.
func (l Layout) ClearUploads() error {
	if err := os.RemoveAll(l.UploadDir()); err != nil {
		return fmt.Errorf("remove %s: %w", l.UploadDir(), err)
	}
	return nil
}

// SyncFile flushes the file at path to disk.
func SyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}
