package broker

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// The OSB API. Status codes and bodies follow the OSB v2.17 status tables
// (broker/openapi.yaml has them route by route).

// MinAPIVersion is the oldest X-Broker-API-Version the broker serves.
const MinAPIVersion = "2.13"

// osbError is the OSB error body.
type osbError struct {
	Error            string `json:"error,omitempty"`
	Description      string `json:"description,omitempty"`
	InstanceUsable   *bool  `json:"instance_usable,omitempty"`
	UpdateRepeatable *bool  `json:"update_repeatable,omitempty"`
}

// OSB error codes.
const (
	codeAsyncRequired           = "AsyncRequired"
	codeConcurrency             = "ConcurrencyError"
	codeMaintenanceInfoConflict = "MaintenanceInfoConflict"
)

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"description":"cannot encode the response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

func fail(w http.ResponseWriter, code int, osbCode, format string, args ...any) {
	writeJSON(w, code, osbError{Error: osbCode, Description: fmt.Sprintf(format, args...)})
}

// empty is the {} body OSB answers with where it has nothing to say.
var empty = struct{}{}

// supportedVersion reports whether an X-Broker-API-Version is 2.13 or
// later within major version 2.
func supportedVersion(v string) bool {
	major, minor, ok := strings.Cut(strings.TrimSpace(v), ".")
	if !ok || major != "2" {
		return false
	}
	n, err := strconv.Atoi(minor)
	return err == nil && n >= 13
}

type ctxKey int

const identityKey ctxKey = 0

// osbMiddleware applies, in this order, what OSB asks of every request:
// the API version (412), basic auth (401), the request identity echoed,
// and the originating identity decoded for the logs.
func (b *Broker) osbMiddleware(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if id := r.Header.Get("X-Broker-API-Request-Identity"); id != "" {
			w.Header().Set("X-Broker-API-Request-Identity", id)
		}
		if v := r.Header.Get("X-Broker-API-Version"); !supportedVersion(v) {
			fail(w, http.StatusPreconditionFailed, "", "X-Broker-API-Version %q: this broker serves %s and later 2.x", v, MinAPIVersion)
			return
		}
		u, p, ok := r.BasicAuth()
		if !ok || !equal(u, b.cfg.Username) || !equal(p, b.cfg.Password) {
			w.Header().Set("WWW-Authenticate", `Basic realm="redis-broker"`)
			fail(w, http.StatusUnauthorized, "", "basic auth credentials required")
			return
		}
		if oi := r.Header.Get("X-Broker-API-Originating-Identity"); oi != "" {
			r = r.WithContext(context.WithValue(r.Context(), identityKey, originatingIdentity(oi)))
		}
		h(w, r)
	}
}

// originatingIdentity decodes "platform base64(json)" into something a log
// line shows: "cloudfoundry {"user_id":"..."}".
func originatingIdentity(h string) string {
	platform, value, _ := strings.Cut(strings.TrimSpace(h), " ")
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(value))
	if err != nil || !json.Valid(b) {
		return platform + " (undecodable identity)"
	}
	return platform + " " + string(b)
}

// logFor is the broker's logger with the request's originating identity.
func (b *Broker) logFor(r *http.Request, iid string) *slog.Logger {
	l := b.log.With("instance", iid)
	if oi, ok := r.Context().Value(identityKey).(string); ok {
		l = l.With("originating_identity", oi)
	}
	if rid := r.Header.Get("X-Broker-API-Request-Identity"); rid != "" {
		l = l.With("request_identity", rid)
	}
	return l
}

// readBody decodes a JSON object body into v; unknown fields are ignored,
// as OSB asks. It answers 400 itself and returns false on a bad body.
func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		fail(w, http.StatusBadRequest, "", "cannot read the request body (at most 1 MiB)")
		return false
	}
	if len(bytes.TrimSpace(body)) == 0 {
		fail(w, http.StatusBadRequest, "", "a JSON body is required")
		return false
	}
	if err := json.Unmarshal(body, v); err != nil {
		fail(w, http.StatusBadRequest, "", "malformed JSON body: %v", err)
		return false
	}
	return true
}

func acceptsIncomplete(r *http.Request) bool {
	return r.URL.Query().Get("accepts_incomplete") == "true"
}

// The catalog.

type osbCatalog struct {
	Services []osbService `json:"services"`
}

type osbService struct {
	ID                   string    `json:"id"`
	Name                 string    `json:"name"`
	Description          string    `json:"description"`
	Tags                 []string  `json:"tags,omitempty"`
	Bindable             bool      `json:"bindable"`
	InstancesRetrievable bool      `json:"instances_retrievable"`
	BindingsRetrievable  bool      `json:"bindings_retrievable"`
	BindingRotatable     bool      `json:"binding_rotatable"`
	PlanUpdateable       bool      `json:"plan_updateable"`
	Plans                []osbPlan `json:"plans"`
}

type osbPlan struct {
	ID              string           `json:"id"`
	Name            string           `json:"name"`
	Description     string           `json:"description"`
	Free            *bool            `json:"free,omitempty"`
	Bindable        bool             `json:"bindable"`
	PlanUpdateable  bool             `json:"plan_updateable"`
	Metadata        map[string]any   `json:"metadata,omitempty"`
	Schemas         map[string]any   `json:"schemas"`
	MaintenanceInfo *maintenanceInfo `json:"maintenance_info,omitempty"`
}

type maintenanceInfo struct {
	Version     string `json:"version"`
	Description string `json:"description,omitempty"`
}

// maintenance is the maintenance_info of every plan: the Redis version the
// ready agents give new instances (the newest, where they differ), so a
// platform sees when an upgrade is available.
func (b *Broker) maintenance() *maintenanceInfo {
	best := ""
	for _, a := range b.fleet.agents {
		if _, ready, _, capa, _, _ := a.snapshot(); ready && versionLess(best, capa.RedisVersion) {
			best = capa.RedisVersion
		}
	}
	if best == "" {
		return nil
	}
	return &maintenanceInfo{Version: best, Description: "Redis " + best}
}

