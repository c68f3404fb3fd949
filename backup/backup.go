// Package backup is the agent's backup target: a bucket of S3-compatible
// object storage (AWS S3, MinIO, Ceph RGW, the Versity gateway, ...)
// reached with minio-go. It knows the key layout and the metadata of a
// backup and nothing of instances or Redis: the agent streams an RDB in,
// lists, reads back and prunes.
//
// Key layout, under the configured prefix (none: the bucket's root):
//
//	<prefix>/<instance id>/<time>.rdb    the RDB (a multipart upload: it
//	                                     exists whole or not at all)
//	<prefix>/<instance id>/<time>.json   its manifest (Manifest), written
//	                                     after the RDB: what it takes to
//	                                     recreate the instance elsewhere
//
// <time> is the backup's start in UTC, 20060102T150405.000Z: keys of one
// instance sort by time. An instance id becomes part of a key only once
// volumes.ValidateID accepts it (letters, digits, '-', '_', '.'; no '/',
// no "..").
package backup

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/redis-agent/redis-agent/volumes"
)

// Config says where backups go.
type Config struct {
	// Endpoint is the S3 server: host[:port] or an http(s):// URL. A bare
	// host is reached over HTTPS.
	Endpoint string
	// Bucket must exist; the agent creates none.
	Bucket string
	// Region is the bucket's region ("" lets the client ask the server).
	Region string
	// Prefix is put before every key ("" for none); no leading or
	// trailing '/'.
	Prefix string
	// AccessKey and SecretKey sign the requests.
	AccessKey, SecretKey string
	// PathStyle addresses the bucket as endpoint/bucket rather than as
	// bucket.endpoint (what MinIO, Ceph and most gateways need).
	PathStyle bool
	// CAFile is a PEM bundle that verifies the endpoint's certificate
	// instead of the system's roots.
	CAFile string
	// PartSize is each part of a multipart upload (and so what an upload
	// holds in memory): 0 means DefaultPartSize.
	PartSize int64
}

// DefaultPartSize is an upload's part size when Config.PartSize is 0: an
// upload holds one part in memory. S3 allows 10000 parts, so up to 160 GiB.
const DefaultPartSize = 16 << 20

// Enabled reports whether c names a target at all.
func (c Config) Enabled() bool { return c.Endpoint != "" || c.Bucket != "" }

// Validate checks c.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Endpoint == "" {
		bad("backup endpoint: required with a backup bucket")
	} else if _, _, err := parseEndpoint(c.Endpoint); err != nil {
		bad("backup endpoint %q: %v", c.Endpoint, err)
	}
	if c.Bucket == "" {
		bad("backup bucket: required with a backup endpoint")
	}
	if c.Prefix != "" && (strings.HasPrefix(c.Prefix, "/") || strings.HasSuffix(c.Prefix, "/") || strings.Contains(c.Prefix, "//")) {
		bad("backup prefix %q: no leading, trailing or double '/'", c.Prefix)
	}
	if c.AccessKey == "" || c.SecretKey == "" {
		bad("backup credentials: want an access key and a secret key (--backup-credentials-file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
	}
	if c.PartSize != 0 && c.PartSize < 5<<20 {
		bad("backup part size %d: S3 wants at least 5 MiB", c.PartSize)
	}
	return errors.Join(errs...)
}

// parseEndpoint splits an endpoint into host[:port] and whether it is
// reached over TLS.
func parseEndpoint(e string) (host string, secure bool, err error) {
	if !strings.Contains(e, "://") {
		return e, true, nil
	}
	u, err := url.Parse(e)
	if err != nil {
		return "", false, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", false, fmt.Errorf("scheme %q: want http or https", u.Scheme)
	}
	if u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return "", false, errors.New("want scheme://host[:port] and nothing after")
	}
	return u.Host, u.Scheme == "https", nil
}

