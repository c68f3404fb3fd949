package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// AgentConfig is one agent the broker places instances on.
type AgentConfig struct {
	// Name identifies the agent in logs, metrics and /admin.
	Name string `yaml:"name"`
	// URL is the agent's API, e.g. https://10.0.0.5:7070.
	URL string `yaml:"url"`
	// Token is its bearer token, if it wants one.
	Token string `yaml:"token"`
	// Zone is a failure domain label; placement spreads across zones.
	Zone string `yaml:"zone"`
}

// agentState is what the broker last saw of one agent.
type agentState struct {
	cfg AgentConfig
	c   *client.Client

	mu        sync.Mutex
	reachable bool
	ready     bool
	draining  bool
	err       error // why it was not reachable or ready at the last look
	capacity  apitype.Capacity
	capAt     time.Time                   // when capacity was read; placements in between adjust it
	instances map[string]apitype.Instance // by id, at the last look
	seen      time.Time                   // the last successful look
}

func (a *agentState) snapshot() (reachable, ready, draining bool, capa apitype.Capacity, err error, n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.reachable, a.ready, a.draining, a.capacity, a.err, len(a.instances)
}

// Fleet is the broker's view of its agents: their readiness, room and
// instances, learned by asking them. It is a cache the broker rebuilds at
// start and refreshes; the agents are the truth.
type Fleet struct {
	agents []*agentState // in configuration order
	byName map[string]*agentState
	// timeout bounds one look at one agent.
	timeout time.Duration
}

// NewFleet returns a fleet of the configured agents; nothing is asked yet.
func NewFleet(cfgs []AgentConfig, hc *http.Client, timeout time.Duration) (*Fleet, error) {
	f := &Fleet{byName: map[string]*agentState{}, timeout: timeout}
	for _, c := range cfgs {
		if c.Name == "" || c.URL == "" {
			return nil, fmt.Errorf("agent %q: want a name and a url", c.Name)
		}
		if f.byName[c.Name] != nil {
			return nil, fmt.Errorf("agent %q is configured twice", c.Name)
		}
		cl := client.New(c.URL, c.Token)
		if hc != nil {
			cl.HTTP = hc
		}
		a := &agentState{cfg: c, c: cl, instances: map[string]apitype.Instance{}}
		f.agents = append(f.agents, a)
		f.byName[c.Name] = a
	}
	if len(f.agents) == 0 {
		return nil, errors.New("no agents configured")
	}
	return f, nil
}

// Refresh asks every agent, in parallel, for its readiness, capacity and
// instances. An agent that does not answer keeps the instances it was
// last seen with (so the broker still knows where they live) and is
// marked unreachable.
func (f *Fleet) Refresh(ctx context.Context) {
	var wg sync.WaitGroup
	for _, a := range f.agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.look(ctx, a)
		}()
	}
	wg.Wait()
}

// look refreshes one agent.
func (f *Fleet) look(ctx context.Context, a *agentState) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	list, err := a.c.List(ctx)
	var capa apitype.Capacity
	if err == nil {
		capa, err = a.c.Capacity(ctx)
	}
	readyErr := err
	if err == nil {
		readyErr = a.c.Ready(ctx)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reachable = err == nil
	a.ready = readyErr == nil
	a.err = readyErr
	if err != nil {
		return
	}
	a.capacity, a.capAt = capa, time.Now()
	a.draining = capa.Draining
	a.instances = make(map[string]apitype.Instance, len(list))
	for _, in := range list {
		a.instances[in.ID] = in
	}
	a.seen = time.Now()
}

// agent returns the agent named name.
func (f *Fleet) agent(name string) *agentState { return f.byName[name] }

// candidates are the agents as placement sees them.
func (f *Fleet) candidates() []Candidate {
	out := make([]Candidate, 0, len(f.agents))
	for _, a := range f.agents {
		_, ready, draining, capa, _, _ := a.snapshot()
		out = append(out, Candidate{Name: a.cfg.Name, Zone: a.cfg.Zone, Ready: ready, Draining: draining, Capacity: capa})
	}
	return out
}

// ErrAgentUnreachable is wrapped by errors about an agent that does not
// answer; the OSB API answers them with a 5xx that names the agent.
var ErrAgentUnreachable = errors.New("agent does not answer")

// located is where an instance lives.
type located struct {
	agent *agentState
	inst  apitype.Instance
}

// locate asks every agent whether it holds instance id, in parallel, and
// returns each that does. unreachable lists the agents that did not
// answer and were last seen holding id, or never seen at all: the
// instance may be there. Agents that did not answer and were seen, not
// holding it, are in others.
func (f *Fleet) locate(ctx context.Context, id string) (found []located, unreachable, others []*agentState) {
	return f.locateIn(ctx, id, f.agents)
}

// locateReachable is locate without the agents that did not answer their
// last look (a check that must not wait out their timeout again).
func (f *Fleet) locateReachable(ctx context.Context, id string) (found []located, unreachable, others []*agentState) {
	as := slices.DeleteFunc(slices.Clone(f.agents), func(a *agentState) bool {
		reachable, _, _, _, _, _ := a.snapshot()
		return !reachable
	})
	return f.locateIn(ctx, id, as)
}

// timeoutFor is how long to wait for a: the configured timeout, or at most
// a second for one that did not answer its last look (it is asked again,
// but a provision must not wait for it several times over).
func (f *Fleet) timeoutFor(a *agentState) time.Duration {
	if reachable, _, _, _, _, _ := a.snapshot(); !reachable && !a.seenZero() {
		return min(f.timeout, time.Second)
	}
	return f.timeout
}

