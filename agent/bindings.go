package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// reservedUsers are ACL user names a binding may not take.
var reservedUsers = map[string]bool{"default": true, redis.AdminUser: true}

// Bind creates an ACL user for binding bid on instance id and returns its
// credentials. created is false when the binding already existed (the same
// credentials are returned again). password, when not empty, is the
// binding's password (a move keeps an application's credentials); a
// binding that exists with another is a conflict.
func (s *Service) Bind(ctx context.Context, id, bid, password string) (Credentials, bool, error) {
	if err := validateID("instance", id); err != nil {
		return Credentials{}, false, err
	}
	if err := validateID("binding", bid); err != nil {
		return Credentials{}, false, err
	}
	if reservedUsers[bid] {
		return Credentials{}, false, fmt.Errorf("binding id %q is reserved: %w", bid, ErrInvalid)
	}
	if err := validPassword(password); err != nil {
		return Credentials{}, false, err
	}
	unlock := s.locks.lock(id)
	defer unlock()

	created := false
	rec, err := s.updateActive(id, func(r *state.Instance) error {
		if b, ok := r.Bindings[bid]; ok {
			if password != "" && password != b.Password {
				return fmt.Errorf("binding %q of instance %q exists with another password: %w", bid, id, ErrConflict)
			}
			return nil
		}
		if in := s.runtime(id); in != nil && in.sup.Status().State == supervisor.Crashloop {
			// Credentials for a server that keeps failing would not work.
			return fmt.Errorf("instance %q is crash-looping (its log says why): %w", id, ErrConflict)
		}
		if r.Bindings == nil {
			r.Bindings = map[string]state.Binding{}
		}
		if password == "" {
			password = redis.NewPassword()
		}
		r.Bindings[bid] = state.Binding{ID: bid, Username: bid, Password: password, CreatedAt: time.Now().UTC()}
		created = true
		return nil
	})
	if err != nil {
		return Credentials{}, false, err
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

// validPassword checks a password a caller sets: empty (the agent makes
// one), or at least apitype.MinPasswordBytes of printable ASCII without
// spaces, which an ACL file line and a URI carry as they are.
func validPassword(p string) error {
	if p == "" {
		return nil
	}
	if len(p) < apitype.MinPasswordBytes || len(p) > 256 {
		return fmt.Errorf("password: %w: want %d to 256 bytes, got %d", ErrInvalid, apitype.MinPasswordBytes, len(p))
	}
	for _, c := range p {
		if c <= ' ' || c > '~' {
			return fmt.Errorf("password: %w: want printable ASCII without spaces", ErrInvalid)
		}
	}
	return nil
}

// Binding returns the credentials of binding bid of instance id.
func (s *Service) Binding(ctx context.Context, id, bid string) (Credentials, error) {
	if err := validateID("instance", id); err != nil {
		return Credentials{}, err
	}
	if err := validateID("binding", bid); err != nil {
		return Credentials{}, err
	}
	rec, err := s.store.Get(id)
	if err != nil {
		return Credentials{}, notFound(id, err)
	}
	b, ok := rec.Bindings[bid]
	if !ok {
		return Credentials{}, fmt.Errorf("binding %q of instance %q: %w", bid, id, ErrNotFound)
	}
	return s.credentials(rec, b), nil
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

// applyACL writes the ACL file of rec and makes the running server's users
// match it before it returns: a removed user can no longer log in nor use
// a connection it has open, and a new one can log in. It goes over the
// kept control connection. When the server is alive but cannot be told (it
// lost that connection while every client slot is taken), it is restarted
// gracefully, and the new process loads the file. When no process runs,
// the next one loads the file. Only when even the restart fails is the
// change reported undone; it is then retried at every health check until
// it is applied.
func (s *Service) applyACL(ctx context.Context, rec state.Instance) error {
	if err := s.layout.WriteRendered(s.layout.ACLPath(rec.ID), acl(rec), s.ownerOf(rec)); err != nil {
		return err
	}
	in := s.runtime(rec.ID)
	if in == nil {
		return nil
	}
	err := s.syncUsers(ctx, in, rec)
	if err != nil {
		in.aclPending.Store(true)
		return err
	}
	in.aclPending.Store(false)
	return nil
}

// syncUsers applies rec's users to the process of in, by ACL commands or
// by a restart; see applyACL.
func (s *Service) syncUsers(ctx context.Context, in *instance, rec state.Instance) error {
	log := s.log.With("instance", rec.ID)
	st := in.sup.Status()
	if st.Process.PID == 0 {
		return nil // down: the next process reads the file
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := in.admin.SyncUsers(sctx, tenantUsers(rec))
	cancel()
	if err == nil {
		return nil
	}
	if !redis.Unreachable(err) && !errors.Is(err, redis.ErrSaturated) && !errors.Is(err, redis.ErrLoading) {
		return fmt.Errorf("apply ACL users: %w", err)
	}
	if st.State == supervisor.Starting {
		// Not listening yet (it then loads the file itself) or not
		// answering yet: try again once it is ready.
		wctx, cancel := context.WithTimeout(ctx, s.cfg.ReadyTimeout)
		werr := in.sup.WaitReady(wctx)
		cancel()
		if werr == nil {
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = in.admin.SyncUsers(sctx, tenantUsers(rec))
			cancel()
			if err == nil {
				return nil
			}
		}
	}
	cur := in.sup.Status()
	if cur.Process.PID == 0 || supervisor.Verify(cur.Process, s.layout.ConfPath(rec.ID)) != nil {
		return nil // it went down; the next process reads the file
	}
	// Alive and out of reach: the ACL file is written, and a graceful
	// restart (SIGTERM when SHUTDOWN cannot reach it either) applies it.
	log.Warn("cannot reach redis-server to change its ACL users; restarting it to load the ACL file", "pid", cur.Process.PID, "err", err)
	if rerr := in.sup.Restart(ctx); rerr != nil {
		return fmt.Errorf("apply ACL users: %w; restart to load the ACL file: %w", err, rerr)
	}
	return nil
}

// credentials are what binding b of rec hands to the application: the
// plain port and a redis:// URI; with TLS also the TLS port, a rediss://
// URI and the CA; with TLS required, the TLS ones are the port and URI.
func (s *Service) credentials(rec state.Instance, b state.Binding) Credentials {
	host := s.cfg.advertiseHost()
	uri := func(scheme string, port int) string {
		u := url.URL{Scheme: scheme, User: url.UserPassword(b.Username, b.Password), Host: net.JoinHostPort(host, strconv.Itoa(port))}
		return u.String()
	}
	c := Credentials{Host: host, Port: rec.Port, Username: b.Username, Password: b.Password, URI: uri("redis", rec.Port)}
	if t := s.tlsConf(rec); t != nil {
		c.TLSPort, c.TLSURI, c.CACert = t.Port, uri("rediss", t.Port), string(s.ca.pem)
		if t.Required {
			c.Port, c.URI = t.Port, c.TLSURI
		}
	}
	return c
}
