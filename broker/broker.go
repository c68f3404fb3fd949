// Package broker is redis-broker: an Open Service Broker (OSB API v2.17)
// in front of many redis-agents. It sells the plans of its catalog,
// places each new instance on the agent with room (filter, then score:
// see Place), hands out one ACL user per binding, resizes on a plan
// change, moves an instance to another agent when its own has no room or
// is drained, and tells operators where everything is.
//
// It is stateless: the agents are the truth. Where each instance lives is
// learned by asking them (a cache rebuilt at start and refreshed), and
// what OSB gives only at provision time (service, plan, organization,
// space, context, parameters) is stored on the agent with the instance as
// its metadata, so a fresh broker, or a second one behind the same load
// balancer, answers as the first would. It talks to agents only over
// their REST API through client/ and apitype, never importing the agent.
package broker

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

// Config is what a Broker needs.
type Config struct {
	// Username and Password are the platform's HTTP basic credentials for
	// /v2.
	Username, Password string
	// AdminUsername and AdminPassword guard /admin; empty means /admin is
	// off.
	AdminUsername, AdminPassword string
	// Agents are the agents to place instances on.
	Agents []AgentConfig
	// Catalog is what the broker sells; zero means DefaultCatalog.
	Catalog Catalog
	// Strategy ranks the agents with room; "" means Spread.
	Strategy Strategy
	// AgentTimeout bounds one request to an agent (not a snapshot's
	// transfer); 0 means 10 s.
	AgentTimeout time.Duration
	// Refresh is how often the fleet is looked at again; 0 means 30 s.
	Refresh time.Duration
	// OperationTTL is how long a finished asynchronous operation is still
	// answered by last_operation; 0 means 1 h.
	OperationTTL time.Duration
	// SnapshotMoves makes every move a snapshot and a restore, never a
	// replication (for agents that cannot reach each other).
	SnapshotMoves bool
	// StaleMove and StaleCutover are how old a move a stopped broker left
	// must be before this broker settles it (settleMoves): one still
	// replicating, and one cut over. 0 means 35 minutes (longer than any
	// move's sync may take) and 1 minute. Shorter bounds are for tests: a
	// bound shorter than a running move's steps lets another broker undo
	// that move under it.
	StaleMove, StaleCutover time.Duration
	// HTTP is the client for agents (TLS settings); nil means a default.
	HTTP *http.Client
	// Logger receives the broker's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Validate checks c.
func (c Config) Validate() error {
	var errs []error
	if c.Username == "" || c.Password == "" {
		errs = append(errs, errors.New("the platform's basic auth username and password are required"))
	}
	if len(c.Agents) == 0 {
		errs = append(errs, errors.New("no agents: configure at least one"))
	}
	if c.Strategy != "" && c.Strategy != Spread && c.Strategy != Pack {
		errs = append(errs, fmt.Errorf("strategy %q: want spread or pack", c.Strategy))
	}
	return errors.Join(errs...)
}

// Broker serves the OSB API and the operators' /admin API.
type Broker struct {
	cfg     Config
	log     *slog.Logger
	fleet   *Fleet
	catalog Catalog
	metrics *metrics

	ops        *operations
	locks      idLocks
	drains     drains
	recoveries recoveries

	// wg counts background work (moves, drains) Close waits for.
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

// New returns a Broker for cfg; call Start before serving.
func New(cfg Config) (*Broker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.AgentTimeout <= 0 {
		cfg.AgentTimeout = 10 * time.Second
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = 30 * time.Second
	}
	if cfg.OperationTTL <= 0 {
		cfg.OperationTTL = time.Hour
	}
	if cfg.StaleMove <= 0 {
		cfg.StaleMove = staleMove
	}
	if cfg.StaleCutover <= 0 {
		cfg.StaleCutover = staleCutover
	}
	if cfg.Strategy == "" {
		cfg.Strategy = Spread
	}
	if len(cfg.Catalog.Services) == 0 {
		cfg.Catalog = DefaultCatalog()
	}
	fleet, err := NewFleet(cfg.Agents, cfg.HTTP, cfg.AgentTimeout)
	if err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: cfg.Logger, fleet: fleet, catalog: cfg.Catalog, ops: newOperations(cfg.OperationTTL)}
	b.metrics = newMetrics(b)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	return b, nil
}

// Start looks at every agent once, then keeps looking every Refresh in
// the background, until Close.
func (b *Broker) Start(ctx context.Context) {
	t0 := time.Now()
	b.fleet.Refresh(ctx)
	n := 0
	for _, a := range b.fleet.agents {
		_, _, _, _, _, k := a.snapshot()
		n += k
	}
	b.log.Info("fleet looked at", "agents", len(b.fleet.agents), "instances", n, "took", time.Since(t0).Round(time.Millisecond))
	b.background(func() {
		t := time.NewTicker(b.cfg.Refresh)
		defer t.Stop()
		for {
			select {
			case <-b.ctx.Done():
				return
			case <-t.C:
				b.fleet.Refresh(b.ctx)
				b.settleMoves(b.ctx)
			}
		}
	})
}

// Close stops background work and waits for it; a move in flight is
// rolled back by its own context ending.
func (b *Broker) Close() {
	b.cancel()
	b.wg.Wait()
}

func (b *Broker) background(fn func()) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		fn()
	}()
}

