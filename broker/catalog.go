package broker

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/redis-agent/redis-agent/apitype"
)

// Catalog is what the broker sells: services and their plans, with the
// instance settings each plan stands for. It is read from a YAML file
// (DefaultCatalog when none is given) and published by GET /v2/catalog.
type Catalog struct {
	Services []Service `yaml:"services" json:"services"`
}

// Service is one OSB service offering.
type Service struct {
	ID          string   `yaml:"id" json:"id"`
	Name        string   `yaml:"name" json:"name"`
	Description string   `yaml:"description" json:"description"`
	Tags        []string `yaml:"tags" json:"tags,omitempty"`
	// PlanUpdateable: an instance may move to another plan of the service.
	PlanUpdateable bool   `yaml:"plan_updateable" json:"plan_updateable"`
	Plans          []Plan `yaml:"plans" json:"plans"`
}

// Plan is one plan: the instance settings of the agent it maps to.
type Plan struct {
	ID          string `yaml:"id" json:"id"`
	Name        string `yaml:"name" json:"name"`
	Description string `yaml:"description" json:"description"`
	Free        *bool  `yaml:"free" json:"free,omitempty"`
	// MemoryMB is the instance's maxmemory.
	MemoryMB int `yaml:"memory_mb" json:"-"`
	// Persistence is the agent's persistence mode (aof, aof-always, rdb,
	// none); a provision's parameters may choose another when
	// PersistenceChoice lists it.
	Persistence       string   `yaml:"persistence" json:"-"`
	PersistenceChoice []string `yaml:"persistence_choice" json:"-"`
}

//go:embed default-catalog.yaml
var defaultCatalog []byte

// DefaultCatalog is the catalog the broker publishes when it is given no
// file: one service, redis, with plans from 64 MiB to 1 GiB.
func DefaultCatalog() Catalog {
	c, err := ParseCatalog(defaultCatalog)
	if err != nil {
		panic("the default catalog is invalid: " + err.Error())
	}
	return c
}

// LoadCatalog reads and checks a catalog file.
func LoadCatalog(path string) (Catalog, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Catalog{}, err
	}
	c, err := ParseCatalog(b)
	if err != nil {
		return Catalog{}, fmt.Errorf("catalog %s: %w", path, err)
	}
	return c, nil
}

// ParseCatalog parses YAML and checks what the broker relies on: ids
// present and unique across services and plans, names present, a positive
// memory_mb and a known persistence mode for every plan.
func ParseCatalog(b []byte) (Catalog, error) {
	var c Catalog
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return Catalog{}, err
	}
	var errs []error
	ids := map[string]bool{}
	unique := func(what, id string) {
		if id == "" {
			errs = append(errs, fmt.Errorf("%s without an id", what))
		} else if ids[id] {
			errs = append(errs, fmt.Errorf("%s: id %s is used twice", what, id))
		}
		ids[id] = true
	}
	if len(c.Services) == 0 {
		errs = append(errs, errors.New("no services"))
	}
	for i := range c.Services {
		s := &c.Services[i]
		unique("service "+s.Name, s.ID)
		if s.Name == "" || len(s.Plans) == 0 {
			errs = append(errs, fmt.Errorf("service %s: want a name and at least one plan", s.ID))
		}
		for j := range s.Plans {
			p := &s.Plans[j]
			unique("plan "+p.Name, p.ID)
			if p.Name == "" || p.MemoryMB < 1 {
				errs = append(errs, fmt.Errorf("plan %s: want a name and memory_mb >= 1", p.ID))
			}
			if p.Persistence == "" {
				p.Persistence = apitype.PersistenceAOF
			}
			for _, m := range append([]string{p.Persistence}, p.PersistenceChoice...) {
				if !slices.Contains(apitype.Persistences, m) {
					errs = append(errs, fmt.Errorf("plan %s: persistence %q: want one of %s", p.Name, m, strings.Join(apitype.Persistences, ", ")))
				}
			}
		}
	}
	return c, errors.Join(errs...)
}

// find returns the service and plan of the given ids.
func (c Catalog) find(serviceID, planID string) (*Service, *Plan) {
	for i := range c.Services {
		s := &c.Services[i]
		if s.ID != serviceID {
			continue
		}
		for j := range s.Plans {
			if s.Plans[j].ID == planID {
				return s, &s.Plans[j]
			}
		}
		return s, nil
	}
	return nil, nil
}

