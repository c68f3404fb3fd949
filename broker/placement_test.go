package broker

import (
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
)

func cand(name, zone string, freeMB, instances int) Candidate {
	return Candidate{Name: name, Zone: zone, Ready: true,
		Capacity: apitype.Capacity{Instances: instances, PortsFree: 10, MemoryFreeMB: freeMB, MemoryTotalMB: 1000}}
}

func TestPlace(t *testing.T) {
	notReady := cand("a", "z1", 900, 0)
	notReady.Ready = false
	draining := cand("b", "z1", 900, 0)
	draining.Draining = true
	noPort := cand("c", "z1", 900, 0)
	noPort.Capacity.PortsFree = 0
	for _, tt := range []struct {
		name     string
		cands    []Candidate
		mb       int
		strategy Strategy
		exclude  []string
		want     string // "" = none
	}{
		{"most free memory", []Candidate{cand("a", "z", 100, 0), cand("b", "z", 300, 0), cand("c", "z", 200, 0)}, 64, Spread, nil, "b"},
		{"a tie goes to the lower name", []Candidate{cand("b", "z", 300, 0), cand("a", "z", 300, 0)}, 64, Spread, nil, "a"},
		{"the emptier zone first", []Candidate{cand("a", "z1", 900, 5), cand("b", "z2", 100, 1), cand("c", "z2", 200, 1)}, 64, Spread, nil, "c"},
		{"zone load counts every agent of the zone", []Candidate{cand("a", "z1", 900, 1), cand("b", "z1", 900, 1), cand("c", "z2", 100, 1)}, 64, Spread, nil, "c"},
		{"pack: the fullest that fits", []Candidate{cand("a", "z", 900, 0), cand("b", "z", 70, 0), cand("c", "z", 60, 0)}, 64, Pack, nil, "b"},
		{"not ready, draining, no port are out", []Candidate{notReady, draining, noPort, cand("d", "z1", 10, 0)}, 64, Spread, nil, ""},
		{"exactly enough memory fits", []Candidate{cand("a", "z", 64, 0)}, 64, Spread, nil, "a"},
		{"excluded (a move's source)", []Candidate{cand("a", "z", 900, 0), cand("b", "z", 100, 0)}, 64, Spread, []string{"a"}, "b"},
		{"nothing", nil, 64, Spread, nil, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, rejected, ok := Place(tt.cands, tt.mb, tt.strategy, tt.exclude...)
			if tt.want == "" {
				if ok {
					t.Fatalf("placed on %s; want nowhere", got.Name)
				}
				if len(rejected) != len(tt.cands) {
					t.Fatalf("rejections %v; want one per agent", rejected)
				}
				return
			}
			if !ok || got.Name != tt.want {
				t.Fatalf("placed on %q (%v); want %q; rejected %v", got.Name, ok, tt.want, rejected)
			}
			if len(rejected) != len(tt.cands)-1 {
				t.Fatalf("rejections %v; want every other agent with a reason", rejected)
			}
		})
	}
}