// Ready reports whether at least one agent answers.
func (b *Broker) Ready() error {
	for _, a := range b.fleet.agents {
		if reachable, _, _, _, _, _ := a.snapshot(); reachable {
			return nil
		}
	}
	return errors.New("no agent answers")
}

// Handler returns the broker's HTTP API.
func (b *Broker) Handler() http.Handler {
	mux := http.NewServeMux()
	osb := func(pattern string, h http.HandlerFunc) {
		mux.Handle(pattern, b.metrics.instrument(pattern, b.osbMiddleware(h)))
	}
	osb("GET /v2/catalog", b.getCatalog)
	osb("PUT /v2/service_instances/{iid}", b.provision)
	osb("PATCH /v2/service_instances/{iid}", b.update)
	osb("GET /v2/service_instances/{iid}", b.fetchInstance)
	osb("DELETE /v2/service_instances/{iid}", b.deprovision)
	osb("GET /v2/service_instances/{iid}/last_operation", b.lastOperation)
	osb("PUT /v2/service_instances/{iid}/service_bindings/{bid}", b.bind)
	osb("GET /v2/service_instances/{iid}/service_bindings/{bid}", b.fetchBinding)
	osb("DELETE /v2/service_instances/{iid}/service_bindings/{bid}", b.unbind)
	osb("GET /v2/service_instances/{iid}/service_bindings/{bid}/last_operation", b.bindingLastOperation)
	admin := func(pattern string, h http.HandlerFunc) {
		mux.Handle(pattern, b.metrics.instrument(pattern, b.adminAuth(h)))
	}
	admin("GET /admin/agents", b.listAgents)
	admin("POST /admin/agents/{name}/drain", b.startDrain)
	admin("GET /admin/agents/{name}/drain", b.drainStatus)
	admin("DELETE /admin/agents/{name}/drain", b.stopDrain)
	admin("POST /admin/agents/{name}/recover", b.startRecover)
	admin("GET /admin/agents/{name}/recover", b.recoverStatus)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := b.Ready(); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, osbError{Error: "NotReady", Description: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	})
	mux.Handle("GET /metrics", b.metrics.handler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no such route"})
	})
	return mux
}

// equal compares secrets in constant time.
func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }

// adminAuth guards /admin with its own basic credentials.
func (b *Broker) adminAuth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if b.cfg.AdminUsername == "" {
			writeJSON(w, http.StatusNotFound, osbError{Description: "the admin API is off: configure an admin credential"})
			return
		}
		u, p, ok := r.BasicAuth()
		if !ok || !equal(u, b.cfg.AdminUsername) || !equal(p, b.cfg.AdminPassword) {
			w.Header().Set("WWW-Authenticate", `Basic realm="redis-broker admin"`)
			writeJSON(w, http.StatusUnauthorized, osbError{Description: "admin credentials required"})
			return
		}
		h(w, r)
	}
}

// idLocks serialises the mutations of one instance within this broker
// and tells which is in flight.
type idLocks struct {
	mu sync.Mutex
	m  map[string]*idLock
}

type idLock struct {
	ch   chan struct{} // holds one token: the lock
	refs int
	kind string // the holder's operation; guarded by idLocks.mu
}

// tryLock takes id's lock for an operation of kind when it is free.
func (l *idLocks) tryLock(id, kind string) (unlock func(), ok bool) {
	e := l.entry(id)
	select {
	case <-e.ch:
		return l.held(id, e, kind), true
	default:
		l.release(id, e)
		return nil, false
	}
}

// lock waits for id's lock, at most until ctx ends.
func (l *idLocks) lock(ctx context.Context, id, kind string) (unlock func(), err error) {
	e := l.entry(id)
	select {
	case <-e.ch:
		return l.held(id, e, kind), nil
	case <-ctx.Done():
		l.release(id, e)
		return nil, ctx.Err()
	}
}

func (l *idLocks) held(id string, e *idLock, kind string) func() {
	l.mu.Lock()
	e.kind = kind
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		e.kind = ""
		l.mu.Unlock()
		e.ch <- struct{}{}
		l.release(id, e)
	}
}

// kind returns the operation in flight on id, or "".
func (l *idLocks) kind(id string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.m[id]; e != nil {
		return e.kind
	}
	return ""
}

func (l *idLocks) entry(id string) *idLock {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]*idLock{}
	}
	e := l.m[id]
	if e == nil {
		e = &idLock{ch: make(chan struct{}, 1)}
		e.ch <- struct{}{}
		l.m[id] = e
	}
	e.refs++
	return e
}

func (l *idLocks) release(id string, e *idLock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(l.m, id)
	}
}
