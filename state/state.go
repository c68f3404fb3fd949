// Package state keeps the agent's durable record of every instance in one
// bbolt file. The record is the intent: it is written before any side effect
// (directory, process) exists, so that after a crash reconcile can finish or
// roll back whatever was half done.
//
// Buckets:
//
//	meta/
//	    version            -> schema version, decimal ("2")
//	instances/
//	    <id>               -> JSON Instance
//	ports/
//	    <port, 2 bytes BE> -> <id>   (index: a port is held by one record)
//	reserved/
//	    <id>               -> memory_mb, decimal (index: the memory budget
//	                          in use, summed without decoding every record)
//	uids/
//	    <id>               -> uid, decimal, for a record with one (index:
//	                          the uids held, for a provision's free one)
//	persistence/
//	    <id>               -> persistence mode (index: with reserved, each
//	                          record's disk reservation, for admission)
//
// A port is allocated in the same transaction that writes the record and is
// free again only when the record is deleted. The indexes change in the
// same transactions as the records they index.
package state

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/apitype"
)

// Errors of the store.
var (
	ErrNotFound = errors.New("no such record")
	ErrExists   = errors.New("record exists")
	// ErrLocked means another process (another agent) holds the state file.
	ErrLocked = errors.New("state file is locked by another process")
)

// Phase is the intent recorded for an instance.
type Phase string

// Phases. Provisioning and Deleting are intents that reconcile finishes
// (provisioning) or carries out (deleting) after a crash.
const (
	PhaseProvisioning Phase = "provisioning"
	PhaseActive       Phase = "active"
	PhaseDeleting     Phase = "deleting"
)

// Binding is one ACL user of an instance.
type Binding struct {
	ID       string `json:"id"`
	Username string `json:"username"`
	// Password is kept so a repeated bind returns the same credentials; the
	// ACL file only ever holds its hash.
	Password  string    `json:"password"`
	CreatedAt time.Time `json:"created_at"`
}

// Instance is the durable record of one instance: what is needed to rebuild
// or adopt it.
type Instance struct {
	ID            string             `json:"id"`
	MemoryMB      int                `json:"memory_mb"`
	Persistence   string             `json:"persistence"`
	Port          int                `json:"port"`
	AdminPassword string             `json:"admin_password"`
	Bindings      map[string]Binding `json:"bindings,omitempty"`
	Phase         Phase              `json:"phase"`
	CreatedAt     time.Time          `json:"created_at"`
	// PID and StartTime (clock ticks after boot, /proc/<pid>/stat field 22)
	// identify the running process for adoption; 0 when none is known.
	PID int `json:"pid,omitempty"`
	// UID is the uid and gid of the instance's own Redis user; 0 in a
	// record of an instance that runs as the shared one (agents without
	// instance users, or older ones), which gets its own at its next start.
	UID        int    `json:"uid,omitempty"`
	StartTime  uint64 `json:"start_time,omitempty"`
	ConfigHash string `json:"config_hash,omitempty"`
	Restarts   int    `json:"restarts"`
	// LastExit is how the last process ended, as the API shows it.
	LastExit *apitype.Exit `json:"last_exit,omitempty"`
	// Binary is the redis-server executable the instance's process was
	// started from, and BinaryID that file's identity then (device, inode,
	// size, modification time): a rollout moves instances whose pair
	// differs from the configured binary's. Empty in records written
	// before rollouts existed, which reconcile fills in.
	Binary   string `json:"binary,omitempty"`
	BinaryID string `json:"binary_id,omitempty"`
	// RolloutFailed is the BinaryID of a binary this instance failed to
	// start on in a rollout: the automatic rollout at agent start does not
	// try that binary again (POST /v1/rollout does).
	RolloutFailed string `json:"rollout_failed,omitempty"`
	// RolloutFrom is set while a rollout moves this instance: the binary
	// it goes back to if it does not become ready on the new one. A crash
	// in the middle of the move leaves it set, and the next rollout
	// finishes the move from it.
	RolloutFrom string `json:"rollout_from,omitempty"`
	// Exe is the executable the process ran once it answered
	// (/proc/<pid>/exe): Binary itself, or what a wrapper script at Binary
	// ran. Adoption requires a process running it (or Binary).
	Exe string `json:"exe,omitempty"`
	// Metadata is the caller's opaque JSON object (compacted), stored
	// with the instance.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// Move is set on the source of a replication move while it runs,
	// each step recorded before it is taken.
	Move *Move `json:"move,omitempty"`
	// ReplicaOf is set on a move's target until it is promoted: its
	// redis-server replicates from there.
	ReplicaOf *Primary `json:"replica_of,omitempty"`
	// MaxmemoryPolicy, MaxmemoryClients and TLS are the instance's
	// settings; "" (in a record from before them) is the default.
	MaxmemoryPolicy  string `json:"maxmemory_policy,omitempty"`
	MaxmemoryClients string `json:"maxmemory_clients,omitempty"`
	TLS              string `json:"tls,omitempty"`
	// TLSPort is the instance's second port, its TLS one, held in the
	// ports index like Port while TLS is not off; 0 when it is.
	TLSPort int `json:"tls_port,omitempty"`
	// TLSCert names the instance's server certificate and key in its tls
	// directory (<TLSCert>.crt, <TLSCert>.key): a renewal writes new
	// files under a new name, so the running server's CONFIG SET of them
	// is a change, which Redis applies.
	TLSCert string `json:"tls_cert,omitempty"`
	// Backup is the instance's own backup settings (nil: the agent's).
	Backup *apitype.BackupPolicy `json:"backup,omitempty"`
	// LastBackup is the last backup of it that succeeded here.
	LastBackup *LastBackup `json:"last_backup,omitempty"`
	// IO is the instance's own IO limits (over the agent's defaults);
	// nil when it has none.
	IO *apitype.IOSetting `json:"io,omitempty"`
}