// ReadCredentials reads an access key and a secret key from a file of
// KEY=VALUE lines (a systemd EnvironmentFile works):
// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Blank lines and lines
// starting with '#' are skipped; values may be quoted.
func ReadCredentials(path string) (access, secret string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", "", fmt.Errorf("backup credentials: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return "", "", fmt.Errorf("backup credentials %s: a line without '=': want KEY=VALUE", path)
		}
		k, v = strings.TrimSpace(strings.TrimPrefix(k, "export ")), strings.TrimSpace(v)
		if uq, err := strconv.Unquote(v); err == nil {
			v = uq
		} else if len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'' {
			v = v[1 : len(v)-1]
		}
		switch k {
		case "AWS_ACCESS_KEY_ID":
			access = v
		case "AWS_SECRET_ACCESS_KEY":
			secret = v
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("backup credentials %s: %w", path, err)
	}
	if access == "" || secret == "" {
		return "", "", fmt.Errorf("backup credentials %s: want AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", path)
	}
	return access, secret, nil
}

// Target is a configured bucket. Safe for concurrent use.
type Target struct {
	cfg Config
	c   *minio.Client
}

// New returns the Target of cfg; it makes no request.
func New(cfg Config) (*Target, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = DefaultPartSize
	}
	host, secure, _ := parseEndpoint(cfg.Endpoint)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = 2 * time.Minute
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("backup CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("backup CA %s: no PEM certificate in it", cfg.CAFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	lookup := minio.BucketLookupAuto
	if cfg.PathStyle {
		lookup = minio.BucketLookupPath
	}
	c, err := minio.New(host, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""),
		Secure:       secure,
		Transport:    tr,
		Region:       cfg.Region,
		BucketLookup: lookup,
	})
	if err != nil {
		return nil, fmt.Errorf("backup target: %w", err)
	}
	return &Target{cfg: cfg, c: c}, nil
}

// Bucket is the target's bucket, and Where the bucket and prefix as a
// person reads them (s3://bucket/prefix).
func (t *Target) Bucket() string { return t.cfg.Bucket }

func (t *Target) Where() string {
	if t.cfg.Prefix == "" {
		return "s3://" + t.cfg.Bucket
	}
	return "s3://" + t.cfg.Bucket + "/" + t.cfg.Prefix
}

// Check asks whether the bucket exists and can be reached.
func (t *Target) Check(ctx context.Context) error {
	ok, err := t.c.BucketExists(ctx, t.cfg.Bucket)
	if err != nil {
		return fmt.Errorf("backup bucket %s: %w", t.cfg.Bucket, err)
	}
	if !ok {
		return fmt.Errorf("backup bucket %s does not exist", t.cfg.Bucket)
	}
	return nil
}

// TimeFormat is <time> in a key.
const TimeFormat = "20060102T150405.000Z"

// instanceDir is the key prefix of id's backups, ending in '/'.
func (t *Target) instanceDir(id string) string {
	if t.cfg.Prefix == "" {
		return id + "/"
	}
	return t.cfg.Prefix + "/" + id + "/"
}

// Key is the key of id's backup taken at when. id must be a valid
// instance id.
func (t *Target) Key(id string, when time.Time) (string, error) {
	if err := volumes.ValidateID(id); err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	return t.instanceDir(id) + when.UTC().Format(TimeFormat) + ".rdb", nil
}

// ParseKey checks that key is a backup's key under this target's prefix
// and returns its instance id and time.
func (t *Target) ParseKey(key string) (id string, when time.Time, err error) {
	rest := key
	if t.cfg.Prefix != "" {
		var ok bool
		if rest, ok = strings.CutPrefix(key, t.cfg.Prefix+"/"); !ok {
			return "", time.Time{}, fmt.Errorf("backup key %q is not under the prefix %s/", key, t.cfg.Prefix)
		}
	}
	id, name, ok := strings.Cut(rest, "/")
	if !ok || strings.Contains(name, "/") {
		return "", time.Time{}, fmt.Errorf("backup key %q: want [prefix/]<instance id>/<time>.rdb", key)
	}
	if err := volumes.ValidateID(id); err != nil {
		return "", time.Time{}, fmt.Errorf("backup key %q: instance id: %w", key, err)
	}
	stamp, ok := strings.CutSuffix(name, ".rdb")
	if !ok {
		return "", time.Time{}, fmt.Errorf("backup key %q: want a name ending in .rdb", key)
	}
	when, err = time.Parse(TimeFormat, stamp)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("backup key %q: time %q: want %s", key, stamp, TimeFormat)
	}
	return id, when, nil
}

