package agent

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/ports"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
)

// An instance's settings besides its memory and persistence: its eviction
// policy, the bound of its clients' memory, and TLS. Each has a default
// that a record written before it existed ("") stands for.

// policyOf is rec's maxmemory-policy.
func policyOf(rec state.Instance) string {
	if rec.MaxmemoryPolicy == "" {
		return apitype.DefaultMaxmemoryPolicy
	}
	return rec.MaxmemoryPolicy
}

// clientsOf is rec's maxmemory-clients.
func clientsOf(rec state.Instance) string {
	if rec.MaxmemoryClients == "" {
		return apitype.DefaultMaxmemoryClients
	}
	return rec.MaxmemoryClients
}

// tlsOf is rec's TLS mode.
func tlsOf(rec state.Instance) string {
	if rec.TLS == "" {
		return apitype.TLSOff
	}
	return rec.TLS
}

// maxmemoryClientsRE is what maxmemory-clients takes: 0, a percentage of
// maxmemory, or a size in bytes with an optional unit.
var maxmemoryClientsRE = regexp.MustCompile(apitype.MaxmemoryClientsPattern)

// normalizePolicy returns an eviction policy as the record keeps it: ""
// is the default; anything Redis 7 does not know is invalid.
func normalizePolicy(p string) (string, error) {
	if p == "" {
		return apitype.DefaultMaxmemoryPolicy, nil
	}
	if !slices.Contains(apitype.MaxmemoryPolicies, p) {
		return "", fmt.Errorf("maxmemory_policy %q: %w: want one of %s", p, ErrInvalid, strings.Join(apitype.MaxmemoryPolicies, ", "))
	}
	return p, nil
}

// normalizeClients returns a maxmemory_clients as the record keeps it
// (lower case; "" is the default, 0).
func normalizeClients(v string) (string, error) {
	if v == "" {
		return apitype.DefaultMaxmemoryClients, nil
	}
	v = strings.ToLower(v)
	if !maxmemoryClientsRE.MatchString(v) {
		return "", fmt.Errorf("maxmemory_clients %q: %w: want 0 (no bound), a percentage of maxmemory (10%%) or a size (8mb)", v, ErrInvalid)
	}
	if pct, ok := strings.CutSuffix(v, "%"); ok {
		if n, _ := strconv.Atoi(pct); n > 100 {
			return "", fmt.Errorf("maxmemory_clients %q: %w: a percentage of maxmemory is at most 100%%", v, ErrInvalid)
		}
	}
	return v, nil
}

// normalizeTLS returns a TLS mode as the record keeps it ("" is off).
func normalizeTLS(m string) (string, error) {
	if m == "" {
		return apitype.TLSOff, nil
	}
	if !slices.Contains(apitype.TLSModes, m) {
		return "", fmt.Errorf("tls %q: %w: want one of %s", m, ErrInvalid, strings.Join(apitype.TLSModes, ", "))
	}
	return m, nil
}

// CheckSettings reports whether a PATCH's settings are valid (an
// ErrInvalid when not), before anything changes.
func CheckSettings(set apitype.Settings) error {
	_, err := normalizeSettings(set)
	return err
}

// normalizeSettings returns set with every value given in the record's
// form.
func normalizeSettings(set apitype.Settings) (apitype.Settings, error) {
	var out apitype.Settings
	if p := set.MaxmemoryPolicy; p != nil {
		if *p == "" {
			return out, fmt.Errorf("maxmemory_policy: %w: want one of %s", ErrInvalid, strings.Join(apitype.MaxmemoryPolicies, ", "))
		}
		v, err := normalizePolicy(*p)
		if err != nil {
			return out, err
		}
		out.MaxmemoryPolicy = &v
	}
	if c := set.MaxmemoryClients; c != nil {
		if *c == "" {
			return out, fmt.Errorf("maxmemory_clients: %w: want 0 (no bound), a percentage of maxmemory (10%%) or a size (8mb)", ErrInvalid)
		}
		v, err := normalizeClients(*c)
		if err != nil {
			return out, err
		}
		out.MaxmemoryClients = &v
	}
	if t := set.TLS; t != nil {
		if *t == "" {
			return out, fmt.Errorf("tls: %w: want one of %s", ErrInvalid, strings.Join(apitype.TLSModes, ", "))
		}
		v, err := normalizeTLS(*t)
		if err != nil {
			return out, err
		}
		out.TLS = &v
	}
	return out, nil
}

