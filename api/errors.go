package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"reflect"
	"sort"
	"strings"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
)

// errBusy: the API is at its bound of concurrent requests of a kind (the
// restores in progress); a retry after retryAfter may find room.
var errBusy = errors.New("retry later")

// retryAfter is the Retry-After, in seconds, of an errBusy answer.
const retryAfter = "10"

// status maps an error from the Service to an HTTP status and code. It is
// the only place that does: the Service wraps one sentinel at most; an
// error that wraps none is the agent's fault.
func status(method string, err error) (int, string) {
	switch {
	case errors.Is(err, agent.ErrNotFound):
		if method == http.MethodDelete {
			// Deleting what is absent: the broker's retry after a lost
			// answer, or a double delete. OSB calls it Gone.
			return http.StatusGone, apitype.CodeGone
		}
		return http.StatusNotFound, apitype.CodeNotFound
	case errors.Is(err, agent.ErrInvalid):
		return http.StatusUnprocessableEntity, apitype.CodeInvalid
	case errors.Is(err, agent.ErrConflict):
		return http.StatusConflict, apitype.CodeConflict
	case errors.Is(err, agent.ErrCapacity):
		return http.StatusInsufficientStorage, apitype.CodeInsufficientCapacity
	case errors.Is(err, agent.ErrNotReady):
		// The instance is down for now and being restarted: a retry may
		// find it up.
		return http.StatusServiceUnavailable, apitype.CodeNotReady
	case errors.Is(err, errBusy):
		return http.StatusServiceUnavailable, apitype.CodeBusy
	case errors.Is(err, agent.ErrStorage):
		return http.StatusBadGateway, apitype.CodeBackupStorage
	}
	return http.StatusInternalServerError, apitype.CodeInternal
}

// fail writes err as an error response. A sentinel error carries its own
// sentence; any other error is logged and answered with a generic one, so
// internals never leak to the caller.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, name := status(r.Method, err)
	desc := err.Error()
	if errors.Is(err, errBusy) {
		w.Header().Set(apitype.RetryAfterHeader, retryAfter)
	}
	if code == http.StatusInternalServerError {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		desc = "the agent failed to complete the request; see its log"
	}
	writeError(w, code, name, desc)
}

func writeError(w http.ResponseWriter, code int, name, desc string) {
	writeJSON(w, code, apitype.Error{Code: name, Description: desc})
}

// reply answers a call's result: v with code, or err as fail maps it.
func (s *server) reply(w http.ResponseWriter, r *http.Request, code int, v any, err error) {
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, code, v)
}

// orEmpty is list, or an empty one for nil: a list encodes as [], never
// as null.
func orEmpty[T any](list []T) []T {
	if list == nil {
		return []T{}
	}
	return list
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code = http.StatusInternalServerError
		b = []byte(`{"error":"Internal","description":"cannot encode the response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

// decode reads a JSON object body into v: at most maxBody bytes (413),
// application/json when a Content-Type is given (415), no unknown fields and
// nothing after the object (400). An empty body leaves v as it is. It
// answers the error itself and returns false when the body is bad, so a bad
// request never reaches the Service.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, apitype.CodeTooLarge, fmt.Sprintf("request body exceeds %d bytes", maxBody))
			return false
		}
		writeError(w, http.StatusBadRequest, apitype.CodeBadRequest, "cannot read the request body")
		return false
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return true
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			writeError(w, http.StatusUnsupportedMediaType, apitype.CodeUnsupportedMediaType, "the request body must be application/json")
			return false
		}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, apitype.CodeBadRequest, "malformed JSON body: "+err.Error())
		return false
	}
	// Anything but white space after the object, even a stray '}', is an
	// error: the body is one object and nothing else.
	if _, err := dec.Token(); err != io.EOF {
		writeError(w, http.StatusBadRequest, apitype.CodeBadRequest, "malformed JSON body: data after the object")
		return false
	}
	if err := exactFields(body, v); err != nil {
		writeError(w, http.StatusBadRequest, apitype.CodeBadRequest, "malformed JSON body: "+err.Error())
		return false
	}
	return true
}

// exactFields checks that every field of the JSON object body is named
// exactly as a field of v's struct type (its json tag): encoding/json
// matches names case-insensitively, so "MEMORY_MB" would otherwise pass
// for memory_mb while any other unknown field is refused.
func exactFields(body []byte, v any) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return nil // not an object (null): decoding into v took it
	}
	known := map[string]bool{}
	jsonNames(reflect.TypeOf(v), known)
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !known[name] {
			return fmt.Errorf("json: unknown field %q (field names are case-sensitive)", name)
		}
	}
	return nil
}

// jsonNames adds the JSON names of struct type t's fields to names.
func jsonNames(t reflect.Type, names map[string]bool) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-":
		case name == "" && f.Anonymous:
			jsonNames(f.Type, names) // its fields are promoted
		case !f.IsExported():
		case name == "":
			names[f.Name] = true
		default:
			names[name] = true
		}
	}
}