// ManifestKey is the key of the manifest of the backup at key.
func ManifestKey(key string) string { return strings.TrimSuffix(key, ".rdb") + ".json" }

// Meta is what an RDB object carries in its user metadata (x-amz-meta-*).
type Meta struct {
	Instance     string
	Time         time.Time
	SHA256       string
	Size         int64
	RedisVersion string
	Agent        string
	MemoryMB     int
	Persistence  string
}

// The user metadata's names, as S3 gives them back (canonical MIME).
const (
	metaInstance    = "Instance"
	metaTime        = "Time"
	metaSHA256      = "Sha256"
	metaSize        = "Size"
	metaVersion     = "Redis-Version"
	metaAgent       = "Agent"
	metaMemory      = "Memory-Mb"
	metaPersistence = "Persistence"
)

func (m Meta) header() map[string]string {
	return map[string]string{
		metaInstance:    m.Instance,
		metaTime:        m.Time.UTC().Format(time.RFC3339Nano),
		metaSHA256:      m.SHA256,
		metaSize:        strconv.FormatInt(m.Size, 10),
		metaVersion:     m.RedisVersion,
		metaAgent:       m.Agent,
		metaMemory:      strconv.Itoa(m.MemoryMB),
		metaPersistence: m.Persistence,
	}
}

func metaOf(h map[string]string) Meta {
	get := func(k string) string {
		if v, ok := h[k]; ok {
			return v
		}
		for hk, v := range h { // servers differ in the case they give back
			if strings.EqualFold(hk, k) {
				return v
			}
		}
		return ""
	}
	m := Meta{Instance: get(metaInstance), SHA256: get(metaSHA256), RedisVersion: get(metaVersion), Agent: get(metaAgent), Persistence: get(metaPersistence)}
	m.Time, _ = time.Parse(time.RFC3339Nano, get(metaTime))
	m.Size, _ = strconv.ParseInt(get(metaSize), 10, 64)
	m.MemoryMB, _ = strconv.Atoi(get(metaMemory))
	return m
}

// Object is one backup in the bucket.
type Object struct {
	Key string
	// Time is the backup's, from its key.
	Time time.Time
	// Size is the object's size as the server lists it.
	Size int64
	// Meta is filled by Stat and Open, not by List.
	Meta *Meta
}

// readOnly hides an *os.File's ReaderAt and Seeker: minio-go then
// uploads the parts one after the other through one buffer of PartSize,
// instead of NumThreads buffers read in parallel.
type readOnly struct{ r io.Reader }

func (r readOnly) Read(p []byte) (int, error) { return r.r.Read(p) }

// Put uploads size bytes of r as the RDB at key with meta, in parts of
// Config.PartSize (one part in memory at a time). The object exists only
// once every part is in: a failure leaves no object at key (a multipart
// upload the server could not be told to abort is left to
// RemoveIncomplete).
func (t *Target) Put(ctx context.Context, key string, r io.Reader, size int64, meta Meta) error {
	_, err := t.c.PutObject(ctx, t.cfg.Bucket, key, readOnly{r}, size, minio.PutObjectOptions{
		UserMetadata: meta.header(),
		ContentType:  "application/octet-stream",
		PartSize:     uint64(t.cfg.PartSize),
		NumThreads:   1,
	})
	if err != nil {
		return fmt.Errorf("upload %s: %w", key, err)
	}
	return nil
}

// Manifest is what it takes to recreate an instance from its backup on
// another agent, written beside each RDB. It holds the bindings'
// passwords: the bucket must be guarded like the agents' state (it holds
// the tenants' data anyway).
type Manifest struct {
	Instance     string          `json:"instance"`
	Time         time.Time       `json:"time"`
	Agent        string          `json:"agent"`
	SHA256       string          `json:"sha256"`
	Size         int64           `json:"size"`
	RedisVersion string          `json:"redis_version,omitempty"`
	MemoryMB     int             `json:"memory_mb"`
	Persistence  string          `json:"persistence"`
	Metadata     json.RawMessage `json:"metadata,omitempty"`
	Bindings     []Binding       `json:"bindings,omitempty"`
	// MaxmemoryPolicy, MaxmemoryClients and TLS are the instance's
	// settings; a manifest written before them has none (the defaults).
	MaxmemoryPolicy  string `json:"maxmemory_policy,omitempty"`
	MaxmemoryClients string `json:"maxmemory_clients,omitempty"`
	TLS              string `json:"tls,omitempty"`
}

