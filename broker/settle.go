package broker

import (
	"context"
	"net/http"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// Moves a broker stopped in the middle of (it was killed or restarted)
// leave copies behind: a move's replica with its source still
// replicating or cut over, or a snapshot move's marked target copy next
// to its source. So does a broker whose undo of a move could not remove
// the replica: a replica next to a source out of the move. Every broker
// settles those it finds once they are older than any move it would run
// itself: back to the source when the target was not promoted (the source
// never stopped holding every write), on to the target when it was (the
// source is fenced and has stopped taking writes).

// staleMove is how long a move may run before another broker takes it
// for abandoned: longer than a move's initial sync may take. It is the
// default of Config.StaleMove.
const staleMove = syncTimeout + 5*time.Minute

// staleCutover is the same for a move cut over: a cutover takes seconds.
// It is the default of Config.StaleCutover.
const staleCutover = time.Minute

// settleMoves looks at what the last refresh saw and settles the moves
// that were left in the middle.
func (b *Broker) settleMoves(ctx context.Context) {
	copies := map[string][]located{}
	everyAgent := true // answered the last look
	for _, a := range b.fleet.agents {
		if reachable, _, _, _, _, _ := a.snapshot(); !reachable {
			everyAgent = false
			continue
		}
		a.mu.Lock()
		for id, in := range a.instances {
			copies[id] = append(copies[id], located{a, in})
		}
		a.mu.Unlock()
	}
	for id, cs := range copies {
		if len(cs) < 2 && !(len(cs) == 1 && cs[0].inst.Move != nil && cs[0].inst.Move.State != apitype.StateForwarding) {
			continue
		}
		unlock, ok := b.locks.tryLock(id, "settle")
		if !ok {
			continue // this broker runs it
		}
		b.settle(ctx, id, cs, everyAgent)
		unlock()
	}
}

// settle settles the move of id whose copies are cs; everyAgent says
// whether every agent answered (none may hold a copy that is not in cs).
func (b *Broker) settle(ctx context.Context, id string, cs []located, everyAgent bool) {
	var src *located
	var replicas, marked, primaries []located
	for i := range cs {
		c := cs[i]
		m, _ := metaOf(c.inst)
		switch {
		case c.inst.Move != nil && c.inst.Move.State != apitype.StateForwarding:
			src = &cs[i]
		case c.inst.Move != nil:
			// A forwarder: done with, it goes at its own end.
		case c.inst.ReplicaOf != "":
			replicas = append(replicas, c)
		case m.MovingFrom != "":
			marked = append(marked, c)
		default:
			primaries = append(primaries, c)
		}
	}
	log := b.log.With("instance", id)
	ctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
	defer cancel()
	if src != nil {
		age := time.Since(src.inst.Move.StartedAt)
		cutOver := src.inst.Move.State == "cutover"
		// A cutover is stale a while after it began, not after the move
		// did: another broker's long sync may just have reached it.
		cutAge := time.Since(src.inst.Move.CutoverAt)
		if src.inst.Move.CutoverAt.IsZero() {
			cutAge = age // an agent from before the field
		}
		if age < b.cfg.StaleMove && !(cutOver && cutAge > b.cfg.StaleCutover) {
			return
		}
		if cutOver && len(primaries) == 1 {
			p := primaries[0]
			log.Warn("finishing a move a broker left after its target took over: the source forwards to it", "source", src.agent.cfg.Name, "target", p.agent.cfg.Name)
			// Promoted again first: the target's record says primary, but
			// its server may still replicate (its agent died between the
			// record and REPLICAOF NO ONE), and would take no writes.
			if err := p.agent.c.Promote(ctx, id, 0, promoteWait); err != nil {
				log.Error("finish a left move: promote its target", "err", err)
				return
			}
			if err := src.agent.c.Forward(ctx, id, p.inst.Host, p.inst.Port, forwardFor); err != nil {
				log.Error("finish a left move", "err", err)
			}
			return
		}
		if cutOver && len(replicas) == 0 && !everyAgent {
			// Its target, promoted or not, may be on an agent that does
			// not answer: letting the source's tenants in again next to a
			// promoted one would make two primaries. It stays fenced
			// until every agent answers.
			log.Warn("a move a broker left after its cutover waits: an agent that may hold its target does not answer", "source", src.agent.cfg.Name, "age", age.Round(time.Second))
			return
		}
		log.Warn("undoing a move a broker left: the source serves as before", "source", src.agent.cfg.Name, "age", age.Round(time.Second))
		for _, r := range replicas {
			if err := r.agent.c.Deprovision(ctx, id); err != nil {
				log.Error("remove a left move's replica", "agent", r.agent.cfg.Name, "err", err)
				return
			}
			r.agent.forget(id)
		}
		if err := src.agent.c.AbortMove(ctx, id); err != nil {
			log.Error("abort a left move", "agent", src.agent.cfg.Name, "err", err)
		}
		return
	}
	// No source in a move, yet a replica: a move undone before its cutover
	// whose replica could not be removed (its agent did not answer the
	// deletion). The source, out of the move, serves and holds every
	// write; the replica, its replication user gone, holds an old copy, a
	// port and memory. With no serving copy in sight it is kept: it may be
	// all there is of the instance.
	if len(primaries) > 0 {
		for _, r := range replicas {
			if time.Since(r.inst.CreatedAt) < b.cfg.StaleMove {
				continue // a move just starting, seen between its steps
			}
			log.Warn("removing the replica of a move a broker undid and left: the source serves", "replica", r.agent.cfg.Name, "primary", primaries[0].agent.cfg.Name)
			if err := r.agent.c.Deprovision(ctx, id); err != nil && !client.IsStatus(err, http.StatusGone) {
				log.Error("remove a left move's replica", "agent", r.agent.cfg.Name, "err", err)
				continue
			}
			r.agent.forget(id)
		}
	}
	for _, c := range marked {
		if time.Since(c.inst.CreatedAt) < b.cfg.StaleMove {
			continue
		}
		m, _ := metaOf(c.inst)
		if sourceHolds(cs, m.MovingFrom) {
			log.Warn("removing the copy of a snapshot move a broker left: the source serves", "copy", c.agent.cfg.Name, "source", m.MovingFrom)
			if err := c.agent.c.Deprovision(ctx, id); err != nil {
				log.Error("remove a left move's copy", "err", err)
			}
			c.agent.forget(id)
			continue
		}
		log.Warn("a snapshot move a broker left had removed its source: its copy is the instance", "copy", c.agent.cfg.Name)
		m.MovingFrom = ""
		if _, err := c.agent.c.Update(ctx, id, apitype.Resize{Metadata: m.raw()}); err != nil {
			log.Error("clear a left move's mark", "err", err)
		}
	}
}

// sourceHolds reports whether agent name holds one of cs.
func sourceHolds(cs []located, name string) bool {
	for _, c := range cs {
		if c.agent.cfg.Name == name {
			return true
		}
	}
	return false
}
