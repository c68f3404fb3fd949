package state

import (
	"encoding/json"
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
	// 1 -> 2: the reserved index (id -> memory_mb), filled from the records.
	func(tx *bolt.Tx) error {
		res, err := tx.CreateBucketIfNotExists(bucketReserved)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketInstances).ForEach(func(k, v []byte) error {
			var m struct {
				MemoryMB int `json:"memory_mb"`
			}
			if err := json.Unmarshal(v, &m); err != nil {
				return fmt.Errorf("instance %q: decode: %w", k, err)
			}
			return res.Put(k, []byte(strconv.Itoa(m.MemoryMB)))
		})
	},
	// 2 -> 3: the uids and persistence indexes, filled from the records
	// (putIndexes writes their reserved entries again, unchanged).
	func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketUIDs, bucketPersist} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketInstances).ForEach(func(k, v []byte) error {
			var inst Instance
			if err := json.Unmarshal(v, &inst); err != nil {
				return fmt.Errorf("instance %q: decode: %w", k, err)
			}
			return putIndexes(tx, inst)
		})
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
	return s.write(func(tx *bolt.Tx) error {
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
