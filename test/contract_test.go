package test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// validating is an http.RoundTripper that checks every request and
// response against the OpenAPI document, and records which operations
// and statuses it saw.
type validating struct {
	t      *testing.T
	router routers.Router
	mu     sync.Mutex
	seen   map[string]bool // "METHOD path-template status"
}

func (v *validating) RoundTrip(req *http.Request) (*http.Response, error) {
	v.t.Helper()
	var reqBody []byte
	if req.Body != nil {
		reqBody, _ = io.ReadAll(req.Body)
		req.Body = io.NopCloser(bytes.NewReader(reqBody))
	}
	route, params, err := v.router.FindRoute(req)
	if err != nil {
		v.t.Errorf("%s %s: not in the OpenAPI document: %v", req.Method, req.URL.Path, err)
		return http.DefaultTransport.RoundTrip(req)
	}
	in := &openapi3filter.RequestValidationInput{
		Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc},
	}
	// Only requests the agent accepts must match the schema; the bad ones
	// are sent on purpose to see the 4xx answer validated.
	reqErr := openapi3filter.ValidateRequest(context.Background(), in)
	req.Body = io.NopCloser(bytes.NewReader(reqBody))
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if resp.StatusCode < 400 && reqErr != nil {
		v.t.Errorf("%s %s answered %d to a request the spec rejects: %v", req.Method, req.URL.Path, resp.StatusCode, reqErr)
	}
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{IncludeResponseStatus: true},
	}
	out.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		v.t.Errorf("%s %s -> %d %s: response does not match the spec: %v", req.Method, req.URL.Path, resp.StatusCode, body, err)
	}
	v.mu.Lock()
	v.seen[req.Method+" "+route.Path+" "+http.StatusText(resp.StatusCode)] = true
	v.mu.Unlock()
	return resp, nil
}

