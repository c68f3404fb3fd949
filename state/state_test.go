package state

import (
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func open(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "state.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// lowest admits the lowest port from 100 that no record holds.
func lowest(u Usage) (int, error) {
	for p := 100; p < 200; p++ {
		if !u.PortHeld(p) {
			return p, nil
		}
	}
	return 0, errors.New("full")
}

func TestCreateGetUpdateDelete(t *testing.T) {
	s := open(t)
	a, err := s.Create(Instance{ID: "a", MemoryMB: 64, Phase: PhaseProvisioning}, lowest)
	if err != nil || a.Port != 100 {
		t.Fatalf("Create a = %+v, %v", a, err)
	}
	b, err := s.Create(Instance{ID: "b", MemoryMB: 32}, lowest)
	if err != nil || b.Port != 101 {
		t.Fatalf("Create b = %+v, %v", b, err)
	}
	// A second create of the same id returns the existing record and writes nothing.
	got, err := s.Create(Instance{ID: "a", MemoryMB: 128}, lowest)
	if !errors.Is(err, ErrExists) || got.MemoryMB != 64 || got.Port != 100 {
		t.Fatalf("Create a again = %+v, %v; want existing and ErrExists", got, err)
	}
	u, err := s.Usage()
	if err != nil || u.Instances != 2 || u.MemoryMB != 96 || !u.PortHeld(100) || u.PortHeld(102) {
		t.Fatalf("Usage = %+v, %v", u, err)
	}
	up, err := s.Update("a", func(i *Instance) error { i.Phase = PhaseActive; i.PID = 42; return nil })
	if err != nil || up.Phase != PhaseActive || up.PID != 42 {
		t.Fatalf("Update = %+v, %v", up, err)
	}
	if g, _ := s.Get("a"); g.PID != 42 {
		t.Fatalf("Get after Update: pid %d", g.PID)
	}
	if _, err := s.Update("a", func(i *Instance) error { i.Port = 555; return nil }); err == nil {
		t.Fatal("Update changed the port")
	}
	if _, err := s.Update("nope", func(*Instance) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Update absent = %v", err)
	}
	if err := s.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete = %v, want ErrNotFound", err)
	}
	if _, err := s.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get deleted = %v", err)
	}
	// The freed port is handed out again.
	c, err := s.Create(Instance{ID: "c"}, lowest)
	if err != nil || c.Port != 100 {
		t.Fatalf("Create c = %+v, %v; want port 100 again", c, err)
	}
	list, err := s.List()
	if err != nil || len(list) != 2 || list[0].ID != "b" || list[1].ID != "c" {
		t.Fatalf("List = %+v, %v", list, err)
	}
}

func TestCreateAdmitErrorWritesNothing(t *testing.T) {
	s := open(t)
	errFull := errors.New("full")
	if _, err := s.Create(Instance{ID: "a"}, func(Usage) (int, error) { return 0, errFull }); !errors.Is(err, errFull) {
		t.Fatalf("Create = %v, want the admit error", err)
	}
	if _, err := s.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("record written despite admit error: %v", err)
	}
}

func TestConcurrentCreatesGetDistinctPorts(t *testing.T) {
	s := open(t)
	const n = 50
	var wg sync.WaitGroup
	ports := make([]int, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			inst, err := s.Create(Instance{ID: fmt.Sprintf("i%d", i)}, lowest)
			ports[i], errs[i] = inst.Port, err
		}()
	}
	wg.Wait()
	seen := map[int]bool{}
	for i, p := range ports {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if seen[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		seen[p] = true
	}
}

func TestSecondOpenIsLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = Open(path, 50*time.Millisecond)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
}

func TestReopenKeepsRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(Instance{ID: "a", AdminPassword: "pw"}, lowest); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if g, err := s.Get("a"); err != nil || g.AdminPassword != "pw" || g.Port != 100 {
		t.Fatalf("after reopen: %+v, %v", g, err)
	}
}

