// Package apitype holds every type and constant that crosses the agent's
// REST API: request and response bodies, the error body and its codes,
// persistence modes, rollout states and header names. It imports only the
// standard library, so a consumer of the API (the client, a broker) does
// not pull in the agent's store, cgroups or Redis client. The agent, the
// API handlers and the client all use these, and nothing declares them
// again.
package apitype

import (
	"encoding/json"
	"time"
)

// Persistence modes of an instance.
const (
	PersistenceAOF       = "aof"        // appendonly, appendfsync everysec (default)
	PersistenceAOFAlways = "aof-always" // appendonly, appendfsync always
	PersistenceRDB       = "rdb"        // RDB snapshots on the usual save points
	PersistenceNone      = "none"       // nothing is written to disk
)

// Persistences lists the persistence modes, the default first.
var Persistences = []string{PersistenceAOF, PersistenceAOFAlways, PersistenceRDB, PersistenceNone}

// IsAOF reports whether mode keeps an append-only file.
func IsAOF(mode string) bool { return mode == PersistenceAOF || mode == PersistenceAOFAlways }

// Spec is what the broker asks for when it provisions an instance
// (PUT /v1/instances/{id}).
type Spec struct {
	// MemoryMB is the instance's maxmemory in MiB; 0 means the agent's default.
	MemoryMB int `json:"memory_mb"`
	// Persistence is one of aof, aof-always, rdb, none; "" means aof.
	Persistence string `json:"persistence"`
	// Metadata is an opaque JSON object the caller stores with the
	// instance and gets back with it (a broker keeps its plan, service and
	// context there, so it needs no database of its own); at most
	// MaxMetadataBytes. Part of what makes two provisions identical.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// ReplicaOf makes the new instance a replica of that primary: the
	// target of a move, until POST .../promote.
	ReplicaOf *Primary `json:"replica_of,omitempty"`
}

// Primary is where a move's target replicates from and how it logs in
// there: the answer of POST /v1/instances/{id}/move on the source, and
// Spec.ReplicaOf on the target.
type Primary struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	User     string `json:"user"`
	Password string `json:"password"`
}

// Replication is GET /v1/instances/{id}/replication.
type Replication struct {
	// Role is "master" or "replica".
	Role string `json:"role"`
	// Offset is a primary's replication offset, or how far a replica has
	// processed its primary's.
	Offset int64 `json:"offset"`
	// LinkUp and SyncInProgress are a replica's link to its primary.
	LinkUp         bool `json:"link_up"`
	SyncInProgress bool `json:"sync_in_progress"`
	// Replicas is how many replicas a primary has.
	Replicas int `json:"replicas"`
	// Persisted is false while the server still writes its data to disk
	// the first time (an AOF replica's rewrite after its sync): a move
	// cuts over only once its target has.
	Persisted bool `json:"persisted"`
}

// Cutover is the body of POST /v1/instances/{id}/move/cutover, and
// Offset its answer's: the source pauses writes for at most TimeoutMS,
// fences its tenants off, and says its final replication offset.
type Cutover struct {
	TimeoutMS int   `json:"timeout_ms"`
	Offset    int64 `json:"offset"`
}

// Promote is the body of POST /v1/instances/{id}/promote on a move's
// target: it waits at most TimeoutMS until it has processed Offset of its
// primary's stream, then becomes a primary.
type Promote struct {
	Offset    int64 `json:"offset"`
	TimeoutMS int   `json:"timeout_ms"`
}

// Forward is the body of POST /v1/instances/{id}/move/forward on a move's
// source: its redis-server goes and a forwarder to Host:Port holds its
// port for TTLSeconds, after which the instance is deleted.
type Forward struct {
	Host       string `json:"host"`
	Port       int    `json:"port"`
	TTLSeconds int    `json:"ttl_seconds"`
}

// MaxMetadataBytes bounds an instance's metadata (compacted JSON).
const MaxMetadataBytes = 8 << 10

// Resize is the body of PATCH /v1/instances/{id}: a new maxmemory, new
// metadata, or both.
type Resize struct {
	MemoryMB *int            `json:"memory_mb,omitempty"`
	Metadata json.RawMessage `json:"metadata,omitempty"`
}

// BindRequest is the optional body of PUT /v1/instances/{id}/bindings/{bid}.
type BindRequest struct {
	// Password, when set, is the binding's password instead of a new
	// random one: a move to another agent keeps the application's
	// credentials. At least MinPasswordBytes of printable ASCII, no
	// spaces.
	Password string `json:"password,omitempty"`
}

// MinPasswordBytes is the shortest password a BindRequest may set.
const MinPasswordBytes = 16

