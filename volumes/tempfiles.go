package volumes

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
)

// tempName matches the temporary files of WriteFileAtomic: os.CreateTemp
// puts a random decimal number in place of the '*' of "."+base+".tmp*".
var tempName = regexp.MustCompile(`^\..+\.tmp[0-9]+$`)

// removeStaleTemps removes from dir the temporary files WriteFileAtomic
// leaves behind when the agent dies between creating one and renaming it
// over its target. Nothing else may be writing to dir meanwhile: Create
// runs under the instance's lock, as every write of its files does.
func removeStaleTemps(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list %s: %w", dir, err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() || !tempName.MatchString(e.Name()) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove a stale temporary file: %w", err)
		}
	}
	return nil
}
