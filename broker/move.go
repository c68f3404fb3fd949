package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// move moves instance iid from src to another agent with room, as want
// (the same or a new plan), keeping every acknowledged write and the
// bindings' usernames and passwords (only host and port change; the old
// port forwards to the new place for a while): by replication when the
// target reaches the source, by snapshot and restore otherwise. Any
// failure before the target takes over leaves the source serving as if
// nothing happened and removes what was made on the target.
//
// unavailable is how long the instance took no writes: a replication
// move's cutover, or a snapshot move's copy (whose writes are lost).
func (b *Broker) move(ctx context.Context, iid string, src *agentState, want apitype.Spec) (target string, unavailable time.Duration, err error) {
	chosen, rejected, ok := b.fleet.place(ctx, needOf(want), b.cfg.Strategy, src.cfg.Name)
	if !ok {
		b.metrics.placementFailures.Inc()
		return "", 0, fmt.Errorf("%w for %d MiB: %s", errNoRoom, want.MemoryMB, rejections(rejected))
	}
	dst := b.fleet.agent(chosen.Name)
	cur, err := src.c.Get(ctx, iid)
	if err != nil {
		return "", 0, fmt.Errorf("read the instance on %s: %w", src.cfg.Name, err)
	}
	// The instance's own settings go with it: a plan says its memory and
	// persistence, not these.
	if want.MaxmemoryPolicy == "" {
		want.MaxmemoryPolicy = cur.MaxmemoryPolicy
	}
	if want.MaxmemoryClients == "" {
		want.MaxmemoryClients = cur.MaxmemoryClients
	}
	if want.TLS == "" {
		want.TLS = cur.TLS
	}
	if !b.cfg.SnapshotMoves && want.Persistence == cur.Persistence {
		unavailable, err := b.replicate(ctx, iid, src, dst, cur, want)
		if err == nil {
			b.metrics.moves.WithLabelValues("replication").Inc()
			return dst.cfg.Name, unavailable, nil
		}
		if !errors.Is(err, errNoLink) {
			return "", 0, err
		}
		b.log.Warn("the target cannot replicate from the source; moving by snapshot", "instance", iid, "from", src.cfg.Name, "to", dst.cfg.Name, "err", err)
	}
	unavailable, err = b.snapshotMove(ctx, iid, src, dst, cur, want)
	if err != nil {
		return "", 0, err
	}
	b.metrics.moves.WithLabelValues("snapshot").Inc()
	return dst.cfg.Name, unavailable, nil
}

// errNoLink: the target never got a replication link to the source.
var errNoLink = errors.New("no replication link")

// errUnsettled: a replication move stopped where this broker can neither
// finish it nor undo it now: the target took over but the source's
// forwarder did not start, or, cut over, the target copy could not be
// removed. Its copies are left to the settle of left moves (settle.go),
// which finishes or undoes the move once the agents answer; until then
// the move's operation is neither succeeded nor failed.
var errUnsettled = errors.New("left to the settle of left moves")

// Bounds of a replication move.
const (
	// syncTimeout bounds the initial sync and the catch-up.
	syncTimeout = 30 * time.Minute
	// linkTimeout bounds the wait for the replica's first link up.
	linkTimeout = 20 * time.Second
	// pauseFor is the source's write pause; the cutover must finish
	// well within it (promotion waits at most promoteWait).
	pauseFor    = 2 * time.Second
	promoteWait = 1500 * time.Millisecond
	// catchUp is the lag, in bytes of the replication stream, under which
	// the cutover starts.
	catchUp = 1 << 20
	// forwardFor is how long the old port forwards to the new place.
	forwardFor = time.Hour
)