// versionLess compares dotted version numbers ("" is the least).
func versionLess(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := range max(len(pa), len(pb)) {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(pa[i])
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(pb[i])
		}
		if x != y {
			return x < y
		}
	}
	return a == "" && b != ""
}

func (b *Broker) getCatalog(w http.ResponseWriter, r *http.Request) {
	mi := b.maintenance()
	out := osbCatalog{Services: []osbService{}}
	for _, s := range b.catalog.Services {
		os := osbService{ID: s.ID, Name: s.Name, Description: s.Description, Tags: s.Tags, Bindable: true,
			InstancesRetrievable: true, BindingsRetrievable: true, BindingRotatable: true, PlanUpdateable: s.PlanUpdateable}
		for i := range s.Plans {
			p := &s.Plans[i]
			params := map[string]any{"parameters": p.parametersSchema()}
			os.Plans = append(os.Plans, osbPlan{
				ID: p.ID, Name: p.Name, Description: p.Description, Free: p.Free, Bindable: true, PlanUpdateable: s.PlanUpdateable,
				Metadata: map[string]any{"memory_mb": p.MemoryMB, "persistence": p.Persistence},
				Schemas: map[string]any{
					"service_instance": map[string]any{"create": params, "update": params},
					"service_binding":  map[string]any{"create": map[string]any{"parameters": noParameters}},
				},
				MaintenanceInfo: mi,
			})
		}
		out.Services = append(out.Services, os)
	}
	writeJSON(w, http.StatusOK, out)
}

