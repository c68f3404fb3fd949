package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// Resize changes the maxmemory of instance id to memoryMB, live: the
// record (against the memory budget), the config file, the running
// server's maxmemory and its cgroup's limit. No restart, no dropped
// connection. Shrinking below what the data set uses is a conflict.
func (s *Service) Resize(ctx context.Context, id string, memoryMB int) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	if err := s.cfg.checkMemory(memoryMB); err != nil {
		return Instance{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Get(id)
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	if rec.Phase != state.PhaseActive {
		return Instance{}, fmt.Errorf("instance %q is %s: %w", id, rec.Phase, ErrConflict)
	}
	in := s.runtime(id)
	running := in != nil && in.sup.Status().State == supervisor.Running
	if rec.MemoryMB == memoryMB {
		// Nothing to record; the live settings are applied again, so a
		// retry of a resize that failed half-way finishes it.
		if running {
			if err := s.applyMemory(ctx, in, id, memoryMB, false); err != nil {
				return Instance{}, fmt.Errorf("resize %q: %w", id, err)
			}
		}
		return s.view(rec), nil
	}
	shrink := memoryMB < rec.MemoryMB
	if shrink && !running {
		// Its data set's size cannot be checked: a limit below it would
		// get the server OOM-killed as soon as it has loaded.
		st := "not running"
		if in != nil {
			st = in.sup.Status().State.String()
		}
		return Instance{}, fmt.Errorf("instance %q is %s; it can shrink only while running, when its data set can be measured: %w", id, st, ErrConflict)
	}
	if shrink {
		f, err := in.admin.Fields(ctx, "memory")
		if err != nil {
			return Instance{}, fmt.Errorf("resize %q: %w", id, err)
		}
		if used, _ := strconv.ParseInt(f["used_memory"], 10, 64); used > int64(memoryMB)<<20 {
			return Instance{}, fmt.Errorf("instance %q uses %.1f MiB, more than memory_mb %d: %w",
				id, float64(used)/(1<<20), memoryMB, ErrConflict)
		}
	}
	old := rec.MemoryMB
	// A bigger reservation must fit the disk budget, under admitMu until
	// the record holds it.
	s.admitMu.Lock()
	if err := s.admitDisk(s.reservation(memoryMB, rec.Persistence)-s.reservation(old, rec.Persistence), fmt.Sprintf("growing to %d MiB", memoryMB)); err != nil {
		s.admitMu.Unlock()
		return Instance{}, fmt.Errorf("resize %q: %w", id, err)
	}
	// The record first: it is the intent. A crash after it leaves a config
	// that reconcile rewrites, and a live maxmemory (and cgroup limit) the
	// first health check after the process is adopted finds and sets.
	rec, err = s.store.Admit(id, func(r *state.Instance, u state.Usage) error {
		if free := s.cfg.MemoryBudgetMB - (u.MemoryMB - r.MemoryMB) - int(s.transientMB.Load()); memoryMB > free {
			return fmt.Errorf("memory_mb %d does not fit: %d of %d MiB of the memory budget are free for this instance: %w",
				memoryMB, max(free, 0), s.cfg.MemoryBudgetMB, ErrCapacity)
		}
		r.MemoryMB = memoryMB
		return nil
	})
	s.admitMu.Unlock()
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	if in != nil {
		in.memoryMB.Store(int64(memoryMB))
	}
	confHash, err := s.writeFiles(rec)
	if err != nil {
		return Instance{}, fmt.Errorf("resize %q: %w", id, err)
	}
	if rec, err = s.store.Update(id, func(r *state.Instance) error { r.ConfigHash = confHash; return nil }); err != nil {
		return Instance{}, err
	}
	if in != nil {
		if err := s.applyMemory(ctx, in, id, memoryMB, shrink); err != nil {
			return Instance{}, fmt.Errorf("resize %q: %w (recorded; a retry or the next start applies it)", id, err)
		}
	}
	s.applyQuota(rec)
	s.measure(rec)
	s.log.Info("resized", "instance", id, "from_mb", old, "to_mb", memoryMB)
	return s.view(rec), nil
}

// applyMemory sets the live maxmemory of id's server and its cgroup's
// limit for memoryMB. Growing: the cgroup first, so the new maxmemory
// always fits in it; shrinking: maxmemory first, for the same reason. A
// server that cannot be reached gets its maxmemory from its config at its
// next start.
func (s *Service) applyMemory(ctx context.Context, in *instance, id string, memoryMB int, shrink bool) error {
	pid := in.sup.Status().Process.PID
	if !shrink {
		s.confine(id, pid)
	}
	if in.sup.Status().State == supervisor.Running {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := in.admin.SetMaxmemory(ctx, memoryMB)
		cancel()
		if err != nil && !redis.Unreachable(err) {
			return err
		}
	}
	if shrink {
		s.confine(id, pid)
	}
	return nil
}

// SetMetadata replaces the opaque metadata of instance id (a broker's
// plan change). Nothing else changes.
func (s *Service) SetMetadata(ctx context.Context, id string, metadata json.RawMessage) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	md, err := normalizeMetadata(metadata)
	if err != nil {
		return Instance{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.updateActive(id, func(r *state.Instance) error {
		r.Metadata = md
		return nil
	})
	if err != nil {
		return Instance{}, err
	}
	return s.view(rec), nil
}