// replicate moves iid from src to dst by replication: dst syncs as a
// replica, the bindings are copied, then the cutover: src pauses writes
// and fences its tenants off, dst is promoted once it has src's final
// offset, and src's port forwards to dst.
func (b *Broker) replicate(ctx context.Context, iid string, src, dst *agentState, cur apitype.Instance, want apitype.Spec) (unavailable time.Duration, err error) {
	log := b.log.With("instance", iid, "from", src.cfg.Name, "to", dst.cfg.Name)
	t0 := time.Now()
	actx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	primary, err := src.c.StartMove(actx, iid)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("start the move on %s: %w", src.cfg.Name, err)
	}
	promoted, cutOver := false, false
	defer func() {
		if err == nil || promoted {
			return
		}
		// Undo: the target copy goes, the source serves as before. From
		// the cutover on, the copy goes first: it may have recorded its
		// promotion although Promote failed (the target's agent died
		// after the record, or the answer was lost), and the source let
		// in again next to it would make two primaries. Until the copy is
		// gone the source stays fenced; a broker's settle of left moves
		// ends it (on to the copy if it says it is a primary, else back).
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.AgentTimeout+30*time.Second)
		defer cancel()
		if derr := dst.c.Deprovision(uctx, iid); derr != nil && !client.IsStatus(derr, http.StatusGone) {
			log.Error("remove the move's target copy", "err", derr)
			err = fmt.Errorf("%w (and removing the copy on %s failed: %v)", err, dst.cfg.Name, derr)
			if cutOver {
				log.Error("the source stays fenced until the target copy is known not to serve", "err", derr)
				err = fmt.Errorf("%w: %w", err, errUnsettled)
				return
			}
		} else {
			dst.forget(iid)
		}
		if aerr := src.c.AbortMove(uctx, iid); aerr != nil {
			log.Error("abort the move on the source", "err", aerr)
			err = fmt.Errorf("%w (and aborting it on %s failed: %v)", err, src.cfg.Name, aerr)
		}
	}()
	want.ReplicaOf = &primary
	pctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
	_, _, err = dst.c.Provision(pctx, iid, want)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("create the replica on %s: %w", dst.cfg.Name, err)
	}
	b.metrics.placements.WithLabelValues(dst.cfg.Name).Inc()
	dst.reserve(needOf(want))
	if err := b.copyBindings(ctx, iid, src, dst, cur.Bindings); err != nil {
		return 0, err
	}
	// The initial sync and the catch-up.
	linked := false
	deadline := time.Now().Add(syncTimeout)
	for {
		r, rerr := dst.c.Replication(ctx, iid)
		s, serr := src.c.Replication(ctx, iid)
		if rerr == nil && serr == nil && r.LinkUp && !r.SyncInProgress {
			linked = true
			// Caught up, and on disk (an AOF target writes its first
			// AOF after the sync).
			if s.Offset-r.Offset <= catchUp && r.Persisted {
				break
			}
		}
		if !linked && time.Since(t0) > linkTimeout {
			return 0, fmt.Errorf("%w from %s to %s after %v", errNoLink, dst.cfg.Name, src.cfg.Name, linkTimeout)
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the replica on %s did not catch up in %v", dst.cfg.Name, syncTimeout)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	synced := time.Since(t0)
	// Bindings made on the source while it synced.
	if again, err := src.c.Get(ctx, iid); err == nil {
		if err := b.copyBindings(ctx, iid, src, dst, again.Bindings); err != nil {
			return 0, err
		}
	}
	t1 := time.Now()
	cutOver = true // from the request on: it may be recorded whatever the answer
	cctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	offset, err := src.c.Cutover(cctx, iid, pauseFor)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("cut over on %s: %w", src.cfg.Name, err)
	}
	pctx, cancel = context.WithTimeout(ctx, b.cfg.AgentTimeout)
	err = dst.c.Promote(pctx, iid, offset, promoteWait)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("promote on %s: %w", dst.cfg.Name, err)
	}
	promoted = true
	inst, err := dst.c.Get(ctx, iid)
	if err != nil {
		return 0, fmt.Errorf("read the promoted instance on %s: %w", dst.cfg.Name, err)
	}
	dst.remember(inst)
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.AgentTimeout+30*time.Second)
	err = src.c.Forward(fctx, iid, inst.Host, inst.Port, forwardFor)
	cancel()
	if err != nil {
		// The target holds every write and takes new ones; the source is
		// fenced. A broker's settle of left moves finishes this (or the
		// source's agent itself, when it recorded the forwarding).
		log.Error("promoted, but the source's forwarder did not start", "err", err)
		return 0, fmt.Errorf("moved to %s, but the forwarder on %s did not start: %w: %w", dst.cfg.Name, src.cfg.Name, err, errUnsettled)
	}
	src.forget(iid)
	unavailable = time.Since(t1)
	log.Info("moved by replication", "sync", synced.Round(time.Millisecond), "cutover", unavailable.Round(time.Millisecond), "offset", offset)
	return unavailable, nil
}