// noParameters is the schema of a binding's parameters: none.
var noParameters = map[string]any{"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "additionalProperties": false}

// Instances.

type provisionRequest struct {
	ServiceID        string           `json:"service_id"`
	PlanID           string           `json:"plan_id"`
	OrganizationGUID string           `json:"organization_guid"`
	SpaceGUID        string           `json:"space_guid"`
	Context          json.RawMessage  `json:"context,omitempty"`
	Parameters       json.RawMessage  `json:"parameters,omitempty"`
	MaintenanceInfo  *maintenanceInfo `json:"maintenance_info,omitempty"`
}

// instanceMeta is what the broker stores with an instance on its agent:
// what OSB gives only at provision time, for a fresh broker to answer GET
// and to check a provision sent again.
type instanceMeta struct {
	ServiceID        string          `json:"service_id"`
	PlanID           string          `json:"plan_id"`
	OrganizationGUID string          `json:"organization_guid,omitempty"`
	SpaceGUID        string          `json:"space_guid,omitempty"`
	Context          json.RawMessage `json:"context,omitempty"`
	Parameters       json.RawMessage `json:"parameters,omitempty"`
	// MovingFrom marks the target copy of a snapshot move while the move
	// runs: the instance still lives on that agent. The move clears it
	// once the source is gone.
	MovingFrom string `json:"moving_from,omitempty"`
}

// moveCopy reports whether l is a move's copy that does not serve the
// instance yet (a replica, or a snapshot move's target), or its old place
// that forwards to the new one.
func moveCopy(l located) bool {
	m, _ := metaOf(l.inst)
	return l.inst.ReplicaOf != "" || l.inst.Move != nil || m.MovingFrom != ""
}

func metaOf(in apitype.Instance) (instanceMeta, bool) {
	var m instanceMeta
	if len(in.Metadata) == 0 || json.Unmarshal(in.Metadata, &m) != nil || m.ServiceID == "" {
		return m, false
	}
	return m, true
}

func (m instanceMeta) raw() json.RawMessage {
	b, _ := json.Marshal(m)
	return b
}

type provisionResponse struct {
	DashboardURL string         `json:"dashboard_url,omitempty"`
	Operation    string         `json:"operation,omitempty"`
	Metadata     map[string]any `json:"metadata,omitempty"`
}

func responseMetadata(agent string, in apitype.Instance) map[string]any {
	return map[string]any{"labels": map[string]string{"agent": agent},
		"attributes": map[string]any{"host": in.Host, "port": in.Port, "memory_mb": in.MemoryMB, "persistence": in.Persistence}}
}

func (b *Broker) provision(w http.ResponseWriter, r *http.Request) {
	iid := r.PathValue("iid")
	var req provisionRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.ServiceID == "" || req.PlanID == "" {
		fail(w, http.StatusBadRequest, "", "service_id and plan_id are required")
		return
	}
	svc, plan := b.catalog.find(req.ServiceID, req.PlanID)
	if svc == nil || plan == nil {
		fail(w, http.StatusBadRequest, "", "service_id %q and plan_id %q are not in the catalog", req.ServiceID, req.PlanID)
		return
	}
	if req.OrganizationGUID == "" || req.SpaceGUID == "" {
		fail(w, http.StatusBadRequest, "", "organization_guid and space_guid are required")
		return
	}
	params, err := plan.checkParameters(req.Parameters)
	if err != nil {
		fail(w, http.StatusBadRequest, "", "%v", err)
		return
	}
	if mi := b.maintenance(); req.MaintenanceInfo != nil && (mi == nil || req.MaintenanceInfo.Version != mi.Version) {
		fail(w, http.StatusUnprocessableEntity, codeMaintenanceInfoConflict, "maintenance_info.version %q is not the catalog's", req.MaintenanceInfo.Version)
		return
	}
	if err := checkID(iid); err != nil {
		fail(w, http.StatusBadRequest, "", "%v", err)
		return
	}
	unlock, ok := b.locks.tryLock(iid, "provision")
	if !ok {
		fail(w, http.StatusUnprocessableEntity, codeConcurrency, "another operation on instance %s is in progress", iid)
		return
	}
	defer unlock()
	log := b.logFor(r, iid)
	spec := plan.spec(params)
	spec.Metadata = instanceMeta{ServiceID: req.ServiceID, PlanID: req.PlanID, OrganizationGUID: req.OrganizationGUID,
		SpaceGUID: req.SpaceGUID, Context: req.Context, Parameters: req.Parameters}.raw()
	t0 := time.Now()
	agent, inst, created, err := b.provisionOn(r.Context(), iid, spec)
	if err != nil {
		b.failAgent(w, log, "provision", err)
		return
	}
	log.Info("provisioned", "agent", agent, "created", created, "plan", plan.Name, "port", inst.Port, "took", time.Since(t0).Round(time.Microsecond))
	b.metrics.observe("provision", t0)
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	writeJSON(w, code, provisionResponse{Metadata: responseMetadata(agent, inst)})
}

// errConflict: the id exists with other attributes (409).
var errConflict = errors.New("exists with other attributes")

// errNoRoom: no agent has room (a 5xx: the platform may try later).
var errNoRoom = errors.New("no agent has room")

// provisionOn creates instance iid with spec where it belongs: on the
// agent that already holds it (identical: created false; other
// attributes: errConflict), else on the agent placement picks, trying the
// next one when an agent turns out full or does not answer.
func (b *Broker) provisionOn(ctx context.Context, iid string, spec apitype.Spec) (agent string, inst apitype.Instance, created bool, err error) {
	found, unreachable, _ := b.fleet.locate(ctx, iid)
	if len(found) > 0 {
		return b.provisionExisting(ctx, iid, spec, found)
	}
	for _, a := range unreachable {
		if a.holds(iid) {
			return "", inst, false, fmt.Errorf("instance %s was last seen on %s: %w", iid, a.cfg.Name, ErrAgentUnreachable)
		}
	}
	// An agent never seen since the broker started may hold it too; a
	// provision goes ahead anyway (the platform keeps working while an
	// agent is down), and a copy found there later is reported.
	if len(unreachable) > 0 {
		b.log.Warn("provisioning while agents that were never seen do not answer", "instance", iid, "agents", names(unreachable))
	}
	var tried []string
	for {
		chosen, rejected, ok := b.fleet.place(ctx, needOf(spec), b.cfg.Strategy, tried...)
		if !ok {
			b.metrics.placementFailures.Inc()
			return "", inst, false, fmt.Errorf("%w for %d MiB: %s", errNoRoom, spec.MemoryMB, rejections(rejected))
		}
		b.log.Info("placement", "instance", iid, "memory_mb", spec.MemoryMB, "strategy", b.cfg.Strategy, "chosen", chosen.Name, "others", rejections(rejected))
		a := b.fleet.agent(chosen.Name)
		pctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
		inst, created, err = a.c.Provision(pctx, iid, spec)
		cancel()
		switch {
		case err == nil:
			b.metrics.placements.WithLabelValues(chosen.Name).Inc()
			if created {
				a.reserve(Need{inst.MemoryMB, inst.Persistence})
			}
			a.remember(inst)
			if kept, ok := b.dedupe(ctx, iid, spec); ok && kept.agent != a {
				// Another broker's copy won the race: that is the instance.
				return kept.agent.cfg.Name, kept.inst, false, nil
			}
			return chosen.Name, inst, created, nil
		case client.IsStatus(err, http.StatusInsufficientStorage):
			b.log.Info("agent full after all; trying the next", "instance", iid, "agent", chosen.Name, "err", err)
		case client.IsStatus(err, http.StatusConflict):
			return chosen.Name, inst, false, fmt.Errorf("on %s: %w", chosen.Name, errConflict)
		case isAgentAnswer(err):
			return chosen.Name, inst, false, fmt.Errorf("agent %s refused the provision: %w", chosen.Name, err)
		default:
			b.log.Warn("agent did not answer a provision; trying the next", "instance", iid, "agent", chosen.Name, "err", err)
			a.markUnreachable(err)
		}
		tried = append(tried, chosen.Name)
	}
}

// provisionExisting answers a provision of an id some agent holds: the
// holder decides whether it is identical.
func (b *Broker) provisionExisting(ctx context.Context, iid string, spec apitype.Spec, found []located) (string, apitype.Instance, bool, error) {
	sortServing(found)
	l := found[0]
	ctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	defer cancel()
	inst, _, err := l.agent.c.Provision(ctx, iid, spec)
	if client.IsStatus(err, http.StatusConflict) {
		return l.agent.cfg.Name, inst, false, fmt.Errorf("on %s: %w", l.agent.cfg.Name, errConflict)
	}
	if err != nil && !isAgentAnswer(err) {
		err = fmt.Errorf("agent %s: %w: %v", l.agent.cfg.Name, ErrAgentUnreachable, err)
	}
	return l.agent.cfg.Name, inst, false, err
}

// dedupe settles a race of two brokers that provisioned one id at once on
// two agents: every broker that sees the id on more than one agent keeps
// the copy on the agent with the lowest name and deletes the others,
// which it may do only while they are fresh (created within a minute,
// without bindings) and identical: a copy with data or other attributes
// is reported, never deleted.
func (b *Broker) dedupe(ctx context.Context, iid string, spec apitype.Spec) (kept located, ok bool) {
	found, _, _ := b.fleet.locateReachable(ctx, iid)
	// A move's copies (a source that forwards or replicates, a replica)
	// are the move's business, not a race's.
	found = slices.DeleteFunc(found, moveCopy)
	if len(found) == 0 {
		return located{}, false
	}
	slices.SortFunc(found, func(x, y located) int { return strings.Compare(x.agent.cfg.Name, y.agent.cfg.Name) })
	for _, l := range found[1:] {
		fresh := time.Since(l.inst.CreatedAt) < time.Minute && len(l.inst.Bindings) == 0
		if !fresh || !bytes.Equal(l.inst.Metadata, found[0].inst.Metadata) {
			b.log.Error("instance exists on more than one agent and cannot be settled by itself", "instance", iid,
				"agents", names([]*agentState{found[0].agent, l.agent}))
			b.metrics.duplicates.Inc()
			continue
		}
		b.log.Warn("two brokers provisioned one instance at once: removing the copy on the higher agent", "instance", iid, "kept", found[0].agent.cfg.Name, "removed", l.agent.cfg.Name)
		dctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
		if err := l.agent.c.Deprovision(dctx, iid); err != nil {
			b.log.Error("remove a duplicate", "instance", iid, "agent", l.agent.cfg.Name, "err", err)
		}
		cancel()
		l.agent.forget(iid)
	}
	return found[0], true
}

func rejections(rs []Rejection) string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = r.Agent + ": " + r.Reason
	}
	return strings.Join(parts, "; ")
}