// LastBackup is a successful backup of an instance.
type LastBackup struct {
	Key    string    `json:"key"`
	Time   time.Time `json:"time"`
	Size   int64     `json:"size"`
	SHA256 string    `json:"sha256"`
}

// Move states on the source, in order.
const (
	MoveReplicating = "replicating" // a replica may sync from it
	MoveCutover     = "cutover"     // writes paused and tenants fenced off
	MoveForwarding  = "forwarding"  // its redis-server is gone; a forwarder holds the port
)

// Move is the source's side of a replication move.
type Move struct {
	State string `json:"state"`
	// User and Password are the replication ACL user made for this move.
	User     string `json:"user"`
	Password string `json:"password"`
	// ForwardTo is the target's address, and ForwardUntil when the
	// forwarder (and the record) go, once forwarding.
	ForwardTo    string    `json:"forward_to,omitempty"`
	ForwardUntil time.Time `json:"forward_until,omitempty"`
	StartedAt    time.Time `json:"started_at"`
	// CutoverAt is when the cutover began.
	CutoverAt time.Time `json:"cutover_at,omitempty"`
}

// Primary is where a move's target replicates from.
type Primary struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	User     string `json:"user"`
	Password string `json:"password"`
	// TLS: the link goes over TLS, the source verified against CACert.
	TLS    bool   `json:"tls,omitempty"`
	CACert string `json:"ca_cert,omitempty"`
}

// SchemaVersion is the version this code writes.
const SchemaVersion = 3

var (
	bucketMeta      = []byte("meta")
	bucketInstances = []byte("instances")
	bucketPorts     = []byte("ports")
	bucketReserved  = []byte("reserved")
	bucketUIDs      = []byte("uids")
	bucketPersist   = []byte("persistence")
	keyVersion      = []byte("version")
	keyDraining     = []byte("draining")
)

// Store is the state file. It is safe for concurrent use.
type Store struct {
	db *bolt.DB
	// writeErr is the error of the last commit that failed (not of a
	// transaction its own function refused), nil once one succeeds.
	writeErr atomic.Pointer[error]
}

