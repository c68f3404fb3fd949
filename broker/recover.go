package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/client"
)

// Recovery of a lost agent: its instances recreated on the others from
// their latest backups in the bucket the agents share.

// Recovery states.
const (
	RecoveryRunning = "running"
	RecoveryDone    = "done"   // every instance is back
	RecoveryFailed  = "failed" // some could not be brought back; Instances say why
)

// Recovery is the progress of bringing back one lost agent's instances
// (POST and GET /admin/agents/{name}/recover).
type Recovery struct {
	Agent string `json:"agent"`
	// BackupAgent is the name the lost agent put in its backups.
	BackupAgent string     `json:"backup_agent"`
	State       string     `json:"state"`
	Error       string     `json:"error,omitempty"`
	StartedAt   time.Time  `json:"started_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
	Total       int        `json:"total"`
	Recovered   int        `json:"recovered"`
	// Instances is each instance's outcome, by id.
	Instances map[string]*RecoveredInstance `json:"instances"`
}

// RecoveredInstance is one instance of a Recovery.
type RecoveredInstance struct {
	// State is running, done or failed.
	State string `json:"state"`
	// Agent is where it was recreated.
	Agent string `json:"agent,omitempty"`
	// Backup is the backup's key, BackupTime when it was taken and
	// BackupAgeSeconds its age when the instance came back: the writes
	// it lost.
	Backup           string    `json:"backup"`
	BackupTime       time.Time `json:"backup_time"`
	BackupAgeSeconds float64   `json:"backup_age_seconds"`
	Bindings         int       `json:"bindings"`
	Error            string    `json:"error,omitempty"`
	Seconds          float64   `json:"seconds,omitempty"`
}

// RecoverRequest is the optional body of POST /admin/agents/{name}/recover.
type RecoverRequest struct {
	// BackupAgent is the lost agent's --backup-agent-name, when the broker
	// never read it (it was down since this broker started); default the
	// name it read, else the agent's name in the broker's configuration.
	BackupAgent string `json:"backup_agent,omitempty"`
}

type recoveries struct {
	mu sync.Mutex
	m  map[string]*Recovery
}

func (r *recoveries) get(name string) (Recovery, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rc := r.m[name]; rc != nil {
		return rc.copy(), true
	}
	return Recovery{}, false
}

func (rc *Recovery) copy() Recovery {
	c := *rc
	c.Instances = make(map[string]*RecoveredInstance, len(rc.Instances))
	for k, v := range rc.Instances {
		vv := *v
		c.Instances[k] = &vv
	}
	return c
}

func (r *recoveries) update(name string, fn func(*Recovery)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn(r.m[name])
}

// recoverParallel is how many instances a recovery brings back at once.
const recoverParallel = 4

// startRecover recreates every instance of a lost agent on the others
// from its latest backup: the instance's id, spec and metadata, its data
// as of that backup, and its bindings with their usernames and
// passwords (the applications reconnect to the new host and port with
// the credentials they have). The agent must not answer: one that does
// is drained, not recovered (its instances would run twice).
func (b *Broker) startRecover(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	a := b.fleet.agent(name)
	if a == nil {
		writeJSON(w, http.StatusNotFound, osbError{Description: "no agent named " + name})
		return
	}
	var req RecoverRequest
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
	if err == nil && len(bytes.TrimSpace(body)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		err = dec.Decode(&req)
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, osbError{Error: "BadRequest", Description: "body: " + err.Error()})
		return
	}
	b.recoveries.mu.Lock()
	if cur := b.recoveries.m[name]; cur != nil && cur.State == RecoveryRunning {
		c := cur.copy()
		b.recoveries.mu.Unlock()
		writeJSON(w, http.StatusAccepted, c)
		return
	}
	b.recoveries.mu.Unlock()
	// Ask it again, now: an agent that answers is not lost.
	actx, cancel := context.WithTimeout(r.Context(), b.cfg.AgentTimeout)
	_, err = a.c.Capacity(actx)
	cancel()
	if err == nil {
		writeJSON(w, http.StatusConflict, osbError{Error: "AgentReachable",
			Description: "agent " + name + " answers: its instances are not lost (drain it to move them: POST /admin/agents/" + name + "/drain)"})
		return
	}
	a.markUnreachable(err)
	backupName := req.BackupAgent
	if backupName == "" {
		_, _, _, capa, _, _ := a.snapshot()
		backupName = capa.BackupAgent
	}
	if backupName == "" {
		backupName = name
	}
	rc := &Recovery{Agent: name, BackupAgent: backupName, State: RecoveryRunning, StartedAt: time.Now().UTC(), Instances: map[string]*RecoveredInstance{}}
	b.recoveries.mu.Lock()
	if b.recoveries.m == nil {
		b.recoveries.m = map[string]*Recovery{}
	}
	b.recoveries.m[name] = rc
	c := rc.copy()
	b.recoveries.mu.Unlock()
	b.log.Warn("recovering a lost agent's instances from their backups", "agent", name, "backup_agent", backupName)
	b.background(func() { b.runRecover(b.ctx, a, backupName) })
	writeJSON(w, http.StatusAccepted, c)
}

func (b *Broker) recoverStatus(w http.ResponseWriter, r *http.Request) {
	agentJobStatus(b, w, r, "recovery", b.recoveries.get)
}

func (b *Broker) runRecover(ctx context.Context, lost *agentState, backupName string) {
	name := lost.cfg.Name
	finish := func(err error) {
		now := time.Now().UTC()
		b.recoveries.update(name, func(rc *Recovery) {
			rc.FinishedAt, rc.State = &now, RecoveryDone
			for _, in := range rc.Instances {
				if in.State != RecoveryDone {
					rc.State = RecoveryFailed
				}
			}
			if err != nil {
				rc.State, rc.Error = RecoveryFailed, err.Error()
			}
		})
		rc, _ := b.recoveries.get(name)
		if rc.State == RecoveryDone {
			b.log.Info("recovered a lost agent's instances", "agent", name, "instances", rc.Recovered, "took", now.Sub(rc.StartedAt).Round(time.Millisecond))
		} else {
			b.log.Error("recovery of a lost agent's instances incomplete", "agent", name, "recovered", rc.Recovered, "of", rc.Total, "err", rc.Error)
		}
	}
	// The bucket, through any agent that answers and has it.
	var list []apitype.Backup
	var errs []error
	held := lost.held()
	asked := false
	for _, a := range b.fleet.agents {
		if a == lost {
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		all, err := a.c.LatestBackups(lctx, "")
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", a.cfg.Name, err))
			continue
		}
		asked = true
		for _, bk := range all {
			if bk.Agent == backupName || slices.Contains(held, bk.Instance) {
				list = append(list, bk)
			}
		}
		break
	}
	if !asked {
		finish(fmt.Errorf("no agent could list the backups: %w", errors.Join(errs...)))
		return
	}
	b.recoveries.update(name, func(rc *Recovery) {
		rc.Total = len(list)
		for _, bk := range list {
			rc.Instances[bk.Instance] = &RecoveredInstance{State: RecoveryRunning, Backup: bk.Key, BackupTime: bk.Time}
		}
		for _, id := range held {
			if !slices.ContainsFunc(list, func(bk apitype.Backup) bool { return bk.Instance == id }) {
				rc.Total++
				rc.Instances[id] = &RecoveredInstance{State: RecoveryFailed, Error: "no backup with a manifest in the bucket: it cannot be brought back"}
			}
		}
	})
	sem := make(chan struct{}, recoverParallel)
	var wg sync.WaitGroup
	for _, bk := range list {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			target, err := b.recoverOne(ctx, lost, bk)
			b.recoveries.update(name, func(rc *Recovery) {
				in := rc.Instances[bk.Instance]
				in.Seconds = time.Since(t0).Seconds()
				in.Agent = target
				in.Bindings = len(bk.Bindings)
				if err != nil {
					in.State, in.Error = RecoveryFailed, err.Error()
					return
				}
				in.State, in.BackupAgeSeconds = RecoveryDone, time.Since(bk.Time).Seconds()
				rc.Recovered++
			})
			if err != nil {
				b.log.Error("recover an instance from its backup", "instance", bk.Instance, "backup", bk.Key, "err", err)
			} else {
				b.log.Info("recovered an instance from its backup", "instance", bk.Instance, "to", target, "backup", bk.Key,
					"backup_age", time.Since(bk.Time).Round(time.Second), "took", time.Since(t0).Round(time.Millisecond))
			}
		}()
	}
	wg.Wait()
	finish(nil)
}

// recoverOne recreates one instance from its backup on an agent with
// room: provision (same id, spec and metadata), restore from the backup,
// the bindings with their passwords. A failure removes what it made. An
// instance some other agent holds already is left there (recovered
// before, or never lost).
func (b *Broker) recoverOne(ctx context.Context, lost *agentState, bk apitype.Backup) (string, error) {
	unlock, err := b.locks.lock(ctx, bk.Instance, "recover")
	if err != nil {
		return "", err
	}
	defer unlock()
	found, _, _ := b.fleet.locateReachable(ctx, bk.Instance)
	for _, f := range found {
		if f.agent != lost {
			return f.agent.cfg.Name, fmt.Errorf("agent %s holds instance %s already: left as it is", f.agent.cfg.Name, bk.Instance)
		}
	}
	spec := apitype.Spec{MemoryMB: bk.MemoryMB, Persistence: bk.Persistence, Metadata: bk.Metadata,
		MaxmemoryPolicy: bk.MaxmemoryPolicy, MaxmemoryClients: bk.MaxmemoryClients, TLS: bk.TLS}
	chosen, rejected, ok := b.fleet.place(ctx, needOf(spec), b.cfg.Strategy, lost.cfg.Name)
	if !ok {
		b.metrics.placementFailures.Inc()
		return "", fmt.Errorf("%w for %d MiB: %s", errNoRoom, spec.MemoryMB, rejections(rejected))
	}
	dst := b.fleet.agent(chosen.Name)
	actx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout+30*time.Second)
	_, _, err = dst.c.Provision(actx, bk.Instance, spec)
	cancel()
	if err != nil {
		return dst.cfg.Name, fmt.Errorf("provision on %s: %w", dst.cfg.Name, err)
	}
	dst.reserve(needOf(spec))
	undo := func(cause error) error {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.AgentTimeout+30*time.Second)
		defer cancel()
		if derr := dst.c.Deprovision(uctx, bk.Instance); derr != nil && !client.IsStatus(derr, http.StatusGone) {
			return fmt.Errorf("%w (and removing the new copy on %s failed: %v)", cause, dst.cfg.Name, derr)
		}
		dst.release(needOf(spec))
		return cause
	}
	rctx, cancel := context.WithTimeout(ctx, 3*time.Hour)
	_, err = dst.c.RestoreBackup(rctx, bk.Instance, bk.Key)
	cancel()
	if err != nil {
		return dst.cfg.Name, undo(fmt.Errorf("restore %s on %s: %w", bk.Key, dst.cfg.Name, err))
	}
	for _, bd := range bk.Bindings {
		bctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
		_, _, err := dst.c.Bind(bctx, bk.Instance, bd.ID, bd.Password)
		cancel()
		if err != nil {
			return dst.cfg.Name, undo(fmt.Errorf("bind %s on %s: %w", bd.ID, dst.cfg.Name, err))
		}
	}
	gctx, cancel := context.WithTimeout(ctx, b.cfg.AgentTimeout)
	inst, err := dst.c.Get(gctx, bk.Instance)
	cancel()
	if err == nil {
		dst.remember(inst)
	}
	lost.forget(bk.Instance)
	return dst.cfg.Name, nil
}
