package agent

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// reservedUsers are ACL user names a binding may not take.
var reservedUsers = map[string]bool{"default": true, redis.AdminUser: true}

// Bind creates an ACL user for binding bid on instance id and returns its
// credentials. created is false when the binding already existed (the same
// credentials are returned again).
func (s *Service) Bind(ctx context.Context, id, bid string) (Credentials, bool, error) {
	if err := validateID("instance", id); err != nil {
		return Credentials{}, false, err
	}
	if err := validateID("binding", bid); err != nil {
		return Credentials{}, false, err
	}
	if reservedUsers[bid] {
		return Credentials{}, false, fmt.Errorf("binding id %q is reserved: %w", bid, ErrInvalid)
	}
	unlock := s.locks.lock(id)
	defer unlock()

	created := false
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if r.Phase != state.PhaseActive {
			return fmt.Errorf("instance %q is %s: %w", id, r.Phase, ErrConflict)
		}
		if _, ok := r.Bindings[bid]; ok {
			return nil
		}
		if r.Bindings == nil {
			r.Bindings = map[string]state.Binding{}
		}
		r.Bindings[bid] = state.Binding{ID: bid, Username: bid, Password: redis.NewPassword(), CreatedAt: time.Now().UTC()}
		created = true
		return nil
	})
	if err != nil {
		return Credentials{}, false, notFound(id, err)
	}
	crashAt(FaultBindRecorded)
	// The record is written first; the ACL file follows from it, here or,
	// after a crash, in reconcile.
	if err := s.applyACL(ctx, rec); err != nil {
		return Credentials{}, false, fmt.Errorf("bind %q/%q: %w", id, bid, err)
	}
	b := rec.Bindings[bid]
	return s.credentials(rec, b), created, nil
}

// Unbind deletes the ACL user of binding bid and closes its connections.
func (s *Service) Unbind(ctx context.Context, id, bid string) error {
	if err := validateID("instance", id); err != nil {
		return err
	}
	if err := validateID("binding", bid); err != nil {
		return err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Update(id, func(r *state.Instance) error {
		if _, ok := r.Bindings[bid]; !ok {
			return fmt.Errorf("binding %q of instance %q: %w", bid, id, ErrNotFound)
		}
		delete(r.Bindings, bid)
		return nil
	})
	if err != nil {
		return notFound(id, err)
	}
	crashAt(FaultUnbindRecorded)
	if err := s.applyACL(ctx, rec); err != nil {
		return fmt.Errorf("unbind %q/%q: %w", id, bid, err)
	}
	return nil
}

// applyACL writes the ACL file of rec and brings the running server's users
// in line with it; a removed user's connections are closed. When no process
// runs, the file takes effect at its next start.
func (s *Service) applyACL(ctx context.Context, rec state.Instance) error {
	if err := s.layout.WriteConfig(s.layout.ACLPath(rec.ID), acl(rec)); err != nil {
		return err
	}
	in := s.runtime(rec.ID)
	if in == nil || in.sup.Status().State != supervisor.Running {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := in.admin.SyncUsers(ctx, tenantUsers(rec))
	if redis.Unreachable(err) {
		// The process is going down (a crash, a hang being killed): the
		// record and the ACL file are written, and the next process loads
		// the file and is synced again when it is ready.
		s.log.Info("redis-server unreachable; the ACL change applies when it is back", "instance", rec.ID, "err", err)
		return nil
	}
	return err
}

func (s *Service) credentials(rec state.Instance, b state.Binding) Credentials {
	host := s.cfg.advertiseHost()
	u := url.URL{
		Scheme: "redis",
		User:   url.UserPassword(b.Username, b.Password),
		Host:   net.JoinHostPort(host, strconv.Itoa(rec.Port)),
	}
	return Credentials{Host: host, Port: rec.Port, Username: b.Username, Password: b.Password, URI: u.String()}
}
