package api

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	"go.uber.org/mock/gomock"

	"github.com/redis-agent/redis-agent/agent"
)

// Field names match exactly: encoding/json alone would take MEMORY_MB
// for memory_mb while refusing any other unknown field. The mock has no
// expectations for the refused bodies, so reaching the Service fails.
func TestFieldNamesAreExact(t *testing.T) {
	for _, tt := range []struct{ method, path, body string }{
		{"PUT", "/v1/instances/i1", `{"MEMORY_MB":64}`},
		{"PUT", "/v1/instances/i1", `{"memory_mb":64,"Persistence":"rdb"}`},
		{"PUT", "/v1/instances/i1", `{"Memory_Mb":64}`},
		{"PATCH", "/v1/instances/i1", `{"MEMORY_MB":128}`},
	} {
		t.Run(tt.body, func(t *testing.T) {
			r := newEnv(t, "").do(tt.method, tt.path, tt.body)
			if r.code != 400 || errorCode(t, r.body) != "BadRequest" {
				t.Fatalf("%s %s %s = %d %s; want 400 BadRequest", tt.method, tt.path, tt.body, r.code, r.body)
			}
		})
	}
	e := newEnv(t, "")
	e.svc.EXPECT().Provision(gomock.Any(), "i1", agent.Spec{MemoryMB: 64, Persistence: "rdb"}).Return(inst, true, nil)
	if r := e.do("PUT", "/v1/instances/i1", `{"memory_mb":64,"persistence":"rdb"}`); r.code != 201 {
		t.Fatalf("exact names = %d %s; want 201", r.code, r.body)
	}
}

// Every struct a body decodes into yields its exact JSON names.
func TestJSONNames(t *testing.T) {
	type inner struct {
		A int `json:"a"`
	}
	type outer struct {
		inner
		B      int `json:"b,omitempty"`
		C      int
		D      int `json:"-"`
		hidden int
	}
	got := map[string]bool{}
	jsonNames(reflect.TypeOf(&outer{}), got)
	_ = outer{}.hidden
	want := map[string]bool{"a": true, "b": true, "C": true}
	if len(got) != len(want) || !got["a"] || !got["b"] || !got["C"] {
		t.Fatalf("jsonNames = %v, want %v", got, want)
	}
}

// A path with an empty, . or .. segment, percent-encoded or not, is a
// 400 JSON error, never a redirect to another route.
func TestUncleanPathsAreRefused(t *testing.T) {
	for _, path := range []string{
		"/v1/instances/..%2Fetc",
		"/v1/instances/i1/..%2F..%2Fcapacity",
		"/v1/instances/%2e%2e",
		"/v1/instances/%2E",
		"//v1//instances",
		"/v1//instances",
		"/v1/instances/./i1",
		"/v1/instances/i1/../i2",
		"/v1/instances/i1/bindings/..",
	} {
		t.Run(path, func(t *testing.T) {
			for _, method := range []string{"GET", "PUT", "DELETE"} {
				r := newEnv(t, "").do(method, path, "")
				if r.code != 400 || errorCode(t, r.body) != "BadRequest" || r.hdr.Get("Location") != "" {
					t.Fatalf("%s %s = %d %v %s; want 400 BadRequest", method, path, r.code, r.hdr, r.body)
				}
			}
		})
	}
	// A trailing slash names no route: 404, not a redirect either.
	if r := newEnv(t, "").do("GET", "/v1/instances/", ""); r.code != 404 || errorCode(t, r.body) != "NotFound" {
		t.Fatalf("GET /v1/instances/ = %d %s; want 404", r.code, r.body)
	}
}

// A restart whose new process does not become ready is a 503 NotReady
// with the Service's sentence, not a bare 500.
func TestRestartNotReadyIs503(t *testing.T) {
	e := newEnv(t, "")
	err := fmt.Errorf("restart %q: %w: redis-server did not become ready: crash (exit code 1)", "i1", agent.ErrNotReady)
	e.svc.EXPECT().Restart(gomock.Any(), "i1").Return(err)
	r := e.do("POST", "/v1/instances/i1/restart", "")
	if r.code != 503 || errorCode(t, r.body) != "NotReady" || !strings.Contains(r.body, "did not become ready: crash") {
		t.Fatalf("restart that did not become ready = %d %s; want 503 NotReady with its sentence", r.code, r.body)
	}
}