// Open opens (creating if needed) the state file at path. It waits at most
// timeout for another process's lock and then fails with ErrLocked.
func Open(path string, timeout time.Duration) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("open %s: %w (is another redis-agent running on this data dir?)", path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &Store{db: db}
	if err := s.migrate(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the file and releases the lock.
func (s *Store) Close() error { return s.db.Close() }

// Path is the file's path.
func (s *Store) Path() string { return s.db.Path() }

// Generation is the id of the store's last commit: it changes with every
// write, so a reader that polls the records can tell, for the price of a
// read transaction, that none has changed since it last read them.
func (s *Store) Generation() (uint64, error) {
	var g uint64
	err := s.db.View(func(tx *bolt.Tx) error { g = uint64(tx.ID()); return nil })
	return g, err
}

// write runs fn in a write transaction and remembers whether committing
// it failed, for Writable.
func (s *Store) write(fn func(*bolt.Tx) error) error {
	var fnErr error
	err := s.db.Update(func(tx *bolt.Tx) error { fnErr = fn(tx); return fnErr })
	return s.noteWrite(err, fnErr)
}

// noteWrite remembers, for Writable, whether the commit of a write
// transaction failed: err is the transaction's, fnErr its function's (a
// refusal of the caller's, not a failure of the file). It returns err.
func (s *Store) noteWrite(err, fnErr error) error {
	switch {
	case err == nil:
		s.writeErr.Store(nil)
	case fnErr == nil:
		s.writeErr.Store(&err)
	}
	return err
}

// Writable reports whether the state file can be written, without writing
// to it (a commit costs fsyncs, and the readiness probe that asks is open
// to anyone): the last commit did not fail, the file is writable, and its
// file system is neither read-only nor full.
func (s *Store) Writable() error {
	if p := s.writeErr.Load(); p != nil {
		return fmt.Errorf("the last write failed: %w", *p)
	}
	path := s.db.Path()
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(path), &st); err != nil {
		return fmt.Errorf("statfs %s: %w", filepath.Dir(path), err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("%s: %w", filepath.Dir(path), unix.EROFS)
	}
	if st.Bfree == 0 {
		return fmt.Errorf("%s: %w", filepath.Dir(path), unix.ENOSPC)
	}
	if err := unix.Access(path, unix.W_OK); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func portKey(p int) []byte {
	var k [2]byte
	binary.BigEndian.PutUint16(k[:], uint16(p))
	return k[:]
}

func get(tx *bolt.Tx, id string) (Instance, error) {
	v := tx.Bucket(bucketInstances).Get([]byte(id))
	if v == nil {
		return Instance{}, fmt.Errorf("instance %q: %w", id, ErrNotFound)
	}
	return decode([]byte(id), v)
}

func put(tx *bolt.Tx, inst Instance) error {
	v, err := json.Marshal(inst)
	if err != nil {
		return fmt.Errorf("instance %q: encode: %w", inst.ID, err)
	}
	return tx.Bucket(bucketInstances).Put([]byte(inst.ID), v)
}

// Get returns the record of id, or ErrNotFound.
func (s *Store) Get(id string) (Instance, error) {
	var inst Instance
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		inst, err = get(tx, id)
		return err
	})
	return inst, err
}

// List returns every record, sorted by id.
func (s *Store) List() ([]Instance, error) {
	var out []Instance
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketInstances).ForEach(func(k, v []byte) error {
			inst, err := decode(k, v)
			if err != nil {
				return err
			}
			out = append(out, inst)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// UIDs returns the uids the records hold (their UID, where not 0), from
// the uids index: a provision of a user of its own asks under the
// admission lock, and decoding a thousand records for it was a third of
// the agent's CPU while it provisioned them.
func (s *Store) UIDs() (map[int]bool, error) {
	uids := map[int]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketUIDs).ForEach(func(k, v []byte) error {
			uid, err := strconv.Atoi(string(v))
			if err != nil {
				return fmt.Errorf("uids %q: %w", k, err)
			}
			uids[uid] = true
			return nil
		})
	})
	return uids, err
}