// isAgentAnswer reports whether err is an answer of the agent (a status
// and a body), as opposed to no answer at all.
func isAgentAnswer(err error) bool {
	var e *client.Error
	return errors.As(err, &e)
}

// failAgent answers an error of an operation on agents.
func (b *Broker) failAgent(w http.ResponseWriter, log *slog.Logger, op string, err error) {
	switch {
	case errors.Is(err, errConflict):
		writeJSON(w, http.StatusConflict, osbError{Description: err.Error()})
		return
	case errors.Is(err, errNoRoom):
		log.Warn(op+": no room", "err", err)
		fail(w, http.StatusServiceUnavailable, "", "%v", err)
		return
	case errors.Is(err, ErrAgentUnreachable):
		log.Error(op+": agent unreachable", "err", err)
		fail(w, http.StatusBadGateway, "", "%v", err)
		return
	}
	var e *client.Error
	if errors.As(err, &e) && e.Status >= 400 && e.Status < 500 {
		log.Warn(op+" refused by the agent", "err", err)
		fail(w, http.StatusBadRequest, "", "%v", err)
		return
	}
	log.Error(op+" failed", "err", err)
	fail(w, http.StatusInternalServerError, "", "%v", err)
}

// checkID refuses an instance or binding id the agents would not take as
// a path element (OSB ids are GUIDs).
func checkID(id string) error {
	if id == "" || len(id) > 64 || id == "." || id == ".." {
		return fmt.Errorf("id %q: want 1 to 64 of A-Z a-z 0-9 . _ -", id)
	}
	for i, c := range id {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')
		if !ok {
			return fmt.Errorf("id %q: want 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . _ -", id)
		}
	}
	return nil
}

// find returns where instance iid lives: one agent (the lowest named when
// a race left it on two), or an error: errNotFound when no agent holds
// it and every agent that may hold it answered, ErrAgentUnreachable
// naming the agents that did not.
func (b *Broker) find(ctx context.Context, iid string) (located, error) {
	found, unreachable, others := b.fleet.locate(ctx, iid)
	if len(found) > 0 {
		sortServing(found)
		return found[0], nil
	}
	if len(unreachable) > 0 {
		return located{}, unreachableErr(iid, unreachable)
	}
	if len(others) > 0 {
		// Not seen there before, but an instance is placed only on
		// agents that answer: it is not on them unless a broker placed
		// it there since the last look. Say so in the log.
		b.log.Debug("agents did not answer a lookup; the instance was never seen there", "instance", iid, "agents", names(others))
	}
	return located{}, errNotFound
}

var errNotFound = errors.New("no such instance")

// sortServing orders the copies of an instance by which serves it: a
// primary that is not a move's forwarding source first, then a replica,
// then a forwarder; among equals the lowest agent name.
func sortServing(found []located) {
	rank := func(l located) int {
		m, _ := metaOf(l.inst)
		switch {
		case l.inst.Move != nil && l.inst.Move.State == apitype.StateForwarding:
			return 2
		case l.inst.ReplicaOf != "" || m.MovingFrom != "":
			return 1
		}
		return 0
	}
	slices.SortFunc(found, func(x, y located) int {
		if d := rank(x) - rank(y); d != 0 {
			return d
		}
		return strings.Compare(x.agent.cfg.Name, y.agent.cfg.Name)
	})
}

// inMove reports whether l is a copy of a move that has not ended: a
// replica, a source replicating or cut over, a snapshot move's marked
// copy (not a forwarder: that move is done with).
func inMove(l located) bool {
	return moveCopy(l) && (l.inst.Move == nil || l.inst.Move.State != apitype.StateForwarding)
}

// movingOn reports whether one of as, which did not answer, was last seen
// holding a copy of iid other than a forwarder.
func movingOn(as []*agentState, iid string) bool {
	for _, a := range as {
		if in, ok := a.lastSeen(iid); ok && (in.Move == nil || in.Move.State != apitype.StateForwarding) {
			return true
		}
	}
	return false
}

// unreachableErr says that instance iid may live on agents that do not
// answer.
func unreachableErr(iid string, as []*agentState) error {
	return fmt.Errorf("instance %s may live on %s, which does not answer: %w", iid, strings.Join(names(as), ", "), ErrAgentUnreachable)
}

type fetchInstanceResponse struct {
	ServiceID       string           `json:"service_id"`
	PlanID          string           `json:"plan_id"`
	Parameters      json.RawMessage  `json:"parameters,omitempty"`
	MaintenanceInfo *maintenanceInfo `json:"maintenance_info,omitempty"`
	Metadata        map[string]any   `json:"metadata,omitempty"`
}