// Binding is one binding of a Manifest.
type Binding struct {
	ID       string `json:"id"`
	Username string `json:"username"`
	Password string `json:"password"`
}

// maxManifest bounds a manifest read back.
const maxManifest = 1 << 20

// PutManifest writes the manifest of the backup at key.
func (t *Target) PutManifest(ctx context.Context, key string, m Manifest) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	mk := ManifestKey(key)
	if _, err := t.c.PutObject(ctx, t.cfg.Bucket, mk, strings.NewReader(string(b)), int64(len(b)),
		minio.PutObjectOptions{ContentType: "application/json", DisableMultipart: true}); err != nil {
		return fmt.Errorf("upload %s: %w", mk, err)
	}
	return nil
}

// ReadManifest reads the manifest of the backup at key.
func (t *Target) ReadManifest(ctx context.Context, key string) (Manifest, error) {
	mk := ManifestKey(key)
	o, err := t.c.GetObject(ctx, t.cfg.Bucket, mk, minio.GetObjectOptions{})
	if err != nil {
		return Manifest{}, fmt.Errorf("read %s: %w", mk, err)
	}
	defer o.Close()
	b, err := io.ReadAll(io.LimitReader(o, maxManifest+1))
	if err != nil {
		return Manifest{}, fmt.Errorf("read %s: %w", mk, err)
	}
	if len(b) > maxManifest {
		return Manifest{}, fmt.Errorf("read %s: larger than %d bytes", mk, maxManifest)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("read %s: %w", mk, err)
	}
	return m, nil
}

