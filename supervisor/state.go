package supervisor

import (
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/redis-agent/redis-agent/apitype"
)

// State is where an instance's process is in its lifecycle.
type State int

// States of the diagram in the package doc.
const (
	Starting State = iota
	Running
	Backoff
	Crashloop
	Stopping
	Stopped
)

// stateNames are the states' names: the API's, so that a State's String
// is what GET /v1/instances shows.
var stateNames = [...]string{
	Starting:  apitype.StateStarting,
	Running:   apitype.StateRunning,
	Backoff:   apitype.StateBackoff,
	Crashloop: apitype.StateCrashloop,
	Stopping:  apitype.StateStopping,
	Stopped:   apitype.StateStopped,
}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// transitions lists, for each state, the states the loop may move it to:
// the edges of the package doc's diagram and no others (a test holds the
// two together).
var transitions = map[State][]State{
	// The first spawn or adoption (New reports starting before Run acts);
	// PONG; an exit, or a failed first spawn; Stop or Replace.
	Starting: {Starting, Running, Backoff, Crashloop, Stopping},
	// An exit: a crash, or killed as hung; Stop or Replace.
	Running: {Backoff, Crashloop, Stopping},
	// The timer or Replace spawns; a spawn that fails again (Replace
	// clears the failure count, so crashloop may become backoff); Stop.
	Backoff:   {Starting, Backoff, Crashloop, Stopping},
	Crashloop: {Starting, Backoff, Crashloop, Stopping},
	// Replace's spawn, or its failure; Stop, also after a Replace whose
	// old process survived SIGKILL and left the state stopping; Stop's end.
	Stopping: {Starting, Backoff, Crashloop, Stopping, Stopped},
	// Run has returned.
	Stopped: nil,
}

// errIllegalTransition is a move between states the diagram has no edge
// for: a bug in the loop.
var errIllegalTransition = errors.New("illegal state transition")

// checkTransition returns nil when from -> to is an edge of the diagram.
func checkTransition(from, to State) error {
	if slices.Contains(transitions[from], to) {
		return nil
	}
	return fmt.Errorf("%v -> %v: %w", from, to, errIllegalTransition)
}