// Configure changes the settings of instance id that set gives, live:
// the record, the config file and the running server (CONFIG SET), no
// restart and no dropped connection. Turning TLS on takes a second port
// from the range (507 when none is free) and issues the instance's
// certificate; turning it off frees that port. Asked again with the same
// settings, it applies them to the running server again, so a retry
// finishes a change that failed half-way.
func (s *Service) Configure(ctx context.Context, id string, set apitype.Settings) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	set, err := normalizeSettings(set)
	if err != nil {
		return Instance{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	old, err := s.store.Get(id)
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	rec, err := s.store.Admit(id, func(r *state.Instance, u state.Usage) error {
		if r.Phase != state.PhaseActive {
			return fmt.Errorf("instance %q is %s: %w", id, r.Phase, ErrConflict)
		}
		if r.Move != nil || r.ReplicaOf != nil {
			return fmt.Errorf("instance %q is in a move: %w", id, ErrConflict)
		}
		if p := set.MaxmemoryPolicy; p != nil {
			r.MaxmemoryPolicy = *p
		}
		if c := set.MaxmemoryClients; c != nil {
			r.MaxmemoryClients = *c
		}
		if t := set.TLS; t != nil {
			r.TLS = *t
			switch {
			case *t == apitype.TLSOff:
				r.TLSPort = 0
			case r.TLSPort == 0:
				p, err := s.alloc.Next(u.PortHeld)
				if err != nil {
					return s.portErr(err)
				}
				r.TLSPort = p
			}
		}
		return nil
	})
	if err != nil {
		return Instance{}, notFound(id, err)
	}
	if rec, err = s.ensureCert(rec); err != nil {
		return Instance{}, fmt.Errorf("configure %q: %w", id, err)
	}
	confHash, err := s.writeFiles(rec)
	if err != nil {
		return Instance{}, fmt.Errorf("configure %q: %w", id, err)
	}
	if rec, err = s.store.Update(id, func(r *state.Instance) error { r.ConfigHash = confHash; return nil }); err != nil {
		return Instance{}, err
	}
	if in := s.runtime(id); in != nil {
		in.policy.Store(policyOf(rec))
		if err := s.applySettings(ctx, in, rec); err != nil {
			return Instance{}, fmt.Errorf("configure %q: %w (recorded; a retry or the next start applies it)", id, err)
		}
	}
	s.removeStaleCerts(rec)
	s.log.Info("configured", "instance", id,
		"maxmemory_policy", policyOf(rec), "maxmemory_clients", clientsOf(rec), "tls", tlsOf(rec), "tls_port", rec.TLSPort,
		"was", fmt.Sprintf("%s %s %s", policyOf(old), clientsOf(old), tlsOf(old)))
	return s.view(rec), nil
}

// portErr is the error of a port allocation.
func (s *Service) portErr(err error) error {
	if errors.Is(err, ports.ErrExhausted) {
		return fmt.Errorf("%w: every port of %d-%d is taken", ErrCapacity, s.cfg.PortMin, s.cfg.PortMax)
	}
	return err
}

// applySettings makes the running server of in have rec's settings:
// eviction, clients' memory, TLS (its ports and certificate), and points
// the agent's own connections at the port that is open. A server that is
// not running gets them from its config at its next start.
func (s *Service) applySettings(ctx context.Context, in *instance, rec state.Instance) error {
	if in.sup.Status().State != supervisor.Running {
		s.useTLS(in, rec)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pairs := []string{"maxmemory-policy", policyOf(rec), "maxmemory-clients", clientsOf(rec)}
	pairs = append(pairs, redis.TLSSettings(s.tlsConf(rec), rec.Port)...)
	// The TLS port opens (or the plain one reopens) before the agent
	// dials it, and the port it dialled closes only after: the kept
	// connection, whichever port it came through, stays open.
	err := in.admin.SetConfig(ctx, pairs...)
	s.useTLS(in, rec)
	if err != nil && !redis.Unreachable(err) && s.tlsConf(rec) != nil {
		// A server an older agent started has no tls directory in its
		// Landlock policy: its next start has.
		return fmt.Errorf("%w (a redis-server started before its tls directory existed cannot read its certificate: a restart, POST /v1/instances/%s/restart, applies it)", err, rec.ID)
	}
	return err
}