// parametersSchema is the JSON schema of a plan's provision and update
// parameters, as published in the catalog and as checkParameters applies
// it: an object whose only property is persistence, one of the plan's
// choices.
func (p *Plan) parametersSchema() map[string]any {
	props := map[string]any{
		"maxmemory_policy": map[string]any{"type": "string", "enum": apitype.MaxmemoryPolicies,
			"description": "What the instance does when its memory is full: noeviction (the default) refuses writes; allkeys-lru and the others evict keys, as a cache."},
		"maxmemory_clients": map[string]any{"type": "string", "pattern": apitype.MaxmemoryClientsPattern,
			"description": "The most memory all client connections together may take: 0 (no bound, the default), a percentage of the plan's memory (10%) or a size (8mb); beyond it the clients using the most are disconnected."},
		"tls": map[string]any{"type": "string", "enum": apitype.TLSModes,
			"description": "off (the default), optional (a TLS port next to the plain one) or required (TLS only); the credentials then carry tls_port, tls_uri and ca_cert."},
	}
	if len(p.PersistenceChoice) > 0 {
		choices := append([]string{p.Persistence}, p.PersistenceChoice...)
		slices.Sort(choices)
		choices = slices.Compact(choices)
		props["persistence"] = map[string]any{"type": "string", "enum": choices,
			"description": "How the instance persists its data; the plan's default is " + p.Persistence + "."}
	}
	return map[string]any{
		"$schema":              "http://json-schema.org/draft-04/schema#",
		"type":                 "object",
		"properties":           props,
		"additionalProperties": false,
	}
}

// Parameters are a provision's or update's parameters, as the schema
// allows them.
type Parameters struct {
	Persistence      string `json:"persistence,omitempty"`
	MaxmemoryPolicy  string `json:"maxmemory_policy,omitempty"`
	MaxmemoryClients string `json:"maxmemory_clients,omitempty"`
	TLS              string `json:"tls,omitempty"`
}

// maxmemoryClients checks a maxmemory_clients parameter.
var maxmemoryClients = regexp.MustCompile(apitype.MaxmemoryClientsPattern)

// checkParameters validates raw (absent, null or a JSON object) against
// the plan's schema and returns them.
func (p *Plan) checkParameters(raw json.RawMessage) (Parameters, error) {
	var out Parameters
	s := strings.TrimSpace(string(raw))
	if s == "" || s == "null" {
		return out, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return out, errors.New("parameters must be a JSON object")
	}
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		var v string
		if err := json.Unmarshal(fields[k], &v); err != nil {
			return out, fmt.Errorf("parameter %s must be a string", k)
		}
		switch k {
		case "persistence":
			if len(p.PersistenceChoice) == 0 {
				return out, fmt.Errorf("parameter %q is not one plan %s takes (see its schema in the catalog)", k, p.Name)
			}
			if v != p.Persistence && !slices.Contains(p.PersistenceChoice, v) {
				return out, fmt.Errorf("parameter persistence %q: plan %s allows %s", v, p.Name, strings.Join(append([]string{p.Persistence}, p.PersistenceChoice...), ", "))
			}
			out.Persistence = v
		case "maxmemory_policy":
			if !slices.Contains(apitype.MaxmemoryPolicies, v) {
				return out, fmt.Errorf("parameter maxmemory_policy %q: want one of %s", v, strings.Join(apitype.MaxmemoryPolicies, ", "))
			}
			out.MaxmemoryPolicy = v
		case "maxmemory_clients":
			v = strings.ToLower(v)
			pct, isPct := strings.CutSuffix(v, "%")
			if n, _ := strconv.Atoi(pct); !maxmemoryClients.MatchString(v) || isPct && n > 100 {
				return out, fmt.Errorf("parameter maxmemory_clients %q: want 0, a percentage of the memory up to 100%% (10%%) or a size (8mb)", v)
			}
			out.MaxmemoryClients = v
		case "tls":
			if !slices.Contains(apitype.TLSModes, v) {
				return out, fmt.Errorf("parameter tls %q: want one of %s", v, strings.Join(apitype.TLSModes, ", "))
			}
			out.TLS = v
		default:
			return out, fmt.Errorf("parameter %q is not one plan %s takes (see its schema in the catalog)", k, p.Name)
		}
	}
	return out, nil
}

// spec is the agent instance a plan and its parameters stand for.
func (p *Plan) spec(params Parameters) apitype.Spec {
	s := apitype.Spec{MemoryMB: p.MemoryMB, Persistence: p.Persistence,
		MaxmemoryPolicy: params.MaxmemoryPolicy, MaxmemoryClients: params.MaxmemoryClients, TLS: params.TLS}
	if params.Persistence != "" {
		s.Persistence = params.Persistence
	}
	// The agent's defaults, spelled out: what the instance has when the
	// parameters leave them out.
	if s.MaxmemoryPolicy == "" {
		s.MaxmemoryPolicy = apitype.DefaultMaxmemoryPolicy
	}
	if s.MaxmemoryClients == "" {
		s.MaxmemoryClients = apitype.DefaultMaxmemoryClients
	}
	if s.TLS == "" {
		s.TLS = apitype.TLSOff
	}
	return s
}
