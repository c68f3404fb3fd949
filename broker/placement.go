package broker

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/redis-agent/redis-agent/apitype"
)

// Strategy names how placement picks among the agents with room.
type Strategy string

// Strategies.
const (
	// Spread (the default) puts a new instance in the zone that holds the
	// fewest instances, and there on the agent with the most free memory:
	// tenants spread across zones and VMs, so losing one takes the fewest.
	Spread Strategy = "spread"
	// Pack puts it on the agent with the least free memory that still
	// fits it (bin-packing): VMs fill one after the other, and empty ones
	// can be given back.
	Pack Strategy = "pack"
)

// Candidate is one agent as placement sees it.
type Candidate struct {
	Name     string
	Zone     string
	Ready    bool
	Draining bool
	// Capacity is the agent's /v1/capacity.
	Capacity apitype.Capacity
}

// Rejection says why an agent was not chosen.
type Rejection struct {
	Agent  string
	Reason string
}

// Need is what an instance takes of an agent: its memory budget, and a
// disk reservation its memory and persistence make (Capacity.DiskNeed).
type Need struct {
	MemoryMB    int
	Persistence string
}

// needOf is what an instance of spec needs.
func needOf(spec apitype.Spec) Need { return Need{spec.MemoryMB, spec.Persistence} }

// Place picks the agent for a new instance of need among cands: first it
// filters (ready, not draining, not in exclude, a free port, the memory
// in its free memory budget and the disk reservation in its available
// disk), then it ranks by strategy; ties go to the lower name, so the
// choice is deterministic. ok is false when no agent has room; rejected
// lists why each agent was left out.
func Place(cands []Candidate, need Need, strategy Strategy, exclude ...string) (chosen Candidate, rejected []Rejection, ok bool) {
	var fit []Candidate
	zoneLoad := map[string]int{}
	for _, c := range cands {
		zoneLoad[c.Zone] += c.Capacity.Instances
		disk := c.Capacity.DiskNeed(need.MemoryMB, need.Persistence)
		reason := ""
		switch {
		case slices.Contains(exclude, c.Name):
			reason = "excluded (the instance's own agent)"
		case !c.Ready:
			reason = "not ready"
		case c.Draining:
			reason = "draining"
		case c.Capacity.PortsFree < 1:
			reason = "no free port"
		case c.Capacity.MemoryFreeMB < need.MemoryMB:
			reason = fmt.Sprintf("%d MiB of memory budget free, %d needed", c.Capacity.MemoryFreeMB, need.MemoryMB)
		case !c.Capacity.DiskFits(disk):
			reason = fmt.Sprintf("%d MiB of disk available, %d needed", c.Capacity.DiskAvailableBytes>>20, (disk+1<<20-1)>>20)
		}
		if reason != "" {
			rejected = append(rejected, Rejection{c.Name, reason})
			continue
		}
		fit = append(fit, c)
	}
	if len(fit) == 0 {
		return Candidate{}, rejected, false
	}
	slices.SortFunc(fit, func(a, b Candidate) int {
		if strategy == Pack {
			return cmp.Or(cmp.Compare(a.Capacity.MemoryFreeMB, b.Capacity.MemoryFreeMB), cmp.Compare(a.Name, b.Name))
		}
		return cmp.Or(
			cmp.Compare(zoneLoad[a.Zone], zoneLoad[b.Zone]),
			cmp.Compare(b.Capacity.MemoryFreeMB, a.Capacity.MemoryFreeMB),
			cmp.Compare(a.Name, b.Name))
	})
	for _, c := range fit[1:] {
		rejected = append(rejected, Rejection{c.Name, "ranked lower than " + fit[0].Name})
	}
	return fit[0], rejected, true
}