// Share is what a record takes of the agent's room: its memory and
// persistence make its disk reservation.
type Share struct {
	ID          string
	MemoryMB    int
	Persistence string
}

// Shares returns every record's share, by id, from the reserved and
// persistence indexes (not decoding the records: a provision's disk
// admission asks under the admission lock).
func (s *Store) Shares() ([]Share, error) {
	var out []Share
	err := s.db.View(func(tx *bolt.Tx) error {
		persist := tx.Bucket(bucketPersist)
		return tx.Bucket(bucketReserved).ForEach(func(k, v []byte) error {
			mb, err := strconv.Atoi(string(v))
			if err != nil {
				return fmt.Errorf("reserved %q: %w", k, err)
			}
			out = append(out, Share{ID: string(k), MemoryMB: mb, Persistence: string(persist.Get(k))})
			return nil
		})
	})
	return out, err
}

// Usage is what the records hold, for admission decisions.
type Usage struct {
	// Instances is the number of records.
	Instances int
	// MemoryMB is the sum of the records' MemoryMB.
	MemoryMB int
	// PortHeld reports whether a record holds the port.
	PortHeld func(port int) bool
}

func usage(tx *bolt.Tx) (Usage, error) {
	u := Usage{}
	err := tx.Bucket(bucketReserved).ForEach(func(k, v []byte) error {
		mb, err := strconv.Atoi(string(v))
		if err != nil {
			return fmt.Errorf("reserved %q: %w", k, err)
		}
		u.Instances++
		u.MemoryMB += mb
		return nil
	})
	ports := tx.Bucket(bucketPorts)
	u.PortHeld = func(p int) bool { return ports.Get(portKey(p)) != nil }
	return u, err
}

// Usage returns what the records hold now. PortHeld is only valid until the
// next call into the store, so it is replaced by a snapshot here.
func (s *Store) Usage() (Usage, error) {
	var u Usage
	held := map[int]bool{}
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		u, err = usage(tx)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketPorts).ForEach(func(k, _ []byte) error {
			held[int(binary.BigEndian.Uint16(k))] = true
			return nil
		})
	})
	u.PortHeld = func(p int) bool { return held[p] }
	return u, err
}

// Create writes a new record in one transaction with its port: admit looks
// at what the existing records hold and returns the port for inst (or an
// error, which aborts the transaction). If id exists, Create returns the
// existing record and ErrExists and writes nothing.
func (s *Store) Create(inst Instance, admit func(Usage) (port int, err error)) (Instance, error) {
	return s.CreatePorts(inst, func(u Usage) (int, int, error) {
		p, err := admit(u)
		return p, 0, err
	})
}

// CreatePorts is Create for a record that may hold a second port (its TLS
// port; 0 for none), allocated in the same transaction.
func (s *Store) CreatePorts(inst Instance, admit func(Usage) (port, tlsPort int, err error)) (Instance, error) {
	var existing Instance
	err := s.write(func(tx *bolt.Tx) error {
		if e, err := get(tx, inst.ID); err == nil {
			existing = e
			return fmt.Errorf("instance %q: %w", inst.ID, ErrExists)
		} else if !errors.Is(err, ErrNotFound) {
			return err
		}
		u, err := usage(tx)
		if err != nil {
			return err
		}
		port, tlsPort, err := admit(u)
		if err != nil {
			return err
		}
		for _, p := range []int{port, tlsPort} {
			if p != 0 && u.PortHeld(p) {
				return fmt.Errorf("port %d is already held by a record", p)
			}
		}
		if port == tlsPort {
			return fmt.Errorf("port %d asked for twice", port)
		}
		inst.Port, inst.TLSPort = port, tlsPort
		if err := tx.Bucket(bucketPorts).Put(portKey(port), []byte(inst.ID)); err != nil {
			return err
		}
		if tlsPort != 0 {
			if err := tx.Bucket(bucketPorts).Put(portKey(tlsPort), []byte(inst.ID)); err != nil {
				return err
			}
		}
		if err := putIndexes(tx, inst); err != nil {
			return err
		}
		return put(tx, inst)
	})
	if errors.Is(err, ErrExists) {
		return existing, err
	}
	if err != nil {
		return Instance{}, err
	}
	return inst, nil
}