func (b *Broker) fetchInstance(w http.ResponseWriter, r *http.Request) {
	iid := r.PathValue("iid")
	switch b.locks.kind(iid) {
	case "provision":
		writeJSON(w, http.StatusNotFound, osbError{Description: "instance " + iid + " is being provisioned"})
		return
	case "":
	default:
		fail(w, http.StatusUnprocessableEntity, codeConcurrency, "an operation on instance %s is in progress", iid)
		return
	}
	l, err := b.find(r.Context(), iid)
	if errors.Is(err, errNotFound) {
		writeJSON(w, http.StatusNotFound, empty)
		return
	}
	if err != nil {
		b.failAgent(w, b.logFor(r, iid), "fetch instance", err)
		return
	}
	m, ok := metaOf(l.inst)
	if !ok {
		writeJSON(w, http.StatusNotFound, osbError{Description: "instance " + iid + " was not made by a broker"})
		return
	}
	writeJSON(w, http.StatusOK, fetchInstanceResponse{ServiceID: m.ServiceID, PlanID: m.PlanID, Parameters: m.Parameters,
		MaintenanceInfo: b.maintenanceOf(l), Metadata: responseMetadata(l.agent.cfg.Name, l.inst)})
}

// maintenanceOf is the maintenance_info of an instance: the Redis version
// it runs, as its agent reports it; nil when the agent does not know.
func (b *Broker) maintenanceOf(l located) *maintenanceInfo {
	if l.inst.RedisVersion == "" {
		return nil
	}
	return &maintenanceInfo{Version: l.inst.RedisVersion, Description: "Redis " + l.inst.RedisVersion}
}

// waitUpgrade waits until instance iid runs Redis version on agent a, or
// a's rollout of it failed.
func (b *Broker) waitUpgrade(ctx context.Context, iid string, a *agentState, version string) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		in, err := a.c.Get(ctx, iid)
		if err == nil && in.RedisVersion == version && in.State == apitype.StateRunning {
			a.remember(in)
			return nil
		}
		st, err := a.c.RolloutStatus(ctx)
		if err == nil && st.State == apitype.RolloutFailed && st.FailedInstance == iid {
			return fmt.Errorf("agent %s could not start the instance on Redis %s; it runs its old one again: %s", a.cfg.Name, version, st.Error)
		}
	}
}

func (b *Broker) deprovision(w http.ResponseWriter, r *http.Request) {
	iid := r.PathValue("iid")
	q := r.URL.Query()
	if q.Get("service_id") == "" || q.Get("plan_id") == "" {
		fail(w, http.StatusBadRequest, "", "service_id and plan_id are required")
		return
	}
	// A delete while a provision of the same id is in flight (the
	// platform's orphan mitigation after a timeout) waits for it and then
	// removes what it made.
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	unlock, err := b.locks.lock(ctx, iid, "deprovision")
	if err != nil {
		fail(w, http.StatusUnprocessableEntity, codeConcurrency, "another operation on instance %s is still in progress", iid)
		return
	}
	handedOff := false
	defer func() {
		if !handedOff {
			unlock()
		}
	}()
	log := b.logFor(r, iid)
	found, unreachable, _ := b.fleet.locate(r.Context(), iid)
	if len(unreachable) > 0 {
		b.failAgent(w, log, "deprovision", unreachableErr(iid, unreachable))
		return
	}
	if len(found) == 0 {
		writeJSON(w, http.StatusGone, empty)
		return
	}
	if acceptsIncomplete(r) {
		// The platform polls last_operation; it answers succeeded for a
		// while after the delete, then 410.
		op := b.ops.start(iid, "deprovision", "")
		handedOff = true
		b.background(func() {
			defer unlock()
			b.ops.finish(op, b.deleteAll(b.ctx, log, iid, found))
		})
		writeJSON(w, http.StatusAccepted, operationResponse{Operation: op.id})
		return
	}
	if err := b.deleteAll(r.Context(), log, iid, found); err != nil {
		b.failAgent(w, log, "deprovision", err)
		return
	}
	writeJSON(w, http.StatusOK, empty)
}

// deleteAll deletes instance iid from every agent in found.
func (b *Broker) deleteAll(ctx context.Context, log *slog.Logger, iid string, found []located) error {
	t0 := time.Now()
	for _, l := range found {
		dctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
		err := l.agent.c.Deprovision(dctx, iid)
		cancel()
		if err != nil {
			return fmt.Errorf("on %s: %w", l.agent.cfg.Name, err)
		}
		l.agent.forget(iid)
		l.agent.release(Need{l.inst.MemoryMB, l.inst.Persistence})
		log.Info("deprovisioned", "agent", l.agent.cfg.Name)
	}
	b.metrics.observe("deprovision", t0)
	return nil
}

type updateRequest struct {
	ServiceID       string           `json:"service_id"`
	PlanID          string           `json:"plan_id"`
	Parameters      json.RawMessage  `json:"parameters,omitempty"`
	Context         json.RawMessage  `json:"context,omitempty"`
	MaintenanceInfo *maintenanceInfo `json:"maintenance_info,omitempty"`
}

type operationResponse struct {
	Operation string `json:"operation,omitempty"`
}

func (b *Broker) update(w http.ResponseWriter, r *http.Request) {
	iid := r.PathValue("iid")
	var req updateRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.ServiceID == "" {
		fail(w, http.StatusBadRequest, "", "service_id is required")
		return
	}
	unlock, ok := b.locks.tryLock(iid, "update")
	if !ok {
		fail(w, http.StatusUnprocessableEntity, codeConcurrency, "another operation on instance %s is in progress", iid)
		return
	}
	u, ok := b.planUpdate(w, r, iid, req)
	if !ok {
		unlock()
		return
	}
	var async bool
	switch {
	case u.upgrade != "":
		async = b.upgrade(w, r, u, unlock)
	case u.inPlace:
		b.resizeInPlace(w, r, u)
	default:
		async = b.moveForUpdate(w, r, u, unlock)
	}
	if !async {
		unlock()
	}
}

// updateJob is an update, checked and planned.
type updateJob struct {
	iid     string
	log     *slog.Logger
	l       located      // where the instance lives
	plan    *Plan        // the plan it goes to
	planID  string       // and its id
	want    apitype.Spec // the instance it becomes, metadata included
	upgrade string       // the Redis version to move it to, if that is the update
	inPlace bool         // its agent has room for it
}

