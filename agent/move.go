package agent

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/forward"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
)

// A replication move, as the agents do it (a broker drives the steps):
//
//	source                               target
//	StartMove: a replication user   ->   Provision with replica_of: it
//	                                     syncs from the source, live
//	Cutover: pause writes, fence the
//	tenants off, say the final offset -> Promote: wait for that offset,
//	                                     then REPLICAOF NO ONE
//	Forward: the redis-server goes, a
//	forwarder to the target holds the
//	port until its TTL, then the
//	instance is deleted
//
// Every step is recorded before it is taken. Until Forward, AbortMove
// puts the source back as it was (the broker deletes the target). The
// source is fenced from the cutover on: its tenants' users are off and
// their connections closed, so even when the pause ends (its timeout)
// before Forward, a crash of the broker or of an agent in between cannot
// leave two primaries taking writes. An agent that restarts with a move
// cut over fences the adopted server again (resumeMoves): it may have
// died between the record and the fence.

// moveUser is the ACL user a move's replica logs in to the source as.
const moveUser = "_move"

// StartMove prepares instance id, on this agent, to be the source of a
// replication move: an ACL user that may only replicate, returned with
// where to reach the instance. Asked again while the move replicates, it
// returns the same.
func (s *Service) StartMove(ctx context.Context, id string) (apitype.Primary, error) {
	if err := validateID("instance", id); err != nil {
		return apitype.Primary{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		switch {
		case r.Phase != state.PhaseActive:
			return fmt.Errorf("instance %q is %s: %w", id, r.Phase, ErrConflict)
		case r.ReplicaOf != nil:
			return fmt.Errorf("instance %q is itself a move's replica: %w", id, ErrConflict)
		case r.Move != nil && r.Move.State != state.MoveReplicating:
			return fmt.Errorf("instance %q is in a move's %s step: %w", id, r.Move.State, ErrConflict)
		case r.Move == nil:
			r.Move = &state.Move{State: state.MoveReplicating, User: moveUser, Password: redis.NewPassword(), StartedAt: time.Now().UTC()}
		}
		return nil
	})
	if err != nil {
		return apitype.Primary{}, notFound(id, err)
	}
	crashAt(FaultMoveStarted)
	if err := s.applyACL(ctx, rec); err != nil {
		return apitype.Primary{}, fmt.Errorf("move %q: %w", id, err)
	}
	s.log.Info("move started: a replica may sync", "instance", id)
	p := apitype.Primary{Host: s.cfg.advertiseHost(), Port: rec.Port, User: rec.Move.User, Password: rec.Move.Password}
	if t := s.tlsConf(rec); t != nil {
		// A tenant that has TLS has its data cross the network in it,
		// to the target too (whose port is its only one when required).
		p.Port, p.TLS, p.CACert = t.Port, true, string(s.ca.pem)
	}
	return p, nil
}

// Replication reports instance id's role and replication offset.
func (s *Service) Replication(ctx context.Context, id string) (apitype.Replication, error) {
	in, _, err := s.running(id)
	if err != nil {
		return apitype.Replication{}, err
	}
	r, err := in.admin.Replication(ctx)
	if err != nil {
		return apitype.Replication{}, fmt.Errorf("replication of %q: %w", id, err)
	}
	out := apitype.Replication{Role: r.Role, Offset: r.MasterReplOffset, Replicas: r.ConnectedSlaves, Persisted: !r.AOFRewriting}
	if r.Role == "slave" {
		out.Role, out.Offset, out.LinkUp, out.SyncInProgress = "replica", r.SlaveReplOffset, r.MasterLinkUp, r.SyncInProgress
	}
	return out, nil
}

// running returns the supervised, running instance id.
func (s *Service) running(id string) (*instance, state.Instance, error) {
	if err := validateID("instance", id); err != nil {
		return nil, state.Instance{}, err
	}
	rec, err := s.store.Get(id)
	if err != nil {
		return nil, rec, notFound(id, err)
	}
	in := s.runtime(id)
	if in == nil || in.sup.Status().State.String() != apitype.StateRunning {
		return nil, rec, fmt.Errorf("instance %q is not running: %w", id, ErrConflict)
	}
	return in, rec, nil
}