// Update applies fn to the record of id and writes the result, unless fn
// returns an error or leaves the record unchanged. The id and port of a
// record never change; its TLS port may (it is freed, or one that no
// other record holds is taken), with the ports index in the same
// transaction.
func (s *Store) Update(id string, fn func(*Instance) error) (Instance, error) {
	return s.update(id, false, func(inst *Instance, _ Usage) error { return fn(inst) })
}

// Admit is Update for a change that must fit what all records hold (a
// bigger memory reservation): fn sees the usage, this record's included,
// in the same transaction as the write.
func (s *Store) Admit(id string, fn func(*Instance, Usage) error) (Instance, error) {
	return s.update(id, true, fn)
}

// update is Update, with the usage computed only when withUsage (it reads
// the whole reserved index).
func (s *Store) update(id string, withUsage bool, fn func(*Instance, Usage) error) (Instance, error) {
	var out Instance
	err := s.write(func(tx *bolt.Tx) error {
		inst, changed, err := apply(tx, id, withUsage, fn)
		if err != nil {
			return err
		}
		out = inst
		if !changed {
			// Rolled back, not committed: a bbolt commit writes and
			// fsyncs its meta page even when nothing changed (every
			// instance's Ready event at an agent start came here).
			return errUnchanged
		}
		return nil
	})
	if errors.Is(err, errUnchanged) {
		err = nil
	}
	return out, err
}

// UpdateBatched is Update, committed together with the other
// UpdateBatched calls of the moment (bbolt's Batch: the calls of up to
// 10 ms share one commit, one fsync): for many writes at once, such as a
// thousand starts at an agent's boot. Each call returns once its change
// is on disk, as Update does; a lone call waits the 10 ms.
func (s *Store) UpdateBatched(id string, fn func(*Instance) error) error {
	var fnErr error
	err := s.db.Batch(func(tx *bolt.Tx) error {
		_, _, fnErr = apply(tx, id, false, func(inst *Instance, _ Usage) error { return fn(inst) })
		return fnErr
	})
	return s.noteWrite(err, fnErr)
}

// UpdateEach is Update of many records in one transaction, one commit
// (one fsync): fns holds the function of each id. Nothing is written when
// one of them fails, or none changes its record. A missing record is
// ErrNotFound.
func (s *Store) UpdateEach(fns map[string]func(*Instance) error) error {
	if len(fns) == 0 {
		return nil
	}
	err := s.write(func(tx *bolt.Tx) error {
		any := false
		for id, fn := range fns {
			_, changed, err := apply(tx, id, false, func(inst *Instance, _ Usage) error { return fn(inst) })
			if err != nil {
				return err
			}
			any = any || changed
		}
		if !any {
			return errUnchanged
		}
		return nil
	})
	if errors.Is(err, errUnchanged) {
		err = nil
	}
	return err
}