// Exit describes how a redis-server process ended.
type Exit struct {
	// Time the exit was noticed.
	Time time.Time `json:"time"`
	// Code is the exit status when the process exited by itself, else -1.
	Code int `json:"code"`
	// Signal names the signal that killed the process ("killed", ...), or "".
	Signal string `json:"signal,omitempty"`
	// Reason is why the agent thinks it ended: one of the Reason* values.
	Reason string `json:"reason"`
	// Message says more where the reason alone does not (why a spawn
	// failed).
	Message string `json:"message,omitempty"`
}

// Exit reasons.
const (
	ReasonCrash       = "crash"        // it exited or was killed by something else
	ReasonUnready     = "unready"      // it did not answer within the ready timeout
	ReasonManual      = "manual"       // a restart was asked for (or applies an ACL change)
	ReasonStopped     = "stopped"      // it was stopped for a delete
	ReasonHung        = "hung"         // it stopped answering and was replaced
	ReasonOOM         = "oom"          // its cgroup's memory limit killed it
	ReasonSpawnFailed = "spawn_failed" // it could not be started at all
)

// Instance states, as GET /v1/instances shows them.
const (
	StateStarting  = "starting"  // spawned, not yet answering
	StateRunning   = "running"   // answers
	StateBackoff   = "backoff"   // exited; waiting to start again
	StateCrashloop = "crashloop" // repeated fast failures; still retrying
	StateStopping  = "stopping"  // being deleted or restarted
	StateStopped   = "stopped"   // no process is supervised
)

