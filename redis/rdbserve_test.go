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

// A loader (RenderLoader) made a replica of a Feed loads the RDB fed to
// it as it arrives and acknowledges it; one it cannot load it refuses, by
// closing the link or exiting, and the Feed says so.
func TestFeedLoader(t *testing.T) {
	ctx := context.Background()
	admin := NewPassword()
	port, srcDir := startConfDir(t, Conf{Persistence: apitype.PersistenceNone}, []User{{Name: AdminUser, PasswordHash: HashPassword(admin), Admin: true}})
	src := NewAdmin("127.0.0.1", port, admin)
	defer src.Close()
	waitUp(t, src)
	for i := range 2000 {
		if _, err := src.Do(ctx, "SET", "k"+strconv.Itoa(i), strings.Repeat("x", 100)); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.Save(ctx); err != nil {
		t.Fatal(err)
	}
	var good bytes.Buffer
	if b, err := os.ReadFile(filepath.Join(srcDir, "dump.rdb")); err != nil {
		t.Fatal(err)
	} else {
		good.Write(b)
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
		"garbage":   []byte("this is not an RDB file at all\n"),
		"truncated": good.Bytes()[:good.Len()/2],
		// Cut in a value whose length says more is to come than the end
		// mark and anything after it.
		"cut in a value": good.Bytes()[:bytes.Index(good.Bytes(), []byte(strings.Repeat("x", 100)))+50],
		"flipped byte":   flipByte(good.Bytes(), good.Len()/3),
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
