package api

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/redis-agent/redis-agent/agent"
)

func readSpec() (string, error) {
	b, err := os.ReadFile("openapi.yaml")
	return string(b), err
}

// fakeService answers every call with the error its id names, so the
// fuzzer reaches every branch of the error mapping.
type fakeService struct{}

func errFor(id string) error {
	switch {
	case strings.HasPrefix(id, "nf"):
		return agent.ErrNotFound
	case strings.HasPrefix(id, "cf"):
		return agent.ErrConflict
	case strings.HasPrefix(id, "in"):
		return agent.ErrInvalid
	case strings.HasPrefix(id, "cap"):
		return agent.ErrCapacity
	case strings.HasPrefix(id, "boom"):
		return errors.New("internal")
	}
	return nil
}

func (fakeService) Provision(_ context.Context, id string, s agent.Spec) (agent.Instance, bool, error) {
	return agent.Instance{ID: id, MemoryMB: s.MemoryMB}, true, errFor(id)
}
func (fakeService) Deprovision(_ context.Context, id string) error { return errFor(id) }
func (fakeService) Get(_ context.Context, id string) (agent.Instance, error) {
	return agent.Instance{ID: id}, errFor(id)
}
func (fakeService) List(context.Context) ([]agent.Instance, error) { return nil, nil }
func (fakeService) Bind(_ context.Context, id, _ string) (agent.Credentials, bool, error) {
	return agent.Credentials{}, true, errFor(id)
}
func (fakeService) Unbind(_ context.Context, id, _ string) error { return errFor(id) }
func (fakeService) Restart(_ context.Context, id string) error   { return errFor(id) }
func (fakeService) Capacity(context.Context) (agent.Capacity, error) {
	return agent.Capacity{}, nil
}
func (fakeService) Orphans(context.Context) ([]agent.Orphan, error) { return nil, nil }
func (fakeService) Log(_ context.Context, id string, n int) ([]string, error) {
	if n < 1 {
		return nil, agent.ErrInvalid
	}
	return []string{"x"}, errFor(id)
}

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
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, s.ctype, s.body)
	}
	h := New(Options{Service: fakeService{}})
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
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code >= 500 && w.Code != http.StatusInsufficientStorage && !strings.Contains(path, "boom") {
			t.Fatalf("%s %s (%q) = %d %s", method, path, body, w.Code, w.Body.String())
		}
	})
}
