package volumes

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// A restore builds the instance's next data directory next to the live
// one and swaps the two in one rename(2):
//
//	<data-root>/<id>/restore/        0700 Redis user: the loader's files
//	<data-root>/<id>/restore/data/   0700 Redis user: the next data dir
//
// Exchange swaps <id>/data and <id>/restore/data atomically
// (RENAME_EXCHANGE), so at every instant <id>/data is either the old or
// the new data directory, whole. The staged directory carries a marker
// file that tells, after a crash, which of the two is live.

// RestoreMarker is the file in a staged data directory that says it was
// staged by a restore.
const RestoreMarker = ".restored"

// StagingDir is where a restore prepares the next data directory of id.
func (l Layout) StagingDir(id string) string { return filepath.Join(l.Dir(id), "restore") }

// StagedDataDir is the data directory a restore prepares.
func (l Layout) StagedDataDir(id string) string { return filepath.Join(l.StagingDir(id), "data") }

// CreateStaging makes an empty staging directory for id, removing what an
// earlier, interrupted restore left there.
func (l Layout) CreateStaging(id string) error {
	if err := l.RemoveStaging(id); err != nil {
		return err
	}
	if err := mkdir(l.StagingDir(id), 0o700, l.Owner); err != nil {
		return err
	}
	if err := mkdir(l.StagedDataDir(id), 0o700, l.Owner); err != nil {
		return err
	}
	marker := filepath.Join(l.StagedDataDir(id), RestoreMarker)
	return WriteFileAtomic(marker, nil, 0o600, l.Owner)
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
// atomic rename and makes the swap durable.
func (l Layout) Exchange(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := unix.Renameat2(unix.AT_FDCWD, l.DataDir(id), unix.AT_FDCWD, l.StagedDataDir(id), unix.RENAME_EXCHANGE); err != nil {
		return fmt.Errorf("exchange %s and %s: %w", l.DataDir(id), l.StagedDataDir(id), err)
	}
	if err := syncDir(l.Dir(id)); err != nil {
		return err
	}
	return syncDir(l.StagingDir(id))
}

// Restored reports whether the live data directory of id is one a restore
// staged (its marker is there): after a crash in the middle of a restore,
// true means the swap happened.
func (l Layout) Restored(id string) bool {
	_, err := os.Lstat(filepath.Join(l.DataDir(id), RestoreMarker))
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
