package testenv

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// Contract is an http.RoundTripper that checks every request and
// response against an OpenAPI document and records which operations and
// statuses it saw, so a test can prove a spec and its server agree.
type Contract struct {
	t      testing.TB
	doc    *openapi3.T
	router routers.Router
	mu     sync.Mutex
	seen   map[string]bool // "METHOD path-template status"
}

// NewContract loads and validates the document at specPath, for a server
// at baseURL.
func NewContract(t testing.TB, specPath, baseURL string) *Contract {
	t.Helper()
	// GET /v1/ca answers a PEM file.
	openapi3filter.RegisterBodyDecoder("application/x-pem-file", openapi3filter.PlainBodyDecoder)
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile(specPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		t.Fatalf("%s is not a valid OpenAPI document: %v", specPath, err)
	}
	doc.Servers = openapi3.Servers{{URL: baseURL}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	return &Contract{t: t, doc: doc, router: router, seen: map[string]bool{}}
}

// RoundTrip sends req and validates it and its answer. Requests the spec
// rejects may be sent on purpose (to see their 4xx validated), but one the
// server accepts with a 2xx or 3xx is an error.
func (c *Contract) RoundTrip(req *http.Request) (*http.Response, error) {
	c.t.Helper()
	var reqBody []byte
	if req.Body != nil {
		reqBody, _ = io.ReadAll(req.Body)
		req.Body = io.NopCloser(bytes.NewReader(reqBody))
	}
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		c.t.Errorf("%s %s: not in the OpenAPI document: %v", req.Method, req.URL.Path, err)
		return http.DefaultTransport.RoundTrip(req)
	}
	in := &openapi3filter.RequestValidationInput{
		Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc},
	}
	reqErr := openapi3filter.ValidateRequest(context.Background(), in)
	req.Body = io.NopCloser(bytes.NewReader(reqBody))
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if resp.StatusCode < 400 && reqErr != nil {
		c.t.Errorf("%s %s answered %d to a request the spec rejects: %v", req.Method, req.URL.Path, resp.StatusCode, reqErr)
	}
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Options: &openapi3filter.Options{IncludeResponseStatus: true},
	}
	out.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		c.t.Errorf("%s %s -> %d %s: response does not match the spec: %v", req.Method, req.URL.Path, resp.StatusCode, body, err)
	}
	c.mu.Lock()
	c.seen[req.Method+" "+route.Path+" "+http.StatusText(resp.StatusCode)] = true
	c.mu.Unlock()
	return resp, nil
}

// CheckCovered fails the test for every operation of the document that
// was never called.
func (c *Contract) CheckCovered(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	for path, item := range c.doc.Paths.Map() {
		for method := range item.Operations() {
			found := false
			for k := range c.seen {
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
