package broker

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// move moves instance iid from src to another agent with room, as want
// (the same or a new plan): it creates the instance on the target,
// streams a fresh snapshot of the source into it, recreates every binding
// there with the same username and password (an application keeps its
// credentials; only host and port change), and only then deletes the
// source. Any failure before that deletes what it made on the target and
// leaves the source serving as if nothing happened. Writes the source
// takes after its snapshot began are not carried over: a live,
// replication-based move is not built yet.
func (b *Broker) move(ctx context.Context, iid string, src *agentState, want apitype.Spec) (target string, err error) {
	b.fleet.refreshCapacity(ctx)
	chosen, rejected, ok := Place(b.fleet.candidates(), want.MemoryMB, b.cfg.Strategy, src.cfg.Name)
	if !ok {
		b.metrics.placementFailures.Inc()
		return "", fmt.Errorf("%w for %d MiB: %s", errNoRoom, want.MemoryMB, rejections(rejected))
	}
	dst := b.fleet.agent(chosen.Name)
	log := b.log.With("instance", iid, "from", src.cfg.Name, "to", dst.cfg.Name)
	actx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
	defer cancel()
	cur, err := src.c.Get(actx, iid)
	if err != nil {
		return "", fmt.Errorf("read the instance on %s: %w", src.cfg.Name, err)
	}
	if _, _, err := dst.c.Provision(actx, iid, want); err != nil {
		return "", fmt.Errorf("create the instance on %s: %w", dst.cfg.Name, err)
	}
	b.metrics.placements.WithLabelValues(dst.cfg.Name).Inc()
	undo := func(cause error) (string, error) {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.AgentTimeout+30*time.Second)
		defer cancel()
		if err := dst.c.Deprovision(dctx, iid); err != nil {
			log.Error("move failed and its target copy could not be removed", "err", err)
			return "", fmt.Errorf("%w (and removing the copy on %s failed: %v)", cause, dst.cfg.Name, err)
		}
		dst.forget(iid)
		return "", cause
	}
	if err := b.copyData(ctx, iid, src, dst); err != nil {
		return undo(err)
	}
	for _, bid := range cur.Bindings {
		creds, err := src.c.Binding(actx, iid, bid)
		if err != nil {
			return undo(fmt.Errorf("read binding %s on %s: %w", bid, src.cfg.Name, err))
		}
		if _, _, err := dst.c.Bind(actx, iid, bid, creds.Password); err != nil {
			return undo(fmt.Errorf("recreate binding %s on %s: %w", bid, dst.cfg.Name, err))
		}
	}
	// Bindings made on the source while the move ran.
	if again, err := src.c.Get(actx, iid); err == nil {
		for _, bid := range again.Bindings {
			if slices.Contains(cur.Bindings, bid) {
				continue
			}
			creds, err := src.c.Binding(actx, iid, bid)
			if err == nil {
				_, _, err = dst.c.Bind(actx, iid, bid, creds.Password)
			}
			if err != nil {
				return undo(fmt.Errorf("recreate binding %s made during the move: %w", bid, err))
			}
		}
	}
	if err := src.c.Deprovision(actx, iid); err != nil && !client.IsStatus(err, http.StatusGone) {
		// Both hold it now, the target complete: the next look settles
		// it (the lowest-named agent's copy is the one the broker
		// uses), and an operator sees the error.
		log.Error("moved, but the source copy could not be removed", "err", err)
		return dst.cfg.Name, fmt.Errorf("moved to %s, but removing the source copy on %s failed: %w", dst.cfg.Name, src.cfg.Name, err)
	}
	src.forget(iid)
	if inst, err := dst.c.Get(actx, iid); err == nil {
		dst.remember(inst)
	}
	return dst.cfg.Name, nil
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
