package broker

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"time"
)

// An asynchronous operation (a plan change that moves an instance, an
// asynchronous deprovision), as last_operation reports it. Its id names
// its kind and, for an update, the plan it goes to, so a broker that did
// not run it (another one, or this one after a restart) can still tell
// from the agents how it ended.
type operation struct {
	id, instance, kind string

	mu       sync.Mutex
	err      error
	finished time.Time
	// unsettled: the operation ended leaving its move to the settle of
	// left moves (errUnsettled): err says why, but how the move ends is
	// up to that settle, so the agents tell.
	unsettled bool
}

func (o *operation) state() (state, description string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case o.finished.IsZero():
		return opInProgress, ""
	case o.err != nil:
		return opFailed, o.err.Error()
	}
	return opSucceeded, ""
}

// operations remembers the broker's operations until ttl after they end.
type operations struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]*operation // by instance + "/" + id
}

func newOperations(ttl time.Duration) *operations {
	return &operations{ttl: ttl, m: map[string]*operation{}}
}

// start records a new operation of kind ("update", "deprovision") on
// instance; arg is the update's target plan.
func (os *operations) start(instance, kind, arg string) *operation {
	var nonce [6]byte
	rand.Read(nonce[:])
	id := kind + ":" + hex.EncodeToString(nonce[:])
	if arg != "" {
		id = kind + ":" + arg + ":" + hex.EncodeToString(nonce[:])
	}
	o := &operation{id: id, instance: instance, kind: kind}
	os.mu.Lock()
	defer os.mu.Unlock()
	os.gc()
	os.m[instance+"/"+id] = o
	return o
}

// finish records how o ended.
func (os *operations) finish(o *operation, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.err, o.finished, o.unsettled = err, time.Now(), errors.Is(err, errUnsettled)
}

// leftToSettle reports whether o ended leaving its move to the settle of
// left moves: last_operation then asks the agents how it ends.
func (o *operation) leftToSettle() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.unsettled
}

// get returns the operation id of instance, if this broker remembers it.
func (os *operations) get(instance, id string) (*operation, bool) {
	os.mu.Lock()
	defer os.mu.Unlock()
	os.gc()
	o, ok := os.m[instance+"/"+id]
	return o, ok
}

// gc forgets operations that ended more than ttl ago.
func (os *operations) gc() {
	for k, o := range os.m {
		o.mu.Lock()
		old := !o.finished.IsZero() && time.Since(o.finished) > os.ttl
		o.mu.Unlock()
		if old {
			delete(os.m, k)
		}
	}
}

// parseOperation reads an operation id: its kind and, for an update, the
// plan it goes to (for an upgrade, the Redis version). ok is false for an
// id this broker never makes.
func parseOperation(id string) (kind, plan string, ok bool) {
	parts := strings.Split(id, ":")
	switch {
	case len(parts) == 3 && (parts[0] == "update" || parts[0] == "upgrade"):
		return parts[0], parts[1], true
	case len(parts) == 2 && parts[0] == "deprovision":
		return "deprovision", "", true
	}
	return "", "", false
}
