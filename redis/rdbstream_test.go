package redis

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/internal/testenv"
)

// A snapshot by replication is the server's data set as an RDB, of every
// persistence mode, and writes nothing to the server's disk.
func TestStreamRDB(t *testing.T) {
	ctx := context.Background()
	for _, mode := range []string{apitype.PersistenceAOF, apitype.PersistenceNone} {
		t.Run(mode, func(t *testing.T) {
			admin := NewPassword()
			port := startConf(t, Conf{Persistence: mode}, []User{{Name: AdminUser, PasswordHash: HashPassword(admin), Admin: true}})
			a := NewAdmin("127.0.0.1", port, admin)
			defer a.Close()
			waitUp(t, a)
			for i := range 300 {
				if _, err := a.Do(ctx, "SET", "k"+strconv.Itoa(i), strings.Repeat("v", i)); err != nil {
					t.Fatal(err)
				}
			}
			var b bytes.Buffer
			n, err := a.StreamRDB(ctx, &b)
			if err != nil {
				t.Fatal(err)
			}
			if n != int64(b.Len()) || !bytes.HasPrefix(b.Bytes(), []byte("REDIS")) {
				t.Fatalf("StreamRDB = %d bytes (%d written), starting %q", n, b.Len(), b.Bytes()[:min(9, b.Len())])
			}
			// A second one, at once, is a fresh one too.
			var c bytes.Buffer
			if _, err := a.StreamRDB(ctx, &c); err != nil {
				t.Fatalf("a second StreamRDB: %v", err)
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "dump.rdb")
			writeFile(t, path, b.Bytes())
			if got := checkRDB(t, path); got != 300 {
				t.Fatalf("the RDB holds %d keys, want 300", got)
			}
			// No save to disk (rdb_saves counts those).
			testenv.Eventually(t, "the fork reaped", 5*time.Second, func() bool {
				f, err := a.Fields(ctx, "persistence")
				return err == nil && f["rdb_bgsave_in_progress"] == "0" && f["rdb_saves"] == "0"
			})
			if n, _ := a.Do(ctx, "DBSIZE"); n.Int != 300 {
				t.Fatalf("DBSIZE after = %d", n.Int)
			}
		})
	}
	wrong := NewAdmin("127.0.0.1", startConf(t, Conf{Persistence: apitype.PersistenceNone}, []User{{Name: AdminUser, PasswordHash: HashPassword("right"), Admin: true}}), "wrong")
	testenv.Eventually(t, "the server up", 5*time.Second, func() bool { return !Unreachable(wrong.Ping(ctx)) })
	if _, err := wrong.StreamRDB(ctx, &bytes.Buffer{}); err == nil {
		t.Fatal("StreamRDB with a wrong password succeeded")
	}
}

// A loader (RenderLoader) made a replica of a Feed loads the RDB fed to
// it as it arrives and acknowledges it; one it cannot load it refuses, by
// closing the link or exiting, and the Feed says so.
func TestFeedLoader(t *testing.T) {
	ctx := context.Background()
	admin := NewPassword()
	port := startConf(t, Conf{Persistence: apitype.PersistenceNone}, []User{{Name: AdminUser, PasswordHash: HashPassword(admin), Admin: true}})
	src := NewAdmin("127.0.0.1", port, admin)
	defer src.Close()
	waitUp(t, src)
	for i := range 2000 {
		if _, err := src.Do(ctx, "SET", "k"+strconv.Itoa(i), strings.Repeat("x", 100)); err != nil {
			t.Fatal(err)
		}
	}
	var good bytes.Buffer
	if _, err := src.StreamRDB(ctx, &good); err != nil {
		t.Fatal(err)
	}
	feed := func(t *testing.T, rdb []byte) (error, int64) {
		f, err := ListenFeed("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		dir := t.TempDir()
		conf := filepath.Join(dir, "loader.conf")
		writeFile(t, conf, RenderLoader(dir, "loader.sock", f.Password()))
		cmd := exec.Command(testenv.RedisServer(t), conf)
		cmd.Dir = dir
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		defer func() { cmd.Process.Kill(); <-exited }()
		a := NewSocketAdmin(filepath.Join(dir, "loader.sock"))
		defer a.Close()
		testenv.Eventually(t, "the loader up", 5*time.Second, func() bool { return a.Ping(ctx) == nil })
		if _, err := a.Do(ctx, "REPLICAOF", f.Host(), strconv.Itoa(f.Port())); err != nil {
			t.Fatal(err)
		}
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		fc, err := f.Accept(actx)
		if err != nil {
			t.Fatal(err)
		}
		defer fc.Close()
		for i := 0; i < len(rdb); i += 1000 {
			if _, err := fc.Write(rdb[i:min(i+1000, len(rdb))]); err != nil {
				return err, 0
			}
		}
		if err := fc.End(actx); err != nil {
			return err, 0
		}
		n, err := a.Do(ctx, "DBSIZE")
		if err != nil {
			t.Fatal(err)
		}
		return nil, n.Int
	}
	// The acknowledgement comes back after the end of the stream, every
	// time.
	for range 20 {
		if err, n := feed(t, good.Bytes()); err != nil || n != 2000 {
			t.Fatalf("fed a good RDB: %v, %d keys; want 2000", err, n)
		}
	}
	bad := map[string][]byte{
		"garbage":      []byte("this is not an RDB file at all\n"),
		"truncated":    good.Bytes()[:good.Len()/2],
		// Cut in a value whose length says more is to come than the end
		// mark and anything after it.
		"cut in a value": good.Bytes()[:bytes.Index(good.Bytes(), []byte(strings.Repeat("x", 100)))+50],
		"flipped byte": flipByte(good.Bytes(), good.Len()/3),
	}
	for name, b := range bad {
		t.Run(name, func(t *testing.T) {
			if err, n := feed(t, b); err == nil || errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("fed a bad RDB: %v, %d keys loaded; want it refused, at once", err, n)
			}
		})
	}
	// A connection that does not log in is not fed.
	f, err := ListenFeed("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	actx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	accepted := make(chan error, 1)
	go func() { _, err := f.Accept(actx); accepted <- err }()
	intruder := NewAdmin(f.Host(), f.Port(), "")
	defer intruder.Close()
	if r, err := intruder.Do(ctx, "PSYNC", "?", "-1"); err == nil {
		t.Fatalf("PSYNC without AUTH = %+v; want refused", r)
	}
	if err := <-accepted; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Accept after an intruder = %v; want it still waiting until its deadline", err)
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func flipByte(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0xff
	return c
}