// Instance is the view of one instance (GET /v1/instances/{id}).
type Instance struct {
	ID          string `json:"id"`
	State       string `json:"state"`
	MemoryMB    int    `json:"memory_mb"`
	Persistence string `json:"persistence"`
	Host        string `json:"host"`
	Port        int    `json:"port"`
	PID         int    `json:"pid,omitempty"`
	// UID is the uid and gid of the instance's own Redis user; 0 when it
	// runs as the shared one.
	UID       int       `json:"uid,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// UptimeSeconds is how long the current process has run; 0 when none runs.
	UptimeSeconds float64 `json:"uptime_seconds"`
	// Restarts counts the restarts of the process since the instance was created.
	Restarts int `json:"restarts"`
	// MemoryUsedBytes (INFO used_memory) and RSSBytes (the process's
	// resident memory) come from the last health check; 0 before one.
	MemoryUsedBytes int64    `json:"memory_used_bytes,omitempty"`
	RSSBytes        int64    `json:"rss_bytes,omitempty"`
	LastExit        *Exit    `json:"last_exit,omitempty"`
	Bindings        []string `json:"bindings"`
	// Binary is the redis-server executable the instance runs (or will
	// run at its next start).
	Binary string `json:"binary,omitempty"`
	// LogTail holds the last lines of the redis-server log while the
	// instance is not running: why it does not start.
	LogTail []string `json:"log_tail,omitempty"`
	// Metadata is what the provision (or a later PATCH) stored.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// RedisVersion is the version of the redis-server the instance runs,
	// when the agent knows it ("7.0.15").
	RedisVersion string `json:"redis_version,omitempty"`
	// Move is the source's side of a move in progress: its state
	// (replicating, cutover, forwarding) and, once forwarding, where to.
	Move *MoveStatus `json:"move,omitempty"`
	// ReplicaOf is set on a move's target until it is promoted.
	ReplicaOf string `json:"replica_of,omitempty"`
}

// MoveStatus is the source's side of a move, in the instance's view.
type MoveStatus struct {
	State string `json:"state"`
	// StartedAt is when the move began on the source, CutoverAt when its
	// cutover did (zero before).
	StartedAt time.Time `json:"started_at"`
	CutoverAt time.Time `json:"cutover_at,omitzero"`
	ForwardTo string    `json:"forward_to,omitempty"`
	// Forwarded counts the connections the forwarder holds now.
	Forwarded int64 `json:"forwarded,omitempty"`
}

// StateForwarding is the state of a moved instance whose old port
// forwards to its new place.
const StateForwarding = "forwarding"

// InstanceList is the body of GET /v1/instances.
type InstanceList struct {
	Instances []Instance `json:"instances"`
}

// Orphan is something on the machine that looks like an instance's but
// that no record owns. The agent reports orphans and never deletes them.
type Orphan struct {
	// Kind is "directory" or "process".
	Kind string `json:"kind"`
	ID   string `json:"id"`
	Path string `json:"path"`
	PID  int    `json:"pid,omitempty"`
}

// OrphanList is the body of GET /v1/orphans.
type OrphanList struct {
	Orphans []Orphan `json:"orphans"`
}

// Credentials are what a binding hands to the application
// (PUT /v1/instances/{id}/bindings/{bid}).
type Credentials struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	Username string `json:"username"`
	Password string `json:"password"`
	URI      string `json:"uri"`
}

// Capacity is what a broker needs to place the next instance on this VM
// (GET /v1/capacity). The memory reserved is the records' memory_mb and
// that of the restore loaders running (each its instance's memory_mb).
type Capacity struct {
	Instances        int `json:"instances"`
	PortsTotal       int `json:"ports_total"`
	PortsFree        int `json:"ports_free"`
	MemoryTotalMB    int `json:"memory_total_mb"`
	MemoryReservedMB int `json:"memory_reserved_mb"`
	MemoryFreeMB     int `json:"memory_free_mb"`
	// RedisVersion is the version of the configured redis-server, the one
	// new instances run.
	RedisVersion string `json:"redis_version"`
	// Draining is the brokers' mark (PUT /v1/drain): nothing new is to be
	// placed here. Kept by the agent so that every broker sees it.
	Draining bool `json:"draining"`
}

// LogLines is the body of GET /v1/instances/{id}/log.
type LogLines struct {
	ID    string   `json:"id"`
	Lines []string `json:"lines"`
}

// Status is the body of /healthz and /readyz when they pass.
type Status struct {
	Status string `json:"status"`
	// Details are what /readyz adds: the isolation the agent cannot give
	// on this host (no Landlock, no user per instance, ...).
	Details []string `json:"details,omitempty"`
}

// RolloutRequest is the optional body of POST /v1/rollout.
type RolloutRequest struct {
	// Instances, when set, limits the rollout to these instances.
	Instances []string `json:"instances,omitempty"`
}

// Rollout states.
const (
	RolloutIdle    = "idle"    // none has run since the agent started
	RolloutRunning = "running" // moving instances, one at a time
	RolloutDone    = "done"    // every instance runs the configured binary
	RolloutFailed  = "failed"  // an instance did not start on it; the rest wait
)

// Rollout is the progress of moving instances to the configured
// redis-server binary (GET and POST /v1/rollout).
type Rollout struct {
	State string `json:"state"`
	// Binary and Version are the configured redis-server: the target.
	Binary  string `json:"binary"`
	Version string `json:"version"`
	// Total is how many instances the rollout set out to move, Moved how
	// many it has moved.
	Total int `json:"total"`
	Moved int `json:"moved"`
	// Pending counts the instances not on the target binary now.
	Pending int `json:"pending"`
	// Current is the instance being moved.
	Current string `json:"current,omitempty"`
	// FailedInstance did not become ready on the target binary and runs on
	// its old one again; Error says why.
	FailedInstance string `json:"failed_instance,omitempty"`
	Error          string `json:"error,omitempty"`
	// MaxUnavailableSeconds is the longest time one instance was down
	// (graceful shutdown to ready on the new binary) in this rollout.
	MaxUnavailableSeconds float64    `json:"max_unavailable_seconds"`
	StartedAt             *time.Time `json:"started_at,omitempty"`
	FinishedAt            *time.Time `json:"finished_at,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	// Code is a stable, machine-readable name: one of the Code* values.
	Code string `json:"error"`
	// Description is a sentence for humans.
	Description string `json:"description"`
}

// Error codes.
const (
	CodeBadRequest           = "BadRequest"           // 400: malformed body, path or query
	CodeUnauthorized         = "Unauthorized"         // 401
	CodeNotFound             = "NotFound"             // 404
	CodeMethodNotAllowed     = "MethodNotAllowed"     // 405
	CodeConflict             = "Conflict"             // 409
	CodeGone                 = "Gone"                 // 410: a DELETE of what is absent
	CodeTooLarge             = "TooLarge"             // 413
	CodeUnsupportedMediaType = "UnsupportedMediaType" // 415
	CodeInvalid              = "Invalid"              // 422
	CodeInternal             = "Internal"             // 500
	CodeNotReady             = "NotReady"             // 503: the instance, or the agent, is not ready
	CodeNotAlive             = "NotAlive"             // 503: the agent's main loop stalls
	CodeBusy                 = "Busy"                 // 503 with Retry-After
	CodeInsufficientCapacity = "InsufficientCapacity" // 507
)

// Header names.
const (
	// SnapshotSHA256Header carries the hex sha256 of a snapshot: set on a
	// snapshot out, checked on a restore in when given.
	SnapshotSHA256Header = "X-Snapshot-Sha256"
	// RetryAfterHeader says, in seconds, when a Busy request may be tried
	// again.
	RetryAfterHeader = "Retry-After"
)
