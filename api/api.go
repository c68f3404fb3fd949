// Package api is the agent's REST interface: a gorilla/mux router over the
// Service it consumes, bearer-token authentication, JSON request parsing
// with strict limits, the one place where errors become HTTP statuses, and
// per-route request metrics. openapi.yaml beside this file is the contract.
package api

//go:generate go tool mockgen -destination=mock_service_test.go -package=api . Service

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
)

// Service is what the API needs from the agent.
type Service interface {
	Provision(ctx context.Context, id string, spec apitype.Spec) (inst apitype.Instance, created bool, err error)
	Deprovision(ctx context.Context, id string) error
	Get(ctx context.Context, id string) (apitype.Instance, error)
	List(ctx context.Context) ([]apitype.Instance, error)
	Bind(ctx context.Context, id, bindingID, password string) (creds apitype.Credentials, created bool, err error)
	Binding(ctx context.Context, id, bindingID string) (apitype.Credentials, error)
	Unbind(ctx context.Context, id, bindingID string) error
	Restart(ctx context.Context, id string) error
	Capacity(ctx context.Context) (apitype.Capacity, error)
	Orphans(ctx context.Context) ([]apitype.Orphan, error)
	Log(ctx context.Context, id string, lines int) ([]string, error)
	Resize(ctx context.Context, id string, memoryMB int) (apitype.Instance, error)
	SetMetadata(ctx context.Context, id string, metadata json.RawMessage) (apitype.Instance, error)
	Configure(ctx context.Context, id string, set apitype.Settings) (apitype.Instance, error)
	CA(ctx context.Context) ([]byte, error)
	SetIO(ctx context.Context, id string, io apitype.IOSetting) (apitype.Instance, error)
	Snapshot(ctx context.Context, id string) (*agent.Snapshot, error)
	SnapshotStream(ctx context.Context, id string) (*agent.SnapshotStream, error)
	Restore(ctx context.Context, id string, rdb io.Reader, size int64, sha256 string) (apitype.Instance, error)
	StartRollout(ctx context.Context, instances []string) (apitype.Rollout, error)
	SetDraining(ctx context.Context, on bool) error
	StartMove(ctx context.Context, id string) (apitype.Primary, error)
	Replication(ctx context.Context, id string) (apitype.Replication, error)
	Cutover(ctx context.Context, id string, timeout time.Duration) (int64, error)
	AbortMove(ctx context.Context, id string) error
	Forward(ctx context.Context, id, host string, port int, ttl time.Duration) error
	Promote(ctx context.Context, id string, offset int64, timeout time.Duration) error
	RolloutStatus(ctx context.Context) (apitype.Rollout, error)
	Backup(ctx context.Context, id string) (apitype.Backup, error)
	Backups(ctx context.Context, id string, details bool) ([]apitype.Backup, error)
	LatestBackups(ctx context.Context, agent string) ([]apitype.Backup, error)
	RestoreBackup(ctx context.Context, id, key string) (apitype.Instance, error)
	SetBackupPolicy(ctx context.Context, id string, p apitype.BackupPolicy) (apitype.Instance, error)
}

var _ Service = (*agent.Service)(nil)

// Options configure the handler.
type Options struct {
	// Service does the work behind every /v1 route.
	Service Service
	// Logger receives 5xx causes and recovered panics; nil discards.
	Logger *slog.Logger
	// Token is a bearer token that authenticates /v1 requests.
	Token string
	// ClientCert lets a verified TLS client certificate authenticate /v1
	// requests (the TLS layer checks it against the client CA). With
	// neither Token nor ClientCert, /v1 is open.
	ClientCert bool
	// MetricsAuth puts /metrics behind the same authentication.
	MetricsAuth bool
	// Ready backs /readyz; nil means always ready.
	Ready func(ctx context.Context) error
	// Details, when set, are added to /readyz's 200 answer.
	Details func() []string
	// Live backs /healthz; nil means always alive.
	Live func(ctx context.Context) error
	// Registerer receives the HTTP request metrics; nil means none.
	Registerer prometheus.Registerer
	// Gatherer is served on /metrics; nil means no /metrics route.
	Gatherer prometheus.Gatherer
	// MaxUploads bounds the restores in progress at once (receiving,
	// checking or loading a snapshot): one more is answered 503 with
	// Retry-After before its body is read. 0 means DefaultMaxUploads.
	MaxUploads int
}

// DefaultMaxUploads is the number of restores in progress at once when
// Options.MaxUploads is 0.
const DefaultMaxUploads = 4

// maxBody bounds every request body.
const maxBody = 64 << 10

type server struct {
	svc     Service
	log     *slog.Logger
	ready   func(context.Context) error
	details func() []string
	live    func(context.Context) error
	// uploads holds a token per restore in progress.
	uploads chan struct{}
}