// copyBindings makes each of bids on dst with its password on src.
func (b *Broker) copyBindings(ctx context.Context, iid string, src, dst *agentState, bids []string) error {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	defer cancel()
	for _, bid := range bids {
		creds, err := src.c.Binding(ctx, iid, bid)
		if err != nil {
			return fmt.Errorf("read binding %s on %s: %w", bid, src.cfg.Name, err)
		}
		if _, _, err := dst.c.Bind(ctx, iid, bid, creds.Password); err != nil {
			return fmt.Errorf("recreate binding %s on %s: %w", bid, dst.cfg.Name, err)
		}
	}
	return nil
}

// snapshotMove moves iid by a snapshot out and a restore in: every
// binding is recreated with its password, then the source is deleted.
// Writes the source takes after its snapshot began are not carried over;
// it is the fallback when the agents cannot reach each other, and for a
// change of persistence mode.
func (b *Broker) snapshotMove(ctx context.Context, iid string, src, dst *agentState, cur apitype.Instance, want apitype.Spec) (unavailable time.Duration, err error) {
	log := b.log.With("instance", iid, "from", src.cfg.Name, "to", dst.cfg.Name)
	actx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
	defer cancel()
	// The target copy says where the instance lives until the move ends,
	// so a broker that did not run the move answers from the source.
	final := want.Metadata
	var m instanceMeta
	json.Unmarshal(final, &m)
	m.MovingFrom = src.cfg.Name
	want.Metadata = m.raw()
	if _, _, err := dst.c.Provision(actx, iid, want); err != nil {
		return 0, fmt.Errorf("create the instance on %s: %w", dst.cfg.Name, err)
	}
	b.metrics.placements.WithLabelValues(dst.cfg.Name).Inc()
	dst.reserve(needOf(want))
	undo := func(cause error) (time.Duration, error) {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.AgentTimeout+30*time.Second)
		defer cancel()
		if err := dst.c.Deprovision(dctx, iid); err != nil {
			log.Error("move failed and its target copy could not be removed", "err", err)
			return 0, fmt.Errorf("%w (and removing the copy on %s failed: %v)", cause, dst.cfg.Name, err)
		}
		dst.forget(iid)
		return 0, cause
	}
	t0 := time.Now()
	if err := b.copyData(ctx, iid, src, dst); err != nil {
		return undo(err)
	}
	if err := b.copyBindings(ctx, iid, src, dst, cur.Bindings); err != nil {
		return undo(err)
	}
	// Bindings made on the source while the move ran.
	if again, err := src.c.Get(actx, iid); err == nil {
		var more []string
		for _, bid := range again.Bindings {
			if !slices.Contains(cur.Bindings, bid) {
				more = append(more, bid)
			}
		}
		if err := b.copyBindings(ctx, iid, src, dst, more); err != nil {
			return undo(err)
		}
	}
	if err := src.c.Deprovision(actx, iid); err != nil && !client.IsStatus(err, http.StatusGone) {
		// Both hold it: the source serves (the target copy is marked),
		// and the broker's look at the fleet settles it later.
		log.Error("moved, but the source copy could not be removed", "err", err)
		return 0, fmt.Errorf("moved to %s, but removing the source copy on %s failed: %w", dst.cfg.Name, src.cfg.Name, err)
	}
	unavailable = time.Since(t0)
	src.forget(iid)
	inst, err := dst.c.Update(actx, iid, apitype.Resize{Metadata: final})
	if err != nil {
		log.Error("moved, but the target copy is still marked as moving", "err", err)
		return unavailable, nil
	}
	dst.remember(inst)
	return unavailable, nil
}

// copyData streams a fresh snapshot of iid from src into iid on dst,
// checked end to end by its sha256.
func (b *Broker) copyData(ctx context.Context, iid string, src, dst *agentState) error {
	ctx, cancel := context.WithTimeout(ctx, time.Hour)
	defer cancel()
	body, sum, err := src.c.Snapshot(ctx, iid)
	if err != nil {
		return fmt.Errorf("snapshot on %s: %w", src.cfg.Name, err)
	}
	defer body.Close()
	if _, err := dst.c.Restore(ctx, iid, io.NopCloser(body), -1, sum); err != nil {
		return fmt.Errorf("restore on %s: %w", dst.cfg.Name, err)
	}
	return nil
}

// ioSetting is the instance's own IO limits, which a move keeps: the
// broker sets none itself, an operator does on the agent.
func ioSetting(in apitype.Instance) *apitype.IOSetting {
	if in.IO == nil {
		return nil
	}
	return in.IO.Setting
}
