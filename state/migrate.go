package state

import (
	"fmt"
	"strconv"

	bolt "go.etcd.io/bbolt"
)

// A migration moves the schema from version i to i+1, where i is its index
// in migrations. Migrations run in order in one transaction at Open.
var migrations = []func(tx *bolt.Tx) error{
	// 0 -> 1: the initial buckets.
	func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketInstances, bucketPorts} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	},
}

func readVersion(tx *bolt.Tx) (int, error) {
	v := tx.Bucket(bucketMeta).Get(keyVersion)
	if v == nil {
		return 0, nil
	}
	n, err := strconv.Atoi(string(v))
	if err != nil {
		return 0, fmt.Errorf("meta/version %q: %w", v, err)
	}
	return n, nil
}

// migrate brings the file to SchemaVersion, and refuses a file written by a
// newer agent rather than guessing at its layout.
func (s *Store) migrate() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketMeta); err != nil {
			return err
		}
		v, err := readVersion(tx)
		if err != nil {
			return err
		}
		if v > len(migrations) {
			return fmt.Errorf("state schema version %d is newer than this agent's %d: upgrade the agent", v, len(migrations))
		}
		if v == len(migrations) {
			return nil
		}
		for i := v; i < len(migrations); i++ {
			if err := migrations[i](tx); err != nil {
				return fmt.Errorf("migrate state %d -> %d: %w", i, i+1, err)
			}
		}
		return tx.Bucket(bucketMeta).Put(keyVersion, []byte(strconv.Itoa(len(migrations))))
	})
}
