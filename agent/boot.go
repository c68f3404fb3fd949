package agent

import (
	"cmp"
	"context"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/redis-agent/redis-agent/state"
)

// The order of starts at agent start. After a power loss every instance
// needs a new process; started all at once, a thousand redis-servers and
// their launchers split the machine's cores a thousand ways and every one
// comes back late. Reconcile instead lets them through in the order of
// their data on disk, smallest first, so most tenants are back soonest
// and a large data set loads while the small ones are done already, and
// bootStartsPerCPU per core at once: each holds its turn until it answers
// PING, fails, or has had bootTurn (a large data set loading keeps a core,
// not the queue). Processes a previous agent left running are adopted at
// once; nothing waits for them.

// bootStartsPerCPU is how many starts run at once per core at boot.
const bootStartsPerCPU = 16

// bootTurn is the longest one start holds its turn.
const bootTurn = time.Second

// bootOrder is what reconcile gathers of the records it goes through: the
// records to write in one commit, and the instances to start, in order.
type bootOrder struct {
	mu      sync.Mutex
	updates map[string]func(*state.Instance) error
	gates   map[string]chan struct{}
	sizes   map[string]int64
}

func newBootOrder() *bootOrder {
	return &bootOrder{updates: map[string]func(*state.Instance) error{}, gates: map[string]chan struct{}{}, sizes: map[string]int64{}}
}

// update records fn, the change of id's record.
func (b *bootOrder) update(id string, fn func(*state.Instance) error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.updates[id] = fn
}

// enroll puts id, with size bytes of data, in the queue of starts.
func (b *bootOrder) enroll(id string, size int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.gates[id] = make(chan struct{})
	b.sizes[id] = size
}

// gate is id's start gate, nil when it is not in the queue.
func (b *bootOrder) gate(id string) <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if g, ok := b.gates[id]; ok {
		return g
	}
	return nil
}

// run lets the queue through, smallest data first (then by id), so many at
// once. It returns once every start has had its turn, or ctx ends (the
// supervisors still waiting end with it).
func (b *bootOrder) run(ctx context.Context, turnsAtOnce int, runtimeOf func(id string) *instance) {
	b.mu.Lock()
	ids := make([]string, 0, len(b.gates))
	for id := range b.gates {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(x, y string) int { return cmp.Or(cmp.Compare(b.sizes[x], b.sizes[y]), cmp.Compare(x, y)) })
	b.mu.Unlock()
	if turnsAtOnce < 1 {
		turnsAtOnce = bootStartsPerCPU * runtime.NumCPU()
	}
	turns := make(chan struct{}, turnsAtOnce)
	for _, id := range ids {
		select {
		case turns <- struct{}{}:
		case <-ctx.Done():
			return
		}
		close(b.gates[id])
		in := runtimeOf(id)
		go func() {
			defer func() { <-turns }()
			if in == nil {
				return
			}
			tctx, cancel := context.WithTimeout(ctx, bootTurn)
			defer cancel()
			in.sup.WaitReady(tctx)
		}()
	}
	for range cap(turns) {
		select {
		case turns <- struct{}{}:
		case <-ctx.Done():
			return
		}
	}
}
