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
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/mock/gomock"
	"gopkg.in/yaml.v3"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
)

type env struct {
	svc *MockService
	h   http.Handler
	reg *prometheus.Registry
}

func newEnv(t *testing.T, token string) *env {
	t.Helper()
	ctrl := gomock.NewController(t)
	svc := NewMockService(ctrl)
	reg := prometheus.NewRegistry()
	return &env{svc: svc, reg: reg, h: New(Options{Service: svc, Token: token, Registerer: reg, Gatherer: reg})}
}

type response struct {
	code int
	body string
	hdr  http.Header
}

func (e *env) do(method, path, body string, hdr ...string) response {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, path, r)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	e.h.ServeHTTP(w, req)
	return response{w.Code, w.Body.String(), w.Header()}
}

func errorCode(t *testing.T, body string) string {
	t.Helper()
	var e apitype.Error
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Code == "" || e.Description == "" {
		t.Fatalf("body %q is not a JSON error with error and description", body)
	}
	return e.Code
}

var inst = agent.Instance{ID: "i1", State: "running", MemoryMB: 64, Persistence: "aof", Host: "127.0.0.1", Port: 16000, Bindings: []string{}}

func TestSuccessStatuses(t *testing.T) {
	creds := agent.Credentials{Host: "127.0.0.1", Port: 16000, Username: "b1", Password: "p", URI: "redis://b1:p@127.0.0.1:16000"}
	tests := []struct {
		name   string
		method string
		path   string
		body   string
		expect func(m *MockService)
		code   int
		has    string
	}{
		{"provision creates", "PUT", "/v1/instances/i1", `{"memory_mb":64,"persistence":"aof"}`, func(m *MockService) {
			m.EXPECT().Provision(gomock.Any(), "i1", agent.Spec{MemoryMB: 64, Persistence: "aof"}).Return(inst, true, nil)
		}, 201, `"port":16000`},
		{"provision identical", "PUT", "/v1/instances/i1", `{"memory_mb":64}`, func(m *MockService) {
			m.EXPECT().Provision(gomock.Any(), "i1", agent.Spec{MemoryMB: 64}).Return(inst, false, nil)
		}, 200, `"id":"i1"`},
		{"provision with a charset", "PUT", "/v1/instances/i1", `{"persistence":"rdb"}`, func(m *MockService) {
			m.EXPECT().Provision(gomock.Any(), "i1", agent.Spec{Persistence: "rdb"}).Return(inst, true, nil)
		}, 201, `"id":"i1"`},
		{"provision empty body uses defaults", "PUT", "/v1/instances/i1", ``, func(m *MockService) {
			m.EXPECT().Provision(gomock.Any(), "i1", agent.Spec{}).Return(inst, true, nil)
		}, 201, `"id":"i1"`},
		{"get", "GET", "/v1/instances/i1", ``, func(m *MockService) {
			m.EXPECT().Get(gomock.Any(), "i1").Return(inst, nil)
		}, 200, `"state":"running"`},
		{"list", "GET", "/v1/instances", ``, func(m *MockService) {
			m.EXPECT().List(gomock.Any()).Return([]agent.Instance{inst}, nil)
		}, 200, `"instances":[{`},
		{"empty list is an array", "GET", "/v1/instances", ``, func(m *MockService) {
			m.EXPECT().List(gomock.Any()).Return(nil, nil)
		}, 200, `{"instances":[]}`},
		{"delete", "DELETE", "/v1/instances/i1", ``, func(m *MockService) {
			m.EXPECT().Deprovision(gomock.Any(), "i1").Return(nil)
		}, 200, `{}`},
		{"bind creates", "PUT", "/v1/instances/i1/bindings/b1", ``, func(m *MockService) {
			m.EXPECT().Bind(gomock.Any(), "i1", "b1", "").Return(creds, true, nil)
		}, 201, `"uri":"redis://b1:p@127.0.0.1:16000"`},
		{"bind again", "PUT", "/v1/instances/i1/bindings/b1", `{}`, func(m *MockService) {
			m.EXPECT().Bind(gomock.Any(), "i1", "b1", "").Return(creds, false, nil)
		}, 200, `"username":"b1"`},
		{"unbind", "DELETE", "/v1/instances/i1/bindings/b1", ``, func(m *MockService) {
			m.EXPECT().Unbind(gomock.Any(), "i1", "b1").Return(nil)
		}, 200, `{}`},
		{"restart", "POST", "/v1/instances/i1/restart", ``, func(m *MockService) {
			m.EXPECT().Restart(gomock.Any(), "i1").Return(nil)
			m.EXPECT().Get(gomock.Any(), "i1").Return(inst, nil)
		}, 200, `"id":"i1"`},
		{"capacity", "GET", "/v1/capacity", ``, func(m *MockService) {
			m.EXPECT().Capacity(gomock.Any()).Return(agent.Capacity{PortsTotal: 1000, PortsFree: 999}, nil)
		}, 200, `"ports_free":999`},
		{"orphans", "GET", "/v1/orphans", ``, func(m *MockService) {
			m.EXPECT().Orphans(gomock.Any()).Return([]agent.Orphan{{Kind: "directory", ID: "ghost", Path: "/d/ghost"}}, nil)
		}, 200, `{"orphans":[{"kind":"directory","id":"ghost","path":"/d/ghost"}]}`},
		{"no orphans is an empty array", "GET", "/v1/orphans", ``, func(m *MockService) {
			m.EXPECT().Orphans(gomock.Any()).Return(nil, nil)
		}, 200, `{"orphans":[]}`},
		{"log", "GET", "/v1/instances/i1/log?lines=2", ``, func(m *MockService) {
			m.EXPECT().Log(gomock.Any(), "i1", 2).Return([]string{"a", "b"}, nil)
		}, 200, `{"id":"i1","lines":["a","b"]}`},
		{"log default lines", "GET", "/v1/instances/i1/log", ``, func(m *MockService) {
			m.EXPECT().Log(gomock.Any(), "i1", 100).Return([]string{}, nil)
		}, 200, `"lines":[]`},
		{"resize", "PATCH", "/v1/instances/i1", `{"memory_mb":128}`, func(m *MockService) {
			m.EXPECT().Resize(gomock.Any(), "i1", 128).Return(agent.Instance{ID: "i1", MemoryMB: 128}, nil)
		}, 200, `"memory_mb":128`},
		{"set io limits", "PATCH", "/v1/instances/i1", `{"io":{"write_bps":10485760,"read_iops":0}}`, func(m *MockService) {
			w, r := int64(10<<20), int64(0)
			m.EXPECT().SetIO(gomock.Any(), "i1", apitype.IOSetting{WriteBPS: &w, ReadIOPS: &r}).Return(agent.Instance{ID: "i1", IO: &apitype.IOLimits{WriteBPS: w}}, nil)
		}, 200, `"write_bps":10485760`},
		{"resize and io limits", "PATCH", "/v1/instances/i1", `{"memory_mb":128,"io":{}}`, func(m *MockService) {
			gomock.InOrder(
				m.EXPECT().Resize(gomock.Any(), "i1", 128).Return(agent.Instance{ID: "i1", MemoryMB: 128}, nil),
				m.EXPECT().SetIO(gomock.Any(), "i1", apitype.IOSetting{}).Return(agent.Instance{ID: "i1", MemoryMB: 128}, nil),
			)
		}, 200, `"memory_mb":128`},
		{"rollout status", "GET", "/v1/rollout", ``, func(m *MockService) {
			m.EXPECT().RolloutStatus(gomock.Any()).Return(agent.Rollout{State: agent.RolloutDone, Moved: 2}, nil)
		}, 200, `"state":"done"`},
		{"rollout start", "POST", "/v1/rollout", ``, func(m *MockService) {
			m.EXPECT().StartRollout(gomock.Any(), gomock.Any()).Return(agent.Rollout{State: agent.RolloutRunning, Total: 3}, nil)
		}, 202, `"total":3`},
		{"healthz", "GET", "/healthz", ``, func(*MockService) {}, 200, `"ok"`},
		{"readyz", "GET", "/readyz", ``, func(*MockService) {}, 200, `"ready"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, "")
			tt.expect(e.svc)
			var hdr []string
			if tt.name == "provision with a charset" {
				hdr = []string{"Content-Type", "application/json; charset=utf-8"}
			}
			r := e.do(tt.method, tt.path, tt.body, hdr...)
			if r.code != tt.code || !strings.Contains(r.body, tt.has) {
				t.Fatalf("%s %s = %d %s; want %d containing %s", tt.method, tt.path, r.code, r.body, tt.code, tt.has)
			}
			if ct := r.hdr.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
		})
	}
}

func TestErrorMapping(t *testing.T) {
	wrap := func(s error) error { return fmt.Errorf("instance %q: %w", "i1", s) }
	tests := []struct {
		name   string
		method string
		path   string
		expect func(m *MockService, err error)
		err    error
		code   int
		ecode  string
	}{
		{"get absent is 404", "GET", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Get(gomock.Any(), "i1").Return(agent.Instance{}, err)
		}, wrap(agent.ErrNotFound), 404, "NotFound"},
		{"delete absent is 410", "DELETE", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Deprovision(gomock.Any(), "i1").Return(err)
		}, wrap(agent.ErrNotFound), 410, "Gone"},
		{"unbind absent is 410", "DELETE", "/v1/instances/i1/bindings/b", func(m *MockService, err error) {
			m.EXPECT().Unbind(gomock.Any(), "i1", "b").Return(err)
		}, wrap(agent.ErrNotFound), 410, "Gone"},
		{"bind on absent instance is 404", "PUT", "/v1/instances/i1/bindings/b", func(m *MockService, err error) {
			m.EXPECT().Bind(gomock.Any(), "i1", "b", "").Return(agent.Credentials{}, false, err)
		}, wrap(agent.ErrNotFound), 404, "NotFound"},
		{"conflict is 409", "PUT", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Provision(gomock.Any(), "i1", gomock.Any()).Return(agent.Instance{}, false, err)
		}, wrap(agent.ErrConflict), 409, "Conflict"},
		{"invalid is 422", "PUT", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Provision(gomock.Any(), "i1", gomock.Any()).Return(agent.Instance{}, false, err)
		}, wrap(agent.ErrInvalid), 422, "Invalid"},
		{"capacity is 507", "PUT", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Provision(gomock.Any(), "i1", gomock.Any()).Return(agent.Instance{}, false, err)
		}, wrap(agent.ErrCapacity), 507, "InsufficientCapacity"},
		{"anything else is 500", "PUT", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Provision(gomock.Any(), "i1", gomock.Any()).Return(agent.Instance{}, false, err)
		}, errors.New("disk on fire at /secret/path"), 500, "Internal"},
		{"restart conflict", "POST", "/v1/instances/i1/restart", func(m *MockService, err error) {
			m.EXPECT().Restart(gomock.Any(), "i1").Return(err)
		}, wrap(agent.ErrConflict), 409, "Conflict"},
		{"restart of absent is 404", "POST", "/v1/instances/i1/restart", func(m *MockService, err error) {
			m.EXPECT().Restart(gomock.Any(), "i1").Return(err)
		}, wrap(agent.ErrNotFound), 404, "NotFound"},
		{"get after restart fails", "POST", "/v1/instances/i1/restart", func(m *MockService, err error) {
			m.EXPECT().Restart(gomock.Any(), "i1").Return(nil)
			m.EXPECT().Get(gomock.Any(), "i1").Return(agent.Instance{}, err)
		}, wrap(agent.ErrNotFound), 404, "NotFound"},
		{"bind invalid is 422", "PUT", "/v1/instances/i1/bindings/default", func(m *MockService, err error) {
			m.EXPECT().Bind(gomock.Any(), "i1", "default", "").Return(agent.Credentials{}, false, err)
		}, wrap(agent.ErrInvalid), 422, "Invalid"},
		{"bind conflict is 409", "PUT", "/v1/instances/i1/bindings/b", func(m *MockService, err error) {
			m.EXPECT().Bind(gomock.Any(), "i1", "b", "").Return(agent.Credentials{}, false, err)
		}, wrap(agent.ErrConflict), 409, "Conflict"},
		{"delete invalid id is 422", "DELETE", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Deprovision(gomock.Any(), "i1").Return(err)
		}, wrap(agent.ErrInvalid), 422, "Invalid"},
		{"delete conflict is 409", "DELETE", "/v1/instances/i1", func(m *MockService, err error) {
			m.EXPECT().Deprovision(gomock.Any(), "i1").Return(err)
		}, wrap(agent.ErrConflict), 409, "Conflict"},
		{"list failure is 500", "GET", "/v1/instances", func(m *MockService, err error) {
			m.EXPECT().List(gomock.Any()).Return(nil, err)
		}, errors.New("bolt: secret file corrupt"), 500, "Internal"},
		{"capacity failure is 500", "GET", "/v1/capacity", func(m *MockService, err error) {
			m.EXPECT().Capacity(gomock.Any()).Return(agent.Capacity{}, err)
		}, errors.New("secret"), 500, "Internal"},
		{"unbind failure is 500", "DELETE", "/v1/instances/i1/bindings/b", func(m *MockService, err error) {
			m.EXPECT().Unbind(gomock.Any(), "i1", "b").Return(err)
		}, errors.New("secret ACL error"), 500, "Internal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, "")
			tt.expect(e.svc, tt.err)
			r := e.do(tt.method, tt.path, "")
			if r.code != tt.code || errorCode(t, r.body) != tt.ecode {
				t.Fatalf("= %d %s; want %d %s", r.code, r.body, tt.code, tt.ecode)
			}
			if tt.code == 500 && strings.Contains(r.body, "secret") {
				t.Fatalf("500 body leaks the internal error: %s", r.body)
			}
			if tt.code < 500 && !strings.Contains(r.body, "i1") {
				t.Fatalf("4xx description does not carry the error's sentence: %s", r.body)
			}
		})
	}
}

// Bad input is answered before the Service is called: the mock has no
// expectations, so any call fails the test.
func TestBadInputNeverReachesService(t *testing.T) {
	tests := []struct {
		name   string
		method string
		path   string
		body   string
		hdr    []string
		code   int
		ecode  string
	}{
		{"malformed JSON", "PUT", "/v1/instances/i1", `{"memory_mb":`, nil, 400, "BadRequest"},
		{"unknown field", "PUT", "/v1/instances/i1", `{"memory_mb":1,"colour":"red"}`, nil, 400, "BadRequest"},
		{"wrong type", "PUT", "/v1/instances/i1", `{"memory_mb":"lots"}`, nil, 400, "BadRequest"},
		{"trailing data", "PUT", "/v1/instances/i1", `{"memory_mb":1} {"memory_mb":2}`, nil, 400, "BadRequest"},
		{"trailing brace", "PUT", "/v1/instances/i1", `{"memory_mb":1}}`, nil, 400, "BadRequest"},
		{"trailing garbage", "PUT", "/v1/instances/i1", `{"memory_mb":1}x`, nil, 400, "BadRequest"},
		{"a string, not an object", "PUT", "/v1/instances/i1", `"aof"`, nil, 400, "BadRequest"},
		{"not an object", "PUT", "/v1/instances/i1", `[1,2]`, nil, 400, "BadRequest"},
		{"too large", "PUT", "/v1/instances/i1", `{"persistence":"` + strings.Repeat("a", maxBody) + `"}`, nil, 413, "TooLarge"},
		{"wrong content type", "PUT", "/v1/instances/i1", `{"memory_mb":1}`, []string{"Content-Type", "text/plain"}, 415, "UnsupportedMediaType"},
		{"form body", "PUT", "/v1/instances/i1", `memory_mb=1`, []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, "UnsupportedMediaType"},
		{"unparsable content type", "PUT", "/v1/instances/i1/bindings/b", `{}`, []string{"Content-Type", "application/json; =;"}, 415, "UnsupportedMediaType"},
		{"too large binding body", "PUT", "/v1/instances/i1/bindings/b", strings.Repeat(" ", maxBody+1), nil, 413, "TooLarge"},
		{"binding with unknown field", "PUT", "/v1/instances/i1/bindings/b", `{"x":1}`, nil, 400, "BadRequest"},
		{"wrong method", "POST", "/v1/instances/i1", ``, nil, 405, "MethodNotAllowed"},
		{"resize without memory_mb", "PATCH", "/v1/instances/i1", `{}`, nil, 422, "Invalid"},
		{"resize with unknown field", "PATCH", "/v1/instances/i1", `{"memory_mb":1,"persistence":"rdb"}`, nil, 400, "BadRequest"},
		// An invalid IO setting is refused before the resize beside it.
		{"io limit below 1 MiB/s", "PATCH", "/v1/instances/i1", `{"memory_mb":128,"io":{"write_bps":1000}}`, nil, 422, "Invalid"},
		{"io with unknown field", "PATCH", "/v1/instances/i1", `{"io":{"write_mbps":1}}`, nil, 400, "BadRequest"},
		{"resize as text", "PATCH", "/v1/instances/i1", `{"memory_mb":1}`, []string{"Content-Type", "text/plain"}, 415, "UnsupportedMediaType"},
		{"restore as text", "PUT", "/v1/instances/i1/snapshot", `x`, []string{"Content-Type", "text/plain"}, 415, "UnsupportedMediaType"},
		{"restore from JSON without a backup", "PUT", "/v1/instances/i1/snapshot", `{}`, []string{"Content-Type", "application/json"}, 422, "Invalid"},
		{"restore from JSON with unknown fields", "PUT", "/v1/instances/i1/snapshot", `{"from":"x"}`, []string{"Content-Type", "application/json"}, 400, "BadRequest"},
		{"rollout with a body", "POST", "/v1/rollout", `{"binary":"/tmp/x"}`, nil, 400, "BadRequest"},
		{"unknown route", "GET", "/v2/whatever", ``, nil, 404, "NotFound"},
		{"unknown sub-route", "GET", "/v1/instances/i1/bindings", ``, nil, 404, "NotFound"},
		{"restart with GET", "GET", "/v1/instances/i1/restart", ``, nil, 405, "MethodNotAllowed"},
		{"POST a list", "POST", "/v1/instances", `{}`, nil, 405, "MethodNotAllowed"},
		{"POST a binding", "POST", "/v1/instances/i1/bindings/b", ``, nil, 405, "MethodNotAllowed"},
		{"DELETE healthz", "DELETE", "/healthz", ``, nil, 405, "MethodNotAllowed"},
		{"log lines not a number", "GET", "/v1/instances/i1/log?lines=many", ``, nil, 400, "BadRequest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, "")
			r := e.do(tt.method, tt.path, tt.body, tt.hdr...)
			if r.code != tt.code || errorCode(t, r.body) != tt.ecode {
				t.Fatalf("= %d %s; want %d %s", r.code, r.body, tt.code, tt.ecode)
			}
		})
	}
}

// A 405 says, in Allow, which methods the path does serve.
func TestMethodNotAllowedListsAllow(t *testing.T) {
	tests := []struct{ method, path, allow string }{
		{"POST", "/v1/instances/i1", "GET, PUT, PATCH, DELETE"},
		{"DELETE", "/v1/instances/i1/snapshot", "GET, PUT"},
		{"PUT", "/v1/rollout", "GET, POST"},
		{"POST", "/v1/instances", "GET"},
		{"POST", "/v1/instances/i1/bindings/b", "GET, PUT, DELETE"},
		{"GET", "/v1/instances/i1/restart", "POST"},
		{"PUT", "/healthz", "GET, HEAD"},
		{"POST", "/metrics", "GET"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			r := newEnv(t, "").do(tt.method, tt.path, "")
			if r.code != 405 || r.hdr.Get("Allow") != tt.allow {
				t.Fatalf("= %d, Allow %q; want 405, Allow %q", r.code, r.hdr.Get("Allow"), tt.allow)
			}
		})
	}
}

func TestAuth(t *testing.T) {
	e := newEnv(t, "s3cret")
	e.svc.EXPECT().List(gomock.Any()).Return(nil, nil)
	tests := []struct {
		name string
		path string
		hdr  []string
		code int
	}{
		{"no header", "/v1/instances", nil, 401},
		{"wrong token", "/v1/instances", []string{"Authorization", "Bearer nope"}, 401},
		{"token prefix only", "/v1/instances", []string{"Authorization", "Bearer s3cre"}, 401},
		{"basic auth", "/v1/instances", []string{"Authorization", "Basic czNjcmV0"}, 401},
		{"right token", "/v1/instances", []string{"Authorization", "Bearer s3cret"}, 200},
		{"healthz is open", "/healthz", nil, 200},
		{"readyz is open", "/readyz", nil, 200},
		{"metrics is open", "/metrics", nil, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do("GET", tt.path, "", tt.hdr...)
			if r.code != tt.code {
				t.Fatalf("= %d %s; want %d", r.code, r.body, tt.code)
			}
			if r.code == 401 {
				if errorCode(t, r.body) != "Unauthorized" || !strings.HasPrefix(r.hdr.Get("WWW-Authenticate"), "Bearer") {
					t.Fatalf("401 without JSON error or WWW-Authenticate: %v %s", r.hdr, r.body)
				}
			}
		})
	}
}

func TestHealthzNotAlive(t *testing.T) {
	h := New(Options{Service: NewMockService(gomock.NewController(t)), Live: func(context.Context) error { return errors.New("main loop last ran 40s ago") }})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/healthz", nil))
	if w.Code != 503 || !strings.Contains(w.Body.String(), "main loop") {
		t.Fatalf("healthz = %d %s", w.Code, w.Body.String())
	}
}

func TestReadyzNotReady(t *testing.T) {
	h := New(Options{Service: NewMockService(gomock.NewController(t)), Ready: func(context.Context) error { return errors.New("reconcile has not finished") }})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
	if w.Code != 503 || !strings.Contains(w.Body.String(), "reconcile has not finished") {
		t.Fatalf("readyz = %d %s", w.Code, w.Body.String())
	}
}

func TestPanicIsA500(t *testing.T) {
	e := newEnv(t, "")
	e.svc.EXPECT().Get(gomock.Any(), "i1").DoAndReturn(func(context.Context, string) (agent.Instance, error) { panic("boom") })
	r := e.do("GET", "/v1/instances/i1", "")
	if r.code != 500 || errorCode(t, r.body) != "Internal" || strings.Contains(r.body, "boom") {
		t.Fatalf("= %d %s", r.code, r.body)
	}
	// The recovered panic is counted like any other 500.
	want := `
# HELP redis_agent_http_requests_total HTTP requests served, by route template, method and status code.
# TYPE redis_agent_http_requests_total counter
redis_agent_http_requests_total{code="500",method="GET",route="/v1/instances/{id}"} 1
`
	if err := testutil.GatherAndCompare(e.reg, strings.NewReader(want), "redis_agent_http_requests_total"); err != nil {
		t.Fatal(err)
	}
}

func TestMetricsUseRouteTemplates(t *testing.T) {
	e := newEnv(t, "")
	e.svc.EXPECT().Get(gomock.Any(), gomock.Any()).Return(inst, nil).Times(2)
	e.do("GET", "/v1/instances/aaa", "")
	e.do("GET", "/v1/instances/bbb", "")
	e.do("GET", "/nowhere", "")
	want := `
# HELP redis_agent_http_requests_total HTTP requests served, by route template, method and status code.
# TYPE redis_agent_http_requests_total counter
redis_agent_http_requests_total{code="200",method="GET",route="/v1/instances/{id}"} 2
redis_agent_http_requests_total{code="404",method="GET",route="unmatched"} 1
`
	if err := testutil.GatherAndCompare(e.reg, strings.NewReader(want), "redis_agent_http_requests_total"); err != nil {
		t.Fatal(err)
	}
	problems, err := testutil.GatherAndLint(e.reg)
	if err != nil || len(problems) != 0 {
		t.Fatalf("promlint: %v %+v", err, problems)
	}
}

// openAPI is the part of openapi.yaml the tests look at.
type openAPI struct {
	OpenAPI    string                          `yaml:"openapi"`
	Security   []map[string][]string           `yaml:"security"`
	Paths      map[string]map[string]yaml.Node `yaml:"paths"`
	Components struct {
		Schemas         map[string]any                           `yaml:"schemas"`
		SecuritySchemes map[string]struct{ Type, Scheme string } `yaml:"securitySchemes"`
	} `yaml:"components"`
}

type openAPIOperation struct {
	// Security is nil when the operation inherits the document's.
	Security  *[]map[string][]string `yaml:"security"`
	Responses map[string]any         `yaml:"responses"`
}

// operations are the keys of an OpenAPI path item that are operations.
var operations = []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}

func loadOpenAPI(t *testing.T) *openAPI {
	t.Helper()
	b, err := os.ReadFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPI
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	return &doc
}

// routes lists "METHOD template" for every route the router serves, HEAD
// aside (it goes with GET).
func routes(t *testing.T) map[string]bool {
	t.Helper()
	s := &server{}
	r := s.router(Options{Token: "t", Gatherer: prometheus.NewRegistry()})
	got := map[string]bool{}
	err := r.Walk(func(route *mux.Route, _ *mux.Router, _ []*mux.Route) error {
		tpl, err := route.GetPathTemplate()
		if err != nil {
			return err
		}
		ms, err := route.GetMethods()
		if err != nil {
			return fmt.Errorf("%s: every route names its methods: %w", tpl, err)
		}
		for _, m := range ms {
			if !slices.Contains(methods, m) {
				t.Errorf("%s %s: method missing from methods, so Allow headers would leave it out", m, tpl)
			}
			if m != http.MethodHead {
				got[m+" "+tpl] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// The OpenAPI document and the router describe the same routes, and the
// document says what the router enforces: bearer auth on /v1 and nowhere
// else, the schemas the handlers write.
func TestOpenAPIMatchesRouter(t *testing.T) {
	doc := loadOpenAPI(t)
	if !strings.HasPrefix(doc.OpenAPI, "3.0.") {
		t.Errorf("openapi = %q, want 3.0.x", doc.OpenAPI)
	}
	if ss := doc.Components.SecuritySchemes["bearerAuth"]; ss.Type != "http" || ss.Scheme != "bearer" {
		t.Errorf("securitySchemes.bearerAuth = %+v, want http bearer", ss)
	}
	// Authentication is optional (with none configured /v1 is open), so
	// the document's requirement is bearerAuth or the empty one.
	var bearer, none bool
	for _, req := range doc.Security {
		bearer = bearer || (len(req) == 1 && req["bearerAuth"] != nil)
		none = none || len(req) == 0
	}
	if len(doc.Security) != 2 || !bearer || !none {
		t.Errorf("document security = %v, want bearerAuth and {} (no authentication configured)", doc.Security)
	}
	for _, name := range []string{"Spec", "Resize", "Instance", "Exit", "Credentials", "Capacity", "Rollout", "Orphan", "Error"} {
		if doc.Components.Schemas[name] == nil {
			t.Errorf("components.schemas has no %s", name)
		}
	}

	served := routes(t)
	documented := map[string]bool{}
	for path, item := range doc.Paths {
		for method, node := range item {
			if !slices.Contains(operations, method) {
				continue // parameters, summary, ...
			}
			var op openAPIOperation
			if err := node.Decode(&op); err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			key := strings.ToUpper(method) + " " + path
			documented[key] = true
			if !served[key] {
				t.Errorf("openapi.yaml documents %s, which the router does not serve", key)
			}
			open := op.Security != nil && len(*op.Security) == 0
			if v1 := strings.HasPrefix(path, "/v1/"); v1 == open {
				t.Errorf("%s: open = %v; want /v1 behind bearerAuth and nothing else", key, open)
			} else if v1 {
				for _, code := range []string{"401", "500"} {
					if op.Responses[code] == nil {
						t.Errorf("%s lists no %s response", key, code)
					}
				}
			}
		}
	}
	for key := range served {
		if !documented[key] {
			t.Errorf("the router serves %s, which openapi.yaml does not document", key)
		}
	}
}

// A snapshot download streams the file with its length and sha256; an
// upload hands the body and the sha256 header to Restore untouched.
func TestSnapshotTransfer(t *testing.T) {
	e := newEnv(t, "")
	f, err := os.CreateTemp(t.TempDir(), "rdb")
	if err != nil {
		t.Fatal(err)
	}
	rdb := "REDIS0010\x00binary\xff"
	f.WriteString(rdb)
	f.Seek(0, io.SeekStart)
	e.svc.EXPECT().Snapshot(gomock.Any(), "i1").Return(&agent.Snapshot{File: f, Size: int64(len(rdb)), SHA256: "ab12"}, nil)
	r := e.do("GET", "/v1/instances/i1/snapshot", "")
	if r.code != 200 || r.body != rdb || r.hdr.Get("Content-Type") != "application/octet-stream" ||
		r.hdr.Get("X-Snapshot-Sha256") != "ab12" || r.hdr.Get("Content-Length") != strconv.Itoa(len(rdb)) {
		t.Fatalf("GET snapshot = %d %q %v", r.code, r.body, r.hdr)
	}

	e.svc.EXPECT().Restore(gomock.Any(), "i1", gomock.Any(), int64(len(rdb)), "cd34").DoAndReturn(
		func(_ context.Context, id string, body io.Reader, _ int64, _ string) (agent.Instance, error) {
			b, _ := io.ReadAll(body)
			if string(b) != rdb {
				t.Errorf("Restore got body %q, want %q", b, rdb)
			}
			return agent.Instance{ID: id}, nil
		})
	r = e.do("PUT", "/v1/instances/i1/snapshot", rdb, "Content-Type", "application/octet-stream", "X-Snapshot-Sha256", "cd34")
	if r.code != 200 || !strings.Contains(r.body, `"id":"i1"`) {
		t.Fatalf("PUT snapshot = %d %s", r.code, r.body)
	}

	e.svc.EXPECT().Snapshot(gomock.Any(), "busy").Return(nil, fmt.Errorf("instance is backoff: %w", agent.ErrConflict))
	if r := e.do("GET", "/v1/instances/busy/snapshot", ""); r.code != 409 || errorCode(t, r.body) != "Conflict" {
		t.Fatalf("GET snapshot of a stopped instance = %d %s", r.code, r.body)
	}
}