// Cutover is the source's last step before the target is promoted: it
// fences the tenants off (their users off, their connections closed),
// pauses writes for at most timeout and returns its replication offset, which
// no longer moves. Recorded first: an agent that restarts keeps the
// tenants fenced until AbortMove or Forward.
func (s *Service) Cutover(ctx context.Context, id string, timeout time.Duration) (int64, error) {
	if timeout <= 0 || timeout > maxPause {
		return 0, fmt.Errorf("timeout_ms %d: %w: want 1 to %d", timeout.Milliseconds(), ErrInvalid, maxPause.Milliseconds())
	}
	unlock := s.locks.lock(id)
	defer unlock()
	in, _, err := s.running(id)
	if err != nil {
		return 0, err
	}
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Move == nil || (r.Move.State != state.MoveReplicating && r.Move.State != state.MoveCutover) {
			return fmt.Errorf("instance %q has no move to cut over: %w", id, ErrConflict)
		}
		if r.Move.State != state.MoveCutover {
			r.Move.CutoverAt = time.Now().UTC()
		}
		r.Move.State = state.MoveCutover
		return nil
	})
	if err != nil {
		return 0, notFound(id, err)
	}
	crashAt(FaultMoveCutover)
	// Recorded: the rest is done even if the caller hangs up (the record
	// says fenced; so must the server).
	ctx = context.WithoutCancel(ctx)
	// The fence first: a tenant may run CLIENT UNPAUSE, and one that
	// did after the pause would write past the offset the target is
	// promoted at. Fenced, no tenant connection is left to; the pause
	// then stops the writes the server makes itself (expiries,
	// evictions), and the offset stays.
	if err := s.fence(ctx, in, rec); err != nil {
		return 0, fmt.Errorf("cutover of %q: %w", id, err)
	}
	off, err := in.admin.PauseWrites(ctx, timeout)
	if err != nil {
		return 0, fmt.Errorf("cutover of %q: %w", id, err)
	}
	s.log.Info("move cut over: writes paused, tenants fenced", "instance", id, "offset", off, "pause", timeout)
	return off, nil
}

// fence keeps the tenants of rec, a move's source cut over, off its
// running server in: their users off, so they cannot log in again, then
// every connection they have open closed. Users off alone would leave
// those connections writing.
func (s *Service) fence(ctx context.Context, in *instance, rec state.Instance) error {
	if err := s.applyACL(ctx, rec); err != nil {
		return fmt.Errorf("fence the tenants: %w", err)
	}
	for _, b := range rec.Bindings {
		if err := in.admin.KillUser(ctx, b.Username); err != nil {
			return fmt.Errorf("fence the tenants: %w", err)
		}
	}
	return nil
}

// resumeMoves takes up, at agent start, the moves recs were cut over in:
// the agent may have died between a cutover's record and its fence (or
// in it), leaving the tenants' connections to the redis-server it now
// adopts open and writing. Once that server is ready, each is fenced
// again: its connections too, not only new logins. Reconcile calls it
// once the supervisors run.
func (s *Service) resumeMoves(recs []state.Instance) {
	for _, rec := range recs {
		if rec.Move == nil || rec.Move.State != state.MoveCutover {
			continue
		}
		s.background(func(ctx context.Context) { s.refence(ctx, rec.ID) })
	}
}