// New returns the API's handler: the router, with panics recovered into
// logged 500s and, when o.Registerer is set, every request counted.
func New(o Options) http.Handler {
	if o.MaxUploads <= 0 {
		o.MaxUploads = DefaultMaxUploads
	}
	s := &server{svc: o.Service, log: o.Logger, ready: o.Ready, details: o.Details, live: o.Live, uploads: make(chan struct{}, o.MaxUploads)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.ready == nil {
		s.ready = func(context.Context) error { return nil }
	}
	if s.live == nil {
		s.live = func(context.Context) error { return nil }
	}
	r := s.router(o)
	h := recoverer(s.log, canonicalPaths(r))
	if o.Registerer != nil {
		// Outside the recoverer, so a recovered panic counts as its 500.
		h = instrument(o.Registerer, r, h)
	}
	return h
}

// router registers every route. Each route names one method, so the
// router alone knows which methods a path allows.
func (s *server) router(o Options) *mux.Router {
	// No cleaning: mux would answer an unclean path with a redirect;
	// canonicalPaths refuses it before the router sees it.
	r := mux.NewRouter().SkipClean(true)
	r.NotFoundHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, apitype.CodeNotFound, "no such route")
	})
	r.MethodNotAllowedHandler = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Allow", strings.Join(allowed(r, req), ", "))
		writeError(w, http.StatusMethodNotAllowed, apitype.CodeMethodNotAllowed, fmt.Sprintf("%s is not allowed on this route", req.Method))
	})

	r.HandleFunc("/healthz", s.healthz).Methods(http.MethodGet, http.MethodHead)
	r.HandleFunc("/readyz", s.readyz).Methods(http.MethodGet, http.MethodHead)
	// The /v1 routes sit on the root router (a mux subrouter would turn a
	// wrong method into a 404) and each carries the auth check.
	auth := func(h http.Handler) http.Handler { return h }
	if o.Token != "" || o.ClientCert {
		auth = authenticate(o.Token, o.ClientCert)
	}
	if o.Gatherer != nil {
		var m http.Handler = promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{})
		if o.MetricsAuth {
			m = auth(m)
		}
		r.Handle("/metrics", m).Methods(http.MethodGet)
	}
	v1 := func(method, path string, h http.HandlerFunc) {
		r.Handle("/v1"+path, auth(h)).Methods(method)
	}
	v1(http.MethodGet, "/instances", s.listInstances)
	v1(http.MethodPut, "/instances/{id}", s.putInstance)
	v1(http.MethodGet, "/instances/{id}", s.getInstance)
	v1(http.MethodDelete, "/instances/{id}", s.deleteInstance)
	v1(http.MethodPatch, "/instances/{id}", s.patchInstance)
	v1(http.MethodGet, "/instances/{id}/snapshot", s.getSnapshot)
	v1(http.MethodPut, "/instances/{id}/snapshot", s.putSnapshot)
	v1(http.MethodPost, "/instances/{id}/backups", s.postBackup)
	v1(http.MethodGet, "/instances/{id}/backups", s.listBackups)
	v1(http.MethodGet, "/backups", s.latestBackups)
	v1(http.MethodGet, "/rollout", s.getRollout)
	v1(http.MethodPost, "/rollout", s.postRollout)
	v1(http.MethodPut, "/instances/{id}/bindings/{bid}", s.putBinding)
	v1(http.MethodGet, "/instances/{id}/bindings/{bid}", s.getBinding)
	v1(http.MethodDelete, "/instances/{id}/bindings/{bid}", s.deleteBinding)
	v1(http.MethodPost, "/instances/{id}/restart", s.restart)
	v1(http.MethodGet, "/instances/{id}/log", s.instanceLog)
	v1(http.MethodPost, "/instances/{id}/move", s.startMove)
	v1(http.MethodDelete, "/instances/{id}/move", s.abortMove)
	v1(http.MethodPost, "/instances/{id}/move/cutover", s.cutover)
	v1(http.MethodPost, "/instances/{id}/move/forward", s.forward)
	v1(http.MethodPost, "/instances/{id}/promote", s.promote)
	v1(http.MethodGet, "/instances/{id}/replication", s.replication)
	v1(http.MethodGet, "/capacity", s.capacity)
	v1(http.MethodPut, "/drain", s.setDrain(true))
	v1(http.MethodDelete, "/drain", s.setDrain(false))
	v1(http.MethodGet, "/orphans", s.orphans)
	v1(http.MethodGet, "/ca", s.getCA)
	return r
}

// methods are those a route may be registered with, in the order an Allow
// header lists them.
var methods = []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete}

// allowed returns the methods router serves on req's path.
func allowed(router *mux.Router, req *http.Request) []string {
	var allow []string
	for _, m := range methods {
		try := req.WithContext(req.Context())
		try.Method = m
		var match mux.RouteMatch
		if router.Match(try, &match) && match.MatchErr == nil {
			allow = append(allow, m)
		}
	}
	return allow
}