// planUpdate checks an update against the instance and the catalog and
// decides what it takes; it answers the error itself and returns false
// when the update is refused.
func (b *Broker) planUpdate(w http.ResponseWriter, r *http.Request, iid string, req updateRequest) (updateJob, bool) {
	u := updateJob{iid: iid, log: b.logFor(r, iid)}
	l, err := b.find(r.Context(), iid)
	if errors.Is(err, errNotFound) {
		fail(w, http.StatusBadRequest, "", "instance %s does not exist", iid)
		return u, false
	}
	if err != nil {
		b.failAgent(w, u.log, "update", err)
		return u, false
	}
	u.l = l
	m, ok := metaOf(l.inst)
	if !ok || m.ServiceID != req.ServiceID {
		fail(w, http.StatusBadRequest, "", "instance %s is not of service %s", iid, req.ServiceID)
		return u, false
	}
	u.planID = cmpOr(req.PlanID, m.PlanID)
	svc, plan := b.catalog.find(m.ServiceID, u.planID)
	if plan == nil {
		fail(w, http.StatusBadRequest, "", "plan_id %q is not a plan of service %s", u.planID, m.ServiceID)
		return u, false
	}
	u.plan = plan
	if u.planID != m.PlanID && !svc.PlanUpdateable {
		fail(w, http.StatusUnprocessableEntity, "", "service %s does not allow plan changes", svc.Name)
		return u, false
	}
	rawParams := req.Parameters
	if rawParams == nil {
		rawParams = m.Parameters
	}
	params, err := plan.checkParameters(rawParams)
	if err != nil {
		fail(w, http.StatusBadRequest, "", "%v", err)
		return u, false
	}
	if req.MaintenanceInfo != nil {
		if mi := b.maintenance(); mi == nil || req.MaintenanceInfo.Version != mi.Version {
			fail(w, http.StatusUnprocessableEntity, codeMaintenanceInfoConflict, "maintenance_info.version %q is not the catalog's", req.MaintenanceInfo.Version)
			return u, false
		}
		if cur := b.maintenanceOf(l); cur == nil || cur.Version != req.MaintenanceInfo.Version {
			_, _, _, capa, _, _ := l.agent.snapshot()
			if capa.RedisVersion != req.MaintenanceInfo.Version {
				fail(w, http.StatusUnprocessableEntity, codeMaintenanceInfoConflict,
					"agent %s, where instance %s lives, does not run Redis %s yet (it offers %s)", l.agent.cfg.Name, iid, req.MaintenanceInfo.Version, capa.RedisVersion)
				return u, false
			}
			if u.planID != m.PlanID {
				fail(w, http.StatusUnprocessableEntity, "", "change the plan and upgrade Redis in two updates, one after the other")
				return u, false
			}
			u.upgrade = req.MaintenanceInfo.Version
		}
	}
	u.want = plan.spec(params)
	newMeta := m
	newMeta.PlanID, newMeta.Parameters = u.planID, rawParams
	if req.Context != nil {
		newMeta.Context = req.Context
	}
	u.want.Metadata = newMeta.raw()
	// An operator's IO limits of the instance go with it.
	u.want.IO = ioSetting(l.inst)
	// In place when the persistence stays and the agent has room: the
	// memory it grows by, and the disk its reservation grows by.
	_, _, _, capa, _, _ := l.agent.snapshot()
	if fresh, err := l.agent.c.Capacity(r.Context()); err == nil {
		capa = fresh
	}
	grows := capa.DiskNeed(u.want.MemoryMB, u.want.Persistence) - capa.DiskNeed(l.inst.MemoryMB, l.inst.Persistence)
	u.inPlace = u.want.Persistence == l.inst.Persistence && u.want.MemoryMB-l.inst.MemoryMB <= capa.MemoryFreeMB && capa.DiskFits(grows)
	if (u.upgrade != "" || !u.inPlace) && !acceptsIncomplete(r) {
		what := "this plan change moves the instance to another agent"
		if u.upgrade != "" {
			what = "an upgrade restarts the instance on its agent's new redis-server"
		}
		fail(w, http.StatusUnprocessableEntity, codeAsyncRequired, "%s, which takes a while: send accepts_incomplete=true", what)
		return u, false
	}
	return u, true
}

// upgrade moves the instance to its agent's new redis-server, in the
// background; it returns whether it took over unlock.
func (b *Broker) upgrade(w http.ResponseWriter, r *http.Request, u updateJob, unlock func()) bool {
	if _, err := u.l.agent.c.StartRollout(r.Context(), u.iid); err != nil {
		b.failAgent(w, u.log, "upgrade", fmt.Errorf("on %s: %w", u.l.agent.cfg.Name, err))
		return false
	}
	op := b.ops.start(u.iid, "upgrade", u.upgrade)
	u.log.Info("upgrading the instance on its agent", "agent", u.l.agent.cfg.Name, "version", u.upgrade, "operation", op.id)
	b.background(func() {
		defer unlock()
		b.ops.finish(op, b.waitUpgrade(b.ctx, u.iid, u.l.agent, u.upgrade))
	})
	writeJSON(w, http.StatusAccepted, operationResponse{Operation: op.id})
	return true
}

