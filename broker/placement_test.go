package broker

import (
	"slices"
	"testing"

	"github.com/redis-agent/redis-agent/apitype"
)

func cand(name, zone string, freeMB, instances int) Candidate {
	return Candidate{Name: name, Zone: zone, Ready: true,
		Capacity: apitype.Capacity{Instances: instances, PortsFree: 10, MemoryFreeMB: freeMB, MemoryTotalMB: 1000}}
}

// withDisk gives c a disk budget with availMB available, and each
// instance 3 MiB of overhead (its directory, its logs).
func withDisk(c Candidate, availMB int64) Candidate {
	c.Capacity.DiskTotalBytes = 10 << 30
	c.Capacity.DiskAvailableBytes = availMB << 20
	c.Capacity.DiskOverheadBytes = 3 << 20
	return c
}

func TestPlace(t *testing.T) {
	notReady := cand("a", "z1", 900, 0)
	notReady.Ready = false
	draining := cand("b", "z1", 900, 0)
	draining.Draining = true
	noPort := cand("c", "z1", 900, 0)
	noPort.Capacity.PortsFree = 0
	budgetOff := withDisk(cand("a", "z", 900, 0), 0)
	budgetOff.Capacity.DiskBudgetOff = true
	aof64 := Need{64, "aof"} // 3*64+64 MiB of files, 3 of overhead: 259 MiB
	for _, tt := range []struct {
		name     string
		cands    []Candidate
		need     Need
		strategy Strategy
		exclude  []string
		want     string // "" = none
		reason   string // one of the rejections says so
	}{
		{"most free memory", []Candidate{cand("a", "z", 100, 0), cand("b", "z", 300, 0), cand("c", "z", 200, 0)}, aof64, Spread, nil, "b", ""},
		{"a tie goes to the lower name", []Candidate{cand("b", "z", 300, 0), cand("a", "z", 300, 0)}, aof64, Spread, nil, "a", ""},
		{"the emptier zone first", []Candidate{cand("a", "z1", 900, 5), cand("b", "z2", 100, 1), cand("c", "z2", 200, 1)}, aof64, Spread, nil, "c", ""},
		{"zone load counts every agent of the zone", []Candidate{cand("a", "z1", 900, 1), cand("b", "z1", 900, 1), cand("c", "z2", 100, 1)}, aof64, Spread, nil, "c", ""},
		{"pack: the fullest that fits", []Candidate{cand("a", "z", 900, 0), cand("b", "z", 70, 0), cand("c", "z", 60, 0)}, aof64, Pack, nil, "b", ""},
		{"not ready, draining, no port are out", []Candidate{notReady, draining, noPort, cand("d", "z1", 10, 0)}, aof64, Spread, nil, "", ""},
		{"exactly enough memory fits", []Candidate{cand("a", "z", 64, 0)}, aof64, Spread, nil, "a", ""},
		{"excluded (a move's source)", []Candidate{cand("a", "z", 900, 0), cand("b", "z", 100, 0)}, aof64, Spread, []string{"a"}, "b", ""},
		{"nothing", nil, aof64, Spread, nil, "", ""},
		{"the disk for its reservation", []Candidate{withDisk(cand("a", "z", 900, 0), 258), withDisk(cand("b", "z", 100, 0), 5000)}, aof64, Spread, nil, "b", "258 MiB of disk available, 259 needed"},
		{"exactly enough disk fits", []Candidate{withDisk(cand("a", "z", 900, 0), 259)}, aof64, Spread, nil, "a", ""},
		{"rdb reserves twice its memory", []Candidate{withDisk(cand("a", "z", 900, 0), 131)}, Need{64, "rdb"}, Spread, nil, "a", ""},
		{"no persistence, no files", []Candidate{withDisk(cand("a", "z", 900, 0), 3)}, Need{64, "none"}, Spread, nil, "a", ""},
		{"no disk for any", []Candidate{withDisk(cand("a", "z", 900, 0), 2)}, Need{64, "none"}, Spread, nil, "", "2 MiB of disk available, 3 needed"},
		{"an agent with --disk-budget off is not held to it", []Candidate{budgetOff}, aof64, Spread, nil, "a", ""},
		{"an agent that reports no disk is not held to it", []Candidate{cand("a", "z", 900, 0)}, aof64, Spread, nil, "a", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, rejected, ok := Place(tt.cands, tt.need, tt.strategy, tt.exclude...)
			if tt.reason != "" && !slices.ContainsFunc(rejected, func(r Rejection) bool { return r.Reason == tt.reason }) {
				t.Errorf("rejections %v; want one saying %q", rejected, tt.reason)
			}
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
