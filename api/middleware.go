package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis-agent/redis-agent/apitype"
)

// authenticate lets a request through when it carries
// "Authorization: Bearer <token>" (token set) or a verified TLS client
// certificate (clientCert set). The token comparison is of fixed-length
// digests in constant time, so neither its content nor its length leaks
// through timing.
func authenticate(token string, clientCert bool) mux.MiddlewareFunc {
	want := sha256.Sum256([]byte(token))
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if clientCert && r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
				next.ServeHTTP(w, r)
				return
			}
			if token != "" {
				got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
				sum := sha256.Sum256([]byte(got))
				if ok && subtle.ConstantTimeCompare(sum[:], want[:]) == 1 {
					next.ServeHTTP(w, r)
					return
				}
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="redis-agent"`)
			writeError(w, http.StatusUnauthorized, apitype.CodeUnauthorized, "a valid bearer token or client certificate is required")
		})
	}
}

// canonicalPaths answers 400 to a path with an empty, "." or ".."
// segment, percent-encoded or not (a trailing slash aside), instead of
// letting it reach a route by another name: gorilla/mux would redirect it
// (301) to its cleaned form, and a client must name a route exactly.
func canonicalPaths(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := r.URL.Path; strings.HasPrefix(p, "/") && !isClean(p) {
			writeError(w, http.StatusBadRequest, apitype.CodeBadRequest,
				fmt.Sprintf("path %q has an empty, . or .. segment: name the route exactly", r.URL.EscapedPath()))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// isClean reports whether p is its own path.Clean, but for a trailing
// slash (which names no route, a 404).
func isClean(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// recoverer turns a panic in a handler into a logged 500.
func recoverer(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "panic", v, "stack", string(debug.Stack()))
				writeError(w, http.StatusInternalServerError, apitype.CodeInternal, "the agent failed to complete the request; see its log")
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// instrument counts requests and their durations by route template (never
// the raw path, whose ids would make unbounded label values).
func instrument(reg prometheus.Registerer, router *mux.Router, next http.Handler) http.Handler {
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "redis_agent_http_requests_total",
		Help: "HTTP requests served, by route template, method and status code.",
	}, []string{"route", "method", "code"})
	duration := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "redis_agent_http_request_duration_seconds",
		Help:    "HTTP request latency, by route template and method.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"route", "method"})
	reg.MustRegister(requests, duration)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		route := "unmatched"
		var m mux.RouteMatch
		if router.Match(r, &m) && m.Route != nil {
			if tpl, err := m.Route.GetPathTemplate(); err == nil {
				route = tpl
			}
		}
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		start := time.Now()
		next.ServeHTTP(rec, r)
		method := r.Method
		switch method {
		case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodDelete, http.MethodPatch:
		default:
			method = "other" // bounded label values
		}
		requests.WithLabelValues(route, method, strconv.Itoa(rec.code)).Inc()
		duration.WithLabelValues(route, method).Observe(time.Since(start).Seconds())
	})
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }
