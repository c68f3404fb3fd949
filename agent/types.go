package agent

import (
	"errors"

	"github.com/redis-agent/redis-agent/apitype"
)

// Sentinel errors of the Service. Every error a Service method returns wraps
// at most one of them (matched with errors.Is); the API maps each to one HTTP
// status in one place. An error that wraps none of them is the agent's fault.
var (
	// ErrNotFound: the instance or binding does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the id exists with a different spec, or the instance is in
	// a state that does not allow the operation.
	ErrConflict = errors.New("conflict")
	// ErrInvalid: the request is well formed but its content is not valid
	// (bad id, unknown persistence mode, memory out of bounds).
	ErrInvalid = errors.New("invalid")
	// ErrCapacity: no free port or not enough memory budget left.
	ErrCapacity = errors.New("no capacity")
	// ErrNotReady: the instance's new redis-server did not become ready
	// (it exited, or did not answer in time); the supervisor keeps
	// restarting it, and the instance's log_tail says why.
	ErrNotReady = errors.New("not ready")
	// ErrStorage: the backup target (the bucket) failed or refused: not
	// reachable, credentials denied, full. The instance is untouched.
	ErrStorage = errors.New("backup storage failed")
)

// The types of the API live in apitype, which crosses the wire; the
// Service speaks them under these names.
type (
	Spec        = apitype.Spec
	Exit        = apitype.Exit
	Instance    = apitype.Instance
	Orphan      = apitype.Orphan
	Credentials = apitype.Credentials
	Capacity    = apitype.Capacity
	Rollout     = apitype.Rollout
)

// Rollout states.
const (
	RolloutIdle    = apitype.RolloutIdle
	RolloutRunning = apitype.RolloutRunning
	RolloutDone    = apitype.RolloutDone
	RolloutFailed  = apitype.RolloutFailed
)