func (a *agentState) seenZero() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seen.IsZero()
}

func (f *Fleet) locateIn(ctx context.Context, id string, agents []*agentState) (found []located, unreachable, others []*agentState) {
	type answer struct {
		a    *agentState
		inst apitype.Instance
		err  error
	}
	answers := make([]answer, len(agents))
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, f.timeoutFor(a))
			defer cancel()
			in, err := a.c.Get(ctx, id)
			answers[i] = answer{a, in, err}
		}()
	}
	wg.Wait()
	for _, an := range answers {
		a := an.a
		switch {
		case an.err == nil:
			found = append(found, located{a, an.inst})
			a.mu.Lock()
			a.instances[id], a.reachable = an.inst, true
			a.mu.Unlock()
		case client.IsStatus(an.err, http.StatusNotFound):
			a.mu.Lock()
			delete(a.instances, id)
			a.reachable = true
			a.mu.Unlock()
		default:
			a.mu.Lock()
			_, had := a.instances[id]
			// Never seen since this broker started: it may hold anything.
			unknown := a.seen.IsZero()
			a.reachable, a.err = false, an.err
			a.mu.Unlock()
			if had || unknown {
				unreachable = append(unreachable, a)
			} else {
				others = append(others, a)
			}
		}
	}
	return found, unreachable, others
}

// names lists agents' names.
func names(as []*agentState) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.cfg.Name
	}
	slices.Sort(out)
	return out
}

// refreshCapacity asks every agent for its readiness and capacity, in
// parallel: what placement needs, without the instance lists.
//
// An agent read less than capacityTTL ago is not asked again: the broker
// adjusts what it read by its own placements and deletions in between
// (reserve, release), and the agent refuses (507) a placement that does
// not fit after all, so the next agent is tried. At a few provisions a
// second this saves the capacity call (a port probe per free port on the
// agent) on all but one.
func (f *Fleet) refreshCapacity(ctx context.Context) { f.readCapacity(ctx, false) }

// place picks an agent for an instance of mb (see Place), from the
// capacities refreshCapacity keeps; when none has room by them, it reads
// every agent's afresh and picks again: room made behind the broker's back
// (a delete on an agent, another broker's) is not in what it kept.
func (f *Fleet) place(ctx context.Context, need Need, strategy Strategy, exclude ...string) (Candidate, []Rejection, bool) {
	f.refreshCapacity(ctx)
	chosen, rejected, ok := Place(f.candidates(), need, strategy, exclude...)
	if ok {
		return chosen, rejected, ok
	}
	f.readCapacity(ctx, true)
	return Place(f.candidates(), need, strategy, exclude...)
}

// readCapacity reads the agents' capacity: all of them with force, else
// those not read within capacityTTL.
func (f *Fleet) readCapacity(ctx context.Context, force bool) {
	var wg sync.WaitGroup
	for _, a := range f.agents {
		a.mu.Lock()
		fresh := a.reachable && time.Since(a.capAt) < capacityTTL
		a.mu.Unlock()
		if fresh && !force {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, f.timeoutFor(a))
			defer cancel()
			capa, err := a.c.Capacity(ctx)
			readyErr := err
			if err == nil {
				readyErr = a.c.Ready(ctx)
			}
			a.mu.Lock()
			defer a.mu.Unlock()
			a.reachable, a.ready, a.err = err == nil, readyErr == nil, readyErr
			if err == nil {
				a.capacity, a.draining, a.capAt = capa, capa.Draining, time.Now()
			}
		}()
	}
	wg.Wait()
}

// capacityTTL is how long a capacity read serves placements.
const capacityTTL = time.Second

// reserve adjusts a's capacity for an instance of need the broker placed
// there.
func (a *agentState) reserve(need Need) { a.adjust(need, 1) }

// release adjusts a's capacity for an instance of need deleted there.
func (a *agentState) release(need Need) { a.adjust(need, -1) }

// adjust counts n more instances of need in a's capacity (n < 0: fewer).
// A new instance's disk reservation is all still to grow into, so it
// comes off the available disk whole.
func (a *agentState) adjust(need Need, n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := &a.capacity
	disk := int64(n) * c.DiskNeed(need.MemoryMB, need.Persistence)
	c.Instances += n
	c.PortsFree -= n
	c.MemoryReservedMB += n * need.MemoryMB
	c.MemoryFreeMB -= n * need.MemoryMB
	c.DiskReservedBytes += disk
	c.DiskAvailableBytes = max(c.DiskAvailableBytes-disk, 0)
}

// remember records that a holds inst.
func (a *agentState) remember(inst apitype.Instance) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.instances[inst.ID] = inst
}

// forget records that a no longer holds id.
func (a *agentState) forget(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.instances, id)
}

// markUnreachable records that a did not answer.
func (a *agentState) markUnreachable(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reachable, a.ready, a.err = false, false, err
}

// setDraining marks a as draining (nothing new is placed there) or not.
func (a *agentState) setDraining(on bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.draining = on
}

// held returns the ids a was last seen holding, sorted.
func (a *agentState) held() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.instances))
	for id := range a.instances {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// lastSeen returns a's copy of id as a was last seen, if it held one.
func (a *agentState) lastSeen(id string) (apitype.Instance, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	in, ok := a.instances[id]
	return in, ok
}

// holds reports whether a was last seen holding id.
func (a *agentState) holds(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.instances[id]
	return ok
}