func TestMigrations(t *testing.T) {
	if SchemaVersion != len(migrations) {
		t.Fatalf("SchemaVersion %d but %d migrations", SchemaVersion, len(migrations))
	}
	t.Run("an empty file gets every bucket and the current version", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Close()
		s, err := Open(path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		err = s.db.View(func(tx *bolt.Tx) error {
			v, err := readVersion(tx)
			if err != nil || v != SchemaVersion {
				return fmt.Errorf("version %d, %v", v, err)
			}
			for _, b := range [][]byte{bucketInstances, bucketPorts, bucketReserved, bucketUIDs, bucketPersist} {
				if tx.Bucket(b) == nil {
					return fmt.Errorf("bucket %s missing", b)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	t.Run("1->2 indexes the reserved memory of existing records", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		// A version-1 file with two records.
		err = db.Update(func(tx *bolt.Tx) error {
			meta, _ := tx.CreateBucketIfNotExists(bucketMeta)
			meta.Put(keyVersion, []byte("1"))
			inst, _ := tx.CreateBucketIfNotExists(bucketInstances)
			ports, _ := tx.CreateBucketIfNotExists(bucketPorts)
			for i, mb := range []int{64, 128} {
				id := fmt.Sprintf("v1-%d", i)
				inst.Put([]byte(id), fmt.Appendf(nil, `{"id":%q,"memory_mb":%d,"port":%d,"phase":"active"}`, id, mb, 100+i))
				ports.Put(portKey(100+i), []byte(id))
			}
			return nil
		})
		db.Close()
		if err != nil {
			t.Fatal(err)
		}
		s, err := Open(path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		u, err := s.Usage()
		if err != nil || u.Instances != 2 || u.MemoryMB != 192 || !u.PortHeld(101) {
			t.Fatalf("Usage after migration = %+v, %v; want 2 instances, 192 MiB", u, err)
		}
		// The index follows later changes.
		if _, err := s.Update("v1-0", func(r *Instance) error { r.MemoryMB = 32; return nil }); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete("v1-1"); err != nil {
			t.Fatal(err)
		}
		if u, _ := s.Usage(); u.Instances != 1 || u.MemoryMB != 32 {
			t.Fatalf("Usage after update and delete = %+v", u)
		}
	})
	t.Run("2->3 indexes the uids and persistence of existing records", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		s, err := Open(path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		// A version-2 file: records written before the indexes were.
		for i, r := range []Instance{{ID: "u", UID: 70000, MemoryMB: 64, Persistence: "aof"}, {ID: "n", MemoryMB: 16, Persistence: "none"}} {
			if _, err := s.Create(r, func(Usage) (int, error) { return 100 + i, nil }); err != nil {
				t.Fatal(err)
			}
		}
		err = s.db.Update(func(tx *bolt.Tx) error {
			tx.DeleteBucket(bucketUIDs)
			tx.DeleteBucket(bucketPersist)
			return tx.Bucket(bucketMeta).Put(keyVersion, []byte("2"))
		})
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		s, err = Open(path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		uids, err := s.UIDs()
		if err != nil || len(uids) != 1 || !uids[70000] {
			t.Fatalf("UIDs after migration = %v, %v; want {70000}", uids, err)
		}
		shares, err := s.Shares()
		want := []Share{{"n", 16, "none"}, {"u", 64, "aof"}}
		if err != nil || !slices.Equal(shares, want) {
			t.Fatalf("Shares after migration = %+v, %v; want %+v", shares, err, want)
		}
	})
	t.Run("newer schema refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucketIfNotExists(bucketMeta)
			return b.Put(keyVersion, []byte("99"))
		})
		db.Close()
		if s, err := Open(path, time.Second); err == nil {
			s.Close()
			t.Fatal("Open accepted a schema from the future")
		}
	})
}

func BenchmarkCreate(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "state.db"), time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	i := 0
	for b.Loop() {
		i++
		_, err := s.Create(Instance{ID: fmt.Sprintf("i%d", i), MemoryMB: 64}, func(u Usage) (int, error) {
			for p := 1; p < 65536; p++ {
				if !u.PortHeld(p) {
					return p, nil
				}
			}
			return 0, errors.New("full")
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// Admit sees the usage of every record, its own included, and its change
// moves the reserved index with the record.
func TestAdmitSeesUsage(t *testing.T) {
	s := open(t)
	for i, id := range []string{"a", "b"} {
		if _, err := s.Create(Instance{ID: id, MemoryMB: 100}, func(Usage) (int, error) { return 7000 + i, nil }); err != nil {
			t.Fatal(err)
		}
	}
	var seen int
	tooBig := errors.New("too big")
	_, err := s.Admit("a", func(r *Instance, u Usage) error {
		seen = u.MemoryMB
		if u.MemoryMB-r.MemoryMB+500 > 300 {
			return tooBig
		}
		r.MemoryMB = 500
		return nil
	})
	if !errors.Is(err, tooBig) || seen != 200 {
		t.Fatalf("Admit = %v, saw %d MiB; want the fn's error after seeing 200", err, seen)
	}
	if _, err := s.Admit("a", func(r *Instance, u Usage) error { r.MemoryMB = 150; return nil }); err != nil {
		t.Fatal(err)
	}
	u, err := s.Usage()
	if err != nil || u.MemoryMB != 250 {
		t.Fatalf("usage after Admit = %d MiB, %v; want 250", u.MemoryMB, err)
	}
}

// An update that changes nothing commits nothing: a bbolt commit writes
// and fsyncs even when empty, and every Ready event at an agent start
// used to pay for one.
func TestUpdateWithoutChangeDoesNotCommit(t *testing.T) {
	s := open(t)
	if _, err := s.Create(Instance{ID: "a", MemoryMB: 8}, lowest); err != nil {
		t.Fatal(err)
	}
	txid := func() int {
		var id int
		s.db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil })
		return id
	}
	before := txid()
	got, err := s.Update("a", func(r *Instance) error { r.MemoryMB = 8; return nil })
	if err != nil || got.MemoryMB != 8 {
		t.Fatalf("no-op Update = %+v, %v", got, err)
	}
	if after := txid(); after != before {
		t.Fatalf("a no-op update committed: txid %d -> %d", before, after)
	}
	if _, err := s.Update("a", func(r *Instance) error { r.MemoryMB = 9; return nil }); err != nil {
		t.Fatal(err)
	}
	if after := txid(); after != before+1 {
		t.Fatalf("a real update: txid %d -> %d, want one commit", before, after)
	}
	if _, err := s.Update("absent", func(*Instance) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Update of an absent record = %v", err)
	}
}

// UpdateEach writes many records in one transaction, or none when one
// function fails.
func TestUpdateEach(t *testing.T) {
	s := open(t)
	for _, id := range []string{"a", "b", "c"} {
		if _, err := s.Create(Instance{ID: id, MemoryMB: 1}, func(u Usage) (int, error) { return 10000 + u.Instances, nil }); err != nil {
			t.Fatal(err)
		}
	}
	setPID := func(pid int) func(*Instance) error { return func(r *Instance) error { r.PID = pid; return nil } }
	if err := s.UpdateEach(map[string]func(*Instance) error{"a": setPID(1), "b": setPID(2)}); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err := s.UpdateEach(map[string]func(*Instance) error{"a": setPID(7), "c": func(*Instance) error { return boom }})
	if !errors.Is(err, boom) {
		t.Fatalf("UpdateEach with a failing function = %v", err)
	}
	if err := s.UpdateEach(map[string]func(*Instance) error{"zz": setPID(1)}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("UpdateEach of a missing record = %v, want ErrNotFound", err)
	}
	for id, want := range map[string]int{"a": 1, "b": 2, "c": 0} {
		if r, err := s.Get(id); err != nil || r.PID != want {
			t.Fatalf("%s: pid %d (%v), want %d", id, r.PID, err, want)
		}
	}
}

// Generation changes with every commit (batched ones included) and with
// nothing else: reads and refused writes leave it.
func TestGeneration(t *testing.T) {
	s := open(t)
	gen := func() uint64 {
		t.Helper()
		g, err := s.Generation()
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	g0 := gen()
	if _, err := s.Create(Instance{ID: "a", MemoryMB: 16}, lowest); err != nil {
		t.Fatal(err)
	}
	g1 := gen()
	if g1 == g0 {
		t.Fatal("Create left the generation")
	}
	s.Get("a")
	s.List()
	s.Usage()
	if _, err := s.Update("a", func(*Instance) error { return errors.New("refused") }); err == nil {
		t.Fatal("a refused update succeeded")
	}
	if g := gen(); g != g1 {
		t.Fatalf("reads and a refused update moved the generation %d -> %d", g1, g)
	}
	if err := s.UpdateBatched("a", func(i *Instance) error { i.PID = 7; return nil }); err != nil {
		t.Fatal(err)
	}
	if g := gen(); g == g1 {
		t.Fatal("a batched update left the generation")
	}
}

// UIDs are the uids records hold; a record without one (0) holds none.
func TestUIDs(t *testing.T) {
	s := open(t)
	for i, uid := range []int{0, 2000001, 2000002} {
		if _, err := s.CreatePorts(Instance{ID: fmt.Sprintf("u%d", i), MemoryMB: 16, UID: uid}, func(Usage) (int, int, error) { return 20000 + i, 0, nil }); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.UIDs()
	if err != nil {
		t.Fatal(err)
	}
	if want := map[int]bool{2000001: true, 2000002: true}; !maps.Equal(got, want) {
		t.Fatalf("UIDs = %v, want %v", got, want)
	}
	if err := s.Delete("u2"); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.UIDs(); got[2000002] {
		t.Fatal("a deleted record's uid is still held")
	}
}

// The uids and persistence indexes follow every change of their records:
// a create, an update of the uid or the persistence, a delete.
func TestIndexesFollowTheRecords(t *testing.T) {
	s := open(t)
	if _, err := s.Create(Instance{ID: "a", MemoryMB: 64, Persistence: "rdb", UID: 5001}, lowest); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(Instance{ID: "b", MemoryMB: 32, Persistence: "aof"}, lowest); err != nil {
		t.Fatal(err)
	}
	check := func(when string, wantUIDs []int, want []Share) {
		t.Helper()
		uids, err := s.UIDs()
		if err != nil {
			t.Fatal(err)
		}
		got := slices.Sorted(maps.Keys(uids))
		if !slices.Equal(got, wantUIDs) {
			t.Errorf("%s: UIDs %v, want %v", when, got, wantUIDs)
		}
		shares, err := s.Shares()
		if err != nil || !slices.Equal(shares, want) {
			t.Errorf("%s: Shares %+v, %v; want %+v", when, shares, err, want)
		}
	}
	check("created", []int{5001}, []Share{{"a", 64, "rdb"}, {"b", 32, "aof"}})
	if _, err := s.Update("b", func(r *Instance) error { r.UID = 5002; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Update("a", func(r *Instance) error { r.UID, r.Persistence = 0, "none"; return nil }); err != nil {
		t.Fatal(err)
	}
	check("updated", []int{5002}, []Share{{"a", 64, "none"}, {"b", 32, "aof"}})
	// A refused update changes no index.
	if _, err := s.Update("b", func(r *Instance) error { r.UID = 1; return errors.New("no") }); err == nil {
		t.Fatal("a refused update succeeded")
	}
	if err := s.Delete("a"); err != nil {
		t.Fatal(err)
	}
	check("deleted", []int{5002}, []Share{{"b", 32, "aof"}})
}
