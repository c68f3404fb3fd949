package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
)

// fakeService answers every call with the error its instance id names, so
// the fuzzer reaches every branch of the error mapping. It notes when it
// returned an error that wraps no sentinel: the one case where a 5xx is
// right.
type fakeService struct {
	internal atomic.Bool
}

var _ Service = (*fakeService)(nil)

func (f *fakeService) errFor(id string) error {
	switch {
	case strings.HasPrefix(id, "nf"):
		return agent.ErrNotFound
	case strings.HasPrefix(id, "cf"):
		return agent.ErrConflict
	case strings.HasPrefix(id, "in"):
		return agent.ErrInvalid
	case strings.HasPrefix(id, "cap"):
		return agent.ErrCapacity
	case strings.HasPrefix(id, "st"):
		return agent.ErrStorage
	case strings.HasPrefix(id, "boom"):
		f.internal.Store(true)
		return errors.New("internal")
	}
	return nil
}

func (f *fakeService) Provision(_ context.Context, id string, s agent.Spec) (agent.Instance, bool, error) {
	return agent.Instance{ID: id, MemoryMB: s.MemoryMB, Persistence: s.Persistence}, true, f.errFor(id)
}
func (f *fakeService) Deprovision(_ context.Context, id string) error { return f.errFor(id) }
func (f *fakeService) Get(_ context.Context, id string) (agent.Instance, error) {
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) List(context.Context) ([]agent.Instance, error) { return nil, nil }
func (f *fakeService) Bind(_ context.Context, id, _, _ string) (agent.Credentials, bool, error) {
	return agent.Credentials{}, true, f.errFor(id)
}
func (f *fakeService) Unbind(_ context.Context, id, _ string) error { return f.errFor(id) }
func (f *fakeService) Binding(_ context.Context, id, _ string) (agent.Credentials, error) {
	return agent.Credentials{}, f.errFor(id)
}
func (f *fakeService) SetMetadata(_ context.Context, id string, _ json.RawMessage) (agent.Instance, error) {
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) SetIO(_ context.Context, id string, _ apitype.IOSetting) (agent.Instance, error) {
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) Restart(_ context.Context, id string) error { return f.errFor(id) }
func (f *fakeService) Capacity(context.Context) (agent.Capacity, error) {
	return agent.Capacity{}, nil
}
func (f *fakeService) Orphans(context.Context) ([]agent.Orphan, error) { return nil, nil }
func (f *fakeService) Log(_ context.Context, id string, n int) ([]string, error) {
	if n < 1 {
		return nil, agent.ErrInvalid
	}
	return []string{"x"}, f.errFor(id)
}

func (f *fakeService) Resize(_ context.Context, id string, mb int) (agent.Instance, error) {
	if mb < 1 {
		return agent.Instance{}, agent.ErrInvalid
	}
	return agent.Instance{ID: id, MemoryMB: mb}, f.errFor(id)
}
func (f *fakeService) Configure(_ context.Context, id string, set apitype.Settings) (agent.Instance, error) {
	if err := agent.CheckSettings(set); err != nil {
		return agent.Instance{}, err
	}
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) CA(context.Context) ([]byte, error) {
	return []byte("-----BEGIN CERTIFICATE-----\n"), nil
}
func (f *fakeService) SnapshotStream(_ context.Context, id string) (*agent.SnapshotStream, error) {
	if err := f.errFor(id); err != nil {
		return nil, err
	}
	return nil, agent.ErrConflict
}
func (f *fakeService) Snapshot(_ context.Context, id string) (*agent.Snapshot, error) {
	if err := f.errFor(id); err != nil {
		return nil, err
	}
	file, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	return &agent.Snapshot{File: file, SHA256: strings.Repeat("0", 64)}, nil
}
func (f *fakeService) Restore(_ context.Context, id string, rdb io.Reader, _ int64, _ string) (agent.Instance, error) {
	if _, err := io.Copy(io.Discard, rdb); err != nil {
		return agent.Instance{}, fmt.Errorf("read: %w", agent.ErrInvalid)
	}
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) StartRollout(context.Context, []string) (agent.Rollout, error) {
	return agent.Rollout{State: agent.RolloutRunning}, nil
}
func (f *fakeService) RolloutStatus(context.Context) (agent.Rollout, error) {
	return agent.Rollout{State: agent.RolloutIdle}, nil
}
func (f *fakeService) Backup(_ context.Context, id string) (apitype.Backup, error) {
	return apitype.Backup{Instance: id}, f.errFor(id)
}
func (f *fakeService) Backups(_ context.Context, id string, _ bool) ([]apitype.Backup, error) {
	return nil, f.errFor(id)
}
func (f *fakeService) LatestBackups(context.Context, string) ([]apitype.Backup, error) {
	return nil, nil
}
func (f *fakeService) RestoreBackup(_ context.Context, id, key string) (agent.Instance, error) {
	if key == "" {
		return agent.Instance{}, agent.ErrInvalid
	}
	return agent.Instance{ID: id}, f.errFor(id)
}
func (f *fakeService) SetBackupPolicy(_ context.Context, id string, _ apitype.BackupPolicy) (agent.Instance, error) {
	return agent.Instance{ID: id}, f.errFor(id)
}

