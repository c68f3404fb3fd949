package broker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"sync"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
)

// The operators' API: the fleet, and drains.

// AgentStatus is one agent as GET /admin/agents shows it.
type AgentStatus struct {
	Name      string           `json:"name"`
	URL       string           `json:"url"`
	Zone      string           `json:"zone"`
	Reachable bool             `json:"reachable"`
	Ready     bool             `json:"ready"`
	Draining  bool             `json:"draining"`
	Error     string           `json:"error,omitempty"`
	Capacity  apitype.Capacity `json:"capacity"`
	// Instances are the ids the agent was last seen holding.
	Instances []string `json:"instances"`
	// SeenAt is the last time it answered.
	SeenAt *time.Time `json:"seen_at,omitempty"`
}

// AgentList is the body of GET /admin/agents.
type AgentList struct {
	Agents []AgentStatus `json:"agents"`
}

func (b *Broker) agentStatuses() []AgentStatus {
	out := make([]AgentStatus, 0, len(b.fleet.agents))
	for _, a := range b.fleet.agents {
		reachable, ready, draining, capa, err, _ := a.snapshot()
		st := AgentStatus{Name: a.cfg.Name, URL: a.cfg.URL, Zone: a.cfg.Zone, Reachable: reachable, Ready: ready,
			Draining: draining, Capacity: capa, Instances: a.held()}
		if err != nil {
			st.Error = err.Error()
		}
		a.mu.Lock()
		if !a.seen.IsZero() {
			seen := a.seen
			st.SeenAt = &seen
		}
		a.mu.Unlock()
		out = append(out, st)
	}
	return out
}

func (b *Broker) listAgents(w http.ResponseWriter, r *http.Request) {
	b.fleet.Refresh(r.Context())
	writeJSON(w, http.StatusOK, AgentList{Agents: b.agentStatuses()})
}

// Drain states.
const (
	DrainRunning = "running"
	DrainDone    = "done"
	DrainFailed  = "failed"
)