// resizeInPlace applies the update on the instance's own agent.
func (b *Broker) resizeInPlace(w http.ResponseWriter, r *http.Request, u updateJob) {
	patch := apitype.Resize{Metadata: u.want.Metadata}
	if u.want.MemoryMB != u.l.inst.MemoryMB {
		patch.MemoryMB = &u.want.MemoryMB
	}
	// The settings the parameters change, live on the agent.
	if w := u.want.MaxmemoryPolicy; w != "" && w != u.l.inst.MaxmemoryPolicy {
		patch.MaxmemoryPolicy = &w
	}
	if w := u.want.MaxmemoryClients; w != "" && w != u.l.inst.MaxmemoryClients {
		patch.MaxmemoryClients = &w
	}
	if w := u.want.TLS; w != "" && w != u.l.inst.TLS {
		patch.TLS = &w
	}
	t0 := time.Now()
	inst, err := u.l.agent.c.Update(r.Context(), u.iid, patch)
	if isAgentAnswer(err) && !client.IsStatus(err, http.StatusNotFound) {
		// Not possible now (shrinking below the data set, no room after
		// all): a 422 changes nothing.
		u.log.Warn("update refused by the agent", "agent", u.l.agent.cfg.Name, "err", err)
		fail(w, http.StatusUnprocessableEntity, "", "agent %s: %v", u.l.agent.cfg.Name, err)
		return
	}
	if err != nil {
		b.failAgent(w, u.log, "update", fmt.Errorf("on %s: %w", u.l.agent.cfg.Name, err))
		return
	}
	u.l.agent.remember(inst)
	u.log.Info("updated in place", "agent", u.l.agent.cfg.Name, "plan", u.plan.Name, "memory_mb", inst.MemoryMB)
	b.metrics.observe("update", t0)
	writeJSON(w, http.StatusOK, empty)
}

// moveForUpdate moves the instance to an agent with room for its new
// plan, in the background; it takes over unlock.
func (b *Broker) moveForUpdate(w http.ResponseWriter, r *http.Request, u updateJob, unlock func()) bool {
	op := b.ops.start(u.iid, "update", u.planID)
	u.log.Info("update moves the instance", "from", u.l.agent.cfg.Name, "plan", u.plan.Name, "operation", op.id)
	b.background(func() {
		defer unlock()
		t0 := time.Now()
		target, _, err := b.move(b.ctx, u.iid, u.l.agent, u.want)
		if errors.Is(err, errUnsettled) {
			u.log.Error("move for a plan change stopped midway: a settle of moves ends it, and last_operation asks the agents how", "err", err)
			b.ops.finish(op, err)
			return
		}
		if err != nil {
			u.log.Error("move for a plan change failed; the instance stays where it was", "err", err)
			b.ops.finish(op, err)
			return
		}
		u.log.Info("moved for a plan change", "from", u.l.agent.cfg.Name, "to", target, "took", time.Since(t0).Round(time.Millisecond))
		b.metrics.observe("move", t0)
		b.ops.finish(op, nil)
	})
	writeJSON(w, http.StatusAccepted, operationResponse{Operation: op.id})
	return true
}

// cmpOr returns a, or b when a is empty.
func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func versionOf(m *maintenanceInfo) string {
	if m == nil {
		return "(unknown)"
	}
	return m.Version
}

type lastOperationResponse struct {
	State       string `json:"state"`
	Description string `json:"description,omitempty"`
}

// OSB operation states.
const (
	opInProgress = "in progress"
	opSucceeded  = "succeeded"
	opFailed     = "failed"
)

func (b *Broker) lastOperation(w http.ResponseWriter, r *http.Request) {
	iid := r.PathValue("iid")
	opID := r.URL.Query().Get("operation")
	kind, plan, known := parseOperation(opID)
	if opID != "" && !known {
		fail(w, http.StatusBadRequest, "", "operation %q is not one this broker started", opID)
		return
	}
	// This broker's operation, unless it left its move to the settle of
	// left moves: then the agents tell, as for another broker's.
	if op, ok := b.ops.get(iid, opID); ok && !op.leftToSettle() {
		st, desc := op.state()
		if st == opInProgress {
			w.Header().Set("Retry-After", "2")
		}
		writeJSON(w, http.StatusOK, lastOperationResponse{State: st, Description: desc})
		return
	}
	// Not this broker's operation (another broker's, or from before a
	// restart): the agents tell. An update's operation names its plan.
	found, unreachable, _ := b.fleet.locate(r.Context(), iid)
	if len(found) == 0 {
		if len(unreachable) > 0 {
			b.failAgent(w, b.logFor(r, iid), "last_operation", unreachableErr(iid, unreachable))
			return
		}
		if kind == "deprovision" {
			// An asynchronous delete that finished: the platform takes
			// Gone as its success.
			writeJSON(w, http.StatusGone, empty)
			return
		}
		writeJSON(w, http.StatusNotFound, empty)
		return
	}
	// A moved instance's old place forwards to its new one for a while:
	// that copy is no longer the instance.
	if serving := slices.DeleteFunc(slices.Clone(found), func(l located) bool {
		return l.inst.Move != nil && l.inst.Move.State == apitype.StateForwarding
	}); len(serving) > 0 {
		found = serving
	}
	sortServing(found)
	switch {
	case kind == "deprovision":
		w.Header().Set("Retry-After", "2")
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opInProgress, Description: "the instance is being deleted"})
	case len(found) > 1:
		w.Header().Set("Retry-After", "2")
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opInProgress, Description: "the instance is being moved"})
	case kind == "upgrade":
		if found[0].inst.RedisVersion == plan {
			writeJSON(w, http.StatusOK, lastOperationResponse{State: opSucceeded})
			return
		}
		st, err := found[0].agent.c.RolloutStatus(r.Context())
		if err == nil && st.State == apitype.RolloutRunning {
			w.Header().Set("Retry-After", "2")
			writeJSON(w, http.StatusOK, lastOperationResponse{State: opInProgress, Description: "the instance's agent is moving it to Redis " + plan})
			return
		}
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opFailed, Description: "the instance does not run Redis " + plan})
	case kind == "update" && slices.ContainsFunc(found, inMove):
		// One copy left, still in a move (a source cut over, a replica):
		// a settle of left moves has yet to finish it or undo it.
		w.Header().Set("Retry-After", "2")
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opInProgress, Description: "the instance is being moved"})
	case kind == "update" && movingOn(unreachable, iid):
		// The other copy is on an agent that does not answer: the move
		// may end either way once it does.
		w.Header().Set("Retry-After", "2")
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opInProgress, Description: "the instance is being moved; agents that hold a copy do not answer: " + strings.Join(names(unreachable), ", ")})
	case kind == "update":
		if m, _ := metaOf(found[0].inst); m.PlanID == plan {
			writeJSON(w, http.StatusOK, lastOperationResponse{State: opSucceeded})
		} else {
			writeJSON(w, http.StatusOK, lastOperationResponse{State: opFailed, Description: "the instance is not on the new plan: the move did not finish (the broker that ran it stopped, or it failed)"})
		}
	default:
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opSucceeded})
	}
}