// TestOpenAPIContract drives every route of the running agent through a
// transport that validates each request and response against
// api/openapi.yaml, so the spec cannot drift from the code.
func TestOpenAPIContract(t *testing.T) {
	testenv.RedisServer(t)
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile("../api/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		t.Fatalf("openapi.yaml is not a valid OpenAPI document: %v", err)
	}
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := runAgent(t, agentOpts{dataDir: dataDir, ports: 2, extra: []string{"--health-interval", "20ms"}})
	doc.Servers = openapi3.Servers{{URL: a.base}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	v := &validating{t: t, router: router, seen: map[string]bool{}}
	saved := http.DefaultClient.Transport
	http.DefaultClient.Transport = v
	defer func() { http.DefaultClient.Transport = saved }()

	calls := []struct {
		method, path, body string
		want               int
	}{
		{"GET", "/healthz", "", 200},
		{"GET", "/readyz", "", 200},
		{"GET", "/metrics", "", 200},
		{"GET", "/v1/instances", "", 200},
		{"PUT", "/v1/instances/c1", `{"memory_mb":32,"persistence":"rdb"}`, 201},
		{"PUT", "/v1/instances/c1", `{"memory_mb":32,"persistence":"rdb"}`, 200},
		{"PUT", "/v1/instances/c1", `{"memory_mb":64,"persistence":"rdb"}`, 409},
		{"PUT", "/v1/instances/c2", `{"persistence":"sometimes"}`, 422},
		{"PUT", "/v1/instances/c2", `{"memory_mb":`, 400},
		{"PUT", "/v1/instances/c2", `{"memory_mb":4096}`, 507},     // the whole budget; c1 holds some
		{"PUT", "/v1/instances/c2", `{"memory_mb":99999999}`, 422}, // beyond the whole budget
		{"GET", "/v1/instances/c1", "", 200},
		{"GET", "/v1/instances/none", "", 404},
		{"GET", "/v1/instances", "", 200},
		{"PUT", "/v1/instances/c1/bindings/app", "", 201},
		{"PUT", "/v1/instances/c1/bindings/app", "", 200},
		{"PUT", "/v1/instances/none/bindings/app", "", 404},
		{"PUT", "/v1/instances/c1/bindings/default", "", 422},
		{"GET", "/v1/instances/c1/bindings/app", "", 200},
		{"GET", "/v1/instances/c1/bindings/none", "", 404},
		{"PUT", "/v1/instances/c1/bindings/kept", `{"password":"0123456789abcdef-kept"}`, 201},
		{"PUT", "/v1/instances/c1/bindings/kept", `{"password":"0123456789abcdef-other"}`, 409},
		{"PUT", "/v1/instances/c1/bindings/short", `{"password":"short"}`, 422},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p1"}}`, 201},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p1"}}`, 200},
		{"PUT", "/v1/instances/c3", `{"memory_mb":16,"metadata":{"plan":"p2"}}`, 409},
		{"PUT", "/v1/instances/c4", `{"metadata":[1]}`, 422},
		{"PATCH", "/v1/instances/c3", `{"metadata":{"plan":"p2"}}`, 200},
		{"GET", "/v1/instances/c3", "", 200},
		// A move's steps on one agent: started, looked at, refused where a
		// step does not fit, aborted.
		{"POST", "/v1/instances/c3/move", "", 200},
		{"GET", "/v1/instances/c3/replication", "", 200},
		{"POST", "/v1/instances/c3/move/cutover", `{"timeout_ms":0}`, 422},
		{"POST", "/v1/instances/c3/move/forward", `{"host":"127.0.0.1","port":1,"ttl_seconds":60}`, 409},
		{"POST", "/v1/instances/c3/promote", `{"offset":0,"timeout_ms":100}`, 409},
		{"DELETE", "/v1/instances/c3/move", "", 200},
		{"DELETE", "/v1/instances/c3/move", "", 410},
		{"GET", "/v1/instances/none/replication", "", 404},
		{"DELETE", "/v1/instances/c3", "", 200},
		{"POST", "/v1/instances/c1/restart", "", 200},
		{"GET", "/v1/instances/c1/log?lines=5", "", 200},
		{"GET", "/v1/capacity", "", 200},
		{"GET", "/v1/orphans", "", 200},
		{"PATCH", "/v1/instances/c1", `{"memory_mb":48}`, 200},
		{"PATCH", "/v1/instances/c1", `{"memory_mb":99999999}`, 422}, // beyond the whole budget
		{"PATCH", "/v1/instances/c1", `{}`, 422},
		{"PATCH", "/v1/instances/none", `{"memory_mb":48}`, 404},
		{"GET", "/v1/instances/none/snapshot", "", 404},
		{"GET", "/v1/rollout", "", 200},
		{"POST", "/v1/rollout", "", 202},
		{"DELETE", "/v1/instances/c1/bindings/app", "", 200},
		{"DELETE", "/v1/instances/c1/bindings/app", "", 410},
		{"DELETE", "/v1/instances/c1", "", 200},
		{"DELETE", "/v1/instances/c1", "", 410},
	}
	for _, c := range calls {
		if code := a.do(c.method, c.path, c.body, nil); code != c.want {
			t.Errorf("%s %s = %d, want %d", c.method, c.path, code, c.want)
		}
	}
	// A crashlooping instance shows last_exit and log_tail; validate that
	// shape too.
	in := mustProvision(t, a, "c3")
	// Snapshots are not JSON: a download, and uploads of a good and a bad
	// file.
	rdb := a.snapshot("c3")
	if code, body := a.restore("c3", rdb, sha(rdb)); code != 200 {
		t.Errorf("restore = %d %s", code, body)
	}
	if code, body := a.restore("c3", []byte("not an RDB"), ""); code != 422 {
		t.Errorf("restore of junk = %d %s", code, body)
	}
	a.do("GET", "/v1/instances/c3", "", &in)
	syscall.Kill(in.PID, syscall.SIGKILL)
	testenv.Eventually(t, "restart", settle, func() bool {
		var got instance
		a.do("GET", "/v1/instances/c3", "", &got)
		return got.LastExit != nil && got.State == "running"
	})
	a.do("DELETE", "/v1/instances/c3", "", nil)

	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			found := false
			for k := range v.seen {
				if strings.HasPrefix(k, method+" "+path+" ") {
					found = true
				}
			}
			if !found {
				t.Errorf("the contract test never called %s %s", method, path)
			}
		}
	}
}
