package state

import (
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/redis-agent/redis-agent/apitype"
)

func TestUpgradeExit(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   apitype.Exit
		want apitype.Exit
	}{
		{"a legacy spawn failure",
			apitype.Exit{Code: -1, Reason: "spawn failed: fork/exec /x: no such file or directory"},
			apitype.Exit{Code: -1, Reason: apitype.ReasonSpawnFailed, Message: "fork/exec /x: no such file or directory"}},
		{"a spawn failure of this agent",
			apitype.Exit{Code: -1, Reason: apitype.ReasonSpawnFailed, Message: "boom"},
			apitype.Exit{Code: -1, Reason: apitype.ReasonSpawnFailed, Message: "boom"}},
		{"a crash", apitype.Exit{Code: 1, Reason: apitype.ReasonCrash}, apitype.Exit{Code: 1, Reason: apitype.ReasonCrash}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := tt.in
			upgradeExit(&e)
			if e != tt.want {
				t.Fatalf("upgradeExit(%+v) = %+v, want %+v", tt.in, e, tt.want)
			}
		})
	}
	upgradeExit(nil)
}

// A record an older agent wrote, whose last exit is a spawn failure with
// the error in its reason, reads as reason spawn_failed with the error as
// the message; an update writes it back that way.
func TestLegacySpawnFailureReads(t *testing.T) {
	s := open(t)
	if _, err := s.Create(Instance{ID: "a", MemoryMB: 8}, lowest); err != nil {
		t.Fatal(err)
	}
	old := `{"id":"a","memory_mb":8,"port":100,"phase":"active","restarts":2,` +
		`"last_exit":{"time":"2024-05-01T10:00:00Z","code":-1,"reason":"spawn failed: fork/exec /usr/bin/redis-server: no such file or directory"}}`
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketInstances).Put([]byte("a"), []byte(old)) }); err != nil {
		t.Fatal(err)
	}
	want := apitype.Exit{Time: time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC), Code: -1,
		Reason: apitype.ReasonSpawnFailed, Message: "fork/exec /usr/bin/redis-server: no such file or directory"}
	if g, err := s.Get("a"); err != nil || g.LastExit == nil || *g.LastExit != want {
		t.Fatalf("Get = %+v, %v; want last exit %+v", g.LastExit, err, want)
	}
	if l, err := s.List(); err != nil || len(l) != 1 || l[0].LastExit == nil || *l[0].LastExit != want {
		t.Fatalf("List = %+v, %v", l, err)
	}
	if _, err := s.Update("a", func(r *Instance) error { r.Restarts = 3; return nil }); err != nil {
		t.Fatal(err)
	}
	var raw string
	s.db.View(func(tx *bolt.Tx) error { raw = string(tx.Bucket(bucketInstances).Get([]byte("a"))); return nil })
	if !strings.Contains(raw, `"reason":"spawn_failed","message":"fork/exec /usr/bin/redis-server: no such file or directory"`) {
		t.Fatalf("stored after an update: %s", raw)
	}
}