// refence fences the tenants of instance id off its server again, once it
// is ready, if it is still a move's source cut over; it tries for a while
// (a server that does not answer yet, an ACL change it refused).
func (s *Service) refence(ctx context.Context, id string) {
	log := s.log.With("instance", id)
	for attempt := 1; ; attempt++ {
		done, err := s.refenceOnce(ctx, id)
		if done {
			return
		}
		if attempt == refenceAttempts || ctx.Err() != nil {
			log.Error("the tenants of a move's source cut over are not fenced again after the agent's restart; a cutover asked again, an abort or a forward ends it", "err", err)
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// refenceAttempts bounds refence's tries, a second apart.
const refenceAttempts = 30

// refenceOnce is one try of refence: done once id is fenced or no longer
// needs to be.
func (s *Service) refenceOnce(ctx context.Context, id string) (done bool, err error) {
	in := s.runtime(id)
	if in == nil {
		return true, nil
	}
	wctx, cancel := context.WithTimeout(ctx, s.cfg.ReadyTimeout+time.Second)
	err = in.sup.WaitReady(wctx)
	cancel()
	if err != nil && wctx.Err() == nil {
		// Not running: the next process loads the ACL file, with the
		// tenants' users off, and nobody is connected to it yet.
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("wait for the adopted server: %w", err)
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Get(id)
	if err != nil || rec.Move == nil || rec.Move.State != state.MoveCutover {
		return true, nil // gone, aborted or forwarded meanwhile
	}
	if err := s.fence(ctx, in, rec); err != nil {
		return false, err
	}
	s.log.Info("a move's source was cut over when the agent started: tenants fenced again, their open connections closed", "instance", id)
	return true, nil
}

// maxPause bounds a cutover's write pause.
const maxPause = 10 * time.Second

// AbortMove undoes a move that has not reached Forward: the tenants are
// let in again, writes resume, the replication user goes.
func (s *Service) AbortMove(ctx context.Context, id string) error {
	if err := validateID("instance", id); err != nil {
		return err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Move == nil {
			return fmt.Errorf("instance %q has no move: %w", id, ErrNotFound)
		}
		if r.Move.State == state.MoveForwarding {
			return fmt.Errorf("instance %q already forwards to its new place: %w", id, ErrConflict)
		}
		r.Move = nil
		return nil
	})
	if err != nil {
		return notFound(id, err)
	}
	ctx = context.WithoutCancel(ctx) // recorded: done even if the caller hangs up
	if err := s.applyACL(ctx, rec); err != nil {
		return fmt.Errorf("abort the move of %q: %w", id, err)
	}
	if in := s.runtime(id); in != nil {
		if err := in.admin.Unpause(ctx); err != nil {
			return fmt.Errorf("abort the move of %q: %w", id, err)
		}
	}
	s.log.Info("move aborted: the instance serves as before", "instance", id)
	return nil
}

// Forward ends the source's part of a move whose target has been
// promoted: its redis-server stops and a forwarder to host:port takes its
// port for ttl, after which the instance is deleted here.
func (s *Service) Forward(ctx context.Context, id, host string, port int, ttl time.Duration) error {
	target := net.JoinHostPort(host, strconv.Itoa(port))
	if host == "" || port < 1 || port > 65535 || ttl <= 0 {
		return fmt.Errorf("forward to %q for %v: %w: want a host, a port and a positive ttl", target, ttl, ErrInvalid)
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Move == nil || (r.Move.State != state.MoveCutover && r.Move.State != state.MoveForwarding) {
			return fmt.Errorf("instance %q has not been cut over: %w", id, ErrConflict)
		}
		r.Move.State, r.Move.ForwardTo, r.Move.ForwardUntil = state.MoveForwarding, target, time.Now().Add(ttl).UTC()
		return nil
	})
	if err != nil {
		return notFound(id, err)
	}
	crashAt(FaultMoveForwardRecorded)
	// Recorded: a caller that hangs up must not leave the port with
	// neither the redis-server nor the forwarder until the next start.
	return s.startForwarding(context.WithoutCancel(ctx), rec)
}

// startForwarding stops rec's redis-server, if one runs, and puts a
// forwarder on its port; it also arms the deletion at the forwarder's
// end. Reconcile calls it for a record a crash left forwarding.
func (s *Service) startForwarding(ctx context.Context, rec state.Instance) error {
	id := rec.ID
	if in := s.runtime(id); in != nil {
		// Its data is on the target: nothing to save.
		sctx, cancel := context.WithTimeout(ctx, s.cfg.StopTimeout+10*time.Second)
		err := in.sup.Stop(sctx, true)
		cancel()
		if err != nil {
			return fmt.Errorf("forward %q: stop its redis-server: %w", id, err)
		}
		in.admin.Close()
		s.mu.Lock()
		delete(s.instances, id)
		s.mu.Unlock()
	} else if err := s.killStray(id); err != nil {
		return err
	}
	addr := net.JoinHostPort(s.cfg.BindHost, strconv.Itoa(rec.Port))
	var f *forward.Forwarder
	var err error
	// The port was the redis-server's a moment ago: retry briefly.
	for range 50 {
		if f, err = forward.Listen(addr, rec.Move.ForwardTo); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("forward %q: listen on %s: %w", id, addr, err)
	}
	s.mu.Lock()
	if old := s.forwarders[id]; old != nil {
		old.Close()
	}
	s.forwarders[id] = f
	s.mu.Unlock()
	go f.Serve()
	until := time.Until(rec.Move.ForwardUntil)
	s.log.Info("moved away: the old port forwards to the new place", "instance", id, "to", rec.Move.ForwardTo, "for", until.Round(time.Second))
	s.background(func(ctx context.Context) {
		t := time.NewTimer(max(until, 0))
		defer t.Stop()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := s.Deprovision(ctx, id); err != nil {
			s.log.Error("remove a moved instance at the end of its forwarding", "instance", id, "err", err)
		}
	})
	return nil
}

// stopForwarding closes id's forwarder, if any.
func (s *Service) stopForwarding(id string) {
	s.mu.Lock()
	f := s.forwarders[id]
	delete(s.forwarders, id)
	s.mu.Unlock()
	if f != nil {
		f.Close()
	}
}

// Promote makes instance id, a move's target, a primary once it has
// processed offset of its primary's stream (waiting at most timeout).
// Recorded first: a target that restarts after it comes up as a primary
// with the data it had synced.
//
// Asked again once recorded, it finishes the promotion at once: a crash
// of the agent between the record and REPLICAOF NO ONE leaves the
// redis-server, which the next agent adopts, replicating (read-only)
// although its record says primary, and a broker that finishes the move
// promotes it again before it forwards the source. On any other primary
// it changes nothing.
func (s *Service) Promote(ctx context.Context, id string, offset int64, timeout time.Duration) error {
	if timeout <= 0 || timeout > maxPause {
		return fmt.Errorf("timeout_ms %d: %w: want 1 to %d", timeout.Milliseconds(), ErrInvalid, maxPause.Milliseconds())
	}
	unlock := s.locks.lock(id)
	defer unlock()
	in, rec, err := s.running(id)
	if err != nil {
		return err
	}
	if rec.ReplicaOf == nil {
		r, err := in.admin.Replication(ctx)
		if err != nil {
			return fmt.Errorf("promote %q: %w", id, err)
		}
		if r.Role == "master" {
			return nil
		}
		if err := in.admin.Promote(context.WithoutCancel(ctx)); err != nil {
			return fmt.Errorf("promote %q: %w", id, err)
		}
		s.log.Warn("promoted a move's target whose record said primary while its server still replicated", "instance", id)
		return nil
	}
	deadline := time.Now().Add(timeout)
	for {
		r, err := in.admin.Replication(ctx)
		if err == nil && r.Role == "slave" && r.MasterLinkUp && r.SlaveReplOffset >= offset {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("instance %q has not reached offset %d in %v (at %d, link up %v): %w", id, offset, timeout, r.SlaveReplOffset, r.MasterLinkUp, ErrNotReady)
		}
		time.Sleep(time.Millisecond)
	}
	// From the record on, the promotion is finished even if the caller
	// hangs up.
	ctx = context.WithoutCancel(ctx)
	rec, err = s.store.Update(id, func(r *state.Instance) error { r.ReplicaOf = nil; return nil })
	if err != nil {
		return notFound(id, err)
	}
	confHash, err := s.writeFiles(rec)
	if err != nil {
		return fmt.Errorf("promote %q: %w", id, err)
	}
	if _, err := s.store.Update(id, func(r *state.Instance) error { r.ConfigHash = confHash; return nil }); err != nil {
		return err
	}
	crashAt(FaultPromoteRecorded)
	if err := in.admin.Promote(ctx); err != nil {
		return fmt.Errorf("promote %q: %w", id, err)
	}
	s.log.Info("promoted: the move's target is the primary", "instance", id, "offset", offset)
	return nil
}
