package backup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

func target(t *testing.T, s3 *testenv.S3, mod func(*Config)) *Target {
	t.Helper()
	cfg := Config{Endpoint: s3.Endpoint(), Bucket: s3.Bucket, Region: "us-east-1", Prefix: "redis/vm1",
		AccessKey: s3.Access, SecretKey: s3.Secret, PathStyle: true, PartSize: 5 << 20}
	if mod != nil {
		mod(&cfg)
	}
	tg, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

func TestKeys(t *testing.T) {
	tg, err := New(Config{Endpoint: "http://127.0.0.1:1", Bucket: "b", Prefix: "p/q", AccessKey: "a", SecretKey: "s"})
	if err != nil {
		t.Fatal(err)
	}
	when := time.Date(2026, 3, 4, 5, 6, 7, 890e6, time.UTC)
	k, err := tg.Key("inst-1", when)
	if err != nil || k != "p/q/inst-1/20260304T050607.890Z.rdb" {
		t.Fatalf("Key = %q, %v", k, err)
	}
	id, got, err := tg.ParseKey(k)
	if err != nil || id != "inst-1" || !got.Equal(when) {
		t.Fatalf("ParseKey = %q %v %v", id, got, err)
	}
	if ManifestKey(k) != "p/q/inst-1/20260304T050607.890Z.json" {
		t.Fatal(ManifestKey(k))
	}
	for _, id := range []string{"", "../x", "a/b", "-a", ".hidden", strings.Repeat("a", 65), "a b"} {
		if _, err := tg.Key(id, when); err == nil {
			t.Errorf("Key(%q) accepted", id)
		}
	}
	for _, k := range []string{"other/inst-1/20260304T050607.890Z.rdb", "p/q/../inst/20260304T050607.890Z.rdb",
		"p/q/inst-1/x/20260304T050607.890Z.rdb", "p/q/inst-1/20260304T050607.890Z.json", "p/q/inst-1/yesterday.rdb", "p/q/inst-1"} {
		if _, _, err := tg.ParseKey(k); err == nil {
			t.Errorf("ParseKey(%q) accepted", k)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{
		{Bucket: "b", AccessKey: "a", SecretKey: "s"},
		{Endpoint: "ftp://h", Bucket: "b", AccessKey: "a", SecretKey: "s"},
		{Endpoint: "h", AccessKey: "a", SecretKey: "s"},
		{Endpoint: "h", Bucket: "b"},
		{Endpoint: "h", Bucket: "b", AccessKey: "a", SecretKey: "s", Prefix: "/x"},
		{Endpoint: "h", Bucket: "b", AccessKey: "a", SecretKey: "s", PartSize: 1 << 20},
		{Endpoint: "http://h/path", Bucket: "b", AccessKey: "a", SecretKey: "s"},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}

func TestReadCredentials(t *testing.T) {
	p := filepath.Join(t.TempDir(), "creds")
	os.WriteFile(p, []byte("# s3\nexport AWS_ACCESS_KEY_ID=\"AK\"\nAWS_SECRET_ACCESS_KEY='S=K'\n\n"), 0o600)
	a, s, err := ReadCredentials(p)
	if err != nil || a != "AK" || s != "S=K" {
		t.Fatalf("%q %q %v", a, s, err)
	}
	os.WriteFile(p, []byte("AWS_ACCESS_KEY_ID=AK\n"), 0o600)
	if _, _, err := ReadCredentials(p); err == nil {
		t.Fatal("a file without a secret accepted")
	}
}

// An RDB's way through the bucket: streamed in parts, listed, read back
// with its metadata and manifest, removed.
func TestPutListOpenRemove(t *testing.T) {
	s3 := testenv.StartS3(t)
	tg := target(t, s3, nil)
	ctx := t.Context()
	if err := tg.Check(ctx); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("REDIS0011 0123456789abcdef"), 500_000) // ~13 MB: 3 parts
	sum := sha256.Sum256(data)
	var keys []string
	base := time.Now().UTC().Truncate(time.Millisecond)
	for i := range 3 {
		when := base.Add(time.Duration(i) * time.Second)
		key, err := tg.Key("i1", when)
		if err != nil {
			t.Fatal(err)
		}
		meta := Meta{Instance: "i1", Time: when, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(data)), RedisVersion: "7.0.15", Agent: "vm1", MemoryMB: 64, Persistence: "aof"}
		if err := tg.Put(ctx, key, bytes.NewReader(data), int64(len(data)), meta); err != nil {
			t.Fatal(err)
		}
		if err := tg.PutManifest(ctx, key, Manifest{Instance: "i1", Time: when, Agent: "vm1", MemoryMB: 64, Persistence: "aof",
			Bindings: []Binding{{ID: "b1", Username: "b1", Password: "p"}}}); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, key)
	}
	list, err := tg.List(ctx, "i1")
	if err != nil || len(list) != 3 {
		t.Fatalf("List = %v, %v", list, err)
	}
	for i, o := range list {
		if o.Key != keys[i] || o.Size != int64(len(data)) {
			t.Fatalf("List[%d] = %+v, want %s", i, o, keys[i])
		}
	}
	r, obj, err := tg.Open(ctx, keys[1])
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	r.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes, %v", len(got), err)
	}
	m := obj.Meta
	if m.Instance != "i1" || m.SHA256 != hex.EncodeToString(sum[:]) || m.Size != int64(len(data)) || m.RedisVersion != "7.0.15" ||
		m.Agent != "vm1" || m.MemoryMB != 64 || m.Persistence != "aof" || !m.Time.Equal(base.Add(time.Second)) {
		t.Fatalf("meta = %+v", m)
	}
	man, err := tg.ReadManifest(ctx, keys[1])
	if err != nil || len(man.Bindings) != 1 || man.Bindings[0].Password != "p" {
		t.Fatalf("manifest = %+v, %v", man, err)
	}
	ids, err := tg.Instances(ctx)
	if err != nil || len(ids) != 1 || ids[0] != "i1" {
		t.Fatalf("Instances = %v, %v", ids, err)
	}
	if err := tg.Remove(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	if list, _ := tg.List(ctx, "i1"); len(list) != 2 {
		t.Fatalf("after a remove: %v", list)
	}
	if _, err := tg.ReadManifest(ctx, keys[0]); err == nil {
		t.Fatal("the removed backup's manifest is still there")
	}
}

// slowReader gives its bytes in small pieces, waiting between them, and
// calls at once after the first part has gone.
type slowReader struct {
	r     io.Reader
	n     int
	after int
	at    func()
}

func (s *slowReader) Read(p []byte) (int, error) {
	if s.n >= s.after && s.at != nil {
		s.at()
		s.at = nil
	}
	n, err := s.r.Read(p[:min(len(p), 1<<20)])
	s.n += n
	return n, err
}

// The server going away in the middle of an upload leaves no object; the
// next upload, once it is back, succeeds; the failures are classified.
func TestServerStoppedMidUpload(t *testing.T) {
	s3 := testenv.StartS3(t)
	tg := target(t, s3, nil)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	data := bytes.Repeat([]byte{7}, 12<<20)
	key, _ := tg.Key("i2", time.Now())
	err := tg.Put(ctx, key, &slowReader{r: bytes.NewReader(data), after: 6 << 20, at: s3.Stop}, int64(len(data)), Meta{Instance: "i2"})
	if err == nil {
		t.Fatal("an upload to a stopped server succeeded")
	}
	if r := Reason(err); r != ReasonUnreachable {
		t.Errorf("Reason(%v) = %s, want unreachable", err, r)
	}
	s3.Start()
	if list, err := tg.List(ctx, "i2"); err != nil || len(list) != 0 {
		t.Fatalf("after the cut upload: %v, %v", list, err)
	}
	if err := tg.RemoveIncomplete(ctx, "i2"); err != nil {
		t.Logf("remove incomplete uploads: %v", err)
	}
	key2, _ := tg.Key("i2", time.Now().Add(time.Millisecond))
	if err := tg.Put(ctx, key2, bytes.NewReader(data), int64(len(data)), Meta{Instance: "i2"}); err != nil {
		t.Fatal(err)
	}
	if list, err := tg.List(ctx, "i2"); err != nil || len(list) != 1 || list[0].Key != key2 {
		t.Fatalf("after the next upload: %v, %v", list, err)
	}
}

func TestReasons(t *testing.T) {
	s3 := testenv.StartS3(t)
	ctx := t.Context()
	data := []byte("x")
	put := func(tg *Target) error {
		key, _ := tg.Key("i3", time.Now())
		return tg.Put(ctx, key, bytes.NewReader(data), 1, Meta{})
	}
	if r := Reason(put(target(t, s3, func(c *Config) { c.SecretKey = "wrong-secret-key-xx" }))); r != ReasonDenied {
		t.Errorf("wrong secret: %s", r)
	}
	if r := Reason(put(target(t, s3, func(c *Config) { c.Bucket = "nosuchbucket" }))); r != ReasonNoBucket {
		t.Errorf("no bucket: %s", r)
	}
	if r := Reason(put(target(t, s3, func(c *Config) { c.Endpoint = "http://127.0.0.1:1" }))); r != ReasonUnreachable {
		t.Errorf("unreachable: %s", r)
	}
	if r := Reason(context.DeadlineExceeded); r != ReasonTimeout {
		t.Errorf("deadline: %s", r)
	}
	if r := Reason(errors.New("x")); r != ReasonOther {
		t.Errorf("other: %s", r)
	}
}