// FuzzHandler throws arbitrary requests at the handler. Seeds beyond these
// live in testdata/fuzz/FuzzHandler. Whatever the request, the handler must
// not panic, must answer every error with a JSON Error, and must not answer
// 5xx unless the service failed on its own (507, the agent being full, is
// not a failure).
func FuzzHandler(f *testing.F) {
	seeds := []struct{ method, path, ctype, body string }{
		{"PUT", "/v1/instances/i1", "application/json", `{"memory_mb":64,"persistence":"aof"}`},
		{"PUT", "/v1/instances/boom", "application/json", `{}`},
		{"PUT", "/v1/instances/cap1", "", ``},
		{"GET", "/v1/instances/nf1", "", ``},
		{"DELETE", "/v1/instances/nf1/bindings/b", "", ``},
		{"PUT", "/v1/instances/i1/bindings/b", "application/json; charset=utf-8", `{}`},
		{"POST", "/v1/instances/cf/restart", "", ``},
		{"PUT", "/v1/instances/i1", "text/plain", `{"memory_mb":1}`},
		{"GET", "/v1/instances/%2e%2e", "", ``},
		{"PUT", "/v1/instances/i1", "application/json", `{"memory_mb":1e400}`},
		{"GET", "/v1/instances/i1/log?lines=-1", "", ``},
		{"PATCH", "/v1/capacity", "", ``},
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, s.ctype, s.body)
	}
	f.Fuzz(func(t *testing.T, method, path, ctype, body string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \r\n\t") || method == "" || strings.ContainsAny(method, " \r\n\t/") {
			return // not a request line a server would parse
		}
		req, err := http.NewRequest(method, "http://agent"+path, strings.NewReader(body))
		if err != nil {
			return
		}
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		svc := &fakeService{}
		w := httptest.NewRecorder()
		New(Options{Service: svc}).ServeHTTP(w, req)
		if w.Code >= 500 && w.Code != http.StatusInsufficientStorage && w.Code != http.StatusBadGateway && !svc.internal.Load() {
			t.Fatalf("%s %s (%q, %q) = %d %s", method, path, ctype, body, w.Code, w.Body.String())
		}
		if w.Code >= 400 {
			var e apitype.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Code == "" || e.Description == "" {
				t.Fatalf("%s %s = %d with a body that is not an Error: %q", method, path, w.Code, w.Body.String())
			}
		}
	})
}

func (f *fakeService) StartMove(_ context.Context, id string) (apitype.Primary, error) {
	return apitype.Primary{}, f.errFor(id)
}
func (f *fakeService) Replication(_ context.Context, id string) (apitype.Replication, error) {
	return apitype.Replication{}, f.errFor(id)
}
func (f *fakeService) Cutover(_ context.Context, id string, _ time.Duration) (int64, error) {
	return 0, f.errFor(id)
}
func (f *fakeService) AbortMove(_ context.Context, id string) error { return f.errFor(id) }
func (f *fakeService) Forward(_ context.Context, id, _ string, _ int, _ time.Duration) error {
	return f.errFor(id)
}
func (f *fakeService) Promote(_ context.Context, id string, _ int64, _ time.Duration) error {
	return f.errFor(id)
}

func (f *fakeService) SetDraining(context.Context, bool) error { return nil }