// apply applies fn to the record of id in tx and writes it when it
// changed.
func apply(tx *bolt.Tx, id string, withUsage bool, fn func(*Instance, Usage) error) (Instance, bool, error) {
	inst, err := get(tx, id)
	if err != nil {
		return inst, false, err
	}
	before, _ := json.Marshal(inst)
	var u Usage
	if withUsage {
		if u, err = usage(tx); err != nil {
			return inst, false, err
		}
	}
	if err := fn(&inst, u); err != nil {
		return inst, false, err
	}
	if inst.ID != id {
		return inst, false, fmt.Errorf("instance %q: update may not change the id", id)
	}
	after, err := json.Marshal(inst)
	if err != nil {
		return inst, false, err
	}
	if string(before) == string(after) {
		return inst, false, nil
	}
	var old struct {
		Port        int    `json:"port"`
		TLSPort     int    `json:"tls_port"`
		MemoryMB    int    `json:"memory_mb"`
		UID         int    `json:"uid"`
		Persistence string `json:"persistence"`
	}
	_ = json.Unmarshal(before, &old)
	if old.Port != inst.Port {
		return inst, false, fmt.Errorf("instance %q: update may not change the port", id)
	}
	if old.TLSPort != inst.TLSPort {
		ports := tx.Bucket(bucketPorts)
		if p := inst.TLSPort; p != 0 {
			if owner := ports.Get(portKey(p)); owner != nil || p == inst.Port {
				return inst, false, fmt.Errorf("instance %q: port %d is already held by a record", id, p)
			}
			if err := ports.Put(portKey(p), []byte(id)); err != nil {
				return inst, false, err
			}
		}
		if p := old.TLSPort; p != 0 && string(ports.Get(portKey(p))) == id {
			if err := ports.Delete(portKey(p)); err != nil {
				return inst, false, err
			}
		}
	}
	if old.MemoryMB != inst.MemoryMB || old.UID != inst.UID || old.Persistence != inst.Persistence {
		if err := putIndexes(tx, inst); err != nil {
			return inst, false, err
		}
	}
	return inst, true, tx.Bucket(bucketInstances).Put([]byte(id), after)
}

// putIndexes writes inst's entries of the reserved, uids and persistence
// indexes (no uids entry for no uid); Delete removes them. The ports
// index is CreatePorts' and apply's, which check what they take.
func putIndexes(tx *bolt.Tx, inst Instance) error {
	id := []byte(inst.ID)
	if err := tx.Bucket(bucketReserved).Put(id, []byte(strconv.Itoa(inst.MemoryMB))); err != nil {
		return err
	}
	uids := tx.Bucket(bucketUIDs)
	var err error
	if inst.UID != 0 {
		err = uids.Put(id, []byte(strconv.Itoa(inst.UID)))
	} else {
		err = uids.Delete(id)
	}
	if err != nil {
		return err
	}
	return tx.Bucket(bucketPersist).Put(id, []byte(inst.Persistence))
}

// errUnchanged ends an update that changed nothing without a commit.
var errUnchanged = errors.New("unchanged")

// Delete removes the record of id and frees its ports. Deleting an absent
// record returns ErrNotFound.
func (s *Store) Delete(id string) error {
	return s.write(func(tx *bolt.Tx) error {
		inst, err := get(tx, id)
		if err != nil {
			return err
		}
		ports := tx.Bucket(bucketPorts)
		for _, p := range []int{inst.Port, inst.TLSPort} {
			if owner := ports.Get(portKey(p)); p != 0 && string(owner) == id {
				if err := ports.Delete(portKey(p)); err != nil {
					return err
				}
			}
		}
		for _, b := range [][]byte{bucketReserved, bucketUIDs, bucketPersist} {
			if err := tx.Bucket(b).Delete([]byte(id)); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketInstances).Delete([]byte(id))
	})
}

// SetDraining records whether the agent is drained (its instances are
// being moved away, nothing new is to be placed on it); a write that
// changes nothing is skipped.
func (s *Store) SetDraining(on bool) error {
	if cur, err := s.Draining(); err == nil && cur == on {
		return nil
	}
	return s.write(func(tx *bolt.Tx) error {
		if on {
			return tx.Bucket(bucketMeta).Put(keyDraining, []byte("1"))
		}
		return tx.Bucket(bucketMeta).Delete(keyDraining)
	})
}

// Draining reports whether the agent is drained.
func (s *Store) Draining() (bool, error) {
	on := false
	err := s.db.View(func(tx *bolt.Tx) error {
		on = tx.Bucket(bucketMeta).Get(keyDraining) != nil
		return nil
	})
	return on, err
}