// List returns id's backups, oldest first: the RDB objects whose keys
// parse (a key of another form is no backup of this agent's, and is left
// alone).
func (t *Target) List(ctx context.Context, id string) ([]Object, error) {
	if err := volumes.ValidateID(id); err != nil {
		return nil, fmt.Errorf("instance id: %w", err)
	}
	var out []Object
	for o := range t.c.ListObjects(ctx, t.cfg.Bucket, minio.ListObjectsOptions{Prefix: t.instanceDir(id), Recursive: true}) {
		if o.Err != nil {
			return nil, fmt.Errorf("list %s: %w", t.instanceDir(id), o.Err)
		}
		oid, when, err := t.ParseKey(o.Key)
		if err != nil || oid != id {
			continue
		}
		out = append(out, Object{Key: o.Key, Time: when, Size: o.Size})
	}
	slices.SortFunc(out, func(a, b Object) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

// Instances lists the instance ids that have something under the prefix.
func (t *Target) Instances(ctx context.Context) ([]string, error) {
	prefix := ""
	if t.cfg.Prefix != "" {
		prefix = t.cfg.Prefix + "/"
	}
	var ids []string
	for o := range t.c.ListObjects(ctx, t.cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix}) {
		if o.Err != nil {
			return nil, fmt.Errorf("list %s: %w", t.Where(), o.Err)
		}
		id, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, prefix), "/")
		if !ok || volumes.ValidateID(id) != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// Stat reads the metadata of the backup at key.
func (t *Target) Stat(ctx context.Context, key string) (Object, error) {
	id, when, err := t.ParseKey(key)
	if err != nil {
		return Object{}, err
	}
	info, err := t.c.StatObject(ctx, t.cfg.Bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return Object{}, fmt.Errorf("backup %s: %w", key, err)
	}
	m := metaOf(info.UserMetadata)
	if m.Instance != "" && m.Instance != id {
		return Object{}, fmt.Errorf("backup %s says it is of instance %q", key, m.Instance)
	}
	return Object{Key: key, Time: when, Size: info.Size, Meta: &m}, nil
}

// Open returns the RDB at key for reading, with its metadata.
func (t *Target) Open(ctx context.Context, key string) (io.ReadCloser, Object, error) {
	obj, err := t.Stat(ctx, key)
	if err != nil {
		return nil, Object{}, err
	}
	r, err := t.c.GetObject(ctx, t.cfg.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, Object{}, fmt.Errorf("backup %s: %w", key, err)
	}
	return r, obj, nil
}

// Remove deletes the backups at keys, their manifests with them.
func (t *Target) Remove(ctx context.Context, keys ...string) error {
	var errs []error
	for _, k := range keys {
		if _, _, err := t.ParseKey(k); err != nil {
			errs = append(errs, err)
			continue
		}
		// The manifest first: an RDB without one still restores in place.
		for _, key := range []string{ManifestKey(k), k} {
			if err := t.c.RemoveObject(ctx, t.cfg.Bucket, key, minio.RemoveObjectOptions{}); err != nil && !IsNotFound(err) {
				errs = append(errs, fmt.Errorf("remove %s: %w", key, err))
			}
		}
	}
	return errors.Join(errs...)
}

// RemoveIncomplete aborts the multipart uploads left under id's prefix (an
// upload cut short by an agent's crash or by the server going away).
// Servers that do not list uploads make it a no-op.
func (t *Target) RemoveIncomplete(ctx context.Context, id string) error {
	if err := volumes.ValidateID(id); err != nil {
		return err
	}
	var errs []error
	for u := range t.c.ListIncompleteUploads(ctx, t.cfg.Bucket, t.instanceDir(id), true) {
		if u.Err != nil {
			if code := minio.ToErrorResponse(u.Err).Code; code == "NotImplemented" {
				return nil
			}
			return u.Err
		}
		if err := t.c.RemoveIncompleteUpload(ctx, t.cfg.Bucket, u.Key); err != nil && !IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// IsNotFound reports whether err says the object (or the key) does not
// exist.
func IsNotFound(err error) bool {
	switch minio.ToErrorResponse(errors.Unwrap(err)).Code {
	case "NoSuchKey", "NotFound", "NoSuchUpload":
		return true
	}
	switch minio.ToErrorResponse(err).Code {
	case "NoSuchKey", "NotFound", "NoSuchUpload":
		return true
	}
	return false
}

// Failure reasons, as the failures metric counts them.
const (
	ReasonUnreachable = "unreachable" // no connection, or it broke
	ReasonDenied      = "denied"      // the credentials are refused, or lack the right
	ReasonFull        = "full"        // the server or the bucket has no room (quota)
	ReasonNoBucket    = "no_bucket"   // the bucket does not exist
	ReasonTimeout     = "timeout"     // it took too long
	ReasonSnapshot    = "snapshot"    // the instance could not make an RDB (BGSAVE)
	ReasonStorage     = "storage"     // any other error the server answered
	ReasonOther       = "other"       // none of those
)

// Reasons lists the failure reasons.
var Reasons = []string{ReasonUnreachable, ReasonDenied, ReasonFull, ReasonNoBucket, ReasonTimeout, ReasonSnapshot, ReasonStorage, ReasonOther}

// Reason classifies an error of the target.
func Reason(err error) string {
	if err == nil {
		return ""
	}
	var er minio.ErrorResponse
	for e := err; e != nil; e = errors.Unwrap(e) {
		if r, ok := e.(minio.ErrorResponse); ok {
			er = r
			break
		}
	}
	switch er.Code {
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken":
		return ReasonDenied
	case "NoSuchBucket":
		return ReasonNoBucket
	case "QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "EntityTooLarge", "InsufficientStorage", "StorageFull":
		return ReasonFull
	case "RequestTimeout", "RequestTimeTooSkewed":
		return ReasonTimeout
	}
	if er.StatusCode == http.StatusForbidden {
		return ReasonDenied
	}
	if er.StatusCode == http.StatusInsufficientStorage {
		return ReasonFull
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return ReasonTimeout
	}
	if errors.Is(err, syscall.ENOSPC) {
		return ReasonFull
	}
	var ne net.Error
	var oe *net.OpError
	if errors.As(err, &oe) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.EPIPE) {
		return ReasonUnreachable
	}
	if errors.As(err, &ne) && ne.Timeout() {
		return ReasonTimeout
	}
	if er.Code != "" || er.StatusCode != 0 {
		return ReasonStorage
	}
	if strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "EOF") {
		return ReasonUnreachable
	}
	return ReasonOther
}