// Drain is the progress of draining one agent.
type Drain struct {
	Agent      string     `json:"agent"`
	State      string     `json:"state"`
	Total      int        `json:"total"`
	Moved      int        `json:"moved"`
	Current    string     `json:"current,omitempty"`
	Error      string     `json:"error,omitempty"`
	StartedAt  time.Time  `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	// Unavailable is, by instance, how long it took no writes: a
	// replication move's cutover (writes wait, none is lost), or a
	// snapshot move's copy (from the snapshot's start to the source's
	// removal; writes in that window stay on the source and are lost).
	Unavailable map[string]float64 `json:"unavailable_seconds,omitempty"`
}

// drains are the drains this broker runs or ran, by agent.
type drains struct {
	mu sync.Mutex
	m  map[string]*Drain
}

func (d *drains) get(name string) (Drain, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.m == nil || d.m[name] == nil {
		return Drain{}, false
	}
	return d.m[name].copy(), true
}

// copy is d with a map of its own, for a reader outside the lock.
func (d *Drain) copy() Drain {
	c := *d
	c.Unavailable = maps.Clone(d.Unavailable)
	return c
}

func (d *drains) update(name string, fn func(*Drain)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fn(d.m[name])
}

// start records a new drain of name unless one runs; it returns the
// current one then.
func (d *drains) start(name string) (Drain, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.m == nil {
		d.m = map[string]*Drain{}
	}
	if cur := d.m[name]; cur != nil && cur.State == DrainRunning {
		return cur.copy(), false
	}
	dr := &Drain{Agent: name, State: DrainRunning, StartedAt: time.Now().UTC(), Unavailable: map[string]float64{}}
	d.m[name] = dr
	return dr.copy(), true
}

// startDrain marks the agent draining (nothing new is placed there) and
// moves its instances to other agents one at a time; it stops at the
// first failure, leaving that instance serving on the agent.
func (b *Broker) startDrain(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	a := b.fleet.agent(name)
	if a == nil {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no agent named " + name})
		return
	}
	// The mark is kept on the agent: every broker, and this one after a
	// restart, places nothing there.
	if err := a.c.SetDraining(r.Context(), true); err != nil {
		fail(w, http.StatusBadGateway, "", "mark agent %s draining: %v", name, err)
		return
	}
	a.setDraining(true)
	dr, started := b.drains.start(name)
	if !started {
		writeJSON(w, http.StatusAccepted, dr)
		return
	}
	b.log.Info("draining agent", "agent", name)
	b.background(func() { b.runDrain(b.ctx, a) })
	writeJSON(w, http.StatusAccepted, dr)
}

func (b *Broker) runDrain(ctx context.Context, a *agentState) {
	name := a.cfg.Name
	finish := func(err error) {
		now := time.Now().UTC()
		b.drains.update(name, func(d *Drain) {
			d.State, d.FinishedAt, d.Current = DrainDone, &now, ""
			if err != nil {
				d.State, d.Error = DrainFailed, err.Error()
			}
		})
		if err != nil {
			b.log.Error("drain stopped", "agent", name, "err", err)
		} else {
			b.log.Info("drained agent", "agent", name)
		}
	}
	lctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	list, err := a.c.List(lctx)
	cancel()
	if err != nil {
		finish(fmt.Errorf("list the instances of %s: %w", name, err))
		return
	}
	b.drains.update(name, func(d *Drain) { d.Total = len(list) })
	for _, in := range list {
		if _, _, draining, _, _, _ := a.snapshot(); !draining {
			finish(errors.New("stopped by an operator (DELETE /admin/agents/" + name + "/drain)"))
			return
		}
		b.drains.update(name, func(d *Drain) { d.Current = in.ID })
		unlock, err := b.locks.lock(ctx, in.ID, "move")
		if err != nil {
			finish(err)
			return
		}
		t0 := time.Now()
		spec := apitype.Spec{MemoryMB: in.MemoryMB, Persistence: in.Persistence, Metadata: in.Metadata, IO: ioSetting(in)}
		target, unavailable, err := b.move(ctx, in.ID, a, spec)
		unlock()
		if err != nil {
			finish(fmt.Errorf("move %s: %w", in.ID, err))
			return
		}
		b.metrics.observe("move", t0)
		b.log.Info("moved for a drain", "instance", in.ID, "from", name, "to", target, "took", time.Since(t0).Round(time.Millisecond), "unavailable", unavailable.Round(time.Millisecond))
		b.drains.update(name, func(d *Drain) { d.Moved++; d.Unavailable[in.ID] = unavailable.Seconds() })
	}
	finish(nil)
}

func (b *Broker) drainStatus(w http.ResponseWriter, r *http.Request) {
	agentJobStatus(b, w, r, "drain", b.drains.get)
}

// agentJobStatus answers the GET of the job of kind what (a drain, a
// recovery) of the agent the path names, which get finds by that name: a
// 404 for an agent the broker does not know, or a job it has not run.
func agentJobStatus[T any](b *Broker, w http.ResponseWriter, r *http.Request, what string, get func(agent string) (T, bool)) {
	name := r.PathValue("name")
	if b.fleet.agent(name) == nil {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no agent named " + name})
		return
	}
	job, ok := get(name)
	if !ok {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no " + what + " of " + name + " since this broker started"})
		return
	}
	writeJSON(w, http.StatusOK, job)
}

// stopDrain clears an agent's draining mark: new instances may be placed
// there again. A drain in progress stops after the instance it moves.
func (b *Broker) stopDrain(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	a := b.fleet.agent(name)
	if a == nil {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no agent named " + name})
		return
	}
	if err := a.c.SetDraining(r.Context(), false); err != nil {
		fail(w, http.StatusBadGateway, "", "clear agent %s's drain mark: %v", name, err)
		return
	}
	a.setDraining(false)
	b.log.Info("agent no longer draining", "agent", name)
	writeJSON(w, http.StatusOK, empty)
}