// Bindings.

type bindRequest struct {
	ServiceID            string          `json:"service_id"`
	PlanID               string          `json:"plan_id"`
	Parameters           json.RawMessage `json:"parameters,omitempty"`
	PredecessorBindingID string          `json:"predecessor_binding_id,omitempty"`
}

type bindResponse struct {
	Credentials apitype.Credentials `json:"credentials"`
	Metadata    map[string]any      `json:"metadata,omitempty"`
}

func (b *Broker) bind(w http.ResponseWriter, r *http.Request) {
	iid, bid := r.PathValue("iid"), r.PathValue("bid")
	var req bindRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.ServiceID == "" || req.PlanID == "" {
		fail(w, http.StatusBadRequest, "", "service_id and plan_id are required")
		return
	}
	if p := strings.TrimSpace(string(req.Parameters)); p != "" && p != "null" && p != "{}" {
		fail(w, http.StatusBadRequest, "", "bindings take no parameters")
		return
	}
	if err := checkID(bid); err != nil || bid == "default" || bid == "agent" {
		fail(w, http.StatusBadRequest, "", "binding id %q: not one the agents take (ids are GUIDs; default and agent are reserved)", bid)
		return
	}
	if b.locks.kind(iid) != "" {
		fail(w, http.StatusUnprocessableEntity, codeConcurrency, "an operation on instance %s is in progress", iid)
		return
	}
	log := b.logFor(r, iid).With("binding", bid)
	l, err := b.find(r.Context(), iid)
	if errors.Is(err, errNotFound) {
		fail(w, http.StatusBadRequest, "", "instance %s does not exist", iid)
		return
	}
	if err != nil {
		b.failAgent(w, log, "bind", err)
		return
	}
	if req.PredecessorBindingID != "" && !slices.Contains(l.inst.Bindings, req.PredecessorBindingID) {
		fail(w, http.StatusBadRequest, "", "predecessor_binding_id %q is not a binding of instance %s", req.PredecessorBindingID, iid)
		return
	}
	creds, created, err := l.agent.c.Bind(r.Context(), iid, bid, "")
	if err != nil {
		b.failAgent(w, log, "bind", fmt.Errorf("on %s: %w", l.agent.cfg.Name, err))
		return
	}
	log.Info("bound", "agent", l.agent.cfg.Name, "created", created, "predecessor", req.PredecessorBindingID)
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	writeJSON(w, code, bindResponse{Credentials: creds})
}

func (b *Broker) fetchBinding(w http.ResponseWriter, r *http.Request) {
	iid, bid := r.PathValue("iid"), r.PathValue("bid")
	l, err := b.find(r.Context(), iid)
	if errors.Is(err, errNotFound) {
		writeJSON(w, http.StatusNotFound, empty)
		return
	}
	if err != nil {
		b.failAgent(w, b.logFor(r, iid), "fetch binding", err)
		return
	}
	creds, err := l.agent.c.Binding(r.Context(), iid, bid)
	if client.IsStatus(err, http.StatusNotFound) || client.IsStatus(err, http.StatusUnprocessableEntity) {
		writeJSON(w, http.StatusNotFound, empty)
		return
	}
	if err != nil {
		b.failAgent(w, b.logFor(r, iid), "fetch binding", fmt.Errorf("on %s: %w", l.agent.cfg.Name, err))
		return
	}
	writeJSON(w, http.StatusOK, bindResponse{Credentials: creds})
}

func (b *Broker) unbind(w http.ResponseWriter, r *http.Request) {
	iid, bid := r.PathValue("iid"), r.PathValue("bid")
	q := r.URL.Query()
	if q.Get("service_id") == "" || q.Get("plan_id") == "" {
		fail(w, http.StatusBadRequest, "", "service_id and plan_id are required")
		return
	}
	log := b.logFor(r, iid).With("binding", bid)
	l, err := b.find(r.Context(), iid)
	if errors.Is(err, errNotFound) {
		writeJSON(w, http.StatusGone, empty)
		return
	}
	if err != nil {
		b.failAgent(w, log, "unbind", err)
		return
	}
	if !slices.Contains(l.inst.Bindings, bid) {
		writeJSON(w, http.StatusGone, empty)
		return
	}
	if err := l.agent.c.Unbind(r.Context(), iid, bid); err != nil {
		b.failAgent(w, log, "unbind", fmt.Errorf("on %s: %w", l.agent.cfg.Name, err))
		return
	}
	log.Info("unbound", "agent", l.agent.cfg.Name)
	writeJSON(w, http.StatusOK, empty)
}

func (b *Broker) bindingLastOperation(w http.ResponseWriter, r *http.Request) {
	// Bindings are made and removed synchronously: there is never one in
	// progress. The binding's presence says how the last one ended.
	iid, bid := r.PathValue("iid"), r.PathValue("bid")
	l, err := b.find(r.Context(), iid)
	if err == nil && slices.Contains(l.inst.Bindings, bid) {
		writeJSON(w, http.StatusOK, lastOperationResponse{State: opSucceeded})
		return
	}
	if err != nil && !errors.Is(err, errNotFound) {
		b.failAgent(w, b.logFor(r, iid), "binding last_operation", err)
		return
	}
	writeJSON(w, http.StatusGone, empty)
}
